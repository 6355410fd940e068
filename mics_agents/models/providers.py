"""LiteLLM as a library: importing it, resolving names, keys and base URLs, Router configs, prices.

Both transports use this (LiteLLM resolves names and keys for the direct client too); it imports neither.
LiteLLM takes seconds to import, so it is imported on first use; ``mics --help`` never pays for it.
"""

from __future__ import annotations

import os
import weakref
from functools import lru_cache
from pathlib import Path
from collections.abc import Mapping
from typing import Any, NamedTuple

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
    """A base URL the user set for this provider (``<PROVIDER>_API_BASE``, ``<PROVIDER>_BASE_URL``); a blank
    variable is unset."""
    prefix = provider.upper()
    for variable in (f"{prefix}_API_BASE", f"{prefix}_BASE_URL"):
        base = (os.environ.get(variable) or "").strip()
        if base:
            return base
    return None


# Providers' own public endpoints: a base URL pointing there is the provider, which needs its key, not a server
# of one's own.
_PUBLIC_API_HOSTS = {
    "openai": _OPENAI_OWN_API, "anthropic": "api.anthropic.com", "gemini": "generativelanguage.googleapis.com",
    "deepseek": "api.deepseek.com", "mistral": "api.mistral.ai", "groq": "api.groq.com", "xai": "api.x.ai",
    "dashscope": "dashscope.aliyuncs.com", "openrouter": "openrouter.ai", "together_ai": "api.together.xyz",
}


def _is_public_api(provider: str, base: str) -> bool:
    """Whether ``base`` is ``provider``'s own public API (any spelling of its host)."""
    from urllib.parse import urlparse

    public = _PUBLIC_API_HOSTS.get(provider)
    if public is None:
        return False
    host = (urlparse(base if "//" in base else "//" + base).hostname or "").lower().rstrip(".")
    return host == public or host.endswith("." + public)


def resolve_api_base(model: str, api_base: str | None = None) -> str | None:
    """The base URL LiteLLM will use for ``model``: the explicit one, else the provider's variable, else
    the one LiteLLM implies (None: the provider's public API)."""
    if api_base:
        return api_base
    provider, _, resolved = _provider(model)
    return resolved or configured_api_base(provider)


def _is_key_variable(name: str) -> bool:
    return name.endswith(("_API_KEY", "_API_TOKEN", "_AUTH_TOKEN"))


def _given(value: Any) -> bool:
    """Whether a credential value is there: an empty or blank one is not (LiteLLM's clients skip it too)."""
    return isinstance(value, str) and bool(value.strip())


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if _given(value) else None


def _param(params: Mapping[str, Any], name: str) -> str | None:
    """A Router deployment's parameter, with an ``os.environ/VAR`` reference read from the environment."""
    value = _from_environment(params.get(name))
    return value if _given(value) else None


# Providers whose key LiteLLM takes from other variables than <PROVIDER>_API_KEY (validate_environment and
# the providers' call paths), for telling an empty variable from a set one.
_KEY_VARIABLES: dict[str, tuple[str, ...]] = {
    "anthropic": ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "together_ai": ("TOGETHERAI_API_KEY",),
    "perplexity": ("PERPLEXITYAI_API_KEY",),
    "datarobot": ("DATAROBOT_API_TOKEN",),
    "fireworks_ai": ("FIREWORKS_AI_API_KEY", "FIREWORKS_API_KEY", "FIREWORKSAI_API_KEY", "FIREWORKS_AI_TOKEN"),
    "dashscope": ("DASHSCOPE_API_KEY",),
}
_AZURE_KEYS = ("AZURE_API_KEY", "AZURE_OPENAI_API_KEY")
_GOOGLE_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


class _Lack(NamedTuple):
    """What a model lacks, as the rest of "MODEL needs ..."; ``key``: a key variable, which a server of
    one's own may not need; ``setting``: something to set (else a package to install, as the text says)."""

    text: str
    key: bool = False
    setting: bool = True


class _SdkChains:
    """The cloud SDKs' own credential chains (environment, profiles, files, instance and container roles),
    asked once per check whatever the number of models using them: off a cloud machine, the chain's last
    link waits on the metadata server."""

    def __init__(self) -> None:
        self._aws: dict[str | None, _Lack | None] = {}
        self._google: tuple[Any, ...] | None = None

    def aws(self, profile: str | None) -> _Lack | None:
        if profile not in self._aws:
            self._aws[profile] = _aws_chain(profile)
        return self._aws[profile]

    def google(self) -> tuple[Any, ...]:
        """(lack or None, project the credentials name or None)."""
        if self._google is None:
            self._google = _google_chain()
        return self._google


