"""The grpo stage on tiny Qwen2.5-VL and LLaVA models on CPU, through training.grpo: TRL's own generation, several
completions per prompt, our rewards logged apart, the adapter moving, a hard kill and an exact resume.

A random tiny model never writes a final-answer line by chance, so every completion would score 0 and GRPO would have
nothing to learn from. The tests bias TRL's sampling towards the answer line with transformers' ``sequence_bias``
(passed through ``generation_kwargs``, as any GRPOConfig field): some completions then carry it and some do not,
and the rewards differ within a group.
"""

from __future__ import annotations

import json
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

from mics_agents.errors import ModelCallError  # noqa: E402
from mics_agents.models import FunctionModel  # noqa: E402
from mics_agents.task_format import final_answer_line, task_prompt  # noqa: E402
from tests import tiny_models  # noqa: E402
from training import StageDataError, TrainingConfigError, load_config  # noqa: E402
from training.grpo import (  # noqa: E402
    check_grpo_model,
    read_grpo_file,
    stage_settings,
    train_grpo_stage,
)
from training.rewards import GraderRewards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the finding?"
COLOURS = ("red", "green")
NEEDS_TORCHVISION = pytest.mark.skipif(
    not tiny_models.has_torchvision(), reason="the Qwen2.5-VL processor needs torchvision built for the installed torch"
)
FAMILIES = [
    pytest.param("qwen2_5_vl", id="qwen2_5_vl", marks=NEEDS_TORCHVISION),
    pytest.param("llava", id="llava"),
]


def build_grpo_curriculum(root: Path) -> Path:
    """Stage files as the dataset builder writes them: the task prompt, the target ending with the answer line.
    stage3 holds two checkable questions (one repeated, as a recipe ratio repeats a source) and one image
    description (nothing to check); test/ is the held-out split."""
    for colour in COLOURS:
        tiny_models.write_image(root / "images" / f"{colour}.png", colour)

    def qa(sample_id: str, colour: str) -> dict:
        return tiny_models.sample(
            sample_id, "part3_cot", task_prompt(QUESTION), f"### Step 1: look.\n\n{final_answer_line(colour)}",
            [f"../images/{colour}.png"],
        )

    rows = [qa("cred-cot", "red"), qa("cgreen-cot", "green"), qa("cred-cot#1", "red")]
    rows.append(tiny_models.sample("cred-align", "part2_alignment", "Describe the image.", "A red lesion.",
                                   ["../images/red.png"]))
    tiny_models.write_stage(root / "stage3", rows)
    tiny_models.write_stage(root / "test", rows[:1])
    (root / "test" / "eval.jsonl").write_text("{}\n")
    return root


# How hard each tiny model is nudged to start the answer line: enough that some completions of a group carry it
# and some do not (LLaVA's tiny logits are more peaked than Qwen2.5-VL's).
START_BIAS = {"qwen2_5_vl": 3.0, "llava": 6.0}


def answer_bias(base: Path) -> list:
    """transformers' sequence_bias towards "\\n### The final answer is: red": a nudge to start it, a push to go on."""
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(base).tokenizer
    ids = tokenizer("\n" + final_answer_line("red"), add_special_tokens=False)["input_ids"]
    start = START_BIAS[base.name.removeprefix("tiny-")]
    return [[ids[: index + 1], 8.0 if index else start] for index in range(len(ids))]


def grpo_config(base: Path, curriculum: Path, output: Path, **overrides):
    values = dict(
        base_model=str(base),
        curriculum_dir=str(curriculum),
        output_dir=str(output),
        max_steps=4,
        global_batch_size=4,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        warmup_ratio=0.0,
        weight_decay=0.0,  # the adapter moves by the rewards' gradients alone
        max_length=256,
        save_steps=2,
        logging_steps=1,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        extra_training_args={"disable_tqdm": True, "generation_kwargs": {"sequence_bias": answer_bias(base)}},
    )
    values.update(overrides)
    return load_config(None, **values)


def settings_for(config, **overrides):
    values = dict(num_generations=4, max_completion_length=16, learning_rate=5e-2, warmup_ratio=0.0)
    values.update(overrides)
    return stage_settings(config, **values)


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("grpo")


@pytest.fixture(scope="module")
def curriculum(workdir) -> Path:
    return build_grpo_curriculum(workdir / "curriculum")


@pytest.fixture(scope="module")
def family_model(request, workdir) -> tuple[str, Path]:
    family = request.param
    texts = [task_prompt(QUESTION), *(final_answer_line(colour) for colour in COLOURS)] * 30
    return family, tiny_models.FAMILIES[family](workdir / f"tiny-{family}", extra_texts=texts)


