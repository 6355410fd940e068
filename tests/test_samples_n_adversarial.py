"""Adversarial cases for samples asked together (``request_samples``, requests with ``n``): cancellation at
once, samples shared with single calls, errors reaching every caller, validators refusing one sample, usage
and cost adding up, store writes failing mid-way, the two transports, limits."""

from __future__ import annotations

import asyncio
import gc
import warnings
from dataclasses import replace

import pytest
import yaml

from mics_agents.errors import MalformedReplyError, ModelCallError, StoreError
from mics_agents.models import FunctionModel, ModelRequest
from mics_agents.models.base import ModelResponse
from mics_agents.models.factory import open_model
from mics_agents.models.providers import load_router
from mics_agents.store import Store

from . import scripted
from .openai_server import SAMPLE_FIELD, OpenAIServer
from .test_litellm_http import SECRET, make_settings
from .test_samples_n import SampledModel, cached_stack, request

pytestmark = pytest.mark.filterwarnings("ignore:Items .* using the `ReadOnly` qualifier:UserWarning")


def refuse_sample_1(text: str) -> None:
    if "sample 1 " in text:
        raise MalformedReplyError("refused", model="intern")


async def test_a_refused_sample_does_not_lose_its_accepted_siblings_paid_replies(tmp_path):
    model = SampledModel()
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        checked = replace(request(), validate=refuse_sample_1)
        with pytest.raises(MalformedReplyError):
            await cached.request_samples(checked, [0, 1, 2])
        sent = len(model.calls)
        # Samples 0 and 2 were accepted and paid for: asked alone now, they come from the cache.
        zero = await cached.request(replace(checked, sample_index=0))
        assert zero.cached and len(model.calls) == sent


async def test_a_caller_of_an_accepted_sample_is_not_failed_by_a_refused_sibling(tmp_path):
    model = SampledModel(delay=0.05)
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        checked = replace(request(), validate=refuse_sample_1)
        batch = asyncio.create_task(cached.request_samples(checked, [0, 1, 2]))
        await asyncio.sleep(0.01)
        # Sample 0 alone: it waits for the batch's sample 0, which the validator accepts.
        zero = await cached.request(replace(checked, sample_index=0))
        assert "sample 0 from call" in zero.text
        with pytest.raises(MalformedReplyError):
            await batch


async def test_a_caller_cancelled_at_once_cancels_the_batch(tmp_path):
    model = SampledModel(delay=0.3)
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        task = asyncio.create_task(cached.request_samples(request(), [0, 1]))
        await asyncio.sleep(0)  # it has started the batch and is waiting for it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # bounded: the cancellation passes through the wrappers' tasks
            if not cached._batches:
                break
            await asyncio.sleep(0.01)
        assert model.cancelled == 1 or not model.calls
        assert not cached._in_flight and not cached._batches


# -- over HTTP ----------------------------------------------------------------------------------------


def choice_brain(model: str, body) -> str:
    k = int(body.get(SAMPLE_FIELD, 0))
    return "### The final answer is: choice " + str(k) + " " + "word " * (3 * k)


class ReversingServer(OpenAIServer):
    """Answers the choices of a request with n last first (a server may send them in any order)."""

    def _completion(self, model, texts, body, *, empty=False):
        reply = super()._completion(model, texts, body, empty=empty)
        reply["choices"] = list(reversed(reply["choices"]))
        return reply


def router_file(path, server, *, supports_n=True):
    entry = {"model_name": "intern-pool",
             "litellm_params": {"model": "openai/intern-1", "api_base": server.base_url, "api_key": "os.environ/OPENAI_API_KEY"}}
    if supports_n:
        entry["model_info"] = {"supports_n": True}
    path.write_text(yaml.safe_dump({"model_list": [entry]}), encoding="utf-8")
    return path


