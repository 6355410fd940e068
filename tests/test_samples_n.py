"""Several samples of one intern call as one request with ``n`` (issue 20): where the endpoint takes ``n``
(a Router deployment's ``model_info: {supports_n: true}``, a ``hosted_vllm/`` server), the samples at one
temperature go out as one request holding one limit slot; each choice is cached under its own sample
index, so a rerun (with or without ``n``) replays them and a partial hit asks only for the missing ones."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest
import yaml

from mics_agents.agents import Case, Intern
from mics_agents.errors import MalformedReplyError, ModelCallError
from mics_agents.models import CachedModel, ChatMessage, FunctionModel, ModelRequest, TextPart
from mics_agents.models.base import Model, ModelResponse
from mics_agents.models.direct import DirectEndpoint, DirectTransport
from mics_agents.models.factory import _transport, open_model, with_store
from mics_agents.models.limits import LimitingModel
from mics_agents.models.providers import load_router
from mics_agents.models.retrying import RetryingModel
from mics_agents.models.transport import choice_responses, split_usage
from mics_agents.models.validating import ValidatingModel
from mics_agents.search import Searcher
from mics_agents.store import Store

from .openai_server import OpenAIServer
from .scripted import settings as scripted_settings
from .test_litellm_http import ANSWER, CASE_INFO, IMAGE, QUESTION, SECRET, comparable, make_settings, png  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:Items .* using the `ReadOnly` qualifier:UserWarning")


def request(text: str = "Which finding?", *, max_tokens: int | None = None) -> ModelRequest:
    return ModelRequest(messages=(ChatMessage("user", (TextPart(text),)),), temperature=1.2, max_tokens=max_tokens)


class SampledModel(Model):
    """An endpoint that takes ``n``: one call answers every sample asked. Records the sample indices of each
    call; every reply says which call made it, so a stored reply is told apart from a fresh one."""

    sends_samples_together = True

    def __init__(self, name: str = "intern", *, delay: float = 0.0, cut_off: frozenset[int] = frozenset()) -> None:
        self.name = name
        self.delay = delay
        self.cut_off = cut_off  # samples whose reply is cut by a budget under 100 tokens
        self.calls: list[list[int]] = []
        self.budgets: list[int | None] = []
        self.in_flight = self.peak_in_flight = 0
        self.cancelled = 0

    async def request(self, request: ModelRequest) -> ModelResponse:
        return (await self.request_samples(request, [request.sample_index]))[0]

    async def request_samples(self, request: ModelRequest, sample_indices) -> list[ModelResponse]:
        call = len(self.calls)
        self.calls.append(list(sample_indices))
        self.budgets.append(request.max_tokens)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        replies = []
        for index in sample_indices:
            cut = index in self.cut_off and (request.max_tokens or 0) < 100
            replies.append(ModelResponse(
                f"### The final answer is: sample {index} from call {call}", self.name, input_tokens=30,
                output_tokens=5, finish_reason="length" if cut else "stop",
            ))
        return replies


def cached_stack(model: Model, store: Store) -> CachedModel:
    """The factory's order of wrappers, around a test endpoint."""
    return CachedModel(ValidatingModel(RetryingModel(LimitingModel(model, limit=8), max_retries=0)), store)


async def test_samples_asked_together_are_stored_under_their_own_sample_index(tmp_path):
    model = SampledModel()
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        replies = await cached.request_samples(request(), [0, 1, 2])
        assert model.calls == [[0, 1, 2]]  # one call for all three
        assert [reply.text for reply in replies] == [f"### The final answer is: sample {k} from call 0" for k in range(3)]
        assert [reply.cached for reply in replies] == [False] * 3
        # Each sample is found on its own, as a call without n would look it up...
        alone = await cached.request(replace(request(), sample_index=2))
        assert (alone.text, alone.cached) == ("### The final answer is: sample 2 from call 0", True)
        # ...and asked together again, nothing is sent.
        again = await cached.request_samples(request(), [0, 1, 2])
        assert [reply.text for reply in again] == [reply.text for reply in replies] and all(r.cached for r in again)
        assert model.calls == [[0, 1, 2]]


