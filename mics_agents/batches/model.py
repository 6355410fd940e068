"""A batched model: where the transport stack would be, a queue.

    CachedModel(ValidatingModel(SanitizingModel(BatchedModel)))    with --batch, for a batched model
    CachedModel(ValidatingModel(SanitizingModel(RetryingModel(LimitingModel(transport)))))    online

The cache still answers first, and a reply is still sanitized and validated before it is kept; only what
happens on a miss changes: the call waits in the run's :class:`~.queue.BatchQueue` for its batch instead of
being sent. So it skips what belongs to one online attempt: the per-model concurrency limit, the per-call
deadline (``MICS_*_TIMEOUT``) and the retrying wrapper (a batch has its own deadline, and a request that
errors goes in a later batch). ``online`` is the model's ordinary stack, used when a request failed in too
many batches (``MICS_BATCH_FALLBACK=online``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..models.base import Model, ModelRequest, ModelResponse

if TYPE_CHECKING:
    from .queue import BatchQueue
    from .wire import BatchRoute

__all__ = ["BatchedModel"]


class BatchedModel(Model):
    def __init__(self, name: str, queue: "BatchQueue", route: "BatchRoute", online: Model, *, namespace: str = "") -> None:
        self.name = name
        self.queue = queue
        self.route = route
        self.online = online
        # The cache's namespace for this model: the custom_id of a request is its cache key.
        self.namespace = namespace
        queue.register(name, route)

    async def request(self, request: ModelRequest) -> ModelResponse:
        return await self.queue.call(self, request)

    async def aclose(self) -> None:
        await self.online.aclose()
