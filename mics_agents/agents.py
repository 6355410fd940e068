"""The three roles of MICS: mentors propose reasoning, interns try to finish it, the judge grades.

Each role renders its prompt template, calls its model and parses the reply. What a role is shown is
decided here and nowhere else: mentors see the case record, question, answer, images and prefix;
interns see the question, images and prefix only; the judge sees question, reference and candidate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from .answers import Solution, extract_exact_final_answer, parse_solution, parse_verdict, render_steps
from .config import Settings
from .errors import InputError, MalformedReplyError, ModelCallError
from .models.base import ChatMessage, ImagePart, Model, ModelRequest, ModelResponse, TextPart
from .prompts import PromptTemplate, load_prompt

__all__ = [
    "Case", "Mentor", "Intern", "Judge", "InternReply", "render_case_info", "render_prefix", "prompt_messages",
    "open_judge",
]

NO_PREFIX = "(none yet: start from Step 1)"


@dataclass(frozen=True)
class Case:
    """One medical case, ready to show to models."""

    rid: str
    question: str
    answer: str
    images: tuple[ImagePart, ...] = ()
    case_info: str = ""
    # The same images at the size mentors get (MICS_MENTOR_IMAGE_MAX_SIDE); None: as ``images``.
    mentor_images: tuple[ImagePart, ...] | None = None


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
    if not isinstance(captions, (list, tuple)) or not all(isinstance(caption, str) for caption in captions):
        raise InputError(f"case_info caption must be a string or a list of strings, not {captions!r:.60}")
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


def render_prefix(steps: list[str], opening: str = "") -> str:
    """The reasoning so far as a role is shown it: the path's opening sentence (``MICS_PATH_OPENING``), if
    any, then the steps as ``### Step k:`` blocks; a placeholder when there is neither."""
    parts = [part for part in (opening.strip(), render_steps(steps)) if part]
    return "\n\n".join(parts) or NO_PREFIX


def prompt_messages(
    template: PromptTemplate, images: tuple[ImagePart, ...], *, images_first: bool = True, **fields: str
) -> tuple[ChatMessage, ...]:
    """A template's messages: the system part, then one user message with the images before the text
    (after it with ``images_first=False``)."""
    system, user = template.render(**fields)
    # Images first, then the text: the shared part of sibling calls comes first (prefix caching).
    parts = (*images, TextPart(user)) if images_first else (TextPart(user), *images)
    user_message = ChatMessage("user", parts)
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
                case.images if case.mentor_images is None else case.mentor_images,
                images_first=self.settings.mentor_images_first,
                case_info=case.case_info or "(no case record given)",
                question=case.question,
                answer=case.answer,
                prefix=render_prefix(prefix, self.settings.path_opening),
            ),
            temperature=self.settings.mentor_temperature,
            max_tokens=self.settings.mentor_max_tokens,
            prompt_version=self.template.version,
            timeout=self.settings.timeout_for("mentor"),
        )
        response = await self.model.request(request)
        return parse_solution(response.text), response


@dataclass(frozen=True)
class InternReply:
    """An intern's answer, or None when its reply had no final-answer line (``format_ok`` False) or was
    cut off by the token budget even after the retry with a larger one (``truncated``)."""

    answer: str | None
    format_ok: bool
    truncated: bool
    responses: tuple[ModelResponse, ...]


INTERN_TEMPLATES = {"answer": "intern", "continue": "intern_continue"}


