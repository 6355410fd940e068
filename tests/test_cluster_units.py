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
    # --batch goes with --ray now (issue 29): refused here only for the missing package, as without it.
    assert refused.returncode == 2 and "pip install 'mics-agents[ray]'" in flat(refused.stderr)
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
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    started = time.monotonic()
    board = _Board()
    try:
        result = run_shard(ShardJob(0, 1, tmp_path / "out.jsonl", [str(tmp_path / "data.jsonl")], lock_wait=0), board)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert result["cancelled"] and result["exit_code"] == 130, result
    assert time.monotonic() - started < 30  # it did not wait for the sleeping run
    # Four report times in 2 s, nothing new after the first: one report (the board hears from every shard).
    assert len(board.snapshots) == 1 and board.snapshots[0]["spent_usd"] == 0.0, board.snapshots


def test_a_stop_after_every_shard_ended_with_all_its_items_stopped_nothing(tmp_path):
    """The budget was reached by the last items: every shard exited 0, so the run completed (and merges), as a
    normal run whose stop came after its last item; a shard stopped by it makes the run a budget stop."""
    from mics_agents.cluster.ray_run import RayRun

    def final(codes: list[int], reason: str) -> str:
        run = RayRun(output=tmp_path / "out.jsonl", run_args=[], total=4)
        run.stats.stop_reason = reason
        run.results = [{"index": index, "exit_code": code, "summary": {"success": 1, "spent_usd": 0.5}}
                       for index, code in enumerate(codes)]
        run._final()
        assert run.stats.success == len(codes) and run.stats.spent_usd == 0.5 * len(codes)
        return run.stats.stop_reason

    assert final([0, 0], "budget") == "completed"
    assert final([0, 130], "budget") == "budget"
    assert final([0, 3], "completed") == "budget"  # a shard stopped itself on the budget
    assert final([130, 0], "interrupted") == "interrupted"
    assert final([0, 1], "completed") == "interrupted"


def test_the_journal_tail_reads_a_large_journal_a_line_at_a_time(tmp_path):
    """A resumed shard of a 10^5-item run has a journal of gigabytes; its task reads it whole once per attempt.
    Peak memory stays near one record, not the file (here 20 MB: it held ~2x the file before)."""
    import tracemalloc

    path = tmp_path / "out.jsonl"
    record = {"rid": "x", "reasoning": "step " * 2600, "usage": {"calls": 2, "cost_usd": 0.001}}
    line = json.dumps(record).encode() + b"\n"
    with open(path, "wb") as handle:
        for _ in range(1500):
            handle.write(line)
        handle.write(line[:5000])  # torn: being written
    tail = JournalTail(path)
    tracemalloc.start()
    try:
        counts = tail.read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (counts["success"], counts["calls"]) == (1500, 3000)
    assert path.stat().st_size > 19_000_000 and peak < 1_000_000, peak
    with open(path, "ab") as handle:
        handle.write(line[5000:])
    assert tail.read()["success"] == 1501  # the torn line, once whole


def test_the_spend_sums_only_new_rows_and_counts_a_replaced_reply_too(tmp_path):
    """Twice a second per shard: summing all ~10^6 calls of a 10^5-item shard each time would cost a core. The
    incremental sum reads the rows past the last rowid seen (a range of the run's index)."""
    from mics_agents.cluster.shard_task import Spend
    from mics_agents.store import MIGRATIONS

    cache = tmp_path / "cache.sqlite"
    spend = Spend(cache, "run-a")
    assert spend.read() == 0.0  # no cache yet
    live = sqlite3.connect(cache)
    for migration in MIGRATIONS:
        live.executescript(migration)
    assert spend.read() == 0.0  # no row yet

    def insert(key: str, cost: float, run: str = "run-a", replace: bool = False) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        live.execute(f"{verb} INTO calls (key, model, text, cost_usd, created_at, run_id) VALUES (?, 'm', '', ?, 0, ?)",
                     (key, cost, run))
        live.commit()

    for number in range(3):
        insert(f"k{number}", 0.25)
    insert("other", 10.0, run="run-b")  # another run's call (a shared cache) is not this run's spend
    assert spend.read() == 0.75
    insert("k3", 0.5)
    assert spend.read() == 1.25
    plan = " ".join(str(row) for row in live.execute(
        "EXPLAIN QUERY PLAN SELECT COALESCE(SUM(cost_usd), 0), MAX(rowid) FROM calls WHERE run_id = ? AND rowid > ?",
        ("run-a", 3)))
    assert "calls_by_run (run_id=? AND rowid>?)" in plan  # a range, never the whole run
    insert("k3", 2.0, replace=True)  # the last reply asked again: both were paid for
    assert spend.read() == 3.25
    assert Spend(cache, "run-a").read() == 2.75  # a new attempt starts from the rows the cache holds
    live.close()