def _aws_chain(profile: str | None) -> _Lack | None:
    try:
        import boto3
        from botocore.credentials import RefreshableCredentials
        from botocore.exceptions import BotoCoreError, ProfileNotFound
    except ImportError:
        return _Lack(
            "the boto3 package, which is not installed (LiteLLM signs AWS requests with it): pip install boto3",
            setting=False,
        )
    try:
        credentials = boto3.Session(profile_name=profile).get_credentials()
    except ProfileNotFound as exc:
        return _Lack(
            f"AWS credentials, and boto3 says: {exc} (profiles live in ~/.aws/config and ~/.aws/credentials, or "
            "the files AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE name)"
        )
    except (BotoCoreError, OSError) as exc:
        return _Lack(f"AWS credentials that boto3 can read, and it cannot: {' '.join(str(exc).split())[:300]}")
    if credentials is not None and not isinstance(credentials, RefreshableCredentials):
        # Fixed keys (from the environment or a file) can be looked at without a request; blank ones are none.
        if not (_given(credentials.access_key) and _given(credentials.secret_key)):
            credentials = None
    if credentials is None:
        return _Lack(
            "AWS credentials and boto3 found none: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
            "(a profile in ~/.aws/credentials or ~/.aws/config), or run where an instance or container role "
            "applies; a Bedrock API key goes in AWS_BEARER_TOKEN_BEDROCK"
        )
    return None


def _google_import_lack() -> _Lack | None:
    try:
        import google.auth  # noqa: F401 - LiteLLM signs vertex_ai requests with it
    except ImportError:
        return _Lack(
            "the google-auth package, which is not installed (LiteLLM signs vertex_ai requests with it): pip "
            "install google-auth (or pip install 'litellm[google]' for Google's whole SDK)",
            setting=False,
        )
    return None


def _google_chain() -> tuple[_Lack | None, str | None]:
    import_lack = _google_import_lack()
    if import_lack is not None:
        return import_lack, None
    import google.auth
    import google.auth.exceptions

    try:
        _, project = google.auth.default(scopes=_GOOGLE_SCOPES)
    except google.auth.exceptions.DefaultCredentialsError as exc:
        reason = " ".join(str(exc).split())[:300]
        return _Lack(
            f"Google credentials and google.auth found none ({reason}): run 'gcloud auth application-default login', "
            "or set GOOGLE_APPLICATION_CREDENTIALS (or VERTEXAI_CREDENTIALS) to a service account's key file"
        ), None
    except google.auth.exceptions.GoogleAuthError as exc:
        reason = " ".join(str(exc).split())[:300]
        return _Lack(f"Google credentials that google.auth can use, and it cannot: {reason}"), None
    return None, project if _given(project) else None


def _azure_lacks(params: Mapping[str, Any]) -> list[_Lack]:
    """Azure OpenAI takes a key or Azure AD (a token, a service principal, a user and password, or
    DefaultAzureCredential when LiteLLM's ``enable_azure_ad_token_refresh`` is on), and has no public
    endpoint: each resource has its own."""
    litellm = import_litellm()
    lacks = []
    signed_in = (
        any(_env(name) for name in _AZURE_KEYS)
        or _given(getattr(litellm, "azure_key", None))
        or _param(params, "azure_ad_token") or _env("AZURE_AD_TOKEN")
        or callable(params.get("azure_ad_token_provider"))
        or getattr(litellm, "enable_azure_ad_token_refresh", False) is True
    )
    client = _param(params, "client_id") or _env("AZURE_CLIENT_ID")
    tenant = _param(params, "tenant_id") or _env("AZURE_TENANT_ID")
    secret = _param(params, "client_secret") or _env("AZURE_CLIENT_SECRET")
    user = _param(params, "azure_username") or _env("AZURE_USERNAME")
    password = _param(params, "azure_password") or _env("AZURE_PASSWORD")
    if not (signed_in or (client and tenant and secret) or (client and user and password)):
        lacks.append(_Lack(
            "a key (AZURE_API_KEY or AZURE_OPENAI_API_KEY) or Azure AD credentials (AZURE_AD_TOKEN, or "
            "AZURE_CLIENT_ID, AZURE_CLIENT_SECRET and AZURE_TENANT_ID), and none is set"
        ))
    if not (_param(params, "api_base") or _env("AZURE_API_BASE") or _given(getattr(litellm, "api_base", None))):
        lacks.append(_Lack("AZURE_API_BASE (the resource's endpoint, https://NAME.openai.azure.com), which is not set"))
    return lacks


def _aws_lacks(params: Mapping[str, Any], chains: _SdkChains) -> list[_Lack]:
    """Bedrock (and SageMaker) sign with AWS credentials: the deployment's own, a Bedrock API key, a role
    LiteLLM assumes, or whatever boto3's chain finds (profile, files, SSO, instance and container roles)."""
    if _env("AWS_BEARER_TOKEN_BEDROCK"):
        return []
    if _param(params, "aws_access_key_id") and _param(params, "aws_secret_access_key"):
        return []
    if any(_param(params, name) for name in ("aws_role_name", "aws_web_identity_token")) or any(
        _env(name) for name in ("AWS_ROLE_NAME", "AWS_WEB_IDENTITY_TOKEN")
    ):
        return []  # LiteLLM asks STS for them itself
    lack = chains.aws(_param(params, "aws_profile_name") or _env("AWS_PROFILE_NAME"))
    return [lack] if lack else []


