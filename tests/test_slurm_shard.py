"""``--shard auto`` (issue 29): the shard from a Slurm job array or from RANK/WORLD_SIZE, and clear refusals
of arrays that would leave shards without a task."""

from __future__ import annotations

import pytest

from mics_agents.data import parse_shard, shard_of
from mics_agents.errors import ConfigError

from .openai_server import OpenAIServer
from .test_run_process import flat, lines_by_item, mics_env, run_args, run_mics, write_dataset


def slurm(task: int, low: int, high: int, count: int | None = None, step: int | None = 1) -> dict[str, str]:
    environ = {
        "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(low), "SLURM_ARRAY_TASK_MAX": str(high),
        "SLURM_ARRAY_TASK_COUNT": str(high - low + 1 if count is None else count), "SLURM_JOB_ID": "4242",
    }
    if step is not None:
        environ["SLURM_ARRAY_TASK_STEP"] = str(step)
    return environ


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (slurm(0, 0, 7), (0, 8)),
        (slurm(7, 0, 7), (7, 8)),
        (slurm(1, 1, 8), (0, 8)),  # --array=1-8: ids need not start at 0
        (slurm(8, 1, 8), (7, 8)),
        (slurm(5, 3, 5, step=None), (2, 3)),  # an older Slurm without SLURM_ARRAY_TASK_STEP
        (slurm(0, 0, 0), (0, 1)),
        ({"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),
        ({"RANK": "0", "WORLD_SIZE": "1"}, (0, 1)),
        # A Slurm array wins over RANK/WORLD_SIZE that a wrapper may have exported for something else.
        ({**slurm(2, 0, 3), "RANK": "0", "WORLD_SIZE": "2"}, (2, 4)),
    ],
)
def test_auto_takes_the_shard_from_the_launcher(environ, expected):
    assert parse_shard("auto", environ) == expected
    assert parse_shard(" auto ", environ) == expected


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({}, "found no shard in the environment"),
        ({"SLURM_JOB_ID": "12", "PATH": "/bin"}, "found no shard"),  # a plain sbatch job, not an array
        (slurm(0, 0, 15, count=4, step=4), "step 4"),  # --array=0-15:4
        (slurm(3, 1, 5, count=3), "gaps"),  # --array=1,3,5
        (slurm(9, 1, 8), "outside the array's range"),
        ({"SLURM_ARRAY_TASK_ID": "2"}, "SLURM_ARRAY_TASK_MIN"),
        ({**slurm(1, 0, 3), "SLURM_ARRAY_TASK_COUNT": "four"}, "not a whole number"),
        ({"RANK": "1"}, "WORLD_SIZE is not"),
        ({"WORLD_SIZE": "4"}, "RANK is not"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "do not name a shard"),
        ({"RANK": "-1", "WORLD_SIZE": "4"}, "do not name a shard"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "do not name a shard"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "not a whole number"),
    ],
)
def test_auto_refuses_what_would_leave_shards_without_a_task(environ, says):
    with pytest.raises(ConfigError, match=says) as caught:
        parse_shard("auto", environ)
    assert "--shard" in str(caught.value)  # each refusal says what to give instead or how to launch


def test_mics_run_shard_auto_runs_the_array_tasks_shard_and_refuses_without_a_launcher(tmp_path):
    data = write_dataset(tmp_path / "data")
    with OpenAIServer(lifetime=120) as server:
        base = mics_env(server)
        for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
                     "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_STEP", "RANK", "WORLD_SIZE"):
            base.pop(name, None)
        output = tmp_path / "out.shard-3.jsonl"
        ran = run_mics(run_args(data, output, tmp_path / "cache.sqlite", "--shard", "auto"),
                       {**base, **slurm(3, 1, 3)}, tmp_path)
        assert ran.returncode == 0, ran.stderr
        refused_output = tmp_path / "refused.jsonl"
        refused = run_mics(run_args(data, refused_output, tmp_path / "cache.sqlite", "--shard", "auto"), base, tmp_path)
    # Array task 3 of --array=1-3 is shard 2 of 3: exactly that shard's items, each with its line.
    expected = sorted(key for key in data.keys if shard_of(key, 3) == 2)
    assert expected and sorted(lines_by_item(output)) == expected
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert "found no shard in the environment" in flat(refused.stderr)
    assert not refused_output.exists() and not refused_output.with_name("refused.jsonl.lock").exists()
