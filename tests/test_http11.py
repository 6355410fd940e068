"""The small HTTP/1.1 keep-alive client of the direct transport (issue 30): keep-alive reuse, replies by
Content-Length, chunks or close, a total deadline, and no half-read connection ever reused, against scripted raw
TCP servers (each answers what a test says, byte for byte) and the suite's OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest

from mics_agents.errors import ModelCallError, TransientModelError
from mics_agents.models import http11
from mics_agents.models.direct import DirectEndpoint, HTTPStatusError, post_chat_completion
from mics_agents.models.http11 import ProtocolError, ReplyTooLarge, post, target_of
from mics_agents.models.transport import classify_error
from tests.openai_server import OpenAIServer

OK_BODY = b'{"ok": true}'


def ok_reply(body: bytes = OK_BODY, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class RawServer:
    """A TCP server whose every request (head and Content-Length body) is answered by ``script(request_number,
    writer, request)``; it counts connections and keeps each request's bytes."""

    def __init__(self, script):
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "RawServer":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        http11.close_pool()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                keep = await self.script(len(self.requests), writer, head + body)
                await writer.drain()
                if keep is False:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def answer_ok(number, writer, request):
    writer.write(ok_reply())


def target(server: RawServer, headers=(("Content-Type", "application/json"),)):
    found = target_of(server.url, headers)
    assert found is not None
    return found


async def test_calls_reuse_one_connection_and_the_body_arrives_byte_for_byte():
    async with RawServer(answer_ok) as server:
        pieces = [b'{"model":"m",', b'"messages":[]', b"}"]
        for _ in range(5):
            reply = await post(target(server), pieces, 5.0)
            assert (reply.status, json.loads(reply.body)) == (200, {"ok": True})
        assert server.connections == 1
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        assert body == b"".join(pieces)
        assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"Content-Length: %d" % len(body) in head and b"Host: 127.0.0.1:" in head


async def test_a_connection_the_server_closed_between_requests_is_not_written_to():
    async def answer_then_close(number, writer, request):
        writer.write(ok_reply())
        return False  # keep-alive said yes, but the server closes right after

    async with RawServer(answer_then_close) as server:
        for _ in range(3):
            assert (await post(target(server), [b"{}"], 5.0)).status == 200
            await asyncio.sleep(0.05)
        assert server.connections == 3


async def test_a_reply_saying_connection_close_is_not_reused():
    async def answer(number, writer, request):
        writer.write(ok_reply(extra=b"Connection: close\r\n"))

    async with RawServer(answer) as server:
        for _ in range(2):
            assert (await post(target(server), [b"{}"], 5.0)).body == OK_BODY
        assert server.connections == 2


async def test_a_chunked_reply_sent_in_pieces_is_read_whole():
    body = json.dumps({"choices": [{"message": {"content": "x" * 5000}}]}).encode()

    async def answer(number, writer, request):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(body), 1000):
            chunk = body[start:start + 1000]
            for piece in (b"%x;ext=1\r\n" % len(chunk), chunk, b"\r\n"):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0)
        writer.write(b"0\r\nX-Trailer: y\r\n\r\n")

    async with RawServer(answer) as server:
        for _ in range(2):
            assert (await post(target(server), [b"{}"], 5.0)).body == body
        assert server.connections == 1


async def test_a_reply_read_up_to_the_close_and_a_gzip_body():
    async def answer(number, writer, request):
        if number == 1:
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + OK_BODY)
            return False
        zipped = gzip.compress(OK_BODY)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(zipped), zipped))

    async with RawServer(answer) as server:
        assert (await post(target(server), [b"{}"], 5.0)).body == OK_BODY
        assert (await post(target(server), [b"{}"], 5.0)).body == OK_BODY


async def test_a_reply_dripped_past_the_deadline_ends_at_it_and_its_connection_is_dropped():
    async def drip(number, writer, request):
        if number > 1:
            writer.write(ok_reply())
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(100):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with RawServer(drip) as server:
        with pytest.raises(TimeoutError):  # the reply never completes: only the deadline ends the call
            await post(target(server), [b"{}"], 0.4)
        # The next call gets a connection of its own and a whole reply.
        assert (await post(target(server), [b"{}"], 5.0)).body == OK_BODY
        assert server.connections == 2


