"""The two output files of a run, which are also its journal.

Successes go to ``OUT.jsonl``, failures to ``OUT_failed.jsonl``; each line is written whole and fsynced
before the item counts as ended. While a run goes the files only grow: a retried item appends its new
outcome, and no line is removed before its replacement is on disk. One rule, :func:`winning_lines`, says
which line stands for an item, for every reader (resume, merge, report, dataset build): a success wins,
else the last failure. A run that reaches the end of its input compacts both files to those lines
(written aside, fsynced, renamed), so a finished run has one line per item.

One process owns an output at a time: :class:`OutputLock` holds an ``flock`` on ``OUT.jsonl.lock``, beside
the output's real path (a symlink or another spelling of a running run's output finds the same lock).

The files, not the database, say what is done: one source of truth, checked the moment it is written.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import current_failure_key
from .errors import ForeignOutputError, MicsError, OutputBusyError, OutputWriteError
from .grading import GRADER_VERSION

__all__ = [
    "OutputFiles",
    "OutputLock",
    "Inspection",
    "ResumeState",
    "MergeReport",
    "Line",
    "merge_outputs",
    "winning_lines",
    "settle",
    "success_line",
    "failure_key",
    "foreign_success",
    "foreign_failure",
    "default_failed_path",
    "lock_path",
    "real_path",
    "check_writable_file",
    "FINAL_FAILURES",
    "GROUP_KEY",
]

FINAL_FAILURES = frozenset({"no_path", "bad_input", "no_items"})
# The field naming the item of a success written as several lines (mics generate: one line per
# generated question, each with ``group_size``).
GROUP_KEY = "case_id"
# Tests only: NAME:N kills the process (SIGKILL) the N-th time it passes the point NAME of the journal.
KILL_AT_VARIABLE = "MICS_TEST_KILL_AT"


def default_failed_path(output: Path) -> Path:
    name = output.name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    return output.with_name(f"{stem}_failed.jsonl")


def lock_path(output: Path) -> Path:
    return Path(output).with_name(Path(output).name + ".lock")


def real_path(path: Path | str) -> Path:
    """``path`` with symlinks, ``.`` and ``..`` resolved (the file itself, however it was spelled)."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise ForeignOutputError(f"{path} cannot be resolved ({exc}); give a path that leads to a file") from None


def check_writable_file(path: Path, option: str = "--output") -> None:
    """Refuse a path that exists and is not a regular file (``/dev/null``, a FIFO, a folder): appending,
    fsyncing and compacting need a file of their own."""
    if path.exists() and not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file (a device, FIFO or socket)"
        raise ForeignOutputError(f"{path} is {what}; give {option} a file of its own to write (nothing was written)")


# -- one owner per output ------------------------------------------------------------------------


class OutputLock:
    """An exclusive ``flock`` on the lock file beside each file a run writes (its output, and its failed file
    when given), with who holds it written inside.

    The kernel drops the lock when its holder dies, however it dies, so a lock left by a dead process
    never blocks: the next owner takes it and writes its own name over the old one.
    """

    def __init__(self, output: Path, *others: Path) -> None:
        # The lock belongs to the file, not to the name it was given by.
        self.output = real_path(output)
        self.targets = list(dict.fromkeys([self.output, *map(real_path, others)]))
        self.path = lock_path(self.output)
        self._fds: list[int] = []

    def probe(self) -> None:
        """Raise :class:`OutputBusyError` if another process holds a lock now, without creating a lock file:
        a command that may still end with a configuration error checks this first and takes the locks
        (:meth:`acquire`) only when nothing else can stop it."""
        for target in self.targets:
            try:
                fd = os.open(lock_path(target), os.O_RDWR)
            except OSError:
                continue  # no lock file: nobody holds it (one that cannot be opened is reported by acquire)
            try:
                self._lock(fd, target)
            finally:
                os.close(fd)  # closing drops the lock just taken

    def acquire(self) -> None:
        """Take every lock or raise :class:`OutputBusyError` naming the holder (never waits)."""
        try:
            for target in self.targets:
                self._fds.append(self._acquire_one(target))
        except BaseException:
            self.release()
            raise

    def _acquire_one(self, target: Path) -> int:
        path = lock_path(target)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise MicsError(
                f"cannot create the lock file {path} beside the output ({exc.strerror}): choose an output "
                "in a folder you can write to."
            ) from None
        try:
            self._lock(fd, target)
        except BaseException:
            os.close(fd)
            raise
        self._write_holder(fd)
        return fd

    @staticmethod
    def _lock(fd: int, target: Path) -> None:
        path = lock_path(target)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(_read_all(fd))
            raise OutputBusyError(
                f"{target} is being written by another run ({holder}; lock file {path}). "
                "Two runs on one output would write every item twice and pay for its calls twice: wait for "
                "that run to end, stop it, or give this one another --output (and --failed)."
            ) from None
        except OSError as exc:
            raise MicsError(
                f"cannot lock {path} ({exc.strerror}): the file system under the output does not support "
                "file locks. Write the output to a local disk or a file system with flock support."
            ) from None

    @staticmethod
    def _write_holder(fd: int) -> None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)

    def release(self) -> None:
        """Closing the files drops the locks. The files stay: removing one would let two owners in."""
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.pread(fd, 65536, sum(map(len, chunks))):
        chunks.append(chunk)
    return b"".join(chunks)


