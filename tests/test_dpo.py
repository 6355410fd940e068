"""The preference stage (kind: dpo) on tiny models made on the spot: CPU, offline, a few steps.

LLaVA runs everywhere; Qwen2.5-VL needs torchvision for its processor and is skipped, saying so, where it does not load.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from tests import tiny_models  # noqa: E402
from tests.test_training import KILLER, REPO, adapter_weights, log_history, tiny_config  # noqa: E402
from training import StageDataError, TrainingConfigError, load_config, run_curriculum  # noqa: E402
from training.dpo import SEPARATOR, pair_dataset, preference_collator  # noqa: E402
from training.errors import DataChangedError, ManifestError  # noqa: E402
from training.modeling import load_processing_class  # noqa: E402
from training.pairs import read_pairs_file  # noqa: E402

NEEDS_TORCHVISION = pytest.mark.skipif(
    not tiny_models.has_torchvision(), reason="the Qwen2.5-VL processor needs torchvision built for the installed torch"
)
FAMILIES = [pytest.param("llava", id="llava"), pytest.param("qwen2_5_vl", id="qwen2_5_vl", marks=NEEDS_TORCHVISION)]
# The start of a step, the image tokens and the end of a turn in each family's rendering.
IMAGE_TOKENS = {"llava": "<image>", "qwen2_5_vl": "<|image_pad|>"}
END_OF_TURN = {"llava": "</s>", "qwen2_5_vl": "<|im_end|>"}
GENERATION_PROMPT = {"llava": "<|assistant|>", "qwen2_5_vl": "<|im_start|>assistant\n"}
LN2 = math.log(2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dpo")


@pytest.fixture(scope="module")
def curriculum(workdir) -> Path:
    root = tiny_models.build_curriculum(workdir / "curriculum")
    tiny_models.build_step_pairs(root)
    return root


@pytest.fixture(scope="module")
def models(workdir):
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny_models.FAMILIES[family](workdir / f"tiny-{family}")
        return built[family]

    return get


def dpo_config(base: Path, curriculum: Path, output: Path, **overrides):
    values = dict(
        stages=["stage3", {"name": "steps", "kind": "dpo", "max_steps": 4}],
        max_steps=3,
        dpo_learning_rate=2e-2,
        dpo_warmup_ratio=0.0,
        max_length=256,
    )
    values.update(overrides)
    return tiny_config(base, curriculum, output, **values)


@pytest.fixture(scope="module")
def sft_then_dpo(workdir, models, curriculum) -> Path:
    """An SFT stage then a DPO stage on the tiny LLaVA, in one run."""
    output = workdir / "sft-then-dpo"
    run_curriculum(dpo_config(models("llava"), curriculum, output))
    return output


# --- what TRL's preference collator makes of a batch ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_chosen_and_rejected_steps_count_in_the_loss(family, models, curriculum):
    """Depth 1 and depth 2 pairs, one and two images, in one batch through TRL's preference collator: the tokens that
    count are exactly the step, never the question, the images or the path so far, and no end of turn follows."""
    from training.dpo import iter_side_lengths

    processor = load_processing_class(str(models(family)), "vlm")
    tokenizer = processor.tokenizer
    pairs = read_pairs_file(curriculum / "steps" / "pairs.jsonl", stage="steps").pairs
    batch = preference_collator(processor)(list(pair_dataset(pairs, processor)))
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[family])
    assert batch["input_ids"].shape[0] == 2 * len(pairs)  # chosen rows, then rejected rows
    lengths = list(iter_side_lengths([pair.side(w) for w in ("chosen", "rejected") for pair in pairs], processor))
    for row in range(2 * len(pairs)):
        pair, which = pairs[row % len(pairs)], ("chosen", "rejected")[row // len(pairs)]
        ids, mask = batch["input_ids"][row], batch["attention_mask"][row].bool()
        counted = batch["completion_mask"][row].bool()
        first = int(counted.nonzero()[0])
        assert tokenizer.decode(ids[counted]) == getattr(pair, which)  # the step, whole, and nothing after it
        assert END_OF_TURN[family] not in tokenizer.decode(ids[counted])
        assert counted[first : int(mask.sum())].all() and not counted[~mask].any()
        assert not counted[ids == image_token].any()
        prompt = tokenizer.decode(ids[:first])
        question = pair.user[-1]["content"][-1]["text"]
        assert question in prompt and prompt.count(IMAGE_TOKENS[family]) >= len(pair.images)
        expected_end = GENERATION_PROMPT[family] + (pair.path + SEPARATOR if pair.path else "")
        assert prompt.endswith(expected_end), (prompt[-80:], expected_end)
        if pair.path:  # one assistant turn: the path is not closed before the step
            assert END_OF_TURN[family] not in prompt[prompt.rindex(GENERATION_PROMPT[family]) :]
        # The length policy counts exactly what the trainer trains on.
        side = lengths[row]
        assert side == [first, int(counted.sum())]


def test_trl_would_split_the_path_and_the_step_into_two_turns(models, curriculum):
    """Why prompts are rendered here: TRL's own rendering of the conversational row closes the path's turn and puts
    the step (with an end of turn) in a second one. Should TRL ever merge them, this test says so."""
    from datasets import load_dataset
    from trl.data_utils import apply_chat_template

    processor = load_processing_class(str(models("llava")), "vlm")
    rows = load_dataset("json", data_files=str(curriculum / "steps" / "pairs.jsonl"), split="train")
    assert set(rows.column_names) >= {"prompt", "chosen", "rejected", "images"}
    continued = next(row for row in rows if row["prompt"][-1]["role"] == "assistant")
    rendered = apply_chat_template(
        {key: continued[key] for key in ("prompt", "chosen", "rejected")}, processor
    )
    assert rendered["chosen"].startswith("</s><|assistant|>") and rendered["chosen"].endswith("</s>")


# --- the stage ----------------------------------------------------------------------------------------------------


def test_an_sft_stage_then_a_dpo_stage_run_end_to_end(sft_then_dpo, curriculum):
    manifest = json.loads((sft_then_dpo / "manifest.json").read_text())
    sft, dpo = manifest["stages"]
    assert (sft["name"], sft["kind"], sft["status"]) == ("stage3", "sft", "done")
    assert (dpo["name"], dpo["kind"], dpo["status"]) == ("steps", "dpo", "done")
    assert dpo["data"] == str(curriculum / "steps" / "pairs.jsonl")
    assert dpo["pairs"] == dpo["trained_pairs"] == 4 and dpo["dropped"] == {} and dpo["images"] == 5
    assert dpo["data_sha256"] == read_pairs_file(curriculum / "steps" / "pairs.jsonl", stage="s").sha256
    assert dpo["global_step"] == 4
    settings = dpo["hyperparameters"]
    assert settings["beta"] == 0.5 and settings["loss_type"] == "sigmoid" and settings["learning_rate"] == 2e-2
    losses = [entry["loss"] for entry in log_history(sft_then_dpo / dpo["checkpoint"]) if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    # The reference is the SFT adapter the stage starts from: policy and reference agree at the first step, so the
    # first loss is exactly ln 2 (against the base model it would not be: the SFT adapter moved the model).
    assert losses[0] == pytest.approx(LN2, abs=1e-4)
    assert losses[-1] < losses[0]
    metrics = dpo["metrics"]
    assert math.isfinite(metrics["rewards/margins"]) and 0 <= metrics["rewards/accuracies"] <= 1
    # The stage continues the SFT adapter and saves its own alone (not TRL's frozen reference copy).
    assert not (sft_then_dpo / "steps" / "adapter" / "ref").exists()
    stage3, steps = adapter_weights(sft_then_dpo / "stage3" / "adapter"), adapter_weights(sft_then_dpo / "steps" / "adapter")
    assert stage3.keys() == steps.keys()
    assert any(not torch.equal(stage3[key], steps[key]) for key in stage3)
    final = adapter_weights(sft_then_dpo / "adapter")
    assert all(torch.equal(final[key], steps[key]) for key in steps)
    card = (sft_then_dpo / "README.md").read_text()
    assert "| steps | dpo | done |" in card and "4 of 4 step preference pairs, beta 0.5" in card
    assert "rewards/accuracies" in card


def test_the_reference_adapter_stays_the_sft_adapter(sft_then_dpo):
    """TRL's frozen copy, saved in each checkpoint, is the SFT adapter at every step."""
    stage3 = adapter_weights(sft_then_dpo / "stage3" / "adapter")
    checkpoint_ref = adapter_weights(sft_then_dpo / "steps" / "checkpoints" / "checkpoint-4" / "ref")
    assert checkpoint_ref.keys() == stage3.keys()
    assert all(torch.equal(checkpoint_ref[key], stage3[key]) for key in stage3)


