"""The batch ledger lives beside the journal, maybe on a network filesystem (issue 29): it is opened with
SQLite's exclusive locking mode set before WAL, so no ``-shm`` shared-memory file is ever made, and a second
opener (another process, or another run of the same output) is refused at once with one line saying what to
do, never blocked and never let in. The node-local call cache keeps shared WAL (shards and runs share it)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time

import pytest

from mics_agents.batches import BatchLedger, ledger_path
from mics_agents.errors import OutputBusyError
from mics_agents.store import Store


def test_ledger_makes_no_shm_file_and_refuses_a_second_opener(tmp_path):
    path = ledger_path(tmp_path / "out.jsonl")

    async def scenario() -> None:
        ledger = await BatchLedger.open(path)
        try:
            await ledger.record("k1", "run", "openai", "http://x", [("id-1", "openai/m")], 0.25)
            assert not path.with_name(path.name + "-shm").exists()
            assert path.with_name(path.name + "-wal").exists()  # WAL all the same, its index in memory
            started = time.process_time()
            with pytest.raises(OutputBusyError) as refused:
                await BatchLedger.open(path)
            assert time.process_time() - started < 2.0
            message = str(refused.value)
            assert "in use by another process" in message and "\n" not in message and str(path) in message
            # Another process (a plain sqlite3 reader) cannot read it either while it is held.
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                with sqlite3.connect(path, timeout=0.1) as other:
                    other.execute("SELECT COUNT(*) FROM batches").fetchone()
        finally:
            await ledger.close()
        assert not path.with_name(path.name + "-shm").exists()
        reopened = await BatchLedger.open(path)  # closed: free again, with what was recorded
        try:
            assert [record.batch_key for record in await reopened.unfinished()] == ["k1"]
        finally:
            await reopened.close()

    asyncio.run(scenario())


def test_a_second_process_is_refused_with_one_line(tmp_path):
    path = ledger_path(tmp_path / "out.jsonl")
    code = ("import asyncio, sys\n"
            "from mics_agents.batches import BatchLedger\n"
            "from mics_agents.errors import OutputBusyError\n"
            "async def main():\n"
            "    try:\n"
            "        await BatchLedger.open(sys.argv[1])\n"
            "    except OutputBusyError as exc:\n"
            "        print(exc); return 7\n"
            "    return 0\n"
            "sys.exit(asyncio.run(main()))\n")

    async def scenario() -> subprocess.CompletedProcess:
        ledger = await BatchLedger.open(path)
        try:
            return await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code, str(path)],
                                           capture_output=True, text=True, timeout=60)
        finally:
            await ledger.close()

    other = asyncio.run(scenario())
    assert other.returncode == 7, other.stderr
    assert "in use by another process" in other.stdout and other.stdout.count("\n") == 1
    assert not path.with_name(path.name + "-shm").exists()


def test_the_call_cache_stays_shared(tmp_path):
    """Two connections to the cache at once (shards sharing it): both open, both write."""
    path = tmp_path / "cache.sqlite"

    async def scenario() -> None:
        first, second = await Store.open(path), await Store.open(path)
        try:
            assert await first.count_calls() == await second.count_calls() == 0
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())
