"""BatchRun in process, with simulated models: resume, retries of model errors, budget, limit, stop."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from mics_agents.config import load_settings
from mics_agents.errors import ModelCallError
from mics_agents.models import FunctionModel, ModelRequest, ModelResponse
from mics_agents.models.simulated import simulated_intern, simulated_judge, simulated_mentor, simulated_reply
from mics_agents.runner import BatchRun, RunOptions, run_id_for
from mics_agents.search import Searcher
from mics_agents.store import Store


def make_dataset(folder: Path, count: int) -> Path:
    images = folder / "images"
    images.mkdir(exist_ok=True)
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 90).save(buffer, format="PNG")
    (images / "scan.png").write_bytes(buffer.getvalue())
    lines = []
    for index in range(count):
        lines.append(json.dumps({
            "id": f"case-{index}",
            "question": f"Case {index}: which finding?\nA. Mass\nB. Cyst\nC. Normal",
            "answer": "ABC"[index % 3],
            "images": ["scan.png"],
            "case_info": f"note {index}",
        }))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Counting:
    """Simulated models that count the calls they receive and can be made to fail or cost money."""

    def __init__(self, *, cost: float = 0.0, broken_intern: bool = False) -> None:
        self.calls = 0
        self.cost = cost
        self.broken_intern = broken_intern

    def model(self, role: str, name: str) -> FunctionModel:
        def reply(request: ModelRequest) -> ModelResponse:
            self.calls += 1
            if role == "intern" and self.broken_intern and name.endswith("2"):
                raise ModelCallError(f"{name}: gave up after 3 attempts; HTTP 500", model=name)
            return ModelResponse(text=simulated_reply(role, name, request), model=name, cost_usd=self.cost)

        return FunctionModel(name, reply)

    async def searcher(self, store: Store, output: Path) -> Searcher:
        return Searcher(
            mentors=[self.model("mentor", "sim/mentor-a"), self.model("mentor", "sim/mentor-b")],
            interns=[self.model("intern", "sim/intern-1"), self.model("intern", "sim/intern-2")],
            judge=self.model("judge", "sim/judge"),
            settings=load_settings(cache_path=None, seed=1),
            store=store,
            run_id=run_id_for(output),
        )


async def run_once(tmp_path: Path, models: Counting, **options) -> tuple:
    data = tmp_path / "data.jsonl"
    output = tmp_path / "out.jsonl"
    updates = []
    async with await Store.open(tmp_path / "cache.sqlite") as store:
        searcher = await models.searcher(store, output)
        options.setdefault("image_dir", tmp_path / "images")
        batch = BatchRun(searcher, RunOptions(data=data, output=output, **options), on_update=updates.append)
        stats = await batch.run()
    return stats, lines_of(output), lines_of(tmp_path / "out_failed.jsonl"), updates


async def test_a_run_writes_one_line_per_item_and_a_rerun_sends_nothing(tmp_path):
    make_dataset(tmp_path, 6)
    models = Counting()
    stats, successes, failures, updates = await run_once(tmp_path, models, concurrency=3)
    assert stats.stop_reason == "completed" and stats.total == 6
    assert sorted(r["rid"] for r in successes + failures) == [f"case-{i}" for i in range(6)]
    assert all(record["images"] == ["scan.png"] for record in successes)
    assert updates and updates[-1].ended == 6
    first_calls = models.calls
    assert first_calls > 0

    stats, successes_again, failures_again, _ = await run_once(tmp_path, models, concurrency=3)
    assert models.calls == first_calls, "a finished run sends nothing on rerun"
    assert stats.already_done == 6 and stats.ended == 0
    assert successes_again == successes and failures_again == failures


async def test_model_errors_are_retried_on_the_next_run(tmp_path):
    make_dataset(tmp_path, 4)
    stats, successes, failures, _ = await run_once(tmp_path, Counting(broken_intern=True))
    assert stats.model_error == 4 and successes == []
    assert {f["error"]["kind"] for f in failures} == {"model_error"}
    assert all("retried on the next run" in f["error"]["message"] for f in failures)
    assert all(f["search"]["tree"] for f in failures), "the partial tree is kept for inspection"

    healthy = Counting()
    stats, successes, failures, _ = await run_once(tmp_path, healthy)
    assert stats.model_error == 0 and stats.already_done == 0
    assert len(successes) + len(failures) == 4 and all(f["error"]["kind"] != "model_error" for f in failures)


async def test_budget_stops_new_items_and_a_larger_budget_continues(tmp_path):
    make_dataset(tmp_path, 8)
    models = Counting(cost=0.01)
    stats, successes, failures, _ = await run_once(tmp_path, models, concurrency=1, budget_usd=0.3)
    assert stats.stop_reason == "budget"
    ended = len(successes) + len(failures)
    assert 0 < ended < 8 and stats.remaining == 8 - ended
    assert stats.spent_usd >= 0.3
    calls_before = models.calls

    stats, successes, failures, _ = await run_once(tmp_path, models, concurrency=1, budget_usd=100)
    assert stats.stop_reason == "completed"
    assert len(successes) + len(failures) == 8
    # Spent over both sessions = every call sent, each at its price (nothing paid twice).
    assert abs(stats.spent_usd - models.calls * 0.01) < 1e-9
    assert models.calls > calls_before


async def test_limit_and_shard_select_the_scope(tmp_path):
    make_dataset(tmp_path, 10)
    stats, successes, failures, _ = await run_once(tmp_path, Counting(), limit=3)
    assert stats.total == 3 and len(successes) + len(failures) == 3
    ids = {r["rid"] for r in successes + failures}
    assert ids == {"case-0", "case-1", "case-2"}


async def test_stop_lets_items_in_flight_finish(tmp_path):
    make_dataset(tmp_path, 10)
    models = Counting()
    output = tmp_path / "out.jsonl"
    async with await Store.open(tmp_path / "cache.sqlite") as store:
        searcher = await models.searcher(store, output)
        options = RunOptions(data=tmp_path / "data.jsonl", output=output, image_dir=tmp_path / "images", concurrency=2)
        batch = BatchRun(searcher, options)

        def stop_after_first(stats):
            if stats.ended >= 1:
                batch.stop("interrupted")

        batch.on_update = stop_after_first
        stats = await batch.run()
    assert stats.stop_reason == "interrupted"
    written = lines_of(output) + lines_of(tmp_path / "out_failed.jsonl")
    assert 1 <= len(written) <= 3 and stats.remaining == 10 - len(written)


async def test_the_demo_cases_run_with_simulated_models(tmp_path):
    from mics_agents.cli import EXAMPLES_DIR

    output = tmp_path / "demo.jsonl"
    searcher = Searcher(
        mentors=[simulated_mentor("sim/a"), simulated_mentor("sim/b")],
        interns=[simulated_intern("sim/i")],
        judge=simulated_judge(),
        settings=load_settings(cache_path=None),
    )
    options = RunOptions(data=EXAMPLES_DIR / "cases.jsonl", output=output, image_dir=EXAMPLES_DIR / "images")
    stats = await BatchRun(searcher, options).run()
    assert stats.ended == 3 and stats.bad_input == 0


async def test_budget_holds_without_a_cache(tmp_path):
    make_dataset(tmp_path, 6)
    models = Counting(cost=0.01)
    output = tmp_path / "out.jsonl"
    searcher = await models.searcher(None, output)
    options = RunOptions(data=tmp_path / "data.jsonl", output=output, image_dir=tmp_path / "images",
                         concurrency=1, budget_usd=0.2)
    stats = await BatchRun(searcher, options).run()
    assert stats.stop_reason == "budget" and 0 < stats.ended < 6
    assert stats.spent_usd == stats.cost_usd >= 0.2


async def test_a_retried_item_keeps_its_failure_line_until_the_run_completes(tmp_path):
    make_dataset(tmp_path, 4)
    await run_once(tmp_path, Counting(broken_intern=True))
    failed_bytes = (tmp_path / "out_failed.jsonl").read_bytes()

    stats, successes, failures, _ = await run_once(tmp_path, Counting(), limit=2)
    assert stats.retried_failures == 4 and stats.compacted_lines == 0, "a run cut short by --limit does not compact"
    assert (tmp_path / "out_failed.jsonl").read_bytes() == failed_bytes, "the journal only grows"
    assert len(successes) + len(failures) == 4 + 2

    stats, successes, failures, _ = await run_once(tmp_path, Counting())
    assert stats.already_done == 2 and stats.ended == 2 and stats.compacted_lines == 4
    assert sorted(r["rid"] for r in successes + failures) == [f"case-{i}" for i in range(4)]


# -- issue 15: an exception in one item is that item's line, and the run goes on ---------------------------


class Flaky:
    """A worker that searches nothing: case-1 raises a bug, case-2 a bad image, case-3 a model error whose
    message echoes the API key; the rest succeed."""

    group_key = None
    store = None

    def __init__(self, *, broken: bool = True) -> None:
        self.broken = broken

    def parse(self, record, line):
        from mics_agents.data import parse_record

        return parse_record(record, line)

    async def __call__(self, item, image_dir):
        from mics_agents.errors import ImageError, ModelCallError
        from mics_agents.runner import Outcome

        if self.broken and item.rid == "case-1":
            return {}["a bug"]  # KeyError: a defect of ours
        if item.rid == "case-2":
            raise ImageError("image 'x.png' is corrupt")
        if self.broken and item.rid == "case-3":
            raise ModelCallError("openai/judge: BadRequestError: Incorrect API key provided: sk-live-0123456789abcdef")
        return Outcome(records=[{"rid": item.rid, "gt_answer": item.answer, "reasoning": "ok"}])

    async def aclose(self) -> None:
        pass


async def test_an_unexpected_exception_is_that_items_internal_error_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-0123456789abcdef")
    data = make_dataset(tmp_path, 6)
    output = tmp_path / "out.jsonl"
    stats = await BatchRun(Flaky(), RunOptions(data=data, output=output)).run()
    assert (stats.success, stats.internal_error, stats.bad_input, stats.model_error) == (3, 1, 1, 1)
    failures = {record["rid"]: record for record in lines_of(tmp_path / "out_failed.jsonl")}
    bug = failures["case-1"]["error"]
    assert bug["kind"] == "internal_error" and "KeyError: 'a bug'" in bug["message"]
    assert "defect in mics-agents" in bug["message"] and "retried on the next run" in bug["message"]
    assert "test_runner.py" in bug["message"] and "Traceback" in failures["case-1"]["traceback"]
    assert failures["case-2"]["error"] == {"kind": "bad_input", "message": "line 3: image 'x.png' is corrupt"}
    assert failures["case-3"]["error"]["kind"] == "model_error"
    assert "sk-live-0123456789abcdef" not in (tmp_path / "out_failed.jsonl").read_text()
    assert stats.as_dict()["internal_error"] == 1

    # The next run retries the internal error and the model error (fixed now), not the bad input.
    again = await BatchRun(Flaky(broken=False), RunOptions(data=data, output=output)).run()
    assert (again.already_done, again.success, again.bad_input) == (4, 2, 0)
    assert {record["rid"] for record in lines_of(tmp_path / "out_failed.jsonl")} == {"case-2"}


async def test_a_problem_of_the_whole_run_still_stops_it(tmp_path):
    from mics_agents.errors import StoreError

    class Broken(Flaky):
        async def __call__(self, item, image_dir):
            raise StoreError("the cache database is corrupt")

    data = make_dataset(tmp_path, 3)
    try:
        await BatchRun(Broken(), RunOptions(data=data, output=tmp_path / "out.jsonl", concurrency=1)).run()
    except StoreError as exc:
        assert "corrupt" in str(exc)
    else:
        raise AssertionError("a StoreError must stop the run")


async def test_a_cache_file_that_cannot_be_opened_leaves_no_thread_behind(tmp_path):
    import threading

    import pytest

    from mics_agents.errors import StoreError

    (tmp_path / "garbage.sqlite").write_text("this is not a database\n" * 10)
    before = set(threading.enumerate())
    with pytest.raises(StoreError, match="not a database"):
        await Store.open(tmp_path / "garbage.sqlite")
    left = [thread for thread in set(threading.enumerate()) - before if not thread.daemon]
    for thread in left:
        thread.join(timeout=5)  # told to stop: it ends as soon as it sees that
    assert not any(thread.is_alive() for thread in left), "a live aiosqlite thread would keep the process running"


async def test_a_failed_file_fed_back_as_input_runs_its_items_in_either_layout(tmp_path):
    """Failure lines keep the item's input fields at top level beside ``error``, so a user can fix the data
    and feed ``*_failed.jsonl`` to another run; files of earlier versions (input under ``input``) work too."""
    from mics_agents.data import FAILURE_FIELDS, failure_input

    make_dataset(tmp_path, 4)
    await run_once(tmp_path, Counting(broken_intern=True))
    failed = lines_of(tmp_path / "out_failed.jsonl")
    assert len(failed) == 4 and all(record["question"].startswith("Case ") and "error" in record for record in failed)
    legacy = tmp_path / "legacy_failed.jsonl"
    legacy.write_text("".join(json.dumps({**{k: v for k, v in r.items() if k in FAILURE_FIELDS}, "rid": r["rid"],
                                          "input": failure_input(r)}) + "\n" for r in failed))

    for source, name in ((tmp_path / "out_failed.jsonl", "again"), (legacy, "legacy")):
        output = tmp_path / f"{name}.jsonl"
        searcher = await Counting().searcher(None, output)
        options = RunOptions(data=source, output=output, image_dir=tmp_path / "images")
        stats = await BatchRun(searcher, options).run()
        assert stats.bad_input == 0 and stats.ended == 4, name
        outcomes = lines_of(output) + lines_of(tmp_path / f"{name}_failed.jsonl")
        assert sorted(record["rid"] for record in outcomes) == [f"case-{i}" for i in range(4)]


def _compaction_watched(batch: BatchRun) -> list[int]:
    """Calls of the batch's compaction, by the dropped-lines count each returned."""
    calls: list[int] = []
    compact = batch.files.compact

    def watched() -> int:
        calls.append(compact())
        return calls[-1]

    batch.files.compact = watched  # type: ignore[method-assign]
    return calls


