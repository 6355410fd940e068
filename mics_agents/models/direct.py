"""The direct transport: OpenAI-compatible chat completions sent with one aiohttp session per event
loop, for the endpoints where LiteLLM's per-call work buys nothing (``MICS_TRANSPORT=auto``, the default).

It applies to ``hosted_vllm/`` models and ``openai/`` models on a base URL other than OpenAI's own API (a
vLLM or other OpenAI-compatible server): standard parameters, no provider quirks to translate, prices from
``MICS_PRICES``, else LiteLLM's table (``providers.listed_prices``), else 0. The base URL and key come from LiteLLM's usual variables, read without importing
it (``providers.direct_target``); every other model keeps going through the LiteLLM transport. Measured on 2 cores: about 0.5 ms of client CPU
per call against LiteLLM's 3 ms (benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache, partial
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, TransientModelError
from .http11 import Target as _Http11Target, post as _http11_post, target_of as _http11_target_of
from .http11 import close_pool as _close_http11_pool
from .base import ImagePart, ModelRequest, ModelResponse, TextPart, affinity_key
from .clients import register_closer
from .providers import direct_deployments, direct_target, written_deployments
from .transport import Transport, choice_responses

if TYPE_CHECKING:
    from ..media import MediaFolder

__all__ = [
    "DirectEndpoint", "DirectTransport", "HTTPStatusError", "direct_endpoint", "direct_replicas", "post_chat_completion", "request_body", "request_pieces", "close_session",
]

# A new case makes its home on a replica holding fewer than this many times its share of the calls in flight.
LOAD_BOUND = 1.25
# Homes remembered (the most recently used): far more than the cases of a run in flight at once.
HOMES_KEPT = 50_000


def home_key(key: str) -> bytes:
    """What a case's home is remembered under: a hash of its affinity key (keys can be 2,000 characters)."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


@dataclass(frozen=True)
class DirectEndpoint:
    url: str
    api_key: str | None
    model: str
    max_parallel: int | None = None  # calls in flight to this endpoint at most (the Router's max_parallel_requests)
    provider: str = ""  # "hosted_vllm" or "openai": MICS_MEDIA_DIR applies to hosted_vllm/ endpoints only
    # The media folder this server reads images from by file:// URL (its deployment's model_info.media_dir);
    # ``media_declared`` with no folder: the deployment says it reads none, whatever MICS_MEDIA_DIR says.
    media: "MediaFolder | None" = None
    media_declared: bool = False


class HTTPStatusError(Exception):
    """A non-2xx reply; ``status_code`` and ``headers`` drive the retry decision and Retry-After."""

    def __init__(self, status_code: int, headers: dict[str, str], body: str) -> None:
        super().__init__(f"HTTP {status_code}: {body[:300]}")
        self.status_code = status_code
        self.headers = headers


def direct_replicas(router: Any, name: str) -> list[DirectEndpoint] | None:
    """The endpoints of a Router name's deployments when every one takes the request unchanged
    (:func:`~.providers.direct_deployments`), else None (the Router sends them)."""
    targets = direct_deployments(router, name)
    if targets is None:
        return None
    # The same deployments, in the same order, as direct_deployments read them (as the file wrote them).
    deployments = written_deployments(router, name)
    endpoints = []
    for (wire, base, key, parallel), deployment in zip(targets, deployments):
        provider = str((deployment.get("litellm_params") or {}).get("model", "")).partition("/")[0]
        info = deployment.get("model_info")
        declared = isinstance(info, dict) and "media_dir" in info
        media = _declared_media(name, info["media_dir"]) if declared else None  # type: ignore[index]
        endpoints.append(DirectEndpoint(base.rstrip("/") + "/chat/completions", key, wire, parallel, provider,
                                        media, declared))
    return endpoints


def _declared_media(name: str, value: Any) -> "MediaFolder | None":
    """A deployment's ``model_info.media_dir``: an absolute folder, or null/false/"" for none."""
    if value is None or value is False or value == "":
        return None
    if not isinstance(value, str) or not os.path.isabs(os.path.expanduser(value)):
        raise ConfigError(
            f"MICS_ROUTER_CONFIG: model_info.media_dir of {name!r} must be the absolute path of the folder its "
            f"server reads images from (its --allowed-local-media-path), or null; not {value!r}"
        )
    from ..media import MediaFolder

    return MediaFolder(value)


