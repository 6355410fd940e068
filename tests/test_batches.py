"""mics run --batch in process, against the local fake of both batch APIs: the same outcome as online, the
cost at the batch rate, errored and expired requests retried then asked online, the budget counted at
submission, --no-wait and the rerun that finishes, a lost cache read back from the batches' results."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from mics_agents.batches import ledger_path, open_batch_worker
from mics_agents.config import load_settings
from mics_agents.errors import ConfigError
from mics_agents.runner import BatchRun, RunOptions, run_id_for
from mics_agents.search import Searcher

from .fake_batch_server import FakeBatchServer

MODELS = {
    "MICS_MENTORS": "openai/mentor-a,anthropic/mentor-b",
    "MICS_INTERNS": "openai/intern-1",
    "MICS_JUDGE": "openai/judge",
    "MICS_BATCH_MODELS": "openai/mentor-a,anthropic/mentor-b,openai/judge",
    "MICS_BATCH_POLL_INTERVAL": "0.02",
    "MICS_RETRY_INITIAL_WAIT": "0.01",
    "MICS_RETRY_MAX_WAIT": "0.05",
    # Priced, so that the batch rate shows: USD per token online (batches: half).
    "MICS_PRICES": json.dumps({name: {"input": 2e-6, "output": 8e-6}
                               for name in ("openai/mentor-a", "anthropic/mentor-b", "openai/judge")}),
}
DIAGNOSES = ["Tension pneumothorax", "Brain abscess", "Sigmoid volvulus", "Duodenal atresia"]


def write_cases(folder: Path, count: int) -> Path:
    """Free-text cases (graded by the judge) and multiple-choice ones, one image each."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (24, 20), ((index * 37) % 256, 60, 120)).save(buffer, format="PNG")
        (images / f"scan{index}.png").write_bytes(buffer.getvalue())
        if index % 3 == 2:
            question, answer = f"Case {index}: which finding?\nA. Mass\nB. Cyst\nC. Normal", "ABC"[index % 3]
        else:
            question, answer = f"Case {index}: what is the most likely diagnosis?", DIAGNOSES[index % len(DIAGNOSES)]
        lines.append(json.dumps({"id": f"case-{index}", "question": question, "answer": answer,
                                 "images": [f"scan{index}.png"]}))
    path = folder / "cases.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def env(monkeypatch):
    def point_at(fake: FakeBatchServer, **extra: str) -> None:
        for name, value in {**MODELS, "OPENAI_API_BASE": fake.openai_base, "OPENAI_API_KEY": "sk-test",
                            "ANTHROPIC_API_BASE": fake.anthropic_base, "ANTHROPIC_API_KEY": "sk-ant-test",
                            **extra}.items():
            monkeypatch.setenv(name, value)

    return point_at


async def run_once(data: Path, output: Path, cache: Path, *, batch: bool = True, no_wait: bool = False,
                   budget: float | None = None, events: list[str] | None = None, resubmit_canceled: bool = False):
    settings = load_settings(cache_path=str(cache))
    run_id = run_id_for(output)
    if batch:
        worker = await open_batch_worker(settings, run_id=run_id, output=output, no_wait=no_wait,
                                         resubmit_canceled=resubmit_canceled,
                                         on_event=(events.append if events is not None else None))
    else:
        worker = await Searcher.open(settings, run_id=run_id)
    try:
        options = RunOptions(data=data, output=output, image_dir=data.parent / "images", concurrency=1000,
                             budget_usd=budget)
        return await BatchRun(worker, options).run()
    finally:
        await worker.aclose()


def records(output: Path) -> dict[str, dict]:
    """Each success by id, without its usage (what it cost is what differs between the two runs)."""
    return {row["rid"]: {key: value for key, value in row.items() if key != "usage"}
            for row in map(json.loads, output.read_text().splitlines())}


def cache_keys(cache: Path) -> set[str]:
    with sqlite3.connect(cache) as db:
        return {row[0] for row in db.execute("SELECT key FROM calls")}