# --- data ----------------------------------------------------------------------------------------------------------


def test_the_prompts_are_the_checkable_train_rows_once_each(curriculum):
    data = read_grpo_file(curriculum / "stage3" / "messages.jsonl", stage="grpo")
    assert [(item.id, item.answer) for item in data.samples] == [("cred-cot", "red"), ("cgreen-cot", "green")]
    assert data.left_out == {"no_reference": 1, "repeat": 1}
    # The prompt is the user turn as taught (task instruction and all); the grader sees the question inside it.
    assert data.samples[0].prompt[-1]["content"][-1]["text"] == task_prompt(QUESTION)
    assert data.samples[0].question == QUESTION
    assert data.samples[0].images == [str((curriculum / "images" / "red.png").resolve())]
    with pytest.raises(StageDataError, match="held-out test split"):
        read_grpo_file(curriculum / "test" / "messages.jsonl", stage="grpo")


def test_settings_that_cannot_work_are_refused_naming_the_field(tmp_path, curriculum):
    config = load_config(None, base_model="unused", curriculum_dir=str(curriculum), output_dir=str(tmp_path),
                         global_batch_size=6)
    problems = " ".join(
        stage_settings(config, num_generations=4, rewards=["accuracy", "length"], reward_weights=[1.0],
                       max_completion_length=9000, loss_type="ppo").problems("stages[grpo].")
    )
    for expected in ("stages[grpo].rewards", "reward_weights: one weight per reward", "not a multiple of num_generations",
                     "max_completion_length: 9000 leaves no room", "loss_type"):
        assert expected in problems
    with pytest.raises(TrainingConfigError, match="extra_training_args.num_generations: set by the grpo stage"):
        train_grpo_stage(
            load_config(None, base_model="unused", curriculum_dir=str(curriculum), output_dir=str(tmp_path),
                        extra_training_args={"num_generations": 2}),
            data=curriculum / "stage3" / "messages.jsonl", settings=settings_for(config, num_generations=2),
        )


def test_an_image_text_family_trl_cannot_train_is_refused():
    from transformers import PretrainedConfig

    class Unsupported(torch.nn.Module):
        config = PretrainedConfig()

    model = Unsupported()
    model.config.model_type = "mllama"
    with pytest.raises(TrainingConfigError, match="TRL's GRPO handles the images of Qwen2-VL.*not 'mllama'"):
        check_grpo_model(model, "grpo")
    model.config.model_type = "llama"  # a text causal LM is fine
    check_grpo_model(model, "grpo")


# --- the stage on tiny models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_model", FAMILIES, indirect=True)
def test_the_stage_trains_the_adapter_on_our_rewards(family_model, curriculum, workdir):
    family, base = family_model
    output = workdir / f"run-{family}"
    config = grpo_config(base, curriculum, output)
    result = train_grpo_stage(config, data=curriculum / "stage3" / "messages.jsonl", settings=settings_for(config))

    steps = [entry for entry in result.log_history if "rewards/accuracy/mean" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3, 4] and result.global_step == 4
    # Each reward logged apart, with the grader's extra metrics.
    for entry in steps:
        assert {"rewards/format/mean", "reward", "accuracy/unscored", "accuracy/by_judge"} <= set(entry)
        assert entry["accuracy/unscored"] == 0.0
    # The bias makes some completions right and some not: there was something to learn from ...
    assert any(entry["reward_std"] > 0 for entry in steps)
    assert max(entry["rewards/accuracy/mean"] for entry in steps) > 0
    # ... and the adapter moved (weight decay is off: only the rewards' gradients move it).
    weights = adapter_weights(result.adapter_dir)
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in weights.items())
    assert result.checkpoint == output / "grpo" / "checkpoints" / "checkpoint-4"
    assert result.rewards["grader_version"] >= 3 and result.rewards["open_answers"] == "recall"
    assert set(result.rewards["functions"]) == {"accuracy", "format"}
    assert result.metrics["unscored_completions"] == 0
    print(f"{family}: {result.metrics['train_runtime'] / 4:.2f} s per step")


