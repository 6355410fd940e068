"""mics merge streams (issue 29): it keeps each item's key and byte offsets, never its record, and copies the
standing lines byte for byte from the shards."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from mics_agents import outputs
from mics_agents.errors import MicsError
from mics_agents.outputs import default_failed_path, merge_outputs


def success(rid: str, size: int = 0) -> dict:
    return {"rid": rid, "gt_answer": "A", "reasoning": "é" * size, "tree": [{"id": 0, "s": "x" * size}]}


def failure(rid: str, kind: str = "model_error") -> dict:
    return {"rid": rid, "key": rid, "line": 1, "error": {"kind": kind, "message": kind}}


def line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def test_the_standing_lines_are_copied_byte_for_byte_from_the_shard_they_come_from(tmp_path):
    shards = [tmp_path / f"s{i}.jsonl" for i in range(3)]
    group = [{"id": f"g-qa{i}", "case_id": "g", "group_size": 2, "rid": "g", "gt_answer": "A"} for i in range(2)]
    # Spacing that our writer never uses: a copy keeps it, a re-encoding would not.
    spaced = b'{"rid": "a",   "gt_answer": "A"}\n'
    shards[0].write_bytes(spaced + line(success("b")))
    default_failed_path(shards[0]).write_bytes(line(failure("c")) + line(failure("d")))
    shards[1].write_bytes(line(success("c")) + b"".join(map(line, group)))
    default_failed_path(shards[1]).write_bytes(line(failure("b")) + line(failure("e", "no_path")))
    shards[2].write_bytes(b"")
    default_failed_path(shards[2]).write_bytes(line(failure("d", "no_path")))

    report = merge_outputs(shards, tmp_path / "all.jsonl", dedupe=True)

    assert (report.successes, report.failures, report.overlaps) == (4, 2, 3)
    assert (tmp_path / "all.jsonl").read_bytes() == spaced + line(success("b")) + line(success("c")) + b"".join(map(line, group))
    assert (tmp_path / "all_failed.jsonl").read_bytes() == line(failure("d")) + line(failure("e", "no_path")), \
        "d's first failure (shard 0) wins over its later one; c's failure lost to its success in shard 1"


def test_a_last_line_without_its_newline_and_a_byte_order_mark_do_not_glue_or_leak_into_the_merge(tmp_path):
    first, second = tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"
    first.write_bytes(b"\xef\xbb\xbf" + line(success("a")) + line(success("b"))[:-1])
    second.write_bytes(line(success("c")))
    merge_outputs([first, second], tmp_path / "all.jsonl")
    assert (tmp_path / "all.jsonl").read_bytes() == line(success("a")) + line(success("b")) + line(success("c"))


def test_memory_holds_offsets_not_records(tmp_path):
    shards = [tmp_path / f"s{i}.jsonl" for i in range(2)]
    for index, shard in enumerate(shards):
        # 2 x 600 items of about 16 KB: 19 MB of JSON, several times that as Python objects.
        shard.write_bytes(b"".join(line(success(f"{index}-{n}", 8000)) for n in range(600)))
        default_failed_path(shard).write_bytes(b"".join(line(failure(f"{index}-{n}")) for n in range(600, 700)))
    tracemalloc.start()
    try:
        report = merge_outputs(shards, tmp_path / "all.jsonl")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (report.successes, report.failures) == (1200, 200)
    assert (tmp_path / "all.jsonl").stat().st_size == sum(shard.stat().st_size for shard in shards)
    assert peak < 3_000_000, f"merge peaked at {peak / 1e6:.1f} MB for 19 MB of records"


def test_a_shard_compacted_between_the_two_passes_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    shard = tmp_path / "s0.jsonl"
    shard.write_bytes(line(success("a")) + line(success("a")) + line(success("b")))
    acquire = outputs.OutputLock.acquire

    def compact_the_shard_then_acquire(self):
        replacement = tmp_path / "compacted"
        replacement.write_bytes(line(success("a")) + line(success("b")))
        replacement.replace(shard)
        acquire(self)

    monkeypatch.setattr(outputs.OutputLock, "acquire", compact_the_shard_then_acquire)
    with pytest.raises(MicsError, match="was replaced while it was being merged"):
        merge_outputs([shard], tmp_path / "all.jsonl")
    assert not (tmp_path / "all.jsonl").exists()
    assert not list(tmp_path.glob(".all.jsonl.*.tmp")), "the temporary file is removed"
