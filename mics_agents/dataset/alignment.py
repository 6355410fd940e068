"""Part 2 of the curriculum: image-text alignment pairs made from case captions.

A caption's ``<image>`` placeholders name the case's images in order (the k-th placeholder over all
captions is the k-th image); captions without placeholders map one-to-one onto the images when their
counts match. Each unit is deduplicated by the hashes of its images, and units with an image below the
minimum resolution or with too many images are dropped, each drop counted.

Captions become clean findings prose (:func:`clean_caption`): Chiron-o1's captions read "According to
the <image>\\n, no aortic dissection.<br/>..."; the target reads "No aortic dissection.\\n...". A lead-in
that names every image of the unit says nothing the images do not, so it is dropped; placeholders
become "Image k" only where the unit has more than one image and the caption tells them apart.
"""

from __future__ import annotations

import html
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import ImageCatalog
from .samples import PART2, Sample, TextSpill, detect_modality

__all__ = ["AlignmentOptions", "alignment_samples", "clean_caption"]

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

_GROUP = re.compile(r"<image>(?:\s*<image>)*")
_LEAD_IN = re.compile(r"\b(?:according to|as (?:seen|shown) (?:on|in))\s+(?:(?:the|this|these)\s+)*$", re.I)
_DETERMINER = re.compile(r"\b(?:the|this|these|an?)\s+$", re.I)
_SENTENCE_START = re.compile(r"(?:^|[.;:!?\n])\s*$")
_HTML_BREAK = re.compile(r"<\s*(?:br|/?p|/?div|/?li|/?tr)\b[^<>]*>", re.I)
_HTML_TAG = re.compile(r"<\s*/?(?!image>)[a-z][a-z0-9]*\b[^<>]*>", re.I)
_SPACES = re.compile(r"[^\S\n]+")
_DOUBLED_ARTICLE = re.compile(r"\b(the|a|an)\s+\1\b", re.I)


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


def _names(first: int, last: int) -> str:
    if first == last:
        return f"Image {first}"
    if last == first + 1:
        return f"Images {first} and {last}"
    return f"Images {first} to {last}"


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _replace_placeholders(text: str, count: int, changes: Counter) -> str:
    """Each run of placeholders, read in its context: a lead-in ("According to the <image>,"), a noun
    after an article ("on the <image>"), a label at the start of a sentence, or a bare mention."""
    out: list[str] = []
    cursor = 0
    number = 0
    capitalise_next = False
    for match in _GROUP.finditer(text):
        before = text[cursor : match.start()]
        first, number = number + 1, number + match.group().count(_PLACEHOLDER)
        first, last = min(first, count), min(number, count)
        trailing = re.match(r"\s*[,:]?\s*", text[match.end() :])
        end = match.end() + trailing.end()
        names_all = first == 1 and last >= count
        if lead := _LEAD_IN.search(before):
            head = before[: lead.start()]
            at_start = bool(_SENTENCE_START.search(head))
            if names_all:  # "According to the <image><image>, X" -> "X"
                out.append(head if at_start else re.sub(r",?\s*$", " ", head))
                changes["lead_in_dropped"] += 1
                capitalise_next = at_start
            else:  # "According to the <image>, X" (image 2 of 2) -> "According to Image 2, X"
                phrase = re.sub(r"(?:\s+(?:the|this|these))+\s+$", " ", before[lead.start() :], flags=re.I)
                out.append(head + phrase + _names(first, last) + ", ")
                changes["images_labelled"] += 1
                capitalise_next = False
                # Chiron-o1 lower-cased the first letter after the comma ("cT cisternography").
                rest = text[end:]
                if re.match(r"[a-z][A-Z]", rest):
                    text = text[:end] + rest[0].upper() + rest[1:]
        elif article := _DETERMINER.search(before):
            if count == 1:  # "seen on the <image>" -> "seen on the image"
                out.append(before[: article.end()] + "image")
            else:  # "The <image> shows" -> "Image 1 shows"
                out.append(before[: article.start()] + _names(first, last))
                changes["images_labelled"] += 1
            end = match.end()
            capitalise_next = False
        elif _SENTENCE_START.search(before):
            if names_all:  # "<image> Axial CT: ..." -> "Axial CT: ..."
                out.append(before)
                changes["placeholder_dropped"] += 1
                capitalise_next = True
            else:  # "<image> left; <image> right" -> "Image 1: left; Image 2: right"
                out.append(before + _names(first, last) + ": ")
                changes["images_labelled"] += 1
                capitalise_next = False
        else:  # a bare mention inside a sentence
            out.append(before + ("the image" if count == 1 else _names(first, last)))
            if count > 1:
                changes["images_labelled"] += 1
            end = match.end()
            capitalise_next = False
        cursor = end
        if capitalise_next:
            rest = text[cursor:]
            stripped = rest.lstrip()
            text = text[:cursor] + rest[: len(rest) - len(stripped)] + _upper_first(stripped)
    out.append(text[cursor:])
    return "".join(out)


