"""The rewards of a grpo stage: the project's own grader, as the reward functions TRL's ``GRPOTrainer`` calls.

- ``accuracy``: the completion's final answer (the last ``The final answer is:`` line, read as
  :mod:`mics_agents.answers` reads every reply) graded against the reference by :class:`mics_agents.grading.Grader`:
  1.0 right, 0.0 wrong or no final answer at all. Rule verdicts (exact, option, yes/no) cost nothing; what the rules
  leave open goes to the judge model when one is configured (through the project's model layer: limits, retries,
  validation, and the same SQLite call cache as the search and ``mics eval``), or is scored by token recall
  (0..1) when none is.
- ``format``: 1.0 when the completion ends with exactly one ``### The final answer is: <answer>`` line, as the
  curriculum's targets do (reasoning items have ``### Step k:`` blocks before it, answer-only items do not, so
  steps are not required), else 0.0.

A judge outage is never a wrong answer (DESIGN §3): when the judge still fails after its retries, *every* reward of
that completion is ``None``. TRL turns ``None`` into NaN and sums the weighted rewards with ``nansum``, so a
completion with only its accuracy missing would be compared with its group on format alone, as if it were wrong;
with all of its rewards missing TRL leaves it out of its group's baseline and gives it no advantage. The
completions left out are counted, logged (``accuracy/unscored``, the share of the batch) and training goes on.

TRL calls async reward functions on an event loop of its own, in another thread. The judge's store and HTTP clients
belong to the loop they were opened on, so :class:`GraderRewards` opens them lazily on the first call (on TRL's
loop) and closes them there (:meth:`GraderRewards.close`, from any thread).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from mics_agents.answers import EXACT_FINAL_ANSWER, extract_final_answer
from mics_agents.errors import ModelError, ModelRequestsForbidden
from mics_agents.grading import GRADER_VERSION, Grader

if TYPE_CHECKING:
    from mics_agents.config import Settings
    from mics_agents.models import Model

__all__ = [
    "REWARD_NAMES",
    "REWARD_DEFINITIONS",
    "GraderRewards",
    "completion_text",
    "format_reward",
]

logger = logging.getLogger("training")

REWARD_NAMES = ("accuracy", "format")
# What each reward is, in words, for the model card and the manifest.
REWARD_DEFINITIONS = {
    "accuracy": (
        "1 if the final-answer line is the reference by mics_agents.grading (exact, option, yes/no rules, then the "
        "judge), 0 if not or if there is no final-answer line; recall (0..1) for open answers when no judge is "
        "configured; left out (None) when the judge is unavailable"
    ),
    "format": "1 if the completion ends with exactly one '### The final answer is: <answer>' line, else 0",
}
# Any wording of a final-answer marker ("The final answer is", "**the final answer is**" ...): a second one anywhere
# before the last line is a second answer.
_OTHER_LOOP = (
    "GraderRewards was opened on another event loop; its store and HTTP clients belong to that loop. Use one "
    "GraderRewards per trainer."
)
_ANY_FINAL_ANSWER = re.compile(r"the\s*final\s*answer\s*is", re.IGNORECASE)


def completion_text(completion: Any) -> str:
    """The text of one completion as TRL passes it: a string, or (conversational) a list of messages whose
    contents are strings or lists of text parts. Code points UTF-8 cannot encode (lone surrogates from broken
    bytes) become U+FFFD, so nothing downstream (the judge request, the cache key) chokes on them."""
    if isinstance(completion, str):
        text = completion
    else:
        pieces = []
        for message in completion or []:
            content = message.get("content") if isinstance(message, dict) else message
            if isinstance(content, str):
                pieces.append(content)
            elif isinstance(content, list):
                pieces.extend(str(part.get("text") or "") for part in content if isinstance(part, dict))
        text = "".join(pieces)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def format_reward(text: str) -> float:
    """1.0 when ``text`` ends with exactly one ``### The final answer is: <answer>`` line (written exactly so), else 0.0."""
    lines = text.strip().splitlines()
    if not lines:
        return 0.0
    last = lines[-1].strip()
    if not last.startswith(EXACT_FINAL_ANSWER):
        return 0.0
    answer = last[len(EXACT_FINAL_ANSWER) :].strip()
    if not answer or _ANY_FINAL_ANSWER.search(answer):
        return 0.0
    if any(_ANY_FINAL_ANSWER.search(line) for line in lines[:-1]):
        return 0.0
    return 1.0


