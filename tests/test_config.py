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


# -- issue 15: every setting checked in one place, naming the variable and the allowed range -----------


@pytest.mark.parametrize(
    "variable, value, fragments",
    [
        ("MICS_INTERN_TEMPERATURES", "nan", ["finite number", "got 'nan'", "from 0 to 2"]),
        ("MICS_INTERN_TEMPERATURES", "1.2,inf", ["finite number", "got 'inf'"]),
        ("MICS_INTERN_TEMPERATURES", "1.2,3", ["3 is outside 0 to 2"]),
        ("MICS_MENTOR_TEMPERATURE", "nan", ["finite number", "allowed: a finite number >= 0 and <= 2"]),
        ("MICS_REQUEST_TIMEOUT", "inf", ["finite number", "allowed: a finite number > 0"]),
        ("MICS_RETRY_MAX_WAIT", "-1", ["allowed: a finite number >= 0"]),
        ("MICS_MODEL_CONCURRENCY", "0", ["allowed: a whole number >= 1"]),
        ("MICS_MODEL_CONCURRENCY_OVERRIDES", '{"openai/m1": 0}', ["'openai/m1' is 0", "whole number >= 1"]),
        ("MICS_MODEL_CONCURRENCY_OVERRIDES", '{"openai/m1": -1}', ["'openai/m1' is -1"]),
        ("MICS_MODEL_CONCURRENCY_OVERRIDES", "{not json", ["not valid JSON", "model name -> whole number >= 1"]),
        ("MICS_MAX_DEPTH", "0", ["allowed: a whole number >= 1 and <= 32"]),
        ("MICS_PROMPT_DIR", "/nonexistent/prompts", ["'/nonexistent/prompts' is not a folder"]),
        ("MICS_ROUTER_CONFIG", "/nonexistent/router.yaml", ["cannot be read"]),
    ],
)
def test_a_bad_setting_names_its_variable_and_the_allowed_range(monkeypatch, variable, value, fragments):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert f"{variable}:" in message
    for fragment in fragments:
        assert fragment in message, message


def test_the_cache_path_may_not_be_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MICS_CACHE_PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="MICS_CACHE_PATH: .* is a folder"):
        load_settings()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("model_list:\n  - litellm_params: {model: openai/x}\n", "model_list entry 1 lacks model_name"),
        ("model_list:\n  - model_name: m\n", "lacks litellm_params"),
        ("model_list:\n  - model_name: m\n    litellm_params: {api_base: x}\n", "litellm_params must be a mapping with model"),
        ("model_list: []\n", "needs a non-empty 'model_list'"),
        ("model_list:\n  - model_name: m\n    litellm_params: {model: openai/x}\nrouter_settings: [1]\n",
         "router_settings must be a mapping"),
        ("model_list: [\n", "is not valid YAML"),
    ],
)
def test_a_broken_router_config_is_refused_before_litellm_is_imported(tmp_path, monkeypatch, text, fragment):
    config = tmp_path / "router.yaml"
    config.write_text(text)
    monkeypatch.setenv("MICS_ROUTER_CONFIG", str(config))
    with pytest.raises(ConfigError, match="MICS_ROUTER_CONFIG") as caught:
        load_settings()
    assert fragment in str(caught.value)


def test_a_router_config_that_is_not_utf8_is_refused(tmp_path):
    config = tmp_path / "router.yaml"
    config.write_bytes(b"model_list:\n  - model_name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(router_config=config)


def test_a_dotenv_file_that_is_not_utf8_is_a_config_error(tmp_path):
    (tmp_path / ".env").write_bytes(b"MICS_SEED=\xff\n")
    with pytest.raises(ConfigError, match=r"\.env file is not UTF-8"):
        load_settings()


def test_the_default_pixel_cap_fits_the_largest_mammograms_and_refuses_the_bombs():
    cap = load_settings().image_max_pixels
    assert 4800 * 6000 < cap < 8900 * 8900
