"""One training sample, independent of any export format, and the one modality detector that the dataset
builder, its stats and ``mics eval`` share."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any

__all__ = ["Sample", "TextSpill", "PART1", "PART2", "PART3", "MODALITIES", "MIXED", "OTHER", "detect_modality", "modality_evidence",
           "case_captions", "case_text"]

PART1 = "part1_text_qa"
PART2 = "part2_alignment"
PART3 = "part3_cot"

OTHER = "other"  # images whose modality nothing names
MIXED = "mixed"  # images of several modalities (folders or fields disagree)

# Words in free text, per modality. Within one text the earliest mention wins ("PET/CT" is PET, "CT
# angiography" is CT); case-sensitive where the lower-case word means something else ("Mr", "us").
_TEXT_PATTERNS: list[tuple[str, str]] = [
    ("CT", r"\bct\b|\bcta\b|computed tomograph|\bhrct\b|\bmdct\b|\bcbct\b"),
    ("MRI", r"\bmri\b|(?-i:\bMRA?\b)|\bfmri\b|magnetic resonance|t[12]-?weighted|\bt[12]w\b|\bflair\b|\bdwi\b"
            r"|diffusion-weighted|\bstir\b"),
    ("Mammography", r"mammogra|tomosynthesis|\bbi-?rads\b"),
    ("X-ray", r"x-?rays?\b|radiograph|\bcxr\b|plain film|chest film|\bkub\b"),
    ("Ultrasound", r"ultrasound|ultrasonogra|sonogra|doppler|echocardiogra|(?-i:\bUS\b)"),
    ("PET", r"\bpet\b|positron emission|\bfdg\b"),
    ("Nuclear medicine", r"scintigra|\bspect\b|bone scan|nuclear medicine|\bmibg\b|\bv/q\b"),
    ("Fluoroscopy", r"fluoroscop|barium (?:swallow|meal|enema)|contrast swallow|\bvcug\b"),
    ("Fundus/OCT", r"fundus|fundoscop|\boct\b|optical coherence|retina|fluorescein angiogra"),
    ("Angiography", r"angiogra|arteriogra|venogra|\bdsa\b|digital subtraction"),
    ("Pathology", r"histolog|histopatholog|micrograph|\bh&e\b|ha?ematoxylin|immunohisto|\bstain(?:ed|ing|s)?\b"
                  r"|cytolog"),
    ("Endoscopy", r"endoscop|colonoscop|gastroscop|bronchoscop|cystoscop|laparoscop|arthroscop"),
]
_TEXT = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in _TEXT_PATTERNS]
MODALITIES = tuple(name for name, _ in _TEXT_PATTERNS)

# Names a folder or a modality field may hold (Chiron-o1's image folders are ``<modality>_group<k>``:
# ``ct_group1``, ``x-ray_group1``, ``mri_group2``, ``mammography_group1``, ``ultrasound_group1``, ...).
_NAMES = {
    "ct": "CT", "cta": "CT", "computed tomography": "CT",
    "mri": "MRI", "mr": "MRI", "mra": "MRI", "magnetic resonance imaging": "MRI",
    "x-ray": "X-ray", "xray": "X-ray", "x ray": "X-ray", "radiograph": "X-ray", "radiography": "X-ray",
    "plain film": "X-ray", "cr": "X-ray", "dx": "X-ray",
    "mammography": "Mammography", "mammogram": "Mammography", "mg": "Mammography",
    "ultrasound": "Ultrasound", "us": "Ultrasound", "sonography": "Ultrasound", "echocardiography": "Ultrasound",
    "pet": "PET", "pet-ct": "PET", "pet/ct": "PET", "pet ct": "PET", "pet-mri": "PET",
    "nuclear medicine": "Nuclear medicine", "nm": "Nuclear medicine", "spect": "Nuclear medicine",
    "scintigraphy": "Nuclear medicine",
    "fluoroscopy": "Fluoroscopy", "rf": "Fluoroscopy",
    "angiography": "Angiography", "dsa": "Angiography", "dsa (angiography)": "Angiography", "xa": "Angiography",
    "pathology": "Pathology", "histology": "Pathology", "histopathology": "Pathology", "microscopy": "Pathology",
    "endoscopy": "Endoscopy",
    "fundus": "Fundus/OCT", "oct": "Fundus/OCT", "fundus photography": "Fundus/OCT", "fundus/oct": "Fundus/OCT",
}
_GROUP_FOLDER = re.compile(r"^(?P<name>.+?)[_\- ]group\d+$", re.IGNORECASE)
_FIELD_KEYS = ("modality", "modalities", "image_modality", "imaging_modality")
_CANONICAL = {name.lower(): name for name in MODALITIES}


def _name(value: str) -> str | None:
    """A modality for a short label (a folder name, a field value): exact names first, then its words."""
    label = re.sub(r"[\s_]+", " ", value).strip().lower()
    if not label:
        return None
    if label in _CANONICAL:
        return _CANONICAL[label]
    if label in _NAMES:
        return _NAMES[label]
    return _from_text(label)


def _from_text(text: str) -> str | None:
    hits = [(match.start(), order, name) for order, (name, pattern) in enumerate(_TEXT)
            if (match := pattern.search(text))]
    return min(hits)[2] if hits else None


def _one(found: Iterable[str]) -> str | None:
    names = sorted(set(found))
    if not names:
        return None
    return names[0] if len(names) == 1 else MIXED


def _from_folders(images: Iterable[str | PurePath] | str | PurePath) -> str | None:
    if isinstance(images, (str, PurePath)):  # one image named on its own (Chiron-o1's eval_data.json does)
        images = [images]
    found = []
    for image in images:
        parts = PurePath(str(image).replace("\\", "/")).parts
        if len(parts) < 2:
            continue
        folder = parts[-2]  # the image's own folder: ``<modality>_group<k>``, or a folder named ``CT``, ``MRI``
        match = _GROUP_FOLDER.match(folder)
        label = re.sub(r"[\s_]+", " ", folder).strip().lower()
        named = _name(match["name"]) if match else _CANONICAL.get(label) or _NAMES.get(label)
        if named:
            found.append(named)
    return _one(found)


def _field_values(case: Mapping[str, Any]) -> Iterable[str]:
    for key in _FIELD_KEYS:
        value = case.get(key)
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (str(item) for item in value if isinstance(item, str))


def _from_fields(case: Mapping[str, Any]) -> tuple[str, str] | None:
    info = case.get("case_info") if isinstance(case.get("case_info"), Mapping) else {}
    # An explicit modality field (SLAKE writes "X-Ray", plain layouts "ct").
    named = _one(filter(None, (_name(value) for layer in (case, info) for value in _field_values(layer))))
    if named:
        return named, "field"
    # Per-modality findings keyed by the modality: {"CT": "...", "MRI": "..."}.
    named = _one(filter(None, (_CANONICAL.get(str(key).lower()) or _NAMES.get(str(key).lower()) for key in info)))
    if named:
        return named, "field"
    # A case title names the study more often than the findings do ("Normal CT head").
    for layer in (case, info):
        title = layer.get("title")
        if isinstance(title, str) and (named := _from_text(title)):
            return named, "title"
    return None


def modality_evidence(
    *texts: str, images: Iterable[str | PurePath] | None = None, case: Mapping[str, Any] | None = None
) -> tuple[str, str]:
    """(modality, what named it): ``folder``, ``field``, ``title``, ``text`` or ``none`` (then ``other``)."""
    named = _from_folders(images or ())
    if named:
        return named, "folder"
    if case:
        found = _from_fields(case)
        if found:
            return found
    for text in texts:  # in the order given: the caller passes the most specific text first
        named = _from_text(str(text or ""))
        if named:
            return named, "text"
    return OTHER, "none"


def case_captions(record: Mapping[str, Any]) -> list[str]:
    """A case's image captions, top-level (Chiron-o1) or under ``case_info`` (plain layout); captions that
    are not text are left out (``mics run`` refuses such a case as bad input)."""
    info = record.get("case_info") if isinstance(record.get("case_info"), Mapping) else {}
    captions = record.get("caption", info.get("caption")) or []
    if isinstance(captions, str):
        captions = [captions]
    return [caption for caption in captions if isinstance(caption, str)] if isinstance(captions, list) else []


def case_text(record: Mapping[str, Any]) -> str:
    """The case's own words about its images (presentation, then captions): where a question that names no
    modality ("Which finding suggests malignancy?") has its modality said ("Axial chest CT: ...")."""
    info = record.get("case_info") if isinstance(record.get("case_info"), Mapping) else {}
    parts = [str(record.get("presentation") or info.get("presentation") or ""), *case_captions(record)]
    if isinstance(record.get("case_info"), str):
        parts.append(record["case_info"])
    return " ".join(part for part in parts if part)


def detect_modality(
    *texts: str, images: Iterable[str | PurePath] | None = None, case: Mapping[str, Any] | None = None
) -> str:
    """The imaging modality of a sample, ``mixed`` when its images are of several, else ``other``.

    Read in this order: the image folders (Chiron-o1's ``ct_group1``, ``x-ray_group1``, ...), the case's
    fields (``modality``; findings keyed by modality; the case ``title``), then words in ``texts``.
    """
    return modality_evidence(*texts, images=images, case=case)[0]


class TextSpill:
    """Samples' texts written to an anonymous temporary file and read back when asked for, so that a build
    holds each sample's ids, images and modality but not its prompt and response (the texts grow with the
    items; a stage's copies share one spilled pair)."""

    def __init__(self, folder: Path | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=folder)
        self._end = 0
        self._writing = True

    def put(self, prompt: str, response: str) -> _Spilled:
        if not self._writing:
            self._file.seek(0, 2)
            self._writing = True
        data = json.dumps([prompt, response], ensure_ascii=False).encode("utf-8", "surrogatepass")
        self._file.write(data)
        start, self._end = self._end, self._end + len(data)
        return _Spilled(self, start, len(data))

    def get(self, start: int, length: int) -> tuple[str, str]:
        if self._writing:
            self._file.flush()
            self._writing = False
        self._file.seek(start)
        prompt, response = json.loads(self._file.read(length).decode("utf-8", "surrogatepass"))
        return prompt, response

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TextSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Spilled:
    __slots__ = ("spill", "start", "length")

    def __init__(self, spill: TextSpill, start: int, length: int) -> None:
        self.spill, self.start, self.length = spill, start, length

    def texts(self) -> tuple[str, str]:
        return self.spill.get(self.start, self.length)


class Sample:
    """A user turn (images, then ``prompt``) and the assistant's ``response``.

    ``images`` are paths to the source files; exports copy them next to the data they write. The two texts
    may live in a :class:`TextSpill` (:meth:`spill`), read back each time they are asked for.
    """

    __slots__ = ("id", "case_id", "source", "_texts", "images", "modality")

    def __init__(self, id: str, case_id: str, source: str, prompt: str, response: str,
                 images: list[Path] | None = None, modality: str = "none") -> None:
        self.id, self.case_id, self.source = id, case_id, source
        self._texts: tuple[str, str] | _Spilled = (prompt, response)
        self.images = [] if images is None else images
        self.modality = modality

    @property
    def texts(self) -> tuple[str, str]:
        """(prompt, response), read back once for both where they were spilled."""
        return self._texts.texts() if isinstance(self._texts, _Spilled) else self._texts

    @property
    def prompt(self) -> str:
        return self.texts[0]

    @property
    def response(self) -> str:
        return self.texts[1]

    def spill(self, spill: TextSpill) -> Sample:
        """Move the texts into ``spill``; the sample itself, for chaining."""
        if not isinstance(self._texts, _Spilled):
            self._texts = spill.put(*self._texts)
        return self

    def copy(self, id: str) -> Sample:
        """The same sample under another id, sharing its texts (spilled or not) and not its images list."""
        copied = Sample.__new__(Sample)
        copied.id, copied.case_id, copied.source = id, self.case_id, self.source
        copied._texts, copied.images, copied.modality = self._texts, list(self.images), self.modality
        return copied

    def _fields(self) -> tuple[Any, ...]:
        return (self.id, self.case_id, self.source, *self.texts, self.images, self.modality)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass it was

    def __repr__(self) -> str:
        names = ("id", "case_id", "source", "prompt", "response", "images", "modality")
        return "Sample(" + ", ".join(f"{name}={value!r}" for name, value in zip(names, self._fields())) + ")"
