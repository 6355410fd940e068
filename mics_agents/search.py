"""Mentor-Intern Collaborative Search (MICS), as DESIGN §3 states it, with every independent call in flight.

Per iteration: all mentors propose at once; every candidate is scored by all interns at all temperatures
at once, each intern answer going to the judge the moment it arrives. MICS-Score = correct / samples.
A full score stops with success; all zeros stop with failure; otherwise the search continues from a
top-scoring candidate. All random choices come from a generator seeded by the run seed and item id.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .agents import Case, Intern, InternReply, Judge, Mentor, render_case_info
from .answers import render_steps
from .config import Settings, Strategy, load_settings
from .errors import ConfigError, InputError, ModelCallError
from .images import ImageCache, ImageSource, load_images, smaller_copy, within_pixels
from .models.base import Model, case_affinity, gather_all
from .models.factory import with_store
from .grading import GRADER_VERSION, Grader
from .results import FinalAnswerGrade, InternSample, Node, SearchResult, Usage
from .scoring import item_rng, mics_score, path_trend, pick_full_score, pick_to_continue
from .store import Store

__all__ = ["Searcher", "search"]



@dataclass
class _Proposal:
    mentor: str
    steps: list[str]
    rest: list[str]
    final_answer: str | None
    reused: bool


class _Run:
    """The state of one item's search; kept apart so a model error can still report the partial tree."""

    def __init__(self, searcher: "Searcher", case: Case) -> None:
        self.searcher = searcher
        self.settings = searcher.settings
        self.case = case
        self.rng = item_rng(self.settings.seed, case.rid)
        self.tree: list[Node] = []
        self.path: list[Node] = []
        self.usage = Usage()
        self.history: dict[str, list[float]] = {mentor.name: [] for mentor in searcher.mentors}
        self.selected_before: set[str] = set()
        self.depth = 0

    def prefix(self) -> list[str]:
        return [step for node in self.path for step in node.steps]

    async def execute(self) -> SearchResult:
        if self.settings.strategy == "vanilla":
            return await self.execute_vanilla(self.searcher.mentors[0])
        for depth in range(1, self.settings.max_depth + 1):
            self.depth = depth
            take = self.settings.initial_steps if depth == 1 else 1
            prefix = self.prefix()
            parent = self.path[-1] if self.path else None
            proposals = await gather_all([self._propose(mentor, prefix, take, parent) for mentor in self.searcher.mentors])
            candidates = [self._add_node(proposal, parent, depth, len(prefix)) for proposal in proposals if proposal]
            if not candidates:
                for mentor_scores in self.history.values():
                    mentor_scores.append(0.0)
                if not self.path:
                    return self._failure("no_path", "no mentor wrote a reasoning step for this case")
                return await self._success("0")  # the mentors have nothing left to add: the path ends here

            await gather_all([self._score(node, prefix) for node in candidates])
            by_mentor = {node.mentor: node for node in candidates}
            for mentor, mentor_scores in self.history.items():
                mentor_scores.append(by_mentor[mentor].score if mentor in by_mentor else 0.0)  # type: ignore[arg-type]

            full_score = [node.mentor for node in candidates if node.score == 1.0]
            if full_score:
                earlier = {mentor: self.history[mentor][:-1] for mentor in full_score}
                self._select(by_mentor[pick_full_score(full_score, earlier, self.rng)])
                return await self._success("1")
            if all(node.score == 0.0 for node in candidates):
                return self._failure("no_path", "no mentor step led any intern to the answer")
            scores = {node.mentor: float(node.score or 0.0) for node in candidates}
            self._select(by_mentor[pick_to_continue(scores, self.selected_before, self.rng)])
        return await self._success("0")

    async def execute_vanilla(self, mentor: Mentor) -> SearchResult:
        """The paper's baseline arm: one mentor writes the whole solution with no intern guidance; the
        same interns and judge score the full path once, so its MICS-Score compares with a search's."""
        self.depth = 1
        solution, response = await mentor.propose(self.case, [])
        self.usage.add(response)
        if not solution.steps:
            self.history[mentor.name].append(0.0)
            return self._failure("no_path", f"mentor {mentor.name} wrote no reasoning step for this case")
        node = self._add_node(_Proposal(mentor.name, solution.steps, [], solution.final_answer, reused=False), None, 1, 0)
        await self._score(node, [])
        self.history[mentor.name].append(float(node.score or 0.0))
        self._select(node)
        self.depth = len(solution.steps)
        return await self._success("1" if node.score == 1.0 else "0")

    async def _propose(self, mentor: Mentor, prefix: list[str], take: int, parent: Node | None) -> _Proposal | None:
        if parent is not None and parent.mentor == mentor.name and parent.rest:
            # This mentor wrote the selected step and its solution goes on: reuse it, no call.
            return _Proposal(mentor.name, parent.rest[:take], parent.rest[take:], parent.final_answer, reused=True)
        solution, response = await mentor.propose(self.case, prefix)
        self.usage.add(response)
        if not solution.steps:
            return None
        return _Proposal(mentor.name, solution.steps[:take], solution.steps[take:], solution.final_answer, reused=False)

    def _add_node(self, proposal: _Proposal, parent: Node | None, depth: int, steps_before: int) -> Node:
        node = Node(
            id=len(self.tree),
            parent=parent.id if parent else None,
            depth=depth,
            mentor=proposal.mentor,
            steps=proposal.steps,
            step=render_steps(proposal.steps, start=steps_before + 1),
            reused=proposal.reused,
            rest=proposal.rest,
            final_answer=proposal.final_answer,
        )
        self.tree.append(node)
        return node

    async def _score(self, node: Node, prefix: list[str]) -> None:
        path = prefix + node.steps
        groups = await gather_all(
            [
                self._samples(intern, path, temperature)
                for intern in self.searcher.interns
                for temperature in self.settings.intern_temperatures
            ]
        )
        node.samples = [sample for group in groups for sample in group]
        node.score = mics_score(sample.correct for sample in node.samples)

    async def _samples(self, intern: Intern, path: list[str], temperature: float) -> list[InternSample]:
        """One intern's samples at one temperature (one request with ``n`` where its endpoint takes it), each
        answer graded as soon as its request is answered."""

        async def ask_and_grade(group: list[int]) -> list[InternSample]:
            replies = await intern.finish_samples(self.case, path, temperature, group)
            return await gather_all([self._grade(intern, temperature, index, reply) for index, reply in zip(group, replies)])

        graded = await gather_all([ask_and_grade(group) for group in intern.sample_groups()])
        return [sample for group in graded for sample in group]

    async def _grade(self, intern: Intern, temperature: float, sample_index: int, reply: InternReply) -> InternSample:
        for response in reply.responses:
            self.usage.add(response)
        if reply.answer is None:
            # The published rule: a reply without a final answer counts wrong; no judge is asked.
            correct, judged_by = False, "truncated" if reply.truncated else "unparsed"
            if reply.truncated:
                self.usage.add_truncated(intern.name)
        else:
            grade = await self.searcher.grader.grade(self.case.question, reply.answer, self.case.answer)
            for response in grade.responses:
                self.usage.add(response)
            correct, judged_by = bool(grade.correct), grade.judged_by
        return InternSample(
            intern=intern.name,
            temperature=temperature,
            sample_index=sample_index,
            answer=reply.answer or "",
            format_ok=reply.format_ok,
            truncated=reply.truncated,
            correct=correct,
            judged_by=judged_by,
        )

    def _select(self, node: Node) -> None:
        node.selected = True
        self.path.append(node)
        self.selected_before.add(node.mentor)

    def _base(self) -> dict[str, Any]:
        path_scores = [float(node.score) for node in self.path if node.score is not None]
        vanilla = self.settings.strategy == "vanilla"
        return {
            "strategy": self.settings.strategy,
            "rid": self.case.rid,
            "question": self.case.question,
            "gt_answer": self.case.answer,
            "images": [image.label for image in self.case.images],
            "path_scores": path_scores,
            "trend": path_trend(path_scores) if path_scores and not vanilla else None,
            "scores": self.history,
            "generated_by": [node.mentor for node in self.path],
            "final_depth": self.depth,
            "tree": self.tree,
            "usage": self.usage,
        }

    async def _success(self, search_id: str) -> SearchResult:
        last = self.path[-1]
        reasoning = render_steps(self.prefix() + last.rest)
        if self.settings.path_opening.strip():
            reasoning = f"{self.settings.path_opening.strip()}\n\n{reasoning}"
        if last.final_answer:
            reasoning += f"\n\n### The final answer is: {last.final_answer}"
        return SearchResult(
            status="success",
            reasoning=reasoning,
            mics_score=last.score,
            search_id=search_id,
            final_answer_grade=await self._grade_final_answer(last.final_answer),
            **self._base(),  # type: ignore[arg-type]
        )

    async def _grade_final_answer(self, final_answer: str | None) -> FinalAnswerGrade:
        """The selecting mentor's own final answer against the reference, for dataset QC."""
        if not final_answer:
            return FinalAnswerGrade(answer=None, correct=False, judged_by="unparsed", grader_version=GRADER_VERSION)
        grade = await self.searcher.grader.grade(self.case.question, final_answer, self.case.answer)
        for response in grade.responses:
            self.usage.add(response)
        return FinalAnswerGrade(
            answer=final_answer, correct=grade.correct, judged_by=grade.judged_by, grader_version=grade.version
        )

    def _failure(self, status: str, message: str) -> SearchResult:
        return SearchResult(status=status, message=message, **self._base())  # type: ignore[arg-type]


