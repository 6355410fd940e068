"""The SQLite store and the call cache (DESIGN §6)."""

import asyncio
import sqlite3

import pytest

from mics_agents.models import CachedModel, ChatMessage, FunctionModel, ImagePart, ModelRequest, TextPart
from mics_agents.store import MIGRATIONS, Store
from mics_agents.errors import StoreError

from .scripted import ANSWER, QUESTION, intern, judge, mentor, settings
from mics_agents.search import Searcher


def request(text="hello", *, sample_index=0, temperature=0.7, image=None) -> ModelRequest:
    parts = (image, TextPart(text)) if image else (TextPart(text),)
    return ModelRequest(messages=(ChatMessage("user", parts),), temperature=temperature, sample_index=sample_index)



async def test_a_cached_call_is_never_sent_again(tmp_path):
    async with await Store.open(tmp_path / "c.sqlite") as store:
        inner = FunctionModel("m", lambda req: "answer")
        cached = CachedModel(inner, store)
        first = await cached.request(request())
        second = await cached.request(request())
        assert len(inner.requests) == 1
        assert (first.text, first.cached) == ("answer", False)
        assert (second.text, second.cached) == ("answer", True)
    # And after reopening the file.
    async with await Store.open(tmp_path / "c.sqlite") as store:
        inner = FunctionModel("m", lambda req: "other")
        assert (await CachedModel(inner, store).request(request())).text == "answer"
        assert inner.requests == []


async def test_sample_index_temperature_model_and_image_make_different_entries(tmp_path):
    async with await Store.open(tmp_path / "c.sqlite") as store:
        replies = iter(range(100))
        inner = FunctionModel("m", lambda req: f"r{next(replies)}")
        cached = CachedModel(inner, store)
        image_a = ImagePart(b"a", "image/png", "sha-a")
        image_b = ImagePart(b"b", "image/png", "sha-b")
        variants = [
            request(),
            request(sample_index=1),
            request(temperature=0.3),
            request(image=image_a),
            request(image=image_b),
        ]
        texts = [(await cached.request(v)).text for v in variants]
        assert len(set(texts)) == 5 and len(inner.requests) == 5
        other = CachedModel(FunctionModel("other-model", lambda req: "x"), store)
        assert (await other.request(request())).text == "x"
        assert await store.count_calls() == 6


def test_cache_key_uses_image_hash_not_bytes():
    same_hash = request(image=ImagePart(b"bytes-1", "image/png", "h"))
    other_bytes = request(image=ImagePart(b"bytes-2", "image/png", "h"))
    assert same_hash.cache_key("m") == other_bytes.cache_key("m")
    assert "bytes" not in str(same_hash.key_payload("m"))


async def test_identical_calls_in_flight_share_one_request(tmp_path):
    async with await Store.open(tmp_path / "c.sqlite") as store:
        inner = FunctionModel("m", lambda req: "once", delay=0.05)
        cached = CachedModel(inner, store)
        replies = await asyncio.gather(*(cached.request(request()) for _ in range(5)))
        assert len(inner.requests) == 1
        assert [r.text for r in replies] == ["once"] * 5
        assert sum(r.cached for r in replies) == 4


async def test_failures_are_not_cached(tmp_path):
    from mics_agents.errors import ModelCallError

    calls = []

    def flaky(req):
        calls.append(req)
        if len(calls) == 1:
            raise ModelCallError("down", model="m")
        return "up"

    async with await Store.open(tmp_path / "c.sqlite") as store:
        cached = CachedModel(FunctionModel("m", flaky), store)
        with pytest.raises(ModelCallError):
            await cached.request(request())
        assert (await cached.request(request())).text == "up"


async def test_repeating_a_search_makes_no_model_calls(tmp_path):
    config = settings(max_depth=3)

    def models():
        return (
            [mentor("m/a", {0: ["a1 [score=0.5]", "a2"], 2: ["a3 [score=0.75]"], 3: ["a4 [score=1.0]"]}),
             mentor("m/b", {0: ["b1 [score=0.25]", "b2"], 2: ["b3 [score=0.5]"], 3: ["b4 [score=0.5]"]})],
            [intern("i/1", config)],
            judge(),
        )

    results = []
    sent = []
    for _ in range(2):
        mentors, interns, grader = models()
        async with await Store.open(tmp_path / "c.sqlite") as store:
            search = Searcher(mentors=mentors, interns=interns, judge=grader, settings=config, store=store)
            results.append(await search.search(QUESTION, answer=ANSWER, rid="r1"))
        sent.append(sum(len(m.requests) for m in [*mentors, *interns, grader]))
    assert sent[0] > 0 and sent[1] == 0
    assert results[1].usage.cached_calls == results[1].usage.calls == results[0].usage.calls
    assert results[0].model_dump(exclude={"usage"}) == results[1].model_dump(exclude={"usage"})


async def test_migrations_are_recorded_and_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "c.sqlite"
    async with await Store.open(path) as store:
        assert await store.schema_version() == len(MIGRATIONS)
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        connection.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer than this mics-agents"):
        await Store.open(path)


async def test_two_connections_write_one_file_without_lock_errors(tmp_path):
    path = tmp_path / "shared.sqlite"
    stores = [await Store.open(path), await Store.open(path)]
    try:
        models = [CachedModel(FunctionModel(f"m{i}", lambda req: "x"), store) for i, store in enumerate(stores)]
        await asyncio.gather(*(model.request(request(f"t{k}")) for model in models for k in range(50)))
        assert await stores[0].count_calls() == 100
    finally:
        for store in stores:
            await store.close()


async def test_a_start_sqlite_answers_locked_at_once_is_tried_again_and_other_errors_are_not(tmp_path, monkeypatch):
    """Two shards opening one new file together: SQLite can say "database is locked" without waiting its busy
    timeout (a journal-mode change, a WAL recovery). The start is tried again; a real fault is reported at once."""
    real_migrate = Store._migrate
    failures = {"left": 2, "seen": 0}

    async def flaky_migrate(self):
        if failures["left"]:
            failures["left"] -= 1
            failures["seen"] += 1
            raise sqlite3.OperationalError("database is locked")
        await real_migrate(self)

    monkeypatch.setattr(Store, "_migrate", flaky_migrate)
    async with await Store.open(tmp_path / "c.sqlite") as store:
        assert failures["seen"] == 2
        assert await store.get_call("nothing") is None

    async def broken_migrate(self):
        failures["seen"] += 1
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Store, "_migrate", broken_migrate)
    failures["seen"] = 0
    with pytest.raises(StoreError, match="disk I/O error.*MICS_CACHE_PATH"):
        await Store.open(tmp_path / "d.sqlite")
    assert failures["seen"] == 1