def test_checkpoints_copy_only_new_calls_until_the_deltas_match_the_base_and_restore_the_newest_replies(tmp_path):
    """A 10^5-item shard's cache is gigabytes: a checkpoint copies the calls added since the last one (a delta),
    and the whole cache again only once the deltas add up to it. A restore applies them in order; an older
    delta left behind never replaces a newer reply."""
    import shutil

    from mics_agents.cluster.cache_backup import CacheBackups, delta_paths
    from mics_agents.store import MIGRATIONS

    shard = tmp_path / "shared" / "out.shard-1-of-2.jsonl"
    shard.parent.mkdir()
    first = local_cache_path(shard, tmp_path / "node-a")
    live = sqlite3.connect(first)
    live.execute("PRAGMA journal_mode=WAL")  # open throughout, as the running shard's connection is
    for migration in MIGRATIONS:
        live.executescript(migration)

    def insert(connection, keys, text="reply", replace=False):
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        connection.executemany(f"{verb} INTO calls (key, model, text, cost_usd, created_at, run_id) "
                               "VALUES (?, 'm', ?, 0.01, 0, 'r')", [(key, f"{text} {key} " * 20) for key in keys])
        connection.commit()

    def contents(path):
        connection = sqlite3.connect(path)
        try:
            return dict(connection.execute("SELECT key, text FROM calls"))
        finally:
            connection.close()

    insert(live, [f"k{n}" for n in range(200)])
    live.execute("INSERT INTO runs VALUES ('r', 'in', 'out', '{}', 0, 0)")
    live.commit()
    backups = CacheBackups(first, shard)
    assert not backups.restore()
    backups.back_up()  # no base yet: a full copy
    insert(live, ["n1", "n2"])
    backups.back_up()
    insert(live, ["k5"], text="asked again", replace=True)
    backups.back_up()
    backups.back_up()  # nothing new: no file
    assert (backups.full_copies, backups.delta_copies) == (1, 2)
    deltas = delta_paths(shard)
    assert [number for number, _ in deltas] == [1, 2]
    assert all(path.stat().st_size < backup_path(shard).stat().st_size / 3 for _, path in deltas)
    assert sorted(p.name for p in shard.parent.iterdir()) == sorted([backup_path(shard).name, *(p.name for _, p in deltas)])

    second = local_cache_path(shard, tmp_path / "node-b")
    again = CacheBackups(second, shard)
    assert again.restore()
    restored = contents(second)
    assert restored == contents(first) and restored["k5"].startswith("asked again") and len(restored) == 202
    attempt = sqlite3.connect(second)
    insert(attempt, ["b1"])  # the retried attempt goes on: its next checkpoint is delta 3
    again.back_up()
    assert [number for number, _ in delta_paths(shard)] == [1, 2, 3] and again.full_copies == 0

    stale = tmp_path / "stale.sqlite"
    shutil.copyfile(deltas[0][1], stale)  # delta 1, as a crash between a new base and the deletions leaves it
    insert(attempt, [f"big{n}" for n in range(400)])  # a delta larger than the base...
    again.back_up()
    insert(attempt, ["n1"], text="newer", replace=True)  # a newer reply to a call delta 1 holds
    again.back_up()  # ...so the next checkpoint copies the whole cache, and the deltas go
    attempt.close()
    assert (again.full_copies, again.delta_copies) == (1, 2) and delta_paths(shard) == []
    shutil.copyfile(stale, deltas[0][1])  # delta 1 is back, older than the base
    third = local_cache_path(shard, tmp_path / "node-c")
    assert CacheBackups(third, shard).restore()
    final = contents(third)
    assert final == contents(second) and final["n1"].startswith("newer") and len(final) == 603
    live.close()


