"""Settings, read in one place: ``MICS_*`` environment variables and a ``.env`` file.

Provider credentials and base URLs are *not* settings of ours: they stay in LiteLLM's own variables
(``OPENAI_API_KEY``, ``OPENAI_API_BASE``, ``GEMINI_API_KEY``, ``HOSTED_VLLM_API_BASE`` ...), so nothing
here ever holds a secret and nothing secret reaches the cache.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import annotated_types
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from .errors import ConfigError, MicsError

__all__ = ["Settings", "Strategy", "load_settings", "load_yaml_model", "check_router_config"]

ENV_PREFIX = "MICS_"

Strategy = Literal["mics", "vanilla"]


def _split_names(value: Any) -> Any:
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


def _split_floats(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]  # pydantic parses each, finite only
    return value


_ROUTER_ENTRY_FIELDS = ("model_name", "litellm_params")


def check_router_config(path: Path, variable: str = "MICS_ROUTER_CONFIG") -> dict[str, Any]:
    """Read and check a LiteLLM Router config before LiteLLM is imported: UTF-8 YAML, a non-empty
    ``model_list`` of ``{model_name, litellm_params: {model, ...}}`` entries, ``router_settings`` a mapping.
    Its key values (``api_key``, ...) are registered with the secret scrubber. Raises :class:`ConfigError`."""
    import yaml

    from .redact import add_secrets, is_secret_name

    where = f"{variable}: {str(path)!r}"
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror or exc}") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a Router config") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_list"), list) or not config["model_list"]:
        raise ConfigError(f"{where} needs a non-empty 'model_list' (a list of model_name + litellm_params entries)")
    for number, entry in enumerate(config["model_list"], start=1):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: model_list entry {number} is not a mapping")
        missing = [field for field in _ROUTER_ENTRY_FIELDS if field not in entry]
        if missing:
            raise ConfigError(f"{where}: model_list entry {number} lacks {', '.join(missing)}; each entry needs "
                              "model_name (the name MICS_* settings use) and litellm_params (with model)")
        if not isinstance(entry["model_name"], str) or not entry["model_name"].strip():
            raise ConfigError(f"{where}: model_list entry {number}: model_name must be a non-empty string")
        params = entry["litellm_params"]
        if not isinstance(params, dict) or not isinstance(params.get("model"), str) or not params["model"].strip():
            raise ConfigError(f"{where}: model_list entry {number} ({entry['model_name']}): litellm_params must be "
                              "a mapping with model (a LiteLLM name, e.g. hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct)")
    router_settings = config.get("router_settings")
    if router_settings is not None and not isinstance(router_settings, dict):
        raise ConfigError(f"{where}: router_settings must be a mapping of litellm.Router arguments")
    # The keys it holds are secrets from now on, wherever a message might repeat them.
    stack: list[Any] = [config]
    secrets = []
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and is_secret_name(key) and isinstance(item, str):
                    secrets.append(item)
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
    add_secrets(secrets)
    return config


def _takes_numbers(annotation: Any) -> bool:
    """Whether a setting's type holds an int or a float anywhere (``int | None``, ``list[float]``, ...)."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) is Literal:
        return False
    return any(_takes_numbers(argument) for argument in get_args(annotation))


