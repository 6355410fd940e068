"""A model wrapper that answers repeated calls from the SQLite store and never sends them again."""

from __future__ import annotations

import asyncio

from ..store import Store
from .base import Model, ModelRequest, ModelResponse

__all__ = ["CachedModel"]


class CachedModel(Model):
    """Look a call up by its key; on a miss ask the wrapped model and store the reply.

    Identical calls already in flight (two mentors proposing the same step, say) share one request.
    Calls sent from here are recorded as paid by ``run_id`` (for a run's budget).
    Only successful replies are stored: a failure is never cached, so it is retried on the next run.
    """

    def __init__(self, inner: Model, store: Store, *, run_id: str | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.store = store
        self.run_id = run_id  # the batch run that pays for the calls sent from here
        self._in_flight: dict[str, asyncio.Future[ModelResponse]] = {}

    async def request(self, request: ModelRequest) -> ModelResponse:
        key = request.cache_key(self.name)
        pending = self._in_flight.get(key)
        if pending is not None:
            response = await asyncio.shield(pending)
            return _as_cached(response)
        # Registered before the first await, so a twin arriving meanwhile waits for this one.
        future: asyncio.Future[ModelResponse] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            response = await self.store.get_call(key)
            if response is None:
                response = await self.inner.request(request)
                await self.store.put_call(key, self.name, response, self.run_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        else:
            future.set_result(response)
            return response
        finally:
            del self._in_flight[key]

    async def aclose(self) -> None:
        await self.inner.aclose()


def _as_cached(response: ModelResponse) -> ModelResponse:
    from dataclasses import replace

    return replace(response, cached=True)
