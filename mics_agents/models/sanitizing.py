"""The sanitizing wrapper: a reply is made fit to keep before anything reads, grades, caches or writes it.

What a model may send that no file should hold:

- a configured secret (an API key the model repeats from its context, a proxy that echoes the bearer token):
  masked by value (:func:`~mics_agents.redact.mask_secret_values`), never by shape, since the text is graded
  and trained on;
- code points UTF-8 cannot encode (a lone surrogate from a ``"\\ud800"`` escape): each becomes U+FFFD and the
  reply says so in ``extra["repaired"]``, then it is graded like any reply;
- a ``finish_reason`` that is no short word (a key, a dict, a huge number): unknown (None).

Put inside the validating and caching wrappers (``models/factory.py``), so the cache stores what the search
used; the cache key comes from the request, so masking never causes a miss. The store masks a cached reply
again when it reads it (:meth:`~mics_agents.store.Store.get_call`), for entries written before a key was set.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace

from ..redact import mask_secret_values, scrub_data
from .base import ModelRequest, ModelResponse, WrapperModel
from .transport import FINISH_REASON

__all__ = ["SanitizingModel", "sanitize_reply", "REPAIRED_ENCODING"]

REPAIRED_ENCODING = "code points with no UTF-8 form replaced by U+FFFD"
_UNENCODABLE = re.compile("[\ud800-\udfff]")
_log = logging.getLogger("mics_agents")


class SanitizingModel(WrapperModel):
    """Every reply of the wrapped model through :func:`sanitize_reply`."""

    passes_samples_on = True

    async def request(self, request: ModelRequest) -> ModelResponse:
        return sanitize_reply(await self.inner.request(request))

    async def request_samples(self, request: ModelRequest, sample_indices: Sequence[int]) -> list[ModelResponse]:
        if not self.sends_samples_together:
            return await super().request_samples(request, sample_indices)
        return [sanitize_reply(response) for response in await self.inner.request_samples(request, sample_indices)]


def sanitize_reply(response: ModelResponse) -> ModelResponse:
    """``response`` with secrets masked and unencodable code points replaced (the same object when there
    was nothing to change)."""
    text = mask_secret_values(response.text)
    extra = scrub_data(response.extra, shapes=False) if response.extra else response.extra
    reason = response.finish_reason
    if reason is not None:  # any model may put anything there; the cache keeps only a short word, masked
        reason = mask_secret_values(reason) if isinstance(reason, str) and FINISH_REASON.fullmatch(reason) else None
    if _UNENCODABLE.search(text):
        text = _UNENCODABLE.sub("\ufffd", text)
        extra = {**extra, "repaired": REPAIRED_ENCODING}
        _log.warning("%s: a reply held code points with no UTF-8 form (lone surrogates); each was replaced by "
                     "U+FFFD and the reply is graded as repaired.", response.model)
    if text is response.text and extra == response.extra and reason == response.finish_reason:
        return response
    return replace(response, text=text, extra=extra, finish_reason=reason)
