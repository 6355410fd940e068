"""The caching wrapper: repeated calls are answered from the SQLite store and never sent again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from .base import Model, ModelRequest, ModelResponse, WrapperModel
from .validating import usable

if TYPE_CHECKING:  # the store imports the model boundary's types: only the annotations need it here
    from ..store import Store

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

    passes_samples_on = True

    def __init__(self, inner: Model, store: Store, *, run_id: str | None = None, namespace: str = "") -> None:
        super().__init__(inner)
        self.store = store
        self.run_id = run_id  # the batch run that pays for the calls sent from here
        self.namespace = namespace
        self._in_flight: dict[str, _SharedCall] = {}
        self._batches: set[asyncio.Task[list[ModelResponse]]] = set()  # samples asked for together

    async def request(self, request: ModelRequest) -> ModelResponse:
        key = self._key(request)
        call = self._in_flight.get(key) or self._share(key, self._fetch(key, request))
        call.waiters += 1
        try:
            response = await asyncio.shield(call.task)
        finally:
            self._leave(key, call)
        return self._hand_out(call, response)

    async def request_samples(self, request: ModelRequest, sample_indices: Sequence[int]) -> list[ModelResponse]:
        """Each sample is looked up under its own key (its ``sample_index``), as if asked alone; only the
        samples not stored are asked for, together (one request with ``n``), and each reply is stored
        under its own key, so a rerun (with or without ``n``) replays them. A sample already in flight
        elsewhere is waited for, not asked twice. When the model below sends samples one by one, or a
        validator may refuse one of them, each is a call of its own here too: a failed or refused sample
        never loses a sibling's paid reply."""
        if not self.sends_samples_together or request.validate is not None or len(sample_indices) == 1:
            # One sample is one call (Model.request_samples): a shared call of its own, no batch around it.
            return await super().request_samples(request, sample_indices)
        requests = [replace(request, sample_index=index) for index in sample_indices]
        keys = [self._key(sample) for sample in requests]
        fresh = list(dict.fromkeys(key for key in keys if key not in self._in_flight))
        if fresh:
            batch = _Batch(asyncio.get_running_loop().create_task(
                self._fetch_samples(request, [requests[keys.index(key)] for key in fresh], fresh)
            ), pickers=len(fresh))
            self._batches.add(batch.task)
            batch.task.add_done_callback(self._forget_batch)
            for position, key in enumerate(fresh):
                self._share(key, batch.pick(position)).task.add_done_callback(batch.dropped)
        # Joined before the first await, so a caller cancelled at once still leaves (and cancels) them.
        calls = [self._in_flight[key] for key in keys]
        for call in calls:
            call.waiters += 1
        try:
            results = await asyncio.gather(*(asyncio.shield(call.task) for call in calls), return_exceptions=True)
        finally:
            for key, call in zip(keys, calls):
                self._leave(key, call)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [self._hand_out(call, response) for call, response in zip(calls, results)]  # type: ignore[arg-type]

    def _key(self, request: ModelRequest) -> str:
        return request.cache_key(self.name, namespace=self.namespace)

    def _share(self, key: str, fetch: Coroutine[Any, Any, ModelResponse]) -> "_SharedCall":
        """``fetch`` as the one call in flight for ``key``, registered before the first await, so a twin
        arriving meanwhile waits for it."""
        call = _SharedCall(asyncio.get_running_loop().create_task(fetch))
        self._in_flight[key] = call
        call.task.add_done_callback(partial(self._forget, key, call))
        return call

    def _leave(self, key: str, call: "_SharedCall") -> None:
        call.waiters -= 1
        if call.waiters == 0 and not call.task.done():
            # Its last caller was cancelled: nobody wants the reply. A twin arriving later starts afresh
            # rather than waiting on a call that is being cancelled.
            self._forget(key, call)
            call.task.cancel()

    @staticmethod
    def _hand_out(call: "_SharedCall", response: ModelResponse) -> ModelResponse:
        if call.answered:
            return _as_cached(response)  # the reply is counted (and paid) once, by the first caller it reached
        call.answered = True
        return response

    def _forget(self, key: str, call: "_SharedCall", task: "asyncio.Task[ModelResponse] | None" = None) -> None:
        if self._in_flight.get(key) is call:
            del self._in_flight[key]
        if task is not None and not task.cancelled():
            task.exception()  # mark retrieved: its waiters (if any) re-raise it themselves

    def _forget_batch(self, task: "asyncio.Task[list[ModelResponse]]") -> None:
        self._batches.discard(task)
        if not task.cancelled():
            task.exception()  # mark retrieved: the samples' calls re-raise it

    async def _fetch(self, key: str, request: ModelRequest) -> ModelResponse:
        response, stale = await self._lookup(key, request)
        if response is None:
            response = await self.inner.request(request)
            await self._put(key, response, run_id=self.run_id, replace=stale)
        return response

    async def _fetch_samples(self, request: ModelRequest, samples: list[ModelRequest], keys: list[str]) -> list[ModelResponse]:
        looked_up = [await self._lookup(key, sample) for key, sample in zip(keys, samples)]
        replies: list[ModelResponse | None] = [response for response, _ in looked_up]
        missing = [position for position, response in enumerate(replies) if response is None]
        if missing:
            fresh = await self.inner.request_samples(request, [samples[position].sample_index for position in missing])
            for position, response in zip(missing, fresh):
                await self._put(keys[position], response, run_id=self.run_id, replace=looked_up[position][1])
                replies[position] = response
        return replies  # type: ignore[return-value]

    async def _lookup(self, key: str, request: ModelRequest) -> tuple[ModelResponse | None, bool]:
        """The stored reply (None: ask for it), and whether a stored one was refused (to be replaced)."""
        response = await self.store.get_call(key)
        if response is None and not self.namespace and request.has_legacy_image_key():
            response = await self.store.get_call(request.cache_key(self.name, legacy_images=True))
            if response is not None and usable(request, response):
                await self._put(key, response, run_id=None)  # under today's key; paid for long ago
        # A stored reply the request's validator refuses (cached by an older version) is asked again.
        if response is not None and not usable(request, response):
            return None, True
        return response, False

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
        tasks = [call.task for call in self._in_flight.values()] + list(self._batches)
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


@dataclass(eq=False)
class _Batch:
    """Samples asked for together: each sample's shared call picks its reply from the batch's. The batch
    is cancelled only when every one of them is (a cancelled sample never cancels its siblings)."""

    task: "asyncio.Task[list[ModelResponse]]"
    pickers: int

    async def pick(self, position: int) -> ModelResponse:
        return (await asyncio.shield(self.task))[position]

    def dropped(self, pick: "asyncio.Task[ModelResponse]") -> None:
        """A sample's call ended; counted here (not in :meth:`pick`) so that one cancelled before it ever
        ran counts too."""
        if pick.cancelled():
            self.pickers -= 1
            if self.pickers == 0:
                self.task.cancel()


def _as_cached(response: ModelResponse) -> ModelResponse:
    return replace(response, cached=True)