def test_a_dpo_stage_from_a_given_adapter_matches_the_same_stage_after_sft(sft_then_dpo, models, curriculum, tmp_path):
    config = dpo_config(
        models("llava"),
        curriculum,
        tmp_path / "from-adapter",
        stages=[{"name": "steps", "kind": "dpo", "max_steps": 4}],
        init_adapter=str(sft_then_dpo / "stage3" / "adapter"),
    )
    run_curriculum(config)
    manifest = json.loads((tmp_path / "from-adapter" / "manifest.json").read_text())
    assert manifest["init_adapter"]["path"] == str(sft_then_dpo / "stage3" / "adapter")
    expected, got = adapter_weights(sft_then_dpo / "steps" / "adapter"), adapter_weights(tmp_path / "from-adapter" / "adapter")
    assert all(torch.allclose(expected[key], got[key], atol=1e-6) for key in expected)
    # Another adapter for the same output folder is refused: the run started from this one.
    stages = [{"name": "steps", "kind": "dpo", "max_steps": 4}]
    other = str(sft_then_dpo / "steps" / "adapter")
    with pytest.raises(DataChangedError, match="started from the adapter"):
        run_curriculum(dpo_config(models("llava"), curriculum, tmp_path / "from-adapter", stages=stages, init_adapter=other))


