"""``mics report``: the data the page is drawn from, the HTML file it is written to, and its size and speed
with 10,000 items. The run is real: simulated models through BatchRun, with bad input, model errors and
items no mentor step could rescue."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mics_agents.config import load_settings
from mics_agents.errors import InputError, ModelCallError
from mics_agents.models import FunctionModel, ModelRequest, ModelResponse
from mics_agents.models.simulated import simulated_reply
from mics_agents.report import build_report_data, render_html, write_report
from mics_agents.runner import BatchRun, RunOptions, run_id_for
from mics_agents.search import Searcher
from mics_agents.store import Store

MENTORS = ["sim/mentor-a", "sim/mentor-b", "sim/mentor-c"]
INTERNS = ["sim/intern-1", "sim/intern-2"]
XSS = '</script><img src=x onerror="alert(1)"><script>alert(2)</script>'
N_NORMAL = 30
N_MODEL_ERROR = 3
N_NO_PATH = 3


def _image(path: Path, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (320 + 8 * index, 240)
    if index % 5 == 0:  # a 16-bit grey scan, as DICOM exports often are
        image = Image.new("I;16", size)
        image.putdata([(x * 200 + y * 50 + index * 97) % 65536 for y in range(size[1]) for x in range(size[0])])
        image.save(path)
        return
    image = Image.new("RGB", size, ((index * 37) % 256, 90, 140))
    for x in range(60, 140):
        for y in range(80, 160):
            image.putpixel((x + index, y), (230, 230, 210))
    image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)


def _model(role: str, name: str) -> FunctionModel:
    """A simulated model that fails for cases marked FORCE-ERROR (intern 2) and answers every case marked
    FORCE-NOPATH wrongly (both interns), so a run has model errors and searches with no path."""

    def reply(request: ModelRequest) -> ModelResponse:
        text = request.messages[-1].plain_text()
        if role == "intern" and "FORCE-ERROR" in text and name.endswith("2"):
            raise ModelCallError(f"{name}: gave up after 6 attempts; HTTP 503 Service Unavailable", model=name)
        if role == "intern" and "FORCE-NOPATH" in text:
            reply_text = "### Step 1: Guessing.\n\n### The final answer is: Z. None of these"
        else:
            reply_text = simulated_reply(role, name, request)
        return ModelResponse(text=reply_text, model=name, input_tokens=120, output_tokens=40, cost_usd=0.0005)

    return FunctionModel(name, reply)


def make_run(folder: Path) -> dict[str, Path]:
    """A small real run: ``out.jsonl`` (successes), ``out_failed.jsonl`` (bad_input, model_error,
    no_path) and the images; returns their paths."""
    images = folder / "images"
    cases = []
    for index in range(N_NORMAL + N_MODEL_ERROR + N_NO_PATH):
        names = [f"case{index}/axial.{'jpg' if index % 2 and index % 5 else 'png'}"]
        if index % 4 == 0:
            names.append(f"case{index}/coronal.png")
        for number, name in enumerate(names):
            _image(images / name, index + number)
        marker = "FORCE-ERROR " if index >= N_NORMAL + N_NO_PATH else "FORCE-NOPATH " if index >= N_NORMAL else ""
        question = f"{marker}Case {index}: which finding best explains the lesion?\nA. Abscess\nB. Metastasis\nC. Cyst"
        if index == 7:
            question = f"Case 7 asks {XSS}?\nA. Abscess\nB. Metastasis\nC. Cyst"
        cases.append({
            "rid": f"case-{index:03d}",
            "messages": [{"role": "user", "content": f"**Question:** {question}"},
                         {"role": "assistant", "content": f"**Correct Answer:** {'ABC'[index % 3]}. {['Abscess', 'Metastasis', 'Cyst'][index % 3]}"}],
            "images": names,
            "presentation": f"Fever for {index} days",
            "age_label": "50", "gender_label": "Female",
            "caption": [f"<image> CT of case {index}."],
        })
    lines = [json.dumps(case) for case in cases]
    lines.append(json.dumps({"id": "bad-no-answer", "question": "Which lobe is affected?", "images": []}))
    lines.append('{"id": "bad-json", "question": "torn')
    lines.append(json.dumps({"id": "bad-image", "question": "What is shown?", "answer": "A cyst",
                             "images": ["nowhere/missing.png"]}))
    data = folder / "cases.jsonl"
    data.write_text("\n".join(lines) + "\n")

    output = folder / "out.jsonl"

    async def run() -> None:
        # Twice, as a user would after model errors: the rerun retries them, replaying their calls from the cache.
        async with await Store.open(folder / "cache.sqlite") as store:
            for _ in range(2):
                searcher = Searcher(
                    mentors=[_model("mentor", name) for name in MENTORS],
                    interns=[_model("intern", name) for name in INTERNS],
                    judge=_model("judge", "sim/judge"),
                    settings=load_settings(cache_path=None, seed=3),
                    store=store,
                    run_id=run_id_for(output),
                )
                await BatchRun(searcher, RunOptions(data=data, output=output, image_dir=images, concurrency=8)).run()

    asyncio.run(run())
    return {"output": output, "failed": folder / "out_failed.jsonl", "images": images, "data": data}


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def embedded_payload(html: str) -> dict:
    """The data a written page carries, decoded the way the page decodes it."""
    match = re.search(r'<script id="mics-data" type="application/x-gzip-base64">([A-Za-z0-9+/=\s]*)</script>', html)
    assert match, "the page embeds its data as base64 of gzip"
    return json.loads(gzip.decompress(base64.b64decode(match.group(1))))


WORDS = ("lesion nodule mass cyst oedema enhancement margin density signal lobe segment cortex duct vessel wall "
         "calcification necrosis haemorrhage effusion fracture stenosis thrombus abscess tumour infarct").split()


def scale_up(run: dict[str, Path], folder: Path, count: int, seed: int = 0) -> dict[str, Path]:
    """``count`` items made from the small run's lines under new ids, with words of their own in every
    question, step and answer (so that compression does not flatter the file size)."""
    import random

    rng = random.Random(seed)
    successes = run["output"].read_text().splitlines()
    failures = run["failed"].read_text().splitlines()
    templates = [(line, False) for line in successes] + [(line, True) for line in failures]
    output, failed = folder / "big.jsonl", folder / "big_failed.jsonl"

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(n))

    with open(output, "w") as out, open(failed, "w") as bad:
        for index in range(count):
            line, is_failure = templates[index % len(templates)]
            record = json.loads(line)
            record["rid"] = f"item-{index:05d}"
            if "key" in record:  # a failure line names its item by key
                record["key"] = record["rid"]
            search = record.get("search") if is_failure else record
            if search and "question" in search:
                search["question"] = f"[{index}] {words(12)}\n" + search["question"]
                for node in search["tree"]:
                    node["step"] += " " + words(20)
                    for sample in node["samples"]:
                        sample["answer"] += " " + words(2)
            (bad if is_failure else out).write(json.dumps(record) + "\n")
    return {"output": output, "failed": failed}


@pytest.fixture(scope="module")
def run_files(tmp_path_factory) -> dict[str, Path]:
    return make_run(tmp_path_factory.mktemp("report_run"))


@pytest.fixture(scope="module")
def report(run_files):
    return build_report_data(run_files["output"], image_dir=run_files["images"])


def test_the_run_has_every_kind_of_item(run_files):
    successes, failures = lines_of(run_files["output"]), lines_of(run_files["failed"])
    kinds = Counter(failure["error"]["kind"] for failure in failures)
    assert kinds["bad_input"] == 3 and kinds["model_error"] == N_MODEL_ERROR and kinds["no_path"] >= N_NO_PATH
    assert len(successes) + len(failures) == N_NORMAL + N_MODEL_ERROR + N_NO_PATH + 3
    assert all(failure["search"]["tree"] for failure in failures if failure["error"]["kind"] != "bad_input")


def test_counts_and_distributions_match_the_records(run_files, report):
    successes, failures = lines_of(run_files["output"]), lines_of(run_files["failed"])
    summary = report.summary
    assert summary["items"] == len(report.items) == len(successes) + len(failures)
    kinds = Counter(failure["error"]["kind"] for failure in failures)
    assert summary["status"] == {"success": len(successes), "no_path": kinds["no_path"],
                                 "model_error": kinds["model_error"], "bad_input": kinds["bad_input"],
                                 "internal_error": 0}
    assert summary["depth"] == dict(sorted(Counter(r["final_depth"] for r in successes).items()))
    assert sum(summary["trend"].values()) == len(successes)
    assert summary["trend"] == {trend: count for trend, count in summary["trend"].items() if count}
    assert Counter(summary["trend"]) == Counter(r["trend"] or "none" for r in successes)
    assert summary["search_id"] == dict(sorted(Counter(r["search_id"] for r in successes).items()))
    assert summary["unreadable_lines"] == 0


def test_winners_are_the_last_mentor_of_each_path(run_files, report):
    successes = lines_of(run_files["output"])
    wins = Counter(record["generated_by"][-1] for record in successes)
    assert report.summary["mentor_wins"] == {mentor: wins[mentor] for mentor in report.mentors}
    assert set(report.mentors) == set(MENTORS)
    by_rid = {item["rid"]: item for item in report.items}
    for record in successes:
        item = by_rid[record["rid"]]
        assert report.mentors[item["win"]] == record["generated_by"][-1]
        assert [report.mentors[m] for m in item["path"]] == record["generated_by"]
    mentors = report.summary["mentors"]
    assert sum(m["wins"] for m in mentors.values()) == len(successes)
    assert sum(m["candidates"] for m in mentors.values()) == sum(
        len(r["tree"]) for r in successes) + sum(len(f.get("search", {}).get("tree", [])) for f in lines_of(run_files["failed"]))


def test_intern_accuracy_counts_every_sample_of_every_tree(run_files, report):
    trees = [r["tree"] for r in lines_of(run_files["output"])]
    trees += [f["search"]["tree"] for f in lines_of(run_files["failed"]) if "search" in f]
    samples = [s for tree in trees for node in tree for s in node["samples"]]
    for intern in INTERNS:
        own = [s for s in samples if s["intern"] == intern]
        stats = report.summary["interns"][intern]
        assert stats["samples"] == len(own) > 0
        assert stats["correct"] == sum(s["correct"] for s in own)
        assert stats["accuracy"] == pytest.approx(stats["correct"] / stats["samples"])
        assert {row["temperature"] for row in stats["by_temperature"]} == {1.2, 0.3}
        assert sum(row["samples"] for row in stats["by_temperature"]) == len(own)
    assert sum(report.summary["judged_by"].values()) == len(samples)


def test_usage_sums_every_search(run_files, report):
    records = lines_of(run_files["output"]) + [f["search"] for f in lines_of(run_files["failed"]) if "search" in f]
    usage = report.summary["usage"]
    for key in ("calls", "cached_calls", "input_tokens", "output_tokens"):
        assert usage[key] == sum(r["usage"][key] for r in records)
    assert usage["calls"] > 0 and usage["cost_usd"] == pytest.approx(sum(r["usage"]["cost_usd"] for r in records))


def test_failures_keep_their_kind_message_tree_and_input(report):
    failures = [item for item in report.items if item["status"] != "success"]
    model_errors = [item for item in failures if item["status"] == "model_error"]
    assert all("HTTP 503" in item["err"] and item["tree"] and item["line"] for item in model_errors)
    no_paths = [item for item in failures if item["status"] == "no_path"]
    assert all(item["tree"] and all(node["sc"] == 0 for node in item["tree"] if node["d"] == item["depth"]) for item in no_paths)
    bad = {item["rid"]: item for item in failures if item["status"] == "bad_input"}
    assert "missing or empty" in bad["bad-no-answer"]["err"] and bad["bad-no-answer"]["q"] == "Which lobe is affected?"
    torn = bad[f"line-{N_NORMAL + N_MODEL_ERROR + N_NO_PATH + 2}"]
    assert "invalid JSON" in torn["err"] and '"bad-json"' in torn["input"]
    assert "missing.png" in bad["bad-image"]["err"] and bad["bad-image"]["img"] == ["nowhere/missing.png"]
    assert all(item["tree"] == [] and item["depth"] is None for item in bad.values())


def test_tree_nodes_keep_steps_scores_and_samples(run_files, report):
    record = lines_of(run_files["output"])[0]
    item = next(item for item in report.items if item["rid"] == record["rid"])
    for node, raw in zip(item["tree"], record["tree"], strict=True):
        assert (node["id"], node["p"], node["d"], node["s"], node["sc"], node["sel"]) == (
            raw["id"], raw["parent"], raw["depth"], raw["step"], raw["score"], int(raw["selected"]))
        assert report.mentors[node["m"]] == raw["mentor"]
        assert [[report.interns[s[0]], s[1], s[2], s[3], bool(s[4]), bool(s[5]), s[6]] for s in node["x"]] == [
            [s["intern"], s["temperature"], s["sample_index"], s["answer"], s["correct"], s["format_ok"], s["judged_by"]]
            for s in raw["samples"]]
    assert sum(node["sel"] for node in item["tree"]) == int(record["final_depth"])


def test_thumbnails_are_small_jpegs_embedded_once(run_files, report):
    referenced = {path for item in report.items for path in item["img"]}
    assert set(report.images) == referenced
    assert report.images["nowhere/missing.png"] is None
    assert any("1 of" in warning and "not found" in warning for warning in report.warnings)
    for path, url in report.images.items():
        if url is None:
            continue
        assert url.startswith("data:image/jpeg;base64,")
        with Image.open(__import__("io").BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
            assert max(image.size) <= 160
    assert sum(url is not None for url in report.images.values()) == len(referenced) - 1


def test_image_paths_cannot_leave_the_image_folder(tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (20, 20)).save(outside)
    images = tmp_path / "images"
    images.mkdir()
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"rid": "r", "question": "q", "gt_answer": "a", "images": ["../secret.png", str(outside)]}) + "\n")
    data = build_report_data(output, image_dir=images)
    assert data.images == {"../secret.png": None, str(outside): None}


def test_the_page_embeds_its_data_safely(run_files, tmp_path):
    page = tmp_path / "report.html"
    data = write_report(run_files["output"], page, image_dir=run_files["images"])
    html = page.read_text(encoding="utf-8")
    assert "onerror" not in html and "alert(" not in html, "no text of the data appears raw in the page"
    assert html.count("</script>") == html.count("<script")
    payload = embedded_payload(html)
    assert payload["summary"] == data.summary and len(payload["items"]) == len(data.items)
    xss_item = next(item for item in payload["items"] if item["rid"] == "case-007")
    assert XSS in xss_item["q"], "the payload survives as text, to be shown as text"
    # No network: a strict Content-Security-Policy, no external URL anywhere in the markup.
    assert "default-src 'none'" in html and not re.search(r"\b(src|href)\s*=\s*[\"']?(https?:)?//", html)
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")


def test_a_title_with_markup_is_escaped(run_files, tmp_path):
    data = build_report_data(run_files["output"], title="<b>run</b> & co")
    html = render_html(data)
    assert "<title>&lt;b&gt;run&lt;/b&gt; &amp; co</title>" in html and "<b>run</b>" not in html


def test_unreadable_lines_are_counted_not_fatal(tmp_path, run_files):
    output = tmp_path / "out.jsonl"
    output.write_text(run_files["output"].read_text() + '[1, 2]\n{"rid": "torn", "quest')
    data = build_report_data(output)
    assert data.summary["unreadable_lines"] == 2
    assert data.summary["items"] == len(lines_of(run_files["output"]))
    assert data.sources["failed"] is None and data.images == {}
    assert any("skipped 2 line(s)" in warning for warning in data.warnings)


def test_odd_records_still_make_a_page(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text("\n".join([
        '{"rid": "surrogate", "question": "lone \\ud800 half", "gt_answer": "\u80ba\u764c", "final_depth": "x"}',
        '{"rid": 7, "tree": [{"id": 0, "mentor": null, "samples": [{"intern": "i", "correct": true, "temperature": NaN}]}]}',
        '{}',
    ]) + "\n")
    data = build_report_data(output)
    payload = embedded_payload(render_html(data))
    assert [item["rid"] for item in payload["items"]] == ["surrogate", "7", "out.jsonl:3"]
    assert payload["items"][0]["a"] == "\u80ba\u764c" and payload["items"][0]["depth"] is None
    assert payload["summary"]["interns"]["i"]["accuracy"] == 1.0
    assert payload["items"][1]["tree"][0]["x"][0][1] is None, "NaN is not JSON: it becomes null"


def test_missing_files_are_input_errors(tmp_path, run_files):
    with pytest.raises(InputError, match="not found"):
        build_report_data(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="failed file"):
        build_report_data(run_files["output"], tmp_path / "nope_failed.jsonl")
    with pytest.raises(InputError, match="image folder"):
        build_report_data(run_files["output"], image_dir=tmp_path / "no-images")


def test_ten_thousand_items_build_fast_into_a_bounded_file(run_files, tmp_path):
    big = scale_up(run_files, tmp_path, 10_000)
    input_bytes = big["output"].stat().st_size + big["failed"].stat().st_size
    page = tmp_path / "big.html"
    # CPU time, not wall time: the build is one thread's work, and other jobs on the machine must not fail it.
    started = time.process_time()
    data = write_report(big["output"], page)
    elapsed = time.process_time() - started
    size = page.stat().st_size
    print(f"\n10,000 items: {input_bytes / 1e6:.1f} MB of JSONL -> {size / 1e6:.2f} MB of HTML in {elapsed:.2f} s")
    assert data.summary["items"] == 10_000
    assert elapsed < 6.0, f"building the page took {elapsed:.1f} s"
    assert size < 0.25 * input_bytes, "the page is a fraction of the run's files"


def test_the_same_run_gives_the_same_file(run_files, tmp_path):
    first, second = tmp_path / "a.html", tmp_path / "b.html"
    write_report(run_files["output"], first, image_dir=run_files["images"])
    write_report(run_files["output"], second, image_dir=run_files["images"])
    assert first.read_bytes() == second.read_bytes()


def test_the_cli_writes_the_report(run_files, tmp_path):
    from typer.testing import CliRunner

    from mics_agents.cli import app

    if "report" not in {command.name or command.callback.__name__ for command in app.registered_commands}:
        pytest.skip("`mics report` is not registered in mics_agents/cli.py yet")
    page = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(run_files["output"]), "--html", str(page),
                                      "--image-dir", str(run_files["images"])])
    assert result.exit_code == 0, result.output
    assert says(result.output, "success") and says(result.output, "report.html") and says(result.output, "not found")
    assert embedded_payload(page.read_text())["summary"]["items"] == N_NORMAL + N_MODEL_ERROR + N_NO_PATH + 3
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing.jsonl"), "--html", str(page)])
    assert result.exit_code == 1 and says(result.output, "missing.jsonl' not found")
    result = CliRunner().invoke(app, ["report", str(run_files["output"]), "--html", str(page), "--failed", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 1 and says(result.output, "failed file") and says(result.output, "none.jsonl")


def says(output: str, text: str) -> bool:
    """``text`` is in ``output`` however the console wrapped it (rich breaks lines at its width, which is
    the terminal's: at spaces, and inside a path longer than a line)."""
    return "".join(text.split()) in "".join(output.split())


# -- a run where nothing succeeded, and either file of a run given ----------------------------------------


def make_failed_run(folder: Path) -> Path:
    """A real run in which no item succeeds: every intern call fails for good (model_error), one line is not
    a usable case (bad_input). Returns the --output it was given."""
    cases = [{"id": f"fail-{index}", "question": f"Case {index}: which finding?\nA. Cyst\nB. Abscess",
              "answer": "A. Cyst", "images": []} for index in range(3)]
    data = folder / "cases.jsonl"
    data.write_text("\n".join([*map(json.dumps, cases), json.dumps({"id": "no-answer", "question": "Which lobe?"})]) + "\n")

    def broken(request: ModelRequest) -> ModelResponse:
        raise ModelCallError("sim/intern-1: gave up after 6 attempts; HTTP 503 Service Unavailable", model="sim/intern-1")

    output = folder / "allfail.jsonl"

    async def run() -> None:
        searcher = Searcher(
            mentors=[_model("mentor", name) for name in MENTORS[:2]],
            interns=[FunctionModel("sim/intern-1", broken)],
            judge=_model("judge", "sim/judge"),
            settings=load_settings(cache_path=None, seed=3),
        )
        await BatchRun(searcher, RunOptions(data=data, output=output, image_dir=folder, concurrency=2)).run()

    asyncio.run(run())
    return output


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory) -> Path:
    return make_failed_run(tmp_path_factory.mktemp("failed_run"))


