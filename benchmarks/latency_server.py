"""An OpenAI-compatible chat-completions server that answers like the simulated MICS models after a set
latency, in a process of its own so that its CPU is not the client's.

    python -m benchmarks.latency_server --port 8765 --latency 0.1 --jitter 0.02 --error-rate 0.01

The role (mentor, intern, judge) comes from the model name. ``GET /stats`` gives the request count, and for
intern requests how many found their images + question prefix already seen here (``--prefix-capacity``
bounds how many prefixes it keeps, as a vLLM replica's prefix cache does). With ``--log-requests``,
``GET /requests`` gives every request as ``[model, case, arrived, answered]`` (wall-clock seconds; ``case`` is
the number of the benchmark case, from ``Case N:`` in its text, or -1), from which a benchmark computes each
model's calls and its busy slots over time.
Error-rate requests get an HTTP 500 (clients retry them). It stops after ``--lifetime`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import time
from collections import Counter, OrderedDict

from aiohttp import web

from mics_agents.models.base import ChatMessage, ModelRequest, TextPart
from mics_agents.models.simulated import simulated_reply


def _request(body: dict, sample_index: int = 0) -> ModelRequest:
    messages = []
    for message in body["messages"]:
        content = message["content"]
        text = content if isinstance(content, str) else "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
        messages.append(ChatMessage(message["role"], (TextPart(text),)))
    return ModelRequest(messages=tuple(messages), temperature=float(body.get("temperature", 1.0)), sample_index=sample_index)


def _role(model: str) -> str:
    for role in ("mentor", "intern", "judge", "generator"):
        if role in model:
            return role
    return "intern"


class PrefixCache:
    """What a vLLM replica's prefix cache holds, counted for intern requests: the key of each request's shared
    prefix (its images and the question, which come before the reasoning so far), the ``capacity`` most
    recently used kept (0: no bound). A request whose prefix is held is a hit."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: OrderedDict[str, None] = OrderedDict()

    def seen(self, key: str) -> bool:
        hit = key in self.held
        self.held[key] = None
        self.held.move_to_end(key)
        if self.capacity and len(self.held) > self.capacity:
            self.held.popitem(last=False)
        return hit


def prefix_key(body: dict) -> str:
    """The model, images and question of an intern request: everything before its ``## Reasoning so far``."""
    digest = hashlib.sha256(body["model"].encode())
    for message in body["messages"]:
        content = message["content"]
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if part.get("type") == "image_url":
                digest.update(part["image_url"]["url"].encode())
            else:
                text = part.get("text", "")
                digest.update(text.split("## Reasoning so far", 1)[0].encode())
                if "## Reasoning so far" in text:
                    return digest.hexdigest()
    return digest.hexdigest()


_CASE = re.compile(rb"Case (\d+):")


def _case_number(raw: bytes) -> int:
    match = _CASE.search(raw)
    return int(match.group(1)) if match else -1


