"""The curriculum fine-tune on tiny models made on the spot: CPU, offline, a few steps per stage.

LLaVA and a text Llama run everywhere; the paper's family (InternVL "-hf") and Qwen2.5-VL need torchvision for their
processors and are skipped, saying so, where it does not load.
"""

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
pytest.importorskip("trl")

from tests import tiny_models  # noqa: E402
from training import (  # noqa: E402
    DataChangedError,
    ManifestError,
    ModelLoadError,
    StageDataError,
    TrainingConfigError,
    load_config,
    run_curriculum,
)
from training.data import read_stage_file  # noqa: E402
from training.modeling import load_processing_class  # noqa: E402
from training.sft import IGNORE_INDEX, stage_dataset, vision_collator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("stage1", "stage2", "stage3")
NEEDS_TORCHVISION = pytest.mark.skipif(
    not tiny_models.has_torchvision(),
    reason="the InternVL and Qwen2.5-VL processors need torchvision built for the installed torch: "
    "pip install -c constraints.txt -e '.[train]' installs torch 2.14.1 + torchvision 0.29.1",
)
FAMILY_PARAMS = [
    pytest.param("llava", id="llava"),
    pytest.param("internvl", id="internvl", marks=NEEDS_TORCHVISION),
    pytest.param("qwen2_5_vl", id="qwen2_5_vl", marks=NEEDS_TORCHVISION),
]


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


def collate(processor, samples):
    """A batch exactly as the trainer builds it: TRL's vision collator over the stage's dataset rows."""
    return vision_collator(processor)(list(stage_dataset(samples, is_vlm=True)))


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
    from PIL import Image

    sample = read_stage_file(curriculum / "stage3" / "messages.jsonl", stage="stage3").samples[2]
    prompt = processor.apply_chat_template(sample.prompt, tokenize=False, add_generation_prompt=True)
    images = [Image.open(path).convert("RGB") for path in sample.images]
    inputs = processor(text=[prompt], images=[images], return_tensors="pt")

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
    assert "left out" not in caplog.text  # every sample fit: nothing dropped
    for stage in manifest["stages"][1:]:
        assert stage["global_step"] == 8
        assert stage["dropped"] == {} and stage["trained_samples"] == stage["samples"]
        assert set(stage["sources"]) <= {"part1_text_qa", "part2_alignment", "part3_cot"} | {
            name for name in stage["sources"] if name.startswith("vqa:")
        }
    # Per-batch losses are noisy on varied samples: the loss over a whole stage, before and after, is not.
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    processor = load_processing_class(str(base), "vlm")
    samples = read_stage_file(curriculum / "stage3" / "messages.jsonl", stage="s").samples
    batches = [collate(processor, samples[i : i + 4]) for i in range(0, len(samples), 4)]
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


# --- which tokens carry loss: golden tests per model family --------------------------------------------------------

QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
# Per family: the prompt as the model sees it (images expanded by the processor), one image's tokens at the tiny
# models' sizes, and what follows the answer. Everything before the answer is masked; the answer and its
# end-of-turn tokens are the only labels.
GOLDEN = {
    "llava": {
        "prompt": "<|user|>{images}{question}</s><|assistant|>",
        "image": "<image>" * 4,  # 16x16 pixels in 8x8 patches
        "end": "</s>",
    },
    "internvl": {
        "prompt": "<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n",
        "image": "<img>" + "<IMG_CONTEXT>" * 4 + "</img>\n",  # one 16-px tile, 4 tokens after the pixel shuffle
        "end": "<|im_end|>\n",
    },
    "qwen2_5_vl": {
        "prompt": QWEN_SYSTEM + "<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n",
        "image": "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>",  # 20x24 -> 16x24 px, 6 tokens
        "end": "<|im_end|>\n",
    },
}
IMAGE_TOKENS = {"llava": "<image>", "internvl": "<IMG_CONTEXT>", "qwen2_5_vl": "<|image_pad|>"}


