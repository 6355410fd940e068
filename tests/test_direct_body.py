"""The direct transport's request body (issue 20): the same JSON as the OpenAI chat request, with each image's
content part encoded once and spliced in, and bodies that would hold up the event loop built in a thread."""

from __future__ import annotations

import hashlib
import json
import os
import threading

from mics_agents.models.base import ChatMessage, ImagePart, ModelRequest, TextPart
from mics_agents.models import direct
from mics_agents.models.direct import OFF_LOOP_IMAGE_BYTES, _needs_a_thread, request_body


def image(size: int, seed: int = 0) -> ImagePart:
    data = os.urandom(size) if seed == 0 else bytes((seed + i) % 251 for i in range(size))
    return ImagePart(data=data, mime="image/png", sha256=hashlib.sha256(data).hexdigest(), label=f"img{seed}")


def a_request(*images: ImagePart, text: str = "Ünïcode \"quoted\" \\ and\nnew lines \u2028") -> ModelRequest:
    return ModelRequest(
        messages=(
            ChatMessage.text("system", "You are an intern."),
            ChatMessage("user", (*images, TextPart(text), TextPart("## Your task"))),
            ChatMessage.text("assistant", "Step 1"),
        ),
        temperature=0.7,
        max_tokens=64,
    )


def test_the_body_is_the_openai_request_whatever_the_text():
    request = a_request(image(3000, seed=1), image(5000, seed=2))
    body = request_body(request, "Qwen/Qwen2.5-VL-7B", {"temperature": 0.7, "max_tokens": 64})
    assert json.loads(body) == {
        "model": "Qwen/Qwen2.5-VL-7B", "messages": request.openai_messages(), "temperature": 0.7, "max_tokens": 64,
    }
    text_only = ModelRequest(messages=(ChatMessage.text("user", "plain"),), temperature=1.0)
    assert json.loads(request_body(text_only, "m", {"temperature": 1.0})) == {
        "model": "m", "messages": [{"role": "user", "content": "plain"}], "temperature": 1.0,
    }


def test_an_image_is_encoded_once_and_the_same_bytes_go_into_every_body():
    shared = image(200_000, seed=3)
    first = request_body(a_request(shared, text="candidate 1"), "m", {})
    fragment = shared.json_part()
    second = request_body(a_request(shared, text="candidate 2"), "m", {})
    assert shared.json_part() is fragment  # not encoded again
    assert fragment in first and fragment in second


def test_a_first_encoding_or_a_large_body_is_built_off_the_event_loop():
    assert not _needs_a_thread(a_request())
    fresh = image(1000, seed=4)
    assert _needs_a_thread(a_request(fresh))  # its base64 is not made yet
    fresh.json_part()
    assert not _needs_a_thread(a_request(fresh))
    big = [image(OFF_LOOP_IMAGE_BYTES // 4 + 1, seed=5 + i) for i in range(3)]
    for part in big:
        part.json_part()
    assert _needs_a_thread(a_request(*big))


async def test_the_direct_transport_builds_a_first_image_body_in_a_worker_thread(monkeypatch):
    threads = []
    real = direct.request_pieces

    def recording(*args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    async def fake_post(endpoint, body, timeout):
        return {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}], "usage": {}}

    monkeypatch.setattr(direct, "request_pieces", recording)
    monkeypatch.setattr(direct, "post_chat_completion", fake_post)
    transport = direct.DirectTransport("hosted_vllm/m", direct.DirectEndpoint("http://127.0.0.1:9/v1", None, "m"), timeout=5)
    shared = image(10_000, seed=9)
    await transport._send(a_request(shared), 5)
    await transport._send(a_request(shared, text="again"), 5)
    assert threads == [False, True]  # first: a worker thread encodes the image; then spliced on the loop


def test_short_pieces_are_joined_and_an_image_part_is_sent_as_the_bytes_it_was_encoded_to():
    large, small = image(100_000, seed=7), image(300, seed=8)
    request = a_request(large, small)
    pieces = direct.request_pieces(request, "m", {"temperature": 0.7})
    body = direct._pieces_payload(pieces)
    written = body._value
    assert b"".join(written) == request_body(request, "m", {"temperature": 0.7})
    assert any(piece is large.json_part() for piece in written)  # the big part is not copied into a body
    assert len(written) == 3  # before it, itself, and everything after it (the small image included)
    text_only = direct._pieces_payload(direct.request_pieces(a_request(), "m", {}))
    assert isinstance(text_only, bytes) and json.loads(text_only)["model"] == "m"
