"""The HTTP clients an event loop's model calls go through, shared by reference count.

LiteLLM caches its clients for the whole process (recent versions keep one set per event loop), and the
direct transport keeps one aiohttp session per loop. Closing them while another model of the loop still
calls through them breaks that model's requests mid-flight (they fail, are retried and so sent twice);
never closing them leaves sessions to be finalised after their loop has gone ("Event loop is closed").
So every model that calls out holds a :class:`ClientShare` of its loop's clients, and the last share
released in a loop closes that loop's clients, and no others.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["ClientShare", "register_closer"]

_lock = threading.Lock()  # loops in other threads may take and release shares too
_shares_by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int]" = weakref.WeakKeyDictionary()
_shares_in_process = 0
# Transports that keep clients of their own (the direct one's aiohttp sessions) register how to close the
# running loop's: this module imports no transport.
_closers: list[Callable[[], Awaitable[None]]] = []


def register_closer(close: Callable[[], Awaitable[None]]) -> None:
    """Have ``close()`` (closing the running loop's clients of one transport) called when a loop's last
    share is released."""
    if close not in _closers:
        _closers.append(close)


class ClientShare:
    """One model's share of the HTTP clients of the running event loop. ``release()`` once, on that loop."""

    def __init__(self) -> None:
        global _shares_in_process
        self.loop = asyncio.get_running_loop()
        self._released = False
        with _lock:
            _shares_by_loop[self.loop] = _shares_by_loop.get(self.loop, 0) + 1
            _shares_in_process += 1

    async def release(self) -> None:
        """Give the share back; the last one of its loop closes the loop's clients. Idempotent."""
        global _shares_in_process
        if self._released:
            return
        self._released = True
        with _lock:
            left_in_loop = _shares_by_loop[self.loop] = _shares_by_loop[self.loop] - 1
            _shares_in_process -= 1
            left_in_process = _shares_in_process
        if left_in_loop > 0:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self.loop:
            return  # clients can only be closed on their own loop; that loop's end finalises them
        await _close_loop_clients(all_loops_idle=left_in_process == 0)


async def _close_loop_clients(*, all_loops_idle: bool) -> None:
    for close in list(_closers):
        await close()
    litellm = sys.modules.get("litellm")
    if litellm is None:
        return  # never imported, so it holds no clients
    cache = getattr(litellm, "in_memory_llm_clients_cache", None)
    cached: dict[Any, Any] = getattr(cache, "cache_dict", None) or {}
    scoped_key = getattr(cache, "update_cache_key_with_event_loop", None)
    if all_loops_idle:
        # No model in the process calls through LiteLLM now: close every client it cached, as the end of a
        # one-loop program would, so none is left bound to a loop that is about to close.
        closing = list(cached.items())
    elif callable(scoped_key):
        # Recent LiteLLM keys each client it caches by its loop ("<key>-<loop token>"): close this loop's.
        suffix = scoped_key("")
        closing = [(key, client) for key, client in list(cached.items()) if isinstance(key, str) and key.endswith(suffix)]
    else:
        return  # an older LiteLLM shares one set of clients over all loops: closed once no loop uses them
    for key, client in closing:  # a snapshot: other tasks may add clients while these close
        cache.delete_cache(key)
        await _close_client(client)
    if all_loops_idle:
        await _close_client(getattr(litellm, "base_llm_aiohttp_handler", None))


async def _close_client(client: Any) -> None:
    if client is None:
        return
    close = getattr(client, "aclose", None) or getattr(client, "close", None)
    if not callable(close):
        return
    try:
        closing = close()
        if inspect.isawaitable(closing):
            await closing
    except Exception:  # a client that fails to close is one we cannot use anyway
        pass