def test_a_run_where_nothing_succeeded_is_reported_from_its_failed_file(failed_run):
    failed = failed_run.with_name("allfail_failed.jsonl")
    kinds = Counter(line["error"]["kind"] for line in lines_of(failed))
    assert kinds == {"model_error": 3, "bad_input": 1}, "the run really failed every item"
    assert not failed_run.exists() or not failed_run.read_text().strip(), "and wrote no success"
    data = build_report_data(failed_run)
    assert data.summary["status"]["success"] == 0
    assert data.summary["status"]["model_error"] == 3 and data.summary["status"]["bad_input"] == 1
    assert data.summary["items"] == 4 and {item["status"] for item in data.items} == {"model_error", "bad_input"}
    assert data.sources["failed"] == "allfail_failed.jsonl" and data.title == "MICS report: allfail.jsonl"
    assert embedded_payload(render_html(data))["summary"]["status"] == data.summary["status"]


def test_no_success_file_and_an_empty_one_read_alike(run_files, tmp_path):
    failed = tmp_path / "run_failed.jsonl"
    failed.write_bytes(run_files["failed"].read_bytes())
    expected = Counter(line["error"]["kind"] for line in lines_of(failed))
    missing = build_report_data(tmp_path / "run.jsonl")
    assert missing.sources["output"] is None and any("no item of this run succeeded" in w for w in missing.warnings)
    (tmp_path / "run.jsonl").write_text("")
    empty = build_report_data(tmp_path / "run.jsonl")
    assert empty.sources["output"] == "run.jsonl"
    for data in (missing, empty):
        assert {status: count for status, count in data.summary["status"].items() if count} == expected
        assert data.summary["status"]["success"] == 0 and data.summary["search_id"] == {}


