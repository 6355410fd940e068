"""Running the curriculum: stages in order, each from the previous one's weights, resumable at any point.

Layout of ``output_dir``::

    manifest.json            what each stage trained on, its status, checkpoint, adapter and metrics
    lengths/rank-N.jsonl     each distinct sample's prompt and answer tokens, by process (the length policy's cache)
    stage1/checkpoints/      Trainer checkpoints (checkpoint-N: adapter, optimizer, scheduler, RNG, trainer state)
    stage1/adapter/          the stage's LoRA adapter when it finished
    stage1/dropped.json      the samples left out because they do not fit in max_length, by reason
    stage2/ ... stage3/
    adapter/                 the final adapter (PEFT; load onto the base model, or serve with vLLM --enable-lora)
    merged/                  the merged full model (save_merged_model, or always with merge_between_stages)
    README.md                model card: data, hashes, stage metrics, how to load and serve

Each stage has a kind, and each kind its trainer (``_STAGE_KINDS``): an ``sft`` stage trains with TRL's
``SFTTrainer`` on prompt-completion rows (completion-only loss; TRL's vision collator for a VLM), a ``dpo`` stage with
TRL's ``DPOTrainer`` on step preference pairs (:mod:`training.dpo`), each after the length policy
(:mod:`training.lengths`) has left out what would not fit in ``max_length``. Every stage continues the adapter of the
one before (or ``init_adapter``).
A rerun of the same command skips finished stages and resumes the running one from its last complete
checkpoint with the Trainer's own resume (same data order, optimizer, LR schedule and RNG state). A stage
whose file is empty is skipped (recorded as such); the next stage continues from the weights before it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from .config import CurriculumConfig, DPOSettings, StageConfig, StageSettings
from .data import StageData, file_sha256, read_stage_file
from .dpo import (
    STRIPPED_ADAPTER,
    apply_pair_length_policy,
    check_dpo_model,
    dpo_metrics,
    iter_side_lengths,
    pair_dataset,
)
from .errors import DataChangedError, ManifestError, StageDataError, TrainingConfigError
from .grpo import (
    build_grpo_trainer,
    check_grpo_model,
    grpo_config,
    grpo_metrics,
    grpo_only_arguments,
    prepare_grpo,
    read_grpo_file,
)
from .lengths import REASONS, apply_length_policy, processor_fingerprint, stage_lengths, write_dropped
from .pairs import PairData, read_pairs_file
from .manifest import Manifest
from .model_card import write_model_card
from .modeling import (
    apply_image_budget,
    count_parameters,
    detect_model_kind,
    language_model_target_modules,
    load_base_model,
    load_processing_class,
    resolve_dtype,
    trained_outside_language_model,
)
from .parallel import check_mixed_stages, sharded_parameters
from .sft import stage_dataset

__all__ = ["run_curriculum", "CurriculumResult", "last_complete_checkpoint", "build_stage_model"]

logger = logging.getLogger("training")

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Settings a resumed stage may change: they do not touch its data order or LR schedule.
_RESUMABLE_CHANGES = {"save_steps", "save_total_limit", "logging_steps"}
# Run-wide settings that decide which samples a stage keeps (so a running stage must resume with them).
_IMAGE_SETTINGS = ("image_max_tiles", "image_min_pixels", "image_max_pixels")


def _load_base(config: CurriculumConfig, kind: Any, precision: Any) -> Any:
    return load_base_model(
        config.base_model,
        kind,
        precision=precision,
        attn_implementation=config.attn_implementation,
        trust_remote_code=config.trust_remote_code,
    )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class CurriculumResult:
    output_dir: Path
    adapter_dir: Path | None
    merged_dir: Path | None
    stages: list[dict[str, Any]] = field(default_factory=list)


def last_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` that was written to the end (``trainer_state.json`` is written last)."""
    if not checkpoints_dir.is_dir():
        return None
    found = []
    for path in checkpoints_dir.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _check_reporters(report_to: Any) -> None:
    reporters = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "tensorboard" in reporters and not (find_spec("tensorboard") or find_spec("tensorboardX")):
        raise TrainingConfigError(
            "report_to: tensorboard needs the tensorboard package: pip install tensorboard (or set report_to: none)"
        )


