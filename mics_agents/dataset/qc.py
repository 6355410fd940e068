"""Quality control of MICS output: which searched reasoning paths become training data.

Every dropped record is counted by reason. By default a path must have an increasing MICS-Score trend
(a path decided in a single iteration has no trend: it is kept, having met the strictest test, a full
score, unless ``keep_single_step`` is off), a ``search_id`` of 1 (a full score), steps, and a final
answer that matches the ground truth.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..answers import normalize_answer, parse_solution, quick_verdict

__all__ = ["QcOptions", "QcResult", "quality_control"]


@dataclass(frozen=True)
class QcOptions:
    keep_trends: tuple[str, ...] = ("increasing",)
    keep_single_step: bool = True
    keep_search_id_zero: bool = False


@dataclass
class QcResult:
    kept: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def _answer_matches(question: str, final_answer: str, truth: str) -> bool:
    verdict = quick_verdict(question, final_answer, truth)
    if verdict is not None:
        return verdict[0]
    # Without a judge, an open answer counts when it contains the ground truth.
    return bool(normalize_answer(truth)) and normalize_answer(truth) in normalize_answer(final_answer)


def quality_control(records: Iterable[dict[str, Any]], options: QcOptions = QcOptions()) -> QcResult:
    result = QcResult()
    for record in records:
        reason = _drop_reason(record, options)
        if reason:
            result.dropped[reason] += 1
        else:
            result.kept.append(record)
    return result


def _drop_reason(record: dict[str, Any], options: QcOptions) -> str | None:
    if record.get("search_id") is None:
        return "not_a_success"
    if record["search_id"] == "0" and not options.keep_search_id_zero:
        return "search_id_0"
    single_step = str(record.get("final_depth")) == "1"
    if not (single_step and options.keep_single_step) and record.get("trend") not in options.keep_trends:
        return f"trend_{record.get('trend')}"
    solution = parse_solution(record.get("reasoning") or "")
    if not solution.steps:
        return "no_steps"
    if not solution.final_answer:
        return "no_final_answer"
    if not _answer_matches(record.get("question", ""), solution.final_answer, record.get("gt_answer", "")):
        return "final_answer_mismatch"
    return None
