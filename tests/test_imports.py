"""Every module imports on its own, first, in a fresh process: a cycle hidden by the order in which the package
happens to load its modules (``from mics_agents import store`` before the model boundary) fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mics_agents"

SCRIPT = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [key for key in sys.modules if key == "mics_agents" or key.startswith("mics_agents.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_first_on_its_own():
    names = module_names()
    assert "mics_agents.store" in names and "mics_agents.models.cached" in names
    result = subprocess.run([sys.executable, "-c", SCRIPT, *names], capture_output=True, text=True, timeout=300,
                            env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
