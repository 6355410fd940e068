"""The curriculum config: one dataclass, help text on every field, read from YAML with CLI overrides on top.

Defaults are the paper's (Chiron-o1 fine-tunes InternVL3 on the three MMRP stages): LoRA r=16, alpha=32 on the
language model with the vision tower and projector frozen; AdamW at 4e-5 with cosine decay and 3% warmup, weight
decay 0.05 (the published 8B script; its 2B script uses 0.01); one epoch per stage; global batch 16; bf16 where the
hardware has it; sequences up to 8192 tokens; InternVL images in at most 6 tiles (``max_dynamic_patch 6``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import TrainingConfigError

__all__ = [
    "StageSettings",
    "DPOSettings",
    "StageConfig",
    "CurriculumConfig",
    "load_config",
    "DEFAULT_STAGES",
    "STAGE_KINDS",
]

DEFAULT_STAGES = ("stage1", "stage2", "stage3")
STAGE_FILE_NAME = "messages.jsonl"
# What a stage of each kind reads when its entry names no 'data': where inside curriculum_dir, and which file.
# An sft stage reads its own folder (NAME/messages.jsonl); a dpo stage the step pairs the dataset builder writes
# beside the curriculum, whatever the stage is called; a grpo stage stage3's items (every checkable source).
STAGE_KINDS = {"sft": (None, STAGE_FILE_NAME), "dpo": ("steps", "pairs.jsonl"), "grpo": ("stage3", STAGE_FILE_NAME)}


@dataclass
class StageSettings:
    """Hyperparameters every stage takes from the top level of the config and may override in its own entry."""

    learning_rate: float = field(default=4e-5, metadata={"help": "Peak AdamW learning rate."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule after warmup (a transformers scheduler name)."}
    )
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "Fraction of the stage's optimizer steps spent warming the LR up from 0."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the stage file."})
    max_steps: int = field(
        default=-1, metadata={"help": "Optimizer steps for the stage; a positive value overrides num_train_epochs."}
    )
    global_batch_size: int = field(
        default=16,
        metadata={
            "help": "Samples per optimizer step over all processes = per_device_train_batch_size x "
            "gradient accumulation x processes; the accumulation is derived from it."
        },
    )
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Samples per forward pass per process."})
    max_length: int = field(
        default=8192,
        metadata={
            "help": "Longest training sequence in tokens (image tokens included). Nothing is ever cut: a sample "
            "longer than this is left out of the stage and counted (manifest, log, model card)."
        },
    )
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (published scripts: 0.05 for 8B, 0.01 for 2B)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    seed: int = field(default=42, metadata={"help": "Seed of the LoRA init, the data order and dropout."})
    save_steps: int = field(
        default=100, metadata={"help": "Write a resumable checkpoint every this many optimizer steps."}
    )
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept per stage (older ones deleted)."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss and LR every this many optimizer steps."})


@dataclass
class DPOSettings(StageSettings):
    """A dpo stage's hyperparameters: the shared ones plus TRL's DPO loss settings (``beta``, ``loss_type``)."""

    beta: float = field(default=0.5, metadata={"help": "DPO beta."})
    loss_type: str = field(default="sigmoid", metadata={"help": "TRL's DPO loss type."})


# Run-wide fields a dpo stage takes its values from instead of the SFT ones, stage field -> config field.
DPO_DEFAULT_FIELDS = {
    "learning_rate": "dpo_learning_rate",
    "num_train_epochs": "dpo_num_train_epochs",
    "warmup_ratio": "dpo_warmup_ratio",
    "beta": "dpo_beta",
    "loss_type": "dpo_loss_type",
}
# TRL's DPO losses that compare the chosen and the rejected step of a pair (the others need unpaired data or a
# different dataset layout).
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "discopop", "sigmoid_norm")


@dataclass
class StageConfig:
    """One stage: its name, its kind (``sft`` or ``dpo``), its data file and its overrides."""

    name: str
    data: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    kind: str = "sft"


@dataclass
class CurriculumConfig(StageSettings):
    """A curriculum fine-tune: a base model, its stages in order, where to write, and how to train."""

    base_model: str = field(
        default="",
        metadata={
            "help": "Base model: a local folder or a Hugging Face id (a VLM loadable with "
            "AutoModelForImageTextToText + AutoProcessor, or a causal LM for text-only stages)."
        },
    )
    output_dir: str = field(
        default="curriculum_output",
        metadata={"help": "Where stages, checkpoints, the manifest, the final adapter and model card go."},
    )
    curriculum_dir: str | None = field(
        default=None,
        metadata={"help": "The dataset builder's curriculum folder; stage NAME reads NAME/messages.jsonl inside it."},
    )
    stages: list[Any] = field(
        default_factory=lambda: list(DEFAULT_STAGES),
        metadata={
            "help": "Stages in training order: names (folders of curriculum_dir) or mappings with 'name', an "
            "optional 'kind' ('sft', the default: a messages.jsonl; 'dpo': step preference pairs, by default "
            "curriculum_dir/steps/pairs.jsonl), an optional 'data' (the stage's file) and any per-stage override of "
            "the hyperparameters (a dpo stage also 'beta' and 'loss_type')."
        },
    )
    model_kind: str = field(
        default="auto",
        metadata={"help": "'vlm', 'text', or 'auto' to decide from the model config."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the model repository (not needed for '-hf' models)."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: 'sdpa', 'eager', 'flash_attention_2'; default: model's."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: Any = field(
        default="auto",
        metadata={
            "help": "'auto': every linear layer of the language model (vision tower, projector and lm_head stay "
            "frozen); or a list of module names / a regex, as PEFT's target_modules."
        },
    )
    merge_between_stages: bool = field(
        default=False,
        metadata={
            "help": "Merge each finished stage's adapter into the weights and start the next stage with a fresh "
            "adapter, instead of carrying one adapter through all stages."
        },
    )
    save_merged_model: bool = field(
        default=False, metadata={"help": "Also write the merged full model (base + adapter) to OUTPUT/merged."}
    )
    image_max_tiles: int = field(
        default=6,
        metadata={
            "help": "InternVL (and other tiling processors with max_patches): at most this many 448-px tiles per "
            "image, plus a thumbnail when there is more than one (the published scripts' max_dynamic_patch: 6; "
            "the processor's own default is 12). Fewer tiles, fewer image tokens."
        },
    )
    image_min_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Qwen2-VL/Qwen2.5-VL: the least pixels an image is resized to (min_pixels); unset: the "
            "processor's own."
        },
    )
    image_max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Qwen2-VL/Qwen2.5-VL: the most pixels an image is resized to (max_pixels; every 28x28 pixels is "
            "one image token), e.g. 1003520 = 1280 tokens; unset: the processor's own."
        },
    )
    precision: str = field(
        default="auto",
        metadata={"help": "'auto' (bf16 on GPUs that have it, else fp32), 'bf16', 'fp16' or 'fp32'."},
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    dataloader_num_workers: int = field(
        default=2, metadata={"help": "Processes that load and preprocess images while the model trains."}
    )
    report_to: Any = field(
        default="none",
        metadata={"help": "Where the Trainer logs besides the console: 'none', 'tensorboard', 'wandb', ... or a list."},
    )
    deepspeed: str | None = field(
        default=None,
        metadata={
            "help": "A DeepSpeed JSON config (e.g. training/configs/deepspeed_zero1.json); launch with "
            "accelerate launch or torchrun."
        },
    )
    check_images: bool = field(
        default=True, metadata={"help": "Check that every image of every stage file exists before training."}
    )
    allow_data_change: bool = field(
        default=False,
        metadata={"help": "Continue although a stage file changed since its stage was trained or started."},
    )
    allow_trainer_change: bool = field(
        default=False,
        metadata={
            "help": "Continue a run that an older version of this package started with its own trainer (before TRL's "
            "SFTTrainer): the unfinished stage resumes from its checkpoint with the new trainer and length policy."
        },
    )
    extra_training_args: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "More TrainingArguments/SFTConfig/DPOConfig/GRPOConfig fields passed as they are, e.g. {optim: "
            "adamw_8bit}; GRPOConfig's own (use_vllm, vllm_mode ...) reach the grpo stages only."
        },
    )
    init_adapter: str | None = field(
        default=None,
        metadata={
            "help": "An existing LoRA adapter folder (e.g. a finished run's OUTPUT/adapter) that the first stage "
            "continues instead of a fresh adapter: run only a dpo stage on top of a trained curriculum."
        },
    )
    # DPO stages (kind: dpo). Step-DPO's published runs are full-parameter (lr 5e-7, beta 0.05-0.5, 2-8 epochs,
    # warmup 0.1); these are the LoRA values (README: "The preference stage").
    dpo_learning_rate: float = field(
        default=5e-6,
        metadata={
            "help": "Peak learning rate of dpo stages (their learning_rate unless the stage entry sets one): 10x "
            "Step-DPO's full-parameter 5e-7, as LoRA needs (alignment-handbook's Zephyr DPO: 5e-7 full, 5e-6 LoRA)."
        },
    )
    dpo_num_train_epochs: float = field(
        default=2.0,
        metadata={"help": "Passes over the pairs in a dpo stage (Step-DPO: 2 in its base config, 4-8 in its runs)."},
    )
    dpo_warmup_ratio: float = field(
        default=0.1, metadata={"help": "Warmup fraction of dpo stages (Step-DPO's and Zephyr's 0.1)."}
    )
    dpo_beta: float = field(
        default=0.5,
        metadata={
            "help": "DPO beta of dpo stages: how far the policy may move from the reference (the adapter the stage "
            "starts from). Step-DPO's published 7B run: 0.5 (72B: 0.4; base config 0.05)."
        },
    )
    dpo_loss_type: str = field(
        default="sigmoid",
        metadata={"help": f"TRL's DPO loss of dpo stages: {', '.join(DPO_LOSS_TYPES)}. 'sigmoid' is DPO's own."},
    )

    # Filled by resolve(): the stage list with paths and overrides.
    resolved_stages: list[StageConfig] = field(default_factory=list, metadata={"help": "", "internal": True})

    def __post_init__(self) -> None:
        self.resolve()

    def resolve(self) -> "CurriculumConfig":
        """Check every value and turn ``stages`` into :class:`StageConfig` entries; raise with the field at fault."""
        problems: list[str] = []
        if not self.base_model:
            problems.append("base_model: give a local model folder or a Hugging Face model id")
        if self.model_kind not in {"auto", "vlm", "text"}:
            problems.append(f"model_kind: must be 'auto', 'vlm' or 'text', not {self.model_kind!r}")
        if self.precision not in {"auto", "bf16", "fp16", "fp32"}:
            problems.append(f"precision: must be 'auto', 'bf16', 'fp16' or 'fp32', not {self.precision!r}")
        if self.lora_r < 1 or self.lora_alpha < 1:
            problems.append("lora_r and lora_alpha must be positive")
        if not 0 <= self.lora_dropout < 1:
            problems.append("lora_dropout: must be in [0, 1)")
        problems += _check_settings(self, "")
        if self.image_max_tiles < 1:
            problems.append("image_max_tiles: must be at least 1")
        for name in ("image_min_pixels", "image_max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name}: must be positive (or unset)")
        if self.image_min_pixels and self.image_max_pixels and self.image_min_pixels > self.image_max_pixels:
            problems.append("image_min_pixels: must not exceed image_max_pixels")
        if self.init_adapter is not None and not (Path(self.init_adapter) / "adapter_config.json").is_file():
            problems.append(
                f"init_adapter: no adapter_config.json in {self.init_adapter}; give the folder of a saved LoRA adapter"
            )
        if self.dpo_loss_type not in DPO_LOSS_TYPES:
            problems.append(f"dpo_loss_type: must be one of {', '.join(DPO_LOSS_TYPES)}, not {self.dpo_loss_type!r}")
        if self.dpo_beta <= 0:
            problems.append("dpo_beta: must be positive")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            problems.append(f"deepspeed: no file at {self.deepspeed}")
        if isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [part.strip() for part in self.report_to.split(",") if part.strip()]
        if not isinstance(self.extra_training_args, dict):
            problems.append("extra_training_args: must be a mapping of TrainingArguments fields")
        else:
            # The length policy and the loss are ours: TRL truncating would cut answers again.
            owned = {"max_length", "completion_only_loss", "truncation_mode", "beta", "loss_type"}
            for key in sorted(set(self.extra_training_args) & owned):
                problems.append(
                    f"extra_training_args.{key}: set by the curriculum (answers are never cut; use the max_length "
                    "field, which leaves out what does not fit)"
                )
        stages: list[StageConfig] = []
        if not isinstance(self.stages, list) or not self.stages:
            problems.append("stages: give a list of stage names or mappings")
        else:
            for index, entry in enumerate(self.stages):
                try:
                    stages.append(self._resolve_stage(index, entry))
                except TrainingConfigError as exc:
                    problems.append(str(exc))
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            problems.append(f"stages: a stage name appears twice: {names}")
        for stage in stages:
            settings = self.stage_settings(stage)
            problems += _check_settings(settings, f"stages[{stage.name}].")
            if stage.kind == "grpo":
                problems += settings.problems(f"stages[{stage.name}].")  # type: ignore[attr-defined]
        if problems:
            raise TrainingConfigError("Invalid training config: " + "; ".join(problems))
        self.resolved_stages = stages
        return self

    def _resolve_stage(self, index: int, entry: Any) -> StageConfig:
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not entry.get("name"):
            raise TrainingConfigError(f"stages[{index}]: give a stage name or a mapping with a 'name'")
        entry = dict(entry)
        name = str(entry.pop("name"))
        data = entry.pop("data", None)
        kind = str(entry.pop("kind", "sft")).lower()
        if kind not in STAGE_KINDS:
            raise TrainingConfigError(f"stages[{name}]: kind must be one of {', '.join(STAGE_KINDS)}, not {kind!r}")
        types = _setting_types(kind)
        allowed = tuple(types)
        unknown = sorted(set(entry) - set(allowed))
        if unknown:
            raise TrainingConfigError(
                f"stages[{name}]: unknown key(s) {unknown}; a {kind} stage may set 'kind', 'data' and "
                f"{', '.join(allowed)}"
            )
        folder, file_name = STAGE_KINDS[kind]
        if data is None:
            if not self.curriculum_dir:
                raise TrainingConfigError(
                    f"stages[{name}]: set curriculum_dir (the dataset builder's output folder) or give the stage "
                    f"a 'data' path to its {file_name}"
                )
            path = Path(self.curriculum_dir) / (folder or name) / file_name
        else:
            path = Path(str(data))
            if path.is_dir():
                path = path / file_name
        overrides = {}
        for key, value in entry.items():
            overrides[key] = _coerce(key, value, types[key])
        if kind == "dpo" and "loss_type" in overrides and overrides["loss_type"] not in DPO_LOSS_TYPES:
            raise TrainingConfigError(
                f"stages[{name}].loss_type: must be one of {', '.join(DPO_LOSS_TYPES)}, not {overrides['loss_type']!r}"
            )
        return StageConfig(name=name, data=path.expanduser().absolute(), overrides=overrides, kind=kind)

    def stage_defaults(self) -> StageSettings:
        """The run-wide stage settings, before any stage's own overrides."""
        return StageSettings(**{name: getattr(self, name) for name in STAGE_SETTING_NAMES})

    def stage_settings(self, stage: StageConfig) -> StageSettings:
        """The stage's hyperparameters: the run's, then (dpo) the run's dpo_* values, then the stage entry's."""
        values = {name: getattr(self, name) for name in STAGE_SETTING_NAMES}
        if stage.kind == "dpo":
            values.update({key: getattr(self, source) for key, source in DPO_DEFAULT_FIELDS.items()})
            return DPOSettings(**{**values, **stage.overrides})
        if stage.kind == "grpo":
            from .grpo import GRPO_STAGE_DEFAULTS, GRPOSettings

            return GRPOSettings(**{**values, **GRPO_STAGE_DEFAULTS, **stage.overrides})
        return StageSettings(**{**values, **stage.overrides})

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what the model card and manifest record)."""
        data = {f.name: getattr(self, f.name) for f in config_fields()}
        data["stages"] = [
            {"name": stage.name, **({"kind": stage.kind} if stage.kind != "sft" else {}), "data": str(stage.data),
             **stage.overrides}
            for stage in self.resolved_stages
        ]
        return data


STAGE_SETTING_NAMES = tuple(f.name for f in dataclasses.fields(StageSettings))
DPO_SETTING_NAMES = tuple(f.name for f in dataclasses.fields(DPOSettings))
_DPO_SETTING_TYPES = {f.name: f.type for f in dataclasses.fields(DPOSettings)}


def _setting_types(kind: str) -> dict[str, Any]:
    """The settings a stage entry of this kind may set, with their types."""
    if kind == "grpo":
        from .grpo import GRPOSettings  # grpo.py builds on this module

        return {f.name: f.type for f in dataclasses.fields(GRPOSettings)}
    if kind == "dpo":
        return dict(_DPO_SETTING_TYPES)
    return {name: _DPO_SETTING_TYPES[name] for name in STAGE_SETTING_NAMES}


def config_fields() -> list[dataclasses.Field]:
    """The user-facing fields of :class:`CurriculumConfig`, in the order ``--help`` lists them."""
    fields = [f for f in dataclasses.fields(CurriculumConfig) if not f.metadata.get("internal")]
    own = [f for f in fields if f.name not in STAGE_SETTING_NAMES]
    shared = [f for f in fields if f.name in STAGE_SETTING_NAMES]
    return own + shared


def _check_settings(settings: StageSettings, prefix: str) -> list[str]:
    problems = []
    if settings.learning_rate <= 0:
        problems.append(f"{prefix}learning_rate: must be positive")
    if not 0 <= settings.warmup_ratio < 1:
        problems.append(f"{prefix}warmup_ratio: must be in [0, 1)")
    if settings.max_steps <= 0 and settings.num_train_epochs <= 0:
        problems.append(f"{prefix}num_train_epochs: must be positive (or set max_steps)")
    if settings.per_device_train_batch_size < 1:
        problems.append(f"{prefix}per_device_train_batch_size: must be at least 1")
    if settings.global_batch_size < settings.per_device_train_batch_size:
        problems.append(f"{prefix}global_batch_size: must be at least per_device_train_batch_size")
    if settings.max_length < 16:
        problems.append(f"{prefix}max_length: must be at least 16 tokens")
    if settings.save_steps < 1 or settings.logging_steps < 1:
        problems.append(f"{prefix}save_steps and logging_steps must be at least 1")
    if settings.save_total_limit < 1:
        problems.append(f"{prefix}save_total_limit: keep at least 1 checkpoint (resuming needs it)")
    if isinstance(settings, DPOSettings) and settings.beta <= 0:
        problems.append(f"{prefix}beta: must be positive")
    return problems


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, with an error naming the field."""
    kind = str(annotation)
    if kind.endswith(" | None"):
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null", ""}):
            return None
        kind = kind[: -len(" | None")]
    try:
        if kind == "float" and not isinstance(value, bool):
            return float(value)
        if kind == "int" and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in {"1", "true", "yes", "on"}:
                return True
            if str(value).lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError
    except (TypeError, ValueError):
        raise TrainingConfigError(f"{name}: expected {kind}, got {value!r}") from None
    return value


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> CurriculumConfig:
    """Read a YAML config (if given) and apply keyword overrides on top; unknown keys are errors.

    Relative paths in the file are taken from the current directory, as the Trainer and accelerate do.
    """
    values: dict[str, Any] = {}
    if path is not None:
        config_path = Path(path)
        if not config_path.is_file():
            raise TrainingConfigError(f"No config file at {config_path}: pass --config PATH to a YAML file")
        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise TrainingConfigError(f"{config_path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise TrainingConfigError(f"{config_path} must hold a mapping of config fields")
        values.update(loaded)
    values.update({key: value for key, value in overrides.items() if value is not None})
    known = {f.name: f for f in config_fields()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TrainingConfigError(f"Unknown config field(s) {unknown}; run `python -m training --help` for the list")
    typed = {name: _coerce(name, value, known[name].type) for name, value in values.items()}
    return CurriculumConfig(**typed)