async def test_a_partial_hit_asks_only_for_the_samples_not_stored(tmp_path):
    model = SampledModel()
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        stored = await cached.request(replace(request(), sample_index=1))
        replies = await cached.request_samples(request(), [0, 1, 2, 3])
    assert model.calls == [[1], [0, 2, 3]]
    assert replies[1].text == stored.text and replies[1].cached
    assert [reply.text.rsplit(" ", 4)[1:] for reply in replies] == [
        ["0", "from", "call", "1"], ["1", "from", "call", "0"], ["2", "from", "call", "1"], ["3", "from", "call", "1"]
    ]


async def test_a_sample_in_flight_elsewhere_is_waited_for_not_asked_twice(tmp_path):
    model = SampledModel(delay=0.05)
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        first, second = await asyncio.gather(
            cached.request_samples(request(), [0, 1, 2]), cached.request_samples(request(), [1, 2, 3])
        )
    assert sorted(model.calls) == [[0, 1, 2], [3]]
    assert [reply.text for reply in second[:2]] == [reply.text for reply in first[1:]]
    # Paid once: the reply a second caller shares is counted as cached there.
    assert [reply.cached for reply in second] == [True, True, False]


async def test_cancelling_one_caller_keeps_the_shared_request_for_the_others(tmp_path):
    model = SampledModel(delay=0.2)
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        owner = asyncio.create_task(cached.request_samples(request(), [0, 1]))
        await asyncio.sleep(0.02)
        sharer = asyncio.create_task(cached.request_samples(request(), [1]))
        await asyncio.sleep(0.02)
        owner.cancel()
        [reply] = await sharer
        assert reply.text == "### The final answer is: sample 1 from call 0"
        assert model.calls == [[0, 1]] and model.cancelled == 0
        # The request finished, so both of its paid replies were stored.
        assert (await cached.request(replace(request(), sample_index=0))).cached

        # When every caller is gone, the request is cancelled and nothing is stored.
        lone = asyncio.create_task(cached.request_samples(request("another"), [0, 1, 2]))
        for _ in range(200):  # bounded: until the request is with the model (after the store lookups)
            if len(model.calls) == 2:
                break
            await asyncio.sleep(0.01)
        lone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lone
        for _ in range(100):  # the cancellation reaches the model through the wrappers' tasks
            if model.cancelled:
                break
            await asyncio.sleep(0.01)
        assert model.cancelled == 1
        assert await store.get_call(replace(request("another"), sample_index=0).cache_key("intern")) is None


async def test_one_request_with_n_holds_one_limit_slot_and_samples_sent_apart_one_each():
    together = SampledModel(delay=0.05)
    limited = LimitingModel(together, limit=1)
    await asyncio.gather(*(limited.request_samples(request(f"case {k}"), [0, 1, 2, 3]) for k in range(3)))
    assert together.calls == [[0, 1, 2, 3]] * 3 and together.peak_in_flight == 1

    # A model without n: each sample is its own request and takes its own slot (never four under one).
    in_flight = peak = 0

    async def one(req: ModelRequest) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return f"sample {req.sample_index}"

    apart = FunctionModel("intern-apart", one)  # another name: limits are shared by name
    replies = await LimitingModel(apart, limit=2).request_samples(request(), [0, 1, 2, 3])
    assert [reply.text for reply in replies] == [f"sample {k}" for k in range(4)]
    assert len(apart.requests) == 4 and peak == 2


async def test_a_cut_off_sample_alone_is_asked_again_with_twice_the_budget(tmp_path):
    model = SampledModel(cut_off=frozenset({1}))
    config = scripted_settings(samples_per_temperature=3, intern_max_tokens=64)
    async with await Store.open(tmp_path / "c.sqlite") as store:
        intern = Intern(with_store(model, store), config)
        replies = await intern.finish_samples(Case("r", "Which?", "A"), ["### Step 1: x"], 1.2, range(3))
    assert model.calls == [[0, 1, 2], [1]] and model.budgets == [64, 128]
    assert [len(reply.responses) for reply in replies] == [1, 2, 1]
    assert [reply.answer for reply in replies] == ["sample 0 from call 0", "sample 1 from call 1", "sample 2 from call 0"]


