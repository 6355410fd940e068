"""Writing a list of samples in the formats training frameworks read.

Each folder gets:

- ``llava.json``: LLaVA's list of ``{id, image, conversations}`` (``image`` a path, or a list for several);
- ``sharegpt.json`` + ``dataset_info.json``: the same conversations with an ``images`` list on every row, and
  the LLaMA-Factory entry that reads them (``--dataset_dir`` the folder, ``--dataset`` the entry's name);
- ``internvl_meta.json`` + ``internvl/<source>.jsonl``: InternVL's meta file, one entry per source whose
  ``repeat_time`` is the source's ratio in the stage, over an annotation file holding each sample once;
- ``messages.jsonl``: TRL's conversational format, the one ``training/`` reads;
- ``hf/``: a Hugging Face ``datasets`` folder (``load_from_disk``) of messages.jsonl's rows with the images
  embedded, read back from that file a row at a time (mics_agents.dataset.hf).

Images live once, by content hash, in the shared ``images/`` folder beside the stage folders; every path
written is relative to the file's own folder, except the InternVL meta's: InternVL opens ``annotation`` and
``root`` from the folder training is launched in, so they are absolute (after moving the curriculum,
``python -m mics_agents.dataset.exports relocate DIR`` rewrites them). The same samples give the same bytes.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..task_format import image_labels
from .hf import MESSAGES, write_hf
from .images import ImageCatalog, posix_relpath
from .samples import Sample

__all__ = ["export_samples", "place_images", "relocate_internvl_meta", "internvl_repeat_time"]

INTERNVL_META = "internvl_meta.json"
INTERNVL_DIR = "internvl"
SHAREGPT = "sharegpt.json"
LLAMAFACTORY_INFO = "dataset_info.json"


def _dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8")


class _JsonListWriter:
    """A JSON list written an element at a time, byte for byte what :func:`_dump_json` writes of the whole list
    (``indent=1``: each element one level in; the encoder escapes every newline inside a string)."""

    def __init__(self, path: Path) -> None:
        self._handle = open(path, "w", encoding="utf-8")
        self._count = 0

    def add(self, element: Any) -> None:
        text = json.dumps(element, ensure_ascii=False, indent=1, sort_keys=True).replace("\n", "\n ")
        self._handle.write(("[\n " if self._count == 0 else ",\n ") + text)
        self._count += 1

    def close(self) -> None:
        self._handle.write("[]\n" if self._count == 0 else "\n]\n")
        self._handle.close()


def _dump_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def _user_content(image_count: int, prompt: str) -> list[dict[str, Any]]:
    """The user turn as TRL content parts: each image after its ``Image-k:`` label (when there are several,
    as in the LLaVA turn below), then the prompt."""
    labels, after_images = image_labels(image_count)
    parts: list[dict[str, Any]] = []
    for label in labels:
        if label:
            parts.append({"type": "text", "text": label})
        parts.append({"type": "image", "text": None})
    parts.append({"type": "text", "text": after_images + prompt})
    return parts


def _human_turn(sample: Sample) -> str:
    if not sample.images:
        return sample.prompt
    if len(sample.images) == 1:
        return f"<image>\n{sample.prompt}"
    labels, after_images = image_labels(len(sample.images))
    return "".join(f"{label}<image>" for label in labels) + after_images + sample.prompt


def export_samples(
    samples: Sequence[Sample],
    folder: Path,
    *,
    name: str,
    image_paths: dict[Path, Path],
    pool: Sequence[Sample] | None = None,
) -> None:
    """Write ``samples`` into ``folder``. ``image_paths`` maps each source image to its placed copy.

    ``pool`` is what the stage drew its samples from (each sample once); with it, InternVL's annotation
    files hold a whole source and its meta entry's ``repeat_time`` subsamples or repeats it as the stage did.
    Without it the samples themselves are the pool (a split taken whole: ``repeat_time`` 1).
    """
    folder.mkdir(parents=True, exist_ok=True)

    def relative(image: Path) -> str:
        return posix_relpath(image_paths[image], folder)

    def llava_entry(sample: Sample) -> dict[str, Any]:
        images = [relative(image) for image in sample.images]
        conversations = [{"from": "human", "value": _human_turn(sample)}, {"from": "gpt", "value": sample.response}]
        entry: dict[str, Any] = {"id": sample.id, "conversations": conversations}
        if images:
            entry["image"] = images[0] if len(images) == 1 else images
        return entry

    # Each file is written a sample at a time; the datasets folder is then read back from messages.jsonl.
    llava, sharegpt = _JsonListWriter(folder / "llava.json"), _JsonListWriter(folder / SHAREGPT)
    with open(folder / "messages.jsonl", "w", encoding="utf-8") as messages:
        for sample in samples:
            entry = llava_entry(sample)
            llava.add(entry)
            images = [relative(image) for image in sample.images]
            # LLaMA-Factory reads the file with `datasets`, which needs one type per column: always a list.
            sharegpt.add({"id": sample.id, "conversations": entry["conversations"], "images": images})
            user_content = _user_content(len(images), sample.prompt)
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
            messages.write(json.dumps({**row, "messages": [_drop_none(m) for m in row["messages"]]},
                                      ensure_ascii=False, sort_keys=True) + "\n")
    llava.close()
    sharegpt.close()
    _dump_json(folder / LLAMAFACTORY_INFO, {name: _llamafactory_entry()})
    _write_internvl(samples, pool, folder, name, llava_entry)
    write_hf(folder / "messages.jsonl", folder / "hf", MESSAGES)


def _llamafactory_entry() -> dict[str, Any]:
    """A ``dataset_info.json`` entry for LLaMA-Factory's sharegpt reader (field names as in its data/README.md)."""
    return {
        "file_name": SHAREGPT,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
    }


