"""What every transport shares: one attempt under one total deadline, and errors sorted into those worth
another attempt (:class:`~mics_agents.errors.TransientModelError`) and those that are not
(:class:`~mics_agents.errors.ModelCallError`, with what to do).

A transport sends one attempt and nothing more: retries, limits, validation and the cache are wrappers
around it (``models/factory.py``). The deadline covers connect, send and the whole reply: HTTP clients'
own timeouts are per read, so a server that drips its reply a byte at a time would never trip them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sys
import weakref
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from ..errors import MalformedReplyError, ModelCallError, ModelError, TransientModelError
from ..redact import mask_secret_values
from .base import Model, ModelRequest, ModelResponse, check_request_allowed
from .clients import ClientShare

__all__ = ["Transport", "classify_error", "retry_after_seconds", "split_usage", "choice_responses", "token_count",
           "RETRYABLE_4XX"]

T = TypeVar("T")

# 4xx statuses that say "try again": request timeout, conflict, too early, too many requests.
RETRYABLE_4XX = frozenset({408, 409, 425, 429})


class Transport(Model):
    """Sends one attempt of a call. Subclasses implement :meth:`_send` and :meth:`endpoint_bases`, and
    may name more error types worth another attempt (:meth:`_is_transient`)."""

    def __init__(self, name: str, *, timeout: float) -> None:
        self.name = name
        self.default_timeout = timeout
        self._shares: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ClientShare]" = weakref.WeakKeyDictionary()

    @abstractmethod
    def endpoint_bases(self) -> list[str | None]:
        """Where this model's calls go (None: the provider's public API), for the request policy."""

    @abstractmethod
    async def _send(self, request: ModelRequest, timeout: float) -> ModelResponse:
        """One attempt; raise anything, :meth:`request` sorts it."""

    def _is_transient(self, exc: BaseException) -> bool:
        return False

    def _deadline_passed(self) -> None:
        """Called in the task whose attempt the deadline just ended (a transport may blame its endpoint)."""

    # Whether the endpoint takes ``n`` (several samples of one request in one reply). Set by the factory.
    supports_n: bool = False

    @property
    def sends_samples_together(self) -> bool:
        return self.supports_n

    async def _send_samples(self, request: ModelRequest, count: int, timeout: float) -> list[ModelResponse]:
        """One attempt asking for ``count`` samples (``n``); transports that can set :attr:`supports_n`."""
        raise NotImplementedError

    async def request(self, request: ModelRequest) -> ModelResponse:
        timeout = request.timeout or self.default_timeout
        return await self._attempt(lambda: self._send(request, timeout), timeout)

    async def request_samples(self, request: ModelRequest, sample_indices: Sequence[int]) -> list[ModelResponse]:
        """One request with ``n`` when the endpoint takes it, else one request per sample. The replies come
        back in the order of ``sample_indices`` (choice k is sample ``sample_indices[k]``)."""
        if not self.supports_n or len(sample_indices) < 2:
            return await super().request_samples(request, sample_indices)
        timeout = request.timeout or self.default_timeout
        return await self._attempt(lambda: self._send_samples(request, len(sample_indices), timeout), timeout)

    async def _attempt(self, send: Callable[[], Awaitable[T]], timeout: float) -> T:
        check_request_allowed(self.name, self.endpoint_bases())
        loop = asyncio.get_running_loop()
        if loop not in self._shares:
            # While this model is open it holds a share of the loop's HTTP clients (see clients.py).
            self._shares[loop] = ClientShare()
        scope = _deadline(timeout)
        try:
            async with scope:
                return await send()
        except ModelError:
            raise
        except TimeoutError as exc:
            if not scope.expired():
                raise classify_error(self.name, exc, self._is_transient) from exc
            self._deadline_passed()
            raise TransientModelError(
                f"no complete reply within the {timeout:g} s deadline",
                model=self.name,
                hint="A slow model needs a longer deadline (MICS_MENTOR_TIMEOUT, MICS_INTERN_TIMEOUT, "
                "MICS_JUDGE_TIMEOUT, MICS_REQUEST_TIMEOUT); otherwise check the server is up and not overloaded.",
            ) from None
        except Exception as exc:
            raise classify_error(self.name, exc, self._is_transient) from exc

    async def aclose(self) -> None:
        """Give back this model's share of the loop's HTTP clients (the loop's last user closes them; another
        loop's clients are closed by that loop). Idempotent."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        shares = list(self._shares.items())
        self._shares.clear()
        for loop, share in shares:
            if loop is not running:
                await share.release()  # returns without suspending: another loop's clients are not closed here
        for loop, share in shares:
            if loop is running:
                await share.release()


def split_usage(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` tokens shared out in proportion to ``weights`` (equal shares when they are all 0), in
    whole tokens that add up to ``total``: a reply with ``n`` choices reports one usage for all of them."""
    if not weights:
        return []
    if sum(weights) <= 0:
        weights = [1] * len(weights)
    whole = sum(weights)
    shares = [total * weight // whole for weight in weights]
    # The tokens rounding left over go to the largest remainders, earliest first.
    by_remainder = sorted(range(len(weights)), key=lambda k: (-(total * weights[k] % whole), k))
    for k in by_remainder[: total - sum(shares)]:
        shares[k] += 1
    return shares


# Token counts a reply may claim; outside this (1e23, -5, NaN, "many") the usage is unknown.
MAX_TOKENS_CLAIMED = 10**9


def token_count(value: Any) -> int | None:
    """A usage figure as a whole number of tokens: 0 when absent, None when it is no plausible count."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not (0 <= value <= MAX_TOKENS_CLAIMED):  # NaN fails this too
        return None
    return int(value)


def choice_responses(
    name: str, choices: list[Any], count: int, *, input_tokens: Any, output_tokens: Any,
    price: Callable[[int, int], float],
) -> list[ModelResponse]:
    """One response per choice of an OpenAI reply (dicts or LiteLLM objects), in ``index`` order. The reply's
    usage (as the reply gave it: :func:`token_count` reads it) is shared out (:func:`~.transport.split_usage`):
    input tokens equally, output tokens by the length of each choice's text. Usage that is no plausible count
    is unknown: the replies carry 0 tokens, cost nothing and say so in ``extra["usage_unknown"]``. A choice
    without text makes the reply malformed (asked again)."""
    indices = [_get(choice, "index") for choice in choices]
    if all(isinstance(index, int) for index in indices):
        choices = [choice for _, choice in sorted(zip(indices, choices), key=lambda pair: pair[0])]
    if count > 1 and 0 < len(choices) < count:
        raise ModelCallError(
            f"{name}: asked for {count} samples in one request (n={count}) but the reply has {len(choices)}: the "
            "server ignores 'n'. Remove 'supports_n' from this deployment's model_info in the Router config.",
            model=name,
        )
    choices = choices[:count]
    texts = [_get(_get(choice, "message"), "content") for choice in choices]
    if len(choices) < count or not all(isinstance(text, str) and text.strip() for text in texts):
        raise MalformedReplyError(f"{name}: reply has no text (choices={len(choices)})", model=name)
    tokens_in_all, tokens_out_all = token_count(input_tokens), token_count(output_tokens)
    extra: dict[str, Any] = {}
    if tokens_in_all is None or tokens_out_all is None:
        # Masked before it is cut: a key cut short is no longer the value the masking looks for.
        claimed = {"prompt_tokens": mask_secret_values(repr(input_tokens))[:40],
                   "completion_tokens": mask_secret_values(repr(output_tokens))[:40]}
        logging.getLogger("mics_agents").warning(
            "%s: the reply's usage (%s) is no plausible token count; kept as unknown, counted as 0 tokens and "
            "no cost.", name, ", ".join(f"{key} {value}" for key, value in claimed.items()),
        )
        tokens_in_all = tokens_out_all = 0
        extra["usage_unknown"] = claimed
    inputs = split_usage(tokens_in_all, [1] * count)
    outputs = split_usage(tokens_out_all, [len(text) for text in texts])
    return [
        ModelResponse(
            text=text, model=name, input_tokens=tokens_in, output_tokens=tokens_out,
            cost_usd=0.0 if extra else _finite_cost(price(tokens_in, tokens_out)),
            finish_reason=finish_reason_of(choice), extra=dict(extra),
        )
        for text, choice, tokens_in, tokens_out in zip(texts, choices, inputs, outputs)
    ]


FINISH_REASON = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")


def finish_reason_of(choice: Any) -> str | None:
    """Why a choice stopped ("stop", "length", "end_turn" ...): a short word, else None (unknown). What a
    server puts there is kept only in that shape, so nothing else it sends can reach the cache through it."""
    reason = _get(choice, "finish_reason")
    return reason if isinstance(reason, str) and FINISH_REASON.fullmatch(reason) else None


def _finite_cost(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 else 0.0


def _get(value: Any, name: str) -> Any:
    """A field of a reply part: a dict's key (JSON) or an object's attribute (LiteLLM's types)."""
    if value is None:
        return None
    return value.get(name) if isinstance(value, dict) else getattr(value, name, None)


class _Deadline:
    """``asyncio.timeout`` for Python 3.10: cancels the task at the deadline and raises TimeoutError."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._expired = False
        self._handle: asyncio.TimerHandle | None = None

    def expired(self) -> bool:
        return self._expired

    async def __aenter__(self) -> "_Deadline":
        task = asyncio.current_task()
        assert task is not None

        def fire() -> None:
            self._expired = True
            task.cancel()

        self._handle = asyncio.get_running_loop().call_later(self.seconds, fire)
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._expired and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


def _deadline(seconds: float) -> Any:
    return asyncio.timeout(seconds) if hasattr(asyncio, "timeout") else _Deadline(seconds)


def status_code(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def retry_after_seconds(exc: BaseException | None) -> float | None:
    """The server's Retry-After (seconds or an HTTP date), from wherever the client kept the headers."""
    if exc is None:
        return None
    header_sets = []
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "headers", None) is not None:
        header_sets.append(response.headers)
    for attribute in ("headers", "litellm_response_headers"):
        headers = getattr(exc, attribute, None)
        if headers:
            header_sets.append(headers)
    for headers in header_sets:
        try:
            value = headers.get("retry-after") or headers.get("Retry-After")
        except AttributeError:
            continue
        if not value:
            continue
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
        except (TypeError, ValueError):
            continue
    # A litellm.Router whose deployments are all cooling down raises RouterRateLimitError (HTTP 429, no
    # headers) with the cooldown it applies: the Router's own "try again in N seconds".
    cooldown = getattr(exc, "cooldown_time", None)
    if isinstance(cooldown, (int, float)) and not isinstance(cooldown, bool) and cooldown > 0:
        return float(cooldown)
    return None


def describe(exc: BaseException) -> str:
    status = status_code(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}{f' (HTTP {status})' if status else ''}{f': {text[:300]}' if text else ''}"


_CREDENTIALS_HINT = (
    "Check the provider's credentials: its API key variable (e.g. OPENAI_API_KEY, GEMINI_API_KEY), or for "
    "Azure, Bedrock and Vertex AI the credentials their SDK finds (Azure AD, the AWS profile, gcloud's)."
)


def hint(exc: BaseException) -> str:
    status = status_code(exc)
    if status in (401, 403):
        return _CREDENTIALS_HINT
    if status == 404:
        return "Check the model name (a LiteLLM name like 'openai/gpt-4o') and the provider's *_API_BASE."
    if status == 400:
        return "The provider refused the request; check the model supports images and the prompt size."
    if status is not None and 400 <= status < 500 and status not in RETRYABLE_4XX:
        return "The provider refused the request as sent; asking again would not help."
    return "Check the provider or server is up and reachable (its *_API_BASE) and rerun: the run resumes."


def _names_a_missing_key(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "api_key" in text and ("must be set" in text or "missing" in text)


# Errors saying the credentials were refused or could not be had, by class name so that no SDK is imported
# to check (LiteLLM, OpenAI, botocore, google-auth, azure-identity), whatever status they carry: an Azure
# AD or Google token that cannot be fetched reaches us as LiteLLM's APIConnectionError (HTTP 500).
_REFUSED_CREDENTIALS = frozenset({
    "AuthenticationError", "PermissionDeniedError", "NoCredentialsError", "PartialCredentialsError",
    "DefaultCredentialsError", "RefreshError", "ClientAuthenticationError", "CredentialUnavailableError",
})
_NO_MODULE = re.compile(r"No module named '([\w.]+)'")
# The package to install for a module LiteLLM imports on a provider's first call.
_PACKAGE_OF_MODULE = {"google": "google-auth", "boto3": "boto3", "botocore": "boto3", "azure": "azure-identity"}


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it was raised from, or raised while handling and whose text it repeats
    (LiteLLM wraps a provider's error in its own and keeps its text); an error merely being handled
    nearby is not a cause."""
    text, found, current = str(exc), [exc], exc
    for _ in range(16):  # chains are short; a cycle or a runaway one ends here
        current = current.__cause__ or current.__context__
        if current is None or current in found:
            break
        if current is exc.__cause__ or (str(current) and str(current) in text):
            found.append(current)
    return found


def _missing_module(exc: BaseException) -> str | None:
    """When ``exc`` is a failed import (a package not installed: every attempt fails the same way), the
    module's name ("?" when it does not say); else None."""
    for cause in _causes(exc):
        if isinstance(cause, ImportError):
            if cause.name:
                return cause.name
            match = _NO_MODULE.search(str(cause))
            return match.group(1) if match else "?"
    # LiteLLM reports a failure before any request (an import among them) as its APIConnectionError.
    match = _NO_MODULE.search(str(exc)) if type(exc).__name__ == "APIConnectionError" else None
    return match.group(1) if match else None


def _refuses_credentials(exc: BaseException) -> bool:
    return any(kind.__name__ in _REFUSED_CREDENTIALS for cause in _causes(exc) for kind in type(cause).__mro__)


# LiteLLM's words when the provider's reply does not fit its response type (litellm_core_utils/llm_response_utils).
_INVALID_RESPONSE = "Invalid response object"


def classify_error(model: str, exc: BaseException, is_transient: Any = None) -> ModelError:
    """The error one failed attempt becomes. 4xx other than 408/409/425/429 are never worth another
    attempt (the same request gets the same refusal), nor are a package that is not installed and
    credentials refused or not found, whatever status a wrapper gives them; 408/409/425/429, 5xx,
    timeouts, dropped connections and unreadable replies are (:class:`TransientModelError`, carrying any
    Retry-After)."""
    if isinstance(exc, ModelError):
        return exc
    module = _missing_module(exc)
    if module is not None:
        package = _PACKAGE_OF_MODULE.get(module.partition(".")[0])
        install = (
            f"pip install {package}" if package
            else "install what the error names" if module == "?"
            else f"install the package that provides {module!r}"
        )
        return ModelCallError(
            f"{model}: {describe(exc)}. A Python package this provider needs is not installed: {install} (in "
            "the environment mics runs in), then rerun: the run resumes.",
            model=model,
        )
    if _refuses_credentials(exc) and status_code(exc) not in RETRYABLE_4XX:
        return ModelCallError(f"{model}: {describe(exc)}. {_CREDENTIALS_HINT}", model=model)
    if _INVALID_RESPONSE in str(exc):
        # LiteLLM could not turn the provider's reply into its own type (a usage figure it cannot read, say).
        # The reply was paid for; asking again buys the same unreadable reply.
        return ModelCallError(
            f"{model}: LiteLLM could not read the provider's reply ({describe(exc)[:300]}). It is not asked "
            "again; for an OpenAI-compatible server of your own, MICS_TRANSPORT=auto reads replies directly and "
            "keeps an unreadable usage figure as unknown.",
            model=model,
        )
    if _names_a_missing_key(exc):
        return ModelCallError(
            f"{model}: {describe(exc)}. Set the provider's API key variable (e.g. OPENAI_API_KEY), in the "
            "environment or the working folder's .env.",
            model=model,
        )
    status = status_code(exc)
    transient_status = status is not None and (status in RETRYABLE_4XX or status >= 500)
    if status is not None and not transient_status and 400 <= status < 500:
        return ModelCallError(f"{model}: {describe(exc)}. {hint(exc)}", model=model)
    if transient_status or _is_transient_type(exc) or (is_transient is not None and is_transient(exc)):
        return TransientModelError(
            describe(exc), model=model, status_code=status, retry_after=retry_after_seconds(exc), hint=hint(exc)
        )
    return ModelCallError(f"{model}: {describe(exc)}. {hint(exc)}", model=model)


def _is_transient_type(exc: BaseException) -> bool:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError, json.JSONDecodeError)):
        return True
    # An error of a client that was never imported cannot have been raised: importing one to check costs
    # ~100 ms (the direct transport's plain http:// calls use neither).
    kinds: tuple[type, ...] = ()
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        kinds += (httpx.TransportError, httpx.DecodingError)
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        kinds += (aiohttp.ClientError,)
    return bool(kinds) and isinstance(exc, kinds)
