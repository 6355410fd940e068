"""``mics dataset build``: MICS output + cases (+ text QA + general VQA sets) -> the curriculum folders."""

from __future__ import annotations

import asyncio
import json
import os
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InputError
from ..outputs import Line, success_line, winning_lines
from ..task_format import final_answer_line, task_prompt, write_task_format
from .alignment import AlignmentOptions, alignment_samples
from .curriculum import Recipe, assemble_stage, is_held_out, split_by_case
from .evalset import answer_type_of, write_eval_items
from .exports import export_samples, place_images
from .images import ImageCatalog
from .qc import QcOptions, drop_reason, grade_final_answers, needs_final_answer_grade
from .samples import PART1, PART3, Sample, TextSpill, case_captions, case_text, detect_modality
from .stats import MicsCounts, dataset_stats, write_stats
from .steps import StepOptions, StepStats, read_step_records, write_steps

__all__ = ["BuildOptions", "BuildReport", "build_dataset", "item_case_id", "read_jsonl"]


@dataclass
class BuildOptions:
    mics: list[Path]
    cases: Path
    image_dir: Path
    output: Path
    recipe: Recipe
    text_qa: Path | None = None
    vqa: dict[str, Path] = field(default_factory=dict)
    seed: int = 0
    # Grades the final answers of MICS records written before the search did (a LiteLLM name, or None).
    judge: str | None = None
    # Labels and pairs of the step data written to OUTPUT/steps/ (mics_agents.dataset.steps).
    steps: StepOptions = field(default_factory=StepOptions)


@dataclass
class BuildReport:
    stages: dict[str, int]
    test: int
    drops: dict[str, dict[str, int]]
    output: Path
    graded_here: int = 0  # MICS records whose final answer this build graded (older output files)
    eval_items: int = 0  # questions of held-out cases in test/eval.jsonl
    steps: StepStats | None = None  # the step rows and pairs written to steps/

    @property
    def step_rows(self) -> int:
        return self.steps.rows if self.steps else 0

    @property
    def step_pairs(self) -> int:
        return self.steps.pairs if self.steps else 0


