"""The output files as a journal (issue 13): one owner per output, lines that are only appended, one rule
per item for every reader (a success wins, else the last failure), and compaction of a finished run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mics_agents.errors import MicsError, OutputBusyError
from mics_agents.outputs import (
    Line,
    OutputFiles,
    OutputLock,
    lock_path,
    merge_outputs,
    settle,
    winning_lines,
)
from mics_agents.report.data import build_report_data


def success(rid: str, **fields) -> dict:
    return {"rid": rid, "question": f"Q {rid}?", "gt_answer": "A", "reasoning": "### Step 1: look.", **fields}


def failure(rid: str, kind: str = "model_error", note: str = "") -> dict:
    return {"rid": rid, "key": rid, "line": 1, "error": {"kind": kind, "message": f"{kind} {note}".strip()},
            "input": {"id": rid}}


def group(case_id: str, size: int, *, written: int | None = None) -> list[dict]:
    """The lines one ``mics generate`` item writes together (``written`` < ``size``: a crash cut it)."""
    return [{"id": f"{case_id}-qa{i}", "case_id": case_id, "group_size": size} for i in range(written or size)]


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- the rule ---------------------------------------------------------------------------------------


def test_a_success_wins_else_the_last_failure():
    successes = [Line("b"), Line("d"), Line("d")]
    failures = ["a", "b", "c", "a", "c", "e"]
    kept, failed = winning_lines(successes, failures)
    assert kept == [0, 1]  # b, and the first success of d
    assert [failures[i] for i in failed] == ["a", "c", "e"] and failed == [3, 4, 5]


def test_a_group_counts_only_whole_and_lines_without_an_id_stand_alone():
    lines = [Line("x", 2), Line("x", 2), Line("y", 3), Line("y", 3), Line(None), Line(None), Line("z", 2)]
    kept, failed = winning_lines(lines, ["y", None, None, "z"])
    assert kept == [0, 1, 4, 5]  # y and z were cut by a crash: they do not count as done
    assert failed == [0, 1, 2, 3]


def test_settle_gives_one_record_per_item():
    successes, failures = settle(
        [success("a"), *group("g", 2)],
        [failure("a"), failure("b", note="first"), failure("b", "no_path", "second"), failure("g")],
    )
    assert [r.get("rid", r.get("id")) for r in successes] == ["a", "g-qa0", "g-qa1"]
    assert [(r["rid"], r["error"]["kind"]) for r in failures] == [("b", "no_path")]


# -- one owner per output ----------------------------------------------------------------------------


def test_a_second_owner_is_refused_with_the_holder_named(tmp_path):
    output = tmp_path / "out.jsonl"
    with OutputLock(output):
        holder = json.loads(lock_path(output).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutputBusyError) as refused:
            OutputLock(output).acquire()
        message = str(refused.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message and holder["started"] in message
        assert "another --output" in message
    with OutputLock(output):  # released: free again
        pass


def test_the_lock_of_a_killed_process_never_blocks(tmp_path):
    output = tmp_path / "out.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mics_agents.outputs import OutputLock; "
         "OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(output)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match=f"pid {holder.pid} "):
            OutputLock(output).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    with OutputLock(output):  # the kernel dropped the dead holder's lock; its name is overwritten
        assert json.loads(lock_path(output).read_text())["pid"] == os.getpid()


def test_a_lock_file_left_with_a_name_but_no_lock_does_not_block(tmp_path):
    output = tmp_path / "out.jsonl"
    lock_path(output).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday"}))
    with OutputLock(output):
        assert json.loads(lock_path(output).read_text())["pid"] == os.getpid()


# -- resuming and compacting ---------------------------------------------------------------------------


def test_resume_keeps_every_line_and_redoes_model_errors(tmp_path):
    output, failed = tmp_path / "out.jsonl", tmp_path / "out_failed.jsonl"
    write(output, [success("a")])
    write(failed, [failure("a"), failure("b"), failure("c", "no_path"), failure("d", "no_path"), failure("d")])
    before = (output.read_bytes(), failed.read_bytes())
    files = OutputFiles(output)
    state = files.prepare()
    assert (output.read_bytes(), failed.read_bytes()) == before, "nothing is removed before it is replaced"
    assert state.done == {"a", "c"} and state.retried_failures == 2  # b, and d (its last line is a model_error)
    assert files.prepare(retry_failed=True).done == {"a"}


def test_a_run_cut_inside_a_group_loses_only_that_write(tmp_path):
    output = tmp_path / "qa.jsonl"
    write(output, [*group("x", 2), *group("y", 3, written=2)])
    state = OutputFiles(output, group_key="case_id").prepare()
    assert state.done == {"x"} and state.repaired_lines == 2
    assert [r["id"] for r in read(output)] == ["x-qa0", "x-qa1"]


def test_compaction_keeps_the_standing_line_of_each_item_byte_for_byte(tmp_path):
    output, failed = tmp_path / "out.jsonl", tmp_path / "out_failed.jsonl"
    write(output, [success("a"), success("b")])
    write(failed, [failure("a"), failure("c", note="1"), failure("b"), failure("c", note="2"), failure("d", "no_path")])
    standing = [line for line in failed.read_text().splitlines(keepends=True) if '"c"' in line and "2" in line]
    (tmp_path / ".out.jsonl.123.abcd.tmp").write_text("left by a compaction that was killed")
    files = OutputFiles(output)
    files.prepare()
    assert not list(tmp_path.glob("*.tmp")), "an owner clears temporary files a killed compaction left"
    success_bytes = output.read_bytes()
    assert files.compact() == 3
    assert output.read_bytes() == success_bytes  # nothing to drop there: not rewritten
    assert failed.read_text() == standing[0] + json.dumps(failure("d", "no_path")) + "\n"
    assert files.compact() == 0
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out_failed.jsonl"]


def test_a_torn_json_line_inside_a_file_is_an_error_that_says_what_to_do(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps(success("a")) + "\n{not json\n")
    with pytest.raises(MicsError, match=r"out.jsonl:2 is not valid JSON.*Fix or remove that line"):
        OutputFiles(output).prepare()


# -- readers -------------------------------------------------------------------------------------------


def test_merge_reads_each_shard_by_the_rule_before_it_looks_for_overlaps(tmp_path):
    first, second = tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"
    write(first, [success("a")])
    write(tmp_path / "s0_failed.jsonl", [failure("a"), failure("b", note="old"), failure("b", "no_path", "new")])
    write(second, [success("c")])
    write(tmp_path / "s1_failed.jsonl", [failure("c"), failure("d"), failure("d")])
    report = merge_outputs([first, second], tmp_path / "all.jsonl")
    assert (report.successes, report.failures, report.overlaps) == (2, 2, 0)
    assert [r["rid"] for r in read(tmp_path / "all.jsonl")] == ["a", "c"]
    merged_failures = read(tmp_path / "all_failed.jsonl")
    assert [(r["rid"], r["error"]["message"]) for r in merged_failures] == [("b", "no_path new"), ("d", "model_error")]

    write(tmp_path / "s2.jsonl", [])
    write(tmp_path / "s2_failed.jsonl", [failure("a")])  # a in two shards: still an overlap
    with pytest.raises(MicsError, match="1 item"):
        merge_outputs([first, tmp_path / "s2.jsonl"], tmp_path / "x.jsonl")
    assert merge_outputs([tmp_path / "s2.jsonl", first], tmp_path / "x.jsonl", dedupe=True).successes == 1


def test_merge_of_generated_groups_counts_items(tmp_path):
    shard = tmp_path / "qa.jsonl"
    write(shard, [*group("x", 2), *group("y", 1)])
    write(tmp_path / "qa_failed.jsonl", [failure("x"), failure("z")])
    report = merge_outputs([shard], tmp_path / "all.jsonl")
    assert (report.successes, report.failures) == (2, 1)
    assert [r["id"] for r in read(tmp_path / "all.jsonl")] == ["x-qa0", "x-qa1", "y-qa0"]


def test_merge_refuses_an_output_a_run_owns(tmp_path):
    shard = tmp_path / "s0.jsonl"
    write(shard, [success("a")])
    with OutputLock(tmp_path / "all.jsonl"), pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
        merge_outputs([shard], tmp_path / "all.jsonl")
    assert not (tmp_path / "all.jsonl").exists()


def test_the_report_shows_each_item_once_by_the_rule(tmp_path):
    output, failed = tmp_path / "out.jsonl", tmp_path / "out_failed.jsonl"
    write(output, [success("a", tree=[], scores={}, generated_by=[])])
    write(failed, [failure("a"), failure("b", note="first"), failure("b", "no_path", "second"), failure("c")])
    data = build_report_data(output)
    shown = {item["rid"]: (item["status"], item.get("err", "")) for item in data.items}
    assert shown == {"a": ("success", ""), "b": ("no_path", "no_path second"), "c": ("model_error", "model_error")}
    assert data.summary["items"] == 3


def test_a_journal_written_in_parts_reads_the_same_as_its_compaction(tmp_path):
    """What a reader sees of a run between sessions equals what it sees once the run has compacted."""
    output, failed = tmp_path / "out.jsonl", tmp_path / "out_failed.jsonl"
    write(output, [success("a"), success("b")])
    write(failed, [failure("b"), failure("c"), failure("a"), failure("c", "no_path")])
    before = build_report_data(output)
    OutputFiles(output).compact()
    after = build_report_data(output)
    assert before.items == after.items and before.summary == after.summary


def test_an_output_folder_that_cannot_be_made_is_an_error_that_says_so(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(MicsError, match="cannot create the lock file .* folder you can write to"):
        OutputLock(tmp_path / "a-file" / "out.jsonl").acquire()


def test_temporary_files_of_an_output_with_glob_characters_in_its_name_are_found(tmp_path):
    output = tmp_path / "run[1].jsonl"
    write(output, [success("a"), success("a")])
    (tmp_path / ".run[1].jsonl.99.x.tmp").write_text("left by a killed compaction")
    files = OutputFiles(output)
    files.prepare()
    assert files.compact() == 1
    assert sorted(os.listdir(tmp_path)) == ["run[1].jsonl", "run[1]_failed.jsonl"]  # the temporary file is gone


def test_resume_counts_finished_records_an_older_grader_graded(tmp_path):
    from mics_agents.grading import GRADER_VERSION
    from mics_agents.outputs import OutputFiles

    out = tmp_path / "out.jsonl"
    current = {"rid": "a", "gt_answer": "x", "search_id": "1", "grader_version": GRADER_VERSION}
    older = {**current, "rid": "b", "grader_version": GRADER_VERSION - 1}
    unversioned = {"rid": "c", "gt_answer": "x", "search_id": "1"}  # written before verdicts had versions
    lines = [current, older, unversioned]
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    state = OutputFiles(out).prepare()
    assert state.done == {"a", "b", "c"} and state.older_grader == 2
