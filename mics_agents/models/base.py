"""The model boundary: one request type, one response type, one abstract async method.

Everything that talks to a model implements :class:`Model`: the transports (LiteLLM, the direct HTTP
client), the test doubles, and the wrappers that take a model and are one (:class:`WrapperModel`:
retrying, limiting, validating, caching). ``models/factory.py`` stacks them.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Union

from ..errors import ModelRequestsForbidden

__all__ = [
    "ImagePart",
    "TextPart",
    "ChatMessage",
    "ModelRequest",
    "ModelResponse",
    "Model",
    "WrapperModel",
    "AroundEachCall",
    "RequestPolicy",
    "set_request_policy",
    "request_policy",
    "case_affinity",
    "affinity_key",
    "gather_all",
]


@dataclass(frozen=True, slots=True)
class TextPart:
    """A piece of text in a message."""

    text: str


@dataclass(frozen=True, slots=True, eq=False)
class ImagePart:
    """An encoded image: the bytes sent, and their sha256. Equality uses that hash, never the bytes.

    ``label`` says where it came from (a path as given, or ``<bytes>``) for records and messages.
    ``key_sha256`` is what the cache key holds for it: the sha256 of the original file's bytes and the
    resize settings, so the key does not change with the Pillow/zlib/libjpeg build that re-encoded it.
    Empty when the bytes are sent as they were read (then it is ``sha256``).
    """

    data: bytes = field(repr=False)
    mime: str
    sha256: str
    label: str = ""
    key_sha256: str = ""
    _data_url: str | None = field(default=None, repr=False)
    _json_part: bytes | None = field(default=None, repr=False)
    # Content parts naming this image's file in a media folder (media.py), by folder: made once per folder.
    _reference_parts: dict[str, bytes] | None = field(default=None, repr=False)

    @property
    def cache_id(self) -> str:
        """The image's part of a cache key."""
        return self.key_sha256 or self.sha256

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImagePart) and other.sha256 == self.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    def data_url(self) -> str:
        """The base64 data URL, encoded once: every mentor and intern call of a case sends the same image."""
        if self._data_url is None:
            encoded = base64.b64encode(self.data).decode("ascii")
            object.__setattr__(self, "_data_url", f"data:{self.mime};base64,{encoded}")
        return self._data_url  # type: ignore[return-value]

    def json_part(self) -> bytes:
        """This image's OpenAI content part as JSON bytes, encoded once: the direct transport splices it into
        every request body, so a call never serialises the image again (base64 needs no JSON escaping)."""
        if self._json_part is None:
            url = self.data_url().encode("ascii")
            object.__setattr__(self, "_json_part", b'{"type":"image_url","image_url":{"url":"' + url + b'"}}')
        return self._json_part  # type: ignore[return-value]

    def json_part_ready(self) -> bool:
        """Whether the JSON content part (its data URL) is already encoded, so using it costs no work."""
        return self._json_part is not None

    def reference_part(self, folder: str) -> bytes | None:
        """This image's content part naming its file in media folder ``folder``, once
        :class:`~mics_agents.media.MediaFolder` has written the file and kept the part here; else None."""
        parts = self._reference_parts
        return None if parts is None else parts.get(folder)

    def keep_reference_part(self, folder: str, part: bytes) -> None:
        """Remember the content part naming this image's file in media folder ``folder`` (called by
        :class:`~mics_agents.media.MediaFolder` once the file is written)."""
        if self._reference_parts is None:
            object.__setattr__(self, "_reference_parts", {})
        self._reference_parts[folder] = part  # type: ignore[index]


