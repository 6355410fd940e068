"""Stage files: read and check ``messages.jsonl`` as the dataset builder writes it.

One JSON object per line::

    {"id": "...", "case_id": "...", "source": "part3_cot",
     "images": ["images/a.png", ...],            # relative to the folder the file is in
     "messages": [{"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "..."}]}]}

with one ``{"type": "image"}`` placeholder per entry of ``images``, in order. Everything up to the last
assistant message is the prompt; the last assistant message is what the model learns to write.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StageDataError

__all__ = ["Sample", "StageData", "read_stage_file", "file_sha256"]

ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Sample:
    """One training sample: the prompt messages, the assistant reply to learn, and absolute image paths."""

    id: str
    prompt: list[dict[str, Any]]
    completion: list[dict[str, Any]]
    images: list[str]
    source: str = ""

    def as_row(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "completion": self.completion, "images": self.images}


@dataclass
class StageData:
    path: Path
    sha256: str
    samples: list[Sample]
    sources: dict[str, int] = field(default_factory=dict)

    @property
    def image_count(self) -> int:
        return sum(len(sample.images) for sample in self.samples)

    def summary(self) -> dict[str, Any]:
        return {
            "data": str(self.path),
            "data_sha256": self.sha256,
            "samples": len(self.samples),
            "images": self.image_count,
            "sources": dict(self.sources),
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_stage_file(path: Path, *, stage: str, check_images: bool = True) -> StageData:
    """Read and check a stage file; raise :class:`StageDataError` naming the line and sample at fault.

    An empty file is not an error here (the builder writes one when a stage's sources are empty): the
    curriculum skips that stage.
    """
    path = Path(path)
    if not path.is_file():
        hint = (
            f"the folder {path.parent} exists but has no {path.name}"
            if path.parent.is_dir()
            else f"there is no folder {path.parent}"
        )
        raise StageDataError(
            f"Stage {stage!r}: no stage file at {path} ({hint}). Build the curriculum with the dataset builder "
            "first, or point the stage's 'data' (or curriculum_dir) at the folder that holds messages.jsonl."
        )
    sha256 = file_sha256(path)
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageDataError(f"{where}: not valid JSON ({exc.msg}); rebuild the stage file") from None
            sample = _parse_record(record, where, path.parent, check_images)
            if sample.id in seen:
                raise StageDataError(
                    f"{where}: sample id {sample.id!r} also appears on line {seen[sample.id]}; ids must be unique"
                )
            seen[sample.id] = line_number
            samples.append(sample)
    sources = Counter(sample.source for sample in samples)
    return StageData(path=path, sha256=sha256, samples=samples, sources=dict(sorted(sources.items())))


def _parse_record(record: Any, where: str, base_dir: Path, check_images: bool) -> Sample:
    if not isinstance(record, dict):
        raise StageDataError(f"{where}: expected a JSON object per line")
    sample_id = record.get("id")
    if not isinstance(sample_id, str) or not sample_id:
        raise StageDataError(f"{where}: missing 'id' (a non-empty string)")
    where = f"{where} (sample {sample_id!r})"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise StageDataError(f"{where}: 'messages' must be a non-empty list")
    images = record.get("images") or []
    if not isinstance(images, list) or not all(isinstance(image, str) and image for image in images):
        raise StageDataError(f"{where}: 'images' must be a list of paths")
    placeholders = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise StageDataError(f"{where}: messages[{index}] needs a 'role' of {sorted(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise StageDataError(f"{where}: messages[{index}].content must be a string or a list of parts")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                if message["role"] == "assistant":
                    raise StageDataError(f"{where}: messages[{index}] is the assistant's and holds an image")
                placeholders += 1
            elif kind == "text":
                if not isinstance(part.get("text"), str):
                    raise StageDataError(f"{where}: messages[{index}] has a text part without a 'text' string")
            else:
                raise StageDataError(f"{where}: messages[{index}] has a part of unknown type {kind!r}")
    if placeholders != len(images):
        raise StageDataError(
            f"{where}: {placeholders} image placeholder(s) in the messages but {len(images)} path(s) in 'images'; "
            'each image needs one {"type": "image"} part, in order'
        )
    if messages[-1]["role"] != "assistant":
        raise StageDataError(f"{where}: the last message must be the assistant's answer to train on")
    if not any(message["role"] == "user" for message in messages[:-1]):
        raise StageDataError(f"{where}: no user message before the assistant's answer")
    resolved = []
    for image in images:
        image_path = (base_dir / image).resolve()
        if check_images and not image_path.is_file():
            raise StageDataError(
                f"{where}: image {image!r} not found at {image_path}. Image paths are relative to the folder "
                "of the stage file; copy the images there or rebuild the stage with the right image folder."
            )
        resolved.append(str(image_path))
    return Sample(
        id=sample_id,
        prompt=messages[:-1],
        completion=messages[-1:],
        images=resolved,
        source=str(record.get("source", "")),
    )
