"""Prompt templates from ``prompts/*.md``: loading, versioning and rendering.

In a wheel the templates sit inside the package (``mics_agents/prompts/``); in a source checkout they
are the top-level ``prompts/`` folder. ``MICS_PROMPT_DIR`` points at a folder of one's own.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import PromptError

__all__ = ["PromptTemplate", "load_prompt", "default_prompt_dir"]

_FIELD = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
_SECTION = re.compile(r"^<!--\s*(system|user)\s*-->\s*$", re.MULTILINE)


def default_prompt_dir() -> Path:
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "prompts", package_dir.parent / "prompts"):
        if (candidate / "mentor.md").is_file():
            return candidate
    raise PromptError(
        f"No prompt templates found next to {package_dir}; reinstall mics-agents or set MICS_PROMPT_DIR"
    )


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str
    user: str
    version: str

    @property
    def fields(self) -> set[str]:
        return set(_FIELD.findall(self.system)) | set(_FIELD.findall(self.user))

    def render(self, **values: str) -> tuple[str, str]:
        """Fill every ``{{field}}``; a missing or unexpected value is an error, not a silent blank."""
        missing = self.fields - values.keys()
        unexpected = values.keys() - self.fields
        if missing or unexpected:
            raise PromptError(
                f"prompt {self.name!r} needs fields {sorted(self.fields)}; "
                f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )

        def fill(text: str) -> str:
            return _FIELD.sub(lambda match: values[match.group(1)], text)

        return fill(self.system), fill(self.user)


@lru_cache(maxsize=32)
def load_prompt(name: str, prompt_dir: Path | None = None) -> PromptTemplate:
    """Load ``<prompt_dir>/<name>.md``; its sha256 (first 12 hex digits) is the prompt version."""
    directory = prompt_dir or default_prompt_dir()
    path = directory / f"{name}.md"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptError(f"prompt template {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    sections = {}
    matches = list(_SECTION.finditer(text))
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        sections[match.group(1)] = text[match.end() : end].strip()
    if "user" not in sections:
        raise PromptError(f"prompt template {str(path)!r} has no '<!-- user -->' part")
    version = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return PromptTemplate(name=name, system=sections.get("system", ""), user=sections["user"], version=version)
