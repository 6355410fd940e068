"""MkDocs hook: the reference pages that are generated from the code at build time, never written by hand.

- ``reference/settings.md``: every field of :class:`mics_agents.config.Settings` (pydantic-settings), as the
  environment variable it is read from, its type, default, constraints and description.
- ``reference/cli.md``: every ``mics`` command and subcommand (the typer app, through click), with its usage,
  arguments and options, their help and defaults; and ``python -m training``'s options.
- ``reference/training-config.md``: every field of the curriculum config (``training/config.py``'s dataclasses)
  with its ``metadata["help"]``, plus the keys a dpo or grpo stage entry may set.

The pages exist only in the built site (``on_files`` adds them as generated files). The render functions are
plain functions of the code, so tests/test_docs_build.py checks that each page covers every setting, command,
option and field without building the site.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # mkdocs may run from anywhere; the packages live at the repository root
    sys.path.insert(0, str(ROOT))

GENERATED_NOTE = "<!-- Generated from the code by docs/hooks/reference.py at build time: do not edit. -->"

PAGES = {
    "reference/settings.md": "render_settings",
    "reference/cli.md": "render_cli",
    "reference/training-config.md": "render_training_config",
}


# -- shared helpers ------------------------------------------------------------------------------------------


def _cell(text: object) -> str:
    """Text safe inside one Markdown table cell."""
    value = " ".join(str(text).split())
    return value.replace("|", "\\|")


def _code(text: object) -> str:
    value = str(text)
    if "`" in value:
        return f"`` {value} ``"
    return f"`{value}`"


def _type_name(annotation: Any) -> str:
    """A readable type: ``int``, ``list[str]``, ``float | None``, ``one of: auto, litellm``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(arg) for arg in args if arg is not type(None)]
        return " | ".join(names) + (" | None" if type(None) in args else "")
    if origin is not None:
        inner = ", ".join(_type_name(arg) for arg in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


# -- settings ------------------------------------------------------------------------------------------------


def _env_value(value: Any) -> str:
    """A default written as the environment variable would hold it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return _code(str(value).lower())
    if isinstance(value, (list, tuple)):
        return _code(",".join(str(item) for item in value)) if value else "empty"
    if isinstance(value, dict):
        return _code(json.dumps(value)) if value else "empty"
    if isinstance(value, str) and not value:
        return "empty"
    if isinstance(value, enum.Enum):
        value = value.value
    return _code(value)


def _constraints(field: Any) -> str:
    import annotated_types

    bounds = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"),
              (annotated_types.Le, "le", "<="), (annotated_types.Lt, "lt", "<"))
    parts = []
    for item in field.metadata:
        for kind, attribute, symbol in bounds:
            if isinstance(item, kind):
                parts.append(f"{symbol} {getattr(item, attribute)}")
        if isinstance(item, annotated_types.MinLen):
            parts.append(f"at least {item.min_length} long")
        if isinstance(item, annotated_types.MaxLen):
            parts.append(f"at most {item.max_length} long")
    return ", ".join(parts)


def settings_rows() -> list[dict[str, str]]:
    """One row per setting: variable, field, type, default, constraints, description."""
    from pydantic_core import PydanticUndefined

    from mics_agents.config import ENV_PREFIX, Settings

    rows = []
    for name, field in Settings.model_fields.items():
        if field.default is not PydanticUndefined:
            default = field.default
        elif field.default_factory is not None:
            default = field.default_factory()  # type: ignore[call-arg]
        else:
            default = None
        alias = field.validation_alias if isinstance(field.validation_alias, str) else None
        rows.append({
            "variable": alias.upper() if alias else f"{ENV_PREFIX}{name.upper()}",
            "field": name,
            "type": _type_name(field.annotation),
            "default": "required" if field.is_required() else _env_value(default),
            "constraints": _constraints(field),
            "description": field.description or "",
        })
    return rows


def render_settings() -> str:
    rows = settings_rows()
    lines = [
        GENERATED_NOTE,
        "# Settings",
        "",
        f"All {len(rows)} settings of a search, a batch run and the other `mics` commands, generated from "
        "`mics_agents.config.Settings` (pydantic-settings). Each is read from its environment variable, or from a "
        "`.env` file in the working directory; `mics config` prints the values in effect. A list is written "
        "comma-separated (`MICS_MENTORS=openai/gpt-4o,gemini/gemini-2.5-pro`), a mapping as JSON "
        "(`MICS_MODEL_CONCURRENCY_OVERRIDES='{\"openai/gpt-4o\": 8}'`), a switch as `true` or `false`. "
        "A value out of range stops the command before any model is called.",
        "",
        "Provider keys and base URLs are not settings of ours: they stay in LiteLLM's own variables "
        "(`OPENAI_API_KEY`, `OPENAI_API_BASE`, `HOSTED_VLLM_API_BASE`, ...); see "
        "[Providers, keys and the Router](../guides/providers.md). In Python, pass the same names in lower case "
        "to `Settings(...)` or as keyword arguments.",
        "",
        "| Variable | Type | Default | Allowed | Description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        anchor = row["variable"].lower()
        lines.append(
            f"| [`{row['variable']}`](#{anchor}){{#{anchor}}} | {_cell(row['type'])} | {_cell(row['default'])} | "
            f"{_cell(row['constraints'])} | {_cell(row['description'])} |"
        )
    return "\n".join(lines) + "\n"


# -- the command line ----------------------------------------------------------------------------------------


def _is_group(command: Any) -> bool:
    return hasattr(command, "list_commands") and hasattr(command, "get_command")


def _context(command: Any, name: str, parent: Any = None) -> Any:
    """A click context for the command (typer ships its own copy of click: take the class the command uses)."""
    from importlib import import_module

    module = import_module(type(command).__mro__[1].__module__)
    context_class = getattr(module, "Context", None) or import_module("click").Context
    return context_class(command, info_name=name, parent=parent)


def _walk(command: Any, path: list[str], parent: Any = None) -> list[tuple[list[str], Any, Any]]:
    """(name path, command, context) for the command and every subcommand, depth first, in the order the
    app lists them; hidden commands are left out."""
    context = _context(command, path[-1], parent)
    found = [(path, command, context)]
    if _is_group(command):
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            found += _walk(sub, [*path, name], context)
    return found


def cli_commands() -> list[tuple[list[str], Any, Any]]:
    """Every ``mics`` command: (["mics", "dataset", "build"], command, context), the root first."""
    import typer.main

    from mics_agents.cli import app

    return _walk(typer.main.get_command(app), ["mics"])


def cli_params(command: Any, context: Any) -> list[Any]:
    """A command's arguments and options as ``--help`` lists them (hidden ones and --help left out)."""
    return [param for param in command.get_params(context)
            if not getattr(param, "hidden", False) and param.name != "help"]


def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def _annotation(param: Any) -> Any:
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        return descriptor.annotation
    kind = getattr(param, "type", None)  # plain click
    choices = getattr(kind, "choices", None)
    if choices:
        return typing.Literal[tuple(choices)]  # type: ignore[misc]
    return {"integer": int, "float": float, "path": Path, "boolean": bool}.get(getattr(kind, "name", ""), str)


def _param_type(param: Any) -> str:
    if getattr(param, "is_flag", False):
        return "switch"
    annotation = _annotation(param)
    repeatable = getattr(param, "multiple", False) or getattr(param, "nargs", 1) == -1
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, typing.List, typing.Tuple):  # noqa: UP006
        annotation = typing.get_args(annotation)[0] if typing.get_args(annotation) else str
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        text = "one of " + ", ".join(str(member.value) for member in annotation)
    else:
        text = {int: "integer", float: "number", str: "text", Path: "path", bool: "true/false"}.get(
            annotation, _type_name(annotation))
    bounds = []
    if getattr(param, "min", None) is not None:
        bounds.append(f">= {param.min}")
    if getattr(param, "max", None) is not None:
        bounds.append(f"<= {param.max}")
    if bounds:
        text += " (" + ", ".join(bounds) + ")"
    if repeatable:
        text += ", repeatable"
    return text