def test_done_before_counts_items_by_their_standing_line_not_journal_lines(tmp_path):
    """A resumed shard's progress starts from the items its run will not redo; its journal has a line per
    attempt of an item (a model_error retried, then its success), so counting lines showed more done than
    there were items, and the bar passed 100%."""
    from mics_agents.cluster.shard_task import done_before

    output, failed = tmp_path / "out.jsonl", tmp_path / "out_failed.jsonl"
    output.write_text("".join(json.dumps(r) + "\n" for r in [{"rid": "a"}, {"rid": "b"}]))
    failed.write_text("".join(json.dumps({"key": key, "error": {"kind": kind}}) + "\n" for key, kind in [
        ("b", "model_error"),  # retried, then succeeded: one item, done
        ("c", "model_error"),  # retried next run: not done
        ("d", "no_path"),  # final unless --retry-failed
        ("e", "no_path"), ("e", "model_error"),  # its last line says model_error: redone
        ("f", "bad_input"), ("g", "internal_error"),
    ]))
    tails = [JournalTail(output, keep_kinds=True), JournalTail(failed, keep_kinds=True)]
    lines = sum(sum(tail.read()[kind] for kind in ("success", "no_path", "model_error", "bad_input",
                                                     "internal_error")) for tail in tails)
    assert lines == 9
    assert done_before(tails[0].kinds, tails[1].kinds, retry_failed=False) == 4  # a, b, d, f
    assert done_before(tails[0].kinds, tails[1].kinds, retry_failed=True) == 2  # a, b
    assert JournalTail(output).kinds is None  # kept only when asked


def test_a_failed_shard_reports_the_last_line_of_its_log_read_from_the_end(tmp_path):
    from mics_agents.cluster.shard_task import last_line

    log = tmp_path / "out.shard-0-of-2.log"
    assert last_line(log) == ""  # no log
    log.write_bytes(b"progress line\n" * 200_000 + "Configuration error: MICS_MENTORS is not set \u2014 set it\n\n".encode())
    assert last_line(log) == "Configuration error: MICS_MENTORS is not set \u2014 set it"
    log.write_bytes(b"\xff\xfe broken bytes\n")
    assert last_line(log) == "\ufffd\ufffd broken bytes"


