"""Test doubles behind the same :class:`Model` protocol: no network, fully scripted, every request recorded."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Union

from ..errors import ModelCallError
from .base import Model, ModelRequest, ModelResponse

__all__ = ["FunctionModel", "ScriptedModel"]

Reply = Union[str, ModelResponse]
ReplyFunction = Callable[[ModelRequest], Union[Reply, Awaitable[Reply]]]


class FunctionModel(Model):
    """Answers each request with ``function(request)`` (sync or async). Raise an exception to fail.

    Every request is kept in :attr:`requests` so tests can assert what a role was shown.
    """

    def __init__(self, name: str, function: ReplyFunction, *, delay: float = 0.0) -> None:
        self.name = name
        self.function = function
        self.delay = delay
        self.requests: list[ModelRequest] = []

    async def request(self, request: ModelRequest) -> ModelResponse:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        reply = self.function(request)
        if inspect.isawaitable(reply):
            reply = await reply
        if isinstance(reply, ModelResponse):
            return reply
        return ModelResponse(text=reply, model=self.name, input_tokens=len(request.messages), output_tokens=1)


class ScriptedModel(FunctionModel):
    """Gives its replies in order, one per request; running out is a test bug and fails loudly."""

    def __init__(self, name: str, replies: Iterable[Reply], *, delay: float = 0.0) -> None:
        self._replies = list(replies)
        self._position = 0
        super().__init__(name, self._next, delay=delay)

    def _next(self, request: ModelRequest) -> Reply:
        if self._position >= len(self._replies):
            raise ModelCallError(f"ScriptedModel {self.name!r} ran out of replies", model=self.name)
        reply = self._replies[self._position]
        self._position += 1
        return reply