async def test_a_call_cancelled_mid_reply_never_leaves_its_half_read_connection_for_the_next():
    half_sent = asyncio.Event()

    async def answer(number, writer, request):
        if number == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"half": ')
            await writer.drain()
            half_sent.set()
            await asyncio.sleep(0.3)
            writer.write(b"1}" + b" " * 89)  # the rest of the first reply, after the caller gave up on it
            return
        writer.write(ok_reply())

    async with RawServer(answer) as server:
        call = asyncio.ensure_future(post(target(server), [b"{}"], 5.0))
        await half_sent.wait()
        await asyncio.sleep(0.02)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        reply = await post(target(server), [b"{}"], 5.0)
        assert reply.body == OK_BODY  # not the tail of the first reply
        assert server.connections == 2


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 2OO OK", b"HTTP/2 200", b"garbage", b"HTTP/1.1 200OK",
                                         b"ICY 200 OK"])
async def test_a_malformed_status_line_is_a_dropped_connection_worth_another_attempt(status_line):
    async def answer(number, writer, request):
        writer.write(status_line + b"\r\nContent-Length: 2\r\n\r\n{}")

    async with RawServer(answer) as server:
        with pytest.raises(ProtocolError, match="malformed status line") as raised:
            await post(target(server), [b"{}"], 5.0)
        assert isinstance(classify_error("m", raised.value), TransientModelError)


@pytest.mark.parametrize("head", [b"Content-Length: 99999999999\r\n", b"Transfer-Encoding: chunked\r\n"])
async def test_a_reply_bigger_than_the_limit_is_refused_and_not_asked_again(monkeypatch, head):
    monkeypatch.setattr(http11, "MAX_BODY_BYTES", 10_000)

    async def answer(number, writer, request):
        writer.write(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n")
        if b"chunked" in head:
            for _ in range(30):
                writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
                await writer.drain()

    async with RawServer(answer) as server:
        with pytest.raises(ReplyTooLarge) as raised:
            await post(target(server), [b"{}"], 5.0)
        assert type(classify_error("m", raised.value)) is ModelCallError


async def test_a_head_without_end_past_its_limit_is_refused():
    async def answer(number, writer, request):
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * (http11.MAX_HEAD_BYTES + 10))

    async with RawServer(answer) as server:
        with pytest.raises(ReplyTooLarge, match="head"):
            await post(target(server), [b"{}"], 5.0)


async def test_the_server_closing_before_the_reply_is_whole_is_a_dropped_connection():
    async def answer(number, writer, request):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{")
        return False

    async with RawServer(answer) as server:
        with pytest.raises(ProtocolError, match="before its reply was whole"):
            await post(target(server), [b"{}"], 5.0)


async def test_a_large_body_is_sent_whole_while_the_socket_drains():
    big = b'{"x":"' + b"a" * (8 * 1024 * 1024) + b'"}'
    async with RawServer(answer_ok) as server:
        reply = await post(target(server), [big[:6], big[6:-2], big[-2:]], 10.0)
        assert reply.body == OK_BODY
        assert server.requests[0].endswith(big)


def test_only_plain_http_urls_without_credentials_or_odd_headers_are_taken():
    assert target_of("http://127.0.0.1:8000/v1/chat/completions") is not None
    assert target_of("http://[::1]:8000/v1/chat/completions").head.count(b"Host: [::1]:8000") == 1
    assert b"Host: example.org\r\n" in target_of("http://example.org/v1").head
    for url in ("https://api.openai.com/v1/chat/completions", "http://user:pw@127.0.0.1/v1", "ftp://x/y",
                "http://127.0.0.1:99999/v1", "http:///nohost", "http://127.0.0.1/v1#frag", "http://127.0.0.1/a b"):
        assert target_of(url) is None, url
    assert target_of("http://127.0.0.1/v1", (("Authorization", "Bearer sk\r\nX-Evil: 1"),)) is None


async def test_direct_calls_to_the_suites_server_and_its_429_with_retry_after():
    with OpenAIServer() as server:
        endpoint = DirectEndpoint(server.base_url.rstrip("/") + "/chat/completions", "sk-test-key-123456", "intern-1")
        body = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0.0}
        reply = await post_chat_completion(endpoint, body, 10.0)
        assert reply["choices"][0]["message"]["content"]
        server.inject("429", model="intern-1", retry_after=7)
        with pytest.raises(HTTPStatusError) as raised:
            await post_chat_completion(endpoint, body, 10.0)
        assert raised.value.status_code == 429
        error = classify_error("hosted_vllm/intern-1", raised.value)
        assert isinstance(error, TransientModelError) and error.retry_after == 7
        assert (await post_chat_completion(endpoint, body, 10.0))["choices"]
        assert server.recorded()[0].headers.get("Authorization") == "Bearer sk-test-key-123456"
        http11.close_pool()


