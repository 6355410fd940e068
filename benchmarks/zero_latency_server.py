"""An OpenAI-compatible chat-completions server that answers at once, in a process of its own: raw asyncio
(no web framework), one reply per request as soon as its body is in, the simulated MICS models' answers.

    python -m benchmarks.zero_latency_server --port 8766 [--record]

A text request is answered in tens of microseconds of this process's CPU (parsing the JSON body dominates a
request with data-URL images), so a client's own CPU, not the server, sets the pace. ``GET /stats`` gives
request counts by role and the wall-clock time (``time.time()``) of the first chat request (``GET /reset-first``
makes the next one the first again). With ``--record``,
``GET /recorded`` gives the intern request bodies seen so far, each image URL replaced by
``{"image_ref": N}`` and the URLs listed once under ``images`` (so a client can send the same bodies again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from mics_agents.models.base import ChatMessage, ModelRequest, TextPart
from mics_agents.models.simulated import simulated_reply


def _role(model: str) -> str:
    for role in ("mentor", "intern", "judge"):
        if role in model:
            return role
    return "intern"


class State:
    def __init__(self, record: bool) -> None:
        self.counters: dict[str, Any] = {"requests": 0, "mentor_requests": 0, "intern_requests": 0,
                                         "judge_requests": 0, "first_request_at": None, "image_parts": 0,
                                         "file_image_parts": 0, "request_bytes": 0}
        self.record = record
        self.recorded: list[dict[str, Any]] = []
        self.images: dict[str, int] = {}

    def answer(self, body: dict[str, Any]) -> bytes:
        counters = self.counters
        if counters["first_request_at"] is None:
            counters["first_request_at"] = time.time()  # wall clock: compared with the launch in another process
        counters["requests"] += 1
        model = body["model"]
        role = _role(model)
        counters[f"{role}_requests"] += 1
        messages = []
        for message in body["messages"]:
            content = message["content"]
            if isinstance(content, str):
                text = content
            else:
                text = "\n".join(part.get("text", "") for part in content if part.get("type") == "text")
                for part in content:
                    if part.get("type") == "image_url":
                        counters["image_parts"] += 1
                        counters["file_image_parts"] += part["image_url"]["url"].startswith("file://")
            messages.append(ChatMessage(message["role"], (TextPart(text),)))
        if self.record and role == "intern":
            self.recorded.append(self._without_images(body))
        count = int(body.get("n") or 1)
        texts = [simulated_reply(role, model, ModelRequest(messages=tuple(messages),
                                                           temperature=float(body.get("temperature", 1.0)),
                                                           sample_index=k))
                 for k in range(count)]
        return json.dumps({
            "id": f"chatcmpl-{counters['requests']}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": k, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        for k, text in enumerate(texts)],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20 * count, "total_tokens": 100 + 20 * count},
        }).encode()

    def _without_images(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = []
        for message in body["messages"]:
            content = message["content"]
            if not isinstance(content, str):
                parts = []
                for part in content:
                    if part.get("type") == "image_url":
                        url = part["image_url"]["url"]
                        part = {"type": "image_url", "image_url": {"image_ref": self.images.setdefault(url, len(self.images))}}
                    parts.append(part)
                content = parts
            messages.append({**message, "content": content})
        return {**body, "messages": messages}

    def recorded_json(self) -> bytes:
        urls = sorted(self.images, key=self.images.__getitem__)
        return json.dumps({"bodies": self.recorded, "images": urls}).encode()


def _response(status: str, payload: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n"
            f"connection: keep-alive\r\n\r\n").encode() + payload


class Connection(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            method, path, _ = head[0].split(" ", 2)
            assert self.transport is not None
            self.transport.write(self.handle(method, path, body))

    def handle(self, method: str, path: str, body: bytes) -> bytes:
        state = self.state
        try:
            if method == "POST" and path.endswith("/chat/completions"):
                state.counters["request_bytes"] += len(body)
                return _response("200 OK", state.answer(json.loads(body)))
            if path == "/stats":
                return _response("200 OK", json.dumps(state.counters).encode())
            if path == "/reset-first":  # the next chat request is timed as a first one again
                state.counters["first_request_at"] = None
                return _response("200 OK", b"{}")
            if path == "/recorded":
                return _response("200 OK", state.recorded_json())
            return _response("404 Not Found", b'{"error":{"message":"not found"}}')
        except Exception as exc:  # a bad request is answered, not a dropped connection
            return _response("500 Internal Server Error", json.dumps({"error": {"message": repr(exc)}}).encode())


async def serve(port: int, lifetime: float, record: bool) -> None:
    state = State(record)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(state), "127.0.0.1", port, backlog=4096)
    print(f"listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await asyncio.sleep(lifetime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--lifetime", type=float, default=3600.0, help="stop after this many seconds")
    parser.add_argument("--record", action="store_true", help="keep the intern request bodies for GET /recorded")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.lifetime, args.record))


if __name__ == "__main__":
    main()
