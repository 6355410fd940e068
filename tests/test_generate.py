"""mics generate (qa, vqa) and the whole pipeline: generate -> run -> QC -> stages -> exports."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mics_agents.config import load_settings
from mics_agents.data import parse_case, read_items
from mics_agents.dataset import BuildOptions, build_dataset, default_recipe
from mics_agents.generate import QaWorker, VqaWorker, parse_json_list, questions_per_case
from mics_agents.models import FunctionModel
from mics_agents.models.simulated import simulated_generator, simulated_intern, simulated_judge, simulated_mentor
from mics_agents.runner import BatchRun, RunOptions
from mics_agents.search import Searcher
from mics_agents.store import Store


def raw_cases(folder: Path, count: int) -> Path:
    """Raw Chiron-o1-style case records (no questions yet) with images."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        Image.new("RGB", (40, 40), (index * 9 % 256, 60, 90)).save(images / f"case{index}.png")
        lines.append(json.dumps({
            "rid": f"case-{index}",
            "images": [f"case{index}.png"],
            "presentation": f"Fever and cough for {index + 2} days" + " with night sweats" * (index % 3) * 60,
            "age_label": str(40 + index),
            "gender_label": "Female",
            "caption": [f"<image> Chest CT: consolidation in the right lower lobe, case {index}."],
        }))
    path = folder / "cases.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def run_worker(worker, data: Path, output: Path, image_dir: Path | None = None):
    try:
        return await BatchRun(worker, RunOptions(data=data, output=output, image_dir=image_dir)).run()
    finally:
        await worker.aclose()


def test_parse_json_list_tolerates_fences_and_chatter():
    assert parse_json_list('```json\n[{"a": 1}]\n```') == [{"a": 1}]
    assert parse_json_list('Here you go: [1, 2] hope it helps') == [1, 2]
    assert parse_json_list("no json") is None and parse_json_list('{"a": 1}') is None


def test_questions_per_case_by_length():
    assert [questions_per_case("x" * n) for n in (100, 800, 5000)] == [1, 2, 3]


async def test_generate_qa_drops_bad_items_with_reasons_and_resumes(tmp_path):
    data = raw_cases(tmp_path, 4)
    settings = load_settings(cache_path=None)
    generator = simulated_generator()
    stats = await run_worker(QaWorker(generator, settings, None), data, tmp_path / "qa.jsonl")
    produced = lines(tmp_path / "qa.jsonl")
    # Case lengths give 1, 2 or 3 questions each; the simulated generator adds one that says "this case".
    from mics_agents.generate import _case_text

    wanted = [questions_per_case(_case_text(item)) for item in read_items(data, parse_case)]
    assert sorted(set(wanted)) == [1, 2, 3], "the fixture covers every length band"
    assert stats.success == 4 and stats.records == len(produced) == sum(wanted)
    assert stats.drops["refers_to_case_or_image"] == 4
    for record in produced:
        assert record["case_id"].startswith("case-") and record["group_size"] >= 1
        assert record["answer"] == "A. Imaging" and "\nA. Imaging\nB. Blood test\nC. Genetic test" in record["question"]
        assert "this case" not in record["question"].lower()
    calls = len(generator.requests)
    again = await run_worker(QaWorker(generator, settings, None), data, tmp_path / "qa.jsonl")
    assert again.already_done == 4 and len(generator.requests) == calls


async def test_generate_qa_reasks_an_unparsable_reply_then_gives_no_items(tmp_path):
    data = raw_cases(tmp_path, 1)
    broken = FunctionModel("gen", lambda request: "Sorry, I cannot produce JSON today.")
    stats = await run_worker(QaWorker(broken, load_settings(cache_path=None), None), data, tmp_path / "qa.jsonl")
    assert stats.no_items == 1 and [r.attempt for r in broken.requests] == [0, 1]
    [failure] = lines(tmp_path / "qa_failed.jsonl")
    assert failure["error"]["kind"] == "no_items" and "unparsable_reply 1" in failure["error"]["message"]


