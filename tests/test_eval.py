"""mics eval: benchmark loaders, answer extraction, grading paths, metrics, resume, the CLI over HTTP."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from mics_agents.config import load_settings
from mics_agents.evaluation import (
    EvalWorker,
    compare_results,
    detect_layout,
    extract_prediction,
    load_benchmark,
    prepare_benchmark,
    summarize,
    wilson_interval,
)
from mics_agents.models import FunctionModel, ModelRequest
from mics_agents.runner import BatchRun, RunOptions


def png_bytes(shade: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (shade, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- fixtures in the published layouts ------------------------------------------------------------


def write_vqa_rad(folder: Path) -> Path:
    images = folder / "VQA_RAD Image Folder"
    images.mkdir(parents=True)
    (images / "synpic1.jpg").write_bytes(png_bytes())
    records = [
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a pneumothorax?", "answer": "yes",
         "answer_type": "CLOSED", "image_organ": "CHEST", "question_type": "PRES", "phrase_type": "test_freeform"},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "Where is the lesion?", "answer": "right lung",
         "answer_type": "OPEN", "image_organ": "CHEST", "question_type": "POS", "phrase_type": "test_para"},
        # The train rows of the same release: never part of the test set.
        {"qid": 3, "image_name": "synpic1.jpg", "question": "Is this a CT?", "answer": "no",
         "answer_type": "CLOSED", "image_organ": "CHEST", "question_type": "MODALITY", "phrase_type": "freeform"},
        {"qid": 4, "image_name": "synpic1.jpg", "question": "Is the heart enlarged?", "answer": "no",
         "answer_type": "CLOSED", "image_organ": "CHEST", "question_type": "SIZE", "phrase_type": "para"},
    ]
    path = folder / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(records))
    return path


def write_slake(folder: Path) -> Path:
    (folder / "imgs" / "xmlab1").mkdir(parents=True)
    (folder / "imgs" / "xmlab1" / "source.jpg").write_bytes(png_bytes())
    records = [
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?", "answer": "Liver",
         "q_lang": "en", "answer_type": "OPEN", "modality": "CT", "qid": 10},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "哪个器官异常?", "answer": "肝脏",
         "q_lang": "zh", "answer_type": "OPEN", "modality": "CT", "qid": 11},
    ]
    path = folder / "test.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def write_pmc_vqa(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "PMC1_fig1.jpg").write_bytes(png_bytes())
    path = folder / "test_2.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"])
        writer.writerow(["0", "PMC1_fig1.jpg", "What imaging is shown?", "MRI", "A:CT", " B:MRI", " C:X-ray", " D:PET", "B"])
    return path


def write_mmmu(folder: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    table = pa.table({
        "id": ["validation_Clinical_Medicine_1"],
        "question": ["<image 1> What is the most likely diagnosis?"],
        "options": [str(["Gout", "Septic arthritis", "Pseudogout"])],
        "answer": ["B"],
        "image_1": [{"bytes": png_bytes(), "path": "a.png"}],
        "image_2": [None],
        "question_type": ["multiple-choice"],
    })
    path = folder / "Clinical_Medicine-validation.parquet"
    pq.write_table(table, path)
    return path


def write_medxpertqa(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "MM-1-a.jpeg").write_bytes(png_bytes())
    record = {"id": "MM-1", "question": "A 40-year-old man... What is the diagnosis?\nAnswer Choices: (A) Gout (B) RA (C) OA",
              "options": {"A": "Gout", "B": "RA", "C": "OA"}, "label": "C", "images": ["MM-1-a.jpeg"],
              "medical_task": "Diagnosis", "body_system": "Skeletal", "question_type": "Reasoning"}
    path = folder / "test.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


def write_chiron(folder: Path) -> Path:
    """Chiron-o1's eval_data.json as published: images under img_name (relative to the file), <image> marks."""
    (folder / "images" / "197271" / "ct_group1").mkdir(parents=True)
    for index in range(2):
        (folder / "images" / "197271" / "ct_group1" / f"{index}.jpeg").write_bytes(png_bytes(80 + index))
    records = [
        {"id": 1, "img_name": ["images/197271/ct_group1/0.jpeg", "images/197271/ct_group1/1.jpeg"],
         "question": "What is the most likely diagnosis? Please base your response on the keyframes "
                     "(Modality 1: <image>\n<image>) and reason step-by-step.",
         "reasoning": "### Step 1: Look at the image.\n### Step 2: Conclude.\n### The final answer is: Appendicitis",
         "answer": "Appendicitis", "answer_type": "OPEN"},
        {"id": "t2", "question": "Is it benign?", "gt_answer": "no", "images": []},
    ]
    path = folder / "eval_data.json"
    path.write_text(json.dumps(records))
    return path


