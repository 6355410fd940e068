"""A shard's call cache on a cluster: a node-local SQLite file, copied beside the shard's journal.

SQLite's WAL needs shared memory that network filesystems do not give, so the live cache is on the node's own
disk. At checkpoints it is copied to the shared storage: every file is first written node-locally, then copied
under a temporary name, fsynced and renamed, so no SQLite connection ever opens a file on the shared storage and a
reader sees an old file or a new one, never half of one. A retried task (another node, or the same one after its
worker died) starts from that copy, so completed items (in the journal) are never searched again and only the calls
its items in flight made since the last checkpoint are repeated.

A shard of a 10^5-item run holds gigabytes of replies, too much to copy whole every minute. A checkpoint therefore
copies only the calls added since the one before (a *delta*: rows past the last rowid copied; the cache never
deletes a row, and a reply asked again gets a new, larger rowid) and copies the whole cache (the *base*) again only
once the deltas together are as large as the base, or there are ``DELTA_LIMIT`` of them: each byte is copied about
twice over the run, and a restore reads at most twice the cache. A restore copies the base, then applies the deltas
in order, never letting an older delta's row replace a newer reply to the same call.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import tempfile
import uuid
from pathlib import Path

__all__ = ["CacheBackups", "backup_path", "delta_paths", "local_cache_path", "restore", "back_up", "remove_local"]

DELTA_LIMIT = 64


def backup_path(shard_output: Path) -> Path:
    """``OUT.shard-0-of-4.jsonl`` -> ``OUT.shard-0-of-4.cache.sqlite``, beside it on the shared storage."""
    return shard_output.with_name(shard_output.name.removesuffix(".jsonl") + ".cache.sqlite")


def _delta_path(shard_output: Path, number: int) -> Path:
    return shard_output.with_name(f"{shard_output.name.removesuffix('.jsonl')}.cache.delta-{number:06d}.sqlite")


def delta_paths(shard_output: Path) -> list[tuple[int, Path]]:
    """The shard's deltas on the shared storage, oldest first."""
    pattern = re.compile(re.escape(shard_output.name.removesuffix(".jsonl")) + r"\.cache\.delta-(\d{6,})\.sqlite")
    found = []
    for path in shard_output.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def local_cache_path(shard_output: Path, local_dir: Path | None = None) -> Path:
    """A fresh node-local file for this attempt. Each attempt has its own: one on a node where an earlier
    attempt died starts from the backup too, as one on another node would."""
    folder = Path(local_dir or tempfile.gettempdir()) / "mics-cluster"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{shard_output.name.removesuffix('.jsonl')}.{uuid.uuid4().hex[:12]}.sqlite"


def _publish(local_file: Path, target: Path) -> None:
    """Copy a finished node-local file to ``target`` on the shared storage: staged, fsynced, renamed."""
    staged = target.with_name(target.name + f".{os.getpid()}.tmp")
    try:
        shutil.copyfile(local_file, staged)
        with open(staged, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)


def _columns(connection: sqlite3.Connection, schema: str, table: str) -> list[str]:
    return [row[1] for row in connection.execute(f"PRAGMA {schema}.table_info({table})")]


def restore(shard_output: Path, local: Path) -> bool:
    """Rebuild the shard's cache at ``local`` from its base and deltas (if any); whether there was a base."""
    source = backup_path(shard_output)
    if not source.is_file():
        return False
    shutil.copyfile(source, local)
    deltas = delta_paths(shard_output)
    if not deltas:
        return True
    connection = sqlite3.connect(local)
    try:
        names = _columns(connection, "main", "calls")
        listed = ", ".join(f'"{name}"' for name in names)
        for _, delta in deltas:
            copy = local.with_name(local.name + ".delta")
            shutil.copyfile(delta, copy)  # read node-locally, as every SQLite file here
            try:
                connection.execute("ATTACH DATABASE ? AS delta", (str(copy),))
                try:
                    with connection:
                        # A row of an older delta never replaces a newer reply to the same call.
                        connection.execute(
                            f"INSERT OR REPLACE INTO main.calls (rowid, {listed}) SELECT source_rowid, {listed} "
                            "FROM delta.calls AS d WHERE NOT EXISTS (SELECT 1 FROM main.calls AS m "
                            "WHERE m.key = d.key AND m.rowid >= d.source_rowid)")
                        runs = ", ".join(f'"{name}"' for name in _columns(connection, "delta", "runs"))
                        if runs:
                            connection.execute(f"INSERT OR REPLACE INTO main.runs ({runs}) SELECT {runs} FROM delta.runs")
                finally:
                    connection.execute("DETACH DATABASE delta")
            finally:
                copy.unlink(missing_ok=True)
    finally:
        connection.close()
    return True


