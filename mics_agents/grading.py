"""Is this answer the same as the reference? One answer to that question for the search, QC and evaluation.

The rules run in a fixed order and stop at the first that decides:

1. ``exact``: equal after normalisation (case, whitespace, markdown, trailing punctuation, a leading article).
2. ``option``: only when the question's options are known (parsed from ``A.`` / ``(B)`` / ``C)`` lines or
   given), and both answers resolve to an option by letter or by the option's text. Without options a
   leading ``E.`` is part of the answer ("E. coli"), never a letter.
3. ``yes_no``: the reference is yes or no; the candidate's *leading* word decides when it is yes or no.
   ``Normal``, ``None seen`` or ``Not excluded`` do not start with the word no and go on.
4. ``judge``: a model says Yes or No (strictly parsed; unclear means No).
5. Without a judge an open answer is not called right or wrong: it gets ``recall``, the share of the
   reference's tokens found in the candidate (the open-question metric of medical VQA papers). A yes/no
   question answered without a leading yes or no is wrong.

There is no substring rule anywhere: "ct" is not in "MRI showing an infarct" as far as grading goes.
Every :class:`Grade` says how it was reached and which grader version reached it, so records graded by an
older rule set can be told apart and regraded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, Protocol

from .answers import parse_options
from .models.base import ModelResponse

__all__ = [
    "GRADER_VERSION",
    "JudgedBy",
    "Grade",
    "Grader",
    "JudgeLike",
    "normalize",
    "resolve_option",
    "leading_yes_no",
    "token_recall",
    "grade_by_rules",
]

# Raise whenever a rule changes what it decides: stored verdicts of an older version get regraded.
GRADER_VERSION = 3

JudgedBy = Literal["exact", "option", "yes_no", "judge", "recall", "unparsed", "truncated"]

_BOXED = re.compile(r"\\boxed\{(.*)\}")
_MARKUP = re.compile(r"[*_`$]")
_ANSWER_PREFIX = re.compile(
    r"^(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*", re.IGNORECASE
)
# Only a leading article: inside an answer "a" is often meaning ("hepatitis A", "type A dissection").
_LEADING_ARTICLE = re.compile(r"^(?:a|an|the)\s+")
_NUMBER_UNIT = re.compile(r"(\d)\s*([a-zµ%°])")
_EDGE_PUNCTUATION = " \t.,;:!?\"'“”‘’"
# A letter answer: "B", "(B)", "B.", "B)", "B:" alone, or followed by space and text ("B. Pneumonia").
_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[.):：,]?$|[.):：,]?\s+(.*)$)", re.DOTALL)
_TOKEN = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")
_YES_NO = {"yes", "no"}


# _plain and normalize are pure and see the same few strings again and again (a case's reference and options,
# the interns' short answers): remembered, a grade costs dict look-ups instead of a dozen regex passes.
@lru_cache(maxsize=8192)
def _plain(text: str) -> str:
    """Markdown, LaTeX boxes and an "the answer is:" lead-in removed; whitespace collapsed."""
    text = _BOXED.sub(r"\1", text)
    text = _MARKUP.sub("", text).strip()
    text = _ANSWER_PREFIX.sub("", text)
    return re.sub(r"\s+", " ", text).strip()


@lru_cache(maxsize=8192)
def normalize(text: str) -> str:
    """The form two answers are compared in by the ``exact`` rule."""
    text = _plain(text).lower()
    text = _NUMBER_UNIT.sub(r"\1 \2", text)  # "5mm" and "5 mm" are the same answer
    without_articles = _LEADING_ARTICLE.sub("", text).strip()
    if without_articles.strip(_EDGE_PUNCTUATION):
        text = without_articles
    return re.sub(r"\s+", " ", text).strip(_EDGE_PUNCTUATION)


def resolve_option(answer: str, options: Mapping[str, str]) -> str | None:
    """The letter of the option an answer names, or None when it names none (or names two at once).

    ``B``, ``(B)``, ``B.``, ``Option B``, the option's text, or ``B. <the option's text>``. A letter
    followed by *another* option's text is a contradiction and resolves to nothing.
    """
    if not options:
        return None
    text = _plain(answer)
    by_text = {normalize(option_text): letter for letter, option_text in options.items()}
    named_by_text = by_text.get(normalize(text))
    if named_by_text:
        return named_by_text
    match = _LETTER.match(text)
    if not match:
        return None
    letter, rest = match.group(1), (match.group(2) or "").strip()
    # A lone lowercase letter is an option letter; before text it must be a capital ("a mass" is prose).
    if rest and not letter.isupper():
        return None
    letter = letter.upper()
    if letter not in options:
        return None
    if rest:
        other = by_text.get(normalize(rest))
        if other is not None and other != letter:
            return None
    return letter


def leading_yes_no(answer: str) -> str | None:
    """``yes`` or ``no`` when the answer starts with that word ("No.", "Yes, a small effusion"), else None."""
    words = _plain(answer).lower().lstrip(_EDGE_PUNCTUATION + "([").split(maxsplit=1)
    if not words:
        return None
    first = re.match(r"[a-z]+", words[0])
    word = first.group(0) if first else ""
    # "no-reflow" or "yes/no" are not a yes or a no.
    rest_of_word = words[0][len(word):]
    if word in _YES_NO and (not rest_of_word or rest_of_word[0] in _EDGE_PUNCTUATION + ")]"):
        return word
    return None


def token_recall(candidate: str, reference: str) -> float:
    """Share of the reference's word tokens that appear in the candidate (0 for an empty reference)."""
    reference_tokens = _TOKEN.findall(_plain(reference).lower())
    if not reference_tokens:
        return 0.0
    candidate_tokens = set(_TOKEN.findall(_plain(candidate).lower()))
    return sum(token in candidate_tokens for token in reference_tokens) / len(reference_tokens)


