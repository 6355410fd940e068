"""The direct transport's lean hot path (issue 30): its own JSON quoting gives exactly json.dumps' JSON, and
replies are read as bytes with the same results (UTF-8 text intact, an error body that is not UTF-8 still said)."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from mics_agents.models.base import ChatMessage, ModelRequest, TextPart
from mics_agents.models.direct import DirectEndpoint, HTTPStatusError, _dumps, post_chat_completion, request_body

ODD_TEXTS = ["", "plain", 'quote " back \\ slash', "new\nline\ttab\r\x00\x1f\x7f", "\u2028\u2029", "Ünïcödé 日本 🩻",
             "</script>", "\ud7ff\ue000\uffff"]


@pytest.mark.parametrize("value", [*ODD_TEXTS, 0.7, 1, 0, 2.0, 1e-7, 12345678901234567890, None, True, [1, "a"]])
def test_our_json_is_json_dumps_json(value):
    assert _dumps(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_every_role_and_text_gives_the_openai_request(text):
    request = ModelRequest(
        messages=(ChatMessage.text("system", text), ChatMessage("user", (TextPart(text), TextPart("x"))),
                  ChatMessage.text("assistant", text)),
        temperature=0.3, max_tokens=7,
    )
    for model in ("m", 'odd "model" ü'):
        assert json.loads(request_body(request, model, {"temperature": 0.3, "max_tokens": 7, "n": 2})) == {
            "model": model, "messages": request.openai_messages(), "temperature": 0.3, "max_tokens": 7, "n": 2,
        }


def test_a_lone_surrogate_is_refused_as_before():
    with pytest.raises(UnicodeEncodeError):
        _dumps("broken \ud800 text")


async def answer_with(body: bytes, status: int, content_type: str):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, status=status, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await post_chat_completion(DirectEndpoint(f"http://127.0.0.1:{port}/v1/chat/completions", "k", "m"),
                                          b"{}", 5.0)
    finally:
        from mics_agents.models.direct import close_session

        await close_session()
        await runner.cleanup()


def test_a_reply_is_read_as_utf8_json_whatever_charset_the_header_names():
    reply = {"choices": [{"index": 0, "message": {"content": "Befund: Pneumothorax links – ü 🩻"}}]}
    encoded = json.dumps(reply, ensure_ascii=False).encode("utf-8")
    for content_type in ("application/json", "application/json; charset=utf-8", "text/plain"):
        assert asyncio.run(answer_with(encoded, 200, content_type)) == reply


def test_an_error_body_that_is_not_utf8_is_still_reported():
    with pytest.raises(HTTPStatusError) as caught:
        asyncio.run(answer_with(b"bad gateway \xff\xfe here", 502, "text/plain"))
    assert caught.value.status_code == 502 and "bad gateway" in str(caught.value)


def test_a_reply_that_is_not_json_raises_what_the_transport_retries():
    with pytest.raises(json.JSONDecodeError):
        asyncio.run(answer_with(b'{"choices": [', 200, "application/json"))


def test_the_fast_final_answer_scan_finds_exactly_what_the_pattern_finds():
    """parse_solution scans for the final-answer marker from just before its lower-case core (issue 30): the
    same matches as the full pattern, for random mixes of its pieces, case, blanks, markup and non-ASCII
    look-alikes (a long s, a dotted I: the full pattern is used for them)."""
    import random

    from mics_agents import answers

    rng = random.Random(30)
    atoms = ["the", "The", "THE", " ", "\t", "#", "##", "**", "__", "final", "Final", "answer", "ANSWER", "is", ":",
             "：", "x", "\n", "thefinal", "answeris", "ſ", "İ", "B", "*", "_", "the final answer is", "### Step 1: a"]
    for _ in range(20_000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 16)))
        expected = [(match.start(), match.end()) for match in answers._FINAL_ANSWER.finditer(text)]
        assert [(match.start(), match.end()) for match in answers._final_markers(text)] == expected, text
    reply = "### Step 1: cystic.\n\n**The Final Answer is:** **B**\n\n## the final answer is: C"
    assert answers.parse_solution(reply).final_answer == "C"
    assert answers.parse_solution("No marker, the finale: B").final_answer is None