def test_each_published_layout_loads(tmp_path):
    vqa_rad = list(load_benchmark(write_vqa_rad(tmp_path / "rad")))
    assert [(i.id, i.answer, i.answer_type, i.images) for i in vqa_rad] == [
        ("1", "yes", "closed", ["synpic1.jpg"]), ("2", "right lung", "open", ["synpic1.jpg"])], "test rows only"
    slake = list(load_benchmark(write_slake(tmp_path / "slake")))
    assert [(i.id, i.answer, i.modality) for i in slake] == [("10", "Liver", "CT")], "only English questions"
    [pmc] = load_benchmark(write_pmc_vqa(tmp_path / "pmc"))
    assert pmc.options == {"A": "CT", "B": "MRI", "C": "X-ray", "D": "PET"} and pmc.answer == "B. MRI"
    assert pmc.question.endswith("\nA. CT\nB. MRI\nC. X-ray\nD. PET") and pmc.answer_type == "choice"
    [mmmu] = load_benchmark(write_mmmu(tmp_path / "mmmu"))
    assert mmmu.answer == "B. Septic arthritis" and len(mmmu.image_bytes) == 1 and "[image 1]" in mmmu.question
    [mxq] = load_benchmark(write_medxpertqa(tmp_path / "mxq"))
    assert mxq.answer == "C. OA" and mxq.images == ["MM-1-a.jpeg"]
    chiron = list(load_benchmark(write_chiron(tmp_path / "chiron")))
    assert [(i.id, i.answer, i.answer_type) for i in chiron] == [("1", "Appendicitis", "open"), ("t2", "no", "closed")]
    assert chiron[0].images == ["images/197271/ct_group1/0.jpeg", "images/197271/ct_group1/1.jpeg"]
    assert "<image>" not in chiron[0].question and "(Modality 1: Image 1\nImage 2)" in chiron[0].question
    assert chiron[0].modality == "CT"
    assert [detect_layout(p) for p in (tmp_path / "rad" / "VQA_RAD Dataset Public.json", tmp_path / "slake" / "test.json",
                                       tmp_path / "pmc" / "test_2.csv", tmp_path / "mmmu" / "Clinical_Medicine-validation.parquet",
                                       tmp_path / "mxq" / "test.jsonl", tmp_path / "chiron" / "eval_data.json")] == [
        "vqa_rad", "slake", "pmc_vqa", "mmmu", "medxpertqa", "chiron"]


def test_parquet_images_are_written_out_once(tmp_path):
    prepared = prepare_benchmark(write_mmmu(tmp_path / "mmmu"), tmp_path / "out")
    [record] = [json.loads(line) for line in prepared.items.read_text().splitlines()]
    assert prepared.image_root == tmp_path / "out" and prepared.count == 1
    assert (tmp_path / "out" / record["images"][0]).read_bytes() == png_bytes()


@pytest.mark.parametrize(
    "reply, options, yes_no, expected",
    [
        ("### Step 1: x\n### The final answer is: (B)", {"A": "a", "B": "b"}, False, ("(B)", "marker")),
        ("I think the answer is (C).", {"A": "a", "B": "b", "C": "c"}, False, ("C", "lenient")),
        ("Answer: **D**", {"A": "a", "B": "b", "C": "c", "D": "d"}, False, ("D", "lenient")),
        ("Reasoning...\nB", {"A": "a", "B": "b"}, False, ("B", "lenient")),
        ("Reasoning...\nright lower lobe", {"A": "left lower lobe", "B": "right lower lobe"}, False,
         ("right lower lobe", "lenient")),
        ("The answer is E", {"A": "a", "B": "b"}, False, (None, None)),
        ("Apples are nice.", {"A": "a", "B": "b"}, False, (None, None)),
        ("It is probably pneumonia.", {}, False, (None, None)),
        ("### The final answer is: yes", {}, True, ("yes", "marker")),
        ("No.", {}, True, ("no", "lenient")),
        ("Normal study.", {}, True, (None, None)),
        ("No.", {}, False, (None, None)),  # an open question has no lenient reading
    ],
)
def test_prediction_extraction(reply, options, yes_no, expected):
    assert extract_prediction(reply, options, yes_no=yes_no) == expected


