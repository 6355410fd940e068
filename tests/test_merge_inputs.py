"""What `mics merge` takes as its inputs: a glob like ``run.shard-*.jsonl`` names both the shards' outputs and
their failed files, a shard whose items all failed has only its failed file, and a shard that never ran has
neither. Failures must never come out of a merge as successes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mics_agents.cli import app
from mics_agents.errors import ForeignOutputError, MicsError
from mics_agents.outputs import OutputFiles, default_failed_path, merge_outputs


def success(rid: str) -> dict:
    return {"rid": rid, "gt_answer": "A", "reasoning": "### Step 1: ...", "tree": []}


def failure(rid: str, kind: str = "no_path") -> dict:
    return {"rid": rid, "key": rid, "line": 1, "error": {"kind": kind, "message": kind}}


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    """Three shards as a run leaves them: one with both outcomes, one all failed, one all succeeded."""
    first, second, third = (tmp_path / f"run.shard-{index}.jsonl" for index in range(3))
    write(first, [success("a")])
    write(default_failed_path(first), [failure("b")])
    write(default_failed_path(second), [failure("c", "model_error"), failure("d")])
    write(third, [success("e")])
    return [first, second, third]


def test_a_glob_that_matches_the_failed_files_too_merges_each_shard_once_and_failures_as_failures(shards, tmp_path):
    named = sorted(tmp_path.glob("run.shard-*.jsonl"))  # what the shell gives for run.shard-*.jsonl
    assert any(path.name.endswith("_failed.jsonl") for path in named)
    report = merge_outputs(named, tmp_path / "all.jsonl")

    assert sorted(record["rid"] for record in read(tmp_path / "all.jsonl")) == ["a", "e"]
    assert all("error" not in record for record in read(tmp_path / "all.jsonl"))
    assert sorted(record["rid"] for record in read(tmp_path / "all_failed.jsonl")) == ["b", "c", "d"]
    assert (report.successes, report.failures, report.overlaps) == (2, 3, 0)


def test_a_shard_named_by_its_output_with_only_a_failed_file_merges_its_failures(shards, tmp_path):
    report = merge_outputs(shards, tmp_path / "all.jsonl")  # run.shard-1.jsonl does not exist: all its items failed
    assert (report.successes, report.failures) == (2, 3)


def test_a_shard_with_neither_file_is_refused_with_what_to_check(shards, tmp_path):
    with pytest.raises(MicsError, match=r"run\.shard-7\.jsonl.*not found, nor its failed file: has that shard run"):
        merge_outputs([*shards, tmp_path / "run.shard-7.jsonl"], tmp_path / "all.jsonl")
    assert not (tmp_path / "all.jsonl").exists()


def test_an_output_that_happens_to_end_in_failed_is_an_output(tmp_path):
    """The name alone does not make a failed file: its lines decide."""
    odd = write(tmp_path / "cases_failed.jsonl", [success("x")])  # someone's output, so named
    report = merge_outputs([odd], tmp_path / "all.jsonl")
    assert [record["rid"] for record in read(tmp_path / "all.jsonl")] == ["x"]
    assert report.failures == 0


def test_failure_lines_under_another_name_are_refused_not_merged_as_successes(tmp_path):
    renamed = write(tmp_path / "failures.jsonl", [failure("b")])
    with pytest.raises(ForeignOutputError, match="is not an output of mics-agents"):
        merge_outputs([renamed], tmp_path / "all.jsonl")
    assert not (tmp_path / "all.jsonl").exists()


def test_a_finished_run_leaves_both_files_even_when_one_has_no_line(tmp_path):
    files = OutputFiles(tmp_path / "out.jsonl")
    files.prepare()
    files.compact()  # what a completed run does last
    assert (tmp_path / "out.jsonl").read_bytes() == b""
    assert (tmp_path / "out_failed.jsonl").read_bytes() == b""
    # and such a shard merges as empty rather than being refused as missing
    assert merge_outputs([tmp_path / "out.jsonl"], tmp_path / "all.jsonl").successes == 0


def test_mics_merge_with_the_shell_glob_says_how_many_of_each(shards, tmp_path):
    named = [str(path) for path in sorted(tmp_path.glob("run.shard-*.jsonl"))]
    result = CliRunner().invoke(app, ["merge", *named, "--output", str(tmp_path / "all.jsonl")])
    assert result.exit_code == 0, result.output
    assert "Merged 2 successes and 3 failures" in result.output


def test_the_same_shard_named_twice_still_overlaps(shards, tmp_path):
    with pytest.raises(MicsError, match="appear in more than one input"):
        merge_outputs([shards[0], shards[0]], tmp_path / "all.jsonl")
    with pytest.raises(MicsError, match="appear in more than one input"):
        merge_outputs([shards[0], default_failed_path(shards[0]), default_failed_path(shards[0])], tmp_path / "all.jsonl")
