"""``mics generate``: LLM steps that make MICS input and Part 1 of the curriculum from raw cases.

- ``qa``: case text -> 1-3 multiple-choice questions (by text length) with answer and rationale.
- ``vqa``: case record and images -> VQA pairs in the paper's three scenarios (patient-to-doctor,
  doctor-to-doctor, intern-to-senior); each line is valid ``mics run`` input.

Both run on the batch runner (resumable, sharded, budgeted) and the cached model layer. Unusable items
are dropped and counted by reason; a case that yields nothing is a ``no_items`` failure.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from .agents import prompt_messages, render_case_info
from .config import Settings
from .data import InputItem, parse_case
from .errors import InputError, ModelCallError
from .images import load_images
from .models.base import ChatMessage, Model, ModelRequest
from .models.factory import with_store
from .prompts import load_prompt
from .results import Usage
from .runner import Outcome
from .store import Store

__all__ = ["QaWorker", "VqaWorker", "open_generation_worker", "questions_per_case", "parse_json_list"]

SCENARIOS = ("patient-to-doctor", "doctor-to-doctor", "intern-to-senior")
_CLOSED_ANSWERS = {"yes", "no", "cannot be determined"}
_REFERS_TO_CASE = re.compile(r"\bthis\s+(case|patient|image|record|scan|picture)\b", re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.MULTILINE)
_ATTEMPTS = 2


def questions_per_case(text: str) -> int:
    """1 question for a short record, 2 for a medium one, 3 for a long one."""
    return 1 if len(text) < 600 else 2 if len(text) < 1500 else 3


def parse_json_list(reply: str) -> list[Any] | None:
    """The JSON list in a reply (code fences and chatter around it allowed), or None."""
    text = _FENCE.sub("", reply.strip())
    candidates = [text]
    start, end = text.find("["), text.rfind("]")
    if start != -1 and end > start:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, list):
            return value
    return None


def _case_text(item: InputItem) -> str:
    parts = [item.question, render_case_info(item.case_info)]
    return "\n".join(part for part in parts if part).strip()


class _GenerationWorker:
    group_key = "case_id"
    template_name = ""
    id_tag = ""

    def __init__(self, model: Model, settings: Settings, store: Store | None) -> None:
        self.model = model
        self.settings = settings
        self.store = store
        self.template = load_prompt(self.template_name, settings.prompt_dir)

    def parse(self, record: Any, line: int) -> InputItem:
        return parse_case(record, line)

    async def _ask(self, messages: tuple[ChatMessage, ...], usage: Usage) -> list[Any] | None:
        """The reply's JSON list; an unparsable reply is asked once more (a new cache entry)."""
        for attempt in range(_ATTEMPTS):
            response = await self.model.request(
                ModelRequest(
                    messages=messages,
                    temperature=self.settings.generator_temperature,
                    max_tokens=self.settings.generator_max_tokens,
                    attempt=attempt,
                    prompt_version=self.template.version,
                )
            )
            usage.add(response)
            parsed = parse_json_list(response.text)
            if parsed is not None:
                return parsed
        return None

    def _messages(self, images: tuple = (), **fields: str) -> tuple[ChatMessage, ...]:
        return prompt_messages(self.template, images, **fields)

    async def __call__(self, item: InputItem, image_dir: Path) -> Outcome:
        usage = Usage()
        try:
            return await self._generate(item, image_dir, usage)
        except ModelCallError as exc:
            return Outcome(failure="model_error", message=f"{exc} (retried on the next run)", usage=usage)

    async def _generate(self, item: InputItem, image_dir: Path, usage: Usage) -> Outcome:
        raise NotImplementedError

    def _check(self, item: InputItem, entry: Any) -> tuple[str | None, dict[str, Any]]:
        """(drop reason, None) for an unusable entry, else (None, the fields of its output line)."""
        raise NotImplementedError

    def _finish(self, item: InputItem, reply: list[Any] | None, usage: Usage) -> Outcome:
        drops: Counter = Counter()
        records: list[dict[str, Any]] = []
        if reply is None:
            drops["unparsable_reply"] += 1
        for entry in reply or []:
            reason, fields = self._check(item, entry)
            if reason:
                drops[reason] += 1
            else:
                records.append({"id": f"{item.rid}-{self.id_tag}{len(records)}", "case_id": item.rid, **fields})
        if not records:
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(drops.items())) or "none"
            return Outcome(failure="no_items", message=f"nothing usable was generated (dropped: {reasons})",
                           usage=usage, drops=drops)
        return Outcome(records=records, usage=usage, drops=drops)

    async def aclose(self) -> None:
        await self.model.aclose()
        if self.store is not None:
            await self.store.close()


