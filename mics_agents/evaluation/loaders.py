"""Benchmark loaders: the published layouts of medical VQA benchmarks, read from local files.

Nothing is downloaded. Each loader yields :class:`EvalItem`s; :func:`prepare_benchmark` writes them as a
plain JSONL (images embedded in parquet files are written out as files once) that ``mics eval`` runs on.

| layout | file | recognised by |
| --- | --- | --- |
| VQA-RAD (OSF release; test rows: ``phrase_type`` ``test_freeform``/``test_para``) | ``VQA_RAD Dataset Public.json`` | a JSON list with ``image_name``, ``qid``, ``answer_type`` |
| SLAKE | ``test.json`` | a JSON list with ``img_name`` and ``q_lang`` (English questions kept) |
| PMC-VQA | ``test.csv`` / ``test_2.csv`` | a CSV with ``Figure_path``, ``Choice A``..., ``Answer_label`` |
| MMMU (Health & Medicine subjects) | ``*.parquet`` | columns ``options`` and ``image_1`` |
| VQA-RAD / SLAKE / PathVQA (Hugging Face; ``q_lang``, ``answer_type`` read as in SLAKE's file) | ``*.parquet`` | columns ``image``, ``question``, ``answer`` |
| MedXpertQA-MM | ``MM/test.jsonl`` | lines with ``options`` and ``label`` |
| Chiron-o1 eval data | ``eval_data.json`` | a JSON list of ``{id, img_name, question, answer, answer_type}`` (or MICS input records) |
| plain (also ``mics dataset build``'s ``test/eval.jsonl``) | ``*.jsonl`` | ``id, question, answer, images`` (+ optional ``options``, ``answer_type``, ``modality``) |
| curriculum exports | ``messages.jsonl`` / ``llava.json`` | TRL ``messages`` rows / ShareGPT ``conversations`` (alignment samples left out) |
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..answers import parse_solution
from ..data import parse_record
from ..dataset.evalset import answer_type_of
from ..task_format import strip_task_instruction
from ..dataset.samples import detect_modality
from ..errors import InputError

__all__ = ["EvalItem", "PreparedBenchmark", "KNOWN_SIZES", "detect_layout", "default_image_dir", "load_benchmark",
           "prepare_benchmark"]


@dataclass
class EvalItem:
    id: str
    question: str
    answer: str
    images: list[str] = field(default_factory=list)  # paths relative to the benchmark's image folder
    options: dict[str, str] = field(default_factory=dict)
    answer_type: str = "open"  # open | closed (yes/no) | choice
    modality: str = "other"
    image_bytes: list[bytes] = field(default_factory=list, repr=False)  # parquet layouts carry the images


def _render(question: str, options: dict[str, str]) -> str:
    if not options:
        return question.strip()
    return question.strip() + "\n" + "\n".join(f"{letter}. {text}" for letter, text in sorted(options.items()))


def _choice_item(item_id: str, question: str, options: dict[str, str], label: str, **extra: Any) -> EvalItem:
    label = label.strip().upper()[:1]
    if label not in options:
        raise InputError(f"item {item_id}: answer label {label!r} is not one of the options {sorted(options)}")
    return EvalItem(item_id, _render(question, options), f"{label}. {options[label]}", options=options,
                    answer_type="choice", **extra)


def _closed_or_open(answer: str, answer_type: str | None = None) -> str:
    if answer_type:
        return "closed" if answer_type.strip().upper() == "CLOSED" else "open"
    return "closed" if answer.strip().lower() in {"yes", "no"} else "open"


def detect_layout(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "pmc_vqa"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = set(pq.read_schema(path).names)
        return "mmmu" if {"options", "image_1"} <= columns else "hf_vqa"
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "{}")
        record = json.loads(first)
        if {"options", "label"} <= set(record):
            return "medxpertqa"
        messages = record.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[0], dict) and "role" in messages[0]:
            return "messages"
        return "plain"
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        first = data[0] if isinstance(data, list) and data else {}
        if {"img_name", "q_lang"} <= set(first):
            return "slake"
        if {"image_name", "qid", "answer_type"} <= set(first):
            return "vqa_rad"
        if "conversations" in first:
            return "llava"
        return "chiron"
    raise InputError(f"{path}: unknown benchmark layout (expected .json, .jsonl, .csv or .parquet)")


# The OSF release holds train and test rows; its test set is the 451 rows of these two phrase types.
VQA_RAD_TEST_PHRASES = {"test_freeform", "test_para"}


def _vqa_rad(path: Path, warn: Warn) -> Iterator[EvalItem]:
    records = json.loads(path.read_text(encoding="utf-8"))
    has_split = any(isinstance(record, dict) and "phrase_type" in record for record in records)
    if not has_split:
        warn("no phrase_type field: cannot tell VQA-RAD's test rows from its train rows; every row is used")
    for record in records:
        if has_split and record.get("phrase_type") not in VQA_RAD_TEST_PHRASES:
            continue
        answer = str(record["answer"]).strip()
        yield EvalItem(str(record["qid"]), str(record["question"]).strip(), answer, [record["image_name"]],
                       answer_type=_closed_or_open(answer, record.get("answer_type")),
                       modality=detect_modality(str(record.get("image_organ", "")), str(record["question"])))


def _english(record: dict[str, Any]) -> bool:
    """SLAKE's published English split: ``q_lang`` "en" (its Chinese questions say "zh"); no field, no filter."""
    return str(record.get("q_lang") or "en").strip().lower() == "en"


