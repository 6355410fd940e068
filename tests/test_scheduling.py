"""How a batch run keeps its models busy: the busiest model's slots never idle while items wait to start, and
the garbage collector's settings while it runs."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path

import pytest

from mics_agents.config import load_settings
from mics_agents.models import FunctionModel, ModelRequest
from mics_agents.models.base import WrapperModel
from mics_agents.models.limits import LimitingModel
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


class _Asked(WrapperModel):
    """Counts the calls asked of the model inside it, before they wait for a slot."""

    def __init__(self, inner, on_asked) -> None:
        super().__init__(inner)
        self.on_asked = on_asked

    async def request(self, request: ModelRequest):
        self.on_asked()
        return await self.inner.request(request)


async def _saturation_run(tmp_path: Path, items: int, items_in_flight: int, limit: int) -> dict:
    """A run whose intern has ``limit`` slots; every event of its calls counted: asked (before the slot),
    started, ended. An intern call that ends while no other intern call is waiting for a slot leaves its slot
    idle; counted while the runner still had items to start."""
    state = {"asked": 0, "started": 0, "ended": 0, "admitted": 0, "peak": 0, "idle_while_items_wait": 0,
             "ends_after_full": 0}

    def count_asked() -> None:
        state["asked"] += 1

    async def intern_reply(request: ModelRequest) -> str:
        state["started"] += 1
        state["peak"] = max(state["peak"], state["started"] - state["ended"])
        await asyncio.sleep(0.002)
        waiting = state["asked"] - state["started"]
        if state["peak"] == limit and state["admitted"] < items:
            state["ends_after_full"] += 1
            state["idle_while_items_wait"] += waiting == 0
        state["ended"] += 1
        return simulated_reply("intern", "sim/intern-1", request)

    async def mentor_reply(name: str, request: ModelRequest) -> str:
        await asyncio.sleep(0.002)
        return simulated_reply("mentor", name, request)

    intern = _Asked(LimitingModel(FunctionModel("sim/intern-1", intern_reply), limit=limit, adaptive=False), count_asked)
    searcher = Searcher(
        mentors=[FunctionModel(name, lambda request, name=name: mentor_reply(name, request))
                 for name in ("sim/mentor-a", "sim/mentor-b")],
        interns=[intern],
        judge=FunctionModel("sim/judge", lambda request: simulated_reply("judge", "sim/judge", request)),
        settings=load_settings(cache_path=None, seed=1),
    )
    data = write_cases(tmp_path / f"cases-{items_in_flight}.jsonl", items)
    batch = BatchRun(searcher, RunOptions(data=data, output=tmp_path / f"out-{items_in_flight}.jsonl",
                                          concurrency=items_in_flight))
    process = batch._process

    async def admitted(item):
        state["admitted"] += 1
        await process(item)

    batch._process = admitted  # type: ignore[method-assign]
    stats = await batch.run()
    await intern.aclose()
    assert stats.success + stats.no_path == items
    return state


async def test_the_interns_slots_are_never_idle_while_items_wait_to_start(tmp_path):
    """Items in flight keep the busiest model's queue from running dry: once the intern has had all its slots
    busy, every intern call that ends hands its slot to a waiting call as long as the runner has items left
    to start. Counted with events, not time."""
    state = await _saturation_run(tmp_path, items=40, items_in_flight=12, limit=4)
    assert state["peak"] == 4
    assert state["ends_after_full"] > 40
    assert state["idle_while_items_wait"] == 0


async def test_the_count_sees_idle_slots_when_too_few_items_are_in_flight(tmp_path):
    """Adversarial check of the measure itself: one item in flight cannot keep 4 slots busy (its intern
    round asks 4 calls at most, then waits on the mentors), so idle slots are counted."""
    state = await _saturation_run(tmp_path, items=10, items_in_flight=1, limit=4)
    assert state["peak"] == 4
    assert state["idle_while_items_wait"] > 0


def test_the_result_models_are_built_when_first_used_not_when_imported():
    """Start-up: building the pydantic schemas of the search's results took ~9 ms of every launch before the
    first request; they are built when first used (in a fresh process: the suite has used them already)."""
    import subprocess
    import sys

    code = (
        "import mics_agents.results as r\n"
        "models = (r.Usage, r.InternSample, r.FinalAnswerGrade, r.Node, r.SearchResult)\n"
        "print(sum(m.__pydantic_complete__ for m in models))\n"
    )
    built = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert built == "0"


def test_a_result_built_late_still_validates_and_round_trips():
    """Adversarial: a lazily built model validates as strictly as before (a status it does not know is
    refused) and a record reads back to the same result."""
    from pydantic import ValidationError

    from mics_agents.results import Node, SearchResult, Usage

    result = SearchResult(rid="x", question="q", gt_answer="a", status="success", usage=Usage(calls=2),
                          tree=[Node(id=0, parent=None, depth=1, mentor="m", steps=["s"], step="### Step 1: s")])
    assert SearchResult.model_validate(result.model_dump()) == result
    with pytest.raises(ValidationError):
        SearchResult(rid="x", question="q", gt_answer="a", status="bogus")
    with pytest.raises(ValidationError):
        Node(id="not a number", parent=None, depth=1, mentor="m", steps=[], step="")


async def test_the_first_items_start_while_the_input_is_still_being_counted(tmp_path, default_gc):
    """Start-up: counting the input (every line parsed: 0.7 s at 10^5 cases) no longer comes before the first
    request. Here the count waits until the first model call has been made; counted first, it would wait for
    ever (the safety timeout then fails the test). Once counted, the totals are right and the run completes."""
    import threading

    from mics_agents.progress import ProgressReporter

    first_call = threading.Event()
    searcher = simulated_searcher(lambda role, name: first_call.set())
    data = write_cases(tmp_path / "cases.jsonl", 5)
    updates = []
    batch = BatchRun(searcher, RunOptions(data=data, output=tmp_path / "out.jsonl", concurrency=2),
                     on_update=lambda stats: updates.append((stats.counted, stats.total, stats.ended)))
    count = batch._count_scope
    seen_first_call = []

    def slow_count(done):
        seen_first_call.append(first_call.wait(timeout=30))
        return count(done)

    batch._count_scope = slow_count  # type: ignore[method-assign]
    stats = await batch.run()
    assert seen_first_call == [True]
    assert stats.counted and stats.total == 5 and stats.ended == 5 and stats.stop_reason == "completed"
    assert updates[0] == (False, 0, 0) and updates[-1] == (True, 5, 5)
    assert (tmp_path / "out_failed.jsonl").exists()  # the run completed: its files were settled

    # A log line (no terminal) says nothing until the count is known, then counts against it.
    import io

    from rich.console import Console

    out = io.StringIO()
    reporter = ProgressReporter(Console(file=out, force_terminal=False, width=200), log_every=0.0)
    uncounted = type(stats)(total=0, counted=False)
    reporter(uncounted)
    assert out.getvalue() == ""
    reporter(type(stats)(total=5, counted=True))
    assert "0/5 items" in out.getvalue()


async def test_a_count_that_fails_after_the_items_began_fails_the_run(tmp_path, default_gc):
    """Adversarial: reading the input for the count fails once the items are under way (the first model call
    made): the run raises that error, not lost in a background task, and the run waits for the count."""
    import threading

    first_call = threading.Event()
    searcher = simulated_searcher(lambda role, name: first_call.set())
    data = write_cases(tmp_path / "cases.jsonl", 3)
    batch = BatchRun(searcher, RunOptions(data=data, output=tmp_path / "out.jsonl"))

    def broken_count(done):
        assert first_call.wait(timeout=30)
        raise OSError(5, "Input/output error")

    batch._count_scope = broken_count  # type: ignore[method-assign]
    with pytest.raises(OSError, match="Input/output error"):
        await batch.run()
    assert first_call.is_set()


@pytest.mark.parametrize("bom_first", [False, True])
def test_the_quick_count_equals_the_readers_count_on_hostile_lines(tmp_path, monkeypatch, bom_first):
    """The count beside the first items skips parsing: on every kind of line the reader has a rule for it
    counts exactly the items the reader gives (blank and whitespace-only lines, a byte order mark alone,
    Unicode whitespace, bytes that are not UTF-8, a line over the size limit, a last line without a newline)."""
    from mics_agents import data as data_module
    from mics_agents.data import read_items
    from mics_agents.runner import count_items

    monkeypatch.setattr(data_module, "MAX_LINE_BYTES", 200)
    record = json.dumps({"id": "a", "question": "Q?", "answer": "A"}).encode()
    lines = [
        (b"\xef\xbb\xbf" if bom_first else b"") + (b"" if bom_first else record),  # a BOM alone, or a record
        record.replace(b'"a"', b'"b"'), b"", b"   ", b"\t", b"\x1c", "\u00a0".encode(), "\u2028".encode(),
        b"\xff\xfe not utf-8", b"not json", b"[1, 2]", b"  " + record.replace(b'"a"', b'"c"'),
        b'{"id": "long", "question": "' + b"x" * 400 + b'"}', record.replace(b'"a"', b'"d"') + b"\r",
        record.replace(b'"a"', b'"a"'),  # a repeated id: an item all the same
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n" + b'{"id": "last", "question": "Q", "answer": "A"}')
    expected = sum(1 for _ in read_items(path))
    assert count_items(path) == expected
    assert expected == (9 if bom_first else 10)