@pytest.mark.parametrize("transport", ["auto", "litellm"])
async def test_choices_out_of_order_map_to_their_index_and_usage_adds_up(transport, tmp_path, monkeypatch):
    with ReversingServer(choice_brain) as server:
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        config = router_file(tmp_path / "r.yaml", server)
        settings = make_settings(None, router_config=config, transport=transport,
                                 prices={"intern-pool": {"input": 1e-6, "output": 2e-6}})
        model = open_model("intern-pool", settings, router=load_router(config))
        try:
            replies = await model.request_samples(request(), [0, 1, 2, 3])
        finally:
            await model.aclose()
        [record] = server.recorded()
        assert record.body.get("n") == 4
        total_out = sum(len(reply.text.split()) for reply in replies)
        assert sum(reply.output_tokens for reply in replies) == total_out  # the server counts words
        cost = sum(reply.cost_usd for reply in replies)
        assert cost == pytest.approx(sum(r.input_tokens for r in replies) * 1e-6 + total_out * 2e-6)
        numbers = [reply.text.split()[6] for reply in replies]
        if transport == "auto":
            # Choice k (its "index", whatever place the server gives it) is sample k.
            assert numbers == ["0", "1", "2", "3"]
        else:
            # LiteLLM renumbers choices by their place in the reply, so the server's "index" is lost: harmless
            # (the choices are draws alike), as long as each reply is one choice, once.
            assert sorted(numbers) == ["0", "1", "2", "3"]


# -- errors, warnings, closing ------------------------------------------------------------------------


class FailingModel(SampledModel):
    def __init__(self, *args, error: BaseException, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.error = error

    async def request_samples(self, request, sample_indices):
        await super().request_samples(request, sample_indices)
        raise self.error


def loop_complaints() -> list[str]:
    complaints: list[str] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: complaints.append(context["message"]))
    return complaints


async def test_a_failed_batch_reaches_every_waiting_caller_and_leaves_no_unretrieved_task(tmp_path):
    complaints = loop_complaints()  # "Task exception was never retrieved" goes to the loop's handler
    model = FailingModel(delay=0.05, error=ModelCallError("intern: broken", model="intern"))
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # "coroutine ... was never awaited"
            results = await asyncio.gather(
                cached.request_samples(request(), [0, 1, 2]),
                cached.request_samples(request(), [1, 3]),  # sample 1 shared, 3 its own batch
                cached.request(replace(request(), sample_index=2)),  # shared with the first batch
                return_exceptions=True,
            )
            assert all(isinstance(result, ModelCallError) for result in results)
            del results
            gc.collect()
            await asyncio.sleep(0.01)
            gc.collect()
        assert sorted(model.calls) == [[0, 1, 2], [3]]
        assert not cached._in_flight and not cached._batches
        assert await store.get_call(replace(request(), sample_index=0).cache_key("intern")) is None
    assert complaints == []


async def test_aclose_while_a_batch_is_in_flight_cancels_it_quietly(tmp_path):
    complaints = loop_complaints()
    model = SampledModel(delay=5)
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        caller = asyncio.create_task(cached.request_samples(request(), [0, 1, 2]))
        sharer = asyncio.create_task(cached.request(replace(request(), sample_index=1)))
        for _ in range(200):  # bounded: until the request is with the model (after the store lookups)
            if model.calls:
                break
            await asyncio.sleep(0.01)
        await asyncio.wait_for(cached.aclose(), 1)
        assert model.cancelled == 1
        for task in (caller, sharer):
            with pytest.raises(asyncio.CancelledError):
                await task
        gc.collect()
        await asyncio.sleep(0)
    assert complaints == []


async def test_a_sample_shared_with_a_single_request_is_paid_once_and_survives_the_batch_callers_cancel(tmp_path):
    model = SampledModel(delay=0.1)
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        single = asyncio.create_task(cached.request(replace(request(), sample_index=1)))
        await asyncio.sleep(0.01)
        batch = asyncio.create_task(cached.request_samples(request(), [0, 1, 2]))
        for _ in range(200):  # bounded: until both requests are with the model (after the store lookups)
            if len(model.calls) == 2:
                break
            await asyncio.sleep(0.01)
        batch.cancel()
        reply = await single
        for _ in range(100):  # the cancellation reaches the model through the wrappers' tasks
            if model.cancelled:
                break
            await asyncio.sleep(0.01)
        assert not reply.cached and "sample 1 from call" in reply.text
        # Under load either lookup may finish first: the calls are the single sample and the other two.
        assert sorted(model.calls) == [[0, 2], [1]] and model.cancelled == 1


