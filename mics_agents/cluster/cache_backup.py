"""A shard's call cache on a cluster: a node-local SQLite file, copied beside the shard's journal.

SQLite's WAL needs shared memory that network filesystems do not give, so the live cache is on the node's own
disk. At checkpoints its pages are copied with SQLite's backup API into another node-local file, which is then
copied to the shared storage under a temporary name, fsynced and renamed: no SQLite connection ever opens a file
on the shared storage, and a reader of the backup sees the old copy or the new one, never half of one. A retried
task (another node, or the same one after its worker died) starts from that backup, so completed items (in the
journal) are never searched again and only the calls its items in flight made since the last copy are repeated.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import uuid
from pathlib import Path

__all__ = ["backup_path", "local_cache_path", "restore", "back_up"]


def backup_path(shard_output: Path) -> Path:
    """``OUT.shard-0-of-4.jsonl`` -> ``OUT.shard-0-of-4.cache.sqlite``, beside it on the shared storage."""
    return shard_output.with_name(shard_output.name.removesuffix(".jsonl") + ".cache.sqlite")


def local_cache_path(shard_output: Path, local_dir: Path | None = None) -> Path:
    """A fresh node-local file for this attempt. Each attempt has its own: one on a node where an earlier
    attempt died starts from the backup too, as one on another node would."""
    folder = Path(local_dir or tempfile.gettempdir()) / "mics-cluster"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{shard_output.name.removesuffix('.jsonl')}.{uuid.uuid4().hex[:12]}.sqlite"


def restore(shard_output: Path, local: Path) -> bool:
    """Copy the shard's backup (if any) to ``local``; whether there was one."""
    source = backup_path(shard_output)
    if not source.is_file():
        return False
    shutil.copyfile(source, local)
    return True


def back_up(local: Path, shard_output: Path) -> None:
    """Copy the live cache at ``local`` to its backup beside the journal (see the module's docstring)."""
    snapshot = local.with_name(local.name + ".snapshot")
    target = backup_path(shard_output)
    staged = target.with_name(target.name + f".{os.getpid()}.tmp")
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
        shutil.copyfile(snapshot, staged)
        with open(staged, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, target)
    finally:
        snapshot.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)


def remove_local(local: Path) -> None:
    for path in (local, local.with_name(local.name + "-wal"), local.with_name(local.name + "-shm")):
        path.unlink(missing_ok=True)
