"""The one exception hierarchy of mics-agents.

Every error a user can meet derives from :class:`MicsError` and carries a message that says what went
wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "MicsError",
    "ConfigError",
    "InputError",
    "ImageError",
    "ModelError",
    "ModelCallError",
    "MalformedReplyError",
    "TransientModelError",
    "ModelRequestsForbidden",
    "PromptError",
    "StoreError",
    "OutputBusyError",
    "ForeignOutputError",
    "OutputWriteError",
]


class MicsError(Exception):
    """Base class of every error raised on purpose by mics-agents."""


class ConfigError(MicsError):
    """A setting is missing or invalid. The message names the environment variable to fix."""


class InputError(MicsError):
    """A case (question, answer, images, case info) cannot be used as given."""


class ImageError(InputError):
    """An image is missing, unreadable, unsupported or too large."""


class PromptError(MicsError):
    """A prompt template is missing or refers to an unknown field."""


class StoreError(MicsError):
    """The SQLite store cannot be opened or has an unknown schema."""


class OutputBusyError(MicsError):
    """Another process owns the output file (it holds the lock beside it). The message names it."""


class ForeignOutputError(MicsError):
    """An output or failed file holds lines mics-agents did not write (an input file given as --output, an
    edited line): refused before anything is written."""


class ModelError(MicsError):
    """Base class of errors at the model boundary."""

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message)
        self.model = model


class ModelCallError(ModelError):
    """A model call failed for good: a non-retryable error, or retries exhausted.

    This is an infrastructure failure: the search ends with status ``model_error`` and the item is
    retried on the next run; it is never counted as a wrong intern answer.
    """


class MalformedReplyError(ModelError):
    """A reply arrived but is unusable (no choices, empty text, not the expected format). Retried."""


class TransientModelError(ModelError):
    """One attempt failed in a way that may pass (HTTP 408/409/425/429/5xx, a timeout, a dropped
    connection): the retrying wrapper tries again, after ``retry_after`` seconds if the server said so.
    ``description`` says what happened, ``hint`` what to do if it keeps happening."""

    def __init__(
        self,
        description: str,
        *,
        model: str | None = None,
        status_code: int | None = None,
        retry_after: float | None = None,
        hint: str = "",
    ) -> None:
        super().__init__(description, model=model)
        self.description = description
        self.status_code = status_code
        self.retry_after = retry_after
        self.hint = hint


class ModelRequestsForbidden(ModelError):
    """A real model request was attempted while they are switched off (the test suite does this)."""


class OutputWriteError(MicsError):
    """An output or failed file could not be written (a full disk, a file-size limit, an I/O error). The run
    stops; every line written before stands, so a rerun resumes with nothing lost."""
