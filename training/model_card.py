"""The model card (``OUTPUT/README.md``): base model, data with sizes and hashes, stage metrics, how to use."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import CurriculumConfig
    from .manifest import Manifest

__all__ = ["write_model_card", "render_model_card"]


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _stage_row(entry: dict[str, Any]) -> str:
    metrics = entry.get("metrics") or {}
    settings = entry.get("hyperparameters") or {}
    cells = [
        entry["name"],
        entry.get("kind", "sft"),
        entry.get("status", ""),
        f"`{entry.get('data', '')}`",
        entry.get("samples", entry.get("pairs", "")),
        entry.get("trained_samples", entry.get("trained_pairs", entry.get("trained_prompts", ""))),
        sum((entry.get("dropped") or {}).values()) if "dropped" in entry else "",
        entry.get("images", ""),
        f"`{(entry.get('data_sha256') or '')[:16]}`",
        entry.get("global_step", ""),
        _number(settings.get("learning_rate")),
        _number(metrics.get("first_logged_loss")),
        _number(metrics.get("last_logged_loss")),
        _number(metrics.get("train_loss")),
    ]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _preference_lines(manifest: "Manifest") -> list[str]:
    """What each dpo stage did: its pairs, its DPO settings, the reference, and TRL's last reward statistics."""
    lines = []
    for entry in manifest.stages:
        if entry.get("kind") != "dpo" or entry.get("status") not in {"done", "running"}:
            continue
        settings = entry.get("hyperparameters") or {}
        metrics = entry.get("metrics") or {}
        rewards = ", ".join(
            f"{key} {_number(metrics[key])}"
            for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
            if key in metrics
        )
        lines.append(
            f"- {entry['name']} (dpo): {entry.get('trained_pairs', '?')} of {entry.get('pairs', '?')} step preference "
            f"pairs, beta {_number(settings.get('beta'))}, loss {settings.get('loss_type')}, reference: the adapter "
            "the stage started from" + (f"; last logged {rewards}" if rewards else "")
        )
    if not lines:
        return []
    return ["Preference stages (DPO on sibling steps of the MICS trees; each step is a continuation of the path so "
            "far, with no end-of-turn after it):", "", *lines, ""]


def _reinforcement_lines(manifest: "Manifest") -> list[str]:
    """What each grpo stage did: its prompts and generation settings, its rewards (weights, definitions, how open
    answers were graded, the grader version), the completions a judge outage left out, and the logged rewards."""
    lines = []
    for entry in manifest.stages:
        if entry.get("kind") != "grpo" or entry.get("status") not in {"done", "running"}:
            continue
        settings = entry.get("hyperparameters") or {}
        metrics = entry.get("metrics") or {}
        rewards = entry.get("rewards") or {}
        functions = rewards.get("functions") or {}
        open_answers = f"by the judge `{rewards['judge']}`" if rewards.get("judge") else "by recall (no judge)"
        logged = [
            f"{label} {_number(metrics[f'first_logged_{key}'])} -> {_number(metrics[f'last_logged_{key}'])}"
            for key, label in [("reward", "reward"), *((f"{name}_reward", name) for name in functions)]
            if f"first_logged_{key}" in metrics
        ]
        unscored = metrics.get("unscored_completions")
        lines.append(
            f"- {entry['name']} (grpo): {entry.get('trained_prompts', '?')} of {entry.get('samples', '?')} prompts, "
            f"{settings.get('num_generations')} completions each of at most {settings.get('max_completion_length')} "
            f"tokens, temperature {_number(settings.get('temperature'))}, loss {settings.get('loss_type')}, beta "
            f"{_number(settings.get('beta'))}; open answers {open_answers}, grader version "
            f"{rewards.get('grader_version', '?')}"
            + (f"; {unscored} completions left out for a judge outage" if unscored is not None else "")
            + (f"; first -> last logged: {', '.join(logged)}" if logged else "")
        )
        lines += [
            f"  - {name} (weight {_number(function['weight'])}): {function['definition']}"
            for name, function in functions.items()
        ]
    if not lines:
        return []
    return ["Reinforcement stages (GRPO; the reward is the weighted sum of the functions below, each logged apart):",
            "", *lines, ""]


def _dropped_lines(manifest: "Manifest") -> list[str]:
    from .lengths import REASONS

    budget = manifest.data.get("image_budget") or {}
    lines = []
    if budget:
        lines += [
            "Image budget: " + ", ".join(f"{key} {value}" for key, value in budget.items()) + " (saved with the "
            "processor in `adapter/` and `merged/`).",
            "",
        ]
    lines += [
        "Length policy: no answer was cut. A sample longer than max_length was left out of its stage, and a pair "
        "where prompt + chosen or prompt + rejected is, and a grpo prompt that leaves no room for "
        "max_completion_length (ids in `<stage>/dropped.json`):",
        "",
    ]
    for entry in manifest.stages:
        if "dropped" not in entry:
            continue
        max_length = (entry.get("hyperparameters") or {}).get("max_length")
        counts = entry.get("dropped") or {}
        reasons = "; ".join(f"{count} {reason} ({REASONS.get(reason, reason)})" for reason, count in counts.items())
        lines.append(f"- {entry['name']} (max_length {max_length}): {reasons or 'none left out'}")
    return lines + [""]


