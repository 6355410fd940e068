"""A small HTTP/1.1 keep-alive client for plain ``http://`` endpoints (the direct transport's local servers).

aiohttp spends ~0.3 ms of CPU per request on machinery a POST to a local vLLM never uses (a request object,
cookie jar, tracing hooks, a stream reader) and ~110 ms importing itself. This client is one
:class:`asyncio.Protocol` per connection: the request goes to the socket as the pieces it was built from, the
reply is parsed where it arrives (``data_received``) and handed over through one future.

- A pool of idle connections per event loop and ``host:port``; a connection goes back to it only after a whole
  reply was read from it and the server did not ask to close it. One found closed (the server's keep-alive
  ran out) or idle for longer than :data:`IDLE_KEPT_S` is dropped, never written to.
- Bodies are sent with ``Content-Length``; replies are read by ``Content-Length``, ``chunked``, or up to the
  server's close; gzip and deflate bodies are decoded.
- One total deadline per call (connect, send, the whole reply): a server that drips its reply is stopped by it.
- A cancelled or failed call closes its connection, so no half-read connection is ever reused.
- A reply whose head or body passes its limit (:data:`MAX_HEAD_BYTES`, :data:`MAX_BODY_BYTES`) fails with
  :class:`ReplyTooLarge` (not worth another attempt); a malformed one with :class:`ProtocolError`, a
  :class:`ConnectionError` (worth another, as any dropped connection). Retries are the retrying wrapper's.

``https://`` and anything unusual (credentials in the URL, a proxy) keep going through aiohttp
(:func:`target_of` says which).
"""

from __future__ import annotations

import asyncio
import collections
import select
import weakref
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "Target", "Reply", "ProtocolError", "ReplyTooLarge", "target_of", "post", "close_pool",
    "MAX_HEAD_BYTES", "MAX_BODY_BYTES", "IDLE_KEPT_S",
]

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024
# An idle connection older than this is not reused: servers close theirs after a few seconds (uvicorn, which
# vLLM runs on: 5 s), and a request written just as the server closes would be lost with it.
IDLE_KEPT_S = 3.0
# Pieces of a body at least this long are written to the socket one by one (waiting for it to drain between
# them), not joined into one copy: an image's encoded part is megabytes.
_SEPARATE_PIECE_BYTES = 64 * 1024


class ProtocolError(ConnectionError):
    """The server's reply is not HTTP/1.1 as it should be, or the connection ended before it was whole."""


class ReplyTooLarge(Exception):
    """The reply's head or body is longer than this client reads (asking again gets the same reply)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL's requests go, and the fixed part of their head."""

    host: str
    port: int
    head: bytes  # "POST /path HTTP/1.1\r\nHost: ...\r\n" and the caller's fixed headers, without Content-Length

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes


