"""Errors that say what to do, at once, over the real HTTP path (issue 14), and one total deadline per
call on every transport (issue 15): against ``tests/openai_server.py`` on 127.0.0.1, in process and as a
real ``mics`` subprocess where start-up (``.env``, keys) is what is tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mics_agents import ModelCallError, Searcher, load_settings
from mics_agents.models import ChatMessage, ModelRequest
from mics_agents.models.factory import open_model

from .openai_server import OpenAIServer
from .test_litellm_http import SECRET, server, transport  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")

ROLES = {"mentors": ["openai/mentor-a", "openai/mentor-b"], "interns": ["openai/intern-1"], "judge": "openai/judge"}
QUESTION = "## Question\nWhich organ is enlarged?\n\n## Reasoning so far\n(none)"
RUN_TIMEOUT = 120.0  # a hang guard only; each launch here takes a few seconds




def settings(**overrides):
    values = {**ROLES, "cache_path": None, "max_retries": 3, "retry_initial_wait": 0.01, "retry_max_wait": 0.05}
    values.update(overrides)
    return load_settings(**values)


async def ask(name: str, config, **request_fields) -> object:
    model = open_model(name, config)
    try:
        return await model.request(ModelRequest((ChatMessage.text("user", QUESTION),), 0.3, **request_fields))
    finally:
        await model.aclose()


# -- errors that say what to do, at once -----------------------------------------------------------------


async def test_retry_after_3600_ends_the_search_as_model_error_within_seconds(server, transport):
    server.inject("429", model="openai/mentor-a", retry_after=3600, times=None)
    async with await Searcher.open(settings(transport=transport)) as searcher:  # LiteLLM's import is not timed
        started = time.monotonic()
        result = await searcher.search("Which organ is enlarged?", answer="Liver", rid="r1")
        elapsed = time.monotonic() - started

    assert result.status == "model_error"
    assert elapsed < 10, f"took {elapsed:.1f} s: the 3600 s Retry-After was waited out"
    assert "3,600 s" in result.message and "MICS_MAX_RETRY_AFTER (120 s)" in result.message
    assert "Rerun later" in result.message
    assert server.count("openai/mentor-a") == 1  # asked once, not retried into the wait


async def test_retry_after_within_the_maximum_is_honoured(server):
    server.inject("429", model="openai/intern-1", retry_after=1)
    reply = await ask("openai/intern-1", settings(max_retry_after=2))
    first, second = server.recorded()
    assert "### The final answer is:" in reply.text and second.received_at - first.received_at >= 0.95


async def test_a_400_is_sent_once_and_says_why(server, transport):
    server.inject("400", model="openai/intern-1", times=None)
    with pytest.raises(ModelCallError) as caught:
        await ask("openai/intern-1", settings(transport=transport, max_retries=5))
    assert server.count() == 1
    assert "HTTP 400" in str(caught.value) and "supports images" in str(caught.value)
    assert "gave up" not in str(caught.value)


# -- one total deadline per attempt, on every transport --------------------------------------------------


async def test_a_server_dripping_its_reply_is_stopped_at_the_deadline(server, transport):
    """The server sends a byte every 0.2 s for 20 s: no single read ever waits long, so the HTTP client's
    own timeout (per read) never fires. The transport's total deadline does."""
    server.inject("drip", model="openai/intern-1", delay=20.0)
    started = time.monotonic()
    with pytest.raises(ModelCallError) as caught:
        await ask("openai/intern-1", settings(transport=transport, request_timeout=1.5, max_retries=0))
    elapsed = time.monotonic() - started

    assert 1.5 <= elapsed < 5, f"the attempt took {elapsed:.1f} s against a 1.5 s deadline"
    assert "within the 1.5 s deadline" in str(caught.value)
    assert server.count() == 1 and server.recorded()[0].fault == "drip"


async def test_a_drip_shorter_than_the_deadline_is_a_reply_and_the_requests_own_deadline_wins(server):
    server.inject("drip", model="openai/mentor-a", delay=1.0)
    reply = await ask("openai/mentor-a", settings(request_timeout=0.5, max_retries=0), timeout=5.0)
    assert "### The final answer is:" in reply.text  # the mentor's longer deadline, not the default


async def test_a_search_gives_mentors_their_longer_deadline_over_http(server):
    """Mentors drip for 1.2 s: within MICS_MENTOR_TIMEOUT (5 s), far beyond the 0.6 s every other role gets."""
    server.inject("drip", model="openai/mentor-a", delay=1.2)
    server.inject("drip", model="openai/mentor-b", delay=1.2)
    config = settings(mentor_timeout=5.0, request_timeout=0.6, max_retries=0, max_depth=1)
    async with await Searcher.open(config) as searcher:
        result = await searcher.search("Which organ is enlarged?", answer="Liver", rid="r1")
    assert result.status in ("success", "no_path"), result.message
    server.inject("drip", model="openai/intern-1", delay=1.2, times=None)
    async with await Searcher.open(settings(mentor_timeout=5.0, request_timeout=0.6, max_retries=0, max_depth=1,
                                            cache_path=None, seed=1)) as searcher:
        slow_intern = await searcher.search("Which organ is enlarged now?", answer="Spleen", rid="r2")
    assert slow_intern.status == "model_error" and "0.6 s deadline" in slow_intern.message