def test_wilson_interval_matches_a_hand_computation():
    # 8 of 10, z = 1.959964: centre = (0.8 + z^2/20) / (1 + z^2/10); half = z*sqrt(0.016 + z^2/400) / (1 + z^2/10)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(centre - half) == pytest.approx(0.4901624, abs=1e-6)
    assert high == pytest.approx(centre + half) == pytest.approx(0.9433178, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 0.0)
    assert wilson_interval(5, 5)[1] == 1.0


def test_summary_counts_parse_failures_as_wrong():
    predictions = [
        {"correct": True, "parse_ok": True, "modality": "CT", "answer_type": "closed"},
        {"correct": False, "parse_ok": False, "modality": "CT", "answer_type": "open"},
        {"correct": False, "parse_ok": True, "modality": "MRI", "answer_type": "open", "mics_score": 0.5},
        {"correct": True, "parse_ok": True, "modality": "MRI", "answer_type": "open", "mics_score": 1.0},
    ]
    summary = summarize(predictions)
    assert summary["n"] == 4 and summary["accuracy"] == 0.5
    assert summary["parse_failures"] == 1 and summary["parse_failure_rate"] == 0.25
    assert summary["mics_score"] == 0.75
    assert summary["by_modality"]["CT"]["accuracy"] == 0.5 and summary["by_answer_type"]["open"]["n"] == 3


def answering_model(answers: dict[str, str], calls: list | None = None) -> FunctionModel:
    """Replies from a table keyed by a word of the question; unknown questions get a reply with no answer."""

    def reply(request: ModelRequest) -> str:
        text = request.messages[-1].plain_text()
        if calls is not None:
            calls.append(text)
        for key, answer in answers.items():
            if key in text:
                return f"### Step 1: Look at the image.\n\n### Step 2: Conclude.\n\n### The final answer is: {answer}"
        return "I am not sure what this shows."

    return FunctionModel("evaluated", reply)


async def run_eval(tmp_path: Path, path: Path, model, *, judge=None, interns=None, name="bench", **options):
    options.pop("image_dir", None)  # the loader knows where a layout keeps its images
    prepared = prepare_benchmark(path, tmp_path / name)
    worker = EvalWorker(model, load_settings(cache_path=None, samples_per_temperature=1), None,
                        benchmark=name, judge=judge, interns=interns)
    output = tmp_path / name / "predictions.jsonl"
    stats = await BatchRun(worker, RunOptions(data=prepared.items, output=output, image_dir=prepared.image_root, **options)).run()
    return stats, [json.loads(line) for line in output.read_text().splitlines()]


async def test_exact_and_option_answers_skip_the_judge_and_open_ones_use_it(tmp_path):
    path = write_vqa_rad(tmp_path / "rad")
    grader = FunctionModel("judge", lambda request: "Yes")
    model = answering_model({"pneumothorax": "Yes.", "lesion": "in the right lung base"})
    stats, predictions = await run_eval(tmp_path, path, model, judge=grader, image_dir=tmp_path / "rad" / "VQA_RAD Image Folder")
    by_id = {p["rid"]: p for p in predictions}
    assert by_id["1"]["judged_by"] == "exact" and by_id["1"]["correct"]
    assert by_id["2"]["judged_by"] == "judge" and by_id["2"]["correct"]
    assert len(grader.requests) == 1
    pmc = write_pmc_vqa(tmp_path / "pmc")
    _, [choice] = await run_eval(tmp_path, pmc, answering_model({"imaging": "(B)"}), judge=grader, name="pmc",
                                 image_dir=tmp_path / "pmc" / "images")
    assert choice["judged_by"] == "option" and choice["correct"] and len(grader.requests) == 1


async def test_unparsable_answers_are_wrong_and_counted(tmp_path):
    path = write_vqa_rad(tmp_path / "rad")
    stats, predictions = await run_eval(tmp_path, path, answering_model({"pneumothorax": "yes"}),
                                        image_dir=tmp_path / "rad" / "VQA_RAD Image Folder")
    assert stats.success == 2
    summary = summarize(predictions)
    assert summary["parse_failures"] == 1 and summary["correct"] == 1 and summary["n"] == 2
    unparsed = next(p for p in predictions if not p["parse_ok"])
    assert unparsed["correct"] is False and unparsed["judged_by"] == "unparsed"


