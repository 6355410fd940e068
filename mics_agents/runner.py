"""Batch runs over a JSONL dataset, resumable after any crash, sharded, under a budget.

Items are read as a stream and handed to a *worker* concurrently (``concurrency`` items in flight, on
top of the per-model call limits): :class:`MicsWorker` searches each case; the generation workers of
``mics generate`` make questions from it. Each ended item is one fsynced line appended to the output or
failed file; a rerun skips those and replays the calls of unfinished items from the cache, so nothing is
paid twice. A run owns its output (a lock beside it) and, once it has been through all of its input,
compacts the files to one line per item.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from .data import InputItem, _read_line, failure_record, parse_record, read_items, shard_of
from .errors import InputError, MicsError, ModelError
from .outputs import OutputFiles, OutputLock, ResumeState, failure_key, success_line
from .redact import scrub, scrub_data
from .results import Usage
from .search import Searcher
from .store import Store

__all__ = ["RunOptions", "RunStats", "BatchRun", "Outcome", "Worker", "MicsWorker", "run_id_for", "internal_error"]

# "waiting": --no-wait found every item waiting on provider batches still in progress.
StopReason = Literal["completed", "budget", "interrupted", "waiting"]
_READ_BATCH = 256

# The cyclic garbage collector while a run goes on. With the default thresholds (700, 10, 10) a run of 64
# items in flight, whose trees and replies live for seconds, promotes them to the oldest generation and
# collects all of it every few seconds: measured on a 1,200-case run, a fifth of the client's CPU and pauses of
# 0.1-0.4 s, in which no reply is read and no freed slot of a model is used. Objects of the process's
# start (modules, settings, clients) are frozen, and the young generation is collected after 50,000
# allocations rather than 700: nearly everything of a call is freed by reference counting long before.
RUN_GC_THRESHOLDS = (50_000, 10, 10)
_gc_users = 0
_gc_saved: tuple[int, int, int] | None = None


@contextlib.contextmanager
def run_gc_settings() -> Any:
    """:data:`RUN_GC_THRESHOLDS` and the start-up objects frozen, while at least one run is on (runs in one
    process may overlap: the first to start sets, the last to end puts back what it found)."""
    global _gc_users, _gc_saved
    if _gc_users == 0:
        _gc_saved = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(*RUN_GC_THRESHOLDS)
    _gc_users += 1
    try:
        yield
    finally:
        _gc_users -= 1
        if _gc_users == 0 and _gc_saved is not None:
            gc.set_threshold(*_gc_saved)
            gc.unfreeze()
            _gc_saved = None


def count_items(path: Path) -> int:
    """How many items :func:`~mics_agents.data.read_items` gives for this file, without parsing a line: every
    line but a blank one (whitespace alone, or a byte order mark) is an item, whatever is wrong with it. A
    line that opens with ``{`` is one at once; any other is decoded and judged as the reader judges it. The
    run counts its input beside the first items, and parsing every line (0.7 s at 10^5 cases) held the
    interpreter from them."""
    count = number = 0
    with open(path, "rb") as handle:
        while True:
            raw, whole = _read_line(handle)
            if not raw:
                return count
            number += 1
            if not whole or raw.lstrip(b" \t")[:1] == b"{":
                count += 1
                continue
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                count += 1  # an item: its error says the line is not UTF-8
                continue
            count += bool(text.strip())


def _empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


def _touch(*paths: Path) -> None:
    """Both files exist once a run is finished, empty ones too (as compacting leaves them)."""
    for path in paths:
        path.touch(exist_ok=True)


def run_id_for(output: Path) -> str:
    """A run is named by its output file: the same command from the same place resumes the same run."""
    return hashlib.sha256(str(Path(output).resolve()).encode("utf-8")).hexdigest()[:16]


@dataclass
class RunOptions:
    data: Path
    output: Path
    image_dir: Path | None = None
    failed: Path | None = None
    concurrency: int = 8
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    retry_failed: bool = False
    budget_usd: float | None = None


@dataclass
class Outcome:
    """What a worker made of one item: output lines, or a failure of some kind (with extra fields)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    usage: Usage | None = None
    drops: Counter = field(default_factory=Counter)


class Worker(Protocol):
    """One kind of batch job. ``parse`` turns a JSON line into an item; calling it does the work."""

    store: Store | None
    group_key: str | None  # set when one item gives several lines, grouped by this field

    def parse(self, record: Any, line: int) -> InputItem: ...

    async def __call__(self, item: InputItem, image_dir: Path) -> Outcome: ...

    async def aclose(self) -> None: ...


class MicsWorker:
    """Searches each case with MICS; one Chiron-o1 record per success."""

    group_key = None

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        self.store = searcher.store

    def parse(self, record: Any, line: int) -> InputItem:
        return parse_record(record, line)

    async def __call__(self, item: InputItem, image_dir: Path) -> Outcome:
        try:
            case = await self.searcher.prepare_case(
                item.question, item.images, answer=item.answer, case_info=item.case_info, rid=item.rid,
                image_dir=image_dir,
            )
        except InputError as exc:
            return Outcome(failure="bad_input", message=f"line {item.line}: {exc}")
        result = await self.searcher.search_case(case)
        if result.ok:
            return Outcome(records=[result.to_record()], usage=result.usage)
        message = result.message + (" (retried on the next run)" if result.status == "model_error" else "")
        return Outcome(failure=result.status, message=message, extra={"search": result.to_record()}, usage=result.usage)

    async def aclose(self) -> None:
        await self.searcher.aclose()


def internal_error(exc: BaseException, where: str = "") -> Outcome:
    """An exception nobody expected, as the item's ``internal_error``: a defect of ours, not of the item,
    reported with where it happened; the item is retried on the next run."""
    frames = traceback.extract_tb(exc.__traceback__)
    place = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    text = " ".join(str(exc).split())[:500] or "(no message)"
    message = (
        f"{where}internal error{place}: {type(exc).__name__}: {text}. This is a defect in mics-agents, not a "
        "problem of this item: please report it with this line. The item is retried on the next run."
    )
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return Outcome(failure="internal_error", message=message, extra={"traceback": trace[-4000:]})


@dataclass
class RunStats:
    total: int = 0
    already_done: int = 0
    # False while the input is still being counted (total and already_done not known yet): the count runs
    # beside the first items, so a large input does not hold back the first request (0.7 s at 10^5 cases).
    counted: bool = True
    success: int = 0
    no_path: int = 0
    model_error: int = 0
    bad_input: int = 0
    internal_error: int = 0  # defects of ours, retried on the next run
    no_items: int = 0
    records: int = 0
    drops: Counter = field(default_factory=Counter)
    in_flight: int = 0
    calls: int = 0
    cached_calls: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    spent_usd: float = 0.0
    repaired_lines: int = 0
    retried_failures: int = 0
    compacted_lines: int = 0
    truncated_samples: Counter = field(default_factory=Counter)  # per intern model: cut off at twice the budget
    started_at: float = field(default_factory=time.monotonic)
    stop_reason: StopReason = "completed"
    batches: dict[str, Any] | None = None  # a batched run's batches (--batch): counts, batch and online cost

    @property
    def ended(self) -> int:
        return self.success + self.no_path + self.model_error + self.bad_input + self.internal_error + self.no_items

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.already_done - self.ended)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "already_done": self.already_done,
            "ended_now": self.ended,
            "success": self.success,
            "no_path": self.no_path,
            "model_error": self.model_error,
            "bad_input": self.bad_input,
            "internal_error": self.internal_error,
            "no_items": self.no_items,
            "records": self.records,
            "drops": dict(sorted(self.drops.items())),
            "not_started": self.remaining,
            "calls": self.calls,
            "cached_calls": self.cached_calls,
            "tokens": self.tokens,
            "cost_usd": round(self.cost_usd, 6),
            "spent_usd": round(self.spent_usd, 6),
            "repaired_lines": self.repaired_lines,
            "retried_failures": self.retried_failures,
            "compacted_lines": self.compacted_lines,
            "truncated_samples": dict(sorted(self.truncated_samples.items())),
            "elapsed_s": round(time.monotonic() - self.started_at, 3),
            "stop_reason": self.stop_reason,
            **({"batches": self.batches} if self.batches is not None else {}),
        }