def _param_default(param: Any) -> str:
    if getattr(param, "required", False):
        return "required"
    default = param.default
    if callable(default) or default is None or default == () or default == []:
        return ""
    if getattr(param, "is_flag", False):
        if param.secondary_opts:
            return param.opts[0] if default else param.secondary_opts[0]
        return "on" if default else "off"
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, (list, tuple)):
        default = " ".join(str(item) for item in default)
    return _code(default)


def param_label(param: Any) -> str:
    """``DATA`` for an argument, ``--output, -o`` (and ``/ --no-x``) for an option."""
    if not _is_option(param):
        return (param.metavar or param.name or "").upper()
    label = ", ".join(param.opts)
    if param.secondary_opts:
        label += " / " + ", ".join(param.secondary_opts)
    return label


def _clean_help(text: str | None) -> str:
    """Click's help text as Markdown (``\\b`` paragraph markers dropped)."""
    if not text:
        return ""
    return text.replace("\b\n", "").replace("\b", "").strip()


def render_cli() -> str:
    commands = cli_commands()
    lines = [
        GENERATED_NOTE,
        "# Command line",
        "",
        "Every `mics` command, generated from the typer app in `mics_agents/cli.py`; `mics COMMAND --help` prints "
        "the same. Settings not given as options come from the `MICS_*` environment variables "
        "([Settings](settings.md)). The training entry point, `python -m training`, is "
        "[at the end](#python-m-training).",
        "",
    ]
    for path, command, context in commands:
        depth = len(path)
        title = " ".join(path)
        lines += [f"{'#' * min(depth + 1, 4)} {title}", ""]
        help_text = _clean_help(command.help)
        if help_text:
            lines += [help_text, ""]
        params = cli_params(command, context)
        arguments = [param_label(param) for param in params if not _is_option(param)]
        usage = [title, "[OPTIONS]" if any(_is_option(param) for param in params) else "",
                 *(arguments), "COMMAND [ARGS]..." if _is_group(command) else ""]
        lines += ["```text", " ".join(piece for piece in usage if piece), "```", ""]
        if _is_group(command):
            subcommands = [(sub_path, sub) for sub_path, sub, _ in commands
                           if len(sub_path) == depth + 1 and sub_path[:depth] == path]
            if subcommands:
                lines += ["| Command | What it does |", "| --- | --- |"]
                for sub_path, sub in subcommands:
                    summary = sub.get_short_help_str(limit=300)
                    lines.append(f"| [`{' '.join(sub_path)}`](#{'-'.join(sub_path)}) | {_cell(summary)} |")
                lines.append("")
        if params:
            lines += ["| Argument or option | Type | Default | Description |", "| --- | --- | --- | --- |"]
            for param in params:
                help_text = _clean_help(getattr(param, "help", "") or "")
                lines.append(f"| {_code(param_label(param))} | {_cell(_param_type(param))} | "
                             f"{_cell(_param_default(param))} | {_cell(help_text)} |")
            lines.append("")
    lines += _render_training_cli()
    return "\n".join(lines) + "\n"


