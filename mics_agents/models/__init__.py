"""The model boundary: the protocol, the LiteLLM adapter, the cache wrapper and test doubles."""

from .base import (
    ChatMessage,
    ImagePart,
    Model,
    ModelRequest,
    ModelResponse,
    TextPart,
    request_policy,
    set_request_policy,
)
from .cached import CachedModel
from .testing import FunctionModel, ScriptedModel

__all__ = [
    "CachedModel",
    "ChatMessage",
    "FunctionModel",
    "ImagePart",
    "LiteLLMModel",
    "Model",
    "ModelRequest",
    "ModelResponse",
    "ScriptedModel",
    "TextPart",
    "request_policy",
    "set_request_policy",
]


def __getattr__(name: str):  # LiteLLMModel pulls in tenacity only; LiteLLM itself loads on first call
    if name == "LiteLLMModel":
        from .litellm_model import LiteLLMModel

        return LiteLLMModel
    raise AttributeError(name)
