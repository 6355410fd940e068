"""Step data from MICS search trees: a step-reward row per scored candidate, and preference pairs of siblings.

Every candidate of a tree was scored by every intern at every temperature: its MICS-Score estimates, by
Monte Carlo, how often the path through it carries an intern to the answer (Math-Shepherd's soft label).
Siblings share the selected prefix, so two of them with clearly different scores are a fair preference pair
(what Step-DPO trains on). Only scored nodes give data: the rest of the winning mentor's solution after its
last selected node, and its final answer, were never scored and appear in no row.

A steps folder holds:

- ``steps.jsonl``: TRL's stepwise-supervision layout (as TRL converted Math-Shepherd): ``prompt`` (the
  question), ``completions`` (one ``### Step k:`` text per node along the path, ending with the candidate; a
  node holding two steps, as at depth 1, is one completion), ``labels`` (one boolean per completion), a parallel
  ``scores`` column of MICS-Scores, and ``images``, ``id``, ``rid``, ``case_id``, ``node``, ``depth``,
  ``mentor``, ``reused``, ``selected``, ``grader_version``, ``source`` (the file name of the MICS output it
  came from);
- ``pairs.jsonl``: TRL's conversational preference layout with images: ``prompt`` is the user turn (an
  ``{"type": "image"}`` placeholder per entry of ``images``, then the task prompt the curriculum uses) and,
  past depth 1, the selected path so far as one assistant message; ``chosen`` / ``rejected`` are one assistant
  message each holding the next step, which continues that path. Plus ``chosen_score``, ``rejected_score``,
  ``score_gap``, ``chosen_mentor``, ``rejected_mentor``, ``chosen_node``, ``rejected_node``, ``id``, ``rid``,
  ``case_id``, ``depth``, ``parent``, ``grader_version``, ``source``. (A prompt that ends in an assistant
  message is a continuation: TRL's own templating adds a generation prompt after every conversational prompt,
  so the trainer renders the path and the step as one assistant turn itself.)
- ``hf/steps``, ``hf/pairs``: the same rows as Hugging Face ``datasets`` folders (``load_from_disk``), images
  embedded as ``Image`` features;
- image paths in the JSONL files are relative to the folder the file is in.

Which outcomes give step data: each item's standing line (the journal's rule, :func:`winning_lines`) among
the successes of the given files and the ``no_path`` failures of the failed file beside each, whatever the
curriculum's quality control decides about the path (its trend, its final answer: things of the whole path
or of the unscored rest, not of a candidate's score). A vanilla-strategy record gives none: its one node is
the whole solution, final answer included, scored once, not a step. Items that ended in a model error are
left out: they are retried, and their trees are cut short.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..answers import render_steps
from ..errors import ConfigError, InputError
from ..outputs import default_failed_path, failure_key, success_line, winning_lines
from ..task_format import task_prompt
from .curriculum import is_held_out
from .evalset import answer_type_of
from .exports import _user_content
from .hf import PAIRS, STEPS, write_hf
from .images import ImageCatalog, posix_relpath

__all__ = [
    "StepOptions",
    "StepStats",
    "Candidate",
    "scored_candidates",
    "step_rows",
    "step_pairs",
    "read_step_records",
    "write_steps",
    "gap_key",
    "STEPS_FILE",
    "PAIRS_FILE",
]

STEPS_FILE = "steps.jsonl"
PAIRS_FILE = "pairs.jsonl"
HF_STEPS = Path("hf") / "steps"
HF_PAIRS = Path("hf") / "pairs"
# Failed searches whose tree is whole as far as it went: every candidate it made was scored.
SEARCHED_FAILURES = ("no_path",)
# Score differences are differences of fractions (3/4 - 1/4, 0.7 - 0.2 is 0.49999999999999994 in floats).
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class StepOptions:
    """How step rows are labelled and which sibling pairs are kept.

    ``label_threshold``: a step is labelled good when its MICS-Score is strictly above it. 0 is Math-Shepherd's
    hard estimate (any sample reached the answer); the default asks for most of the samples, because MICS
    interns answer without reasoning, so on closed questions they reach the answer by chance (with 4 samples
    a yes/no question gets at least one right 94% of the time by guessing, a majority 31%; four options 68%
    and 5%). The soft label is in ``scores`` whatever the threshold.

    ``pair_margin``: the least score difference of a pair. With the usual 4 samples a score moves in quarters
    and one sample is noise (a score's standard error is up to 0.25, a difference of two up to 0.35); 0.5 is
    two samples' difference.

    ``max_pairs_per_node``: the most pairs from one prefix, the largest gaps first. 3 keeps every pair three
    mentors can make and bounds a case at ``max_depth`` x 3 pairs however many mentors there are.
    """

    label_threshold: float = 0.5
    pair_margin: float = 0.5
    max_pairs_per_node: int = 3

    def __post_init__(self) -> None:
        problems = []
        if not _is_number(self.label_threshold) or not 0 <= self.label_threshold < 1:
            problems.append(f"label threshold must be at least 0 and below 1 (got {self.label_threshold!r})")
        if not _is_number(self.pair_margin) or not 0 < self.pair_margin <= 1:
            problems.append(f"pair margin must be above 0 and at most 1 (got {self.pair_margin!r})")
        if type(self.max_pairs_per_node) is not int or self.max_pairs_per_node < 0:
            problems.append(f"max pairs per node must be a whole number >= 0 (got {self.max_pairs_per_node!r})")
        if problems:
            raise ConfigError("; ".join(problems))

    def settings(self) -> dict[str, Any]:
        return {"label_threshold": self.label_threshold, "pair_margin": self.pair_margin,
                "max_pairs_per_node": self.max_pairs_per_node}


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _score(value: Any) -> float | None:
    """A MICS-Score as recorded (a fraction of intern samples), or None for a node that was not scored."""
    return float(value) if _is_number(value) and 0 <= value <= 1 else None


def gap_key(gap: float) -> str:
    """The histogram bin of a chosen-minus-rejected score gap: two decimals, exact for quarters and tenths."""
    return f"{gap + _TOLERANCE:.2f}"


@dataclass(frozen=True)
class Candidate:
    """A scored node with the scored path to it: ``path`` holds (text, score) of its ancestors, root first."""

    node: int
    parent: int | None
    depth: int
    mentor: str
    reused: bool
    selected: bool
    text: str
    score: float
    path: tuple[tuple[str, float], ...]

    @property
    def prefix(self) -> str:
        return "\n\n".join(text for text, _ in self.path)


def scored_candidates(record: dict[str, Any]) -> tuple[list[Candidate], Counter]:
    """Every node of a MICS record's tree that was scored and whose ancestors were, in tree order; the nodes
    left out, counted by reason (``unscored``, ``unscored_ancestor``, ``broken_path``, ``empty_step``,
    ``duplicate_id``)."""
    skipped: Counter = Counter()
    nodes: dict[int, dict[str, Any]] = {}
    order: list[int] = []
    tree = record.get("tree") if isinstance(record.get("tree"), list) else []
    for node in tree:
        if not isinstance(node, dict) or type(node.get("id")) is not int:
            skipped["broken_path"] += 1
        elif node["id"] in nodes:
            skipped["duplicate_id"] += 1
        else:
            nodes[node["id"]] = node
            order.append(node["id"])

    resolved: dict[int, Candidate | str] = {}  # a node's candidate, or why it is none

    def resolve(node_id: int, seen: frozenset[int]) -> Candidate | str:
        if node_id in resolved:
            return resolved[node_id]
        node = nodes[node_id]
        parent = node.get("parent")
        path: tuple[tuple[str, float], ...] = ()
        steps_before = 0
        if parent is not None:
            if type(parent) is not int or parent not in nodes or parent in seen:
                return _remember(resolved, node_id, "broken_path")
            above = resolve(parent, seen | {node_id})
            if isinstance(above, str):
                why = "unscored_ancestor" if above in ("unscored", "unscored_ancestor") else above
                return _remember(resolved, node_id, "broken_path" if why == "empty_step" else why)
            path = (*above.path, (above.text, above.score))
            steps_before = sum(len(_steps(nodes[n])) for n in _chain(nodes, parent))
        score = _score(node.get("score"))
        depth = node.get("depth")
        if type(depth) is not int or depth != len(path) + 1:
            return _remember(resolved, node_id, "broken_path")
        if score is None:
            return _remember(resolved, node_id, "unscored")
        text = node.get("step") if isinstance(node.get("step"), str) else ""
        if not text.strip():
            text = render_steps(_steps(node), start=steps_before + 1)
        if not text.strip():
            return _remember(resolved, node_id, "empty_step")
        candidate = Candidate(
            node=node_id, parent=parent, depth=depth, mentor=str(node.get("mentor") or ""),
            reused=node.get("reused") is True, selected=node.get("selected") is True,
            text=text, score=score, path=path,
        )
        return _remember(resolved, node_id, candidate)

    candidates = []
    for node_id in order:
        outcome = resolve(node_id, frozenset())
        if isinstance(outcome, str):
            skipped[outcome] += 1
        else:
            candidates.append(outcome)
    return candidates, skipped


def _remember(resolved: dict[int, Candidate | str], node_id: int, outcome: Candidate | str) -> Candidate | str:
    resolved[node_id] = outcome
    return outcome


def _steps(node: dict[str, Any]) -> list[str]:
    steps = node.get("steps")
    return [step for step in steps if isinstance(step, str)] if isinstance(steps, list) else []


def _chain(nodes: dict[int, dict[str, Any]], node_id: int) -> Iterator[int]:
    """``node_id`` and its ancestors (already checked to end at the root)."""
    while node_id is not None:
        yield node_id
        node_id = nodes[node_id].get("parent")


def _common(record: dict[str, Any], case_id: str, images: list[str], source: str) -> dict[str, Any]:
    version = record.get("grader_version")
    return {
        "rid": str(record.get("rid")),
        "case_id": case_id,
        "images": images,
        "grader_version": version if type(version) is int else None,
        "source": source,
    }


def step_rows(
    record: dict[str, Any], candidates: list[Candidate], options: StepOptions, *, case_id: str, images: list[str],
    source: str,
) -> list[dict[str, Any]]:
    """One stepwise-supervision row per candidate."""
    common = _common(record, case_id, images, source)
    question = str(record.get("question") or "")
    rows = []
    for candidate in candidates:
        scores = [score for _, score in candidate.path] + [candidate.score]
        rows.append({
            "id": f"{common['rid']}-n{candidate.node}",
            **common,
            "node": candidate.node,
            "depth": candidate.depth,
            "mentor": candidate.mentor,
            "reused": candidate.reused,
            "selected": candidate.selected,
            "prompt": question,
            "completions": [text for text, _ in candidate.path] + [candidate.text],
            "labels": [score > options.label_threshold + _TOLERANCE for score in scores],
            "scores": scores,
        })
    return rows


def _sibling_pairs(candidates: list[Candidate], options: StepOptions) -> tuple[list[tuple[Candidate, Candidate]], int]:
    """(chosen, rejected) pairs of siblings at least the margin apart, at most the cap per parent with the
    largest gaps first; and how many qualifying pairs the cap left out."""
    by_parent: dict[int | None, list[Candidate]] = {}
    for candidate in candidates:
        by_parent.setdefault(candidate.parent, []).append(candidate)
    pairs: list[tuple[Candidate, Candidate]] = []
    capped = 0
    for siblings in by_parent.values():
        found = [
            (high, low) for high in siblings for low in siblings
            if high.score - low.score >= options.pair_margin - _TOLERANCE and high.text != low.text
        ]
        found.sort(key=lambda pair: (-(pair[0].score - pair[1].score), pair[0].node, pair[1].node))
        pairs.extend(found[: options.max_pairs_per_node])
        capped += max(0, len(found) - options.max_pairs_per_node)
    return pairs, capped


def step_pairs(
    record: dict[str, Any], candidates: list[Candidate], options: StepOptions, *, case_id: str, images: list[str],
    source: str,
) -> tuple[list[dict[str, Any]], int]:
    """The preference pairs of one tree, and how many the per-node cap left out."""
    common = _common(record, case_id, images, source)
    question, answer = str(record.get("question") or ""), str(record.get("gt_answer") or "")
    # The user turn as the curriculum's Part 3 samples have it; an image part is a bare placeholder.
    parts = _user_content(len(images), task_prompt(question, answer_type_of(question, answer)))
    user_turn = {"role": "user", "content": [{k: v for k, v in part.items() if v is not None} for part in parts]}

    def step(candidate: Candidate) -> list[dict[str, Any]]:
        return [{"role": "assistant", "content": [{"type": "text", "text": candidate.text}]}]

    def step_path(candidate: Candidate) -> list[dict[str, Any]]:
        return [{"role": "assistant", "content": [{"type": "text", "text": candidate.prefix}]}] if candidate.path else []

    pairs, capped = _sibling_pairs(candidates, options)
    rows = []
    for chosen, rejected in pairs:
        rows.append({
            "id": f"{common['rid']}-n{chosen.node}-n{rejected.node}",
            **common,
            "depth": chosen.depth,
            "parent": chosen.parent,
            "prompt": [user_turn, *step_path(chosen)],
            "chosen": step(chosen),
            "rejected": step(rejected),
            "chosen_node": chosen.node,
            "rejected_node": rejected.node,
            "chosen_score": chosen.score,
            "rejected_score": rejected.score,
            "score_gap": chosen.score - rejected.score,
            "chosen_mentor": chosen.mentor,
            "rejected_mentor": rejected.mentor,
        })
    return rows, capped


# --- what the export counts ----------------------------------------------------------------------------


@dataclass
class StepStats:
    """Counts of a step export (or of a run's trees, for the report)."""

    options: StepOptions = field(default_factory=StepOptions)
    records: int = 0  # records that gave step data
    rows: int = 0
    labels: Counter = field(default_factory=lambda: Counter({"true": 0, "false": 0}))  # each candidate's own
    reused_rows: int = 0
    rows_by_depth: Counter = field(default_factory=Counter)
    pairs: int = 0
    pairs_over_cap: int = 0
    gap_histogram: Counter = field(default_factory=Counter)
    records_skipped: Counter = field(default_factory=Counter)
    nodes_skipped: Counter = field(default_factory=Counter)

    def add(self, rows: list[dict[str, Any]], pairs: list[dict[str, Any]], capped: int) -> None:
        self.records += 1
        self.rows += len(rows)
        for row in rows:
            self.labels["true" if row["labels"][-1] else "false"] += 1
            self.reused_rows += int(row["reused"])
            self.rows_by_depth[str(row["depth"])] += 1
        self.pairs += len(pairs)
        self.pairs_over_cap += capped
        self.gap_histogram.update(gap_key(pair["score_gap"]) for pair in pairs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "settings": self.options.settings(),
            "records": self.records,
            "rows": self.rows,
            "labels": dict(self.labels),
            "reused_rows": self.reused_rows,
            "rows_by_depth": dict(sorted(self.rows_by_depth.items(), key=lambda kv: int(kv[0]))),
            "pairs": self.pairs,
            "pairs_over_cap": self.pairs_over_cap,
            "gap_histogram": dict(sorted(self.gap_histogram.items())),
            "records_skipped": dict(sorted(self.records_skipped.items())),
            "nodes_skipped": dict(sorted(self.nodes_skipped.items())),
        }


def count_tree(record: dict[str, Any], stats: StepStats) -> None:
    """Add one search record's step rows and pairs to ``stats`` without writing them (``mics report``)."""
    if record.get("strategy") == "vanilla":
        stats.records_skipped["vanilla"] += 1
        return
    candidates, skipped = scored_candidates(record)
    stats.nodes_skipped.update(skipped)
    rows = step_rows(record, candidates, stats.options, case_id="", images=[], source="")
    pairs, capped = step_pairs(record, candidates, stats.options, case_id="", images=[], source="")
    stats.add(rows, pairs, capped)


# --- reading a run's outcomes ----------------------------------------------------------------------------


def _objects(path: Path, what: str) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(start, end, record) of each JSON object line of a file, ``start``/``end`` its bytes."""
    with open(path, "rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                raise InputError(
                    f"{path}:{number}: not a JSON line in the {what} file; give the files mics run wrote "
                    "(a run still writing may end in a torn line: build once it has stopped)"
                ) from None
            if isinstance(record, dict):
                yield start, offset, record


def _identity(path: Path) -> tuple[int, int]:
    found = path.stat()
    return found.st_dev, found.st_ino


def _read_at(handles: dict[Path, Any], path: Path, identity: tuple[int, int], start: int, end: int) -> dict[str, Any]:
    """The record at ``start``..``end`` of ``path``, which must be the file first read (a file that grew since is
    fine: a run still going only appends)."""
    handle = handles.get(path)
    if handle is None:
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            handle = None
        if handle is None or (os.fstat(handle.fileno()).st_dev, os.fstat(handle.fileno()).st_ino) != identity:
            if handle is not None:
                handle.close()
            raise _changed(path)
        handles[path] = handle
    handle.seek(start)
    try:
        record = json.loads(handle.read(end - start))
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict):
        raise _changed(path)
    return record


def _changed(path: Path) -> InputError:
    return InputError(f"{path} changed while it was being read (a run compacted or rewrote it). Build again once "
                      "the run has ended.")


def read_step_records(paths: Iterable[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(source, search record) of each item's standing outcome over ``paths`` (``mics run`` outputs) and the
    failed file beside each: successes, and the searches of ``no_path`` failures. ``source`` is the output's
    file name: it names the run without putting the machine's folders into a dataset that may be shared (and
    the same records give the same bytes wherever the run lived). Reads the files twice (which line stands
    for an item, then those lines by their byte offsets), so memory holds item keys, never every tree; a file
    replaced between the two (a run compacted it) is an :class:`InputError`."""
    files = []
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"MICS output file {str(path)!r} not found")
        failed = default_failed_path(Path(path))
        files.append((Path(path), failed if failed.is_file() else None))
    # Per line: (index into ``sources``, start, end); ``sources`` are (file, identity, the output's name).
    sources: list[tuple[Path, tuple[int, int], str]] = []
    successes, success_places = [], []
    for path, _ in files:
        sources.append((path, _identity(path), path.name))
        for start, end, record in _objects(path, "MICS output"):
            successes.append(success_line(record))
            success_places.append((len(sources) - 1, start, end))
    failures, failure_places = [], []
    for path, failed in files:
        if failed is None:
            continue
        sources.append((failed, _identity(failed), path.name))
        for start, end, record in _objects(failed, "failed"):
            failures.append(failure_key(record))
            failure_places.append((len(sources) - 1, start, end))
    kept, kept_failures = winning_lines(successes, failures)
    kept_places = [success_places[index] for index in kept]
    kept_failure_places = [failure_places[index] for index in kept_failures]
    del successes, failures, success_places, failure_places, kept, kept_failures

    handles: dict[Path, Any] = {}
    try:
        for source, start, end in kept_places:
            path, identity, name = sources[source]
            yield name, _read_at(handles, path, identity, start, end)
        for source, start, end in kept_failure_places:
            path, identity, name = sources[source]
            record = _read_at(handles, path, identity, start, end)
            error = record.get("error") if isinstance(record.get("error"), dict) else {}
            search = record.get("search")
            if error.get("kind") in SEARCHED_FAILURES and isinstance(search, dict):
                yield name, {**search, "rid": search.get("rid") or record.get("rid") or record.get("key")}
    finally:
        for handle in handles.values():
            handle.close()


# --- writing a steps folder ------------------------------------------------------------------------------


def write_steps(
    records: Iterable[tuple[str, dict[str, Any]]],
    folder: Path,
    *,
    image_dir: Path,
    images_root: Path,
    catalog: ImageCatalog,
    options: StepOptions,
    test_fraction: float,
    seed: int,
    case_of: dict[str, str] | None = None,
) -> StepStats:
    """Write the step rows and pairs of the train-side cases of ``records`` into ``folder`` (see the module
    doc), their images into ``images_root`` by content hash. A case is held out as ``mics dataset build``
    holds it out (:func:`is_held_out` of its case id, ``case_of`` mapping item ids to case ids), so with the
    same seed and fraction no case gives step data on one side and curriculum rows on the other."""
    from datasets import disable_progress_bars

    disable_progress_bars()
    case_of = case_of or {}
    stats = StepStats(options=options)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / STEPS_FILE, "w", encoding="utf-8") as steps_out, open(folder / PAIRS_FILE, "w", encoding="utf-8") as pairs_out:
        for source, record in records:
            if record.get("strategy") == "vanilla":
                stats.records_skipped["vanilla"] += 1
                continue
            rid = str(record.get("rid"))
            case_id = case_of.get(rid, rid)
            if is_held_out(case_id, test_fraction, seed):
                stats.records_skipped["held_out"] += 1
                continue
            images = record.get("images") or []
            images = images if isinstance(images, list) else [None]  # not a list of paths: unusable
            infos = [catalog.lookup(image, image_dir) if isinstance(image, str) else None for image in images]
            if any(info is None for info in infos):
                stats.records_skipped["image_missing_or_unreadable"] += 1
                continue
            placed = [posix_relpath(catalog.place(info, images_root), folder) for info in infos]
            candidates, skipped = scored_candidates(record)
            stats.nodes_skipped.update(skipped)
            if not candidates:
                stats.records_skipped["no_scored_node"] += 1
                continue
            rows = step_rows(record, candidates, options, case_id=case_id, images=placed, source=source)
            pairs, capped = step_pairs(record, candidates, options, case_id=case_id, images=placed, source=source)
            for row in rows:
                steps_out.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            for pair in pairs:
                pairs_out.write(json.dumps(pair, ensure_ascii=False, sort_keys=True) + "\n")
            stats.add(rows, pairs, capped)
    write_hf(folder / STEPS_FILE, folder / HF_STEPS, STEPS)
    write_hf(folder / PAIRS_FILE, folder / HF_PAIRS, PAIRS)
    return stats
