"""The real LiteLLM path against an OpenAI-compatible server on 127.0.0.1 (DESIGN §5, §6, §8).

Every search here goes through the model stack (``models/factory.py``) -> ``litellm.acompletion`` (or a ``litellm.Router``) ->
HTTP -> ``tests/openai_server.py``, whose brain answers like the package's simulated mentors, interns
and judge. Faults are injected at the server; a search that met faults must equal a fault-free one.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from mics_agents import ModelCallError, ModelRequestsForbidden, SearchResult, Searcher, Settings, load_settings
from mics_agents.errors import ModelError
from mics_agents.models import ChatMessage, ModelRequest, TextPart, set_request_policy
from mics_agents.models.factory import open_model
from mics_agents.models.providers import load_router
from mics_agents.models.transport import retry_after_seconds

from .openai_server import OpenAIServer, RecordedRequest

# LiteLLM's Router builds a pydantic schema over a TypedDict with ReadOnly items; pydantic warns, harmlessly.
pytestmark = pytest.mark.filterwarnings("ignore:Items .* using the `ReadOnly` qualifier:UserWarning")

SECRET = "sk-test-secret-3b1f9c7e5d2a4068"
MENTORS = ["openai/mentor-a", "openai/mentor-b"]
INTERNS = ["openai/intern-1", "openai/intern-2"]
JUDGE = "openai/judge"
# With these texts the simulated models give a three-iteration search with judge calls (no mocks: the
# path is decided by the server's replies).
QUESTION = (
    "Case 7: a 58-year-old smoker has sudden pleuritic chest pain and shortness of breath. "
    "What is the most likely diagnosis?"
)
ANSWER = "Left tension pneumothorax"
CASE_MARKER = "CASE-RECORD-7731"
CASE_INFO = {
    "presentation": f"{CASE_MARKER}: sudden chest pain after a coughing fit",
    "age_label": "58",
    "gender_label": "male",
    "caption": ["<image> shows a hyperlucent left hemithorax"],
}
IMAGE = "scan.png"


# -- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    """A fresh server; LiteLLM's OpenAI provider pointed at it with a test key."""
    with OpenAIServer() as running:
        monkeypatch.setenv("OPENAI_API_BASE", running.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        yield running
        assert running.errors == [], "the server's brain failed on a request it should understand"


@pytest.fixture(params=["litellm", "direct"])
def transport(request) -> str:
    """Both ways a call can go out: through litellm.acompletion, or mics-agents' direct HTTP client
    (MICS_TRANSPORT=direct), which must behave the same on every fault."""
    return request.param


@pytest.fixture
def png(tmp_path: Path) -> bytes:
    """A real PNG in the working directory (the conftest chdirs to tmp_path), small enough to pass as is."""
    from PIL import Image

    image = Image.new("RGB", (48, 32))
    for x in range(48):
        for y in range(32):
            image.putpixel((x, y), (x * 5, y * 7, 90))
    image.save(tmp_path / IMAGE, format="PNG")
    return (tmp_path / IMAGE).read_bytes()


def make_settings(cache_path: Path | None, **overrides) -> Settings:
    values = {
        "mentors": MENTORS,
        "interns": INTERNS,
        "judge": JUDGE,
        "cache_path": cache_path,
        "seed": 7,
        "max_retries": 3,
        "retry_initial_wait": 0.01,
        "retry_max_wait": 0.05,
        "request_timeout": 10.0,
    }
    values.update(overrides)
    return load_settings(**values)


async def run_search(settings: Settings) -> SearchResult:
    async with await Searcher.open(settings) as searcher:
        return await searcher.search(QUESTION, IMAGE, answer=ANSWER, case_info=CASE_INFO, rid="case-5")


async def fault_free_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **overrides) -> tuple[SearchResult, int]:
    """The same search on a fresh server and a fresh cache; gives the result and the HTTP requests it took."""
    faulty_base = os.environ["OPENAI_API_BASE"]
    with OpenAIServer() as clean:
        monkeypatch.setenv("OPENAI_API_BASE", clean.base_url)
        try:
            result = await run_search(make_settings(tmp_path / f"clean-{clean.port}.sqlite", **overrides))
        finally:
            monkeypatch.setenv("OPENAI_API_BASE", faulty_base)
        assert clean.errors == [] and clean.count() > 0
        return result, clean.count()