def _max_rowid(path: Path) -> int:
    connection = sqlite3.connect(path)  # node-local; read only (plain mode: a WAL file may have no -shm now)
    try:
        return int(connection.execute("SELECT COALESCE(MAX(rowid), 0) FROM calls").fetchone()[0])
    except sqlite3.OperationalError:  # no calls table yet
        return 0
    finally:
        connection.close()


def back_up(local: Path, shard_output: Path) -> int:
    """Copy the whole live cache at ``local`` to its base beside the journal; the last rowid it holds."""
    snapshot = local.with_name(local.name + ".snapshot")
    try:
        source = sqlite3.connect(local)
        try:
            copy = sqlite3.connect(snapshot)
            try:
                source.backup(copy)
            finally:
                copy.close()
        finally:
            source.close()
        last = _max_rowid(snapshot)
        _publish(snapshot, backup_path(shard_output))
        return last
    finally:
        snapshot.unlink(missing_ok=True)


class CacheBackups:
    """The checkpoints of one attempt's live cache: a delta when that is enough, the base when it is due."""

    def __init__(self, local: Path, shard_output: Path) -> None:
        self.local, self.output = local, shard_output
        self._last_rowid: int | None = None  # calls up to here are in the base and deltas; None: no base yet
        self._base_size = 0
        self._deltas: list[tuple[int, int]] = []  # (number, size) of the deltas since the base
        self._next = 1
        self.full_copies = self.delta_copies = 0

    def restore(self) -> bool:
        """Start from the shard's backup (see :func:`restore`); whether there was one."""
        restored = restore(self.output, self.local)
        deltas = delta_paths(self.output)
        self._next = deltas[-1][0] + 1 if deltas else 1
        if restored:
            self._last_rowid = _max_rowid(self.local)
            self._base_size = backup_path(self.output).stat().st_size
            self._deltas = [(number, path.stat().st_size) for number, path in deltas]
        return restored

    def back_up(self) -> str | None:
        """Take a checkpoint; what went wrong, if it could not (the shard runs on, and the next one tries again:
        a cache still being created, shared storage full or gone for a moment)."""
        if not self.local.exists():
            return None
        try:
            if (self._last_rowid is None or len(self._deltas) >= DELTA_LIMIT
                    or sum(size for _, size in self._deltas) >= self._base_size
                    or not backup_path(self.output).is_file()):  # the base was lost: deltas alone restore nothing
                self._full()
            else:
                self._delta()
        except (sqlite3.Error, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _full(self) -> None:
        self._last_rowid = back_up(self.local, self.output)
        self._base_size = backup_path(self.output).stat().st_size
        self.full_copies += 1
        # The base holds every delta now. One left behind (a crash just here) is applied again harmlessly, and
        # deleted by the next attempt's first full copy. (No listing of the folder: it holds every shard's files.)
        for number, _ in self._deltas:
            _delta_path(self.output, number).unlink(missing_ok=True)
        self._deltas = []

    def _delta(self) -> None:
        staged = self.local.with_name(self.local.name + ".delta-out")
        staged.unlink(missing_ok=True)
        try:
            connection = sqlite3.connect(staged)
            try:
                connection.execute("ATTACH DATABASE ? AS live", (str(self.local),))  # read here, never written
                with connection:
                    connection.execute("CREATE TABLE calls AS SELECT rowid AS source_rowid, * FROM live.calls "
                                       "WHERE rowid > ?", (self._last_rowid,))
                    connection.execute("CREATE TABLE runs AS SELECT * FROM live.runs")
                last = connection.execute("SELECT MAX(source_rowid) FROM calls").fetchone()[0]
                connection.execute("DETACH DATABASE live")
            finally:
                connection.close()
            if last is None:
                return  # nothing new since the last checkpoint
            target = _delta_path(self.output, self._next)
            _publish(staged, target)
            self._deltas.append((self._next, target.stat().st_size))
            self._next += 1
            self._last_rowid = int(last)
            self.delta_copies += 1
        finally:
            staged.unlink(missing_ok=True)


def remove_local(local: Path) -> None:
    for path in (local, local.with_name(local.name + "-wal"), local.with_name(local.name + "-shm")):
        path.unlink(missing_ok=True)