class BatchRun:
    """One session of a run. ``on_update`` is called after each ended item (progress display).

    ``output_lock``: the lock on the output that the caller already holds; without one, ``run()`` takes
    it (and raises :class:`~mics_agents.errors.OutputBusyError` if another process has it). ``resume``: what
    :meth:`OutputFiles.prepare` already found, when the caller prepared the files itself (under that lock,
    before opening the worker, so a foreign file is refused before any model is set up).

    Every item ends with one line whatever happens to it: bad input is ``bad_input``, a model call that
    keeps failing ``model_error``, and any other exception in one item ``internal_error`` (a defect of
    ours, retried on the next run); the run goes on. Only a problem of the run itself (settings, the cache,
    the output files) stops it.
    """

    def __init__(
        self,
        worker: Worker | Searcher,
        options: RunOptions,
        *,
        on_update: Callable[[RunStats], None] | None = None,
        output_lock: OutputLock | None = None,
        resume: ResumeState | None = None,
    ) -> None:
        self.worker: Worker = MicsWorker(worker) if isinstance(worker, Searcher) else worker
        self.options = options
        self.files = OutputFiles(options.output, options.failed, group_key=self.worker.group_key)
        self.output_lock = output_lock
        self._resume = resume
        self._read_all_input = False
        # Keys this session wrote a line for, while the files held nothing before it: then each key has one
        # line, and compacting (which reads both files back whole) would drop nothing. None once that is
        # not known (files not empty, a key written twice, lines grouped by item).
        self._keys_written: set[str] | None = None
        self.run_id = run_id_for(options.output)
        self.stats = RunStats()
        self.on_update = on_update or (lambda stats: None)
        self._stop: StopReason | None = None
        self._fatal: BaseException | None = None
        self._spent_before = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch_refused = False
        # A batched run's queue (--batch): items are marked for it, and it counts against the budget.
        self.batches: Any = getattr(self.worker, "batches", None)

    @property
    def stopping(self) -> bool:
        return self._stop is not None

    def stop(self, reason: StopReason = "interrupted") -> None:
        """Start no new item; items in flight finish and are written."""
        if self._stop is None:
            self._stop = reason

    def _in_scope(self, item: InputItem) -> bool:
        index, shards = self.options.shard
        return shards == 1 or shard_of(item.key, shards) == index

    def _count_scope(self, done: set[str]) -> tuple[int, int]:
        """Items in this shard (up to ``limit``), and how many of them are done already."""
        if self.options.shard[1] == 1 and self.options.limit is None and not done:
            return count_items(self.options.data), 0  # every item counts: no line needs parsing
        count = finished = 0
        for item in read_items(self.options.data, self.worker.parse):
            if self._in_scope(item):
                count += 1
                finished += item.key in done
                if self.options.limit is not None and count >= self.options.limit:
                    break
        return count, finished

    async def _items(self) -> AsyncIterator[InputItem]:
        """The items of this shard (up to ``limit``), read in a thread a batch at a time."""
        iterator = read_items(self.options.data, self.worker.parse)

        def next_batch() -> list[InputItem]:
            return [item for _, item in zip(range(_READ_BATCH), iterator)]

        taken = 0
        while True:
            batch = await asyncio.to_thread(next_batch)
            if not batch:
                self._read_all_input = True
                return
            for item in batch:
                if not self._in_scope(item):
                    continue
                if self.options.limit is not None and taken >= self.options.limit:
                    return
                taken += 1
                yield item

    def _counted(self, counting: "asyncio.Future[tuple[int, int]]") -> None:
        if counting.cancelled() or counting.exception() is not None:
            return  # the run re-raises it
        self.stats.total, self.stats.already_done = counting.result()
        self.stats.counted = True
        self._report()

    def _spent(self) -> float:
        store = self.worker.store
        # Without a cache every call is new: what ended items cost is what was spent.
        new = store.new_cost_usd.get(self.run_id, 0.0) if store is not None else self.stats.cost_usd
        return self._spent_before + new

    def _report(self) -> None:
        """Hand the stats to the progress display, with the batches' state as it is now (--batch)."""
        if self.batches is not None:
            self.stats.batches = self.batches.summary()
        self.on_update(self.stats)

    def _over_budget(self) -> bool:
        """Whether the budget is spent; counts what this run spent either way (the summary shows it). Batches
        submitted and not yet ended count at their estimate."""
        self.stats.spent_usd = self._spent()
        committed = self.batches.committed_usd if self.batches is not None else 0.0
        budget = self.options.budget_usd
        return budget is not None and self.stats.spent_usd + committed >= budget

    def _batch_over_budget(self) -> None:
        """A batch was not submitted: it would have passed the budget. The items that waited on it end as
        model_error (retried on the next run), so the run stops on the budget even with none left to start."""
        self._batch_refused = True
        self.stop("budget")

    def _leave_waiting(self) -> None:
        """--no-wait: every item waits on a batch in progress. The items stop without a line (a rerun takes
        them up again, their calls replayed from the cache and their batches re-attached)."""
        self.stop("waiting")
        for task in self._tasks:
            task.cancel()

    async def run(self) -> RunStats:
        if not self.options.data.is_file():
            raise MicsError(f"input file {str(self.options.data)!r} not found")
        with run_gc_settings():
            if self.output_lock is not None:
                return await self._run()
            with OutputLock(self.files.output, self.files.failed):
                return await self._run()

    async def _run(self) -> RunStats:
        resume = self._resume or await asyncio.to_thread(self.files.prepare, retry_failed=self.options.retry_failed)
        if self.worker.group_key is None and all(_empty(path) for path in (self.files.output, self.files.failed)):
            self._keys_written = set()
        self.stats.counted = False
        counting = asyncio.ensure_future(asyncio.to_thread(self._count_scope, resume.done))
        counting.add_done_callback(self._counted)
        self.stats.repaired_lines = resume.repaired_lines
        self.stats.retried_failures = resume.retried_failures
        if self.worker.store is not None:
            self._spent_before = await self.worker.store.run_cost(self.run_id)
            self.stats.spent_usd = self._spent_before
        self._report()

        slots = asyncio.Semaphore(self.options.concurrency)
        tasks = self._tasks
        if self.batches is not None:
            self.batches.budget_usd = self.options.budget_usd
            self.batches.spent_usd = self._spent
            self.batches.on_budget = self._batch_over_budget
            self.batches.on_only_waiting = self._leave_waiting

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None and self._fatal is None:
                self._fatal = task.exception()
                self.stop("interrupted")

        try:
            async for item in self._items():
                if item.key in resume.done:
                    continue
                await slots.acquire()
                if self._stop is None and self._over_budget():
                    self.stop("budget")
                if self._stop is not None:
                    slots.release()
                    break
                task = asyncio.create_task(self._process(item))
                tasks.add(task)
                task.add_done_callback(finished)
            if tasks:
                await asyncio.wait(set(tasks))
            await counting  # its error, if reading the input failed there
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(set(tasks))
            await asyncio.wait([counting])  # a thread cannot be stopped: let it end before the files close
            await self.files.aclose()
        self._over_budget()
        if self.batches is not None:
            self.stats.batches = self.batches.summary()
        if self._fatal is not None:
            raise self._fatal
        # A stop that came after the last item was scheduled stopped nothing.
        self.stats.stop_reason = self._stop if self._stop and (self.stats.remaining or self._batch_refused) else "completed"
        if self.stats.stop_reason == "completed" and self._read_all_input:
            # Every item of the input (this shard) has its outcome on disk: keep only those lines.
            if self._keys_written is not None:
                # One line per item already: nothing to drop (reading back a large output costs seconds).
                await asyncio.to_thread(_touch, self.files.output, self.files.failed)
            else:
                self.stats.compacted_lines = await asyncio.to_thread(self.files.compact)
        self._report()
        return self.stats

    async def _process(self, item: InputItem) -> None:
        self.stats.in_flight += 1
        try:
            if item.error:
                outcome = Outcome(failure=item.failure, message=item.error)
            else:
                with self.batches.item() if self.batches is not None else contextlib.nullcontext():
                    outcome = await self._work(item)
            if outcome.usage is not None:
                self._count_usage(outcome.usage)
            self.stats.drops.update(outcome.drops)
            if outcome.failure is None:
                self._note_lines([success_line(record).key for record in outcome.records])
                await self.files.append_success(outcome.records)
                self.stats.success += 1
                self.stats.records += len(outcome.records)
            else:
                await self._fail(item, outcome)
        finally:
            self.stats.in_flight -= 1
            self._report()

    def _note_lines(self, keys: list[str | None]) -> None:
        """The items of the lines about to be written, as compacting reads them (a line naming none stands
        alone); an item that gets a second line means compacting at the end has something to drop."""
        written = self._keys_written
        if written is None:
            return
        for key in keys:
            if key is not None:
                if key in written:
                    self._keys_written = None  # e.g. an id repeated in the input: its records share a rid
                    return
                written.add(key)

    async def _work(self, item: InputItem) -> Outcome:
        """The worker's outcome for one item; an exception becomes the item's failure, never the run's,
        unless it is a problem of the whole run (settings, prompts, the cache, the output)."""
        try:
            return await self.worker(item, self.options.image_dir or self.options.data.parent)
        except InputError as exc:
            return Outcome(failure="bad_input", message=f"line {item.line}: {exc}")
        except ModelError as exc:
            return Outcome(failure="model_error", message=f"{exc} (retried on the next run)")
        except MicsError:
            raise  # ConfigError, PromptError, StoreError ...: the run cannot go on, and says why
        except Exception as exc:
            return internal_error(exc, f"line {item.line}: ")

    def _count_usage(self, usage: Usage) -> None:
        self.stats.calls += usage.calls
        self.stats.cached_calls += usage.cached_calls
        self.stats.tokens += usage.input_tokens + usage.output_tokens
        self.stats.cost_usd += usage.cost_usd
        self.stats.truncated_samples.update(usage.truncated_samples)

    async def _fail(self, item: InputItem, outcome: Outcome) -> None:
        kind = outcome.failure or "bad_input"
        record = failure_record(item.rid, item.key, item.line, {"kind": kind, "message": scrub(outcome.message)}, item.raw)
        record.update(outcome.extra)
        # A provider's error may echo the API key; nothing secret reaches the file.
        record = scrub_data(record)
        self._note_lines([failure_key(record)])
        await self.files.append_failure(record)
        if hasattr(self.stats, kind):
            setattr(self.stats, kind, getattr(self.stats, kind) + 1)
