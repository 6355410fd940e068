"""Many searches in one event loop (issue 13): concurrent ``search()`` calls and Searchers share the
per-model limits, the cache file and the loop's HTTP clients; none closes what another still uses; and a
cancelled caller of a shared call never takes the other callers' reply with it.

The HTTP tests go through the real path (LiteLLM or the direct transport -> HTTP -> tests/openai_server.py),
and count at the server: requests, repeated requests, and the peak number in flight per model.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import mics_agents
from mics_agents import Searcher, Settings, load_settings
from mics_agents.models import ChatMessage, FunctionModel, ModelRequest
from mics_agents.models.cached import CachedModel
from mics_agents.models.limits import ModelLimit
from mics_agents.store import Store

from .openai_server import OpenAIServer

pytestmark = pytest.mark.filterwarnings("ignore:Items .* using the `ReadOnly` qualifier:UserWarning")

REPOSITORY = Path(__file__).resolve().parent.parent
SECRET = "sk-test-concurrent-5c2e"
ROLES = {
    "MICS_MENTORS": "openai/mentor-a,openai/mentor-b",
    "MICS_INTERNS": "openai/intern-1,openai/intern-2",
    "MICS_JUDGE": "openai/judge",
}
QUESTION = (
    "Case {number}: a 58-year-old smoker has sudden pleuritic chest pain and shortness of breath. "
    "What is the most likely diagnosis?"
)
ANSWER = "Left tension pneumothorax"
CALLS, CASES = 50, 10  # every case is searched 5 times at once
MODEL_LIMIT, INTERN_1_LIMIT = 3, 2


def environment(server: OpenAIServer, cache: Path, transport: str) -> dict[str, str]:
    return {
        **ROLES,
        "OPENAI_API_BASE": server.base_url,
        "OPENAI_API_KEY": SECRET,
        "MICS_CACHE_PATH": str(cache),
        "MICS_TRANSPORT": transport,
        "MICS_MODEL_CONCURRENCY": str(MODEL_LIMIT),
        "MICS_MODEL_CONCURRENCY_OVERRIDES": json.dumps({"openai/intern-1": INTERN_1_LIMIT}),
        "MICS_RETRY_INITIAL_WAIT": "0.01",
        "MICS_RETRY_MAX_WAIT": "0.05",
    }


def case(call: int) -> dict:
    number = call % CASES
    return {"question": QUESTION.format(number=number), "answer": ANSWER, "rid": f"case-{number}"}


def repeated_requests(server: OpenAIServer) -> int:
    """Completed requests the server saw more than once (the same model, messages and temperature)."""
    counts = Counter(record.canonical() for record in server.recorded() if record.status == 200)
    return sum(count - 1 for count in counts.values())


def check_the_server_saw_one_request_per_call(server: OpenAIServer) -> None:
    assert server.errors == []
    assert server.count() > 0
    assert {record.status for record in server.recorded()} == {200}, "a request failed (and was retried)"
    assert repeated_requests(server) == 0
    peaks = server.peak_in_flight
    assert peaks["intern-1"] <= INTERN_1_LIMIT and all(peaks[model] <= MODEL_LIMIT for model in peaks), peaks
    assert max(peaks.values()) >= 2, f"the searches did not overlap at all: {peaks}"


SCRIPT = """
import asyncio, json, sys, time

import mics_agents
from mics_agents.models import set_request_policy

cases = json.loads(open(sys.argv[1], encoding="utf-8").read())


async def main():
    set_request_policy("local-only")
    results = await asyncio.gather(*(mics_agents.search(**case) for case in cases))
    print(json.dumps({
        "results": [result.model_dump(mode="json", exclude={"usage"}) for result in results],
        "done_at": time.time(),
    }), flush=True)