def _slake(path: Path, warn: Warn) -> Iterator[EvalItem]:
    for record in json.loads(path.read_text(encoding="utf-8")):
        if not _english(record):
            continue
        answer = str(record["answer"]).strip()
        yield EvalItem(str(record["qid"]), str(record["question"]).strip(), answer, [record["img_name"]],
                       answer_type=_closed_or_open(answer, record.get("answer_type")),
                       modality=detect_modality(str(record["question"]), images=[record["img_name"]], case=record))


def _pmc_vqa(path: Path, warn: Warn) -> Iterator[EvalItem]:
    with open(path, encoding="utf-8", newline="") as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            options = {}
            for letter in "ABCD":
                text = (row.get(f"Choice {letter}") or "").strip()
                # PMC-VQA writes choices as "A:text" / " B:text".
                text = re.sub(rf"^\s*{letter}\s*[:.]\s*", "", text)
                if text:
                    options[letter] = text
            item_id = str(row.get("index") or row.get("", "") or index)
            yield _choice_item(item_id, row["Question"], options, row["Answer_label"], images=[row["Figure_path"]],
                               modality=detect_modality(row["Question"]))


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for batch in table.to_batches(max_chunksize=256):
        yield from batch.to_pylist()


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return None


def _mmmu(path: Path, warn: Warn) -> Iterator[EvalItem]:
    for row in _parquet_rows(path):
        images = [data for data in (_image_bytes(row.get(f"image_{k}")) for k in range(1, 8)) if data]
        question = re.sub(r"<image (\d+)>", r"[image \1]", str(row["question"]))
        raw_options = row.get("options") or "[]"
        choices = ast.literal_eval(raw_options) if isinstance(raw_options, str) else list(raw_options)
        if row.get("question_type", "multiple-choice") == "multiple-choice" and choices:
            options = {chr(ord("A") + i): str(choice) for i, choice in enumerate(choices)}
            item = _choice_item(str(row["id"]), question, options, str(row["answer"]))
        else:
            item = EvalItem(str(row["id"]), question, str(row["answer"]))
        item.image_bytes = images
        item.modality = detect_modality(question)
        yield item


def _hf_vqa(path: Path, warn: Warn) -> Iterator[EvalItem]:
    """VQA-RAD, SLAKE or PathVQA as a Hugging Face parquet. Where the file keeps SLAKE's columns, the same
    split and labels as its ``test.json``: English questions only, closed or open as ``answer_type`` says."""
    for index, row in enumerate(_parquet_rows(path)):
        if not _english(row):
            continue
        data = _image_bytes(row.get("image"))
        answer = str(row["answer"]).strip()
        label = row.get("answer_type")
        item_id = next((row[key] for key in ("qid", "id") if row.get(key) is not None), index)
        item = EvalItem(str(item_id), str(row["question"]).strip(), answer,
                        answer_type=_closed_or_open(answer, label if isinstance(label, str) else None),
                        modality=detect_modality(str(row["question"]), case=row))
        item.image_bytes = [data] if data else []
        yield item


def _medxpertqa(path: Path, warn: Warn) -> Iterator[EvalItem]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            # The question text already ends with "Answer Choices: (A) ... (B) ..."; keep it as written.
            question = str(record["question"]).strip()
            options = {str(k).upper(): str(v) for k, v in record["options"].items()}
            label = str(record["label"]).strip().upper()[:1]
            yield EvalItem(str(record["id"]), question, f"{label}. {options[label]}", list(record.get("images") or []),
                           options=options, answer_type="choice",
                           modality=detect_modality(question, str(record.get("body_system", ""))))


