"""Input records: the Chiron-o1 layout and a plain layout, read from JSONL as a stream.

Reading never stops at a bad line: each line becomes an :class:`InputItem`, and a line that cannot be
used carries an ``error`` saying what is wrong and where (line number and field), to be written to the
failed file as ``bad_input``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "InputItem", "read_items", "parse_record", "parse_case", "shard_of", "parse_shard",
    "made_up_key", "duplicate_key", "current_failure_key",
    "MAX_LINE_BYTES", "MAX_NESTING", "MAX_ID_CHARS", "MAX_IMAGE_PATH_CHARS", "MAX_IMAGES",
]

_QUESTION_PREFIX = re.compile(r"^\s*\**\s*question\s*:?\s*\**\s*:?\s*", re.IGNORECASE)
_ANSWER_PREFIX = re.compile(r"^\s*\**\s*correct\s+answer\s*:?\s*\**\s*:?\s*", re.IGNORECASE)
_CASE_FIELDS = ("presentation", "age_label", "gender_label", "caption")

# Limits on one input line (the README lists them): what a case needs is far below each, and each bounds
# what one hostile line can cost (memory, recursion, a path the OS refuses).
MAX_LINE_BYTES = 16 * 1024 * 1024  # a case with long case notes is a few kB
MAX_NESTING = 64  # JSON arrays/objects inside one another; a case uses 3
MAX_ID_CHARS = 512
MAX_IMAGE_PATH_CHARS = 1024  # and each part of the path at most 255 bytes (the usual file name limit)
MAX_IMAGES = 32  # per case; each loaded image stays in memory while its case is searched
_RAW_KEPT_CHARS = 2000  # of a line that cannot be parsed, what its failure line keeps

# Made-up keys (lines without a usable id, repeated ids) hold a NUL, which no real id may hold (ids
# with control characters are refused), so a made-up key never equals a real id.
_MADE_UP = "\x00line-"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def made_up_key(line: int) -> str:
    """The key of line ``line`` when it has no usable id (it cannot be parsed, or its id cannot be used)."""
    return f"{_MADE_UP}{line}"


def duplicate_key(rid: str, line: int) -> str:
    """The key of a repeated id on line ``line`` (the first line with the id keeps the id as its key)."""
    return f"{rid}{_MADE_UP}{line}"


def legacy_form(key: str) -> str:
    """A key as versions before made-up keys held a NUL wrote it (``line-N``, ``ID@lineN``): what shards
    hash, so an item stays in its shard across the upgrade."""
    rid, marker, line = key.rpartition(_MADE_UP)
    if not marker:
        return key
    return f"{rid}@line{line}" if rid else f"line-{line}"


@dataclass
class InputItem:
    """One input line. ``key`` is unique within a file: the id, or a made-up key (:func:`made_up_key`,
    :func:`duplicate_key`) that no real id can equal. ``rid`` is None when the line has no usable id.
    ``failure``: the kind of failure ``error`` is (``bad_input``, or ``internal_error`` for a defect)."""

    line: int
    rid: str | None
    key: str
    question: str = ""
    answer: str = ""
    images: list[str] = field(default_factory=list)
    case_info: dict[str, Any] | str | None = None
    raw: Any = None
    error: str | None = None
    failure: str = "bad_input"


def _unparsed(line: int, raw: Any, error: str, failure: str = "bad_input") -> InputItem:
    return InputItem(line, None, made_up_key(line), raw=raw, error=error, failure=failure)


def _shown(value: Any, limit: int = 80) -> str:
    """A value as a message shows it: repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" + f" ({len(str(value)):,} characters)"


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _id_problem(value: Any, name: str) -> str | None:
    """Why ``value`` cannot be an id, or None."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"field {name!r} must be a string or a number, got {type(value).__name__} {_shown(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"field {name!r} must be a finite number, got {value}"
    text = str(value)
    if _SURROGATE.search(text):
        return f"field {name!r} holds a lone surrogate, which is not text: the file was written by a broken encoder"
    if len(text) > MAX_ID_CHARS:
        return f"field {name!r} is {len(text):,} characters long; an id may have at most {MAX_ID_CHARS}"
    control = _CONTROL.search(text)
    if control:
        return (f"field {name!r} holds the control character {control.group()!r} at position {control.start()} "
                f"({_shown(text)}); an id must be printable text")
    return None


def _own_id(record: dict[str, Any], fields: tuple[str, ...]) -> tuple[str | None, Any]:
    """(the field that names the record's id, its value): the first of ``fields`` present, as the layouts
    have always read it; (None, None) when the id is missing or empty."""
    for name in fields:
        if name in record:
            value = record[name]
            return (None, None) if value is None or value == "" else (name, value)
    return None, None


def _start(record: dict[str, Any], line: int, fields: tuple[str, ...]) -> InputItem:
    """An item with the record's id (or ``line-N`` when it has none), or a failed one if the id is unusable."""
    name, value = _own_id(record, fields)
    if name is None:
        rid = f"line-{line}"  # a line without an id: made up as always; a real id equal to it is a duplicate
        return InputItem(line, rid, rid, raw=record)
    problem = _id_problem(value, name)
    if problem:
        return _unparsed(line, record, f"line {line}: {problem}")
    rid = str(value)
    return InputItem(line, rid, rid, raw=record)


def _take_images(record: dict[str, Any], item: InputItem) -> bool:
    """Set ``item.images`` from the record (a path or a list of paths); False, with the error set, if bad."""
    images = record.get("images", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(image, str) and image for image in images):
        item.error = f"line {item.line}: field 'images' must be a list of image paths, got {_shown(images)}"
        return False
    if len(images) > MAX_IMAGES:
        item.error = f"line {item.line}: field 'images' lists {len(images)} images; a case may have at most {MAX_IMAGES}"
        return False
    for index, image in enumerate(images):
        problem = None
        if len(image) > MAX_IMAGE_PATH_CHARS:
            problem = f"is {len(image):,} characters long; an image path may have at most {MAX_IMAGE_PATH_CHARS}"
        elif _CONTROL.search(image):
            problem = f"holds the control character {_CONTROL.search(image).group()!r}; a file name cannot"
        elif any(len(part.encode("utf-8")) > 255 for part in image.split("/")):
            problem = "has a part longer than 255 bytes, more than a file name may have"
        if problem:
            item.error = f"line {item.line}: field 'images[{index}]' ({_shown(image)}) {problem}"
            return False
    item.images = images
    return True


def _check_case_info(case_info: Any, line: int, where: str) -> str | None:
    """Why case fields cannot be rendered into a prompt, or None."""
    if case_info is None or isinstance(case_info, str):
        return None
    if not isinstance(case_info, dict):
        return f"line {line}: field {where!r} must be a string or an object, got {type(case_info).__name__} {_shown(case_info)}"
    caption = case_info.get("caption")
    prefix = "" if where == "case fields" else f"{where}."
    if caption is not None and not isinstance(caption, str) and not (
        isinstance(caption, list) and all(isinstance(text, (str, int, float)) and not isinstance(text, bool) for text in caption)
    ):
        return (f"line {line}: field '{prefix}caption' must be a string or a list of strings (one finding per "
                f"image), got {_shown(caption)}")
    return None


def parse_record(record: Any, line: int) -> InputItem:
    """One decoded JSON value -> an item; layout errors become ``item.error``."""
    if not isinstance(record, dict):
        return _unparsed(line, record, f"line {line}: expected a JSON object, got {type(record).__name__}")
    item = _start(record, line, ("rid", "id"))
    if item.error:
        return item

    if "messages" in record:  # Chiron-o1 layout
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages[:2]):
            item.error = f"line {line}: field 'messages' must hold the question and the answer messages"
            return item
        item.question = _QUESTION_PREFIX.sub("", _text(messages[0].get("content")), count=1).strip()
        item.answer = _ANSWER_PREFIX.sub("", _text(messages[1].get("content")), count=1).strip()
        case_info = {key: record[key] for key in _CASE_FIELDS if record.get(key) not in (None, "", [])}
        item.case_info = case_info or None
        question_field, answer_field, case_field = "messages[0].content", "messages[1].content", "case fields"
    else:  # plain layout
        item.question = _text(record.get("question"))
        item.answer = _text(record.get("answer"))
        if record.get("answer") is not None and not isinstance(record.get("answer"), str):
            item.answer = str(record["answer"]).strip()
        item.case_info = record.get("case_info")
        question_field, answer_field, case_field = "question", "answer", "case_info"

    if not item.question:
        item.error = f"line {line}: field '{question_field}' is missing or empty; every case needs its question"
        return item
    if not item.answer:
        item.error = f"line {line}: field '{answer_field}' is missing or empty; MICS needs the ground-truth answer"
        return item
    if not _take_images(record, item):
        return item
    item.error = _check_case_info(item.case_info, line, case_field)
    return item