@dataclass(frozen=True)
class _Outcome:
    """One completion's accuracy: a reward, or None when the judge was unavailable; how it was decided."""

    reward: float | None
    judged_by: str


class GraderRewards:
    """The reward functions of one grpo stage, sharing one grader (and its judge, store and clients).

    ``judge``: a LiteLLM model name; empty: open answers get recall. ``settings``: the project's settings
    (``MICS_*``: cache path, timeouts, retries, concurrency, router); default: read from the environment when the
    judge is first needed. ``judge_model``: a model to use instead of opening ``judge`` (a test double); it is
    still validated and cached like any other model.
    """

    def __init__(
        self,
        judge: str = "",
        *,
        settings: "Settings | None" = None,
        judge_model: "Model | None" = None,
    ) -> None:
        self.judge_name = judge or (judge_model.name if judge_model is not None else "")
        self._settings = settings
        self._judge_model = judge_model
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Task | None = None
        self._grader: Grader | None = None
        self._resources: list[Any] = []  # the judge model and the store, closed in that order
        # TRL hands every reward function of one batch the same list of completions: the grading of a batch is shared
        # by accuracy and format through it (format must know which completions have no accuracy).
        self._batch_completions: Any = None
        self._batch_outcomes: list[asyncio.Future] = []
        self.counts: Counter[str] = Counter()  # completions graded, by how; 'unscored' for judge outages
        self._uses_accuracy = True  # format defers to accuracy's outages unless functions() leaves accuracy out
        if judge and judge_model is None:
            self._check_credentials()

    @property
    def grader_version(self) -> int:
        return GRADER_VERSION

    def functions(self, names: Sequence[str] = REWARD_NAMES) -> list[Callable[..., Any]]:
        """The reward functions to hand to TRL, in ``names`` order; TRL logs each under its ``__name__``."""
        unknown = [name for name in names if name not in REWARD_NAMES]
        if unknown or not names:
            raise ValueError(f"rewards: choose from {', '.join(REWARD_NAMES)} (got {list(names)})")
        self._uses_accuracy = "accuracy" in names
        return [getattr(self, name) for name in names]

    # -- the reward functions ---------------------------------------------------------------------------------------

    async def accuracy(
        self,
        prompts: list[Any],
        completions: list[Any],
        question: list[str],
        answer: list[str],
        log_metric: Callable[[str, float], None] | None = None,
        **_: Any,
    ) -> list[float | None]:
        outcomes = await asyncio.gather(*self._batch(completions, question, answer))
        unscored = sum(outcome.reward is None for outcome in outcomes)
        if log_metric is not None and outcomes:
            log_metric("accuracy/unscored", unscored / len(outcomes))
            log_metric("accuracy/by_judge", sum(o.judged_by == "judge" for o in outcomes) / len(outcomes))
        if unscored:
            logger.warning(
                "accuracy: the judge %s was unavailable for %d of %d completions; they are left out of this batch "
                "(%d so far), training goes on",
                self.judge_name,
                unscored,
                len(outcomes),
                self.counts["unscored"],
            )
        return [outcome.reward for outcome in outcomes]

    async def format(
        self,
        prompts: list[Any],
        completions: list[Any],
        question: list[str] | None = None,
        answer: list[str] | None = None,
        **_: Any,
    ) -> list[float | None]:
        rewards: list[float | None] = [format_reward(completion_text(c)) for c in completions]
        if self._uses_accuracy and question is not None and answer is not None:
            outcomes = await asyncio.gather(*self._batch(completions, question, answer))
            rewards = [None if outcome.reward is None else reward for reward, outcome in zip(rewards, outcomes)]
        return rewards

    # -- grading ----------------------------------------------------------------------------------------------------

    def _batch(self, completions: list[Any], question: list[str], answer: list[str]) -> list[asyncio.Future]:
        """The grading of every completion of this batch, started once for all reward functions (and once for each
        distinct question, answer and candidate in it)."""
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            raise RuntimeError(_OTHER_LOOP)
        if completions is not self._batch_completions:
            self._batch_completions = completions
            started: dict[tuple[str, str, str | None], asyncio.Future] = {}
            outcomes = []
            for completion, asked, reference in zip(completions, question, answer, strict=True):
                candidate = extract_final_answer(completion_text(completion))
                key = (asked, reference, candidate)
                if key not in started:
                    started[key] = asyncio.ensure_future(self._grade(asked, candidate, reference))
                outcomes.append(started[key])
            self._batch_outcomes = outcomes
        return self._batch_outcomes

    async def _grade(self, question: str, candidate: str | None, reference: str) -> _Outcome:
        if candidate is None:
            outcome = _Outcome(0.0, "unparsed")
        else:
            grader = await self._open()
            try:
                grade = await grader.grade(question, candidate, reference)
            except ModelRequestsForbidden:
                raise  # a switch someone set, not an outage
            except ModelError as exc:
                logger.debug("accuracy: judge unavailable: %s", exc)
                outcome = _Outcome(None, "unscored")
            else:
                if grade.correct is None:
                    outcome = _Outcome(float(grade.recall or 0.0), grade.judged_by)
                else:
                    outcome = _Outcome(1.0 if grade.correct else 0.0, grade.judged_by)
        self.counts[outcome.judged_by] += 1
        return outcome

    # -- the grader's resources, on the loop that uses them ---------------------------------------------------------

    async def _open(self) -> Grader:
        loop = asyncio.get_running_loop()
        if self._opening is None:
            self._loop = loop
            self._opening = loop.create_task(self._open_grader())
        elif self._loop is not loop:
            raise RuntimeError(_OTHER_LOOP)
        return await asyncio.shield(self._opening)

    async def _open_grader(self) -> Grader:
        if not self.judge_name:
            self._grader = Grader(None)
            return self._grader
        from mics_agents.agents import Judge
        from mics_agents.models.factory import open_models, with_store
        from mics_agents.store import Store

        settings = self._load_settings()
        store = await Store.open(settings.cache_path) if settings.cache_path else None
        if store is not None:
            self._resources.append(store)
        try:
            if self._judge_model is not None:
                model = with_store(
                    self._judge_model, store, namespace=settings.cache_namespace_for(self._judge_model.name)
                )
            else:
                [model] = open_models([self.judge_name], settings, store)
        except BaseException:
            await self.aclose()
            raise
        self._resources.insert(0, model)
        self._grader = Grader(Judge(model, settings))
        return self._grader

    def _load_settings(self) -> "Settings":
        if self._settings is None:
            from mics_agents.config import load_settings

            self._settings = load_settings()
        return self._settings

    def _check_credentials(self) -> None:
        """A missing provider key stops the stage before the model loads, not at the first open answer."""
        from mics_agents.models.factory import open_router
        from mics_agents.models.providers import check_credentials

        check_credentials([self.judge_name], open_router(self._load_settings()))

    async def aclose(self) -> None:
        """Close the judge model and the store (on the loop they were opened on)."""
        resources, self._resources = self._resources, []
        for resource in resources:
            closer = getattr(resource, "aclose", None) or resource.close
            await closer()
        self._batch_completions, self._batch_outcomes = None, []

    def close(self, timeout: float = 60.0) -> None:
        """Close from any thread: the closing runs on the loop the resources belong to."""
        loop = self._loop
        if loop is None or not self._resources:
            return
        if loop.is_closed() or not loop.is_running():
            logger.warning("The rewards' event loop ended before its judge and store were closed")
            self._resources = []
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("GraderRewards.close() called on its own loop: await aclose() there instead")
        asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout)
