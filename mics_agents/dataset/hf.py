"""Hugging Face ``datasets`` folders (``load_from_disk``) written from a JSONL file already on disk, a row at a
time, with each image's bytes embedded: memory stays flat in the rows (a stage's ``hf/`` from its
``messages.jsonl``, the step data's ``hf/steps`` and ``hf/pairs`` from theirs)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["MESSAGES", "STEPS", "PAIRS", "features", "file_sha256", "write_hf"]

MESSAGES = "messages"  # a stage's rows (exports.export_samples)
STEPS = "steps"  # step rows (steps.write_steps)
PAIRS = "pairs"  # step pairs


def features(kind: str):
    """The columns of each kind of folder (one type per column, as ``datasets`` needs)."""
    from datasets import Features, Image, List, Value

    turn = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
    if kind == MESSAGES:
        return Features({"id": Value("string"), "case_id": Value("string"), "source": Value("string"),
                         "images": List(Image()), "messages": turn})
    common = {
        "id": Value("string"), "rid": Value("string"), "case_id": Value("string"), "images": List(Image()),
        "grader_version": Value("int64"), "source": Value("string"), "depth": Value("int64"),
    }
    if kind == STEPS:
        return Features({
            **common, "node": Value("int64"), "mentor": Value("string"), "reused": Value("bool"),
            "selected": Value("bool"), "prompt": Value("string"), "completions": List(Value("string")),
            "labels": List(Value("bool")), "scores": List(Value("float64")),
        })
    if kind == PAIRS:
        return Features({
            **common, "parent": Value("int64"), "prompt": turn, "chosen": turn, "rejected": turn,
            "chosen_node": Value("int64"), "rejected_node": Value("int64"), "chosen_score": Value("float64"),
            "rejected_score": Value("float64"), "score_gap": Value("float64"), "chosen_mentor": Value("string"),
            "rejected_mentor": Value("string"),
        })
    raise ValueError(f"unknown datasets folder kind {kind!r}")


def _embedded_rows(jsonl: str, folder: str) -> Iterator[tuple[dict[str, Any], int]]:
    """(row, its size in bytes) of each line of a JSONL file, each image's bytes in place of its path
    (relative to ``folder``), one row in memory at a time. A key the columns have and the row lacks
    (messages.jsonl drops an image part's ``text``) comes back as None: the columns' types fill it."""
    with open(jsonl, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            row["images"] = [_image(folder, image) for image in row["images"]]
            yield row, len(line) + sum(len(image["bytes"]) for image in row["images"])


def _image(folder: str, relative: str) -> dict[str, Any]:
    # Plain strings, not Paths: a Path interns each part of its path for good (one file name per image).
    with open(os.path.join(folder, relative), "rb") as handle:
        return {"bytes": handle.read(), "path": posixpath.basename(relative)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# A new data file past this many bytes of rows (save_to_disk's default shard size).
SHARD_BYTES = 500 * 2**20


def write_hf(jsonl: Path, target: Path, kind: str) -> None:
    """A ``datasets`` folder (``load_from_disk``) of a JSONL file's rows, each image's bytes embedded.

    The rows go straight into the folder's Arrow files through ``datasets``' own writer, a batch at a time:
    nothing is cached elsewhere (no ``~/.cache``, no temporary copy read back through a memory map), and
    memory stays flat in the rows. The fingerprint is the JSONL file's hash (its image paths are content
    hashes): the same rows give the same folder, byte for byte, wherever it is written."""
    from dataclasses import asdict

    from datasets import DatasetInfo
    from datasets.arrow_writer import ArrowWriter

    columns = features(kind)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shards: list[Path] = []
    writer: ArrowWriter | None = None
    written = 0
    for row, size in _embedded_rows(str(jsonl), str(jsonl.parent)):
        if writer is None or written >= SHARD_BYTES:
            if writer is not None:
                writer.finalize()
                writer.close()
            shards.append(target / f".data-{len(shards)}.arrow")
            writer, written = ArrowWriter(features=columns, path=str(shards[-1])), 0
        writer.write(row)
        written += size
    if writer is None:  # no rows: one empty data file (with none, load_from_disk refuses the folder)
        shards.append(target / ".data-0.arrow")
        writer = ArrowWriter(features=columns, path=str(shards[-1]))
    writer.finalize()
    writer.close()
    names = [f"data-{index:05d}-of-{len(shards):05d}.arrow" for index in range(len(shards))]
    for shard, name in zip(shards, names):
        shard.rename(target / name)
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": file_sha256(jsonl)[:16],
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None,
    }
    (target / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    info = asdict(DatasetInfo(features=columns))
    # As save_to_disk writes it: the first level sorted, the features' fields in their order.
    (target / "dataset_info.json").write_text(json.dumps({key: info[key] for key in sorted(info)}, indent=2),
                                              encoding="utf-8")