async def test_mics_score_of_the_models_own_reasoning(tmp_path):
    path = write_chiron(tmp_path / "chiron")
    seen_prefixes = []

    def intern(request: ModelRequest) -> str:
        text = request.messages[-1].plain_text()
        seen_prefixes.append(text)
        return "### The final answer is: Appendicitis" if request.temperature < 1 else "### The final answer is: Colitis"

    model = answering_model({"diagnosis": "Appendicitis", "benign": "no"})
    _, predictions = await run_eval(tmp_path, path, model, interns=[FunctionModel("intern", intern)])
    by_id = {p["rid"]: p for p in predictions}
    # Interns at temperatures 1.2 and 0.3: one right, one wrong.
    assert by_id["1"]["mics_score"] == 0.5
    assert all("### Step 1: Look at the image." in text and "### Step 2: Conclude." in text for text in seen_prefixes)
    assert all("Appendicitis" not in text.split("## Reasoning so far")[0] for text in seen_prefixes)


async def test_resume_sends_no_repeated_questions(tmp_path):
    path = write_vqa_rad(tmp_path / "rad")
    calls: list = []
    model = answering_model({"pneumothorax": "yes", "lesion": "right lung"}, calls)
    stats, _ = await run_eval(tmp_path, path, model, limit=1, image_dir=tmp_path / "rad" / "VQA_RAD Image Folder")
    assert stats.success == 1 and len(calls) == 1
    stats, predictions = await run_eval(tmp_path, path, model, image_dir=tmp_path / "rad" / "VQA_RAD Image Folder")
    assert stats.already_done == 1 and stats.success == 1 and len(calls) == 2
    assert sorted(p["rid"] for p in predictions) == ["1", "2"]


def test_the_eval_command_over_http_and_compare(tmp_path, monkeypatch):
    """The CLI end to end through LiteLLM against the local test server, then a comparison of two runs."""
    from typer.testing import CliRunner

    from mics_agents.cli import app

    from .openai_server import OpenAIServer, request_from_openai

    def brain(model: str, body: dict) -> str:
        text = request_from_openai(body).messages[-1].plain_text()
        if model == "judge":
            return "No"
        answer = {"pneumothorax": "yes", "lesion": "left lung", "organ": "Liver", "imaging": "B"}
        for key, value in answer.items():
            if key in text:
                return f"### Step 1: Read the image.\n### The final answer is: {value}"
        return "no idea"

    rad = write_vqa_rad(tmp_path / "rad")
    slake = write_slake(tmp_path / "slake")
    pmc = write_pmc_vqa(tmp_path / "pmc")
    with OpenAIServer(brain) as server:
        monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        runner = CliRunner()
        arguments = ["eval", "--model", "openai/model-a", "--judge", "openai/judge", "--benchmark", f"vqa_rad={rad}",
                     "--benchmark", f"slake={slake}", "--benchmark", f"pmc={pmc}", "--output", str(tmp_path / "a")]
        result = runner.invoke(app, arguments)
        assert result.exit_code == 0, result.output
        sent = server.count()
        again = runner.invoke(app, arguments)
        assert again.exit_code == 0 and server.count() == sent, "a rerun is answered from files and cache"
        images_sent = [r for r in server.recorded() if r.model == "model-a"]
        assert all("data:image/" in json.dumps(r.body) for r in images_sent)
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["benchmarks"]["vqa_rad"]["correct"] == 1  # "left lung" judged wrong, "yes" exact
    assert results["benchmarks"]["slake"]["accuracy"] == 1.0
    assert results["benchmarks"]["pmc"]["correct"] == 1
    assert results["overall"]["n"] == 4 and results["overall"]["correct"] == 3
    # VQA-RAD: the closed question right (exact), the open one wrong (judge): reported apart.
    assert "| vqa_rad | 2 | 100.0 (20.7-100.0) of 1 | 0.0 (0.0-79.3) of 1 |" in (tmp_path / "a" / "results.md").read_text()
    assert results["benchmarks"]["vqa_rad"]["closed"]["accuracy"] == 1.0
    assert results["benchmarks"]["vqa_rad"]["open"]["accuracy"] == 0.0
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps({**results, "model": "openai/model-b"}))
    table = compare_results([tmp_path / "a", tmp_path / "b"])
    assert "`openai/model-a`" in table and "`openai/model-b`" in table and "| **overall** | 75.0" in table


