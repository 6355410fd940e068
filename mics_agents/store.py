"""The SQLite store (aiosqlite, WAL): the model-call cache, and later the run state.

The schema grows by append-only migrations: each entry of :data:`MIGRATIONS` runs once, in order, and
``PRAGMA user_version`` records how many have run. Never edit a migration that has shipped; add one.

What is stored is what identifies a call (its key: a hash of the model name as configured, the messages
with images replaced by their sha256, sampling parameters, sample index and prompt version) and what the
model answered. Credentials and base URLs are never part of either.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite

from .errors import OutputBusyError, StoreError
from .models.base import ModelResponse
from .models.sanitizing import sanitize_reply

__all__ = ["Store", "MIGRATIONS", "WRITE_ATTEMPTS", "check_cache_file"]

# A cache write that fails (a full disk freed meanwhile, a lock held past busy_timeout) is tried this often.
WRITE_ATTEMPTS = 3
WRITE_RETRY_PAUSE = 0.2  # seconds, times the attempt number

MIGRATIONS: list[str] = [
    # 1: the call cache
    """
    CREATE TABLE calls (
        key TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        text TEXT NOT NULL,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        extra TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    );
    CREATE INDEX calls_by_model ON calls (model);
    """,
    # 2: batch runs, and which run paid for each call (for --budget-usd)
    """
    ALTER TABLE calls ADD COLUMN run_id TEXT;
    CREATE INDEX calls_by_run ON calls (run_id);
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        input TEXT NOT NULL,
        output TEXT NOT NULL,
        settings TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 3: why generation stopped ("length" marks a reply cut off by its token budget)
    """
    ALTER TABLE calls ADD COLUMN finish_reason TEXT;
    """,
    # 4: provider batches (mics run --batch): each batch and its requests are recorded before anything is
    # sent, so a run killed at any point finds what it paid for and never submits a request twice.
    # custom_id is the request's bare cache key.
    """
    CREATE TABLE batches (
        batch_key TEXT PRIMARY KEY,
        run_id TEXT,
        provider TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        state TEXT NOT NULL,
        input_file_id TEXT,
        batch_id TEXT,
        status TEXT,
        requests INTEGER NOT NULL,
        estimated_cost_usd REAL NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        submitted_at REAL,
        ended_at REAL
    );
    CREATE INDEX batches_by_state ON batches (state);
    CREATE TABLE batch_requests (
        batch_key TEXT NOT NULL,
        custom_id TEXT NOT NULL,
        model TEXT NOT NULL,
        outcome TEXT,
        error TEXT,
        PRIMARY KEY (batch_key, custom_id)
    );
    CREATE INDEX batch_requests_by_id ON batch_requests (custom_id);
    """,
]


_SQLITE_HEADER = b"SQLite format 3\x00"


def check_cache_file(path: str | Path | None, variable: str = "MICS_CACHE_PATH") -> None:
    """Check the cache file can be opened, without opening it for real (blocking, stdlib sqlite3, closed
    before returning): start-up calls this before LiteLLM is imported, so a wrong file is reported in well
    under a second. A missing file is fine if its folder can be made and written. Raises :class:`StoreError`."""
    if path is None or str(path) == ":memory:":
        return
    location = Path(path).expanduser()
    where = f"{variable}: the cache {str(path)!r}"
    if location.is_dir():
        raise StoreError(f"{where} is a folder; give a file path, e.g. {str(location / 'mics_cache.sqlite')!r}")
    if not location.exists():
        folder = location.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{where} cannot be created: {exc.strerror or exc} ({str(folder)!r})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(f"{where} cannot be created: the folder {str(folder)!r} is not writable")
        return
    try:
        with open(location, "rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise StoreError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if header and header != _SQLITE_HEADER:
        raise StoreError(f"{where} is not an SQLite database (the file holds something else); point "
                         f"{variable} at another file, or move this one away")
    if not header:
        return  # an empty file: SQLite makes a database of it
    try:
        with closing(sqlite3.connect(location, timeout=5.0)) as connection:
            version = int(connection.execute("PRAGMA user_version").fetchone()[0])
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"{where} cannot be opened: {exc}; point {variable} at another file, or move this "
                         "one away") from None
    if version > len(MIGRATIONS):
        raise StoreError(
            f"{where} has schema version {version}, newer than this mics-agents knows ({len(MIGRATIONS)}); "
            f"upgrade mics-agents or point {variable} at another file"
        )


