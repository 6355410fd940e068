import pytest

from mics_agents.config import load_settings
from mics_agents.errors import ConfigError


def test_roles_and_knobs_from_environment(monkeypatch):
    monkeypatch.setenv("MICS_MENTORS", "openai/gpt-4o, gemini/gemini-2.5-pro")
    monkeypatch.setenv("MICS_INTERNS", "hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct")
    monkeypatch.setenv("MICS_JUDGE", "openai/gpt-4o-mini")
    monkeypatch.setenv("MICS_INTERN_TEMPERATURES", "1.2,0.2")
    monkeypatch.setenv("MICS_MAX_DEPTH", "4")
    monkeypatch.setenv("MICS_MODEL_CONCURRENCY_OVERRIDES", '{"openai/gpt-4o": 4}')
    settings = load_settings().check_roles()
    assert settings.mentors == ["openai/gpt-4o", "gemini/gemini-2.5-pro"]
    assert settings.intern_temperatures == [1.2, 0.2]
    assert settings.max_depth == 4
    assert settings.concurrency_for("openai/gpt-4o") == 4
    assert settings.concurrency_for("gemini/gemini-2.5-pro") == settings.model_concurrency


def test_dotenv_file_is_read(tmp_path):
    (tmp_path / ".env").write_text("MICS_JUDGE=openai/gpt-4o-mini\nMICS_SEED=7\n")
    settings = load_settings()
    assert settings.judge == "openai/gpt-4o-mini" and settings.seed == 7


def test_invalid_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("MICS_MAX_DEPTH", "zero")
    with pytest.raises(ConfigError, match="MICS_MAX_DEPTH"):
        load_settings()


@pytest.mark.parametrize(
    "values, variable",
    [
        ({"mentors": "openai/gpt-4o", "interns": "x/y", "judge": "x/j"}, "MICS_MENTORS"),
        ({"mentors": "a/a,b/b", "interns": "", "judge": "x/j"}, "MICS_INTERNS"),
        ({"mentors": "a/a,b/b", "interns": "x/y", "judge": ""}, "MICS_JUDGE"),
        ({"mentors": "a/a,a/a", "interns": "x/y", "judge": "x/j"}, "MICS_MENTORS"),
    ],
)
def test_missing_roles_name_the_variable(monkeypatch, values, variable):
    for key, value in values.items():
        monkeypatch.setenv(f"MICS_{key.upper()}", value)
    with pytest.raises(ConfigError, match=variable):
        load_settings().check_roles()


def test_empty_cache_path_disables_the_cache(monkeypatch):
    monkeypatch.setenv("MICS_CACHE_PATH", "")
    assert load_settings().cache_path is None