def build_app(
    latency: float, jitter: float, error_rate: float, seed: int, bucket_rate: float = 0.0, prefix_capacity: int = 0,
    distinct_samples: bool = False, count_prefixes: bool = False, log_requests: bool = False,
) -> web.Application:
    rng = random.Random(seed)
    counters: dict = {"requests": 0, "errors": 0, "in_flight": 0, "peak_in_flight": 0, "first_request_at": None,
                      "rate_limited": 0, "intern_requests": 0, "prefix_hits": 0, "prefixes": 0}
    prefixes = PrefixCache(prefix_capacity)
    times_asked: Counter[str] = Counter()
    everything_seen: set[str] = set()
    # A provider's hidden rate limit: a token bucket of bucket_rate requests/s (a second's worth at most);
    # beyond it, HTTP 429 with Retry-After: 1.
    bucket = {"tokens": bucket_rate, "at": time.monotonic()}

    log: list[list] = []

    async def completions(request: web.Request) -> web.Response:
        arrived = time.time()  # wall clock: the benchmark compares it across processes
        if counters["first_request_at"] is None:
            counters["first_request_at"] = arrived
        raw = await request.read()
        body = json.loads(raw)
        entry = [body["model"], _case_number(raw), arrived, None] if log_requests else None
        if entry is not None:
            log.append(entry)
        counters["requests"] += 1
        if _role(body["model"]) == "intern":
            counters["intern_requests"] += 1
        if count_prefixes and _role(body["model"]) == "intern":
            key = prefix_key(body)
            counters["prefix_hits"] += prefixes.seen(key)
            if key not in everything_seen:
                everything_seen.add(key)
                counters["prefixes"] += 1  # distinct prefixes this replica was ever asked for
        if bucket_rate > 0:
            now = time.monotonic()
            bucket["tokens"] = min(bucket_rate, bucket["tokens"] + (now - bucket["at"]) * bucket_rate)
            bucket["at"] = now
            if bucket["tokens"] < 1:
                counters["rate_limited"] += 1
                return web.json_response({"error": {"message": "rate limited", "type": "rate_limit"}}, status=429,
                                         headers={"Retry-After": "1"})
            bucket["tokens"] -= 1
        counters["in_flight"] += 1
        counters["peak_in_flight"] = max(counters["peak_in_flight"], counters["in_flight"])
        try:
            await asyncio.sleep(max(0.0, latency + rng.uniform(-jitter, jitter)))
            if rng.random() < error_rate:
                counters["errors"] += 1
                return web.json_response({"error": {"message": "injected", "type": "server_error"}}, status=500)
            model = body["model"]
            # With n, choice k is answered as sample k. With --distinct-samples, the k-th time a request is asked
            # (or choice k of one with n, counting on from there) is sample k, so n or not, the answers are alike.
            count = int(body.get("n") or 1)
            first = 0
            if distinct_samples:
                asked = json.dumps({**body, "n": None}, sort_keys=True)
                first, times_asked[asked] = times_asked[asked], times_asked[asked] + count
            texts = [simulated_reply(_role(model), model, _request(body, first + k)) for k in range(count)]
        finally:
            counters["in_flight"] -= 1
            if entry is not None:
                entry[3] = time.time()
        return web.json_response({
            "id": f"chatcmpl-{counters['requests']}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": k, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        for k, text in enumerate(texts)],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20 * len(texts), "total_tokens": 100 + 20 * len(texts)},
        })

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counters)

    async def requests(request: web.Request) -> web.Response:
        return web.json_response(log)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/stats", stats)
    app.router.add_get("/requests", requests)
    return app


async def serve(
    port: int, latency: float, jitter: float, error_rate: float, lifetime: float, seed: int, bucket_rate: float = 0.0,
    prefix_capacity: int = 0, distinct_samples: bool = False, count_prefixes: bool = False, log_requests: bool = False,
) -> None:
    app = build_app(latency, jitter, error_rate, seed, bucket_rate, prefix_capacity, distinct_samples, count_prefixes,
                    log_requests)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    try:
        await asyncio.sleep(lifetime)
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per reply")
    parser.add_argument("--jitter", type=float, default=0.0, help="+/- seconds, uniform")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered with HTTP 500")
    parser.add_argument("--lifetime", type=float, default=1800.0, help="stop after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bucket-rate", type=float, default=0.0, help="requests/s before 429s (0: no limit)")
    parser.add_argument("--count-prefixes", action="store_true",
                        help="count intern requests whose prefix (images + question) was seen here before")
    parser.add_argument("--prefix-capacity", type=int, default=0,
                        help="with --count-prefixes: prefixes a replica's cache holds (0: no bound)")
    parser.add_argument("--distinct-samples", action="store_true",
                        help="answer the k-th asking of one request as sample k (as choice k of a request with n)")
    parser.add_argument("--log-requests", action="store_true",
                        help="keep every request's model, case, arrival and answer time (GET /requests)")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.latency, args.jitter, args.error_rate, args.lifetime, args.seed, args.bucket_rate,
                      args.prefix_capacity, args.distinct_samples, args.count_prefixes, args.log_requests))


if __name__ == "__main__":
    main()
