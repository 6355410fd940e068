"""The grpo stage on tiny Qwen2.5-VL and LLaVA models on CPU, run as the curriculum runs every stage
(``run_curriculum`` on a config whose ``stages:`` hold a grpo entry): TRL's own generation, several completions per
prompt, our rewards logged apart, the adapter moving, the manifest and model card, a hard kill and an exact resume,
and the demo's dataset through SFT, DPO and GRPO stages in one recipe.

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
from tests.test_training import REPO, adapter_weights, log_history  # noqa: E402
from training import StageDataError, TrainingConfigError, load_config, run_curriculum  # noqa: E402
from training.grpo import check_grpo_model, read_grpo_file  # noqa: E402
from training.pairs import read_pairs_file  # noqa: E402
from training.rewards import GraderRewards  # noqa: E402

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
START_BIAS = {"qwen2_5_vl": 3.0, "llava": 5.0}


def answer_bias(base: Path) -> list:
    """transformers' sequence_bias towards "\\n### The final answer is: red": a nudge to start it, a push to go on."""
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(base).tokenizer
    ids = tokenizer("\n" + final_answer_line("red"), add_special_tokens=False)["input_ids"]
    start = START_BIAS[base.name.removeprefix("tiny-")]
    return [[ids[: index + 1], 8.0 if index else start] for index in range(len(ids))]


def grpo_stage(data: Path, **overrides) -> dict:
    """A grpo entry of ``stages:``: four completions per prompt, a short completion, a high learning rate."""
    values = dict(num_generations=4, max_completion_length=16, learning_rate=5e-2, warmup_ratio=0.0)
    return dict(name="grpo", kind="grpo", data=str(data), **{**values, **overrides})