@pytest.mark.parametrize("total, weights, expected", [
    (10, [1, 1, 1], [4, 3, 3]),
    (7, [0, 0], [4, 3]),
    (0, [5, 1], [0, 0]),
    (100, [30, 10], [75, 25]),
    (5, [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]),
])
def test_split_usage_shares_out_whole_tokens_that_add_up(total, weights, expected):
    assert split_usage(total, weights) == expected


def test_split_usage_always_adds_up_and_stays_near_the_proportion():
    rng = random.Random(3)
    for _ in range(500):
        weights = [rng.randint(0, 50) for _ in range(rng.randint(1, 8))]
        total = rng.randint(0, 10_000)
        shares = split_usage(total, weights)
        assert sum(shares) == total and min(shares) >= 0
        if sum(weights):
            assert all(abs(share - total * w / sum(weights)) < 1 for share, w in zip(shares, weights))


def test_choices_come_back_in_index_order_with_usage_and_cost_shared_out():
    choices = [
        {"index": 1, "message": {"content": "### The final answer is: B, after a long look"}, "finish_reason": "stop"},
        {"index": 0, "message": {"content": "### The final answer is: A"}, "finish_reason": "length"},
    ]
    replies = choice_responses("m", choices, 2, input_tokens=101, output_tokens=30,
                               price=lambda tokens_in, tokens_out: tokens_in * 1e-6 + tokens_out * 2e-6)
    assert [reply.text[-1] for reply in replies] == ["A", "k"]
    assert [reply.finish_reason for reply in replies] == ["length", "stop"]
    assert sum(reply.input_tokens for reply in replies) == 101 and sum(reply.output_tokens for reply in replies) == 30
    assert replies[0].output_tokens < replies[1].output_tokens  # by the length of each text
    assert sum(reply.cost_usd for reply in replies) == pytest.approx(101e-6 + 60e-6)


def test_a_reply_with_fewer_choices_than_n_or_an_empty_one_is_refused():
    one = [{"index": 0, "message": {"content": "### The final answer is: A"}, "finish_reason": "stop"}]
    with pytest.raises(ModelCallError, match="ignores 'n'.*supports_n"):
        choice_responses("m", one, 3, input_tokens=1, output_tokens=1, price=lambda i, o: 0.0)
    empty = one + [{"index": 1, "message": {"content": "  "}, "finish_reason": "stop"}]
    with pytest.raises(MalformedReplyError):  # asked again, as a single reply without text is
        choice_responses("m", empty, 2, input_tokens=1, output_tokens=1, price=lambda i, o: 0.0)


# -- over HTTP, through the factory ---------------------------------------------------------------------


def pool_config(path, server: OpenAIServer, *, supports_n: bool, replicas: int = 1):
    entry = {"model_name": "intern-pool",
             "litellm_params": {"model": "openai/intern-1", "api_base": server.base_url, "api_key": "os.environ/OPENAI_API_KEY"}}
    if supports_n:
        entry["model_info"] = {"supports_n": True}
    path.write_text(yaml.safe_dump({"model_list": [entry] * replicas}), encoding="utf-8")
    return path


def intern_calls(result) -> set[tuple[tuple[str, ...], float]]:
    """The distinct intern calls of a search, samples aside: each scored path (its steps from the root) at
    each temperature (two mentors writing the same step make one call, shared in flight and cached)."""
    by_id = {node.id: node for node in result.tree}

    def path(node) -> tuple[str, ...]:
        return (path(by_id[node.parent]) if node.parent is not None else ()) + tuple(node.steps)

    return {(path(node), sample.temperature) for node in result.tree for sample in node.samples}


async def run_pool_search(folder, config, **overrides):
    folder.mkdir(exist_ok=True)
    settings = make_settings(folder / "cache.sqlite", interns=["intern-pool"], router_config=config,
                             samples_per_temperature=3, **overrides)
    async with await Searcher.open(settings) as searcher:
        return await searcher.search(QUESTION, IMAGE, answer=ANSWER, case_info=CASE_INFO, rid="case-n")


