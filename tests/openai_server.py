"""A small OpenAI-compatible chat-completions server for the integration tests (DESIGN §8).

It runs on 127.0.0.1 (a free port) in a background thread with its own event loop, so it does not care
which loop the test runs on, and it stops when its context ends (or, as a safety net, after ``lifetime``
seconds). What it answers is decided by a *brain*, a function of (model name, request JSON); the default
brain turns the OpenAI messages back into a :class:`~mics_agents.models.base.ModelRequest` and answers
with the package's simulated mentor, intern or judge (chosen by the model name). Every request is
recorded (path, model, body, headers, arrival and reply times, fault applied), and a fault script makes the next
requests fail on purpose: ``429`` (with ``Retry-After``), ``500``, ``401``, ``400``, ``timeout`` (answers late),
``drip`` (HTTP 200 at once, then the body a byte every ``DRIP_INTERVAL`` s for ``delay`` s: no read ever waits
long, so only a total deadline stops it), ``malformed`` (HTTP 200, invalid JSON), ``empty`` (``choices: []``)
and ``empty_content``. A reply longer than the request's ``max_tokens`` (one word, one token) is cut there
with ``finish_reason: "length"``.

Images may come as data URLs or, from a server given ``media_dir`` (vLLM's ``--allowed-local-media-path``), as
``file://`` URLs that it reads from that folder, refusing (HTTP 400, as vLLM does) any that is not a file
inside it once resolved (``..``, a symlink out, another host); a server without ``media_dir`` refuses every
``file://`` URL. Each request records the bytes of its images (``images``) and their URLs (``image_urls``); the
brain sees the images as data URLs whichever way they came.

    with OpenAIServer() as server:
        server.inject("429", model="intern-1", retry_after=1)
        ... point OPENAI_API_BASE at server.base_url ...
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import mimetypes
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from aiohttp import web

from mics_agents.models.base import ChatMessage, ImagePart, ModelRequest, TextPart
from mics_agents.models.simulated import simulated_reply

__all__ = [
    "Brain",
    "Fault",
    "OpenAIServer",
    "RecordedRequest",
    "simulated_brain",
    "simulated_brain_with_roles",
    "prompt_brain",
    "role_from_prompt",
    "request_from_openai",
]

Brain = Callable[[str, dict[str, Any]], str]

FAULT_KINDS = ("429", "500", "401", "400", "timeout", "drip", "malformed", "empty", "empty_content")
# However long a test asks a "timeout" reply to take, the server never holds a request longer.
MAX_TIMEOUT_DELAY = 5.0
# A "drip" reply sends one byte this often, for at most MAX_DRIP seconds, then the whole completion.
DRIP_INTERVAL = 0.2
MAX_DRIP = 30.0


@dataclass
class Fault:
    """What to do to the next matching request(s). ``model`` matches the name the server sees
    (``intern-1``) or the LiteLLM name (``openai/intern-1``); ``None`` matches any request.
    ``times=None`` repeats the fault forever."""

    kind: str
    model: str | None = None
    times: int | None = 1
    retry_after: float | str = 1
    delay: float = 3.0

    def matches(self, model: str) -> bool:
        return self.model is None or self.model == model or self.model.rsplit("/", 1)[-1] == model


@dataclass
class RecordedRequest:
    path: str
    model: str
    body: dict[str, Any]
    headers: dict[str, str]
    received_at: float  # time.monotonic() on arrival
    fault: str | None = None
    status: int = 200
    replied_at: float | None = None  # time.monotonic() when the reply was handed to the client
    drip_seconds: float = 0.0  # how long a "drip" fault spreads the reply over
    images: list[bytes] = field(default_factory=list)  # each image's bytes as the server read them, in order
    image_urls: list[str] = field(default_factory=list)  # and the URL it came by

    def canonical(self) -> str:
        """What identifies the call, as one string: model, messages and temperature (a retry, or the same
        call sent again by a later run, gives the same string)."""
        body = self.body
        return json.dumps(
            {"model": self.model, "messages": body.get("messages"), "temperature": body.get("temperature")},
            sort_keys=True,
            ensure_ascii=False,
        )

    def text(self) -> str:
        """All text of the messages, in order (images left out)."""
        return "\n".join(_message_text(message) for message in self.body.get("messages", []))

    def same_call(self, other: "RecordedRequest") -> bool:
        """The same request body: a retry of a failed call looks exactly like the call."""
        return self.path == other.path and self.body == other.body


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content or [] if part.get("type") == "text")


def _image_part(url: str) -> ImagePart:
    header, _, payload = url.partition(",")
    if not header.startswith("data:") or ";base64" not in header:
        raise ValueError(f"image is not a base64 data URL: {url[:40]!r}")
    data = base64.b64decode(payload, validate=True)
    mime = header[len("data:") :].split(";", 1)[0]
    return ImagePart(data, mime, hashlib.sha256(data).hexdigest())


class MediaRefused(ValueError):
    """A ``file://`` image URL the server may not read."""


