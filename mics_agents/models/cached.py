"""The caching wrapper: repeated calls are answered from the SQLite store and never sent again."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from functools import partial

from ..errors import StoreError
from ..store import Store
from .base import Model, ModelRequest, ModelResponse, WrapperModel
from .validating import usable

__all__ = ["CachedModel"]


class CachedModel(WrapperModel):
    """Look a call up by its key; on a miss ask the wrapped model and store the reply.

    Identical calls already in flight (two mentors proposing the same step, say) share one request. The
    shared request runs as its own task, so a caller that is cancelled never cancels the others; the task
    is cancelled when its last caller is (as an unshared call would be), and its reply is then not stored.
    Calls sent from here are recorded as paid by ``run_id`` (for a run's budget).

    Only what the wrapped model returns is stored, so a failure is never cached; wrap a
    :class:`~mics_agents.models.validating.ValidatingModel` so that a reply the request's ``validate``
    refuses fails too. A stored reply today's validator refuses (cached by an older version) is asked again.

    ``namespace`` keeps the calls of a changed model served under the same name apart. Images are keyed by
    their original bytes and resize settings; an entry an older version wrote under the hash of the re-encoded
    bytes is still found (and copied to today's key), so a run under way does not pay for it again.
    A reply whose write fails (after the store's own retries) is still returned: paid for, it is used.
    """

    def __init__(self, inner: Model, store: Store, *, run_id: str | None = None, namespace: str = "") -> None:
        super().__init__(inner)
        self.store = store
        self.run_id = run_id  # the batch run that pays for the calls sent from here
        self.namespace = namespace
        self._in_flight: dict[str, _SharedCall] = {}

    async def request(self, request: ModelRequest) -> ModelResponse:
        key = request.cache_key(self.name, namespace=self.namespace)
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
        if response is None and not self.namespace and request.has_legacy_image_key():
            response = await self.store.get_call(request.cache_key(self.name, legacy_images=True))
            if response is not None and usable(request, response):
                await self._put(key, response, run_id=None)  # under today's key; paid for long ago
        # A stored reply the request's validator refuses (cached by an older version) is asked again.
        stale = response is not None and not usable(request, response)
        if response is None or stale:
            response = await self.inner.request(request)
            await self._put(key, response, run_id=self.run_id, replace=stale)
        return response

    async def _put(self, key: str, response: ModelResponse, *, run_id: str | None, replace: bool = False) -> None:
        try:
            await self.store.put_call(key, self.name, response, run_id, replace=replace)
        except StoreError as exc:
            # The store retried the write already. The reply was paid for: the item keeps it, and only a
            # later run pays for it again.
            self.store.unsaved_calls += 1
            if self.store.unsaved_calls == 1:
                logging.getLogger("mics_agents").warning(
                    "%s The reply is used all the same, but a rerun will ask for it again.", exc
                )

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


def _as_cached(response: ModelResponse) -> ModelResponse:
    return replace(response, cached=True)
