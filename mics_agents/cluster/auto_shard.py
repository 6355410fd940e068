"""``--shard auto``: the shard this process runs, from the variables its launcher set.

Slurm job arrays number their tasks from the ``--array`` range, which need not start at 0 (``--array=1-8``), so
the shard index is the task id less the array's lowest id. Only a contiguous range with step 1 maps onto shards
0..N-1: with a step (``0-15:4``) or a list with gaps (``1,3,5``) some shards would belong to no task and their
items would silently never run, so such arrays are refused. Launchers of the torchrun family set ``RANK`` and
``WORLD_SIZE`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ConfigError

__all__ = ["shard_from_environment"]

_SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_COUNT")


def _integer(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(f"--shard auto: {name}={value!r} is not a whole number; give --shard I/N instead") from None


def _from_slurm(environ: Mapping[str, str]) -> tuple[int, int]:
    missing = [name for name in _SLURM if not environ.get(name, "").strip()]
    if missing:
        raise ConfigError(f"--shard auto: SLURM_ARRAY_TASK_ID is set but {', '.join(missing)} is not; run under "
                          "sbatch --array=0-N (Slurm sets them all) or give --shard I/N")
    task, low, high, count = (_integer(environ, name) for name in _SLURM)
    step = _integer(environ, "SLURM_ARRAY_TASK_STEP") if environ.get("SLURM_ARRAY_TASK_STEP", "").strip() else 1
    if step != 1:
        raise ConfigError(f"--shard auto: the job array has step {step} (SLURM_ARRAY_TASK_STEP); shards need every "
                          f"id of a range, e.g. --array={low}-{low + count - 1}")
    if high - low + 1 != count:
        raise ConfigError(f"--shard auto: the job array's ids have gaps ({count} tasks between {low} and {high}); "
                          f"shards need a contiguous range, e.g. --array=0-{count - 1}")
    if not low <= task <= high:
        raise ConfigError(f"--shard auto: SLURM_ARRAY_TASK_ID={task} is outside the array's range {low}-{high}")
    return task - low, count


def _from_rank(environ: Mapping[str, str]) -> tuple[int, int]:
    if not (environ.get("RANK", "").strip() and environ.get("WORLD_SIZE", "").strip()):
        given = "RANK" if environ.get("RANK", "").strip() else "WORLD_SIZE"
        other = "WORLD_SIZE" if given == "RANK" else "RANK"
        raise ConfigError(f"--shard auto: {given} is set but {other} is not; set both, or give --shard I/N")
    rank, world = _integer(environ, "RANK"), _integer(environ, "WORLD_SIZE")
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"--shard auto: RANK={rank} and WORLD_SIZE={world} do not name a shard (0 <= RANK < "
                          "WORLD_SIZE); give --shard I/N instead")
    return rank, world


def shard_from_environment(environ: Mapping[str, str]) -> tuple[int, int]:
    """(index, count) from a Slurm job array, else from RANK/WORLD_SIZE; :class:`ConfigError` saying what to
    do when neither launcher set them, or set them in a way that would leave shards without a task."""
    if environ.get("SLURM_ARRAY_TASK_ID", "").strip():
        return _from_slurm(environ)
    if environ.get("RANK", "").strip() or environ.get("WORLD_SIZE", "").strip():
        return _from_rank(environ)
    raise ConfigError("--shard auto found no shard in the environment: it reads a Slurm job array "
                      "(sbatch --array=0-N sets SLURM_ARRAY_TASK_ID) or RANK and WORLD_SIZE; give --shard I/N "
                      "when running by hand")