async def test_duplicate_and_empty_sample_lists(tmp_path):
    model = SampledModel()
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        assert await cached.request_samples(request(), []) == []
        assert model.calls == []
        replies = await cached.request_samples(request(), [2, 0, 2])
        assert model.calls == [[2, 0]]
        assert [r.text[-18:] for r in replies] == ["sample 2 from call 0"[-18:], "sample 0 from call 0"[-18:], "sample 2 from call 0"[-18:]]
        # The duplicate is the same reply, counted (paid) once.
        assert [r.cached for r in replies] == [False, False, True]


async def test_a_store_write_failing_mid_batch_keeps_the_other_samples(tmp_path, monkeypatch):
    model = SampledModel()
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        real_put = store.put_call
        writes = 0

        async def flaky_put(key, *args, **kwargs):
            nonlocal writes
            writes += 1
            if writes == 2:
                raise StoreError("disk full")
            return await real_put(key, *args, **kwargs)

        monkeypatch.setattr(store, "put_call", flaky_put)
        replies = await cached.request_samples(request(), [0, 1, 2])
        assert [r.cached for r in replies] == [False] * 3 and store.unsaved_calls == 1
        again = await cached.request_samples(request(), [0, 1, 2])
        assert [r.cached for r in again] == [True, False, True]
        assert model.calls == [[0, 1, 2], [1]]


async def test_a_stale_stored_reply_the_validator_refuses_is_asked_again_and_replaced(tmp_path):
    model = SampledModel()

    def no_old(text: str) -> None:
        if "old" in text:
            raise MalformedReplyError("old format", model="intern")

    checked = replace(request(), validate=no_old)
    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = cached_stack(model, store)
        await store.put_call(replace(checked, sample_index=0).cache_key("intern"), "intern",
                             ModelResponse("old reply", "intern"))
        await store.put_call(replace(checked, sample_index=1).cache_key("intern"), "intern",
                             ModelResponse("### The final answer is: kept", "intern"))
        replies = await cached.request_samples(checked, [0, 1, 2])
        assert [r.cached for r in replies] == [False, True, False]
        assert replies[1].text.endswith("kept") and "old" not in replies[0].text
        assert sorted(model.calls) == [[0], [2]]
        stored = await store.get_call(replace(checked, sample_index=0).cache_key("intern"))
        assert stored.text == replies[0].text


# -- usage of a search when one sample fails ----------------------------------------------------------


async def test_a_failed_sample_does_not_drop_its_siblings_paid_replies_from_the_usage():
    config = scripted.settings(samples_per_temperature=3)
    good = scripted.intern("intern", config)
    answered = 0

    def reply(req: ModelRequest):
        nonlocal answered
        if req.sample_index == 2 and req.temperature == config.intern_temperatures[0]:
            raise ModelCallError("intern: gave up", model="intern")
        answered += 1
        return ModelResponse(good.function(req), "intern", input_tokens=10, output_tokens=1, cost_usd=1.0)

    mentors = [scripted.mentor("mentor-a", {0: ["look [score=0.5]"]}), scripted.mentor("mentor-b", {0: ["see [score=0.5]"]})]
    searcher = scripted.searcher(mentors, [FunctionModel("intern", reply)], config=config)
    result = await searcher.search(scripted.QUESTION, answer=scripted.ANSWER, rid="r")
    assert result.status == "model_error"
    # Every intern reply that came back was paid for and is in the failed item's usage (as before n).
    assert result.usage.cost_usd == pytest.approx(answered)


@pytest.mark.parametrize("transport", ["auto", "litellm"])
async def test_a_request_with_n_is_retried_whole_and_holds_one_slot_over_http(transport, tmp_path, monkeypatch):
    with OpenAIServer(choice_brain, latency=0.05) as server:
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        config = router_file(tmp_path / "r.yaml", server)
        settings = make_settings(None, router_config=config, transport=transport, model_concurrency=1)
        model = open_model("intern-pool", settings, router=load_router(config))
        server.inject("500", model="intern-1", times=1)
        try:
            groups = await asyncio.gather(*(
                model.request_samples(request(f"case {k}"), [0, 1, 2]) for k in range(3)
            ))
        finally:
            await model.aclose()
        assert [record.body.get("n") for record in server.recorded()] == [3] * 4  # one failed, retried whole
        assert server.peak_in_flight["intern-1"] == 1
        assert all(len(group) == 3 for group in groups) and server.errors == []
