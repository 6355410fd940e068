"""Input records: the Chiron-o1 layout and a plain layout, read from JSONL as a stream.

Reading never stops at a bad line: each line becomes an :class:`InputItem`, and a line that cannot be
used carries an ``error`` saying what is wrong and where (line number and field), to be written to the
failed file as ``bad_input``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["InputItem", "read_items", "parse_record", "shard_of", "parse_shard"]

_QUESTION_PREFIX = re.compile(r"^\s*\**\s*question\s*:?\s*\**\s*:?\s*", re.IGNORECASE)
_ANSWER_PREFIX = re.compile(r"^\s*\**\s*correct\s+answer\s*:?\s*\**\s*:?\s*", re.IGNORECASE)
_CASE_FIELDS = ("presentation", "age_label", "gender_label", "caption")


@dataclass
class InputItem:
    """One input line. ``key`` is unique within a file (duplicated ids get ``@line<N>`` appended)."""

    line: int
    rid: str
    key: str
    question: str = ""
    answer: str = ""
    images: list[str] = field(default_factory=list)
    case_info: dict[str, Any] | str | None = None
    raw: Any = None
    error: str | None = None


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _take_images(record: dict[str, Any], item: InputItem) -> bool:
    """Set ``item.images`` from the record (a path or a list of paths); False, with the error set, if bad."""
    images = record.get("images", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(image, str) and image for image in images):
        item.error = f"line {item.line}: field 'images' must be a list of image paths"
        return False
    item.images = images
    return True


def parse_record(record: Any, line: int) -> InputItem:
    """One decoded JSON value -> an item; layout errors become ``item.error``."""
    if not isinstance(record, dict):
        return InputItem(line, f"line-{line}", f"line-{line}", raw=record,
                         error=f"line {line}: expected a JSON object, got {type(record).__name__}")
    raw_id = record.get("rid", record.get("id"))
    rid = str(raw_id) if raw_id not in (None, "") else f"line-{line}"
    item = InputItem(line, rid, rid, raw=record)

    if "messages" in record:  # Chiron-o1 layout
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages[:2]):
            item.error = f"line {line}: field 'messages' must hold the question and the answer messages"
            return item
        item.question = _QUESTION_PREFIX.sub("", _text(messages[0].get("content")), count=1).strip()
        item.answer = _ANSWER_PREFIX.sub("", _text(messages[1].get("content")), count=1).strip()
        case_info = {key: record[key] for key in _CASE_FIELDS if record.get(key) not in (None, "", [])}
        item.case_info = case_info or None
        question_field, answer_field = "messages[0].content", "messages[1].content"
    else:  # plain layout
        item.question = _text(record.get("question"))
        item.answer = _text(record.get("answer"))
        if record.get("answer") is not None and not isinstance(record.get("answer"), str):
            item.answer = str(record["answer"]).strip()
        item.case_info = record.get("case_info")
        question_field, answer_field = "question", "answer"

    if not item.question:
        item.error = f"line {line}: field '{question_field}' is missing or empty; every case needs its question"
        return item
    if not item.answer:
        item.error = f"line {line}: field '{answer_field}' is missing or empty; MICS needs the ground-truth answer"
        return item
    if not _take_images(record, item):
        return item
    if item.case_info is not None and not isinstance(item.case_info, (str, dict)):
        item.error = f"line {line}: field 'case_info' must be a string or an object"
    return item


def read_items(path: Path, parse: Callable[[Any, int], InputItem] = parse_record) -> Iterator[InputItem]:
    """Stream the items of a JSONL file, one line at a time (blocking: call from a thread).

    Blank lines are skipped; a duplicated id is an error on the later line, naming the first one.
    """
    first_line_of: dict[str, int] = {}
    with open(path, "rb") as handle:
        for number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue
            try:
                text = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM may open the file
                record = json.loads(text)
            except UnicodeDecodeError:
                yield InputItem(number, f"line-{number}", f"line-{number}", raw=None,
                                error=f"line {number}: not UTF-8 text")
                continue
            except json.JSONDecodeError as exc:
                yield InputItem(number, f"line-{number}", f"line-{number}", raw=text.strip()[:2000],
                                error=f"line {number}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            item = parse(record, number)
            if item.rid in first_line_of:
                item.key = f"{item.rid}@line{number}"
                item.error = (
                    f"line {number}: duplicate id {item.rid!r} (first seen on line {first_line_of[item.rid]}); "
                    "give every case its own id"
                )
            else:
                first_line_of[item.rid] = number
            yield item


def shard_of(key: str, shards: int) -> int:
    """Which of ``shards`` shards an item belongs to: a stable hash of its id, the same on every machine."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % shards


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise ValueError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_case(record: Any, line: int) -> InputItem:
    """A case record for ``mics generate``: an id, case fields (Chiron-o1 ``presentation``, ``age_label``,
    ``gender_label``, ``caption``, or ``case_info``), optional ``text`` and ``images``."""
    if not isinstance(record, dict):
        return InputItem(line, f"line-{line}", f"line-{line}", raw=record,
                         error=f"line {line}: expected a JSON object, got {type(record).__name__}")
    raw_id = record.get("case_id", record.get("rid", record.get("id")))
    rid = str(raw_id) if raw_id not in (None, "") else f"line-{line}"
    item = InputItem(line, rid, rid, raw=record)
    case_info = record.get("case_info")
    if case_info is None:
        case_info = {key: record[key] for key in _CASE_FIELDS if record.get(key) not in (None, "", [])} or None
    if case_info is not None and not isinstance(case_info, (str, dict)):
        item.error = f"line {line}: field 'case_info' must be a string or an object"
        return item
    item.case_info = case_info
    item.question = _text(record.get("text"))  # free case text, if any, rides in ``question``
    if not _take_images(record, item):
        return item
    if not item.question and not case_info:
        item.error = f"line {line}: the case has no text: give 'text', 'case_info' or the Chiron-o1 case fields"
    return item
