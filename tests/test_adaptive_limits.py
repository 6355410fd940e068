"""Adaptive per-model concurrency (issue 20): on a 429 a model's calls in flight halve (once per burst), then
grow back by one slot per window of successful calls up to the configured limit (AIMD)."""

from __future__ import annotations

import asyncio

from mics_agents.errors import TransientModelError
from mics_agents.models.base import ChatMessage, Model, ModelRequest, ModelResponse, TextPart
from mics_agents.models.factory import open_model
from mics_agents.models.limits import LimitingModel, model_limit

from .test_litellm_http import make_settings, server  # noqa: F401


def request(number: int) -> ModelRequest:
    return ModelRequest(
        messages=(ChatMessage("user", (TextPart(f"## Question\nCase {number}?\n\n## Reasoning so far\n(none)"),)),),
        temperature=0.3,
    )


class Bucket(Model):
    """Answers 429 while ``refusing`` is set; counts calls in flight."""

    name = "openai/bucket"

    def __init__(self) -> None:
        self.refusing = False
        self.in_flight = self.peak = 0

    async def request(self, request: ModelRequest) -> ModelResponse:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            if self.refusing:
                raise TransientModelError("HTTP 429", model=self.name, status_code=429, retry_after=0.0)
            return ModelResponse(text="ok", model=self.name)
        finally:
            self.in_flight -= 1


async def test_a_burst_of_429s_halves_the_limit_once_and_successes_bring_it_back():
    bucket = Bucket()
    model = LimitingModel(bucket, limit=16)
    limit = model_limit(bucket.name)
    bucket.refusing = True
    outcomes = await asyncio.gather(*(model.request(request(n)) for n in range(16)), return_exceptions=True)
    assert all(isinstance(outcome, TransientModelError) for outcome in outcomes)
    assert limit.decreases == 1 and limit.limit == 8  # 16 calls in flight together: one halving

    bucket.refusing = False
    bucket.peak = 0
    await asyncio.gather(*(model.request(request(n)) for n in range(40)))
    assert bucket.peak <= 12  # grew from 8 by about one slot per window of successes, not back at once
    for _ in range(10):
        await asyncio.gather(*(model.request(request(n)) for n in range(40)))
    assert limit.window is None and limit.limit == 16  # recovered up to the configured ceiling, and stops there
    await model.aclose()


async def test_without_adapting_a_429_leaves_the_limit_alone():
    bucket = Bucket()
    bucket.name = "openai/fixed"
    model = LimitingModel(bucket, limit=16, adaptive=False)
    bucket.refusing = True
    await asyncio.gather(*(model.request(request(n)) for n in range(16)), return_exceptions=True)
    assert model_limit("openai/fixed").limit == 16
    await model.aclose()


async def test_the_adaptive_limit_backs_off_on_429s_from_the_server_and_recovers(server):  # noqa: F811
    settings = make_settings(None, model_concurrency=16, max_retries=4, retry_initial_wait=0.01, retry_max_wait=0.05)
    model = open_model("openai/intern-1", settings)
    limit = model_limit("openai/intern-1")
    server.inject("429", model="intern-1", times=6, retry_after=0.05)
    try:
        replies = await asyncio.wait_for(asyncio.gather(*(model.request(request(n)) for n in range(32))), 30)
        assert len(replies) == 32  # every call went through, the 429s retried after Retry-After
        assert limit.decreases >= 1 and limit.limit < 16
        for round_number in range(20):
            if limit.window is None:
                break
            await asyncio.wait_for(asyncio.gather(*(model.request(request(1000 * round_number + n)) for n in range(32))), 30)
        assert limit.limit == 16 and limit.window is None
    finally:
        await model.aclose()
    assert sum(1 for record in server.recorded() if record.status == 429) == 6
