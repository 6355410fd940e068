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


# -- issue 24: a bool is not a number; an empty cache option means no cache --------------------------------


@pytest.mark.parametrize(
    "variable, value, fragment",
    [
        ("MICS_MODEL_CONCURRENCY_OVERRIDES", '{"openai/judge": true}', "the limit of 'openai/judge' is true, not a number"),
        ("MICS_MODEL_CONCURRENCY_OVERRIDES", '{"openai/judge": false}', "the limit of 'openai/judge' is false"),
        ("MICS_PRICES", '{"openai/m": {"input": true, "output": 1e-6}}', "the price of 'openai/m' holds true or false"),
        ("MICS_MODEL_CONCURRENCY", "true", "valid integer"),
        ("MICS_MAX_DEPTH", "true", "valid integer"),
    ],
)
def test_true_is_not_a_count_or_a_price_in_any_variable(monkeypatch, variable, value, fragment):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert f"{variable}:" in str(caught.value) and fragment in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_concurrency", True),
        ("max_depth", True),
        ("seed", False),
        ("request_timeout", True),
        ("mentor_temperature", True),
        ("judge_max_tokens", True),
        ("intern_image_max_pixels", True),
        ("intern_temperatures", [1.2, True]),
        ("model_concurrency_overrides", {"openai/judge": True}),
        ("prices", {"openai/m": {"input": 1e-6, "output": True}}),
    ],
)
def test_a_bool_given_from_python_is_refused_where_a_number_belongs(field, value):
    with pytest.raises(ConfigError) as caught:
        load_settings(**{field: value})
    message = str(caught.value)
    assert f"MICS_{field.upper()}:" in message and ("not a number" in message), message


def test_switches_still_take_bools(monkeypatch):
    assert load_settings(adaptive_concurrency=False).adaptive_concurrency is False
    monkeypatch.setenv("MICS_MENTOR_IMAGES_FIRST", "false")
    assert load_settings().mentor_images_first is False
    assert load_settings(model_concurrency_overrides={"openai/judge": 2}).concurrency_for("openai/judge") == 2


@pytest.mark.parametrize("spelling", ["", "  ", "off", "none"])
def test_an_empty_cache_option_means_no_cache_as_the_empty_variable_does(monkeypatch, spelling):
    """The CLI hands --cache over as the string it got: "" must disable the cache, even over a path in
    MICS_CACHE_PATH, exactly as MICS_CACHE_PATH="" does."""
    monkeypatch.setenv("MICS_CACHE_PATH", "elsewhere.sqlite")
    assert load_settings().cache_path is not None
    assert load_settings(cache_path=spelling).cache_path is None
    monkeypatch.setenv("MICS_CACHE_PATH", spelling)
    assert load_settings().cache_path is None


def test_a_dot_is_still_a_folder_not_no_cache(tmp_path):
    """Only an empty value disables the cache: "." names the working folder, which is refused."""
    with pytest.raises(ConfigError, match="MICS_CACHE_PATH: '.' is a folder"):
        load_settings(cache_path=".")
    assert load_settings(cache_path="run.sqlite").cache_path.name == "run.sqlite"


def test_the_judge_reply_budget_is_16_by_default_and_empty_means_none(monkeypatch):
    assert load_settings().judge_max_tokens == 16
    monkeypatch.setenv("MICS_JUDGE_MAX_TOKENS", "")
    assert load_settings().judge_max_tokens is None
    monkeypatch.setenv("MICS_JUDGE_MAX_TOKENS", "0")
    with pytest.raises(ConfigError, match="MICS_JUDGE_MAX_TOKENS:.*whole number >= 1"):
        load_settings()


@pytest.mark.parametrize(
    "opening",
    ["### Step 1: look at the film", "Think.\n**Step 2** then", "The final answer is: B", "so the final answer is"],
)
def test_a_path_opening_holding_a_step_or_an_answer_line_is_refused(monkeypatch, opening):
    monkeypatch.setenv("MICS_PATH_OPENING", opening)
    with pytest.raises(ConfigError, match="MICS_PATH_OPENING: the opening holds"):
        load_settings()


def test_a_path_opening_is_one_plain_sentence_trimmed(monkeypatch):
    assert load_settings().path_opening == ""
    monkeypatch.setenv("MICS_PATH_OPENING", "  Let's work through this step by step.  ")
    assert load_settings().path_opening == "Let's work through this step by step."


def test_an_intern_image_budget_whose_minimum_exceeds_its_maximum_is_refused(monkeypatch):
    monkeypatch.setenv("MICS_INTERN_IMAGE_MAX_PIXELS", "100000")
    monkeypatch.setenv("MICS_INTERN_IMAGE_MIN_PIXELS", "200000")
    with pytest.raises(ConfigError, match="MICS_INTERN_IMAGE_MIN_PIXELS: 200,000 is above MICS_INTERN_IMAGE_MAX_PIXELS"):
        load_settings()
    monkeypatch.setenv("MICS_INTERN_IMAGE_MAX_PIXELS", "0")  # no maximum: any minimum goes
    assert load_settings().intern_image_min_pixels == 200_000
