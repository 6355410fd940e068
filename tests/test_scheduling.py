"""How a batch run keeps its models busy: the garbage collector's settings while it runs."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from mics_agents.config import load_settings
from mics_agents.models import FunctionModel, ModelRequest
from mics_agents.models.simulated import simulated_reply
from mics_agents.runner import RUN_GC_THRESHOLDS, BatchRun, RunOptions, run_gc_settings
from mics_agents.search import Searcher


def write_cases(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({
        "id": f"case-{index}", "question": f"Case {index}: which finding?\nA. Mass\nB. Cyst\nC. Normal",
        "answer": "ABC"[index % 3],
    }) + "\n" for index in range(count)))
    return path


def simulated_searcher(on_call=None) -> Searcher:
    def model(role: str, name: str) -> FunctionModel:
        def reply(request: ModelRequest) -> str:
            if on_call is not None:
                on_call(role, name)
            return simulated_reply(role, name, request)

        return FunctionModel(name, reply)

    return Searcher(
        mentors=[model("mentor", "sim/mentor-a"), model("mentor", "sim/mentor-b")],
        interns=[model("intern", "sim/intern-1")],
        judge=model("judge", "sim/judge"),
        settings=load_settings(cache_path=None, seed=1),
    )


@pytest.fixture
def default_gc():
    """Each test starts and ends with the interpreter's own collector settings."""
    saved = gc.get_threshold()
    gc.unfreeze()
    yield saved
    gc.set_threshold(*saved)
    gc.unfreeze()


async def test_a_run_collects_young_objects_rarely_and_puts_the_collector_back(tmp_path, default_gc):
    seen = []
    searcher = simulated_searcher(lambda role, name: seen.append((gc.get_threshold(), gc.get_freeze_count())))
    data = write_cases(tmp_path / "cases.jsonl", 3)
    stats = await BatchRun(searcher, RunOptions(data=data, output=tmp_path / "out.jsonl", concurrency=2)).run()
    assert stats.success + stats.no_path == 3
    assert seen and all(threshold == RUN_GC_THRESHOLDS for threshold, _ in seen)
    assert all(frozen > 0 for _, frozen in seen)  # the objects of the process's start are left alone
    assert gc.get_threshold() == default_gc
    assert gc.get_freeze_count() == 0


async def test_a_run_that_fails_still_puts_the_collector_back(tmp_path, default_gc):
    """Adversarial: the run stops on an error of the whole run (its input is missing) or an exception in
    the middle of it; the collector's settings are restored either way."""
    searcher = simulated_searcher()
    with pytest.raises(Exception):
        await BatchRun(searcher, RunOptions(data=tmp_path / "missing.jsonl", output=tmp_path / "out.jsonl")).run()
    assert gc.get_threshold() == default_gc and gc.get_freeze_count() == 0

    class Boom(RuntimeError):
        pass

    def explode(role: str, name: str) -> None:
        raise Boom("the cache is gone")

    data = write_cases(tmp_path / "cases.jsonl", 2)
    batch = BatchRun(simulated_searcher(explode), RunOptions(data=data, output=tmp_path / "out2.jsonl"))

    async def failing_work(item):
        raise Boom("a problem of the whole run")

    batch._work = failing_work  # type: ignore[method-assign]
    with pytest.raises(Boom):
        await batch.run()
    assert gc.get_threshold() == default_gc and gc.get_freeze_count() == 0


def test_overlapping_runs_restore_what_the_first_one_found(default_gc):
    """Two runs in one process that overlap: the second one to start does not save the first one's
    settings as 'the old ones', and the settings hold until the last one ends."""
    gc.set_threshold(1234, 5, 6)
    with run_gc_settings():
        with run_gc_settings():
            assert gc.get_threshold() == RUN_GC_THRESHOLDS
        assert gc.get_threshold() == RUN_GC_THRESHOLDS  # the first run still goes on
    assert gc.get_threshold() == (1234, 5, 6)
    assert gc.get_freeze_count() == 0
