"""Simulated mentors, interns and a judge: offline stand-ins for ``mics demo`` and the benchmarks.

They read the default prompt templates the way a model would and behave like the real thing in the way
that matters to MICS: a mentor's steps reveal the diagnosis at some step of its plan; an intern shown a
prefix that contains the revealing step usually answers right, otherwise it guesses. Every reply is
fixed by a hash of the request, so runs are reproducible. Nothing here is medical knowledge.
"""

from __future__ import annotations

import hashlib
import random
import re

from ..answers import parse_options
from ..grading import grade_by_rules
from .base import ModelRequest
from .testing import FunctionModel

__all__ = ["simulated_mentor", "simulated_intern", "simulated_judge", "simulated_generator", "simulated_reply"]

_REVEAL = "These findings point to "


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^## {heading}[^\n]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1).strip() if match else ""


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _mentor_text(name: str, user_text: str, has_images: bool) -> str:
    question = _section(user_text, "Question")
    answer = _section(user_text, "Correct answer")
    done = len(re.findall(r"^### Step \d+:", _section(user_text, "Reasoning so far"), re.MULTILINE))
    topic = question.splitlines()[0][:120] if question else "the question"
    plan = [
        f"The question asks: {topic}",
        "The images show the main abnormality; note its location, size and density."
        if has_images
        else "The case gives the key clinical facts; list the ones that bear on the question.",
        "Compare the findings with the usual differential and set aside what does not fit.",
        "Check the remaining candidate against the patient's presentation and the imaging pattern.",
    ]
    # Where this mentor's plan names the answer differs by mentor and case: some reveal it early.
    reveal_at = 2 + _rng(name, question).randrange(2)
    plan.insert(reveal_at - 1, f"{_REVEAL}{answer}.")
    remaining = plan[done:] or [f"Taken together, the evidence supports {answer}."]
    steps = "\n\n".join(f"### Step {done + i + 1}: {step}" for i, step in enumerate(remaining))
    return f"{steps}\n\n### The final answer is: {answer}"


def _intern_text(user_text: str, temperature: float, seed: str) -> str:
    question = _section(user_text, "Question")
    prefix = _section(user_text, "Reasoning so far")
    rng = _rng(seed)
    revealed = re.search(re.escape(_REVEAL) + r"(.+?)\.?$", prefix, re.MULTILINE)
    follow = 0.95 - 0.2 * min(temperature, 1.5)  # hotter samples stray more often
    options = parse_options(question)
    if revealed and rng.random() < follow:
        answer = revealed.group(1).strip()
    elif options:
        answer = rng.choice(sorted(options))
    else:
        answer = rng.choice(["Cannot be determined", "No", "Yes", "Normal study"])
    if "### Step k" in _section(user_text, "Your task"):  # the 'continue' intern writes its steps first
        return f"### Step 1: Reading the question and the reasoning so far.\n\n### The final answer is: {answer}"
    return f"### The final answer is: {answer}"


def _judge_text(user_text: str) -> str:
    question = _section(user_text, "Question")
    reference = _section(user_text, "Reference answer")
    # The candidate is the section's first paragraph; the instruction to the judge follows it.
    candidate = _section(user_text, "Candidate answer").split("\n\n")[0]
    # A stand-in for a model, so it may only know what the rules know: what they leave open is a No.
    grade = grade_by_rules(question, candidate, reference)
    return "Yes" if grade is not None and grade.correct else "No"


def _generator_text(user_text: str) -> str:
    """JSON the way ``mics generate`` asks for it: questions for text QA, scenario pairs for VQA."""
    import json

    record = _section(user_text, "Case record")
    wanted = re.search(r"Write (\d+)", user_text)
    count = int(wanted.group(1)) if wanted else 1
    if "multiple-choice" in user_text:
        items = [
            {
                "question": f"A record reads: '{record[:80]}'. Which kind of examination is described ({index + 1})?",
                "options": {"A": "Imaging", "B": "Blood test", "C": "Genetic test"},
                "answer": "A",
                "rationale": "The record describes images.",
                "medical": True,
            }
            for index in range(count)
        ]
        # Models sometimes ignore the rules; the generator must catch it.
        items.append({"question": "What does this case show?", "options": {"A": "x", "B": "y", "C": "z"}, "answer": "A"})
        return json.dumps(items)
    presentation = record.splitlines()[0] if record else "the finding"
    return json.dumps([
        {"scenario": "patient-to-doctor", "question": "Is there an abnormality on my scan?", "answer": "yes"},
        {"scenario": "doctor-to-doctor", "question": f"Given '{presentation[:60]}', what is the key finding?",
         "answer": "A focal lesion"},
        {"scenario": "intern-to-senior", "question": "Why does the lesion matter here?",
         "answer": "Because it explains the presentation."},
        {"scenario": "patient-to-doctor", "question": "Will I be fine?", "answer": "probably"},
    ][: count + 1])


def simulated_reply(role: str, name: str, request: ModelRequest) -> str:
    user_text = request.messages[-1].plain_text()
    if role == "mentor":
        return _mentor_text(name, user_text, bool(request.messages[-1].images()))
    if role == "intern":
        return _intern_text(user_text, request.temperature, request.cache_key(name))
    if role == "judge":
        return _judge_text(user_text)
    if role == "generator":
        return _generator_text(user_text)
    raise ValueError(f"unknown simulated role {role!r}")


def simulated_mentor(name: str) -> FunctionModel:
    return FunctionModel(name, lambda request: simulated_reply("mentor", name, request))


def simulated_intern(name: str) -> FunctionModel:
    return FunctionModel(name, lambda request: simulated_reply("intern", name, request))


def simulated_judge(name: str = "simulated/judge") -> FunctionModel:
    return FunctionModel(name, lambda request: simulated_reply("judge", name, request))


def simulated_generator(name: str = "simulated/generator") -> FunctionModel:
    return FunctionModel(name, lambda request: simulated_reply("generator", name, request))
