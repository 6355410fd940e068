"""The real ``mics run --batch`` as a subprocess, SIGKILLed at the moments money is at stake, for both
providers: between recording a batch and sending it, between OpenAI's upload and its create call, right
after a create call returns and before its id is stored, mid-poll and mid-download. Each rerun re-attaches;
across all sessions no custom_id is ever submitted twice, and the run ends as an uninterrupted one does."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mics_agents.batches import ledger_path

from .fake_batch_server import FakeBatchServer
from .test_batches import write_cases

MICS = [sys.executable, "-m", "mics_agents"]
RUN_TIMEOUT = 120.0

PROVIDERS = {
    "openai": {
        "MICS_MENTORS": "openai/mentor-a,openai/mentor-b",
        "MICS_JUDGE": "openai/judge",
        "MICS_BATCH_MODELS": "openai/mentor-a,openai/mentor-b,openai/judge",
    },
    "anthropic": {
        "MICS_MENTORS": "anthropic/mentor-a,anthropic/mentor-b",
        "MICS_JUDGE": "anthropic/judge",
        "MICS_BATCH_MODELS": "anthropic/mentor-a,anthropic/mentor-b,anthropic/judge",
    },
}
# Where each provider's sessions are killed, in order (N: the N-th pass of the point in that session).
KILLS = {
    "openai": ["batch-recorded", "batch-uploaded", "batch-created", "batch-poll", "batch-download"],
    "anthropic": ["batch-recorded", "batch-created", "batch-poll", "batch-download"],
}


def mics_env(fake: FakeBatchServer, provider: str, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("MICS_") and not name.endswith(("_API_KEY", "_API_BASE", "_BASE_URL"))}
    env.update(PROVIDERS[provider], MICS_INTERNS="openai/intern-1", OPENAI_API_BASE=fake.openai_base,
               OPENAI_API_KEY="sk-test", ANTHROPIC_API_BASE=fake.anthropic_base, ANTHROPIC_API_KEY="sk-ant-test",
               MICS_BATCH_POLL_INTERVAL="0.05", MICS_RETRY_INITIAL_WAIT="0.01", MICS_RETRY_MAX_WAIT="0.05",
               LITELLM_LOCAL_MODEL_COST_MAP="True", **extra)
    return env


def run(data: Path, output: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    args = ["run", str(data), "--image-dir", str(data.parent / "images"), "--output", str(output),
            "--cache", str(cwd / "cache.sqlite"), "--batch", "--seed", "3"]
    return subprocess.run([*MICS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def outcomes(output: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in output.read_text().splitlines()] if output.exists() else []
    failed = output.with_name(output.name.replace(".jsonl", "_failed.jsonl"))
    rows += [json.loads(line) for line in failed.read_text().splitlines()] if failed.exists() else []
    def without_usage(row: dict) -> dict:
        kept = {key: value for key, value in row.items() if key != "usage"}
        if isinstance(kept.get("search"), dict):  # a failure keeps its search, with what it cost
            kept["search"] = without_usage(kept["search"])
        return kept

    return {str(row.get("rid")): without_usage(row) for row in rows}


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_sigkill_at_every_moment_money_is_at_stake_never_submits_a_request_twice(provider, tmp_path):
    data = write_cases(tmp_path, 5)
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    with FakeBatchServer(delay=0.2) as fake:
        reference = run(data, reference_dir / "out.jsonl", mics_env(fake, provider), reference_dir)
        assert reference.returncode == 0, reference.stderr
    expected = outcomes(reference_dir / "out.jsonl")
    assert len(expected) == 5

    rng = random.Random(f"{provider}-kills")
    output = killed_dir / "out.jsonl"
    sessions = []
    with FakeBatchServer(delay=0.2) as fake:
        for point in KILLS[provider]:
            # A random pass of the point (the first for the create-side points: there is one per batch).
            count = rng.randint(2, 4) if point in ("batch-poll", "batch-download") else 1
            killed = run(data, output, mics_env(fake, provider, MICS_TEST_KILL_AT=f"{point}:{count}"), killed_dir)
            sessions.append((point, count, killed.returncode, len(fake.submissions)))
            assert killed.returncode == -signal.SIGKILL, f"{point}:{count} was not reached: {killed.stderr[-2000:]}"
            assert fake.submitted_twice() == {}, f"after {point}:{count}: {sessions}"
        final = run(data, output, mics_env(fake, provider), killed_dir)
        assert final.returncode == 0, final.stderr
        assert fake.submitted_twice() == {}, sessions
        assert fake.errors == []
        made = {batch_id for batch_id, _ in fake.submissions}
    assert outcomes(output) == expected
    with sqlite3.connect(ledger_path(output)) as db:
        states = {row[0] for row in db.execute("SELECT state FROM batches")}
        recorded_ids = {row[0] for row in db.execute("SELECT batch_id FROM batches")}
        orphans = db.execute("SELECT COUNT(*) FROM batch_requests r LEFT JOIN batches b USING (batch_key) "
                             "WHERE b.batch_key IS NULL").fetchone()[0]
    assert states == {"ended"} and orphans == 0
    # The kill right after a create call returned left a batch whose id was never stored: a later session
    # found it at the provider (by its metadata, or its size and custom_ids), so every batch made is known.
    assert made == recorded_ids, sessions
