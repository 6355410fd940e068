"""Adversarial cases for replica affinity (DirectTransport.pick, per-replica slots, calls in flight, a hung
replica), the retried Store.open, and the one-sample / one-awaitable fast paths and coalesced request bodies."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import threading
import time

import pytest
from aiohttp import web

from mics_agents.errors import StoreError, TransientModelError
from mics_agents.models import direct
from mics_agents.models.base import ChatMessage, Model, ModelRequest, ModelResponse, case_affinity, gather_all
from mics_agents.models.direct import DirectEndpoint, DirectTransport
from mics_agents.models.factory import open_model
from mics_agents.models.providers import load_router
from mics_agents import store as store_module
from mics_agents.store import Store

from .test_affinity import fleet, fleet_config, intern_request, served_by  # noqa: F401
from .test_direct_body import a_request, image
from .test_litellm_http import make_settings, server  # noqa: F401


@contextlib.asynccontextmanager
async def closed_after(transport: DirectTransport):
    """The transport, closed at the end: it gives back its share of the (session-wide) loop's HTTP clients."""
    try:
        yield transport
    finally:
        await transport.aclose()


def replicas(count: int, max_parallel: int | None = None) -> list[DirectEndpoint]:
    return [
        DirectEndpoint(f"http://127.0.0.1:{9000 + k}/v1/chat/completions", None, "intern-1", max_parallel)
        for k in range(count)
    ]


OK_REPLY = {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}], "usage": {}}


async def until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# -- a hung replica ---------------------------------------------------------------------------------------


async def test_a_home_replica_that_never_answers_cools_down_even_when_the_body_took_a_moment(server, fleet, tmp_path, monkeypatch):  # noqa: F811
    """A hung home (accepts, never replies) cools down, so the retry goes elsewhere. The transport's deadline
    starts before the body is built (here in a thread, 50 ms) or a slot is waited for, so it ends the attempt
    before aiohttp's own timer: the transport counts that deadline as the replica's failure."""
    real_pieces = direct.request_pieces

    def slow_pieces(*args, **kwargs):  # a first image encoding that takes 50 ms (a large image)
        time.sleep(0.05)
        return real_pieces(*args, **kwargs)

    monkeypatch.setattr(direct, "request_pieces", slow_pieces)
    router = load_router(fleet_config(tmp_path / "router.yaml", fleet[:2], allowed_fails=0, cooldown_time=30))
    model = open_model("intern-pool", make_settings(None, max_retries=2, request_timeout=0.5), router=router)

    def with_image(text: str, seed: int) -> ModelRequest:
        plain = intern_request(text)
        return ModelRequest(messages=(ChatMessage("user", (image(1000, seed=seed), *plain.messages[0].parts)),),
                            temperature=0.3)

    try:
        with case_affinity("case-hung"):
            await model.request(with_image("first", 21))
            (home,) = served_by(fleet)["CASEMARK1"]
            fleet[home].inject("timeout", model="intern-1", times=None, delay=3.0)
            response = await model.request(with_image("second", 22))  # a new image: encoded in a thread
    finally:
        fleet[0].clear_faults()
        fleet[1].clear_faults()
        await model.aclose()
    assert "### The final answer is:" in response.text
    assert served_by(fleet)["CASEMARK1"] == {0, 1}


# -- pinned behaviour: calls in flight never leak, whatever ends a call -----------------------------------


async def test_in_flight_returns_to_zero_when_a_call_is_cancelled_waiting_for_a_slot(monkeypatch):
    release = asyncio.Event()
    entered = []

    async def post(endpoint, body, timeout):
        entered.append(endpoint.url)
        await release.wait()
        return OK_REPLY

    monkeypatch.setattr(direct, "post_chat_completion", post)
    async with closed_after(DirectTransport("intern-pool", replicas(2, max_parallel=1), timeout=5)) as transport:
        with case_affinity("c"):
            home = transport.pick("case:c")
            first = asyncio.create_task(transport.request(intern_request("1")))
            await until(lambda: len(entered) == 1)
            waiting = asyncio.create_task(transport.request(intern_request("2")))
            await until(lambda: transport._in_flight[home] == 2)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert transport._in_flight[home] == 1
            release.set()
            await first
            assert transport._in_flight == [0, 0]
            # The slot came back: the next call of the case is sent at once.
            assert (await transport.request(intern_request("3"))).text == "ok"
        assert transport._in_flight == [0, 0] and entered == [transport.replicas[home].url] * 2
        assert not transport._cooling_until  # a cancelled call is nobody's failure