def _wait_for_everyone() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def gradient_accumulation(settings: StageSettings, world_size: int, stage: str) -> int:
    per_step = settings.per_device_train_batch_size * world_size
    if settings.global_batch_size % per_step:
        raise TrainingConfigError(
            f"stages[{stage}]: global_batch_size {settings.global_batch_size} is not a multiple of "
            f"per_device_train_batch_size {settings.per_device_train_batch_size} x {world_size} process(es); "
            "change one of them"
        )
    return settings.global_batch_size // per_step


def _lora_config(config: CurriculumConfig, model: torch.nn.Module) -> Any:
    from peft import LoraConfig

    target = config.lora_target_modules
    if target == "auto":
        target = language_model_target_modules(model)
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_stage_model(
    config: CurriculumConfig, kind: str, precision: str, previous_adapters: Sequence[Path]
) -> tuple[torch.nn.Module, Any]:
    """The model a stage starts from, and the LoRA config of a fresh adapter (None when one is carried on).

    Carried adapter: the last stage's adapter is loaded trainable. ``merge_between_stages``: every earlier
    adapter is merged in, in order (each was trained on top of the ones before), and a fresh adapter is added.
    A fresh adapter is put on by ``SFTTrainer`` (after it seeds the run, so the LoRA init follows ``seed``).
    """
    from peft import PeftModel

    model = _load_base(config, kind, precision)
    if config.merge_between_stages:
        for adapter in previous_adapters:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        return model, _lora_config(config, model)
    if previous_adapters:
        return PeftModel.from_pretrained(model, str(previous_adapters[-1]), is_trainable=True), None
    return model, _lora_config(config, model)


class ManifestCallback(TrainerCallback):
    """Records every checkpoint in the manifest as it is written (main process only)."""

    def __init__(self, manifest: Manifest, stage: str, output_dir: Path) -> None:
        self.manifest, self.stage, self.output_dir = manifest, stage, output_dir

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.manifest.update_stage(
            self.stage,
            checkpoint=os.path.relpath(checkpoint, self.output_dir),
            global_step=state.global_step,
            max_steps=state.max_steps,
        )
        self.manifest.save()


def _training_arguments(
    config: CurriculumConfig,
    settings: StageSettings,
    precision: str,
    checkpoints_dir: Path,
    world_size: int,
    stage: str,
    kind: str,
    stage_kind: str = "sft",
) -> SFTConfig | DPOConfig:
    arguments: dict[str, Any] = dict(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation(settings, world_size, stage),
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a ratio of the stage's steps
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        optim="adamw_torch",
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # transformers 5's name for gradient checkpointing; TRL's own default (on) is overridden both ways.
        activation_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        # A text model has no unused parameters; a VLM's are decided once its LoRA is known (_unused_parameters).
        ddp_find_unused_parameters=None if kind == "vlm" else False,
        report_to=config.report_to,
        run_name=f"{Path(config.output_dir).name}-{stage}",
        deepspeed=config.deepspeed,
        # The length policy has dropped whatever would not fit, so TRL never truncates (it would cut answers and
        # steps, or image tokens apart from their pixels).
        max_length=None,
    )
    if stage_kind == "grpo":
        return grpo_config(arguments, settings, config.extra_training_args, stage)  # type: ignore[arg-type]
    # The grpo stages' own fields (vLLM, sampling) are theirs alone.
    extra = {key: value for key, value in config.extra_training_args.items() if key not in grpo_only_arguments()}
    if stage_kind == "dpo":
        assert isinstance(settings, DPOSettings)
        arguments.update(beta=settings.beta, loss_type=[settings.loss_type])
        arguments.update(extra)
        arguments_class: type = DPOConfig
    else:
        arguments.update(completion_only_loss=True)  # the loss is the answer's alone
        arguments.update(extra)
        arguments_class = SFTConfig
    try:
        return arguments_class(**arguments)
    except (TypeError, ValueError, ImportError) as exc:
        message = str(exc)
        if "tensorboard" in message.lower():
            message += " (pip install tensorboard, or set report_to: none)"
        raise TrainingConfigError(f"Invalid training arguments for stage {stage!r}: {message}") from None


