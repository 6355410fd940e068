"""Two arms side by side: MICS against the vanilla strategy (or any runs) on one input, as the paper compares
them. Read from the runs' output files by the journal's rule, so a run still under way can be compared too."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from .dataset.build import read_jsonl
from .dataset.qc import QcOptions, grade_final_answers, needs_final_answer_grade, quality_control
from .errors import InputError
from .outputs import default_failed_path, settle

__all__ = ["run_summary", "compare_runs"]


def _read(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path, "mics run output") if path.is_file() else []  # a run may have no failed file


def run_summary(output: Path) -> dict[str, Any]:
    """What one run made: items, full-score paths, MICS-Scores, depths, trends, and what a kept path cost.

    A path is *kept* when quality control would keep it (vanilla paths included, and judged without a
    trend, which a single scored path does not have). Final answers the run did not grade are graded by
    the rules only here, so undecided ones count as not kept.
    """
    output = Path(output)
    if not output.is_file():
        raise InputError(f"{output} not found: give the --output file of a mics run")
    successes, failures = settle(_read(output), _read(default_failed_path(output)))
    if any(needs_final_answer_grade(record) for record in successes):
        asyncio.run(grade_final_answers(successes, None))
    kept = quality_control(successes, QcOptions(include_vanilla=True)).kept
    usage = [record.get("usage") or {} for record in successes]
    usage += [(record.get("search") or {}).get("usage") or {} for record in failures]
    calls = sum(int(entry.get("calls") or 0) for entry in usage)
    cost = sum(float(entry.get("cost_usd") or 0.0) for entry in usage)
    scores = [float(record["mics_score"]) for record in successes if record.get("mics_score") is not None]
    strategies = sorted({str(record.get("strategy") or "mics") for record in successes + failures})
    items = len(successes) + len(failures)
    return {
        "output": str(output),
        "strategy": ",".join(strategies) or "-",
        "items": items,
        "success": len(successes),
        "full_score": sum(record.get("search_id") == "1" for record in successes),
        "mean_mics_score": sum(scores) / len(scores) if scores else None,
        "depth": dict(sorted(Counter(str(record.get("final_depth")) for record in successes).items())),
        "trend": dict(sorted(Counter(str(record.get("trend") or "none") for record in successes).items())),
        "kept": len(kept),
        "calls": calls,
        "cost_usd": cost,
        "calls_per_kept": calls / len(kept) if kept else None,
        "cost_per_kept_usd": cost / len(kept) if kept else None,
    }


def _share(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.1f}%)" if whole else "-"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in counts.items()) or "-"


def compare_runs(outputs: list[Path]) -> str:
    """A markdown table, one column per run."""
    summaries = [run_summary(path) for path in outputs]
    header = "| | " + " | ".join(f"`{Path(s['output']).name}` ({s['strategy']})" for s in summaries) + " |"
    rows = [
        ("items", lambda s: str(s["items"])),
        ("full-score paths", lambda s: _share(s["full_score"], s["items"])),
        ("mean MICS-Score", lambda s: "-" if s["mean_mics_score"] is None else f"{s['mean_mics_score']:.3f}"),
        ("depth", lambda s: _counts(s["depth"])),
        ("trend", lambda s: _counts(s["trend"])),
        ("kept by quality control", lambda s: _share(s["kept"], s["items"])),
        ("calls per kept path", lambda s: "-" if s["calls_per_kept"] is None else f"{s['calls_per_kept']:.1f}"),
        ("cost per kept path", lambda s: "-" if s["cost_per_kept_usd"] is None else f"${s['cost_per_kept_usd']:.4f}"),
    ]
    lines = [header, "| --- |" + " --- |" * len(summaries)]
    lines += [f"| {name} | " + " | ".join(cell(s) for s in summaries) + " |" for name, cell in rows]
    return "\n".join(lines) + "\n"
