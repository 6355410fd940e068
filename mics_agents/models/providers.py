"""LiteLLM as a library: importing it, resolving names, keys and base URLs, Router configs, prices.

Both transports use this (LiteLLM resolves names and keys for the direct client too); it imports neither.
LiteLLM takes seconds to import, so it is imported on first use; ``mics --help`` never pays for it.
"""

from __future__ import annotations

import os
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = [
    "import_litellm",
    "load_router",
    "router_deployments",
    "router_model_names",
    "resolve_api_base",
    "configured_api_base",
    "missing_credentials",
    "check_credentials",
    "token_prices",
    "cost_of",
    "direct_target",
    "direct_deployments",
    "listed_prices",
    "needs_litellm",
    "declares_n",
]

_OPENAI_OWN_API = "api.openai.com"

_ENV_REFERENCE = "os.environ/"
_litellm: Any = None
_written_deployments: "weakref.WeakKeyDictionary[Any, list[dict[str, Any]]]" = weakref.WeakKeyDictionary()


def import_litellm() -> Any:
    """Import LiteLLM once, offline (local cost map) and quiet, after the working folder's ``.env`` is in
    the environment. LiteLLM would otherwise load a ``.env`` found upward from its own install folder (a
    different file whenever the venv is not inside the project): ``LITELLM_MODE=PRODUCTION`` switches
    that off, so the one file read is the one our settings read."""
    global _litellm
    if _litellm is not None:
        return _litellm  # every call asks for it: no file system work after the first
    from ..config import load_env_file

    try:
        load_env_file()
    except (OSError, ValueError):  # unreadable or not UTF-8: loading the settings has said so already
        pass
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_MODE", "PRODUCTION")
    import litellm

    litellm.suppress_debug_info = True
    _litellm = litellm
    return litellm