# -- start-up: keys and the one .env, as a real process --------------------------------------------------


def write_case(folder: Path) -> Path:
    data = folder / "cases.jsonl"
    data.write_text(json.dumps({"id": "c1", "question": "Which organ is enlarged?", "answer": "Liver"}) + "\n")
    return data


def launch(cwd: Path, env: dict[str, str], data: Path) -> subprocess.CompletedProcess:
    base = {name: value for name, value in os.environ.items()
            if not name.startswith("MICS_") and not name.endswith(("_API_KEY", "_API_BASE", "_BASE_URL"))}
    base.update(LITELLM_LOCAL_MODEL_COST_MAP="True", COLUMNS="400", MICS_RETRY_INITIAL_WAIT="0.01",
                MICS_RETRY_MAX_WAIT="0.05", MICS_MAX_DEPTH="1", MICS_CACHE_PATH=str(cwd / "cache.sqlite"))
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "mics_agents", "run", str(data), "--output", str(cwd / "out.jsonl")],
        cwd=cwd, env=base, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )


def test_a_missing_key_exits_2_before_any_request_and_hosted_vllm_needs_none(tmp_path):
    data = write_case(tmp_path)
    with OpenAIServer() as server:
        missing = launch(tmp_path, {
            "MICS_MENTORS": "openai/mentor-a,openai/mentor-b",  # the provider's API, no key anywhere
            "MICS_INTERNS": "hosted_vllm/intern-1", "MICS_JUDGE": "hosted_vllm/judge",
            "HOSTED_VLLM_API_BASE": server.base_url,
        }, data)
        assert missing.returncode == 2, missing.stderr
        message = " ".join(missing.stderr.split())
        assert "openai/mentor-a needs OPENAI_API_KEY" in message and "Traceback" not in message
        assert str(tmp_path / ".env") in message
        assert server.count() == 0, "a request went out before the missing key was reported"
        assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""

        local = launch(tmp_path, {
            "MICS_MENTORS": "hosted_vllm/mentor-a,hosted_vllm/mentor-b",
            "MICS_INTERNS": "hosted_vllm/intern-1", "MICS_JUDGE": "hosted_vllm/judge",
            "HOSTED_VLLM_API_BASE": server.base_url,
        }, data)
        assert local.returncode == 0, local.stderr
        assert server.count() > 0 and server.count("mentor-a") >= 1


def test_a_provider_key_in_the_working_folders_dotenv_reaches_the_request(tmp_path):
    """One .env, the working folder's: our MICS_* settings and LiteLLM's OPENAI_API_KEY both come from it,
    whatever folder LiteLLM is installed in (LiteLLM's own search for a .env is switched off)."""
    data = write_case(tmp_path)
    key = "sk-from-the-dotenv-file-7c41a9"
    with OpenAIServer() as server:
        (tmp_path / ".env").write_text(
            f"OPENAI_API_KEY={key}\nOPENAI_API_BASE={server.base_url}\n"
            "MICS_MENTORS=openai/mentor-a,openai/mentor-b\nMICS_INTERNS=openai/intern-1\nMICS_JUDGE=openai/judge\n"
        )
        finished = launch(tmp_path, {}, data)
        assert finished.returncode == 0, finished.stderr
        headers = {record.headers.get("Authorization") for record in server.recorded()}
    assert headers == {f"Bearer {key}"}


# -- mics eval keys the evaluated model's answers by its output folder ----------------------------------


def test_eval_into_a_new_folder_asks_again_and_into_the_same_folder_replays(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mics_agents.cli import app

    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(
        json.dumps({"id": f"q{i}", "question": f"Is finding {i} present?", "answer": "yes"}) + "\n" for i in range(3)
    ))
    with OpenAIServer(lambda model, body: "### The final answer is: yes") as server:
        monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        monkeypatch.setenv("MICS_CACHE_PATH", str(tmp_path / "cache.sqlite"))

        def evaluate(folder: str, *extra: str) -> int:
            result = CliRunner().invoke(app, ["eval", "--model", "openai/chiron", "--judge", "none",
                                              "--benchmark", f"b={bench}", "--output", str(tmp_path / folder), *extra])
            assert result.exit_code == 0, result.output
            return server.count("openai/chiron")

        assert evaluate("first") == 3
        (tmp_path / "first" / "b" / "predictions.jsonl").unlink()  # resume into the same folder, nothing done
        assert evaluate("first") == 3, "the same folder replays its answers from the cache"
        assert evaluate("retrained") == 6, "a new folder asks the model again (a retrained checkpoint, same name)"
        assert evaluate("shared-1", "--cache-namespace", "v1") == 9
        assert evaluate("shared-2", "--cache-namespace", "v1") == 9, "--cache-namespace shares on purpose"
