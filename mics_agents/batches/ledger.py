"""The batch ledger: every batch a run submits, and every request in it, written down before the network
call that spends money on it.

It lives beside the run's output (``OUT_batches.sqlite``), with the journal, not in the call cache: a cache
can be deleted or shared, and what was paid for must outlive it. A batch goes through these states, each
committed (synchronously, to the disk) before the next call:

- ``recorded``: its requests are written; nothing has been sent that could be paid for;
- ``uploaded`` (OpenAI): its input file is uploaded and the file id stored, the batch not yet known to exist;
- ``submitted``: the provider's batch id is stored;
- ``ended``: its results are in the cache and each request's outcome is here.

A restart finds a ``recorded`` or ``uploaded`` batch whose create call may have reached the provider and
looks for it there before anything is sent again (``queue.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..store import Store

__all__ = ["BatchLedger", "BatchRecord", "ledger_path"]


def ledger_path(output: Path) -> Path:
    """``OUT.jsonl`` -> ``OUT_batches.sqlite``, beside it."""
    name = Path(output).name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    return Path(output).with_name(f"{stem}_batches.sqlite")


@dataclass
class BatchRecord:
    batch_key: str
    provider: str
    endpoint: str
    state: str
    input_file_id: str | None
    batch_id: str | None
    status: str | None
    requests: int
    estimated_cost_usd: float
    created_at: float
    submitted_at: float | None
    custom_ids: list[tuple[str, str]] = field(default_factory=list)  # (custom_id, model name)


_COLUMNS = ("batch_key, provider, endpoint, state, input_file_id, batch_id, status, requests, estimated_cost_usd, "
            "created_at, submitted_at")


class BatchLedger:
    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    async def open(cls, path: Path) -> "BatchLedger":
        # Beside the journal, so maybe on a network filesystem: one process at a time (the output's lock
        # already says so), without WAL's shared-memory file; a second opener is refused, never blocked.
        store = await Store.open(path, exclusive=True)
        try:
            await store.sync_every_commit()
        except BaseException:
            await store.close()
            raise
        return cls(store)

    async def close(self) -> None:
        await self.store.close()

    async def record(self, batch_key: str, run_id: str | None, provider: str, endpoint: str,
                     requests: list[tuple[str, str]], estimated_cost_usd: float) -> None:
        """A batch about to be sent, with its requests (custom_id, model): one transaction."""
        await self.store.write_together([
            ("INSERT INTO batches (batch_key, run_id, provider, endpoint, state, requests, estimated_cost_usd, "
             "created_at) VALUES (?, ?, ?, ?, 'recorded', ?, ?, ?)",
             (batch_key, run_id, provider, endpoint, len(requests), estimated_cost_usd, time.time())),
            ("INSERT INTO batch_requests (batch_key, custom_id, model) VALUES (?, ?, ?)",
             [(batch_key, custom_id, model) for custom_id, model in requests]),
        ])

    async def set_file(self, batch_key: str, input_file_id: str) -> None:
        await self.store.write_together([
            ("UPDATE batches SET state = 'uploaded', input_file_id = ? WHERE batch_key = ?", (input_file_id, batch_key)),
        ])

    async def set_submitted(self, batch_key: str, batch_id: str, status: str) -> None:
        await self.store.write_together([
            ("UPDATE batches SET state = 'submitted', batch_id = ?, status = ?, submitted_at = ? WHERE batch_key = ?",
             (batch_id, status, time.time(), batch_key)),
        ])

    async def set_status(self, batch_key: str, status: str) -> None:
        await self.store.write_together([("UPDATE batches SET status = ? WHERE batch_key = ?", (status, batch_key))])

    async def end(self, batch_key: str, status: str, outcomes: list[tuple[str, str, str]]) -> None:
        """The batch's results are in the cache: each request's (custom_id, outcome, error), and the batch
        ended, in one transaction."""
        await self.store.write_together([
            ("UPDATE batch_requests SET outcome = ?, error = ? WHERE batch_key = ? AND custom_id = ?",
             [(outcome, error[:500] or None, batch_key, custom_id) for custom_id, outcome, error in outcomes]),
            ("UPDATE batches SET state = 'ended', status = ?, ended_at = ? WHERE batch_key = ?",
             (status, time.time(), batch_key)),
        ])

    async def forget(self, batch_key: str) -> None:
        """A batch that was never created (the provider refused it, or a restart found no trace of it)."""
        await self.store.write_together([
            ("DELETE FROM batch_requests WHERE batch_key = ?", (batch_key,)),
            ("DELETE FROM batches WHERE batch_key = ?", (batch_key,)),
        ])

    async def unfinished(self) -> list[BatchRecord]:
        """Batches not ended, oldest first, with their requests."""
        rows = await self.store.read(f"SELECT {_COLUMNS} FROM batches WHERE state != 'ended' ORDER BY created_at")
        records = [BatchRecord(*row) for row in rows]
        for record in records:
            record.custom_ids = [(str(custom_id), str(model)) for custom_id, model in await self.store.read(
                "SELECT custom_id, model FROM batch_requests WHERE batch_key = ?", (record.batch_key,))]
        return records

    async def outcomes(self) -> list[tuple[str, str, str | None, str | None]]:
        """Every request of every batch, in the order they were recorded: (custom_id, batch_key, batch state,
        outcome)."""
        rows = await self.store.read(
            "SELECT r.custom_id, r.batch_key, b.state, r.outcome FROM batch_requests r "
            "JOIN batches b ON b.batch_key = r.batch_key ORDER BY r.rowid")
        return [(str(a), str(b), c, d) for a, b, c, d in rows]

    async def ended_batch(self, batch_key: str) -> BatchRecord | None:
        rows = await self.store.read(f"SELECT {_COLUMNS} FROM batches WHERE batch_key = ?", (batch_key,))
        return BatchRecord(*rows[0]) if rows else None

    async def known_batch_ids(self) -> set[str]:
        rows = await self.store.read("SELECT batch_id FROM batches WHERE batch_id IS NOT NULL")
        return {str(row[0]) for row in rows}

    async def totals(self) -> dict[str, float]:
        """Batches and requests of all sessions, for the summary."""
        rows = await self.store.read(
            "SELECT COUNT(*), COALESCE(SUM(requests), 0), COALESCE(SUM(CASE WHEN state != 'ended' THEN 1 ELSE 0 END), 0) "
            "FROM batches WHERE state IN ('submitted', 'ended')")
        batches, requests, open_batches = rows[0] if rows else (0, 0, 0)
        return {"batches": int(batches), "requests": int(requests), "in_progress": int(open_batches)}
