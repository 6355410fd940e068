"""The LiteLLM adapter: any provider string (``openai/gpt-4o``, ``gemini/...``, ``hosted_vllm/...``) behind
:class:`~mics_agents.models.base.Model`, with retries, a per-model concurrency limit and usage.

LiteLLM takes seconds to import, so it is imported on first use; ``mics --help`` never pays for it.
Its own retries are switched off: tenacity does them here, once, with backoff, jitter and Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import weakref
from functools import lru_cache
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from ..errors import ConfigError, MalformedReplyError, ModelCallError, ModelError
from .base import Model, ModelRequest, ModelResponse, check_request_allowed
from .clients import ClientShare
from .limits import model_limit

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["LiteLLMModel", "import_litellm", "load_router", "open_models"]

# Longest Retry-After we honour; a server asking for more is treated as down.
_MAX_RETRY_AFTER = 900.0


def import_litellm() -> Any:
    """Import LiteLLM once, offline (local cost map) and quiet."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    return litellm


def load_router(config_path: Path) -> Any:
    """A ``litellm.Router`` from a YAML/JSON file with a ``model_list`` (and optional ``router_settings``)."""
    import yaml

    try:
        config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"MICS_ROUTER_CONFIG: cannot read {str(config_path)!r}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"MICS_ROUTER_CONFIG: {str(config_path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_list"), list) or not config["model_list"]:
        raise ConfigError(f"MICS_ROUTER_CONFIG: {str(config_path)!r} needs a non-empty 'model_list'")
    litellm = import_litellm()
    settings = dict(config.get("router_settings") or {})
    # Retries happen once, in LiteLLMModel; the Router only picks the deployment.
    settings["num_retries"] = 0
    return litellm.Router(model_list=config["model_list"], **settings)


def _router_deployments(router: Any) -> list[dict[str, Any]]:
    """The Router's deployments: ``router.registry().all()`` in recent LiteLLM (1.110 deprecates the
    ``model_list`` attribute), ``router.model_list`` in older ones."""
    registry = getattr(router, "registry", None)
    if callable(registry):
        return list(registry().all())
    return list(router.model_list)


def _router_model_names(router: Any) -> set[str]:
    return {deployment["model_name"] for deployment in _router_deployments(router)}


def _resolve_api_base(model: str, api_base: str | None) -> str | None:
    """The base URL LiteLLM will use for ``model``: the explicit one, else the provider's variable."""
    if api_base:
        return api_base
    litellm = import_litellm()
    try:
        _, provider, _, resolved = litellm.get_llm_provider(model)
    except Exception as exc:  # LiteLLM raises its own BadRequestError for unknown providers
        raise ConfigError(
            f"{model!r} is not a LiteLLM model name ({exc}). Use 'provider/model', "
            "e.g. 'openai/gpt-4o' or 'hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct'."
        ) from None
    prefix = provider.upper()
    resolved = resolved or os.environ.get(f"{prefix}_API_BASE") or os.environ.get(f"{prefix}_BASE_URL")
    if provider == "openai":
        resolved = resolved or os.environ.get("OPENAI_BASE_URL")
    return resolved


class _LoopHold:
    """What one model holds in one event loop: a share of the loop's HTTP clients, and its configured
    limits registered with the loop's per-model (and overall) limits."""

    def __init__(self, model_name: str, settings: "Settings") -> None:
        self.clients = ClientShare()
        self.limit = model_limit(model_name)
        self._limit_value = settings.concurrency_for(model_name)
        self.limit.register(self._limit_value)
        self._overall_value = settings.max_calls_in_flight
        self.overall = model_limit("") if self._overall_value else None
        if self.overall is not None:
            self.overall.register(self._overall_value)

    async def release(self) -> None:
        self.limit.unregister(self._limit_value)
        if self.overall is not None:
            self.overall.unregister(self._overall_value)
        await self.clients.release()


def _status_code(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, MalformedReplyError):
        return True
    if isinstance(exc, ModelError):
        return False
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError, json.JSONDecodeError)):
        return True
    litellm = import_litellm()
    if isinstance(exc, (litellm.ContextWindowExceededError, litellm.ContentPolicyViolationError)):
        return False
    if isinstance(
        exc,
        (
            litellm.RateLimitError,
            litellm.Timeout,
            litellm.APIConnectionError,
            litellm.InternalServerError,
            litellm.ServiceUnavailableError,
            litellm.BadGatewayError,
            litellm.APIResponseValidationError,
        ),
    ):
        return True
    status = _status_code(exc)
    if status is not None:
        return status in (408, 409, 425, 429) or status >= 500
    import aiohttp
    import httpx

    return isinstance(exc, (httpx.TransportError, httpx.DecodingError, aiohttp.ClientError))


