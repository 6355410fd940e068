"""Hostile input through the real ``mics run`` (issue 15): every line of a corpus built to break the reader,
the parser, the image loader and the journal ends with exactly one record, the run exits 0, its memory
stays bounded, a rerun sends nothing, and failed lines written under the made-up keys of earlier versions
are still recognised.

The run's peak RSS is read from the kernel as it exits (VmHWM of its own address space).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mics_agents.data import MAX_LINE_BYTES, duplicate_key, made_up_key

from .openai_server import OpenAIServer, simulated_brain
from .test_run_process import MICS, RUN_TIMEOUT, failed_path, mics_env, read_jsonl, write_png

# Four 6,000 x 6,000 RGB images (36 M pixels each, under the 40 M cap) decoded by four items at once take
# the run to ~930 MB (measured; ~220 MB without them); the process-wide decode budget (400 MB) lets two of
# them decode together, and the run peaks near 580 MB. The bound sits between the two.
PEAK_RSS_BOUND_MB = 700
BIG_SIDE = 6000


def big_png(path: Path, seed: int, mode: str = "RGB", side: int = BIG_SIDE) -> None:
    """A large image that compresses to a few hundred kB (flat colour with a mark, so each one differs)."""
    from PIL import Image

    image = Image.new(mode, (side, side), (seed * 40 % 256, 90, 30) if mode == "RGB" else 0)
    image.putpixel((seed, seed), (255, 255, 255) if mode == "RGB" else 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def plain(rid, question=None, answer="Brain abscess", images=None, **fields) -> dict:
    question = question or f"What is the most likely diagnosis for case {str(rid)[:40]}?"
    record = {"id": rid, "question": question, "answer": answer, "images": images or ["ok.png"], **fields}
    return {key: value for key, value in record.items() if value is not None}


def chiron(rid: str, images: list[str], **fields) -> dict:
    return {
        "rid": rid,
        "messages": [{"role": "user", "content": f"**Question:** What is the most likely diagnosis for case {rid}?"},
                     {"role": "assistant", "content": "**Correct Answer:** Brain abscess"}],
        "images": images, "presentation": "Fever and headache.", "age_label": "40", "gender_label": "Male",
        "caption": ["<image> A ring-enhancing lesion."], **fields,
    }


def line(record: dict) -> bytes:
    return json.dumps(record).encode()


SEARCHED = "searched"  # success or no_path: the item reached the search


def build_corpus(folder: Path) -> tuple[Path, Path, dict[str, tuple[str, list[str]]], int]:
    """The input file, its image folder, and per expected key: (kind, fragments of its message)."""
    images = folder / "images"
    write_png(images / "ok.png", 24, 24, seed=1)
    for index in range(4):
        big_png(images / f"big{index}.png", seed=index + 1)
    big_png(images / "bomb.png", seed=1, mode="L", side=8900)  # 79.2 M pixels: the PNG
    (images / "loop-a.png").symlink_to("loop-b.png")
    (images / "loop-b.png").symlink_to("loop-a.png")

    rows: list[tuple[bytes, str | None, str | None, list[str]]] = []  # (bytes, key, kind, fragments)

    def add(raw: bytes, key: str | None, kind: str | None, *fragments: str, ending: bytes = b"\n") -> int:
        rows.append((raw + ending, key, kind, list(fragments)))
        return len(rows)

    add(b"\xef\xbb\xbf" + line(chiron("ok-1", ["ok.png"])), "ok-1", SEARCHED, ending=b"\r\n")  # BOM, CRLF
    n = len(rows) + 1
    add(line(chiron("caption-5", ["ok.png"], caption=5)), "caption-5", "bad_input",
        f"line {n}:", "field 'caption' must be a string or a list of strings", "got 5")
    n = len(rows) + 1
    add(line(plain("case-info-caption-5", case_info={"caption": 5})), "case-info-caption-5", "bad_input",
        f"line {n}:", "field 'case_info.caption'")
    n = len(rows) + 1
    add(b'{"id": "surrogate-question", "question": "a \\ud800 b", "answer": "x", "images": ["ok.png"]}',
        "surrogate-question", "bad_input", f"line {n}:", "field 'question' holds a lone surrogate '\\ud800'")
    n = len(rows) + 1
    add(b'{"id": "surrogate-\\udfff", "question": "q", "answer": "x"}', made_up_key(n), "bad_input",
        f"line {n}:", "field 'id' holds a lone surrogate")
    n = len(rows) + 1
    add(line(plain("nul-path", images=["a\u0000b.png"])), "nul-path", "bad_input",
        f"line {n}:", "field 'images[0]'", "control character '\\x00'")
    n = len(rows) + 1
    add(line(plain("long-path", images=["d" * 5000 + ".png"])), "long-path", "bad_input",
        f"line {n}:", "is 5,004 characters long; an image path may have at most 1024")
    n = len(rows) + 1
    add(line(plain("symlink-loop", images=["loop-a.png"])), "symlink-loop", "bad_input",
        f"line {n}:", "image path 'loop-a.png' cannot be used", "ymlink loop")
    n = len(rows) + 1
    add(b"[" * 100_000, made_up_key(n), "bad_input", f"line {n}:", "nested deeper than 64 levels")
    unparsable = len(rows) + 1
    add(b'{"id": "broken", "question": "What?"', made_up_key(unparsable), "bad_input",
        f"line {unparsable}:", "invalid JSON")
    # A real item whose id is the one earlier versions made up for the unparsable line: both must stand.
    add(line(plain(f"line-{unparsable}")), f"line-{unparsable}", SEARCHED)
    add(line(plain(12345)), "12345", SEARCHED)
    add(line(plain(7.5)), "7.5", SEARCHED)
    add(line(plain(-3)), "-3", SEARCHED)
    n = len(rows) + 1
    add(line(plain(True)), made_up_key(n), "bad_input", f"line {n}:", "field 'id' must be a string or a number, got bool")
    n = len(rows) + 1
    add(line(plain(None)), f"line-{n}", SEARCHED)  # no id: made up from the line, as always
    n = len(rows) + 1
    add(line(plain("")), f"line-{n}", SEARCHED)
    n = len(rows) + 1
    add(line(plain([1, 2])), made_up_key(n), "bad_input", f"line {n}:", "got list [1, 2]")
    n = len(rows) + 1
    add(line(plain({"a": 1})), made_up_key(n), "bad_input", f"line {n}:", "got dict")
    n = len(rows) + 1
    add(line(plain("x" * 600)), made_up_key(n), "bad_input", f"line {n}:", "600 characters long; an id may have at most 512")
    n = len(rows) + 1
    add(line(plain("tab\there")), made_up_key(n), "bad_input", f"line {n}:", "control character '\\t'")
    n = len(rows) + 1
    add(b'\xff\xfe{"id": "latin-1"}', made_up_key(n), "bad_input", f"line {n}:", "not UTF-8 text (byte 0xff")
    n = len(rows) + 1
    add(b'{"id": "huge", "question": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}', made_up_key(n), "bad_input",
        f"line {n}:", "longer than 16 MiB")
    for index in range(4):
        add(line(plain(f"big-{index}", images=[f"big{index}.png"])), f"big-{index}", SEARCHED)
    n = len(rows) + 1
    add(line(plain("bomb", images=["bomb.png"])), "bomb", "bad_input",
        f"line {n}:", "is 8900x8900 = 79,210,000 pixels, above the cap of 40,000,000 (MICS_IMAGE_MAX_PIXELS)")
    # Line and paragraph separators are text, not line ends (str.splitlines would split on them).
    add(line(plain("separators", question="What is shown?\u2028Second line\u0085third", answer="Brain\u2028abscess")),
        "separators", SEARCHED)
    add(b"   ", None, None)  # blank: skipped, but counted in line numbers
    n = len(rows) + 1
    add(line(plain("ok-1")), duplicate_key("ok-1", n), "bad_input", f"line {n}:", "duplicate id 'ok-1' (first seen on line 1)")
    add(line(chiron("last-no-newline", ["ok.png"])), "last-no-newline", SEARCHED, ending=b"")

    data = folder / "corpus.jsonl"
    data.write_bytes(b"".join(raw for raw, _, _, _ in rows))
    expected = {key: (kind, fragments) for _, key, kind, fragments in rows if key is not None}
    return data, images, expected, len(rows)


def brain_with_separators(model: str, body: dict) -> str:
    """The simulated models, with U+2028 and U+0085 inside every mentor reply (as real models write them)."""
    reply = simulated_brain(model, body)
    return reply.replace("### Step 1:", "### Step 1: \u2028(see\u0085below)") if "mentor" in model else reply


# The run's own peak resident memory, from the kernel (VmHWM of its address space, written as it exits).
# Not ru_maxrss: on Linux a child's ru_maxrss starts at its parent's RSS (kept across the exec), so it would
# measure pytest, not mics.
_MEASURED = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def record():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(out, "w") as handle:
        handle.write(peak)
atexit.register(record)
sys.argv[0] = "mics"
runpy.run_module("mics_agents", run_name="__main__", alter_sys=True)
"""