def read_media_url(url: str, media_dir: Path | None) -> bytes:
    """The bytes of the file a ``file://`` URL names, if it is a file inside ``media_dir`` once resolved (as
    vLLM's ``--allowed-local-media-path`` checks it); else :class:`MediaRefused`."""
    if media_dir is None:
        raise MediaRefused("Local file URLs are not accepted (the server has no --allowed-local-media-path)")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaRefused(f"File URL netloc is not supported: {parsed.netloc}")
    allowed = Path(media_dir).resolve()
    path = Path(url2pathname(parsed.path)).resolve()
    if allowed not in path.parents:
        raise MediaRefused(f"File path {path} is not within allowed directory {allowed}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MediaRefused(f"File {path} cannot be read: {exc.strerror or exc}") from None


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# Not on the wire: the server adds it to the body a brain sees for choice k of a request with ``n``.
SAMPLE_FIELD = "x_test_choice"


def request_from_openai(body: dict[str, Any]) -> ModelRequest:
    """The :class:`ModelRequest` a chat-completions body was made from (sample index and prompt version
    are not sent over the wire, so they stay at their defaults; choice k of a request with ``n`` is sample
    k)."""
    messages = []
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            parts: tuple[Any, ...] = (TextPart(content),)
        else:
            parts = tuple(
                TextPart(part["text"]) if part["type"] == "text" else _image_part(part["image_url"]["url"])
                for part in content
            )
        messages.append(ChatMessage(message["role"], parts))
    return ModelRequest(
        messages=tuple(messages),
        temperature=float(body.get("temperature", 1.0)),
        max_tokens=body.get("max_tokens"),
        sample_index=int(body.get(SAMPLE_FIELD, 0)),
    )


def role_of(model: str, roles: Mapping[str, str] | None = None) -> str:
    """The simulated role a model name plays: from ``roles`` (server-side name or LiteLLM name), else
    from the name itself (it must contain mentor, intern or judge)."""
    if roles:
        for name, role in roles.items():
            if name == model or name.rsplit("/", 1)[-1] == model:
                return role
    for role in ("mentor", "intern", "judge"):
        if role in model:
            return role
    raise ValueError(f"cannot tell the role of model {model!r}: its name must contain mentor, intern or judge")


def simulated_brain(model: str, body: dict[str, Any]) -> str:
    """Answer like the package's simulated models, deterministically from the request."""
    return simulated_reply(role_of(model), model, request_from_openai(body))


def simulated_brain_with_roles(roles: Mapping[str, str]) -> Brain:
    """:func:`simulated_brain` for model names that do not say their role, e.g. ``{"openai/gpt-4o": "mentor"}``
    (a model LiteLLM knows the price of, so calls have a cost)."""
    roles = dict(roles)

    def brain(model: str, body: dict[str, Any]) -> str:
        return simulated_reply(role_of(model, roles), model, request_from_openai(body))

    return brain


def role_from_prompt(body: dict[str, Any]) -> str:
    """The role a request asks for, read from the headings of the package's prompt templates in its last message
    (so any model name works): ``mentor`` (a correct answer known only to it), ``judge`` (a reference and a
    candidate answer), ``intern`` (a question and the reasoning so far), ``generator`` (a case record to write
    questions from), else ``answerer`` (a plain question, as ``mics eval`` asks it)."""
    messages = body.get("messages") or [{}]
    text = _message_text(messages[-1])
    if "## Correct answer" in text:
        return "mentor"
    if "## Reference answer" in text and "## Candidate answer" in text:
        return "judge"
    if "## Reasoning so far" in text:
        return "intern"
    if "## Case record" in text and "## Question" not in text:
        return "generator"
    return "answerer"


def _answerer_text(model: str, body: dict[str, Any]) -> str:
    """A model under evaluation: one step, then a final answer drawn from the question's options (or yes/no),
    fixed by a hash of the request."""
    from mics_agents.answers import parse_options

    messages = body.get("messages") or [{}]
    question = _message_text(messages[-1])
    seed = hashlib.sha256(f"{model}\x00{question}\x00{body.get(SAMPLE_FIELD, 0)}".encode()).digest()
    rng = random.Random(int.from_bytes(seed[:8], "big"))
    options = sorted(parse_options(question))
    answer = rng.choice(options) if options else rng.choice(["Yes", "No"])
    return f"### Step 1: Reading the question and the images.\n\n### The final answer is: {answer}"


def prompt_brain(model: str, body: dict[str, Any]) -> str:
    """Like :func:`simulated_brain`, but the role comes from the prompt, not the model name: what the docs'
    examples run against, whatever models they name (``openai/gpt-4o`` as mentor, judge and intern alike)."""
    role = role_from_prompt(body)
    if role == "answerer":
        return _answerer_text(model, body)
    return simulated_reply(role, model, request_from_openai(body))


class OpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 in its own thread. Use as a context manager."""

    def __init__(
        self,
        brain: Brain = simulated_brain,
        *,
        lifetime: float = 300.0,
        latency: float | tuple[float, float] = 0.0,
        latency_seed: int = 0,
        honours_n: bool = True,
        usage: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
        media_dir: Path | str | None = None,
    ) -> None:
        self.brain = brain
        self.media_dir = Path(media_dir) if media_dir is not None else None  # what file:// URLs may name
        self.usage = usage  # (model, the usage the server counted) -> the usage it reports: for lying servers
        self.honours_n = honours_n  # False: answers one choice whatever ``n`` asks, as some servers do
        self.lifetime = lifetime
        # Seconds every successful reply takes, like a model generating; (low, high) draws each reply's
        # latency uniformly from that range (seeded by ``latency_seed``).
        self.latency = latency
        self._latency_rng = random.Random(latency_seed)
        self.in_flight: dict[str, int] = {}
        self.peak_in_flight: dict[str, int] = {}
        self.port: int | None = None
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # brain failures, answered with HTTP 400; a test should see none
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # -- control (called from the test's thread) ------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, as OPENAI_API_BASE wants it."""
        return f"http://127.0.0.1:{self.port}/v1"

    def inject(
        self,
        kind: str,
        *,
        model: str | None = None,
        times: int | None = 1,
        retry_after: float | str = 1,
        delay: float = 3.0,
    ) -> Fault:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULT_KINDS}")
        fault = Fault(kind, model, times, retry_after, min(delay, MAX_DRIP if kind == "drip" else MAX_TIMEOUT_DELAY))
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def reset(self) -> None:
        """Forget recorded requests and faults."""
        with self._lock:
            self._faults.clear()
            self.requests.clear()
            self.errors.clear()

    def recorded(self, model: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            requests = list(self.requests)
        if model is None:
            return requests
        short = model.rsplit("/", 1)[-1]
        return [request for request in requests if request.model in (model, short)]

    def count(self, model: str | None = None) -> int:
        if model is None:
            with self._lock:
                return len(self.requests)
        return len(self.recorded(model))

    def start(self) -> "OpenAIServer":
        self._thread = threading.Thread(target=self._run, name="openai-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("the test OpenAI server did not start within 10 s")
        if self._startup_error is not None:
            raise RuntimeError(f"the test OpenAI server failed to start: {self._startup_error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                raise RuntimeError("the test OpenAI server did not stop within 10 s")
            self._thread = None

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the server (runs in its own thread and loop) --------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/chat/completions", self._handle)
        # Extra prefixes let one server stand for several deployments (e.g. /replica-2/v1).
        app.router.add_post("/{prefix}/v1/chat/completions", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        try:
            await runner.setup()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            await web.SockSite(runner, sock).start()
        except BaseException as exc:  # reported to start()
            self._startup_error = exc
            self._ready.set()
            await runner.cleanup()
            return
        self._ready.set()
        try:
            # Stops when told to, or by itself after ``lifetime`` seconds so a forgotten server never hangs.
            await asyncio.wait_for(self._stopped.wait(), timeout=self.lifetime)
        except asyncio.TimeoutError:
            pass
        finally:
            self._stopped.set()  # wakes handlers sleeping in a "timeout" fault
            await runner.cleanup()

    def _next_latency(self) -> float:
        if isinstance(self.latency, tuple):
            low, high = self.latency
            with self._lock:
                return self._latency_rng.uniform(low, high)
        return self.latency

    def _take_fault(self, model: str) -> Fault | None:
        with self._lock:
            for index, fault in enumerate(self._faults):
                if fault.matches(model):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            del self._faults[index]
                    return fault
        return None

    async def _handle(self, http_request: web.Request) -> web.StreamResponse:
        record, response = await self._reply(http_request)
        # Send the reply here (not after returning) so that ``replied_at`` is when its bytes went out.
        try:
            if record is not None and record.fault == "drip":
                response = await self._drip(http_request, response, record.drip_seconds)
            else:
                await response.prepare(http_request)
                await response.write_eof()
        except ConnectionError:  # the client is gone (killed, or gave up on a late reply)
            return response
        if record is not None:
            record.replied_at = time.monotonic()
        return response

    async def _drip(self, http_request: web.Request, complete: web.Response, seconds: float) -> web.StreamResponse:
        """Headers at once, then a space every DRIP_INTERVAL s (JSON allows leading whitespace), then the
        completion: a client bounded per read never times out; only a total deadline stops it."""
        assert self._stopped is not None
        body = complete.body if isinstance(complete.body, bytes) else b""
        spaces = int(seconds / DRIP_INTERVAL)
        stream = web.StreamResponse(status=complete.status, headers={"Content-Type": "application/json"})
        stream.content_length = spaces + len(body)
        await stream.prepare(http_request)
        for _ in range(spaces):
            await stream.write(b" ")
            try:
                await asyncio.wait_for(self._stopped.wait(), timeout=DRIP_INTERVAL)
                break  # the server stops: the reply is cut short
            except asyncio.TimeoutError:
                pass
        await stream.write(body)
        await stream.write_eof()
        return stream

    async def _reply(self, http_request: web.Request) -> tuple[RecordedRequest | None, web.Response]:
        received_at = time.monotonic()
        raw = await http_request.read()
        try:
            body = json.loads(raw)
            model = str(body["model"])
        except (ValueError, KeyError, TypeError):
            return None, web.json_response({"error": {"message": "request body is not a chat completion"}}, status=400)
        record = RecordedRequest(http_request.path, model, body, dict(http_request.headers), received_at)
        fault = self._take_fault(model)
        record.fault = fault.kind if fault else None
        record.drip_seconds = fault.delay if fault is not None and fault.kind == "drip" else 0.0
        with self._lock:
            self.requests.append(record)
        try:
            body = self._read_images(body, record)
        except MediaRefused as exc:
            record.status = 400
            return record, web.json_response({"error": {"message": str(exc), "type": "BadRequestError"}}, status=400)

        if fault is not None and fault.kind in ("429", "500", "401", "400"):
            record.status = int(fault.kind)
            messages = {429: "Rate limit reached, slow down", 500: "Internal server error", 401: "Invalid API key",
                        400: "Invalid image: unsupported format"}
            kinds = {429: "rate_limit_error", 500: "server_error", 401: "invalid_request_error",
                     400: "invalid_request_error"}
            headers = {"Retry-After": str(fault.retry_after)} if fault.kind == "429" else {}
            return record, web.json_response(
                {"error": {"message": messages[record.status], "type": kinds[record.status], "code": None}},
                status=record.status,
                headers=headers,
            )
        if fault is not None and fault.kind == "timeout":
            # Late, but never longer than MAX_TIMEOUT_DELAY, and cut short when the server stops.
            assert self._stopped is not None
            try:
                await asyncio.wait_for(self._stopped.wait(), timeout=min(fault.delay, MAX_TIMEOUT_DELAY))
            except asyncio.TimeoutError:
                pass
        if fault is not None and fault.kind == "malformed":
            return record, web.Response(
                text='{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"index": 0, "mess',
                content_type="application/json",
            )
        if fault is not None and fault.kind == "empty":
            return record, web.json_response(self._completion(model, None, body, empty=True))

        latency = self._next_latency()
        if latency:
            with self._lock:
                self.in_flight[model] = self.in_flight.get(model, 0) + 1
                self.peak_in_flight[model] = max(self.peak_in_flight.get(model, 0), self.in_flight[model])
            try:
                await asyncio.sleep(latency)
            finally:
                with self._lock:
                    self.in_flight[model] -= 1
        try:
            count = (body.get("n") or 1) if self.honours_n else 1
            # With n, each choice is answered as its own sample: the brain sees the choice as the sample index.
            texts = [
                "" if fault is not None and fault.kind == "empty_content"
                else self.brain(model, body if count == 1 else {**body, SAMPLE_FIELD: choice})
                for choice in range(count)
            ]
        except Exception as exc:  # a brain bug should be loud in the test, not a hang
            message = f"brain failed for {model}: {type(exc).__name__}: {exc}"
            with self._lock:
                self.errors.append(message)
            record.status = 400
            return record, web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=400)
        return record, web.json_response(self._completion(model, texts, body))

    def _read_images(self, body: dict[str, Any], record: RecordedRequest) -> dict[str, Any]:
        """Record each image's bytes and URL; the body with every ``file://`` image as the data URL of the bytes
        read (the brain decodes data URLs), or the body itself when it names no file."""
        messages = body.get("messages")
        if not isinstance(messages, list):
            return body
        changed = False
        converted = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                converted.append(message)
                continue
            parts = []
            for part in content:
                url = part.get("image_url", {}).get("url") if isinstance(part, dict) and isinstance(part.get("image_url"), dict) else None
                if not isinstance(url, str):
                    parts.append(part)
                    continue
                record.image_urls.append(url)
                if url.startswith("file:"):
                    data = read_media_url(url, self.media_dir)
                    mime = mimetypes.guess_type(urlparse(url).path)[0] or "image/png"
                    parts.append({**part, "image_url": {**part["image_url"], "url": _data_url(data, mime)}})
                    changed = True
                else:
                    try:
                        data = _image_part(url).data
                    except (ValueError, TypeError):
                        data = b""  # not a data URL the brain can read either: it says so
                    parts.append(part)
                record.images.append(data)
            converted.append({**message, "content": parts})
        return {**body, "messages": converted} if changed else body

    def _completion(self, model: str, texts: list[str] | None, body: dict[str, Any], *, empty: bool = False) -> dict:
        prompt_tokens = sum(len(_message_text(message).split()) for message in body.get("messages", []))
        budget = body.get("max_tokens") or body.get("max_completion_tokens")
        choices = []
        completion_tokens = 0
        for index, text in enumerate([] if empty else texts or []):
            words = text.split(" ")
            finish_reason = "stop"
            if isinstance(budget, int) and len(words) > budget:
                # As a real server does: one word is one token here, and the reply stops at the budget.
                text, finish_reason = " ".join(words[:budget]), "length"
            completion_tokens += len(text.split())
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "finish_reason": finish_reason, "logprobs": None})
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return {
            "id": f"chatcmpl-test-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": self.usage(model, usage) if self.usage else usage,
        }
