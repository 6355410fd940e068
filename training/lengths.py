"""The length policy: no answer is ever cut. A sample that would not fit in ``max_length`` is left out and counted.

Every distinct sample is measured once, exactly as the trainer will see it: the prompt rendered with the chat
template and run through the processor with its images (image tokens included), and the answer that follows it.
Then:

- ``prompt_over_max_length``: the prompt alone (question, case text, image tokens) takes ``max_length`` tokens or
  more, so there is no room for any answer. Cutting the prompt is no way out either: it would cut image tokens
  apart from their pixels, or train an answer on a question the model never saw whole;
- ``answer_over_max_length``: the prompt fits but prompt + answer do not; training on it would teach a
  chain-of-thought that stops mid-sentence without its final answer.

A dpo stage's pair is measured as its two sides, prompt + chosen and prompt + rejected, through TRL's preference
collator (:mod:`training.dpo`), and is dropped when either side would be (the step is the answer there).

Both are dropped, before the trainer sees the stage, so every process trains on the same samples (the decision is
made on the whole stage file before the data is sharded). Counts by reason go into the manifest, the log and the
model card; the ids into ``OUTPUT/<stage>/dropped.json``.

Measuring is the slow part (tens of ms per image sample, tens of thousands of samples), so it is shared and kept:

- a sample is keyed by what its length depends on (messages, image sizes, processor settings), so the copies of a
  repeated source and the same sample in another stage are measured once;
- every process measures its own share of what is not yet known, while the others measure theirs: no process waits
  in a collective for longer than the slowest share takes (never for a whole stage measured by rank 0);
- each process appends every length it measures to ``OUTPUT/lengths/rank-<N>.jsonl`` as it goes, so a run killed
  while measuring resumes with what it had, and a rerun with another ``max_length`` measures nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .data import Sample
from .errors import StageDataError
from .sft import IGNORE_INDEX, flatten_content, vision_collator

__all__ = [
    "REASONS",
    "LengthReport",
    "iter_lengths",
    "measure_lengths",
    "stage_lengths",
    "sample_keys",
    "read_length_cache",
    "apply_length_policy",
    "processor_fingerprint",
]

logger = logging.getLogger("training")

REASONS = {
    "prompt_over_max_length": "the prompt alone (images included) fills max_length: no room for the answer",
    "answer_over_max_length": "prompt + answer exceed max_length: the answer would be cut",
}
CACHE_SUFFIX = ".jsonl"
DROPPED_FILE = "dropped.json"


@dataclass
class LengthReport:
    """Which samples (or a dpo stage's pairs, or a grpo stage's prompts) a stage trains on, which it leaves out
    and why."""

    max_length: int
    kept: list[Any]
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


def iter_lengths(samples: Sequence[Sample], processing_class: Any, *, is_vlm: bool) -> Iterator[list[int]]:
    """``[prompt tokens, answer tokens]`` of each sample in turn, counted as the trainer's collator builds the
    sequence: the very rows the trainer gets (images decoded by ``datasets``), one at a time through TRL's collator."""
    from .sft import stage_dataset

    collator = vision_collator(processing_class) if is_vlm else None
    dataset = stage_dataset(samples, is_vlm=True) if is_vlm and samples else None
    for index, sample in enumerate(samples):
        if not is_vlm:
            yield list(_measure_text(processing_class, sample))
            continue
        try:
            batch = collator([dataset[index]])
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
        yield [total - answer, answer]


def measure_lengths(samples: Sequence[Sample], processing_class: Any, *, is_vlm: bool) -> dict[str, list[int]]:
    """``{sample id: [prompt tokens, answer tokens]}`` of every sample, measured here and now (no cache)."""
    measured = iter_lengths(samples, processing_class, is_vlm=is_vlm)
    return {sample.id: lengths for sample, lengths in zip(samples, measured, strict=True)}


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


def image_identity(path: str) -> list[Any] | None:
    """What an image's token count depends on: its size as the trainer sees it (EXIF orientation applied by
    ``datasets``). None for a file that does not open; measuring it then names the file."""
    from PIL import ExifTags, Image

    try:
        with Image.open(path) as image:
            # Reading a PNG's EXIF where the header holds none would decode every pixel; PNG puts it first.
            exif = image.getexif() if image.format != "PNG" or "exif" in image.info else {}
            return [image.width, image.height, exif.get(ExifTags.Base.Orientation)]
    except (OSError, ValueError):
        return None


def sample_keys(samples: Sequence[Sample], fingerprint: str) -> list[str]:
    """Each sample's cache key: its messages, its images' sizes and the processor (``fingerprint``).

    Copies of a sample (a stage repeats a source as ``<id>#<copy>``) share the key, so they are measured once, and
    so does the same sample in another stage, in another folder or on another machine. Only image headers are read.
    """
    images: dict[str, list[Any] | None] = {}
    keys = []
    for sample in samples:
        for path in sample.images:
            if path not in images:
                images[path] = image_identity(path)
        described = {
            "fingerprint": fingerprint,
            "messages": [*sample.prompt, *sample.completion],
            "images": [images[path] for path in sample.images],
        }
        keys.append(hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest())
    return keys


