"""The preference stage (``kind: dpo``): TRL's ``DPOTrainer`` with its vision preference collator on step pairs.

What TRL is given, and why:

- **Rows rendered here, as text.** A pair's prompt ends with the path so far as an assistant message, and its chosen
  and rejected steps continue that message. TRL renders a conversational pair as prompt + chosen as two messages: the
  path would close its turn and the step would open a second assistant turn, and the step would end with the
  end-of-turn tokens. So each prompt is rendered with the model's chat template here (``continue_final_message``
  after the path and a blank line, or the generation prompt at depth 1), and chosen/rejected are the step texts
  alone, as TRL's standard (non-conversational) preference rows. TRL's ``DataCollatorForVisionPreference`` still
  does the rest: images through the processor with the prompt, the steps tokenized after it, and a completion mask
  that covers the step's tokens only. A step is not the end of an answer, so no end-of-turn token follows it: the
  loss would otherwise teach the model to stop after every step it prefers (and to go on after one it rejects).
- **The reference is the adapter the stage starts from.** Continuing the curriculum's adapter, TRL copies it into a
  frozen ``ref`` adapter and computes the reference log-probabilities with it (DPO's reference must be the SFT
  policy, not the base model the SFT adapter was trained away from). With a fresh adapter (no stage before, or
  ``merge_between_stages``) the reference is the model with the adapter disabled, which is the same starting point.
- **Never truncated.** ``max_length=None`` for TRL; the length policy (:mod:`training.lengths`) measures prompt +
  chosen and prompt + rejected through this very collator and leaves out every pair where either does not fit.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

from .data import Sample
from .errors import StageDataError, TrainingConfigError
from .lengths import REASONS, LengthReport
from .pairs import Pair, message_text

__all__ = [
    "SEPARATOR",
    "render_prompt",
    "pair_records",
    "pair_dataset",
    "preference_collator",
    "iter_side_lengths",
        "apply_pair_length_policy",
    "dpo_metrics",
    "check_dpo_model",
    "STRIPPED_ADAPTER",
]

logger = logging.getLogger("training")

# Steps of a path are '### Step k: ...' blocks joined by a blank line (the mentors' output format), so the next step
# follows the path after one.
SEPARATOR = "\n\n"
# The frozen copy of the starting adapter that TRL keeps as the reference; it is the previous stage's adapter, so the
# stage's own adapter folder does not keep it.
STRIPPED_ADAPTER = "ref"
DPO_LOG_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def render_prompt(processing_class: Any, user: list[dict[str, Any]], path: str) -> str:
    """The prompt as the model sees it before the next step: the user turn, the assistant header, the path so far."""
    if not path:
        return processing_class.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    messages = [*user, {"role": "assistant", "content": [{"type": "text", "text": path + SEPARATOR}]}]
    text = processing_class.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    if not text.endswith(SEPARATOR):  # a template that trims a message's trailing blank line
        text = text.rstrip() + SEPARATOR
    return text


def _side_parts(sample: Sample) -> tuple[list[dict[str, Any]], str, str]:
    prompt = sample.prompt
    path = message_text(prompt[-1]) if prompt[-1]["role"] == "assistant" else ""
    user = prompt[:-1] if path else prompt
    return user, path, message_text(sample.completion[0])


def pair_records(pairs: Sequence[Pair], processing_class: Any) -> list[dict[str, Any]]:
    """The pairs as TRL's standard preference rows with images: rendered prompt, chosen and rejected step texts."""
    return [
        {
            "id": pair.id,
            "prompt": render_prompt(processing_class, pair.user, pair.path),
            "chosen": pair.chosen,
            "rejected": pair.rejected,
            "images": list(pair.images),
        }
        for pair in pairs
    ]


def _dataset(records: list[dict[str, Any]]) -> Any:
    from datasets import Dataset, Features, Image, List, Value

    features = Features(
        {
            "id": Value("string"),
            "prompt": Value("string"),
            "chosen": Value("string"),
            "rejected": Value("string"),
            "images": List(Image()),
        }
    )
    return Dataset.from_list(records, features=features)