# How long a start that SQLite answers "database is locked" is tried again.
OPEN_LOCKED_FOR_S = 30.0


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


_CALL_COLUMNS = ("calls (key, model, text, input_tokens, output_tokens, cost_usd, extra, created_at, run_id, finish_reason)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_CALL = "INSERT OR IGNORE INTO " + _CALL_COLUMNS
_REPLACE_CALL = "INSERT OR REPLACE INTO " + _CALL_COLUMNS
# Keys per look-up query (SQLite's default limit on bound values is 32,766 since 3.32; 999 before).
LOOKUP_CHUNK = 500


def _write_rows_in_thread(connection: sqlite3.Connection, rows: list[tuple[str, tuple]]) -> list[int]:
    """Run in the database thread: the statements in one transaction (within one already open, if another
    caller's is, as a lone statement would be), each statement's row count."""
    begin = not connection.in_transaction
    if begin:
        connection.execute("BEGIN IMMEDIATE")
    try:
        counts = [connection.execute(statement, values).rowcount for statement, values in rows]
        if begin:
            connection.execute("COMMIT")
    except BaseException:
        if begin and connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    return counts


def _storable_count(value: object) -> int:
    """A token count SQLite can hold; anything else (a transport's parsing guards against it already) is
    stored as 0, unknown, rather than failing the write of a paid reply."""
    return value if isinstance(value, int) and 0 <= value < 2**63 else 0


def _storable_cost(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 else 0.0


async def _worker_stopped(connection: aiosqlite.Connection) -> None:
    """Wait for the thread of a connection that failed to open: aiosqlite stops it without waiting, and a
    thread still running when the event loop closes prints a traceback ("Event loop is closed")."""
    thread = getattr(connection, "_thread", None)
    if thread is not None and thread.is_alive():
        await asyncio.to_thread(thread.join, 5.0)
        await asyncio.sleep(0)  # let the stop's reply, scheduled by the thread, run while the loop is open


class Store:
    """One connection to the SQLite file. Use ``async with await Store.open(path)`` or call ``close()``."""

    def __init__(self, connection: aiosqlite.Connection, path: str) -> None:
        self._db = connection
        self.path = path
        # Cost of the calls sent (not cached) through this connection, per run id.
        self.new_cost_usd: dict[str, float] = {}
        # Replies that could not be written (after retries) and were used all the same; a rerun pays again.
        self.unsaved_calls = 0
        # Group commit: the replies and look-ups asked for in one turn of the event loop go to the database
        # thread together (one trip, one transaction), see :meth:`put_call` and :meth:`get_call`.
        self._puts: list[tuple[str, tuple, str | None, float, asyncio.Future[None]]] = []
        self._lookups: dict[str, list[asyncio.Future[Any]]] = {}
        self._flushing: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, path: str | Path, *, exclusive: bool = False) -> "Store":
        """``exclusive``: one process at a time (the batch ledger, which may live on a network filesystem
        beside its journal): SQLite's ``locking_mode=EXCLUSIVE``, set before WAL is, keeps the WAL index in
        this process's memory, so no ``-shm`` file (shared memory, unsafe over NFS) is made; a second opener
        is refused at once with :class:`OutputBusyError`."""
        location = str(path)
        if exclusive:
            try:
                Path(location).expanduser().parent.mkdir(parents=True, exist_ok=True)
                return await cls._connect(location, exclusive=True)
            except OSError as exc:
                raise StoreError(f"cannot create the folder of {location!r}: {exc.strerror or exc}") from None
            except aiosqlite.Error as exc:
                if _is_lock_error(exc):
                    raise OutputBusyError(
                        f"{location!r} is in use by another process (another run of this output, maybe on "
                        "another node); wait for it to end or stop it, then rerun") from None
                raise StoreError(f"cannot open {location!r}: {exc}") from exc
        if location != ":memory:":
            try:
                Path(location).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the folder of the cache database {location!r}: "
                                 f"{exc.strerror or exc}. Check the path (MICS_CACHE_PATH).") from None
        # Another process opening the same file at the same moment (shards started together) can make SQLite
        # answer "database is locked" at once, busy timeout or not (a journal-mode change, a WAL recovery):
        # such a start is tried again for a while before it is reported (random exponential waits; a plain
        # loop, as importing tenacity for it cost ~20 ms of every start).
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await cls._connect(location)
            except aiosqlite.Error as exc:
                if not _is_lock_error(exc) or time.monotonic() - started >= OPEN_LOCKED_FOR_S:
                    raise StoreError(f"cannot open the cache database {location!r}: {exc}. Check the path "
                                     "(MICS_CACHE_PATH).") from exc
            await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2 ** attempt)))

    @classmethod
    async def _connect(cls, location: str, *, exclusive: bool = False) -> "Store":
        # Autocommit: each cache write is one statement and one trip to the database thread, durable when it
        # returns; migrations open their own transactions.
        connection = aiosqlite.connect(location, timeout=1.0 if exclusive else 60.0, isolation_level=None)
        try:
            await connection
        except BaseException:
            await _worker_stopped(connection)
            raise
        try:
            # Several processes (shards) may share one file: WAL lets readers run beside the writer and
            # busy_timeout makes a writer wait for the lock instead of failing with "database is locked".
            if exclusive:  # before the first access in WAL mode: the WAL index then lives in heap memory
                await connection.execute("PRAGMA locking_mode=EXCLUSIVE")
            await connection.execute("PRAGMA journal_mode=WAL")
            await connection.execute("PRAGMA synchronous=NORMAL")
            if not exclusive:
                await connection.execute("PRAGMA busy_timeout=60000")
            store = cls(connection, location)
            await store._migrate()
            await store.check_writable()
        except BaseException:
            # Closed here, cancelled or not: an open connection's (non-daemon) thread keeps the process alive.
            await connection.close()
            raise
        return store

    async def _migrate(self) -> None:
        async with self._db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path!r} has schema version {version}, newer than this mics-agents knows "
                f"({len(MIGRATIONS)}); upgrade mics-agents or use another MICS_CACHE_PATH"
            )
        for number in range(version, len(MIGRATIONS)):
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have migrated while we waited for the lock.
                async with self._db.execute("PRAGMA user_version") as cursor:
                    row = await cursor.fetchone()
                if row and row[0] > number:
                    await self._db.execute("ROLLBACK")
                    continue
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        await self._db.execute(statement)
                await self._db.execute(f"PRAGMA user_version = {number + 1}")
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise

    async def schema_version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    def _failed(self, doing: str, exc: BaseException) -> StoreError:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return StoreError(
            f"cannot {doing} the cache database {self.path!r}: {reason}. Check the disk has room and the file and "
            "its folder are writable and not on a network filesystem that breaks SQLite locking; or point "
            "MICS_CACHE_PATH at another file (or set it empty to run without a cache)."
        )

    async def get_call(self, key: str) -> ModelResponse | None:
        """The reply stored under ``key``, or None. The look-ups of one turn of the event loop are one query
        (one trip to the database thread)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiting = self._lookups.get(key)
        if waiting is not None:
            waiting.append(future)
        else:
            if not self._lookups:
                self._start_soon(self._flush_lookups)
            self._lookups[key] = [future]
        row = await future
        if row is None:
            return None
        model, text, input_tokens, output_tokens, cost_usd, extra, finish_reason = row
        # Masked again as read: the entry may predate the scrubbing of replies, or a key set since.
        return sanitize_reply(ModelResponse(
            text=text,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost_usd,
            cached=True,
            finish_reason=finish_reason,
            extra={} if extra == "{}" else json.loads(extra),
        ))

    async def put_call(
        self, key: str, model_name: str, response: ModelResponse, run_id: str | None = None, *, replace: bool = False
    ) -> None:
        """Store a reply. ``replace`` overwrites an entry found unusable (a reply an older version cached).

        A reply was paid for, so a failed write is tried again (:data:`WRITE_ATTEMPTS` times in all, with a
        short pause) before it raises :class:`StoreError`."""
        response = sanitize_reply(response)  # a reply from any model, wrapped or not, is stored fit to keep
        values = (
            key,
            model_name,
            response.text,
            _storable_count(response.input_tokens),
            _storable_count(response.output_tokens),
            _storable_cost(response.cost_usd),
            "{}" if type(response.extra) is dict and not response.extra else json.dumps(response.extra, sort_keys=True),
            time.time(),
            run_id,
            response.finish_reason,
        )
        # Written with the other replies of this turn of the event loop, in one transaction; this returns once
        # it has committed (a reply is never handed on before it is stored).
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._puts:
            self._start_soon(self._flush_puts)
        self._puts.append((_REPLACE_CALL if replace else _INSERT_CALL, values, run_id,
                           _storable_cost(response.cost_usd), future))
        await future

    def _start_soon(self, flush: Callable[[], Awaitable[None]]) -> None:
        """Run ``flush`` once the callbacks ready now have run (they may add to the batch)."""
        loop = asyncio.get_running_loop()

        def start() -> None:
            task = loop.create_task(flush())
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

        loop.call_soon(start)

    async def _flush_lookups(self) -> None:
        lookups, self._lookups = self._lookups, {}
        keys = list(lookups)
        found: dict[str, tuple] = {}
        try:
            for start in range(0, len(keys), LOOKUP_CHUNK):
                chunk = keys[start:start + LOOKUP_CHUNK]
                rows = await self._read(
                    "SELECT key, model, text, input_tokens, output_tokens, cost_usd, extra, finish_reason FROM calls "
                    f"WHERE key IN ({', '.join('?' * len(chunk))})", tuple(chunk),
                )
                for row in rows:
                    found[row[0]] = tuple(row[1:])
        except BaseException as exc:
            for futures in lookups.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc) if isinstance(exc, Exception) else future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for key, futures in lookups.items():
            for future in futures:
                if not future.done():
                    future.set_result(found.get(key))

    async def _flush_puts(self) -> None:
        puts, self._puts = self._puts, []
        rows = [(statement, values) for statement, values, _, _, _ in puts]
        try:
            counts = await self._write_rows(rows)
        except BaseException as exc:
            for *_, future in puts:
                if not future.done():
                    future.set_exception(exc) if isinstance(exc, Exception) else future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, run_id, cost, future), count in zip(puts, counts):
            # Another process sharing the file may have stored the same call first: then it paid, not us.
            if run_id is not None and count == 1:
                self.new_cost_usd[run_id] = self.new_cost_usd.get(run_id, 0.0) + cost
            if not future.done():
                future.set_result(None)

    async def _write_rows(self, rows: list[tuple[str, tuple]]) -> list[int]:
        """Statements in one transaction in one trip to the database thread (each its own row count), tried
        :data:`WRITE_ATTEMPTS` times in all before it raises :class:`StoreError`."""
        run_in_thread = getattr(self._db, "_execute", None)
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                if run_in_thread is None:  # an aiosqlite without it: a trip per statement
                    return [(await self._db.execute(statement, values)).rowcount for statement, values in rows]
                return await run_in_thread(_write_rows_in_thread, self._db._conn, rows)
            except sqlite3.Error as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise self._failed("write to", exc) from exc
                await asyncio.sleep(WRITE_RETRY_PAUSE * attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _write(self, statement: str, values: tuple) -> aiosqlite.Cursor:
        """One write statement, tried :data:`WRITE_ATTEMPTS` times in all (a full disk freed meanwhile, a lock
        held past busy_timeout) before it raises :class:`StoreError`."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return await self._db.execute(statement, values)
            except sqlite3.Error as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise self._failed("write to", exc) from exc
                await asyncio.sleep(WRITE_RETRY_PAUSE * attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def check_writable(self) -> None:
        """Raise :class:`StoreError` now if the file cannot be written (a read-only file or folder, an
        immutable file, a full disk): a run would otherwise find out at its first paid reply. Writes the
        schema version it read, inside one transaction, so nothing changes."""
        try:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._db.execute(f"PRAGMA user_version = {await self.schema_version()}")
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._failed("write to", exc) from exc

    async def run_cost(self, run_id: str) -> float:
        """What the calls first sent by this run cost, over all its sessions."""
        rows = await self._read("SELECT COALESCE(SUM(cost_usd), 0) FROM calls WHERE run_id = ?", (run_id,))
        return float(rows[0][0]) if rows else 0.0

    async def sync_every_commit(self) -> None:
        """Make each commit reach the disk before it returns, power loss included (WAL's NORMAL survives
        only a crash of the process): for records that protect money, such as the batch ledger."""
        try:
            await self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise self._failed("configure", exc) from exc

    async def read(self, statement: str, values: tuple = ()) -> list[Any]:
        """Rows of one query (the batch ledger's); a failed read raises :class:`StoreError`."""
        return await self._read(statement, values)

    async def write_together(self, statements: list[tuple[str, Any]]) -> None:
        """Statements in one transaction: all of them are durable when this returns, or none is. A value
        that is a list of tuples runs the statement once per tuple. Tried :data:`WRITE_ATTEMPTS` times in
        all before it raises :class:`StoreError`."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement, values in statements:
                        if isinstance(values, list):
                            await self._db.executemany(statement, values)
                        else:
                            await self._db.execute(statement, values)
                    await self._db.execute("COMMIT")
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
                return
            except sqlite3.Error as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise self._failed("write to", exc) from exc
                await asyncio.sleep(WRITE_RETRY_PAUSE * attempt)

    async def _read(self, statement: str, values: tuple = ()) -> list[Any]:
        try:
            return list(await self._db.execute_fetchall(statement, values))
        except sqlite3.Error as exc:  # a corrupt page, an I/O error: the file's problem, said as such
            raise self._failed("read from", exc) from exc

    async def record_run(self, run_id: str, input_path: str, output_path: str, settings: dict) -> dict | None:
        """Remember a run's input, output and search settings; returns the settings of its last session.
        A failed read or write (after retries) raises :class:`StoreError`."""
        rows = await self._read("SELECT settings FROM runs WHERE run_id = ?", (run_id,))
        row = next(iter(rows), None)
        now = time.time()
        encoded = json.dumps(settings, sort_keys=True, default=str)
        await self._write(
            "INSERT INTO runs (run_id, input, output, settings, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(run_id) DO UPDATE SET input = excluded.input, settings = excluded.settings,"
            " updated_at = excluded.updated_at",
            (run_id, input_path, output_path, encoded, now, now),
        )
        return json.loads(row[0]) if row else None

    async def count_calls(self) -> int:
        rows = await self._read("SELECT COUNT(*) FROM calls")
        return int(rows[0][0]) if rows else 0

    async def close(self) -> None:
        # Replies and look-ups asked for before closing are written and answered first.
        while self._flushing or self._puts or self._lookups:
            if self._flushing:
                await asyncio.gather(*self._flushing, return_exceptions=True)
            else:
                await asyncio.sleep(0)
        await self._db.close()

    async def __aenter__(self) -> "Store":
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