def load_router(config_path: Path) -> Any:
    """A ``litellm.Router`` from a YAML/JSON file with a ``model_list`` (and optional ``router_settings``)."""
    import yaml

    try:
        config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"MICS_ROUTER_CONFIG: cannot read {str(config_path)!r}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"MICS_ROUTER_CONFIG: {str(config_path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_list"), list) or not config["model_list"]:
        raise ConfigError(f"MICS_ROUTER_CONFIG: {str(config_path)!r} needs a non-empty 'model_list'")
    litellm = import_litellm()
    settings = dict(config.get("router_settings") or {})
    # Retries happen once, in the retrying wrapper; the Router only picks the deployment.
    settings["num_retries"] = 0
    try:
        router = litellm.Router(model_list=config["model_list"], **settings)
    except Exception as exc:  # an unknown router_settings key (TypeError), a deployment LiteLLM refuses
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(f"MICS_ROUTER_CONFIG: LiteLLM refused {str(config_path)!r}: {type(exc).__name__}: {reason}") from None
    # The Router resolves "os.environ/VAR" keys as it loads (an unset one just disappears): keep the file's
    # deployments as written, to say which variable is missing.
    _written_deployments[router] = [entry for entry in config["model_list"] if isinstance(entry, dict)]
    return router


def router_deployments(router: Any) -> list[dict[str, Any]]:
    """The Router's deployments: ``router.registry().all()`` in recent LiteLLM (1.110 deprecates the
    ``model_list`` attribute), ``router.model_list`` in older ones."""
    registry = getattr(router, "registry", None)
    if callable(registry):
        return list(registry().all())
    return list(router.model_list)


def router_model_names(router: Any) -> set[str]:
    return {deployment["model_name"] for deployment in router_deployments(router)}


def _provider(model: str) -> tuple[str, str | None, str | None]:
    """LiteLLM's (provider, key it implies, base URL it implies) for a model name."""
    litellm = import_litellm()
    try:
        _, provider, dynamic_key, resolved = litellm.get_llm_provider(model)
    except Exception as exc:  # LiteLLM raises its own BadRequestError for unknown providers
        raise ConfigError(
            f"{model!r} is not a LiteLLM model name ({' '.join(str(exc).split())[:200]}). Use 'provider/model', "
            "e.g. 'openai/gpt-4o' or 'hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct'."
        ) from None
    return provider, dynamic_key, resolved


def configured_api_base(provider: str) -> str | None:
    """A base URL the user set for this provider (``<PROVIDER>_API_BASE``, ``<PROVIDER>_BASE_URL``)."""
    prefix = provider.upper()
    base = os.environ.get(f"{prefix}_API_BASE") or os.environ.get(f"{prefix}_BASE_URL")
    if provider == "openai":
        base = base or os.environ.get("OPENAI_BASE_URL")
    return base or None


def resolve_api_base(model: str, api_base: str | None = None) -> str | None:
    """The base URL LiteLLM will use for ``model``: the explicit one, else the provider's variable, else
    the one LiteLLM implies (None: the provider's public API)."""
    if api_base:
        return api_base
    provider, _, resolved = _provider(model)
    return resolved or configured_api_base(provider)


def _is_key_variable(name: str) -> bool:
    return name.endswith(("_API_KEY", "_API_TOKEN", "_AUTH_TOKEN"))


def _missing_for(model: str, api_key: Any = None, api_base: Any = None) -> list[str]:
    """The credential variables ``model`` needs and lacks, or ``[]``."""
    if isinstance(api_key, str) and api_key:
        if api_key.startswith(_ENV_REFERENCE):
            variable = api_key[len(_ENV_REFERENCE):]
            return [] if os.environ.get(variable) else [variable]
        return []
    if api_key is not None and not isinstance(api_key, str):
        return []
    provider, dynamic_key, _ = _provider(model)
    if dynamic_key or api_base or configured_api_base(provider):
        return []  # a key LiteLLM supplies (hosted_vllm/), or an endpoint of one's own: it may need none
    checked = import_litellm().validate_environment(model)
    missing = [name for name in checked.get("missing_keys") or [] if isinstance(name, str)]
    if checked.get("keys_in_environment") or not missing:
        return []
    # Only an API-key variable is surely needed: cloud providers (Bedrock, Vertex) also take credentials from
    # profiles and instance roles, and a missing *_API_BASE is LiteLLM's default URL, not a missing secret.
    return missing if all(_is_key_variable(name) for name in missing) else []


def direct_target(model: str) -> tuple[str, str, str | None] | None:
    """(wire model, base URL, key) when ``model``'s endpoint takes the OpenAI request unchanged, else None.

    Read from the variables LiteLLM reads, without importing it: ``hosted_vllm/NAME`` on
    ``HOSTED_VLLM_API_BASE`` (key ``HOSTED_VLLM_API_KEY``, if any), and ``openai/NAME`` on
    ``OPENAI_API_BASE`` / ``OPENAI_BASE_URL`` when that is not OpenAI's own API, whose reasoning models need
    LiteLLM's parameter mapping (``drop_params`` for an o-series temperature)."""
    provider, _, wire_model = model.partition("/")
    if provider not in ("hosted_vllm", "openai") or not wire_model:
        return None
    base = configured_api_base(provider)
    if not base or (provider == "openai" and _OPENAI_OWN_API in base):
        return None
    return wire_model, base, os.environ.get(f"{provider.upper()}_API_KEY") or None


def _from_environment(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_ENV_REFERENCE):
        return os.environ.get(value[len(_ENV_REFERENCE):]) or None
    return value


def direct_deployments(router: Any, name: str) -> list[tuple[str, str, str | None, int | None]] | None:
    """(wire model, base URL, key, ``max_parallel_requests``) for each Router deployment of ``name``, as the
    config file wrote them, when every one takes the OpenAI request unchanged (``hosted_vllm/`` or ``openai/``
    with an ``api_base`` that is not OpenAI's own API, and no other parameter for LiteLLM to apply); else None."""
    deployments = [d for d in _written_deployments.get(router) or router_deployments(router) if d.get("model_name") == name]
    if not deployments:
        return None
    targets = []
    for deployment in deployments:
        params = dict(deployment.get("litellm_params") or {})
        model = str(params.pop("model", "") or "")
        base = _from_environment(params.pop("api_base", None))
        key = _from_environment(params.pop("api_key", None))
        params.pop("rpm", None), params.pop("tpm", None)  # the Router's own budgets, not request parameters
        parallel = params.pop("max_parallel_requests", None)  # per deployment: the direct client holds it too
        provider, _, wire = model.partition("/")
        if params or provider not in ("hosted_vllm", "openai") or not wire:
            return None
        if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
            return None  # not a limit we can hold: the Router says what it makes of it
        base = base or configured_api_base(provider)
        if not isinstance(base, str) or not base or (provider == "openai" and _OPENAI_OWN_API in base):
            return None
        key = key if isinstance(key, str) and key else os.environ.get(f"{provider.upper()}_API_KEY") or None
        targets.append((wire, base, key, parallel))
    return targets


def declares_n(router: Any, name: str) -> bool:
    """Whether every Router deployment of ``name`` says in its ``model_info`` that it takes ``n`` (several
    samples in one request): ``model_info: {supports_n: true}``."""
    deployments = [d for d in _written_deployments.get(router) or router_deployments(router) if d.get("model_name") == name]
    return bool(deployments) and all(
        isinstance(d.get("model_info"), dict) and d["model_info"].get("supports_n") is True for d in deployments
    )


@lru_cache(maxsize=1)
def _bundled_price_table() -> dict[str, Any]:
    """LiteLLM's own price table as it ships (the file ``LITELLM_LOCAL_MODEL_COST_MAP`` makes it use), read
    as JSON: ~30 ms, against seconds for importing LiteLLM."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("litellm")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        try:
            with open(Path(folder) / "model_prices_and_context_window_backup.json", encoding="utf-8") as handle:
                table = json.load(handle)
            return table if isinstance(table, dict) else {}
        except (OSError, ValueError):
            continue
    return {}


def listed_prices(model: str) -> tuple[float, float] | None:
    """USD per input and output token that LiteLLM's table lists for ``openai/NAME`` (as LiteLLM prices
    it whatever the base URL: a gateway serving ``gpt-4o-mini`` is paid as that model), else None.
    ``hosted_vllm/`` models are one's own servers: never listed."""
    provider, _, wire = model.partition("/")
    if provider != "openai" or not wire:
        return None
    table = _bundled_price_table()
    entry = table.get(model) or table.get(wire)
    if not isinstance(entry, dict):
        return None
    price_in, price_out = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
    if not isinstance(price_in, (int, float)) or not isinstance(price_out, (int, float)):
        return None
    return float(price_in), float(price_out)


def needs_litellm(names: list[str], transport: str, router_config: Any = None) -> bool:
    """Whether any of these models goes through LiteLLM (a Router config always does: LiteLLM reads it)."""
    if router_config or transport == "litellm":
        return True
    return any(direct_target(name) is None for name in names)


def missing_credentials(name: str, router: Any = None) -> list[str]:
    """The credential variables model ``name`` (a LiteLLM name, or a Router ``model_name``) lacks. Keys a
    Router deployment gives (``api_key``, ``os.environ/VAR`` when VAR is set) are not missing."""
    routed = router is not None and name in router_model_names(router)
    if not routed and direct_target(name) is not None:
        return []  # an endpoint of one's own: it may need no key (and LiteLLM need not be imported to say so)
    if routed:
        for deployment in _written_deployments.get(router) or router_deployments(router):
            if deployment.get("model_name") != name:
                continue
            params = deployment.get("litellm_params") or {}
            missing = _missing_for(str(params.get("model") or name), params.get("api_key"), params.get("api_base"))
            if missing:
                return missing
        return []
    return _missing_for(name)


def check_credentials(names: list[str], router: Any = None) -> None:
    """Raise :class:`ConfigError` before any call when a model's provider key is not set anywhere (the
    environment or the working folder's ``.env``). LiteLLM would report it per call as a server error, which
    was retried as if the server were down."""
    problems = []
    for name in dict.fromkeys(names):
        missing = missing_credentials(name, router)
        if missing:
            problems.append(f"{name} needs {' or '.join(missing)}, which is not set")
    if problems:
        env_file = Path.cwd() / ".env"
        raise ConfigError(
            f"Missing API key: {'; '.join(problems)}. Set it in the environment or in {str(env_file)!r} (the one "
            ".env file read), or, for a server of your own that needs no key, point the provider's *_API_BASE "
            "(e.g. OPENAI_API_BASE) at it."
        )


@lru_cache(maxsize=256)
def token_prices(model_name: str) -> tuple[float, float]:
    """USD per input and per output token from LiteLLM's price table; (0, 0) for unpriced models."""
    litellm = import_litellm()
    try:
        price_in = litellm.cost_per_token(model=model_name, prompt_tokens=1, completion_tokens=0)[0]
        price_out = litellm.cost_per_token(model=model_name, prompt_tokens=0, completion_tokens=1)[1]
        return float(price_in), float(price_out)
    except Exception:
        return 0.0, 0.0


def cost_of(litellm: Any, response: Any) -> float:
    """LiteLLM prices the response while handling it (``_hidden_params["response_cost"]``; None for a model
    without a price, e.g. local vLLM): use that rather than pricing it a second time."""
    hidden = getattr(response, "_hidden_params", None) or {}
    if isinstance(hidden, dict) and "response_cost" in hidden:
        return float(hidden["response_cost"] or 0.0)
    try:
        return float(litellm.completion_cost(completion_response=response) or 0.0)
    except Exception:  # models without a price cost nothing we can know
        return 0.0