def _google_lacks(params: Mapping[str, Any], chains: _SdkChains) -> list[_Lack]:
    """Vertex AI signs with google-auth: the credentials given to LiteLLM (VERTEXAI_CREDENTIALS, a
    deployment's ``vertex_credentials``: a key file or its JSON, which names its project), else Application
    Default Credentials, and then needs a project."""
    given = params.get("vertex_credentials") or params.get("vertex_ai_credentials")
    if isinstance(given, dict) or _given(_from_environment(given)) or _env("VERTEXAI_CREDENTIALS"):
        lack = _google_import_lack()
        return [lack] if lack else []
    lack, project = chains.google()
    if lack is not None:
        return [lack]
    named = _param(params, "vertex_project") or _param(params, "vertex_ai_project") or _env("VERTEXAI_PROJECT")
    if not (named or project or _given(getattr(import_litellm(), "vertex_project", None))):
        return [_Lack("a Google Cloud project: set VERTEXAI_PROJECT (the credentials found name none)")]
    return []


def _key_lacks(model: str, provider: str) -> list[_Lack]:
    """A provider whose key is one variable (of a few): LiteLLM's own check, except that a variable set to
    nothing, which LiteLLM counts as set, is not a key."""
    checked = import_litellm().validate_environment(model)
    missing = [name for name in checked.get("missing_keys") or [] if isinstance(name, str)]
    if not checked.get("keys_in_environment"):
        # Only an API-key variable is surely needed: a missing *_API_BASE is LiteLLM's default URL, not a secret.
        if missing and all(_is_key_variable(name) for name in missing):
            return [_Lack(f"{' or '.join(missing)}, which is not set", key=True)]
        return []
    names = _KEY_VARIABLES.get(provider, (f"{provider.upper()}_API_KEY",))
    empty = [name for name in names if name in os.environ]
    if empty and not any(_env(name) for name in names):
        if len(names) == 1:
            return [_Lack(f"{names[0]}, which is set to nothing", key=True)]
        state = f"{' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} set to nothing"
        return [_Lack(f"{' or '.join(names)}, and {state}", key=True)]
    return []


def _lacks_of(model: str, params: Mapping[str, Any], chains: _SdkChains) -> list[_Lack]:
    """What ``model`` (with a Router deployment's ``params``, if any) needs to sign its calls and lacks."""
    api_key = params.get("api_key")
    if isinstance(api_key, str) and api_key.startswith(_ENV_REFERENCE):
        variable = api_key[len(_ENV_REFERENCE):]
        if _env(variable):
            return []
        state = "set to nothing" if variable in os.environ else "not set"
        return [_Lack(f"{variable}, which is {state}", key=True)]
    if _given(api_key) or (api_key is not None and not isinstance(api_key, str)):
        return []
    provider, dynamic_key, _ = _provider(model)
    if provider == "azure":
        return _azure_lacks(params)
    if provider in ("bedrock", "sagemaker"):
        return _aws_lacks(params, chains)
    if provider.startswith("vertex_ai"):
        return _google_lacks(params, chains)
    base = _param(params, "api_base") or configured_api_base(provider)
    if _given(dynamic_key) or (base and not _is_public_api(provider, base)):
        return []  # a key LiteLLM supplies (hosted_vllm/), or an endpoint of one's own: it may need none
    return _key_lacks(model, provider)


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
    if not base or _is_public_api(provider, base):
        return None
    return wire_model, base, os.environ.get(f"{provider.upper()}_API_KEY") or None


def _from_environment(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_ENV_REFERENCE):
        return os.environ.get(value[len(_ENV_REFERENCE):]) or None
    return value


def written_deployments(router: Any, name: str) -> list[dict[str, Any]]:
    """The Router's deployments of ``name``, as the config file wrote them (``os.environ/`` references unread)."""
    return [d for d in _written_deployments.get(router) or router_deployments(router) if d.get("model_name") == name]


def direct_deployments(router: Any, name: str) -> list[tuple[str, str, str | None, int | None]] | None:
    """(wire model, base URL, key, ``max_parallel_requests``) for each Router deployment of ``name``, as the
    config file wrote them, when every one takes the OpenAI request unchanged (``hosted_vllm/`` or ``openai/``
    with an ``api_base`` that is not OpenAI's own API, and no other parameter for LiteLLM to apply); else None."""
    deployments = written_deployments(router, name)
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
        if not isinstance(base, str) or not base or _is_public_api(provider, base):
            return None
        key = key if isinstance(key, str) and key else os.environ.get(f"{provider.upper()}_API_KEY") or None
        targets.append((wire, base, key, parallel))
    return targets