async def test_in_flight_returns_to_zero_when_the_body_fails_in_a_thread_or_the_reply_fails(monkeypatch):
    async with closed_after(DirectTransport("intern-pool", replicas(3), timeout=5)) as transport:

        def broken_pieces(*args, **kwargs):
            raise ValueError("boom in the thread")

        monkeypatch.setattr(direct, "request_pieces", broken_pieces)
        fresh = a_request(image(2000, seed=11))
        assert direct._needs_a_thread(fresh)
        with pytest.raises(Exception):
            await transport.request(fresh)
        assert transport._in_flight == [0, 0, 0]
        monkeypatch.undo()

        async def failing(endpoint, body, timeout):
            raise direct.HTTPStatusError(503, {}, "down")

        monkeypatch.setattr(direct, "post_chat_completion", failing)
        with pytest.raises(TransientModelError):
            await transport.request(a_request())
        assert transport._in_flight == [0, 0, 0]


async def test_all_replicas_cooling_raises_before_counting_anything():
    async with closed_after(DirectTransport("intern-pool", replicas(2), timeout=5)) as transport:
        now = time.monotonic()
        transport._cooling_until = {0: now + 30, 1: now + 10}
        with pytest.raises(TransientModelError) as caught:
            await transport.request(a_request())
        assert 9 < caught.value.retry_after <= 10
        assert transport._in_flight == [0, 0] and not transport._homes


def test_pick_never_runs_out_of_replicas_whatever_the_loads_and_cooldowns():
    rng = random.Random(5)
    for round_ in range(2000):
        count = rng.randint(2, 6)
        transport = DirectTransport("intern-pool", replicas(count), timeout=5)
        transport._in_flight[:] = [rng.choice([0, 0, 1, 3, 50, 1000]) for _ in range(count)]
        cooling = rng.sample(range(count), rng.randint(0, count - 1))
        transport._cooling_until = {index: time.monotonic() + 60 for index in cooling}
        chosen = transport.pick(f"case:{round_}")
        assert chosen not in cooling and 0 <= chosen < count


def test_homes_are_bounded_and_the_least_recently_used_is_forgotten(monkeypatch):
    monkeypatch.setattr(direct, "HOMES_KEPT", 3)
    transport = DirectTransport("intern-pool", replicas(2), timeout=5)
    for key in ("a", "b", "c"):
        transport.pick(key)
    transport.pick("a")  # used again: now the most recent
    transport.pick("d")
    assert list(transport._homes) == [direct.home_key(key) for key in ("c", "a", "d")]


def test_a_cooling_home_is_kept_and_the_case_comes_back_when_it_is_over():
    transport = DirectTransport("intern-pool", replicas(3), timeout=5)
    home = transport.pick("case:x")
    transport._cooling_until[home] = time.monotonic() + 60
    away = transport.pick("case:x")
    assert away != home and away == [i for i in transport._order("case:x") if i != home][0]
    transport._cooling_until[home] = time.monotonic() - 1
    assert transport.pick("case:x") == home


def test_a_replicas_slots_are_per_event_loop_and_hold_in_each():
    transport = DirectTransport("intern-pool", replicas(1, max_parallel=1), timeout=5)
    peaks = []

    async def run():
        active = [0, 0]

        async def one():
            async with transport._slot(0):
                active[0] += 1
                active[1] = max(active[1], active[0])
                await asyncio.sleep(0.01)
                active[0] -= 1

        await asyncio.gather(*(one() for _ in range(4)))
        peaks.append(active[1])

    asyncio.run(run())
    asyncio.run(run())  # a second loop: a semaphore of its own, no "bound to a different event loop"
    thread = threading.Thread(target=lambda: asyncio.run(run()))
    thread.start()
    thread.join()
    assert peaks == [1, 1, 1]


# -- pinned behaviour: the fast paths ---------------------------------------------------------------------


class Recorder(Model):
    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[ModelRequest] = []

    async def request(self, request: ModelRequest) -> ModelResponse:
        self.seen.append(request)
        return ModelResponse(text=f"s{request.sample_index}", model=self.name)


async def test_one_sample_is_asked_at_the_index_given_not_at_the_requests_own():
    model = Recorder()
    base = ModelRequest(messages=(ChatMessage.text("user", "q"),), temperature=0.7, sample_index=5)
    assert [r.text for r in await model.request_samples(base, [2])] == ["s2"]
    assert [r.text for r in await model.request_samples(base, [5])] == ["s5"]
    assert [r.text for r in await model.request_samples(base, [3, 5])] == ["s3", "s5"]
    assert [seen.sample_index for seen in model.seen] == [2, 5, 3, 5]