@NEEDS_TORCHVISION
def test_a_dpo_stage_on_qwen2_5_vl(models, curriculum, tmp_path):
    run_curriculum(dpo_config(models("qwen2_5_vl"), curriculum, tmp_path / "qwen", max_steps=2))
    manifest = json.loads((tmp_path / "qwen" / "manifest.json").read_text())
    dpo = manifest["stages"][1]
    assert dpo["status"] == "done" and dpo["trained_pairs"] == 4
    losses = [entry["loss"] for entry in log_history(tmp_path / "qwen" / dpo["checkpoint"]) if "loss" in entry]
    assert losses[0] == pytest.approx(LN2, abs=1e-4) and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]


def test_a_killed_dpo_stage_resumes_to_the_same_adapter(sft_then_dpo, models, curriculum, tmp_path):
    config_file = tmp_path / "config.yaml"
    resumed = tmp_path / "resumed"
    config_file.write_text(json.dumps(dpo_config(models("llava"), curriculum, resumed).to_dict()))
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    env = {**os.environ, "KILL_STAGE": "steps", "KILL_AT_STEP": "3", "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [sys.executable, str(killer), "--config", str(config_file)], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert killed.returncode == 137, killed.stderr[-3000:]
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert [(s["kind"], s["status"]) for s in manifest["stages"]] == [("sft", "done"), ("dpo", "running")]
    assert manifest["stages"][1]["checkpoint"] == "steps/checkpoints/checkpoint-2"
    rerun = subprocess.run(
        [sys.executable, "-m", "training", "--config", str(config_file)], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Stage stage3 is done" in rerun.stderr and "checkpoint-2" in rerun.stderr
    losses = lambda run: [e["loss"] for e in log_history(run / "steps" / "checkpoints" / "checkpoint-4") if "loss" in e]  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(sft_then_dpo), abs=1e-5)
    expected, got = adapter_weights(sft_then_dpo / "steps" / "adapter"), adapter_weights(resumed / "steps" / "adapter")
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[key], got[key], atol=1e-6) for key in expected)


