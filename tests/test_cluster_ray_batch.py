"""``mics run --ray --batch`` on a local Ray (issue 29), against the fake batch APIs: 2 shards, each batched,
merge to what one unsharded ``mics run --batch`` writes; no request is ever submitted twice; each shard's
ledger lies beside its journal with no ``-shm`` file; a shard whose items all wait on batches is run again
until it ends (its task loops, resuming from journal and ledger). The budget: batches held in progress at the
provider cost nothing yet, but what both shards committed (their estimates) reaches the driver, which stops
every shard on it and exits 3."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from mics_agents.batches import ledger_path  # noqa: E402
from mics_agents.cluster.shard_task import committed_path, shard_output  # noqa: E402

from .fake_batch_server import FakeBatchServer  # noqa: E402
from .test_batches import write_cases  # noqa: E402
from .test_batches_process import MICS, mics_env, outcomes, run  # noqa: E402
from .test_cluster_ray import alive, cluster, holder_pid  # noqa: E402,F401
from .test_run_process import launch, wait_until  # noqa: E402,F401

SHARDS = 2
RAY_TIMEOUT = 300.0
PRICES = json.dumps({name: {"input": 2e-6, "output": 8e-6}
                     for name in ("openai/mentor-a", "openai/mentor-b", "openai/judge", "openai/intern-1")})


def run_on_ray(data: Path, output: Path, env: dict[str, str], cwd: Path, address: str,
               *extra: str) -> subprocess.CompletedProcess:
    args = ["run", str(data), "--image-dir", str(data.parent / "images"), "--output", str(output), "--batch",
            "--seed", "3", "--ray", address, "--shards", str(SHARDS), "--json-summary",
            str(output.with_name("summary.json")), *extra]
    return subprocess.run([*MICS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=RAY_TIMEOUT)


def no_shm_files(folder: Path) -> bool:
    return not list(folder.rglob("*-shm"))


def test_two_batched_shards_merge_to_an_unsharded_batched_run_submitting_nothing_twice(cluster, tmp_path):
    data = write_cases(tmp_path, 6)
    reference_dir, ray_dir = tmp_path / "reference", tmp_path / "ray"
    reference_dir.mkdir()
    ray_dir.mkdir()
    with FakeBatchServer(delay=0.3) as fake:
        reference = run(data, reference_dir / "out.jsonl", mics_env(fake, "openai", MICS_PRICES=PRICES), reference_dir)
        assert reference.returncode == 0, reference.stderr
    expected = outcomes(reference_dir / "out.jsonl")
    assert len(expected) == 6
    with FakeBatchServer(delay=0.3) as fake:
        sharded = run_on_ray(data, ray_dir / "out.jsonl", mics_env(fake, "openai", MICS_PRICES=PRICES), ray_dir,
                             cluster)
        assert sharded.returncode == 0, sharded.stderr
        assert fake.submitted_twice() == {} and fake.errors == []
        submitted = {custom_id for _, custom_id in fake.submissions}
    assert outcomes(ray_dir / "out.jsonl") == expected
    summary = json.loads((ray_dir / "summary.json").read_text())
    assert [shard["exit_code"] for shard in summary["shards"]] == [0] * SHARDS
    # Items waited on batches in progress: each shard's run exited 75 at least once and its task ran it again.
    assert all(shard["batch_reruns"] >= 1 for shard in summary["shards"]), summary["shards"]
    assert no_shm_files(ray_dir)  # (looked at before the test reads a ledger: its own reader would make one)
    recorded: set[str] = set()
    for index in range(SHARDS):
        ledger = ledger_path(shard_output(ray_dir / "out.jsonl", index, SHARDS))
        assert ledger.is_file() and ledger.parent == ray_dir  # beside the journal, on the shared storage
        with closing(sqlite3.connect(ledger)) as db:
            assert {row[0] for row in db.execute("SELECT state FROM batches")} == {"ended"}
            ids = [row[0] for row in db.execute("SELECT custom_id FROM batch_requests")]
        assert not recorded & set(ids)  # no request in two shards' ledgers
        recorded |= set(ids)
    assert recorded == submitted
    # Every batch ended: what the shards committed is spent now; nothing is left counted as committed.
    for index in range(SHARDS):
        spent = json.loads(shard_output(ray_dir / "out.jsonl", index, SHARDS).with_name(
            f"out.shard-{index}-of-{SHARDS}.spent.json").read_text())
        assert spent["committed_usd"] == 0.0 and spent["spent_usd"] > 0


def test_the_budget_counts_what_both_shards_committed_to_batches_and_stops_them(cluster, tmp_path):
    """Batches held in progress: nothing is billed, so only their estimates can stop the run. Each shard's first
    round of batches alone is under the budget (a shard by itself would go on waiting); both together pass it.
    The board grants each batch against what every shard committed, so together they never pass it."""
    data = write_cases(tmp_path, 6)
    probe_dir, ray_dir = tmp_path / "probe", tmp_path / "ray"
    probe_dir.mkdir()
    ray_dir.mkdir()
    with FakeBatchServer() as fake:
        fake.hold = True
        env = mics_env(fake, "openai", MICS_PRICES=PRICES)
        # How much each shard's first round of batches is counted at: one shard alone, then stopped.
        probe = run_on_ray(data, probe_dir / "out.jsonl", env, probe_dir, cluster, "--no-wait")
        assert probe.returncode == 75, probe.stderr
        estimates = []
        for index in range(SHARDS):
            with closing(sqlite3.connect(ledger_path(shard_output(probe_dir / "out.jsonl", index, SHARDS)))) as db:
                estimates.append(db.execute("SELECT COALESCE(SUM(estimated_cost_usd), 0) FROM batches").fetchone()[0])
        assert all(estimate > 0 for estimate in estimates), estimates
        budget = max(estimates) * 1.2  # more than either shard's batches, less than both
        assert budget < sum(estimates)
        before = len(fake.submissions)
        stopped = run_on_ray(data, ray_dir / "out.jsonl", env, ray_dir, cluster, "--budget-usd", f"{budget:.8f}")
        submitted = fake.submissions[before:]
        text = " ".join(stopped.stderr.split())
        assert stopped.returncode == 3, stopped.stderr
        assert "stopping every shard" in text and "next batch would pass it" in text, text
        summary = json.loads((ray_dir / "summary.json").read_text())
        assert {shard["exit_code"] for shard in summary["shards"]} <= {3, 130}, summary["shards"]
        assert summary["spent_usd"] == 0.0  # nothing billed: it was the commitments that stopped it
        assert no_shm_files(ray_dir)
        total, committed = 0.0, 0.0
        for index in range(SHARDS):
            shard = shard_output(ray_dir / "out.jsonl", index, SHARDS)
            committed += json.loads(shard.with_name(f"out.shard-{index}-of-{SHARDS}.spent.json").read_text())[
                "committed_usd"]
            with closing(sqlite3.connect(ledger_path(shard))) as db:
                total += db.execute("SELECT COALESCE(SUM(estimated_cost_usd), 0) FROM batches").fetchone()[0]
        # The shards together never committed more than the budget (each alone would have gone to it).
        assert 0 < total <= budget and abs(committed - total) < 1e-9, (total, committed, budget)
        assert len({custom_id for _, custom_id in submitted}) == len(submitted)  # nothing twice
        # A rerun (--no-wait: the held batches never end) re-attaches: no request submitted twice over both runs,
        # and it stops on the budget or leaves its shards waiting, never passing it.
        again = run_on_ray(data, ray_dir / "out.jsonl", env, ray_dir, cluster, "--budget-usd", f"{budget:.8f}",
                           "--no-wait")
        assert again.returncode in (3, 75), again.stderr
        both = [custom_id for _, custom_id in fake.submissions[before:]]
        assert len(set(both)) == len(both)
        total = 0.0
        for index in range(SHARDS):
            with closing(sqlite3.connect(ledger_path(shard_output(ray_dir / "out.jsonl", index, SHARDS)))) as db:
                total += db.execute("SELECT COALESCE(SUM(estimated_cost_usd), 0) FROM batches").fetchone()[0]
        assert total <= budget


def test_a_batched_shard_whose_worker_is_killed_is_retried_and_resubmits_nothing(cluster, tmp_path, launch):
    """Ray runs the task again after its worker died with batches in progress: the new attempt resumes from the
    journal and re-attaches to the batches its ledger (beside the journal) records; none is submitted twice."""
    data = write_cases(tmp_path, 6)
    output = tmp_path / "out.jsonl"
    first = shard_output(output, 0, SHARDS)
    with FakeBatchServer(delay=1.5) as fake:
        env = mics_env(fake, "openai", MICS_PRICES=PRICES, MICS_CLUSTER_BACKUP_EVERY="0.3")
        driver = launch(["run", str(data), "--image-dir", str(data.parent / "images"), "--output", str(output),
                         "--batch", "--seed", "3", "--ray", cluster, "--shards", str(SHARDS)], env, name="driver")

        def shard_0_has_a_batch_in_progress() -> bool:
            try:
                committed = json.loads(committed_path(first).read_text())["committed_usd"]
            except (OSError, ValueError, KeyError):
                return False
            return committed > 0 and holder_pid(first) is not None and len(fake.submissions) > 0

        wait_until(shard_0_has_a_batch_in_progress, timeout=120, what="shard 0 running with a batch in progress")
        child = holder_pid(first)
        worker = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its Ray worker
        submitted_before = len(fake.submissions)
        os.kill(worker, signal.SIGKILL)
        assert driver.wait(timeout=240) == 0, driver.err()
        assert fake.submitted_twice() == {} and fake.errors == []
        assert submitted_before > 0
        made = {batch_id for batch_id, _ in fake.submissions}
    assert not alive(child)  # the shard's run died with its worker; a second attempt finished the shard
    records = outcomes(output)
    assert len(records) == 6
    recorded: set[str] = set()
    for index in range(SHARDS):
        with closing(sqlite3.connect(ledger_path(shard_output(output, index, SHARDS)))) as db:
            # Every batch is known at the provider (none left recorded but unsent); one whose calls the items no
            # longer needed once they ended may still be in progress, as after any run.
            assert {row[0] for row in db.execute("SELECT state FROM batches")} <= {"ended", "submitted"}
            recorded |= {row[0] for row in db.execute("SELECT batch_id FROM batches")}
    assert made == recorded  # every batch made was recorded, and the retried attempt made none again