def training_options() -> list[Any]:
    """``python -m training``'s argparse actions, --help left out."""
    import argparse

    from training.cli import build_parser

    parser = build_parser()
    return [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]


def _render_training_cli() -> list[str]:
    from training.cli import build_parser

    parser = build_parser()
    lines = [
        "## python -m training",
        "",
        _clean_help(parser.description),
        "",
        "```text",
        "python -m training --config curriculum.yaml [--FIELD VALUE ...]",
        "```",
        "",
        "Every field of the [training config](training-config.md) is also an option (`--learning-rate 2e-5`) that "
        "overrides the YAML file; a switch takes `--NAME` or `--no-NAME`.",
        "",
        "| Option | Value | Description |",
        "| --- | --- | --- |",
    ]
    for action in training_options():
        names = ", ".join(action.option_strings)
        value = "switch" if action.nargs == 0 else (action.metavar or "")
        help_text = (action.help or "").replace("%%", "%")
        lines.append(f"| {_code(names)} | {_cell(value)} | {_cell(help_text)} |")
    if parser.epilog:
        lines += ["", "```text", parser.epilog.strip("\n"), "```"]
    lines.append("")
    return lines


# -- the training config -------------------------------------------------------------------------------------


def _dataclass_default(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return spec.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _yaml_value(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return _code(str(value).lower())
    if isinstance(value, (list, dict)):
        return _code(json.dumps(value)) if value else "empty"
    if isinstance(value, str) and not value:
        return "empty"
    return _code(value)


def training_tables() -> dict[str, list[dict[str, str]]]:
    """The training config's fields, by section: the run's own, the stage hyperparameters (top level, and any
    stage entry), and the extra keys of dpo and grpo stage entries."""
    from training.config import DPOSettings, StageSettings, config_fields
    from training.grpo import GRPO_STAGE_DEFAULTS, GRPOSettings

    stage_names = {spec.name for spec in dataclasses.fields(StageSettings)}

    def row(spec: dataclasses.Field, default: Any = None) -> dict[str, str]:
        return {
            "field": spec.name,
            "type": str(spec.type),
            "default": _yaml_value(_dataclass_default(spec) if default is None else default),
            "option": f"--{spec.name.replace('_', '-')}",
            "help": spec.metadata.get("help", ""),
        }

    fields = config_fields()
    return {
        "run": [row(spec) for spec in fields if spec.name not in stage_names],
        "stage": [row(spec) for spec in fields if spec.name in stage_names],
        "dpo": [row(spec) for spec in dataclasses.fields(DPOSettings) if spec.name not in stage_names],
        "grpo": [row(spec) for spec in dataclasses.fields(GRPOSettings) if spec.name not in stage_names],
        "grpo_defaults": [
            {"field": name, "type": "", "default": _yaml_value(value), "option": "", "help": ""}
            for name, value in GRPO_STAGE_DEFAULTS.items()
        ],
    }


def render_training_config() -> str:
    tables = training_tables()

    def table(rows: list[dict[str, str]], option: bool, prefix: str = "") -> list[str]:
        head = ["| Field | Type | Default |" + (" Option |" if option else "") + " Description |",
                "| --- | --- | --- |" + (" --- |" if option else "") + " --- |"]
        body = [
            f"| {_code(row['field'])}{{#{prefix}{row['field'].replace('_', '-')}}} | {_cell(row['type'])} | "
            f"{_cell(row['default'])} |" + (f" {_code(row['option'])} |" if option else "") + f" {_cell(row['help'])} |"
            for row in rows
        ]
        return head + body + [""]

    grpo_defaults = ", ".join(f"`{row['field']}` {row['default']}" for row in tables["grpo_defaults"])
    lines = [
        GENERATED_NOTE,
        "# Training config",
        "",
        "The fields of the curriculum config (`training/config.py`), generated from each field's "
        "`metadata[\"help\"]`. Write them in a YAML file for `python -m training --config FILE.yaml`, override any "
        "on the command line (the option column; see [the command line](cli.md#python-m-training)), or pass "
        "them to `training.load_config(path, **overrides)`. Unknown keys are errors.",
        "",
        "## The run",
        "",
        *table(tables["run"], option=True),
        "## Stage hyperparameters",
        "",
        "Set at the top level, they apply to every stage; a stage entry in `stages` may override any of them for "
        "that stage alone.",
        "",
        *table(tables["stage"], option=True),
        "## dpo stage keys",
        "",
        "A stage entry with `kind: dpo` may also set these; its defaults come from the run's `dpo_*` fields.",
        "",
        *table(tables["dpo"], option=False, prefix="dpo-stage-"),
        "## grpo stage keys",
        "",
        "A stage entry with `kind: grpo` may also set these. A grpo stage starts from different defaults for "
        f"some shared hyperparameters: {grpo_defaults}.",
        "",
        *table(tables["grpo"], option=False, prefix="grpo-stage-"),
    ]
    return "\n".join(lines) + "\n"


# -- the MkDocs hook ------------------------------------------------------------------------------------------


def render(page: str) -> str:
    return globals()[PAGES[page]]()


_SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|data|attr|mod|exc|obj|const):<code>~?([^<]*)</code>")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """The docstrings are Sphinx-flavoured (``:class:`Searcher```): show a role's target as code, not the role."""
    return _SPHINX_ROLE.sub(lambda match: f"<code>{match.group(1)}</code>", html)


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for page in PAGES:
        existing = files.get_file_from_path(page)
        if existing is not None:  # a hand-written file of the same name would hide the generated one
            files.remove(existing)
        files.append(File.generated(config, page, content=render(page)))
    return files
