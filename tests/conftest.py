"""Shared fixtures. No test may reach a real provider: model requests are limited to 127.0.0.1."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from mics_agents.models import set_request_policy  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Only local servers may be called; MICS_* and provider variables of the machine are ignored;
    the working directory (and so the default cache file and .env lookup) is a fresh temp dir."""
    for name in list(os.environ):
        if name.startswith("MICS_") or name.endswith(("_API_KEY", "_API_BASE", "_BASE_URL")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    previous = set_request_policy("local-only")
    yield
    set_request_policy(previous)
