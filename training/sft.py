"""What a stage hands to TRL's ``SFTTrainer``: a prompt-completion dataset and, for a VLM, TRL's vision collator.

Each sample becomes one conversational prompt-completion row, ``{"id", "prompt", "completion", "images"}`` (image
paths, decoded lazily by ``datasets``). The loss is the completion's alone (TRL's ``completion_only_loss``):

- a vision-language model gets TRL's ``DataCollatorForVisionLanguageModeling``, which renders the prompt with the
  model's chat template and the generation prompt, runs the processor over it with the sample's images, and
  appends the rest of the rendered conversation (the answer and its end-of-turn tokens) as the only labelled part;
- a text-only model gets the same rows without images and with plain-string contents (text chat templates expect
  strings); ``SFTTrainer`` tokenizes them the same way and builds the labels itself.

TRL never truncates here (``max_length=None``): the length policy (:mod:`training.lengths`) has already left out
every sample that would not fit, so no answer is ever cut.
"""

from __future__ import annotations

from typing import Any, Sequence

from .data import Sample

__all__ = ["stage_records", "stage_dataset", "vision_collator", "flatten_content", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def flatten_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Text-only chat templates expect string contents: join the text parts."""
    flat = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content if part.get("type") == "text")
        flat.append({"role": message["role"], "content": content})
    return flat


def _structured(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every content as a list of ``{"type", "text"}`` parts, so that one Arrow schema holds every row."""
    structured = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = [{"type": part["type"], "text": part.get("text")} for part in content]
        structured.append({"role": message["role"], "content": parts})
    return structured


def stage_records(samples: Sequence[Sample], *, is_vlm: bool) -> list[dict[str, Any]]:
    """The samples as prompt-completion rows (image paths, not pixels)."""
    if is_vlm:
        return [
            {
                "id": sample.id,
                "prompt": _structured(sample.prompt),
                "completion": _structured(sample.completion),
                "images": list(sample.images),
            }
            for sample in samples
        ]
    return [
        {"id": sample.id, "prompt": flatten_content(sample.prompt), "completion": flatten_content(sample.completion)}
        for sample in samples
    ]


def _features(is_vlm: bool) -> Any:
    from datasets import Features, Image, List, Value

    if is_vlm:
        part = {"type": Value("string"), "text": Value("string")}
        message = {"role": Value("string"), "content": List(part)}
        return Features(
            {"id": Value("string"), "prompt": List(message), "completion": List(message), "images": List(Image())}
        )
    message = {"role": Value("string"), "content": Value("string")}
    return Features({"id": Value("string"), "prompt": List(message), "completion": List(message)})


def stage_dataset(samples: Sequence[Sample], *, is_vlm: bool) -> Any:
    """A ``datasets.Dataset`` of the samples for ``SFTTrainer``; images load (as RGB by the processor) per batch."""
    from datasets import Dataset

    return Dataset.from_list(stage_records(samples, is_vlm=is_vlm), features=_features(is_vlm))


def vision_collator(processor: Any) -> Any:
    """TRL's vision collator as ``SFTTrainer`` builds it for our rows: completion-only loss, no truncation."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    return DataCollatorForVisionLanguageModeling(processor=processor, max_length=None, completion_only_loss=True)