def read_length_cache(cache_dir: Path, wanted: set[str] | None = None) -> dict[str, list[int]]:
    """Every length the cache folder holds (only the ``wanted`` keys, when given).

    A line that does not parse is skipped: it is the torn last line of a process that was killed while writing.
    """
    found: dict[str, list[int]] = {}
    for path in sorted(Path(cache_dir).glob(f"*{CACHE_SUFFIX}")):
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
                key, lengths = record["key"], [int(value) for value in record["lengths"]]
            except (ValueError, TypeError, KeyError):
                continue
            if len(lengths) == 2 and (wanted is None or key in wanted):
                found[key] = lengths
    return found


class _CacheWriter:
    """Appends one line per measured sample to this process's own file, so a killed measurement resumes."""

    _SYNC_EVERY_S = 10.0

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a+b")
        self.handle.seek(0, os.SEEK_END)
        if self.handle.tell():
            self.handle.seek(-1, os.SEEK_END)
            if self.handle.read(1) != b"\n":  # a torn last line: start on a line of our own
                self.handle.write(b"\n")
        self.synced = time.monotonic()

    def add(self, key: str, sample_id: str, lengths: list[int]) -> None:
        line = json.dumps({"key": key, "lengths": lengths, "id": sample_id}) + "\n"
        self.handle.write(line.encode())
        self.handle.flush()  # a killed process keeps what it flushed; fsync guards against a crashed machine
        if time.monotonic() - self.synced > self._SYNC_EVERY_S:
            os.fsync(self.handle.fileno())
            self.synced = time.monotonic()

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def _gather(items: list[Any], state: Any) -> list[Any]:
    """Every process's ``items``, concatenated in rank order, on every process (one collective)."""
    if state is None or state.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(items)


def stage_lengths(
    samples: Sequence[Sample],
    processing_class: Any,
    *,
    is_vlm: bool,
    fingerprint: str,
    cache_dir: Path,
    state: Any = None,
    stage: str = "",
    measure: Callable[[Sequence[Sample]], Iterator[list[int]]] | None = None,
) -> dict[str, list[int]]:
    """``{sample id: [prompt tokens, answer tokens]}`` for the whole stage, the same on every process.

    Each distinct sample is measured once, by one process: what the cache in ``cache_dir`` (written by any process,
    in this run or an earlier one) already holds is reused, the rest is dealt out over the processes in turn, each
    appends what it measures to its own file as it goes, and the results are gathered. ``state`` is accelerate's
    ``PartialState`` of the launch (None: one process). Every process must call this with the same samples.
    ``measure`` counts ``[prompt, answer]`` of samples as another trainer builds them (a dpo stage's collator);
    its ``fingerprint`` must then say so, as the cache keys depend on it.
    """
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    keys = sample_keys(samples, fingerprint)
    distinct: dict[str, Sample] = {}
    for key, sample in zip(keys, samples, strict=True):
        distinct.setdefault(key, sample)
    # Processes that do not share a filesystem see different cache files: agree on the union first. Each process
    # deals out the work from its own keys, so they must all have read the same stage.
    seen_here = hashlib.sha256("".join(keys).encode()).hexdigest()
    views = _gather([(rank, seen_here, list(read_length_cache(cache_dir, set(distinct)).items()))], state)
    differing = [other for other, seen, _ in views if seen != views[0][1]]
    if differing:
        raise StageDataError(
            f"Stage {stage!r}: process(es) {differing} read other samples or images than process 0 (another stage "
            "file, or image files that differ between machines). Give every process the same stage files and images."
        )
    known = {key: lengths for _, _, entries in views for key, lengths in entries}
    missing = [key for key in distinct if key not in known]
    share = missing[rank::world]  # in turn, so a block of cheap text samples is split as evenly as the rest
    logger.info(
        "Stage %s: %d samples, %d distinct, %d measured before; %d to measure over %d process(es) (%d here)",
        stage,
        len(samples),
        len(distinct),
        len(distinct) - len(missing),
        len(missing),
        world,
        len(share),
    )
    measured: list[tuple[str, list[int]]] = []
    error: Exception | None = None
    started = reported = time.monotonic()
    writer = None
    try:  # every process must reach the gather below, or the others wait there until the launch's timeout
        if share:
            writer = _CacheWriter(Path(cache_dir) / f"rank-{rank}{CACHE_SUFFIX}")
            share_samples = [distinct[key] for key in share]
            measuring = (
                measure(share_samples)
                if measure is not None
                else iter_lengths(share_samples, processing_class, is_vlm=is_vlm)
            )
            for key, sample, lengths in zip(share, share_samples, measuring, strict=True):
                writer.add(key, sample.id, lengths)
                measured.append((key, lengths))
                if time.monotonic() - reported > 30:
                    reported = time.monotonic()
                    logger.info("Measured %d/%d samples (%.0f s)", len(measured), len(share), reported - started)
            writer.close()
            writer = None
            logger.info("Measured %d samples in %.1f s", len(measured), time.monotonic() - started)
    except Exception as exc:
        error = exc
        if writer is not None:
            writer.handle.close()
    failure = f"{type(error).__name__}: {error}" if error is not None else None
    outcomes = _gather([(rank, measured, failure)], state)
    if error is not None:
        raise error
    for other, _, message in outcomes:
        if message is not None:
            raise StageDataError(
                f"Stage {stage!r}: process {other} could not measure its samples ({message}); see its log. What "
                f"was measured is kept in {cache_dir}, so a rerun measures only the rest."
            )
    for _, entries, _ in outcomes:
        known.update(entries)
    return {sample.id: known[key] for key, sample in zip(keys, samples, strict=True)}


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