def _task_format_lines(config: "CurriculumConfig") -> list[str]:
    """The prompt format the curriculum's question samples were built with (``task_format.json`` of the
    dataset builder), which ``mics eval`` asks in too."""
    path = Path(config.curriculum_dir) / "task_format.json" if config.curriculum_dir else None
    if path is None or not path.is_file():
        return []
    task = json.loads(path.read_text(encoding="utf-8"))
    return [
        "## Prompt format",
        "",
        f"Question samples were built with the task format `mics eval` uses (template `{task['template']}`, "
        f"version `{task['template_version']}`): the user turn is",
        "",
        "```",
        task["user_turn"],
        "```",
        "",
        f"and every target ends with `{task['target_ends_with']}`. Ask the model in this format "
        "(`mics eval` does) to measure what it was taught.",
        "",
    ]


def _image_budget_flag(manifest: "Manifest") -> str:
    """The vLLM flag that serves the model with the image budget it was trained with: vLLM takes the base
    model's processor for an adapter, so without it images are cut to the base model's own budget."""
    budget = manifest.data.get("image_budget") or {}
    if not budget:
        return ""
    from mics_agents.serve import vllm_image_kwargs

    return " --mm-processor-kwargs " + shlex.quote(json.dumps(vllm_image_kwargs(budget), sort_keys=True))


def render_model_card(config: "CurriculumConfig", manifest: "Manifest") -> str:
    final = manifest.data.get("final") or {}
    budget_flag = _image_budget_flag(manifest)
    is_vlm = manifest.data.get("model_kind") == "vlm"
    model_class = "AutoModelForImageTextToText" if is_vlm else "AutoModelForCausalLM"
    lines = [
        "---",
        f"base_model: {config.base_model}",
        "library_name: peft",
        f"pipeline_tag: {'image-text-to-text' if is_vlm else 'text-generation'}",
        "tags: [lora, medical, chain-of-thought, mics, curriculum]",
        "---",
        "",
        f"# Curriculum fine-tune of {config.base_model}",
        "",
        "LoRA fine-tune on the Chiron-o1 curriculum (MICS reasoning data), stage by stage (`python -m training`: "
        "TRL's SFTTrainer for sft stages, TRL's DPOTrainer on step preference pairs for dpo stages, TRL's "
        "GRPOTrainer with the project's grader as reward for grpo stages).",
        f"LoRA r={config.lora_r}, alpha={config.lora_alpha}, dropout={config.lora_dropout} on the language model; "
        "vision tower and projector frozen; only the assistant's answers carry loss.",
        "",
        "## Data and metrics",
        "",
        "| stage | kind | status | stage file | samples (pairs, prompts) | trained | dropped | images | sha256 | steps "
        "| lr | first loss | last loss | train loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(_stage_row(entry) for entry in manifest.stages),
        "",
        *_preference_lines(manifest),
        *_reinforcement_lines(manifest),
        *_dropped_lines(manifest),
        "Sources per stage:",
        "",
    ]
    for entry in manifest.stages:
        sources = ", ".join(f"{name or '(none)'}: {count}" for name, count in (entry.get("sources") or {}).items())
        lines.append(f"- {entry['name']}: {sources or '(empty)'}")
    lines += ["", "Hyperparameters per stage, checkpoints and full hashes are in `manifest.json`.", ""]
    if manifest.data.get("init_adapter"):
        lines += [f"The first stage continued the adapter `{manifest.data['init_adapter']['path']}` (init_adapter).", ""]
    lines += _task_format_lines(config)
    lines += ["## Use", ""]
    if config.merge_between_stages:
        lines += ["The stages were merged into the weights between stages: use the merged model in `merged/`.", ""]
    else:
        lines += [
            "```python",
            "from peft import PeftModel",
            f"from transformers import {model_class}",
            "",
            f'base = {model_class}.from_pretrained("{config.base_model}")',
            'model = PeftModel.from_pretrained(base, "adapter")  # this folder\'s adapter/',
            "```",
            "",
            "Serve with vLLM"
            + (" at the image budget it was trained with (vLLM applies one budget to every adapter of a server), "
               "or with `mics serve` (`lora_modules: {curriculum: OUTPUT/adapter}`), which reads it from `adapter/`:"
               if budget_flag else ":"),
            "",
            "```bash",
            f"vllm serve {shlex.quote(config.base_model)} --enable-lora --max-lora-rank {config.lora_r} "
            f"--lora-modules {shlex.quote('curriculum=' + str(Path(config.output_dir).absolute() / 'adapter'))}"
            f"{budget_flag}",
            "```",
            "",
        ]
    if final.get("merged"):
        merged = Path(config.output_dir).absolute() / final["merged"]
        lines += [
            f"Merged model: `{final['merged']}/` (loads and serves like the base model"
            + ("; serve it at its trained image budget):" if budget_flag else "):"),
            "",
            "```bash",
            f"vllm serve {shlex.quote(str(merged))}{budget_flag}",
            "```",
            "",
        ]
    return "\n".join(lines)


def write_model_card(output_dir: Path, config: "CurriculumConfig", manifest: "Manifest") -> Path:
    path = Path(output_dir) / "README.md"
    path.write_text(render_model_card(config, manifest), encoding="utf-8")
    return path
