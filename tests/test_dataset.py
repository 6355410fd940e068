"""The dataset builder, end to end on synthetic cases: run -> QC -> stages -> exports -> stats."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mics_agents.config import load_settings
from mics_agents.dataset import BuildOptions, QcOptions, Recipe, build_dataset, default_recipe, quality_control
from mics_agents.dataset.qc import grade_final_answers
from mics_agents.dataset.alignment import AlignmentOptions, alignment_samples
from mics_agents.dataset.images import ImageCatalog
from mics_agents.models.simulated import simulated_intern, simulated_judge, simulated_mentor
from mics_agents.runner import BatchRun, RunOptions
from mics_agents.search import Searcher

N_CASES = 24


def png(path: Path, size=(48, 40), shade=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade % 256, (shade * 7) % 256, 120)).save(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Cases (Chiron-o1 layout), their MICS output from simulated models, a text-QA file and a VQA set."""
    root = tmp_path_factory.mktemp("corpus")
    images = root / "images"
    cases = []
    for index in range(N_CASES):
        png(images / f"c{index}_a.png", shade=index * 3)
        names = [f"c{index}_a.png"]
        captions = [f"<image> Axial CT of case {index}: a {index + 10} mm nodule."]
        if index % 4 == 0:
            png(images / f"c{index}_b.png", shade=index * 3 + 1)
            names.append(f"c{index}_b.png")
            captions.append(f"According to the <image>, the MRI shows oedema in case {index}.")
        cases.append({
            "rid": f"case-{index}",
            "messages": [
                {"role": "user", "content": f"**Question:** Case {index}: which finding?\nA. Nodule\nB. Cyst\nC. Normal"},
                {"role": "assistant", "content": f"**Correct Answer:** {'ABC'[index % 3]}"},
            ],
            "images": names,
            "presentation": f"Cough for {index} weeks",
            "age_label": "60",
            "gender_label": "Male",
            "caption": captions,
        })
    # Alignment edge cases: a tiny image, and a case reusing another case's image.
    png(images / "tiny.png", size=(8, 8))
    cases.append({"rid": "case-tiny", "messages": [{"content": "**Question:** q?"}, {"content": "**Correct Answer:** x"}],
                  "images": ["tiny.png"], "caption": ["<image> a tiny image"]})
    cases.append({"rid": "case-dup", "messages": [{"content": "**Question:** q?"}, {"content": "**Correct Answer:** x"}],
                  "images": ["c1_a.png"], "caption": ["<image> the same picture again"]})
    data = root / "cases.jsonl"
    data.write_text("".join(json.dumps(case) + "\n" for case in cases))

    text_qa = root / "text_qa.jsonl"
    text_qa.write_text("".join(
        json.dumps({"id": f"case-{i}-qa0", "case_id": f"case-{i}", "question": f"Q{i}?\nA. a\nB. b\nC. c",
                    "answer": "B. b", "rationale": "Because b."}) + "\n"
        for i in range(N_CASES)
    ))
    vqa_dir = root / "vqa_rad"
    for index in range(10):
        png(vqa_dir / f"v{index}.png", shade=200 + index)
    vqa = vqa_dir / "vqa.jsonl"
    vqa.write_text("".join(
        json.dumps({"id": f"v{i}", "question": f"Is there a fracture {i}?", "answer": "no", "images": [f"v{i}.png"]}) + "\n"
        for i in range(10)
    ))

    import asyncio

    async def run_mics() -> None:
        searcher = Searcher(
            mentors=[simulated_mentor("sim/a"), simulated_mentor("sim/b")],
            interns=[simulated_intern("sim/i1"), simulated_intern("sim/i2")],
            judge=simulated_judge(),
            settings=load_settings(cache_path=None, seed=2),
        )
        await BatchRun(searcher, RunOptions(data=data, output=root / "mics.jsonl", image_dir=images)).run()

    asyncio.run(run_mics())
    return {"root": root, "cases": data, "images": images, "mics": root / "mics.jsonl", "text_qa": text_qa, "vqa": vqa}


