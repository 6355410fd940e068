"""Prompt templates from ``prompts/*.md``: loading, versioning and rendering.

In a wheel the templates sit inside the package (``mics_agents/prompts/``); in a source checkout they
are the top-level ``prompts/`` folder. ``MICS_PROMPT_DIR`` points at a folder of one's own: a template it
holds replaces the shipped one of the same name, one it lacks is the shipped one, and one that cannot be
rendered the way the code renders the shipped one (other ``{{fields}}``, no user part, not UTF-8) is an
error at start-up (:func:`check_prompt_dir`), not in the middle of a run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import PromptError

__all__ = ["PromptTemplate", "load_prompt", "default_prompt_dir", "check_prompt_dir", "template_names"]

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


def template_names() -> list[str]:
    """The templates mics-agents ships (and so renders): mentor, intern, judge, eval, generate_qa, ..."""
    return sorted(path.stem for path in default_prompt_dir().glob("*.md") if path.stem != "README")


def _template_path(name: str, prompt_dir: Path | None) -> Path:
    """Where ``name`` comes from: ``prompt_dir`` if it holds it, else the shipped templates."""
    if prompt_dir is not None:
        if not Path(prompt_dir).is_dir():
            raise PromptError(
                f"MICS_PROMPT_DIR {str(prompt_dir)!r} is not a folder: point it at a folder of templates "
                "(mentor.md, intern.md, judge.md, ...) or unset it to use the shipped ones"
            )
        own = Path(prompt_dir) / f"{name}.md"
        if own.exists():
            return own
    return default_prompt_dir() / f"{name}.md"


def check_prompt_dir(prompt_dir: Path | None) -> list[str]:
    """Check every template of ``prompt_dir`` that replaces a shipped one renders with exactly the fields
    the shipped one takes (the fields the code passes). Returns the names it replaces; raises
    :class:`PromptError` naming the file and what is wrong."""
    if prompt_dir is None:
        return []
    replaced = []
    for name in template_names():
        path = _template_path(name, prompt_dir)
        if path.parent == default_prompt_dir():
            continue
        own = load_prompt(name, prompt_dir)
        shipped = load_prompt(name, None)
        if own.fields != shipped.fields:
            unknown, missing = sorted(own.fields - shipped.fields), sorted(shipped.fields - own.fields)
            problems = [f"unknown field(s) {', '.join('{{' + f + '}}' for f in unknown)}" if unknown else "",
                        f"missing field(s) {', '.join('{{' + f + '}}' for f in missing)}" if missing else ""]
            raise PromptError(
                f"MICS_PROMPT_DIR: template {str(path)!r} does not render: "
                f"{' and '.join(p for p in problems if p)}; a {name} template takes exactly "
                f"{', '.join('{{' + f + '}}' for f in sorted(shipped.fields))}"
            )
        own.render(**{field: "x" for field in own.fields})
        replaced.append(name)
    return replaced


@lru_cache(maxsize=32)
def load_prompt(name: str, prompt_dir: Path | None = None) -> PromptTemplate:
    """Load ``<name>.md`` from ``prompt_dir`` if it holds one, else the shipped one; its sha256 (first 12
    hex digits) is the prompt version."""
    path = _template_path(name, prompt_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"prompt template {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
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
