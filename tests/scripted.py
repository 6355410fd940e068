"""Scripted mentors, interns and judges for the search-rule tests.

A mentor is scripted per depth: ``plans[depth]`` is the list of steps it writes when asked at that depth.
Each step may carry a tag ``[score=0.75]``; an intern answers correctly in that share of its samples
when the *last* tag in its prefix says so, so a candidate's MICS-Score is set by its text.
"""

from __future__ import annotations

import re

from mics_agents.config import Settings, load_settings
from mics_agents.models import FunctionModel, ModelRequest
from mics_agents.search import Searcher

ANSWER = "Zebra syndrome"
WRONG = "Horse syndrome"
CASE_INFO = "PATIENT-NOTE-7731: fever for three days"
QUESTION = "What is the most likely diagnosis?"
_TAG = re.compile(r"\[score=([0-9.]+)\]")


def section(request: ModelRequest, heading: str) -> str:
    text = request.messages[-1].plain_text()
    match = re.search(rf"^## {heading}[^\n]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1).strip() if match else ""


def steps_in_prefix(request: ModelRequest) -> int:
    return len(re.findall(r"^### Step \d+:", section(request, "Reasoning so far"), re.MULTILINE))


def mentor(name: str, plans: dict[int, list[str]], *, final: str | None = ANSWER, delay: float = 0.0) -> FunctionModel:
    """``plans`` maps the number of steps already in the prefix to the steps this mentor writes then."""

    def reply(request: ModelRequest) -> str:
        done = steps_in_prefix(request)
        steps = plans.get(done, [])
        text = "\n\n".join(f"### Step {done + i + 1}: {step}" for i, step in enumerate(steps))
        if final is not None:
            text += f"\n\n### The final answer is: {final}"
        return text

    return FunctionModel(name, reply, delay=delay)


def intern(name: str, settings: Settings, *, delay: float = 0.0) -> FunctionModel:
    """Correct in the share of samples given by the last ``[score=x]`` tag of its prefix."""
    temperatures = list(settings.intern_temperatures)
    per_candidate = len(temperatures) * settings.samples_per_temperature

    def reply(request: ModelRequest) -> str:
        tags = _TAG.findall(section(request, "Reasoning so far"))
        share = float(tags[-1]) if tags else 0.0
        slot = temperatures.index(request.temperature) * settings.samples_per_temperature + request.sample_index
        answer = ANSWER if slot < round(share * per_candidate) else WRONG
        return f"### Step 9: thinking\n### The final answer is: {answer}"

    return FunctionModel(name, reply, delay=delay)


def judge(name: str = "judge") -> FunctionModel:
    def reply(request: ModelRequest) -> str:
        return "Yes" if section(request, "Candidate answer").endswith(ANSWER) else "No"

    return FunctionModel(name, reply)


def settings(**overrides) -> Settings:
    values = {"cache_path": None, "samples_per_temperature": 2, "seed": 0}
    values.update(overrides)
    return load_settings(**values)


def searcher(mentors, interns, judge_model=None, **overrides) -> Searcher:
    config = overrides.pop("config", None) or settings(**overrides)
    return Searcher(mentors=mentors, interns=interns, judge=judge_model or judge(), settings=config)
