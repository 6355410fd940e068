"""The reinforcement stage (``kind: grpo``): TRL's ``GRPOTrainer`` with our grader as its reward.

What TRL is given, and why:

- **Prompts the model was taught with.** The stage reads curriculum stage files (``messages.jsonl``, train side only:
  a folder holding the builder's held-out ``eval.jsonl`` is refused). Each row with a checkable reference becomes one
  prompt: its messages up to the assistant's (the recorded task format, images in place) and the reference from the
  assistant's final-answer line. Rows without a final-answer line (image descriptions) have nothing to check and are
  left out; a source the recipe repeated is one prompt, not several. The rows are conversational prompt-only rows
  for TRL, with their image paths (decoded by ``datasets`` per batch), the question and the reference as columns the
  reward functions receive.
- **Rewards from the grader** (:mod:`training.rewards`): ``accuracy`` and ``format``, each logged apart by TRL
  (``rewards/accuracy/mean``, ``rewards/format/mean``); which run, their weights and the judge are stage settings.
- **The adapter of the stage before.** The model and LoRA config come from :func:`training.curriculum.build_stage_model`
  like every other stage: a carried adapter keeps training; with ``beta > 0`` TRL keeps a frozen copy of it as the
  reference policy (dropped from the saved adapter, as for dpo).
- **Generation by TRL**: ``transformers`` generation by default (what the tests run on CPU); vLLM on GPUs through
  TRL's own settings (``use_vllm``, ``vllm_mode: colocate`` or ``server`` with ``trl vllm-serve``), passed in
  ``extra_training_args``.
- **Nothing cut.** A prompt whose tokens (images included) plus ``max_completion_length`` do not fit in ``max_length``
  is left out and counted by the length policy (:mod:`training.lengths`), measured exactly as the SFT stages measure
  their prompts (the same cache).

- **A resume that goes on as if never stopped.** The curriculum resumes a grpo stage like any other, from its last
  complete checkpoint with the Trainer's RNG state. Two things TRL keeps outside the checkpoint are handled here:
  the prompt order (TRL's sampler draws each epoch's order from a generator carried over from the epochs before, so a
  resumed stage would replay the first epoch's order; each epoch's order is drawn from (seed, epoch) instead) and the
  count of completions a judge outage left out (kept in the log history, which the checkpoint holds). With TRL's own
  generation on the same hardware, and each generation used within one optimizer step (``steps_per_generation`` x
  ``num_iterations`` dividing the gradient accumulation: the defaults), the steps after a resume sample the same
  completions and reach the same adapter as an uninterrupted run (the tests check this). Not exact: vLLM generation
  (its sampling RNG lives in the vLLM engine or server, which no checkpoint holds), and a generation reused across
  optimizer steps (``num_iterations`` > 1, or ``steps_per_generation`` above the accumulation): TRL's micro-step
  counter restarts at 0, so a stage resumed inside such a block generates its completions anew.

Families: TRL's GRPO runs text causal LMs and the vision-language models its own tests cover (Qwen2-VL, Qwen2.5-VL,
LLaVA-NeXT, Gemma 3) plus those ours do (LLaVA, InternVL "-hf"); any other image-text model is refused before a step
runs rather than half run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mics_agents.answers import extract_final_answer
from mics_agents.task_format import strip_task_instruction

from .config import StageSettings
from .data import Sample, read_stage_file
from .errors import StageDataError, TrainingConfigError
from .rewards import REWARD_DEFINITIONS, REWARD_NAMES, GraderRewards

__all__ = [
    "GRPO_VLM_FAMILIES",
    "GRPO_STAGE_DEFAULTS",
    "GRPO_OWNED_ARGUMENTS",
    "GRPOSettings",
    "GRPOItem",
    "GRPOData",
    "GRPOPrepared",
    "read_grpo_file",
    "grpo_records",
    "grpo_dataset",
    "prepare_grpo",
    "check_grpo_model",
    "grpo_config",
    "grpo_only_arguments",
    "grpo_extra_arguments",
    "build_grpo_trainer",
    "grpo_metrics",
    "reward_record",
]

logger = logging.getLogger("training")

# model_type -> name, of the image-text families TRL's GRPO handles (its tests: Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT,
# Gemma 3; ours: LLaVA, Qwen2.5-VL, InternVL "-hf"). Text causal LMs are all supported.
GRPO_VLM_FAMILIES = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "llava": "LLaVA",
    "llava_next": "LLaVA-NeXT",
    "gemma3": "Gemma 3",
    "internvl": "InternVL (-hf)",
}
# Where a grpo stage's defaults differ from the SFT stages' (LoRA RL steps: 10x the full-parameter 1e-6 of
# TRL's GRPOConfig, as for the dpo stage).
GRPO_STAGE_DEFAULTS: dict[str, Any] = {"learning_rate": 1e-5, "warmup_ratio": 0.0}
# GRPOConfig fields a grpo stage sets from its own settings; extra_training_args may not set them.
GRPO_OWNED_ARGUMENTS = (
    "num_generations", "max_completion_length", "temperature", "beta", "loss_type", "reward_weights",
)
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")
# The sft stages' own argument that GRPOConfig does not take: TRL never truncates a GRPO prompt either.
_SFT_ONLY_ARGUMENTS = ("max_length", "completion_only_loss")
_HELD_OUT_MARKER = "eval.jsonl"  # the dataset builder writes it into the held-out test folder only


@dataclass
class GRPOSettings(StageSettings):
    """A grpo stage's hyperparameters: the shared ones plus generation, the GRPO loss and the rewards.

    ``global_batch_size`` counts completions: ``global_batch_size / num_generations`` prompts per optimizer step.
    """

    num_generations: int = field(
        default=8, metadata={"help": "Completions sampled per prompt (the group each is compared with)."}
    )
    max_completion_length: int = field(
        default=1024,
        metadata={"help": "Most tokens a completion may take (steps and the final-answer line); counts toward max_length."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the completions."})
    beta: float = field(
        default=0.0,
        metadata={
            "help": "KL coefficient against the adapter the stage starts from; 0 (TRL's default) keeps no reference."
        },
    )
    loss_type: str = field(default="dapo", metadata={"help": f"TRL's GRPO loss: {', '.join(GRPO_LOSS_TYPES)}."})
    rewards: list[str] = field(
        default_factory=lambda: list(REWARD_NAMES),
        metadata={"help": "Which rewards run: accuracy (the grader), format (one final-answer line at the end)."},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward, in the order of 'rewards'; default 1 each."}
    )
    judge: str = field(
        default="",
        metadata={
            "help": "LiteLLM name of the judge for open answers (cached in MICS_CACHE_PATH, retried as MICS_* say); "
            "empty: open answers are scored by recall."
        },
    )

    def __post_init__(self) -> None:
        self.rewards = [str(name) for name in (self.rewards or [])]
        if self.reward_weights is not None:
            self.reward_weights = [float(weight) for weight in self.reward_weights]

    def problems(self, prefix: str = "") -> list[str]:
        """What is wrong with the grpo-only values, each naming its field."""
        found = []
        unknown = [name for name in self.rewards if name not in REWARD_NAMES]
        if not self.rewards or unknown or len(set(self.rewards)) != len(self.rewards):
            found.append(f"{prefix}rewards: a list of distinct names from {', '.join(REWARD_NAMES)}, not {self.rewards}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            found.append(
                f"{prefix}reward_weights: one weight per reward ({len(self.rewards)}: {', '.join(self.rewards)}), "
                f"not {len(self.reward_weights)}"
            )
        if self.num_generations < 2:
            found.append(f"{prefix}num_generations: at least 2 (each completion is compared with its group)")
        elif self.global_batch_size % self.num_generations:
            found.append(
                f"{prefix}global_batch_size: {self.global_batch_size} completions per step is not a multiple of "
                f"num_generations {self.num_generations}; every prompt's group must fit in one step"
            )
        if self.max_completion_length < 1:
            found.append(f"{prefix}max_completion_length: must be at least 1")
        elif self.max_completion_length >= self.max_length:
            found.append(
                f"{prefix}max_completion_length: {self.max_completion_length} leaves no room for a prompt in "
                f"max_length {self.max_length}"
            )
        if self.temperature <= 0:
            found.append(f"{prefix}temperature: must be positive (GRPO samples its completions)")
        if self.beta < 0:
            found.append(f"{prefix}beta: must be 0 or more")
        if self.loss_type not in GRPO_LOSS_TYPES:
            found.append(f"{prefix}loss_type: one of {', '.join(GRPO_LOSS_TYPES)}, not {self.loss_type!r}")
        return found


# --- data ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GRPOItem:
    """One prompt of a grpo stage: what the model is asked (as it was taught), and the reference to grade against."""

    id: str
    prompt: list[dict[str, Any]]
    images: list[str]
    question: str  # the question inside the task instruction: what the grader parses options from and the judge sees
    answer: str  # the reference: the final answer of the row's target
    sample: Sample  # the row as read, measured by the length policy like an SFT sample


@dataclass
class GRPOData:
    path: Path
    sha256: str
    samples: list[GRPOItem]
    rows: int  # rows in the file
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> rows not made into prompts
    sources: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "data": str(self.path),
            "data_sha256": self.sha256,
            "rows": self.rows,
            "samples": len(self.samples),
            "images": sum(len(item.images) for item in self.samples),
            "sources": dict(self.sources),
            "left_out": dict(self.left_out),
        }


def _text_of(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


def read_grpo_file(path: Path, *, stage: str, check_images: bool = True) -> GRPOData:
    """The prompts of a grpo stage from a curriculum stage file (``messages.jsonl``, read and checked as the sft
    stages read it). Left out, counted by reason: rows whose target has no final-answer line (``no_reference``),
    rows that continue an assistant turn (``continuation``), and repeats of the same prompt and reference
    (``repeat``: the recipe's copies of a source)."""
    path = Path(path)
    if (path.parent / _HELD_OUT_MARKER).is_file():
        raise StageDataError(
            f"Stage {stage!r}: {path} is the held-out test split (its folder holds {_HELD_OUT_MARKER}); a grpo stage "
            "trains on the train side only. Point its 'data' at a stage file (e.g. CURRICULUM/stage3/messages.jsonl)."
        )
    stage_data = read_stage_file(path, stage=stage, check_images=check_images)
    items: list[GRPOItem] = []
    left_out: Counter[str] = Counter()
    seen: set[str] = set()
    for sample in stage_data.samples:
        if sample.prompt[-1]["role"] != "user":
            left_out["continuation"] += 1
            continue
        reference = extract_final_answer(_text_of(sample.completion[-1]))
        if reference is None:
            left_out["no_reference"] += 1
            continue
        identity = json.dumps([sample.prompt, sample.images, reference])
        if identity in seen:
            left_out["repeat"] += 1
            continue
        seen.add(identity)
        items.append(
            GRPOItem(
                id=sample.id,
                prompt=sample.prompt,
                images=list(sample.images),
                question=strip_task_instruction(_text_of(sample.prompt[-1])),
                answer=reference,
                sample=sample,
            )
        )
    sources = Counter(item.sample.source for item in items)
    return GRPOData(
        path=stage_data.path,
        sha256=stage_data.sha256,
        samples=items,
        rows=len(stage_data.samples),
        left_out=dict(sorted(left_out.items())),
        sources=dict(sorted(sources.items())),
    )


def grpo_records(items: Sequence[GRPOItem], *, is_vlm: bool) -> list[dict[str, Any]]:
    """The prompts as TRL's conversational prompt-only rows, with the columns the rewards read."""
    from .sft import stage_records

    rows = stage_records([item.sample for item in items], is_vlm=is_vlm)
    for row, item in zip(rows, items, strict=True):
        del row["completion"]
        row.update(question=item.question, answer=item.answer)
    return rows


def grpo_dataset(items: Sequence[GRPOItem], *, is_vlm: bool) -> Any:
    from datasets import Dataset, Features, Image, List, Value

    if is_vlm:
        part = {"type": Value("string"), "text": Value("string")}
        message = {"role": Value("string"), "content": List(part)}
        extra = {"images": List(Image())}
    else:
        message = {"role": Value("string"), "content": Value("string")}
        extra = {}
    features = Features(
        {"id": Value("string"), "prompt": List(message), **extra, "question": Value("string"), "answer": Value("string")}
    )
    return Dataset.from_list(grpo_records(items, is_vlm=is_vlm), features=features)


@dataclass
class GRPOPrepared:
    """What a grpo stage trains on after the length policy, and what the manifest records about it."""

    dataset: Any
    report: Any  # LengthReport: its max_length is the stage's, each prompt counted with max_completion_length
    unit: str
    images: int
    record: dict[str, Any]


def prepare_grpo(
    data: GRPOData,
    processing_class: Any,
    is_vlm: bool,
    fingerprint: str,
    cache_dir: Path,
    state: Any,
    stage: str,
    settings: GRPOSettings,
) -> GRPOPrepared:
    """The length policy for a grpo stage: a prompt stays when its tokens plus ``max_completion_length`` fit in
    ``max_length`` (``prompt_over_max_length``: the prompt alone fills it; ``answer_over_max_length``: no room for a
    whole completion). Prompts are measured as the sft stages measure theirs, so the sft stages' cache answers."""
    from .lengths import apply_length_policy, stage_lengths

    samples = [item.sample for item in data.samples]
    measured = stage_lengths(
        samples, processing_class, is_vlm=is_vlm, fingerprint=fingerprint, cache_dir=cache_dir, state=state, stage=stage
    )
    budget = {item_id: [lengths[0], settings.max_completion_length] for item_id, lengths in measured.items()}
    report = apply_length_policy(data.samples, budget, settings.max_length)
    return GRPOPrepared(
        dataset=grpo_dataset(report.kept, is_vlm=is_vlm) if report.kept else None,
        report=report,
        unit="prompts",
        images=sum(len(item.images) for item in report.kept),
        record={"trained_prompts": len(report.kept), "rewards": reward_record(settings)},
    )


# --- model, arguments, trainer -------------------------------------------------------------------------------------


def check_grpo_model(model: Any, stage: str) -> None:
    """Refuse, before any step, a model TRL's GRPO does not train: encoder-decoders, and image-text families it
    does not handle (their pixel inputs are not split per completion the way TRL expects)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    model_type = getattr(config, "model_type", "?")
    problem = None
    if getattr(config, "is_encoder_decoder", False):
        problem = "it is an encoder-decoder model; GRPO samples and scores decoder-only completions"
    elif model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in GRPO_VLM_FAMILIES:
        problem = (
            f"TRL's GRPO handles the images of {', '.join(GRPO_VLM_FAMILIES.values())} models, not {model_type!r}"
        )
    if problem:
        raise TrainingConfigError(
            f"Stage {stage!r} (grpo): cannot train {type(inner).__name__}: {problem}. Use a supported base model, or "
            "remove the grpo stage from the config."
        )


def _argument_names(config_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class) if f.init}


@functools.cache
def grpo_only_arguments() -> frozenset[str]:
    """GRPOConfig fields that no other stage's arguments have (vLLM, sampling, the GRPO loss): in
    ``extra_training_args`` they are for the grpo stages, and the sft and dpo stages leave them out."""
    from trl import DPOConfig, GRPOConfig, SFTConfig

    return frozenset(_argument_names(GRPOConfig) - _argument_names(SFTConfig) - _argument_names(DPOConfig))


def grpo_extra_arguments(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The ``extra_training_args`` a grpo stage takes: the GRPOConfig fields among them. SFTConfig or DPOConfig
    fields are the other stages' and left out; a field the stage owns, or one no stage's arguments have, is an
    error naming it."""
    from trl import DPOConfig, GRPOConfig, SFTConfig

    grpo_names = _argument_names(GRPOConfig)
    other_names = _argument_names(SFTConfig) | _argument_names(DPOConfig)
    taken, problems = {}, []
    for key, value in extra.items():
        if key in GRPO_OWNED_ARGUMENTS:
            problems.append(f"extra_training_args.{key}: set by the grpo stage; give it as the stage's {key}")
        elif key in grpo_names:
            taken[key] = value
        elif key not in other_names:
            problems.append(
                f"extra_training_args.{key}: not a TrainingArguments, SFTConfig, DPOConfig or GRPOConfig field"
            )
    if problems:
        raise TrainingConfigError("Invalid training config: " + "; ".join(problems))
    return taken


def grpo_config(arguments: Mapping[str, Any], settings: GRPOSettings, extra: Mapping[str, Any], stage: str) -> Any:
    """TRL's ``GRPOConfig`` from the arguments every stage shares (those the curriculum builds for its sft stages:
    batch, schedule, precision, checkpoints, logging), the stage's GRPO settings and ``extra_training_args``."""
    from trl import GRPOConfig

    problems = settings.problems(f"stages[{stage}].")
    if problems:
        raise TrainingConfigError("Invalid training config: " + "; ".join(problems))
    values = {key: value for key, value in arguments.items() if key not in _SFT_ONLY_ARGUMENTS}
    values.update(log_completions=False)
    values.update(grpo_extra_arguments(extra))
    values.update(
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        beta=settings.beta,
        loss_type=settings.loss_type,
        reward_weights=settings.reward_weights or [1.0] * len(settings.rewards),
        remove_unused_columns=False,  # the rewards read the question and answer columns
    )
    try:
        return GRPOConfig(**values)
    except (TypeError, ValueError, ImportError) as exc:
        raise TrainingConfigError(f"Invalid training arguments for stage {stage!r}: {exc}") from None


UNSCORED = "rewards/unscored_completions"  # the log key of the completions a judge outage left out, so far


def _last_logged(log_history: Sequence[Mapping[str, Any]], key: str) -> Any:
    return next((entry[key] for entry in reversed(log_history) if key in entry), None)


def _unscored_callback(rewards: GraderRewards) -> Any:
    from transformers import TrainerCallback

    class UnscoredCompletions(TrainerCallback):
        """Keeps the count of completions a judge outage left out, over all processes and the whole stage, in the log
        history: on every log entry, and in an entry of its own before a checkpoint that no log precedes. A resumed
        stage starts from the count its checkpoint holds, so the steps trained again after it are not counted twice
        and those before it are not lost. At the end the rewards' judge and store are closed."""

        def __init__(self) -> None:
            self.before = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.before = _last_logged(state.log_history, UNSCORED) or 0

        def total(self, args: Any) -> int:
            import torch

            count = torch.tensor([float(rewards.counts["unscored"])])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                count = count.to(args.device)
                torch.distributed.all_reduce(count)
            return self.before + int(count.item())

        # Every process logs and saves at the same steps, so the collective in total() is reached by all of them.
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if control.should_save and not control.should_log:
                state.log_history.append({UNSCORED: self.total(args), "step": state.global_step})

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            state.log_history[-1][UNSCORED] = self.total(args)  # the entry Trainer.log just appended

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            rewards.close()

    return UnscoredCompletions()


@functools.cache
def _trainer_class() -> type:
    """TRL's ``GRPOTrainer`` with an epoch's prompt order drawn from (seed, epoch).

    TRL's sampler draws each epoch's order from one generator that carries over from the epochs before, and a resumed
    stage builds a new sampler and skips the finished epochs without drawing them: after a resume, epoch k would get
    the first epoch's order. Seeded per epoch (the Trainer calls ``set_epoch`` before each), the order is the same
    whether or not the stage was interrupted."""
    from torch.utils.data import Sampler
    from trl import GRPOTrainer

    class EpochSeededSampler(Sampler):
        def __init__(self, sampler: Any) -> None:
            self.sampler = sampler

        def set_epoch(self, epoch: int) -> None:
            if self.sampler.shuffle and self.sampler.seed is not None:
                self.sampler.generator.manual_seed(self.sampler.seed + epoch)

        def __iter__(self) -> Any:
            return iter(self.sampler)

        def __len__(self) -> int:
            return len(self.sampler)

    class StageGRPOTrainer(GRPOTrainer):
        def _get_train_sampler(self, dataset: Any = None) -> Any:
            return EpochSeededSampler(super()._get_train_sampler(dataset))

    return StageGRPOTrainer


def build_grpo_trainer(
    model: Any,
    args: Any,
    dataset: Any,
    processing_class: Any,
    peft_config: Any,
    callbacks: Sequence[Any],
    *,
    settings: GRPOSettings,
) -> Any:
    """TRL's ``GRPOTrainer`` for a stage: the model and LoRA config :func:`~training.curriculum.build_stage_model`
    made, the rewards of ``settings`` from a :class:`GraderRewards` on ``settings.judge``, whose judge and store close
    when training ends (or by ``trainer.grader_rewards.close()``)."""
    rewards = GraderRewards(settings.judge)
    trainer = _trainer_class()(
        model=model,
        reward_funcs=rewards.functions(settings.rewards),
        args=args,
        train_dataset=dataset,
        processing_class=processing_class,
        peft_config=peft_config,
        callbacks=[*callbacks, _unscored_callback(rewards)],
    )
    trainer.grader_rewards = rewards
    return trainer


def reward_record(settings: GRPOSettings) -> dict[str, Any]:
    """The rewards as the manifest and model card record them: definitions, weights, judge, grader version."""
    from mics_agents.grading import GRADER_VERSION

    weights = settings.reward_weights or [1.0] * len(settings.rewards)
    return {
        "functions": {name: {"weight": weight, "definition": REWARD_DEFINITIONS[name]}
                      for name, weight in zip(settings.rewards, weights, strict=True)},
        "judge": settings.judge or None,
        "open_answers": "judge" if settings.judge else "recall",
        "grader_version": GRADER_VERSION,
    }


def grpo_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """First and last logged mean reward (total and per function) and the completions a judge outage left out."""
    metrics: dict[str, Any] = {}
    keys = ["reward", *(f"rewards/{name}/mean" for name in REWARD_NAMES)]
    for key in keys:
        values = [entry[key] for entry in log_history if key in entry]
        if values:
            label = key.replace("rewards/", "").replace("/mean", "_reward").replace("/", "_")
            metrics[f"first_logged_{label}"], metrics[f"last_logged_{label}"] = values[0], values[-1]
    unscored = _last_logged(log_history, UNSCORED)
    if unscored is not None:
        metrics["unscored_completions"] = unscored
    return metrics
