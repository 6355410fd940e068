"""One training sample, independent of any export format."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Sample", "PART1", "PART2", "PART3", "detect_modality"]

PART1 = "part1_text_qa"
PART2 = "part2_alignment"
PART3 = "part3_cot"

_MODALITIES = [
    ("CT", r"\bct\b|computed tomography"),
    ("MRI", r"\bmri\b|\bmr\b|magnetic resonance|t1-?weighted|t2-?weighted|flair|\bdwi\b"),
    ("X-ray", r"x-?ray|radiograph|\bcxr\b"),
    ("Ultrasound", r"ultrasound|sonograph|doppler|echocardio"),
    ("PET", r"\bpet\b|positron"),
    ("Pathology", r"histolog|patholog|biopsy|\bh&e\b|stain"),
    ("Endoscopy", r"endoscop|colonoscop"),
    ("Fundus/OCT", r"fundus|\boct\b|retina"),
]


def detect_modality(*texts: str) -> str:
    """The imaging modality named in the texts (first match in a fixed order), else ``other``."""
    joined = " ".join(texts).lower()
    for name, pattern in _MODALITIES:
        if re.search(pattern, joined):
            return name
    return "other"


@dataclass
class Sample:
    """A user turn (images, then ``prompt``) and the assistant's ``response``.

    ``images`` are paths to the source files; exports copy them next to the data they write.
    """

    id: str
    case_id: str
    source: str
    prompt: str
    response: str
    images: list[Path] = field(default_factory=list)
    modality: str = "none"
