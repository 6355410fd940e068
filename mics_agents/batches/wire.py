"""What one batched call looks like on each provider's wire, and what its result line says.

A batched request is the same request an online call sends (the same messages, images as base64, the same
temperature and reply budget), written as one line of the provider's batch format with the request's bare
cache key as ``custom_id``; a result line becomes the same :class:`ModelResponse` an online call gives,
priced at the batch rate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..errors import MalformedReplyError
from ..models.base import ImagePart, ModelRequest, ModelResponse, TextPart
from ..models.transport import choice_responses, finish_reason_of, token_count

__all__ = ["Provider", "BatchRoute", "ResultLine", "openai_line", "anthropic_request", "parse_openai_line",
           "parse_anthropic_line", "estimated_tokens", "request_bytes"]

Provider = Literal["openai", "anthropic"]

# Per provider: requests and bytes one batch may hold (OpenAI: 50,000 and a 200 MB file; Anthropic: 100,000
# and 256 MB), the bytes with room to spare for the JSON around each request.
PROVIDER_LIMITS: dict[str, tuple[int, int]] = {
    "openai": (50_000, 190 * 1024 * 1024),
    "anthropic": (100_000, 240 * 1024 * 1024),
}
# What a batch is counted at when it is submitted, before its replies say what it cost: each image as this
# many input tokens (a 1-megapixel image at OpenAI's high detail is 1,105), each reply as long as its budget,
# or this long without one.
ESTIMATED_IMAGE_TOKENS = 1_100
ESTIMATED_REPLY_TOKENS = 2_048
# Anthropic takes temperatures from 0 to 1 (the published mentor temperature is 1.2).
ANTHROPIC_MAX_TEMPERATURE = 1.0


@dataclass(frozen=True)
class BatchRoute:
    """Where a batched model's calls go: the provider's batch API at ``endpoint`` (a base URL, never a key),
    the model name the provider knows, and USD per input and output token online and batched."""

    provider: Provider
    endpoint: str
    wire_model: str
    online_prices: tuple[float, float]
    batch_prices: tuple[float, float]
    anthropic_max_tokens: int = 8192

    def group(self) -> tuple[str, str, str]:
        """Calls that may share one batch: OpenAI takes one model per batch file, Anthropic mixes them."""
        return (self.provider, self.endpoint, self.wire_model if self.provider == "openai" else "")

    def online_cost(self, tokens_in: int, tokens_out: int) -> float:
        return tokens_in * self.online_prices[0] + tokens_out * self.online_prices[1]

    def batch_cost(self, tokens_in: int, tokens_out: int) -> float:
        return tokens_in * self.batch_prices[0] + tokens_out * self.batch_prices[1]


@dataclass
class ResultLine:
    """One request's outcome in a batch's results: ``succeeded`` with its reply, or why not."""

    custom_id: str
    outcome: Literal["succeeded", "errored", "expired", "canceled"]
    response: ModelResponse | None = None
    error: str = ""


def openai_line(custom_id: str, request: ModelRequest, route: BatchRoute) -> bytes:
    """One line of an OpenAI batch input file (``/v1/chat/completions``)."""
    body: dict[str, Any] = {"model": route.wire_model, "messages": request.openai_messages(),
                            "temperature": request.temperature}
    if request.max_tokens is not None:
        body["max_completion_tokens"] = request.max_tokens
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def anthropic_request(custom_id: str, request: ModelRequest, route: BatchRoute) -> dict[str, Any]:
    """One entry of an Anthropic message batch's ``requests``: system text apart, images as base64 blocks,
    ``max_tokens`` always (Anthropic requires it: the role's budget, else the batch default)."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role == "system":
            system.append(message.plain_text())
            continue
        blocks = [
            {"type": "text", "text": part.text}
            if isinstance(part, TextPart)
            else {"type": "image", "source": {"type": "base64", "media_type": part.mime,
                                               "data": part.data_url().partition(",")[2]}}
            for part in message.parts
        ]
        messages.append({"role": message.role, "content": blocks})
    params: dict[str, Any] = {
        "model": route.wire_model,
        "max_tokens": request.max_tokens if request.max_tokens is not None else route.anthropic_max_tokens,
        "messages": messages,
        "temperature": min(request.temperature, ANTHROPIC_MAX_TEMPERATURE),
    }
    if system:
        params["system"] = "\n\n".join(system)
    return {"custom_id": custom_id, "params": params}


def _priced(name: str, route: BatchRoute, text: Any, tokens_in: Any, tokens_out: Any, finish: str | None) -> ModelResponse:
    """The reply at the batch price, carrying what it would have cost online (``extra["online_cost_usd"]``, kept
    in the cache and summed into each record's usage, so the report can say what batching saved)."""
    choice = {"index": 0, "message": {"content": text}, "finish_reason": finish}
    response = choice_responses(name, [choice], 1, input_tokens=tokens_in, output_tokens=tokens_out,
                                price=route.batch_cost)[0]
    if "usage_unknown" in response.extra:
        return response  # no cost either way
    online = route.online_cost(response.input_tokens, response.output_tokens)
    return replace(response, extra={**response.extra, "online_cost_usd": online})


def parse_openai_line(line: dict[str, Any], name: str, route: BatchRoute) -> ResultLine:
    """A line of an OpenAI batch's output or error file."""
    custom_id = str(line.get("custom_id") or "")
    response = line.get("response") if isinstance(line.get("response"), dict) else {}
    error = line.get("error") if isinstance(line.get("error"), dict) else None
    status = response.get("status_code")
    body = response.get("body") if isinstance(response.get("body"), dict) else {}
    if error is None and status == 200:
        choices = body.get("choices") if isinstance(body.get("choices"), list) else []
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        try:
            first = choices[0] if choices else {}
            message = first.get("message") if isinstance(first, dict) else None
            text = message.get("content") if isinstance(message, dict) else None
            reply = _priced(name, route, text, usage.get("prompt_tokens"), usage.get("completion_tokens"),
                            finish_reason_of(first))
        except MalformedReplyError as exc:
            return ResultLine(custom_id, "errored", error=str(exc))
        return ResultLine(custom_id, "succeeded", reply)
    code = str((error or {}).get("code") or "")
    said = error or (body.get("error") if isinstance(body.get("error"), dict) else {})
    message = str(said.get("message") or "")
    if code == "batch_expired":
        return ResultLine(custom_id, "expired", error=message or "the batch expired before this request ran")
    if code == "batch_cancelled":
        return ResultLine(custom_id, "canceled", error=message or "the batch was cancelled")
    return ResultLine(custom_id, "errored", error=f"HTTP {status}: {message}" if status else message or code or "error")


_ANTHROPIC_FINISH = {"max_tokens": "length", "end_turn": "stop", "stop_sequence": "stop"}


def parse_anthropic_line(line: dict[str, Any], name: str, route: BatchRoute) -> ResultLine:
    """A line of an Anthropic message batch's results."""
    custom_id = str(line.get("custom_id") or "")
    result = line.get("result") if isinstance(line.get("result"), dict) else {}
    kind = result.get("type")
    if kind == "succeeded":
        message = result.get("message") if isinstance(result.get("message"), dict) else {}
        blocks = message.get("content") if isinstance(message.get("content"), list) else []
        text = "".join(block.get("text", "") for block in blocks
                       if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str))
        usage = message.get("usage") if isinstance(message.get("usage"), dict) else {}
        stop = message.get("stop_reason")
        try:
            reply = _priced(name, route, text, usage.get("input_tokens"), usage.get("output_tokens"),
                            _ANTHROPIC_FINISH.get(stop, stop) if isinstance(stop, str) else None)
        except MalformedReplyError as exc:
            return ResultLine(custom_id, "errored", error=str(exc))
        return ResultLine(custom_id, "succeeded", reply)
    if kind in ("expired", "canceled"):
        return ResultLine(custom_id, kind, error=f"the request {kind}")
    error = result.get("error") if isinstance(result.get("error"), dict) else {}
    inner = error.get("error") if isinstance(error.get("error"), dict) else error
    return ResultLine(custom_id, "errored", error=f"{inner.get('type', 'error')}: {inner.get('message', '')}".strip(": "))


def estimated_tokens(request: ModelRequest, route: BatchRoute) -> tuple[int, int]:
    """Input and output tokens a request is counted at before its reply says: text at four characters a
    token, images at :data:`ESTIMATED_IMAGE_TOKENS`, the reply at its whole budget."""
    characters = sum(len(part.text) for message in request.messages for part in message.parts if isinstance(part, TextPart))
    images = sum(1 for message in request.messages for part in message.parts if isinstance(part, ImagePart))
    budget = request.max_tokens
    if budget is None:
        budget = route.anthropic_max_tokens if route.provider == "anthropic" else ESTIMATED_REPLY_TOKENS
    return math.ceil(characters / 4) + images * ESTIMATED_IMAGE_TOKENS, budget


def request_bytes(request: ModelRequest) -> int:
    """About how many bytes a request takes in a batch (images as base64), to keep batches under the limit."""
    size = 512
    for message in request.messages:
        for part in message.parts:
            size += len(part.text.encode("utf-8")) + 16 if isinstance(part, TextPart) else len(part.data) * 4 // 3 + 96
    return size


def token_counts(response: ModelResponse) -> tuple[int, int]:
    return token_count(response.input_tokens) or 0, token_count(response.output_tokens) or 0