@pytest.fixture(scope="module")
def family_model(request, workdir):
    """``family_model(name)``: the tiny model of that family, built once per module."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name == "llava":
            return request.getfixturevalue("tiny_vlm")
        if name not in built:
            built[name] = tiny_models.FAMILIES[name](workdir / f"tiny-{name}")
        return built[name]

    return get


def family_processor(base: Path, max_tiles: int = 6):
    from training.modeling import apply_image_budget

    processor = load_processing_class(str(base), "vlm")
    apply_image_budget(processor, max_tiles=max_tiles)
    return processor


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_golden_labels_only_the_answer_carries_loss(family, family_model, curriculum):
    """Text-only, one-image and two-image samples in one batch, through TRL's collator as the trainer uses it."""
    from training.lengths import measure_lengths

    processor = family_processor(family_model(family))
    tokenizer = processor.tokenizer
    stage1 = read_stage_file(curriculum / "stage1" / "messages.jsonl", stage="stage1").samples
    stage3 = read_stage_file(curriculum / "stage3" / "messages.jsonl", stage="stage3").samples
    samples = [stage1[0], stage3[0], stage3[3]]
    assert [len(sample.images) for sample in samples] == [0, 1, 2]
    batch = collate(processor, samples)
    golden = GOLDEN[family]
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[family])
    lengths = measure_lengths(samples, processor, is_vlm=True)
    for row, sample in enumerate(samples):
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        trained = labels != IGNORE_INDEX
        first = int(trained.nonzero()[0])
        question = sample.prompt[0]["content"][-1]["text"]
        answer = sample.completion[0]["content"][0]["text"]
        expected_prompt = golden["prompt"].format(images=golden["image"] * len(sample.images), question=question)
        assert tokenizer.decode(ids[:first]) == expected_prompt
        assert tokenizer.decode(labels[trained]) == answer + golden["end"]
        assert torch.equal(labels[trained], ids[trained]) and not trained[:first].any()
        assert trained[first : int(mask.sum())].all()  # the whole answer, uncut, then only padding
        assert not trained[mask == 0].any() and not trained[ids == image_token].any()
        assert (ids[mask == 0] == tokenizer.pad_token_id).all()
        # The length policy counts exactly what the trainer trains on.
        assert lengths[sample.id] == [first, int(trained.sum())]
    planes = batch["image_grid_thw"].shape[0] if family == "qwen2_5_vl" else batch["pixel_values"].shape[0]
    assert planes == 3  # three images (one tile each for InternVL at 20x24 pixels)


def test_golden_labels_of_a_text_model(tmp_path, curriculum):
    """A text-only model: SFTTrainer tokenizes the prompt-completion rows itself; the same tokens carry loss."""
    from trl import SFTConfig, SFTTrainer

    from training.lengths import measure_lengths

    base = tiny_models.build_tiny_causal_lm(tmp_path / "tiny-llama")
    tokenizer = load_processing_class(str(base), "text")
    samples = read_stage_file(curriculum / "stage1" / "messages.jsonl", stage="stage1").samples[:2]
    from transformers import AutoModelForCausalLM

    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        args=SFTConfig(
            output_dir=str(tmp_path / "out"),
            completion_only_loss=True,
            max_length=None,
            bf16=False,
            activation_checkpointing=False,
            report_to="none",
        ),
        train_dataset=stage_dataset(samples, is_vlm=False),
        processing_class=tokenizer,
    )
    lengths = measure_lengths(samples, tokenizer, is_vlm=False)
    for row, sample in zip(trainer.train_dataset, samples, strict=True):
        ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        trained = labels != IGNORE_INDEX
        first = int(trained.nonzero()[0])
        question, answer = sample.prompt[0]["content"][-1]["text"], sample.completion[0]["content"][0]["text"]
        assert tokenizer.decode(ids[:first]) == f"<|user|>{question}</s><|assistant|>"
        assert tokenizer.decode(labels[trained]) == answer + "</s>" and trained[first:].all()
        assert lengths[sample.id] == [first, int(trained.sum())]


# --- the length policy: never train on a cut answer ----------------------------------------------------------------


