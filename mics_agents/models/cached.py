"""A model wrapper that answers repeated calls from the SQLite store and never sends them again."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from functools import partial

from ..errors import MalformedReplyError
from ..store import Store
from .base import Model, ModelRequest, ModelResponse

__all__ = ["CachedModel"]


class CachedModel(Model):
    """Look a call up by its key; on a miss ask the wrapped model and store the reply.

    Identical calls already in flight (two mentors proposing the same step, say) share one request. The
    shared request runs as its own task, so a caller that is cancelled never cancels the others; the task
    is cancelled when its last caller is (as an unshared call would be), and its reply is then not stored.
    Calls sent from here are recorded as paid by ``run_id`` (for a run's budget).
    Only successful replies are stored: a failure, or a reply the request's ``validate`` refuses, is never
    cached, so it is asked again on the next run.
    """

    def __init__(self, inner: Model, store: Store, *, run_id: str | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.store = store
        self.run_id = run_id  # the batch run that pays for the calls sent from here
        self._in_flight: dict[str, _SharedCall] = {}

    async def request(self, request: ModelRequest) -> ModelResponse:
        key = request.cache_key(self.name)
        call = self._in_flight.get(key)
        if call is None:
            # Registered before the first await, so a twin arriving meanwhile waits for this one.
            call = _SharedCall(asyncio.get_running_loop().create_task(self._fetch(key, request)))
            self._in_flight[key] = call
            call.task.add_done_callback(partial(self._forget, key, call))
        call.waiters += 1
        try:
            response = await asyncio.shield(call.task)
        finally:
            call.waiters -= 1
            if call.waiters == 0 and not call.task.done():
                # Its last caller was cancelled: nobody wants the reply. A twin arriving later starts afresh
                # rather than waiting on a call that is being cancelled.
                self._forget(key, call)
                call.task.cancel()
        if call.answered:
            return _as_cached(response)  # the reply is counted (and paid) once, by the first caller it reached
        call.answered = True
        return response

    def _forget(self, key: str, call: "_SharedCall", task: "asyncio.Task[ModelResponse] | None" = None) -> None:
        if self._in_flight.get(key) is call:
            del self._in_flight[key]
        if task is not None and not task.cancelled():
            task.exception()  # mark retrieved: its waiters (if any) re-raise it themselves

    async def _fetch(self, key: str, request: ModelRequest) -> ModelResponse:
        response = await self.store.get_call(key)
        # A stored reply the request's validator refuses (cached by an older version) is asked again.
        stale = response is not None and not _usable(request, response)
        if response is None or stale:
            response = await self.inner.request(request)
            if request.validate is not None:
                request.validate(response.text)  # MalformedReplyError: not stored, asked again next time
            await self.store.put_call(key, self.name, response, self.run_id, replace=stale)
        return response

    async def aclose(self) -> None:
        """Cancel calls still in flight (their callers are gone or going), then close the wrapped model."""
        tasks = [call.task for call in self._in_flight.values()]
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await self.inner.aclose()


@dataclass(eq=False)
class _SharedCall:
    """One call in flight, and how many callers wait for it."""

    task: "asyncio.Task[ModelResponse]"
    waiters: int = 0
    answered: bool = False  # a caller has had the reply as sent


def _usable(request: ModelRequest, response: ModelResponse) -> bool:
    if request.validate is None:
        return True
    try:
        request.validate(response.text)
    except MalformedReplyError:
        return False
    return True


def _as_cached(response: ModelResponse) -> ModelResponse:
    return replace(response, cached=True)
