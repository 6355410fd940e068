"""The ``direct`` transport: OpenAI-compatible chat completions sent with one aiohttp session per event
loop, for the endpoints where LiteLLM's per-call work buys nothing (``MICS_TRANSPORT=direct``).

It applies to ``hosted_vllm/`` models and ``openai/`` models pointed at a base URL of one's own (a vLLM
or other OpenAI-compatible server): standard parameters, no price, no provider quirks to translate.
LiteLLM still resolves the provider, base URL and key from its usual variables (``providers.py``); every
other model keeps going through the LiteLLM transport. Measured on 2 cores: about 0.5 ms of client CPU
per call against LiteLLM's 3 ms (benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import weakref
from dataclasses import dataclass
from typing import Any

from ..errors import MalformedReplyError
from .base import ModelRequest, ModelResponse
from .clients import register_closer
from .providers import import_litellm, resolve_api_base, token_prices
from .transport import Transport

__all__ = [
    "DirectEndpoint", "DirectTransport", "HTTPStatusError", "direct_endpoint", "post_chat_completion", "close_session",
]

_OPENAI_DEFAULT_BASE = "api.openai.com"


@dataclass(frozen=True)
class DirectEndpoint:
    url: str
    api_key: str | None
    model: str


class HTTPStatusError(Exception):
    """A non-2xx reply; ``status_code`` and ``headers`` drive the retry decision and Retry-After."""

    def __init__(self, status_code: int, headers: dict[str, str], body: str) -> None:
        super().__init__(f"HTTP {status_code}: {body[:300]}")
        self.status_code = status_code
        self.headers = headers


def direct_endpoint(model_name: str, api_base: str | None = None) -> DirectEndpoint | None:
    """Where to send ``model_name`` directly, or None when it must go through LiteLLM."""
    litellm = import_litellm()
    try:
        wire_model, provider, dynamic_key, _ = litellm.get_llm_provider(model_name)
    except Exception:
        return None
    api_base = api_base or resolve_api_base(model_name)
    if provider not in ("hosted_vllm", "openai") or not api_base:
        return None
    if provider == "openai" and _OPENAI_DEFAULT_BASE in api_base:
        return None  # the real OpenAI API: LiteLLM maps parameters for its reasoning models
    key = dynamic_key or os.environ.get(f"{provider.upper()}_API_KEY")
    return DirectEndpoint(api_base.rstrip("/") + "/chat/completions", key, wire_model)


class DirectTransport(Transport):
    """One attempt as one POST to an OpenAI-compatible server, on the loop's shared aiohttp session."""

    def __init__(self, name: str, endpoint: DirectEndpoint, *, timeout: float) -> None:
        super().__init__(name, timeout=timeout)
        self.endpoint = endpoint

    def endpoint_bases(self) -> list[str | None]:
        return [self.endpoint.url]

    async def _send(self, request: ModelRequest, timeout: float) -> ModelResponse:
        payload: dict[str, Any] = {"messages": request.openai_messages(), "temperature": request.temperature}
        if request.max_tokens is not None:
            payload["max_tokens"] = request.max_tokens
        reply = await post_chat_completion(self.endpoint, payload, timeout)
        choices = reply.get("choices") or [] if isinstance(reply, dict) else []
        message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise MalformedReplyError(f"{self.name}: reply has no text (choices={len(choices)})", model=self.name)
        usage = reply.get("usage") or {}
        input_tokens = int(usage.get("prompt_tokens") or 0)
        output_tokens = int(usage.get("completion_tokens") or 0)
        price_in, price_out = token_prices(self.name)
        return ModelResponse(
            text=text, model=self.name, input_tokens=input_tokens, output_tokens=output_tokens,
            cost_usd=input_tokens * price_in + output_tokens * price_out,
            finish_reason=choices[0].get("finish_reason"),
        )


_sessions: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]" = weakref.WeakKeyDictionary()


def _session() -> Any:
    import aiohttp

    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        # No connection cap here: the per-model and overall semaphores already bound calls in flight.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300))
        _sessions[loop] = session
    return session


async def post_chat_completion(endpoint: DirectEndpoint, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    body = json.dumps({**payload, "model": endpoint.model}, ensure_ascii=False).encode("utf-8")
    async with _session().post(
        endpoint.url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as response:
        text = await response.text()
        if response.status >= 400:
            raise HTTPStatusError(response.status, dict(response.headers), text)
    return json.loads(text)


async def close_session() -> None:
    """Close this loop's session (idempotent; the next call opens a new one). Models call it through
    :class:`~mics_agents.models.clients.ClientShare`, once no model of the loop uses the session."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    session = _sessions.pop(loop, None)
    if session is not None and not session.closed:
        await session.close()


register_closer(close_session)