def _scan_value(value: Any) -> str | None:
    """Why a decoded line cannot be used whatever its layout (nested too deeply, a lone surrogate in a
    string), naming the field; walked without recursion."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        current, path, depth = stack.pop()
        if isinstance(current, str):
            bad = _SURROGATE.search(current) if not current.isascii() else None
            if bad:
                return (f"field {path or '(the line)'!r} holds a lone surrogate {bad.group()!r} at position "
                        f"{bad.start()}, which is not text: the file was written by a broken encoder; fix that value")
            continue
        if not isinstance(current, (dict, list)):
            continue
        if depth > MAX_NESTING:
            return f"nested deeper than {MAX_NESTING} levels (at {path or 'the top'!r}); a case needs 3"
        if isinstance(current, dict):
            for key, item in current.items():
                if not key.isascii() and _SURROGATE.search(key):
                    return (f"field name {_shown(key)} holds a lone surrogate, which is not text: the file was "
                            "written by a broken encoder")
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        else:
            stack.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(current))
    return None


def _read_line(handle: BinaryIO) -> tuple[bytes, bool]:
    """The next line, at most MAX_LINE_BYTES of it; (line, False) when longer (the rest is skipped)."""
    raw = handle.readline(MAX_LINE_BYTES + 1)
    if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
        return raw, True
    while True:  # skip to the end of the line without holding it
        rest = handle.readline(1024 * 1024)
        if not rest or rest.endswith(b"\n"):
            return raw[:_RAW_KEPT_CHARS], False


def _size(count: int) -> str:
    return f"{count // 2**20} MiB" if count % 2**20 == 0 else f"{count:,} bytes"


def _decode_line(number: int, raw_line: bytes, whole: bool, parse: Callable[[Any, int], InputItem]) -> InputItem | None:
    """One line -> an item (None for a blank line). Never raises: whatever is wrong is the item's error."""
    if not whole:
        return _unparsed(number, raw_line.decode("utf-8", errors="replace"),
                         f"line {number}: longer than {_size(MAX_LINE_BYTES)}, the most a line may have; a case "
                         "is a few kB (images are paths, not data)")
    try:
        text = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM may open the file
    except UnicodeDecodeError as exc:
        return _unparsed(number, None, f"line {number}: not UTF-8 text (byte 0x{raw_line[exc.start]:02x} at "
                                       f"column {exc.start + 1}); save the file as UTF-8")
    if not text.strip():
        return None  # blank, or a byte order mark alone
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return _unparsed(number, text.strip()[:_RAW_KEPT_CHARS],
                         f"line {number}: invalid JSON ({exc.msg} at column {exc.colno})")
    except RecursionError:
        return _unparsed(number, text.strip()[:_RAW_KEPT_CHARS],
                         f"line {number}: nested deeper than {MAX_NESTING} levels; a case needs 3")
    problem = _scan_value(record)
    if problem and problem.startswith("nested"):
        return _unparsed(number, text.strip()[:_RAW_KEPT_CHARS], f"line {number}: {problem}")
    record = failure_input(record) if is_failure_record(record) else record  # a *_failed.jsonl fed back
    try:
        item = parse(record, number)
    except Exception as exc:  # a defect of the parser, not of the line: say so, and go on
        return _unparsed(number, record, f"line {number}: internal error while reading the line (a defect in "
                                         f"mics-agents; please report it): {type(exc).__name__}: {exc}",
                         failure="internal_error")
    if problem:  # a lone surrogate: the line keeps its id if the id itself is text
        if item.rid is not None and _SURROGATE.search(item.rid):
            item = _unparsed(number, record, "")
        item.error, item.failure = f"line {number}: {problem}", "bad_input"
    return item


