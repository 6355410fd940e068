"""Refusing a sharded-parameter setup (FSDP, DeepSpeed ZeRO-3) on stages that mix text-only and image samples.

With parameters sharded across processes, every process must run the same modules each step: a forward of the
vision tower gathers its shards from every rank. A stage that mixes text-only and image samples gives some rank,
some step, a batch without an image while another rank has one; that rank skips the vision tower and the others
wait for it forever (the known hang of vision-language models under FSDP/ZeRO-3). ZeRO-1/2 and DDP keep whole
parameters on every process and are not affected, so the run is refused at the start with that advice, before any
model loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import TrainingConfigError

__all__ = ["sharded_parameters", "check_mixed_stages"]


def _true(value: Any) -> bool:
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def _zero_stage_of(config_file: str | None) -> int | None:
    if not config_file or not Path(config_file).is_file():
        return None
    try:
        data = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    stage = (data.get("zero_optimization") or {}).get("stage")
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None


def sharded_parameters(
    deepspeed: str | None, extra_training_args: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> str | None:
    """How parameters are sharded across processes in this launch (a phrase for a message), or None."""
    environ = os.environ if environ is None else environ
    if extra_training_args.get("fsdp") or extra_training_args.get("fsdp_config"):
        return "FSDP (extra_training_args.fsdp)"
    if _true(environ.get("ACCELERATE_USE_FSDP", "")):
        return "FSDP (accelerate launch with an FSDP config)"
    if _zero_stage_of(deepspeed) == 3:
        return f"DeepSpeed ZeRO-3 ({deepspeed})"
    if _true(environ.get("ACCELERATE_USE_DEEPSPEED", "")):
        stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or _zero_stage_of(
            environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        )
        if str(stage) == "3":
            return "DeepSpeed ZeRO-3 (accelerate launch with a DeepSpeed config)"
    return None


def check_mixed_stages(mix: Mapping[str, tuple[int, int]], sharding: str | None) -> None:
    """``mix``: stage -> (samples with images, text-only samples). Refuse a sharded launch on a mixed stage."""
    if sharding is None:
        return
    mixed = {stage: counts for stage, counts in mix.items() if counts[0] and counts[1]}
    if not mixed:
        return
    details = ", ".join(f"{stage} ({images} with images, {texts} text-only)" for stage, (images, texts) in mixed.items())
    raise TrainingConfigError(
        f"{sharding} shards the parameters across processes, and stages that mix text-only and image samples "
        f"would hang it: a process whose batch has no image skips the vision tower while the others wait for its "
        f"shards. Mixed stages: {details}. Use DeepSpeed ZeRO-1 or ZeRO-2 (training/configs/deepspeed_zero1.json) "
        "or plain DDP (torchrun without --deepspeed), or give each such stage only image samples or only text-only "
        "samples (two stages)."
    )
