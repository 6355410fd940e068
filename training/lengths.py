"""The length policy: no answer is ever cut. A sample that would not fit in ``max_length`` is left out and counted.

Every sample is measured once, exactly as the trainer will see it: the prompt rendered with the chat template and
run through the processor with its images (image tokens included), and the answer that follows it. Then:

- ``prompt_over_max_length``: the prompt alone (question, case text, image tokens) takes ``max_length`` tokens or
  more, so there is no room for any answer. Cutting the prompt is no way out either: it would cut image tokens
  apart from their pixels, or train an answer on a question the model never saw whole;
- ``answer_over_max_length``: the prompt fits but prompt + answer do not; training on it would teach a
  chain-of-thought that stops mid-sentence without its final answer.

Both are dropped, before the trainer sees the stage, so every process trains on the same samples (the decision is
made on the whole stage file before the data is sharded). Counts by reason go into the manifest, the log and the
model card; the ids into ``OUTPUT/<stage>/dropped.json``. Lengths are cached in ``OUTPUT/<stage>/lengths.json``
keyed by the stage file's hash and the processor's settings, so a resumed run does not measure again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .data import Sample
from .errors import StageDataError
from .sft import IGNORE_INDEX, flatten_content, vision_collator

__all__ = [
    "REASONS",
    "LengthReport",
    "measure_lengths",
    "apply_length_policy",
    "processor_fingerprint",
    "cached_lengths",
]

logger = logging.getLogger("training")

REASONS = {
    "prompt_over_max_length": "the prompt alone (images included) fills max_length: no room for the answer",
    "answer_over_max_length": "prompt + answer exceed max_length: the answer would be cut",
}
LENGTHS_FILE = "lengths.json"
DROPPED_FILE = "dropped.json"


@dataclass
class LengthReport:
    """Which samples a stage trains on, which it leaves out and why."""

    max_length: int
    kept: list[Sample]
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> sample ids, in file order
    longest_kept: int = 0

    def counts(self) -> dict[str, int]:
        return {reason: len(ids) for reason, ids in self.dropped.items() if ids}

    @property
    def dropped_total(self) -> int:
        return sum(len(ids) for ids in self.dropped.values())

    @property
    def dropped_ids(self) -> set[str]:
        return {sample_id for ids in self.dropped.values() for sample_id in ids}


def _common_prefix(left: Sequence[int], right: Sequence[int]) -> int:
    length = 0
    for a, b in zip(left, right, strict=False):
        if a != b:
            break
        length += 1
    return length


def _measure_text(tokenizer: Any, sample: Sample) -> tuple[int, int]:
    # As SFTTrainer tokenizes a conversational prompt-completion row: the answer starts where the prompt with the
    # generation prompt and the whole conversation part ways.
    prompt, completion = flatten_content(sample.prompt), flatten_content(sample.completion)
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)
    prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    prompt_length = _common_prefix(prompt_ids, full_ids)
    return prompt_length, len(full_ids) - prompt_length


def measure_lengths(samples: Sequence[Sample], processing_class: Any, *, is_vlm: bool) -> dict[str, list[int]]:
    """``{sample id: [prompt tokens, answer tokens]}``, counted as the trainer's collator builds the sequence:
    the very rows the trainer gets (images decoded by ``datasets``), one at a time through TRL's collator."""
    from .sft import stage_dataset

    lengths: dict[str, list[int]] = {}
    collator = vision_collator(processing_class) if is_vlm else None
    dataset = stage_dataset(samples, is_vlm=True) if is_vlm else None
    started, reported = time.monotonic(), time.monotonic()
    for index, sample in enumerate(samples):
        if is_vlm:
            try:
                example = dataset[index]
                batch = collator([example])
            except (OSError, ValueError) as exc:
                unreadable = [path for path in sample.images if not _readable(path)]
                if not unreadable:
                    raise
                raise StageDataError(
                    f"Sample {sample.id!r}: cannot read image {unreadable[0]}: {exc}. Fix or replace the file, or "
                    "rebuild the stage without this sample."
                ) from None
            total = int(batch["attention_mask"].sum())
            answer = int((batch["labels"] != IGNORE_INDEX).sum())
            lengths[sample.id] = [total - answer, answer]
        else:
            lengths[sample.id] = list(_measure_text(processing_class, sample))
        if time.monotonic() - reported > 30:
            reported = time.monotonic()
            logger.info("Measured %d/%d samples (%.0f s)", index + 1, len(samples), reported - started)
    return lengths


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError):
        return False
    return True


def apply_length_policy(
    samples: Sequence[Sample], lengths: dict[str, list[int]], max_length: int
) -> LengthReport:
    """Keep the samples whose whole sequence fits in ``max_length``; drop and record the others by reason."""
    report = LengthReport(max_length=max_length, kept=[], dropped={reason: [] for reason in REASONS})
    for sample in samples:
        prompt_tokens, answer_tokens = lengths[sample.id]
        if prompt_tokens >= max_length:
            report.dropped["prompt_over_max_length"].append(sample.id)
        elif prompt_tokens + answer_tokens > max_length:
            report.dropped["answer_over_max_length"].append(sample.id)
        else:
            report.kept.append(sample)
            report.longest_kept = max(report.longest_kept, prompt_tokens + answer_tokens)
    return report


def processor_fingerprint(processing_class: Any, *, is_vlm: bool, image_budget: dict[str, Any]) -> str:
    """What the measured lengths depend on besides the stage file: template, vocabulary, image settings, versions."""
    import transformers
    import trl

    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    image_processor = getattr(processing_class, "image_processor", None)
    described = {
        "is_vlm": is_vlm,
        "processor": type(processing_class).__name__,
        "image_processor": type(image_processor).__name__ if image_processor is not None else None,
        "image_processor_config": image_processor.to_json_string() if image_processor is not None else None,
        "image_budget": image_budget,
        "chat_template": getattr(processing_class, "chat_template", None) or getattr(tokenizer, "chat_template", None),
        "vocab_size": len(tokenizer),
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def cached_lengths(
    stage_dir: Path,
    samples: Sequence[Sample],
    processing_class: Any,
    *,
    is_vlm: bool,
    data_sha256: str,
    fingerprint: str,
    write: bool,
) -> dict[str, list[int]]:
    """The stage's lengths from ``stage_dir/lengths.json`` when it matches, else measured (and written if ``write``)."""
    path = Path(stage_dir) / LENGTHS_FILE
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            cached = {}
        if cached.get("data_sha256") == data_sha256 and cached.get("fingerprint") == fingerprint:
            lengths = cached.get("lengths") or {}
            if all(sample.id in lengths for sample in samples):
                return lengths
    started = time.monotonic()
    lengths = measure_lengths(samples, processing_class, is_vlm=is_vlm)
    logger.info("Measured %d samples in %.1f s", len(samples), time.monotonic() - started)
    if write:
        _write_json(path, {"data_sha256": data_sha256, "fingerprint": fingerprint, "lengths": lengths})
    return lengths


def write_dropped(stage_dir: Path, report: LengthReport) -> Path:
    path = Path(stage_dir) / DROPPED_FILE
    _write_json(
        path,
        {
            "max_length": report.max_length,
            "reasons": {reason: REASONS[reason] for reason in report.dropped},
            "dropped": report.dropped,
        },
    )
    return path


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)
