"""The ``direct`` transport: OpenAI-compatible chat completions sent with one aiohttp session per event
loop, for the endpoints where LiteLLM's per-call work buys nothing (``MICS_TRANSPORT=direct``).

It applies to ``hosted_vllm/`` models and ``openai/`` models pointed at a base URL of one's own (a vLLM
or other OpenAI-compatible server): standard parameters, no price, no provider quirks to translate.
LiteLLM still resolves the provider, base URL and key from its usual variables; every other model
keeps going through ``litellm.acompletion``. Measured on 2 cores: about 0.5 ms of client CPU per call
against LiteLLM's 3 ms (benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import weakref
from dataclasses import dataclass
from typing import Any

__all__ = ["DirectEndpoint", "HTTPStatusError", "direct_endpoint", "post_chat_completion", "close_session"]

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


def direct_endpoint(model_name: str, api_base: str | None) -> DirectEndpoint | None:
    """Where to send ``model_name`` directly, or None when it must go through LiteLLM."""
    from .litellm_model import import_litellm

    litellm = import_litellm()
    try:
        wire_model, provider, dynamic_key, _ = litellm.get_llm_provider(model_name)
    except Exception:
        return None
    if provider not in ("hosted_vllm", "openai") or not api_base:
        return None
    if provider == "openai" and _OPENAI_DEFAULT_BASE in api_base:
        return None  # the real OpenAI API: LiteLLM maps parameters for its reasoning models
    key = dynamic_key or os.environ.get(f"{provider.upper()}_API_KEY")
    return DirectEndpoint(api_base.rstrip("/") + "/chat/completions", key, wire_model)


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