class QaWorker(_GenerationWorker):
    """Part 1: multiple-choice questions from case text (no images)."""

    template_name = "generate_qa"
    id_tag = "qa"

    async def _generate(self, item: InputItem, image_dir: Path, usage: Usage) -> Outcome:
        text = _case_text(item)
        reply = await self._ask(self._messages(case_text=text, count=str(questions_per_case(text))), usage)
        return self._finish(item, reply, usage)

    def _check(self, item: InputItem, entry: Any) -> tuple[str | None, dict[str, Any]]:
        if not isinstance(entry, dict) or not isinstance(entry.get("question"), str) or not entry["question"].strip():
            return "missing_fields", {}
        if entry.get("medical") is False:
            return "not_medical", {}
        question = entry["question"].strip()
        options = entry.get("options")
        if not isinstance(options, dict) or not 3 <= len(options) <= 5:
            return "bad_options", {}
        letters = sorted(str(key).strip().upper() for key in options)
        if letters != [chr(ord("A") + i) for i in range(len(letters))]:
            return "bad_options", {}
        options = {str(key).strip().upper(): str(value).strip() for key, value in options.items()}
        answer = str(entry.get("answer") or "").strip().upper()[:1]
        if answer not in options:
            return "answer_not_an_option", {}
        if _REFERS_TO_CASE.search(question) or any(_REFERS_TO_CASE.search(value) for value in options.values()):
            return "refers_to_case_or_image", {}
        listed = "\n".join(f"{letter}. {options[letter]}" for letter in sorted(options))
        return None, {
            "question": f"{question}\n{listed}",
            "answer": f"{answer}. {options[answer]}",
            "options": dict(sorted(options.items())),
            "rationale": str(entry.get("rationale") or "").strip(),
        }


class VqaWorker(_GenerationWorker):
    """MICS input: VQA pairs in three scenarios from a case record and its images."""

    template_name = "generate_vqa"
    id_tag = "vqa"

    async def _generate(self, item: InputItem, image_dir: Path, usage: Usage) -> Outcome:
        if not item.images:
            return Outcome(failure="bad_input", message=f"line {item.line}: the case has no images to ask about")
        try:
            images = await load_images(item.images, max_side=self.settings.image_max_side,
                                       max_pixels=self.settings.image_max_pixels, base_dir=image_dir)
        except InputError as exc:
            return Outcome(failure="bad_input", message=f"line {item.line}: {exc}")
        messages = self._messages(tuple(images), case_info=_case_text(item),
                                  count=str(self.settings.vqa_per_case))
        return self._finish(item, await self._ask(messages, usage), usage)

    def _check(self, item: InputItem, entry: Any) -> tuple[str | None, dict[str, Any]]:
        if not isinstance(entry, dict):
            return "missing_fields", {}
        question, answer = entry.get("question"), entry.get("answer")
        if not isinstance(question, str) or not question.strip() or not isinstance(answer, str) or not answer.strip():
            return "missing_fields", {}
        scenario = str(entry.get("scenario") or "").strip().lower().replace(" ", "-").replace("_", "-")
        if scenario not in SCENARIOS:
            return "unknown_scenario", {}
        if scenario == "patient-to-doctor" and answer.strip().lower().rstrip(".") not in _CLOSED_ANSWERS:
            return "patient_answer_not_closed", {}
        return None, {"scenario": scenario, "question": question.strip(), "answer": answer.strip(),
                      "images": item.images, "case_info": item.case_info}


async def open_generation_worker(
    kind: Literal["qa", "vqa"], settings: Settings, *, run_id: str, model: Model | None = None
) -> _GenerationWorker:
    """A worker on the generator model (``MICS_GENERATOR``, else the first mentor), cached like searches."""
    from .errors import ConfigError

    name = settings.generator or (settings.mentors[0] if settings.mentors else "")
    if model is None and not name:
        raise ConfigError("MICS_GENERATOR is not set (nor MICS_MENTORS to fall back on); e.g. MICS_GENERATOR=openai/gpt-4o")
    store = await Store.open(settings.cache_path) if settings.cache_path else None
    try:
        if model is None:
            from .models.factory import open_models

            [model] = open_models([name], settings, store, run_id=run_id)
        elif store is not None:
            model = with_store(model, store, run_id=run_id, namespace=settings.cache_namespace_for(model.name))
        worker_class = QaWorker if kind == "qa" else VqaWorker
        return worker_class(model, settings, store)
    except BaseException:
        # Closed here: an open cache connection's (non-daemon) thread would keep the process alive.
        if store is not None:
            await store.close()
        raise
