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