@pytest.mark.parametrize("family_model", FAMILIES[:1], indirect=True)
def test_a_stage_continues_a_given_adapter_and_survives_a_judge_outage(family_model, curriculum, workdir, tmp_path):
    """Runnable from a given adapter (here the previous test's); the judge is out for every open answer: those
    completions are left out, counted and logged, and the stage finishes its steps."""
    family, base = family_model
    previous = workdir / f"run-{family}" / "grpo" / "adapter"
    if not previous.is_dir():
        pytest.fail("test_the_stage_trains_the_adapter_on_our_rewards[qwen2_5_vl] must run first (same module)")

    def out(request):
        raise ModelCallError("judge: timed out", model="judge")

    config = grpo_config(base, curriculum, tmp_path / "run", max_steps=2)
    from mics_agents import load_settings

    rewards = GraderRewards(
        settings=load_settings(cache_path=tmp_path / "cache.sqlite", max_retries=0),
        judge_model=FunctionModel("judge", out),
    )
    result = train_grpo_stage(
        config, data=curriculum / "stage3" / "messages.jsonl", settings=settings_for(config, judge="judge"),
        previous_adapters=[previous], rewards=rewards,
    )
    assert result.global_step == 2
    assert rewards.counts["unscored"] > 0  # "red <more tokens>" is not exact: the judge was asked, and was out
    assert result.metrics["unscored_completions"] == rewards.counts["unscored"]
    assert any(entry.get("accuracy/unscored", 0) > 0 for entry in result.log_history)
    assert result.rewards["judge"] == "judge"
    assert rewards._resources == []  # the judge and store were closed at the end
    start = adapter_weights(previous)
    assert set(start) == set(adapter_weights(result.adapter_dir))  # the same adapter went on (no 'ref' copy kept)


# --- a hard kill mid-stage, then resume -------------------------------------------------------------------------

KILLER = """
import json, os, sys
from pathlib import Path
from transformers import TrainerCallback
from training import load_config
from training.grpo import stage_settings, train_grpo_stage

class HardExit(TrainerCallback):
    # Dies like a killed process (no cleanup, no final save) in the middle of the stage.
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("KILL_AT_STEP", "0")):
            os._exit(137)

config = load_config(sys.argv[1])
settings = stage_settings(config, **json.loads(sys.argv[2]))
result = train_grpo_stage(config, data=Path(sys.argv[3]), settings=settings, callbacks=[HardExit()])
print(json.dumps({"resumed_from": str(result.resumed_from), "step": result.global_step}))
"""


@pytest.mark.parametrize("family_model", FAMILIES[:1], indirect=True)
def test_a_killed_stage_resumes_to_the_same_steps_and_weights(family_model, curriculum, workdir, tmp_path):
    family, base = family_model
    reference = workdir / f"run-{family}"  # the uninterrupted run of the first test, same settings
    if not (reference / "grpo" / "adapter").is_dir():
        pytest.fail("test_the_stage_trains_the_adapter_on_our_rewards[qwen2_5_vl] must run first (same module)")
    resumed = tmp_path / "resumed"
    config_file = tmp_path / "grpo.yaml"
    config_file.write_text(json.dumps(grpo_config(base, curriculum, resumed).to_dict()))
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    overrides = json.dumps(dict(num_generations=4, max_completion_length=16, learning_rate=5e-2, warmup_ratio=0.0))
    command = [sys.executable, str(killer), str(config_file), overrides, str(curriculum / "stage3" / "messages.jsonl")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILL_AT_STEP": "3"}

    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-3000:]
    checkpoints = resumed / "grpo" / "checkpoints"
    assert sorted(path.name for path in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (resumed / "grpo" / "adapter").exists()

    rerun = subprocess.run(command, env={**env, "KILL_AT_STEP": "0"}, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    outcome = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert outcome == {"resumed_from": str(checkpoints / "checkpoint-2"), "step": 4}

    def history(run: Path) -> list[dict]:
        state = json.loads((run / "grpo" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
        return [entry for entry in state["log_history"] if "reward" in entry]

    # The steps before the kill come back from the checkpoint as they were; the schedule goes on where it stopped.
    got, expected = history(resumed), history(reference)
    assert [entry["step"] for entry in got] == [entry["step"] for entry in expected] == [1, 2, 3, 4]
    assert [entry["reward"] for entry in got[:2]] == pytest.approx([entry["reward"] for entry in expected[:2]])
    assert [entry["learning_rate"] for entry in got] == pytest.approx([entry["learning_rate"] for entry in expected])
    # Steps 3-4 trained after the resume: the final adapter moved on from the checkpoint's. (The completions sampled
    # after a resume are not bit-identical to an uninterrupted run's: TRL's sampling RNG is not part of what the
    # checkpoint restores exactly.)
    at_kill = adapter_weights(checkpoints / "checkpoint-2")
    final = adapter_weights(resumed / "grpo" / "adapter")
    assert set(at_kill) == set(final)
    assert any(not torch.equal(at_kill[name], final[name]) for name in final)