class Settings(BaseSettings):
    """Every knob of a search. Each field is also the environment variable ``MICS_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        allow_inf_nan=False,  # "nan" would pass every range check and fail every call
    )

    mentors: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Mentor models (at least two), comma-separated LiteLLM names, e.g. "
        "'openai/gpt-4o,gemini/gemini-2.5-pro'.",
    )
    interns: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Intern models (at least one), comma-separated LiteLLM names, e.g. "
        "'hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct'.",
    )
    judge: str = Field(default="", description="Judge model, a LiteLLM name, e.g. 'openai/gpt-4o-mini'.")
    generator: str = Field(
        default="", description="Model of 'mics generate' (question writing); the first mentor when empty."
    )
    generator_temperature: float = Field(default=0.7, ge=0, le=2, description="Generator sampling temperature.")
    generator_max_tokens: int = Field(default=2048, ge=16, description="Reply budget of a generator call.")
    eval_temperature: float = Field(default=0.0, ge=0, le=2, description="Temperature of the model under 'mics eval'.")
    eval_max_tokens: int = Field(default=2048, ge=16, description="Reply budget of the model under 'mics eval'.")
    vqa_per_case: int = Field(default=3, ge=1, le=12, description="VQA pairs 'mics generate vqa' asks for per case.")

    max_depth: int = Field(default=3, ge=1, le=32, description="Search iterations (tree depth).")
    initial_steps: int = Field(default=2, ge=1, le=8, description="Steps the first candidate takes.")
    intern_temperatures: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [1.2, 0.3],
        description="Temperatures every intern samples at, comma-separated.",
    )
    samples_per_temperature: int = Field(default=1, ge=1, le=64, description="Intern samples per temperature.")
    mentor_temperature: float = Field(
        default=1.2, ge=0, le=2, description="Mentor sampling temperature (published: 1.2, as interns' first)."
    )
    judge_temperature: float = Field(default=0.0, ge=0, le=2, description="Judge sampling temperature.")
    mentor_max_tokens: int | None = Field(
        default=None,
        ge=16,
        description="Reply budget of a mentor call; empty for none, as published (a thinking mentor cut off "
        "mid-solution would score 0).",
    )
    intern_max_tokens: int = Field(default=1024, ge=16, description="Reply budget of an intern call.")
    judge_max_tokens: int | None = Field(
        default=16,
        ge=1,
        description="Reply budget of a judge call: only its leading Yes or No is read, so 16 tokens hold every "
        "verdict and no paid-for explanation; empty for none, as published (a reasoning judge needs room to think).",
    )
    judge_attempts: int = Field(
        default=3, ge=1, le=10, description="Judge calls to try before an unparsable verdict is an error."
    )
    seed: int = Field(default=0, description="Run seed; with the item id it fixes every random choice.")

    strategy: Strategy = Field(
        default="mics",
        description="'mics': the mentor-intern search; 'vanilla': one mentor writes the whole solution with no "
        "intern guidance, scored once by the same interns and judge (the paper's baseline arm).",
    )
    vanilla_mentor: str = Field(default="", description="The mentor of the vanilla strategy; the first of MICS_MENTORS when empty.")
    path_opening: str = Field(
        default="",
        description="A sentence every reasoning path starts with: shown to mentors and interns as the first line "
        "of the reasoning so far, and kept at the start of the saved reasoning (which training learns to write). "
        "Empty for none (the published code starts each path with a fixed 'think step by step' sentence).",
    )
    mentor_images_first: bool = Field(
        default=True,
        description="Mentors get the images before the prompt text, as interns do (the shared part of an item's "
        "calls first, for providers' prompt caches); false puts them after the text, as the published API "
        "mentors had them.",
    )
    intern_answer_line: Literal["loose", "exact"] = Field(
        default="loose",
        description="How an intern's final-answer line is recognised: 'loose' also takes bold, other case, fewer "
        "or no '#' and missing spaces ('**The final answer is:** B'); 'exact' takes only '### The final answer "
        "is:' as written, as the published code did (any other reply counts wrong).",
    )
    intern_mode: Literal["answer", "continue"] = Field(
        default="answer",
        description="'answer': interns give only the final answer after the prefix (published), so the score "
        "measures how far the mentor's steps carry them; 'continue': they write the missing steps first.",
    )
    mentor_image_max_side: int = Field(
        default=512,
        ge=64,
        description="Longest image side sent to mentors (published: API mentors get 512 px); interns, "
        "generation and evaluation use MICS_IMAGE_MAX_SIDE.",
    )
    image_max_side: int = Field(
        default=1536, ge=64, description="Images with a longer side are downscaled to this many pixels."
    )
    intern_image_max_pixels: int = Field(
        default=1280 * 28 * 28,
        ge=0,
        description="Interns get images of at most this many pixels (aspect kept), from the image at "
        "MICS_IMAGE_MAX_SIDE: the published Qwen interns' processor budget (1280 x 28 x 28); 0 for no bound.",
    )
    intern_image_min_pixels: int = Field(
        default=0,
        ge=0,
        description="Interns get smaller images enlarged to at least this many pixels (aspect kept); 0 (the "
        "default) for no bound: the published Qwen processor's minimum (256 x 28 x 28) is applied by the served "
        "processor itself, and enlarging here would only make every request bigger (API interns pay for it).",
    )
    image_max_pixels: int = Field(
        default=40_000_000, ge=1,
        description="Images with more pixels than this are refused (40 M: the largest mammograms, 4,800 x "
        "6,000, with 40% to spare).",
    )

    cache_path: Path | None = Field(
        default=Path("mics_cache.sqlite"),
        description="SQLite file of the call cache and run state; empty to disable caching.",
    )
    prompt_dir: Path | None = Field(
        default=None, description="A folder of one's own mentor.md, intern.md and judge.md templates."
    )
    router_config: Path | None = Field(
        default=None, description="A LiteLLM Router config (YAML with a model_list) to route model names."
    )
    transport: Literal["auto", "litellm", "direct"] = Field(
        default="auto",
        description="'auto': hosted_vllm/ models and openai/ ones on a base URL other than OpenAI's own API go "
        "through mics-agents' own HTTP client (the request unchanged, no LiteLLM import, ~6x less client CPU per "
        "call), every other model through LiteLLM; 'litellm': every model through LiteLLM; 'direct': as 'auto'.",
    )
    media_dir: Path | None = Field(
        default=None,
        description="A folder that the hosted_vllm/ servers reached directly read images from (vLLM's "
        "--allowed-local-media-path): their requests name each image's file there (file:// URLs, each prepared "
        "image written once) instead of carrying it. A Router deployment's model_info.media_dir says it per "
        "deployment (mics serve writes it). Empty: images go as data URLs.",
    )
    prices: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description='USD per token per model as JSON, e.g. {"openai/my-model": {"input": 2.5e-6, "output": 1e-5}}: '
        "the cost recorded (and counted by --budget-usd) on either transport; a model not named costs what LiteLLM's "
        "price table lists for it, on both, and 0 when unlisted (hosted_vllm/, local servers).",
    )
    request_timeout: float = Field(
        default=180.0, gt=0,
        description="Seconds one attempt of a model call may take in all (connect, send, the whole reply), "
        "whatever the transport; the deadline of interns, the judge and every other role without its own.",
    )
    mentor_timeout: float = Field(
        default=600.0, gt=0,
        description="The same deadline for mentor calls: longer, as thinking models take minutes to write a solution.",
    )
    intern_timeout: float | None = Field(
        default=None, gt=0, description="The deadline of intern calls; empty: MICS_REQUEST_TIMEOUT."
    )
    judge_timeout: float | None = Field(
        default=None, gt=0, description="The deadline of judge calls; empty: MICS_REQUEST_TIMEOUT."
    )
    max_retry_after: float = Field(
        default=120.0, ge=0,
        description="Longest Retry-After honoured, in seconds; a server asking for more is treated as down "
        "and the call fails at once (model_error, retried on the next run).",
    )
    cache_namespace: str = Field(
        default="",
        description="Keeps the calls of a changed model served under the same name apart in the cache: a "
        'word for every model, or JSON per model name, e.g. {"hosted_vllm/chiron": "retrained-2"}.',
    )
    max_retries: int = Field(default=6, ge=0, le=50, description="Retries of a failing model call.")
    retry_initial_wait: float = Field(default=1.0, ge=0, description="First backoff wait in seconds.")
    retry_max_wait: float = Field(default=60.0, ge=0, description="Longest backoff wait in seconds.")
    model_concurrency: int = Field(default=32, ge=1, description="Calls in flight per model.")
    adaptive_concurrency: bool = Field(
        default=True,
        description="On a 429 a model's calls in flight halve, then grow back by one per round of successful "
        "calls up to its limit (AIMD), so a rate-limited provider is not flooded with retries.",
    )
    max_calls_in_flight: int = Field(
        default=0, ge=0, description="Model calls in flight over all models together; 0 for no limit."
    )
    model_concurrency_overrides: dict[str, int] = Field(
        default_factory=dict,
        description='Per-model limits as JSON, e.g. {"openai/gpt-4o": 8}.',
    )
    # -- provider batch APIs (mics run --batch) --
    batch_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["mentors", "interns", "judge"],
        description="With 'mics run --batch': the models whose calls go through their provider's batch API, as "
        "role words (mentors, interns, judge) and/or model names, comma-separated. A role takes only openai/ "
        "models on OpenAI's own API and anthropic/ models; a name given here is batched on any base URL. "
        "Every other model (hosted_vllm/ interns) stays online.",
    )
    batch_items_in_flight: int = Field(
        default=1000, ge=1, le=100_000,
        description="Items searched at once under --batch (each holds its images in memory: about 0.5 MB).",
    )
    batch_max_requests: int = Field(
        default=50_000, ge=1, le=100_000,
        description="Requests per batch at most (OpenAI takes 50,000, Anthropic 100,000); a larger queue "
        "goes as several batches.",
    )
    batch_max_age: float = Field(
        default=300.0, gt=0,
        description="Seconds the oldest queued call waits before its queue is submitted, even while some "
        "searches still have online work to do.",
    )
    batch_poll_interval: float = Field(
        default=30.0, gt=0, description="Seconds between polls of a batch in progress."
    )
    batch_deadline: float = Field(
        default=26 * 3600.0, gt=0,
        description="Seconds after its submission that a batch still in progress is cancelled; its unanswered "
        "requests then count as expired.",
    )
    batch_retries: int = Field(
        default=1, ge=0, le=10,
        description="Times an errored or expired request is put in a later batch before batch_fallback applies.",
    )
    batch_fallback: Literal["online", "fail"] = Field(
        default="online",
        description="A request that errored or expired batch_retries+1 times: online asks it as an ordinary "
        "call; fail ends its item as model_error.",
    )
    # -- clusters (mics run --ray) --
    ray_cpus_per_shard: float = Field(
        default=1.0, gt=0, le=1024,
        description="With 'mics run --ray': CPUs each shard's task asks of Ray; --shards defaults to the "
        "cluster's CPUs divided by this.",
    )
    ray_max_retries: int = Field(
        default=3, ge=0, le=100,
        description="With 'mics run --ray': times Ray runs a shard's task again when its worker or node died; "
        "each attempt resumes from the shard's journal.",
    )
    cluster_backup_every: float = Field(
        default=60.0, gt=0,
        description="With 'mics run --ray': seconds between copies of a shard's node-local call cache to the "
        "shared storage beside its journal (also copied when the shard ends); a lost node repeats at most the "
        "calls its items in flight made since the last copy.",
    )
    cluster_lock_wait: float = Field(
        default=300.0, ge=0,
        description="With 'mics run --ray': seconds a shard's task waits while its output's lock is held before "
        "it starts the shard; on a network filesystem a dead node's lock lasts until its lease expires (NFSv4: "
        "90 s by default). Past this the shard stops with exit 2 and is reported.",
    )
    batch_anthropic_max_tokens: int = Field(
        default=8192, ge=16,
        description="max_tokens of a batched Anthropic request whose role sets none (Anthropic requires one; "
        "MICS_MENTOR_MAX_TOKENS is empty by default).",
    )
    batch_price_factor: float = Field(
        default=0.5, gt=0, le=1,
        description="A batched call's price as a share of the online price, where LiteLLM's table lists no "
        "batch price for the model (OpenAI and Anthropic batches: half).",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic takes True as 1: a switch given where a count or a number belongs is a mistake, not a 1.
        if not _takes_numbers(Settings.model_fields[info.field_name].annotation):
            return value
        given = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(item, bool) for item in given):
            raise ValueError(f"{_shown(value).lower()} is not a number; give {_allowed(info.field_name)}")
        return value

    @field_validator("mentors", "interns", "batch_models", mode="before")
    @classmethod
    def _parse_names(cls, value: Any) -> Any:
        return _split_names(value)

    @field_validator("intern_temperatures", mode="before")
    @classmethod
    def _parse_temperatures(cls, value: Any) -> Any:
        return _split_floats(value)

    @field_validator("model_concurrency_overrides", mode="before")
    @classmethod
    def _no_bool_limit(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name, limit in value.items():
                if isinstance(limit, bool):
                    raise ValueError(f"the limit of {name!r} is {str(limit).lower()}, not a number; "
                                     "each must be a whole number >= 1")
        return value

    @field_validator("prices", mode="before")
    @classmethod
    def _no_bool_price(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name, price in value.items():
                if isinstance(price, dict) and any(isinstance(usd, bool) for usd in price.values()):
                    raise ValueError(f"the price of {name!r} holds true or false, not a number; give "
                                     '{"input": USD per token, "output": USD per token}, both >= 0')
        return value

    @field_validator("model_concurrency_overrides")
    @classmethod
    def _check_overrides(cls, value: dict[str, int]) -> dict[str, int]:
        for name, limit in value.items():
            if not name.strip():
                raise ValueError("a model name is empty")
            if limit < 1:
                raise ValueError(f"the limit of {name!r} is {limit}; each must be a whole number >= 1")
        return value

    @field_validator("prices")
    @classmethod
    def _check_prices(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for name, price in value.items():
            if not name.strip():
                raise ValueError("a model name is empty")
            if set(price) != {"input", "output"} or not all(0 <= usd < float("inf") for usd in price.values()):
                raise ValueError(
                    f"the price of {name!r} must be {{\"input\": USD per token, \"output\": USD per token}}, both >= 0"
                )
        return value

    def prices_for(self, model_name: str) -> tuple[float, float] | None:
        """USD per input and output token from ``MICS_PRICES``, or None when the table does not name it."""
        price = self.prices.get(model_name)
        return None if price is None else (price["input"], price["output"])

    @field_validator("prompt_dir")
    @classmethod
    def _check_prompt_dir(cls, value: Path | None) -> Path | None:
        from .errors import PromptError
        from .prompts import check_prompt_dir

        if value is None:
            return value
        if not value.is_dir():
            raise ValueError(f"{str(value)!r} is not a folder; point it at a folder of templates (mentor.md, "
                             "intern.md, judge.md, ...) or leave it unset for the shipped ones")
        try:
            check_prompt_dir(value)
        except PromptError as exc:
            raise ValueError(str(exc).removeprefix("MICS_PROMPT_DIR: ")) from None
        return value

    @field_validator("router_config")
    @classmethod
    def _check_router_config(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                check_router_config(value, variable="")
            except ConfigError as exc:
                raise ValueError(str(exc).removeprefix(": ")) from None
        return value

    @field_validator("cache_path")
    @classmethod
    def _check_cache_path(cls, value: Path | None) -> Path | None:
        if value is not None and value.is_dir():
            raise ValueError(f"{str(value)!r} is a folder; give a file path, e.g. {str(value / 'mics_cache.sqlite')!r}")
        return value

    @field_validator("media_dir")
    @classmethod
    def _check_media_dir(cls, value: Path | None) -> Path | None:
        if value is not None and value.exists() and not value.is_dir():
            raise ValueError(f"{str(value)!r} is a file; give the folder the model servers read images from")
        return value

    @field_validator("cache_path", "router_config", "prompt_dir", "media_dir", "mentor_max_tokens", "judge_max_tokens",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in {"", "none", "off"}:
            return None
        return value

    @field_validator("intern_image_min_pixels")
    @classmethod
    def _check_intern_budget(cls, value: int, info: ValidationInfo) -> int:
        largest = info.data.get("intern_image_max_pixels")
        if value and largest and value > largest:
            raise ValueError(f"{value:,} is above MICS_INTERN_IMAGE_MAX_PIXELS ({largest:,}); the minimum of the "
                             "interns' image budget must not exceed its maximum (0 turns either bound off)")
        return value

    @field_validator("path_opening")
    @classmethod
    def _check_path_opening(cls, value: str) -> str:
        from .answers import parse_solution

        value = value.strip()
        solution = parse_solution(value)
        if solution.steps or solution.final_answer is not None or "final answer is" in value.lower():
            # It heads the saved reasoning: a step or answer line in it would be read as part of the path.
            raise ValueError("the opening holds a '### Step k:' or 'The final answer is:' line; give one plain "
                             "sentence (or nothing), e.g. \"Let's work through this step by step.\"")
        return value

    @field_validator("intern_temperatures")
    @classmethod
    def _check_temperatures(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("give at least one temperature, e.g. 1.2,0.3")
        outside = [t for t in value if t < 0 or t > 2]
        if outside:
            raise ValueError(f"{outside[0]:g} is outside 0 to 2; give comma-separated finite numbers from 0 to 2")
        return value

    @property
    def search_mentors(self) -> list[str]:
        """The mentors a search asks: all of MICS_MENTORS, or the one mentor of the vanilla strategy."""
        if self.strategy == "vanilla":
            name = self.vanilla_mentor or (self.mentors[0] if self.mentors else "")
            return [name] if name else []
        return list(self.mentors)

    def check_roles(self) -> "Settings":
        """Fail with a message naming the variable when the model roles cannot run a search."""
        if self.strategy == "vanilla" and not self.search_mentors:
            raise ConfigError(
                f"the vanilla strategy needs one mentor: set {ENV_PREFIX}VANILLA_MENTOR (or --vanilla-mentor) or "
                f"{ENV_PREFIX}MENTORS, e.g. MICS_VANILLA_MENTOR=openai/gpt-4o"
            )
        if self.strategy == "mics" and len(self.mentors) < 2:
            raise ConfigError(
                f"{ENV_PREFIX}MENTORS needs at least two mentor models (got {len(self.mentors)}). "
                "Set it to comma-separated LiteLLM names, e.g. "
                "MICS_MENTORS=openai/gpt-4o,gemini/gemini-2.5-pro"
            )
        if not self.interns:
            raise ConfigError(
                f"{ENV_PREFIX}INTERNS needs at least one intern model, e.g. "
                "MICS_INTERNS=hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct"
            )
        if not self.judge:
            raise ConfigError(f"{ENV_PREFIX}JUDGE is not set; give a LiteLLM name, e.g. MICS_JUDGE=openai/gpt-4o-mini")
        if len(set(self.mentors)) != len(self.mentors):
            raise ConfigError(f"{ENV_PREFIX}MENTORS lists a model twice: {','.join(self.mentors)}")
        return self

    @field_validator("cache_namespace")
    @classmethod
    def _check_cache_namespace(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("{"):
            import json

            try:
                mapping = json.loads(value)
            except ValueError:
                raise ValueError("not valid JSON; give one word, or a JSON object of model name -> word") from None
            if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
                raise ValueError("a JSON value must map model names to words, e.g. {\"hosted_vllm/chiron\": \"v2\"}")
        return value

    @field_validator("intern_timeout", "judge_timeout", mode="before")
    @classmethod
    def _empty_timeout_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    def cache_namespace_for(self, model_name: str) -> str:
        """The cache namespace of this model's calls ("" for none: the keys of earlier versions)."""
        if not self.cache_namespace.startswith("{"):
            return self.cache_namespace
        import json

        return str(json.loads(self.cache_namespace).get(model_name, "")).strip()

    def timeout_for(self, role: str) -> float:
        """Seconds one attempt of a call by this role (mentor, intern, judge, or anything else) may take."""
        own = {"mentor": self.mentor_timeout, "intern": self.intern_timeout, "judge": self.judge_timeout}.get(role)
        return own if own is not None else self.request_timeout

    def concurrency_for(self, model_name: str) -> int:
        """Calls in flight allowed to ``model_name``: its entry in ``MICS_MODEL_CONCURRENCY_OVERRIDES``,
        else ``MICS_MODEL_CONCURRENCY``."""
        return self.model_concurrency_overrides.get(model_name, self.model_concurrency)


