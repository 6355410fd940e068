"""``mics report`` and ``mics dataset build`` stream (issue 29): memory holds each item's key and byte offsets,
never its record, so four times the items costs a few bytes an item more, not four times the records. The
two passes over a file refuse one that a run compacted between them; the journal's rule still picks each
item's line (the last failure, a success over a failure); a torn last line is skipped."""

from __future__ import annotations

import base64
import gzip
import json
import random
import re
import tracemalloc
from pathlib import Path

import pytest

from mics_agents.dataset import BuildOptions, build_dataset, default_recipe
from mics_agents.errors import InputError
from mics_agents.report import build_report_data, render_html, write_report
from mics_agents.report import data as report_data

MENTORS = ["sim/mentor-a", "sim/mentor-b"]


def node(index: int, parent: int | None, width: int) -> dict:
    return {
        "id": index, "parent": parent, "depth": 1 if parent is None else 2, "mentor": MENTORS[index % 2],
        "step": f"### Step {index}: " + "lesion margin density " * width, "score": 0.5, "selected": index == 0,
        "samples": [{"intern": "sim/intern-1", "temperature": 0.7, "sample_index": n, "answer": f"B {n} é",
                     "correct": n % 2 == 0, "format_ok": True, "judged_by": "option"} for n in range(4)],
    }


def success(rid: str, width: int = 0) -> dict:
    """A search record like a run's, its tree's text ``width`` times longer. Every item asks the same question:
    the caches of parsed questions (bounded: answers.py, grading.py) would otherwise fill as items come."""
    return {
        "rid": rid, "images": [f"{rid}/axial.png"], "question": "Which finding?\nA. Cyst\nB. Abscess",
        "gt_answer": "B. Abscess", "reasoning": "### Step 1: Look.\n\n### The final answer is: B. Abscess",
        "scores": {MENTORS[0]: [1.0]}, "final_depth": "1", "generated_by": [MENTORS[0]], "search_id": "1",
        "mics_score": 1.0, "trend": "increasing", "strategy": "mics",
        "final_answer_grade": {"answer": "B. Abscess", "correct": True, "judged_by": "option"},
        "tree": [node(0, None, width), *(node(n, 0, width) for n in range(1, 6))],
        "usage": {"calls": 9, "cached_calls": 0, "input_tokens": 900, "output_tokens": 300, "cost_usd": 0.01},
    }


def failure(rid: str, kind: str = "model_error", note: str = "") -> dict:
    return {"rid": rid, "key": rid, "line": 1, "error": {"kind": kind, "message": f"{kind} {note}".strip()},
            "input": {"id": rid, "question": "q", "answer": "a"}}


