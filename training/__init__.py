"""Curriculum fine-tuning of a vision-language model on the MMRP stages the dataset builder writes.

Kept apart from ``mics_agents``: it reads the dataset builder's stage files, never the search code.
``python -m training --config curriculum.yaml`` runs it; from Python::

    from training import load_config, run_curriculum
    run_curriculum(load_config("curriculum.yaml", output_dir="runs/chiron"))

Importing this package is cheap: torch and transformers load with :func:`run_curriculum`.
"""

from __future__ import annotations

from typing import Any

from .config import CurriculumConfig, StageConfig, StageSettings, load_config
from .errors import (
    DataChangedError,
    ManifestError,
    ModelLoadError,
    StageDataError,
    TrainingConfigError,
    TrainingError,
)

__all__ = [
    "CurriculumConfig",
    "StageConfig",
    "StageSettings",
    "load_config",
    "run_curriculum",
    "TrainingError",
    "TrainingConfigError",
    "StageDataError",
    "ModelLoadError",
    "ManifestError",
    "DataChangedError",
]


def __getattr__(name: str) -> Any:
    if name == "run_curriculum":
        from .curriculum import run_curriculum

        return run_curriculum
    raise AttributeError(f"module 'training' has no attribute {name!r}")