def _retry_after_seconds(exc: BaseException | None) -> float | None:
    """The server's Retry-After (seconds or an HTTP date), from wherever LiteLLM kept the headers."""
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
            from datetime import datetime, timezone

            return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
        except (TypeError, ValueError):
            continue
    # A litellm.Router whose deployments are all cooling down raises RouterRateLimitError (HTTP 429, no
    # headers) with the cooldown it applies: the Router's own "try again in N seconds".
    cooldown = getattr(exc, "cooldown_time", None)
    if isinstance(cooldown, (int, float)) and not isinstance(cooldown, bool) and cooldown > 0:
        return float(cooldown)
    return None


def _describe(exc: BaseException) -> str:
    status = _status_code(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}{f' (HTTP {status})' if status else ''}: {text[:300]}"


def _hint(exc: BaseException) -> str:
    status = _status_code(exc)
    if status in (401, 403):
        return "Check the provider's API key variable (e.g. OPENAI_API_KEY, GEMINI_API_KEY)."
    if status == 404:
        return "Check the model name (a LiteLLM name like 'openai/gpt-4o') and the provider's *_API_BASE."
    if status == 400:
        return "The provider refused the request; check the model supports images and the prompt size."
    return "Check the provider or server is up and reachable (its *_API_BASE) and rerun: the run resumes."