def comparable(result: SearchResult) -> dict:
    return result.model_dump(exclude={"usage"})


def user_content(record: RecordedRequest) -> list:
    user = [message for message in record.body["messages"] if message["role"] == "user"]
    assert len(user) == 1
    content = user[0]["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def without_prefix(text: str) -> str:
    """The prompt text with the '## Reasoning so far' section (the mentors' steps) cut out."""
    return re.sub(r"^## Reasoning so far\n.*?(?=^## |\Z)", "", text, flags=re.MULTILINE | re.DOTALL)


def faulted_and_retry(server: OpenAIServer, kind: str) -> tuple[RecordedRequest, RecordedRequest]:
    records = server.recorded()
    faulted = [record for record in records if record.fault == kind]
    assert len(faulted) == 1, f"the {kind} fault should have hit exactly one request"
    later = records[records.index(faulted[0]) + 1 :]
    retries = [record for record in later if record.same_call(faulted[0])]
    assert retries, f"the request that met {kind} was never sent again"
    assert retries[0].fault is None and retries[0].status == 200
    return faulted[0], retries[0]


# -- a whole search over HTTP ------------------------------------------------------------------------


async def test_search_over_http_sends_images_and_keeps_interns_blind(server, png, tmp_path):
    result = await run_search(make_settings(tmp_path / "cache.sqlite"))

    assert result.status == "success", result.message
    assert result.final_depth == 3 and result.search_id == "1" and result.mics_score == 1.0
    assert set(result.generated_by) == set(MENTORS)
    assert result.reasoning.endswith(f"### The final answer is: {ANSWER}")
    assert {sample.intern for node in result.tree for sample in node.samples} == set(INTERNS)
    assert result.images == [IMAGE]
    # Every call not answered by the cache went over HTTP, and only those.
    assert result.usage.calls - result.usage.cached_calls == server.count()
    assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0

    judges = server.recorded("openai/judge")
    mentors = [r for r in server.recorded() if r.model.startswith("mentor-")]
    interns = [r for r in server.recorded() if r.model.startswith("intern-")]
    assert {r.model for r in mentors} == {"mentor-a", "mentor-b"}
    assert {r.model for r in interns} == {"intern-1", "intern-2"}
    assert judges, "the judge should have been asked about some free-text intern answers"
    assert all(r.path == "/v1/chat/completions" for r in server.recorded())
    assert all(r.headers.get("Authorization") == f"Bearer {SECRET}" for r in server.recorded())

    # The image arrives as a base64 PNG data URL in the user message of mentors and interns, byte for byte.
    for record in mentors + interns:
        images = [part for part in user_content(record) if part["type"] == "image_url"]
        assert len(images) == 1
        url = images[0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == png
    for record in judges:
        assert all(part["type"] == "text" for part in user_content(record))

    # Mentors see the case record and the answer; interns never do (only the mentors' steps, which may
    # name the diagnosis once a step reveals it: that is how an intern is led to it).
    assert all(CASE_MARKER in r.text() and ANSWER in r.text() for r in mentors)
    for record in interns:
        text = record.text()
        assert CASE_MARKER not in text and "hyperlucent" not in text and "Correct answer" not in text
        assert ANSWER.lower() not in without_prefix(text).lower()
    assert any(ANSWER in r.text() for r in interns), "some prefix should have revealed the diagnosis"
    # Interns are sampled at every configured temperature.
    assert {r.body["temperature"] for r in interns} == {1.2, 0.3}


# -- faults: retried, and the result is the fault-free one -------------------------------------------


async def test_429_is_retried_after_retry_after(server, png, tmp_path, monkeypatch, transport):
    clean, clean_requests = await fault_free_run(monkeypatch, tmp_path, transport=transport)
    server.inject("429", model="openai/mentor-a", retry_after=1)

    result = await run_search(make_settings(tmp_path / "cache.sqlite", transport=transport))

    assert comparable(result) == comparable(clean)
    assert result.usage.calls == clean.usage.calls
    faulted, retry = faulted_and_retry(server, "429")
    assert faulted.status == 429 and faulted.model == "mentor-a"
    # Backoff alone is at most retry_max_wait (0.05 s): waiting ~1 s means Retry-After was honoured.
    waited = retry.received_at - faulted.received_at
    assert 0.95 <= waited < 5, f"retry came {waited:.3f} s after the 429 with Retry-After: 1"
    assert server.count() == clean_requests + 1
    assert server.pending_faults() == []


@pytest.mark.parametrize(
    ("kind", "model", "overrides"),
    [
        ("500", "openai/intern-1", {}),
        ("timeout", "openai/judge", {"request_timeout": 1.0}),
        ("malformed", "openai/mentor-b", {}),
        ("empty", "openai/intern-2", {}),
        ("empty_content", "openai/judge", {}),
    ],
)
async def test_fault_is_retried_and_the_result_is_unchanged(
    server, png, tmp_path, monkeypatch, kind, model, overrides, transport
):
    overrides = {**overrides, "transport": transport}
    clean, clean_requests = await fault_free_run(monkeypatch, tmp_path, **overrides)
    server.inject(kind, model=model, delay=3.0)

    result = await run_search(make_settings(tmp_path / "cache.sqlite", **overrides))

    assert result.status == "success", result.message
    assert comparable(result) == comparable(clean)
    assert result.usage.calls == clean.usage.calls  # a failed attempt is not a call of the search
    faulted, retry = faulted_and_retry(server, kind)
    assert faulted.model == model.split("/")[-1]
    if kind == "timeout":
        # The client gave up after request_timeout (1 s) and sent it again; the late reply was dropped.
        assert retry.received_at - faulted.received_at >= 0.95
    assert server.count() == clean_requests + 1  # exactly one extra request: no double retries
    assert server.pending_faults() == []


async def test_a_model_that_keeps_failing_ends_as_model_error_not_a_wrong_answer(
    server, png, tmp_path, monkeypatch, transport
):
    clean, _ = await fault_free_run(monkeypatch, tmp_path, transport=transport)
    server.inject("500", model="openai/intern-2", times=None)
    settings = make_settings(tmp_path / "cache.sqlite", max_retries=2, transport=transport)

    result = await run_search(settings)

    assert result.status == "model_error"
    assert "openai/intern-2" in result.message and "gave up after 3 attempts" in result.message
    assert "HTTP 500" in result.message
    assert result.reasoning == "" and result.mics_score is None and result.search_id is None
    # No candidate was scored from the partial samples: nothing counts intern-2's failure as a wrong answer.
    assert result.tree and all(node.score is None and node.samples == [] for node in result.tree)
    failing = server.recorded("openai/intern-2")
    assert all(record.status == 500 for record in failing)
    # Iteration 1: 2 candidates x 2 temperatures = 4 intern-2 calls, each tried max_retries + 1 = 3 times.
    distinct = []
    for record in failing:
        if not any(record.same_call(seen) for seen in distinct):
            distinct.append(record)
    assert len(distinct) == 4 and len(failing) == 12

    # The next run (server healthy again) replays what succeeded from the cache and finishes the item.
    succeeded = [record for record in server.recorded() if record.status == 200]
    server.reset()
    rerun = await run_search(settings)
    assert comparable(rerun) == comparable(clean)
    assert not any(new.same_call(old) for new in server.recorded() for old in succeeded)
    assert rerun.usage.cached_calls >= len(succeeded)


async def test_401_is_not_retried_and_names_the_model(server, png, tmp_path):
    server.inject("401", model="openai/mentor-a")

    result = await run_search(make_settings(tmp_path / "cache.sqlite"))

    assert result.status == "model_error"
    assert "openai/mentor-a" in result.message and "HTTP 401" in result.message
    assert "API key" in result.message  # the hint says what to fix ...
    assert SECRET not in result.message  # ... without showing the key
    assert server.count("openai/mentor-a") == 1
    assert server.count("openai/mentor-b") == 1  # its sibling finished (and was cached), nothing else ran
    assert server.count() == 2


# -- the cache --------------------------------------------------------------------------------------


async def test_a_repeated_search_is_answered_from_the_cache_and_no_secret_is_stored(server, png, tmp_path):
    cache = tmp_path / "runs" / "cache.sqlite"
    settings = make_settings(cache)
    first = await run_search(settings)
    sent = server.count()
    assert sent > 0 and first.status == "success"

    async with await Searcher.open(settings) as searcher:
        second = await searcher.search(QUESTION, IMAGE, answer=ANSWER, case_info=CASE_INFO, rid="case-5")
        # Read the files while the store is open too (the WAL holds the newest pages).
        files_while_open = {path.name: path.read_bytes() for path in cache.parent.iterdir()}

    assert server.count() == sent, "a cached call was sent again"
    assert second.model_dump(exclude={"usage": {"cached_calls"}}) == first.model_dump(exclude={"usage": {"cached_calls"}})
    assert second.usage.cached_calls == second.usage.calls == first.usage.calls

    # The key did reach the server, so its absence from the database means something.
    assert all(record.headers.get("Authorization") == f"Bearer {SECRET}" for record in server.recorded())
    files_after = {path.name: path.read_bytes() for path in cache.parent.iterdir()}
    assert "cache.sqlite" in files_while_open and "cache.sqlite-wal" in files_while_open
    for name, data in [*files_while_open.items(), *files_after.items()]:
        for forbidden in (SECRET, "sk-test-secret", f"127.0.0.1:{server.port}"):
            assert forbidden.encode() not in data, f"{forbidden!r} found in {name}"
    assert any(b"mentor-a" in data for data in files_after.values())  # the file does hold the calls


# -- a LiteLLM Router config ------------------------------------------------------------------------


def write_router_config(path: Path, server: OpenAIServer, **router_settings) -> Path:
    deployments = [
        {"model_name": "intern-pool", "litellm_params": {"model": "openai/intern-1", "api_base": base}}
        for base in (server.base_url, server.base_url.replace("/v1", "/replica-2/v1"))
    ]
    config = {"model_list": deployments}
    if router_settings:
        config["router_settings"] = router_settings
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def test_router_config_routes_a_pool_name_to_its_deployments(server, png, tmp_path, monkeypatch):
    clean, _ = await fault_free_run(monkeypatch, tmp_path, interns=["openai/intern-1"])
    config = write_router_config(tmp_path / "router.yaml", server)
    settings = make_settings(tmp_path / "cache.sqlite", interns=["intern-pool"], router_config=config)
    assert settings.router_config == config

    result = await run_search(settings)

    assert result.status == "success", result.message
    pool = [r for r in server.recorded() if r.model.startswith("intern")]
    assert pool and {r.model for r in pool} == {"intern-1"}  # the Router swapped the pool name
    assert {r.path for r in pool} <= {"/v1/chat/completions", "/replica-2/v1/chat/completions"}
    assert {sample.intern for node in result.tree for sample in node.samples} == {"intern-pool"}
    # Same replies as calling openai/intern-1 directly: the same search, with the intern named as configured.
    renamed = comparable(result)
    for node in renamed["tree"]:
        for sample in node["samples"]:
            sample["intern"] = "openai/intern-1"
    assert renamed == comparable(clean)


async def test_router_cooldown_is_waited_out_not_burned_through(server, tmp_path):
    """Both deployments fail once and the Router cools them down (allowed_fails: 0); the next attempt
    gets RouterRateLimitError, and the retry must wait the Router's cooldown, not the short backoff."""
    router = load_router(write_router_config(tmp_path / "router.yaml", server, allowed_fails=0, cooldown_time=1))
    model = open_model("intern-pool", make_settings(None, max_retries=3), router=router)
    server.inject("500", model="openai/intern-1", times=2)
    request = ModelRequest(
        messages=(ChatMessage("user", (TextPart("## Question\nWhat is it?\n\n## Reasoning so far\n(none)"),)),),
        temperature=0.3,
    )

    try:
        response = await model.request(request)
    finally:
        await model.aclose()  # gives back its share of the loop's HTTP clients, so the last user closes them

    assert "### The final answer is:" in response.text
    first, second, success = server.recorded()
    assert (first.status, second.status, success.status) == (500, 500, 200)
    assert first.path != second.path  # the first deployment was cooling down, so the Router used the other
    assert success.received_at - second.received_at >= 0.95


def test_retry_after_reads_the_routers_cooldown():
    import litellm

    error = litellm.RouterRateLimitError(
        model="intern-pool", cooldown_time=4.0, enable_pre_call_checks=False, cooldown_list=["a", "b"]
    )
    assert retry_after_seconds(error) == 4.0


# -- the request policy -----------------------------------------------------------------------------


async def test_local_only_policy_refuses_a_remote_endpoint_before_any_request(server, png, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_BASE")  # openai/... would now go to api.openai.com

    with pytest.raises(ModelRequestsForbidden) as caught:
        await run_search(make_settings(tmp_path / "cache.sqlite"))

    # Not a ModelCallError: the search does not turn it into a retryable model_error item, it stops.
    assert isinstance(caught.value, ModelError) and not isinstance(caught.value, ModelCallError)
    assert caught.value.model in MENTORS and "127.0.0.1" in str(caught.value)
    assert server.count() == 0


async def test_deny_policy_refuses_even_the_local_server(server, png, tmp_path):
    set_request_policy("deny")  # the conftest restores its own policy afterwards
    with pytest.raises(ModelRequestsForbidden, match="switched off"):
        await run_search(make_settings(tmp_path / "cache.sqlite"))
    assert server.count() == 0


async def test_local_only_policy_checks_router_deployments(server, png, tmp_path):
    config = tmp_path / "router.yaml"
    remote = {"model": "openai/intern-1", "api_base": "https://api.example.invalid/v1"}
    config.write_text(yaml.safe_dump({"model_list": [{"model_name": "intern-pool", "litellm_params": remote}]}))
    settings = make_settings(tmp_path / "cache.sqlite", interns=["intern-pool"], router_config=config)

    with pytest.raises(ModelRequestsForbidden) as caught:
        await run_search(settings)

    assert caught.value.model == "intern-pool" and "api.example.invalid" in str(caught.value)
    # The mentors (local) ran; the pool was refused before it sent anything.
    assert server.count() > 0 and server.count("intern-1") == 0


async def test_per_model_concurrency_limit_holds_over_http(png, tmp_path, monkeypatch):
    """intern-1 is limited to 2 calls in flight; intern-2 keeps the default and runs all its calls at once."""
    with OpenAIServer(latency=0.15) as slow:
        monkeypatch.setenv("OPENAI_API_BASE", slow.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        settings = make_settings(
            None, samples_per_temperature=2, model_concurrency_overrides={"openai/intern-1": 2}
        )
        result = await run_search(settings)
    assert result.status == "success"
    assert slow.peak_in_flight["intern-1"] == 2
    # 2 candidates x 2 temperatures x 2 samples were ready at once for the unlimited intern.
    assert slow.peak_in_flight["intern-2"] >= 4


async def test_direct_transport_gives_the_litellm_result_with_images_and_usage(server, png, tmp_path):
    via_litellm = await run_search(make_settings(tmp_path / "a.sqlite"))
    litellm_requests = server.count()
    via_direct = await run_search(make_settings(tmp_path / "b.sqlite", transport="direct"))
    assert comparable(via_direct) == comparable(via_litellm)
    assert server.count() - litellm_requests == litellm_requests
    assert via_direct.usage.input_tokens == via_litellm.usage.input_tokens > 0
    direct_records = server.recorded()[litellm_requests:]
    assert all(r.headers.get("Authorization") == f"Bearer {SECRET}" for r in direct_records)
    with_images = [r for r in direct_records if "data:image/png;base64," in json.dumps(r.body)]
    assert with_images, "images go out as data URLs on the direct path too"