def pair_dataset(pairs: Sequence[Pair], processing_class: Any) -> Any:
    """A ``datasets.Dataset`` of the pairs for ``DPOTrainer``; images load (decoded by ``datasets``) per batch."""
    return _dataset(pair_records(pairs, processing_class))


def preference_collator(processor: Any) -> Any:
    """TRL's vision preference collator as ``DPOTrainer`` builds it for our rows: no truncation."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    return DataCollatorForVisionPreference(processor=processor, max_length=None)


def iter_side_lengths(sides: Sequence[Sample], processing_class: Any) -> Iterator[list[int]]:
    """``[prompt tokens, step tokens]`` of each side (prompt + one step), counted by TRL's preference collator on the
    very row the trainer gets (the step in both the chosen and the rejected place)."""
    collator = preference_collator(processing_class)
    records = []
    for side in sides:
        user, path, step = _side_parts(side)
        records.append(
            {
                "id": side.id,
                "prompt": render_prompt(processing_class, user, path),
                "chosen": step,
                "rejected": step,
                "images": list(side.images),
            }
        )
    dataset = _dataset(records) if records else None
    for index, side in enumerate(sides):
        try:
            batch = collator([dataset[index]])
        except (OSError, ValueError) as exc:
            raise StageDataError(f"Pair side {side.id!r}: cannot be processed ({exc}). Check its images.") from None
        total = int(batch["attention_mask"][0].sum())
        step = int(batch["completion_mask"][0].sum())
        yield [total - step, step]


def apply_pair_length_policy(pairs: Sequence[Pair], lengths: dict[str, list[int]], max_length: int) -> LengthReport:
    """Keep a pair when prompt + chosen and prompt + rejected both fit in ``max_length``; drop it and say why else."""
    report = LengthReport(max_length=max_length, kept=[], dropped={reason: [] for reason in REASONS})
    for pair in pairs:
        (prompt, chosen), (_, rejected) = lengths[f"{pair.id}:chosen"], lengths[f"{pair.id}:rejected"]
        if prompt >= max_length:
            report.dropped["prompt_over_max_length"].append(pair.id)
        elif prompt + max(chosen, rejected) > max_length:
            report.dropped["answer_over_max_length"].append(pair.id)
        else:
            report.kept.append(pair)
            report.longest_kept = max(report.longest_kept, prompt + max(chosen, rejected))
    return report


def dpo_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The stage's DPO numbers from TRL's logs: first and last loss, and the last logged reward statistics."""
    logged = [entry for entry in log_history if "loss" in entry]
    if not logged:
        return {}
    metrics: dict[str, Any] = {
        "first_logged_loss": logged[0]["loss"],
        "last_logged_loss": logged[-1]["loss"],
        "logged_losses": len(logged),
    }
    for key in DPO_LOG_KEYS:
        if key in logged[-1]:
            metrics[key] = logged[-1][key]
    return metrics


def check_dpo_model(model: Any, stage: str) -> None:
    """Refuse a model TRL's DPO cannot score before any step runs, saying why and what to do.

    TRL computes the log-probabilities of a pair with a fused LM head: the backbone (the model's ``base_model``)
    must return ``last_hidden_state`` and the output embedding must be a linear layer it can project with.
    """
    from torch import nn

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(inner).__name__
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    backbone = getattr(inner, "base_model", None)
    problem = None
    if getattr(inner.config, "is_encoder_decoder", False):
        problem = "it is an encoder-decoder model, and TRL scores a pair as one decoder-only sequence"
    elif not isinstance(head, nn.Linear):
        problem = f"its LM head is {type(head).__name__ if head is not None else 'missing'}, not a linear layer"
    elif backbone is None or backbone is inner:
        problem = "it has no separate language backbone (base_model) whose hidden states the head projects"
    if problem:
        raise TrainingConfigError(
            f"Stage {stage!r} (dpo): TRL's DPOTrainer cannot train {name}: {problem}. The preference stage needs a "
            "decoder-only image-text-to-text model (LLaVA, Qwen2.5-VL, InternVL '-hf' and the like); use such a "
            "base model, or remove the dpo stage from the config."
        )