async def test_a_batched_run_ends_as_the_same_run_online_with_the_same_cache_keys_at_half_the_price(tmp_path, env):
    data = write_cases(tmp_path, 8)
    with FakeBatchServer(delay=0.05) as fake:
        env(fake)
        online = await run_once(data, tmp_path / "online.jsonl", tmp_path / "online.sqlite", batch=False)
        online_calls = len(fake.online_calls)
        batched = await run_once(data, tmp_path / "batched.jsonl", tmp_path / "batched.sqlite")
        assert fake.errors == []
    assert (online.success, online.no_path) == (batched.success, batched.no_path) and batched.ended == 8
    assert batched.success >= 6
    assert records(tmp_path / "online.jsonl") == records(tmp_path / "batched.jsonl")
    assert cache_keys(tmp_path / "online.sqlite") == cache_keys(tmp_path / "batched.sqlite")
    # Only the intern (not batched) went online in the batched run; every mentor and judge call was batched.
    batched_online = fake.online_calls[online_calls:]
    assert {model for _, model in batched_online} == {"intern-1"}
    assert fake.submitted_twice() == {}
    summary = batched.as_dict()["batches"]
    assert summary["requests_submitted"] == len(fake.submissions) == summary["replies"]
    assert summary["requests_per_batch"] > 1
    # Priced at the batch rate: half of what the same replies cost online, and that is what was spent.
    assert summary["batch_cost_usd"] == pytest.approx(summary["online_cost_usd"] / 2)
    assert summary["batch_cost_usd"] > 0
    assert batched.spent_usd == pytest.approx(summary["batch_cost_usd"])
    assert online.spent_usd == pytest.approx(summary["online_cost_usd"])
    # Each record's usage says what its calls would have cost online, and the report adds them up.
    from mics_agents.report import write_report

    def usage_total(path, key):  # over every search: successes, and the failed file's no_path searches
        failed = path.with_name(path.stem + "_failed.jsonl")
        searches = [json.loads(line) for line in path.read_text().splitlines()]
        if failed.exists():
            searches += [json.loads(line)["search"] for line in failed.read_text().splitlines()]
        return sum(search["usage"][key] for search in searches if "usage" in search)

    assert usage_total(tmp_path / "online.jsonl", "online_cost_usd") == pytest.approx(
        usage_total(tmp_path / "online.jsonl", "cost_usd"))
    assert usage_total(tmp_path / "batched.jsonl", "online_cost_usd") == pytest.approx(
        usage_total(tmp_path / "online.jsonl", "cost_usd"))
    assert usage_total(tmp_path / "batched.jsonl", "cost_usd") < usage_total(tmp_path / "online.jsonl", "cost_usd")
    page = write_report(tmp_path / "batched.jsonl", tmp_path / "report.html").summary["usage"]
    assert page["online_cost_usd"] == pytest.approx(usage_total(tmp_path / "online.jsonl", "cost_usd"))
    assert page["cost_usd"] == pytest.approx(usage_total(tmp_path / "batched.jsonl", "cost_usd"))


async def test_errored_and_expired_requests_go_in_a_later_batch_then_online(tmp_path, env):
    data = write_cases(tmp_path, 6)
    with FakeBatchServer() as reference_server:
        env(reference_server)
        await run_once(data, tmp_path / "reference.jsonl", tmp_path / "reference.sqlite")

    def outcome(custom_id: str, before: int) -> str | None:
        # Some requests error once (answered in the next batch); some expire every time (asked online
        # after MICS_BATCH_RETRIES=1 retry).
        if int(custom_id, 16) % 5 == 0:
            return "expired"
        if int(custom_id, 16) % 5 == 1 and before == 0:
            return "errored"
        return None

    events: list[str] = []
    with FakeBatchServer(outcome=outcome) as fake:
        env(fake, MICS_BATCH_RETRIES="1")
        stats = await run_once(data, tmp_path / "out.jsonl", tmp_path / "cache.sqlite", events=events)
        always_expired = {cid for _, cid in fake.submissions if int(cid, 16) % 5 == 0}
        twice = fake.submitted_twice()
    summary = stats.as_dict()["batches"]
    assert stats.ended == 6 and stats.model_error == 0
    assert records(tmp_path / "out.jsonl") == records(tmp_path / "reference.jsonl")
    # An expired request is in exactly two batches (first try, one retry), then asked online once.
    assert always_expired and all(twice.get(cid) == 2 for cid in always_expired)
    assert summary["asked_online_instead"] == len(always_expired)
    assert len([call for call in fake.online_calls if call[1] != "intern-1"]) == len(always_expired)
    assert summary["retried_in_a_later_batch"] >= len(always_expired)
    assert any("asking it" in event for event in events)


