"""Quality control of MICS output: which searched reasoning paths become training data.

Every dropped record is counted by reason. By default a path must have an increasing MICS-Score trend
(a path decided in a single iteration has no trend: it is kept, having met the strictest test, a full
score, unless ``keep_single_step`` is off), a ``search_id`` of 1 (a full score), steps, and a final
answer that the grader (:mod:`mics_agents.grading`) found the same as the ground truth. Records of the
vanilla strategy (one mentor, no intern guidance) are left out unless ``include_vanilla`` is set.

The search records that verdict as ``final_answer_grade``. Records written before it did are graded
here by :func:`grade_final_answers`: the rules, then the judge when one is given; what neither decides
is ``ungraded`` and dropped unless the recipe says ``keep_ungraded``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..answers import parse_solution
from ..grading import Grade, Grader, JudgeLike

__all__ = ["QcOptions", "QcResult", "quality_control", "drop_reason", "grade_final_answers", "needs_final_answer_grade"]


@dataclass(frozen=True)
class QcOptions:
    keep_trends: tuple[str, ...] = ("increasing",)
    keep_single_step: bool = True
    keep_search_id_zero: bool = False
    keep_ungraded: bool = False
    include_vanilla: bool = False


@dataclass
class QcResult:
    kept: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def needs_final_answer_grade(record: dict[str, Any]) -> bool:
    """A success record written before the search graded its final answer."""
    return record.get("search_id") is not None and not isinstance(record.get("final_answer_grade"), dict)


async def grade_final_answers(
    records: Iterable[dict[str, Any]], judge: JudgeLike | None = None, *, concurrency: int = 16
) -> int:
    """Give every record that lacks one a ``final_answer_grade`` (in place); returns how many were graded."""
    grader = Grader(judge)
    slots = asyncio.Semaphore(concurrency)

    async def grade(record: dict[str, Any]) -> None:
        final_answer = parse_solution(str(record.get("reasoning") or "")).final_answer
        if not final_answer:
            verdict = Grade(False, "unparsed")
        else:
            async with slots:
                verdict = await grader.grade(str(record.get("question") or ""), final_answer, str(record.get("gt_answer") or ""))
        record["final_answer_grade"] = {
            "answer": final_answer,
            "correct": verdict.correct,
            "judged_by": verdict.judged_by,
            "grader_version": verdict.version,
        }

    missing = [record for record in records if needs_final_answer_grade(record)]
    await asyncio.gather(*(grade(record) for record in missing))
    return len(missing)


def quality_control(records: Iterable[dict[str, Any]], options: QcOptions = QcOptions()) -> QcResult:
    result = QcResult()
    for record in records:
        reason = drop_reason(record, options)
        if reason:
            result.dropped[reason] += 1
        else:
            result.kept.append(record)
    return result


def drop_reason(record: dict[str, Any], options: QcOptions = QcOptions()) -> str | None:
    """Why quality control drops ``record`` (the key it is counted under), or None if it keeps it."""
    if record.get("search_id") is None:
        return "not_a_success"
    if record.get("strategy") == "vanilla" and not options.include_vanilla:
        return "vanilla"  # the baseline arm: no intern guidance chose its steps
    if record["search_id"] == "0" and not options.keep_search_id_zero:
        return "search_id_0"
    single_step = str(record.get("final_depth")) == "1"
    scored_once = record.get("strategy") == "vanilla"  # one scored path has no trend to keep or drop on
    if not scored_once and not (single_step and options.keep_single_step) and record.get("trend") not in options.keep_trends:
        return f"trend_{record.get('trend')}"
    solution = parse_solution(record.get("reasoning") or "")
    if not solution.steps:
        return "no_steps"
    if not solution.final_answer:
        return "no_final_answer"
    grade = record.get("final_answer_grade")
    if not isinstance(grade, dict):
        raise ValueError(f"record {record.get('rid')!r} has no final_answer_grade: grade_final_answers() first")
    if grade.get("correct") is None:
        return None if options.keep_ungraded else "ungraded"
    if not grade["correct"]:
        return "final_answer_mismatch"
    return None
