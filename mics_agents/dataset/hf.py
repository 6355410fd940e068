"""Hugging Face ``datasets`` folders (``load_from_disk``) written from a JSONL file already on disk, a row at a
time, with each image's bytes embedded: memory stays flat in the rows (a stage's ``hf/`` from its
``messages.jsonl``, the step data's ``hf/steps`` and ``hf/pairs`` from theirs)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
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


def _embedded_rows(jsonl: str, folder: str) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL file with each image's bytes in place of its path (relative to ``folder``), one
    row in memory at a time. A key the columns have and the row lacks (messages.jsonl drops an image part's
    ``text``) comes back as None: the columns' types fill it."""
    with open(jsonl, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            row["images"] = [
                {"bytes": (Path(folder) / image).read_bytes(), "path": Path(image).name} for image in row["images"]
            ]
            yield row


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_hf(jsonl: Path, target: Path, kind: str) -> None:
    """A ``datasets`` folder of a JSONL file's rows, written in Arrow batches (memory flat in the rows).

    The Arrow cache ``datasets`` writes first lives in a temporary folder beside ``target`` (never
    ``~/.cache``), removed once the folder is saved. The fingerprint is the JSONL file's hash (its image paths
    are content hashes): the same rows give the same folder, byte for byte, wherever it is written."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    columns = features(kind)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if jsonl.stat().st_size == 0:
        # One shard named: by default an empty dataset is saved with no data file, which load_from_disk refuses.
        Dataset.from_dict({name: [] for name in columns}, features=columns).save_to_disk(str(target), num_shards=1)
        return
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".arrow-") as cache:
        dataset = Dataset.from_generator(
            _embedded_rows, features=columns, cache_dir=cache,
            gen_kwargs={"jsonl": str(jsonl), "folder": str(jsonl.parent)},
            fingerprint=file_sha256(jsonl)[:16],
        )
        dataset.save_to_disk(str(target))
        del dataset
