"""Against a real, already running vLLM server: `mics run` and `mics eval` through LiteLLM's ``hosted_vllm/``
provider and the Router config `mics serve` writes, and a LoRA adapter queried by name.

Skipped unless a server is configured (``bash tests/vllm/run_e2e.sh`` starts one and sets these):

    MICS_TEST_VLLM_BASE     the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1        (required)
    MICS_TEST_VLLM_MODEL    the served model name (vLLM's --served-model-name)                   (required)
    MICS_TEST_VLLM_LORA     a served LoRA module name (--lora-modules NAME=DIR)                   (optional)
    MICS_TEST_VLLM_ROUTER   the Router config `mics serve` wrote; interns go through it           (optional)
    MICS_TEST_VLLM_INTERN   the intern's Router name [default: the Router's first plain name]
    MICS_TEST_VLLM_TRAINED  1: the LoRA is run_e2e's adapter trained on tests/vllm/tiny_fixtures, so its
                            replies have known formats and stronger checks apply
    MICS_TEST_VLLM_REPORT   a JSON file the tests add their wall times and counts to

Any model works for the plain checks (every item ends with exactly one output line, no model errors, the
server answered every call, eval results are counted consistently): a random model's replies are
gibberish, so its items end as ``no_path`` and its eval answers as parse failures.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.vllm.tiny_fixtures import BENCHMARK, CASES, INTERN_MAX_TOKENS, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
# Read now: the suite's autouse fixture removes every MICS_* variable before each test.
BASE = os.environ.get("MICS_TEST_VLLM_BASE", "").rstrip("/")
MODEL = os.environ.get("MICS_TEST_VLLM_MODEL", "")
LORA = os.environ.get("MICS_TEST_VLLM_LORA", "")
ROUTER = os.environ.get("MICS_TEST_VLLM_ROUTER", "")
INTERN = os.environ.get("MICS_TEST_VLLM_INTERN", "")
TRAINED = os.environ.get("MICS_TEST_VLLM_TRAINED", "") == "1"
REPORT = os.environ.get("MICS_TEST_VLLM_REPORT", "")

if not (BASE and MODEL):
    pytest.skip(
        "no vLLM server configured: set MICS_TEST_VLLM_BASE and MICS_TEST_VLLM_MODEL, or run "
        "`bash tests/vllm/run_e2e.sh`, which installs vLLM (CPU) in its own venv, serves a tiny model and runs these",
        allow_module_level=True,
    )
needs_lora = pytest.mark.skipif(not LORA, reason="no LoRA module configured: set MICS_TEST_VLLM_LORA")
needs_router = pytest.mark.skipif(not ROUTER, reason="no Router config configured: set MICS_TEST_VLLM_ROUTER")

# Small reply budgets: they fit a 512-token context and keep a CPU server quick.
BUDGETS = {"MICS_MENTOR_MAX_TOKENS": "96", "MICS_INTERN_MAX_TOKENS": str(INTERN_MAX_TOKENS), "MICS_EVAL_MAX_TOKENS": "96",
           "MICS_JUDGE_MAX_TOKENS": "8"}
COMMAND_TIMEOUT = 900


def report(key: str, value: Any) -> None:
    if not REPORT:
        return
    path = Path(REPORT)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2) + "\n")


def intern_name() -> str:
    if INTERN:
        return INTERN
    import yaml

    names = [entry["model_name"] for entry in yaml.safe_load(Path(ROUTER).read_text())["model_list"]]
    return next(name for name in names if ":" not in name)


def server_url(path: str) -> str:
    return BASE.removesuffix("/v1") + path


def get_json(path: str) -> Any:
    with urllib.request.urlopen(server_url(path), timeout=30) as response:
        return json.loads(response.read())


def finished_requests() -> float:
    """Requests the server finished, from its Prometheus metrics (all models and adapters)."""
    with urllib.request.urlopen(server_url("/metrics"), timeout=30) as response:
        text = response.read().decode()
    return sum(float(match) for match in re.findall(r"^vllm:request_success_total(?:\{[^}]*\})? (\S+)$", text, re.M))


def chat(model: str, messages: list[dict[str, Any]], *, temperature: float = 0.0, max_tokens: int = 96) -> str:
    body = json.dumps({"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens})
    request = urllib.request.Request(BASE + "/chat/completions", body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def mics_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MICS_")}
    env.update(BUDGETS)
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        HOSTED_VLLM_API_BASE=BASE,
        HOSTED_VLLM_API_KEY="EMPTY",
        MICS_CACHE_PATH=str(tmp_path / "cache.sqlite"),
        MICS_MAX_RETRIES="2",
        MICS_RETRY_MAX_WAIT="2",
        MICS_REQUEST_TIMEOUT="120",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def mics(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mics_agents", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=COMMAND_TIMEOUT)
    return result, time.monotonic() - started


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_server_lists_the_model_and_the_lora():
    served = {entry["id"] for entry in get_json("/v1/models")["data"]}
    assert MODEL in served, served
    if LORA:
        assert LORA in served, served


def roles(tuned: bool) -> dict[str, str]:
    """Mentors, interns and judge, all on the one served model: interns through the Router when there is
    one; ``tuned``: mentors and judge on the LoRA adapter (by its hosted_vllm/ name and its Router name)."""
    plain = f"hosted_vllm/{MODEL}"
    lead = f"hosted_vllm/{LORA}" if tuned else plain
    if ROUTER:
        intern = intern_name()
        second = f"{intern}:{LORA}" if tuned else intern
        return {"MICS_MENTORS": f"{lead},{second}", "MICS_INTERNS": intern, "MICS_JUDGE": lead,
                "MICS_ROUTER_CONFIG": str(Path(ROUTER).resolve())}
    # Without a Router the second mentor is the same server through LiteLLM's openai/ provider.
    return {"MICS_MENTORS": f"{lead},openai/{LORA if tuned else MODEL}", "MICS_INTERNS": plain, "MICS_JUDGE": lead,
            "OPENAI_API_BASE": BASE, "OPENAI_API_KEY": "EMPTY"}


@pytest.mark.parametrize("mentors", ["base", pytest.param("lora", marks=needs_lora)])
def test_mics_run_text_cases_end_each_item_once_without_model_errors(tmp_path, mentors):
    data = write_jsonl(tmp_path / "cases.jsonl", [{**case, "images": []} for case in CASES])
    env = mics_env(tmp_path, MICS_MAX_DEPTH="2", MICS_INTERN_TEMPERATURES="1.2,0.3", **roles(mentors == "lora"))
    before = finished_requests()
    result, seconds = mics(["run", str(data), "--output", str(tmp_path / "mics.jsonl"), "--concurrency", "4",
                            "--json-summary", str(tmp_path / "summary.json"), "--log-every", "5"], env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    successes, failures = read_lines(tmp_path / "mics.jsonl"), read_lines(tmp_path / "mics_failed.jsonl")
    ended = [record["rid"] for record in successes + failures]
    assert sorted(ended) == sorted(case["id"] for case in CASES), "every item ends with exactly one line"
    kinds = [failure["error"]["kind"] for failure in failures]
    assert "model_error" not in kinds, [failure["error"] for failure in failures]
    assert summary["model_error"] == 0 and summary["calls"] > 0
    # Identical calls (two mentors writing the same step make identical intern calls) are sent once.
    sent = summary["calls"] - summary["cached_calls"]
    answered = finished_requests() - before
    assert sent > 0 and answered >= sent, f"the server finished {answered} requests for {sent} calls sent"
    report(f"mics_run_{mentors}", {"seconds": round(seconds, 1), "items": len(CASES), "success": summary["success"],
                        "no_path": summary["no_path"], "calls": summary["calls"], "sent": sent, "tokens": summary["tokens"],
                        "server_requests": answered, "roles": {k: v for k, v in roles(mentors == "lora").items() if k.startswith("MICS_")}})
    if TRAINED and mentors == "base":
        # The random model writes no "### Step k:" lines: no mentor step, so every item is a no_path.
        assert kinds == ["no_path"] * len(CASES), [failure["error"] for failure in failures]
    if TRAINED and mentors == "lora":
        # The adapter writes steps, so interns (the random base model, through the Router) are called. Their
        # gibberish has no final-answer line: the published rule counts such a sample wrong and asks no judge
        # ("unparsed", or "truncated" when cut off by the budget), so items mostly end as no_path after
        # MICS_MAX_DEPTH. A sample that does parse is judged by the adapter, which says Yes: a success at depth 1.
        trees = [record["tree"] for record in successes] + [failure["search"]["tree"] for failure in failures]
        samples = _intern_samples(trees)
        assert samples, "the adapter's steps reached the interns"
        assert {sample["intern"] for sample in samples} == {roles(True)["MICS_INTERNS"]}, "through the Router name"
        for sample in samples:
            if sample["judged_by"] in ("unparsed", "truncated"):
                assert not sample["correct"] and not sample["answer"], sample
        for record in successes:
            assert record["search_id"] == "1" and record["mics_score"] == 1.0
            assert record["reasoning"].startswith("### Step 1:")
        assert kinds == ["no_path"] * len(failures), [failure["error"] for failure in failures]

    # A rerun replays every call from the cache and ends nothing twice.
    rerun, _ = mics(["run", str(data), "--output", str(tmp_path / "mics.jsonl"), "--retry-failed",
                     "--json-summary", str(tmp_path / "rerun.json")], env, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    again = json.loads((tmp_path / "rerun.json").read_text())
    assert again["calls"] == again["cached_calls"], again
    ended_again = [r["rid"] for r in read_lines(tmp_path / "mics.jsonl") + read_lines(tmp_path / "mics_failed.jsonl")]
    assert sorted(ended_again) == sorted(case["id"] for case in CASES)


def _intern_samples(tree: Any) -> list[dict[str, Any]]:
    """Every intern sample (a dict with ``judged_by``) anywhere in search trees."""
    if isinstance(tree, dict):
        found = [tree] if "judged_by" in tree and "intern" in tree else []
        return found + [sample for value in tree.values() for sample in _intern_samples(value)]
    if isinstance(tree, list):
        return [sample for value in tree for sample in _intern_samples(value)]
    return []


def evaluate(tmp_path: Path, model: str, name: str) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    benchmark = write_jsonl(tmp_path / "tiny_bench.jsonl", BENCHMARK)
    output = tmp_path / name
    result, seconds = mics(["eval", "--model", model, "--benchmark", f"tiny={benchmark}", "--output", str(output),
                            "--concurrency", "4", "--log-every", "5"], mics_env(tmp_path), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (output / "results.json").exists() and (output / "results.md").exists()
    results = json.loads((output / "results.json").read_text())
    predictions = read_lines(output / "tiny" / "predictions.jsonl")
    block = results["benchmarks"]["tiny"]
    assert block["n"] == len(BENCHMARK) == len(predictions) and block["not_scored"] == 0
    assert block["correct"] == sum(bool(p["correct"]) for p in predictions)
    assert block["parse_failures"] == sum(not p["parse_ok"] for p in predictions)
    assert all(not p["correct"] for p in predictions if not p["parse_ok"]), "an unreadable answer counts as wrong"
    report(f"mics_eval_{name}", {"model": model, "seconds": round(seconds, 1), "n": block["n"],
                                 "correct": block["correct"], "parse_failures": block["parse_failures"]})
    return block, predictions, seconds


def test_mics_eval_of_the_served_model_counts_answers_and_parse_failures(tmp_path):
    block, _, _ = evaluate(tmp_path, f"hosted_vllm/{MODEL}", "base")
    if TRAINED:
        assert block["parse_failures"] > 0, "the random base model's gibberish has no readable answer"


@needs_lora
def test_mics_eval_of_the_lora_adapter(tmp_path):
    block, predictions, _ = evaluate(tmp_path, f"hosted_vllm/{LORA}", "lora")
    if TRAINED:
        assert block["parse_failures"] == 0 and block["correct"] == block["n"], predictions


def _judge_and_mentor_messages() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from mics_agents.agents import NO_PREFIX, render_case_info
    from tests.vllm.tiny_fixtures import _messages

    case = CASES[0]
    judge = _messages("judge", question=case["question"], reference=case["answer"], candidate="qz blorp")
    mentor = _messages("mentor", case_info=render_case_info(case["case_info"]), question=case["question"],
                       answer=case["answer"], prefix=NO_PREFIX)
    return judge, mentor


@needs_lora
def test_the_lora_answers_by_its_hosted_vllm_name():
    judge, mentor = _judge_and_mentor_messages()
    tuned, base = chat(LORA, mentor), chat(MODEL, mentor)
    assert tuned.strip() and base.strip()
    report("lora_reply", tuned[:200])
    if TRAINED:
        from mics_agents.answers import parse_solution

        assert chat(LORA, judge, max_tokens=8).strip() == "Yes"
        assert parse_solution(tuned).steps and parse_solution(tuned).final_answer == CASES[0]["answer"]
        assert not parse_solution(base).steps, "the adapter, not the base model, writes the trained format"


@needs_lora
@needs_router
async def test_the_lora_answers_by_its_router_name():
    from mics_agents.config import load_settings
    from mics_agents.models import ChatMessage, ModelRequest, set_request_policy
    from mics_agents.models.factory import open_model
    from mics_agents.models.providers import load_router, router_model_names

    set_request_policy("allow")  # the server was configured on purpose; it may be on another machine
    settings = load_settings(cache_path=None, router_config=Path(ROUTER), max_retries=1)
    name = f"{intern_name()}:{LORA}"
    router = load_router(settings.router_config)
    assert name in router_model_names(router), f"{name} is not in {ROUTER}"
    model = open_model(name, settings, router=router)
    judge, _ = _judge_and_mentor_messages()
    messages = tuple(ChatMessage.text(message["role"], message["content"]) for message in judge)
    started = time.monotonic()
    try:
        reply = await model.request(ModelRequest(messages, 0.0, max_tokens=8))
    finally:
        await model.aclose()
    report("lora_router_seconds", round(time.monotonic() - started, 2))
    assert reply.text.strip()
    if TRAINED:
        assert reply.text.strip() == "Yes"