asyncio.run(main())
"""


@pytest.mark.parametrize("transport", ["litellm", "direct"])
def test_fifty_concurrent_search_calls_in_a_script_send_nothing_twice_and_exit_promptly(tmp_path, transport):
    """The README's use: ``asyncio.gather`` over ``search()`` in a script run with ``asyncio.run``."""
    cases = [case(call) for call in range(CALLS)]
    with OpenAIServer(latency=0.02) as server:
        env = {
            **os.environ,
            **environment(server, tmp_path / "cache.sqlite", transport),
            "PYTHONPATH": str(REPOSITORY),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
        (tmp_path / "cases.json").write_text(json.dumps(cases), encoding="utf-8")
        started = time.time()
        try:
            process = subprocess.run(
                [sys.executable, "-c", SCRIPT, "cases.json"],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
            )
        except subprocess.TimeoutExpired as hung:
            pytest.fail(f"the script did not end within 120 s (seen: {server.count()} requests): {hung.stderr!r:.2000}")
        ended = time.time()
        assert process.returncode == 0, process.stderr[-4000:]
        report = json.loads(process.stdout.strip().splitlines()[-1])
        check_the_server_saw_one_request_per_call(server)

    results = report["results"]
    assert len(results) == CALLS and {result["status"] for result in results} <= {"success", "no_path"}
    by_case: dict[str, list[dict]] = {}
    for result in results:
        by_case.setdefault(result["rid"], []).append(result)
    assert len(by_case) == CASES and all(len(same) == CALLS // CASES for same in by_case.values())
    assert all(same.count(same[0]) == len(same) for same in by_case.values()), "one case searched twice differs"
    # Nothing (an unclosed store's worker thread, an open client) keeps the interpreter alive at exit.
    exit_seconds = ended - report["done_at"]
    assert exit_seconds < 10, f"the script took {exit_seconds:.1f} s to exit after its searches ended"
    assert "Unclosed" not in process.stderr and "Traceback" not in process.stderr, process.stderr[-4000:]
    print(f"{transport}: {server.count()} requests, peaks {server.peak_in_flight}, "
          f"run {ended - started:.1f} s, exit {exit_seconds:.2f} s after the searches")


def store_threads() -> set[threading.Thread]:
    """aiosqlite's worker threads (one per open connection; not daemons, so one left open blocks exit)."""
    return {thread for thread in threading.enumerate() if "_connection_worker_thread" in thread.name}


async def test_fifty_concurrent_search_calls_share_one_searcher_and_close_it(tmp_path, monkeypatch):
    """In the caller's loop: the calls (some passing equal ``settings=``) share one Searcher, and the last
    call to end closes it, its store connection (a non-daemon thread) included."""
    threads_before = store_threads()
    with OpenAIServer(latency=0.02) as server:
        for name, value in environment(server, tmp_path / "cache.sqlite", "litellm").items():
            monkeypatch.setenv(name, value)
        same_settings = load_settings()
        results = await asyncio.gather(
            *(mics_agents.search(**case(call), settings=same_settings if call % 2 else None) for call in range(CALLS))
        )
        check_the_server_saw_one_request_per_call(server)

    assert {result.status for result in results} <= {"success", "no_path"}
    assert store_threads() == threads_before, "a store connection was left open"
    from mics_agents.search import _shared_searchers

    assert not _shared_searchers.get(asyncio.get_running_loop()), "the shared searcher outlived its calls"


async def test_cancelling_search_calls_never_stops_the_others_nor_leaves_the_searcher_open(tmp_path, monkeypatch):
    threads_before = store_threads()
    with OpenAIServer(latency=0.05) as server:
        for name, value in environment(server, tmp_path / "cache.sqlite", "litellm").items():
            monkeypatch.setenv(name, value)
        # The first call opens the shared searcher; it is cancelled while that is still opening.
        opener = asyncio.create_task(mics_agents.search(**case(0)))
        others = [asyncio.create_task(mics_agents.search(**case(call))) for call in (1, 2)]
        await asyncio.sleep(0)
        opener.cancel()
        results = await asyncio.wait_for(asyncio.gather(*others), timeout=60)
        assert opener.cancelled() and {result.status for result in results} <= {"success", "no_path"}

        # Every call cancelled, while the searcher opens and while it searches: nothing stays open.
        for wait in (0.0, 0.3):
            calls = [asyncio.create_task(mics_agents.search(**case(call))) for call in range(3, 6)]
            await asyncio.sleep(wait)
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            deadline = time.monotonic() + 10
            while store_threads() != threads_before:  # the cancelled opening closes its store as it ends
                assert time.monotonic() < deadline, "a store connection was left open"
                await asyncio.sleep(0.01)
    from mics_agents.search import _shared_searchers

    assert not _shared_searchers.get(asyncio.get_running_loop())


async def test_two_searchers_with_different_limits_on_one_model_respect_the_smaller(tmp_path, monkeypatch):
    with OpenAIServer(latency=0.1) as server:
        monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)

        def settings(intern_1_limit: int, cache: str) -> Settings:
            return load_settings(
                **{name.removeprefix("MICS_").lower(): value for name, value in ROLES.items()},
                cache_path=tmp_path / cache,
                samples_per_temperature=2,
                model_concurrency_overrides={"openai/intern-1": intern_1_limit},
            )

        wide = await Searcher.open(settings(4, "wide.sqlite"))
        narrow = await Searcher.open(settings(2, "narrow.sqlite"))
        try:
            results = await asyncio.gather(
                *(searcher.search(**case(call)) for call in range(4) for searcher in (wide, narrow))
            )
        finally:
            await narrow.aclose()
            await wide.aclose()

    assert {result.status for result in results} <= {"success", "no_path"}
    assert server.peak_in_flight["intern-1"] == 2  # the smaller limit, over both searchers together
    assert server.peak_in_flight["intern-2"] > 4  # the default limit (32) holds for the other intern


@pytest.mark.parametrize("transport", ["litellm", "direct"])
async def test_closing_one_searcher_leaves_another_searchers_calls_in_flight_alone(tmp_path, monkeypatch, transport):
    with OpenAIServer(latency=0.5) as server:
        for name, value in environment(server, tmp_path / "cache.sqlite", transport).items():
            monkeypatch.setenv(name, value)
        first = await Searcher.open(load_settings(cache_path=tmp_path / "first.sqlite"))
        second = await Searcher.open(load_settings(cache_path=tmp_path / "second.sqlite"))
        try:
            await first.search(**case(0))  # its models have used (and so hold) the loop's clients
            searching = asyncio.create_task(second.search(**case(1)))
            deadline = time.monotonic() + 10
            while not any(server.in_flight.values()):
                assert time.monotonic() < deadline, "the second search sent nothing"
                await asyncio.sleep(0.01)
            await first.aclose()  # while the second searcher's requests are on the wire
            result = await asyncio.wait_for(searching, timeout=60)
        finally:
            await first.aclose()
            await second.aclose()
        check_the_server_saw_one_request_per_call(server)
    assert result.status in ("success", "no_path")


# -- the in-flight dedupe: one shared call, its own task ------------------------------------------------


REQUEST = ModelRequest((ChatMessage.text("user", "What is it?"),), temperature=0.0)


class SlowModel(FunctionModel):
    """Answers once ``release`` is set, and notes the calls that were cancelled."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = 0
        super().__init__("slow", self._answer)

    async def _answer(self, request: ModelRequest) -> str:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "the reply"


async def waiters_on_one_call(model: CachedModel) -> tuple[asyncio.Task, asyncio.Task]:
    first = asyncio.create_task(model.request(REQUEST))
    second = asyncio.create_task(model.request(REQUEST))
    await asyncio.wait_for(model.inner.started.wait(), timeout=5)  # type: ignore[attr-defined]
    return first, second


@pytest.mark.parametrize("cancelled", ["the first caller", "the second caller"])
async def test_cancelling_one_waiter_of_a_shared_call_leaves_the_other_its_reply(cancelled):
    async with await Store.open(":memory:") as store:
        inner = SlowModel()
        model = CachedModel(inner, store)
        first, second = await waiters_on_one_call(model)
        gone, waiting = (first, second) if cancelled == "the first caller" else (second, first)

        gone.cancel()
        await asyncio.sleep(0)  # the cancellation lands before the reply comes
        inner.release.set()
        response = await asyncio.wait_for(waiting, timeout=5)

        assert gone.cancelled()
        assert response.text == "the reply"
        assert len(inner.requests) == 1 and inner.cancelled == 0  # sent once, never cancelled
        assert await store.count_calls() == 1  # and stored: the next ask is free
        assert (await model.request(REQUEST)).cached


async def test_cancelling_every_waiter_cancels_the_shared_call():
    async with await Store.open(":memory:") as store:
        inner = SlowModel()
        model = CachedModel(inner, store)
        first, second = await waiters_on_one_call(model)

        first.cancel()
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        for _ in range(3):
            await asyncio.sleep(0)  # let the shared task take its cancellation

        assert inner.cancelled == 1 and await store.count_calls() == 0
        # Nothing waits on the abandoned call: a new caller sends the request afresh.
        inner.release.set()
        response = await asyncio.wait_for(model.request(REQUEST), timeout=5)
        assert response.text == "the reply" and not response.cached and len(inner.requests) == 2


async def test_a_shared_call_that_fails_fails_every_waiter_and_is_not_cached():
    async with await Store.open(":memory:") as store:

        async def fail(request: ModelRequest) -> str:
            await asyncio.sleep(0.01)
            raise mics_agents.ModelCallError("down", model="failing")

        inner = FunctionModel("failing", fail)
        model = CachedModel(inner, store)
        outcomes = await asyncio.gather(model.request(REQUEST), model.request(REQUEST), return_exceptions=True)
        assert all(isinstance(outcome, mics_agents.ModelCallError) for outcome in outcomes)
        assert len(inner.requests) == 1 and await store.count_calls() == 0


async def test_a_reply_shared_by_twins_is_counted_once():
    async with await Store.open(":memory:") as store:
        inner = SlowModel()
        model = CachedModel(inner, store)
        first, second = await waiters_on_one_call(model)
        inner.release.set()
        replies = await asyncio.gather(first, second)
        assert sorted(reply.cached for reply in replies) == [False, True]


# -- the shared per-model limit -------------------------------------------------------------------------


async def test_a_model_limit_is_the_smallest_registered_and_rises_when_that_one_closes():
    limit = ModelLimit("openai/intern-1")
    limit.register(4)
    limit.register(2)
    assert limit.limit == 2
    held = [asyncio.create_task(limit.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert limit.in_flight == 2 and not held[2].done()

    # A waiter cancelled while it waits takes no slot with it.
    waiting = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)

    limit.unregister(2)  # the narrow searcher closed: the wide one's limit applies
    await asyncio.sleep(0)
    assert limit.limit == 4 and held[2].done() and limit.in_flight == 3
    for _ in range(3):
        limit.release()
    assert limit.in_flight == 0
