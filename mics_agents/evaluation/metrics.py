"""Accuracy with a 95% Wilson interval, per benchmark, per modality and overall; tables and comparisons."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["NO_RULE_MATCHED", "closed_by_label", "counted_verdict", "wilson_interval", "summarize", "results_markdown",
           "compare_results"]

Z95 = 1.959963984540054

# How a closed answer is recorded that no grading rule matched and no judge was asked about: wrong.
NO_RULE_MATCHED = "no_rule"


def closed_by_label(prediction: dict[str, Any]) -> bool:
    """Closed by the benchmark's own label (VQA-RAD/SLAKE CLOSED, multiple choice), as results split them."""
    return prediction.get("answer_type") in ("closed", "choice")


def counted_verdict(prediction: dict[str, Any]) -> bool | None:
    """The verdict accuracy counts: the recorded one; for a closed question without one (stored before such
    answers were recorded wrong) False, so a closed item never leaves the denominator; None (not counted in
    accuracy, only in recall) for an open answer no judge graded."""
    correct = prediction.get("correct")
    if correct is None and closed_by_label(prediction):
        return False
    return correct


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion; (0, 0) for no trials."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def _block(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy over the graded predictions (``graded`` of ``n``: a parse failure and a closed answer no rule
    matched are graded wrong; an open answer without a judge is not graded and counts in ``recall`` only),
    strict accuracy (the final-answer line was there), and the open-question recall; each figure beside the
    count of predictions it covers."""
    total = len(predictions)
    graded = [p for p in predictions if counted_verdict(p) is not None]
    correct = sum(counted_verdict(p) is True for p in graded)
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
    similarities = [p["bertscore_f1"] for p in predictions if p.get("bertscore_f1") is not None]
    if similarities:
        block["bertscore_f1"] = sum(similarities) / len(similarities)
        block["bertscore_n"] = len(similarities)
    scores = [p["mics_score"] for p in predictions if p.get("mics_score") is not None]
    if scores:
        block["mics_score"] = sum(scores) / len(scores)
        block["mics_score_n"] = len(scores)
    return block


def summarize(predictions: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """All predictions, then closed and open questions apart (as the VQA-RAD/SLAKE/PathVQA papers report
    them), by modality and answer type, and the published Chiron-o1 figure: accuracy over parsed answers."""
    predictions = list(predictions)
    summary = _block(predictions)
    summary["closed"] = _block([p for p in predictions if closed_by_label(p)])
    summary["open"] = _block([p for p in predictions if not closed_by_label(p)])
    parsed = [p for p in predictions if p.get("parse_ok") and counted_verdict(p) is not None]
    summary["accuracy_over_parsed"] = sum(counted_verdict(p) is True for p in parsed) / len(parsed) if parsed else None
    summary["accuracy_over_parsed_n"] = len(parsed)
    for key in ("modality", "answer_type"):
        groups: dict[str, list[dict[str, Any]]] = {}
        for prediction in predictions:
            groups.setdefault(str(prediction.get(key) or "other"), []).append(prediction)
        summary[f"by_{key}"] = {name: _block(group) for name, group in sorted(groups.items())}
    return summary


# Every figure in the tables is followed by "of N": the predictions it was computed over.


def _cell(block: dict[str, Any] | None) -> str:
    if not block or not block.get("graded", block.get("n")):
        return "-"
    low, high = block["ci95"]
    return f"{100 * block['accuracy']:.1f} ({100 * low:.1f}-{100 * high:.1f}) of {block['graded']}"


def _percent(block: dict[str, Any] | None, key: str) -> str:
    if not block or block.get(key) is None or not block.get("graded", 1):
        return "-"
    return f"{100 * block[key]:.1f} of {block['graded']}"


def _recall(block: dict[str, Any] | None) -> str:
    return f"{100 * block['recall']:.1f} of {block['recall_n']}" if block and "recall" in block else "-"


def results_markdown(results: dict[str, Any]) -> str:
    """The tables papers print: closed accuracy, open accuracy and recall per benchmark, then the details."""
    judge = results.get("judge")
    lines = [
        f"# Evaluation of `{results['model']}`",
        "",
        f"Graded by: {judge or 'rules only (no judge): open answers get token recall, not a verdict'}.",
        "Closed: by the benchmark's own label (yes/no, \"left or right?\", multiple choice); every closed question",
        "counts, and a closed answer no rule matches, without a judge, is wrong. Accuracy counts a reply without a",
        "readable answer as wrong; strict accuracy also needs the `### The final answer is:` line. Open recall:",
        "share of the reference's words in the answer (offline; the published Chiron-o1 evaluation uses BERTScore).",
        "\"of N\": the questions a figure covers (open answers without a judge count in recall, not in accuracy).",
        "",
        "| benchmark | n | closed accuracy % (95% CI) | open accuracy % (95% CI) | open recall % | strict % | parse failures | MICS-Score |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    rows = list(results["benchmarks"].items()) + [("**overall**", results["overall"])]
    for name, block in rows:
        mics = f"{block['mics_score']:.3f} of {block['mics_score_n']}" if "mics_score" in block else "-"
        lines.append(
            f"| {name} | {block['n']} | {_cell(block.get('closed'))} | {_cell(block.get('open'))} | "
            f"{_recall(block.get('open'))} | {_percent(block, 'strict_accuracy')} | {block['parse_failures']} "
            f"({100 * block['parse_failure_rate']:.1f}%) | {mics} |"
        )
    published = [(name, block) for name, block in results["benchmarks"].items() if block.get("layout") == "chiron"]
    if published:
        lines += ["", "Computed the published Chiron-o1 way (judge accuracy over parsed answers, unparsed ones left out):", ""]
        for name, block in published:
            share = block.get("accuracy_over_parsed")
            figure = f"{100 * share:.1f}%" if share is not None else "-"
            parsed = block.get("accuracy_over_parsed_n", block["n"] - block["parse_failures"])
            lines.append(f"- {name}: {figure} of {parsed} parsed")
    lines += ["", "## By modality (all benchmarks)", "", "| modality | n | accuracy % (95% CI) |", "| --- | ---: | --- |"]
    for name, block in results["overall"]["by_modality"].items():
        lines.append(f"| {name} | {block['n']} | {_cell(block)} |")
    scored = [(name, block["open"]) for name, block in results["benchmarks"].items()
              if (block.get("open") or {}).get("bertscore_f1") is not None]
    if scored:
        lines += ["", "Open answers, BERTScore F1 (roberta-large, parsed answers only, as published):", ""]
        lines += [f"- {name}: {block['bertscore_f1']:.4f} over {block['bertscore_n']}" for name, block in scored]
    judged_by = results["overall"].get("judged_by") or {}
    if judged_by:
        lines += ["", "How answers were graded: " + ", ".join(f"{kind} {count}" for kind, count in judged_by.items()) + "."]
    not_scored = {name: block.get("not_scored_by_kind") for name, block in results["benchmarks"].items()
                  if block.get("not_scored_by_kind")}
    for name, kinds in not_scored.items():
        lines.append(f"Not scored in {name}: " + ", ".join(f"{count} {kind}" for kind, count in kinds.items()) + ".")
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
            cells.append(_cell(block) if block else "-")
        lines.append(f"| {'**overall**' if name == 'overall' else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