def _unused_parameters(model: torch.nn.Module, peft_config: Any, stage: str) -> bool | None:
    """``ddp_find_unused_parameters`` for a VLM stage: False when only the language model trains.

    A text-only batch skips the vision tower, but DDP only waits for gradients of trainable parameters: with the
    tower and projector frozen and LoRA inside the language model (which every batch runs through), nothing can go
    unused, and looking for it would cost a graph traversal every step. LoRA that reaches other modules keeps TRL's
    choice (None: TRL turns the search on for a VLM).
    """
    outside = trained_outside_language_model(model, peft_config)
    if outside:
        logger.info(
            "Stage %s: LoRA reaches modules outside the language model (%s%s), so DDP looks for unused parameters",
            stage,
            ", ".join(outside[:3]),
            f" and {len(outside) - 3} more" if len(outside) > 3 else "",
        )
        return None
    return False


def _loss_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    if not losses:
        return {}
    return {"first_logged_loss": losses[0], "last_logged_loss": losses[-1], "logged_losses": len(losses)}


def run_curriculum(config: CurriculumConfig, *, callbacks: Sequence[Any] = ()) -> CurriculumResult:
    """Train every stage of ``config`` that is not done yet, then write the final adapter and model card."""
    # Launchers (torchrun, accelerate launch) set RANK and WORLD_SIZE. The process group itself is set up by
    # TrainingArguments, so that DeepSpeed/FSDP/DDP come from the launcher's and the config's choices.
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    is_main = rank == 0
    _check_reporters(config.report_to)
    output_dir = Path(config.output_dir).absolute()
    stages = config.resolved_stages

    # Everything that can be checked without a GPU is checked before the model loads.
    stage_data = {
        stage.name: _STAGE_KINDS[stage.kind].read(stage.data, stage=stage.name, check_images=config.check_images)
        for stage in stages
    }
    if not any(_rows(data) for data in stage_data.values()):
        raise StageDataError(
            "Every stage file is empty: "
            + ", ".join(str(data.path) for data in stage_data.values())
            + ". Build the curriculum from MICS output (mics dataset build) first."
        )
    check_mixed_stages(
        {stage.name: _image_mix(stage_data[stage.name]) for stage in stages},
        sharded_parameters(config.deepspeed, config.extra_training_args),
    )
    kind = detect_model_kind(config.base_model, config.model_kind, trust_remote_code=config.trust_remote_code)
    if kind == "text":
        for stage in stages:
            if stage.kind == "dpo":
                raise TrainingConfigError(
                    f"Stage {stage.name!r} is a dpo stage, but {config.base_model!r} is a text-only model: the "
                    "preference stage trains vision-language models (TRL's vision preference collator renders each "
                    "step as a continuation of the path so far). Use a vision-language base model, or remove the stage."
                )
            with_images = _image_mix(stage_data[stage.name])[0]
            if with_images:
                raise StageDataError(
                    f"Stage {stage.name!r} has {with_images} sample(s) with images, but {config.base_model!r} is a "
                    "text-only model. Use a vision-language base model, or a stage file of text-only samples."
                )
    precision = resolve_dtype(config.precision)
    manifest = Manifest.open(
        output_dir, base_model=config.base_model, model_kind=kind, allow_trainer_change=config.allow_trainer_change
    )
    manifest.check_stage_order([stage.name for stage in stages])
    manifest.check_kinds({stage.name: stage.kind for stage in stages})
    init_adapter = _init_adapter(config, manifest)
    for stage in stages:
        data = stage_data[stage.name]
        manifest.check_data(stage.name, data.sha256, str(data.path), allow_change=config.allow_data_change)
    processing_class = load_processing_class(config.base_model, kind, trust_remote_code=config.trust_remote_code)
    image_budget = apply_image_budget(
        processing_class,
        max_tiles=config.image_max_tiles,
        min_pixels=config.image_min_pixels,
        max_pixels=config.image_max_pixels,
    )
    if image_budget:
        logger.info("Image budget: %s", ", ".join(f"{key}={value}" for key, value in image_budget.items()))
    manifest.data["image_budget"] = image_budget

    trained: list[Path] = [init_adapter] if init_adapter else []  # adapters to continue from, in order
    for stage in stages:
        entry = manifest.stage(stage.name)
        data = stage_data[stage.name]
        if entry is not None and entry["status"] in {"done", "skipped"}:
            adapter = output_dir / stage.name / "adapter"
            if entry["status"] == "done" and not (adapter / "adapter_config.json").is_file():
                raise ManifestError(
                    f"Stage {stage.name!r} is done but its adapter {adapter} is gone, so the later stages cannot "
                    "continue from it. Restore the folder, or use a new output_dir to train again."
                )
            logger.info("Stage %s is %s: skipped", stage.name, entry["status"])
        elif not _rows(data):
            logger.warning(
                "Stage %s: %s holds no samples, so the stage is skipped and the next one continues from the "
                "previous weights",
                stage.name,
                data.path,
            )
            if is_main:
                manifest.update_stage(stage.name, status="skipped", reason="empty stage file", **data.summary())
                manifest.save()
        else:
            _train_stage(
                config=config,
                stage=stage,
                data=data,
                kind=kind,
                precision=precision,
                processing_class=processing_class,
                image_budget=image_budget,
                previous_adapters=list(trained),
                manifest=manifest,
                output_dir=output_dir,
                world_size=world_size,
                is_main=is_main,
                callbacks=callbacks,
            )
            _wait_for_everyone()  # the stage's adapter is on disk before any process loads it
        if (output_dir / stage.name / "adapter" / "adapter_config.json").is_file() and (
            (manifest.stage(stage.name) or {}).get("status") != "skipped"
        ):
            trained.append(output_dir / stage.name / "adapter")

    adapter_dir, merged_dir = None, None
    if is_main:
        adapter_dir, merged_dir = _export(config, kind, precision, processing_class, output_dir, manifest, trained)
        write_model_card(output_dir, config, manifest)
    _wait_for_everyone()
    return CurriculumResult(
        output_dir=output_dir, adapter_dir=adapter_dir, merged_dir=merged_dir, stages=list(manifest.stages)
    )


