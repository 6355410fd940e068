"""Evaluation on medical VQA benchmarks (``mics eval``), with the MICS-Score of a model's own reasoning."""

from .loaders import EvalItem, detect_layout, load_benchmark, prepare_benchmark
from .metrics import compare_results, results_markdown, summarize, wilson_interval
from .worker import EvalWorker, extract_prediction

__all__ = [
    "EvalItem",
    "EvalWorker",
    "compare_results",
    "detect_layout",
    "extract_prediction",
    "load_benchmark",
    "prepare_benchmark",
    "results_markdown",
    "summarize",
    "wilson_interval",
]