def _describe_holder(data: bytes) -> str:
    try:
        holder = json.loads(data)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder.get('command', '?')}"
    except (ValueError, KeyError, TypeError):
        return "a process that is just starting"  # it holds the lock but has not written its name yet


# -- the one rule --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """What the rule reads of a success line: its item (None: the line names none, so it stands alone),
    and how many lines the item wrote."""

    key: str | None
    group_size: int = 1


def _key(value: Any) -> str | None:
    return None if value is None else str(value)


def success_line(record: dict[str, Any]) -> Line:
    if "group_size" in record:
        return Line(_key(record.get(GROUP_KEY)), _group_size(record["group_size"]))
    return Line(_key(record.get("rid", record.get("id"))))


def failure_key(record: dict[str, Any]) -> str | None:
    """The item a failed-file line is about; the made-up keys of earlier versions read as today's."""
    return current_failure_key(record)


def foreign_success(record: Any, group_key: str | None = None) -> str | None:
    """Why a success-file line is not one mics-agents wrote, or None. Every command's success lines have
    always carried these fields: ``rid`` and ``gt_answer`` (mics run, merge, eval), or the item field and
    ``id`` (mics generate). An input line (``messages``, or ``question``/``answer`` but no ``gt_answer``) is
    not one."""
    if not isinstance(record, dict):
        return f"it is a JSON {type(record).__name__}, not an object"
    required = (group_key, "id") if group_key else ("rid", "gt_answer")
    missing = [name for name in required if name not in record]
    if missing:
        return f"it has no {' or '.join(repr(name) for name in missing)} field"
    return None


def foreign_failure(record: Any) -> str | None:
    """Why a failed-file line is not one mics-agents wrote (``{rid, key, line, error: {kind, message},
    input}``), or None."""
    if not isinstance(record, dict):
        return f"it is a JSON {type(record).__name__}, not an object"
    error = record.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("kind"), str):
        return "its 'error' is not an object with a 'kind'"
    if "key" not in record and "rid" not in record:
        return "it names no item (no 'key' or 'rid')"
    return None


