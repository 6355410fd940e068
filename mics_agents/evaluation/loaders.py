"""Benchmark loaders: the published layouts of medical VQA benchmarks, read from local files.

Nothing is downloaded. Each loader yields :class:`EvalItem`s; :func:`prepare_benchmark` writes them as a
plain JSONL (images embedded in parquet files are written out as files once) that ``mics eval`` runs on.

| layout | file | recognised by |
| --- | --- | --- |
| VQA-RAD (OSF release) | ``VQA_RAD Dataset Public.json`` | a JSON list with ``image_name``, ``qid``, ``answer_type`` |
| SLAKE | ``test.json`` | a JSON list with ``img_name`` and ``q_lang`` (English questions kept) |
| PMC-VQA | ``test.csv`` / ``test_2.csv`` | a CSV with ``Figure_path``, ``Choice A``..., ``Answer_label`` |
| MMMU (Health & Medicine subjects) | ``*.parquet`` | columns ``options`` and ``image_1`` |
| VQA-RAD / SLAKE / PathVQA (Hugging Face) | ``*.parquet`` | columns ``image``, ``question``, ``answer`` |
| MedXpertQA-MM | ``MM/test.jsonl`` | lines with ``options`` and ``label`` |
| Chiron-o1 eval data | ``eval_data.json`` | a JSON list of ``question``/``answer`` or ``messages`` records |
| plain | ``*.jsonl`` | ``id, question, answer, images`` (+ optional ``options``, ``modality``) |
"""

from __future__ import annotations

import ast
import csv
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data import parse_record
from ..dataset.samples import detect_modality
from ..errors import InputError

__all__ = ["EvalItem", "detect_layout", "default_image_dir", "load_benchmark", "prepare_benchmark"]


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
        return "medxpertqa" if {"options", "label"} <= set(record) else "plain"
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        first = data[0] if isinstance(data, list) and data else {}
        if {"img_name", "q_lang"} <= set(first):
            return "slake"
        if {"image_name", "qid", "answer_type"} <= set(first):
            return "vqa_rad"
        return "chiron"
    raise InputError(f"{path}: unknown benchmark layout (expected .json, .jsonl, .csv or .parquet)")


def _vqa_rad(path: Path) -> Iterator[EvalItem]:
    for record in json.loads(path.read_text(encoding="utf-8")):
        answer = str(record["answer"]).strip()
        yield EvalItem(str(record["qid"]), str(record["question"]).strip(), answer, [record["image_name"]],
                       answer_type=_closed_or_open(answer, record.get("answer_type")),
                       modality=detect_modality(str(record.get("image_organ", "")), str(record["question"])))


def _slake(path: Path) -> Iterator[EvalItem]:
    for record in json.loads(path.read_text(encoding="utf-8")):
        if record.get("q_lang", "en") != "en":
            continue
        answer = str(record["answer"]).strip()
        yield EvalItem(str(record["qid"]), str(record["question"]).strip(), answer, [record["img_name"]],
                       answer_type=_closed_or_open(answer, record.get("answer_type")),
                       modality=str(record.get("modality") or "other"))


def _pmc_vqa(path: Path) -> Iterator[EvalItem]:
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


def _mmmu(path: Path) -> Iterator[EvalItem]:
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


def _hf_vqa(path: Path) -> Iterator[EvalItem]:
    for index, row in enumerate(_parquet_rows(path)):
        data = _image_bytes(row.get("image"))
        answer = str(row["answer"]).strip()
        item = EvalItem(str(row.get("qid") or row.get("id") or index), str(row["question"]).strip(), answer,
                        answer_type=_closed_or_open(answer), modality=detect_modality(str(row["question"])))
        item.image_bytes = [data] if data else []
        yield item


def _medxpertqa(path: Path) -> Iterator[EvalItem]:
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


def _chiron(path: Path) -> Iterator[EvalItem]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of evaluation records")
    for number, record in enumerate(data, start=1):
        if isinstance(record, dict) and "gt_answer" in record and "answer" not in record:
            record = {**record, "answer": record["gt_answer"]}
        item = parse_record(record, number)
        if item.error:
            raise InputError(f"{path}: record {number}: {item.error}")
        yield EvalItem(item.rid, item.question, item.answer, item.images, answer_type=_closed_or_open(item.answer),
                       modality=detect_modality(item.question, images=item.images))


def _plain(path: Path) -> Iterator[EvalItem]:
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
                                   modality=record.get("modality") or detect_modality(item.question))
            else:
                yield EvalItem(item.rid, item.question, item.answer, item.images,
                               answer_type=_closed_or_open(item.answer),
                               modality=record.get("modality") or detect_modality(item.question))


_LOADERS = {"vqa_rad": _vqa_rad, "slake": _slake, "pmc_vqa": _pmc_vqa, "mmmu": _mmmu, "hf_vqa": _hf_vqa,
            "medxpertqa": _medxpertqa, "chiron": _chiron, "plain": _plain}


def load_benchmark(path: Path, layout: str | None = None) -> Iterator[EvalItem]:
    if not path.is_file():
        raise InputError(f"benchmark file {str(path)!r} not found")
    return _LOADERS[layout or detect_layout(path)](path)


_IMAGE_FOLDERS = {"vqa_rad": "VQA_RAD Image Folder", "slake": "imgs", "pmc_vqa": "images", "medxpertqa": "images"}


def default_image_dir(path: Path, layout: str) -> Path:
    """Where a layout's images usually sit next to its file: the named folder if present, else the file's folder."""
    for candidate in (_IMAGE_FOLDERS.get(layout), "images", "imgs"):
        if candidate and (path.parent / candidate).is_dir():
            return path.parent / candidate
    return path.parent


def prepare_benchmark(path: Path, folder: Path, layout: str | None = None) -> tuple[Path, int, bool]:
    """Write the benchmark as plain JSONL in ``folder``; images embedded in parquet files are written to
    ``folder/images`` once. Returns the JSONL path, the item count and whether images were embedded
    (then their paths are relative to ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "items.jsonl"
    temporary = folder / "items.jsonl.tmp"
    count = 0
    embedded = False
    with open(temporary, "w", encoding="utf-8") as handle:
        for item in load_benchmark(path, layout):
            if item.image_bytes:
                names = []
                for index, data in enumerate(item.image_bytes):
                    image_path = folder / "images" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', item.id)}_{index}.png"
                    if not image_path.exists():
                        image_path.parent.mkdir(parents=True, exist_ok=True)
                        image_path.write_bytes(data)
                    names.append(f"images/{image_path.name}")
                item.images = names
                embedded = True
            record = {key: value for key, value in asdict(item).items() if key != "image_bytes"}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    temporary.replace(target)
    return target, count, embedded