def _made_up_id(item: InputItem) -> bool:
    """True when the item's id was made up (``line-N``: its line has none)."""
    if item.rid != f"line-{item.line}":
        return False
    raw = item.raw if isinstance(item.raw, dict) else {}
    return not any(str(raw.get(name)) == item.rid for name in ("case_id", "rid", "id") if raw.get(name) not in (None, ""))


def read_items(path: Path, parse: Callable[[Any, int], InputItem] = parse_record) -> Iterator[InputItem]:
    """Stream the items of a JSONL file, one line at a time (blocking: call from a thread).

    Only ``\\n`` ends a line (``\\r\\n`` too; U+2028 and U+0085 are text). Blank lines are skipped; every
    other line gives exactly one item, with ``error`` set when it cannot be used: no line, however it is
    broken, stops the reading. A repeated id is an error on the later line, naming the first one.
    """
    first_line_of: dict[str, int] = {}
    made_up_lines: set[int] = set()
    with open(path, "rb") as handle:
        number = 0
        while True:
            raw_line, whole = _read_line(handle)
            if not raw_line:
                return
            number += 1
            item = _decode_line(number, raw_line, whole, parse)
            if item is None:
                continue
            if item.rid is not None and item.key == item.rid:
                if item.rid in first_line_of:
                    first = first_line_of[item.rid]
                    item.key = duplicate_key(item.rid, number)
                    if _made_up_id(item):
                        why = f"has no id, and {item.rid!r}, the id made up for it, is the id of line {first}"
                    elif item.rid == f"line-{first}" and first in made_up_lines:
                        why = f"has the id {item.rid!r}, which was made up for line {first} (it has none)"
                    else:
                        why = f"has the duplicate id {item.rid!r} (first seen on line {first})"
                    item.error = f"line {number}: {why}; give every case its own id"
                    item.failure = "bad_input"
                else:
                    first_line_of[item.rid] = number
                    if _made_up_id(item):
                        made_up_lines.add(number)
            yield item