@dataclass(frozen=True)
class Grade:
    """A verdict and how it was reached. ``correct`` is None when nothing decided it (open answer, no judge)."""

    correct: bool | None
    judged_by: JudgedBy
    recall: float | None = None
    responses: tuple[ModelResponse, ...] = field(default=(), repr=False)
    version: int = GRADER_VERSION

    def as_record(self) -> dict[str, object]:
        """The verdict as records keep it: ``correct``, ``judged_by``, ``grader_version`` (and ``recall``)."""
        record: dict[str, object] = {"correct": self.correct, "judged_by": self.judged_by, "grader_version": self.version}
        if self.recall is not None:
            record["recall"] = self.recall
        return record


def grade_by_rules(
    question: str, candidate: str, reference: str, options: Mapping[str, str] | None = None
) -> Grade | None:
    """Rules 1-3: a verdict when one of them decides, else None (a judge, or recall, has to)."""
    if not candidate.strip():
        return Grade(False, "unparsed")
    if normalize(candidate) and normalize(candidate) == normalize(reference):
        return Grade(True, "exact")
    known_options = dict(options) if options else parse_options(question)
    if known_options:
        candidate_letter = resolve_option(candidate, known_options)
        reference_letter = resolve_option(reference, known_options)
        if candidate_letter and reference_letter:
            return Grade(candidate_letter == reference_letter, "option")
    expected = normalize(reference)
    if expected in _YES_NO:
        said = leading_yes_no(candidate)
        if said is not None:
            return Grade(said == expected, "yes_no")
    return None


class JudgeLike(Protocol):
    """What :class:`Grader` needs of a judge: the verdict on one answer and the replies it took."""

    async def ask(self, question: str, candidate: str, reference: str) -> tuple[bool, tuple[ModelResponse, ...]]:
        """Whether ``candidate`` answers ``question`` as ``reference`` does, and the replies that said so."""
        ...


class Grader:
    """The rules, then the judge (a :class:`~mics_agents.agents.Judge`) for what they leave open.

    Without a judge, what the rules leave open is scored by recall, except yes/no questions, which are
    wrong without a leading yes or no.
    """

    def __init__(self, judge: JudgeLike | None) -> None:
        self.judge = judge

    async def grade(
        self, question: str, candidate: str, reference: str, options: Mapping[str, str] | None = None
    ) -> Grade:
        """The verdict on ``candidate``: the rules (exact, option letter, yes/no) when one decides, else the
        judge, else recall. ``options`` are the question's lettered options when known (parsed from the
        question otherwise)."""
        decided = grade_by_rules(question, candidate, reference, options)
        if decided is not None:
            return decided
        if self.judge is not None:
            correct, responses = await self.judge.ask(question, candidate, reference)
            return Grade(correct, "judge", responses=responses)
        if normalize(reference) in _YES_NO:
            return Grade(False, "yes_no")
        return Grade(None, "recall", recall=token_recall(candidate, reference))