@dataclass
class _Prepared:
    """What a stage trains on after the length policy, and what the manifest records about it."""

    dataset: Any
    report: Any  # LengthReport: of samples (sft), pairs (dpo) or prompts (grpo)
    unit: str  # what a row is, for the log: 'samples' or 'pairs'
    images: int
    record: dict[str, Any]


def _prepare_sft(
    data: StageData, processing_class: Any, is_vlm: bool, fingerprint: str, cache_dir: Path, state: Any, stage: str,
    settings: StageSettings,
) -> _Prepared:
    lengths = stage_lengths(
        data.samples, processing_class, is_vlm=is_vlm, fingerprint=fingerprint, cache_dir=cache_dir, state=state,
        stage=stage,
    )
    report = apply_length_policy(data.samples, lengths, settings.max_length)
    return _Prepared(
        dataset=stage_dataset(report.kept, is_vlm=is_vlm) if report.kept else None,
        report=report,
        unit="samples",
        images=sum(len(sample.images) for sample in report.kept),
        record={"trained_samples": len(report.kept)},
    )


def _prepare_dpo(
    data: PairData, processing_class: Any, is_vlm: bool, fingerprint: str, cache_dir: Path, state: Any, stage: str,
    settings: StageSettings,
) -> _Prepared:
    # Each pair is measured as its two sides, prompt + chosen and prompt + rejected, through the preference collator;
    # the fingerprint says so, so these lengths never answer for an SFT sample with the same messages.
    sides = [pair.side(which) for pair in data.pairs for which in ("chosen", "rejected")]
    lengths = stage_lengths(
        sides,
        processing_class,
        is_vlm=is_vlm,
        fingerprint=hashlib.sha256(f"dpo-continuation:{fingerprint}".encode()).hexdigest(),
        cache_dir=cache_dir,
        state=state,
        stage=stage,
        measure=lambda samples: iter_side_lengths(samples, processing_class),
    )
    report = apply_pair_length_policy(data.pairs, lengths, settings.max_length)
    return _Prepared(
        dataset=pair_dataset(report.kept, processing_class) if report.kept else None,
        report=report,
        unit="pairs",
        images=sum(len(pair.images) for pair in report.kept),
        record={"trained_pairs": len(report.kept)},
    )


