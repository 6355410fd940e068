"""Asking the evaluated model, reading its answer, grading it, and (optionally) the MICS-Score of its
reasoning: interns continue from the model's own steps and the share of correct intern answers is the
score, as in Chiron-o1's Table 2."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from ..agents import Case, Intern, Judge, prompt_messages
from ..answers import answer_letter, normalize_answer, parse_solution, quick_verdict
from ..config import Settings
from ..data import InputItem
from ..errors import InputError, ModelCallError
from ..images import load_images
from ..models.base import Model, ModelRequest
from ..prompts import load_prompt
from ..results import Usage
from ..runner import Outcome
from ..scoring import mics_score
from ..store import Store

__all__ = ["EvalWorker", "extract_prediction"]

_LETTER_CLAIM = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*\(?\**([A-J])\**\)?(?![A-Za-z])", re.IGNORECASE)
_HINTS = {"choice": " (the letter of one option)", "closed": " (yes or no)", "open": ""}


def extract_prediction(text: str, options: dict[str, str]) -> str | None:
    """The model's answer: the ``### The final answer is:`` line, else, for multiple choice, an option
    letter it states ("the answer is (C)", or a lone letter on the last line). None if neither."""
    final = parse_solution(text).final_answer
    if final:
        return final
    if options:
        claims = [letter.upper() for letter in _LETTER_CLAIM.findall(text) if letter.upper() in options]
        if claims:
            return claims[-1]
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        if lines and answer_letter(lines[-1], options) and len(lines[-1]) <= 40:
            return lines[-1]
    return None


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
        self.interns = [Intern(intern, settings) for intern in interns or []]

    def parse(self, record: Any, line: int) -> InputItem:
        item = InputItem(line, str(record["id"]), str(record["id"]), question=record["question"],
                         answer=record["answer"], images=list(record.get("images") or []), raw=record)
        return item

    async def _grade(self, case: Case, candidate: str, usage: Usage) -> tuple[bool, str]:
        if self.judge is not None:
            verdict = await self.judge.grade(case, candidate)
            for response in verdict.responses:
                usage.add(response)
            return verdict.correct, verdict.judged_by
        quick = quick_verdict(case.question, candidate, case.answer)
        if quick is not None:
            return quick
        truth = normalize_answer(case.answer)
        return bool(truth) and truth in normalize_answer(candidate), "contains"

    async def _mics_score(self, case: Case, steps: list[str], usage: Usage) -> float | None:
        if not self.interns or not steps:
            return None

        async def sample(intern: Intern, temperature: float, index: int) -> bool:
            reply = await intern.finish(case, steps, temperature, index)
            usage.add(reply.response)
            return (await self._grade(case, reply.answer, usage))[0]

        verdicts = await asyncio.gather(*(
            sample(intern, temperature, index)
            for intern in self.interns
            for temperature in self.settings.intern_temperatures
            for index in range(self.settings.samples_per_temperature)
        ))
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
        try:
            response = await self.model.request(ModelRequest(
                messages=prompt_messages(self.template, case.images, question=case.question,
                                         answer_hint=_HINTS.get(record.get("answer_type", "open"), "")),
                temperature=self.settings.eval_temperature,
                max_tokens=self.settings.eval_max_tokens,
                prompt_version=self.template.version,
            ))
            usage.add(response)
            prediction = extract_prediction(response.text, options)
            if prediction is None:
                correct, judged_by = False, "unparsed"
            else:
                correct, judged_by = await self._grade(case, prediction, usage)
            score = await self._mics_score(case, parse_solution(response.text).steps, usage)
        except ModelCallError as exc:
            return Outcome(failure="model_error", message=f"{exc} (retried on the next run)", usage=usage)
        return Outcome(records=[{
            "rid": item.rid,
            "benchmark": self.benchmark,
            "question": case.question,
            "gt_answer": case.answer,
            "answer_type": record.get("answer_type", "open"),
            "modality": record.get("modality", "other"),
            "response": response.text,
            "prediction": prediction,
            "parse_ok": prediction is not None,
            "correct": correct,
            "judged_by": judged_by,
            "mics_score": score,
            "usage": usage.model_dump(),
        }], usage=usage)

    async def aclose(self) -> None:
        roles = [self.model, *(intern.model for intern in self.interns)]
        if self.judge is not None:
            roles.append(self.judge.model)
        for model in {id(m): m for m in roles}.values():
            await model.aclose()
        if self.store is not None:
            await self.store.close()
