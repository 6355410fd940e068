"""The two output files of a run, which are also its journal.

Successes go to ``OUT.jsonl``, failures to ``OUT_failed.jsonl``; each line is written whole and fsynced
before the item counts as ended. On start the files are repaired (a line torn by a crash is cut off) and
read back: an item with a line is done, except ``model_error`` failures (and, with ``--retry-failed``,
every failure), whose lines are removed so that the rerun writes exactly one line per item.

The files, not the database, say what is done: one source of truth, checked the moment it is written.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MicsError

__all__ = ["OutputFiles", "ResumeState", "MergeReport", "merge_outputs", "default_failed_path", "FINAL_FAILURES"]

FINAL_FAILURES = frozenset({"no_path", "bad_input", "no_items"})


def default_failed_path(output: Path) -> Path:
    name = output.name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    return output.with_name(f"{stem}_failed.jsonl")


@dataclass
class ResumeState:
    done: set[str] = field(default_factory=set)
    counts: Counter = field(default_factory=Counter)
    repaired_lines: int = 0
    retried_failures: int = 0


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


def _read_lines(path: Path) -> list[dict[str, Any]]:
    records = []
    if not path.exists():
        return records
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise MicsError(
                    f"{path}:{number} is not valid JSON ({exc.msg}); the file was edited or corrupted. "
                    "Fix or remove that line and rerun."
                ) from None
    return records


class OutputFiles:
    def __init__(self, output: Path, failed: Path | None = None, *, group_key: str | None = None) -> None:
        """``group_key``: one item writes several lines, each naming its item in this field and the
        number of lines the item wrote in ``group_size``; an item with fewer lines than that (a crash
        mid-write) is not done and its lines are removed."""
        self.output = Path(output)
        self.group_key = group_key
        self.failed = Path(failed) if failed else default_failed_path(self.output)
        if self.output.resolve() == self.failed.resolve():
            raise MicsError(f"--failed must differ from --output ({self.output})")
        self._locks: dict[Path, asyncio.Lock] = {}
        self._fds: dict[Path, int] = {}
        self._writes: set[asyncio.Future[None]] = set()

    def prepare(self, *, retry_failed: bool = False) -> ResumeState:
        """Repair, read back and prune the files (blocking: call through a thread)."""
        state = ResumeState()
        for path in (self.output, self.failed):
            path.parent.mkdir(parents=True, exist_ok=True)
            state.repaired_lines += _repair_tail(path)
        records = _read_lines(self.output)
        if self.group_key is None:
            for record in records:
                state.done.add(str(record["rid"]))
                state.counts["success"] += 1
        else:
            self._prune_incomplete_groups(records, state)
        kept, dropped = [], 0
        for record in _read_lines(self.failed):
            kind = record.get("error", {}).get("kind")
            if kind in FINAL_FAILURES and not retry_failed:
                kept.append(record)
                state.done.add(str(record.get("key", record.get("rid"))))
                state.counts[kind] += 1
            else:
                dropped += 1
        if dropped:
            _rewrite(self.failed, kept)
        state.retried_failures = dropped
        return state

    def _prune_incomplete_groups(self, records: list[dict[str, Any]], state: ResumeState) -> None:
        groups: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            groups.setdefault(str(record[self.group_key]), []).append(record)
        complete = {key for key, lines in groups.items() if len(lines) == lines[0].get("group_size")}
        state.done.update(complete)
        state.counts["success"] += len(complete)
        if len(complete) < len(groups):
            _rewrite(self.output, [r for r in records if str(r[self.group_key]) in complete])

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
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)

    async def aclose(self) -> None:
        """Wait for writes under way, then close the files."""
        if self._writes:
            await asyncio.wait(set(self._writes))
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace a file's lines atomically (write aside, fsync, rename)."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        for record in records:
            handle.write(_encode(record))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


@dataclass
class MergeReport:
    successes: int = 0
    failures: int = 0
    overlaps: int = 0


def merge_outputs(inputs: list[Path], output: Path, *, dedupe: bool = False) -> MergeReport:
    """Join shard outputs (and their failed files) into ``output`` and its failed file.

    An item in more than one input is refused unless ``dedupe``: then a success wins over a failure,
    and otherwise the first input listed wins.
    """
    successes: dict[str, dict[str, Any]] = {}
    failures: dict[str, dict[str, Any]] = {}
    overlapping: list[str] = []
    for path in inputs:
        if not Path(path).is_file():
            raise MicsError(f"shard output {str(path)!r} not found")
        for record in _read_lines(Path(path)):
            key = str(record.get("rid", record.get("id")))
            if key in successes or key in failures:
                overlapping.append(key)
                failures.pop(key, None)
                successes.setdefault(key, record)
            else:
                successes[key] = record
        for record in _read_lines(default_failed_path(Path(path))):
            key = str(record.get("key", record.get("rid")))
            if key in successes or key in failures:
                overlapping.append(key)
            else:
                failures[key] = record
    if overlapping and not dedupe:
        shown = ", ".join(repr(key) for key in overlapping[:5])
        raise MicsError(
            f"{len(overlapping)} item(s) appear in more than one input ({shown}"
            f"{', ...' if len(overlapping) > 5 else ''}); shards overlap. Use --dedupe to keep one line per item "
            "(a success wins over a failure)."
        )
    for path, records in ((Path(output), successes), (default_failed_path(Path(output)), failures)):
        path.parent.mkdir(parents=True, exist_ok=True)
        _rewrite(path, list(records.values()))
    return MergeReport(successes=len(successes), failures=len(failures), overlaps=len(overlapping))