def test_over_long_pairs_are_dropped_and_counted(models, curriculum, tmp_path, caplog):
    """A pair whose chosen step would not fit, and one whose rejected step would not, are both left out and counted;
    max_length is set between the longest normal pair and the long steps, as measured by the collator."""
    from training.dpo import iter_side_lengths

    long_step = "### Step 2: " + " ".join(["compare the colour of the finding with the image."] * 12)
    question = "What colour is the finding?"
    rows = [json.loads(line) for line in (curriculum / "steps" / "pairs.jsonl").read_text().splitlines()]
    rows.append(tiny_models.step_pair("clong", question, ["../images/red.png"], [tiny_models.STEPS["look"]], long_step,
                                      tiny_models.STEPS["wrong"]))
    rows.append(tiny_models.step_pair("clong2", question, ["../images/red.png"], [], tiny_models.STEPS["red"], long_step))
    folder = tmp_path / "curriculum"
    folder.mkdir()
    os.symlink(curriculum / "images", folder / "images")
    tiny_models.write_pairs(folder / "steps", rows)
    pairs = read_pairs_file(folder / "steps" / "pairs.jsonl", stage="steps").pairs
    processor = load_processing_class(str(models("llava")), "vlm")
    measured = [sum(lengths) for lengths in iter_side_lengths([p.side(w) for p in pairs for w in ("chosen", "rejected")], processor)]
    fits = max(measured[:8])
    assert measured[8] > fits and measured[11] > fits and measured[9] <= fits and measured[10] <= fits
    stages = [{"name": "steps", "kind": "dpo", "max_steps": 1}]
    run_curriculum(dpo_config(models("llava"), folder, tmp_path / "run", max_length=fits, stages=stages))
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"][0]
    assert entry["pairs"] == 6 and entry["trained_pairs"] == 4
    assert entry["dropped"] == {"answer_over_max_length": 2} and entry["longest_sequence"] == fits
    dropped = json.loads((tmp_path / "run" / "steps" / "dropped.json").read_text())
    assert dropped["dropped"]["answer_over_max_length"] == ["clong#5", "clong2#6"]
    assert "2 of 6 pairs left out" in caplog.text
    # Nothing fits: an error that says what to change.
    with pytest.raises(StageDataError, match="none of its 6 pairs fits in max_length 20"):
        run_curriculum(dpo_config(models("llava"), folder, tmp_path / "run2", max_length=20, stages=stages))


# --- refusals -----------------------------------------------------------------------------------------------------

GOOD = tiny_models.step_pair("c1", "What colour?", ["../images/red.png"], ["### Step 1: look."], "### Step 2: a.", "### Step 2: b.")


def _broken(**changes):
    row = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None:
            row.pop(key)
        else:
            row[key] = value
    return row