def _plain_benchmark(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "b0.png").write_bytes(png_bytes())
    records = [
        {"id": "q1", "question": "Is the study normal?", "answer": "no", "images": ["b0.png"], "answer_type": "closed"},
        {"id": "q2", "question": "Which modality is this?", "answer": "ct", "images": ["b0.png"]},
        {"id": "q3", "question": "Where is the lesion?", "answer": "left lower lobe", "images": ["b0.png"]},
    ]
    path = folder / "bench.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_without_a_judge_open_answers_get_recall_and_old_predictions_are_regraded(tmp_path, monkeypatch):
    """--judge none: no substring verdicts ("Normal" is not "no", "MRI ... infarct" is not "ct"); stored
    predictions of an older grader are regraded without asking the evaluated model again."""
    from typer.testing import CliRunner

    from mics_agents.cli import app
    from mics_agents.grading import GRADER_VERSION

    from .openai_server import OpenAIServer

    replies = {"normal": "Normal", "modality": "MRI showing an infarct", "lesion": "right lower lobe"}

    def brain(model: str, body: dict) -> str:
        text = json.dumps(body)
        answer = next(value for key, value in replies.items() if key in text)
        return f"### The final answer is: {answer}\u2028(reply ends)"

    bench = _plain_benchmark(tmp_path / "bench")
    monkeypatch.chdir(tmp_path)
    with OpenAIServer(brain) as server:
        monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        arguments = ["eval", "--model", "openai/model-a", "--judge", "none", "--benchmark", f"b={bench}",
                     "--image-root", f"b={bench.parent}", "--output", str(tmp_path / "out")]
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 0, result.output
        assert server.count("openai/judge") == 0 and server.count() == 3
        results = json.loads((tmp_path / "out" / "results.json").read_text())
        block = results["benchmarks"]["b"]
        # q1 is a yes/no question answered "Normal": wrong. q2, q3 are open: recall only, no verdict.
        assert (block["graded"], block["correct"]) == (1, 0)
        assert block["recall"] == pytest.approx((0.0 + 2 / 3) / 2)
        assert block["judged_by"] == {"recall": 2, "yes_no": 1}

        predictions_path = tmp_path / "out" / "b" / "predictions.jsonl"
        stored = [json.loads(line) for line in predictions_path.open(encoding="utf-8", newline="\n")]
        for record in stored:  # as an older, substring-happy grader left them
            record.update(correct=True, judged_by="contains", grader_version=1)
        predictions_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in stored), encoding="utf-8")
        again = CliRunner().invoke(app, arguments)
        assert again.exit_code == 0, again.output
        assert "regraded 3 stored predictions" in " ".join(again.output.split())
        assert server.count() == 3, "regrading never asks the evaluated model"
    regraded = json.loads((tmp_path / "out" / "results.json").read_text())["benchmarks"]["b"]
    assert (regraded["graded"], regraded["correct"]) == (1, 0)
    rewritten = [json.loads(line) for line in predictions_path.open(encoding="utf-8", newline="\n")]
    assert {record["grader_version"] for record in rewritten} == {GRADER_VERSION}


def _eval_cli(tmp_path: Path, monkeypatch, brain, *arguments: str):
    from typer.testing import CliRunner

    from mics_agents.cli import app

    from .openai_server import OpenAIServer

    monkeypatch.chdir(tmp_path)
    with OpenAIServer(brain) as server:
        monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        result = CliRunner().invoke(app, ["eval", "--model", "openai/model-a", "--judge", "none", *arguments])
        return result, server.recorded()