def build(corpus, output: Path, recipe: Recipe | None = None, seed: int = 5):
    recipe = recipe or default_recipe().model_copy(update={"test_fraction": 0.25})
    return build_dataset(BuildOptions(
        mics=[corpus["mics"]], cases=corpus["cases"], image_dir=corpus["images"], output=output, recipe=recipe,
        text_qa=corpus["text_qa"], vqa={"vqa_rad": corpus["vqa"]}, seed=seed,
    ))


def messages(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "messages.jsonl").read_text().splitlines()]


def base_id(sample_id: str) -> str:
    return sample_id.split("#")[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """Hashes of every file; InternVL's meta names absolute paths (InternVL opens them from the launch folder),
    so it is hashed with the output folder's own path taken out."""

    def content(path: Path) -> bytes:
        if path.name == "internvl_meta.json":
            return path.read_text().replace(json.dumps(str(folder.resolve()))[1:-1], "<output>").encode()
        return path.read_bytes()

    return {
        str(path.relative_to(folder)): hashlib.sha256(content(path)).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def test_stages_nest_with_the_recipe_ratios_and_the_split_keeps_cases_apart(corpus, tmp_path):
    report = build(corpus, tmp_path / "ds")
    stages = {name: messages(tmp_path / "ds" / name) for name in ("stage1", "stage2", "stage3")}
    test = messages(tmp_path / "ds" / "test")
    sources = {name: Counter(row["source"] for row in rows) for name, rows in stages.items()}
    assert set(sources["stage1"]) == {"vqa:vqa_rad", "part1_text_qa"}
    assert set(sources["stage2"]) == {"vqa:vqa_rad", "part1_text_qa", "part2_alignment"}
    assert set(sources["stage3"]) == {"vqa:vqa_rad", "part1_text_qa", "part2_alignment", "part3_cot"}

    def unique(rows, source):
        return {base_id(row["id"]) for row in rows if row["source"] == source}

    # Part 1 is whole in every stage (nesting); Part 2 x10 then x5; VQA about a fifth, then whole.
    part1 = unique(stages["stage1"], "part1_text_qa")
    assert part1 == unique(stages["stage2"], "part1_text_qa") == unique(stages["stage3"], "part1_text_qa")
    part2 = unique(stages["stage2"], "part2_alignment")
    assert part2 == unique(stages["stage3"], "part2_alignment") and part2
    assert sources["stage2"]["part2_alignment"] == 10 * len(part2)
    assert sources["stage3"]["part2_alignment"] == 5 * len(part2)
    assert sources["stage1"]["vqa:vqa_rad"] == 2 and sources["stage3"]["vqa:vqa_rad"] == 10
    assert report.stages == {name: len(rows) for name, rows in stages.items()}

    # No case id on both sides; the test split holds in-domain samples only, each once.
    train_cases = {row["case_id"] for rows in stages.values() for row in rows}
    test_cases = {row["case_id"] for row in test}
    assert test_cases and not train_cases & test_cases
    assert not any(row["source"].startswith("vqa") for row in test)
    assert len({row["id"] for row in test}) == len(test)


def test_every_export_loads_back_with_resolvable_images(corpus, tmp_path):
    from datasets import load_from_disk

    build(corpus, tmp_path / "ds")
    for name in ("stage1", "stage2", "stage3", "test"):
        folder = tmp_path / "ds" / name
        rows = messages(folder)
        for row in rows:
            placeholders = [part for part in row["messages"][0]["content"] if part["type"] == "image"]
            assert len(placeholders) == len(row["images"])
            assert all((folder / image).is_file() for image in row["images"])
        llava = json.loads((folder / "llava.json").read_text())
        assert len(llava) == len(rows)
        for entry in llava:
            images = entry.get("image", [])
            images = [images] if isinstance(images, str) else images
            assert entry["conversations"][0]["value"].count("<image>") == len(images)
            assert all((folder / image).is_file() for image in images)
        meta = json.loads((folder / "internvl_meta.json").read_text())
        assert meta and all(dataset_name.startswith(f"mmrp_{name}_") for dataset_name in meta)
        taken = 0  # InternVL: each source once, a fraction's head or integer repeats (test_curriculum_data.py)
        for spec in meta.values():
            lines = len((folder / spec["annotation"]).read_text().splitlines())
            assert lines == spec["length"]
            taken += int(lines * spec["repeat_time"]) if spec["repeat_time"] < 1 else lines * spec["repeat_time"]
        assert taken == len(rows)
        hf = load_from_disk(str(folder / "hf"))
        assert len(hf) == len(rows)
        with_images = [row for row in hf if row["images"]]
        if rows and any(row["images"] for row in rows):
            assert with_images and with_images[0]["images"][0].size[0] > 0  # decoded PIL images
        if len(hf):
            assert hf[0]["messages"][1]["role"] == "assistant"


def test_alignment_deduplicates_and_filters_with_counts(corpus, tmp_path):
    report = build(corpus, tmp_path / "ds")
    assert report.drops["part2"] == {"duplicate_image": 1, "low_resolution": 1}
    stats = json.loads((tmp_path / "ds" / "stats.json").read_text())
    assert stats["drops"]["part2"] == {"duplicate_image": 1, "low_resolution": 1}
    assert stats["mics"]["records"] == len(corpus["mics"].read_text().splitlines()) > 0
    assert sum(stats["mics"]["trend"].values()) == stats["mics"]["records"]
    assert (tmp_path / "ds" / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(stats["stages"]) == {"stage1", "stage2", "stage3"}
    assert stats["stages"]["stage3"]["modality"].get("CT", 0) > 0


def test_reruns_are_byte_identical_and_the_seed_matters(corpus, tmp_path):
    build(corpus, tmp_path / "a")
    first = tree_digest(tmp_path / "a")
    build(corpus, tmp_path / "a")
    assert tree_digest(tmp_path / "a") == first
    build(corpus, tmp_path / "b")
    assert tree_digest(tmp_path / "b") == first, "nothing in the output depends on where it is written"
    build(corpus, tmp_path / "c", seed=6)
    assert tree_digest(tmp_path / "c") != first


def test_the_build_reads_mics_output_by_the_journals_rule(corpus, tmp_path):
    """A run that has not compacted yet may repeat an item's success, or end with a group a crash cut:
    the build takes one success per item, as every reader of the output does."""
    build(corpus, tmp_path / "once")
    repeated = {**corpus, "mics": tmp_path / "mics.jsonl", "text_qa": tmp_path / "text_qa.jsonl"}
    lines = corpus["mics"].read_text().splitlines(keepends=True)
    repeated["mics"].write_text("".join(lines + lines[::2]))
    questions = [json.loads(line) for line in corpus["text_qa"].read_text().splitlines()]
    cut = [{**questions[0], "id": "case-0-qa1", "case_id": "case-0", "group_size": 3}]  # 1 of 3 lines written
    repeated["text_qa"].write_text("".join(json.dumps(record) + "\n" for record in questions + cut))
    build(repeated, tmp_path / "repeated")
    assert tree_digest(tmp_path / "repeated") == tree_digest(tmp_path / "once")


async def test_quality_control_counts_each_drop_reason():
    good = {"rid": "g", "search_id": "1", "final_depth": "2", "trend": "increasing", "question": "Q?",
            "gt_answer": "Pneumonia", "reasoning": "### Step 1: x\n\n### The final answer is: Pneumonia"}
    records = [
        good,
        {**good, "rid": "single", "final_depth": "1", "trend": "constant"},
        {**good, "rid": "zero", "search_id": "0"},
        {**good, "rid": "flat", "trend": "constant"},
        {**good, "rid": "nosteps", "reasoning": "### The final answer is: Pneumonia"},
        {**good, "rid": "noanswer", "reasoning": "### Step 1: x"},
        # Graded by the search (a judge said No): dropped on that verdict.
        {**good, "rid": "wrong", "reasoning": "### Step 1: x\n### The final answer is: Asthma",
         "final_answer_grade": {"answer": "Asthma", "correct": False, "judged_by": "judge", "grader_version": 2}},
        # Written before the search graded final answers, built without a judge: nothing decides it.
        {**good, "rid": "old", "reasoning": "### Step 1: x\n### The final answer is: Lobar pneumonia"},
        {"rid": "failed", "search_id": None},
    ]
    assert await grade_final_answers(records) == 7
    result = quality_control(records)
    assert [r["rid"] for r in result.kept] == ["g", "single"]
    assert result.dropped == Counter({"search_id_0": 1, "trend_constant": 1, "no_steps": 1, "no_final_answer": 1,
                                      "final_answer_mismatch": 1, "ungraded": 1, "not_a_success": 1})
    strict = quality_control(records, QcOptions(keep_single_step=False, keep_search_id_zero=True))
    assert [r["rid"] for r in strict.kept] == ["g", "zero"]
    lenient = quality_control(records, QcOptions(keep_ungraded=True))
    assert [r["rid"] for r in lenient.kept] == ["g", "single", "old"]


async def test_quality_control_keeps_a_paraphrased_final_answer_the_judge_accepts():
    class Judge:
        asked = []

        async def ask(self, question, candidate, reference):
            self.asked.append(candidate)
            return candidate == "Fracture of the pacemaker lead", ()

    record = {"rid": "p", "search_id": "1", "final_depth": "2", "trend": "increasing", "question": "Finding?",
              "gt_answer": "Pacemaker lead fracture",
              "reasoning": "### Step 1: x\n### The final answer is: Fracture of the pacemaker lead"}
    judge = Judge()
    await grade_final_answers([record], judge)
    assert judge.asked == ["Fracture of the pacemaker lead"]
    assert record["final_answer_grade"]["judged_by"] == "judge"
    assert [r["rid"] for r in quality_control([record]).kept] == ["p"]


def test_alignment_maps_placeholders_in_order_and_caps_units(tmp_path):
    for name in ("a", "b", "c"):
        png(tmp_path / f"{name}.png", shade=ord(name))
    case = {"case_id": "k", "images": ["a.png", "b.png", "c.png"], "text": "",
            "caption": ["<image> left; <image> right.", "<image> the third"]}
    samples, dropped, _ = alignment_samples([case], ImageCatalog(), tmp_path, AlignmentOptions(max_images_per_unit=4), 0)
    assert [[p.name for p in s.images] for s in samples] == [["a.png", "b.png"], ["c.png"]]
    assert samples[0].response == "Image 1: left; Image 2: right."
    assert samples[1].response == "The third."  # one image: no label (tests/test_curriculum_data.py has the prose)
    capped, dropped, _ = alignment_samples([case], ImageCatalog(), tmp_path, AlignmentOptions(max_images_per_unit=1), 0)
    assert len(capped) == 1 and dropped["too_many_images"] == 1


def test_a_recipe_with_an_unknown_source_is_refused(tmp_path):
    from mics_agents.dataset import load_recipe
    from mics_agents.errors import ConfigError

    path = tmp_path / "recipe.yaml"
    path.write_text("stages:\n  stage1: {part9: 1}\n")
    with pytest.raises(ConfigError, match="unknown source 'part9'"):
        load_recipe(path)
    path.write_text("stages:\n  s1: {vqa: 0.5, 'vqa:rad': 2}\ntest_fraction: 0.1\n")
    assert load_recipe(path).stages["s1"]["vqa:rad"] == 2


def test_the_held_out_cases_go_from_build_to_a_score(corpus, tmp_path, monkeypatch):
    """dataset build -> test/eval.jsonl (every held-out case, QC or not) -> mics eval over HTTP, and mics eval
    reads the test split's messages.jsonl and llava.json as they are."""
    from typer.testing import CliRunner

    from mics_agents.cli import app
    from mics_agents.dataset.curriculum import is_held_out

    from .openai_server import OpenAIServer, request_from_openai

    report = build(corpus, tmp_path / "ds")
    eval_file = tmp_path / "ds" / "test" / "eval.jsonl"
    items = [json.loads(line) for line in eval_file.read_text().splitlines()]
    expected = sorted(case["rid"] for case in map(json.loads, corpus["cases"].read_text().splitlines())
                      if is_held_out(case["rid"], 0.25, 5))
    assert [item["id"] for item in items] == expected and report.eval_items == len(expected) > 0
    assert all((eval_file.parent / image).is_file() for item in items for image in item["images"])
    assert {item["answer_type"] for item in items} <= {"choice", "open"} and "choice" in {i["answer_type"] for i in items}

    answers = {item["question"].split(":")[0]: item["answer"] for item in items}

    def brain(model: str, body: dict) -> str:
        text = request_from_openai(body).messages[-1].plain_text()
        case = next((key for key in answers if key in text), None)
        return f"### The final answer is: {answers[case] if case else 'A'}"

    monkeypatch.chdir(tmp_path)
    with OpenAIServer(brain) as server:
        monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        arguments = ["eval", "--model", "openai/model-a", "--judge", "none", "--output", str(tmp_path / "scores"),
                     "--benchmark", f"in_domain={eval_file}",
                     "--benchmark", f"messages={tmp_path / 'ds' / 'test' / 'messages.jsonl'}",
                     "--benchmark", f"llava={tmp_path / 'ds' / 'test' / 'llava.json'}"]
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 0, result.output
        case_questions = [r for r in server.recorded() if "which finding?" in json.dumps(r.body)]
        assert case_questions and all("data:image/" in json.dumps(r.body) for r in case_questions), \
            "every case question went out with its images"
    results = json.loads((tmp_path / "scores" / "results.json").read_text())
    in_domain = results["benchmarks"]["in_domain"]
    assert in_domain["n"] == len(items) and in_domain["closed"]["accuracy"] == 1.0
    assert results["benchmarks"]["messages"]["n"] == results["benchmarks"]["llava"]["n"] > 0


async def test_training_samples_and_the_evaluation_prompt_share_one_task_format(corpus, tmp_path):
    """A model is evaluated in the format it was trained in: the same instruction after the question and
    the same final-answer line, for general VQA, text QA and MICS chain-of-thought samples alike."""
    from mics_agents.evaluation import EvalWorker
    from mics_agents.models import FunctionModel
    from mics_agents.task_format import task_prompt

    build(corpus, tmp_path / "ds")
    rows = messages(tmp_path / "ds" / "stage3")
    by_source = {}
    for row in rows:
        by_source.setdefault(row["source"].split(":")[0], row)
    vqa = by_source["vqa"]
    user = next(part["text"] for part in vqa["messages"][0]["content"] if part["type"] == "text")
    target = vqa["messages"][1]["content"][0]["text"]
    question = user.split("\n")[0]  # "Is there a fracture k?"
    assert user == task_prompt(question, "closed") and target == "### The final answer is: no"
    for source in ("part1_text_qa", "part3_cot"):
        row = by_source[source]
        text = next(part["text"] for part in row["messages"][0]["content"] if part["type"] == "text")
        assert "Answer the question." in text and "### The final answer is:" in row["messages"][1]["content"][0]["text"]

    model = FunctionModel("evaluated", lambda request: "### The final answer is: no")
    worker = EvalWorker(model, load_settings(cache_path=None), None, benchmark="b")
    item = worker.parse({"id": "v0", "question": question, "answer": "no", "images": [], "answer_type": "closed"}, 1)
    outcome = await worker(item, tmp_path)
    assert outcome.failure is None
    assert model.requests[0].messages[-1].plain_text() == user


def test_the_build_records_its_task_format_and_the_model_card_shows_it(corpus, tmp_path):
    from types import SimpleNamespace

    from mics_agents.task_format import task_prompt
    from training.model_card import _task_format_lines

    build(corpus, tmp_path / "ds")
    recorded = json.loads((tmp_path / "ds" / "task_format.json").read_text())
    assert recorded["user_turn"] == task_prompt("<question>", "open")
    card = "\n".join(_task_format_lines(SimpleNamespace(curriculum_dir=str(tmp_path / "ds"))))
    assert "## Prompt format" in card and recorded["template_version"] in card and recorded["user_turn"] in card
    assert _task_format_lines(SimpleNamespace(curriculum_dir=None)) == []


def test_held_out_items_take_their_modality_from_the_case_captions_too(tmp_path):
    """The shipped chest-CT example asks about "a solitary nodule" and names no modality; its caption says
    "Axial chest CT", which is where its training samples read CT from, so test/eval.jsonl says CT too."""
    from mics_agents.dataset.evalset import write_eval_items

    examples = Path(__file__).parent.parent / "mics_agents" / "examples"
    cases = [json.loads(line) for line in (examples / "cases.jsonl").read_text().splitlines() if line.strip()]
    # Adversarial: captions that are not text (the case is unreadable), one bare string instead of a list.
    odd = [{"id": "odd-1", "question": "Any mass?", "answer": "no", "images": ["chest_ct.png"],
            "case_info": {"caption": [{"text": "MRI"}, 7]}},
           {"id": "odd-2", "question": "Any mass?", "answer": "no", "images": ["chest_ct.png"],
            "caption": "<image> Ultrasound of the right kidney."}]
    output = tmp_path / "test" / "eval.jsonl"
    count, dropped = write_eval_items([(case, case["id"]) for case in [*cases, *odd]], ImageCatalog(),
                                      examples / "images", output, tmp_path / "test" / "images")
    items = {item["id"]: item for item in map(json.loads, output.read_text().splitlines())}
    assert count == 4 and dropped == {"unreadable_case": 1}, "captions that are not text: refused, not guessed from"
    assert items["demo-chest-001"]["modality"] == "CT"
    assert items["demo-brain-002"]["modality"] == "MRI"
    assert items["odd-2"]["modality"] == "Ultrasound"


def test_mics_eval_reads_labelled_messages_rows_as_the_llava_questions(tmp_path):
    """messages.jsonl names several images "Image-k"; read back for evaluation, the labels are not part of
    the question, which is the one llava.json gives."""
    from mics_agents.dataset.exports import export_samples
    from mics_agents.dataset.samples import PART3, Sample
    from mics_agents.evaluation import load_benchmark
    from mics_agents.task_format import task_prompt

    for name in ("a.png", "b.png", "c.png"):
        png(tmp_path / "src" / name, shade=len(name) + ord(name[0]))
    images = {tmp_path / "src" / name: tmp_path / "images" / name for name in ("a.png", "b.png", "c.png")}
    for placed in images.values():
        png(placed)
    # Adversarial: a question that itself starts like a label stays whole.
    questions = ["Which phase shows washout?", "Image-2: is that a cyst?"]
    samples = [
        Sample("c1-cot", "c1", PART3, task_prompt(questions[0], "open"), "### The final answer is: the venous phase",
               list(images)),
        Sample("c2-cot", "c2", PART3, task_prompt(questions[1], "closed"), "### The final answer is: yes",
               [tmp_path / "src" / "a.png"]),
    ]
    export_samples(samples, tmp_path / "test", name="mmrp_test", image_paths=images)
    [labelled, _] = messages(tmp_path / "test")
    assert [part["type"] for part in labelled["messages"][0]["content"]] == ["text", "image"] * 3 + ["text"]
    from_messages = {item.id: (item.question, item.answer, item.answer_type, item.images)
                     for item in load_benchmark(tmp_path / "test" / "messages.jsonl")}
    from_llava = {item.id: (item.question, item.answer, item.answer_type, item.images)
                  for item in load_benchmark(tmp_path / "test" / "llava.json")}
    assert from_messages == from_llava
    assert [question for question, *_ in from_messages.values()] == questions


def test_the_build_writes_every_scored_candidate_of_train_cases_as_a_step_row(corpus, tmp_path):
    from mics_agents.dataset.curriculum import is_held_out

    report = build(corpus, tmp_path / "ds")
    steps = tmp_path / "ds" / "steps"
    rows = [json.loads(line) for line in (steps / "steps.jsonl").read_text().splitlines()]
    case_of = {}
    for line in corpus["cases"].read_text().splitlines():
        case = json.loads(line)
        case_of[str(case.get("rid") or case.get("id"))] = str(case.get("case_id") or case.get("rid") or case.get("id"))
    expected = {}
    for line in corpus["mics"].read_text().splitlines():
        record = json.loads(line)
        if not is_held_out(case_of.get(record["rid"], record["rid"]), 0.25, 5):
            expected.update({(record["rid"], node["id"]): node["score"] for node in record["tree"]})
    assert expected and {(row["rid"], row["node"]): row["scores"][-1] for row in rows} == expected
    assert len(rows) == len(expected) == report.step_rows
    test_cases = {row["case_id"] for row in messages(tmp_path / "ds" / "test")}
    assert test_cases and not test_cases & {row["case_id"] for row in rows}
    stats = json.loads((tmp_path / "ds" / "stats.json").read_text())["steps"]
    assert stats["rows"] == len(rows) and stats["pairs"] == report.step_pairs
    assert stats["labels"]["true"] + stats["labels"]["false"] == len(rows)


def test_an_empty_stage_is_still_a_loadable_datasets_folder(tmp_path):
    from datasets import load_from_disk

    from mics_agents.dataset.hf import MESSAGES, write_hf

    (tmp_path / "messages.jsonl").write_text("")
    write_hf(tmp_path / "messages.jsonl", tmp_path / "hf", MESSAGES)
    assert len(load_from_disk(str(tmp_path / "hf"))) == 0


def test_records_the_search_did_not_grade_are_graded_in_batches_into_the_same_curriculum(corpus, tmp_path, monkeypatch):
    """Older output (no final_answer_grade) is graded while it is read, a batch at a time: batches that end
    mid-file and a last short one give the curriculum of the graded records."""
    from mics_agents.dataset import build as build_module

    build(corpus, tmp_path / "graded")
    records = [json.loads(line) for line in corpus["mics"].read_text().splitlines()]
    for record in records:
        record.pop("final_answer_grade", None)
    older = {**corpus, "mics": tmp_path / "older.jsonl"}
    older["mics"].write_text("".join(json.dumps(record) + "\n" for record in records))
    monkeypatch.setattr(build_module, "_GRADE_BATCH", 3)
    report = build(older, tmp_path / "older")
    assert report.graded_here == sum(record.get("search_id") is not None for record in records) > 3
    assert len(records) % 3, "the last batch is a short one"
    # The step rows name the output file they come from (older.jsonl); every other file is the same.
    graded, older_digest = tree_digest(tmp_path / "graded"), tree_digest(tmp_path / "older")
    assert {k: v for k, v in older_digest.items() if not k.startswith("steps/")} == \
        {k: v for k, v in graded.items() if not k.startswith("steps/")}


def test_a_json_list_written_an_element_at_a_time_is_the_list_dumped_whole(tmp_path):
    from mics_agents.dataset.exports import _dump_json, _JsonListWriter

    lists = [
        [],
        [{}],
        [{"id": "a", "conversations": [{"from": "human", "value": "line\nbreak \u2028 é <image>\n"}], "image": ["x", "y"]},
         {"nested": {"deep": [[], {}, [1, [2, {"k": None}]]]}, "text": "  indented\n  text\r\n\\n"}, "plain", 3, None],
    ]
    for index, elements in enumerate(lists):
        whole, streamed = tmp_path / f"whole{index}.json", tmp_path / f"streamed{index}.json"
        _dump_json(whole, elements)
        writer = _JsonListWriter(streamed)
        for element in elements:
            writer.add(element)
        writer.close()
        assert streamed.read_bytes() == whole.read_bytes()
