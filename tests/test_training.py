"""The curriculum fine-tune on tiny models made on the spot: CPU, offline, a few steps per stage."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from tests import tiny_models  # noqa: E402
from training import (  # noqa: E402
    DataChangedError,
    ModelLoadError,
    StageDataError,
    TrainingConfigError,
    load_config,
    run_curriculum,
)
from training.collator import IGNORE_INDEX, CompletionOnlyCollator  # noqa: E402
from training.data import read_stage_file  # noqa: E402
from training.modeling import load_processing_class  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("stage1", "stage2", "stage3")


def tiny_config(base: Path, curriculum: Path, output: Path, **overrides):
    """Small and fast, with a high learning rate so that a few steps on repeated samples lower the loss."""
    values = dict(
        base_model=str(base),
        curriculum_dir=str(curriculum),
        output_dir=str(output),
        max_steps=6,
        global_batch_size=4,
        per_device_train_batch_size=2,
        learning_rate=2e-2,
        warmup_ratio=0.0,
        max_length=128,
        save_steps=2,
        logging_steps=1,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        extra_training_args={"disable_tqdm": True},
    )
    values.update(overrides)
    return load_config(None, **values)


def log_history(checkpoint: Path) -> list[dict]:
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


def adapter_weights(folder: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def answer_loss(model, batches) -> float:
    """Mean loss per answer token over ``batches``, in eval mode (no dropout)."""
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * count
            tokens += count
    return total / tokens


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def tiny_vlm(workdir) -> Path:
    return tiny_models.build_tiny_vlm(workdir / "tiny-llava")


@pytest.fixture(scope="module")
def curriculum(workdir) -> Path:
    return tiny_models.build_curriculum(workdir / "curriculum")


@pytest.fixture(scope="module")
def finished_run(workdir, tiny_vlm, curriculum) -> Path:
    """All three stages on the tiny VLM, with gradient checkpointing and a merged model."""
    config = tiny_config(
        tiny_vlm,
        curriculum,
        workdir / "run",
        gradient_checkpointing=True,
        save_merged_model=True,
        stages=["stage1", "stage2", {"name": "stage3", "learning_rate": 1e-2}],
    )
    result = run_curriculum(config)
    assert result.adapter_dir == workdir / "run" / "adapter"
    return workdir / "run"


# --- the three stages -----------------------------------------------------------------------------------------


def test_every_stage_trains_its_steps_and_the_loss_falls(finished_run, curriculum):
    manifest = json.loads((finished_run / "manifest.json").read_text())
    assert [stage["name"] for stage in manifest["stages"]] == list(STAGES)
    for stage in manifest["stages"]:
        assert stage["status"] == "done"
        assert stage["global_step"] == stage["max_steps"] == 6
        assert stage["checkpoint"] == f"{stage['name']}/checkpoints/checkpoint-6"
        data = curriculum / stage["name"] / "messages.jsonl"
        assert stage["data_sha256"] == read_stage_file(data, stage=stage["name"]).sha256
        assert stage["samples"] == 4
        losses = [entry["loss"] for entry in log_history(finished_run / stage["checkpoint"]) if "loss" in entry]
        assert len(losses) == 6
        assert losses[-1] < losses[0] - 0.3, (stage["name"], losses)
    assert manifest["stages"][0]["images"] == 2 and manifest["stages"][2]["images"] == 6
    assert manifest["stages"][2]["hyperparameters"]["learning_rate"] == 1e-2  # the per-stage override
    assert manifest["stages"][0]["hyperparameters"]["learning_rate"] == 2e-2
    assert manifest["stages"][0]["sources"] == {"part1_text_qa": 2, "part2_alignment": 2}


def test_lora_is_on_the_language_model_only(finished_run):
    config = json.loads((finished_run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    names = list(adapter_weights(finished_run / "adapter"))
    assert names and all(".language_model." in name for name in names), names
    assert not any("vision_tower" in name or "multi_modal_projector" in name or "lm_head" in name for name in names)


def test_each_stage_continues_from_the_previous_one(finished_run, tiny_vlm):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    weights = {stage: adapter_weights(finished_run / stage / "adapter") for stage in STAGES}
    for stage in STAGES:
        # The stage's adapter is its last checkpoint, and it reloads onto the base model.
        checkpoint = adapter_weights(finished_run / stage / "checkpoints" / "checkpoint-6")
        assert checkpoint.keys() == weights[stage].keys()
        assert all(torch.equal(checkpoint[key], weights[stage][key]) for key in checkpoint)
        base = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
        model = PeftModel.from_pretrained(base, str(finished_run / stage / "checkpoints" / "checkpoint-6"))
        loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(weights[stage])
    # One adapter carried through: stage 2 started from stage 1's weights (LoRA B is zero at a fresh start).
    stage2_start = log_history(finished_run / "stage2" / "checkpoints" / "checkpoint-6")[0]["loss"]
    stage1_start = log_history(finished_run / "stage1" / "checkpoints" / "checkpoint-6")[0]["loss"]
    assert stage2_start < stage1_start
    for first, second in zip(STAGES, STAGES[1:], strict=False):
        assert any(not torch.equal(weights[first][k], weights[second][k]) for k in weights[first])


def test_the_final_adapter_generates_and_the_merged_model_matches_it(finished_run, tiny_vlm, curriculum):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vlm)
    sample = read_stage_file(curriculum / "stage3" / "messages.jsonl", stage="stage3").samples[2]
    collator = CompletionOnlyCollator(processor, is_vlm=True, max_length=128)
    prompt = processor.apply_chat_template(sample.prompt, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[collator.load_images(sample.as_row())], return_tensors="pt")

    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = PeftModel.from_pretrained(base, str(finished_run / "adapter")).eval()
    with torch.no_grad():
        adapter_logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert not torch.allclose(base_logits, adapter_logits, atol=1e-4)

    merged = AutoModelForImageTextToText.from_pretrained(finished_run / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
    assert AutoProcessor.from_pretrained(finished_run / "merged") is not None


def test_the_model_card_lists_data_and_metrics(finished_run, curriculum):
    card = (finished_run / "README.md").read_text()
    manifest = json.loads((finished_run / "manifest.json").read_text())
    for stage in manifest["stages"]:
        assert str(curriculum / stage["name"] / "messages.jsonl") in card
        assert stage["data_sha256"][:16] in card
        assert f"{stage['metrics']['last_logged_loss']:.4g}" in card
    assert "--enable-lora" in card and "base_model:" in card


def test_a_rerun_of_a_finished_run_trains_nothing(finished_run, tiny_vlm, curriculum, caplog):
    before = {p: p.stat().st_mtime_ns for p in finished_run.glob("stage*/adapter/adapter_model.safetensors")}
    config = tiny_config(
        tiny_vlm,
        curriculum,
        finished_run,
        gradient_checkpointing=True,
        save_merged_model=True,
        stages=["stage1", "stage2", {"name": "stage3", "learning_rate": 1e-2}],
    )
    with caplog.at_level("INFO", logger="training"):
        run_curriculum(config)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert sum("is done" in record.getMessage() for record in caplog.records) == 3


def test_changed_data_is_refused_unless_allowed(finished_run, tiny_vlm, curriculum, workdir):
    copy_curriculum = workdir / "changed-curriculum"
    shutil.copytree(curriculum, copy_curriculum)
    copy_run = workdir / "changed-run"
    shutil.copytree(finished_run, copy_run)
    stage2 = copy_curriculum / "stage2" / "messages.jsonl"
    lines = stage2.read_text().splitlines(keepends=True)
    stage2.write_text("".join(lines[:-1]))  # one sample fewer
    overrides = dict(
        gradient_checkpointing=True,
        save_merged_model=True,
        stages=["stage1", "stage2", {"name": "stage3", "learning_rate": 1e-2}],
    )
    with pytest.raises(DataChangedError, match=r"stage2.*changed.*--allow-data-change"):
        run_curriculum(tiny_config(tiny_vlm, copy_curriculum, copy_run, **overrides))
    run_curriculum(tiny_config(tiny_vlm, copy_curriculum, copy_run, allow_data_change=True, **overrides))
    manifest = json.loads((copy_run / "manifest.json").read_text())
    entry = manifest["stages"][1]
    assert entry["data_sha256"] == read_stage_file(stage2, stage="stage2").sha256
    assert entry["previous_data_sha256"] == [
        json.loads((finished_run / "manifest.json").read_text())["stages"][1]["data_sha256"]
    ]


def test_trains_on_the_curriculum_the_dataset_builder_writes(tmp_path, caplog):
    """`mics demo` runs MICS with simulated models on the shipped cases and builds the curriculum; its stage1
    is empty (the demo has no text QA), so that stage is skipped and stage 3 continues from stage 2."""
    demo = subprocess.run(
        [sys.executable, "-m", "mics_agents", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    [curriculum] = {path.parent.parent for path in tmp_path.glob("*/stage2/messages.jsonl")}
    texts = [
        part["text"]
        for stage in STAGES
        for line in (curriculum / stage / "messages.jsonl").read_text().splitlines()
        for message in json.loads(line)["messages"]
        for part in message["content"]
        if part["type"] == "text"
    ]
    base = tiny_models.build_tiny_vlm(tmp_path / "tiny-llava", extra_texts=texts)
    with caplog.at_level("WARNING"):
        result = run_curriculum(tiny_config(base, curriculum, tmp_path / "run", max_steps=8, max_length=512))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    statuses = {stage["name"]: stage["status"] for stage in manifest["stages"]}
    samples = {stage["name"]: stage["samples"] for stage in manifest["stages"]}
    if samples["stage1"] == 0:
        assert statuses["stage1"] == "skipped" and "holds no samples" in caplog.text
    assert statuses["stage2"] == statuses["stage3"] == "done" and samples["stage3"] > 0
    assert "skipped (no loss)" not in caplog.text  # every prompt fit
    for stage in manifest["stages"][1:]:
        assert stage["global_step"] == 8
        assert set(stage["sources"]) <= {"part1_text_qa", "part2_alignment", "part3_cot"} | {
            name for name in stage["sources"] if name.startswith("vqa:")
        }
    # Per-batch losses are noisy on varied samples: the loss over a whole stage, before and after, is not.
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    processor = load_processing_class(str(base), "vlm")
    rows = [sample.as_row() for sample in read_stage_file(curriculum / "stage3" / "messages.jsonl", stage="s").samples]
    collator = CompletionOnlyCollator(processor, is_vlm=True, max_length=512)
    batches = [collator(rows[i : i + 4]) for i in range(0, len(rows), 4)]
    before = answer_loss(AutoModelForImageTextToText.from_pretrained(base), batches)
    tuned = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), str(result.adapter_dir))
    after = answer_loss(tuned, batches)
    assert after < before - 1.0, (before, after)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


# --- exact resume after a hard kill -------------------------------------------------------------------------------

KILLER = """
import os, sys
from transformers import TrainerCallback
from training.cli import main