@lru_cache(maxsize=256)
def target_of(url: str, headers: tuple[tuple[str, str], ...] = ()) -> Target | None:
    """The target of a POST to ``url`` with these extra headers, or None when this client does not take it
    (not ``http://``, credentials or a fragment in the URL, a header with a line break)."""
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError:
        return None
    if parts.scheme != "http" or not parts.hostname or parts.username is not None or parts.password is not None:
        return None
    if parts.fragment or any(character in url for character in "\r\n \t"):
        return None
    for name, value in headers:
        if any(character in name + value for character in "\r\n\0") or not name or ":" in name:
            return None
    host = parts.hostname
    authority = f"[{host}]" if ":" in host else host
    if port != 80:
        authority += f":{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"POST {path} HTTP/1.1", f"Host: {authority}", "Accept: application/json", "User-Agent: mics-agents"]
    lines += [f"{name}: {value}" for name, value in headers]
    try:
        head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
    except UnicodeEncodeError:
        return None
    return Target(host, port, head)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._buffer = bytearray()
        self._waiter: asyncio.Future[Reply] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        self._reset_reply()

    def _reset_reply(self) -> None:
        self._head_done = False
        self._scanned = 0  # where the search for the end of the head goes on from
        self._status = 0
        self._headers: dict[str, str] = {}
        self._length: int | None = None  # Content-Length
        self._chunked = False
        self._to_close = False  # read up to the server's close (neither length nor chunked)
        self._keep = True
        self._chunks: list[bytes] = []
        self._chunk_bytes = 0
        self._eof = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._eof = True
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("the server closed the connection"))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._to_close and self._head_done and exc is None:
                try:
                    self._finish()
                except Exception as error:  # noqa: BLE001 - handed to the caller
                    if not waiter.done():
                        waiter.set_exception(error)
            else:
                waiter.set_exception(ProtocolError(
                    "the server closed the connection before its reply was whole"
                    + (f" ({exc})" if exc else "")
                ))

    def eof_received(self) -> bool:
        self._eof = True
        return False  # let the transport close

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            # Bytes nobody asked for (a server talking out of turn): this connection cannot be trusted.
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            return
        self._buffer += data
        try:
            self._parse()
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            self.closed = True
            if not waiter.done():
                waiter.set_exception(exc)

    # -- the reply ------------------------------------------------------------------------------------------------
    def _parse(self) -> None:
        buffer = self._buffer
        while not self._head_done:
            end = buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise ReplyTooLarge(f"the reply's head is longer than {MAX_HEAD_BYTES:,} bytes")
                self._scanned = len(buffer)
                return
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            self._scanned = 0
            if self._read_head(head):
                self._head_done = True
        if self._length is not None:
            if len(buffer) >= self._length:
                self._chunks.append(bytes(buffer[: self._length]))
                del buffer[: self._length]
                self._finish()
        elif self._chunked:
            self._parse_chunks()
        elif len(buffer) > MAX_BODY_BYTES:
            raise ReplyTooLarge(f"the reply's body is longer than {MAX_BODY_BYTES:,} bytes")

    def _read_head(self, head: bytes) -> bool:
        """Read a reply head; False for an interim (1xx) reply, which is skipped."""
        lines = head.split(b"\r\n")
        status_line = lines[0]
        version, _, rest = status_line.partition(b" ")
        code = rest[:3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit() or rest[3:4] not in (b"", b" "):
            raise ProtocolError(f"malformed status line from the server: {status_line[:100]!r}")
        status = int(code)
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError("the server switched protocols (HTTP 101), which this client does not speak")
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise ProtocolError(f"malformed header line from the server: {line[:100]!r}")
            headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
        self._status, self._headers = status, headers
        connection = headers.get("connection", "").lower()
        self._keep = "close" not in connection and (version == b"HTTP/1.1" or "keep-alive" in connection)
        encoding = headers.get("transfer-encoding", "").lower()
        if status in (204, 304):
            self._length = 0
        elif encoding:
            if encoding.rsplit(",", 1)[-1].strip() != "chunked":
                raise ProtocolError(f"unsupported Transfer-Encoding {encoding[:60]!r}")
            self._chunked = True
            self._chunk_state = 0  # 0: a size line next, 1: chunk data, 2: the CRLF after it, 3: trailers
            self._chunk_left = 0
        elif "content-length" in headers:
            value = headers["content-length"]
            if not (value.isascii() and value.isdigit()):
                raise ProtocolError(f"malformed Content-Length {value[:40]!r}")
            self._length = int(value)
            if self._length > MAX_BODY_BYTES:
                raise ReplyTooLarge(f"the reply's body ({self._length:,} bytes) is longer than {MAX_BODY_BYTES:,} bytes")
        else:
            self._to_close = True
            self._keep = False
        return True

    def _parse_chunks(self) -> None:
        buffer = self._buffer
        while True:
            if self._chunk_state == 0:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 1024:
                        raise ProtocolError("malformed chunk size line from the server")
                    return
                size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
                del buffer[: end + 2]
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ProtocolError(f"malformed chunk size {size_text[:20]!r}") from None
                if size < 0:
                    raise ProtocolError(f"malformed chunk size {size_text[:20]!r}")
                if size == 0:
                    self._chunk_state = 3
                    continue
                if self._chunk_bytes + size > MAX_BODY_BYTES:
                    raise ReplyTooLarge(f"the reply's body is longer than {MAX_BODY_BYTES:,} bytes")
                self._chunk_left, self._chunk_state = size, 1
            elif self._chunk_state == 1:
                if not buffer:
                    return
                take = min(self._chunk_left, len(buffer))
                self._chunks.append(bytes(buffer[:take]))
                del buffer[:take]
                self._chunk_bytes += take
                self._chunk_left -= take
                if self._chunk_left:
                    return
                self._chunk_state = 2
            elif self._chunk_state == 2:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise ProtocolError("malformed chunk: no line end after its data")
                del buffer[:2]
                self._chunk_state = 0
            else:  # trailers up to an empty line
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise ReplyTooLarge("the reply's trailers are too long")
                    return
                del buffer[: end + 2]
                if end == 0:
                    self._finish()
                    return

    def _finish(self) -> None:
        if self._to_close:
            self._chunks.append(bytes(self._buffer))
            self._buffer.clear()
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        encoding = self._headers.get("content-encoding", "").lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            try:
                decoder = zlib.decompressobj(wbits=47 if encoding != "deflate" else 15)
                body = decoder.decompress(body, MAX_BODY_BYTES + 1)
            except zlib.error as exc:
                raise ProtocolError(f"the reply's {encoding} body does not decode: {exc}") from None
            if len(body) > MAX_BODY_BYTES:
                raise ReplyTooLarge(f"the reply's decoded body is longer than {MAX_BODY_BYTES:,} bytes")
            if not decoder.eof:  # zlib takes a cut stream without a word: the end is how we know it is whole
                raise ProtocolError(f"the reply's {encoding} body ends before its compressed stream does")
        elif encoding not in ("", "identity"):
            raise ProtocolError(f"unsupported Content-Encoding {encoding[:40]!r}")
        if self._buffer:  # bytes past the reply: the server is out of step with us
            self._keep = False
        reply = Reply(self._status, self._headers, body)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    # -- one exchange -----------------------------------------------------------------------------------------
    async def exchange(self, head: bytes, pieces: list[bytes]) -> Reply:
        transport = self.transport
        assert transport is not None
        self._reset_reply()
        self._buffer.clear()
        waiter = self._waiter = self.loop.create_future()
        if pieces and len(pieces[0]) < _SEPARATE_PIECE_BYTES:  # the head and a short start: one send
            head, pieces = head + pieces[0], pieces[1:]
        transport.write(head)
        for piece in pieces:
            transport.write(piece)
            if self._paused and len(piece) >= _SEPARATE_PIECE_BYTES:
                drained = self._drained = self.loop.create_future()
                if self._paused:
                    # The server may answer (413, 400) without reading the rest: the reply ends the wait too.
                    await asyncio.wait((drained, waiter), return_when=asyncio.FIRST_COMPLETED)
                    if not waiter.done():
                        drained.result()  # raises when the connection was lost or the deadline passed
                    elif drained.done() and not drained.cancelled():
                        drained.exception()  # the reply came first: what the close said is not news
                self._drained = None
            if waiter.done():  # the server answered (an error) before reading all of the body
                self._keep = False  # the rest of the body would be read as the next request
                break
        return await waiter

    def reusable(self) -> bool:
        return self._keep and not self.closed and not self._eof and self.transport is not None and not self.transport.is_closing()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _has_input(connection: _Connection) -> bool:
    """Whether an idle connection's socket has something to read that the loop has not handled yet: the
    server's close (or an unasked-for reply, such as a 408 before closing). Either way it is no longer fit for
    a request, which the server would never read."""
    transport = connection.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        readable, _, _ = select.select((sock.fileno(),), (), (), 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class _Pool:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle: dict[tuple[str, int], collections.deque[_Connection]] = {}
        self.open: "weakref.WeakSet[_Connection]" = weakref.WeakSet()

    def take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self.idle.get(key)
        if not idle:
            return None
        now = self.loop.time()
        while idle and now - idle[0].idle_since >= IDLE_KEPT_S:  # the oldest, left by a burst: closed, not kept
            idle.popleft().abort()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to have been closed
            if connection.reusable() and now - connection.idle_since < IDLE_KEPT_S and not _has_input(connection):
                return connection
            connection.abort()
        return None

    def give_back(self, key: tuple[str, int], connection: _Connection) -> None:
        if not connection.reusable():
            connection.abort()
            return
        connection.idle_since = self.loop.time()
        connection._waiter = None
        self.idle.setdefault(key, collections.deque()).append(connection)

    async def connect(self, target: Target) -> _Connection:
        _, connection = await self.loop.create_connection(lambda: _Connection(self.loop), target.host, target.port)
        self.open.add(connection)
        return connection

    def close(self) -> None:
        for connection in list(self.open):
            if connection.transport is not None:
                connection.transport.close()
            connection.closed = True
        self.idle.clear()


_pools: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pool]" = weakref.WeakKeyDictionary()


def _pool() -> _Pool:
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = _Pool(loop)
    return pool


def _expire(waiter: asyncio.Future[Any], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"no complete reply within {timeout:g} s"))


