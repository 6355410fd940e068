"""The secret scrubber: configured key values, Router YAML keys and token shapes are masked wherever a
message is written (issue 15)."""

from __future__ import annotations

import pytest

from mics_agents import redact
from mics_agents.config import check_router_config
from mics_agents.redact import MASK, ScrubbingWriter, add_secrets, scrub, scrub_data

KEY = "sk-proj-Abc123Def456Ghi789Jkl"


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.setattr(redact, "_registered", set())


def test_configured_provider_keys_are_masked_by_value(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("GEMINI_API_KEY", "gemini-secret-value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("HF_TOKEN", "hf-token-value-1")
    text = (f"Incorrect API key provided: {KEY}. gemini: gemini-secret-value, aws wJalrXUtnFEMI/K7MDENG, "
            "hf hf-token-value-1")
    cleaned = scrub(text)
    for secret in (KEY, "gemini-secret-value", "wJalrXUtnFEMI/K7MDENG", "hf-token-value-1"):
        assert secret not in cleaned
    assert cleaned.count(MASK) == 4 and cleaned.startswith("Incorrect API key provided: ")


def test_short_values_and_other_variables_are_left_alone(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "short")  # under 8 characters: masking it would mangle words
    monkeypatch.setenv("OPENAI_API_BASE", "http://127.0.0.1:8000/v1")
    text = "a short answer from http://127.0.0.1:8000/v1"
    assert scrub(text) == text


def test_a_key_in_a_dotenv_file_is_masked(tmp_path):
    (tmp_path / ".env").write_text("DEEPSEEK_API_KEY=deepseek-from-dotenv\nMICS_SEED=3\n")
    assert scrub("echo deepseek-from-dotenv") == f"echo {MASK}"


def test_bearer_tokens_and_known_key_shapes_are_masked_whatever_their_source():
    text = ("Authorization: Bearer abcdefghijklmnop123 and sk-ant-api03-0123456789abcdef and "
            "AIzaSyA1234567890abcdefghijklmnopqrstu and hf_abcdefghijklmnopqrstuvwxyz")
    cleaned = scrub(text)
    assert "abcdefghijklmnop123" not in cleaned and "Bearer " + MASK in cleaned
    assert "sk-ant" not in cleaned and "AIza" not in cleaned and "hf_abc" not in cleaned
    assert scrub("the risk-benefit of a skin biopsy") == "the risk-benefit of a skin biopsy"


def test_router_yaml_keys_are_registered_when_the_config_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICA_KEY_VAR", "from-the-environment-123")
    config = tmp_path / "router.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: interns\n"
        "    litellm_params: {model: hosted_vllm/q, api_base: 'http://a/v1', api_key: router-key-value-1}\n"
        "  - model_name: interns\n"
        "    litellm_params: {model: hosted_vllm/q, api_base: 'http://b/v1', api_key: os.environ/REPLICA_KEY_VAR}\n"
    )
    check_router_config(config)
    cleaned = scrub("router-key-value-1 / from-the-environment-123 / http://a/v1")
    assert cleaned == f"{MASK} / {MASK} / http://a/v1"


def test_scrub_data_masks_every_string_of_a_record_and_any_nesting(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    deep: object = KEY
    for _ in range(3000):  # deeper than Python's recursion limit
        deep = [deep]
    record = {"error": {"message": f"echo {KEY}"}, "input": {"notes": [KEY, 5, None]}, KEY: "key", "deep": deep}
    cleaned = scrub_data(record)
    innermost = cleaned["deep"]
    while isinstance(innermost, list):
        innermost = innermost[0]
    assert innermost == MASK and KEY not in cleaned and cleaned[MASK] == "key"
    assert cleaned["error"]["message"] == f"echo {MASK}" and cleaned["input"]["notes"] == [MASK, 5, None]
    assert record["error"]["message"] == f"echo {KEY}", "the original is not changed"


def test_a_console_writing_through_the_scrubber_never_prints_the_key(monkeypatch, capsys):
    import sys

    from rich.console import Console

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    console = Console(file=ScrubbingWriter(lambda: sys.stderr), width=40)
    console.print(f"Run stopped: openai/judge: BadRequestError: Incorrect API key provided: {KEY}.", soft_wrap=True)
    err = capsys.readouterr().err
    assert KEY not in err and MASK in err


def test_add_secrets_ignores_short_and_non_string_values():
    add_secrets(["tiny", None, 12345678, "long-enough-value"])
    assert scrub("tiny long-enough-value 12345678") == f"tiny {MASK} 12345678"