def test_the_failed_file_given_as_the_output_reports_the_whole_run(run_files, report):
    by_failed = build_report_data(run_files["failed"], image_dir=run_files["images"])
    assert by_failed.summary == report.summary
    assert by_failed.sources == report.sources and by_failed.title == report.title


def test_failure_lines_are_never_counted_as_successes(run_files, tmp_path):
    """The failed file under a name that is not ``_failed.jsonl``, and failures pasted into a success file."""
    expected = Counter(line["error"]["kind"] for line in lines_of(run_files["failed"]))
    renamed = tmp_path / "failures.jsonl"
    renamed.write_bytes(run_files["failed"].read_bytes())
    data = build_report_data(renamed)
    assert data.summary["status"]["success"] == 0
    assert {status: count for status, count in data.summary["status"].items() if count} == expected
    assert any("are failures, not successes" in warning for warning in data.warnings)

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(run_files["output"].read_text() + run_files["failed"].read_text())
    data = build_report_data(mixed)
    assert data.summary["status"]["success"] == len(lines_of(run_files["output"]))
    assert sum(data.summary["status"].values()) - data.summary["status"]["success"] == sum(expected.values())


def test_an_output_really_named_failed_is_its_own_success_file(run_files, tmp_path):
    output = tmp_path / "x_failed.jsonl"  # the --output of a run, with its own failed file beside it
    output.write_bytes(run_files["output"].read_bytes())
    (tmp_path / "x_failed_failed.jsonl").write_bytes(run_files["failed"].read_bytes())
    data = build_report_data(output)
    assert data.summary["status"]["success"] == len(lines_of(run_files["output"]))
    assert data.sources == {"output": "x_failed.jsonl", "failed": "x_failed_failed.jsonl", "image_dir": None}