class Intern:
    """Answers from a reasoning prefix. In ``answer`` mode (the published one) it gives only the final
    answer, so its score measures the mentor's steps; in ``continue`` mode it writes the missing steps first."""

    def __init__(self, model: Model, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.template = load_prompt(INTERN_TEMPLATES[settings.intern_mode], settings.prompt_dir)

    @property
    def name(self) -> str:
        return self.model.name

    async def finish(self, case: Case, prefix: list[str], temperature: float, sample_index: int) -> InternReply:
        """The intern's answer after ``prefix`` (:meth:`finish_samples` for one sample)."""
        return (await self.finish_samples(case, prefix, temperature, [sample_index]))[0]

    def sample_groups(self) -> list[list[int]]:
        """The sample indices of one temperature, grouped as they are asked: all in one request where the
        model's endpoint takes ``n``, else one each (so each sample's reply is used as soon as it comes, and
        one that fails never hides a sibling's paid reply)."""
        indices = list(range(self.settings.samples_per_temperature))
        return [indices] if self.model.sends_samples_together else [[index] for index in indices]

    async def finish_samples(
        self, case: Case, prefix: list[str], temperature: float, sample_indices: Sequence[int]
    ) -> list[InternReply]:
        """The intern's answers after ``prefix``, one per sample index, asked together (one request with
        ``n`` where the model's endpoint takes it). Interns are never shown the answer or the case record.

        A reply cut off by the token budget is asked once more with twice the budget (a different
        request, so a different cache entry); cut off again, it counts as truncated and has no answer.
        """
        sample_indices = list(sample_indices)
        messages = prompt_messages(
            self.template, case.images, question=case.question, prefix=render_prefix(prefix, self.settings.path_opening)
        )
        budget = self.settings.intern_max_tokens
        responses: dict[int, list[ModelResponse]] = {index: [] for index in sample_indices}
        pending = list(responses)
        for max_tokens in (budget, 2 * budget):
            request = ModelRequest(
                messages=messages,
                temperature=temperature,
                max_tokens=max_tokens,
                prompt_version=self.template.version,
                timeout=self.settings.timeout_for("intern"),
            )
            replies = await self.model.request_samples(request, pending)
            for index, response in zip(pending, replies):
                responses[index].append(response)
            pending = [index for index, response in zip(pending, replies) if response.finish_reason == "length"]
            if not pending:
                break
        return [self._reply(tuple(responses[index])) for index in sample_indices]

    def _reply(self, responses: tuple[ModelResponse, ...]) -> InternReply:
        last = responses[-1]
        if last.finish_reason == "length":
            return InternReply(None, False, True, responses)
        if self.settings.intern_answer_line == "exact":
            answer = extract_exact_final_answer(last.text)
        else:
            answer = parse_solution(last.text).final_answer
        return InternReply(answer, answer is not None, False, responses)


class Judge:
    """Says whether a candidate answer means the same as the reference. Used through
    :class:`~mics_agents.grading.Grader`, which asks it only what the grading rules leave open."""

    def __init__(self, model: Model, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.template = load_prompt("judge", settings.prompt_dir)

    @property
    def name(self) -> str:
        return self.model.name

    async def ask(self, question: str, candidate: str, reference: str) -> tuple[bool, tuple[ModelResponse, ...]]:
        """The judge's Yes (True) or No (False), and its replies. A reply that does not start with yes or
        no is never cached (the request's validator refuses it), so a rerun asks again."""
        responses: list[ModelResponse] = []
        last_problem = ""
        for attempt in range(self.settings.judge_attempts):
            request = ModelRequest(
                messages=prompt_messages(self.template, (), question=question, reference=reference, candidate=candidate),
                temperature=self.settings.judge_temperature,
                max_tokens=self.settings.judge_max_tokens,
                attempt=attempt,
                prompt_version=self.template.version,
                validate=parse_verdict,
                timeout=self.settings.timeout_for("judge"),
            )
            try:
                response = await self.model.request(request)
                verdict = parse_verdict(response.text)
            except MalformedReplyError as exc:
                last_problem = str(exc)
                continue
            responses.append(response)
            return verdict, tuple(responses)
        raise ModelCallError(
            f"judge {self.name}: no Yes/No verdict in {self.settings.judge_attempts} attempts "
            f"({last_problem}). Use a judge that follows the format, or raise MICS_JUDGE_MAX_TOKENS if it is "
            "a reasoning model; the unusable replies were not cached, so a rerun asks again.",
            model=self.name,
        )


@asynccontextmanager
async def open_judge(name: str | None, settings: Settings) -> AsyncIterator[Judge | None]:
    """A judge on the LiteLLM model ``name``, cached in ``MICS_CACHE_PATH``; None when no name is given.
    For grading outside a search (older MICS output, stored evaluation predictions)."""
    if not name:
        yield None
        return
    from .models.factory import open_models
    from .store import Store

    store = await Store.open(settings.cache_path) if settings.cache_path else None
    try:
        [model] = open_models([name], settings, store)
        try:
            yield Judge(model, settings)
        finally:
            await model.aclose()
    finally:
        if store is not None:
            await store.close()