async def test_a_request_that_keeps_failing_ends_its_item_as_model_error_when_the_fallback_is_fail(tmp_path, env):
    data = write_cases(tmp_path, 3)
    with FakeBatchServer(outcome=lambda custom_id, before: "errored") as fake:
        env(fake, MICS_BATCH_RETRIES="0", MICS_BATCH_FALLBACK="fail")
        stats = await run_once(data, tmp_path / "out.jsonl", tmp_path / "cache.sqlite")
        assert fake.submitted_twice() == {}
        assert [call for call in fake.online_calls if call[1] != "intern-1"] == []
    assert stats.model_error == 3 and stats.success == 0
    failures = [json.loads(line) for line in (tmp_path / "out_failed.jsonl").read_text().splitlines()]
    assert all("MICS_BATCH_FALLBACK=online" in row["error"]["message"] for row in failures)


async def test_no_batch_is_submitted_that_would_pass_the_budget(tmp_path, env):
    data = write_cases(tmp_path, 4)
    with FakeBatchServer() as fake:
        env(fake)
        stats = await run_once(data, tmp_path / "out.jsonl", tmp_path / "cache.sqlite", budget=0.001)
        assert fake.submissions == []
    assert stats.stop_reason == "budget"
    assert stats.spent_usd == 0
    # Each item that waited on the refused batch ends as model_error (retried on the next run), saying why.
    failures = [json.loads(line) for line in (tmp_path / "out_failed.jsonl").read_text().splitlines()]
    assert failures and all("budget" in row["error"]["message"] for row in failures)


async def test_the_budget_counts_a_batch_at_submission_before_its_replies_are_known(tmp_path, env):
    data = write_cases(tmp_path, 4)
    with FakeBatchServer() as fake:
        env(fake)
        # Enough for the first round of mentor batches (estimated), not for everything after.
        stats = await run_once(data, tmp_path / "out.jsonl", tmp_path / "cache.sqlite", budget=0.12)
        submitted = len(fake.submissions)
    assert submitted > 0 and stats.stop_reason == "budget"
    with sqlite3.connect(ledger_path(tmp_path / "out.jsonl")) as db:
        estimates = sum(row[0] for row in db.execute("SELECT estimated_cost_usd FROM batches"))
    assert estimates <= 0.12
    assert stats.spent_usd <= 0.12


async def test_no_wait_leaves_batches_in_progress_and_a_rerun_finishes_without_submitting_twice(tmp_path, env):
    data = write_cases(tmp_path, 5)
    output, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    with FakeBatchServer() as fake:
        env(fake)
        fake.hold = True  # every batch stays in_progress
        events: list[str] = []
        first = await run_once(data, output, cache, no_wait=True, events=events)
        assert first.stop_reason == "waiting" and first.ended == 0
        assert first.as_dict()["batches"]["batches_in_progress"] == first.as_dict()["batches"]["batches_submitted"] > 0
        submitted = len(fake.submissions)
        assert not output.exists() or output.read_text() == ""
        # Still in progress: the rerun re-attaches, says so, and leaves again without sending anything.
        events.clear()
        second = await run_once(data, output, cache, no_wait=True, events=events)
        assert second.stop_reason == "waiting" and len(fake.submissions) == submitted
        assert any("re-attached" in event for event in events)
        fake.hold = False
        # As from cron: each session picks up what ended, submits the next round and leaves while it runs.
        sessions = []
        for _ in range(12):
            final = await run_once(data, output, cache, no_wait=True)
            sessions.append(final.stop_reason)
            if final.stop_reason == "completed":
                break
        assert fake.submitted_twice() == {}
    assert sessions[-1] == "completed" and set(sessions[:-1]) <= {"waiting"} and len(sessions) > 1
    assert len(records(output)) + len((tmp_path / "out_failed.jsonl").read_text().splitlines()) == 5


async def test_a_lost_cache_is_read_back_from_the_batches_results_not_bought_again(tmp_path, env):
    data = write_cases(tmp_path, 4)
    output, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    with FakeBatchServer() as fake:
        env(fake)
        await run_once(data, output, cache)
        submitted = len(fake.submissions)
        expected = records(output)
        for path in tmp_path.glob("cache.sqlite*"):
            path.unlink()
        output.unlink()
        again = await run_once(data, output, cache)
        assert len(fake.submissions) == submitted, "a request answered in a batch was submitted again"
    assert again.ended == 4 and records(output) == expected


