"""Writing a list of samples in the formats training frameworks read.

Each folder gets ``llava.json`` (LLaVA/ShareGPT), ``internvl_meta.json`` + ``internvl.jsonl`` (InternVL),
``messages.jsonl`` (TRL's conversational format, the one ``training/`` reads) and ``hf/`` (a Hugging
Face ``datasets`` folder with the images embedded). Images live once, by content hash, in the shared
``images/`` folder beside the stage folders; every path written is relative to the file's own folder.
Output is deterministic: the same samples give the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .images import ImageCatalog
from .samples import Sample

__all__ = ["export_samples", "place_images"]


def _dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _dump_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def _human_turn(sample: Sample) -> str:
    if not sample.images:
        return sample.prompt
    if len(sample.images) == 1:
        return f"<image>\n{sample.prompt}"
    tags = "".join(f"Image-{index}: <image>\n" for index in range(1, len(sample.images) + 1))
    return tags + sample.prompt


def export_samples(samples: list[Sample], folder: Path, *, name: str, image_paths: dict[Path, Path]) -> None:
    """Write ``samples`` into ``folder``. ``image_paths`` maps each source image to its placed copy."""
    folder.mkdir(parents=True, exist_ok=True)

    def relative(image: Path) -> str:
        return Path(os.path.relpath(image_paths[image], folder)).as_posix()

    llava, internvl, messages, hf_rows = [], [], [], []
    for sample in samples:
        images = [relative(image) for image in sample.images]
        conversations = [{"from": "human", "value": _human_turn(sample)}, {"from": "gpt", "value": sample.response}]
        entry: dict[str, Any] = {"id": sample.id, "conversations": conversations}
        if images:
            entry["image"] = images[0] if len(images) == 1 else images
        llava.append(entry)
        internvl.append(entry)
        user_content = [{"type": "image", "text": None} for _ in images] + [{"type": "text", "text": sample.prompt}]
        row = {
            "id": sample.id,
            "case_id": sample.case_id,
            "source": sample.source,
            "images": images,
            "messages": [
                {"role": "user", "content": user_content},
                {"role": "assistant", "content": [{"type": "text", "text": sample.response}]},
            ],
        }
        messages.append({**row, "messages": [_drop_none(m) for m in row["messages"]]})
        hf_rows.append({**row, "images": [image_paths[image] for image in sample.images]})

    _dump_json(folder / "llava.json", llava)
    _dump_jsonl(folder / "internvl.jsonl", internvl)
    _dump_json(
        folder / "internvl_meta.json",
        {name: {"root": ".", "annotation": "internvl.jsonl", "data_augment": False, "repeat_time": 1,
                "length": len(internvl)}},
    )
    _dump_jsonl(folder / "messages.jsonl", messages)
    _write_hf(hf_rows, folder / "hf")


def _drop_none(message: dict[str, Any]) -> dict[str, Any]:
    return {**message, "content": [{k: v for k, v in part.items() if v is not None} for part in message["content"]]}


def _write_hf(rows: list[dict[str, Any]], target: Path) -> None:
    from datasets import Dataset, Features, Image, List, Value, disable_progress_bars

    disable_progress_bars()

    features = Features(
        {
            "id": Value("string"),
            "case_id": Value("string"),
            "source": Value("string"),
            "images": List(Image()),
            "messages": List(
                {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
            ),
        }
    )
    embedded = [
        {**row, "images": [{"bytes": Path(path).read_bytes(), "path": Path(path).name} for path in row["images"]]}
        for row in rows
    ]
    if target.exists():
        shutil.rmtree(target)
    columns = {name: [row[name] for row in embedded] for name in features}
    Dataset.from_dict(columns, features=features).save_to_disk(str(target))


def place_images(samples: list[Sample], catalog: ImageCatalog, images_root: Path) -> dict[Path, Path]:
    """Put every image the samples use into ``images_root`` (once each); source path -> placed path."""
    placed: dict[Path, Path] = {}
    for sample in samples:
        for image in sample.images:
            if image not in placed:
                info = catalog.info(image)
                if info is None:
                    raise FileNotFoundError(f"image {image} vanished while building the dataset")
                placed[image] = catalog.place(info, images_root)
    return placed