async def test_a_torn_group_of_lines_is_redone(tmp_path):
    data = raw_cases(tmp_path, 3)
    settings = load_settings(cache_path=None)
    await run_worker(QaWorker(simulated_generator(), settings, None), data, tmp_path / "qa.jsonl")
    records = lines(tmp_path / "qa.jsonl")
    multi = next(r for r in records if r["group_size"] > 1)
    # Simulate a crash that left only the first line of a multi-line case.
    kept = [r for r in records if r["case_id"] != multi["case_id"]] + [multi]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    generator = simulated_generator()
    stats = await run_worker(QaWorker(generator, settings, None), data, tmp_path / "qa.jsonl")
    assert stats.already_done == 2 and stats.success == 1
    final = lines(tmp_path / "qa.jsonl")
    assert sorted(r["id"] for r in final) == sorted(r["id"] for r in records)


async def test_generate_vqa_gives_mics_run_input_in_three_scenarios(tmp_path):
    data = raw_cases(tmp_path, 3)
    settings = load_settings(cache_path=None, vqa_per_case=3)
    generator = simulated_generator()
    stats = await run_worker(VqaWorker(generator, settings, None), data, tmp_path / "vqa.jsonl", tmp_path / "images")
    produced = lines(tmp_path / "vqa.jsonl")
    assert stats.success == 3 and len(produced) == 9
    assert stats.drops["patient_answer_not_closed"] == 3
    assert {r["scenario"] for r in produced} == {"patient-to-doctor", "doctor-to-doctor", "intern-to-senior"}
    assert all(r["answer"] in ("yes", "no", "cannot be determined") for r in produced if r["scenario"] == "patient-to-doctor")
    # The generator saw the case's images.
    assert all(request.messages[-1].images() for request in generator.requests)
    # Every line is valid mics run input.
    items = list(read_items(tmp_path / "vqa.jsonl"))
    assert all(item.error is None and item.images == [f"case{item.rid.split('-')[1]}.png"] for item in items)


async def test_generate_vqa_refuses_a_case_without_images(tmp_path):
    data = tmp_path / "cases.jsonl"
    data.write_text(json.dumps({"id": "x", "case_info": "text only"}) + "\n")
    stats = await run_worker(VqaWorker(simulated_generator(), load_settings(cache_path=None), None), data, tmp_path / "v.jsonl")
    assert stats.bad_input == 1
    assert "no images" in lines(tmp_path / "v_failed.jsonl")[0]["error"]["message"]


async def test_the_whole_pipeline_generate_run_build(tmp_path):
    data = raw_cases(tmp_path, 8)
    images = tmp_path / "images"
    settings = load_settings(cache_path=tmp_path / "cache.sqlite", seed=4)
    store = await Store.open(settings.cache_path)
    await run_worker(VqaWorker(simulated_generator(), settings, store), data, tmp_path / "vqa.jsonl", images)
    store = await Store.open(settings.cache_path)
    await run_worker(QaWorker(simulated_generator(), settings, store), data, tmp_path / "qa.jsonl")
    searcher = Searcher(
        mentors=[simulated_mentor("sim/a"), simulated_mentor("sim/b")],
        interns=[simulated_intern("sim/i")],
        judge=simulated_judge(),
        settings=settings,
        store=await Store.open(settings.cache_path),
        owns_store=True,
    )
    run = await BatchRun(searcher, RunOptions(data=tmp_path / "vqa.jsonl", output=tmp_path / "mics.jsonl", image_dir=images)).run()
    await searcher.aclose()
    assert run.success + run.no_path == 24
    report = build_dataset(BuildOptions(
        mics=[tmp_path / "mics.jsonl"], cases=tmp_path / "vqa.jsonl", image_dir=images, output=tmp_path / "ds",
        recipe=default_recipe().model_copy(update={"test_fraction": 0.3}), text_qa=tmp_path / "qa.jsonl", seed=4,
    ))
    stage3 = lines(tmp_path / "ds" / "stage3" / "messages.jsonl")
    test = lines(tmp_path / "ds" / "test" / "messages.jsonl")
    assert {r["source"] for r in stage3} >= {"part1_text_qa", "part2_alignment", "part3_cot"}
    # Split by the source case: the VQA items of one case, its QA and its alignment pairs stay together.
    assert not {r["case_id"] for r in stage3} & {r["case_id"] for r in test}
    assert {r["case_id"] for r in stage3 + test} <= {f"case-{i}" for i in range(8)}
    assert report.stages["stage3"] == len(stage3)