class HardExit(TrainerCallback):
    # Dies like a killed process (no cleanup, no final save) in the middle of a stage.
    def on_step_end(self, args, state, control, **kwargs):
        if os.environ["KILL_STAGE"] in args.output_dir and state.global_step == int(os.environ["KILL_AT_STEP"]):
            os._exit(137)

sys.exit(main(sys.argv[1:], callbacks=[HardExit()]))
"""


def test_a_killed_run_resumes_to_the_same_steps_and_weights(workdir, tiny_vlm, curriculum, tmp_path):
    overrides = dict(stages=["stage1", "stage2"], max_steps=5, lr_scheduler_type="cosine", warmup_ratio=0.2)
    reference = workdir / "reference-run"
    run_curriculum(tiny_config(tiny_vlm, curriculum, reference, **overrides))

    resumed = tmp_path / "resumed-run"
    config_file = tmp_path / "curriculum.yaml"
    config = tiny_config(tiny_vlm, curriculum, resumed, **overrides).to_dict()
    config_file.write_text(json.dumps(config))  # JSON is YAML
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    env = {**os.environ, "KILL_STAGE": "stage2", "KILL_AT_STEP": "3", "PYTHONPATH": str(REPO)}

    killed = subprocess.run(
        [sys.executable, str(killer), "--config", str(config_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == 137, killed.stderr[-3000:]
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done", "running"]
    assert manifest["stages"][1]["checkpoint"] == "stage2/checkpoints/checkpoint-2"
    assert not (resumed / "stage2" / "adapter").exists()

    rerun = subprocess.run(
        [sys.executable, "-m", "training", "--config", str(config_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Stage stage1 is done" in rerun.stderr
    assert "resuming from" in rerun.stderr and "checkpoint-2" in rerun.stderr

    for stage in ("stage1", "stage2"):
        expected = json.loads((reference / "manifest.json").read_text())
        got = json.loads((resumed / "manifest.json").read_text())
        assert [s["global_step"] for s in got["stages"]] == [s["global_step"] for s in expected["stages"]] == [5, 5]
        final_ref = reference / stage / "checkpoints" / "checkpoint-5"
        final_got = resumed / stage / "checkpoints" / "checkpoint-5"
        state_ref = json.loads((final_ref / "trainer_state.json").read_text())
        state_got = json.loads((final_got / "trainer_state.json").read_text())
        assert state_got["global_step"] == state_ref["global_step"] == 5
        # Same LR schedule and same data order: the same learning rates and losses step by step.
        lrs = lambda state: [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]  # noqa: E731
        losses = lambda state: [e["loss"] for e in state["log_history"] if "loss" in e]  # noqa: E731
        assert lrs(state_got) == pytest.approx(lrs(state_ref))
        assert losses(state_got) == pytest.approx(losses(state_ref), abs=1e-4)
        ref_weights, got_weights = (
            adapter_weights(reference / stage / "adapter"),
            adapter_weights(resumed / stage / "adapter"),
        )
        assert all(torch.allclose(ref_weights[k], got_weights[k], atol=1e-5) for k in ref_weights)


def test_torchrun_data_parallel_matches_one_process(workdir, tiny_vlm, curriculum, tmp_path):
    """Two processes (DDP over gloo on CPU) with global batch 4 take the same steps as one process does.

    Without dropout both see every sample once per step, so the losses agree to float precision."""
    overrides = dict(stages=["stage1", "stage2"], max_steps=3, per_device_train_batch_size=1, lora_dropout=0.0)
    single = tmp_path / "single"
    run_curriculum(tiny_config(tiny_vlm, curriculum, single, **overrides))
    config_file = tmp_path / "curriculum.yaml"
    config_file.write_text(json.dumps(tiny_config(tiny_vlm, curriculum, tmp_path / "ddp", **overrides).to_dict()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "-m",
            "training",
            "--config",
            str(config_file),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert [(s["status"], s["global_step"]) for s in manifest["stages"]] == [("done", 3), ("done", 3)]
    for stage in ("stage1", "stage2"):
        ddp_log = log_history(tmp_path / "ddp" / stage / "checkpoints" / "checkpoint-3")
        single_log = log_history(single / stage / "checkpoints" / "checkpoint-3")
        assert ddp_log[-1]["step"] == 3
        assert [e["loss"] for e in ddp_log if "loss" in e] == pytest.approx(
            [e["loss"] for e in single_log if "loss" in e], abs=1e-4
        )
    assert launched.stderr.count("Curriculum done") == 1  # one process logs and writes the outputs


def test_a_running_stage_refuses_other_settings(tmp_path):
    from training.errors import ManifestError
    from training.manifest import Manifest

    manifest = Manifest.open(tmp_path, base_model="m", model_kind="vlm")
    manifest.update_stage("stage1", status="running", hyperparameters={"learning_rate": 4e-5, "max_steps": 10})
    manifest.save()
    reopened = Manifest.open(tmp_path, base_model="m", model_kind="vlm")
    reopened.check_settings("stage1", {"learning_rate": 4e-5, "max_steps": 10})
    with pytest.raises(ManifestError, match=r"max_steps: 10 -> 20.*delete"):
        reopened.check_settings("stage1", {"learning_rate": 4e-5, "max_steps": 20})
    with pytest.raises(ManifestError, match=r"trained the stages \['stage1'\]"):
        reopened.check_stage_order(["stage0", "stage1"])
    with pytest.raises(ManifestError, match="base model 'm', not 'other'"):
        Manifest.open(tmp_path, base_model="other", model_kind="vlm")


# --- label masking -------------------------------------------------------------------------------------------------


def test_only_the_assistant_answer_carries_labels(tiny_vlm, curriculum):
    processor = load_processing_class(str(tiny_vlm), "vlm")
    samples = read_stage_file(curriculum / "stage1" / "messages.jsonl", stage="stage1").samples
    text_sample, image_sample = samples[0], samples[2]
    assert not text_sample.images and image_sample.images
    collator = CompletionOnlyCollator(processor, is_vlm=True, max_length=128)
    batch = collator([text_sample.as_row(), image_sample.as_row()])
    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    assert batch["pixel_values"].shape[0] == 1  # one image in the batch
    for row, sample in enumerate([text_sample, image_sample]):
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        trained = labels != IGNORE_INDEX
        answer = sample.completion[0]["content"][0]["text"]
        assert tokenizer.decode(labels[trained]) == answer + "</s>"  # the answer and its end-of-turn token
        assert torch.equal(labels[trained], ids[trained])
        first = int(trained.nonzero()[0])
        assert tokenizer.decode(ids[:first]).endswith("<|assistant|>")  # everything before is prompt
        assert not trained[:first].any() and not trained[mask == 0].any()
        assert not trained[ids == image_token].any()
    assert int((batch["input_ids"][1] == image_token).sum()) == 4  # 16x16 pixels in 8x8 patches
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == tokenizer.pad_token_id).all()  # right-padded


def test_text_models_mask_the_same_way_and_long_answers_are_cut(tmp_path, curriculum):
    tokenizer_dir = tiny_models.build_tiny_causal_lm(tmp_path / "tiny-llama")
    tokenizer = load_processing_class(str(tokenizer_dir), "text")
    sample = read_stage_file(curriculum / "stage1" / "messages.jsonl", stage="stage1").samples[1]
    full = CompletionOnlyCollator(tokenizer, is_vlm=False, max_length=128)([sample.as_row()])
    trained = full["labels"][0] != IGNORE_INDEX
    assert tokenizer.decode(full["labels"][0][trained]) == sample.completion[0]["content"][0]["text"] + "</s>"
    prompt_length = int((~trained).sum())
    cut = CompletionOnlyCollator(tokenizer, is_vlm=False, max_length=prompt_length + 3)([sample.as_row()])
    assert cut["input_ids"].shape[1] == prompt_length + 3
    assert int((cut["labels"][0] != IGNORE_INDEX).sum()) == 3


def test_a_prompt_longer_than_max_length_is_kept_out_of_the_loss(tiny_vlm, curriculum, caplog):
    processor = load_processing_class(str(tiny_vlm), "vlm")
    sample = read_stage_file(curriculum / "stage3" / "messages.jsonl", stage="stage3").samples[3]
    with caplog.at_level("WARNING"):
        batch = CompletionOnlyCollator(processor, is_vlm=True, max_length=16)([sample.as_row()])
    assert (batch["labels"] == IGNORE_INDEX).all() and batch["input_ids"].shape[1] <= 16
    assert "pixel_values" not in batch  # no image tokens left, so no pixels either
    assert sample.id in caplog.text and "max_length" in caplog.text


# --- text-only model, merging between stages ---------------------------------------------------------------------


def test_a_text_model_trains_with_merges_between_stages(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_models.build_tiny_causal_lm(tmp_path / "tiny-llama")
    text_curriculum = tiny_models.build_curriculum(tmp_path / "text-curriculum", with_images=False)
    config = tiny_config(
        base,
        text_curriculum,
        tmp_path / "run",
        stages=["stage1", "stage2"],
        merge_between_stages=True,
        global_batch_size=2,
        per_device_train_batch_size=1,
    )
    result = run_curriculum(config)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model_kind"] == "text" and [s["status"] for s in manifest["stages"]] == ["done", "done"]
    for stage in manifest["stages"]:
        assert stage["metrics"]["last_logged_loss"] < stage["metrics"]["first_logged_loss"]

    # The merged model is base + stage 1 merged + stage 2 merged, in that order.
    chained = AutoModelForCausalLM.from_pretrained(base)
    for stage in ("stage1", "stage2"):
        chained = PeftModel.from_pretrained(chained, str(tmp_path / "run" / stage / "adapter")).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    ids = torch.tensor([[4, 40, 41, 42, 5]])
    with torch.no_grad():
        assert torch.allclose(chained(ids).logits, merged(ids).logits, atol=1e-5)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(base)(ids).logits, merged(ids).logits, atol=1e-4)
    assert "merged" in (tmp_path / "run" / "README.md").read_text()


# --- errors a user can meet --------------------------------------------------------------------------------------


def test_a_missing_stage_file_says_what_to_do(tmp_path, curriculum):
    broken = tmp_path / "curriculum"
    shutil.copytree(curriculum, broken)
    (broken / "stage3" / "messages.jsonl").unlink()
    with pytest.raises(StageDataError, match=r"stage3.*no stage file.*dataset builder"):
        run_curriculum(tiny_config(tmp_path / "no-model-needed", broken, tmp_path / "out"))


def test_a_missing_image_names_the_sample(tmp_path, curriculum):
    broken = tmp_path / "curriculum"
    shutil.copytree(curriculum, broken)
    (broken / "stage3" / "images" / "grey.png").unlink()
    with pytest.raises(StageDataError, match=r"sample 'cgrey-cot2'.*images/grey.png.*not found"):
        run_curriculum(tiny_config(tmp_path / "no-model-needed", broken, tmp_path / "out"))


def test_bad_stage_lines_name_file_line_and_problem(tmp_path):
    record = tiny_models.sample("a-1", "part3_cot", "Q?", "A.", [])
    record["messages"][0]["content"].insert(0, {"type": "image"})  # a placeholder without an image path
    path = tiny_models.write_stage(tmp_path / "stage1", [tiny_models.sample("a-0", "x", "Q", "A", []), record])
    with pytest.raises(StageDataError, match=r"messages.jsonl:2 \(sample 'a-1'\): 1 image placeholder"):
        read_stage_file(path, stage="stage1")
    path.write_text(path.read_text().splitlines()[0] + "\n" + path.read_text().splitlines()[0] + "\n")
    with pytest.raises(StageDataError, match=r"'a-0' also appears on line 1"):
        read_stage_file(path, stage="stage1")


def test_a_base_model_that_does_not_load_says_what_to_do(tmp_path, curriculum):
    with pytest.raises(ModelLoadError, match=r"not-a-model.*There is no folder .*not-a-model: check base_model"):
        run_curriculum(tiny_config(tmp_path / "not-a-model", curriculum, tmp_path / "out"))


def test_image_stages_need_a_vision_language_model(tmp_path, curriculum):
    base = tiny_models.build_tiny_causal_lm(tmp_path / "tiny-llama")
    with pytest.raises(StageDataError, match=r"stage1.*2 sample\(s\) with images.*text-only"):
        run_curriculum(tiny_config(base, curriculum, tmp_path / "out"))


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(TrainingConfigError, match="base_model"):
        load_config(None, curriculum_dir="c")
    with pytest.raises(TrainingConfigError, match=r"Unknown config field\(s\) \['learning_rat'\]"):
        load_config(None, base_model="m", learning_rat=1.0)
    with pytest.raises(TrainingConfigError, match=r"stages\[stage2\]: unknown key\(s\) \['lr'\]"):
        load_config(None, base_model="m", curriculum_dir="c", stages=["stage1", {"name": "stage2", "lr": 1}])
    with pytest.raises(TrainingConfigError, match="set curriculum_dir"):
        load_config(None, base_model="m")
    with pytest.raises(TrainingConfigError, match="lora_r: expected int"):
        load_config(None, base_model="m", curriculum_dir="c", lora_r="sixteen")

    from training.curriculum import gradient_accumulation

    settings = load_config(None, base_model="m", curriculum_dir="c").stage_defaults()
    assert gradient_accumulation(settings, world_size=1, stage="s") == 16
    assert gradient_accumulation(settings, world_size=8, stage="s") == 2  # the paper: 8 GPUs, global batch 16
    with pytest.raises(TrainingConfigError, match="not a multiple"):
        gradient_accumulation(settings, world_size=3, stage="s")


def test_the_shipped_configs_hold_the_paper_defaults(tmp_path):
    import yaml

    config = load_config(REPO / "training" / "configs" / "curriculum.yaml", curriculum_dir=str(tmp_path))
    assert (config.lora_r, config.lora_alpha, config.learning_rate) == (16, 32, 4e-5)
    assert (config.lr_scheduler_type, config.warmup_ratio, config.num_train_epochs) == ("cosine", 0.03, 1)
    assert (config.global_batch_size, config.max_length, config.precision) == (16, 8192, "auto")
    assert [stage.name for stage in config.resolved_stages] == list(STAGES)
    assert config.resolved_stages[0].data == (tmp_path / "stage1" / "messages.jsonl").absolute()
    zero = json.loads((REPO / "training" / "configs" / "deepspeed_zero1.json").read_text())
    assert zero["zero_optimization"]["stage"] == 1 and zero["gradient_accumulation_steps"] == "auto"
    fsdp = yaml.safe_load((REPO / "training" / "configs" / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_the_command_line(tmp_path, capsys):
    from training.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in (
        "--config",
        "--base-model",
        "--curriculum-dir",
        "--learning-rate",
        "--merge-between-stages",
        "--allow-data-change",
        "--deepspeed",
        "accelerate launch",
        "torchrun",
    ):
        assert option in help_text
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "No config file" in capsys.readouterr().err
    config_file = tmp_path / "c.yaml"
    config_file.write_text("base_model: m\ncurriculum_dir: nowhere\n")
    assert main(["--config", str(config_file), "--learning_rate", "1e-4", "--stages", "[stage1]"]) == 2
    assert "no stage file" in capsys.readouterr().err