def grpo_config(base: Path, curriculum: Path, output: Path, stage: dict | None = None, **overrides):
    values = dict(
        base_model=str(base),
        curriculum_dir=str(curriculum),
        output_dir=str(output),
        stages=[stage or grpo_stage(curriculum / "stage3" / "messages.jsonl")],
        max_steps=4,
        global_batch_size=4,
        per_device_train_batch_size=4,
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


def stage_entry(output: Path) -> dict:
    [entry] = json.loads((output / "manifest.json").read_text())["stages"]
    return entry


def reward_history(output: Path) -> list[dict]:
    """The grpo stage's logged steps, from its last checkpoint."""
    return [entry for entry in log_history(output / stage_entry(output)["checkpoint"]) if "reward" in entry]


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


def test_settings_that_cannot_work_are_refused_naming_the_field(curriculum):
    stage = grpo_stage(curriculum / "stage3", rewards=["accuracy", "length"], reward_weights=[1.0],
                       max_completion_length=9000, loss_type="ppo", temperature=0)
    with pytest.raises(TrainingConfigError) as raised:
        load_config(None, base_model="unused", curriculum_dir=str(curriculum), global_batch_size=6, stages=[stage])
    for expected in ("stages[grpo].rewards", "stages[grpo].reward_weights: one weight per reward",
                     "stages[grpo].global_batch_size: 6 completions per step is not a multiple of num_generations 4",
                     "stages[grpo].max_completion_length: 9000 leaves no room", "stages[grpo].loss_type",
                     "stages[grpo].temperature"):
        assert expected in str(raised.value)
    with pytest.raises(TrainingConfigError, match=r"stages\[grpo\].num_generations: at least 2"):
        load_config(None, base_model="unused", curriculum_dir=str(curriculum),
                    stages=[grpo_stage(curriculum / "stage3", num_generations=1)])


def test_extra_training_args_reach_the_stages_whose_trainer_takes_them():
    from training.grpo import grpo_extra_arguments, grpo_only_arguments

    # vLLM and sampling fields are the grpo stage's; an SFT-only field is the sft stages'; a field the stage owns
    # or one no trainer has is refused, naming it.
    assert grpo_extra_arguments({"use_vllm": True, "packing": False, "optim": "adamw_torch"}) == {
        "use_vllm": True, "optim": "adamw_torch"}
    assert {"use_vllm", "vllm_mode", "generation_kwargs"} <= grpo_only_arguments()
    assert not {"optim", "packing", "max_length"} & grpo_only_arguments()
    with pytest.raises(TrainingConfigError) as raised:
        grpo_extra_arguments({"num_generations": 2, "use_vlm": True})
    assert "extra_training_args.num_generations: set by the grpo stage" in str(raised.value)
    assert "extra_training_args.use_vlm: not a TrainingArguments, SFTConfig, DPOConfig or GRPOConfig field" in str(
        raised.value
    )


def test_the_unscored_count_survives_a_resume():
    """The count of completions a judge outage left out goes into the log history before every checkpoint and on every
    log, over the whole stage: a resumed stage starts from what its checkpoint holds."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from training.grpo import UNSCORED, _unscored_callback, grpo_metrics

    rewards = GraderRewards()
    callback = _unscored_callback(rewards)
    args = SimpleNamespace(device="cpu")
    state, control = TrainerState(), TrainerControl()
    state.log_history = [{"reward": 0.5, "step": 1, UNSCORED: 3}]  # as the checkpoint the stage resumes from holds it
    callback.on_train_begin(args, state, control)
    rewards.counts["unscored"] += 2  # completions left out after the resume
    state.global_step, control.should_save = 2, True  # a checkpoint with no log at its step
    callback.on_step_end(args, state, control)
    assert state.log_history[-1] == {UNSCORED: 5, "step": 2}
    control.should_save = False
    callback.on_step_end(args, state, control)  # no checkpoint, no entry
    assert len(state.log_history) == 2
    rewards.counts["unscored"] += 1
    state.log_history.append({"reward": 0.25, "step": 3})  # Trainer.log appends, then calls on_log
    callback.on_log(args, state, control, logs={"reward": 0.25})
    assert state.log_history[-1][UNSCORED] == 6
    assert grpo_metrics(state.log_history)["unscored_completions"] == 6


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


def test_the_shipped_grpo_config_runs_the_curriculum_then_dpo_then_grpo():
    import re

    import yaml

    from training.grpo import grpo_extra_arguments

    path = REPO / "training" / "configs" / "curriculum_grpo.yaml"
    config = load_config(path)
    assert [(stage.name, stage.kind) for stage in config.resolved_stages] == [
        ("stage1", "sft"), ("stage2", "sft"), ("stage3", "sft"), ("steps", "dpo"), ("grpo", "grpo")
    ]
    grpo = config.resolved_stages[-1]
    assert grpo.data.parts[-2:] == ("stage3", "messages.jsonl")
    settings = config.stage_settings(grpo)
    assert (settings.num_generations, settings.global_batch_size, settings.learning_rate) == (8, 64, 1e-5)
    # The vLLM blocks the comments offer (one GPU colocated, eight GPUs with a server) are GRPOConfig fields.
    blocks = re.findall(r"^# extra_training_args:\n((?:#   .*\n)+)", path.read_text(), re.MULTILINE)
    modes = []
    for block in blocks:
        extra = yaml.safe_load(block.replace("#   ", ""))
        assert grpo_extra_arguments(extra) == extra
        modes.append(extra["vllm_mode"])
    assert modes == ["colocate", "server"]


# --- the stage on tiny models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_model", FAMILIES, indirect=True)
def test_the_stage_trains_the_adapter_on_our_rewards(family_model, curriculum, workdir):
    family, base = family_model
    output = workdir / f"run-{family}"
    run_curriculum(grpo_config(base, curriculum, output))

    entry = stage_entry(output)
    assert (entry["kind"], entry["status"], entry["global_step"]) == ("grpo", "done", 4)
    assert entry["data"] == str(curriculum / "stage3" / "messages.jsonl")
    assert (entry["rows"], entry["samples"], entry["trained_prompts"]) == (4, 2, 2)
    assert entry["left_out"] == {"no_reference": 1, "repeat": 1} and entry["dropped"] == {}
    assert entry["checkpoint"] == "grpo/checkpoints/checkpoint-4"
    settings = entry["hyperparameters"]
    assert (settings["num_generations"], settings["rewards"], settings["learning_rate"]) == (
        4, ["accuracy", "format"], 5e-2)
    rewards = entry["rewards"]
    assert rewards["grader_version"] >= 3 and (rewards["judge"], rewards["open_answers"]) == (None, "recall")
    reward_weights = {name: function["weight"] for name, function in rewards["functions"].items()}
    assert reward_weights == {"accuracy": 1.0, "format": 1.0}

    steps = reward_history(output)
    assert [step["step"] for step in steps] == [1, 2, 3, 4]
    # Each reward logged apart, with the grader's extra metrics and the running count of unscored completions.
    for step in steps:
        assert {"rewards/accuracy/mean", "rewards/format/mean", "accuracy/unscored", "accuracy/by_judge"} <= set(step)
        assert step["accuracy/unscored"] == 0.0 and step["rewards/unscored_completions"] == 0
    # The bias makes some completions right and some not: there was something to learn from ...
    assert any(step["reward_std"] > 0 for step in steps)
    assert max(step["rewards/accuracy/mean"] for step in steps) > 0
    metrics = entry["metrics"]
    assert metrics["unscored_completions"] == 0
    assert metrics["first_logged_accuracy_reward"] == steps[0]["rewards/accuracy/mean"]
    assert metrics["last_logged_format_reward"] == steps[-1]["rewards/format/mean"]
    # ... and the adapter moved (weight decay is off: only the rewards' gradients move it); it is the run's final one.
    weights = adapter_weights(output / "grpo" / "adapter")
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in weights.items())
    final = adapter_weights(output / "adapter")
    assert all(torch.equal(final[name], weights[name]) for name in weights)
    card = (output / "README.md").read_text()
    assert "| grpo | grpo | done |" in card
    assert "accuracy (weight 1)" in card and "format (weight 1)" in card and "open answers by recall" in card
    assert f"grader version {rewards['grader_version']}" in card and "0 completions left out" in card
    print(f"{family}: {metrics['train_runtime'] / 4:.2f} s per step")


@pytest.mark.parametrize("family_model", FAMILIES[:1], indirect=True)
def test_a_stage_continues_a_given_adapter_and_survives_a_judge_outage(
    family_model, curriculum, workdir, tmp_path, monkeypatch
):
    """Runnable from a given adapter (init_adapter: here the previous test's); the judge is out for every open answer:
    those completions are left out, counted and logged, and the stage finishes its steps."""
    from mics_agents import load_settings

    family, base = family_model
    previous = workdir / f"run-{family}" / "grpo" / "adapter"
    if not previous.is_dir():
        pytest.fail("test_the_stage_trains_the_adapter_on_our_rewards[qwen2_5_vl] must run first (same module)")

    def out(request):
        raise ModelCallError("judge: timed out", model="judge")

    made: list[GraderRewards] = []

    class JudgeOutRewards(GraderRewards):
        """The stage's rewards with a judge that always times out, in place of the named judge."""

        def __init__(self, judge: str = "") -> None:
            settings = load_settings(cache_path=tmp_path / "cache.sqlite", max_retries=0)
            super().__init__(settings=settings, judge_model=FunctionModel(judge, out))
            made.append(self)

    monkeypatch.setattr("training.grpo.GraderRewards", JudgeOutRewards)
    output = tmp_path / "run"
    stage = grpo_stage(curriculum / "stage3" / "messages.jsonl", judge="judge")
    run_curriculum(grpo_config(base, curriculum, output, stage=stage, max_steps=2, init_adapter=str(previous)))

    [rewards] = made
    entry = stage_entry(output)
    assert entry["status"] == "done" and entry["global_step"] == 2
    assert rewards.counts["unscored"] > 0  # "red <more tokens>" is not exact: the judge was asked, and was out
    assert entry["metrics"]["unscored_completions"] == rewards.counts["unscored"]
    assert any(step["accuracy/unscored"] > 0 for step in reward_history(output))
    assert (entry["rewards"]["judge"], entry["rewards"]["open_answers"]) == ("judge", "judge")
    assert rewards._resources == []  # the judge and store were closed at the end
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["init_adapter"]["path"] == str(previous)
    # The given adapter went on (no 'ref' copy kept).
    assert set(adapter_weights(previous)) == set(adapter_weights(output / "grpo" / "adapter"))
    card = (output / "README.md").read_text()
    assert "open answers by the judge `judge`" in card
    assert f"{rewards.counts['unscored']} completions left out" in card


# --- a hard kill mid-stage, then resume -------------------------------------------------------------------------


@pytest.mark.parametrize("family_model", FAMILIES[:1], indirect=True)
def test_a_killed_stage_resumes_to_the_same_steps_and_weights(family_model, curriculum, workdir, tmp_path):
    from tests.test_training import KILLER

    family, base = family_model
    reference = workdir / f"run-{family}"  # the uninterrupted run of the first test, same settings
    if not (reference / "grpo" / "adapter").is_dir():
        pytest.fail("test_the_stage_trains_the_adapter_on_our_rewards[qwen2_5_vl] must run first (same module)")
    resumed = tmp_path / "resumed"
    config_file = tmp_path / "grpo.yaml"
    config_file.write_text(json.dumps(grpo_config(base, curriculum, resumed).to_dict()))
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILL_STAGE": "grpo", "KILL_AT_STEP": "3"}

    killed = subprocess.run([sys.executable, str(killer), "--config", str(config_file)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-3000:]
    entry = stage_entry(resumed)
    assert (entry["status"], entry["checkpoint"]) == ("running", "grpo/checkpoints/checkpoint-2")
    assert not (resumed / "grpo" / "adapter").exists()

    rerun = subprocess.run([sys.executable, "-m", "training", "--config", str(config_file)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {resumed / 'grpo' / 'checkpoints' / 'checkpoint-2'}" in rerun.stderr

    # The steps before the kill come back from the checkpoint as they were, and the steps after it sample the same
    # prompts and completions as the uninterrupted run: the same rewards, schedule and final adapter.
    got, expected = reward_history(resumed), reward_history(reference)
    assert [step["step"] for step in got] == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "rewards/accuracy/mean", "rewards/format/mean", "learning_rate", "loss"):
        assert [step[key] for step in got] == pytest.approx([step[key] for step in expected], abs=1e-6), key
    assert stage_entry(resumed)["metrics"]["unscored_completions"] == 0
    final, uninterrupted = adapter_weights(resumed / "grpo" / "adapter"), adapter_weights(reference / "grpo" / "adapter")
    assert final.keys() == uninterrupted.keys()
    assert all(torch.allclose(final[name], uninterrupted[name], atol=1e-6) for name in final)


# --- the whole recipe on the demo's dataset -------------------------------------------------------------------------


def test_the_demos_dataset_trains_sft_stages_then_dpo_then_grpo(tmp_path):
    """Issue 27's recipe: `mics demo`'s dataset through `python -m training`: SFT stages, the dpo stage on its step
    pairs, then the grpo stage on stage3's checkable items, one step each. The grpo stage's sampling settings in
    extra_training_args leave the sft and dpo stages alone."""
    demo = subprocess.run(
        [sys.executable, "-m", "mics_agents", "demo", "--cache", ""], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    curriculum = tmp_path / "mics_demo_output_dataset"
    prompts = read_grpo_file(curriculum / "stage3" / "messages.jsonl", stage="grpo").samples
    pairs = read_pairs_file(curriculum / "steps" / "pairs.jsonl", stage="steps").pairs
    assert prompts and pairs, "the demo made no checkable stage3 rows or no step pairs"
    texts = [item.question for item in prompts] + [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    base = tiny_models.build_tiny_vlm(tmp_path / "tiny-llava", extra_texts=texts)
    stages = ["stage2", "stage3", {"name": "steps", "kind": "dpo"},
              {"name": "grpo", "kind": "grpo", "num_generations": 2, "max_completion_length": 8}]
    config = grpo_config(base, curriculum, tmp_path / "run", stages=stages, max_steps=1, global_batch_size=2,
                         per_device_train_batch_size=2, max_length=2048)
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text(json.dumps(config.to_dict()))
    run = subprocess.run([sys.executable, "-m", "training", "--config", str(config_file)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [(s["name"], s["kind"], s["status"], s["global_step"]) for s in manifest["stages"]] == [
        ("stage2", "sft", "done", 1), ("stage3", "sft", "done", 1), ("steps", "dpo", "done", 1),
        ("grpo", "grpo", "done", 1),
    ]
    grpo = manifest["stages"][-1]
    assert grpo["data"] == str(curriculum / "stage3" / "messages.jsonl") and grpo["trained_prompts"] == len(prompts)
    assert "rewards/accuracy/mean" in log_history(tmp_path / "run" / grpo["checkpoint"])[-1]
    # Each stage continued the one before: the grpo stage's adapter is the run's final adapter.
    final, grpo_adapter = (adapter_weights(tmp_path / "run" / folder) for folder in ("adapter", "grpo/adapter"))
    assert final.keys() == adapter_weights(tmp_path / "run" / "stage2" / "adapter").keys()
    assert all(torch.equal(final[name], grpo_adapter[name]) for name in final)
