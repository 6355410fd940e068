"""``MICS_TRANSPORT=auto`` (issue 20): the direct client for the models whose endpoint takes the OpenAI request
unchanged, LiteLLM for the rest; both transports give the same requests, records, cache keys and recorded
cost; and ``mics run`` with only such models never imports LiteLLM."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from mics_agents.config import load_settings
from mics_agents.models.direct import DirectTransport
from mics_agents.models.factory import _transport
from mics_agents.models.litellm_model import LiteLLMTransport

from .openai_server import OpenAIServer, simulated_brain_with_roles
from .test_litellm_http import SECRET, comparable, fault_free_run, make_settings, png, run_search, server  # noqa: F401
from .test_run_process import MICS, failed_path, mics_env, read_jsonl, run_args, write_dataset
from .test_startup import stand_in_litellm

PRICES = {
    "openai/mentor-a": {"input": 2e-6, "output": 8e-6},
    "openai/mentor-b": {"input": 3e-6, "output": 9e-6},
    "openai/intern-1": {"input": 1e-7, "output": 4e-7},
    "openai/intern-2": {"input": 1e-7, "output": 4e-7},
    "openai/judge": {"input": 5e-7, "output": 1e-6},
}


def test_auto_is_the_default():
    assert load_settings().transport == "auto"


@pytest.mark.parametrize(
    "name, variables, expected",
    [
        ("hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct", {"HOSTED_VLLM_API_BASE": "http://127.0.0.1:8000/v1"}, "direct"),
        ("openai/my-model", {"OPENAI_API_BASE": "http://127.0.0.1:8000/v1"}, "direct"),
        ("openai/my-model", {"OPENAI_BASE_URL": "https://gateway.example/v1"}, "direct"),
        # OpenAI's own API maps parameters for its reasoning models (drop_params): LiteLLM's job.
        ("openai/o3", {"OPENAI_API_BASE": "https://api.openai.com/v1"}, "litellm"),
        ("openai/gpt-4o", {}, "litellm"),
        ("hosted_vllm/model", {}, "litellm"),  # no base URL: LiteLLM says what is missing
        ("gemini/gemini-2.5-pro", {}, "litellm"),
        ("dashscope/qwen-vl-max", {"OPENAI_API_BASE": "http://127.0.0.1:8000/v1"}, "litellm"),
    ],
)
def test_auto_sends_directly_exactly_the_models_whose_endpoint_takes_the_request_unchanged(
    monkeypatch, name, variables, expected
):
    for variable in ("HOSTED_VLLM_API_BASE", "OPENAI_API_BASE", "OPENAI_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    chosen = _transport(name, load_settings(transport="auto"), None)
    assert isinstance(chosen, DirectTransport if expected == "direct" else LiteLLMTransport)
    # MICS_TRANSPORT=litellm sends everything through LiteLLM.
    assert isinstance(_transport(name, load_settings(transport="litellm"), None), LiteLLMTransport)


def test_prices_are_checked_and_read_from_json(monkeypatch):
    with pytest.raises(Exception, match="USD per token"):
        load_settings(prices={"hosted_vllm/m": {"input": 1e-7}})
    monkeypatch.setenv("MICS_PRICES", json.dumps({"hosted_vllm/m": {"input": 1e-7, "output": 2e-7}}))
    assert load_settings().prices_for("hosted_vllm/m") == (1e-7, 2e-7)
    assert load_settings().prices_for("hosted_vllm/other") is None


def cache_rows(path: Path) -> set[tuple]:
    with sqlite3.connect(path) as db:
        return set(db.execute("SELECT key, model, text, input_tokens, output_tokens, cost_usd FROM calls"))


def sent(records: list) -> Counter:
    """What each request asked, as the server read it (the Authorization header too)."""
    return Counter(
        (
            record.model,
            json.dumps(record.body.get("messages"), sort_keys=True),
            record.body.get("temperature"),
            record.body.get("max_tokens") or record.body.get("max_completion_tokens"),
            record.headers.get("Authorization"),
        )
        for record in records
    )


async def test_one_input_through_each_transport_gives_the_same_requests_records_cache_keys_and_cost(
    server, png, tmp_path  # noqa: F811
):
    via_litellm = await run_search(make_settings(tmp_path / "litellm.sqlite", transport="litellm", prices=PRICES))
    litellm_requests = server.recorded()
    via_auto = await run_search(make_settings(tmp_path / "auto.sqlite", prices=PRICES))
    auto_requests = server.recorded()[len(litellm_requests):]

    assert via_auto.status == via_litellm.status == "success"
    assert comparable(via_auto) == comparable(via_litellm)
    assert sent(auto_requests) == sent(litellm_requests)
    assert all(record.headers.get("Authorization") == f"Bearer {SECRET}" for record in auto_requests)
    # Same keys, texts, usage and cost in the cache: a run may switch transports and replay every call.
    litellm_rows, auto_rows = cache_rows(tmp_path / "litellm.sqlite"), cache_rows(tmp_path / "auto.sqlite")
    assert auto_rows == litellm_rows and len(auto_rows) == len(litellm_requests)
    assert via_litellm.usage.cost_usd > 0
    assert via_auto.usage.cost_usd == pytest.approx(via_litellm.usage.cost_usd)
    for _, model, _, input_tokens, output_tokens, cost in auto_rows:  # MICS_PRICES, not LiteLLM's table
        assert cost == pytest.approx(input_tokens * PRICES[model]["input"] + output_tokens * PRICES[model]["output"])


async def test_a_local_model_without_a_price_costs_nothing_on_either_transport(server, png, tmp_path):  # noqa: F811
    via_litellm = await run_search(make_settings(tmp_path / "a.sqlite", transport="litellm"))
    via_auto = await run_search(make_settings(tmp_path / "b.sqlite"))
    assert via_litellm.usage.cost_usd == via_auto.usage.cost_usd == 0
    assert via_auto.usage.input_tokens == via_litellm.usage.input_tokens > 0


def test_mics_run_with_only_local_models_never_imports_litellm(tmp_path):
    """The stand-in ``litellm`` on PYTHONPATH fails on import; the run must not need it, and its first
    request comes quickly (measured and printed: start-up is ~0.5 s here without LiteLLM, ~4 s with it)."""
    data = write_dataset(tmp_path)
    with OpenAIServer(lifetime=120) as server:
        env = mics_env(server, MICS_PRICES=json.dumps({"openai/judge": {"input": 1e-6, "output": 1e-6}}))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stand_in_litellm(tmp_path)), env.get("PYTHONPATH")]))
        started = time.monotonic()
        result = subprocess.run(
            [*MICS, *run_args(data, tmp_path / "out.jsonl", tmp_path / "cache.sqlite")],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
        )
        first = min(record.received_at for record in server.recorded())
        assert server.errors == []
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "litellm-imported").exists(), "LiteLLM was imported"
    print(f"first request {first - started:.2f} s after the process started")
    ended = read_jsonl(tmp_path / "out.jsonl") + read_jsonl(failed_path(tmp_path / "out.jsonl"))
    assert sorted(record["rid"] for record in ended) == sorted(data.keys)
    assert not any(record.get("error_kind") in ("model_error", "internal_error") for record in ended)


async def test_a_model_litellm_lists_costs_the_same_on_the_direct_client(monkeypatch):
    """openai/gpt-4o-mini on a gateway of one's own: LiteLLM prices it from its table whatever the base URL;
    the direct client reads the same table (as JSON), so --budget-usd stops alike."""
    from mics_agents.models.base import ChatMessage, ModelRequest, TextPart
    from mics_agents.models.factory import open_model

    request = ModelRequest(
        messages=(ChatMessage("user", (TextPart("## Question\nWhat is it?\n\n## Reasoning so far\n(none)"),)),),
        temperature=0.3,
    )
    costs = {}
    with OpenAIServer(simulated_brain_with_roles({"gpt-4o-mini": "intern"})) as gateway:
        monkeypatch.setenv("OPENAI_API_BASE", gateway.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        for transport in ("litellm", "auto"):
            model = open_model("openai/gpt-4o-mini", make_settings(None, transport=transport))
            try:
                costs[transport] = (await model.request(request)).cost_usd
            finally:
                await model.aclose()
        assert gateway.errors == []
    assert costs["auto"] == pytest.approx(costs["litellm"]) and costs["auto"] > 0
