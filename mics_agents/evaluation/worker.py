"""Asking the evaluated model, reading its answer, grading it, and (optionally) the MICS-Score of its
reasoning: interns continue from the model's own steps and the share of correct intern answers is the
score, as in Chiron-o1's Table 2."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import Any

from ..agents import Case, Intern, InternReply, Judge, open_judge
from ..answers import parse_options, parse_solution
from ..config import Settings
from ..data import InputItem
from ..dataset.evalset import answer_type_of
from ..errors import InputError, ModelCallError
from ..grading import GRADER_VERSION, Grade, Grader, leading_yes_no, normalize, resolve_option, token_recall
from ..images import load_images, within_pixels
from ..models.base import ChatMessage, ImagePart, Model, ModelRequest, TextPart
from ..prompts import load_prompt
from ..results import Usage
from ..runner import Outcome
from ..scoring import mics_score
from ..task_format import image_labels, task_prompt
from ..store import Store
from .metrics import NO_RULE_MATCHED, closed_by_label

__all__ = ["EvalWorker", "answer_hint", "extract_prediction", "grade_prediction", "needs_regrade", "regrade_predictions"]

_LETTER_CLAIM = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*\(?\**([A-J])\**\)?(?![A-Za-z])", re.IGNORECASE)


def extract_prediction(text: str, options: dict[str, str], *, yes_no: bool = False) -> tuple[str | None, str | None]:
    """The model's answer and how it was read: ``marker`` (the ``### The final answer is:`` line), else
    ``lenient``: a leading yes or no for a yes/no question; for multiple choice an option letter it states
    ("the answer is (C)"), or a last line that is a letter or an option's exact text. (None, None) if neither."""
    final = parse_solution(text).final_answer
    if final:
        return final, "marker"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if yes_no:
        said = leading_yes_no(lines[0]) if lines else None
        return (said, "lenient") if said else (None, None)
    if options:
        claims = [letter.upper() for letter in _LETTER_CLAIM.findall(text) if letter.upper() in options]
        if claims:
            return claims[-1], "lenient"
        if lines and len(lines[-1]) <= 200 and resolve_option(lines[-1], options):
            return lines[-1], "lenient"
    return None, None


def _is_yes_no(record: dict[str, Any]) -> bool:
    return normalize(str(record.get("gt_answer") or record.get("answer") or "")) in {"yes", "no"}


def answer_hint(record: dict[str, Any]) -> str:
    """Which answer hint the question is asked with (a key of ``task_format.ANSWER_HINTS``): decided by the
    reference, as the dataset builder decides it for training, never by the benchmark's closed label. VQA-RAD
    and SLAKE call "Is the lesion on the left or right?" closed; told to answer yes or no, a model would be
    asked something it was never trained to and the question answered wrongly by construction."""
    if record.get("options"):
        return "choice"
    return answer_type_of(str(record.get("question") or ""), str(record.get("answer") or record.get("gt_answer") or ""))


async def grade_prediction(record: dict[str, Any], grader: Grader, usage: Usage | None = None) -> dict[str, Any]:
    """Read the stored reply of a prediction record and grade it; returns the fields to update.

    Used for new predictions and to regrade stored ones: nothing here calls the evaluated model.
    """
    question = str(record["question"])
    options = record.get("options") or parse_options(question)
    prediction, parse = extract_prediction(str(record.get("response") or ""), options, yes_no=_is_yes_no(record))
    if prediction is None:
        grade = Grade(False, "unparsed")
    else:
        grade = await grader.grade(question, prediction, str(record["gt_answer"]), options)
    if usage is not None:
        for response in grade.responses:
            usage.add(response)
    correct, judged_by, recall = grade.correct, str(grade.judged_by), grade.recall
    if closed_by_label(record):
        # A closed question has a right answer the rules can check; one they cannot match ("right" for
        # "Left", "CT" for "MRI") without a judge is wrong, never left out of the closed accuracy.
        recall = None
        if correct is None:
            correct, judged_by = False, NO_RULE_MATCHED
    elif recall is None:
        recall = token_recall(prediction, str(record["gt_answer"])) if prediction else 0.0
    return {
        "prediction": prediction,
        "parse": parse,
        "parse_ok": prediction is not None,
        "correct": correct,
        "strict_correct": bool(correct) and parse == "marker",
        "judged_by": judged_by,
        "recall": recall,
        "grader_version": grade.version,
    }


def needs_regrade(record: dict[str, Any]) -> bool:
    """Graded by an older grader (or before graders had versions), or a closed question stored without a
    verdict (before a closed answer no rule matched counted as wrong)."""
    return record.get("grader_version") != GRADER_VERSION or (closed_by_label(record) and record.get("correct") is None)