def test_a_folder_or_a_run_without_files_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="nor its failed file 'gone_failed.jsonl'"):
        build_report_data(tmp_path / "gone.jsonl")
    with pytest.raises(InputError, match="nor its failed file"):
        build_report_data(tmp_path / "gone_failed.jsonl")
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(InputError, match="not a file"):
        build_report_data(tmp_path / "folder.jsonl")


def test_the_cli_reports_an_all_failed_run_by_either_name(failed_run, tmp_path):
    from typer.testing import CliRunner

    from mics_agents.cli import app

    page = tmp_path / "report.html"
    for given in (failed_run, failed_run.with_name("allfail_failed.jsonl")):
        result = CliRunner().invoke(app, ["report", str(given), "--html", str(page)])
        assert result.exit_code == 0, result.output
        assert says(result.output, "4 items (0 success, 0 no_path, 3 model_error, 1 bad_input")
        assert embedded_payload(page.read_text())["summary"]["status"]["success"] == 0
        page.unlink()


def test_the_summary_counts_the_step_data_of_success_and_no_path_trees(run_files, report):
    """Step rows and pairs counted independently from the files: a scored node whose ancestors are scored is a
    row; siblings half a point apart are a pair (at most 3 per parent)."""
    successes, failures = lines_of(run_files["output"]), lines_of(run_files["failed"])
    searched = successes + [f["search"] for f in failures if f["error"]["kind"] == "no_path"]

    rows = good = pairs = 0
    gaps: Counter = Counter()
    for search in searched:
        by_parent: dict = {}
        for tree_node in search["tree"]:
            rows += 1
            good += tree_node["score"] > 0.5
            by_parent.setdefault(tree_node["parent"], []).append(tree_node["score"])
        for scores in by_parent.values():
            found = sorted((high - low for high in scores for low in scores if high - low >= 0.5 - 1e-9), reverse=True)[:3]
            pairs += len(found)
            gaps.update(f"{gap + 1e-9:.2f}" for gap in found)
    steps = report.summary["steps"]
    assert rows > 0 and pairs > 0
    assert steps["rows"] == rows and steps["labels"] == {"true": good, "false": rows - good}
    assert steps["pairs"] == pairs and steps["gap_histogram"] == dict(sorted(gaps.items()))
    assert steps["records"] == len(searched)
    assert steps["settings"] == {"label_threshold": 0.5, "pair_margin": 0.5, "max_pairs_per_node": 3}


def test_step_counts_leave_out_model_error_and_vanilla_trees(tmp_path):
    from .test_steps import failure, known_tree, node, record, write_lines

    write_lines(tmp_path / "out.jsonl", [
        record("ok"), record("vanilla", [node(0, None, 1, "m/a", 0.75, steps=["one", "two"])], strategy="vanilla"),
    ])
    write_lines(tmp_path / "out_failed.jsonl", [failure("cut", "model_error", known_tree()),
                                                failure("none", "no_path", known_tree()[:3])])
    steps = build_report_data(tmp_path / "out.jsonl").summary["steps"]
    assert steps["rows"] == 6 + 3 and steps["pairs"] == 3 + 1
    assert steps["records"] == 2 and steps["records_skipped"] == {"vanilla": 1}
