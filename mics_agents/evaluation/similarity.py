"""BERTScore of open answers, as the published Chiron-o1 evaluation reports it (roberta-large, F1), for
``mics eval --bertscore``. Optional: it needs the ``bert-score`` package and roberta-large already in the
Hugging Face cache; nothing is downloaded here. Token recall (in ``metrics``) is the offline figure."""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError

__all__ = ["BERTSCORE_MODEL", "add_bertscore"]

BERTSCORE_MODEL = "roberta-large"


def _score_function() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download a model in the middle of an evaluation
    try:
        from bert_score import score
    except ImportError:
        raise ConfigError(
            "--bertscore needs the bert-score package: pip install bert-score (and roberta-large in the "
            "Hugging Face cache, e.g. huggingface-cli download roberta-large), or leave --bertscore off"
        ) from None
    return score


def add_bertscore(predictions: list[dict[str, Any]]) -> int:
    """Set ``bertscore_f1`` on every parsed open answer (in place), as the published evaluation scores
    them (unparsed ones are left out); returns how many were scored."""
    scored = [p for p in predictions if p.get("answer_type", "open") == "open" and p.get("parse_ok")]
    if not scored:
        return 0
    score = _score_function()
    try:
        _, _, f1 = score([str(p["prediction"]) for p in scored], [str(p["gt_answer"]) for p in scored],
                         model_type=BERTSCORE_MODEL, lang="en", verbose=False)
    except OSError as exc:
        raise ConfigError(f"--bertscore: {BERTSCORE_MODEL} is not in the Hugging Face cache ({exc}); download it "
                          "first (huggingface-cli download roberta-large) or leave --bertscore off") from None
    for prediction, value in zip(scored, f1.tolist() if hasattr(f1, "tolist") else list(f1)):
        prediction["bertscore_f1"] = float(value)
    return len(scored)
