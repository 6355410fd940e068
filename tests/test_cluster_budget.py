"""``mics run --ray --budget-usd``: one budget for the whole run (issue 29). The driver sums what every shard
spent; once the budget is spent it stops every shard (none starts a new item, items in flight finish), exits 3
with stop_reason "budget" as a normal run does, merges nothing, and a rerun with a larger budget resumes every
shard and completes with one line per item, repeating no call the stopped run was answered.

The bound tested: after the driver's decision (the "stopping every shard" line), the server sees calls only of
items that had already sent one (items in flight), or of items a shard started before the cancel reached it
(Ray's cancel reaching the shard's task, which sees it within 0.05 s, then SIGINT to its run): within ``CANCEL_LAG``
of the decision (measured up to 0.55 s on 2 busy cores). No shard's run outlives the driver, and nothing calls
the server after it exited."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from mics_agents.cluster.shard_task import shard_output  # noqa: E402
from mics_agents.data import shard_of  # noqa: E402

from .openai_server import OpenAIServer, RecordedRequest, simulated_brain_with_roles  # noqa: E402
from .test_cluster_ray import SHARDS, alive, cluster, dataset, holder_pid  # noqa: E402,F401
from .test_run_process import (  # noqa: E402,F401
    PRICED_ROLES, PRICES, answered, flat, launch, lines_by_item, mics_env, run_args, run_mics, wait_until,
    without_usage,
)

CANCEL_LAG = 2.0  # seconds from the decision to the last shard having stopped starting items
DECISION = "stopping every shard"


def item_of(request: RecordedRequest, questions: dict[str, str]) -> str:
    text = request.text()
    found = [key for key, question in questions.items() if question in text]
    assert len(found) == 1, f"request names {len(found)} items: {text[:200]!r}"
    return found[0]


def summary_spent(path: Path) -> float:
    return json.loads(path.read_text())["spent_usd"]


def shard_costs(records: dict[str, dict]) -> dict[int, float]:
    costs = dict.fromkeys(range(SHARDS), 0.0)
    for key, record in records.items():
        usage = record.get("usage") or record.get("search", {}).get("usage") or {}
        costs[shard_of(key, SHARDS)] += usage.get("cost_usd", 0.0)
    return costs


def test_the_budget_stops_every_shard_and_a_larger_budget_completes_the_run(cluster, dataset, tmp_path, launch):
    questions = {}
    for line in dataset.path.read_text().splitlines():
        record = json.loads(line)
        question = record.get("question") or record["messages"][0]["content"].removeprefix("**Question:** ")
        questions[record.get("rid", record.get("id"))] = question.split("\n")[0]
    output = tmp_path / "ray.jsonl"
    shards = [shard_output(output, index, SHARDS) for index in range(SHARDS)]
    args = [*run_args(dataset, output, tmp_path / "ignored.sqlite", "--ray", "--ray-address", cluster,
                      "--shards", str(SHARDS)), "--concurrency", "1"]
    with OpenAIServer(simulated_brain_with_roles(PRICED_ROLES), latency=(0.03, 0.08), latency_seed=11,
                      lifetime=300) as server:
        env = mics_env(server, MICS_MENTORS="openai/gpt-4o,openai/gpt-4o-mini", MICS_PRICES=PRICES)
        single = run_mics([*run_args(dataset, tmp_path / "single.jsonl", tmp_path / "single.sqlite"),
                           "--json-summary", str(tmp_path / "single.json")], env, tmp_path)
        assert single.returncode == 0, single.stderr
        full_cost = json.loads((tmp_path / "single.json").read_text())["spent_usd"]
        # Above what any one shard costs (so no shard stops itself: the driver must), well below the whole.
        budget = round(max(shard_costs(lines_by_item(tmp_path / "single.jsonl")).values()) * 1.05, 6)
        assert budget < 0.6 * full_cost
        server.reset()

        driver = launch([*args, "--budget-usd", f"{budget}", "--json-summary", str(tmp_path / "s1.json")], env,
                        name="driver")
        seen: set[int] = set()

        def decided() -> bool:
            seen.update(pid for pid in map(holder_pid, shards) if pid is not None)
            return DECISION in flat(driver.err()) or driver.process.poll() is not None

        wait_until(decided, timeout=180, what="the driver's budget decision")
        decided_at = time.monotonic()
        assert driver.wait(timeout=120) == 3, driver.err()
        exited_at = time.monotonic()
        for pid in seen:
            assert not alive(pid), f"shard run {pid} still running after the driver exited"
        count = server.count()
        time.sleep(1.0)
        assert server.count() == count  # nothing sends calls any more
        first_session = server.recorded()
        server.reset()
        assert not output.exists()  # no merge of a run that did not end
        ended_first = {key for shard in shards for key in lines_by_item(shard)}  # (one line per item, each shard)

        # The same budget again: what each shard spent before (beside its journal) is spent already; no shard
        # starts, none sends a call, and none counts as failed.
        again = run_mics([*args, "--budget-usd", f"{budget}", "--json-summary", str(tmp_path / "again.json")], env,
                         tmp_path)
        assert again.returncode == 3, again.stderr
        assert server.count() == 0 and "Shard" not in flat(again.stderr)
        assert "was spent by former sessions" in flat(again.stderr) and "no shard starts" in flat(again.stderr)
        again_summary = json.loads((tmp_path / "again.json").read_text())
        assert again_summary["stop_reason"] == "budget" and again_summary["shards"] == []
        assert again_summary["spent_usd"] == pytest.approx(summary_spent(tmp_path / "s1.json"), abs=1e-6)

        # Without --shards the cluster's CPUs would make 2 shards: the rerun takes the 4 its journals were run with.
        at = args.index("--shards")
        unsharded = args[:at] + args[at + 2:]
        resumed = run_mics([*unsharded, "--budget-usd", "100", "--json-summary", str(tmp_path / "s2.json")], env,
                           tmp_path)
        second_session = server.recorded()
        assert server.errors == []

    stderr = flat(driver.err())
    assert DECISION in stderr and f"Budget of ${budget} reached: every shard stopped" in stderr
    summary = json.loads((tmp_path / "s1.json").read_text())
    assert summary["stop_reason"] == "budget" and summary["spent_usd"] >= budget
    assert 0 < summary["not_started"] < len(dataset.keys)  # stopped mid-run
    assert all(request.received_at < exited_at for request in first_session)

    first_call: dict[str, float] = {}
    for request in first_session:
        key = item_of(request, questions)
        first_call[key] = min(first_call.get(key, request.received_at), request.received_at)
    in_flight = {key for key, at in first_call.items() if at <= decided_at}
    late = {key: round(at - decided_at, 3) for key, at in first_call.items() if at > decided_at + CANCEL_LAG}
    assert not late, f"items started after the budget stop: {late}"
    after = [item_of(request, questions) for request in first_session if request.received_at > decided_at]
    started_late = set(after) - in_flight  # started before the cancel reached their shard (checked above)
    assert ended_first <= set(first_call) and len(ended_first) < len(dataset.keys)
    print({key: round(first_call[key] - decided_at, 3) for key in started_late})
    print(f"budget ${budget} of ${full_cost:.6f}: spent ${summary['spent_usd']:.6f}; {len(after)} calls after the "
          f"stop, of {len(set(after))} items ({len(started_late)} started after it); {len(ended_first)} items ended")

    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming the {SHARDS} shards beside" in flat(resumed.stderr)
    records = lines_by_item(output)
    assert sorted(records) == sorted(dataset.keys)
    assert without_usage(records) == without_usage(lines_by_item(tmp_path / "single.jsonl"))
    assert json.loads((tmp_path / "s2.json").read_text())["already_done"] == len(ended_first)
    assert not answered(first_session) & {request.canonical() for request in second_session}
