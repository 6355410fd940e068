"""What a search returns: the whole tree, the selected path, usage, and the Chiron-o1 record."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .grading import GRADER_VERSION, JudgedBy
from .models.base import ModelResponse
from .scoring import Trend

__all__ = ["Usage", "InternSample", "FinalAnswerGrade", "Node", "SearchResult", "SearchStatus"]

SearchStatus = Literal["success", "no_path", "model_error"]

# Each model's schema is built when it is first used (defer_build), not at import: building them all took ~9 ms
# of every launch before the first request.


class Usage(BaseModel):
    """Model calls of one search. Tokens and cost count every call, cached ones at what they first cost;
    ``cached_calls`` says how many were answered from the cache rather than sent."""
    model_config = ConfigDict(defer_build=True)

    calls: int = 0
    cached_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    online_cost_usd: float = Field(
        default=0.0,
        description="What the same calls cost at online prices: cost_usd, unless some went through a provider's "
        "batch API (mics run --batch) at its lower price.",
    )
    truncated_samples: dict[str, int] = Field(
        default_factory=dict, description="Intern samples cut off by the token budget even at twice it, per model."
    )

    def add(self, response: ModelResponse) -> None:
        self.calls += 1
        self.cached_calls += int(response.cached)
        self.input_tokens += response.input_tokens
        self.output_tokens += response.output_tokens
        self.cost_usd += response.cost_usd
        online = response.extra.get("online_cost_usd") if response.extra else None
        self.online_cost_usd += online if isinstance(online, (int, float)) and online >= 0 else response.cost_usd

    def add_truncated(self, model: str) -> None:
        self.truncated_samples[model] = self.truncated_samples.get(model, 0) + 1


class InternSample(BaseModel):
    model_config = ConfigDict(defer_build=True)

    intern: str
    temperature: float
    sample_index: int
    answer: str = Field(description="The intern's final answer; empty when its reply had none.")
    format_ok: bool = Field(description="The reply had a '### The final answer is:' line.")
    truncated: bool = Field(default=False, description="Cut off by the token budget, even with twice the budget.")
    correct: bool
    judged_by: JudgedBy = Field(description="Which grading rule decided (mics_agents.grading).")


class FinalAnswerGrade(BaseModel):
    """The selected mentor's final answer graded against the reference: what dataset QC keeps or drops on."""
    model_config = ConfigDict(defer_build=True)

    answer: str | None
    correct: bool | None = Field(description="None when no rule decided and no judge was asked.")
    judged_by: JudgedBy
    grader_version: int


class Node(BaseModel):
    """One candidate: a mentor's next reasoning step(s) after its parent's path."""
    model_config = ConfigDict(defer_build=True)

    id: int
    parent: int | None
    depth: int
    mentor: str
    steps: list[str]
    step: str = Field(description="The candidate's steps as '### Step k:' text, numbered along the path.")
    reused: bool = Field(default=False, description="Taken from the mentor's earlier solution, no new call.")
    score: float | None = None
    selected: bool = False
    samples: list[InternSample] = Field(default_factory=list)
    rest: list[str] = Field(default_factory=list, description="The mentor's steps after this candidate.")
    final_answer: str | None = Field(default=None, description="The mentor's final answer for this solution.")


class SearchResult(BaseModel):
    model_config = ConfigDict(defer_build=True)

    rid: str
    strategy: Literal["mics", "vanilla"] = "mics"
    question: str
    gt_answer: str
    images: list[str] = Field(default_factory=list)
    status: SearchStatus
    message: str = ""
    reasoning: str = ""
    mics_score: float | None = None
    path_scores: list[float] = Field(default_factory=list)
    trend: Trend | None = None
    scores: dict[str, list[float]] = Field(default_factory=dict)
    generated_by: list[str] = Field(default_factory=list)
    final_depth: int = 0
    search_id: Literal["0", "1"] | None = None
    final_answer_grade: FinalAnswerGrade | None = None
    grader_version: int = GRADER_VERSION
    tree: list[Node] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def to_record(self) -> dict[str, Any]:
        """The Chiron-o1 output line (``rid, images, question, gt_answer, reasoning, scores, final_depth,
        generated_by, search_id``) plus ``mics_score``, ``trend``, ``tree`` and ``usage``."""
        return {
            "rid": self.rid,
            "strategy": self.strategy,
            "images": self.images,
            "question": self.question,
            "gt_answer": self.gt_answer,
            "reasoning": self.reasoning,
            "scores": self.scores,
            "final_depth": str(self.final_depth),
            "generated_by": self.generated_by,
            "search_id": self.search_id,
            "mics_score": self.mics_score,
            "trend": self.trend,
            "final_answer_grade": self.final_answer_grade.model_dump() if self.final_answer_grade else None,
            "grader_version": self.grader_version,
            "tree": [node.model_dump(exclude={"rest", "final_answer"}) for node in self.tree],
            "usage": self.usage.model_dump(),
        }