@pytest.mark.parametrize(
    "row, message",
    [
        (_broken(chosen=None), r"'chosen' must be a non-empty list"),
        (_broken(rejected=[{"role": "user", "content": "x"}]), r"'rejected' must be exactly one assistant message"),
        (_broken(chosen=GOOD["chosen"] * 2), r"'chosen' must be exactly one assistant message"),
        (_broken(rejected=GOOD["chosen"]), r"'chosen' and 'rejected' are the same step"),
        (_broken(images=[]), r"'prompt' has 1 image placeholder\(s\) but 'images' has 0"),
        (_broken(images=["../images/nowhere.png"]), r"'images' entry '../images/nowhere.png' not found"),
        (_broken(chosen_score=0.25, rejected_score=0.5), r"'chosen_score' 0.25 is not above 'rejected_score' 0.5"),
        (_broken(chosen_score="high"), r"'chosen_score' must be a number"),
        (_broken(prompt=[GOOD["prompt"][1]]), r"'prompt' must be the user turn"),
        (_broken(prompt=[*GOOD["prompt"], GOOD["prompt"][1]]), r"'prompt' holds more than one assistant message"),
        (_broken(prompt=[GOOD["prompt"][0], {"role": "assistant", "content": [{"type": "image"}]}]),
         r"prompt\[1\].content\[0\] is an image in an assistant message"),
        (_broken(prompt=[{"role": "user", "content": [{"type": "video"}]}]), r"prompt\[0\].content\[0\] has a part of unknown type 'video'"),
        (_broken(chosen=[{"role": "assistant", "content": [{"type": "text", "text": "  "}]}]), r"'chosen' has no text"),
        ("not json", r":1: not valid JSON"),
    ],
)
def test_a_malformed_pairs_row_is_refused_naming_the_field(row, message, curriculum, tmp_path):
    folder = tmp_path / "steps"
    folder.mkdir()
    os.symlink(curriculum / "images", tmp_path / "images")
    (folder / "pairs.jsonl").write_text((row if isinstance(row, str) else json.dumps(row)) + "\n")
    with pytest.raises(StageDataError, match=message) as raised:
        read_pairs_file(folder / "pairs.jsonl", stage="steps")
    assert str(folder / "pairs.jsonl") in str(raised.value)


def test_a_missing_pairs_file_says_how_to_make_it(tmp_path):
    with pytest.raises(StageDataError, match=r"no pairs file at .*mics dataset build writes CURRICULUM/steps/pairs.jsonl"):
        read_pairs_file(tmp_path / "steps" / "pairs.jsonl", stage="steps")


def test_a_text_only_model_is_refused_for_a_dpo_stage(tmp_path, curriculum):
    base = tiny_models.build_tiny_causal_lm(tmp_path / "llama")
    config = load_config(None, base_model=str(base), curriculum_dir=str(curriculum), output_dir=str(tmp_path / "o"),
                         stages=[{"name": "steps", "kind": "dpo"}])
    with pytest.raises(TrainingConfigError, match="'steps' is a dpo stage, but .* is a text-only model"):
        run_curriculum(config)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_a_family_trls_dpo_cannot_score_is_refused():
    """An encoder-decoder model (TRL scores a pair as one decoder-only sequence) and a model without a linear LM
    head are refused before any step, saying why and what to do."""
    from transformers import T5Config, T5ForConditionalGeneration

    from training.dpo import check_dpo_model

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4))
    with pytest.raises(TrainingConfigError, match=r"cannot train T5ForConditionalGeneration: it is an encoder-decoder"):
        check_dpo_model(t5, "steps")
    t5.config.is_encoder_decoder = False
    t5.lm_head = torch.nn.Identity()
    with pytest.raises(TrainingConfigError, match=r"its LM head is Identity, not a linear layer.*remove the dpo stage"):
        check_dpo_model(t5, "steps")