def read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; a missing file or a line that is not JSON is an :class:`InputError`."""
    if not path.is_file():
        raise InputError(f"{what} file {str(path)!r} not found")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: invalid JSON in the {what} file ({exc.msg})") from None
            if isinstance(record, dict):
                records.append(record)
    return records


class _CaseFile:
    """The cases file, read a line at a time: each object with where its line starts, then any of them again
    by that offset (from the same file: one replaced between the reads is refused)."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise InputError(f"cases file {str(path)!r} not found")
        self.path = path
        self._handle: BinaryIO | None = None
        self._identity: tuple[int, int] | None = None

    def records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(start, object) of each line that holds a JSON object, as :func:`read_jsonl` reads them."""
        with open(self.path, "rb") as handle:
            found = os.fstat(handle.fileno())
            self._identity = (found.st_dev, found.st_ino)
            offset = 0
            for number, raw in enumerate(handle, start=1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{self.path}:{number}: invalid JSON in the cases file ({exc.msg})") from None
                except (UnicodeDecodeError, RecursionError) as exc:
                    reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "nested too deeply"
                    raise InputError(f"{self.path}:{number}: invalid JSON in the cases file ({reason})") from None
                if isinstance(record, dict):
                    yield start, record

    def record(self, start: int) -> dict[str, Any]:
        if self._handle is None:
            assert self._identity is not None, "records() first"
            self._handle = _reopen(self.path, self._identity)
        self._handle.seek(start)
        try:
            record = json.loads(self._handle.readline())
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict):
            raise _changed(self.path)
        return record

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _case_view(record: dict[str, Any]) -> dict[str, Any]:
    """A case record of any accepted layout as {case_id, images, caption, text}."""
    return {
        "case_id": str(record.get("case_id") or record.get("rid") or record.get("id")),
        "images": [image for image in record.get("images") or [] if isinstance(image, str)],
        "caption": case_captions(record),
        "text": case_text(record),
        "fields": record,  # modality fields and title, read by detect_modality
    }


def item_case_id(record: dict[str, Any]) -> tuple[str, str]:
    """(item id, case id) of a case record: the split holds out case ids, MICS output names item ids."""
    case_id = _case_view(record)["case_id"]
    return str(record.get("rid") or record.get("id") or case_id), case_id


def build_dataset(options: BuildOptions) -> BuildReport:
    cases = _CaseFile(options.cases)
    try:
        with TextSpill(_existing_folder(options.output)) as spill:
            return _build(options, cases, spill)
    finally:
        cases.close()


def _existing_folder(path: Path) -> Path | None:
    """The nearest folder that exists at or above ``path`` (where the spill file goes: the output's disk)."""
    for folder in (path, *path.parents):
        if folder.is_dir():
            return folder
    return None


def _build(options: BuildOptions, cases: _CaseFile, spill: TextSpill) -> BuildReport:
    """The build, every sample's texts in ``spill`` (a sample holds its ids, images and modality)."""
    recipe = options.recipe
    catalog = ImageCatalog()
    drops: dict[str, Counter] = {"qc": Counter(), "part1": Counter(), "part2": Counter(), "part3": Counter(), "vqa": Counter()}

    # Cases: the case id behind each item id, and where each case's line is (its captions make Part 2, its
    # text and fields name a modality): the records are read back by offset when needed, never held.
    case_of: dict[str, str] = {}
    case_at: dict[str, int] = {}  # case id -> start of its first line
    held_out_at = array("q")  # starts of the held-out cases' lines, for test/eval.jsonl
    for start, record in cases.records():
        item_id, case_id = item_case_id(record)
        case_of[item_id] = case_id
        case_at.setdefault(case_id, start)
        if is_held_out(case_id, recipe.test_fraction, options.seed):
            held_out_at.append(start)

    def case_view(case_id: str) -> dict[str, Any]:
        return _case_view(cases.record(case_at[case_id])) if case_id in case_at else {}

    samples: list[Sample] = []

    # Part 3: MICS chain-of-thought that passes quality control.
    # One success per item by the journal's rule (a run's file may hold a cut group or a repeat until it compacts),
    # read one at a time: a first pass finds where each item's line is, a second reads those lines.
    standing = _standing_mics(options.mics)
    graded = [0]
    qc_options = QcOptions(tuple(recipe.keep_trends), recipe.keep_single_step, recipe.keep_search_id_zero,
                           recipe.keep_ungraded, recipe.include_vanilla)
    mics_counts = MicsCounts()
    for record in _graded(_read_standing(standing), options.judge, standing.needs_grade, graded):
        mics_counts.add(record)
        reason = drop_reason(record, qc_options)
        if reason:
            drops["qc"][reason] += 1
            continue
        rid = str(record["rid"])
        infos = [catalog.lookup(image, options.image_dir) for image in record.get("images") or []]
        if any(info is None for info in infos):
            drops["part3"]["image_missing_or_unreadable"] += 1
            continue
        case_id = case_of.get(rid, rid)
        case = case_view(case_id)
        samples.append(
            Sample(
                id=f"{rid}-cot",
                case_id=case_id,
                source=PART3,
                prompt=task_prompt(record["question"], answer_type_of(record["question"], str(record.get("gt_answer") or ""))),
                response=record["reasoning"],
                images=[info.path for info in infos],
                modality=detect_modality(record["question"], case.get("text", ""),
                                         images=record.get("images"), case=case.get("fields")),
            ).spill(spill)
        )

    # Part 1: text multiple-choice QA made from case text (mics generate qa).
    if options.text_qa is not None:
        # One record per item by the journal's rule, as for MICS output, read back one at a time.
        for record in _read_standing(_standing_mics([options.text_qa], "text QA")):
            question, answer = str(record.get("question") or "").strip(), str(record.get("answer") or "").strip()
            if not question or not answer:
                drops["part1"]["missing_question_or_answer"] += 1
                continue
            rationale = str(record.get("rationale") or "").strip()
            response = (f"{rationale}\n\n" if rationale else "") + final_answer_line(answer)
            case_id = str(record.get("case_id") or record.get("id"))
            samples.append(
                Sample(f"{record.get('id')}-qa", case_id, PART1, task_prompt(question, "choice"), response, [],
                       "none").spill(spill)
            )

    # Part 2: image-text alignment from captions.
    part2, drops["part2"], caption_cleaning = alignment_samples(
        (case_view(case_id) for case_id in sorted(case_at)),
        catalog,
        options.image_dir,
        AlignmentOptions(recipe.alignment_min_side, recipe.alignment_max_images),
        options.seed,
        spill,
    )
    samples.extend(part2)

    # General medical VQA sets, images relative to their own file.
    for name, path in sorted(options.vqa.items()):
        for record in read_jsonl(path, f"VQA set {name!r}"):
            question, answer = str(record.get("question") or "").strip(), str(record.get("answer") or "").strip()
            images = record.get("images") or []
            if isinstance(images, str):
                images = [images]
            infos = [catalog.lookup(image, path.parent) for image in images]
            if not question or not answer or any(info is None for info in infos):
                drops["vqa"][f"{name}:unusable"] += 1
                continue
            item_id = str(record.get("id") or record.get("qid") or len(samples))
            samples.append(
                Sample(f"{name}-{item_id}", f"vqa:{name}:{item_id}", f"vqa:{name}",
                       task_prompt(question, answer_type_of(question, answer)), final_answer_line(answer),
                       [info.path for info in infos], detect_modality(question, images=images, case=record)).spill(spill)
            )

    train, test = split_by_case(samples, recipe.test_fraction, options.seed)
    stages = {stage: assemble_stage(stage, sources, train, options.seed) for stage, sources in recipe.stages.items()}

    options.output.mkdir(parents=True, exist_ok=True)
    image_paths = place_images([*train, *test], catalog, options.output / "images")
    for stage, stage_samples in stages.items():
        export_samples(stage_samples, options.output / stage, name=f"mmrp_{stage}", image_paths=image_paths, pool=train)
    export_samples(test, options.output / "test", name="mmrp_test", image_paths=image_paths)
    eval_count, drops["eval"] = write_eval_items(
        ((record, item_case_id(record)[1]) for record in map(cases.record, held_out_at)), catalog, options.image_dir, options.output / "test" / "eval.jsonl",
        options.output / "test" / "images",
    )
    # Step data from every scored tree, failed searches included, on the side of the split its case is on.
    steps = write_steps(
        read_step_records(options.mics), options.output / "steps", image_dir=options.image_dir,
        images_root=options.output / "images", catalog=catalog, options=options.steps,
        test_fraction=recipe.test_fraction, seed=options.seed, case_of=case_of,
    )
    write_stats(dataset_stats(stages, test, mics_counts, drops, caption_cleaning, steps.as_dict()), options.output)
    write_task_format(options.output / "task_format.json")
    return BuildReport(
        stages={stage: len(items) for stage, items in stages.items()},
        test=len(test),
        drops={step: dict(counter) for step, counter in drops.items() if counter},
        output=options.output,
        graded_here=graded[0],
        eval_items=eval_count,
        steps=steps,
    )


# --- reading MICS output twice, holding no record -------------------------------------------------------


@dataclass
class _Standing:
    """Where each item's standing success line is: (file, start, end) of each, in the order the files give
    them, and each file's identity when it was read (a run that compacts it between the passes replaces it)."""

    files: list[tuple[Path, tuple[int, int]]]
    places: array
    needs_grade: bool  # a standing record the search did not grade (older output): the judge is opened for it


def _mics_lines(path: Path, what: str = "MICS output") -> Iterator[tuple[int, int, int, Any]]:
    """(line number, start, end, JSON value) of each non-blank line of a MICS output file (or another run's
    output: ``what`` names it in errors)."""
    with open(path, "rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            if raw.strip():
                yield number, start, offset, _decode_mics(raw, path, number, what)


def _decode_mics(raw: bytes, path: Path, number: int, what: str = "MICS output") -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{number}: invalid JSON in the {what} file ({exc.msg})") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "nested too deeply"
        raise InputError(f"{path}:{number}: invalid JSON in the {what} file ({reason})") from None


def _standing_mics(paths: list[Path], what: str = "MICS output") -> _Standing:
    """The first pass: each line's item, and where its bytes are; records are decoded one at a time, dropped
    (MICS output, or the text QA of ``mics generate qa``: ``what`` names it in errors)."""
    files: list[tuple[Path, tuple[int, int]]] = []
    lines: list[Line] = []
    places = array("q")
    needs = array("b")
    for path in paths:
        if not path.is_file():
            raise InputError(f"{what} file {str(path)!r} not found")
        found = path.stat()
        files.append((path, (found.st_dev, found.st_ino)))
        for _, start, end, record in _mics_lines(path, what):
            if isinstance(record, dict):
                lines.append(success_line(record))
                places.extend((len(files) - 1, start, end))
                needs.append(needs_final_answer_grade(record))
    kept, _ = winning_lines(lines, [])
    del lines
    standing = array("q")
    for index in kept:
        standing.extend(places[3 * index:3 * index + 3])
    return _Standing(files, standing, any(needs[index] for index in kept))


def _read_standing(standing: _Standing) -> Iterator[dict[str, Any]]:
    """The second pass: the standing records, one at a time, from files that must be the ones first read (a
    file that grew since is fine: a run still going only appends)."""
    handle, current = None, -1
    try:
        for at in range(0, len(standing.places), 3):
            file, start, end = standing.places[at:at + 3]
            path, identity = standing.files[file]
            if file != current:
                if handle is not None:
                    handle.close()
                handle, current = _reopen(path, identity), file
            handle.seek(start)
            raw = handle.read(end - start)
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):
                record = None
            if not isinstance(record, dict):
                raise _changed(path)
            yield record
    finally:
        if handle is not None:
            handle.close()


def _reopen(path: Path, identity: tuple[int, int]) -> BinaryIO:
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise _changed(path) from None
    found = os.fstat(handle.fileno())
    if (found.st_dev, found.st_ino) != identity:
        handle.close()
        raise _changed(path)
    return handle


def _changed(path: Path) -> InputError:
    return InputError(
        f"{path} changed while the build read it (a run compacted or rewrote it). Build again once the run "
        "has ended."
    )


# Records graded together (the judge's calls run concurrently within a batch).
_GRADE_BATCH = 256


def _graded(records: Iterator[dict[str, Any]], judge_name: str | None, needed: bool, graded: list[int]) -> Iterator[dict[str, Any]]:
    """``records``, each with a ``final_answer_grade``: those the search did not grade (files written before it
    did) are graded here, a batch at a time, with the judge if named; ``graded[0]`` counts them."""
    if not needed:
        yield from records
        return
    from ..agents import open_judge
    from ..config import load_settings

    with asyncio.Runner() as runner:
        context = open_judge(judge_name, load_settings())
        judge = runner.run(context.__aenter__())
        try:
            batch: list[dict[str, Any]] = []
            for record in records:
                batch.append(record)
                if len(batch) == _GRADE_BATCH:
                    graded[0] += runner.run(grade_final_answers(batch, judge))
                    yield from batch
                    batch = []
            graded[0] += runner.run(grade_final_answers(batch, judge))
            yield from batch
        finally:
            runner.run(context.__aexit__(None, None, None))