def run_measured(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, float, str]:
    """Run ``mics``; (exit code, peak RSS in MB of that process, stderr)."""
    stamp = time.monotonic_ns()
    stderr, peak = cwd / f"stderr-{stamp}.txt", cwd / f"peak-{stamp}.txt"
    with open(stderr, "wb") as err:
        result = subprocess.run([sys.executable, "-c", _MEASURED, str(peak), *args], env=env, cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=err, timeout=RUN_TIMEOUT)
    return result.returncode, int(peak.read_text()) / 1024, stderr.read_text(encoding="utf-8", errors="replace")


def read_bytes(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def records_by_key(successes: bytes, failures: bytes) -> dict[str, dict]:
    """The records of OUT and OUT_failed (as bytes) by item key, split on newlines only; fails on an item
    with two lines."""
    by_key: dict[str, dict] = {}
    for data, field in ((successes, "rid"), (failures, "key")):
        assert not data or data.endswith(b"\n")
        for raw in data.split(b"\n")[:-1]:
            record = json.loads(raw)
            assert record[field] not in by_key, f"{record[field]!r} has two lines"
            by_key[record[field]] = record
    return by_key


def to_legacy(record: dict) -> dict:
    """A failed-file line as versions before this one wrote it: made-up keys ``line-N`` (or the str() of an id
    refused today, like ``True``) and ``ID@lineN``, the item's input nested under ``input``."""
    if "input" not in record:  # earlier versions nested the item's input under "input"
        from mics_agents.data import FAILURE_FIELDS, failure_input

        record = {**{k: v for k, v in record.items() if k in FAILURE_FIELDS}, "rid": record["rid"],
                  "input": failure_input(record)}
    key, number = record["key"], record["line"]
    if key == made_up_key(number):
        raw = record.get("input")
        value = raw.get("rid", raw.get("id")) if isinstance(raw, dict) else None
        old = str(value) if value not in (None, "") else f"line-{number}"
        return {**record, "rid": old, "key": old}
    if key == duplicate_key(record["rid"], number):
        return {**record, "key": f"{record['rid']}@line{number}"}
    return record


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/status and symlink loops as on Linux")
def test_every_hostile_line_ends_with_one_record_the_run_exits_0_and_memory_stays_bounded(tmp_path):
    data, image_dir, expected, line_count = build_corpus(tmp_path / "data")
    output, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    args = ["run", str(data), "--image-dir", str(image_dir), "--output", str(output), "--cache", str(cache),
            "--concurrency", "8", "--seed", "1"]

    with OpenAIServer(brain_with_separators, lifetime=240) as server:
        env = mics_env(server, MICS_MAX_DEPTH="2")
        code, peak_mb, stderr = run_measured(args, env, tmp_path)
        first_requests = server.count()
        assert server.errors == []
        assert code == 0, stderr
        first_output, first_failed = read_bytes(output), read_bytes(failed_path(output))

        # A rerun reads everything back (U+2028 inside lines included) and has nothing to do.
        server.reset()
        again, _, again_err = run_measured(args, env, tmp_path)
        assert again == 0, again_err
        assert server.count() == 0
        assert read_bytes(output) == first_output and read_bytes(failed_path(output)) == first_failed

        # Failed lines written under the made-up keys of earlier versions count as those lines' records.
        legacy = [to_legacy(record) for record in read_jsonl(failed_path(output))]
        assert any(record["key"] == f"line-{record['line']}" for record in legacy)
        assert any(record["key"] == f"ok-1@line{record['line']}" for record in legacy)
        failed_path(output).write_text("".join(json.dumps(record) + "\n" for record in legacy), encoding="ascii")
        legacy_bytes = failed_path(output).read_bytes()
        upgraded, _, upgraded_err = run_measured(args, env, tmp_path)
        assert upgraded == 0, upgraded_err
        assert server.count() == 0
        assert failed_path(output).read_bytes() == legacy_bytes, "nothing appended: every old line was recognised"

    # Exactly one record per non-blank line, each the kind expected, each message naming line, field, value.
    first = records_by_key(first_output, first_failed)
    assert sorted(first, key=str) == sorted(expected, key=str)
    assert len(first) == line_count - 1  # every line but the blank one
    for key, (kind, fragments) in expected.items():
        record = first[key]
        if kind == SEARCHED:
            assert "error" not in record or record["error"]["kind"] == "no_path", (key, record.get("error"))
        else:
            assert record["error"]["kind"] == kind, (key, record["error"])
            for fragment in fragments:
                assert fragment in record["error"]["message"], (key, fragment, record["error"]["message"])
    # The line that cannot be parsed and the real item with the id once made up for it are two items.
    unparsable = next(key for key, (_, fragments) in expected.items() if "invalid JSON" in fragments)
    number = first[unparsable]["line"]
    assert first[unparsable]["rid"] is None and first[f"line-{number}"]["rid"] == f"line-{number}"
    # Replies with U+2028 / U+0085 were written inside their lines and read back by the rerun above.
    assert "\u2028".encode() in first_output + first_failed and "\u0085".encode() in first_output + first_failed
    assert any(kind == "success" for kind in (("error" in r and r["error"]["kind"]) or "success" for r in first.values()))
    assert first_requests > 0
    print(f"peak RSS of the run: {peak_mb:.0f} MB")
    assert peak_mb < PEAK_RSS_BOUND_MB, f"peak RSS {peak_mb:.0f} MB above {PEAK_RSS_BOUND_MB} MB"


def test_a_file_holding_only_a_byte_order_mark_has_no_items(tmp_path):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf")
    crlf = tmp_path / "bom-crlf.jsonl"
    crlf.write_bytes(b"\xef\xbb\xbf\r\n\r\n")
    with OpenAIServer(lifetime=60) as server:
        env = mics_env(server)
        for path in (data, crlf):
            output = tmp_path / f"{path.stem}-out.jsonl"
            result = subprocess.run([*MICS, "run", str(path), "--output", str(output), "--cache",
                                     str(tmp_path / "c.sqlite"), "--json-summary", str(tmp_path / "s.json")],
                                    env=env, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT)
            assert result.returncode == 0, result.stderr
            summary = json.loads((tmp_path / "s.json").read_text())
            assert summary["total"] == 0 and summary["ended_now"] == 0
            assert read_jsonl(output) == [] and read_jsonl(failed_path(output)) == []
        assert server.count() == 0
