"""Reading model output: reasoning steps, final answers, option lists and judge verdicts.

Whether an answer is *right* is decided in :mod:`mics_agents.grading`.

Models format loosely (``**Step 1:**``, ``###Step1``, ``### The Final Answer is: **B**``), so the
patterns accept case, bold and missing spaces; the judge's verdict, on the other hand, is read
strictly: only a reply that *starts* with yes or no counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .errors import MalformedReplyError

__all__ = [
    "Solution",
    "parse_solution",
    "extract_final_answer",
    "extract_exact_final_answer",
    "render_steps",
    "parse_options",
    "parse_verdict",
]

_STEP_HEADER = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*step[ \t]*(\d+)[ \t]*(?:\*\*|__)?[ \t]*[:：.)\-–]?[ \t]*(?:\*\*|__)?",
    re.IGNORECASE | re.MULTILINE,
)
_FINAL_ANSWER = re.compile(
    r"(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*the[ \t]*final[ \t]*answer[ \t]*is[ \t]*(?:\*\*|__)?[ \t]*[:：]?[ \t]*(?:\*\*|__)?",
    re.IGNORECASE,
)
_BOXED = re.compile(r"\\boxed\{(.*)\}")
_OPTION_LINE = re.compile(r"^[ \t]*\(?([A-J])[\.\):：][ \t]*(\S.*)$", re.MULTILINE)
_VERDICT = re.compile(r"^(yes|no)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Solution:
    """A parsed mentor (or intern) reply: the reasoning steps and the final answer, if any."""

    steps: list[str] = field(default_factory=list)
    final_answer: str | None = None


def _clean_answer(text: str) -> str:
    text = text.strip()
    # The answer is the first non-empty line after the marker.
    for line in text.splitlines():
        if line.strip():
            text = line.strip()
            break
    boxed = _BOXED.search(text)
    if boxed:
        text = boxed.group(1)
    return text.strip().strip("*_`$ ").strip()


# The part of the final-answer marker every match holds, in lower-case ASCII text: found by a fast literal scan.
_FINAL_ANSWER_CORE = re.compile(r"the[ \t]*final[ \t]*answer[ \t]*is")
_MARKER_LEAD = frozenset("#*_ \t")


def _final_markers(text: str) -> list[re.Match[str]]:
    """Every match of the final-answer marker, as ``_FINAL_ANSWER.finditer(text)`` gives them. Scanning a
    reply with that pattern tries its optional prefix at every character (~36 us for a 500-character mentor
    reply); every match holds the lower-case core, and only ``#*_`` and blanks lie between a match's start and
    its core, so the scan starts just before the first core (ASCII text only, where lower-casing changes
    nothing else)."""
    if not text.isascii():
        return list(_FINAL_ANSWER.finditer(text))
    core = _FINAL_ANSWER_CORE.search(text.lower())
    if core is None:
        return []
    start = core.start()
    while start > 0 and text[start - 1] in _MARKER_LEAD:
        start -= 1
    return list(_FINAL_ANSWER.finditer(text, start))


def parse_solution(text: str) -> Solution:
    """Split a reply into ``### Step k:`` bodies and the ``### The final answer is:`` answer.

    Everything from the final-answer marker on is the answer, never part of a step, so a candidate
    step can never carry the final-answer line. Text before the first step header is ignored.
    """
    markers = _final_markers(text)
    final_answer = None
    reasoning = text
    if markers:
        last = markers[-1]
        final_answer = _clean_answer(text[last.end() :]) or None
        reasoning = text[: markers[0].start()]
    headers = list(_STEP_HEADER.finditer(reasoning))
    steps = []
    for index, header in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(reasoning)
        body = reasoning[header.end() : end].strip().strip("#").strip()
        if body:
            steps.append(body)
    return Solution(steps=steps, final_answer=final_answer)


def extract_final_answer(text: str) -> str | None:
    return parse_solution(text).final_answer


EXACT_FINAL_ANSWER = "### The final answer is:"


def extract_exact_final_answer(text: str) -> str | None:
    """The answer after the last ``### The final answer is:`` written exactly so (case, hashes and spaces as
    here), the only line the published code took; None when there is none or nothing follows it."""
    if EXACT_FINAL_ANSWER not in text:
        return None
    return _clean_answer(text.rsplit(EXACT_FINAL_ANSWER, 1)[1]) or None


def render_steps(steps: list[str], start: int = 1) -> str:
    """Steps as ``### Step k: ...`` blocks, numbered from ``start`` whatever the model numbered."""
    return "\n\n".join(f"### Step {start + offset}: {step}" for offset, step in enumerate(steps))


def parse_options(question: str) -> dict[str, str]:
    """Options of a multiple-choice question written one per line (``A. ...``, ``(B) ...``, ``C) ...``).

    Needs at least two consecutive letters starting at A, so a stray ``A.`` in prose is not an option list.
    """
    return dict(_options_of(question))  # a copy: the caller may change it


@lru_cache(maxsize=1024)  # a case's question is parsed at every grade of its answers
def _options_of(question: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for match in _OPTION_LINE.finditer(question):
        letter = match.group(1).upper()
        options.setdefault(letter, match.group(2).strip())
    letters = sorted(options)
    if len(letters) < 2 or letters[0] != "A":
        return {}
    expected = [chr(ord("A") + i) for i in range(len(letters))]
    return options if letters == expected else {}


def parse_verdict(reply: str) -> bool:
    """A judge reply must start with yes or no (markdown and quotes aside); anything else is malformed."""
    text = reply.strip().lstrip("*_#`>\"'“‘ \t\n").strip()
    match = _VERDICT.match(text)
    if not match:
        raise MalformedReplyError(f"judge reply does not start with Yes or No: {reply[:80]!r}")
    return match.group(1).lower() == "yes"