_IMAGE_TOKEN = re.compile(r"<image>")


def _label_image_tokens(question: str) -> str:
    """Chiron-o1 questions mark where each image stands with a literal ``<image>``; the model gets the
    images first and the question names them "Image 1", "Image 2", ... in their place, never the raw token."""
    counter = iter(range(1, 1000))
    return _IMAGE_TOKEN.sub(lambda _: f"Image {next(counter)}", question).strip()


def _chiron(path: Path, warn: Warn) -> Iterator[EvalItem]:
    """Chiron-o1's ``eval_data.json``: ``{id, img_name: [paths relative to the file], question (with <image>
    placeholders), reasoning, answer, answer_type}``; also records of the MICS input layouts."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of evaluation records")
    for number, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise InputError(f"{path}: record {number} is not an object")
        if "img_name" in record and "question" in record:
            images = record["img_name"]
            images = [images] if isinstance(images, str) else [str(image) for image in images or []]
            answer = str(record.get("answer") or record.get("gt_answer") or "").strip()
            question = _label_image_tokens(str(record["question"]))
            yield EvalItem(str(record.get("id", number)), question, answer, images,
                           answer_type=_closed_or_open(answer, record.get("answer_type")),
                           modality=detect_modality(question, images=images))
            continue
        if "gt_answer" in record and "answer" not in record:
            record = {**record, "answer": record["gt_answer"]}
        item = parse_record(record, number)
        if item.error:
            raise InputError(f"{path}: record {number}: {item.error}")
        question = _label_image_tokens(item.question)
        yield EvalItem(item.rid, question, item.answer, item.images, answer_type=_closed_or_open(item.answer),
                       modality=detect_modality(question, images=item.images))


_LLAVA_IMAGE_TAG = re.compile(r"(?:Image-\d+:\s*)?<image>\s*")


def _curriculum_item(item_id: str, question: str, response: str, images: list[str]) -> EvalItem:
    """A question of the curriculum builder's exports: the target's final answer (a CoT sample's
    ``### The final answer is:`` line, or a bare VQA answer) is the reference."""
    answer = parse_solution(response).final_answer or response.strip()
    question = strip_task_instruction(question)  # mics eval adds the instruction itself
    return EvalItem(item_id, question, answer, images, answer_type=answer_type_of(question, answer),
                    modality=detect_modality(question, images=images))


def _messages(path: Path, warn: Warn) -> Iterator[EvalItem]:
    """The builder's ``messages.jsonl`` (TRL conversational rows with ``images`` relative to the file);
    alignment samples are descriptions, not questions, and are left out."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("source") == "part2_alignment":
                continue
            turns = {turn.get("role"): turn.get("content") for turn in row.get("messages") or []}
            question = _turn_text(turns.get("user"))
            response = _turn_text(turns.get("assistant"))
            if not question or not response:
                raise InputError(f"{path}:{number}: a messages row needs a user and an assistant turn")
            yield _curriculum_item(str(row.get("id", number)), question, response, list(row.get("images") or []))


# The text part naming the image after it (mics_agents.task_format.image_labels); not part of the question.
_IMAGE_LABEL = re.compile(r"\s*Image-\d+:\s*")


def _turn_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    texts = [part.get("text") or "" for part in content or [] if part.get("type") == "text"]
    return "\n".join(text for text in texts if not _IMAGE_LABEL.fullmatch(text)).strip()


def _llava(path: Path, warn: Warn) -> Iterator[EvalItem]:
    """The builder's ``llava.json`` (ShareGPT ``conversations``; ``image`` a path or a list)."""
    for number, entry in enumerate(json.loads(path.read_text(encoding="utf-8")), start=1):
        item_id = str(entry.get("id", number))
        if re.search(r"-align\d+$", item_id):
            continue
        turns = {turn.get("from"): turn.get("value") for turn in entry.get("conversations") or []}
        question = _LLAVA_IMAGE_TAG.sub("", str(turns.get("human") or ""))
        response = str(turns.get("gpt") or "")
        if not question.strip() or not response.strip():
            raise InputError(f"{path}: entry {number} needs a human and a gpt turn")
        image = entry.get("image") or []
        yield _curriculum_item(item_id, question, response, [image] if isinstance(image, str) else list(image))


def _plain(path: Path, warn: Warn) -> Iterator[EvalItem]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            item = parse_record(record, number)
            if item.error:
                raise InputError(f"{path}: {item.error}")
            options = {str(k).upper(): str(v) for k, v in (record.get("options") or {}).items()}
            if options:
                yield _choice_item(item.rid, item.question, options, item.answer, images=item.images,
                                   modality=detect_modality(item.question, images=item.images, case=record))
            else:
                given = str(record.get("answer_type") or "").lower()
                answer_type = given if given in ("open", "closed", "choice") else answer_type_of(item.question, item.answer)
                yield EvalItem(item.rid, item.question, item.answer, item.images, answer_type=answer_type,
                               modality=detect_modality(item.question, images=item.images, case=record))


_LOADERS = {"vqa_rad": _vqa_rad, "slake": _slake, "pmc_vqa": _pmc_vqa, "mmmu": _mmmu, "hf_vqa": _hf_vqa,
            "medxpertqa": _medxpertqa, "chiron": _chiron, "plain": _plain, "messages": _messages, "llava": _llava}


def load_benchmark(path: Path, layout: str | None = None, warn: Warn | None = None) -> Iterator[EvalItem]:
    """The benchmark's test items in its published split; ``warn`` hears what a user should know."""
    if not path.is_file():
        raise InputError(f"benchmark file {str(path)!r} not found")
    return _LOADERS[layout or detect_layout(path)](path, warn or (lambda message: None))


# Where a published layout keeps its images beside its file; the other layouts' paths are relative to the file.
_IMAGE_FOLDERS = {"vqa_rad": "VQA_RAD Image Folder", "slake": "imgs", "pmc_vqa": "images", "medxpertqa": "images"}

# The published size of each known test split, to warn when a file gives another count.
KNOWN_SIZES = {"vqa_rad": 451, "slake": 1061, "medxpertqa": 2000}


def default_image_dir(path: Path, layout: str) -> Path:
    """Where a layout's image paths are relative to: its published image folder beside the file if there is
    one, else the file's own folder (plain JSONL and Chiron-o1 paths are relative to the file)."""
    folder = _IMAGE_FOLDERS.get(layout)
    if folder and (path.parent / folder).is_dir():
        return path.parent / folder
    return path.parent


Warn = Callable[[str], None]


@dataclass
class PreparedBenchmark:
    """A benchmark written out as plain JSONL for ``mics eval``; image paths are relative to ``image_root``."""

    items: Path
    count: int
    layout: str
    image_root: Path
    ids: set[str]
    warnings: list[str]


def prepare_benchmark(path: Path, folder: Path, layout: str | None = None, image_root: Path | None = None) -> PreparedBenchmark:
    """Write the benchmark as plain JSONL in ``folder``. Image paths stay relative to ``image_root`` (default:
    :func:`default_image_dir`); images embedded in parquet files are written to ``folder/images`` once and
    ``folder`` is the root. A path that does not resolve stays in the item, so the item fails as ``bad_input``
    naming it rather than being asked without its image."""
    layout = layout or detect_layout(path)
    root = Path(image_root) if image_root is not None else default_image_dir(path, layout)
    # The builder's exports name their images "../images/..." (one shared folder beside the stage folders):
    # for those two layouts only, the curriculum folder above the file is the root.
    rebase = image_root is None and layout in ("messages", "llava")
    if rebase:
        root = path.parent.parent
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "items.jsonl"
    temporary = folder / "items.jsonl.tmp"
    ids: set[str] = set()
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(f"{path.name}: {message}")

    with open(temporary, "w", encoding="utf-8") as handle:
        for item in load_benchmark(path, layout, warn):
            if item.image_bytes:
                names = []
                for index, data in enumerate(item.image_bytes):
                    image_path = folder / "images" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', item.id)}_{index}.png"
                    if not image_path.exists():
                        image_path.parent.mkdir(parents=True, exist_ok=True)
                        image_path.write_bytes(data)
                    names.append(f"images/{image_path.name}")
                item.images = names
                root = folder  # the written-out images are relative to the benchmark's result folder
            elif rebase:
                item.images = [Path(os.path.relpath(path.parent / image, root)).as_posix() for image in item.images]
            if item.id in ids:
                warn(f"id {item.id!r} appears twice; the later item is skipped")
                continue
            ids.add(item.id)
            record = {key: value for key, value in asdict(item).items() if key != "image_bytes"}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    temporary.replace(target)
    known = KNOWN_SIZES.get(layout)
    if known is not None and len(ids) != known:
        warnings.append(f"{path.name}: {len(ids)} questions, but the published {layout} test split has {known}; "
                        "check this is the test file you meant")
    if layout == "hf_vqa" and "test" not in path.name.lower():
        warnings.append(f"{path.name}: not named as a test split; the published figures use the test split")
    return PreparedBenchmark(target, len(ids), layout, root, ids, warnings)
