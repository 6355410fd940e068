"""``test/eval.jsonl``: the held-out cases' questions in the plain layout ``mics eval`` reads, so a built
curriculum goes to a score in one command.

The items come from the cases file (the MICS input), not from the searched output: the held-out case ids
are drawn from all cases before quality control, so the in-domain test is not tilted towards the cases
MICS found easy. Each item keeps its ground-truth answer; alignment units are not questions and stay out.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..answers import parse_options
from ..data import parse_record
from ..grading import normalize
from .images import ImageCatalog, posix_relpath
from .samples import case_text, detect_modality

__all__ = ["write_eval_items", "answer_type_of"]


def answer_type_of(question: str, answer: str) -> str:
    """``closed`` for yes/no, ``choice`` when the question lists options, else ``open``."""
    if normalize(answer) in {"yes", "no"}:
        return "closed"
    return "choice" if parse_options(question) else "open"


def write_eval_items(
    cases: Iterable[tuple[dict[str, Any], str]],
    catalog: ImageCatalog,
    image_dir: Path,
    output: Path,
    images_root: Path,
) -> tuple[int, Counter]:
    """Write ``output`` (``test/eval.jsonl``) from ``(case record, case id)`` pairs of held-out cases.
    Images are placed in ``images_root`` (content-addressed, hard links where possible) inside ``output``'s
    folder, so the file is self-contained: ``mics eval`` never follows a path out of a benchmark's folder.
    Returns the count written and the items left out, by reason."""
    dropped: Counter = Counter()
    lines = []
    for number, (record, case_id) in enumerate(cases, start=1):
        item = parse_record(record, number)
        if item.error:
            dropped["unreadable_case"] += 1
            continue
        infos = [catalog.lookup(image, image_dir) for image in item.images]
        if any(info is None for info in infos):
            dropped["image_missing_or_unreadable"] += 1
            continue
        placed = [catalog.place(info, images_root) for info in infos]  # type: ignore[arg-type]
        lines.append({
            "id": item.rid,
            "case_id": case_id,
            "question": item.question,
            "answer": item.answer,
            "images": [posix_relpath(path, output.parent) for path in placed],
            "answer_type": answer_type_of(item.question, item.answer),
            # As for the case's training samples: the captions often name the modality the question does not.
            "modality": detect_modality(item.question, case_text(record), images=item.images, case=record),
        })
    output.parent.mkdir(parents=True, exist_ok=True)
    lines.sort(key=lambda line: line["id"])
    output.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return len(lines), dropped