def direct_endpoint(model_name: str) -> DirectEndpoint | None:
    """Where to send ``model_name`` directly, or None when it must go through LiteLLM
    (:func:`~.providers.direct_target`; LiteLLM is not imported)."""
    target = direct_target(model_name)
    if target is None:
        return None
    wire_model, api_base, key = target
    return DirectEndpoint(api_base.rstrip("/") + "/chat/completions", key, wire_model,
                          provider=model_name.partition("/")[0])


class DirectTransport(Transport):
    """One attempt as one POST to an OpenAI-compatible server, on the loop's shared aiohttp session.

    With several replicas (a Router config's deployments of one name), every call of one case goes to the
    same replica, so vLLM's prefix cache holds the case's images and question (:meth:`pick`: rendezvous
    hashing of the case, :func:`~.base.affinity_key`, with bounded loads), skipping one that failed in the
    last ``cooldown`` seconds (a 429, a 5xx, a dropped connection), as the Router would.

    A replica that reads a media folder (its deployment's ``model_info.media_dir``; for ``hosted_vllm/`` ones
    that declare nothing, ``media_dir``: MICS_MEDIA_DIR) is sent its images as ``file://`` URLs to files
    written there (:class:`~mics_agents.media.MediaFolder`); every other one gets data URLs."""

    def __init__(
        self,
        name: str,
        endpoint: DirectEndpoint | list[DirectEndpoint],
        *,
        timeout: float,
        prices: tuple[float, float] | None = None,
        cooldown: float = 5.0,
        allowed_fails: int = 3,
        media_dir: "str | os.PathLike[str] | None" = None,
        price_lookup: "Callable[[], tuple[float, float] | None] | None" = None,
    ) -> None:
        super().__init__(name, timeout=timeout)
        self.replicas = list(endpoint) if isinstance(endpoint, list) else [endpoint]
        self.endpoint = self.replicas[0]
        default_media = None
        if media_dir:
            from ..media import MediaFolder

            default_media = MediaFolder(media_dir)
        # Each replica's media folder (None: it is sent data URLs).
        self.media = [
            replica.media if replica.media_declared else default_media if replica.provider == "hosted_vllm" else None
            for replica in self.replicas
        ]
        self._media_failing: set[str] = set()  # folders a write failed in (warned about once)
        # Image files being written (folder, image hash) -> the write: calls of one case sent at once wait for
        # the one write of each image instead of each writing (or reading back) it in a thread of its own.
        self._writing: dict[tuple[str, str], "asyncio.Future[Any]"] = {}
        # USD per input and output token (MICS_PRICES), else what ``price_lookup`` finds when a reply first
        # needs it (LiteLLM's table: ~30 ms to read, not spent before the first request); a server of one's
        # own costs nothing we can know.
        self._prices = prices
        self._price_lookup = None if prices else price_lookup
        self.cooldown = cooldown
        self.allowed_fails = allowed_fails  # per replica per minute before it cools down (a 429: at once)
        self._cooling_until: dict[int, float] = {}
        self._in_flight = [0] * len(self.replicas)  # calls sent to each replica and not yet answered
        self._homes: OrderedDict[bytes, int] = OrderedDict()  # affinity key's hash -> its replica, most recent last
        self._slots: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, asyncio.Semaphore]]" = (
            weakref.WeakKeyDictionary()
        )
        # The replica each task's request is with (set once it holds its slot), for a deadline that ends it.
        self._sending: "weakref.WeakKeyDictionary[asyncio.Task[Any], int]" = weakref.WeakKeyDictionary()
        self._fails: dict[int, list[float]] = {}

    @property
    def prices(self) -> tuple[float, float]:
        if self._price_lookup is not None:
            lookup, self._price_lookup = self._price_lookup, None
            self._prices = lookup()
        return self._prices or (0.0, 0.0)

    @prices.setter
    def prices(self, value: tuple[float, float] | None) -> None:
        self._prices, self._price_lookup = value, None

    def endpoint_bases(self) -> list[str | None]:
        return [replica.url for replica in self.replicas]

    def pick(self, key: str) -> int:
        """The replica (its index) for affinity key ``key``: the case's home replica, and while that one cools
        down, the next in the case's order that does not (the home is kept for when it is back).

        A case's order over the replicas is by the hash of (key, replica) (rendezvous hashing). Its home is
        chosen at its first call: the first in its order holding fewer than ``LOAD_BOUND`` times its share of
        the calls in flight (hashing with bounded loads: new cases go around a busy replica, and every later
        call of a case goes home whatever the load, so its prefix stays in one cache). When every replica
        is cooling down, a transient error carrying the time until the first is back."""
        if len(self.replicas) == 1:
            return 0
        now = time.monotonic()
        usable = [index for index in self._order(key) if self._cooling_until.get(index, 0.0) <= now]
        if not usable:
            wait = min(self._cooling_until.values()) - now
            # Every replica is cooling down: wait as the Router would (its RouterRateLimitError), not hammer one.
            raise TransientModelError(
                # No status: it is our own cooldown, not the server's 429, so the adaptive limit stays as it is.
                f"all {len(self.replicas)} replicas are cooling down after failures", model=self.name,
                retry_after=max(0.0, wait),
                hint="Check the servers behind this name are up (the Router config's model_list).",
            )
        remembered = home_key(key)
        home = self._homes.get(remembered)
        if home is None:
            bound = math.ceil(LOAD_BOUND * (sum(self._in_flight[index] for index in usable) + 1) / len(usable))
            home = self._homes[remembered] = next(index for index in usable if self._in_flight[index] < bound)
            if len(self._homes) > HOMES_KEPT:
                self._homes.popitem(last=False)
        self._homes.move_to_end(remembered)
        return home if home in usable else usable[0]

    def _slot(self, replica: int) -> Any:
        """One of the replica's ``max_parallel`` slots (a call waits for its home rather than leave it), or
        nothing to wait for. Per event loop, as asyncio's semaphores are."""
        limit = self.replicas[replica].max_parallel
        if limit is None:
            return contextlib.nullcontext()
        slots = self._slots.setdefault(asyncio.get_running_loop(), {})
        if replica not in slots:
            slots[replica] = asyncio.Semaphore(limit)
        return slots[replica]

    def _order(self, key: str) -> list[int]:
        return sorted(
            range(len(self.replicas)),
            key=lambda index: hashlib.blake2b(f"{key}\0{self.replicas[index].url}".encode(), digest_size=8).digest(),
            reverse=True,
        )

    def _deadline_passed(self) -> None:
        """The attempt's deadline ended it while its request was with a replica: a failure of that replica,
        as a timeout is for the Router (a hung replica cools down, and the retry goes to another)."""
        replica = self._sending.pop(asyncio.current_task(), None)
        if replica is not None and len(self.replicas) > 1:
            self._failed(replica, TimeoutError())

    def _failed(self, replica: int, exc: BaseException) -> None:
        now = time.monotonic()
        fails = [at for at in self._fails.get(replica, []) if now - at < 60.0] + [now]
        too_many = isinstance(exc, HTTPStatusError) and exc.status_code == 429 or len(fails) > self.allowed_fails
        if too_many:
            self._cooling_until[replica] = now + self.cooldown
            fails = []
        self._fails[replica] = fails

    async def _send(self, request: ModelRequest, timeout: float) -> ModelResponse:
        return (await self._post(request, 1, timeout))[0]

    def _pieces(self, request: ModelRequest, wire_model: str, extra: dict[str, Any], media: "MediaFolder | None") -> list[bytes]:
        """:func:`request_pieces`, writing images into ``media`` (blocking). A folder that cannot be written
        (full, not writable) costs the call its files, not its answer: it is sent data URLs, with a warning."""
        if media is not None:
            try:
                return request_pieces(request, wire_model, extra, media)
            except OSError as exc:
                if media.key not in self._media_failing:
                    self._media_failing.add(media.key)
                    logging.getLogger("mics_agents").warning(
                        "%s: cannot write images into the media folder %s (%s); sending them as data URLs until "
                        "it can be written", self.name, media.key, exc.strerror or exc,
                    )
        return request_pieces(request, wire_model, extra)

    @staticmethod
    def _written_already(request: ModelRequest, media: "MediaFolder") -> bool:
        return all(media.ready(part) for message in request.messages for part in message.parts
                   if isinstance(part, ImagePart))

    async def _write_images(self, request: ModelRequest, media: "MediaFolder") -> "MediaFolder | None":
        """Write the request's images not yet in ``media`` (each once, in a worker thread, however many calls
        ask at once); ``media``, or None when the folder cannot be written (the call is sent data URLs, with a
        warning, as :meth:`_pieces` does)."""
        writes = []
        for message in request.messages:
            for part in message.parts:
                if isinstance(part, ImagePart) and not media.ready(part):
                    key = (media.key, part.sha256)
                    write = self._writing.get(key)
                    if write is None:
                        write = self._writing[key] = asyncio.ensure_future(asyncio.to_thread(media.json_part, part))
                        write.add_done_callback(partial(self._written, key))
                    writes.append(write)
        try:
            # Shielded: a call cancelled meanwhile leaves the write to the others waiting for it.
            await asyncio.gather(*(asyncio.shield(write) for write in dict.fromkeys(writes)))
        except OSError as exc:
            if media.key not in self._media_failing:
                self._media_failing.add(media.key)
                logging.getLogger("mics_agents").warning(
                    "%s: cannot write images into the media folder %s (%s); sending them as data URLs until "
                    "it can be written", self.name, media.key, exc.strerror or exc,
                )
            return None
        return media

    def _written(self, key: tuple[str, str], write: "asyncio.Future[Any]") -> None:
        self._writing.pop(key, None)
        if not write.cancelled():
            write.exception()  # retrieved: every call that waited for it has seen it

    async def _send_samples(self, request: ModelRequest, count: int, timeout: float) -> list[ModelResponse]:
        return await self._post(request, count, timeout)

    async def _post(self, request: ModelRequest, count: int, timeout: float) -> list[ModelResponse]:
        """One POST asking for ``count`` choices (``n``, sent only above 1); the replies in choice order."""
        extra: dict[str, Any] = {"temperature": request.temperature}
        if request.max_tokens is not None:
            extra["max_tokens"] = request.max_tokens
        if count > 1:
            extra["n"] = count
        replica = self.pick(affinity_key(request)) if len(self.replicas) > 1 else 0
        wire_model = self.replicas[replica].model
        media = self.media[replica]
        self._in_flight[replica] += 1  # counted from the choice on, so a case choosing meanwhile sees it
        try:
            if media is not None and not self._written_already(request, media):
                media = await self._write_images(request, media)
            if _needs_a_thread(request, media):
                body = await asyncio.to_thread(self._pieces, request, wire_model, extra, media)
            else:
                body = request_pieces(request, wire_model, extra, media)
            task = asyncio.current_task()
            try:
                async with self._slot(replica):
                    # From here a deadline is this replica's doing (not the queue's): see _deadline_passed.
                    self._sending[task] = replica
                    # The attempt's deadline (Transport._attempt) ends it: no second timer of the client's own.
                    under_deadline = _UNDER_ATTEMPT_DEADLINE.set(True)
                    try:
                        reply = await post_chat_completion(self.replicas[replica], body, timeout)
                    finally:
                        _UNDER_ATTEMPT_DEADLINE.reset(under_deadline)
                    del self._sending[task]
            except asyncio.CancelledError:
                raise  # the transport's own deadline, or the caller: _deadline_passed tells them apart
            except BaseException as exc:
                self._sending.pop(task, None)
                if len(self.replicas) > 1 and _cools_down(exc):
                    self._failed(replica, exc)
                raise
        finally:
            self._in_flight[replica] -= 1
        choices = reply.get("choices") or [] if isinstance(reply, dict) else []
        usage = reply.get("usage") if isinstance(reply, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        price_in, price_out = self.prices
        return choice_responses(
            self.name, choices, count,
            input_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens"),
            price=lambda tokens_in, tokens_out: tokens_in * price_in + tokens_out * price_out,
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


# Bodies with more image bytes than this, or with an image not yet base64-encoded, are assembled in a worker
# thread: a copy of megabytes (or a first encoding) would otherwise hold up every other call on the loop.
OFF_LOOP_IMAGE_BYTES = 4 * 1024 * 1024


def _cools_down(exc: BaseException) -> bool:
    """A failure that says this replica is overloaded or gone (the next calls go elsewhere for a while)."""
    if isinstance(exc, HTTPStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, (OSError, asyncio.TimeoutError, TimeoutError)) or (
        type(exc).__module__.startswith("aiohttp")
    )


def _needs_a_thread(request: ModelRequest, media: "MediaFolder | None" = None) -> bool:
    images = [part for message in request.messages for part in message.parts if isinstance(part, ImagePart)]
    if not images:
        return False
    if media is not None:  # a file to write (once per image); the body itself is small
        return not all(media.ready(image) for image in images)
    return any(not image.json_part_ready() for image in images) or sum(len(image.data) for image in images) * 4 // 3 > OFF_LOOP_IMAGE_BYTES


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# json.encoder's own string quoting (C): the JSON json.dumps(text, ensure_ascii=False) gives, a tenth of its cost.
_quoted = json.encoder.encode_basestring  # type: ignore[attr-defined]
_ROLE_PIECES = {role: b'{"role":"' + role.encode() + b'","content":' for role in ("system", "user", "assistant")}


def _dumps(value: Any) -> bytes:
    if type(value) is str:
        return _quoted(value).encode("utf-8")
    return _ENCODER.encode(value).encode("utf-8")


@lru_cache(maxsize=256)
def _model_piece(wire_model: str) -> bytes:
    return b'{"model":' + _dumps(wire_model) + b',"messages":['


def request_body(
    request: ModelRequest, wire_model: str, extra: dict[str, Any], media: "MediaFolder | None" = None
) -> bytes:
    """The JSON body of the OpenAI chat request: the same JSON as ``{"model", "messages", **extra}``, with
    each image's content part spliced in as the bytes it was encoded to once (:meth:`ImagePart.json_part`),
    or, given a media folder, its part naming the image's file there (:meth:`MediaFolder.json_part`)."""
    return b"".join(request_pieces(request, wire_model, extra, media))


def request_pieces(
    request: ModelRequest, wire_model: str, extra: dict[str, Any], media: "MediaFolder | None" = None
) -> list[bytes]:
    """:func:`request_body` in pieces, sent as they are: an image's part is never copied into one body."""
    pieces = [_model_piece(wire_model)]
    for index, message in enumerate(request.messages):
        if index:
            pieces.append(b",")
        role = _ROLE_PIECES.get(message.role)
        pieces.append(role if role is not None else b'{"role":' + _dumps(message.role) + b',"content":')
        if all(isinstance(part, TextPart) for part in message.parts):
            pieces += [_dumps(message.plain_text()), b"}"]
            continue
        pieces.append(b"[")
        for number, part in enumerate(message.parts):
            if number:
                pieces.append(b",")
            if isinstance(part, ImagePart):
                pieces.append(part.json_part() if media is None else media.json_part(part))
            else:
                pieces += [b'{"type":"text","text":', _dumps(part.text), b"}"]
        pieces.append(b"]}")
    pieces.append(b"]")
    for name, value in extra.items():
        pieces += [b',"', name.encode("ascii"), b'":', _dumps(value)]
    pieces.append(b"}")
    return pieces


# Pieces at least this long (an image's encoded part) go to the socket as they are; shorter runs are joined,
# so a call costs a write or two, not one per JSON fragment.
SEPARATE_PIECE_BYTES = 64 * 1024


def _coalesced(pieces: list[bytes]) -> list[bytes]:
    joined: list[bytes] = []
    run: list[bytes] = []
    for piece in pieces:
        if len(piece) < SEPARATE_PIECE_BYTES:
            run.append(piece)
            continue
        if run:
            joined.append(b"".join(run))
            run = []
        joined.append(piece)
    if run:
        joined.append(b"".join(run))
    return joined


@lru_cache(maxsize=1)
def _pieces_payload_type() -> Any:
    import aiohttp.payload

    class PiecesPayload(aiohttp.payload.Payload):
        """An aiohttp body written piece by piece with one Content-Length."""

        def __init__(self, value: list[bytes]) -> None:
            super().__init__(value, content_type="application/json")
            self._size = sum(len(piece) for piece in value)

        def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
            return b"".join(self._value).decode(encoding, errors)

        async def write(self, writer: Any) -> None:
            for piece in self._value:
                await writer.write(piece)

        async def write_with_length(self, writer: Any, content_length: int | None) -> None:
            await self.write(writer)

    return PiecesPayload


def _pieces_payload(pieces: list[bytes]) -> Any:
    """The body to send: image parts go to the socket from the bytes they were encoded to once, the short
    pieces between them joined; a body with no long piece is one bytes object."""
    joined = _coalesced(pieces)
    if len(joined) == 1:
        return joined[0]
    return _pieces_payload_type()(joined)


# Set while a transport's attempt (whose deadline cancels it) posts: the plain http:// client then sets no timer.
_UNDER_ATTEMPT_DEADLINE: "contextvars.ContextVar[bool]" = contextvars.ContextVar("mics_under_attempt_deadline",
                                                                                 default=False)


async def post_chat_completion(endpoint: DirectEndpoint, body: Any, timeout: float) -> dict[str, Any]:
    """POST ``body`` (JSON bytes from :func:`request_body`, its pieces, or a payload dict without the model) and
    read the reply's JSON within ``timeout`` seconds (under a transport's attempt, whose deadline ends it, a
    plain http:// call sets no timer of its own); a non-2xx reply raises :class:`HTTPStatusError`. A plain ``http://`` endpoint is
    sent it by the small keep-alive client of ``models/http11.py``; any other goes through aiohttp."""
    if isinstance(body, dict):
        body = json.dumps({**body, "model": endpoint.model}, ensure_ascii=False).encode("utf-8")
    target = _http11_target(endpoint.url, endpoint.api_key)
    if target is not None:
        own_deadline = None if _UNDER_ATTEMPT_DEADLINE.get() else timeout
        reply = await _http11_post(target, body if isinstance(body, list) else [body], own_deadline)
        if reply.status >= 400:
            raise HTTPStatusError(reply.status, reply.headers, reply.body.decode("utf-8", "replace"))
        return json.loads(reply.body)
    if isinstance(body, list):
        body = _pieces_payload(body)
    async with _session().post(
        endpoint.url, data=body, headers=_headers(endpoint.api_key), timeout=_client_timeout(timeout)
    ) as response:
        # The bytes as they came: JSON is UTF-8 (json.loads reads bytes), so no charset to look up and no str.
        raw = await response.read()
        if response.status >= 400:
            raise HTTPStatusError(response.status, dict(response.headers), raw.decode("utf-8", "replace"))
    return json.loads(raw)


@lru_cache(maxsize=64)
def _headers(api_key: str | None) -> dict[str, str]:
    """A request's headers (aiohttp copies them, so one dict serves every call)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


@lru_cache(maxsize=64)
def _http11_target(url: str, api_key: str | None) -> "_Http11Target | None":
    headers = (("Content-Type", "application/json"),)
    if api_key:
        headers += (("Authorization", f"Bearer {api_key}"),)
    return _http11_target_of(url, headers)


@lru_cache(maxsize=64)
def _client_timeout(seconds: float) -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)


async def close_session() -> None:
    """Close this loop's session (idempotent; the next call opens a new one). Models call it through
    :class:`~mics_agents.models.clients.ClientShare`, once no model of the loop uses the session."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    _close_http11_pool()
    session = _sessions.pop(loop, None)
    if session is not None and not session.closed:
        await session.close()


register_closer(close_session)