@pytest.mark.parametrize("transport", ["auto", "litellm"])
async def test_a_search_sends_one_request_per_temperature_and_a_rerun_without_n_replays_it(
    transport, png, tmp_path, monkeypatch  # noqa: F811
):
    with OpenAIServer() as server:
        monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        with_n = pool_config(tmp_path / "with_n.yaml", server, supports_n=True)
        result = await run_pool_search(tmp_path, with_n, transport=transport)
        assert result.status in ("success", "no_path"), result.message
        intern_requests = server.recorded("intern-1")
        assert all(record.body.get("n") == 3 for record in intern_requests)
        assert len(intern_requests) == len(intern_calls(result))  # one per scored path and temperature
        scored = [node for node in result.tree if node.samples]
        temperatures = make_settings(None).intern_temperatures
        for node in scored:
            pool = [sample for sample in node.samples if sample.intern == "intern-pool"]
            assert sorted((s.temperature, s.sample_index) for s in pool) == sorted(
                (t, k) for t in temperatures for k in range(3)
            )
        # The three samples of a temperature are three answers (the server answers choice k as sample k).
        assert len({s.answer for node in scored for s in node.samples if s.intern == "intern-pool"}) > 1

        # The same search where the pool does not declare n, on the same cache: every sample is found
        # under its own index, so nothing is sent to the interns and the result is the same.
        before = server.count("intern-1")
        without_n = pool_config(tmp_path / "without_n.yaml", server, supports_n=False)
        rerun = await run_pool_search(tmp_path, without_n, transport=transport)
        assert server.count("intern-1") == before
        assert comparable(rerun) == comparable(result)

        # On a fresh cache without n, the same search asks for each sample on its own: three times the requests.
        fresh = await run_pool_search(tmp_path / "fresh", without_n, transport=transport)
        assert server.count("intern-1") - before == 3 * len(intern_calls(fresh))
        assert server.errors == []


async def test_a_server_that_ignores_n_fails_at_once_naming_the_setting(tmp_path, monkeypatch):
    with OpenAIServer(honours_n=False) as server:
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        config = pool_config(tmp_path / "r.yaml", server, supports_n=True)
        settings = make_settings(None, router_config=config, max_retries=3)
        model = open_model("intern-pool", settings, router=load_router(config))
        try:
            with pytest.raises(ModelCallError, match="ignores 'n'"):
                await model.request_samples(request(), [0, 1, 2])
        finally:
            await model.aclose()
        assert server.count() == 1  # not retried: the same request gets the same single choice


def test_which_endpoints_take_n(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTED_VLLM_API_BASE", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_BASE", "http://127.0.0.1:9/v1")
    settings = make_settings(None)
    assert _transport("hosted_vllm/qwen", settings, None).supports_n  # vLLM takes n
    assert not _transport("openai/some-gateway-model", settings, None).supports_n  # unknown server: one each

    class Stub:
        base_url = "http://127.0.0.1:9/v1"

    declared = load_router(pool_config(tmp_path / "a.yaml", Stub(), supports_n=True, replicas=2))
    assert _transport("intern-pool", settings, declared).supports_n
    undeclared = load_router(pool_config(tmp_path / "b.yaml", Stub(), supports_n=False))
    assert not _transport("intern-pool", settings, undeclared).supports_n
    assert isinstance(_transport("intern-pool", settings, declared), DirectTransport)


async def test_a_direct_request_with_n_carries_n_only_above_one(monkeypatch):
    with OpenAIServer() as server:
        transport = DirectTransport("intern", DirectEndpoint(server.base_url + "/chat/completions", None, "intern-1"),
                                    timeout=5)
        transport.supports_n = True
        try:
            assert len(await transport.request_samples(request(), [0, 1])) == 2
            assert len(await transport.request_samples(request(), [5])) == 1
        finally:
            await transport.aclose()
    assert [record.body.get("n") for record in server.recorded()] == [2, None]