async def post(target: Target, pieces: list[bytes], timeout: float | None) -> Reply:
    """POST the body ``pieces`` (JSON, in order) to ``target``; the whole reply within ``timeout`` seconds,
    whatever its status (None: no deadline here, the caller's cancellation ends the call). Raises
    :class:`TimeoutError`, :class:`ProtocolError` (and other :class:`OSError` connection failures) or
    :class:`ReplyTooLarge`."""
    pool = _pool()
    loop = pool.loop
    length = 0
    for piece in pieces:
        length += len(piece)
    head = target.head + b"Content-Length: %d\r\n\r\n" % length
    if len(pieces) > 1:
        pieces = [b"".join(pieces)] if length < _SEPARATE_PIECE_BYTES else _coalesced(pieces)
    connection = pool.take(target.key)
    if timeout is None:
        if connection is None:
            connection = await pool.connect(target)
        try:
            reply = await connection.exchange(head, pieces)
        except BaseException:
            connection.abort()  # cancelled or failed mid-reply: never reused half-read
            raise
        pool.give_back(target.key, connection)
        return reply
    deadline = loop.time() + timeout
    if connection is None:
        connection = await asyncio.wait_for(pool.connect(target), timeout)
    try:
        timer = loop.call_at(deadline, _expire_connection, connection, timeout)
        try:
            reply = await connection.exchange(head, pieces)
        finally:
            timer.cancel()
    except BaseException:
        connection.abort()  # cancelled, timed out or failed mid-reply: never reused half-read
        raise
    pool.give_back(target.key, connection)
    return reply


def _coalesced(pieces: list[bytes]) -> list[bytes]:
    """The pieces with each run of short ones joined (a send each, not one per JSON fragment); long ones (an
    image's encoded part) are kept as they are, never copied."""
    joined: list[bytes] = []
    run: list[bytes] = []
    for piece in pieces:
        if len(piece) < _SEPARATE_PIECE_BYTES:
            run.append(piece)
            continue
        if run:
            joined.append(run[0] if len(run) == 1 else b"".join(run))
            run = []
        joined.append(piece)
    if run:
        joined.append(run[0] if len(run) == 1 else b"".join(run))
    return joined


def _expire_connection(connection: _Connection, timeout: float) -> None:
    waiter = connection._waiter
    if waiter is not None:
        _expire(waiter, timeout)
    drained = connection._drained
    if drained is not None and not drained.done():
        drained.set_exception(TimeoutError(f"no complete reply within {timeout:g} s"))


def close_pool() -> None:
    """Close the running loop's connections (the next call opens new ones)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    pool = _pools.pop(loop, None)
    if pool is not None:
        pool.close()
