"""The validating wrapper: a reply is checked by its request's ``validate`` before anyone keeps it.

Put inside the cache (``CachedModel(ValidatingModel(model))``, as ``models/factory.py`` does), a reply the
validator refuses raises :class:`~mics_agents.errors.MalformedReplyError` on its way out and is never
stored, so a rerun asks again; the cache uses :func:`usable` to ask an entry stored by an older version
again when today's validator refuses it. Outside the retrying wrapper on purpose: a refused reply is the
caller's to re-ask (the judge asks with the next ``attempt``, a new request), not to resend unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import MalformedReplyError
from .base import ModelRequest, ModelResponse, WrapperModel

__all__ = ["ValidatingModel", "usable"]


class ValidatingModel(WrapperModel):
    """Raises :class:`MalformedReplyError` for a reply ``request.validate`` refuses."""

    passes_samples_on = True

    async def request(self, request: ModelRequest) -> ModelResponse:
        response = await self.inner.request(request)
        if request.validate is not None:
            request.validate(response.text)  # MalformedReplyError: refused
        return response

    async def request_samples(self, request: ModelRequest, sample_indices: Sequence[int]) -> list[ModelResponse]:
        """Passed on as one call when there is nothing to check; with a validator, each sample is asked and
        checked on its own, so one refused reply never takes its accepted siblings down with it."""
        if request.validate is not None or not self.sends_samples_together:
            return await super().request_samples(request, sample_indices)
        return await self.inner.request_samples(request, sample_indices)


def usable(request: ModelRequest, response: ModelResponse) -> bool:
    """Whether the request's validator (if any) accepts this reply."""
    if request.validate is None:
        return True
    try:
        request.validate(response.text)
    except MalformedReplyError:
        return False
    return True