async def test_a_fresh_run_with_one_line_per_item_is_not_read_back_to_compact(tmp_path):
    """A run that started on empty files and wrote one line per item has nothing to compact: the files are
    not read back (seconds for a large output), yet both exist, as compacting would leave them."""
    data = make_dataset(tmp_path, 5)
    output = tmp_path / "out.jsonl"
    async with await Store.open(tmp_path / "cache.sqlite") as store:
        searcher = await Counting().searcher(store, output)
        batch = BatchRun(searcher, RunOptions(data=data, output=output, image_dir=tmp_path / "images", concurrency=3))
        compactions = _compaction_watched(batch)
        stats = await batch.run()
    assert stats.stop_reason == "completed" and stats.ended == 5
    assert compactions == []
    assert output.exists() and (tmp_path / "out_failed.jsonl").exists()
    keys = [line["rid"] for line in lines_of(output)] + [line["key"] for line in lines_of(tmp_path / "out_failed.jsonl")]
    assert sorted(keys) == [f"case-{index}" for index in range(5)]
    from mics_agents.outputs import OutputFiles

    assert OutputFiles(output).compact() == 0  # what compacting would have done: nothing


async def test_compacting_is_skipped_only_when_it_would_drop_nothing(tmp_path):
    """Adversarial: an id twice in the input (its second line is a bad_input under a key of its own, so
    nothing to drop, and a compaction afterwards drops nothing); a worker whose item writes two records with
    one rid (compacted to one); a session that resumes files with lines in them (compacted as before)."""
    from mics_agents.outputs import OutputFiles
    from mics_agents.runner import MicsWorker, Outcome

    data = make_dataset(tmp_path, 3)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([*lines, lines[1]]) + "\n")  # case-1 again, on line 4
    output = tmp_path / "out.jsonl"
    async with await Store.open(tmp_path / "cache.sqlite") as store:
        searcher = await Counting().searcher(store, output)
        batch = BatchRun(searcher, RunOptions(data=data, output=output, image_dir=tmp_path / "images"))
        compactions = _compaction_watched(batch)
        stats = await batch.run()
        assert stats.bad_input == 1 and compactions == []
        assert OutputFiles(output).compact() == 0

        class Twice(MicsWorker):
            async def __call__(self, item, image_dir):
                outcome = await super().__call__(item, image_dir)
                if outcome.failure is None and item.rid == "case-2":
                    return Outcome(records=outcome.records * 2, usage=outcome.usage)
                return outcome

        twice_output = tmp_path / "twice.jsonl"
        batch = BatchRun(Twice(searcher), RunOptions(data=data, output=twice_output, image_dir=tmp_path / "images"))
        compactions = _compaction_watched(batch)
        stats = await batch.run()
    assert any(line["rid"] == "case-2" for line in lines_of(twice_output))  # the simulated case-2 succeeds
    assert compactions == [1] and stats.compacted_lines == 1
    successes = [line["rid"] for line in lines_of(twice_output)]
    assert len(successes) == len(set(successes))

    second = tmp_path / "second"
    second.mkdir()
    data = make_dataset(second, 4)
    output = second / "out.jsonl"
    async with await Store.open(second / "cache.sqlite") as store:
        searcher = await Counting().searcher(store, output)
        await BatchRun(searcher, RunOptions(data=data, output=output, image_dir=second / "images", limit=2)).run()
        batch = BatchRun(searcher, RunOptions(data=data, output=output, image_dir=second / "images"))
        compactions = _compaction_watched(batch)
        stats = await batch.run()
    assert stats.already_done == 2 and len(compactions) == 1
