"""The dataset's numbers (JSON) and a chart of them (PNG): samples per stage and part, the modality mix
(per stage as trained, with repeats, and over distinct samples per part), how Part 2 captions were cleaned,
MICS depths and trends, drops by reason, and the step export's rows, labels, pairs and score gaps."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

from .samples import Sample

__all__ = ["MicsCounts", "dataset_stats", "write_stats", "write_step_stats"]


def _summary(samples: Sequence[Sample]) -> dict[str, Any]:
    return {
        "total": len(samples),
        "by_source": dict(sorted(Counter(s.source for s in samples).items())),
        "modality": dict(sorted(Counter(s.modality for s in samples).items())),
        "cases": len({s.case_id for s in samples}),
    }


def _distinct(samples: Iterable[Sample]) -> dict[str, Sample]:
    """Each sample once: a stage repeats a sample as ``<id>#<copy>``."""
    distinct: dict[str, Sample] = {}
    for sample in samples:
        distinct.setdefault(re.sub(r"#\d+$", "", sample.id), sample)
    return distinct


def _modality_mix(samples: list[Sample]) -> dict[str, Any]:
    by_source: dict[str, Counter] = {}
    for sample in samples:
        by_source.setdefault(sample.source, Counter())[sample.modality] += 1
    overall: Counter = Counter()
    for counts in by_source.values():
        overall.update(counts)
    return {
        "distinct_samples": dict(sorted(overall.items())),
        "by_source": {source: dict(sorted(counts.items())) for source, counts in sorted(by_source.items())},
    }


class MicsCounts:
    """The MICS records' numbers, added up one record at a time (a build never holds them all)."""

    def __init__(self, records: Iterable[dict[str, Any]] = ()) -> None:
        self.records = 0
        self.final_depth: Counter = Counter()
        self.trend: Counter = Counter()
        self.search_id: Counter = Counter()
        for record in records:
            self.add(record)

    def add(self, record: dict[str, Any]) -> None:
        self.records += 1
        self.final_depth[str(record.get("final_depth"))] += 1
        self.trend[str(record.get("trend"))] += 1
        self.search_id[str(record.get("search_id"))] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "final_depth": dict(sorted(self.final_depth.items())),
            "trend": dict(sorted(self.trend.items())),
            "search_id": dict(sorted(self.search_id.items())),
        }


def dataset_stats(
    stages: dict[str, Sequence[Sample]],
    test: Sequence[Sample],
    mics_records: Iterable[dict[str, Any]] | MicsCounts,
    drops: dict[str, Counter],
    caption_cleaning: Counter | None = None,
    steps: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The curriculum's numbers; ``steps`` is the step export's (:meth:`StepStats.as_dict`)."""
    distinct = _distinct(chain(*stages.values(), test))
    return {
        "stages": {name: _summary(samples) for name, samples in stages.items()},
        "test": _summary(test),
        "modality": _modality_mix(list(distinct.values())),
        "caption_cleaning": dict(sorted((caption_cleaning or Counter()).items())),
        "mics": (mics_records if isinstance(mics_records, MicsCounts) else MicsCounts(mics_records)).as_dict(),
        "drops": {step: dict(sorted(counter.items())) for step, counter in sorted(drops.items())},
        **({"steps": steps} if steps is not None else {}),
    }


def write_stats(stats: dict[str, Any], folder: Path) -> None:
    (folder / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _plot(stats, folder / "stats.png")


def _bar(axis, counts: dict[str, int], title: str) -> None:
    labels = list(counts) or ["(none)"]
    values = list(counts.values()) or [0]
    axis.bar(range(len(labels)), values, color="#4c72b0")
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    axis.set_title(title, fontsize=10)


def _plot(stats: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 4, figsize=(18, 8))
    stages = list(stats["stages"])
    sources = sorted({source for stage in stats["stages"].values() for source in stage["by_source"]})
    bottoms = [0] * len(stages)
    for source in sources:
        heights = [stats["stages"][stage]["by_source"].get(source, 0) for stage in stages]
        axes[0][0].bar(stages, heights, bottom=bottoms, label=source)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    axes[0][0].set_title("samples per stage and part", fontsize=10)
    if sources:
        axes[0][0].legend(fontsize=7)
    mix = stats["modality"]
    modalities = list(mix["distinct_samples"]) or ["(none)"]
    bottoms = [0] * len(modalities)
    for source, counts in mix["by_source"].items():
        heights = [counts.get(modality, 0) for modality in modalities]
        axes[0][1].bar(range(len(modalities)), heights, bottom=bottoms, label=source)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    axes[0][1].set_xticks(range(len(modalities)), modalities, rotation=30, ha="right", fontsize=8)
    axes[0][1].set_title("modality mix (distinct samples, by part)", fontsize=10)
    if mix["by_source"]:
        axes[0][1].legend(fontsize=7)
    _bar(axes[0][2], stats["mics"]["final_depth"], "MICS final depth")
    _bar(axes[0][3], stats["mics"]["trend"], "MICS path trend")
    drops = {f"{step}:{reason}": count for step, reasons in stats["drops"].items() for reason, count in reasons.items()}
    _bar(axes[1][0], drops, "dropped, by reason")
    _bar(axes[1][1], {"test": stats["test"]["total"], **{k: v["total"] for k, v in stats["stages"].items()}}, "split sizes")
    _bar(axes[1][2], stats["caption_cleaning"], "Part 2 caption cleaning (units)")
    if "steps" in stats:
        _step_gaps(axes[1][3], stats["steps"])
    else:
        axes[1][3].axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(figure)


def _step_gaps(axis, steps: dict[str, Any]) -> None:
    labels = steps["labels"]
    _bar(axis, steps["gap_histogram"], f"{steps['pairs']} step pairs by score gap (chosen - rejected)\n"
         f"{steps['rows']} step rows: {labels.get('true', 0)} good, {labels.get('false', 0)} not")


def write_step_stats(steps: dict[str, Any], folder: Path) -> None:
    """``stats.json`` (``{"steps": ...}``) and ``stats.png`` (the gap histogram) of a steps folder of its own."""
    (folder / "stats.json").write_text(json.dumps({"steps": steps}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    _step_gaps(axis, steps)
    figure.tight_layout()
    figure.savefig(folder / "stats.png", dpi=80, metadata={"Software": None})
    plt.close(figure)