def _trl_trainer(trainer_class: type) -> Any:
    """A stage kind's trainer: TRL's ``trainer_class`` on the model, LoRA config and data the stage made."""

    def build(
        model: Any, args: Any, dataset: Any, processing_class: Any, peft_config: Any, callbacks: list, *, settings: Any
    ) -> Any:
        return trainer_class(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
        )

    return build


_sft_trainer = _trl_trainer(SFTTrainer)
# No ref_model: TRL takes a frozen copy of a carried adapter as the reference, or the model with a fresh adapter
# disabled; either way the policy the stage starts from (training.dpo).
_dpo_trainer = _trl_trainer(DPOTrainer)


@dataclass(frozen=True)
class _StageKind:
    """Everything that differs between stage kinds; the loop in :func:`_train_stage` is the same for all."""

    read: Any  # (path, *, stage, check_images) -> StageData | PairData | GRPOData
    prepare: Any  # (data, processing_class, is_vlm, fingerprint, cache_dir, state, stage, settings) -> _Prepared
    trainer: Any  # (model, args, dataset, processing_class, peft_config, callbacks, *, settings) -> a Trainer
    metrics: Any  # log_history -> dict
    check_model: Any = None  # (model, stage) -> None, raising for a model this kind cannot train


_STAGE_KINDS = {
    "sft": _StageKind(read=read_stage_file, prepare=_prepare_sft, trainer=_sft_trainer, metrics=_loss_metrics),
    "dpo": _StageKind(
        read=read_pairs_file, prepare=_prepare_dpo, trainer=_dpo_trainer, metrics=dpo_metrics,
        check_model=check_dpo_model,
    ),
    "grpo": _StageKind(
        read=read_grpo_file, prepare=prepare_grpo, trainer=build_grpo_trainer, metrics=grpo_metrics,
        check_model=check_grpo_model,
    ),
}


def _rows(data: StageData | PairData) -> int:
    return len(data.pairs) if isinstance(data, PairData) else len(data.samples)


def _image_mix(data: StageData | PairData) -> tuple[int, int]:
    """(rows with images, rows without) of a stage's data."""
    rows = data.pairs if isinstance(data, PairData) else data.samples
    with_images = sum(1 for row in rows if row.images)
    return with_images, len(rows) - with_images