class Searcher:
    """Mentors, interns and a judge, ready to search many cases; the models are shared, so their
    concurrency limits and the cache hold across all searches of this searcher.

    Build one from settings with ``await Searcher.open()``, or from models directly (tests, custom models).
    """

    def __init__(
        self,
        *,
        mentors: Sequence[Model],
        interns: Sequence[Model],
        judge: Model,
        settings: Settings | None = None,
        store: Store | None = None,
        owns_store: bool = False,
        run_id: str | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        if strategy is not None and strategy != self.settings.strategy:
            self.settings = self.settings.model_copy(update={"strategy": strategy})
        if self.settings.strategy == "vanilla":
            mentors = mentors[:1]  # the vanilla mentor (the first given)
            if not mentors:
                raise ConfigError("the vanilla strategy needs one mentor: set MICS_VANILLA_MENTOR or MICS_MENTORS")
        elif len(mentors) < 2:
            raise ConfigError(f"MICS needs at least two mentors (got {len(mentors)}): set MICS_MENTORS")
        if not interns:
            raise ConfigError("MICS needs at least one intern: set MICS_INTERNS")
        names = [model.name for model in mentors]
        if len(set(names)) != len(names):
            raise ConfigError(f"mentor names must differ (got {names}): set MICS_MENTORS")
        self.store = store
        self._owns_store = owns_store
        self._images = ImageCache()

        def wrap(model: Model) -> Model:  # validated, then cached: an unusable reply is never stored
            return with_store(model, store, run_id=run_id, namespace=self.settings.cache_namespace_for(model.name))

        self.mentors = [Mentor(wrap(model), self.settings) for model in mentors]
        self.interns = [Intern(wrap(model), self.settings) for model in interns]
        self.judge = Judge(wrap(judge), self.settings)
        self.grader = Grader(self.judge)

    @classmethod
    async def open(
        cls, settings: Settings | None = None, *, run_id: str | None = None, strategy: Strategy | None = None
    ) -> "Searcher":
        """Models from ``MICS_MENTORS`` / ``MICS_INTERNS`` / ``MICS_JUDGE`` via LiteLLM (and the Router
        config if one is set), cached in ``MICS_CACHE_PATH`` unless that is empty. ``strategy`` overrides
        ``MICS_STRATEGY`` (``vanilla`` asks only ``MICS_VANILLA_MENTOR``, or the first mentor)."""
        settings = settings or load_settings()
        if strategy is not None and strategy != settings.strategy:
            settings = settings.model_copy(update={"strategy": strategy})
        from .models.factory import open_model, open_router
        from .models.providers import check_credentials, import_litellm, needs_litellm

        settings = settings.check_roles()
        names = [*settings.search_mentors, *settings.interns, settings.judge]
        if needs_litellm(names, settings.transport, settings.router_config):
            await asyncio.to_thread(import_litellm)  # seconds of import, kept off the event loop
        router = open_router(settings)
        # A provider key missing is a configuration error now, before any call (and before the store opens).
        # Off the event loop: boto3's and google-auth's chains read files and may ask a metadata server.
        await asyncio.to_thread(check_credentials, names, router)

        store = await Store.open(settings.cache_path) if settings.cache_path else None
        models: dict[str, Model] = {}  # one model per name, even when a name plays two roles

        def model(name: str) -> Model:
            if name not in models:
                models[name] = open_model(name, settings, router=router)
            return models[name]

        try:
            return cls(
                mentors=[model(name) for name in settings.search_mentors],
                interns=[model(name) for name in settings.interns],
                judge=model(settings.judge),
                settings=settings,
                store=store,
                owns_store=True,
                run_id=run_id,
            )
        except BaseException:
            # Whatever was opened here is closed here, so a failed open leaves no connection behind.
            for opened in models.values():
                await opened.aclose()
            if store is not None:
                await store.close()
            raise

    async def search(
        self,
        question: str,
        images: ImageSource | Sequence[ImageSource] | None = None,
        *,
        answer: str,
        case_info: str | Mapping[str, Any] | None = None,
        rid: str | None = None,
    ) -> SearchResult:
        """Search one case. Bad input raises :class:`InputError`; a model that keeps failing gives a
        result with status ``model_error`` (retry it later), never a wrong answer."""
        case = await self.prepare_case(question, images, answer=answer, case_info=case_info, rid=rid)
        return await self.search_case(case)

    async def prepare_case(
        self,
        question: str,
        images: ImageSource | Sequence[ImageSource] | None = None,
        *,
        answer: str,
        case_info: str | Mapping[str, Any] | None = None,
        rid: str | None = None,
        image_dir: Any = None,
    ) -> Case:
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty; give the case's question text")
        if not isinstance(answer, str) or not answer.strip():
            raise InputError("the answer is empty; MICS needs the ground-truth answer to verify reasoning")
        loaded = await load_images(
            images,
            max_side=self.settings.image_max_side,
            max_pixels=self.settings.image_max_pixels,
            base_dir=image_dir,
            cache=self._images,
        )
        mentor_images = None
        if loaded and self.settings.mentor_image_max_side < self.settings.image_max_side:
            side = self.settings.mentor_image_max_side
            # From the images just loaded: each original file is read, decoded and hashed once per case.
            mentor_images = tuple(await asyncio.gather(*(asyncio.to_thread(smaller_copy, part, side) for part in loaded)))
        if mentor_images is None:
            mentor_images = tuple(loaded)  # interns' may be scaled below; mentors keep the loaded size
        if rid is None:
            digest = hashlib.sha256("\x00".join([question, answer, *(image.sha256 for image in loaded)]).encode())
            rid = digest.hexdigest()[:16]
        budget = (self.settings.intern_image_min_pixels, self.settings.intern_image_max_pixels)
        if loaded and any(budget):
            loaded = list(await asyncio.gather(*(asyncio.to_thread(within_pixels, part, *budget) for part in loaded)))
        return Case(
            rid=str(rid),
            question=question.strip(),
            answer=answer.strip(),
            images=tuple(loaded),
            case_info=render_case_info(case_info),
            mentor_images=mentor_images,
        )

    async def search_case(self, case: Case) -> SearchResult:
        run = _Run(self, case)
        try:
            with case_affinity(case.rid):  # replicas of a model: the case's calls go to one (prefix cache)
                return await run.execute()
        except ModelCallError as exc:
            return run._failure("model_error", str(exc))

    async def aclose(self) -> None:
        """Close this searcher's models (each gives back its share of the loop's HTTP clients, which the
        last user closes: other searchers' calls are never disturbed) and the store if it opened it."""
        models = {id(role.model): role.model for role in [*self.mentors, *self.interns, self.judge]}
        try:
            for model in models.values():
                await model.aclose()
        finally:
            if self.store is not None and self._owns_store:
                await self.store.close()  # even when cancelled: its worker thread would keep the process alive

    async def __aenter__(self) -> "Searcher":
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def search(
    question: str,
    images: ImageSource | Sequence[ImageSource] | None = None,
    *,
    answer: str,
    case_info: str | Mapping[str, Any] | None = None,
    rid: str | None = None,
    settings: Settings | None = None,
) -> SearchResult:
    """Run MICS on one case with the models configured in the environment (``MICS_MENTORS``,
    ``MICS_INTERNS``, ``MICS_JUDGE`` and LiteLLM's provider variables), or in ``settings``.

    ``images`` takes a path, bytes, a PIL image or a list of them; ``case_info`` a string or a dict of
    the Chiron-o1 case fields. Calls are cached in ``MICS_CACHE_PATH``, so repeating a search is free.
    Any number of calls may run at once (``asyncio.gather``): those with equal settings share one
    :class:`Searcher`, so they share its cache connection, its in-flight calls and the per-model limits.
    """
    async with _shared_searcher(settings or load_settings()) as searcher:
        return await searcher.search(question, images, answer=answer, case_info=case_info, rid=rid)


class _SharedSearcher:
    """The Searcher of the :func:`search` calls with one settings in one event loop: opened by the first
    call, closed by the last one to end, so nothing stays open (and no thread keeps the process alive)
    once no call runs."""

    def __init__(self, settings: Settings) -> None:
        self.users = 0
        # Its own task, so that the first caller's cancellation does not cancel the others' searcher.
        self.opening: asyncio.Task[Searcher] = asyncio.get_running_loop().create_task(Searcher.open(settings))
        self.opening.add_done_callback(_retrieve_exception)

    async def close(self) -> None:
        if not self.opening.done():
            self.opening.cancel()  # Searcher.open closes whatever it had opened
        elif not self.opening.cancelled() and self.opening.exception() is None:
            await self.opening.result().aclose()


def _retrieve_exception(task: "asyncio.Task[Any]") -> None:
    if not task.cancelled():
        task.exception()  # every caller re-raises it; none may be left to, which is no error


_shared_searchers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _SharedSearcher]]" = (
    weakref.WeakKeyDictionary()
)


@asynccontextmanager
async def _shared_searcher(settings: Settings) -> AsyncIterator[Searcher]:
    by_settings = _shared_searchers.setdefault(asyncio.get_running_loop(), {})
    key = settings.model_dump_json()
    shared = by_settings.get(key)
    if shared is None:
        shared = by_settings[key] = _SharedSearcher(settings)
    shared.users += 1
    try:
        yield await asyncio.shield(shared.opening)
    finally:
        shared.users -= 1
        if shared.users == 0:
            if by_settings.get(key) is shared:
                del by_settings[key]  # a call starting from now opens a new one
            await shared.close()
