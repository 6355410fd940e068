"""``mics run --ray [ADDRESS]`` (issue 29): ``--ray`` alone, ``--ray ADDRESS``, ``--ray=ADDRESS`` and the alias
``--ray-address ADDRESS`` each reach the Ray run with the cluster they name; the token after ``--ray`` is taken as
the address only when it looks like one and is not an existing file, so ``--ray --shards 4`` and ``--ray DATA``
keep their meaning."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mics_agents import cli
from mics_agents.cluster import ray_command
from mics_agents.cluster.ray_option import looks_like_address, with_ray_values


@pytest.fixture
def ray_runs(monkeypatch):
    """What each ``mics run --ray`` hands to the Ray run (nothing starts)."""
    calls: list[dict] = []

    def record(**kwargs):
        calls.append(kwargs)
        return 0

    monkeypatch.setattr(ray_command, "run_on_ray", record)
    return calls


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cases.jsonl"
    path.write_text('{"id": "a", "question": "q", "answer": "a"}\n')
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli.app, ["run", *args], env={"COLUMNS": "400"})


@pytest.mark.parametrize(("args", "address", "shards"), [
    (["cases.jsonl", "-o", "out.jsonl", "--ray"], None, None),
    (["cases.jsonl", "--ray", "--shards", "4", "-o", "out.jsonl"], None, 4),
    (["--ray", "cases.jsonl", "-o", "out.jsonl"], None, None),  # DATA after --ray is still DATA
    (["--ray", "--shards", "4", "cases.jsonl", "-o", "out.jsonl"], None, 4),
    (["cases.jsonl", "-o", "out.jsonl", "--ray", "auto", "--shards", "4"], "auto", 4),
    (["--ray", "ray://head:10001", "cases.jsonl", "-o", "out.jsonl"], "ray://head:10001", None),
    (["cases.jsonl", "--ray", "10.0.0.5:6379", "-o", "out.jsonl"], "10.0.0.5:6379", None),
    (["cases.jsonl", "--ray", "[::1]:6379", "-o", "out.jsonl"], "[::1]:6379", None),
    (["cases.jsonl", "--ray=head.cluster:6379", "-o", "out.jsonl"], "head.cluster:6379", None),
    (["cases.jsonl", "--ray-address", "auto", "-o", "out.jsonl", "--shards", "2"], "auto", 2),  # the alias alone
    (["cases.jsonl", "--ray", "auto", "--ray-address", "auto", "-o", "out.jsonl"], "auto", None),
    (["cases.jsonl", "--ray", "-o", "out.jsonl"], None, None),
])
def test_every_spelling_of_ray_reaches_the_ray_run_with_its_address(data, ray_runs, args, address, shards):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    [call] = ray_runs
    assert (call["address"], call["shards"], call["data"].name) == (address, shards, "cases.jsonl")


def test_two_different_clusters_or_shards_without_ray_are_refused_in_one_line(data, ray_runs):
    both = invoke("cases.jsonl", "-o", "out.jsonl", "--ray", "auto", "--ray-address", "10.0.0.5:6379")
    lonely = invoke("cases.jsonl", "-o", "out.jsonl", "--shards", "3")
    failed = invoke("cases.jsonl", "-o", "out.jsonl", "--ray", "--failed", "f.jsonl")
    sharded = invoke("cases.jsonl", "-o", "out.jsonl", "--ray", "--shard", "1/2")
    for result in (both, lonely, failed, sharded):
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert "Traceback" not in result.output
    assert "name two clusters" in both.output and "--shards goes with --ray" in lonely.output
    assert all("does not take --failed or --shard" in result.output for result in (failed, sharded))
    assert ray_runs == []


def test_a_data_file_named_like_an_address_stays_the_data(tmp_path, monkeypatch, ray_runs):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "auto").write_text('{"id": "a", "question": "q", "answer": "a"}\n')
    result = invoke("--ray", "auto", "-o", "out.jsonl")
    assert result.exit_code == 0, result.output
    assert (ray_runs[0]["address"], ray_runs[0]["data"].name) == (None, "auto")


def test_the_address_rule():
    assert all(map(looks_like_address, ["auto", "local", "ray://head:10001", "anyscale://c", "head:6379",
                                        "10.0.0.5:6379", "[fe80::1]:6379"]))
    assert not any(map(looks_like_address, ["", "-", "--shards", "cases.jsonl", "data/cases.jsonl", "head",
                                            "head:port", "C:\\data.jsonl", "4"]))
    # After --, every token is positional; --ray=VALUE is left as it is.
    assert with_ray_values(["--ray", "--", "--ray", "auto"]) == ["--ray=", "--", "--ray", "auto"]
    assert with_ray_values(["--ray=auto", "--ray"]) == ["--ray=auto", "--ray="]