def _init_adapter(config: CurriculumConfig, manifest: Manifest) -> Path | None:
    """The adapter the first stage continues (``init_adapter``), checked against the one the run started from."""
    if not config.init_adapter:
        recorded = manifest.data.get("init_adapter")
        if recorded and any(entry["status"] != "pending" for entry in manifest.stages):
            raise ManifestError(
                f"{manifest.path.parent} started from the adapter {recorded['path']} (init_adapter), which the config "
                "no longer names. Set init_adapter to it again, or use a new output_dir."
            )
        return None
    path = Path(config.init_adapter).expanduser().absolute()
    weights = path / "adapter_model.safetensors"
    identity = {"path": str(path), "sha256": file_sha256(weights) if weights.is_file() else None}
    recorded = manifest.data.get("init_adapter")
    started = any(entry["status"] != "pending" for entry in manifest.stages)
    if started and recorded != identity and not config.allow_data_change:
        before, now = recorded or {}, identity
        raise DataChangedError(
            f"{manifest.path.parent} started from the adapter {before.get('path')!r} (sha256 "
            f"{(before.get('sha256') or '?')[:12]}...), not {now['path']} ({(now['sha256'] or '?')[:12]}...). "
            "Restore it, use a new output_dir, or pass --allow-data-change to continue anyway."
        )
    manifest.data["init_adapter"] = identity
    return path