def test_the_length_policy_keeps_what_fits_and_says_why_the_rest_goes():
    from training.data import Sample
    from training.lengths import apply_length_policy

    samples = [Sample(id=name, prompt=[], completion=[], images=[]) for name in "abcde"]
    lengths = {"a": [10, 6], "b": [10, 7], "c": [16, 1], "d": [15, 1], "e": [3, 40]}
    report = apply_length_policy(samples, lengths, max_length=16)
    assert [sample.id for sample in report.kept] == ["a", "d"] and report.longest_kept == 16
    assert report.dropped == {"prompt_over_max_length": ["c"], "answer_over_max_length": ["b", "e"]}
    assert report.counts() == {"prompt_over_max_length": 1, "answer_over_max_length": 2}


def test_a_sample_that_would_be_cut_is_left_out_and_counted(tiny_vlm, curriculum, tmp_path, caplog):
    """At max_length 48 one answer and one prompt do not fit: both are dropped (never cut), on every count."""
    from transformers import TrainerCallback

    long_curriculum = tmp_path / "curriculum"
    shutil.copytree(curriculum, long_curriculum)
    stage3 = long_curriculum / "stage3" / "messages.jsonl"
    records = [json.loads(line) for line in stage3.read_text().splitlines()]
    long_answer = tiny_models.sample(
        "long-answer", "part3_cot", "What colour is the finding?", " ".join([tiny_models.COT.format(answer="red")] * 3),
        ["../images/red.png"],
    )
    long_prompt = tiny_models.sample(
        "long-prompt", "part3_cot", " ".join(["Compare the two images."] * 12), "The final answer is: red",
        ["images/blue.png", "images/grey.png"],
    )
    tiny_models.write_stage(long_curriculum / "stage3", [*records, long_answer, long_prompt])

    seen: dict[str, object] = {}

    class SeeTheData(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            seen["collator"] = train_dataloader.collate_fn
            seen["rows"] = list(train_dataloader.dataset)

    config = tiny_config(tiny_vlm, long_curriculum, tmp_path / "run", stages=["stage3"], max_steps=2, max_length=48)
    with caplog.at_level("WARNING", logger="training"):
        run_curriculum(config, callbacks=[SeeTheData()])

    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"][0]
    assert entry["samples"] == 6 and entry["trained_samples"] == 4 and entry["longest_sequence"] <= 48
    assert entry["dropped"] == {"prompt_over_max_length": 1, "answer_over_max_length": 1}
    dropped = json.loads((tmp_path / "run" / "stage3" / "dropped.json").read_text())
    assert dropped["dropped"] == {"prompt_over_max_length": ["long-prompt"], "answer_over_max_length": ["long-answer"]}
    assert "2 of 6 samples left out" in caplog.text and "long-answer" in caplog.text
    card = (tmp_path / "run" / "README.md").read_text()
    assert "stage3 (max_length 48): 1 prompt_over_max_length" in card and "1 answer_over_max_length" in card
    # The trainer saw the four samples that fit, with TRL's collator as the golden tests use it, and no truncation.
    assert len(seen["rows"]) == 4
    assert all(row["completion"][0]["content"][0]["text"].startswith("Step 1") for row in seen["rows"])
    collator = seen["collator"]
    assert type(collator).__name__ == "DataCollatorForVisionLanguageModeling"
    assert collator.completion_only_loss and collator.max_length is None
    # The lengths were measured once and kept, by sample, for a rerun with another max_length.
    cached = [json.loads(line) for line in (tmp_path / "run" / "lengths" / "rank-0.jsonl").read_text().splitlines()]
    lengths = {record["id"]: record["lengths"] for record in cached}
    assert len(cached) == len(lengths) == 6
    assert sum(lengths["long-answer"]) > 48 >= sum(lengths["cred-cot"]) and lengths["long-prompt"][0] >= 48


def test_a_stage_where_nothing_fits_is_an_error(tiny_vlm, curriculum, tmp_path):
    config = tiny_config(tiny_vlm, curriculum, tmp_path / "run", stages=["stage3"], max_length=16)
    with pytest.raises(StageDataError, match=r"stage3.*none of its 4 samples fits in max_length 16.*image_max_tiles"):
        run_curriculum(config)


# --- the paper's family: InternVL "-hf" and Qwen2.5-VL -----------------------------------------------------------


class CrashAt:
    """A callback that raises in the middle of a stage, as a crash would (the checkpoint before it stays)."""

    def __new__(cls, stage: str, step: int):
        from transformers import TrainerCallback

        class _Crash(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stage in args.output_dir and state.global_step == step:
                    raise RuntimeError(f"crash in {stage} at step {step}")

        return _Crash()


@pytest.mark.parametrize("family", FAMILY_PARAMS[1:])
def test_the_papers_family_trains_every_stage_and_resumes_exactly(family, family_model, curriculum, tmp_path):
    """All three stages on a tiny InternVL / Qwen2.5-VL; a run that crashes in stage 2 and is rerun ends with the
    same losses and weights as one that did not."""
    from transformers import AutoProcessor

    base = family_model(family)
    overrides = dict(max_steps=4, max_length=256, lr_scheduler_type="cosine", warmup_ratio=0.25)
    reference = tmp_path / "reference"
    run_curriculum(tiny_config(base, curriculum, reference, **overrides))
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="crash in stage2 at step 3"):
        run_curriculum(tiny_config(base, curriculum, resumed, **overrides), callbacks=[CrashAt("stage2", 3)])
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done", "running"]
    assert manifest["stages"][1]["checkpoint"] == "stage2/checkpoints/checkpoint-2"
    run_curriculum(tiny_config(base, curriculum, resumed, **overrides))

    expected = json.loads((reference / "manifest.json").read_text())
    got = json.loads((resumed / "manifest.json").read_text())
    assert got["trainer"] == "trl-sft" and got["model_kind"] == "vlm"
    for stage_ref, stage_got in zip(expected["stages"], got["stages"], strict=True):
        name = stage_ref["name"]
        assert stage_got["status"] == "done" and stage_got["global_step"] == 4 and stage_got["dropped"] == {}
        losses = lambda run: [e["loss"] for e in log_history(run / name / "checkpoints" / "checkpoint-4") if "loss" in e]  # noqa: E731
        assert losses(resumed) == pytest.approx(losses(reference), abs=1e-4)
        assert losses(reference)[-1] < losses(reference)[0], (name, losses(reference))
        ref_weights, got_weights = adapter_weights(reference / name / "adapter"), adapter_weights(resumed / name / "adapter")
        assert ref_weights.keys() == got_weights.keys()
        assert all(torch.allclose(ref_weights[k], got_weights[k], atol=1e-5) for k in ref_weights)
        assert all(".language_model." in key for key in ref_weights)  # LoRA on the language model only
    # The image budget is on the processor saved beside the adapter, so serving sees images as training did.
    saved = AutoProcessor.from_pretrained(resumed / "adapter").image_processor
    if family == "internvl":
        assert got["image_budget"] == {"max_patches": 6} and saved.max_patches == 6
    else:
        assert got["image_budget"] == {"min_pixels": 64, "max_pixels": 1024}
        assert (saved.size.shortest_edge, saved.size.longest_edge) == (64, 1024)


@NEEDS_TORCHVISION
def test_the_image_budget_sets_internvl_tiles_and_qwen_pixels(family_model, tmp_path):
    from PIL import Image

    from training.modeling import apply_image_budget

    wide = tmp_path / "wide.png"
    Image.new("RGB", (64, 32), (200, 30, 30)).save(wide)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]

    def image_tokens(processor, token: str) -> int:
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = processor(text=[prompt], images=[[Image.open(wide).convert("RGB")]], return_tensors="pt")["input_ids"]
        return int((ids == processor.tokenizer.convert_tokens_to_ids(token)).sum())

    internvl = load_processing_class(str(family_model("internvl")), "vlm")
    assert image_tokens(internvl, "<IMG_CONTEXT>") == 9 * 4  # the processor's default 12 tiles: 4x2 + thumbnail
    assert apply_image_budget(internvl, max_tiles=6) == {"max_patches": 6}
    assert image_tokens(internvl, "<IMG_CONTEXT>") == 3 * 4  # at most 6: 2x1 + thumbnail
    with pytest.raises(TrainingConfigError, match="pixel budget.*GotOcr2ImageProcessor.*image_max_tiles"):
        apply_image_budget(internvl, max_tiles=6, max_pixels=4096)

    qwen = load_processing_class(str(family_model("qwen2_5_vl")), "vlm")
    assert image_tokens(qwen, "<|image_pad|>") == 10  # 64x32 resized to 40x16 (max_pixels 1024): 10 tokens of 8x8
    assert apply_image_budget(qwen, max_tiles=6, max_pixels=256) == {"min_pixels": 64, "max_pixels": 256}
    assert image_tokens(qwen, "<|image_pad|>") == 2  # at most 256 pixels: 16x8


