"""Turning samples into training batches in which only the assistant's answer carries labels.

The prompt (every message before the last assistant message, with a generation prompt) is rendered with the
model's own chat template and run through the processor together with the sample's images; the answer is the
rest of the full rendering (the assistant's text and its end-of-turn token) and is tokenized as text. Labels are
``-100`` on the prompt, image and padding tokens, so the loss is the answer's alone. This works with any chat
template, with or without ``{% generation %}`` markers (most VLM templates have none).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from .errors import StageDataError
from .modeling import tokenizer_of

__all__ = ["CompletionOnlyCollator", "render_prompt_and_completion", "IGNORE_INDEX"]

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)


def _flatten_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Text-only chat templates expect string contents: join the text parts."""
    flat = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content if part.get("type") == "text")
        flat.append({**message, "content": content})
    return flat


def _without_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**m, "content": [p for p in m["content"] if p.get("type") != "image"]} if isinstance(m["content"], list) else m
        for m in messages
    ]


def render_prompt_and_completion(
    processing_class: Any, prompt: list[dict[str, Any]], completion: list[dict[str, Any]], *, is_vlm: bool
) -> tuple[str, str]:
    """The prompt as the model sees it at inference (with the generation prompt) and the answer that follows it."""
    if not is_vlm:
        prompt, completion = _flatten_content(prompt), _flatten_content(completion)
    prompt_text = processing_class.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = processing_class.apply_chat_template(prompt + completion, tokenize=False)
    # Templates that render the prompt differently alone (e.g. a reasoning model's empty <think> block) share a
    # common prefix with the full text: the answer is what follows it.
    common = 0
    for left, right in zip(prompt_text, full_text, strict=False):
        if left != right:
            break
        common += 1
    return full_text[:common], full_text[common:]


class CompletionOnlyCollator:
    """Batches rows ``{"id", "prompt", "completion", "images"}`` (image paths) for a VLM processor or a tokenizer."""

    def __init__(self, processing_class: Any, *, is_vlm: bool, max_length: int) -> None:
        self.processing_class = processing_class
        # Not named `tokenizer`: the Trainer would save any collator.tokenizer into every adapter folder.
        self.text_tokenizer = tokenizer_of(processing_class)
        self.is_vlm = is_vlm
        self.max_length = max_length
        self.pad_token_id = self.text_tokenizer.pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(row) for row in rows]
        return self._pad(encoded)

    def load_images(self, row: dict[str, Any]) -> list[Image.Image]:
        images = []
        for path in row["images"]:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except (OSError, ValueError) as exc:
                raise StageDataError(
                    f"Sample {row['id']!r}: cannot read image {path}: {exc}. Fix or replace the file, or rebuild the "
                    "stage without this sample."
                ) from None
        return images

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        """One sample's ``input_ids``, ``labels`` and processor outputs (``pixel_values``, ...), unpadded."""
        prompt_text, completion_text = render_prompt_and_completion(
            self.processing_class, row["prompt"], row["completion"], is_vlm=self.is_vlm
        )
        extras: dict[str, torch.Tensor] = {}
        if self.is_vlm:
            images = self.load_images(row)
            kwargs: dict[str, Any] = {"text": [prompt_text], "return_tensors": "pt", "add_special_tokens": False}
            if images:
                kwargs["images"] = [images]
            processed = self.processing_class(**kwargs)
            prompt_ids = processed["input_ids"][0].tolist()
            for key, value in processed.items():
                if key not in {"input_ids", "attention_mask"} and isinstance(value, torch.Tensor):
                    extras[key] = value
        else:
            prompt_ids = self.text_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completion_ids = self.text_tokenizer(completion_text, add_special_tokens=False)["input_ids"]

        if len(prompt_ids) >= self.max_length:
            return self._overlong(row, len(prompt_ids))
        completion_ids = completion_ids[: self.max_length - len(prompt_ids)]
        input_ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        # Per-token processor outputs (token_type_ids, mm_token_type_ids) get zeros over the answer.
        sequence_extras = {}
        for key in list(extras):
            value = extras[key]
            if value.dim() == 2 and value.shape == (1, len(prompt_ids)):
                sequence_extras[key] = value[0].tolist() + [0] * len(completion_ids)
                del extras[key]
        return {"input_ids": input_ids, "labels": labels, "sequence_extras": sequence_extras, "extras": extras}

    def _overlong(self, row: dict[str, Any], prompt_length: int) -> dict[str, Any]:
        # Cutting a prompt could cut image tokens apart from their pixels, so the sample is kept out of the loss
        # instead: its text alone, without images, cut to max_length and with no labels.
        logger.warning(
            "Sample %r: the prompt is %d tokens (images included), not less than max_length %d; it is skipped "
            "(no loss). Raise max_length or lower the image resolution to train on it.",
            row["id"],
            prompt_length,
            self.max_length,
        )
        prompt = _without_images(row["prompt"]) if self.is_vlm else row["prompt"]
        prompt_text, _ = render_prompt_and_completion(
            self.processing_class, prompt, row["completion"], is_vlm=self.is_vlm
        )
        ids = self.text_tokenizer(prompt_text, add_special_tokens=False)["input_ids"][: self.max_length]
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "sequence_extras": {}, "extras": {}}

    def _pad(self, encoded: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in encoded)
        batch: dict[str, Any] = {
            "input_ids": torch.full((len(encoded), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(encoded), length), dtype=torch.long),
            "labels": torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long),
        }
        sequence_keys = sorted({key for item in encoded for key in item["sequence_extras"]})
        for key in sequence_keys:
            batch[key] = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, item in enumerate(encoded):
            size = len(item["input_ids"])
            batch["input_ids"][row, :size] = torch.tensor(item["input_ids"], dtype=torch.long)
            batch["attention_mask"][row, :size] = 1
            batch["labels"][row, :size] = torch.tensor(item["labels"], dtype=torch.long)
            for key, values in item["sequence_extras"].items():
                batch[key][row, :size] = torch.tensor(values, dtype=torch.long)
        # Image tensors (pixel_values, image_grid_thw, image_sizes, ...) are stacked along their first dimension,
        # in sample order, as the processors lay them out for a batch.
        extra_keys = sorted({key for item in encoded for key in item["extras"]})
        for key in extra_keys:
            parts = [item["extras"][key] for item in encoded if key in item["extras"]]
            batch[key] = torch.cat(parts, dim=0)
        return batch
