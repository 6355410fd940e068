"""The model layer's pieces, each alone with a scripted model (DESIGN §5, §7): retrying, limiting,
validating, caching, the transport's deadline, the credentials check, and the import graph."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import io
import time
from contextlib import closing
from pathlib import Path

import pytest

from mics_agents.errors import (
    ConfigError,
    MalformedReplyError,
    ModelCallError,
    StoreError,
    TransientModelError,
)
from mics_agents.models import (
    CachedModel,
    ChatMessage,
    FunctionModel,
    ImagePart,
    LimitingModel,
    ModelRequest,
    ModelResponse,
    RetryingModel,
    TextPart,
    ValidatingModel,
)
from mics_agents.models.transport import Transport
from mics_agents.store import Store

from .scripted import ANSWER, QUESTION, intern, judge, mentor, settings

REQUEST = ModelRequest((ChatMessage.text("user", "What is it?"),), temperature=0.0)


class Script(FunctionModel):
    """Raises or answers in order: an exception instance is raised, a string answered."""

    def __init__(self, *steps: object, name: str = "scripted/m") -> None:
        self.steps = list(steps)
        super().__init__(name, self._next)

    def _next(self, request: ModelRequest) -> str:
        if not self.steps:
            raise ModelCallError(f"{self.name} ran out of replies (the test expected no more calls)", model=self.name)
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        return str(step)


def retrying(inner, **overrides) -> RetryingModel:
    values = {"max_retries": 3, "initial_wait": 0.0, "max_wait": 0.0, "max_retry_after": 120.0}
    values.update(overrides)
    return RetryingModel(inner, **values)


# -- retrying --------------------------------------------------------------------------------------------


async def test_an_error_that_may_pass_is_tried_again_and_one_that_cannot_is_sent_once():
    flaky = Script(TransientModelError("HTTP 500", model="m"), MalformedReplyError("no text"), "fine")
    assert (await retrying(flaky).request(REQUEST)).text == "fine"
    assert len(flaky.requests) == 3

    refused = Script(ModelCallError("m: HTTP 400: bad image", model="m"), "never")
    with pytest.raises(ModelCallError, match="HTTP 400"):
        await retrying(refused).request(REQUEST)
    assert len(refused.requests) == 1


async def test_retries_run_out_with_a_message_naming_the_attempts_and_the_last_error():
    down = Script(*[TransientModelError("APIError (HTTP 503): busy", model="m", hint="Check it is up.")] * 4)
    with pytest.raises(ModelCallError) as caught:
        await retrying(down, max_retries=3).request(REQUEST)
    assert str(caught.value) == (
        "scripted/m: gave up after 4 attempts; last error APIError (HTTP 503): busy. Check it is up."
    )
    assert len(down.requests) == 4


async def test_retry_after_is_waited_out_when_short_and_ends_the_call_at_once_when_long():
    short = Script(TransientModelError("HTTP 429", model="m", retry_after=0.3), "fine")
    started = time.monotonic()
    assert (await retrying(short).request(REQUEST)).text == "fine"
    assert 0.3 <= time.monotonic() - started < 2

    long = Script(*[TransientModelError("RateLimitError (HTTP 429): slow down", model="m", retry_after=3600)] * 4)
    started = time.monotonic()
    with pytest.raises(ModelCallError) as caught:
        await retrying(long, max_retry_after=120).request(REQUEST)
    assert time.monotonic() - started < 1
    assert len(long.requests) == 1
    message = str(caught.value)
    assert "3,600 s" in message and "MICS_MAX_RETRY_AFTER (120 s)" in message and "HTTP 429" in message


async def test_backoff_waits_grow_with_full_jitter_up_to_the_cap_and_a_cancelled_wait_ends_the_call(monkeypatch):
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(seconds, *args):
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    down = Script(*[TransientModelError("HTTP 503", model="m")] * 6, "fine")
    model = retrying(down, max_retries=6, initial_wait=1.0, max_wait=4.0)
    assert (await model.request(REQUEST)).text == "fine"
    assert len(waits) == 6 and len(down.requests) == 7
    for attempt, wait in enumerate(waits, start=1):
        assert 0 <= wait <= min(4.0, 2 ** (attempt - 1))
    monkeypatch.setattr(asyncio, "sleep", real_sleep)

    # A call cancelled while it backs off is cancelled, not retried nor turned into a model error.
    slow = Script(TransientModelError("HTTP 503", model="m", retry_after=30), "never")
    call = asyncio.ensure_future(retrying(slow).request(REQUEST))
    await real_sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert len(slow.requests) == 1


def test_remembered_secrets_follow_every_change_and_short_texts_skip_the_masking(monkeypatch, tmp_path):
    from mics_agents import redact

    monkeypatch.chdir(tmp_path)
    value = "registered-secret-after-the-first-mask"
    assert redact.mask_secret_values(f"a {value}") == f"a {value}"  # the sorted secrets are remembered now
    redact.add_secrets([value])
    assert redact.mask_secret_values(f"a {value}") == f"a {redact.MASK}"
    monkeypatch.setattr(redact, "_registered", set())  # a fresh set (as a test may put) is seen too
    assert redact.mask_secret_values(f"a {value}") == f"a {value}"
    reason = "stop"
    assert redact.mask_secret_values(reason) is reason
    (tmp_path / ".env").write_text("SHORT_TOKEN=12345678\n")  # exactly MIN_SECRET_CHARS: masked
    assert redact.mask_secret_values("x12345678") == f"x{redact.MASK}"
    assert redact.mask_secret_values("1234567") == "1234567"


# -- limiting --------------------------------------------------------------------------------------------


class InFlight:
    """Calls in flight at a pretend server, and the peak."""

    def __init__(self) -> None:
        self.now = self.peak = 0


class Gauge(FunctionModel):
    """Each call takes ``hold`` s at the server ``counter`` counts."""

    def __init__(self, name: str = "openai/intern-1", counter: InFlight | None = None, hold: float = 0.05) -> None:
        self.counter = counter or InFlight()
        self.hold = hold
        super().__init__(name, self._answer)

    async def _answer(self, request: ModelRequest) -> str:
        self.counter.now += 1
        self.counter.peak = max(self.counter.peak, self.counter.now)
        try:
            await asyncio.sleep(self.hold)
        finally:
            self.counter.now -= 1
        return "ok"


async def test_two_limits_on_one_model_name_hold_together_at_the_smaller():
    server = Gauge()
    wide, narrow = LimitingModel(server, limit=4), LimitingModel(server, limit=3)
    try:
        await asyncio.gather(*(model.request(REQUEST) for model in (wide, narrow) for _ in range(10)))
        assert server.counter.peak == 3
        await narrow.aclose()  # the narrow one's limit goes with it
        server.counter.peak = 0
        await asyncio.gather(*(wide.request(REQUEST) for _ in range(10)))
        assert server.counter.peak == 4
    finally:
        await wide.aclose()
        await narrow.aclose()


async def test_the_overall_limit_holds_over_all_models_and_a_backing_off_call_holds_no_slot():
    everywhere = InFlight()
    models = [LimitingModel(Gauge(name, everywhere), limit=5, overall=3) for name in ("m/one", "m/two")]
    try:
        await asyncio.gather(*(model.request(REQUEST) for model in models for _ in range(6)))
        assert everywhere.peak == 3
        # Retries sit outside the limit: a call waiting to retry lets another use its slot.
        flaky = Script(TransientModelError("HTTP 429", model="m", retry_after=0.3), "late", name="m/limited")
        quick = Script("quick", name="m/limited")
        slow_retry = retrying(LimitingModel(flaky, limit=1))
        other = LimitingModel(quick, limit=1)
        started = time.monotonic()
        task = asyncio.create_task(slow_retry.request(REQUEST))
        await asyncio.sleep(0.05)
        assert (await other.request(REQUEST)).text == "quick"
        assert time.monotonic() - started < 0.25  # did not wait for the retry's Retry-After
        assert (await task).text == "late"
        await slow_retry.aclose()
        await other.aclose()
    finally:
        for model in models:
            await model.aclose()


# -- validating ------------------------------------------------------------------------------------------


def yes_or_no(text: str) -> str:
    if text.strip().lower() not in ("yes", "no"):
        raise MalformedReplyError(f"not a verdict: {text!r}")
    return text


async def test_a_reply_the_validator_refuses_raises_and_one_it_accepts_passes():
    model = ValidatingModel(Script("It depends.", "Yes"))
    request = ModelRequest(REQUEST.messages, 0.0, validate=yes_or_no)
    with pytest.raises(MalformedReplyError, match="not a verdict"):
        await model.request(request)
    assert (await model.request(request)).text == "Yes"
    unchecked = ValidatingModel(Script("It depends."))
    assert (await unchecked.request(REQUEST)).text == "It depends."  # no validator: nothing to refuse


# -- caching ---------------------------------------------------------------------------------------------


async def test_an_unusable_reply_is_never_cached_and_a_stale_unusable_entry_is_asked_again():
    request = ModelRequest(REQUEST.messages, 0.0, validate=yes_or_no)
    async with await Store.open(":memory:") as store:
        cached = CachedModel(ValidatingModel(Script("It depends.", "Yes")), store)
        with pytest.raises(MalformedReplyError):
            await cached.request(request)
        assert await store.count_calls() == 0
        assert (await cached.request(request)).text == "Yes"

        # An entry an older version stored before validators existed:
        other = ModelRequest((ChatMessage.text("user", "another"),), 0.0, validate=yes_or_no)
        await store.put_call(other.cache_key("scripted/m"), "scripted/m", ModelResponse("Maybe", "scripted/m"))
        inner = Script("No")
        answer = await CachedModel(ValidatingModel(inner), store).request(other)
        assert answer.text == "No" and not answer.cached and len(inner.requests) == 1
        assert (await store.get_call(other.cache_key("scripted/m"))).text == "No"  # replaced


async def test_a_cache_namespace_keeps_a_changed_model_apart_and_empty_keeps_the_old_keys():
    async with await Store.open(":memory:") as store:
        old = CachedModel(Script("old checkpoint"), store)
        assert (await old.request(REQUEST)).text == "old checkpoint"
        assert REQUEST.cache_key("scripted/m") == REQUEST.cache_key("scripted/m", namespace="")
        retrained = CachedModel(Script("new checkpoint"), store, namespace="retrained")
        assert (await retrained.request(REQUEST)).text == "new checkpoint"
        again = CachedModel(Script(), store, namespace="retrained")
        assert (await again.request(REQUEST)).text == "new checkpoint"


def png(width: int, height: int) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (width, height))
    image.putdata([((x * 7) % 256, (x // width) % 256, 90) for x in range(width * height)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_resized_images_key_is_its_original_bytes_and_the_resize_settings_not_the_encoding(monkeypatch):
    from PIL import Image

    from mics_agents.images import load_image_sync, resized_image_key

    original = png(300, 200)
    small = load_image_sync(original, max_side=100, max_pixels=10**8)
    assert small.key_sha256 == resized_image_key(hashlib.sha256(original).hexdigest(), 100)
    assert small.cache_id != small.sha256  # the bytes sent are not the original bytes
    # Another Pillow/zlib build encodes the same pixels to other bytes: the key stays.
    real_save = Image.Image.save
    def other_build(self, fp, format=None, **options):
        return real_save(self, fp, format, compress_level=1)

    monkeypatch.setattr(Image.Image, "save", other_build)
    rebuilt = load_image_sync(original, max_side=100, max_pixels=10**8)
    assert rebuilt.sha256 != small.sha256 and rebuilt.cache_id == small.cache_id
    assert load_image_sync(original, max_side=150, max_pixels=10**8).cache_id != small.cache_id
    # An image sent as it is keeps the hash of its bytes as its key (unchanged from earlier versions).
    as_is = load_image_sync(original, max_side=1000, max_pixels=10**8)
    assert as_is.key_sha256 == "" and as_is.cache_id == as_is.sha256 == hashlib.sha256(original).hexdigest()


async def test_a_cache_entry_written_under_the_old_image_key_is_found_and_not_paid_again():
    from mics_agents.images import load_image_sync

    image = load_image_sync(png(300, 200), max_side=100, max_pixels=10**8)
    old_image = ImagePart(image.data, image.mime, image.sha256, image.label)  # as earlier versions built it
    request = ModelRequest((ChatMessage("user", (image, TextPart("Which organ?"))),), 0.3)
    old_request = ModelRequest((ChatMessage("user", (old_image, TextPart("Which organ?"))),), 0.3)
    assert request.cache_key("m") != old_request.cache_key("m")
    assert request.cache_key("m", legacy_images=True) == old_request.cache_key("m")
    async with await Store.open(":memory:") as store:
        await store.put_call(old_request.cache_key("m"), "m", ModelResponse("Liver", "m", cost_usd=0.02), "old-run")
        inner = Script(name="m")
        found = await CachedModel(inner, store, run_id="new-run").request(request)
        assert (found.text, found.cached) == ("Liver", True) and inner.requests == []
        assert (await store.get_call(request.cache_key("m"))).text == "Liver"  # copied under today's key
        assert await store.run_cost("new-run") == 0.0  # paid by the run that asked, long ago
        # A namespace separates on purpose: no fallback to entries written without one.
        with pytest.raises(ModelCallError):
            await CachedModel(inner, store, namespace="v2").request(request)


async def test_a_store_write_that_fails_once_is_retried_and_the_reply_kept(tmp_path, monkeypatch):
    import sqlite3

    from mics_agents import store as store_module

    async with await Store.open(tmp_path / "cache.sqlite") as store:
        real_write = store_module._write_rows_in_thread
        failures = iter([sqlite3.OperationalError("disk I/O error")])

        def flaky_write(connection, rows):
            failure = next(failures, None)
            if failure is not None:
                raise failure
            return real_write(connection, rows)

        monkeypatch.setattr(store_module, "_write_rows_in_thread", flaky_write)
        inner = Script("paid reply")
        reply = await CachedModel(inner, store, run_id="run").request(REQUEST)
        assert reply.text == "paid reply" and store.unsaved_calls == 0
        assert (await store.get_call(REQUEST.cache_key("scripted/m"))).text == "paid reply"
        assert await store.count_calls() == 1 and len(inner.requests) == 1


async def test_a_store_write_that_keeps_failing_still_gives_the_reply_and_says_so(tmp_path, monkeypatch, caplog):
    import sqlite3

    monkeypatch.setattr("mics_agents.store.WRITE_RETRY_PAUSE", 0.0)
    from mics_agents import store as store_module

    async with await Store.open(tmp_path / "cache.sqlite") as store:
        def full_disk(connection, rows):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(store_module, "_write_rows_in_thread", full_disk)
        with pytest.raises(StoreError) as caught:
            await store.put_call("k", "m", ModelResponse("x", "m"))
        assert str(tmp_path / "cache.sqlite") in str(caught.value) and "MICS_CACHE_PATH" in str(caught.value)
        assert "disk is full" in str(caught.value)

        inner = Script("paid reply", "paid again")
        with caplog.at_level("WARNING", logger="mics_agents"):
            reply = await CachedModel(inner, store).request(REQUEST)
        assert reply.text == "paid reply" and store.unsaved_calls == 1
        assert "a rerun will ask for it again" in caplog.text


async def test_replies_stored_in_one_turn_share_one_commit_and_each_returns_once_committed(tmp_path, monkeypatch):
    import sqlite3

    from mics_agents import store as store_module

    trips: list[int] = []
    real_write = store_module._write_rows_in_thread

    def counted(connection, rows):
        trips.append(len(rows))
        return real_write(connection, rows)

    monkeypatch.setattr(store_module, "_write_rows_in_thread", counted)
    path = tmp_path / "cache.sqlite"
    async with await Store.open(path) as store:
        await store.put_call("old", "m", ModelResponse("stored first elsewhere", "m", cost_usd=5.0), run_id="run")
        trips.clear()
        store.new_cost_usd.clear()

        async def put(index: int) -> int:
            await store.put_call(f"k{index}" if index else "old", "m", ModelResponse(f"reply {index}", "m", cost_usd=1.0),
                                 run_id="run")
            with closing(sqlite3.connect(path)) as reader:  # committed: another connection sees it
                return reader.execute("SELECT COUNT(*) FROM calls WHERE key = ?", (f"k{index}" if index else "old",)).fetchone()[0]

        assert await asyncio.gather(*(put(index) for index in range(64))) == [1] * 64
        assert trips == [64]
        # The key stored before was not written again, so this run paid for 63 replies, not 64.
        assert store.new_cost_usd == {"run": 63.0}
        assert (await store.get_call("old")).text == "stored first elsewhere"

        # A reply whose caller is cancelled meanwhile is stored all the same (it was paid for).
        cancelled = asyncio.ensure_future(store.put_call("cancelled", "m", ModelResponse("paid", "m")))
        await asyncio.sleep(0)
        cancelled.cancel()
        pending = asyncio.ensure_future(store.put_call("at-close", "m", ModelResponse("paid too", "m")))
    assert not pending.done() or pending.exception() is None
    with closing(sqlite3.connect(path)) as reader:
        keys = {row[0] for row in reader.execute("SELECT key FROM calls")}
    assert {"cancelled", "at-close"} <= keys  # written before the store closed


async def test_lookups_in_one_turn_are_one_query_with_duplicates_and_misses(tmp_path, monkeypatch):
    import aiosqlite

    queries: list[int] = []
    real_read = aiosqlite.Connection.execute_fetchall

    async def counted(self, sql, parameters=None):
        if "FROM calls WHERE key IN" in sql:
            queries.append(len(parameters))
        return await real_read(self, sql, parameters)

    monkeypatch.setattr(aiosqlite.Connection, "execute_fetchall", counted)
    monkeypatch.setattr("mics_agents.store.LOOKUP_CHUNK", 7)
    async with await Store.open(tmp_path / "cache.sqlite") as store:
        await asyncio.gather(*(store.put_call(f"k{index}", "m", ModelResponse(f"reply {index}", "m"))
                               for index in range(0, 20, 2)))
        keys = [f"k{index % 20}" for index in range(30)] + ["missing", "k'); DROP TABLE calls; --"]
        found = await asyncio.gather(*(store.get_call(key) for key in keys))
        assert [reply.text if reply else None for reply in found] == [
            f"reply {index % 20}" if index % 2 == 0 else None for index in range(30)] + [None, None]
        assert all(reply.cached for reply in found if reply)
        assert queries == [7, 7, 7, 1]  # 22 distinct keys, 7 a query
        assert await store.count_calls() == 10


async def test_a_batch_that_cannot_be_written_fails_each_of_its_replies_and_the_next_batch_is_written(tmp_path, monkeypatch):
    from mics_agents import store as store_module

    monkeypatch.setattr("mics_agents.store.WRITE_RETRY_PAUSE", 0.0)
    real_write = store_module._write_rows_in_thread
    broken = True

    def flaky(connection, rows):
        # The batch's last statement fails after the others ran, inside its transaction.
        return real_write(connection, rows + [("INSERT INTO no_such_table VALUES (1)", ())] if broken else rows)

    monkeypatch.setattr(store_module, "_write_rows_in_thread", flaky)
    async with await Store.open(tmp_path / "cache.sqlite") as store:
        results = await asyncio.gather(*(store.put_call(f"k{index}", "m", ModelResponse("x", "m")) for index in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(result, StoreError) and "no_such_table" in str(result) for result in results)
        assert await store.count_calls() == 0  # rolled back whole: no half-written batch
        broken = False
        await asyncio.gather(*(store.put_call(f"k{index}", "m", ModelResponse("x", "m")) for index in range(5)))
        assert await store.count_calls() == 5


async def test_a_store_read_failure_is_a_store_error_naming_the_file_and_the_fix(tmp_path):
    store = await Store.open(tmp_path / "cache.sqlite")
    await store.close()
    store._db = _Broken()
    with pytest.raises(StoreError) as caught:
        await store.get_call("k")
    assert "cannot read from the cache database" in str(caught.value) and "MICS_CACHE_PATH" in str(caught.value)


class _Broken:
    async def execute_fetchall(self, *args, **kwargs):
        import sqlite3

        raise sqlite3.DatabaseError("database disk image is malformed")


# -- the transport's deadline, per role ------------------------------------------------------------------


class Dripping(Transport):
    """A transport whose reply never finishes (each read is quick; the whole never ends)."""

    def endpoint_bases(self) -> list[str | None]:
        return ["http://127.0.0.1:1/v1"]

    async def _send(self, request: ModelRequest, timeout: float) -> ModelResponse:
        while True:
            await asyncio.sleep(0.05)


async def test_a_transport_attempt_ends_at_its_deadline_whatever_the_client_does():
    transport = Dripping("openai/slow", timeout=0.3)
    started = time.monotonic()
    with pytest.raises(TransientModelError, match="within the 0.3 s deadline") as caught:
        await transport.request(REQUEST)
    assert 0.3 <= time.monotonic() - started < 1.0
    assert "MICS_MENTOR_TIMEOUT" in caught.value.hint
    started = time.monotonic()
    with pytest.raises(TransientModelError, match="0.5 s deadline"):
        await transport.request(ModelRequest(REQUEST.messages, 0.0, timeout=0.5))  # the request's own
    assert 0.5 <= time.monotonic() - started < 1.2
    await transport.aclose()


async def test_each_role_asks_with_its_own_deadline_and_mentors_get_the_longest():
    config = settings(max_depth=1, request_timeout=40.0, judge_timeout=15.0)
    assert config.timeout_for("mentor") == 600.0 > config.timeout_for("intern") == 40.0
    mentors = [mentor("m/a", {0: ["a1 [score=0.5]"]}), mentor("m/b", {0: ["b1 [score=0.5]"]})]
    interns, grader = [intern("i/1", config)], judge()
    from mics_agents.search import Searcher

    async with Searcher(mentors=mentors, interns=interns, judge=grader, settings=config) as searcher:
        await searcher.search(QUESTION, answer=ANSWER, rid="r1")
    assert {r.timeout for m in mentors for r in m.requests} == {600.0}
    assert {r.timeout for r in interns[0].requests} == {40.0}
    assert {r.timeout for r in grader.requests} <= {15.0}


# -- credentials -----------------------------------------------------------------------------------------


def test_a_missing_provider_key_is_named_and_endpoints_that_need_none_pass(monkeypatch, tmp_path):
    from mics_agents.models.providers import check_credentials

    with pytest.raises(ConfigError) as caught:
        check_credentials(["openai/gpt-4o", "anthropic/claude-sonnet-4-5", "hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct"])
    message = str(caught.value)
    assert "openai/gpt-4o needs OPENAI_API_KEY" in message and "ANTHROPIC_API_KEY" in message
    assert "hosted_vllm" not in message and str(tmp_path / ".env") in message
    check_credentials(["hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct", "ollama/llama3"])  # no key needed
    monkeypatch.setenv("OPENAI_API_BASE", "http://127.0.0.1:8000/v1")  # a server of one's own
    check_credentials(["openai/my-vllm-model"])
    monkeypatch.delenv("OPENAI_API_BASE")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key-123456")
    check_credentials(["openai/gpt-4o"])


@pytest.mark.filterwarnings("ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")
def test_keys_in_a_router_config_are_not_missing_and_an_unset_reference_is(monkeypatch, tmp_path):
    import yaml

    from mics_agents.models.providers import check_credentials, load_router

    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "pool", "litellm_params": {"model": "openai/gpt-4o", "api_key": "sk-from-yaml-1234567"}},
        {"model_name": "by-reference", "litellm_params": {"model": "openai/gpt-4o", "api_key": "os.environ/POOL_KEY"}},
    ]}))
    router = load_router(config)
    check_credentials(["pool"], router)
    with pytest.raises(ConfigError, match="by-reference needs POOL_KEY"):
        check_credentials(["by-reference"], router)
    monkeypatch.setenv("POOL_KEY", "sk-pool-key-abcdefgh")
    check_credentials(["by-reference"], router)


# -- the import graph ------------------------------------------------------------------------------------


def test_the_model_package_has_no_import_cycle_and_transports_do_not_import_each_other():
    folder = Path(__import__("mics_agents.models", fromlist=["x"]).__file__).parent
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):  # module level and inside functions alike
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported.add(node.module or "__init__")
        graph[path.stem] = {name for name in imported if (folder / f"{name}.py").exists()}
    assert "direct" not in graph["litellm_model"] and "litellm_model" not in graph["direct"]
    assert not graph["clients"] & {"direct", "litellm_model", "transport"}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, f"import cycle: {' -> '.join((*trail, name))}"
        for child in graph.get(name, ()):
            visit(child, (*trail, name))

    for name in graph:
        if name != "__init__":
            visit(name, ())


async def test_one_sample_of_a_model_that_sends_samples_together_is_one_shared_call(tmp_path):
    """request_samples with one index takes the single-call path (no batch task around it): a twin asked
    meanwhile shares it, a cancelled caller does not cancel the twin, and the reply is stored under the
    sample's own key."""
    release = asyncio.Event()
    sent: list[int] = []

    class Together(FunctionModel):
        @property
        def sends_samples_together(self) -> bool:
            return True

    async def answer(request: ModelRequest) -> str:
        sent.append(request.sample_index)
        await release.wait()
        return f"sample {request.sample_index}"

    async with await Store.open(tmp_path / "cache.sqlite") as store:
        cached = CachedModel(Together("scripted/m", answer), store)
        assert cached.sends_samples_together
        first = asyncio.ensure_future(cached.request_samples(REQUEST, [3]))
        twin = asyncio.ensure_future(cached.request_samples(REQUEST, [3]))
        await asyncio.sleep(0.01)
        assert not cached._batches and len(cached._in_flight) == 1
        first.cancel()
        await asyncio.sleep(0.01)
        release.set()
        [reply] = await twin
        assert reply.text == "sample 3" and sent == [3]
        from dataclasses import replace as replaced

        assert (await store.get_call(replaced(REQUEST, sample_index=3).cache_key("scripted/m"))).text == "sample 3"