def declares_n(router: Any, name: str) -> bool:
    """Whether every Router deployment of ``name`` says in its ``model_info`` that it takes ``n`` (several
    samples in one request): ``model_info: {supports_n: true}``."""
    deployments = written_deployments(router, name)
    return bool(deployments) and all(
        isinstance(d.get("model_info"), dict) and d["model_info"].get("supports_n") is True for d in deployments
    )


@lru_cache(maxsize=1)
def _bundled_price_text() -> str:
    """The text of LiteLLM's own price table as it ships (the file ``LITELLM_LOCAL_MODEL_COST_MAP`` makes it
    use), or "" (~2 ms: read, not parsed)."""
    import importlib.util

    spec = importlib.util.find_spec("litellm")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        try:
            return (Path(folder) / "model_prices_and_context_window_backup.json").read_text(encoding="utf-8")
        except (OSError, ValueError):
            continue
    return ""


@lru_cache(maxsize=1)
def _bundled_price_table() -> dict[str, Any]:
    """LiteLLM's own price table as it ships, read as JSON: ~30 ms, against seconds for importing LiteLLM."""
    import json

    try:
        table = json.loads(_bundled_price_text() or "{}")
    except ValueError:
        return {}
    return table if isinstance(table, dict) else {}


def _may_be_listed(*names: str) -> bool:
    """False when no key of the price table can be one of ``names``: none of them appears in its text as a
    JSON string (as a key would), so the table need not be parsed (a local model's name, usually)."""
    import json

    text = _bundled_price_text()
    forms = {form for name in names for quoted in (json.dumps(name), json.dumps(name, ensure_ascii=False))
             for form in (quoted, quoted.replace("/", "\\/"))}
    return any(form in text for form in forms)


def listed_prices(model: str) -> tuple[float, float] | None:
    """USD per input and output token that LiteLLM's table lists for ``openai/NAME`` (as LiteLLM prices
    it whatever the base URL: a gateway serving ``gpt-4o-mini`` is paid as that model), else None.
    ``hosted_vllm/`` models are one's own servers: never listed."""
    provider, _, wire = model.partition("/")
    if provider != "openai" or not wire or not _may_be_listed(model, wire):
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


def _lacks(name: str, router: Any, chains: _SdkChains) -> list[_Lack]:
    routed = router is not None and name in router_model_names(router)
    if not routed and direct_target(name) is not None:
        return []  # an endpoint of one's own: it may need no key (and LiteLLM need not be imported to say so)
    if not routed:
        return _lacks_of(name, {}, chains)
    lacks: list[_Lack] = []
    for deployment in _written_deployments.get(router) or router_deployments(router):
        if deployment.get("model_name") == name:
            params = deployment.get("litellm_params") or {}
            lacks += [lack for lack in _lacks_of(str(params.get("model") or name), params, chains) if lack not in lacks]
    return lacks


def missing_credentials(name: str, router: Any = None) -> list[str]:
    """What model ``name`` (a LiteLLM name, or a Router ``model_name``) needs to sign its calls and lacks,
    each as the rest of "NAME needs ...", or ``[]``. What a Router deployment gives (``api_key``, AWS keys,
    ``vertex_credentials``, ``os.environ/VAR`` when VAR is set) is not missing."""
    return [lack.text for lack in _lacks(name, router, _SdkChains())]


def check_credentials(names: list[str], router: Any = None) -> None:
    """Raise :class:`ConfigError` before any call when a model cannot sign its calls: its provider's key is
    not set anywhere (the environment or the working folder's ``.env``; a variable set to nothing counts as
    unset), or, for AWS and Google Cloud, their SDK is not installed or its credential chain finds nothing.
    LiteLLM would report each per call, as a failed item or an error retried as if the server were down.

    The SDK chains read files and, off a cloud machine, wait on its metadata server: call this from a
    worker thread in async code."""
    chains = _SdkChains()
    lacks = [(name, lack) for name in dict.fromkeys(names) for lack in _lacks(name, router, chains)]
    if not lacks:
        return
    message = f"Missing credentials: {'; '.join(f'{name} needs {lack.text}' for name, lack in lacks)}."
    if any(lack.setting for _, lack in lacks):
        env_file = str(Path.cwd() / ".env")
        message += f" Set what is missing in the environment or in {env_file!r} (the one .env file read)"
        if any(lack.key for _, lack in lacks):
            message += (
                ", or, for a server of your own that needs no key, point the provider's *_API_BASE "
                "(e.g. OPENAI_API_BASE) at it"
            )
        message += "."
    raise ConfigError(message)


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