async def test_a_model_with_no_batch_api_named_for_batches_is_refused_before_anything_starts(tmp_path, env):
    with FakeBatchServer() as fake:
        env(fake, MICS_INTERNS="hosted_vllm/qwen", HOSTED_VLLM_API_BASE="http://127.0.0.1:9/v1",
            MICS_BATCH_MODELS="mentors,hosted_vllm/qwen")
        with pytest.raises(ConfigError, match="hosted_vllm/qwen.*no batch API"):
            await open_batch_worker(load_settings(cache_path=str(tmp_path / "c.sqlite")), run_id="r",
                                    output=tmp_path / "out.jsonl")
        env(fake, MICS_BATCH_MODELS="openai/not-in-this-run")
        with pytest.raises(ConfigError, match="not a mentor, intern or judge"):
            await open_batch_worker(load_settings(cache_path=str(tmp_path / "c.sqlite")), run_id="r",
                                    output=tmp_path / "out.jsonl")


async def test_role_words_leave_local_interns_online_and_take_openai_only_on_its_own_api(tmp_path, env, monkeypatch):
    from mics_agents.batches import batch_routes

    with FakeBatchServer() as fake:
        env(fake, MICS_INTERNS="hosted_vllm/qwen", MICS_BATCH_MODELS="mentors,interns,judge")
        routes = batch_routes(load_settings())
        # openai/ on a server of one's own is batched only when named; anthropic/ is taken by its role.
        assert set(routes) == {"anthropic/mentor-b"}
        monkeypatch.delenv("OPENAI_API_BASE")
        routes = batch_routes(load_settings())
        assert set(routes) == {"openai/mentor-a", "anthropic/mentor-b", "openai/judge"}
        assert routes["openai/mentor-a"].endpoint == "https://api.openai.com/v1"


async def test_a_batch_cancelled_at_the_provider_is_sent_again_only_when_asked(tmp_path, env):
    import httpx

    data = write_cases(tmp_path, 3)
    output, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    with FakeBatchServer() as fake:
        env(fake)
        fake.hold = True
        await run_once(data, output, cache, no_wait=True)
        # Someone cancels the first batches in the provider's console.
        async with httpx.AsyncClient() as client:
            for batch_id in list(fake.openai_batches):
                await client.post(f"{fake.openai_base}/batches/{batch_id}/cancel")
            for batch_id in list(fake.anthropic_batches):
                await client.post(f"{fake.anthropic_base}/v1/messages/batches/{batch_id}/cancel")
        fake.hold = False
        submitted = len(fake.submissions)
        refused = await run_once(data, output, cache)
        assert len(fake.submissions) == submitted, "a cancelled request was sent again unasked"
        assert refused.model_error == 3
        failures = [json.loads(line) for line in (tmp_path / "out_failed.jsonl").read_text().splitlines()]
        assert all("--resubmit-canceled" in row["error"]["message"] for row in failures)
        final = await run_once(data, output, cache, resubmit_canceled=True)
        twice = fake.submitted_twice()
    assert final.ended == 3 and final.model_error == 0
    # Sent again once each, on request; nothing else twice.
    assert twice and set(twice.values()) == {2} and len(twice) == submitted


async def test_a_batch_past_its_deadline_is_cancelled_and_its_requests_go_in_a_later_batch(tmp_path, env):
    data = write_cases(tmp_path, 2)
    events: list[str] = []
    with FakeBatchServer() as fake:
        env(fake, MICS_BATCH_DEADLINE="0.3", MICS_BATCH_RETRIES="1")
        fake.hold = True

        async def release() -> None:  # the batches sent after the cancelled ones end normally
            import asyncio

            while not any(batch["status"] == "cancelled" for batch in fake.openai_batches.values()):
                await asyncio.sleep(0.02)
            fake.hold = False

        import asyncio

        releasing = asyncio.ensure_future(release())
        stats = await asyncio.wait_for(run_once(data, tmp_path / "out.jsonl", tmp_path / "cache.sqlite", events=events), 60)
        await releasing
        twice = fake.submitted_twice()
    assert stats.ended == 2 and stats.model_error == 0
    assert any("passed its deadline" in event for event in events)
    assert twice and set(twice.values()) == {2}
    assert stats.as_dict()["batches"]["retried_in_a_later_batch"] >= len(twice)


def test_the_progress_line_shows_the_batches_and_what_their_replies_would_cost_online():
    from mics_agents.progress import _counts
    from mics_agents.runner import RunStats

    stats = RunStats(spent_usd=0.25)
    assert "batches" not in _counts(stats)  # an online run says nothing of batches
    stats.batches = {"batches_in_progress": 2, "batches_ended": 3, "batch_cost_usd": 0.25, "online_cost_usd": 0.5}
    line = _counts(stats)
    assert "batches 2 running, 3 ended, $0.2500 (online $0.5000)" in line and "$0.2500 spent" in line