def test_chiron_eval_data_sends_every_image_in_place_of_its_token(tmp_path, monkeypatch):
    path = write_chiron(tmp_path / "chiron")
    result, requests = _eval_cli(tmp_path, monkeypatch, lambda model, body: "### The final answer is: Appendicitis",
                                 "--benchmark", f"chiron={path}", "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    first = next(r for r in requests if "keyframes" in json.dumps(r.body))
    content = first.body["messages"][-1]["content"]
    images = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
    assert len(images) == 2 and all(url.startswith("data:image/") for url in images)
    text = " ".join(part["text"] for part in content if part["type"] == "text")
    assert "<image>" not in text and "Image 1" in text and "Image 2" in text
    # Each image after its label, as the curriculum's messages.jsonl and llava.json name them in training.
    assert [part["type"] for part in content] == ["text", "image_url", "text", "image_url", "text"]
    assert [content[0]["text"], content[2]["text"]] == ["Image-1: ", "\nImage-2: "]
    assert content[4]["text"].startswith("\nWhat is the most likely diagnosis?")
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "published Chiron-o1 way" in markdown


def test_a_plain_benchmark_finds_images_beside_its_own_file(tmp_path, monkeypatch):
    bench = _plain_benchmark(tmp_path / "bench")
    (tmp_path / "bench" / "images").mkdir()  # a folder named images must not capture the paths
    result, requests = _eval_cli(tmp_path, monkeypatch, lambda model, body: "### The final answer is: no",
                                 "--benchmark", f"b={bench}", "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert len(requests) == 3 and all("data:image/" in json.dumps(r.body) for r in requests)


def test_a_benchmark_where_every_item_fails_writes_results_and_exits_non_zero(tmp_path, monkeypatch):
    bench = _plain_benchmark(tmp_path / "bench")
    (tmp_path / "bench" / "b0.png").unlink()
    result, requests = _eval_cli(tmp_path, monkeypatch, lambda model, body: "### The final answer is: no",
                                 "--benchmark", f"b={bench}", "--output", str(tmp_path / "out"))
    assert result.exit_code == 1 and requests == []
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "No answer was graded" in " ".join(result.output.split()) and "3 bad_input" in result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["overall"]["graded"] == 0 and results["benchmarks"]["b"]["not_scored_by_kind"] == {"bad_input": 3}


def test_predictions_of_items_no_longer_in_the_benchmark_are_left_out(tmp_path, monkeypatch):
    path = write_vqa_rad(tmp_path / "rad")
    out = tmp_path / "out"
    (out / "rad").mkdir(parents=True)
    # An evaluation made before the loader knew the split graded a train row (qid 3) too.
    stale = {"rid": "3", "benchmark": "rad", "question": "Is this a CT?", "gt_answer": "no", "options": {},
             "answer_type": "closed", "modality": "other", "response": "### The final answer is: no",
             "prediction": "no", "parse": "marker", "parse_ok": True, "correct": True, "strict_correct": True,
             "judged_by": "exact", "recall": None, "grader_version": 2, "mics_score": None, "usage": {}}
    (out / "rad" / "predictions.jsonl").write_text(json.dumps(stale) + "\n")
    result, _ = _eval_cli(tmp_path, monkeypatch, lambda model, body: "### The final answer is: no",
                          "--benchmark", f"rad={path}", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "1 stored predictions are for items not in the benchmark" in " ".join(result.output.split())
    results = json.loads((out / "results.json").read_text())
    assert results["benchmarks"]["rad"]["n"] == 2
    assert "2 questions" in result.output and "published vqa_rad test split has 451" in " ".join(result.output.split())


def test_bertscore_is_optional_and_scores_parsed_open_answers_as_published(tmp_path, monkeypatch):
    """With bert-score present (here a stand-in module), open answers get an F1 each, unparsed ones none;
    without it, --bertscore is a configuration error naming what to install."""
    import sys
    import types

    calls = []

    def fake_score(candidates, references, model_type, lang, verbose):
        calls.append((list(candidates), list(references), model_type))
        return None, None, [0.5 + 0.1 * index for index in range(len(candidates))]

    bench = _plain_benchmark(tmp_path / "bench")
    monkeypatch.setitem(sys.modules, "bert_score", types.SimpleNamespace(score=fake_score))
    result, _ = _eval_cli(tmp_path, monkeypatch, lambda model, body: "### The final answer is: left lung",
                          "--benchmark", f"b={bench}", "--output", str(tmp_path / "out"), "--bertscore")
    assert result.exit_code == 0, result.output
    [(candidates, references, model_type)] = calls
    assert model_type == "roberta-large" and sorted(references) == ["ct", "left lower lobe"] and candidates == ["left lung"] * 2
    block = json.loads((tmp_path / "out" / "results.json").read_text())["benchmarks"]["b"]["open"]
    assert block["bertscore_n"] == 2 and block["bertscore_f1"] == pytest.approx(0.55)
    assert "BERTScore F1" in (tmp_path / "out" / "results.md").read_text()

    monkeypatch.setitem(sys.modules, "bert_score", None)  # not installed
    missing, _ = _eval_cli(tmp_path, monkeypatch, lambda model, body: "### The final answer is: left lung",
                           "--benchmark", f"b={bench}", "--output", str(tmp_path / "out2"), "--bertscore")
    assert missing.exit_code == 2 and "pip install bert-score" in " ".join(missing.output.split())


# -- closed questions: asked as their reference reads, every one counted -------------------------------------


def write_slake_closed(folder: Path) -> Path:
    """SLAKE's test.json with the closed questions the benchmark labels CLOSED without a yes/no answer."""
    (folder / "imgs" / "xmlab2").mkdir(parents=True)
    (folder / "imgs" / "xmlab2" / "source.jpg").write_bytes(png_bytes())
    image = "xmlab2/source.jpg"
    records = [
        {"qid": 20, "img_name": image, "question": "Is the lesion on the left or right?", "answer": "Left",
         "q_lang": "en", "answer_type": "CLOSED", "modality": "CT"},
        {"qid": 21, "img_name": image, "question": "Does the picture contain the liver?", "answer": "Yes",
         "q_lang": "en", "answer_type": "CLOSED", "modality": "CT"},
        {"qid": 22, "img_name": image, "question": "CT or MRI?", "answer": "CT",
         "q_lang": "en", "answer_type": "CLOSED", "modality": "CT"},
        {"qid": 23, "img_name": image, "question": "Where is the abnormality?", "answer": "Left lobe of the liver",
         "q_lang": "en", "answer_type": "OPEN", "modality": "CT"},
    ]
    path = folder / "test.json"
    path.write_text(json.dumps(records))
    return path


def test_closed_questions_get_the_hint_their_reference_calls_for(tmp_path, monkeypatch):
    """The eval log: the left/right and CT-or-MRI questions (CLOSED in SLAKE) go out without "(yes or no)",
    the yes/no one with it, as the dataset builder asks them in training."""
    from mics_agents.task_format import ANSWER_HINTS

    path = write_slake_closed(tmp_path / "slake")
    replies = {"left or right": "right", "liver?": "yes", "CT or MRI": "MRI", "abnormality": "left lobe"}

    def brain(model: str, body: dict) -> str:
        text = json.dumps(body)
        return "### The final answer is: " + next(reply for key, reply in replies.items() if key in text)

    result, requests = _eval_cli(tmp_path, monkeypatch, brain, "--benchmark", f"slake={path}",
                                 "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    sent = {}
    for request in requests:
        text = " ".join(part["text"] for part in request.body["messages"][-1]["content"] if part["type"] == "text")
        sent[next(key for key in replies if key in text)] = text
    yes_no = ANSWER_HINTS["closed"]
    assert yes_no not in sent["left or right"] and yes_no not in sent["CT or MRI"]
    assert ANSWER_HINTS["choice"] not in sent["left or right"]
    assert yes_no in sent["liver?"] and yes_no not in sent["abnormality"]
    log = {p["rid"]: p for p in map(json.loads, (tmp_path / "out" / "slake" / "predictions.jsonl").read_text().splitlines())}
    assert {rid: (p["answer_type"], p["answer_hint"]) for rid, p in log.items()} == {
        "20": ("closed", "open"), "21": ("closed", "closed"), "22": ("closed", "open"), "23": ("open", "open")}


def test_without_a_judge_every_closed_question_counts_and_an_unmatched_one_is_wrong(tmp_path, monkeypatch):
    """SLAKE, --judge none: "right" for "Left" is wrong and stays in the closed denominator (it used to read
    n 2, graded 1, accuracy 1.0); the open question keeps recall and no verdict."""
    (tmp_path / "slake").mkdir()
    full = json.loads(write_slake_closed(tmp_path / "full").read_text())
    path = tmp_path / "slake" / "test.json"
    path.write_text(json.dumps([full[0], full[1], full[3]]))
    (tmp_path / "slake" / "imgs").symlink_to(tmp_path / "full" / "imgs")
    replies = {"left or right": "right", "liver?": "Yes", "abnormality": "the left lobe"}

    def brain(model: str, body: dict) -> str:
        text = json.dumps(body)
        return "### The final answer is: " + next(reply for key, reply in replies.items() if key in text)

    result, _ = _eval_cli(tmp_path, monkeypatch, brain, "--benchmark", f"slake={path}", "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    slake = json.loads((tmp_path / "out" / "results.json").read_text())["benchmarks"]["slake"]
    closed, opened = slake["closed"], slake["open"]
    assert (closed["n"], closed["graded"], closed["correct"], closed["accuracy"]) == (2, 2, 1, 0.5)
    assert (opened["n"], opened["graded"], opened["recall_n"]) == (1, 0, 1) and opened["recall"] == pytest.approx(0.6)
    assert "recall" not in closed, "recall is the open-question figure"
    log = {p["rid"]: p for p in map(json.loads, (tmp_path / "out" / "slake" / "predictions.jsonl").read_text().splitlines())}
    assert (log["20"]["correct"], log["20"]["judged_by"]) == (False, "no_rule")
    assert log["23"]["correct"] is None and log["23"]["judged_by"] == "recall"
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| slake | 3 | 50.0 (9.5-90.5) of 2 | - | 60.0 of 1 |" in markdown


def test_a_stored_closed_prediction_without_a_verdict_is_counted_wrong_and_regraded():
    """Predictions stored before this rule (closed, correct null) count as wrong at once and are regraded."""
    from mics_agents.evaluation.worker import needs_regrade
    from mics_agents.grading import GRADER_VERSION

    stored = {"rid": "20", "question": "Is the lesion on the left or right?", "gt_answer": "Left", "options": {},
              "answer_type": "closed", "prediction": "right", "parse_ok": True, "correct": None,
              "judged_by": "recall", "recall": 0.0, "grader_version": GRADER_VERSION}
    right = {**stored, "rid": "21", "correct": True, "judged_by": "yes_no"}
    open_one = {**stored, "rid": "23", "answer_type": "open"}
    summary = summarize([stored, right, open_one])
    assert (summary["closed"]["graded"], summary["closed"]["accuracy"]) == (2, 0.5)
    assert summary["open"]["graded"] == 0 and summary["accuracy_over_parsed_n"] == 2
    assert needs_regrade(stored) and not needs_regrade(right) and not needs_regrade(open_one)


def test_a_question_with_options_and_a_yes_no_reference_in_a_plain_file(tmp_path):
    """Adversarial: options win over a yes/no-looking label; a reference " YES. " is still yes/no; a question
    that names no options and is labelled closed gets no hint at all."""
    from mics_agents.evaluation.worker import answer_hint

    assert answer_hint({"question": "Which side?\nA. left\nB. right", "answer": "A. left", "answer_type": "closed",
                        "options": {"A": "left", "B": "right"}}) == "choice"
    assert answer_hint({"question": "Is it normal?", "answer": " YES. ", "answer_type": "open"}) == "closed"
    assert answer_hint({"question": "Left or right?", "answer": "no idea", "answer_type": "closed"}) == "open"
    assert answer_hint({"question": "Which one?\nA. x\nB. y", "answer": "B"}) == "choice"


# -- the Hugging Face parquet layout --------------------------------------------------------------------------


def test_a_slake_parquet_keeps_english_questions_and_its_own_closed_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = {"bytes": png_bytes(), "path": "x.png"}
    table = pa.table({
        "qid": [0, 1, 2, 3, 4],
        "image": [image] * 5,
        "question": ["Is the lesion on the left or right?", "病变在哪里?", "Is this normal?",
                     "What organ is shown?", "Which lobe?"],
        "answer": ["Left", "左", "yes", "no", "Left"],
        "q_lang": ["en", "zh", "EN", "en", None],
        "answer_type": ["CLOSED", "OPEN", "OPEN", None, "OPEN"],
        "modality": ["CT", "CT", "MRI", "X-Ray", "CT"],
    })
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(table, path)
    items = list(load_benchmark(path))
    assert detect_layout(path) == "hf_vqa"
    # qid 0 is an id like any other; the Chinese row is left out; a missing language is not a language.
    assert [(i.id, i.answer_type) for i in items] == [("0", "closed"), ("2", "open"), ("3", "closed"), ("4", "open")]
    assert [i.modality for i in items] == ["CT", "MRI", "X-ray", "CT"]

    plain = pa.table({"image": [image, image], "question": ["Is there a mass?", "What stain?"], "answer": ["no", "H&E"]})
    pq.write_table(plain, tmp_path / "pathvqa-test.parquet")
    assert [i.answer_type for i in load_benchmark(tmp_path / "pathvqa-test.parquet")] == ["closed", "open"]


def test_results_record_the_image_budget_the_model_was_served_with(tmp_path, monkeypatch):
    """A model served by mics serve with a trained image budget: results.json says which one it answered under."""
    from typer.testing import CliRunner

    from mics_agents.cli import app

    from .openai_server import OpenAIServer

    bench = _plain_benchmark(tmp_path / "bench")
    monkeypatch.chdir(tmp_path)
    with OpenAIServer(lambda model, body: "### The final answer is: yes") as server:
        router = tmp_path / "router.yaml"
        router.write_text(
            "model_list:\n"
            "  - model_name: openai/model-a\n"
            f"    litellm_params: {{model: openai/model-a, api_base: '{server.base_url}', api_key: sk-test}}\n"
            "    model_info: {image_budget: {max_dynamic_patch: 6}}\n"
        )
        monkeypatch.setenv("MICS_ROUTER_CONFIG", str(router))
        arguments = ["eval", "--model", "openai/model-a", "--judge", "none", "--benchmark", f"b={bench}",
                     "--image-root", f"b={bench.parent}", "--output", str(tmp_path / "out")]
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "results.json").read_text())["image_budget"] == {"max_dynamic_patch": 6}
