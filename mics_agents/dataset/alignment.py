"""Part 2 of the curriculum: image-text alignment pairs made from case captions.

A caption's ``<image>`` placeholders name the case's images in order (the k-th placeholder over all
captions is the k-th image); captions without placeholders map one-to-one onto the images when their
counts match. Each unit is deduplicated by the hashes of its images, and units with an image below the
minimum resolution or with too many images are dropped, each drop counted.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import ImageCatalog
from .samples import PART2, Sample, detect_modality

__all__ = ["AlignmentOptions", "alignment_samples"]

_PLACEHOLDER = "<image>"
_PROMPTS_ONE = [
    "Describe the findings in this image.",
    "What does this image show?",
    "Write the radiology-style finding for this image.",
]
_PROMPTS_MANY = [
    "Describe the findings in these images.",
    "What do these images show, image by image?",
]


@dataclass(frozen=True)
class AlignmentOptions:
    min_side: int = 32
    max_images_per_unit: int = 4


def _units(case: dict[str, Any]) -> list[tuple[list[str], str]]:
    images = case.get("images") or []
    captions = [str(c) for c in case.get("caption") or [] if str(c).strip()]
    units = []
    if any(_PLACEHOLDER in caption for caption in captions):
        cursor = 0
        for caption in captions:
            count = caption.count(_PLACEHOLDER)
            if count:
                units.append((images[cursor : cursor + count], caption))
                cursor += count
    elif captions and len(captions) == len(images):
        units = [([image], caption) for image, caption in zip(images, captions)]
    return [(unit_images, caption) for unit_images, caption in units if unit_images]


def _response(caption: str, count: int) -> str:
    if count == 1:
        text = caption.replace(_PLACEHOLDER, "the image")
    else:
        numbers = iter(range(1, count + 1))
        text = re.sub(re.escape(_PLACEHOLDER), lambda _: f"Image {next(numbers)}", caption)
    text = re.sub(r"\s+", " ", text).strip()
    return text[0].upper() + text[1:] if text else text


def alignment_samples(
    cases: list[dict[str, Any]], catalog: ImageCatalog, image_dir: Path, options: AlignmentOptions, seed: int
) -> tuple[list[Sample], Counter]:
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    samples: list[Sample] = []
    dropped: Counter = Counter()
    for case in cases:
        case_id = str(case["case_id"])
        for index, (paths, caption) in enumerate(_units(case)):
            if len(paths) > options.max_images_per_unit:
                dropped["too_many_images"] += 1
                continue
            infos = [catalog.lookup(path, image_dir) for path in paths]
            if any(info is None for info in infos):
                dropped["image_missing_or_unreadable"] += 1
                continue
            if any(min(info.width, info.height) < options.min_side for info in infos):
                dropped["low_resolution"] += 1
                continue
            hashes = tuple(sorted(info.sha256 for info in infos))
            if hashes in seen:
                dropped["duplicate_image"] += 1
                continue
            seen.add(hashes)
            prompt = rng.choice(_PROMPTS_ONE if len(infos) == 1 else _PROMPTS_MANY)
            samples.append(
                Sample(
                    id=f"{case_id}-align{index}",
                    case_id=case_id,
                    source=PART2,
                    prompt=prompt,
                    response=_response(caption, len(infos)),
                    images=[info.path for info in infos],
                    modality=detect_modality(caption, case.get("text", "")),
                )
            )
    return samples, dropped
