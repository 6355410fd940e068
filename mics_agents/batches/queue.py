"""The run's batch queue: calls to batched models wait here, go out together as one batch per provider (and,
for OpenAI, per model), and get their replies when the batch ends.

A queue is submitted when the run has nothing else to do (every item in flight waits on a batched call, or
on a batch already submitted), when it reaches ``MICS_BATCH_MAX_REQUESTS``, or when its oldest call has
waited ``MICS_BATCH_MAX_AGE`` seconds. A queued call has no per-call deadline and holds no concurrency
slot; its batch has a deadline of its own (``MICS_BATCH_DEADLINE``), and is polled every
``MICS_BATCH_POLL_INTERVAL`` seconds.

What protects money is written to the ledger (``ledger.py``) before the call that spends it: a batch's
requests before its upload or create call, OpenAI's input file id before the create call, the batch id as
soon as the create call returns. The one window left is between a create call reaching the provider and its
id being stored; a restart closes it per provider before sending anything again:

- OpenAI: the batch carries our batch key in its ``metadata`` and was made from the input file id stored
  before the call: listing the batches created since finds it, or shows it was never made (then it is made
  now, from the same file: nothing is uploaded twice);
- Anthropic: a create takes only the requests, so the batches created since the record are listed and one
  with our number of requests is taken (checked against our ``custom_id``s as soon as its results can be
  read); none means it was never made, and its requests go back in the queue.

Results are written to the call cache as they are read, then each request's outcome to the ledger: a batch
that ended is read once. A request that errored or expired goes in a later batch (``MICS_BATCH_RETRIES``
times), then is asked online or fails its item (``MICS_BATCH_FALLBACK``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MicsError, ModelCallError, ModelError
from ..models.base import ModelRequest, ModelResponse
from .apis import METADATA_KEY, AnthropicBatches, BatchAPI, BatchAPIError, OpenAIBatches, RemoteBatch, open_batch_api
from .ledger import BatchLedger, BatchRecord
from .wire import (PROVIDER_LIMITS, BatchRoute, ResultLine, anthropic_request, estimated_tokens, openai_line,
                   parse_anthropic_line, parse_openai_line, request_bytes, token_counts)

if TYPE_CHECKING:
    from ..config import Settings
    from ..store import Store
    from .model import BatchedModel

__all__ = ["BatchQueue", "BatchStats"]

log = logging.getLogger("mics_agents.batches")

# Once every search waits, calls made in the same moment (a mentor's siblings) get this long to join.
SETTLE_S = 0.2
# A record's time and the provider's clock may disagree by this much when looking for a batch by its time.
CLOCK_SLACK_S = 600.0
# Tries of an upload, and of a create whose outcome was unknown and that listing showed was not made.
SEND_ATTEMPTS = 4
FAILED_OUTCOMES = frozenset({"errored", "expired", "missing"})
# Set by a Ray shard's task (``cluster/shard_task.py``): a file where the queue keeps what its open batches are
# counted at, for the driver's one budget (the ledger itself is held exclusively by this process).
COMMITTED_FILE_VARIABLE = "MICS_BATCH_COMMITTED_FILE"
# Also set by a Ray shard's task under a budget: a node-local folder where the queue asks the task (which asks the
# driver's board) whether a batch may be submitted, with what the other shards spent and committed; the board
# answers one shard at a time, so shards cannot each commit the whole budget at the same moment.
GATE_FOLDER_VARIABLE = "MICS_BATCH_GATE_DIR"
GATE_PATIENCE_S = 120.0  # no answer in this long (the task is stuck): the batch is not submitted
KILL_AT_VARIABLE = "MICS_TEST_KILL_AT"  # tests only: NAME:N kills the process the N-th time it passes NAME
_passed: Counter = Counter()


def _crash_point(name: str) -> None:
    target, _, count = os.environ.get(KILL_AT_VARIABLE, "").partition(":")
    if target == name:
        _passed[name] += 1
        if _passed[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)


_item: "ContextVar[object | None]" = ContextVar("mics_batch_item", default=None)


@dataclass
class BatchStats:
    """What this session did with batches, and what the batched replies cost against online."""

    submitted: int = 0
    requests: int = 0
    sizes: list[int] = field(default_factory=list)
    reattached: int = 0
    ended: int = 0
    succeeded: int = 0
    failed_requests: int = 0
    retried: int = 0
    fell_back: int = 0
    batch_cost_usd: float = 0.0
    online_cost_usd: float = 0.0
    in_progress: int = 0
    round_seconds: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches_submitted": self.submitted,
            "requests_submitted": self.requests,
            "requests_per_batch": round(self.requests / self.submitted, 1) if self.submitted else 0,
            "batches_reattached": self.reattached,
            "batches_ended": self.ended,
            "batches_in_progress": self.in_progress,
            "replies": self.succeeded,
            "failed_requests": self.failed_requests,
            "retried_in_a_later_batch": self.retried,
            "asked_online_instead": self.fell_back,
            "batch_cost_usd": round(self.batch_cost_usd, 6),
            "online_cost_usd": round(self.online_cost_usd, 6),
            "saved_usd": round(self.online_cost_usd - self.batch_cost_usd, 6),
            "longest_batch_s": round(max(self.round_seconds), 3) if self.round_seconds else 0,
        }


@dataclass(eq=False)
class _Call:
    """One batched request (one cache key) and who waits for it."""

    key: str
    model: "BatchedModel"
    request: ModelRequest
    future: "asyncio.Future[ModelResponse]"
    items: Counter = field(default_factory=Counter)
    waiters: int = 0
    queued_at: float = 0.0
    batch_key: str | None = None
    queued: bool = False


@dataclass(eq=False)
class _Batch:
    """A batch of ours that has not ended: recorded, maybe submitted, being followed."""

    record: BatchRecord
    api: BatchAPI
    names: dict[str, str]  # custom_id -> model name
    task: "asyncio.Task[None] | None" = None
    started: float = field(default_factory=time.monotonic)
    cancel_sent: bool = False


class BatchQueue:
    """One per run. Batched models (:class:`~.model.BatchedModel`) hand it their calls (:meth:`call`); the
    runner marks each item's work with :meth:`item`, so the queue knows when every search waits."""

    def __init__(
        self,
        ledger: BatchLedger,
        store: "Store",
        settings: "Settings",
        *,
        run_id: str | None = None,
        no_wait: bool = False,
        resubmit_canceled: bool = False,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.settings = settings
        self.run_id = run_id
        self.no_wait = no_wait
        self.resubmit_canceled = resubmit_canceled
        self.on_event = on_event or log.info
        self.stats = BatchStats()
        # Set by the runner: what the run has spent (for the budget), what to do when a batch would pass it,
        # and what to do when --no-wait finds nothing left but waiting.
        self.budget_usd: float | None = None
        self.spent_usd: Callable[[], float] = lambda: 0.0
        self.on_budget: Callable[[], None] = lambda: None
        self.on_only_waiting: Callable[[], None] = lambda: None
        self._routes: dict[str, BatchRoute] = {}
        self._apis: dict[tuple[str, str], BatchAPI] = {}
        self._calls: dict[str, _Call] = {}
        self._queues: dict[tuple[str, str, str], list[_Call]] = {}
        self._history: dict[str, list[tuple[str, str]]] = {}  # custom_id -> [(batch_key, outcome)] of ended batches
        self._open: dict[str, _Batch] = {}
        self._open_keys: dict[str, str] = {}  # custom_id -> batch_key of the open batch holding it
        self._refetches: dict[str, "asyncio.Task[None]"] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._active: set[object] = set()
        self._waiting: Counter = Counter()
        self._sending = 0  # batches taken from the queue and not yet recorded
        self._wakeup = asyncio.Event()
        self._scheduler: "asyncio.Task[None] | None" = None
        self._unpolled: set[str] = set()  # re-attached batches not yet looked at (--no-wait waits for that)
        self._told_waiting = False
        self._closed = False
        self._last_queued = 0.0
        # One batch at a time between asking the gate and recording it (what it commits is then in the next ask).
        self._gate_lock = asyncio.Lock()

    # -- set-up --------------------------------------------------------------------------------------

    def register(self, name: str, route: BatchRoute) -> None:
        self._routes[name] = route

    def _api(self, provider: str, endpoint: str) -> BatchAPI:
        if (provider, endpoint) not in self._apis:
            self._apis[(provider, endpoint)] = open_batch_api(provider, endpoint)
        return self._apis[(provider, endpoint)]

    async def start(self) -> None:
        """Read the ledger and re-attach to the batches a past session left open."""
        for custom_id, batch_key, state, outcome in await self.ledger.outcomes():
            if state == "ended" and outcome is not None:
                self._history.setdefault(custom_id, []).append((batch_key, outcome))
        unfinished = await self.ledger.unfinished()
        for record in unfinished:
            batch = self._track(record)
            self._unpolled.add(record.batch_key)
            self.stats.reattached += 1
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at))
            self.on_event(f"re-attached to {record.provider} batch {record.batch_id or '(not yet known: looking for it)'} "
                          f"of {record.requests} requests, recorded {when}, {record.status or record.state}")
            batch.task = self._spawn(self._follow(batch, fresh=False))
        if not unfinished:
            self._publish_committed()  # none open: a former session's file may say otherwise
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule())

    def _track(self, record: BatchRecord) -> _Batch:
        batch = _Batch(record, self._api(record.provider, record.endpoint), dict(record.custom_ids))
        self._open[record.batch_key] = batch
        for custom_id in batch.names:
            self._open_keys[custom_id] = record.batch_key
        self._publish_committed()
        return batch

    def _spawn(self, coroutine: Any) -> "asyncio.Task[Any]":
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: "asyncio.Task[Any]") -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.error("batch queue: %s: %s", type(error).__name__, error)
            # A defect or a ledger that cannot be written: every waiting call fails rather than hang.
            for call in list(self._calls.values()):
                self._settle(call, error=error if isinstance(error, MicsError) else
                             ModelCallError(f"the batch queue stopped: {type(error).__name__}: {error}"))
        self._wake()

    def summary(self) -> dict[str, Any]:
        """This session's batches for the run's summary (``RunStats.batches``)."""
        self.stats.in_progress = len(self._open)
        return self.stats.as_dict()

    @property
    def committed_usd(self) -> float:
        """What the batches submitted and not yet ended are counted at (their estimate)."""
        return sum(batch.record.estimated_cost_usd for batch in self._open.values())

    def _publish_committed(self) -> None:
        """Under a Ray shard's task: write :attr:`committed_usd` where the task reads it (atomically; a failed
        write is logged, and the next change writes it again)."""
        target = os.environ.get(COMMITTED_FILE_VARIABLE)
        if not target:
            return
        staged = f"{target}.{os.getpid()}.tmp"
        try:
            with open(staged, "w", encoding="utf-8") as handle:
                handle.write(json.dumps({"committed_usd": self.committed_usd}) + "\n")
            os.replace(staged, target)
        except OSError as exc:
            log.warning("could not write %s: %s", target, exc)

    # -- items and calls -----------------------------------------------------------------------------

    @contextmanager
    def item(self) -> Iterator[None]:
        """Calls made inside belong to one item of the run: when every item waits on batched calls, the
        queue is submitted."""
        token = object()
        self._active.add(token)
        handle = _item.set(token)
        try:
            yield
        finally:
            _item.reset(handle)
            self._active.discard(token)
            self._waiting.pop(token, None)
            self._wake()

    def _wake(self) -> None:
        self._wakeup.set()

    async def call(self, model: "BatchedModel", request: ModelRequest) -> ModelResponse:
        key = request.cache_key(model.name, namespace=model.namespace)
        call = self._calls.get(key)
        if call is None or call.future.done():
            call = _Call(key, model, request, asyncio.get_running_loop().create_future())
            self._calls[key] = call
            self._dispatch(call)
        token = _item.get()
        call.waiters += 1
        if token is not None and not call.future.done():
            call.items[token] += 1
            self._waiting[token] += 1
        self._wake()
        try:
            return await asyncio.shield(call.future)
        finally:
            self._leave(call, token)

    def _leave(self, call: _Call, token: object | None) -> None:
        call.waiters -= 1
        if token is not None and call.items.get(token, 0) > 0:
            call.items[token] -= 1
            self._release(token)
        if call.waiters == 0 and not call.future.done() and call.queued:
            # Nobody wants it and it has not been sent: out of the queue.
            call.queued = False
            queue = self._queues.get(call.model.route.group(), [])
            if call in queue:
                queue.remove(call)
            self._settle(call, error=None)

    def _release(self, token: object) -> None:
        self._waiting[token] -= 1
        if self._waiting[token] <= 0:
            del self._waiting[token]
        self._wake()

    def _settle(self, call: _Call, response: ModelResponse | None = None, error: BaseException | None = None) -> None:
        """The call's reply (or failure; ``error=None`` without a response: cancelled) reaches its waiters."""
        if self._calls.get(call.key) is call:
            del self._calls[call.key]
        call.queued = False
        for token, count in call.items.items():
            for _ in range(count):
                if token in self._waiting:
                    self._release(token)
        call.items.clear()
        if call.future.done():
            return
        if response is not None:
            call.future.set_result(response)
        elif error is not None:
            call.future.set_exception(error)
            call.future.exception()  # retrieved: a waiter gone meanwhile must not log it
        else:
            call.future.cancel()

    def _dispatch(self, call: _Call) -> None:
        """Send a call where it belongs: to the open batch that holds it, the ended batch that answered it,
        the queue, or (after too many failed batches) online."""
        open_key = self._open_keys.get(call.key)
        if open_key is not None:
            call.batch_key = open_key
            return
        history = self._history.get(call.key, [])
        last_batch, last_outcome = history[-1] if history else (None, None)
        if last_outcome == "succeeded" and last_batch is not None:
            # Answered in an ended batch, but not in the cache (a cache deleted or moved): read it again.
            self._read_again(call, last_batch)
            return
        if last_outcome == "canceled" and not self.resubmit_canceled:
            self._settle(call, error=ModelCallError(
                f"{call.model.name}: its request was in batch {last_batch}, which was cancelled. Rerun with "
                "--resubmit-canceled to send it again.", model=call.model.name))
            return
        failures = sum(1 for _, outcome in history if outcome in FAILED_OUTCOMES)
        if failures > self.settings.batch_retries:
            self._fall_back(call, failures)
            return
        if failures:
            self.stats.retried += 1
        call.queued = True
        call.queued_at = time.monotonic()
        self._last_queued = call.queued_at
        self._queues.setdefault(call.model.route.group(), []).append(call)
        self._wake()

    def _fall_back(self, call: _Call, failures: int) -> None:
        if self.settings.batch_fallback == "fail":
            self._settle(call, error=ModelCallError(
                f"{call.model.name}: its request failed in {failures} batches. Rerun with MICS_BATCH_FALLBACK=online "
                "to ask it online, or raise MICS_BATCH_RETRIES.", model=call.model.name))
            return
        self.stats.fell_back += 1
        if self.stats.fell_back == 1:
            self.on_event(f"a request failed in {failures} batches: asking it (and any more like it) online")

        async def ask() -> None:
            try:
                response = await call.model.online.request(call.request)
            except ModelError as exc:
                self._settle(call, error=exc)
            else:
                self._settle(call, response)

        # Not waiting on a batch while it is asked: the item is busy, not idle.
        for token, count in list(call.items.items()):
            for _ in range(count):
                self._release(token)
        call.items.clear()
        self._spawn(ask())

    def _read_again(self, call: _Call, batch_key: str) -> None:
        if batch_key not in self._refetches:
            self._refetches[batch_key] = self._spawn(self._refetch(batch_key))

        async def after() -> None:
            try:
                await asyncio.shield(self._refetches[batch_key])
            except Exception:  # the results are gone: ask again
                pass
            response = await self.store.get_call(call.key)
            if response is not None:
                self._settle(call, response)
            else:
                self._history[call.key] = [entry for entry in self._history.get(call.key, []) if entry[0] != batch_key]
                self._dispatch(call)

        self._spawn(after())

    # -- when to submit --------------------------------------------------------------------------------

    def _all_waiting(self) -> bool:
        if not self._active:
            return time.monotonic() - self._last_queued >= SETTLE_S  # no items marked: a quiet moment
        return all(self._waiting.get(token, 0) > 0 for token in self._active)

    def _queued(self) -> list[_Call]:
        return [call for queue in self._queues.values() for call in queue]

    async def _schedule(self) -> None:
        limit = self.settings.batch_max_requests
        while not self._closed:
            queued = self._queued()
            timeout = None
            if queued:
                oldest = min(call.queued_at for call in queued)
                timeout = max(0.0, oldest + self.settings.batch_max_age - time.monotonic())
                if not self._active:
                    timeout = min(timeout, SETTLE_S)
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self._wakeup.clear()
            queued = self._queued()
            if not queued:
                self._check_only_waiting()
                continue
            full = any(len(queue) >= min(limit, PROVIDER_LIMITS[group[0]][0]) for group, queue in self._queues.items())
            aged = time.monotonic() - min(call.queued_at for call in queued) >= self.settings.batch_max_age
            if not (full or aged or self._all_waiting()):
                continue
            if not full and not aged:
                await asyncio.sleep(SETTLE_S)  # let the calls of this moment join
            for group in list(self._queues):
                calls = [call for call in self._queues.pop(group) if call.queued and not call.future.done()]
                for chunk in _chunks(calls, group[0], limit):
                    self._sending += 1
                    self._spawn(self._submit(chunk))

    def _check_only_waiting(self) -> None:
        """--no-wait: once nothing is queued or being sent and every item waits on an open batch, say so."""
        if not self.no_wait or self._told_waiting or self._unpolled or self._sending or self._queued():
            return
        if self._active and self._all_waiting() and self._open:
            self._told_waiting = True
            self.on_event(f"{len(self._open)} batch(es) still in progress; exiting (--no-wait). Rerun the same "
                          "command later to pick up their results.")
            self.on_only_waiting()

    # -- submitting ----------------------------------------------------------------------------------

    async def _gate_allows(self, own: float, estimate: float) -> bool:
        """Under a Ray shard's task with a budget (:data:`GATE_FOLDER_VARIABLE`): ask whether a batch counted at
        ``estimate`` may be submitted, this shard having spent and committed ``own``. Without one: yes."""
        folder = os.environ.get(GATE_FOLDER_VARIABLE)
        if not folder:
            return True
        name = uuid.uuid4().hex
        ask, answer = Path(folder) / f"ask-{name}.json", Path(folder) / f"ask-{name}.answer"
        staged = Path(folder) / f"ask-{name}.tmp"
        try:
            staged.write_text(json.dumps({"own": own, "estimate": estimate}), encoding="utf-8")
            os.replace(staged, ask)
            waited = 0.0
            while not answer.exists():
                if waited >= GATE_PATIENCE_S:
                    log.warning("no answer from the shard's task about the budget in %g s: not submitting",
                                GATE_PATIENCE_S)
                    return False
                await asyncio.sleep(0.02)
                waited += 0.02
            return bool(json.loads(answer.read_text(encoding="utf-8")).get("granted"))
        except (OSError, ValueError) as exc:
            log.warning("asking the shard's task about the budget: %s: not submitting", exc)
            return False
        finally:
            for path in (staged, ask, answer):
                path.unlink(missing_ok=True)

    async def _submit(self, calls: list[_Call]) -> None:
        try:
            await self._send(calls)
        finally:
            self._sending -= 1
            self._wake()

    async def _send(self, calls: list[_Call]) -> None:
        route = calls[0].model.route
        estimate = sum(route.batch_cost(*estimated_tokens(call.request, route)) for call in calls)
        async with self._gate_lock:
            own = self.spent_usd() + self.committed_usd
            refusal = None
            if self.budget_usd is not None and own + estimate > self.budget_usd:
                refusal = f"would pass the budget of ${self.budget_usd:g}"
            elif self.budget_usd is not None and not await self._gate_allows(own, estimate):
                refusal = (f"would pass the budget of ${self.budget_usd:g} with what the other shards spent and "
                           "committed")
            if refusal is not None:
                for call in calls:
                    self._settle(call, error=ModelCallError(
                        f"{call.model.name}: not submitted: its batch of {len(calls)} requests, counted at "
                        f"${estimate:.4f}, {refusal}. Rerun with a larger --budget-usd to continue.",
                        model=call.model.name))
                self.on_budget()
                return
            batch_key = uuid.uuid4().hex
            await self.ledger.record(batch_key, self.run_id, route.provider, route.endpoint,
                                     [(call.key, call.model.name) for call in calls], estimate)
            record = BatchRecord(batch_key, route.provider, route.endpoint, "recorded", None, None, None, len(calls),
                                 estimate, time.time(), None, [(call.key, call.model.name) for call in calls])
            batch = self._track(record)
        for call in calls:
            call.queued = False
            call.batch_key = batch_key
        _crash_point("batch-recorded")
        try:
            remote = await self._create(batch, calls)
        except BatchAPIError as exc:
            if exc.refused or batch.record.state == "recorded" and route.provider == "openai":
                # Refused, or the upload failed: no batch exists, nothing was paid.
                await self._forget(batch, requeue=False, error=ModelCallError(
                    f"{exc} Nothing was submitted; rerun to try again.", model=calls[0].model.name))
                return
            self.on_event(f"{exc}; the batch may exist: looking for it before sending anything again")
            batch.task = self._spawn(self._follow(batch, fresh=True))
            return
        await self._stored(batch, remote)
        self.stats.submitted += 1
        self.stats.requests += len(calls)
        self.stats.sizes.append(len(calls))
        self.on_event(f"submitted {route.provider} batch {remote.id}: {len(calls)} requests"
                      f"{' to ' + route.wire_model if route.provider == 'openai' else ''}, counted at ${estimate:.4f}")
        batch.task = self._spawn(self._follow(batch, fresh=True))

    async def _create(self, batch: _Batch, calls: list[_Call]) -> RemoteBatch:
        api = batch.api
        if isinstance(api, OpenAIBatches):
            path = await asyncio.to_thread(_write_input_file, calls)
            try:
                file_id = await _tried(lambda: api.upload(path))
            finally:
                await asyncio.to_thread(path.unlink, True)
            await self.ledger.set_file(batch.record.batch_key, file_id)
            batch.record.state, batch.record.input_file_id = "uploaded", file_id
            _crash_point("batch-uploaded")
            remote = await api.create(file_id, batch.record.batch_key)
        else:
            assert isinstance(api, AnthropicBatches)
            requests = await asyncio.to_thread(
                lambda: [anthropic_request(call.key, call.request, call.model.route) for call in calls])
            remote = await api.create(requests)
        _crash_point("batch-created")
        return remote

    async def _stored(self, batch: _Batch, remote: RemoteBatch) -> None:
        await self.ledger.set_submitted(batch.record.batch_key, remote.id, remote.status)
        batch.record.batch_id, batch.record.state, batch.record.status = remote.id, "submitted", remote.status
        batch.record.submitted_at = time.time()

    async def _forget(self, batch: _Batch, *, requeue: bool, error: BaseException | None = None) -> None:
        """A batch that does not exist at the provider: out of the ledger; its calls queued again, or failed."""
        await self.ledger.forget(batch.record.batch_key)
        self._close(batch)
        for custom_id in batch.names:
            call = self._calls.get(custom_id)
            if call is None or call.future.done() or call.batch_key != batch.record.batch_key:
                continue
            call.batch_key = None
            if requeue:
                self._dispatch(call)
            else:
                self._settle(call, error=error)

    def _close(self, batch: _Batch) -> None:
        if self._open.pop(batch.record.batch_key, None) is not None:
            self._publish_committed()
        for custom_id in batch.names:
            if self._open_keys.get(custom_id) == batch.record.batch_key:
                del self._open_keys[custom_id]
        self._unpolled.discard(batch.record.batch_key)
        self._wake()

    # -- following a batch ---------------------------------------------------------------------------

    async def _follow(self, batch: _Batch, *, fresh: bool) -> None:
        """Find the batch if its id is not known, then poll it until it ends and read its results."""
        record = batch.record
        if record.batch_id is None:
            if not await self._find_or_make(batch):
                return
        deadline = (record.submitted_at or record.created_at) + self.settings.batch_deadline
        first = True
        last_seen = (record.status, "")
        while True:
            if not (first and not fresh):
                await asyncio.sleep(self.settings.batch_poll_interval)
            first = False
            assert record.batch_id is not None
            try:
                remote = await batch.api.retrieve(record.batch_id)
            except BatchAPIError as exc:
                if exc.status == 404:
                    self.on_event(f"batch {record.batch_id} is gone at the provider; its requests are asked again")
                    await self._end(batch, RemoteBatch(record.batch_id, "missing", True, record.created_at), [])
                    return
                log.warning("%s; polling again in %g s", exc, self.settings.batch_poll_interval)
                continue
            _crash_point("batch-poll")
            if (remote.status, remote.counts) != last_seen:
                last_seen = (remote.status, remote.counts)
                if remote.status != record.status:
                    await self.ledger.set_status(record.batch_key, remote.status)
                    record.status = remote.status
                self.on_event(f"batch {remote.id}: {remote.status}{' (' + remote.counts + ')' if remote.counts else ''}")
            if remote.ended:
                lines = await self._results(batch, remote)
                await self._end(batch, remote, lines)
                return
            self._unpolled.discard(record.batch_key)
            self._check_only_waiting()
            if time.time() > deadline and not batch.cancel_sent:
                batch.cancel_sent = True
                self.on_event(f"batch {remote.id} passed its deadline (MICS_BATCH_DEADLINE): cancelling it; "
                              "what it has not answered counts as expired")
                try:
                    await batch.api.cancel(remote.id)
                except BatchAPIError as exc:
                    log.warning("%s", exc)

    async def _find_or_make(self, batch: _Batch) -> bool:
        """A batch recorded without an id: its create call may or may not have reached the provider. Find it
        by listing; an OpenAI batch not found is created now from its uploaded file; an Anthropic one not
        found (or any batch recorded before its upload) was never made, and its calls go back in the queue.
        True once its id is stored."""
        record = batch.record
        if record.provider == "openai" and record.input_file_id is None:
            await self._forget(batch, requeue=True)
            return False
        for attempt in range(SEND_ATTEMPTS):
            try:
                found = await self._look_for(batch)
            except _Ambiguous as exc:
                self.on_event(f"{exc}; looking again in {self.settings.batch_poll_interval:g} s")
                await asyncio.sleep(self.settings.batch_poll_interval)
                continue
            except BatchAPIError as exc:
                log.warning("%s; trying again", exc)
                await asyncio.sleep(min(self.settings.batch_poll_interval, 2.0 ** attempt))
                continue
            if found is not None:
                self.on_event(f"found batch {found.id} ({found.status}) made before the last session stopped")
                await self._stored(batch, found)
                return True
            if record.provider == "anthropic":
                self.on_event(f"no trace of the {record.requests} request(s) recorded at "
                              f"{time.strftime('%H:%M:%S', time.localtime(record.created_at))}: they were never "
                              "submitted and go back in the queue")
                await self._forget(batch, requeue=True)
                return False
            assert isinstance(batch.api, OpenAIBatches) and record.input_file_id is not None
            try:
                remote = await batch.api.create(record.input_file_id, record.batch_key)
            except BatchAPIError as exc:
                if exc.refused:
                    await self._forget(batch, requeue=False, error=ModelCallError(f"{exc} Rerun to try again."))
                    return False
                log.warning("%s; looking for the batch before trying again", exc)
                await asyncio.sleep(min(self.settings.batch_poll_interval, 2.0 ** attempt))
                continue
            _crash_point("batch-created")
            await self._stored(batch, remote)
            self.stats.submitted += 1
            self.stats.requests += record.requests
            self.stats.sizes.append(record.requests)
            self.on_event(f"submitted openai batch {remote.id} from the file uploaded before: {record.requests} requests")
            return True
        error = ModelCallError(f"could not tell whether {record.provider} batch (recorded {record.batch_key}) was "
                               "made; rerun later: nothing is sent again until it is found or shown not to exist")
        self._close(batch)
        for custom_id in batch.names:
            call = self._calls.get(custom_id)
            if call is not None and call.batch_key == record.batch_key:
                self._settle(call, error=error)
        return False

    async def _look_for(self, batch: _Batch) -> RemoteBatch | None:
        record = batch.record
        known = await self.ledger.known_batch_ids()
        candidates = [remote async for remote in batch.api.list_since(record.created_at - CLOCK_SLACK_S)
                      if remote.id not in known]
        if record.provider == "openai":
            return next((remote for remote in candidates if remote.metadata.get(METADATA_KEY) == record.batch_key
                         or (record.input_file_id and remote.input_file_id == record.input_file_id)), None)
        ours = set(batch.names)
        same_size = [remote for remote in candidates if remote.request_count == record.requests]
        waiting = []
        for remote in same_size:
            if remote.ended:
                ids = {str(line.get("custom_id")) async for line in batch.api.results(remote)}
                if ids == ours:
                    return remote
            else:
                waiting.append(remote)
        if len(waiting) > 1:
            raise _Ambiguous(f"{len(waiting)} Anthropic batches of {record.requests} requests, made since "
                             "our record, are in progress; which is ours shows once they end")
        return waiting[0] if waiting else None

    async def _results(self, batch: _Batch, remote: RemoteBatch) -> dict[str, ResultLine]:
        """Read the results, writing each reply to the cache as it comes (a session killed here reads the
        batch again: a reply already stored is not counted twice)."""
        parse = parse_openai_line if batch.record.provider == "openai" else parse_anthropic_line
        lines: dict[str, ResultLine] = {}
        for attempt in range(SEND_ATTEMPTS):
            try:
                async for raw in batch.api.results(remote):
                    custom_id = str(raw.get("custom_id"))
                    name = batch.names.get(custom_id)
                    if name is None or custom_id in lines:
                        continue  # not ours (a batch taken by its size whose requests differ): left alone
                    route = self._routes.get(name) or _unpriced(batch.record)
                    line = parse(raw, name, route)
                    if line.outcome == "succeeded" and line.response is not None:
                        await self.store.put_call(custom_id, name, line.response, self.run_id)
                        tokens = token_counts(line.response)
                        self.stats.batch_cost_usd += line.response.cost_usd
                        self.stats.online_cost_usd += route.online_cost(*tokens)
                    lines[custom_id] = line
                    _crash_point("batch-download")
                return lines
            except BatchAPIError as exc:
                if attempt == SEND_ATTEMPTS - 1:
                    raise
                log.warning("%s; reading again", exc)
                await asyncio.sleep(min(self.settings.batch_poll_interval, 2.0 ** attempt))
        return lines

    async def _end(self, batch: _Batch, remote: RemoteBatch, lines: dict[str, ResultLine]) -> None:
        unanswered = "expired" if remote.status == "expired" or batch.cancel_sent else (
            "canceled" if remote.status.startswith("cancel") else "missing")
        outcomes = []
        for custom_id in batch.names:
            line = lines.get(custom_id)
            outcome = line.outcome if line is not None else unanswered
            if outcome == "canceled" and batch.cancel_sent:
                outcome = "expired"  # cancelled by us at its deadline, not by a person: it goes in a later batch
            error = line.error if line is not None else (remote.errors or f"no result in batch {remote.id} ({remote.status})")
            outcomes.append((custom_id, outcome, error))
        await self.ledger.end(batch.record.batch_key, remote.status, outcomes)
        self._close(batch)
        tally = Counter(outcome for _, outcome, _ in outcomes)
        self.stats.ended += 1
        self.stats.succeeded += tally["succeeded"]
        self.stats.failed_requests += sum(count for outcome, count in tally.items() if outcome != "succeeded")
        self.stats.round_seconds.append(time.monotonic() - batch.started)
        self.on_event(f"batch {remote.id} ended ({remote.status}): "
                      + ", ".join(f"{count} {outcome}" for outcome, count in sorted(tally.items())))
        for custom_id, outcome, _ in outcomes:
            self._history.setdefault(custom_id, []).append((batch.record.batch_key, outcome))
            call = self._calls.get(custom_id)
            if call is None or call.future.done() or call.batch_key != batch.record.batch_key:
                continue
            call.batch_key = None
            line = lines.get(custom_id)
            if outcome == "succeeded" and line is not None and line.response is not None:
                self._settle(call, line.response)
            else:
                self._dispatch(call)

    async def _refetch(self, batch_key: str) -> None:
        """Read an ended batch's results again into the cache (its replies were lost from it)."""
        record = await self.ledger.ended_batch(batch_key)
        if record is None or record.batch_id is None:
            return
        api = self._api(record.provider, record.endpoint)
        remote = await api.retrieve(record.batch_id)
        rows = await self.ledger.store.read("SELECT custom_id, model FROM batch_requests WHERE batch_key = ?", (batch_key,))
        names = {str(custom_id): str(name) for custom_id, name in rows}
        parse = parse_openai_line if record.provider == "openai" else parse_anthropic_line
        async for raw in api.results(remote):
            custom_id = str(raw.get("custom_id"))
            if custom_id not in names:
                continue
            route = self._routes.get(names[custom_id]) or _unpriced(record)
            line = parse(raw, names[custom_id], route)
            if line.outcome == "succeeded" and line.response is not None:
                await self.store.put_call(custom_id, names[custom_id], line.response, None)  # paid for already

    # -- closing -------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop following batches (they go on at the provider; the next session re-attaches) and close the
        API clients and the ledger. Calls still waiting are cancelled."""
        self._closed = True
        self.stats.in_progress = len(self._open)
        tasks = [task for task in [self._scheduler, *self._tasks] if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for call in list(self._calls.values()):
            self._settle(call, error=None)
        for api in self._apis.values():
            try:
                await api.aclose()
            except Exception as exc:  # closing a client must not hide what the run did
                log.warning("closing a batch API client: %s", exc)
        await self.ledger.close()


class _Ambiguous(Exception):
    pass


def _unpriced(record: BatchRecord) -> BatchRoute:
    """A model recorded by an earlier session but not configured now: its replies are kept, priced at 0."""
    return BatchRoute(record.provider, record.endpoint, "", (0.0, 0.0), (0.0, 0.0))  # type: ignore[arg-type]


def _chunks(calls: list[_Call], provider: str, limit: int) -> Iterator[list[_Call]]:
    """Batches of at most ``limit`` requests (and the provider's own count and size limits)."""
    most, most_bytes = PROVIDER_LIMITS[provider]
    most = min(most, limit)
    chunk: list[_Call] = []
    size = 0
    for call in calls:
        weight = request_bytes(call.request)
        if chunk and (len(chunk) >= most or size + weight > most_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(call)
        size += weight
    if chunk:
        yield chunk


def _write_input_file(calls: list[_Call]) -> Path:
    """The OpenAI batch input file, written to a temporary file (in a worker thread: it holds every image)."""
    handle = tempfile.NamedTemporaryFile("wb", prefix="mics-batch-", suffix=".jsonl", delete=False)
    with handle:
        for call in calls:
            handle.write(openai_line(call.key, call.request, call.model.route))
    return Path(handle.name)


async def _tried(send: Callable[[], Any]) -> Any:
    """An upload (nothing paid yet), tried again after a failure that may pass."""
    for attempt in range(SEND_ATTEMPTS):
        try:
            return await send()
        except BatchAPIError as exc:
            if exc.refused or attempt == SEND_ATTEMPTS - 1:
                raise
            await asyncio.sleep(2.0 ** attempt)
    raise AssertionError("unreachable")

