"""The three roles of MICS: mentors propose reasoning, interns try to finish it, the judge grades.

Each role renders its prompt template, calls its model and parses the reply. What a role is shown is
decided here and nowhere else: mentors see the case record, question, answer, images and prefix;
interns see the question, images and prefix only; the judge sees question, reference and candidate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .answers import JudgedBy, Solution, parse_solution, parse_verdict, quick_verdict, render_steps
from .config import Settings
from .errors import InputError, MalformedReplyError, ModelCallError
from .models.base import ChatMessage, ImagePart, Model, ModelRequest, ModelResponse, TextPart
from .prompts import PromptTemplate, load_prompt

__all__ = ["Case", "Mentor", "Intern", "Judge", "InternReply", "Verdict", "render_case_info", "prompt_messages"]

NO_PREFIX = "(none yet: start from Step 1)"


@dataclass(frozen=True)
class Case:
    """One medical case, ready to show to models."""

    rid: str
    question: str
    answer: str
    images: tuple[ImagePart, ...] = ()
    case_info: str = ""


def render_case_info(case_info: str | Mapping[str, Any] | None) -> str:
    """The case record as text. Takes a string, or a dict of the Chiron-o1 fields (``presentation``,
    ``age_label``, ``gender_label``, ``caption``) plus any others; ``<image>`` placeholders in captions
    become ``Image 1``, ``Image 2`` ... in order."""
    if case_info is None:
        return ""
    if isinstance(case_info, str):
        return case_info.strip()
    if not isinstance(case_info, Mapping):
        raise InputError(f"case_info must be a string or a dict, not {type(case_info).__name__}")
    labels = {"presentation": "Presentation", "age_label": "Age", "gender_label": "Gender"}
    lines = []
    for key, label in labels.items():
        value = case_info.get(key)
        if value not in (None, "", []):
            lines.append(f"{label}: {str(value).strip()}")
    captions = case_info.get("caption") or []
    if isinstance(captions, str):
        captions = [captions]
    image_number = 0
    findings = []
    for caption in captions:
        text = str(caption)
        while "<image>" in text:
            image_number += 1
            text = text.replace("<image>", f"Image {image_number}", 1)
        if text.strip():
            findings.append(f"- {text.strip()}")
    if findings:
        lines.append("Image findings:\n" + "\n".join(findings))
    for key, value in case_info.items():
        if key not in labels and key != "caption" and value not in (None, "", []):
            lines.append(f"{key.replace('_', ' ').capitalize()}: {value}")
    return "\n".join(lines)


def prompt_messages(template: PromptTemplate, images: tuple[ImagePart, ...], **fields: str) -> tuple[ChatMessage, ...]:
    """A template's messages: the system part, then one user message with the images before the text."""
    system, user = template.render(**fields)
    # Images first, then the text: the shared part of sibling calls comes first (prefix caching).
    user_message = ChatMessage("user", (*images, TextPart(user)))
    if system:
        return (ChatMessage.text("system", system), user_message)
    return (user_message,)


class Mentor:
    def __init__(self, model: Model, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.template = load_prompt("mentor", settings.prompt_dir)

    @property
    def name(self) -> str:
        return self.model.name

    async def propose(self, case: Case, prefix: list[str]) -> tuple[Solution, ModelResponse]:
        """The rest of the solution after ``prefix``: its steps (never the final-answer line) and answer."""
        request = ModelRequest(
            messages=prompt_messages(
                self.template,
                case.images,
                case_info=case.case_info or "(no case record given)",
                question=case.question,
                answer=case.answer,
                prefix=render_steps(prefix) or NO_PREFIX,
            ),
            temperature=self.settings.mentor_temperature,
            max_tokens=self.settings.mentor_max_tokens,
            prompt_version=self.template.version,
        )
        response = await self.model.request(request)
        return parse_solution(response.text), response


@dataclass(frozen=True)
class InternReply:
    answer: str
    format_ok: bool
    response: ModelResponse


class Intern:
    def __init__(self, model: Model, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.template = load_prompt("intern", settings.prompt_dir)

    @property
    def name(self) -> str:
        return self.model.name

    async def finish(self, case: Case, prefix: list[str], temperature: float, sample_index: int) -> InternReply:
        """Finish the reasoning from ``prefix``. Interns are never shown the answer or the case record."""
        request = ModelRequest(
            messages=prompt_messages(
                self.template, case.images, question=case.question, prefix=render_steps(prefix) or NO_PREFIX
            ),
            temperature=temperature,
            max_tokens=self.settings.intern_max_tokens,
            sample_index=sample_index,
            prompt_version=self.template.version,
        )
        response = await self.model.request(request)
        answer = parse_solution(response.text).final_answer
        if answer is not None:
            return InternReply(answer, True, response)
        # No answer line: the reply's last line is the best reading of what the intern concluded.
        lines = [line.strip() for line in response.text.strip().splitlines() if line.strip()]
        return InternReply(lines[-1][:500] if lines else "", False, response)


@dataclass(frozen=True)
class Verdict:
    correct: bool
    judged_by: JudgedBy
    responses: tuple[ModelResponse, ...] = ()


class Judge:
    def __init__(self, model: Model, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.template = load_prompt("judge", settings.prompt_dir)

    @property
    def name(self) -> str:
        return self.model.name

    async def grade(self, case: Case, candidate: str) -> Verdict:
        """Exact or same-option answers are decided without a call; otherwise the judge says Yes or No."""
        if not candidate.strip():
            return Verdict(False, "exact")
        quick = quick_verdict(case.question, candidate, case.answer)
        if quick is not None:
            return Verdict(*quick)
        responses = []
        for attempt in range(self.settings.judge_attempts):
            request = ModelRequest(
                messages=prompt_messages(
                    self.template, (), question=case.question, reference=case.answer, candidate=candidate
                ),
                temperature=self.settings.judge_temperature,
                max_tokens=self.settings.judge_max_tokens,
                attempt=attempt,
                prompt_version=self.template.version,
            )
            response = await self.model.request(request)
            responses.append(response)
            try:
                return Verdict(parse_verdict(response.text), "judge", tuple(responses))
            except MalformedReplyError:
                continue
        raise ModelCallError(
            f"judge {self.name}: no Yes/No verdict in {self.settings.judge_attempts} attempts "
            f"(last reply {responses[-1].text[:80]!r}). Use a judge that follows the format, or raise "
            "MICS_JUDGE_MAX_TOKENS if it is a reasoning model.",
            model=self.name,
        )
