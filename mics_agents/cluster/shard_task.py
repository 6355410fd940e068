"""One shard inside its Ray task: the same resumable ``mics run --shard I/N`` as by hand, as a child process.

The child is that command itself, so a shard means exactly what it means without Ray (lock, journal, resume,
exit codes). It dies with the worker that started it (``PR_SET_PDEATHSIG``), so a task Ray retries never
meets a former attempt still writing. Its call cache is node-local (:mod:`.cache_backup`). While it runs, the
task reads the shard's journal as it grows and the cache's spend, and reports them to the driver's board.
``ray.cancel`` reaches the task as ``KeyboardInterrupt``: the child gets SIGINT (no new item starts, items in
flight finish and are written), and the task returns once it has ended.

A batched shard (``--batch``) runs with ``--no-wait``: when every item waits on a batch in progress its run exits
(75), and the task starts it again after ``MICS_BATCH_POLL_INTERVAL`` seconds; each run resumes from the journal
and re-attaches to the batches its ledger (beside the journal) records, so nothing is submitted twice, by a rerun
or by a retried task. A cancel between two runs returns at once. The run keeps what its open batches are counted
at in ``OUT.shard-I-of-N.committed.json``; the task reports it with the spend.

A retried task can find the shard's output lock still held: on a network filesystem the lock of a node that
died lasts until the server's lease for that node expires. The task waits for it (``lock_wait`` seconds at
most) before it starts the child; it never breaks a lock, since a holder it cannot see may still be writing.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runner import run_id_for
from .cache_backup import CacheBackups, local_cache_path, remove_local

__all__ = ["ShardJob", "shard_output", "spent_path", "read_spent", "read_committed", "committed_path", "run_shard", "wait_for_output", "JournalTail", "Spend", "done_before",
           "FAILURE_KINDS"]

FAILURE_KINDS = ("no_path", "model_error", "bad_input", "internal_error")
_POLL_S = 0.05  # how soon a cancel (it lands when a sleep ends) or the child's end is seen
_REPORT_S = 0.5
_LOCK_POLL_S = 1.0
EXIT_BATCHES_PENDING = 75  # mics run --batch --no-wait: every item waits on a batch in progress (cli.py's)
COMMITTED_FILE_VARIABLE = "MICS_BATCH_COMMITTED_FILE"  # batches/queue.py's (not imported: 0.17 s per task)
GATE_FOLDER_VARIABLE = "MICS_BATCH_GATE_DIR"  # batches/queue.py's too


def spent_path(shard: Path) -> Path:
    """``OUT.shard-0-of-4.jsonl`` -> ``OUT.shard-0-of-4.spent.json``: what the shard's run has spent, over all its
    attempts, as of its last checkpoint; the driver reads it before it starts the shard (its one budget)."""
    return shard.with_name(shard.name.removesuffix(".jsonl") + ".spent.json")


def _read_amount(path: Path, name: str) -> float:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))[name]
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
    return float(value) if isinstance(value, (int, float)) and value >= 0 else 0.0


def read_spent(shard: Path) -> float:
    return _read_amount(spent_path(shard), "spent_usd")


def read_committed(shard: Path) -> float:
    """What the shard's batches still open were counted at (their estimate) as of its last checkpoint: money
    committed, not yet billed (``mics run --batch``), which counts against the budget as spent does."""
    return _read_amount(spent_path(shard), "committed_usd")


def committed_path(shard: Path) -> Path:
    """``OUT.shard-0-of-4.committed.json``: where a batched shard's run keeps what its open batches are counted at
    (its ledger is held by that run alone); the task reads it for the driver."""
    return shard.with_name(shard.name.removesuffix(".jsonl") + ".committed.json")


def _write_spent(shard: Path, spent: float, committed: float = 0.0) -> None:
    target = spent_path(shard)
    staged = target.with_name(target.name + f".{os.getpid()}.tmp")
    try:
        staged.write_text(json.dumps({"spent_usd": spent, "committed_usd": committed}) + "\n", encoding="utf-8")
        os.replace(staged, target)
    except OSError:  # the checkpoint after this one writes it again
        staged.unlink(missing_ok=True)


def shard_output(output: Path, index: int, count: int) -> Path:
    """``OUT.jsonl`` -> ``OUT.shard-I-of-N.jsonl``, beside it (on the storage every node shares)."""
    return output.with_name(f"{output.name.removesuffix('.jsonl')}.shard-{index}-of-{count}.jsonl")


@dataclass
class ShardJob:
    index: int
    count: int
    output: Path  # the shard's own output, absolute
    run_args: list[str]  # ``mics run`` arguments shared by every shard: the data and options, absolute paths
    env: dict[str, str] = field(default_factory=dict)  # the driver's model settings and keys
    backup_every: float = 60.0
    lock_wait: float = 300.0  # seconds to wait for a lock a former holder left (settings.cluster_lock_wait)
    # A batched shard (--batch): its run is started with --no-wait, and while it exits 75 (every item waits on
    # a batch in progress) it is started again after this many seconds (MICS_BATCH_POLL_INTERVAL), resuming
    # from its journal and ledger, until it ends otherwise. None: not batched, or the user's own --no-wait.
    batch_rerun_every: float | None = None
    # A batched shard under a budget: each batch its run would submit is first granted by the driver's board
    # (``board.reserve``), which answers one shard at a time against what every shard spent and committed.
    budget_gate: bool = False


class JournalTail:
    """Counts of a journal (output or failed file) read as it grows: whole lines only, from where the last read
    stopped; a file that was replaced (compacted) or cut (a torn line repaired) is read again from its start."""

    def __init__(self, path: Path, *, keep_kinds: bool = False) -> None:
        self.path = path
        self._offset = 0
        self._inode: int | None = None
        self.counts: Counter = Counter()
        # Each item's last outcome while kept (what was done before an attempt: see :func:`done_before`).
        self.kinds: dict[str, str] | None = {} if keep_kinds else None

    def read(self) -> Counter:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return self.counts
        if status.st_ino != self._inode or status.st_size < self._offset:
            self._inode, self._offset, self.counts = status.st_ino, 0, Counter()
            self.kinds = {} if self.kinds is not None else None
        elif status.st_size == self._offset:
            return self.counts  # nothing new: not even opened (twice a second, per shard, on shared storage)
        # A line at a time: a resumed shard's journal can be gigabytes (10^5 items of ~13 KB each), read whole
        # once per attempt; only a torn last line (no newline yet) is left for the next read.
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            for line in handle:
                if not line.endswith(b"\n"):
                    break
                self._offset += len(line)
                self._count(line)
        return self.counts

    def _count(self, line: bytes) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            return
        if not isinstance(record, dict):
            return
        error = record.get("error")
        kind = error.get("kind") if isinstance(error, dict) else None
        self.counts[kind if kind in FAILURE_KINDS else "success"] += 1
        if self.kinds is not None:
            key = record.get("key", record.get("rid"))
            if key is not None:
                self.kinds[str(key)] = kind if kind in FAILURE_KINDS else "success"
        usage = record.get("usage") if kind is None else (record.get("search") or {}).get("usage")
        if isinstance(usage, dict):
            for name in ("calls", "cached_calls", "input_tokens", "output_tokens", "cost_usd"):
                value = usage.get(name)
                if isinstance(value, (int, float)):
                    self.counts[name] += value


def done_before(successes: dict[str, str], failures: dict[str, str], *, retry_failed: bool) -> int:
    """Items a shard's run will not redo, from each item's last line in its output and failed file: as the
    journal's rule (``outputs.winning_lines``), a success stands, else the last failure; no_path and bad_input
    are done unless --retry-failed; model_error and internal_error are retried. Journal lines are not items: a
    retried item has several, so counting lines would show more done than there are items."""
    succeeded = {key for key, kind in successes.items() if kind == "success"}
    final = () if retry_failed else ("no_path", "bad_input")
    return len(succeeded) + sum(1 for key, kind in failures.items() if key not in succeeded and kind in final)


class Spend:
    """What this shard's run paid for, over all its attempts (the backup carries it from one to the next).

    Read twice a second while the shard runs, so only the rows added since the last read are summed (a range of
    the run's index, by rowid): a shard of a 10^5-item run holds ~10^6 calls, and summing them all each time would
    cost the node a core. The cache never deletes a row, and a replaced reply (asked again) gets a new, larger
    rowid, so no row is missed; both replies count, as both were paid for (as in ``mics run``'s own count)."""

    def __init__(self, cache: Path, run_id: str) -> None:
        self.cache, self.run_id = cache, run_id
        self.total = 0.0
        self._last_rowid = 0

    def read(self) -> float:
        try:
            connection = sqlite3.connect(f"file:{self.cache}?mode=ro", uri=True, timeout=1.0)
            try:
                added, last = connection.execute(
                    "SELECT COALESCE(SUM(cost_usd), 0), MAX(rowid) FROM calls WHERE run_id = ? AND rowid > ?",
                    (self.run_id, self._last_rowid)).fetchone()
            finally:
                connection.close()
        except sqlite3.Error:  # not created yet, or busy for a moment: the next report has it
            return self.total
        if last is not None:
            self.total += float(added)
            self._last_rowid = int(last)
        return self.total


def last_line(log: Path, *, window: int = 64 * 1024) -> str:
    """The last non-blank line of a shard's log, read from its end (a log of a days-long run is megabytes)."""
    try:
        with open(log, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - window))
            tail = handle.read()
    except OSError:
        return ""
    lines = tail.decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _failed_path(output: Path) -> Path:
    from ..outputs import default_failed_path

    return default_failed_path(output)


def wait_for_output(output: Path, patience: float, *, poll: float = _LOCK_POLL_S) -> tuple[bool, float]:
    """Wait while another process holds the lock of the shard's output or failed file, ``patience`` seconds at
    most. Returns (free now, seconds waited); when it is not free the child says who holds it and exits 2."""
    from ..errors import OutputBusyError
    from ..outputs import OutputLock

    lock = OutputLock(output, _failed_path(output))
    started = time.monotonic()
    while True:
        try:
            lock.probe()
            return True, time.monotonic() - started
        except OutputBusyError:
            waited = time.monotonic() - started
            if waited >= patience:
                return False, waited
            time.sleep(min(poll, patience - waited))


def _reserve(board: Any, index: int, own: float, estimate: float) -> bool:
    """The board's answer (an actor's, through Ray; a test's board answers at once)."""
    answer = board.reserve.remote(index, own, estimate)
    if not isinstance(answer, bool):
        import ray

        answer = ray.get(answer)
    return bool(answer)


def run_shard(job: ShardJob, board: Any) -> dict[str, Any]:
    """Run shard ``job.index`` to its end (or until cancelled); its exit code, summary and last log line."""
    stem = job.output.name.removesuffix(".jsonl")
    log = job.output.with_name(f"{stem}.log")
    try:
        free, waited = wait_for_output(job.output, job.lock_wait)
    except KeyboardInterrupt:
        return {"index": job.index, "exit_code": 130, "cancelled": True, "log": str(log)}
    if waited >= _LOCK_POLL_S:
        with open(log, "a", encoding="utf-8") as log_file:
            log_file.write(f"waited {waited:.0f} s for the output's lock (a former attempt's node may have died): "
                           f"{'free' if free else 'still held; the run below says by whom'}\n")
    local = local_cache_path(job.output)
    backups = CacheBackups(local, job.output)
    backups.restore()
    summary = job.output.with_name(f"{stem}.summary.json")
    summary.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "mics_agents", "run", *job.run_args, "--output", str(job.output),
        "--shard", f"{job.index}/{job.count}", "--cache", str(local), "--json-summary", str(summary),
    ]
    environment = {**os.environ, **job.env}
    committed_file = committed_path(job.output)
    batched = "--batch" in job.run_args
    # Run again while every item waits on batches: only a batched run, and not when the user said --no-wait.
    rerun_every = job.batch_rerun_every if batched and "--no-wait" not in job.run_args else None
    gate: Path | None = None
    if batched:
        environment[COMMITTED_FILE_VARIABLE] = str(committed_file)
        if job.budget_gate:  # node-local: only this task and its run use it
            import tempfile

            gate = Path(tempfile.mkdtemp(prefix="mics-gate-"))
            environment[GATE_FOLDER_VARIABLE] = str(gate)
    refused = False
    if rerun_every is not None:
        command.append("--no-wait")
    tails = [JournalTail(job.output, keep_kinds=True), JournalTail(_failed_path(job.output), keep_kinds=True)]
    run_id = run_id_for(job.output)
    before: Counter | None = None
    already_done = 0
    sent: dict[str, Any] | None = None
    spend = Spend(local, run_id)

    def committed() -> float:
        return _read_amount(committed_file, "committed_usd") if batched else 0.0

    def report() -> None:
        nonlocal before, already_done, sent
        counts: Counter = Counter()
        try:
            for tail in tails:
                counts.update(tail.read())
        except OSError:  # the shared storage, unavailable for a moment (ESTALE, EIO): the next report reads it
            return
        if before is None:  # what the journal held when this attempt started; its lines since are items it ended
            before = counts
            already_done = done_before(tails[0].kinds or {}, tails[1].kinds or {},
                                       retry_failed="--retry-failed" in job.run_args)
            for tail in tails:
                tail.kinds = None  # a key per item: not kept while the shard runs
        snapshot = {name: counts[name] - before[name] for name in counts}
        snapshot.update(already_done=already_done, spent_usd=spend.read(), committed_usd=committed(),
                        attempt_pid=os.getpid())
        if refused:
            snapshot["budget_refused"] = True
        if snapshot != sent:  # items take minutes: most reports would say nothing new to one actor for every shard
            board.report.remote(job.index, snapshot)
            sent = snapshot

    def start() -> subprocess.Popen:
        with open(log, "ab") as log_file:
            return subprocess.Popen(command, env=environment, cwd=job.output.parent, stdin=subprocess.DEVNULL,
                                    stdout=log_file, stderr=log_file, preexec_fn=_die_with_parent)

    backed_up = reported = time.monotonic()
    cancelled = False
    reruns = 0

    def checkpoint() -> None:
        problem = backups.back_up()
        if problem is not None:  # said in the shard's log; the shard runs on
            with open(log, "a", encoding="utf-8") as log_file:
                log_file.write(f"cache checkpoint failed ({problem}); the next one tries again\n")
        _write_spent(job.output, spend.read(), committed())

    def answer_gate() -> None:
        nonlocal refused
        for ask in sorted(gate.glob("ask-*.json")) if gate is not None else ():
            answer = ask.with_suffix(".answer")
            if answer.exists():
                continue
            try:
                question = json.loads(ask.read_text(encoding="utf-8"))
                own, estimate = float(question["own"]), float(question["estimate"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # gone (the run gave up on it), or not ours
            granted = _reserve(board, job.index, own, estimate)
            if not granted:
                refused = True
                report()  # the driver stops every shard on it without waiting for the next report
            staged = answer.with_suffix(".staged")
            staged.write_text(json.dumps({"granted": granted}), encoding="utf-8")
            os.replace(staged, answer)

    def tick() -> None:
        nonlocal reported, backed_up
        time.sleep(_POLL_S)
        answer_gate()
        now = time.monotonic()
        if now - reported >= _REPORT_S:
            report()
            reported = now
        if now - backed_up >= job.backup_every:
            checkpoint()
            backed_up = now

    child: subprocess.Popen | None = None
    try:
        report()
        while True:
            child = start()
            while child.poll() is None:
                tick()
            if child.returncode != EXIT_BATCHES_PENDING or rerun_every is None:
                break
            # Every item waits on a batch in progress: the run exited (its memory freed, its ledger closed);
            # it is started again once the batches had time to move, and resumes from its journal and ledger.
            reruns += 1
            child = None
            resume_at = time.monotonic() + rerun_every
            while time.monotonic() < resume_at:
                tick()
    except KeyboardInterrupt:
        cancelled = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGINT)
            child.wait()
    finally:
        if child is not None and child.poll() is None:  # an error of ours above: never leave the shard running
            child.kill()
            child.wait()
        if local.exists():
            checkpoint()  # and all it spent (the local file goes now)
        remove_local(local)
        if gate is not None:
            import shutil

            shutil.rmtree(gate, ignore_errors=True)
    report()
    # Cancelled between two runs (all its items waited on batches): it stopped as an interrupted run does.
    code = child.returncode if child is not None else 130
    if cancelled and code in (-signal.SIGINT, EXIT_BATCHES_PENDING):
        code = 130  # the cancel came before the run set its handler (while importing), or as it left waiting
    result = {"index": job.index, "exit_code": code, "cancelled": cancelled, "log": str(log),
              "lock_wait_s": round(waited, 1), "batch_reruns": reruns,
              "cache_backups": {"full": backups.full_copies, "deltas": backups.delta_copies}}
    try:
        result["summary"] = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none (the run stopped before its end), or cut short by a kill
        result["last_line"] = last_line(log)
    return result