def _train_stage(
    *,
    config: CurriculumConfig,
    stage: StageConfig,
    data: StageData | PairData,
    kind: str,
    precision: str,
    processing_class: Any,
    image_budget: dict[str, Any],
    previous_adapters: list[Path],
    manifest: Manifest,
    output_dir: Path,
    world_size: int,
    is_main: bool,
    callbacks: Sequence[Any],
) -> None:
    stage_kind = _STAGE_KINDS[stage.kind]
    settings = config.stage_settings(stage)
    hyperparameters = dataclasses.asdict(settings)
    hyperparameters.update({name: getattr(config, name) for name in _IMAGE_SETTINGS})
    manifest.check_settings(
        stage.name, {key: value for key, value in hyperparameters.items() if key not in _RESUMABLE_CHANGES}
    )
    stage_dir = output_dir / stage.name
    checkpoints_dir = stage_dir / "checkpoints"
    resume_from = last_complete_checkpoint(checkpoints_dir)
    is_vlm = kind == "vlm"
    args = _training_arguments(
        config, settings, precision, checkpoints_dir, world_size, stage.name, kind, stage_kind=stage.kind
    )

    # The length policy, on the whole stage file before the data is sharded: every process measures its share of
    # what is not cached yet and all of them get every length, so every process keeps the same rows.
    prepared = stage_kind.prepare(
        data,
        processing_class,
        is_vlm,
        processor_fingerprint(processing_class, is_vlm=is_vlm, image_budget=image_budget),
        output_dir / "lengths",
        args.distributed_state,  # the launch's processes, set up by the arguments as the Trainer's
        stage.name,
        settings,
    )
    report, unit, total_rows = prepared.report, prepared.unit, _rows(data)
    dropped = report.counts()
    if not report.kept:
        raise StageDataError(
            f"Stage {stage.name!r}: none of its {total_rows} {unit} fits in max_length {settings.max_length} "
            f"({', '.join(f'{count} {reason}' for reason, count in dropped.items())}). Raise max_length, or lower "
            "the image budget (image_max_tiles, image_max_pixels)."
        )
    if dropped:
        rows = data.pairs if isinstance(data, PairData) else data.samples
        logger.warning(
            "Stage %s: %d of %d %s left out because they do not fit in max_length %d (%s); nothing is cut. "
            "First ids: %s. All ids: %s",
            stage.name,
            report.dropped_total,
            total_rows,
            unit,
            settings.max_length,
            ", ".join(f"{count} {reason}: {REASONS[reason]}" for reason, count in dropped.items()),
            ", ".join([row.id for row in rows if row.id in report.dropped_ids][:5]),
            stage_dir / "dropped.json",
        )

    model, peft_config = build_stage_model(config, kind, precision, previous_adapters)
    if stage_kind.check_model is not None:
        stage_kind.check_model(model, stage.name)
    if is_vlm and "ddp_find_unused_parameters" not in config.extra_training_args:
        args.ddp_find_unused_parameters = _unused_parameters(model, peft_config, stage.name)
    trainer = stage_kind.trainer(
        model,
        args,
        prepared.dataset,
        processing_class,
        peft_config,
        [ManifestCallback(manifest, stage.name, output_dir), *callbacks],
        settings=settings,
    )
    trainable, total = count_parameters(trainer.model)
    logger.info(
        "Stage %s (%s): %d of %d %s (%d images) from %s, longest %d tokens; global batch %d = %d per device x %d "
        "accumulation x %d process(es); %s of %s parameters trainable; %s",
        stage.name,
        stage.kind,
        len(report.kept),
        total_rows,
        unit,
        prepared.images,
        data.path,
        report.longest_kept,
        settings.global_batch_size,
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        world_size,
        f"{trainable:,}",
        f"{total:,}",
        f"resuming from {resume_from}" if resume_from else "starting",
    )
    if is_main:
        write_dropped(stage_dir, report)
        entry = manifest.update_stage(
            stage.name,
            kind=stage.kind,
            status="running",
            **data.summary(),
            **prepared.record,
            dropped=dropped,
            longest_sequence=report.longest_kept,
            hyperparameters=hyperparameters,
            trainable_parameters=trainable,
        )
        entry.setdefault("started", _now())
        manifest.save()

    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        rewards = getattr(trainer, "grader_rewards", None)  # a grpo stage's judge and store
        if rewards is not None:
            rewards.close()
    adapter_dir = stage_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    if is_main:
        # TRL's frozen reference copy is the adapter this stage started from; the stage's adapter is its own alone.
        shutil.rmtree(adapter_dir / STRIPPED_ADAPTER, ignore_errors=True)
        last = last_complete_checkpoint(checkpoints_dir)
        metrics = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))}
        metrics.update(stage_kind.metrics(trainer.state.log_history))
        manifest.update_stage(
            stage.name,
            status="done",
            adapter=os.path.relpath(adapter_dir, output_dir),
            checkpoint=os.path.relpath(last, output_dir) if last else None,
            global_step=trainer.state.global_step,
            max_steps=trainer.state.max_steps,
            metrics=metrics,
            finished=_now(),
        )
        manifest.save()
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _export(
    config: CurriculumConfig,
    kind: str,
    precision: str,
    processing_class: Any,
    output_dir: Path,
    manifest: Manifest,
    adapters: list[Path],
) -> tuple[Path | None, Path | None]:
    """Copy the last stage's adapter to ``adapter/`` and, if asked, write the merged model to ``merged/``."""
    from peft import PeftModel

    adapter_dir = output_dir / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    shutil.copytree(adapters[-1], adapter_dir)
    merged_dir = None
    if config.save_merged_model or config.merge_between_stages:
        merged_dir = output_dir / "merged"
        complete = merged_dir / "config.json"
        final = manifest.data.get("final") or {}
        if not (complete.is_file() and final.get("merged_from") == [str(a) for a in adapters]):
            model = _load_base(config, kind, precision)
            chain = adapters if config.merge_between_stages else adapters[-1:]
            for adapter in chain:
                model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            if merged_dir.exists():
                shutil.rmtree(merged_dir)
            model.save_pretrained(str(merged_dir))
            processing_class.save_pretrained(str(merged_dir))
            del model
    manifest.data["final"] = {
        "adapter": os.path.relpath(adapter_dir, output_dir),
        "adapter_base": "base_model + earlier stages merged" if config.merge_between_stages else config.base_model,
        "merged": os.path.relpath(merged_dir, output_dir) if merged_dir else None,
        "merged_from": [str(a) for a in adapters] if merged_dir else None,
    }
    manifest.save()
    return adapter_dir, merged_dir
