"""mics-agents: Mentor-Intern Collaborative Search (MICS) for verified medical chain-of-thought data.

    result = await mics_agents.search(question, "scan.png", answer="B")
"""

import os as _os

# LiteLLM fetches its model cost map from the network at import unless told otherwise.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from .config import Settings, load_settings  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    ImageError,
    InputError,
    MalformedReplyError,
    MicsError,
    ModelCallError,
    ModelError,
    ModelRequestsForbidden,
    PromptError,
    StoreError,
)
from .results import InternSample, Node, SearchResult, Usage  # noqa: E402
from .search import Searcher, search  # noqa: E402
from .store import Store  # noqa: E402

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
