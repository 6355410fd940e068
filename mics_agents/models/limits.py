"""The limiting wrapper, and the per-model concurrency limits it takes slots of: one per model name and
event loop, shared by every model of that name.

Searchers opened side by side in one loop (or many ``search()`` calls) reach the same server, so a limit
configured for a model name must hold over all of them together: each open model registers the limit it
was configured with, and the smallest registered limit applies. A model that closes takes its limit
back, so a later searcher with a larger limit is not held to an earlier, smaller one.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

from ..errors import TransientModelError
from .base import AroundEachCall, Model

__all__ = ["LimitingModel", "ModelLimit", "model_limit"]

T = TypeVar("T")


class ModelLimit:
    """Calls in flight for one model name in one event loop; ``async with limit:`` holds one slot.

    Waiters are served first come, first served. A limit lowered while calls are in flight lets no new
    call start until the calls in flight are below it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.in_flight = 0
        self._limits: Counter[int] = Counter()  # the limit of each open model of this name
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Adaptive (AIMD) window under the configured limit: None until the server first answers 429.
        self.window: float | None = None
        self.epoch = 0  # counts decreases: one 429 burst from calls started in one epoch halves it once
        self.decreases = 0
        self._hold_until = 0.0  # no additive increase before this (the last 429's Retry-After)

    @property
    def configured(self) -> int | None:
        """The smallest limit registered, or None (no open model: no limit)."""
        return min(self._limits) if self._limits else None

    @property
    def limit(self) -> int | None:
        """The limit in force: the configured one, or less while the server is answering 429."""
        configured = self.configured
        if configured is None or self.window is None:
            return configured
        return max(1, min(configured, int(self.window)))

    def rate_limited(self, started_in: int, retry_after: float | None = None) -> None:
        """A call started in epoch ``started_in`` got a 429: halve the window (multiplicative decrease),
        once per epoch, so a burst of 429s from the calls that were in flight together counts once; and do
        not grow it again before the server's Retry-After has passed."""
        if retry_after:
            self._hold_until = max(self._hold_until, time.monotonic() + min(retry_after, 60.0))
        if started_in != self.epoch:
            return
        configured = self.configured or max(1, self.in_flight)
        current = self.window if self.window is not None else float(min(configured, max(1, self.in_flight + 1)))
        self.window = max(1.0, current / 2)
        self.epoch += 1
        self.decreases += 1

    def succeeded(self) -> None:
        """A call went through: the window grows by one slot per window of calls (additive increase) up to
        the configured limit, where adapting stops."""
        if self.window is None or time.monotonic() < self._hold_until:
            return
        configured = self.configured
        self.window += 1.0 / max(1.0, self.window)
        if configured is None or self.window >= configured:
            self.window = None
        self._wake()

    def register(self, limit: int) -> None:
        self._limits[limit] += 1

    def unregister(self, limit: int) -> None:
        self._limits[limit] -= 1
        if self._limits[limit] <= 0:
            del self._limits[limit]
        self._wake()  # the limit may have risen

    def _has_room(self) -> bool:
        limit = self.limit
        return limit is None or self.in_flight < limit

    def _wake(self) -> None:
        while self._waiters and self._has_room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1  # the slot is handed over, so nobody can take it in between
                waiter.set_result(None)

    async def acquire(self) -> None:
        if not self._waiters and self._has_room():
            self.in_flight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot and cancelled before using it: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


_by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, ModelLimit]]" = weakref.WeakKeyDictionary()


def model_limit(name: str) -> ModelLimit:
    """The running loop's limit for this model name (``""`` names the limit over all models together)."""
    per_loop = _by_loop.setdefault(asyncio.get_running_loop(), {})
    limit = per_loop.get(name)
    if limit is None:
        limit = per_loop[name] = ModelLimit(name)
    return limit


class _Registration:
    """One model's limits, registered with one loop's shared limits."""

    def __init__(self, name: str, limit: int, overall: int) -> None:
        self.value, self.overall_value = limit, overall
        self.limit = model_limit(name)
        self.limit.register(limit)
        self.overall = model_limit("") if overall else None
        if self.overall is not None:
            self.overall.register(overall)

    def release(self) -> None:
        self.limit.unregister(self.value)
        if self.overall is not None:
            self.overall.unregister(self.overall_value)


class LimitingModel(AroundEachCall):
    """At most ``limit`` calls of this model name in flight (the smallest limit any open model of that name
    was configured with), and at most ``overall`` over all models together (0: no overall limit).

    A slot is held for the call only: put retries outside this wrapper, so that a call backing off holds
    none. The model's own slot is taken first, so a call waiting for its model never holds an overall one.
    """

    def __init__(self, inner: Model, *, limit: int, overall: int = 0, adaptive: bool = True) -> None:
        super().__init__(inner)
        # Halve this name's limit on a 429 and add one slot per window of successes, back up to ``limit``.
        self.adaptive = adaptive
        if limit < 1 or overall < 0:
            raise ValueError(f"{inner.name}: a limit must be >= 1 (got {limit}), overall >= 0 (got {overall})")
        self.limit_value = limit
        self.overall_value = overall
        self._registrations: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Registration]" = (
            weakref.WeakKeyDictionary()
        )
        try:
            # Opened inside a loop (Searcher.open): register now, so the limit holds from the first call of
            # any searcher, not from this model's first call.
            self._registration()
        except RuntimeError:
            pass  # built outside a loop: the first call registers it

    def _registration(self) -> _Registration:
        loop = asyncio.get_running_loop()
        registration = self._registrations.get(loop)
        if registration is None:
            registration = self._registrations[loop] = _Registration(self.name, self.limit_value, self.overall_value)
        return registration

    async def around(self, send: Callable[[], Awaitable[T]]) -> T:
        """``send`` in a slot: one request, with ``n`` or without, holds one."""
        registration = self._registration()
        limit = registration.limit
        async with limit:
            epoch = limit.epoch
            try:
                if registration.overall is None:
                    result = await send()
                else:
                    async with registration.overall:
                        result = await send()
            except TransientModelError as exc:
                if self.adaptive and exc.status_code == 429:
                    limit.rate_limited(epoch, exc.retry_after)
                raise
            if self.adaptive:
                limit.succeeded()
            return result

    async def aclose(self) -> None:
        """Take this model's limits back (a larger limit of another open model may apply again), then close
        the inner model. Idempotent."""
        registrations = list(self._registrations.values())
        self._registrations.clear()
        for registration in registrations:
            registration.release()
        await self.inner.aclose()
