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

Families: TRL's GRPO runs text causal LMs and the vision-language models its own tests cover (Qwen2-VL, Qwen2.5-VL,
LLaVA-NeXT, Gemma 3) plus those ours do (LLaVA, InternVL "-hf"); any other image-text model is refused before a step
runs rather than half run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mics_agents.answers import extract_final_answer
from mics_agents.task_format import strip_task_instruction

from .config import StageSettings
from .data import Sample, read_stage_file
from .errors import StageDataError, TrainingConfigError
from .rewards import REWARD_DEFINITIONS, REWARD_NAMES, GraderRewards

if TYPE_CHECKING:
    from .config import CurriculumConfig

__all__ = [
    "GRPO_VLM_FAMILIES",
    "GRPO_STAGE_DEFAULTS",
    "GRPO_OWNED_ARGUMENTS",
    "GRPOSettings",
    "GRPOItem",
    "GRPOData",
    "GRPOPrepared",
    "GRPOStageResult",
    "read_grpo_file",
    "grpo_records",
    "grpo_dataset",
    "prepare_grpo",
    "check_grpo_model",
    "grpo_config",
    "split_extra_arguments",
    "build_grpo_trainer",
    "grpo_metrics",
    "reward_record",
    "train_grpo_stage",
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
_STRIPPED_ADAPTER = "ref"  # TRL's frozen reference copy of a carried adapter (beta > 0)


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


def split_extra_arguments(extra: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``extra_training_args`` of a grpo stage as (TrainingArguments fields, GRPOConfig-only fields); anything else
    (an SFT- or DPO-only field) or a field the stage owns is an error naming it."""
    from transformers import TrainingArguments
    from trl import GRPOConfig

    shared_names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    grpo_names = {f.name for f in dataclasses.fields(GRPOConfig) if f.init} - shared_names
    shared, grpo_only, problems = {}, {}, []
    for key, value in extra.items():
        if key in GRPO_OWNED_ARGUMENTS:
            problems.append(f"extra_training_args.{key}: set by the grpo stage; give it as the stage's {key}")
        elif key in shared_names:
            shared[key] = value
        elif key in grpo_names:
            grpo_only[key] = value
        else:
            problems.append(f"extra_training_args.{key}: not a GRPOConfig field")
    if problems:
        raise TrainingConfigError("Invalid training config: " + "; ".join(problems))
    return shared, grpo_only


def grpo_config(arguments: Mapping[str, Any], settings: GRPOSettings, extra: Mapping[str, Any], stage: str) -> Any:
    """TRL's ``GRPOConfig`` from the arguments every stage shares (those the curriculum builds for its sft stages:
    batch, schedule, precision, checkpoints, logging), the stage's GRPO settings and ``extra_training_args``."""
    from trl import GRPOConfig

    problems = settings.problems(f"stages[{stage}].")
    if problems:
        raise TrainingConfigError("Invalid training config: " + "; ".join(problems))
    shared_extra, grpo_extra = split_extra_arguments(extra)
    values = {key: value for key, value in arguments.items() if key not in _SFT_ONLY_ARGUMENTS}
    values.update(shared_extra)
    values.update(
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        beta=settings.beta,
        loss_type=settings.loss_type,
        reward_weights=settings.reward_weights or [1.0] * len(settings.rewards),
        log_completions=False,
        remove_unused_columns=False,  # the rewards read the question and answer columns
    )
    values.update(grpo_extra)
    try:
        return GRPOConfig(**values)
    except (TypeError, ValueError, ImportError) as exc:
        raise TrainingConfigError(f"Invalid training arguments for stage {stage!r}: {exc}") from None


def _rewards_callback(rewards: GraderRewards) -> Any:
    from transformers import TrainerCallback

    class RewardsCallback(TrainerCallback):
        """At the end: the completions left out for a judge outage, over all processes, into the log history; then
        the judge and store closed on the loop they were opened on."""

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import torch

            unscored = torch.tensor([float(rewards.counts["unscored"])])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                unscored = unscored.to(args.device)
                torch.distributed.all_reduce(unscored)
            state.log_history.append(
                {"rewards/unscored_completions": int(unscored.item()), "step": state.global_step}
            )
            rewards.close()

    return RewardsCallback()


def build_grpo_trainer(
    model: Any,
    args: Any,
    dataset: Any,
    processing_class: Any,
    peft_config: Any,
    callbacks: Sequence[Any],
    *,
    settings: GRPOSettings,
    rewards: GraderRewards | None = None,
) -> Any:
    """TRL's ``GRPOTrainer`` for a stage: the model and LoRA config :func:`~training.curriculum.build_stage_model`
    made, the rewards of ``settings`` (a :class:`GraderRewards` on ``settings.judge`` unless one is given). The
    rewards' judge and store close when training ends (or call ``trainer.grader_rewards.close()``)."""
    from trl import GRPOTrainer

    rewards = rewards if rewards is not None else GraderRewards(settings.judge)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards.functions(settings.rewards),
        args=args,
        train_dataset=dataset,
        processing_class=processing_class,
        peft_config=peft_config,
        callbacks=[*callbacks, _rewards_callback(rewards)],
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
    unscored = [entry["rewards/unscored_completions"] for entry in log_history if "rewards/unscored_completions" in entry]
    if unscored:
        metrics["unscored_completions"] = sum(unscored)
    return metrics


# --- one stage on its own ------------------------------------------------------------------------------------------


@dataclass
class GRPOStageResult:
    adapter_dir: Path
    checkpoint: Path | None
    global_step: int
    resumed_from: Path | None
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]]
    dropped: dict[str, int]
    rewards: dict[str, Any]


