"""A retried Ray shard that finds its output's lock still held (on a network filesystem, a dead node's lock lasts
until its lease expires) waits for it, a bounded time, instead of failing at once (issue 29)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mics_agents.cluster.shard_task import ShardJob, run_shard, wait_for_output
from mics_agents.outputs import default_failed_path

# Models for mics run's start-up checks; every item is already done, so none is called.
MODELS = {
    "MICS_MENTORS": "hosted_vllm/mentor-a,hosted_vllm/mentor-b", "MICS_INTERNS": "hosted_vllm/intern-1", "MICS_JUDGE": "hosted_vllm/judge",
    "HOSTED_VLLM_API_BASE": "http://127.0.0.1:9/v1", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}


class Board:
    """Stands in for the driver's board actor: keeps what the shard reported."""

    def __init__(self) -> None:
        self.snapshots: list[dict] = []
        self.report = self

    def remote(self, index: int, snapshot: dict) -> None:
        self.snapshots.append(snapshot)


def hold_lock(output: Path, seconds: float) -> subprocess.Popen:
    """Another live process that holds the output's locks for ``seconds``, then ends."""
    code = ("import sys, time; from pathlib import Path; from mics_agents.outputs import OutputLock, default_failed_path\n"
            "output = Path(sys.argv[1])\n"
            "with OutputLock(output, default_failed_path(output)):\n"
            "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(output), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture
def finished_shard(tmp_path):
    """A shard whose items all ended: its run only resumes, finds them done and exits 0."""
    data = tmp_path / "cases.jsonl"
    data.write_text("".join(json.dumps({"id": rid, "question": "Q?", "answer": "A"}) + "\n" for rid in ("a", "b")))
    output = tmp_path / "mics.shard-0-of-1.jsonl"
    output.write_text("".join(json.dumps({"rid": rid, "gt_answer": "A", "reasoning": "r"}) + "\n" for rid in ("a", "b")))
    return ShardJob(0, 1, output, [str(data), "--image-dir", str(tmp_path)], env=MODELS)


def test_the_wait_ends_when_the_holder_lets_go(tmp_path):
    output = tmp_path / "out.jsonl"
    holder = hold_lock(output, 1.5)
    try:
        free, waited = wait_for_output(output, 30, poll=0.1)
    finally:
        holder.wait()
    assert free and 1.0 <= waited < 10


def test_the_wait_is_bounded(tmp_path):
    output = tmp_path / "out.jsonl"
    holder = hold_lock(default_failed_path(output), 30)  # the failed file's lock counts too
    try:
        started = time.monotonic()
        free, waited = wait_for_output(output, 0.5, poll=0.1)
        assert not free and 0.5 <= waited and time.monotonic() - started < 3
    finally:
        holder.kill()
        holder.wait()


def test_a_retried_shard_waits_for_the_lock_then_runs(finished_shard):
    holder = hold_lock(finished_shard.output, 2)
    try:
        finished_shard.lock_wait = 60
        result = run_shard(finished_shard, Board())
    finally:
        holder.wait()
    assert result["exit_code"] == 0, Path(result["log"]).read_text()
    assert result["lock_wait_s"] >= 1
    assert result["summary"]["already_done"] == 2
    assert "waited" in Path(result["log"]).read_text().splitlines()[0]


def test_past_the_wait_the_shard_stops_with_exit_2_naming_the_holder(finished_shard):
    holder = hold_lock(finished_shard.output, 60)
    try:
        finished_shard.lock_wait = 0.5
        result = run_shard(finished_shard, Board())
    finally:
        holder.kill()
        holder.wait()
    assert result["exit_code"] == 2
    assert f"pid {holder.pid}" in " ".join(Path(result["log"]).read_text().split())
    assert os.path.getsize(finished_shard.output) > 0
