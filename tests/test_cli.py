"""The command line: fast help, an offline demo, configuration errors that name the variable."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

MICS = [sys.executable, "-m", "mics_agents"]


def run(*args, env=None, cwd=None):
    return subprocess.run([*MICS, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def read_sorted(path: Path) -> list[dict]:
    """Records by id: a run writes them in the order items end."""
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["rid"])


def test_help_is_fast():
    started = time.perf_counter()
    result = run("--help")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0 and "demo" in result.stdout
    assert elapsed < 1.5, f"mics --help took {elapsed:.2f}s"


def test_demo_runs_offline_and_resumes_from_cache(tmp_path):
    first = run("demo", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "SIMULATED" in first.stdout and "MICS_MENTORS" in first.stdout
    records = read_sorted(tmp_path / "mics_demo_output.jsonl")
    assert [r["rid"] for r in records] == ["demo-brain-002", "demo-chest-001", "demo-liver-003"]
    assert all(r["reasoning"].startswith("### Step 1:") for r in records if r["search_id"] is not None)
    second = run("demo", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    again = read_sorted(tmp_path / "mics_demo_output.jsonl")
    assert [r["usage"]["cached_calls"] for r in again] == [r["usage"]["calls"] for r in again]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "usage"} for r in rs]  # noqa: E731
    assert strip(again) == strip(records)


def test_search_without_models_is_a_configuration_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICS_")}
    result = run("search", "What?", "--answer", "x", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "MICS_MENTORS" in result.stderr