Part = Union[TextPart, ImagePart]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation: a role and its parts (text and images, in order)."""

    role: Literal["system", "user", "assistant"]
    parts: tuple[Part, ...]

    @classmethod
    def text(cls, role: Literal["system", "user", "assistant"], text: str) -> "ChatMessage":
        """A message of one text part."""
        return cls(role, (TextPart(text),))

    def plain_text(self) -> str:
        """The message's text parts joined by newlines (its images left out)."""
        return "\n".join(part.text for part in self.parts if isinstance(part, TextPart))

    def images(self) -> list[ImagePart]:
        """The message's image parts, in order."""
        return [part for part in self.parts if isinstance(part, ImagePart)]


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """One call. ``sample_index`` tells identical sampled calls apart; ``attempt`` counts re-asks after
    an unparsable reply; ``prompt_version`` changes when a template changes. All are part of the cache key;
    ``validate`` and ``timeout`` are not."""

    messages: tuple[ChatMessage, ...]
    temperature: float
    max_tokens: int | None = None
    sample_index: int = 0
    attempt: int = 0
    prompt_version: str = ""
    # Checked before a reply is cached (raise MalformedReplyError to refuse it): an unusable reply is
    # never stored, so a rerun asks again. Not part of the key.
    validate: Callable[[str], object] | None = field(default=None, compare=False)
    # Seconds one attempt may take in all (connect, send, the whole reply), on every transport; None: the
    # transport's default (MICS_REQUEST_TIMEOUT). Set by the role: mentors get longer than interns.
    timeout: float | None = field(default=None, compare=False)

    def key_payload(self, model_name: str, *, namespace: str = "", legacy_images: bool = False) -> dict[str, Any]:
        """What identifies this call: images by content hash, no credentials, no base URL. ``namespace``
        (empty: none, as in keys written before namespaces existed) separates a changed model served under
        the same name; ``legacy_images`` keys images by the hash of the bytes sent, as earlier versions
        did (the cache's fallback lookup, so entries they wrote are still found)."""
        payload: dict[str, Any] = {
            "model": model_name,
            "messages": [
                {
                    "role": message.role,
                    "content": [
                        {"text": part.text}
                        if isinstance(part, TextPart)
                        else {"image_sha256": part.sha256 if legacy_images else part.cache_id}
                        for part in message.parts
                    ],
                }
                for message in self.messages
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "sample_index": self.sample_index,
            "attempt": self.attempt,
            "prompt_version": self.prompt_version,
        }
        if namespace:
            payload["namespace"] = namespace
        return payload

    def cache_key(self, model_name: str, *, namespace: str = "", legacy_images: bool = False) -> str:
        """The sha256 of the request's canonical JSON for ``model_name``: what the cache stores the reply
        under. Images enter as hashes of the prepared image (never a URL), so a data URL and a ``file://``
        reference to the same bytes share a key; ``namespace`` separates a changed model served under the
        same name; ``legacy_images`` gives the key older versions wrote for a resized image."""
        payload = self.key_payload(model_name, namespace=namespace, legacy_images=legacy_images)
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def has_legacy_image_key(self) -> bool:
        """Whether an image's key differs from the hash of its bytes (a resized image): only then can an
        entry written by an older version sit under another key."""
        return any(
            isinstance(part, ImagePart) and part.cache_id != part.sha256
            for message in self.messages
            for part in message.parts
        )

    def openai_messages(self) -> list[dict[str, Any]]:
        """The OpenAI chat format LiteLLM takes; images as base64 data URLs."""
        converted: list[dict[str, Any]] = []
        for message in self.messages:
            if all(isinstance(part, TextPart) for part in message.parts):
                converted.append({"role": message.role, "content": message.plain_text()})
                continue
            content = [
                {"type": "text", "text": part.text}
                if isinstance(part, TextPart)
                else {"type": "image_url", "image_url": {"url": part.data_url()}}
                for part in message.parts
            ]
            converted.append({"role": message.role, "content": content})
        return converted


@dataclass(frozen=True, slots=True)
class ModelResponse:
    """A model's reply: its text, the model that wrote it, token counts and cost (0 when unknown), whether
    the cache answered, why generation stopped, and transport details in ``extra``."""

    text: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False
    # Why generation stopped, as the API says it ("stop", "length", ...); None when it did not say.
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Model(ABC):
    """A named model that answers :class:`ModelRequest`s."""

    name: str

    @abstractmethod
    async def request(self, request: ModelRequest) -> ModelResponse:
        """Answer one request, or raise :class:`~mics_agents.errors.ModelCallError`."""

    async def request_samples(self, request: ModelRequest, sample_indices: Sequence[int]) -> list[ModelResponse]:
        """Replies to ``request`` sampled at each of ``sample_indices`` (its ``sample_index`` replaced), in
        that order. Here: one request per sample, all at once; every sibling is let finish before the first
        error is raised, so paid replies reach the cache. A transport whose endpoint takes ``n`` sends one
        request for them all (:class:`~.transport.Transport`)."""
        if len(sample_indices) == 1:  # the usual case (one sample per temperature): no task to start
            index = sample_indices[0]
            return [await self.request(request if request.sample_index == index else replace(request, sample_index=index))]
        return await gather_all([self.request(replace(request, sample_index=index)) for index in sample_indices])

    @property
    def sends_samples_together(self) -> bool:
        """Whether :meth:`request_samples` sends its samples as one request (``n``), holding one slot."""
        return False

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources (clients, connections). Most models hold none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class WrapperModel(Model):
    """A model around another one, with its name; closing it closes the inner model.

    :meth:`request_samples` goes through :meth:`request` once per sample, as for any model, so a wrapper
    that only overrides :meth:`request` is never bypassed. A wrapper that can hand the samples on as one
    call sets ``passes_samples_on`` and overrides :meth:`request_samples` too (limiting, retrying,
    validating and caching do)."""

    passes_samples_on: bool = False

    def __init__(self, inner: Model) -> None:
        self.inner = inner
        self.name = inner.name

    @property
    def sends_samples_together(self) -> bool:
        return self.passes_samples_on and self.inner.sends_samples_together

    async def request(self, request: ModelRequest) -> ModelResponse:
        return await self.inner.request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


async def gather_all(awaitables: "Sequence[Any]") -> list[Any]:
    """Run all at once and let all finish, then raise the first error (in the order given).

    Letting the siblings of a failed call finish means their (paid) replies reach the cache and are not
    bought again when the item is retried."""
    if len(awaitables) == 1:
        return [await awaitables[0]]
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)


