"""Loading the base model and its processor, and putting LoRA on the language model only.

A vision-language model loads with ``AutoModelForImageTextToText`` + ``AutoProcessor``; a text-only causal LM
with ``AutoModelForCausalLM`` + ``AutoTokenizer``. LoRA goes on every linear layer of the language model (the
module ``get_decoder()`` returns), so the vision tower, the projector and the LM head stay frozen.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError, TrainingConfigError

__all__ = [
    "detect_model_kind",
    "load_processing_class",
    "load_base_model",
    "language_model_target_modules",
    "trained_outside_language_model",
    "resolve_dtype",
    "tokenizer_of",
    "apply_image_budget",
]

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(precision: str) -> str:
    """'auto' means bf16 on a GPU that has it and fp32 otherwise (CPU, older GPUs)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _model_hint(base_model: str) -> str:
    if Path(base_model).exists():
        return f"The folder {base_model} must hold config.json and the weights (save_pretrained output)"
    if base_model.startswith(("/", ".", "~")) or base_model.count("/") > 1:
        return f"There is no folder {base_model}: check base_model"
    return (
        f"{base_model!r} is not a local folder, so it is read as a Hugging Face id: download it first "
        "(huggingface-cli download) or give the local folder; with HF_HUB_OFFLINE=1 it must be in the cache"
    )


def _reason(exc: BaseException) -> str:
    return str(exc).strip().rstrip(".")


