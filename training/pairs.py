"""Step preference pairs: read and check ``steps/pairs.jsonl`` as the dataset builder writes it.

One JSON object per line, TRL's conversational preference layout with images::

    {"prompt": [{"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text": "..."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "### Step 1: ...\\n\\n### Step 2: ..."}]}],
     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "### Step 3: ..."}]}],
     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "### Step 3: ..."}]}],
     "images": ["../images/ab/ab....png"],         # relative to the folder the file is in
     "case_id": "...", "depth": 3, "chosen_score": 1.0, "rejected_score": 0.25, ...}

The prompt is the user turn, then (past depth 1) the selected path so far as an assistant message that the chosen
and rejected steps continue. Other fields (mentors, grader version, run) are kept for the record only.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import Sample, file_sha256
from .errors import StageDataError

__all__ = ["Pair", "PairData", "read_pairs_file", "message_text"]


@dataclass(frozen=True)
class Pair:
    """One preference pair: the user turn (with image placeholders), the path so far, and the two next steps."""

    id: str
    user: list[dict[str, Any]]  # the prompt's messages before the path (system and user turns)
    path: str  # the selected steps so far ('' at depth 1)
    chosen: str
    rejected: str
    images: list[str]
    source: str = ""

    def side(self, which: str) -> Sample:
        """Prompt + one step as a :class:`Sample`: what the length policy measures and keys its cache by."""
        step = self.chosen if which == "chosen" else self.rejected
        prompt = list(self.user)
        if self.path:
            prompt.append({"role": "assistant", "content": [{"type": "text", "text": self.path}]})
        completion = [{"role": "assistant", "content": [{"type": "text", "text": step}]}]
        return Sample(id=f"{self.id}:{which}", prompt=prompt, completion=completion, images=self.images)


@dataclass
class PairData:
    path: Path
    sha256: str
    pairs: list[Pair]
    sources: dict[str, int] = field(default_factory=dict)

    @property
    def image_count(self) -> int:
        return sum(len(pair.images) for pair in self.pairs)

    def summary(self) -> dict[str, Any]:
        return {
            "data": str(self.path),
            "data_sha256": self.sha256,
            "pairs": len(self.pairs),
            "images": self.image_count,
            "sources": dict(self.sources),
        }


def message_text(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def read_pairs_file(path: Path, *, stage: str, check_images: bool = True) -> PairData:
    """Read and check a pairs file; raise :class:`StageDataError` naming the line and the field at fault.

    An empty file is not an error (a curriculum whose trees gave no pair): the stage is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise StageDataError(
            f"Stage {stage!r}: no pairs file at {path}. Build the step pairs with the dataset builder (mics dataset "
            "build writes CURRICULUM/steps/pairs.jsonl), or point the stage's 'data' at a pairs.jsonl."
        )
    pairs: list[Pair] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageDataError(f"{where}: not valid JSON ({exc.msg}); rebuild the pairs file") from None
            pair = _parse_pair(record, where, line_number, path.parent, check_images)
            if pair.id in seen:
                raise StageDataError(f"{where}: pair id {pair.id!r} also appears on line {seen[pair.id]}")
            seen[pair.id] = line_number
            pairs.append(pair)
    sources = Counter(pair.source for pair in pairs)
    return PairData(path=path, sha256=file_sha256(path), pairs=pairs, sources=dict(sorted(sources.items())))


def _messages(record: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    messages = record.get(key)
    if not isinstance(messages, list) or not messages:
        raise StageDataError(f"{where}: '{key}' must be a non-empty list of messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in {"system", "user", "assistant"}:
            raise StageDataError(f"{where}: {key}[{index}] needs a 'role' of system, user or assistant")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise StageDataError(f"{where}: {key}[{index}].content must be a string or a list of parts")
        for part_index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            at = f"{key}[{index}].content[{part_index}]"
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise StageDataError(f"{where}: {at} is a text part without a 'text' string")
            elif kind == "image":
                if message["role"] != "user" and message["role"] != "system":
                    raise StageDataError(f"{where}: {at} is an image in an {message['role']} message")
            else:
                raise StageDataError(f"{where}: {at} has a part of unknown type {kind!r}")
    return messages


def _step(record: dict[str, Any], key: str, where: str) -> str:
    messages = _messages(record, key, where)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise StageDataError(f"{where}: '{key}' must be exactly one assistant message (the next step)")
    text = message_text(messages[0]).strip()
    if not text:
        raise StageDataError(f"{where}: '{key}' has no text")
    return text


def _parse_pair(record: Any, where: str, line_number: int, base_dir: Path, check_images: bool) -> Pair:
    if not isinstance(record, dict):
        raise StageDataError(f"{where}: expected a JSON object per line")
    prompt = _messages(record, "prompt", where)
    chosen, rejected = _step(record, "chosen", where), _step(record, "rejected", where)
    case = record.get("case_id") or record.get("rid")
    pair_id = record.get("id") or f"{case or 'pair'}#{line_number}"
    if not isinstance(pair_id, str):
        raise StageDataError(f"{where}: 'id' must be a string")
    where = f"{where} (pair {pair_id!r})"
    if chosen == rejected:
        raise StageDataError(
            f"{where}: 'chosen' and 'rejected' are the same step, which teaches nothing; remove the line or rebuild "
            "the pairs"
        )
    scores = {key: record.get(key) for key in ("chosen_score", "rejected_score")}
    for key, value in scores.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise StageDataError(f"{where}: '{key}' must be a number, not {value!r}")
    if None not in scores.values() and scores["chosen_score"] <= scores["rejected_score"]:
        raise StageDataError(
            f"{where}: 'chosen_score' {scores['chosen_score']} is not above 'rejected_score' "
            f"{scores['rejected_score']}; chosen must be the higher-scored step"
        )
    user, path = prompt, ""
    if prompt[-1]["role"] == "assistant":
        user, path = prompt[:-1], message_text(prompt[-1]).strip()
        if not path:
            raise StageDataError(f"{where}: 'prompt' ends with an empty assistant message (the path so far)")
    if any(message["role"] == "assistant" for message in user):
        raise StageDataError(f"{where}: 'prompt' holds more than one assistant message; give the path so far as one")
    if not user or user[-1]["role"] != "user":
        raise StageDataError(
            f"{where}: 'prompt' must be the user turn, optionally followed by one assistant message (the path so far)"
        )
    images = record.get("images") or []
    if not isinstance(images, list) or not all(isinstance(image, str) and image for image in images):
        raise StageDataError(f"{where}: 'images' must be a list of paths")
    placeholders = sum(
        1
        for message in user
        if isinstance(message["content"], list)
        for part in message["content"]
        if part.get("type") == "image"
    )
    if placeholders != len(images):
        raise StageDataError(
            f"{where}: 'prompt' has {placeholders} image placeholder(s) but 'images' has {len(images)} path(s); "
            'each image needs one {"type": "image"} part, in order'
        )
    resolved = []
    for image in images:
        image_path = (base_dir / image).resolve()
        if check_images and not image_path.is_file():
            raise StageDataError(
                f"{where}: 'images' entry {image!r} not found at {image_path}. Image paths are relative to the folder "
                "of the pairs file."
            )
        resolved.append(str(image_path))
    return Pair(
        id=pair_id,
        user=user,
        path=path,
        chosen=chosen,
        rejected=rejected,
        images=resolved,
        source=str(record.get("source", "")),
    )