def _group_size(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 1


def _groups(lines: Sequence[Line]) -> Iterator[tuple[int, int, bool]]:
    """(first index, end index, complete) of each item's run of success lines, in file order."""
    start = 0
    while start < len(lines):
        key, size = lines[start].key, lines[start].group_size
        end = start + 1
        while end < len(lines) and end - start < size and key is not None and lines[end].key == key:
            end += 1
        yield start, end, end - start == size
        start = end


def winning_lines(successes: Sequence[Line], failures: Sequence[str | None]) -> tuple[list[int], list[int]]:
    """THE rule of the journal, the one place it is written down: which lines stand for their item.

    An item's success (its first complete one: all the lines it wrote together) wins; an item without one
    is told by its last failure line. ``failures`` are the item keys of the failed file's lines. Returns
    the indexes of the standing success lines and failure lines, each in file order.
    """
    kept: list[int] = []
    succeeded: set[str] = set()
    for start, end, complete in _groups(successes):
        key = successes[start].key
        if complete and key not in succeeded:
            if key is not None:
                succeeded.add(key)
            kept.extend(range(start, end))
    last_failure: dict[str | int, int] = {}
    for index, key in enumerate(failures):
        if key not in succeeded:
            last_failure[index if key is None else key] = index
    return kept, sorted(last_failure.values())


def settle(successes: list[dict[str, Any]], failures: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The records of :func:`winning_lines`: one outcome per item."""
    kept, failed = winning_lines([success_line(r) for r in successes], [failure_key(r) for r in failures])
    return [successes[i] for i in kept], [failures[i] for i in failed]


# -- reading the files ---------------------------------------------------------------------------


@dataclass
class ResumeState:
    done: set[str] = field(default_factory=set)
    counts: Counter = field(default_factory=Counter)
    repaired_lines: int = 0
    retried_failures: int = 0
    older_grader: int = 0  # finished MICS records an older grader graded: their scores stand as they were


@dataclass
class Inspection:
    """What :meth:`OutputFiles.inspect` read: the lines of both files, and each file's identity, size and
    modification time then (None: absent)."""

    successes: list["_Entry"]
    failures: list["_Entry"]
    stamps: tuple[tuple[int, int, int] | None, ...]


@dataclass
class _Entry:
    """A line of a file, as much of it as resuming and compacting need, and where its bytes are."""

    line: Line
    kind: str | None
    start: int
    end: int
    older_grader: bool = False  # a MICS record graded by an older grader (mics_agents.grading)


def _decode(raw: bytes, path: Path, number: int, *, objects_only: bool = True) -> Any:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "nested too deeply"
        raise ForeignOutputError(
            f"{path}:{number} is not valid JSON ({reason}); the file was edited or corrupted. "
            "Fix or remove that line and rerun (nothing was written)."
        ) from None
    if objects_only and not isinstance(record, dict):
        raise ForeignOutputError(f"{path}:{number} is not a JSON object; the file was edited. Fix or remove that line "
                                 "and rerun (nothing was written).")
    return record


def _refuse_foreign(path: Path, number: int, reason: str, *, failures: bool) -> None:
    what = "a failed file" if failures else "an output"
    if number == 1:
        raise ForeignOutputError(
            f"{path} is not {what} of mics-agents: its first line is not a line we write ({reason}). Is it your "
            f"input file? Give the run {what} of its own (nothing was written)."
        )
    raise ForeignOutputError(
        f"{path}:{number} is not a line mics-agents writes ({reason}); someone edited the file. Fix or remove "
        "that line and rerun (nothing was written)."
    )


def _numbered_lines(path: Path, *, whole_only: bool = False) -> Iterator[tuple[int, int, int, bytes]]:
    """(line number, start, end, bytes) of each non-blank line; ``whole_only`` leaves out a last line without
    its newline (a torn write, which the repair cuts)."""
    if not path.exists():
        return
    with open(path, "rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            if whole_only and not raw.endswith(b"\n"):
                return
            if raw.strip():
                yield number, start, offset, raw


def _scan(path: Path, *, failures: bool, group_key: str | None = None, whole_only: bool = False) -> list[_Entry]:
    """The lines of a file; a line mics-agents does not write raises :class:`ForeignOutputError`."""
    entries = []
    for number, start, end, raw in _numbered_lines(path, whole_only=whole_only):
        record = _decode(raw, path, number, objects_only=False)
        reason = foreign_failure(record) if failures else foreign_success(record, group_key)
        if reason:
            _refuse_foreign(path, number, reason, failures=failures)
        if failures:
            error = record.get("error")
            kind = error.get("kind") if isinstance(error, dict) else None
            entries.append(_Entry(Line(failure_key(record)), kind, start, end))
        else:
            older = "search_id" in record and record.get("grader_version") != GRADER_VERSION
            entries.append(_Entry(success_line(record), None, start, end, older_grader=older))
    return entries


def _repair_tail(path: Path) -> int:
    """Cut a last line that a crash left without its newline. Returns 1 if it did, else 0."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return 0
        size = handle.seek(0, os.SEEK_END)
        # Walk back to the last newline in chunks.
        position = size
        while position > 0:
            step = min(65536, position)
            handle.seek(position - step)
            chunk = handle.read(step)
            newline = chunk.rfind(b"\n")
            if newline != -1:
                handle.truncate(position - step + newline + 1)
                break
            position -= step
        else:
            handle.truncate(0)
        handle.flush()
        os.fsync(handle.fileno())
    return 1


def _cut_unfinished_group(path: Path, entries: list[_Entry]) -> int:
    """Cut the lines of an item whose write a crash stopped part-way (only the last write can be one):
    like a torn line they never counted. Returns how many lines it cut."""
    last = None
    for last in _groups([entry.line for entry in entries]):
        pass
    if last is None or last[2]:
        return 0
    start = last[0]
    with open(path, "rb+") as handle:
        handle.truncate(entries[start].start)
        os.fsync(handle.fileno())
    cut = len(entries) - start
    del entries[start:]
    return cut


# -- rewriting a file atomically -----------------------------------------------------------------

_passed: Counter = Counter()
_passed_lock = threading.Lock()


def _crash_point(name: str) -> bool:
    """True when the test asked (``MICS_TEST_KILL_AT=NAME:N``) to die at this, the N-th pass of NAME."""
    target, _, count = os.environ.get(KILL_AT_VARIABLE, "").partition(":")
    if target != name:
        return False
    with _passed_lock:
        _passed[name] += 1
        return _passed[name] == int(count or 1)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _maybe_die(name: str) -> None:
    if _crash_point(name):
        _die()


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(path: Path, chunks: Iterator[bytes]) -> None:
    """Write ``chunks`` to a temporary file of this process beside ``path``, fsync it, rename it over
    ``path`` and fsync the folder: a reader sees the old file or the new one, never a mix."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _mode_for(path))  # mkstemp makes 0600; the file keeps the mode it had, or gets the usual
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        _maybe_die("compact-write")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    _maybe_die("compact-replace")


def _mode_for(path: Path) -> int:
    """The permission bits ``path`` has, or those a new file gets under the process's umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, for every thread, while it asks)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _copy_ranges(path: Path, ranges: list[tuple[int, int]]) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        for start, end in ranges:
            handle.seek(start)
            yield handle.read(end - start)


def _encode(record: dict[str, Any]) -> bytes:
    """One line. Only ``\\n`` ends it: U+2028, U+0085 and the like stay inside (every reader here splits on
    ``\\n`` alone). Text with a lone surrogate (from a ``"\\ud800"`` escape in the input) has no UTF-8
    form; such a record is written with ASCII escapes, which reads back to the same text."""
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")


def _remove_leftover_temporaries(path: Path) -> None:
    """Temporary files a killed compaction left (only an owner of the output makes them)."""
    for leftover in path.parent.glob(glob.escape(f".{path.name}.") + "*.tmp"):
        leftover.unlink(missing_ok=True)


# -- the files of a run --------------------------------------------------------------------------


class OutputFiles:
    def __init__(self, output: Path, failed: Path | None = None, *, group_key: str | None = None) -> None:
        """``group_key``: one item writes several lines, each naming its item in this field and the
        number of lines the item wrote in ``group_size``; an item with fewer lines than that (a crash
        mid-write) is not done."""
        self.output = real_path(output)
        self.group_key = group_key
        self.failed = real_path(failed) if failed else default_failed_path(self.output)
        if self.output == self.failed:
            raise MicsError(f"--failed must differ from --output ({self.output})")
        self._locks: dict[Path, asyncio.Lock] = {}
        self._fds: dict[Path, int] = {}
        self._writes: set[asyncio.Future[None]] = set()
        self._broken: OutputWriteError | None = None  # a write failed: no line may follow a partial one

    def check_paths(self) -> None:
        """Refuse an output or failed path that is not a file to write (blocking; cheap)."""
        check_writable_file(self.output, "--output")
        check_writable_file(self.failed, "--failed")

    def inspect(self) -> "Inspection":
        """Read every line back and refuse a file mics-agents did not write, writing nothing (blocking: call
        through a thread). Done before the output's lock is taken, so a foreign file ends the command with
        nothing created; :meth:`prepare` uses what it read unless the files changed since."""
        self.check_paths()
        return Inspection(
            successes=_scan(self.output, failures=False, group_key=self.group_key, whole_only=True),
            failures=_scan(self.failed, failures=True, whole_only=True),
            stamps=self._stamps(),
        )

    def _stamps(self) -> tuple[tuple[int, int, int] | None, ...]:
        stamps = []
        for path in (self.output, self.failed):
            try:
                found = path.stat()
                stamps.append((found.st_ino, found.st_size, found.st_mtime_ns))
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)

    def prepare(self, *, retry_failed: bool = False, inspection: "Inspection | None" = None) -> ResumeState:
        """Repair and read back the files (blocking: call through a thread). Removes only what a crash
        left half-written; an item to redo keeps its failure line until its new outcome is written.
        ``inspection``: what :meth:`inspect` read, used when the files are unchanged since."""
        state = ResumeState()
        # Every line is read, and known to be ours, before anything is written (a torn last line is left
        # out here and cut below): an input given as --output is refused untouched.
        if inspection is None or inspection.stamps != self._stamps():
            inspection = self.inspect()
        successes, failures = inspection.successes, inspection.failures
        for path in (self.output, self.failed):
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_leftover_temporaries(path)
            state.repaired_lines += _repair_tail(path)
        state.repaired_lines += _cut_unfinished_group(self.output, successes)
        kept, failed = winning_lines([entry.line for entry in successes], [entry.line.key for entry in failures])
        succeeded = {successes[index].line.key for index in kept} - {None}
        state.older_grader = sum(successes[index].older_grader for index in kept)
        state.done |= succeeded
        state.counts["success"] = len(succeeded)
        for index in failed:
            kind = failures[index].kind
            if kind in FINAL_FAILURES and not retry_failed:
                state.done.add(failures[index].line.key)
                state.counts[kind] += 1
            else:
                state.retried_failures += 1
        return state

    def compact(self) -> int:
        """Rewrite each file to the lines that stand (blocking; only when no write is under way).
        Returns how many lines it dropped."""
        successes = _scan(self.output, failures=False, group_key=self.group_key)
        failures = _scan(self.failed, failures=True)
        kept, failed = winning_lines([entry.line for entry in successes], [entry.line.key for entry in failures])
        dropped = 0
        for path, entries, keep in ((self.output, successes, kept), (self.failed, failures, failed)):
            if len(keep) < len(entries):
                try:
                    _replace_atomically(path, _copy_ranges(path, [(entries[i].start, entries[i].end) for i in keep]))
                except OSError as exc:
                    raise OutputWriteError(
                        f"cannot compact {path}: {exc.strerror or exc}. Every item's outcome is in the file as it "
                        "was (retried items keep their older lines too, and the last one wins); free space on "
                        "that disk and rerun the same command to compact it."
                    ) from None
                dropped += len(entries) - len(keep)
        # A finished run leaves both files, empty ones included: a shard whose items all failed (or that had
        # none) is then told apart from a shard that never ran, and merges as what it is.
        for path in (self.output, self.failed):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        return dropped

    async def append_success(self, records: list[dict[str, Any]]) -> None:
        """All lines of one item in one write, so a crash leaves them whole or detectably cut."""
        if self.group_key is not None:
            records = [{**record, "group_size": len(records)} for record in records]
        await self._append(self.output, records)

    async def append_failure(self, record: dict[str, Any]) -> None:
        await self._append(self.failed, [record])

    async def _append(self, path: Path, records: list[dict[str, Any]]) -> None:
        data = b"".join(_encode(record) for record in records)
        lock = self._locks.setdefault(path, asyncio.Lock())
        async with lock:
            # A write that has started finishes even if its item is cancelled (a second Ctrl-C): the
            # thread cannot be stopped, and the file must not be closed under it.
            write = asyncio.ensure_future(asyncio.to_thread(self._write_durably, path, data))
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)
            await asyncio.shield(write)

    def _write_durably(self, path: Path, data: bytes) -> None:
        """Append ``data`` and fsync it. A write that fails (a full disk, a file-size limit) is cut back to
        the file's size before it, so no partial line is left for a later one to be glued to; the files
        take no further line, and :class:`OutputWriteError` says what to do."""
        if self._broken is not None:
            raise self._broken
        fd = self._fds.get(path)
        size = None
        try:
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(fd).st_size
            if _crash_point("torn"):
                os.write(fd, data[: max(1, len(data) // 2)])
                _die()
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            _maybe_die("write")
            os.fsync(fd)
            _maybe_die("fsync")
        except OSError as exc:
            if fd is not None and size is not None:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass  # then the rerun's repair cuts the torn line
            self._broken = OutputWriteError(
                f"cannot write {path}: {exc.strerror or exc}. The run stopped; every line written before stands. "
                "Free space on that disk (or raise the file-size limit), then rerun the same command to resume."
            )
            raise self._broken from None

    async def aclose(self) -> None:
        """Wait for writes under way, then close the files."""
        if self._writes:
            await asyncio.wait(set(self._writes))
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# -- merging shards ------------------------------------------------------------------------------


@dataclass
class MergeReport:
    successes: int = 0
    failures: int = 0
    overlaps: int = 0


# Where an item's standing lines are in one shard: (start, end) byte offsets, flattened, with touching
# ranges joined, so an item written as one line costs two ints.
_Ranges = tuple[int, ...]
_BYTE_ORDER_MARK = b"\xef\xbb\xbf"


@dataclass
class _ShardFile:
    """One file a merge reads: its path, and the identity it had when its lines were read (a run that
    compacts it between the two passes replaces it, and the offsets would point into another file)."""

    path: Path
    identity: tuple[int, int] | None = None


def _line_offsets(source: _ShardFile, *, failures: bool) -> tuple[list[Line], list[int], list[int]]:
    """The item of each line of a shard file and where its bytes are; the records themselves are decoded one
    at a time and dropped."""
    lines: list[Line] = []
    starts: list[int] = []
    ends: list[int] = []
    if not source.path.exists():
        return lines, starts, ends
    found = source.path.stat()
    source.identity = (found.st_dev, found.st_ino)
    for number, start, end, raw in _numbered_lines(source.path):
        record = _decode(raw, source.path, number)
        reason = foreign_failure(record) if failures else foreign_success(record, GROUP_KEY if "group_size" in record else None)
        if reason:
            _refuse_foreign(source.path, number, reason, failures=failures)
        lines.append(Line(failure_key(record)) if failures else success_line(record))
        starts.append(start)
        ends.append(end)
    return lines, starts, ends


def _ranges(starts: list[int], ends: list[int], indexes: list[int]) -> _Ranges:
    flat: list[int] = []
    for index in indexes:
        if flat and flat[-1] == starts[index]:
            flat[-1] = ends[index]
        else:
            flat += (starts[index], ends[index])
    return tuple(flat)


def _shard_winners(output: _ShardFile, failed: _ShardFile) -> tuple[dict[str | None, _Ranges], dict[str | None, _Ranges]]:
    """One shard's outcome per item, by the rule: (item -> where its success lines are, item -> where its
    failure line is), each in file order."""
    successes, success_starts, success_ends = _line_offsets(output, failures=False)
    failures, failure_starts, failure_ends = _line_offsets(failed, failures=True)
    kept, standing = winning_lines(successes, [line.key for line in failures])
    by_item: dict[str | None, list[int]] = {}
    for index in kept:
        by_item.setdefault(successes[index].key, []).append(index)
    return (
        {key: _ranges(success_starts, success_ends, indexes) for key, indexes in by_item.items()},
        {failures[index].key: (failure_starts[index], failure_ends[index]) for index in standing},
    )


def _copy_lines(sources: list[_ShardFile], chosen: Iterator[tuple[int, _Ranges]]) -> Iterator[bytes]:
    """The bytes of the chosen lines, each ending with its newline. ``chosen`` comes shard by shard, so one
    file is open at a time."""
    current: int | None = None
    handle = None
    try:
        for shard, ranges in chosen:
            if shard != current:
                if handle is not None:
                    handle.close()
                current, handle = shard, _reopen(sources[shard])
            for start, end in zip(ranges[::2], ranges[1::2]):
                handle.seek(start)
                data = handle.read(end - start)
                if start == 0 and data.startswith(_BYTE_ORDER_MARK):
                    data = data[len(_BYTE_ORDER_MARK):]
                yield data if data.endswith(b"\n") else data + b"\n"
    finally:
        if handle is not None:
            handle.close()


def _reopen(source: _ShardFile):
    handle = open(source.path, "rb")
    found = os.fstat(handle.fileno())
    if (found.st_dev, found.st_ino) != source.identity:
        handle.close()
        raise MicsError(
            f"{source.path} was replaced while it was being merged (a run compacted it): nothing was written. "
            "Wait for the shard's run to end and merge again."
        )
    return handle


def merge_outputs(inputs: list[Path], output: Path, *, dedupe: bool = False) -> MergeReport:
    """Join shard outputs (and their failed files) into ``output`` and its failed file.

    Each shard is first read by the rule of :func:`winning_lines`. An item in more than one shard is
    refused unless ``dedupe``: then a success wins over a failure, and otherwise the first input listed
    wins. Raises :class:`OutputBusyError` while a run owns ``output``.

    Memory stays flat in the size of the records: a first pass keeps each item's key and the byte offsets
    of its standing lines, a second copies those bytes, shard by shard, into the new files.
    """
    sources: list[_ShardFile] = []
    successes: dict[str | None, tuple[int, _Ranges]] = {}
    failures: dict[str | None, tuple[int, _Ranges]] = {}
    overlapping: list[str | None] = []
    for path in _shard_outputs(inputs):
        output_file, failed_file = _ShardFile(path), _ShardFile(default_failed_path(path))
        sources += (output_file, failed_file)
        shard_successes, shard_failures = _shard_winners(output_file, failed_file)
        for key, ranges in shard_successes.items():
            if key in successes or key in failures:
                overlapping.append(key)
                failures.pop(key, None)
            successes.setdefault(key, (len(sources) - 2, ranges))
        for key, ranges in shard_failures.items():
            if key in successes or key in failures:
                overlapping.append(key)
            else:
                failures[key] = (len(sources) - 1, ranges)
    if overlapping and not dedupe:
        shown = ", ".join(repr(key) for key in overlapping[:5])
        raise MicsError(
            f"{len(overlapping)} item(s) appear in more than one input ({shown}"
            f"{', ...' if len(overlapping) > 5 else ''}); shards overlap. Use --dedupe to keep one line per item "
            "(a success wins over a failure)."
        )
    output = real_path(output)
    failed = default_failed_path(output)
    for path, option in ((output, "--output"), (failed, "--output's failed file")):
        check_writable_file(path, option)
    output.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(output, failed):
        # A file there that we did not write (an input, a report) is refused, never overwritten.
        _check_ours(output, failures=False)
        _check_ours(failed, failures=True)
        _replace_atomically(output, _copy_lines(sources, iter(successes.values())))
        _replace_atomically(failed, _copy_lines(sources, iter(failures.values())))
    return MergeReport(successes=len(successes), failures=len(failures), overlaps=len(overlapping))


def _shard_outputs(inputs: list[Path]) -> list[Path]:
    """The shards the inputs name, each once and in order. A shard is named by its output or by its failed
    file (``shard-*.jsonl`` matches both), and needs at least one of the two on disk: a shard whose items all
    failed has only failures to give, but a shard with neither file has not run (or the name is wrong)."""
    shards: list[Path] = []
    named: dict[Path, set[bool]] = {}  # shard -> which of its files were named (True: the failed file)
    for path in map(Path, inputs):
        of_failed = _output_of_failed_file(path)
        shard = of_failed or path
        kinds = named.setdefault(shard, set())
        if kinds and (of_failed is not None) not in kinds:
            kinds.add(of_failed is not None)
            continue  # its other file: the same shard (the same file twice is two inputs, and overlaps)
        kinds.add(of_failed is not None)
        if path.exists() and not path.is_file():
            raise MicsError(f"{str(path)!r} is not a file: name the shards' outputs (OUT.jsonl), e.g. run.shard-*.jsonl")
        if not shard.is_file() and not default_failed_path(shard).is_file():
            raise MicsError(
                f"shard output {str(shard)!r} not found, nor its failed file: has that shard run? Merge once every "
                "shard has finished (a finished shard always leaves both files), or check the name."
            )
        shards.append(shard)
    return shards


def _output_of_failed_file(path: Path) -> Path | None:
    """The output whose failed file ``path`` is, when its name says so and its first line is a failure line
    (or it has none); else None: it is an output of its own, whatever it is called."""
    suffix = "_failed.jsonl"
    if not path.name.endswith(suffix) or len(path.name) == len(suffix) or not path.is_file():
        return None
    for number, _, _, raw in _numbered_lines(path):
        record = _decode(raw, path, number, objects_only=False)
        if foreign_failure(record) is not None:
            return None
        break
    return path.with_name(path.name[: -len(suffix)] + ".jsonl")


def _check_ours(path: Path, *, failures: bool) -> None:
    """Raise :class:`ForeignOutputError` at the first line of ``path`` mics-agents does not write."""
    for number, _, _, raw in _numbered_lines(path):
        record = _decode(raw, path, number, objects_only=False)
        reason = foreign_failure(record) if failures else foreign_success(record)
        if reason:
            _refuse_foreign(path, number, reason, failures=failures)


def rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace a JSONL file's lines atomically (write aside, fsync, rename): e.g. regraded predictions."""
    _replace_atomically(Path(path), (_encode(record) for record in records))