def detect_model_kind(base_model: str, model_kind: str, *, trust_remote_code: bool = False) -> str:
    """'vlm' or 'text', from the config's model type unless the user said which."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Cannot read the config of base model {base_model!r}: {_reason(exc)}. {_model_hint(base_model)}."
        ) from None
    if model_kind != "auto":
        return model_kind
    auto_map = getattr(config, "auto_map", None) or {}
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or "AutoModelForImageTextToText" in auto_map:
        return "vlm"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in auto_map:
        return "text"
    raise ModelLoadError(
        f"Base model {base_model!r} (model_type {config.model_type!r}) is neither an image-text-to-text model nor a "
        "causal LM that transformers knows. Use a '-hf' checkpoint (e.g. OpenGVLab/InternVL3-2B-hf), or set "
        "model_kind and trust_remote_code: true for a model with its own code."
    )


def tokenizer_of(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


def load_processing_class(base_model: str, kind: str, *, trust_remote_code: bool = False) -> Any:
    """The processor (VLM) or tokenizer (text), with a pad token and a chat template checked."""
    from transformers import AutoProcessor, AutoTokenizer

    loader = AutoProcessor if kind == "vlm" else AutoTokenizer
    try:
        processing_class = loader.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        extra = ""
        if "torchvision" in str(exc).lower():
            extra = " This processor needs torchvision: pip install torchvision matching your torch version."
        raise ModelLoadError(
            f"Cannot load the {loader.__name__} of {base_model!r}: {_reason(exc)}.{extra} {_model_hint(base_model)}."
        ) from None
    if kind == "vlm" and not hasattr(processing_class, "tokenizer"):
        raise ModelLoadError(
            f"AutoProcessor of {base_model!r} gave a {type(processing_class).__name__} without an image processor; "
            "it looks like a text-only model: set model_kind: text"
        )
    tokenizer = tokenizer_of(processing_class)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ModelLoadError(f"The tokenizer of {base_model!r} has neither a pad nor an eos token; add one")
    if not getattr(processing_class, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"{base_model!r} has no chat template, so conversations cannot be rendered. Use the instruct/chat "
            "variant of the model, or add a chat_template.jinja to the model folder."
        )
    return processing_class


def load_base_model(
    base_model: str,
    kind: str,
    *,
    precision: str,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    loader = AutoModelForImageTextToText if kind == "vlm" else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": _DTYPES[precision], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = loader.from_pretrained(base_model, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        other = "model_kind: text" if kind == "vlm" else "model_kind: vlm"
        raise ModelLoadError(
            f"Cannot load base model {base_model!r} with {loader.__name__}: {_reason(exc)}. {_model_hint(base_model)}; "
            f"if it is the other kind of model, set {other}."
        ) from None
    model.requires_grad_(False)
    return model


def _language_model_prefix(model: nn.Module) -> str | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return next((name for name, module in model.named_modules() if module is decoder and name), None)


def language_model_target_modules(model: nn.Module) -> str:
    """A PEFT ``target_modules`` regex naming every linear layer inside the language model.

    The regex ends in ``(name|name...)$`` so vLLM's adapter loader can read the module names from it.
    """
    prefix = _language_model_prefix(model)
    if prefix is None:
        raise TrainingConfigError(
            f"Cannot find the language model inside {type(model).__name__} to put LoRA on; set "
            "lora_target_modules to a list of module names or a regex"
        )
    leaves = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name.startswith(prefix + ".") and isinstance(module, nn.Linear)
        }
    )
    if not leaves:
        raise TrainingConfigError(f"The language model {prefix!r} has no linear layers; set lora_target_modules")
    return rf"^{re.escape(prefix)}\..*\.({'|'.join(leaves)})$"


def trained_outside_language_model(model: nn.Module, lora_config: Any) -> list[str]:
    """The modules outside the language model that the stage will train: [] when LoRA stays inside it.

    ``lora_config``: the fresh adapter's config, or None for a model that carries its (trainable) adapter already.
    Unknown is never taken for inside: a model whose language model cannot be found, or PEFT's ``all-linear``,
    counts as reaching everything.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    prefix = _language_model_prefix(model)
    if prefix is None:
        return ["<the whole model: no language model found>"]
    inside = prefix + "."
    if lora_config is None:
        return sorted(
            {
                name.rsplit(".", 1)[0]
                for name, parameter in model.named_parameters()
                if parameter.requires_grad and not name.startswith(inside)
            }
        )
    if lora_config.target_modules == "all-linear":
        return ["<all-linear>"]
    return [
        name
        for name, _ in model.named_modules()
        if name and not name.startswith(inside) and check_target_module_exists(lora_config, name)
    ]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def apply_image_budget(
    processing_class: Any, *, max_tiles: int, min_pixels: int | None = None, max_pixels: int | None = None
) -> dict[str, Any]:
    """Set how many image tokens an image may cost, on the processor itself, and return what was set.

    Tiling processors (InternVL's, ``max_patches``) get ``max_tiles``; pixel-budget processors (Qwen2-VL/2.5-VL,
    ``size.shortest_edge``/``size.longest_edge``) get ``min_pixels``/``max_pixels`` where given. The settings stay on
    the processor, so they are saved with every checkpoint, adapter and merged model and serve the same way.
    Pixel settings on a processor without a pixel budget are an error rather than silently ignored.
    """
    image_processor = getattr(processing_class, "image_processor", None)
    applied: dict[str, Any] = {}
    if image_processor is None:
        return applied
    name = type(image_processor).__name__
    if hasattr(image_processor, "max_patches"):
        image_processor.max_patches = max_tiles
        applied["max_patches"] = max_tiles
        if getattr(image_processor, "min_patches", 1) > max_tiles:
            image_processor.min_patches = max_tiles
    size = getattr(image_processor, "size", None)
    has_pixel_budget = size is not None and "longest_edge" in _size_keys(size) and hasattr(image_processor, "merge_size")
    if min_pixels is not None or max_pixels is not None:
        if not has_pixel_budget:
            raise TrainingConfigError(
                f"image_min_pixels/image_max_pixels apply to processors with a pixel budget (Qwen2-VL, Qwen2.5-VL); "
                f"this model's image processor is {name}: unset them"
                + (" and use image_max_tiles" if "max_patches" in applied else "")
            )
        values = dict(_size_items(size))
        if min_pixels is not None:
            values["shortest_edge"] = min_pixels
        if max_pixels is not None:
            values["longest_edge"] = max_pixels
        if values["shortest_edge"] > values["longest_edge"]:
            raise TrainingConfigError(
                f"image_min_pixels {values['shortest_edge']} exceeds the processor's max_pixels {values['longest_edge']}"
            )
        image_processor.size = type(size)(**values) if not isinstance(size, dict) else values
    if has_pixel_budget:
        values = dict(_size_items(image_processor.size))
        applied["min_pixels"], applied["max_pixels"] = values["shortest_edge"], values["longest_edge"]
    return applied


def _size_items(size: Any) -> list[tuple[str, Any]]:
    if isinstance(size, dict):
        return [(key, value) for key, value in size.items() if value is not None]
    return [(key, getattr(size, key)) for key in _size_keys(size)]


def _size_keys(size: Any) -> list[str]:
    if isinstance(size, dict):
        return [key for key, value in size.items() if value is not None]
    keys = getattr(size, "__dataclass_fields__", None) or vars(size)
    return [key for key in keys if getattr(size, key, None) is not None]