_loaded_env_files: set[Path] = set()


def load_env_file() -> Path | None:
    """Load the working folder's ``.env`` into the environment, once per file, never overriding a variable
    already set. It is the one ``.env`` read: our ``MICS_*`` settings and the provider variables LiteLLM
    reads (``OPENAI_API_KEY``, ``HOSTED_VLLM_API_BASE`` ...) both come from it, and LiteLLM's own search for
    a ``.env`` above its install folder is switched off before it is imported. Returns the file, if any."""
    import os

    path = Path.cwd() / ".env"
    if not path.is_file():
        return None
    resolved = path.resolve()
    if resolved not in _loaded_env_files:
        from dotenv import dotenv_values

        for name, value in dotenv_values(resolved, encoding="utf-8").items():
            if value is not None and name not in os.environ:
                os.environ[name] = value
        _loaded_env_files.add(resolved)
    return resolved


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (and the working folder's ``.env``), with keyword overrides on top.

    A bad value raises :class:`ConfigError` naming the ``MICS_*`` variable at fault.
    """
    try:
        load_env_file()
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            message = error["msg"].removeprefix("Value error, ")
            if field in Settings.model_fields and error["type"] != "value_error":
                allowed = _allowed(field)
                message += f" (got {_shown(error.get('input'))}{'; allowed: ' + allowed if allowed else ''})"
            problems.append(f"{ENV_PREFIX}{field.upper()}: {message}" if field else message)
        raise ConfigError("Invalid settings: " + "; ".join(problems)) from None
    except SettingsError as exc:  # a JSON-valued variable that is not JSON
        match = re.search(r'field "(\w+)"', str(exc))
        field = match.group(1) if match else ""
        raise ConfigError(
            f"Invalid settings: {ENV_PREFIX}{field.upper()}: not valid JSON"
            + (f" (allowed: {_allowed(field)})" if field else "")
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Invalid settings: the .env file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (MicsError, OSError) as exc:
        raise ConfigError(f"Invalid settings: {exc}") from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _allowed(field: str) -> str:
    """The range a setting takes, in words, from its declared bounds."""
    info = Settings.model_fields[field]
    bounds = {}
    for item in info.metadata:
        for name in ("ge", "gt", "le", "lt"):
            if isinstance(item, getattr(annotated_types, name.capitalize())):
                bounds[name] = getattr(item, name)
    annotation = str(info.annotation)
    if field == "model_concurrency_overrides":
        return 'a JSON object of model name -> whole number >= 1, e.g. {"openai/gpt-4o": 8}'
    kind = "whole number" if "int" in annotation else "finite number" if "float" in annotation else ""
    if not kind:
        return ""
    parts = []
    for name, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if name in bounds:
            parts.append(f"{word} {bounds[name]:g}" if isinstance(bounds[name], float) else f"{word} {bounds[name]}")
    text = f"a {kind}" + (" " + " and ".join(parts) if parts else "")
    if annotation.startswith("list"):
        text = "comma-separated, each " + text + (" from 0 to 2" if field == "intern_temperatures" else "")
    return text


ModelT = TypeVar("ModelT", bound=BaseModel)


def load_yaml_model(path: Path, model: type[ModelT], option: str, what: str) -> ModelT:
    """A YAML file validated into a pydantic model; errors name the option and say what is wrong."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        return model.model_validate(data)
    except OSError as exc:
        raise ConfigError(f"{option} {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{option} {str(path)!r} is not a valid {what}: {exc}") from exc