class AroundEachCall(WrapperModel):
    """A wrapper that does one thing around every request it sends on (:meth:`around`): a single call, or
    the samples of one call sent together as one request with ``n`` (samples sent one by one are each a
    call of their own here too). The limiting and retrying wrappers are such."""

    passes_samples_on = True

    async def around(self, send: Callable[[], Any]) -> Any:
        """Send (``await send()``) with this wrapper's work around it."""
        raise NotImplementedError

    async def request(self, request: ModelRequest) -> ModelResponse:
        return await self.around(lambda: self.inner.request(request))

    async def request_samples(self, request: ModelRequest, sample_indices: Sequence[int]) -> list[ModelResponse]:
        if not self.sends_samples_together:
            return await super().request_samples(request, sample_indices)
        return await self.around(lambda: self.inner.request_samples(request, sample_indices))


RequestPolicy = Literal["allow", "local-only", "deny"]
_policy: RequestPolicy = "allow"


def set_request_policy(policy: RequestPolicy) -> RequestPolicy:
    """Switch real model requests on (``allow``), to 127.0.0.1/localhost only (``local-only``), or off.

    The test suite sets ``local-only`` so that no test can reach a real provider. Returns the old policy.
    """
    global _policy
    if policy not in ("allow", "local-only", "deny"):
        raise ValueError(f"unknown request policy {policy!r}")
    previous, _policy = _policy, policy
    return previous


def request_policy() -> RequestPolicy:
    """The policy in effect for real model requests (see :func:`set_request_policy`)."""
    return _policy


def check_request_allowed(model_name: str, api_bases: list[str | None]) -> None:
    """Raise :class:`ModelRequestsForbidden` when the policy does not allow reaching these endpoints."""
    if _policy == "allow":
        return
    if _policy == "deny":
        raise ModelRequestsForbidden(
            f"Real model requests are switched off, but {model_name!r} was called. "
            "Use a test model, or call set_request_policy('allow').",
            model=model_name,
        )
    from urllib.parse import urlparse

    for base in api_bases:
        host = urlparse(base).hostname if base else None
        if host not in {"127.0.0.1", "localhost", "::1"}:
            raise ModelRequestsForbidden(
                f"Only local model servers may be called now, but {model_name!r} would go to "
                f"{base or 'its provider default (a remote API)'}. Point its *_API_BASE at 127.0.0.1.",
                model=model_name,
            )


_case_affinity: "contextvars.ContextVar[str | None]" = contextvars.ContextVar("mics_case_affinity", default=None)


@contextmanager
def case_affinity(case_id: str) -> Iterator[None]:
    """Calls made inside (and in tasks started inside) belong to case ``case_id``: a transport with several
    replicas of a model sends them all to one, whose prefix cache then holds the case's images and question."""
    token = _case_affinity.set(case_id)
    try:
        yield
    finally:
        _case_affinity.reset(token)


def affinity_key(request: ModelRequest) -> str:
    """What a request's replica is chosen by: its case (:func:`case_affinity`), else its images, else its
    first message's text."""
    case = _case_affinity.get()
    if case is not None:
        return "case:" + case
    images = [part.cache_id for message in request.messages for part in message.parts if isinstance(part, ImagePart)]
    if images:
        return "images:" + ",".join(images)
    return "text:" + (request.messages[0].plain_text()[:2000] if request.messages else "")
