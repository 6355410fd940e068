"""Secrets out of every message that reaches a file or the terminal.

A provider's error body may echo the API key it was sent (``Incorrect API key provided: sk-...``, as some
proxies do), and LiteLLM puts that body in its exception text. Whatever we write to a failed file, print or
log goes through :func:`scrub` first, which masks:

- the value (8 characters or longer) of every configured provider key variable: LiteLLM's credential
  variables (``OPENAI_API_KEY``, ``GEMINI_API_KEY``, ``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN`` ...), recognised by
  name, from the environment and from a ``.env`` file in the working directory;
- every key value of the Router YAML (``api_key`` and the like, or the variable an ``os.environ/NAME``
  reference names), registered when the config is checked (:func:`add_secrets`);
- anything shaped like a bearer token or a well-known API key (``Bearer ...``, ``sk-...``, ``AIza...``).

Shorter values are left alone: masking a 4-character "key" would mangle ordinary words.

Model replies are different: their text is graded and trained on, so a shape (``bearer ...``) must not
rewrite it. :func:`mask_secret_values` masks the configured values only; every reply goes through it before
anyone keeps it (``models/sanitizing.py``), and a cached reply again when it is read (the cache may predate
this, or a key may have been added since).
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "scrub", "scrub_data", "mask_secret_values", "add_secrets", "secret_values", "is_secret_name", "ScrubbingWriter", "MASK",
    "MIN_SECRET_CHARS",
]

MASK = "[secret]"
MIN_SECRET_CHARS = 8

# Credential variables by name: LiteLLM reads OPENAI_API_KEY, AZURE_AD_TOKEN, AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN, HF_TOKEN, VERTEXAI_CREDENTIALS, DATABRICKS_TOKEN, ... ; every one ends like this.
_SECRET_NAME = re.compile(
    r"(?:^|_)(?:API_?KEY|KEY|TOKEN|SECRET|SECRET_KEY|SECRET_ACCESS_KEY|ACCESS_KEY|ACCESS_KEY_ID|PASSWORD|PASS|"
    r"CREDENTIALS?|AUTH)$"
    r"|(?:^|_)BEARER_TOKEN(?:_|$)",  # AWS_BEARER_TOKEN_BEDROCK: the key sits before the provider's name
    re.IGNORECASE,
)
# Shapes of credentials whatever their source: an Authorization header's value, OpenAI/Anthropic/DeepSeek style
# keys, Google API keys, Hugging Face and Groq tokens.
_SHAPES = re.compile(
    r"(?i:\bbearer\s+)[A-Za-z0-9\-._~+/]{8,}=*"
    r"|\bsk-[A-Za-z0-9_\-]{12,}"
    r"|\bAIza[0-9A-Za-z_\-]{30,}"
    r"|\bhf_[A-Za-z0-9]{20,}"
    r"|\bgsk_[A-Za-z0-9]{20,}"
)
_ENV_REFERENCE = "os.environ/"

_registered: set[str] = set()
_registered_generation = 0  # counts add_secrets calls: the sorted secrets are made again after one
_lock = threading.Lock()
_NO_VALUES: dict[str, str | None] = {}  # no .env: always this one dict, so the sorted secrets stay remembered


@functools.lru_cache(maxsize=4096)  # asked for every variable on every reply: the names hardly change
def is_secret_name(name: str) -> bool:
    """True for a variable or config key that holds a credential (``OPENAI_API_KEY``, ``api_key``)."""
    return bool(_SECRET_NAME.search(name.strip()))


def _usable(value: Any) -> str | None:
    if isinstance(value, str) and len(value.strip()) >= MIN_SECRET_CHARS:
        return value.strip()
    return None


def add_secrets(values: Iterable[Any]) -> None:
    """Mask these values from now on (e.g. the keys of a Router YAML). ``os.environ/NAME`` stands for the
    value of that variable."""
    found = set()
    for value in values:
        if isinstance(value, str) and value.startswith(_ENV_REFERENCE):
            value = os.environ.get(value[len(_ENV_REFERENCE):])
        usable = _usable(value)
        if usable:
            found.add(usable)
    global _registered_generation
    with _lock:
        _registered.update(found)
        _registered_generation += 1


_dotenv_cache: tuple[tuple[str, int, int, int] | None, dict[str, str | None]] = (None, {})


def _dotenv_values() -> dict[str, str | None]:
    """The variables of ``.env`` in the working directory (read again only when the file changes)."""
    global _dotenv_cache
    if not os.access(".env", os.F_OK):  # asked on every reply: no exception raised when there is none
        return _NO_VALUES
    try:
        found = os.stat(".env")  # plain os calls, no path resolution
        stamp = (os.getcwd(), found.st_ino, found.st_size, found.st_mtime_ns)
    except OSError:
        return _NO_VALUES
    if _dotenv_cache[0] == stamp:
        return _dotenv_cache[1]
    try:
        from dotenv import dotenv_values

        values = dict(dotenv_values(Path(".env")))
    except Exception:  # an unreadable .env is reported by the settings, not here
        values = {}
    _dotenv_cache = (stamp, values)
    return values


def _credential_values(source: Any) -> set[str]:
    values = set()
    for name in source:  # names first: reading every value of os.environ costs more than the rest
        usable = _usable(source.get(name)) if is_secret_name(name) else None
        if usable:
            values.add(usable)
    return values


# The environment's credential values, and the environment they were read from (CPython's raw bytes mapping,
# compared in C): every reply asks, and walking os.environ in Python each time cost ~40 us a call.
_environment_cache: tuple[dict[Any, Any] | None, frozenset[str]] = (None, frozenset())


def _environment_secrets() -> frozenset[str]:
    global _environment_cache
    raw = getattr(os.environ, "_data", None)
    if raw is not None and _environment_cache[0] == raw:
        return _environment_cache[1]
    values = frozenset(_credential_values(os.environ))
    _environment_cache = (dict(raw) if raw is not None else None, values)
    return values


def secret_values() -> set[str]:
    """Every value masked now: the environment's and .env's credential variables, and what was registered."""
    values = set(_environment_secrets()) | _credential_values(_dotenv_values())
    with _lock:
        values |= _registered
    return values


def scrub(text: str) -> str:
    """``text`` with every secret masked."""
    if not isinstance(text, str) or not text:
        return text
    return _SHAPES.sub(_mask_shape, _mask_values(text, _sorted_secrets()))


# The sorted secrets, and what they were made from (the environment's values, .env's, the registered ones'
# generation): every reply asks, and making them again each time cost more than the masking.
_sorted_cache: tuple[Any, Any, Any, list[str]] = (None, None, None, [])


def _sorted_secrets() -> list[str]:
    global _sorted_cache
    environment, dotenv = _environment_secrets(), _dotenv_values()
    registered = (_registered, _registered_generation, len(_registered))
    cached_environment, cached_dotenv, cached_registered, cached = _sorted_cache
    if (cached_environment is environment and cached_dotenv is dotenv and cached_registered is not None
            and cached_registered[0] is registered[0] and cached_registered[1:] == registered[1:]):
        return cached
    # Longest first, so a key that contains another is masked whole.
    values = sorted(secret_values(), key=len, reverse=True)
    _sorted_cache = (environment, dotenv, registered, values)
    return values


@functools.lru_cache(maxsize=1024)
def _escaped(secret: str) -> str:
    """``secret`` as it appears inside a JSON string (in an error body)."""
    return json.dumps(secret)[1:-1]


def _mask_values(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
        escaped = _escaped(secret)
        if escaped != secret and escaped in text:
            text = text.replace(escaped, MASK)
    return text


def mask_secret_values(text: str) -> str:
    """``text`` with every configured secret value masked and nothing else changed: no shape is matched,
    so medical text that merely looks like a token is kept as it is."""
    if not isinstance(text, str) or len(text) < MIN_SECRET_CHARS:  # too short to hold any secret ("stop")
        return text
    return _mask_values(text, _sorted_secrets())


def _mask_shape(match: re.Match[str]) -> str:
    found = match.group(0)
    return found[:6] + " " + MASK if found[:6].lower() == "bearer" else MASK


def scrub_data(value: Any, *, shapes: bool = True) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with every string scrubbed (``shapes=False``: of
    the configured values only, as :func:`mask_secret_values`); walked without recursion, so no nesting
    depth can break it."""
    secrets = _sorted_secrets()

    def clean(text: str) -> str:
        text = _mask_values(text, secrets)
        return _SHAPES.sub(_mask_shape, text) if shapes else text

    if isinstance(value, str):
        return clean(value)
    if not isinstance(value, (dict, list)):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any]] = [(value, root)]
    while stack:
        source, target = stack.pop()
        pairs = source.items() if isinstance(source, dict) else enumerate(source)
        for key, item in pairs:
            if isinstance(item, (dict, list)):
                copy: Any = {} if isinstance(item, dict) else []
                stack.append((item, copy))
            else:
                copy = clean(item) if isinstance(item, str) else item
            if isinstance(target, dict):
                target[clean(key) if isinstance(key, str) else key] = copy
            else:
                target.append(copy)
    return root


class ScrubbingWriter:
    """A text stream that scrubs what is written to it, then hands it to ``stream()`` (looked up on every
    write, so a test's captured stderr is honoured). The consoles of the CLI write through it."""

    def __init__(self, stream: Callable[[], TextIO]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream().write(scrub(text))
        return len(text)

    def flush(self) -> None:
        self._stream().flush()

    def isatty(self) -> bool:
        return self._stream().isatty()

    def fileno(self) -> int:
        return self._stream().fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._stream(), "encoding", "utf-8")