# What a failed-file line adds to the item's own fields (which sit beside them at top level).
FAILURE_FIELDS = ("key", "line", "error", "search", "traceback")


def is_failure_record(record: Any) -> bool:
    """A line of a ``*_failed.jsonl``: ``error`` is an object with a ``kind``."""
    return isinstance(record, dict) and isinstance(record.get("error"), dict) and "kind" in record["error"]


def failure_record(rid: Any, key: str, line: int, error: dict[str, Any], raw: Any) -> dict[str, Any]:
    """A failed-file line: the item's input fields at top level beside ``error``, so the file can be fed back
    to ``mics run`` once the data is fixed. Input that is not an object, or that holds a field of ours, is
    kept whole under ``input`` instead (the layout of earlier versions, which every reader still takes), as
    is the input of an item whose id was made up or differs from the input's own ``rid``."""
    flat = (
        isinstance(raw, dict)
        and "input" not in raw
        and not any(name in raw for name in FAILURE_FIELDS)
        and _MADE_UP not in key  # an item whose id was made up keeps its input untouched
        and raw.get("rid", rid) == rid  # and the input's own id is never overwritten
    )
    if flat:
        return {**raw, "rid": rid, "key": key, "line": line, "error": error}
    return {"rid": rid, "key": key, "line": line, "error": error, "input": raw}


def failure_input(record: dict[str, Any]) -> Any:
    """The item's own input of a failed-file line, in either layout."""
    if "input" in record:
        return record["input"]
    return {name: value for name, value in record.items() if name not in FAILURE_FIELDS}


def current_failure_key(record: dict[str, Any]) -> str | None:
    """The key of a failed-file line, translating the made-up keys of earlier versions (``line-N`` for a
    line without a usable id, ``ID@lineN`` for a repeated id) to today's, so their lines still count on
    resume. Only keys those versions made up are translated: a real id ``line-5`` stays itself."""
    key = record.get("key", record.get("rid"))
    if key is None:
        return None
    key = str(key)
    line = record.get("line")
    if _MADE_UP in key or not isinstance(line, int) or isinstance(line, bool):
        return key
    if "input" not in record:
        return key  # input fields at top level: written by this version, whose keys need no translation
    raw = record.get("input")
    rid = record.get("rid")
    if key == f"line-{line}" and not isinstance(raw, dict):
        return made_up_key(line)  # the line was not a JSON object (invalid JSON, not UTF-8, a list ...)
    if isinstance(raw, dict):
        for name in ("case_id", "rid", "id"):
            value = raw.get(name)
            if value is not None and value != "" and str(value) == str(rid) and _id_problem(value, name):
                return made_up_key(line)  # an id read then that is refused now (a boolean, a control character)
    if isinstance(rid, str) and key != rid and key == f"{rid}@line{line}":
        return duplicate_key(rid, line)
    return key


def shard_of(key: str, shards: int) -> int:
    """Which of ``shards`` shards an item belongs to: a stable hash of its id, the same on every machine
    (and across versions: a made-up key hashes in the form earlier versions wrote it)."""
    return int.from_bytes(hashlib.sha256(legacy_form(key).encode("utf-8", "surrogatepass")).digest()[:8], "big") % shards


def parse_shard(text: str, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; ``"auto"``: from the launcher's variables in ``environ`` (default
    ``os.environ``), see :mod:`mics_agents.cluster.auto_shard`."""
    if text.strip() == "auto":
        from .cluster.auto_shard import shard_from_environment

        return shard_from_environment(os.environ if environ is None else environ)
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise ValueError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4) or auto, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_case(record: Any, line: int) -> InputItem:
    """A case record for ``mics generate``: an id, case fields (Chiron-o1 ``presentation``, ``age_label``,
    ``gender_label``, ``caption``, or ``case_info``), optional ``text`` and ``images``."""
    if not isinstance(record, dict):
        return _unparsed(line, record, f"line {line}: expected a JSON object, got {type(record).__name__}")
    item = _start(record, line, ("case_id", "rid", "id"))
    if item.error:
        return item
    case_info = record.get("case_info")
    where = "case_info"
    if case_info is None:
        case_info = {key: record[key] for key in _CASE_FIELDS if record.get(key) not in (None, "", [])} or None
        where = "case fields"
    item.error = _check_case_info(case_info, line, where)
    if item.error:
        return item
    item.case_info = case_info
    item.question = _text(record.get("text"))  # free case text, if any, rides in ``question``
    if not _take_images(record, item):
        return item
    if not item.question and not case_info:
        item.error = f"line {line}: the case has no text: give 'text', 'case_info' or the Chiron-o1 case fields"
    return item