# --- InternVL ---------------------------------------------------------------------------------------------


def internvl_repeat_time(taken: int, total: int) -> float:
    """The shortest decimal fraction that InternVL turns into exactly ``taken`` of ``total`` lines.

    InternVL keeps ``lines[:int(len(lines) * repeat_time)]`` when ``repeat_time < 1``, in floats; the stages
    drew ``round(ratio * total)`` samples. A fifth of 10 is 0.2; a fifth of 13 is 3 samples, so 0.3 (0.2
    would give 2); 29 of 100 is 0.291 (100 * 0.29 is 28.999... in floats).
    """
    if not 0 < taken < total:
        raise ValueError(f"a fraction takes some but not all lines: {taken} of {total}")
    for digits in range(1, 18):
        scale = 10**digits
        smallest = -(-taken * scale // total)  # ceil(taken / total * scale), in integers
        for numerator in (smallest, smallest + 1):
            candidate = numerator / scale
            if candidate < 1 and int(total * candidate) == taken:
                return candidate
    raise ValueError(f"no float fraction gives {taken} of {total}")  # not reached for counts below 10**15


def _slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", source)


def _base_ids(samples: Iterable[Sample], pool_ids: set[str]) -> Iterator[str]:
    """The pool id behind each sample: repeats of a sample are ``<id>#<copy>`` (curriculum.assemble_stage)."""
    return (s.id if s.id in pool_ids else re.sub(r"#\d+$", "", s.id) for s in samples)


def _write_internvl(samples: Sequence[Sample], pool: Sequence[Sample] | None, folder: Path, name: str,
                    entry_of) -> None:
    annotations = folder / INTERNVL_DIR
    if annotations.exists():
        shutil.rmtree(annotations)
    annotations.mkdir(parents=True)
    stage_sources = sorted({sample.source for sample in samples})
    if pool is None:
        pool = samples
    pool_by_source: dict[str, list[Sample]] = {}
    for sample in pool:
        pool_by_source.setdefault(sample.source, []).append(sample)
    meta: dict[str, dict[str, Any]] = {}
    for source in stage_sources:

        def in_stage(source: str = source) -> Iterator[Sample]:
            # Read again each time it is needed: a stage's repeats are made as they are read (curriculum.Stage).
            return (sample for sample in samples if sample.source == source)

        unique = list({s.id: s for s in pool_by_source.get(source, [])}.values())
        counts = Counter(_base_ids(in_stage(), {s.id for s in unique}))
        if set(counts) - {s.id for s in unique}:
            unique = list({base: s for base, s in zip(_base_ids(in_stage(), set()), in_stage())}.values())
            counts = Counter(_base_ids(in_stage(), {s.id for s in unique}))
        whole = min(counts.get(s.id, 0) for s in unique)
        extra = [s for s in unique if counts.get(s.id, 0) == whole + 1]
        if any(counts.get(s.id, 0) not in (whole, whole + 1) for s in unique):
            # Not the shape of a ratio (a hand-made list): every sample as often as it appears, once each line.
            lines, whole, extra = list(in_stage()), 1, []
        else:
            chosen = {s.id for s in extra}
            lines = extra + [s for s in unique if s.id not in chosen]  # InternVL's fraction takes the head
        path = annotations / f"{_slug(source)}.jsonl"
        _dump_jsonl(path, (entry_of(sample) for sample in lines))
        spec = {"root": str(folder.resolve()), "annotation": str(path.resolve()), "data_augment": False,
                "length": len(lines)}
        key = f"{name}_{_slug(source)}"
        if whole:
            meta[key] = {**spec, "repeat_time": whole}
        if extra:
            fraction = internvl_repeat_time(len(extra), len(lines))
            meta[f"{key}_part" if whole else key] = {**spec, "repeat_time": fraction}
    _dump_json(folder / INTERNVL_META, meta)


def relocate_internvl_meta(meta_path: Path) -> None:
    """Point a moved stage folder's InternVL meta at where its files now are."""
    meta_path = Path(meta_path)
    folder = meta_path.parent.resolve()
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    for spec in meta.values():
        spec["root"] = str(folder)
        spec["annotation"] = str(folder / INTERNVL_DIR / Path(spec["annotation"]).name)
    _dump_json(meta_path, meta)


# --- TRL's messages ---------------------------------------------------------------------------------------


def _drop_none(message: dict[str, Any]) -> dict[str, Any]:
    return {**message, "content": [{k: v for k, v in part.items() if v is not None} for part in message["content"]]}


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


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "relocate":
        print("usage: python -m mics_agents.dataset.exports relocate CURRICULUM_DIR", file=sys.stderr)
        return 2
    metas = sorted(Path(argv[1]).glob(f"*/{INTERNVL_META}"))
    for meta_path in metas:
        relocate_internvl_meta(meta_path)
        print(f"rewrote {meta_path}")
    if not metas:
        print(f"no */{INTERNVL_META} under {argv[1]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