async def test_gather_all_with_one_awaitable_raises_and_cancels_as_with_several():
    async def fails():
        raise ValueError("one")

    with pytest.raises(ValueError):
        await gather_all([fails()])
    future = asyncio.get_running_loop().create_future()
    future.set_result(7)
    assert await gather_all([future]) == [7]

    started = asyncio.Event()
    inner_cancelled = []

    async def slow():
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            inner_cancelled.append(True)
            raise

    for count in (1, 2):
        started.clear()
        outer = asyncio.create_task(gather_all([slow() for _ in range(count)]))
        await started.wait()
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
    assert inner_cancelled == [True, True, True]


def test_coalesced_pieces_are_the_body_byte_for_byte_and_long_pieces_are_not_copied():
    rng = random.Random(3)
    limit = direct.SEPARATE_PIECE_BYTES
    for _ in range(300):
        pieces = [bytes([rng.randrange(256)]) * rng.choice([0, 1, 5, limit - 1, limit, limit + 1, 3 * limit])
                  for _ in range(rng.randint(1, 12))]
        joined = direct._coalesced(pieces)
        assert b"".join(joined) == b"".join(pieces)
        long_ids = {id(piece) for piece in pieces if len(piece) >= limit}
        assert {id(piece) for piece in joined if len(piece) >= limit} >= long_ids
        assert not any(len(a) < limit and len(b) < limit for a, b in zip(joined, joined[1:]))  # short runs joined


async def test_a_body_with_a_big_image_arrives_whole_with_its_content_length():
    received: list[tuple[bytes, str | None]] = []

    async def handle(http_request: web.Request) -> web.Response:
        received.append((await http_request.read(), http_request.headers.get("Content-Length")))
        return web.json_response(OK_REPLY)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        endpoint = DirectEndpoint(f"http://127.0.0.1:{port}/v1/chat/completions", None, "m")
        request = a_request(image(300_000, seed=12), image(200, seed=13), image(90_000, seed=14))
        expected = direct.request_body(request, "m", {"temperature": 0.7})
        await direct.post_chat_completion(endpoint, direct.request_pieces(request, "m", {"temperature": 0.7}), 5)
        await direct.post_chat_completion(endpoint, direct.request_pieces(a_request(), "m", {}), 5)
    finally:
        await direct.close_session()
        await runner.cleanup()
    assert received[0] == (expected, str(len(expected)))
    small = direct.request_body(a_request(), "m", {})
    assert received[1] == (small, str(len(small)))


# -- pinned behaviour: Store.open retried on lock errors only ---------------------------------------------


def _live_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.is_alive()}


async def test_a_file_locked_for_good_fails_after_the_retry_window_and_leaves_no_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "OPEN_LOCKED_FOR_S", 0.5)
    attempts = []

    async def locked(self):
        attempts.append(time.monotonic())
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Store, "_migrate", locked)
    before = _live_threads()
    started = time.monotonic()
    with pytest.raises(StoreError, match="database is locked"):
        await Store.open(tmp_path / "c.sqlite")
    assert time.monotonic() - started < 5
    assert len(attempts) >= 2
    deadline = time.monotonic() + 5
    while _live_threads() - before and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not (_live_threads() - before), "a failed attempt left its connection's thread running"


async def test_a_non_sqlite_error_in_the_open_is_not_retried_and_closes_the_connection(tmp_path, monkeypatch):
    attempts = []

    async def broken(self):
        attempts.append(1)
        raise RuntimeError("locked out by a bug")  # says "locked", but is no SQLite lock error

    monkeypatch.setattr(Store, "_migrate", broken)
    before = _live_threads()
    with pytest.raises(RuntimeError):
        await Store.open(tmp_path / "c.sqlite")
    assert attempts == [1]
    deadline = time.monotonic() + 5
    while _live_threads() - before and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not (_live_threads() - before)


async def test_an_open_cancelled_while_backing_off_stops_at_once(tmp_path, monkeypatch):
    attempts = []

    async def locked(self):
        attempts.append(1)
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Store, "_migrate", locked)
    task = asyncio.create_task(Store.open(tmp_path / "c.sqlite"))
    await until(lambda: len(attempts) >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
