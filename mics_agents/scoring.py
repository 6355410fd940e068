"""The numbers and choices of MICS: MICS-Score, competitiveness, candidate selection and path trend.

Pure functions over plain values, so every rule of the search can be tested on its own.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from typing import Literal, TypeVar

__all__ = ["mics_score", "competitiveness", "path_trend", "pick_full_score", "pick_to_continue", "item_rng", "Trend"]

Trend = Literal["increasing", "non-increasing", "constant", "fluctuating"]
T = TypeVar("T")


def mics_score(verdicts: Iterable[bool]) -> float:
    """Share of intern samples the judge found correct: correct / all samples."""
    verdicts = list(verdicts)
    if not verdicts:
        raise ValueError("a MICS-Score needs at least one intern sample")
    return sum(verdicts) / len(verdicts)


def competitiveness(earlier_scores: Sequence[float]) -> float:
    """Product of the scores a mentor's candidates got at the earlier iterations (1.0 with none)."""
    return math.prod(earlier_scores)


def path_trend(scores: Sequence[float]) -> Trend:
    """Shape of the selected path's scores.

    ``constant``: all equal (a single score included). ``increasing``: never falls and ends higher than
    it starts. ``non-increasing``: never rises and ends lower. ``fluctuating``: rises and falls.
    """
    if not scores:
        raise ValueError("a trend needs at least one score")
    steps = [later - earlier for earlier, later in zip(scores, scores[1:])]
    if all(step == 0 for step in steps):
        return "constant"
    if all(step >= 0 for step in steps):
        return "increasing"
    if all(step <= 0 for step in steps):
        return "non-increasing"
    return "fluctuating"


def item_rng(seed: int, rid: str) -> random.Random:
    """A random generator fixed by the run seed and the item id, so reruns make the same choices."""
    digest = hashlib.sha256(f"{seed}\x00{rid}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def pick_full_score(mentors: Sequence[str], history: dict[str, list[float]], rng: random.Random) -> str:
    """Among mentors whose candidate scored 1.0, the most competitive one; remaining ties at random.

    ``history[mentor]`` holds the scores of that mentor's candidates at the *earlier* iterations.

    The published code differs (README, fidelity): it draws among all mentors at the first iteration and
    ranks all of them by 1 + the sum of their scores afterwards, so it can save the solution of a mentor
    whose candidate did not score 1.0 as a full-score path. We keep the paper's rule: the product, over
    the mentors that scored 1.0.
    """
    best = max(competitiveness(history[mentor]) for mentor in mentors)
    tied = [mentor for mentor in mentors if competitiveness(history[mentor]) == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def pick_to_continue(
    scores: dict[str, float], selected_before: set[str], rng: random.Random
) -> str:
    """A top-scoring mentor; on ties one not selected at an earlier iteration, then at random."""
    best = max(scores.values())
    top = [mentor for mentor, score in scores.items() if score == best]
    fresh = [mentor for mentor in top if mentor not in selected_before]
    pool = fresh or top
    return pool[0] if len(pool) == 1 else rng.choice(pool)