def stage_settings(config: "CurriculumConfig", **overrides: Any) -> GRPOSettings:
    """A grpo stage's settings: the run's shared values, the grpo defaults, then ``overrides``."""
    values = dataclasses.asdict(config.stage_defaults())
    values.update(GRPO_STAGE_DEFAULTS)
    values.update(overrides)
    return GRPOSettings(**values)


def train_grpo_stage(
    config: "CurriculumConfig",
    *,
    data: Path,
    stage: str = "grpo",
    settings: GRPOSettings | None = None,
    previous_adapters: Sequence[Path] = (),
    callbacks: Sequence[Any] = (),
    rewards: GraderRewards | None = None,
) -> GRPOStageResult:
    """Train one grpo stage of ``config`` into ``OUTPUT/<stage>/`` from ``previous_adapters`` (a finished run's
    adapter, or none), resuming from its last complete checkpoint if one is there.

    The model, LoRA config and shared training arguments are built as the curriculum builds them for its other
    stages (:func:`~training.curriculum.build_stage_model`); the manifest and model card are the curriculum's.
    """
    from .curriculum import _training_arguments, _unused_parameters, build_stage_model, last_complete_checkpoint
    from .lengths import processor_fingerprint, write_dropped
    from .modeling import (
        apply_image_budget,
        detect_model_kind,
        load_processing_class,
        resolve_dtype,
    )

    settings = settings if settings is not None else stage_settings(config)
    problems = settings.problems(f"stages[{stage}].")
    if problems:
        raise TrainingConfigError("Invalid training config: " + "; ".join(problems))
    shared_extra, _ = split_extra_arguments(config.extra_training_args)
    output_dir = Path(config.output_dir).absolute()
    stage_dir = output_dir / stage
    checkpoints_dir = stage_dir / "checkpoints"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    grpo_data = read_grpo_file(data, stage=stage, check_images=config.check_images)
    if not grpo_data.samples:
        raise StageDataError(
            f"Stage {stage!r}: {grpo_data.path} holds no row with a checkable reference ({grpo_data.rows} rows; "
            f"left out: {grpo_data.left_out or 'none'}). A grpo stage needs question-answer rows whose target ends "
            "with a final-answer line."
        )
    kind = detect_model_kind(config.base_model, config.model_kind, trust_remote_code=config.trust_remote_code)
    if kind == "text" and any(item.images for item in grpo_data.samples):
        raise StageDataError(
            f"Stage {stage!r} has prompts with images, but {config.base_model!r} is a text-only model. Use a "
            "vision-language base model, or a stage file of text-only rows."
        )
    rewards = rewards if rewards is not None else GraderRewards(settings.judge)  # credentials checked before loading
    precision = resolve_dtype(config.precision)
    processing_class = load_processing_class(config.base_model, kind, trust_remote_code=config.trust_remote_code)
    image_budget = apply_image_budget(
        processing_class,
        max_tiles=config.image_max_tiles,
        min_pixels=config.image_min_pixels,
        max_pixels=config.image_max_pixels,
    )
    shared_config = dataclasses.replace(config, extra_training_args=shared_extra)
    shared_arguments = _training_arguments(
        shared_config, settings, precision, checkpoints_dir, world_size, stage, kind
    )
    from transformers import TrainingArguments

    arguments = {f.name: getattr(shared_arguments, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    args = grpo_config(arguments, settings, config.extra_training_args, stage)

    is_vlm = kind == "vlm"
    prepared = prepare_grpo(
        grpo_data,
        processing_class,
        is_vlm,
        processor_fingerprint(processing_class, is_vlm=is_vlm, image_budget=image_budget),
        output_dir / "lengths",
        args.distributed_state,
        stage,
        settings,
    )
    report = prepared.report
    if not report.kept:
        raise StageDataError(
            f"Stage {stage!r}: none of its {len(grpo_data.samples)} prompts leaves room for max_completion_length "
            f"{settings.max_completion_length} in max_length {settings.max_length} ({report.counts()}). Raise "
            "max_length, lower max_completion_length, or lower the image budget."
        )
    if report.dropped_total:
        logger.warning(
            "Stage %s: %d of %d prompts left out because prompt + max_completion_length (%d) exceed max_length %d: %s",
            stage, report.dropped_total, len(grpo_data.samples), settings.max_completion_length, settings.max_length,
            report.counts(),
        )

    model, peft_config = build_stage_model(config, kind, precision, list(previous_adapters))
    check_grpo_model(model, stage)
    if is_vlm and "ddp_find_unused_parameters" not in config.extra_training_args:
        args.ddp_find_unused_parameters = _unused_parameters(model, peft_config, stage)
    trainer = build_grpo_trainer(
        model, args, prepared.dataset, processing_class, peft_config, callbacks, settings=settings, rewards=rewards
    )
    resume_from = last_complete_checkpoint(checkpoints_dir)
    logger.info(
        "Stage %s (grpo): %d of %d prompts (%d images) from %s, %d completions each, %s rewards %s; %s",
        stage, len(report.kept), len(grpo_data.samples), prepared.images, grpo_data.path, settings.num_generations,
        "judge " + settings.judge if settings.judge else "recall for open answers,", settings.rewards,
        f"resuming from {resume_from}" if resume_from else "starting",
    )
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        rewards.close()
    adapter_dir = stage_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    if args.process_index == 0:
        shutil.rmtree(adapter_dir / _STRIPPED_ADAPTER, ignore_errors=True)
        write_dropped(stage_dir, report)
    metrics = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))}
    metrics.update(grpo_metrics(trainer.state.log_history))
    return GRPOStageResult(
        adapter_dir=adapter_dir,
        checkpoint=last_complete_checkpoint(checkpoints_dir),
        global_step=trainer.state.global_step,
        resumed_from=resume_from,
        metrics=metrics,
        log_history=list(trainer.state.log_history),
        dropped=report.counts(),
        rewards=reward_record(settings),
    )