class LiteLLMModel(Model):
    """A model reached through ``litellm.acompletion``, or through a ``litellm.Router`` when the router's
    ``model_list`` has this name."""

    def __init__(self, name: str, settings: "Settings", *, router: Any | None = None) -> None:
        self.name = name
        self.settings = settings
        self.router = router if router is not None and name in _router_model_names(router) else None
        self._api_bases: list[str | None] | None = None
        self._direct: Any = None  # the DirectEndpoint, once resolved (False: not direct)
        self._holds: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopHold]" = weakref.WeakKeyDictionary()
        try:
            # Opened inside a loop (Searcher.open): register the limit now, so that it holds from the first
            # call of any searcher, not from this model's first call.
            self._hold()
        except RuntimeError:
            pass  # built outside a loop: the first call registers it

    def _hold(self) -> _LoopHold:
        loop = asyncio.get_running_loop()
        hold = self._holds.get(loop)
        if hold is None:
            hold = self._holds[loop] = _LoopHold(self.name, self.settings)
        return hold

    def _endpoint_bases(self) -> list[str | None]:
        """Where calls of this model go, for the request policy (tests allow 127.0.0.1 only)."""
        if self._api_bases is None:
            if self.router is not None:
                self._api_bases = [
                    _resolve_api_base(params.get("model", self.name), params.get("api_base"))
                    for deployment in _router_deployments(self.router)
                    if deployment["model_name"] == self.name
                    for params in [deployment.get("litellm_params") or {}]
                ]
            else:
                self._api_bases = [_resolve_api_base(self.name, None)]
        return self._api_bases

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = _retry_after_seconds(exc)
        if retry_after is not None:
            return min(retry_after, _MAX_RETRY_AFTER)
        # Exponential backoff with full jitter, capped.
        ceiling = min(self.settings.retry_max_wait, self.settings.retry_initial_wait * 2 ** (state.attempt_number - 1))
        return random.uniform(0, ceiling)

    async def request(self, request: ModelRequest) -> ModelResponse:
        check_request_allowed(self.name, self._endpoint_bases())
        hold = self._hold()
        limit, overall = hold.limit, hold.overall
        attempts = self.settings.max_retries + 1
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=self._wait,
            retry=retry_if_exception(_is_retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    # Slots are held for the call only, not while backing off; the model's first, so a
                    # call waiting for its model never holds one of the overall slots.
                    async with limit:
                        if overall is None:
                            return await self._send(request)
                        async with overall:
                            return await self._send(request)
        except ModelError as exc:
            if isinstance(exc, MalformedReplyError):
                raise ModelCallError(
                    f"{self.name}: gave up after {attempts} attempts; last reply was malformed: {exc}. "
                    "Check the model serves chat completions.",
                    model=self.name,
                ) from exc
            raise
        except Exception as exc:
            if _is_retryable(exc):
                message = f"{self.name}: gave up after {attempts} attempts; last error {_describe(exc)}. {_hint(exc)}"
            else:
                message = f"{self.name}: {_describe(exc)}. {_hint(exc)}"
            raise ModelCallError(message, model=self.name) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _direct_endpoint(self) -> Any:
        if self._direct is None:
            self._direct = False
            if self.settings.transport == "direct" and self.router is None:
                from .direct import direct_endpoint

                self._direct = direct_endpoint(self.name, _resolve_api_base(self.name, None)) or False
        return self._direct

    async def _send_direct(self, endpoint: Any, request: ModelRequest) -> ModelResponse:
        from .direct import post_chat_completion

        payload: dict[str, Any] = {"messages": request.openai_messages(), "temperature": request.temperature}
        if request.max_tokens is not None:
            payload["max_tokens"] = request.max_tokens
        reply = await post_chat_completion(endpoint, payload, self.settings.request_timeout)
        choices = reply.get("choices") or [] if isinstance(reply, dict) else []
        message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise MalformedReplyError(f"{self.name}: reply has no text (choices={len(choices)})", model=self.name)
        usage = reply.get("usage") or {}
        input_tokens = int(usage.get("prompt_tokens") or 0)
        output_tokens = int(usage.get("completion_tokens") or 0)
        price_in, price_out = _token_prices(self.name)
        return ModelResponse(
            text=text, model=self.name, input_tokens=input_tokens, output_tokens=output_tokens,
            cost_usd=input_tokens * price_in + output_tokens * price_out,
            finish_reason=choices[0].get("finish_reason"),
        )

    async def aclose(self) -> None:
        """Take back this model's limits and its share of the HTTP clients; the loop's last model to close
        closes the loop's clients (never those other models still use). Idempotent."""
        try:
            here = self._holds.pop(asyncio.get_running_loop(), None)
        except RuntimeError:
            here = None
        elsewhere = list(self._holds.values())
        self._holds.clear()
        for hold in elsewhere:
            await hold.release()  # returns without suspending: another loop's clients are not closed here
        if here is not None:
            await here.release()

    async def _send(self, request: ModelRequest) -> ModelResponse:
        endpoint = self._direct_endpoint()
        if endpoint:
            return await self._send_direct(endpoint, request)
        litellm = import_litellm()
        arguments: dict[str, Any] = {
            "model": self.name,
            "messages": request.openai_messages(),
            "temperature": request.temperature,
            "timeout": self.settings.request_timeout,
            "num_retries": 0,
            "max_retries": 0,
        }
        if request.max_tokens is not None:
            arguments["max_tokens"] = request.max_tokens
        if self.router is not None:
            response = await self.router.acompletion(**arguments)
        else:
            response = await litellm.acompletion(**arguments)
        choices = getattr(response, "choices", None) or []
        message = getattr(choices[0], "message", None) if choices else None
        text = getattr(message, "content", None) if message is not None else None
        if not isinstance(text, str) or not text.strip():
            raise MalformedReplyError(f"{self.name}: reply has no text (choices={len(choices)})", model=self.name)
        usage = getattr(response, "usage", None)
        return ModelResponse(
            text=text,
            model=self.name,
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            cost_usd=_cost_of(litellm, response),
            finish_reason=getattr(choices[0], "finish_reason", None),
        )


@lru_cache(maxsize=256)
def _token_prices(model_name: str) -> tuple[float, float]:
    """USD per input and per output token from LiteLLM's price table; (0, 0) for unpriced models."""
    litellm = import_litellm()
    try:
        price_in = litellm.cost_per_token(model=model_name, prompt_tokens=1, completion_tokens=0)[0]
        price_out = litellm.cost_per_token(model=model_name, prompt_tokens=0, completion_tokens=1)[1]
        return float(price_in), float(price_out)
    except Exception:
        return 0.0, 0.0


def _cost_of(litellm: Any, response: Any) -> float:
    """LiteLLM prices the response while handling it (``_hidden_params["response_cost"]``; None for a model
    without a price, e.g. local vLLM): use that rather than pricing it a second time."""
    hidden = getattr(response, "_hidden_params", None) or {}
    if isinstance(hidden, dict) and "response_cost" in hidden:
        return float(hidden["response_cost"] or 0.0)
    try:
        return float(litellm.completion_cost(completion_response=response) or 0.0)
    except Exception:  # models without a price cost nothing we can know
        return 0.0


def open_models(names: list[str], settings: "Settings", store: Any = None, *, run_id: str | None = None) -> list[Model]:
    """LiteLLM models for these names (through the Router config if set), cached in ``store`` if given."""
    from .cached import CachedModel

    router = load_router(settings.router_config) if settings.router_config else None
    models: list[Model] = [LiteLLMModel(name, settings, router=router) for name in names]
    if store is not None:
        models = [CachedModel(model, store, run_id=run_id) for model in models]
    return models