def clean_caption(caption: str, count: int) -> tuple[str, Counter]:
    """A caption as clean findings prose for a unit of ``count`` images, and what cleaning it took."""
    changes: Counter = Counter()
    text = caption
    if _HTML_BREAK.search(text) or _HTML_TAG.search(text) or re.search(r"&(?:#\d+|#x[0-9a-f]+|[a-z]+);", text, re.I):
        changes["html_stripped"] += 1
        text = _HTML_BREAK.sub("\n", text)
        text = _HTML_TAG.sub("", text)
        text = html.unescape(text)
    text = text.replace("\u00a0", " ").replace("\r\n", "\n").replace("\r", "\n")
    text = _replace_placeholders(text, count, changes)
    lines = []
    for line in text.split("\n"):
        line = _SPACES.sub(" ", line).strip()
        fixed = re.sub(r"\s+([,;])\s*", r"\1 ", line)  # "mass ,seen" -> "mass, seen"
        fixed = re.sub(r"\s+([.:])(?=\s|$)", r"\1", fixed)  # "mass ." -> "mass."
        fixed = re.sub(r",\s*(?=[,.;:])", "", fixed)  # ", ," / ",." -> "," / "."
        fixed = re.sub(r"^[,;:]\s*", "", fixed)  # a line that starts with the comma a lead-in left
        if fixed != line:
            changes["stray_punctuation"] += 1
        line, doubled = _DOUBLED_ARTICLE.subn(r"\1", fixed)
        if doubled:
            changes["doubled_article"] += 1
        if line:
            lines.append(_upper_first(line))
    text = "\n".join(lines)
    if text and text[-1].isalnum():  # a caption cut mid-sentence still ends as one
        text += "."
    return text, changes


def alignment_samples(
    cases: Iterable[dict[str, Any]], catalog: ImageCatalog, image_dir: Path, options: AlignmentOptions, seed: int,
    spill: TextSpill | None = None,
) -> tuple[list[Sample], Counter, Counter]:
    """(samples, drops by reason, caption cleaning by kind: how many units needed each fix); with ``spill``,
    each sample's texts are written there as it is made."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    samples: list[Sample] = []
    dropped: Counter = Counter()
    cleaning: Counter = Counter()
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
            response, changes = clean_caption(caption, len(infos))
            if not response:
                dropped["empty_caption"] += 1
                continue
            seen.add(hashes)
            cleaning["units"] += 1
            cleaning.update(set(changes))  # units that needed each fix
            if not changes:
                cleaning["unchanged"] += 1
            prompt = rng.choice(_PROMPTS_ONE if len(infos) == 1 else _PROMPTS_MANY)
            samples.append(
                Sample(
                    id=f"{case_id}-align{index}",
                    case_id=case_id,
                    source=PART2,
                    prompt=prompt,
                    response=response,
                    images=[info.path for info in infos],
                    modality=detect_modality(response, case.get("text", ""), images=paths, case=case.get("fields")),
                )
            )
            if spill is not None:
                samples[-1].spill(spill)
    return samples, dropped, cleaning