def test_pixel_settings_on_a_model_without_a_pixel_budget_are_refused(tiny_vlm, curriculum, tmp_path):
    with pytest.raises(TrainingConfigError, match="image_max_pixels apply to processors with a pixel budget"):
        run_curriculum(tiny_config(tiny_vlm, curriculum, tmp_path / "run", image_max_pixels=1024))


# --- DDP's search for unused parameters ------------------------------------------------------------------------


def unused_parameter_search(config) -> list:
    """``ddp_find_unused_parameters`` as each stage's trainer got it (after TRL's own choice)."""
    from transformers import TrainerCallback

    seen = []

    class SeeTheArguments(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append(args.ddp_find_unused_parameters)

    run_curriculum(config, callbacks=[SeeTheArguments()])
    return seen


def test_ddp_looks_for_unused_parameters_only_when_lora_leaves_the_language_model(tiny_vlm, curriculum, tmp_path):
    """Stage 1 mixes text-only and image samples: a text batch skips the vision tower, which is frozen, so with LoRA
    on the language model alone nothing trainable goes unused. (The two-process run above trains it that way.)"""
    from transformers import AutoModelForImageTextToText

    from training.curriculum import _lora_config
    from training.modeling import trained_outside_language_model

    quick = dict(max_steps=1, save_steps=1)
    default = tiny_config(tiny_vlm, curriculum, tmp_path / "auto", stages=["stage1", "stage2"], **quick)
    assert unused_parameter_search(default) == [False, False]  # stage 2 carries stage 1's adapter on
    # Leaf names that the vision tower's attention has too (CLIP's q_proj, v_proj): TRL's choice stands (on).
    vision_too = tiny_config(
        tiny_vlm, curriculum, tmp_path / "names", stages=["stage1"], lora_target_modules=["q_proj", "v_proj"], **quick
    )
    assert unused_parameter_search(vision_too) == [True]
    # A user's pattern that stays inside the language model is as safe as the default.
    language_only = tiny_config(
        tiny_vlm,
        curriculum,
        tmp_path / "regex",
        stages=["stage1"],
        lora_target_modules=r".*language_model\..*\.(q_proj|v_proj)$",
        **quick,
    )
    assert unused_parameter_search(language_only) == [False]
    # The user's own setting wins over both.
    own = tiny_config(
        tiny_vlm,
        curriculum,
        tmp_path / "own",
        stages=["stage1"],
        extra_training_args={"ddp_find_unused_parameters": True},
        **quick,
    )
    assert unused_parameter_search(own) == [True]

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    reached = trained_outside_language_model(model, _lora_config(vision_too, model))
    assert reached and all(name.startswith("model.vision_tower.") for name in reached)
    all_linear = tiny_config(tiny_vlm, curriculum, tmp_path / "x", lora_target_modules="all-linear")
    assert trained_outside_language_model(model, _lora_config(all_linear, model))  # reaches the vision tower too
    assert trained_outside_language_model(model, _lora_config(default, model)) == []


# --- sharded parameters with mixed stages, and runs of the earlier trainer ----------------------------------------


def test_zero3_or_fsdp_on_a_stage_that_mixes_text_and_images_is_refused(tmp_path, curriculum, monkeypatch):
    """Refused at the start, before any model loads (the base model here does not even exist)."""
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    missing_model = tmp_path / "no-model"
    with pytest.raises(
        TrainingConfigError, match=r"ZeRO-3 .*would hang.*stage1 \(2 with images, 2 text-only\).*ZeRO-1 or ZeRO-2"
    ):
        run_curriculum(tiny_config(missing_model, curriculum, tmp_path / "out", deepspeed=str(zero3)))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(TrainingConfigError, match=r"FSDP \(accelerate launch.*stage1 \(2 with images"):
        run_curriculum(tiny_config(missing_model, curriculum, tmp_path / "out"))
    # Stages of one kind each do not hang: the check lets them through (to the missing model here).
    text_only = tiny_models.build_curriculum(tmp_path / "text-curriculum", with_images=False)
    with pytest.raises(ModelLoadError):
        run_curriculum(tiny_config(missing_model, text_only, tmp_path / "out"))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    zero1 = tmp_path / "zero1.json"
    zero1.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(ModelLoadError):
        run_curriculum(tiny_config(missing_model, curriculum, tmp_path / "out", deepspeed=str(zero1)))


def test_a_run_the_earlier_trainer_started_is_refused_unless_allowed(tiny_vlm, curriculum, tmp_path):
    from training.manifest import Manifest

    output = tmp_path / "old-run"
    output.mkdir()
    old = {  # what the version with its own collator wrote: format 1, no trainer
        "format": 1,
        "base_model": str(tiny_vlm),
        "model_kind": "vlm",
        "stages": [{"name": "stage1", "status": "running", "checkpoint": "stage1/checkpoints/checkpoint-2"}],
        "final": None,
    }
    (output / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ManifestError, match=r"earlier version.*cut answers.*new output_dir.*--allow-trainer-change"):
        run_curriculum(tiny_config(tiny_vlm, curriculum, output))
    manifest = Manifest.open(output, base_model=str(tiny_vlm), model_kind="vlm", allow_trainer_change=True)
    assert manifest.data["trainer"] == "trl-sft" and manifest.data["format"] == 2
    assert manifest.data["trainer_changes"][0]["from"] == "transformers-trainer"
    # A format-1 manifest of a run that never started a stage is simply taken over.
    (output / "manifest.json").write_text(json.dumps({**old, "stages": []}))
    assert Manifest.open(output, base_model=str(tiny_vlm), model_kind="vlm").data["trainer"] == "trl-sft"


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


def test_an_unreadable_image_names_the_sample(tiny_vlm, tmp_path, curriculum):
    broken = tmp_path / "curriculum"
    shutil.copytree(curriculum, broken)
    (broken / "stage3" / "images" / "grey.png").write_bytes(b"not a png")
    config = tiny_config(tiny_vlm, broken, tmp_path / "out", stages=["stage3"])
    with pytest.raises(StageDataError, match=r"Sample 'cgrey-cot2': cannot read image .*grey.png"):
        run_curriculum(config)


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
    with pytest.raises(TrainingConfigError, match=r"extra_training_args.max_length: set by the curriculum"):
        load_config(None, base_model="m", curriculum_dir="c", extra_training_args={"max_length": 512})

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
    assert (config.weight_decay, config.image_max_tiles) == (0.05, 6)  # the published 8B script
    assert load_config(None, base_model="m", curriculum_dir="c").weight_decay == 0.05  # the default too
    small = load_config(REPO / "training" / "configs" / "curriculum_internvl3_2b.yaml", curriculum_dir=str(tmp_path))
    assert (small.base_model, small.weight_decay, small.image_max_tiles) == ("OpenGVLab/InternVL3-2B-hf", 0.01, 6)
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
        "--allow-trainer-change",
        "--image-max-tiles",
        "--image-max-pixels",
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
    assert main(["--config", str(config_file), "--image-max-tiles", "0"]) == 2
    assert "image_max_tiles: must be at least 1" in capsys.readouterr().err
    assert main(["--config", str(config_file), "--image-max-pixels", "many"]) == 2
    assert "image_max_pixels: expected int" in capsys.readouterr().err
