"""The parts of ``mics run --ray`` that need no cluster: a missing Ray, the journal tail the progress comes
from, the cache backup a retried shard restores, and the options --ray refuses."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from mics_agents.cluster.cache_backup import back_up, backup_path, local_cache_path, restore
from mics_agents.cluster.shard_task import JournalTail

from .openai_server import OpenAIServer
from .test_run_process import flat, mics_env, run_args, run_mics, write_dataset


def test_without_ray_installed_ray_runs_exit_2_naming_the_package(tmp_path):
    blocker = tmp_path / "no-ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    data = write_dataset(tmp_path / "data")
    with OpenAIServer(lifetime=60) as server:
        env = mics_env(server, PYTHONPATH=str(blocker.parent))
        result = run_mics(run_args(data, tmp_path / "out.jsonl", tmp_path / "c.sqlite", "--ray"), env, tmp_path)
        refused = run_mics(run_args(data, tmp_path / "out.jsonl", tmp_path / "c.sqlite", "--ray", "--batch"), env,
                           tmp_path)
        lonely = run_mics(run_args(data, tmp_path / "out.jsonl", tmp_path / "c.sqlite", "--shards", "3"), env, tmp_path)
    assert result.returncode == 2 and "pip install 'mics-agents[ray]'" in flat(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert refused.returncode == 2 and "--batch" in flat(refused.stderr)
    assert lonely.returncode == 2 and "--shards goes with --ray" in flat(lonely.stderr)
    assert not (tmp_path / "out.jsonl").exists()


def test_the_journal_tail_counts_whole_lines_once_and_rereads_a_replaced_or_cut_file(tmp_path):
    path = tmp_path / "out.jsonl"
    tail = JournalTail(path)
    assert tail.read() == {}  # not there yet
    success = {"rid": "a", "usage": {"calls": 3, "cached_calls": 1, "cost_usd": 0.5}}
    failure = {"rid": "b", "key": "b", "error": {"kind": "no_path"}, "search": {"usage": {"calls": 2}}}
    path.write_bytes((json.dumps(success) + "\n" + json.dumps(failure) + "\n").encode() + b'{"rid": "c", "us')
    counts = tail.read()
    assert (counts["success"], counts["no_path"], counts["calls"], counts["cost_usd"]) == (1, 1, 5, 0.5)
    assert tail.read()["success"] == 1  # nothing new: nothing counted twice, the torn line not at all
    with open(path, "ab") as handle:
        handle.write(b'age": {"calls": 4}}\n[1, 2]\nnot json\n')
    counts = tail.read()
    assert (counts["success"], counts["calls"]) == (2, 9)  # the finished line counts; junk lines do not
    path.write_text(json.dumps(success) + "\n")  # cut back (a repaired file) or compacted: counted afresh
    assert tail.read()["success"] == 1


def test_a_backup_is_restored_whole_by_the_next_attempt_and_never_opened_on_the_shared_side(tmp_path):
    shard = tmp_path / "shared" / "out.shard-0-of-2.jsonl"
    shard.parent.mkdir()
    first = local_cache_path(shard, tmp_path / "node-a")
    assert not restore(shard, first)  # a first attempt has nothing to restore
    live = sqlite3.connect(first)
    live.execute("PRAGMA journal_mode=WAL")
    live.execute("CREATE TABLE calls (key TEXT PRIMARY KEY, cost_usd REAL)")
    live.executemany("INSERT INTO calls VALUES (?, ?)", [(f"k{n}", 0.01) for n in range(100)])
    live.commit()  # still open and in WAL mode, as the running shard's connection is
    back_up(first, shard)
    live.execute("INSERT INTO calls VALUES ('after', 1.0)")
    live.commit()
    live.close()
    assert sorted(p.name for p in shard.parent.iterdir()) == [backup_path(shard).name]  # no -wal, no temp left
    second = local_cache_path(shard, tmp_path / "node-b")
    assert second != first and restore(shard, second)
    restored = sqlite3.connect(second)
    keys = {row[0] for row in restored.execute("SELECT key FROM calls")}
    restored.close()
    assert len(keys) == 100 and "after" not in keys  # what the backup held, and only that


class _Board:
    """The driver's board, as a shard's task sees it (``board.report.remote(index, snapshot)``)."""

    def __init__(self) -> None:
        self.snapshots: list[dict] = []
        self.report = self
        self.remote = lambda index, snapshot: self.snapshots.append(snapshot)


def test_a_cancel_that_reaches_the_shard_while_its_run_starts_counts_as_interrupted_not_failed(tmp_path):
    """``ray.cancel`` arrives as KeyboardInterrupt; the shard's run gets SIGINT. A run still importing dies of
    the signal (exit -2); that is a stopped shard (130), not a failed one."""
    import signal
    import time

    from mics_agents.cluster.shard_task import ShardJob, run_shard

    slow = tmp_path / "mics_agents"  # what ``python -m mics_agents`` finds first in the shard's folder
    slow.mkdir()
    (slow / "__init__.py").write_text("")
    (slow / "__main__.py").write_text("import time\ntime.sleep(60)\n")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    started = time.monotonic()
    try:
        result = run_shard(ShardJob(0, 1, tmp_path / "out.jsonl", [str(tmp_path / "data.jsonl")], lock_wait=0), _Board())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert result["cancelled"] and result["exit_code"] == 130, result
    assert time.monotonic() - started < 30  # it did not wait for the sleeping run
