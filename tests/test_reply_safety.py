"""A reply is kept or refused, never a defect, and no secret inside one reaches a file (issue 24): a model that
repeats the caller's key, a reply holding a lone surrogate, a server that claims 1e23 tokens."""

from __future__ import annotations

import base64
import gzip
import json
import math
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from mics_agents.models import FunctionModel
from mics_agents.models.base import ModelRequest, ModelResponse
from mics_agents.models.sanitizing import REPAIRED_ENCODING, SanitizingModel, sanitize_reply
from mics_agents.models.transport import choice_responses, token_count
from mics_agents.redact import MASK, mask_secret_values
from mics_agents.store import Store

from .openai_server import OpenAIServer, simulated_brain, simulated_brain_with_roles
from .test_run_process import MICS, PRICED_ROLES, PRICES, RUN_TIMEOUT, lines_by_item, mics_env, write_dataset

KEY = "sk-proj-RepeatedByTheModel0123456789abcdef"
DOTENV_KEY = "AIzaOnlyInTheDotEnvFile0123456789abcdefghij"
FINAL = "### The final answer is:"


def ask() -> ModelRequest:
    return ModelRequest(messages=(), temperature=0.3)


# -- the wrapper, alone ----------------------------------------------------------------------------


async def test_a_configured_key_in_a_reply_is_masked_but_a_token_shape_is_not(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    # Text that merely looks like a credential is medicine here: shapes are matched only in error messages.
    shaped = "Bearer abcdefghijklmnop sign; sk-looking-0123456789abcdef nodule"
    model = SanitizingModel(FunctionModel("m", lambda request: f"(session {KEY}) {shaped}\n{FINAL} B"))
    reply = await model.request(ask())
    assert KEY not in reply.text and f"(session {MASK})" in reply.text
    assert shaped in reply.text and reply.text.endswith(f"{FINAL} B")


async def test_a_lone_surrogate_becomes_the_replacement_character_and_the_reply_says_so():
    model = SanitizingModel(FunctionModel("m", lambda request: f"lesion \ud800 left\udfff\n{FINAL} Left"))
    reply = await model.request(ask())
    assert reply.text == f"lesion \ufffd left\ufffd\n{FINAL} Left"
    assert reply.extra["repaired"] == REPAIRED_ENCODING
    reply.text.encode("utf-8")  # what every file needs


def test_a_clean_reply_is_handed_on_untouched():
    response = ModelResponse(text=f"Step.\n{FINAL} B", model="m", extra={"n": 2})
    assert sanitize_reply(response) is response


def test_a_key_escaped_inside_json_text_is_masked_too(monkeypatch):
    key = 'sk-with"quote\\and-backslash-0123456789'
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    escaped = json.dumps(key)[1:-1]
    assert mask_secret_values(f"a {key} b {escaped} c") == f"a {MASK} b {MASK} c"


# -- usage a server claims ---------------------------------------------------------------------------


@pytest.mark.parametrize("claimed", [1e23, -5, float("nan"), float("inf"), "many", True, 10**9 + 1, [3]])
def test_a_usage_figure_that_is_no_token_count_is_unknown(claimed):
    assert token_count(claimed) is None


@pytest.mark.parametrize(("claimed", "tokens"), [(None, 0), (0, 0), (12, 12), (12.0, 12), (10**9, 10**9)])
def test_a_plausible_usage_figure_is_kept(claimed, tokens):
    assert token_count(claimed) == tokens


def test_absurd_usage_costs_nothing_and_is_marked_unknown(caplog):
    choices = [{"index": 0, "message": {"content": "A"}, "finish_reason": "stop"},
               {"index": 1, "message": {"content": "B"}, "finish_reason": "stop"}]
    replies = choice_responses("openai/x", choices, 2, input_tokens=10, output_tokens=1e23,
                               price=lambda tokens_in, tokens_out: tokens_in * 1e-6 + tokens_out * 1e-5)
    assert [reply.cost_usd for reply in replies] == [0.0, 0.0]
    assert all(reply.input_tokens == reply.output_tokens == 0 for reply in replies)
    assert replies[0].extra["usage_unknown"]["completion_tokens"] == "1e+23"
    assert "no plausible token count" in caplog.text


def test_a_price_that_comes_out_infinite_is_no_cost():
    choices = [{"index": 0, "message": {"content": "A"}, "finish_reason": "stop"}]
    replies = choice_responses("m", choices, 1, input_tokens=5, output_tokens=5, price=lambda a, b: math.inf)
    assert replies[0].cost_usd == 0.0 and replies[0].input_tokens == 5


# -- the store ---------------------------------------------------------------------------------------


async def test_a_cache_written_before_scrubbing_is_masked_when_read(tmp_path, monkeypatch):
    path = tmp_path / "cache.sqlite"
    async with await Store.open(path):
        pass
    with sqlite3.connect(path) as db:  # as an older version wrote it: the key inside, raw
        db.execute("INSERT INTO calls (key, model, text, extra, created_at) VALUES (?, ?, ?, ?, 0)",
                   ("k", "m", f"(session {KEY})\n{FINAL} B", json.dumps({"note": KEY})))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    async with await Store.open(path) as store:
        reply = await store.get_call("k")
    assert reply is not None and KEY not in reply.text and KEY not in json.dumps(reply.extra)
    assert reply.text.endswith(f"{FINAL} B")


async def test_the_store_keeps_a_reply_whatever_its_numbers_and_text(tmp_path):
    async with await Store.open(tmp_path / "cache.sqlite") as store:
        odd = ModelResponse(text="x \ud800", model="m", input_tokens=10**30, output_tokens=-1,
                            cost_usd=float("nan"))
        await store.put_call("k", "m", odd, run_id="r")
        stored = await store.get_call("k")
        assert stored is not None and stored.input_tokens == 0 and stored.output_tokens == 0
        assert stored.cost_usd == 0.0 and stored.text == "x \ufffd"
        assert await store.run_cost("r") == 0.0 and store.new_cost_usd["r"] == 0.0


# -- through the real command ------------------------------------------------------------------------


def repeating_brain(model: str, body: dict) -> str:
    """A model that repeats its session key (and one from the .env) in every reply, before its final line."""
    reply = simulated_brain(model, body)
    if model.endswith("judge"):
        return reply
    said = f"(session {KEY}; backup {DOTENV_KEY})"
    return reply.replace(FINAL, f"{said}\n{FINAL}").replace("### Step 1:", f"### Step 1: {said}")


def report_payload(html: str) -> str:
    blob = re.search(r'<script id="mics-data" type="application/x-gzip-base64">(.*?)</script>', html, re.S)
    assert blob, "the report embeds its data"
    return gzip.decompress(base64.b64decode("".join(blob.group(1).split()))).decode("utf-8")


def cache_cells(path: Path) -> list[str]:
    cells = []
    with sqlite3.connect(path) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in db.execute(f"SELECT * FROM {table}"):
                cells += [str(cell) for cell in row]
    return cells


def test_a_key_a_model_repeats_reaches_no_file_the_run_and_its_report_write(tmp_path):
    data = write_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".env").write_text(f"GEMINI_API_KEY={DOTENV_KEY}\n")
    output = run_dir / "out.jsonl"
    with OpenAIServer(repeating_brain, lifetime=120) as server:
        env = mics_env(server, OPENAI_API_KEY=KEY)
        run = subprocess.run(
            [*MICS, "run", str(data.path), "--image-dir", str(data.image_dir), "--output", str(output),
             "--cache", str(run_dir / "cache.sqlite"), "--limit", "4"],
            env=env, cwd=run_dir, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )
        assert server.errors == []
        repeated = [request for request in server.recorded() if not request.model.endswith("judge")]
    report = subprocess.run([*MICS, "report", str(output), "--html", str(run_dir / "report.html")],
                            env=env, cwd=run_dir, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert run.returncode == 0, run.stderr
    assert report.returncode == 0, report.stderr
    assert repeated, "the models repeated the key"

    successes = [json.loads(line) for line in output.read_text().splitlines()]
    assert successes, "the items still succeed"
    assert any(MASK in record["reasoning"] for record in successes), "the masked steps are in the reasoning"
    texts = {path: path.read_bytes().decode("utf-8", "replace") for path in run_dir.rglob("*")
             if path.is_file() and path.name != ".env"}
    texts["report data"] = report_payload(texts[run_dir / "report.html"])
    texts["cache cells"] = "\n".join(cache_cells(run_dir / "cache.sqlite"))
    assert MASK in texts["cache cells"] and MASK in texts["report data"]
    for where, text in texts.items():
        for secret in (KEY, DOTENV_KEY):
            assert secret not in text, f"{secret[:8]}... written to {where}"
    for stream in (run.stdout, run.stderr, report.stdout, report.stderr):
        assert KEY not in stream and DOTENV_KEY not in stream


def lying_usage(model: str, usage: dict) -> dict:
    """intern-2's server claims 1e23 completion tokens; the others count honestly."""
    return {**usage, "completion_tokens": 1e23} if model.endswith("intern-2") else usage


_priced_brain = simulated_brain_with_roles(PRICED_ROLES)


def surrogate_brain(model: str, body: dict) -> str:
    """intern-1 and the mentor gpt-4o put a lone surrogate (JSON "\\ud800") in their replies."""
    reply = _priced_brain(model, body)
    if model.endswith("intern-1"):
        return "\ud800 " + reply
    return reply.replace("### Step 1:", "### Step 1: \ud800") if model.endswith("gpt-4o") else reply


def test_a_poisoned_reply_ends_as_a_search_result_and_a_rerun_sends_nothing(tmp_path):
    data = write_dataset(tmp_path / "data")
    output, cache, summary = tmp_path / "out.jsonl", tmp_path / "cache.sqlite", tmp_path / "summary.json"
    args = [*MICS, "run", str(data.path), "--image-dir", str(data.image_dir), "--output", str(output),
            "--cache", str(cache), "--limit", "4"]  # no budget: what was spent is counted all the same
    with OpenAIServer(surrogate_brain, lifetime=120, usage=lying_usage) as server:
        env = mics_env(server, MICS_MENTORS="openai/gpt-4o,openai/gpt-4o-mini", MICS_PRICES=PRICES)
        first = subprocess.run([*args, "--json-summary", str(summary)], env=env, cwd=tmp_path, capture_output=True,
                               text=True, timeout=RUN_TIMEOUT)
        sent = server.count()
        server.reset()
        second = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        resent = server.count()
        assert server.errors == []

    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr and "internal error" not in first.stderr
    outcomes = lines_by_item(output)
    kinds = {key: record["error"]["kind"] for key, record in outcomes.items() if "error" in record}
    assert len(outcomes) == 4 and set(kinds.values()) <= {"no_path"}, kinds
    trees = json.dumps(list(outcomes.values()), ensure_ascii=False)
    assert "\ufffd" in trees and "\\ud800" not in json.dumps(list(outcomes.values()))
    # The summary counts the calls, and its cost is the budget's: the absurd usage added nothing to either.
    counted = json.loads(summary.read_text())
    assert counted["calls"] - counted["cached_calls"] == sent > 0
    assert counted["cost_usd"] == pytest.approx(counted["spent_usd"]) and 0 < counted["cost_usd"] < 1
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT MAX(output_tokens) FROM calls").fetchone()[0] < 10**9
        marked = db.execute("SELECT COUNT(*) FROM calls WHERE extra LIKE '%usage_unknown%'").fetchone()[0]
        repaired = db.execute("SELECT COUNT(*) FROM calls WHERE extra LIKE '%repaired%'").fetchone()[0]
    assert marked > 0 and repaired > 0
    assert second.returncode == 0, second.stderr
    assert resent == 0, "every reply was kept, so the rerun asks for nothing"


@pytest.mark.parametrize(("name", "secret"), [
    ("AWS_BEARER_TOKEN_BEDROCK", True), ("OPENAI_API_KEY", True), ("HF_TOKEN", True), ("azure_ad_token", True),
    ("MICS_INTERN_MAX_TOKENS", False), ("MICS_JUDGE_MAX_TOKENS", False), ("TOKENIZERS_PARALLELISM", False),
])
def test_which_variables_hold_secrets(name, secret):
    from mics_agents.redact import is_secret_name

    assert is_secret_name(name) is secret


@pytest.mark.parametrize("reason", [f"stop {KEY}", "stop\ud800", 10**30, {"type": "stop"}, "", "x" * 200])
def test_a_finish_reason_that_is_no_short_word_is_unknown(reason):
    choices = [{"index": 0, "message": {"content": "A"}, "finish_reason": reason}]
    [reply] = choice_responses("m", choices, 1, input_tokens=1, output_tokens=1, price=lambda a, b: 0.0)
    assert reply.finish_reason is None


def test_a_key_as_the_finish_reason_or_in_a_usage_string_is_masked_whole(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert sanitize_reply(ModelResponse(text="A", model="m", finish_reason=KEY)).finish_reason == MASK
    assert sanitize_reply(ModelResponse(text="A", model="m", finish_reason={"x": 1})).finish_reason is None
    choices = [{"index": 0, "message": {"content": "A"}, "finish_reason": "stop"}]
    [reply] = choice_responses("m", choices, 1, input_tokens=KEY, output_tokens=1, price=lambda a, b: 0.0)
    claimed = reply.extra["usage_unknown"]["prompt_tokens"]
    assert KEY[:12] not in claimed and MASK in claimed  # masked before it was cut to 40 characters


def test_a_reply_litellm_cannot_read_is_not_bought_again():
    from mics_agents.errors import ModelCallError
    from mics_agents.models.transport import classify_error

    litellm_said = Exception("litellm.InternalServerError: OpenAIException - Invalid response object Traceback ...")
    litellm_said.status_code = 500  # type: ignore[attr-defined]
    error = classify_error("openai/gpt-4o", litellm_said)
    assert isinstance(error, ModelCallError) and "not asked again" in str(error)


async def test_a_corrupt_cache_read_is_a_store_error(tmp_path, monkeypatch):
    import aiosqlite

    from mics_agents.errors import StoreError

    async with await Store.open(tmp_path / "cache.sqlite") as store:
        async def corrupt(*args, **kwargs):
            raise sqlite3.DatabaseError("database disk image is malformed")

        monkeypatch.setattr(aiosqlite.Connection, "execute_fetchall", corrupt)
        for read in (store.run_cost("r"), store.count_calls(), store.get_call("k")):
            with pytest.raises(StoreError, match="malformed"):
                await read


def test_a_key_set_or_removed_after_the_first_reply_is_seen_at_once(monkeypatch, tmp_path):
    """The environment's and .env's secrets are remembered between replies, never past a change."""
    monkeypatch.chdir(tmp_path)
    late = "sk-set-after-the-first-reply-0123456789"
    assert mask_secret_values(f"a {late}") == f"a {late}"
    monkeypatch.setenv("LATE_API_KEY", late)
    assert mask_secret_values(f"a {late}") == f"a {MASK}"
    monkeypatch.delenv("LATE_API_KEY")
    assert mask_secret_values(f"a {late}") == f"a {late}"
    (tmp_path / ".env").write_text(f"DOTENV_TOKEN={late}\n")
    assert mask_secret_values(f"a {late}") == f"a {MASK}"
    (tmp_path / ".env").write_text("DOTENV_TOKEN=another-value-entirely\n")
    assert mask_secret_values(f"a {late}") == f"a {late}"