async def regrade_predictions(predictions: list[dict[str, Any]], judge_name: str | None, settings: Settings) -> int:
    """Regrade, in place, stored predictions an older grader graded; returns how many. The evaluated
    model is not called; the judge's verdicts come from the cache where it has them."""
    stale = [record for record in predictions if needs_regrade(record)]
    if not stale:
        return 0
    async with open_judge(judge_name, settings) as judge:
        grader = Grader(judge)
        slots = asyncio.Semaphore(16)

        async def regrade(record: dict[str, Any]) -> None:
            async with slots:
                record.update(await grade_prediction(record, grader))

        await asyncio.gather(*(regrade(record) for record in stale))
    return len(stale)


class EvalWorker:
    group_key = None

    def __init__(
        self,
        model: Model,
        settings: Settings,
        store: Store | None,
        *,
        benchmark: str,
        judge: Model | None = None,
        interns: list[Model] | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.store = store
        self.benchmark = benchmark
        self.template = load_prompt("eval", settings.prompt_dir)
        self.judge = Judge(judge, settings) if judge is not None else None
        self.grader = Grader(self.judge)
        self.interns = [Intern(intern, settings) for intern in interns or []]

    def parse(self, record: Any, line: int) -> InputItem:
        item = InputItem(line, str(record["id"]), str(record["id"]), question=record["question"],
                         answer=record["answer"], images=list(record.get("images") or []), raw=record)
        return item

    async def _mics_score(self, case: Case, steps: list[str], usage: Usage) -> float | None:
        if not self.interns or not steps:
            return None
        budget = (self.settings.intern_image_min_pixels, self.settings.intern_image_max_pixels)
        if case.images and any(budget):  # interns see images as they do in the search
            scaled = await asyncio.gather(*(asyncio.to_thread(within_pixels, part, *budget) for part in case.images))
            case = dataclasses.replace(case, images=tuple(scaled))

        async def verdict(reply: InternReply) -> bool:
            for response in reply.responses:
                usage.add(response)
            if reply.answer is None:
                return False
            grade = await self.grader.grade(case.question, reply.answer, case.answer)
            for response in grade.responses:
                usage.add(response)
            return bool(grade.correct)

        async def samples(intern: Intern, temperature: float, group: list[int]) -> list[bool]:
            replies = await intern.finish_samples(case, steps, temperature, group)  # one request with n, or one
            return list(await asyncio.gather(*(verdict(reply) for reply in replies)))

        groups = await asyncio.gather(*(
            samples(intern, temperature, group)
            for intern in self.interns
            for temperature in self.settings.intern_temperatures
            for group in intern.sample_groups()
        ))
        verdicts = [correct for group in groups for correct in group]
        return mics_score(verdicts)

    async def __call__(self, item: InputItem, image_dir: Path) -> Outcome:
        record: dict[str, Any] = item.raw
        usage = Usage()
        try:
            images = await load_images(item.images, max_side=self.settings.image_max_side,
                                       max_pixels=self.settings.image_max_pixels, base_dir=image_dir)
        except InputError as exc:
            return Outcome(failure="bad_input", message=f"item {item.rid}: {exc}")
        case = Case(item.rid, item.question, item.answer, tuple(images))
        options = record.get("options") or {}
        hint = answer_hint(record)
        # The same user turn the curriculum's samples were built with (mics_agents.task_format).
        labels, after_images = image_labels(len(case.images))
        parts: list[TextPart | ImagePart] = []
        for label, image in zip(labels, case.images):
            if label:
                parts.append(TextPart(label))
            parts.append(image)
        parts.append(TextPart(after_images + task_prompt(case.question, hint, self.settings.prompt_dir)))
        try:
            response = await self.model.request(ModelRequest(
                messages=(ChatMessage("user", tuple(parts)),),
                temperature=self.settings.eval_temperature,
                max_tokens=self.settings.eval_max_tokens,
                prompt_version=self.template.version,
            ))
            usage.add(response)
            prediction = {
                "rid": item.rid,
                "benchmark": self.benchmark,
                "question": case.question,
                "gt_answer": case.answer,
                "options": options,
                "answer_type": record.get("answer_type", "open"),
                "answer_hint": hint,
                "modality": record.get("modality", "other"),
                "response": response.text,
                "finish_reason": response.finish_reason,
            }
            prediction.update(await grade_prediction(prediction, self.grader, usage))
            prediction["mics_score"] = await self._mics_score(case, parse_solution(response.text).steps, usage)
        except ModelCallError as exc:
            return Outcome(failure="model_error", message=f"{exc} (retried on the next run)", usage=usage)
        prediction["usage"] = usage.model_dump()
        return Outcome(records=[prediction], usage=usage)

    async def aclose(self) -> None:
        roles = [self.model, *(intern.model for intern in self.interns)]
        if self.judge is not None:
            roles.append(self.judge.model)
        for model in {id(m): m for m in roles}.values():
            await model.aclose()
        if self.store is not None:
            await self.store.close()
