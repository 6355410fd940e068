"""The exception hierarchy of the training package.

Every error a user can meet derives from :class:`TrainingError` and says what went wrong and what to do.
"""

from __future__ import annotations

__all__ = [
    "TrainingError",
    "TrainingConfigError",
    "StageDataError",
    "ModelLoadError",
    "ManifestError",
    "DataChangedError",
]


class TrainingError(Exception):
    """Base class of every error raised on purpose by ``training``."""


class TrainingConfigError(TrainingError):
    """The curriculum config is missing a value or holds an invalid one. The message names the field."""


class StageDataError(TrainingError):
    """A stage file is missing or one of its samples cannot be trained on (the message names file, line, id)."""


class ModelLoadError(TrainingError):
    """The base model, its processor/tokenizer, or a stage adapter cannot be loaded."""


class ManifestError(TrainingError):
    """The output folder holds a run that this config cannot continue (other base model, other stages)."""


class DataChangedError(ManifestError):
    """A stage file changed since its stage was trained or started; resuming would mix data silently."""
