"""Accuracy with a 95% Wilson interval, per benchmark, per modality and overall; tables and comparisons."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["wilson_interval", "summarize", "results_markdown", "compare_results"]

Z95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion; (0, 0) for no trials."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def _block(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy over the graded predictions (a parse failure is graded wrong; an open answer without a
    judge is not graded and counts in ``recall`` only), strict accuracy (the final-answer line was there),
    and the open-question recall."""
    total = len(predictions)
    graded = [p for p in predictions if p.get("correct") is not None]
    correct = sum(p["correct"] is True for p in graded)
    strict = sum(bool(p.get("strict_correct")) for p in graded)
    parse_failures = sum(not p.get("parse_ok") for p in predictions)
    no_marker = sum(p.get("parse") != "marker" for p in predictions)
    low, high = wilson_interval(correct, len(graded))
    block: dict[str, Any] = {
        "n": total,
        "graded": len(graded),
        "correct": correct,
        "accuracy": correct / len(graded) if graded else 0.0,
        "ci95": [low, high],
        "strict_correct": strict,
        "strict_accuracy": strict / len(graded) if graded else 0.0,
        "parse_failures": parse_failures,
        "parse_failure_rate": parse_failures / total if total else 0.0,
        "no_final_answer_line": no_marker,
        "judged_by": dict(sorted(Counter(str(p.get("judged_by")) for p in predictions).items())),
    }
    recalls = [p["recall"] for p in predictions if p.get("recall") is not None]
    if recalls:
        block["recall"] = sum(recalls) / len(recalls)
        block["recall_n"] = len(recalls)
    scores = [p["mics_score"] for p in predictions if p.get("mics_score") is not None]
    if scores:
        block["mics_score"] = sum(scores) / len(scores)
        block["mics_score_n"] = len(scores)
    return block


def summarize(predictions: Iterable[dict[str, Any]]) -> dict[str, Any]:
    predictions = list(predictions)
    summary = _block(predictions)
    for key in ("modality", "answer_type"):
        groups: dict[str, list[dict[str, Any]]] = {}
        for prediction in predictions:
            groups.setdefault(str(prediction.get(key) or "other"), []).append(prediction)
        summary[f"by_{key}"] = {name: _block(group) for name, group in sorted(groups.items())}
    return summary


def _cell(block: dict[str, Any]) -> str:
    if not block.get("graded", block["n"]):
        return "-"
    low, high = block["ci95"]
    return f"{100 * block['accuracy']:.1f} ({100 * low:.1f}-{100 * high:.1f})"


def _percent(block: dict[str, Any], key: str) -> str:
    return f"{100 * block[key]:.1f}" if key in block and block.get("graded", 1) else "-"


def results_markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation of `{results['model']}`",
        "",
        f"Graded by: {results.get('judge') or 'rules only (no judge): open answers get token recall, not a verdict'}.",
        "Accuracy counts a reply without a readable answer as wrong; strict accuracy also needs the",
        "`### The final answer is:` line. Recall: share of the reference's words in open answers.",
        "",
        "| benchmark | n | graded | accuracy % (95% CI) | strict % | parse failures | open recall % | MICS-Score |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    rows = list(results["benchmarks"].items()) + [("**overall**", results["overall"])]
    for name, block in rows:
        mics = f"{block['mics_score']:.3f}" if "mics_score" in block else "-"
        recall = f"{100 * block['recall']:.1f}" if "recall" in block else "-"
        lines.append(
            f"| {name} | {block['n']} | {block.get('graded', block['n'])} | {_cell(block)} | "
            f"{_percent(block, 'strict_accuracy')} | {block['parse_failures']} "
            f"({100 * block['parse_failure_rate']:.1f}%) | {recall} | {mics} |"
        )
    lines += ["", "## By modality (all benchmarks)", "", "| modality | n | accuracy % (95% CI) |", "| --- | ---: | --- |"]
    for name, block in results["overall"]["by_modality"].items():
        lines.append(f"| {name} | {block['n']} | {_cell(block)} |")
    judged_by = results["overall"].get("judged_by") or {}
    if judged_by:
        lines += ["", "How answers were graded: " + ", ".join(f"{kind} {count}" for kind, count in judged_by.items()) + "."]
    return "\n".join(lines) + "\n"


def compare_results(folders: list[Path]) -> str:
    """Side by side: one column per result folder, one row per benchmark (accuracy and 95% CI)."""
    loaded = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run 'mics eval --output {folder}' first")
        loaded.append(json.loads(path.read_text(encoding="utf-8")))
    names = sorted({name for result in loaded for name in result["benchmarks"]})
    header = "| benchmark | " + " | ".join(f"`{r['model']}` ({Path(f).name})" for r, f in zip(loaded, folders)) + " |"
    lines = [header, "| --- |" + " --- |" * len(loaded)]
    for name in [*names, "overall"]:
        cells = []
        for result in loaded:
            block = result["overall"] if name == "overall" else result["benchmarks"].get(name)
            cells.append(_cell(block) + f" n={block['n']}" if block else "-")
        lines.append(f"| {'**overall**' if name == 'overall' else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
