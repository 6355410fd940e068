"""mics-agents: Mentor-Intern Collaborative Search (MICS) for verified medical chain-of-thought data.

    result = await mics_agents.search(question, "scan.png", answer="B")
"""

import os as _os
import sys as _sys
import types as _types

# LiteLLM fetches its model cost map from the network at import unless told otherwise.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# The public names, imported on first use (PEP 562): ``import mics_agents`` (and every ``mics`` command, whose
# modules live in this package) no longer pays for pydantic, the search and the store before it needs them.
_EXPORTS = {
    "Settings": "config", "load_settings": "config",
    "ConfigError": "errors", "ImageError": "errors", "InputError": "errors", "MalformedReplyError": "errors",
    "MicsError": "errors", "ModelCallError": "errors", "ModelError": "errors", "ModelRequestsForbidden": "errors",
    "PromptError": "errors", "StoreError": "errors",
    "InternSample": "results", "Node": "results", "SearchResult": "results", "Usage": "results",
    "Searcher": "search",
    "Store": "store",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mics_agents' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, "search"})


class _Package(_types.ModuleType):
    """``mics_agents.search`` is the function, as it was when this module imported it eagerly: importing the
    submodule ``mics_agents.search`` sets the package's attribute to the module, which is ignored here."""

    @property
    def search(self) -> object:
        from .search import search

        return search

    @search.setter
    def search(self, value: object) -> None:
        pass


_sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ImageError",
    "InputError",
    "InternSample",
    "MalformedReplyError",
    "MicsError",
    "ModelCallError",
    "ModelError",
    "ModelRequestsForbidden",
    "Node",
    "PromptError",
    "SearchResult",
    "Searcher",
    "Settings",
    "Store",
    "StoreError",
    "Usage",
    "load_settings",
    "search",
    "__version__",
]
