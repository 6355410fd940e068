"""The retrying wrapper: another attempt after an error that may pass, with exponential backoff
and full jitter, or after the server's ``Retry-After`` when it gives one and it is not too long.

What is worth another attempt is decided by the transport: it raises
:class:`~mics_agents.errors.TransientModelError` (429, 5xx, timeouts, dropped connections) or
:class:`~mics_agents.errors.MalformedReplyError` (a reply without text); anything else is sent once: a 400,
credentials refused or not found (401, 403, whatever status a wrapper gives them) and a package that is not
installed (LiteLLM reports the failed import as a connection error) fail the same way every time. A ``Retry-After`` beyond ``max_retry_after`` means the server is down or out of quota
for longer than a run should sit and wait: the call fails at once, saying how long it asked for.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import MalformedReplyError, ModelCallError, TransientModelError
from .base import AroundEachCall, Model

__all__ = ["RetryingModel"]

T = TypeVar("T")


def _attempts(count: int) -> str:
    return f"{count} attempt" if count == 1 else f"{count} attempts"


class _WaitTooLong(Exception):
    def __init__(self, cause: TransientModelError) -> None:
        self.cause = cause


class RetryingModel(AroundEachCall):
    """Up to ``max_retries`` more attempts of a call that failed in a way that may pass."""

    def __init__(
        self,
        inner: Model,
        *,
        max_retries: int = 6,
        initial_wait: float = 1.0,
        max_wait: float = 60.0,
        max_retry_after: float = 120.0,
    ) -> None:
        super().__init__(inner)
        self.max_retries = max_retries
        self.initial_wait = initial_wait
        self.max_wait = max_wait
        self.max_retry_after = max_retry_after

    def _wait(self, exc: BaseException, attempt_number: int) -> float:
        retry_after = exc.retry_after if isinstance(exc, TransientModelError) else None
        if retry_after is not None:
            return retry_after
        # Exponential backoff with full jitter, capped.
        return random.uniform(0, min(self.max_wait, self.initial_wait * 2 ** (attempt_number - 1)))

    def _worth_another(self, exc: BaseException) -> bool:
        return isinstance(exc, (TransientModelError, MalformedReplyError))

    async def around(self, send: Callable[[], Awaitable[T]]) -> T:
        """``send``, tried again after errors that may pass: a request with ``n`` as a whole.

        A plain loop (tenacity's retrying objects cost ~25 us a call to build and drive, on every call, most of
        which never fail)."""
        attempts = self.max_retries + 1
        made = 0
        try:
            while True:
                made += 1
                try:
                    return await send()
                except TransientModelError as exc:
                    if exc.retry_after is not None and exc.retry_after > self.max_retry_after:
                        raise _WaitTooLong(exc) from exc
                    if made >= attempts:
                        raise
                    wait = self._wait(exc, made)
                except MalformedReplyError as exc:
                    if made >= attempts:
                        raise
                    wait = self._wait(exc, made)
                await asyncio.sleep(wait)
        except _WaitTooLong as too_long:
            exc = too_long.cause
            raise ModelCallError(
                f"{self.name}: the server asked to wait {exc.retry_after:,.0f} s before trying again (Retry-After; "
                f"last error {exc.description}), longer than MICS_MAX_RETRY_AFTER ({self.max_retry_after:g} s): it "
                "is down or out of quota for now. Rerun later (the run resumes), or raise MICS_MAX_RETRY_AFTER.",
                model=self.name,
            ) from exc
        except TransientModelError as exc:
            raise ModelCallError(
                f"{self.name}: gave up after {_attempts(made)}; last error {exc.description}. {exc.hint}".rstrip(),
                model=self.name,
            ) from exc
        except MalformedReplyError as exc:
            raise ModelCallError(
                f"{self.name}: gave up after {_attempts(made)}; last reply was malformed: {exc}. "
                "Check the model serves chat completions.",
                model=self.name,
            ) from exc
