"""``mics dataset build``: MICS output + cases (+ text QA + general VQA sets) -> the curriculum folders."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..outputs import settle
from ..task_format import final_answer_line, task_prompt, write_task_format
from .alignment import AlignmentOptions, alignment_samples
from .curriculum import Recipe, assemble_stage, is_held_out, split_by_case
from .evalset import answer_type_of, write_eval_items
from .exports import export_samples, place_images
from .images import ImageCatalog
from .qc import QcOptions, grade_final_answers, needs_final_answer_grade, quality_control
from .samples import PART1, PART3, Sample, case_captions, case_text, detect_modality
from .stats import dataset_stats, write_stats
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
    recipe = options.recipe
    catalog = ImageCatalog()
    drops: dict[str, Counter] = {"qc": Counter(), "part1": Counter(), "part2": Counter(), "part3": Counter(), "vqa": Counter()}

    # Cases: the case id behind each item id, and the captions Part 2 is made from.
    case_of: dict[str, str] = {}
    cases: dict[str, dict[str, Any]] = {}
    held_out_items: list[tuple[dict[str, Any], str]] = []
    for record in read_jsonl(options.cases, "cases"):
        view = _case_view(record)
        item_id, _ = item_case_id(record)
        case_of[item_id] = view["case_id"]
        cases.setdefault(view["case_id"], view)
        if is_held_out(view["case_id"], recipe.test_fraction, options.seed):
            held_out_items.append((record, view["case_id"]))

    samples: list[Sample] = []

    # Part 3: MICS chain-of-thought that passes quality control.
    # One success per item by the journal's rule (a run's file may hold a cut group or a repeat until it compacts).
    mics_records = settle([record for path in options.mics for record in read_jsonl(path, "MICS output")], [])[0]
    graded_here = 0
    if any(needs_final_answer_grade(record) for record in mics_records):
        graded_here = asyncio.run(_grade_older_records(mics_records, options.judge))
    qc = quality_control(
        mics_records,
        QcOptions(tuple(recipe.keep_trends), recipe.keep_single_step, recipe.keep_search_id_zero, recipe.keep_ungraded,
                  recipe.include_vanilla),
    )
    drops["qc"] = qc.dropped
    for record in qc.kept:
        rid = str(record["rid"])
        infos = [catalog.lookup(image, options.image_dir) for image in record.get("images") or []]
        if any(info is None for info in infos):
            drops["part3"]["image_missing_or_unreadable"] += 1
            continue
        case_id = case_of.get(rid, rid)
        samples.append(
            Sample(
                id=f"{rid}-cot",
                case_id=case_id,
                source=PART3,
                prompt=task_prompt(record["question"], answer_type_of(record["question"], str(record.get("gt_answer") or ""))),
                response=record["reasoning"],
                images=[info.path for info in infos],
                modality=detect_modality(record["question"], cases.get(case_id, {}).get("text", ""),
                                         images=record.get("images"), case=cases.get(case_id, {}).get("fields")),
            )
        )

    # Part 1: text multiple-choice QA made from case text (mics generate qa).
    if options.text_qa is not None:
        for record in settle(read_jsonl(options.text_qa, "text QA"), [])[0]:
            question, answer = str(record.get("question") or "").strip(), str(record.get("answer") or "").strip()
            if not question or not answer:
                drops["part1"]["missing_question_or_answer"] += 1
                continue
            rationale = str(record.get("rationale") or "").strip()
            response = (f"{rationale}\n\n" if rationale else "") + final_answer_line(answer)
            case_id = str(record.get("case_id") or record.get("id"))
            samples.append(
                Sample(f"{record.get('id')}-qa", case_id, PART1, task_prompt(question, "choice"), response, [], "none")
            )

    # Part 2: image-text alignment from captions.
    part2, drops["part2"], caption_cleaning = alignment_samples(
        [cases[key] for key in sorted(cases)],
        catalog,
        options.image_dir,
        AlignmentOptions(recipe.alignment_min_side, recipe.alignment_max_images),
        options.seed,
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
                       [info.path for info in infos], detect_modality(question, images=images, case=record))
            )

    train, test = split_by_case(samples, recipe.test_fraction, options.seed)
    stages = {stage: assemble_stage(stage, sources, train, options.seed) for stage, sources in recipe.stages.items()}

    options.output.mkdir(parents=True, exist_ok=True)
    image_paths = place_images([*train, *test], catalog, options.output / "images")
    for stage, stage_samples in stages.items():
        export_samples(stage_samples, options.output / stage, name=f"mmrp_{stage}", image_paths=image_paths, pool=train)
    export_samples(test, options.output / "test", name="mmrp_test", image_paths=image_paths)
    eval_count, drops["eval"] = write_eval_items(
        held_out_items, catalog, options.image_dir, options.output / "test" / "eval.jsonl",
        options.output / "test" / "images",
    )
    # Step data from every scored tree, failed searches included, on the side of the split its case is on.
    steps = write_steps(
        read_step_records(options.mics), options.output / "steps", image_dir=options.image_dir,
        images_root=options.output / "images", catalog=catalog, options=options.steps,
        test_fraction=recipe.test_fraction, seed=options.seed, case_of=case_of,
    )
    write_stats(dataset_stats(stages, test, mics_records, drops, caption_cleaning, steps.as_dict()), options.output)
    write_task_format(options.output / "task_format.json")
    return BuildReport(
        stages={stage: len(items) for stage, items in stages.items()},
        test=len(test),
        drops={step: dict(counter) for step, counter in drops.items() if counter},
        output=options.output,
        graded_here=graded_here,
        eval_items=eval_count,
        steps=steps,
    )


async def _grade_older_records(records: list[dict[str, Any]], judge_name: str | None) -> int:
    """Grade final answers the search did not (files written before it did), with the judge if named."""
    from ..agents import open_judge
    from ..config import load_settings

    async with open_judge(judge_name, load_settings()) as judge:
        return await grade_final_answers(records, judge)
