"""The model boundary: the protocol (``base``), its wrappers (``retrying``, ``limits``, ``sanitizing``,
``validating``, ``cached``), its transports (``litellm_model``, ``direct``, sharing ``transport`` and
``providers``), the one place they are put together (``factory``), and test doubles."""

from .base import (
    ChatMessage,
    ImagePart,
    Model,
    ModelRequest,
    ModelResponse,
    TextPart,
    WrapperModel,
    AroundEachCall,
    request_policy,
    set_request_policy,
)
from .cached import CachedModel
from .limits import LimitingModel
from .retrying import RetryingModel
from .sanitizing import SanitizingModel
from .testing import FunctionModel, ScriptedModel
from .validating import ValidatingModel

__all__ = [
    "CachedModel",
    "ChatMessage",
    "FunctionModel",
    "ImagePart",
    "LimitingModel",
    "Model",
    "ModelRequest",
    "ModelResponse",
    "RetryingModel",
    "SanitizingModel",
    "ScriptedModel",
    "TextPart",
    "ValidatingModel",
    "WrapperModel",
    "AroundEachCall",
    "open_model",
    "open_models",
    "request_policy",
    "set_request_policy",
]


def __getattr__(name: str):  # the factory pulls in the transports; LiteLLM itself loads on first call
    if name in ("open_model", "open_models"):
        from . import factory

        return getattr(factory, name)
    raise AttributeError(name)