def line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def write_run(folder: Path, items: int, width: int = 60) -> Path:
    """``items`` successes of about 13 KB and a failure for every tenth item (a retry that later succeeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / "out.jsonl"
    output.write_bytes(b"".join(line(success(f"item-{n:05d}", width)) for n in range(items)))
    (folder / "out_failed.jsonl").write_bytes(b"".join(line(failure(f"item-{n:05d}")) for n in range(0, items, 10)))
    return output


def peak_of(call) -> int:
    tracemalloc.start()
    try:
        call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def embedded_payload(html: str) -> dict:
    match = re.search(r'<script id="mics-data" type="application/x-gzip-base64">([A-Za-z0-9+/=\s]*)</script>', html)
    assert match
    return json.loads(gzip.decompress(base64.b64decode(match.group(1))))


# -- mics report ------------------------------------------------------------------------------------------


def test_the_report_holds_offsets_not_records(tmp_path):
    small, large = write_run(tmp_path / "n", 100), write_run(tmp_path / "4n", 400)
    record_bytes = small.stat().st_size // 100
    assert record_bytes > 12_000
    peaks = {}
    for name, output in (("n", small), ("4n", large)):
        peaks[name] = peak_of(lambda: write_report(output, output.with_suffix(".html")))
    payload = embedded_payload(large.with_suffix(".html").read_text(encoding="utf-8"))
    assert payload["summary"]["items"] == len(payload["items"]) == 400
    growth = peaks["4n"] - peaks["n"]
    # Holding the 300 extra records would be 300 x 13 KB of JSON, several times that as Python objects.
    assert growth < 300 * 1_000, f"300 more items cost {growth / 1e3:.0f} KB ({peaks})"
    assert peaks["4n"] < 12 * record_bytes + 3_000_000, f"peak {peaks['4n'] / 1e6:.1f} MB"


def one_shot_page(data) -> str:
    """The page as the report wrote it before it streamed: the whole payload dumped, gzipped and base64ed at once."""
    text = json.dumps(data.payload(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    encoded = base64.b64encode(gzip.compress(text.encode("utf-8", errors="replace"), compresslevel=5, mtime=0)).decode()
    lines = "\n".join(encoded[start:start + 4096] for start in range(0, len(encoded), 4096))
    page = render_html(data)
    head, _, rest = page.partition('type="application/x-gzip-base64">')
    return head + 'type="application/x-gzip-base64">' + lines + rest[rest.index("</script>"):]


def test_the_streamed_page_is_byte_for_byte_the_page_of_the_whole_payload(tmp_path):
    output = write_run(tmp_path, 60, width=30)
    rng = random.Random(0)
    with open(output, "ab") as handle:  # text that needs care: a lone surrogate, markup, non-ASCII
        handle.write(b'{"rid": "odd", "question": "lone \\ud800 half </script>", "gt_answer": "\xe8\x82\xba"}\n')
        for index in range(20):  # text that does not compress: the data spans many lines of the page
            handle.write(line({**success(f"noise-{index}"), "reasoning": rng.randbytes(3000).hex()}))
    page = tmp_path / "report.html"
    written = write_report(output, page, title="a title with __DATA__ in it")
    data = build_report_data(output, title="a title with __DATA__ in it")
    text = page.read_text(encoding="utf-8")
    assert text == one_shot_page(data) == render_html(data)
    assert text.count("\n") > 40, "the data spans many lines of the page"
    assert written.summary == data.summary and list(written.items) == data.items and len(written.items) == 81


def test_the_report_reads_each_items_standing_line_by_the_rule(tmp_path):
    output, failed = tmp_path / "out.jsonl", tmp_path / "out_failed.jsonl"
    output.write_bytes(line(success("a")) + line({**success("a"), "question": "again"}) + line(success("b"))
                       + b'{"rid": "torn", "question": "cut off by a crash')
    failed.write_bytes(line(failure("b")) + line(failure("c", note="first")) + line(failure("c", "no_path", "last"))
                       + line(failure("d")))
    page = tmp_path / "report.html"
    data = write_report(output, page)
    shown = {item["rid"]: (item["status"], item["q"][:9], item.get("err", ""))
             for item in embedded_payload(page.read_text(encoding="utf-8"))["items"]}
    # a: its first success stands (the rule), not the repeat; c: its last failure; b: its success over its failure
    assert shown == {"a": ("success", "Which fin", ""), "b": ("success", "Which fin", ""),
                     "c": ("no_path", "q", "no_path last"), "d": ("model_error", "q", "model_error")}
    assert data.summary["unreadable_lines"] == 1 and any("skipped 1 line" in warning for warning in data.warnings)


def test_a_file_compacted_between_the_two_passes_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    output = tmp_path / "out.jsonl"
    output.write_bytes(line(failure("a")) + line(success("a")) + line(success("b")))
    scan_run = report_data._scan_run

    def scan_then_compact(*args):
        scan = scan_run(*args)
        replacement = tmp_path / "compacted"
        replacement.write_bytes(line(success("a")) + line(success("b")))
        replacement.replace(output)
        return scan

    monkeypatch.setattr(report_data, "_scan_run", scan_then_compact)
    page = tmp_path / "report.html"
    with pytest.raises(InputError, match="changed while it was being read .* Run mics report again"):
        write_report(output, page)
    assert not page.exists() and [path.name for path in tmp_path.iterdir()] == ["out.jsonl"], "no page, no scratch file"

    from typer.testing import CliRunner

    from mics_agents.cli import app

    result = CliRunner().invoke(app, ["report", str(output), "--html", str(page)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "changedwhileitwasbeingread" in "".join(result.output.split())


def test_a_run_that_grows_between_the_passes_is_reported_as_it_was_first_read(tmp_path, monkeypatch):
    output = write_run(tmp_path, 5, width=1)
    scan_run = report_data._scan_run

    def scan_then_append(*args):
        scan = scan_run(*args)
        with open(output, "ab") as handle:  # a run still going appends its next item
            handle.write(line(success("late")))
        return scan

    monkeypatch.setattr(report_data, "_scan_run", scan_then_append)
    data = write_report(output, tmp_path / "report.html")
    assert data.summary["items"] == 5


# -- mics dataset build ------------------------------------------------------------------------------------


def write_build_input(folder: Path, items: int, width: int = 120) -> BuildOptions:
    """``items`` cases and their MICS records of about 20 KB, which quality control drops (their trend
    fluctuates): what the build holds of them is then what it reads, not what it writes."""
    folder.mkdir(parents=True, exist_ok=True)
    mics = folder / "mics.jsonl"
    mics.write_bytes(b"".join(line({**success(f"item-{n:05d}", width), "final_depth": "2", "trend": "fluctuating"})
                              for n in range(items)))
    cases = folder / "cases.jsonl"
    cases.write_bytes(b"".join(line({"id": f"item-{n:05d}", "question": "Which finding?", "answer": "B"})
                               for n in range(items)))
    (folder / "images").mkdir(exist_ok=True)
    return BuildOptions(mics=[mics], cases=cases, image_dir=folder / "images", output=folder / "dataset",
                        recipe=default_recipe())


def test_the_dataset_build_holds_offsets_not_records(tmp_path):
    build_dataset(write_build_input(tmp_path / "warm", 20))  # imports (datasets, matplotlib) out of the count
    small, large = write_build_input(tmp_path / "n", 50), write_build_input(tmp_path / "4n", 200)
    record_bytes = small.mics[0].stat().st_size // 50
    assert record_bytes > 20_000
    peaks = {}
    for name, options in (("n", small), ("4n", large)):
        report = None

        def build(options=options):
            nonlocal report
            report = build_dataset(options)

        peaks[name] = peak_of(build)
        assert report.drops["qc"] == {"trend_fluctuating": len(options.mics[0].read_bytes().splitlines())}
    growth = peaks["4n"] - peaks["n"]
    # Holding the 150 extra records would be 150 x 20 KB of JSON, several times that as Python objects; what
    # grows is each item's key and offsets, its case id and where its case's line is (read back for Part 2).
    assert growth < 150 * 6_000, f"150 more items cost {growth / 1e3:.0f} KB ({peaks})"


def write_kept_build_input(folder: Path, items: int) -> BuildOptions:
    """``items`` cases that each become training samples: a MICS path quality control keeps (its reasoning
    about 6 KB), a case with two captioned images (two Part 2 units, ten copies in stage 2 and five in
    stage 3), and a text QA question (Part 1)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = folder / "images"
    for n in range(items):
        for view in ("axial", "coronal"):
            (images / f"item-{n:05d}").mkdir(parents=True, exist_ok=True)
            colour = (n % 256, n // 256, 1 if view == "axial" else 2)
            Image.new("RGB", (40, 36), color=colour).save(images / f"item-{n:05d}" / f"{view}.png")
    reasoning = "### Step 1: case {n}: " + "the margin is irregular and enhancing; " * 150 + "\n\n### The final answer is: B. Abscess"
    mics = folder / "mics.jsonl"
    mics.write_bytes(b"".join(line({**success(f"item-{n:05d}", 60), "reasoning": reasoning.format(n=n)})
                              for n in range(items)))
    cases = folder / "cases.jsonl"
    cases.write_bytes(b"".join(line({
        "id": f"item-{n:05d}", "question": "Which finding?", "answer": "B", "images": [f"item-{n:05d}/axial.png",
                                                                                     f"item-{n:05d}/coronal.png"],
        "caption": [f"<image> Axial CT {n}: " + "a rim-enhancing collection; " * 40,
                    f"<image> Coronal CT {n}: " + "no free air; " * 40],
        "case_info": "Fever and right upper quadrant pain. " * 30,
    }) for n in range(items)))
    text_qa = folder / "text_qa.jsonl"
    text_qa.write_bytes(b"".join(line({"id": f"item-{n:05d}-qa0", "case_id": f"item-{n:05d}",
                                       "question": f"Q{n}?\nA. a\nB. b", "answer": "B. b",
                                       "rationale": "Because b. " * 100}) for n in range(items)))
    return BuildOptions(mics=[mics], cases=cases, image_dir=images, output=folder / "dataset",
                        recipe=default_recipe(), text_qa=text_qa)


def test_the_dataset_build_holds_each_samples_ids_not_its_texts(tmp_path):
    """A build that keeps every item (Part 3, two Part 2 units repeated 15 times across the stages, Part 1)
    holds a few hundred bytes per sample and copy (ids, image paths, where its texts are spilled), never the
    texts (6 KB of reasoning, 2 KB of captions per unit), the records or the stages' rows (hf/ is read back
    from messages.jsonl)."""
    build_dataset(write_kept_build_input(tmp_path / "warm", 10))
    small, large = write_kept_build_input(tmp_path / "n", 50), write_kept_build_input(tmp_path / "4n", 200)
    peaks, reports = {}, {}
    for name, options in (("n", small), ("4n", large)):

        def build(options=options, name=name):
            reports[name] = build_dataset(options)

        peaks[name] = peak_of(build)
    report = reports["4n"]
    assert report.drops.get("qc") is None and report.stages["stage3"] > 200 * (1 + 2 * 5) * 0.9, report
    from datasets import load_from_disk

    assert len(load_from_disk(str(large.output / "stage2" / "hf"))) == report.stages["stage2"]
    growth = peaks["4n"] - peaks["n"]
    # Per item: 1 + 2 x 15 + 2 samples and copies in the stages (one sample's texts alone are 2-6 KB).
    assert growth < 150 * 15_000, f"150 more items cost {growth / 1e3:.0f} KB ({peaks})"


def test_text_qa_is_read_as_mics_output_is_one_standing_record_per_item_and_errors_name_the_line(tmp_path):
    options = write_kept_build_input(tmp_path / "ok", 4)
    text_qa = options.text_qa
    rows = text_qa.read_bytes().splitlines(keepends=True)
    # A repeat of item 0 (a run not compacted yet): the one the journal's rule keeps stands, once.
    from mics_agents.outputs import settle

    text_qa.write_bytes(b"".join(rows) + line({**json.loads(rows[0]), "rationale": "Second thoughts."}))
    standing = settle([json.loads(row) for row in text_qa.read_bytes().splitlines()], [])[0]
    rationale = next(record["rationale"] for record in standing if record["id"] == "item-00000-qa0")
    build_dataset(options)
    part1 = [json.loads(row) for row in (options.output / "stage1" / "messages.jsonl").read_text().splitlines()
             if json.loads(row)["source"] == "part1_text_qa"]
    held_out = {row["case_id"] for row in map(json.loads, (options.output / "test" / "messages.jsonl").read_text().splitlines())}
    first = [row for row in part1 if row["id"] == "item-00000-qa0-qa"]
    assert len(first) == (0 if "item-00000" in held_out else 1)
    assert len(standing) == 4 and all(rationale.strip() in row["messages"][1]["content"][0]["text"] for row in first)
    text_qa.write_bytes(rows[0] + b'{"id": "torn", "question": "cut\n')
    with pytest.raises(InputError, match=r"text_qa.jsonl:2: invalid JSON in the text QA file"):
        build_dataset(options)


def test_a_mics_file_compacted_between_the_two_passes_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from mics_agents.dataset import build as build_module

    options = write_build_input(tmp_path, 3, width=1)
    mics = options.mics[0]
    mics.write_bytes(mics.read_bytes() + mics.read_bytes())  # a run not compacted yet: each item twice
    standing_mics = build_module._standing_mics

    def first_pass_then_compact(paths):
        standing = standing_mics(paths)
        replacement = tmp_path / "compacted"
        replacement.write_bytes(b"".join(mics.read_bytes().splitlines(keepends=True)[:3]))
        replacement.replace(mics)
        return standing

    monkeypatch.setattr(build_module, "_standing_mics", first_pass_then_compact)
    with pytest.raises(InputError, match="mics.jsonl changed while the build read it .* Build again"):
        build_dataset(options)
    assert not options.output.exists()


def test_a_torn_last_line_of_mics_output_is_an_input_error_naming_the_line(tmp_path):
    options = write_build_input(tmp_path, 2, width=1)
    with open(options.mics[0], "ab") as handle:
        handle.write(b'{"rid": "torn", "question": "cut off')
    with pytest.raises(InputError, match=r"mics.jsonl:3: invalid JSON in the MICS output file"):
        build_dataset(options)
    options.mics[0].write_bytes(b'{"rid": "x", "question": "\xff"}\n')
    with pytest.raises(InputError, match=r"mics.jsonl:1: invalid JSON in the MICS output file \(not UTF-8\)"):
        build_dataset(options)


def test_step_records_of_a_failed_file_replaced_between_the_passes_are_refused(tmp_path):
    from mics_agents.dataset import read_step_records

    output = tmp_path / "out.jsonl"
    output.write_bytes(line(success("a", 1)) + line(success("b", 1)))
    failed = tmp_path / "out_failed.jsonl"
    no_path = {**failure("c", "no_path"), "search": success("c", 1)}
    failed.write_bytes(line(failure("c")) + line(no_path))
    records = read_step_records([output])
    assert next(records)[1]["rid"] == "a"  # the first pass is over: each standing line's offsets are kept
    replacement = tmp_path / "compacted"
    replacement.write_bytes(line(no_path))
    replacement.replace(failed)
    with pytest.raises(InputError, match="out_failed.jsonl changed while it was being read"):
        list(records)
    # Read whole, the same files give each item's standing record.
    assert [(source, record["rid"]) for source, record in read_step_records([output])] == \
        [("out.jsonl", "a"), ("out.jsonl", "b"), ("out.jsonl", "c")]


def test_a_missing_run_makes_no_folder_for_its_page(tmp_path):
    with pytest.raises(InputError, match="not found"):
        write_report(tmp_path / "none.jsonl", tmp_path / "pages" / "report.html")
    assert not (tmp_path / "pages").exists()
