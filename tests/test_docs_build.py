"""The manual builds with ``mkdocs build --strict`` (a broken link or anchor, a page outside the nav, a failing
API reference: any warning fails), and its generated references cover the code: every setting, every command and
option, every training config field."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 300  # a hang guard, not a performance bound: the build takes about 5 s here

if os.environ.get("CI"):  # under CI the site must build: a missing MkDocs fails instead of skipping
    import mkdocs  # noqa: F401
else:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[dev]'")


def _reference_module():
    spec = importlib.util.spec_from_file_location("docs_reference_hook", ROOT / "docs" / "hooks" / "reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _reference_module()


def test_the_site_builds_strictly_without_a_warning(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MICS_")}
    env.update({"NO_MKDOCS_2_WARNING": "1", "NO_COLOR": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )
    log = result.stdout + result.stderr
    warnings = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0 and not warnings, "mkdocs build --strict failed:\n" + "\n".join(warnings or [log[-4000:]])
    for page in ("index.html", "reference/api/index.html", "reference/settings/index.html",
                 "reference/cli/index.html", "reference/training-config/index.html"):
        assert (site / page).is_file(), f"the site has no {page}"
    api = (site / "reference/api/index.html").read_text(encoding="utf-8")
    for name in ("mics_agents.search.search", "mics_agents.search.Searcher", "mics_agents.results.SearchResult",
                 "mics_agents.config.Settings", "mics_agents.models.base.Model", "mics_agents.models.cached.CachedModel",
                 "mics_agents.models.retrying.RetryingModel", "mics_agents.grading.grade_by_rules",
                 "training.config.CurriculumConfig"):
        assert f'id="{name}"' in api, f"the API reference does not document {name}"
    assert ":class:" not in api, "a Sphinx role is shown as text in the API reference"


def _section(page: str, heading: str) -> str:
    """The text under a heading, up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", page, re.MULTILINE | re.DOTALL)
    assert match, f"no section {heading!r}"
    return match.group(1)


def test_the_settings_reference_lists_every_setting() -> None:
    from mics_agents.config import Settings

    page = reference.render_settings()
    assert len(Settings.model_fields) > 40
    for name, field in Settings.model_fields.items():
        variable = f"MICS_{name.upper()}"
        row = next((line for line in page.splitlines() if line.startswith(f"| [`{variable}`]")), None)
        assert row is not None, f"{variable} is missing from the settings reference"
        assert field.description and " ".join(field.description.split()).replace("|", "\\|") in row, (
            f"{variable}: its description is missing")


def test_the_settings_reference_shows_types_defaults_and_bounds() -> None:
    rows = {row["variable"]: row for row in reference.settings_rows()}
    assert rows["MICS_MAX_DEPTH"]["default"] == "`3`"
    assert rows["MICS_MAX_DEPTH"]["constraints"] == ">= 1, <= 32"
    assert rows["MICS_MENTORS"]["type"] == "list[str]"
    assert rows["MICS_TRANSPORT"]["type"] == "one of auto, litellm, direct"
    assert rows["MICS_CACHE_PATH"]["type"] == "Path | None"


def test_the_cli_reference_lists_every_command_and_option() -> None:
    page = reference.render_cli()
    commands = reference.cli_commands()
    names = [" ".join(path) for path, _, _ in commands]
    assert {"mics run", "mics demo", "mics dataset build", "mics eval", "mics serve", "mics report"} <= set(names)
    for path, command, context in commands:
        section = _section(page, " ".join(path))
        if command.help:
            assert " ".join(command.help.split()[:6]) in " ".join(section.split()), f"{path}: help missing"
        for param in reference.cli_params(command, context):
            label = reference.param_label(param)
            assert f"| `{label}` |" in section, f"{' '.join(path)}: {label} is missing from the CLI reference"
            if getattr(param, "help", None):
                assert reference._cell(param.help.split("\n")[0])[:40] in section, f"{label}: its help is missing"


def test_the_cli_reference_covers_python_m_training() -> None:
    section = _section(reference.render_cli(), "python -m training")
    for action in reference.training_options():
        assert f"| `{', '.join(action.option_strings)}` |" in section, f"{action.option_strings} missing"


def test_the_training_config_reference_lists_every_field_with_its_help() -> None:
    from training.config import DPOSettings, config_fields
    from training.grpo import GRPOSettings

    page = reference.render_training_config()
    fields = [*config_fields(), *dataclasses.fields(DPOSettings), *dataclasses.fields(GRPOSettings)]
    for spec in fields:
        help_text = spec.metadata.get("help")
        assert help_text, f"training config field {spec.name} has no metadata['help']"
        assert f"| `{spec.name}`{{#" in page, f"{spec.name} is missing from the training config reference"
        assert reference._cell(help_text) in page, f"{spec.name}: its help is missing"


def test_the_generated_pages_do_not_depend_on_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pages = {name: reference.render(name) for name in reference.PAGES}
    monkeypatch.setenv("COLUMNS", "37")
    assert {name: reference.render(name) for name in reference.PAGES} == pages


def test_no_generated_page_is_checked_in() -> None:
    for name in reference.PAGES:
        assert not (ROOT / "docs" / name).exists(), f"docs/{name} is generated at build time: delete the file"