def test_a_rerun_keeps_the_shard_count_its_journals_were_run_with(tmp_path):
    """Another count would put every item in a shard without a journal or cache: searched and paid for again.
    Without --shards the count is taken from the journals; a different --shards, or two sets, is refused."""
    from mics_agents.cluster.ray_run import shards_of_journals
    from mics_agents.errors import ConfigError

    output = tmp_path / "run.jsonl"
    assert shards_of_journals(output, None) is None and shards_of_journals(output, 3) is None
    (tmp_path / "run.shard-2-of-4_failed.jsonl").write_text("")  # a shard whose items all failed
    (tmp_path / "run.shard-0-of-4.cache.sqlite").write_text("")
    (tmp_path / "other.shard-0-of-7.jsonl").write_text("")  # another output's shards
    (tmp_path / "run.shard-x-of-9.jsonl").write_text("")  # not a shard's name
    assert shards_of_journals(output, None) == 4 and shards_of_journals(output, 4) == 4
    try:
        shards_of_journals(output, 3)
    except ConfigError as exc:
        assert "rerun with --shards 4" in str(exc)
    else:
        raise AssertionError("a different --shards was taken")
    (tmp_path / "run.shard-1-of-2.jsonl").write_text("")
    try:
        shards_of_journals(output, None)
    except ConfigError as exc:
        assert "2 and 4 shards" in str(exc)
    else:
        raise AssertionError("two sets of journals were taken")
    data = write_dataset(tmp_path / "data")
    with OpenAIServer(lifetime=60) as server:
        result = run_mics(run_args(data, output, tmp_path / "c.sqlite", "--ray", "--shards", "3"), mics_env(server),
                          tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "2 and 4 shards" in flat(result.stderr) and "Traceback" not in result.stderr


def test_a_cluster_address_nothing_answers_at_is_refused_in_one_line_at_once(tmp_path):
    """ray.init waits minutes for an address nothing answers at, printing warnings; the run says so at once."""
    import socket
    import time

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    data = write_dataset(tmp_path / "data")
    with OpenAIServer(lifetime=60) as server:
        started = time.monotonic()
        given = run_mics(run_args(data, tmp_path / "out.jsonl", tmp_path / "c.sqlite", "--ray", f"127.0.0.1:{port}"),
                         mics_env(server), tmp_path)
        from_env = run_mics(run_args(data, tmp_path / "out.jsonl", tmp_path / "c.sqlite", "--ray"),
                            mics_env(server, RAY_ADDRESS=f"ray://127.0.0.1:{port}"), tmp_path)
        elapsed = time.monotonic() - started
    for result, names in ((given, "check --ray"), (from_env, "check RAY_ADDRESS")):
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "nothing answers at the Ray cluster" in flat(result.stderr) and names in flat(result.stderr)
    assert elapsed < 60
    assert not (tmp_path / "out.jsonl").exists()


def test_a_checkpoint_that_cannot_be_taken_is_reported_and_the_next_one_takes_it(tmp_path):
    """A cache still being created (no table yet), or shared storage gone for a moment: the checkpoint says what
    went wrong (the shard's log gets it) instead of failing the shard, and the next one is whole."""
    import shutil

    from mics_agents.cluster.cache_backup import CacheBackups, delta_paths
    from mics_agents.store import MIGRATIONS

    shard = tmp_path / "shared" / "out.shard-0-of-1.jsonl"
    shard.parent.mkdir()
    local = local_cache_path(shard, tmp_path / "node")
    sqlite3.connect(local).close()  # the run has created its cache file, not yet its tables
    backups = CacheBackups(local, shard)
    assert backups.back_up() is None and backups.full_copies == 1  # an empty base
    problem = backups.back_up()
    assert problem is not None and "no such table" in problem
    live = sqlite3.connect(local)
    for migration in MIGRATIONS:
        live.executescript(migration)
    live.execute("INSERT INTO calls (key, model, text, created_at, run_id) VALUES ('k', 'm', 't', 0, 'r')")
    live.commit()
    shutil.rmtree(shard.parent)  # the shared storage, gone
    problem = backups.back_up()
    assert problem is not None and "FileNotFoundError" in problem
    shard.parent.mkdir()  # back, empty: the base is gone, so the next checkpoint is a whole copy, not a delta
    assert backups.back_up() is None and backups.full_copies == 2 and delta_paths(shard) == []
    restored = local_cache_path(shard, tmp_path / "other")
    assert CacheBackups(restored, shard).restore()
    connection = sqlite3.connect(restored)
    assert connection.execute("SELECT key FROM calls").fetchall() == [("k",)]
    connection.close()
    live.close()


def test_a_report_that_cannot_read_the_journal_is_skipped_not_fatal(tmp_path, monkeypatch):
    """An NFS hiccup (ESTALE) while a shard's task reads its journal must not end a shard hours into its run."""
    import errno

    from mics_agents.cluster import shard_task

    reads = {"count": 0}
    real = shard_task.JournalTail.read

    def flaky(self):
        reads["count"] += 1
        if reads["count"] in (3, 4, 5):
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(self)

    monkeypatch.setattr(shard_task.JournalTail, "read", flaky)
    slow = tmp_path / "mics_agents"
    slow.mkdir()
    (slow / "__init__.py").write_text("")
    # A run that ends by itself (exit 0), its summary cut short (killed while writing it).
    (slow / "__main__.py").write_text("import sys, time\ntime.sleep(2)\n"
                                      "open(sys.argv[sys.argv.index('--json-summary') + 1], 'w').write('{\"succ')\n"
                                      "print('last words')\n")
    board = _Board()
    result = shard_task.run_shard(shard_task.ShardJob(0, 1, tmp_path / "out.jsonl", [], lock_wait=0), board)
    assert result["exit_code"] == 0 and not result["cancelled"], result
    assert "summary" not in result and result["last_line"] == "last words"
    assert reads["count"] > 5 and board.snapshots  # it went on reading after the failed reads