def test_dpo_stage_config(tmp_path, curriculum):
    config = load_config(None, base_model="m", curriculum_dir=str(curriculum),
                         stages=["stage1", {"name": "prefs", "kind": "dpo", "beta": 0.1}])
    sft, dpo = config.resolved_stages
    assert sft.kind == "sft" and dpo.kind == "dpo"
    assert dpo.data == (curriculum / "steps" / "pairs.jsonl").absolute()  # whatever the stage is called
    settings = config.stage_settings(dpo)
    assert (settings.learning_rate, settings.num_train_epochs, settings.warmup_ratio) == (5e-6, 2.0, 0.1)
    assert (settings.beta, settings.loss_type) == (0.1, "sigmoid")
    assert config.stage_settings(sft).learning_rate == 4e-5  # the SFT stages keep theirs
    assert load_config(None, **config.to_dict()).to_dict() == config.to_dict()  # the recorded config reloads
    for stages, message in [
        ([{"name": "x", "kind": "grpo", "beta": -1, "rewards": ["length"]}], r"stages\[x\].rewards"),
        ([{"name": "x", "kind": "ppo"}], "kind must be one of sft, dpo, grpo, not 'ppo'"),
        ([{"name": "x", "beta": 0.1}], r"unknown key\(s\) \['beta'\]; a sft stage"),
        ([{"name": "x", "kind": "dpo", "loss_type": "kto"}], "stages\\[x\\].loss_type: must be one of"),
        ([{"name": "x", "kind": "dpo", "beta": 0}], "stages\\[x\\].beta: must be positive"),
    ]:
        with pytest.raises(TrainingConfigError, match=message):
            load_config(None, base_model="m", curriculum_dir=str(curriculum), stages=stages)
    with pytest.raises(TrainingConfigError, match="init_adapter: no adapter_config.json"):
        load_config(None, base_model="m", curriculum_dir=str(curriculum), init_adapter=str(tmp_path))
    with pytest.raises(TrainingConfigError, match="extra_training_args.beta: set by the curriculum"):
        load_config(None, base_model="m", curriculum_dir=str(curriculum), extra_training_args={"beta": 0.2})


def test_a_started_stage_keeps_its_kind(tmp_path):
    from training.manifest import Manifest

    manifest = Manifest.open(tmp_path, base_model="m", model_kind="vlm")
    manifest.update_stage("steps", status="running", kind="sft")
    manifest.check_kinds({"steps": "sft"})
    with pytest.raises(ManifestError, match="started as a sft stage, but the config now makes it a dpo stage"):
        manifest.check_kinds({"steps": "dpo"})


def test_the_shipped_dpo_config_runs_the_curriculum_then_the_preference_stage():
    config = load_config(REPO / "training" / "configs" / "curriculum_dpo.yaml")
    assert [(stage.name, stage.kind) for stage in config.resolved_stages] == [
        ("stage1", "sft"), ("stage2", "sft"), ("stage3", "sft"), ("steps", "dpo")
    ]
    assert config.resolved_stages[-1].data.parts[-2:] == ("steps", "pairs.jsonl")
    settings = config.stage_settings(config.resolved_stages[-1])
    assert (settings.learning_rate, settings.beta, settings.num_train_epochs, settings.loss_type) == (5e-6, 0.5, 2, "sigmoid")
    assert config.stage_settings(config.resolved_stages[0]).learning_rate == 4e-5


def test_the_demos_dataset_trains_sft_stages_then_the_dpo_stage(tmp_path):
    """`mics demo`'s dataset (the dataset builder's real pairs.jsonl) through SFT stages then the dpo stage."""
    demo = subprocess.run(
        [sys.executable, "-m", "mics_agents", "demo"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    [curriculum] = {path.parent.parent for path in tmp_path.glob("*/steps/pairs.jsonl")}
    pairs = read_pairs_file(curriculum / "steps" / "pairs.jsonl", stage="steps").pairs
    assert pairs, "the demo made no step pairs"
    texts = [pair.path for pair in pairs] + [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    base = tiny_models.build_tiny_vlm(tmp_path / "tiny-llava", extra_texts=texts)
    stages = ["stage2", "stage3", {"name": "steps", "kind": "dpo"}]
    run_curriculum(dpo_config(base, curriculum, tmp_path / "run", stages=stages, max_length=2048, max_steps=2))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [(s["kind"], s["status"]) for s in manifest["stages"]] == [("sft", "done"), ("sft", "done"), ("dpo", "done")]
    dpo = manifest["stages"][-1]
    assert dpo["pairs"] == len(pairs) and dpo["trained_pairs"] == len(pairs) and dpo["dropped"] == {}
    losses = [e["loss"] for e in log_history(tmp_path / "run" / dpo["checkpoint"]) if "loss" in e]
    assert losses and losses[0] == pytest.approx(LN2, abs=1e-4) and all(math.isfinite(loss) for loss in losses)
