"""``mics run --ray`` on a local Ray (issue 29): 4 shards against the test's OpenAI-compatible server equal an
unsharded run; a shard whose worker is SIGKILLed is retried and repeats no call answered before its cache's
last checkpoint; Ctrl-C on the driver stops every shard; a driver killed ends its shards and the same command
resumes them. The cluster (2 CPUs) is started and stopped here; each ``mics run --ray`` is a driver process of
its own that connects to it. The budget: ``test_cluster_budget.py``."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from mics_agents.cluster.cache_backup import backup_path, delta_paths  # noqa: E402
from mics_agents.cluster.shard_task import shard_output  # noqa: E402

from .openai_server import OpenAIServer  # noqa: E402
from .test_run_process import (  # noqa: E402
    IN_FLIGHT_WINDOW, lines_by_item, mics_env, run_args, run_mics, wait_until, without_usage, write_dataset, launch,
)

SHARDS = 4
__all__ = ["launch"]


@pytest.fixture(scope="module")
def cluster() -> str:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ray-data"))


def ray_args(dataset, output: Path, address: str, *extra: str) -> list[str]:
    """``--ray ADDRESS --shards N`` (the budget test spells it ``--ray-address``)."""
    return [*run_args(dataset, output, output.with_name("ignored.sqlite"), "--ray", address,
                      "--shards", str(SHARDS)), *extra]


def holder_pid(shard: Path) -> int | None:
    """The pid of the ``mics run`` that owns a shard's output now (from its lock file), if any."""
    try:
        return json.loads(shard.with_name(shard.name + ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def last_checkpoint(shard: Path) -> float:
    """When the shard's cache was last copied beside it (its base or newest delta), on the clock the test server
    stamps requests with (time.monotonic())."""
    newest = max(path.stat().st_mtime for path in [backup_path(shard), *(path for _, path in delta_paths(shard))])
    return newest - time.time() + time.monotonic()


def test_four_shards_on_ray_merge_to_what_one_unsharded_run_writes(cluster, dataset, tmp_path):
    with OpenAIServer(lifetime=200) as server:
        env = mics_env(server)
        single = run_mics(run_args(dataset, tmp_path / "single.jsonl", tmp_path / "single.sqlite"), env, tmp_path)
        assert single.returncode == 0, single.stderr
        sharded = run_mics(ray_args(dataset, tmp_path / "ray.jsonl", cluster, "--json-summary",
                                    str(tmp_path / "summary.json")), env, tmp_path)
    assert sharded.returncode == 0, sharded.stderr
    merged = lines_by_item(tmp_path / "ray.jsonl")
    assert sorted(merged) == sorted(dataset.keys)
    assert without_usage(merged) == without_usage(lines_by_item(tmp_path / "single.jsonl"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [shard["exit_code"] for shard in summary["shards"]] == [0] * SHARDS
    # Each shard copied its whole cache once (its first checkpoint, at its end here), no delta yet.
    assert [shard["cache_backups"] for shard in summary["shards"]] == [{"full": 1, "deltas": 0}] * SHARDS
    assert summary["success"] + summary["no_path"] + summary["model_error"] == len(dataset.keys)
    for index in range(SHARDS):  # every shard's cache came back beside its journal; none was left on the node
        assert backup_path(shard_output(tmp_path / "ray.jsonl", index, SHARDS)).is_file()


def test_a_shard_whose_worker_is_killed_is_retried_and_repeats_only_calls_after_its_last_backup(
        cluster, dataset, tmp_path, launch):
    output = tmp_path / "out.jsonl"
    first = shard_output(output, 0, SHARDS)
    with OpenAIServer(latency=(0.05, 0.15), latency_seed=7, lifetime=200) as server:
        env = mics_env(server, MICS_CLUSTER_BACKUP_EVERY="0.3")
        driver = launch(ray_args(dataset, output, cluster, "--concurrency", "1"), env, name="driver")
        def backed_up_calls() -> bool:  # shard 0 runs, and its last backup holds calls answered well before it
            try:
                backup = last_checkpoint(first)
            except FileNotFoundError:
                return False
            return holder_pid(first) is not None and server.count() >= 10 and any(
                r.replied_at is not None and r.replied_at < backup - IN_FLIGHT_WINDOW for r in server.recorded())

        wait_until(backed_up_calls, timeout=120, what="shard 0 running with a backup of its cache")
        child = holder_pid(first)
        stat = Path(f"/proc/{child}/stat").read_text()
        worker = int(stat.rsplit(")", 1)[1].split()[1])  # the Ray worker that runs shard 0's task
        last_backup = last_checkpoint(first)
        killed_at = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        assert driver.wait(timeout=240) == 0, driver.err()
        requests = server.recorded()
    assert not alive(child)  # the shard's run died with its worker
    records = lines_by_item(output)  # fails on an item with two lines
    assert sorted(records) == sorted(dataset.keys)
    before = {r.canonical() for r in requests if r.status == 200 and r.replied_at is not None
              and r.replied_at < killed_at}
    again = [r.canonical() for r in requests if r.received_at > killed_at and r.canonical() in before]
    safe = {r.canonical() for r in requests if r.status == 200 and r.replied_at is not None
            and r.replied_at < last_backup - IN_FLIGHT_WINDOW}
    # The bound: a retried shard repeats only calls its items in flight made after the last backup.
    assert safe and not set(again) & safe
    print(f"re-sent after the kill: {len(again)} of {len(before)} calls answered before it")
    assert holder_pid(first) != child  # a second attempt owned the shard after the kill


def test_ctrl_c_on_the_driver_stops_every_shard(cluster, dataset, tmp_path, launch):
    output = tmp_path / "out.jsonl"
    shards = [shard_output(output, index, SHARDS) for index in range(SHARDS)]
    seen: set[int] = set()

    def running() -> bool:
        seen.update(pid for pid in map(holder_pid, shards) if pid is not None)
        return len(seen) >= 2

    with OpenAIServer(latency=(0.1, 0.2), latency_seed=3, lifetime=200) as server:
        driver = launch(ray_args(dataset, output, cluster, "--concurrency", "1"), mics_env(server), name="driver")
        wait_until(lambda: running() and server.count() >= 10, timeout=120, what="two shards running")
        driver.process.send_signal(signal.SIGINT)
        assert driver.wait(timeout=120) == 130, driver.err()
        ended_at = time.monotonic()
        assert "Interrupted: every shard stopped" in " ".join(driver.err().split())
        for pid in seen:
            assert not alive(pid), f"shard run {pid} still running after the driver exited"
        count = server.count()
        time.sleep(1.0)
        assert server.count() == count  # nothing sends calls any more
        assert time.monotonic() - ended_at >= 1.0
    assert not output.exists()  # no merge of a run that did not end
    lines_by_item(shards[0])  # every shard left whole lines, at most one per item


def test_a_driver_killed_ends_its_shards_and_the_same_command_resumes_them(cluster, dataset, tmp_path, launch):
    """Ray ends the tasks of a driver that died (kill -9): each shard's run dies with its worker, as after a
    node loss; the same command run again resumes every shard and completes with one line per item."""
    output = tmp_path / "out.jsonl"
    shards = [shard_output(output, index, SHARDS) for index in range(SHARDS)]
    seen: set[int] = set()

    def running() -> bool:
        seen.update(pid for pid in map(holder_pid, shards) if pid is not None)
        return len(seen) >= 2

    with OpenAIServer(latency=(0.05, 0.1), latency_seed=5, lifetime=200) as server:
        env = mics_env(server)
        driver = launch(ray_args(dataset, output, cluster, "--concurrency", "1"), env, name="driver")
        wait_until(lambda: running() and server.count() >= 10, timeout=120, what="two shards running")
        driver.process.kill()
        driver.wait(timeout=30)
        wait_until(lambda: not any(alive(pid) for pid in seen), timeout=60, what="the shards' runs to end")
        count = server.count()
        time.sleep(1.0)
        assert server.count() == count  # nothing sends calls any more
        again = run_mics(ray_args(dataset, output, cluster), env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(lines_by_item(output)) == sorted(dataset.keys)