async def test_a_dripping_suite_server_is_stopped_by_the_total_deadline():
    with OpenAIServer() as server:
        endpoint = DirectEndpoint(server.base_url.rstrip("/") + "/chat/completions", None, "intern-1")
        server.inject("drip", model="intern-1", delay=5.0)
        with pytest.raises(TimeoutError):  # without the deadline the dripped reply would arrive whole after 5 s
            await post_chat_completion(endpoint, {"messages": [{"role": "user", "content": "hi"}]}, 0.7)
        http11.close_pool()


def test_short_pieces_are_joined_and_an_image_part_is_never_copied():
    big = b"i" * (http11._SEPARATE_PIECE_BYTES + 1)
    joined = http11._coalesced([b"{", b'"a":', big, b",", b"}"])
    assert joined == [b'{"a":', big, b",}"] and joined[1] is big


# -- found by an adversarial review ------------------------------------------------------------------------------


async def test_an_error_reply_sent_before_the_body_is_read_is_what_the_caller_gets():
    """A server answering 413 to the head of a large request, then reading nothing: the reply, not a reset or a
    wait for the deadline."""
    async def refuse_unread(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"error": "too large"}'
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await asyncio.sleep(3)  # holds the socket open without reading the body
        writer.close()

    server = await asyncio.start_server(refuse_unread, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        found = target_of(f"http://127.0.0.1:{port}/v1/chat/completions", (("Content-Type", "application/json"),))
        reply = await post(found, [b'{"x":"', b"a" * (32 << 20), b'"}'], timeout=10)
        assert reply.status == 413 and b"too large" in reply.body
    finally:
        server.close()
        http11.close_pool()


async def test_a_pooled_connection_whose_close_the_loop_has_not_seen_is_not_reused():
    """The server closes right after its reply (no Connection: close) and the loop is busy: the next call opens
    a new connection instead of writing to a closed one."""
    async def answer_then_close(number, writer, request):
        writer.write(ok_reply())
        return False

    async with RawServer(answer_then_close) as server:
        found = target(server)
        assert (await post(found, [b"{}"], timeout=5)).status == 200
        await asyncio.sleep(0.2)
        import time
        time.sleep(0.2)  # the loop busy while the FIN arrives: the pool has not been told
        for _ in range(3):
            assert (await post(found, [b"{}"], timeout=5)).status == 200
        assert server.connections == 4 and len(server.requests) == 4


async def test_an_unasked_for_reply_on_an_idle_connection_is_not_taken_for_the_next_ones():
    async def answer_then_408(number, writer, request):
        writer.write(ok_reply())
        await writer.drain()
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    async with RawServer(answer_then_408) as server:
        found = target(server)
        assert (await post(found, [b"{}"], timeout=5)).status == 200
        import time
        time.sleep(0.3)  # the 408 arrives while the loop is busy
        assert (await post(found, [b"{}"], timeout=5)).status == 200
        assert server.connections == 2  # the 408's connection was dropped, never written to


async def test_a_gzip_body_cut_short_is_a_protocol_error_not_half_a_reply():
    whole = gzip.compress(b'{"ok": true, "padding": "' + b"x" * 200 + b'"}')
    cut = whole[: len(whole) // 2]

    async def answer_cut(number, writer, request):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(cut), cut))

    async with RawServer(answer_cut) as server:
        with pytest.raises(ProtocolError, match="ends before its compressed stream"):
            await post(target(server), [b"{}"], timeout=5)


async def test_a_content_length_of_non_ascii_digits_is_a_protocol_error():
    async def answer_odd(number, writer, request):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nxx")

    async with RawServer(answer_odd) as server:
        with pytest.raises(ProtocolError, match="malformed Content-Length"):
            await post(target(server), [b"{}"], timeout=5)


async def test_idle_connections_left_by_a_burst_are_closed_once_they_are_old(monkeypatch):
    monkeypatch.setattr(http11, "IDLE_KEPT_S", 0.2)
    async with RawServer(answer_ok) as server:
        found = target(server)
        await asyncio.gather(*(post(found, [b"{}"], timeout=5) for _ in range(20)))
        pool = http11._pool()
        assert len(pool.idle[found.key]) == 20
        await asyncio.sleep(0.3)
        for _ in range(3):  # one at a time now: the burst's connections are closed, not kept underneath
            await post(found, [b"{}"], timeout=5)
        assert len(pool.idle[found.key]) == 1
