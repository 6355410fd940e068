"""The three-stage curriculum: a recipe of sources and sampling ratios, the train/test split by case id,
and stage assembly.

Ratios repeat or subsample a source: 10 means ten copies, 0.2 a seeded fifth, 2.5 two copies and half.
The default recipe follows the proportions of Chiron-o1's Table 4: general VQA at about a fifth in
stages 1-2 and whole in stage 3, Part 1 in every stage, Part 2 ten times in stage 2 and five times in
stage 3, Part 3 in stage 3.
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

from pydantic import BaseModel, Field, field_validator

from ..config import load_yaml_model
from .samples import PART1, PART2, PART3, Sample

__all__ = ["Recipe", "default_recipe", "load_recipe", "split_by_case", "assemble_stage", "Stage", "source_weight"]

VQA = "vqa"
KNOWN_SOURCES = {VQA, PART1, PART2, PART3}


class Recipe(BaseModel):
    """What goes into each stage, and the knobs of quality control and alignment."""

    stages: dict[str, dict[str, float]] = Field(
        description="stage name -> {source: ratio}; sources: vqa (every --vqa set), vqa:NAME (one set), "
        f"{PART1}, {PART2}, {PART3}"
    )
    test_fraction: float = Field(default=0.05, ge=0, lt=1, description="Share of case ids held out for test/.")
    keep_trends: list[str] = Field(default_factory=lambda: ["increasing"], description="MICS trends kept by QC.")
    keep_single_step: bool = Field(default=True, description="Keep paths decided in one iteration (no trend).")
    keep_search_id_zero: bool = Field(default=False, description="Keep paths that never reached a full score.")
    include_vanilla: bool = Field(
        default=False, description="Also train on vanilla-strategy records (one mentor, no intern guidance)."
    )
    keep_ungraded: bool = Field(
        default=False,
        description="Keep paths whose final answer no grading rule decided and no judge was asked about "
        "(older MICS output built without --judge).",
    )
    alignment_min_side: int = Field(default=32, ge=1, description="Smallest image side (pixels) for Part 2.")
    alignment_max_images: int = Field(default=4, ge=1, description="Most images in one Part 2 unit.")

    @field_validator("stages")
    @classmethod
    def _check_sources(cls, stages: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        if not stages:
            raise ValueError("a recipe needs at least one stage")
        for stage, sources in stages.items():
            for source, ratio in sources.items():
                if source not in KNOWN_SOURCES and not source.startswith(f"{VQA}:"):
                    raise ValueError(f"stage {stage!r}: unknown source {source!r} (known: {sorted(KNOWN_SOURCES)}, vqa:NAME)")
                if ratio < 0:
                    raise ValueError(f"stage {stage!r}: ratio of {source!r} must be >= 0")
        return stages


def default_recipe() -> Recipe:
    return Recipe(
        stages={
            "stage1": {VQA: 0.2, PART1: 1.0},
            "stage2": {VQA: 0.2, PART1: 1.0, PART2: 10.0},
            "stage3": {VQA: 1.0, PART1: 1.0, PART2: 5.0, PART3: 1.0},
        }
    )


def load_recipe(path: Path | None) -> Recipe:
    return default_recipe() if path is None else load_yaml_model(path, Recipe, "--recipe", "recipe")


def _unit_hash(seed: int, text: str) -> float:
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(case_id: str, fraction: float, seed: int) -> bool:
    """Whether a case is in the test split: a hash of its id, so the choice never depends on which of its
    samples survive quality control."""
    return _unit_hash(seed, case_id) < fraction


def split_by_case(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, test): a case id is on one side only. External VQA sets stay in train."""
    train, test = [], []
    for sample in samples:
        held_out = not sample.source.startswith(VQA) and is_held_out(sample.case_id, fraction, seed)
        (test if held_out else train).append(sample)
    return train, test


def source_weight(source: str, stage_sources: dict[str, float]) -> float | None:
    """A sample source's ratio in a stage: an exact ``vqa:NAME`` entry wins over ``vqa``."""
    if source in stage_sources:
        return stage_sources[source]
    if source.startswith(f"{VQA}:") and VQA in stage_sources:
        return stage_sources[VQA]
    return None


class Stage(Sequence[Sample]):
    """A stage's samples in order, held as (pool index, copy number) pairs over the train pool: a copy
    (``<id>#<copy>``, :meth:`Sample.copy`) is made each time it is read and dropped after, so a stage that
    repeats Part 2 ten times holds 16 bytes per repeat, not a sample."""

    def __init__(self, pool: list[Sample], indices: array, copies: array) -> None:
        self.pool, self._indices, self._copies = pool, indices, copies

    def __len__(self) -> int:
        return len(self._indices)

    def _at(self, position: int) -> Sample:
        return _copy(self.pool[self._indices[position]], self._copies[position])

    @overload
    def __getitem__(self, position: int) -> Sample: ...

    @overload
    def __getitem__(self, position: slice) -> list[Sample]: ...

    def __getitem__(self, position: int | slice) -> Sample | list[Sample]:
        if isinstance(position, slice):
            return [self._at(index) for index in range(*position.indices(len(self)))]
        return self._at(range(len(self))[position])

    def __iter__(self) -> Iterator[Sample]:
        for index, copy in zip(self._indices, self._copies):
            yield _copy(self.pool[index], copy)


def _apply_ratio(positions: list[int], ratio: float, rng: random.Random, indices: array, copies: array) -> None:
    """Append to (``indices``, ``copies``) the pool position and copy number of each sample a ratio takes from a
    source's ``positions``; the draw is the one ``rng.sample`` makes of the samples themselves (it picks by
    position)."""
    whole = math.floor(ratio)
    for copy in range(whole):
        indices.extend(positions)
        copies.extend(array("q", [copy]) * len(positions))
    remainder = round((ratio - whole) * len(positions))
    if remainder:
        indices.extend(rng.sample(positions, remainder))
        copies.extend(array("q", [whole]) * remainder)


def _copy(sample: Sample, index: int) -> Sample:
    return sample if index == 0 else sample.copy(sample.id + f"#{index}")


def assemble_stage(stage: str, stage_sources: dict[str, float], train: list[Sample], seed: int) -> Stage:
    """The samples of one stage, each source at its ratio, shuffled with a seed of its own."""
    by_source: dict[str, list[int]] = {}
    for position, sample in enumerate(train):
        by_source.setdefault(sample.source, []).append(position)
    stage_indices, stage_copies = array("q"), array("q")
    for source in sorted(by_source):
        ratio = source_weight(source, stage_sources)
        if ratio:
            rng = random.Random(f"{seed}:{stage}:{source}")
            _apply_ratio(by_source[source], ratio, rng, stage_indices, stage_copies)
    # A shuffle moves each element by its place alone: shuffling the places shuffles the samples alike.
    order = array("q", range(len(stage_indices)))
    random.Random(f"{seed}:{stage}:order").shuffle(order)
    return Stage(train, array("q", (stage_indices[at] for at in order)), array("q", (stage_copies[at] for at in order)))
