"""Prompt templates: rendering, versioning, message order, and shipping inside the wheel."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mics_agents.agents import Case, Intern, Mentor
from mics_agents.config import load_settings
from mics_agents.errors import PromptError
from mics_agents.models import FunctionModel, ImagePart, TextPart
from mics_agents.prompts import load_prompt

ROOT = Path(__file__).resolve().parents[1]


def test_templates_render_every_field():
    system, user = load_prompt("mentor").render(case_info="CI", question="Q?", answer="ANS", prefix="P")
    assert system and "Q?" in user and "ANS" in user and "CI" in user and "{{" not in user


def test_missing_or_unknown_fields_are_errors():
    with pytest.raises(PromptError, match="missing"):
        load_prompt("judge").render(question="q", reference="r")
    with pytest.raises(PromptError, match="unexpected"):
        load_prompt("intern").render(question="q", prefix="p", answer="leak")


def test_own_prompt_dir_changes_the_version(tmp_path):
    for name in ("mentor", "intern", "judge"):
        shutil.copy(ROOT / "prompts" / f"{name}.md", tmp_path / f"{name}.md")
    (tmp_path / "judge.md").write_text((tmp_path / "judge.md").read_text() + "\nBe brief.\n")
    assert load_prompt("judge", tmp_path).version != load_prompt("judge").version
    assert load_prompt("mentor", tmp_path).version == load_prompt("mentor").version


async def test_intern_prompt_puts_images_and_question_before_the_prefix():
    """Sibling candidates share everything up to the prefix, so vLLM's prefix cache can reuse it."""
    image = ImagePart(b"png", "image/png", "abc")
    model = FunctionModel("i", lambda request: "### The final answer is: x")
    case = Case(rid="r", question="QUESTION-TEXT", answer="ANSWER-TEXT", images=(image,), case_info="INFO")
    await Intern(model, load_settings(cache_path=None)).finish(case, ["PREFIX-STEP"], 0.3, 0)
    user = model.requests[0].messages[-1]
    assert isinstance(user.parts[0], ImagePart) and isinstance(user.parts[-1], TextPart)
    text = user.plain_text()
    assert text.index("QUESTION-TEXT") < text.index("PREFIX-STEP")
    assert "ANSWER-TEXT" not in text and "INFO" not in text


async def test_mentor_sees_case_info_answer_and_images():
    image = ImagePart(b"png", "image/png", "abc")
    model = FunctionModel("m", lambda request: "### Step 1: s\n### The final answer is: x")
    case = Case(rid="r", question="QUESTION-TEXT", answer="ANSWER-TEXT", images=(image,), case_info="INFO")
    solution, _ = await Mentor(model, load_settings(cache_path=None)).propose(case, [])
    text = model.requests[0].messages[-1].plain_text()
    assert "ANSWER-TEXT" in text and "INFO" in text and model.requests[0].messages[-1].images() == [image]
    assert solution.steps == ["s"]


def test_prompts_ship_inside_the_wheel(tmp_path):
    # hatchling comes with the dev extra, so the wheel builds without reaching an index.
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("mics_agents-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("mentor", "intern", "judge"):
        assert f"mics_agents/prompts/{name}.md" in names
    assert "mics_agents/examples/cases.jsonl" in names
    assert {"mics_agents/report/assets/report.js", "mics_agents/report/assets/report.css"} <= set(names)


# -- MICS_PROMPT_DIR (issue 15): a template there replaces the shipped one, a missing one falls back, one
#    that does not render is an error at start-up ---------------------------------------------------------


def test_a_template_missing_from_the_prompt_dir_falls_back_to_the_shipped_one(tmp_path):
    from mics_agents.prompts import check_prompt_dir

    (tmp_path / "judge.md").write_text((ROOT / "prompts" / "judge.md").read_text() + "\nBe brief.\n")
    assert load_prompt("mentor", tmp_path) == load_prompt("mentor")  # not there: the shipped one
    assert "Be brief." in load_prompt("judge", tmp_path).user
    assert check_prompt_dir(tmp_path) == ["judge"]
    assert load_settings(prompt_dir=tmp_path).prompt_dir == tmp_path


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("<!-- user -->\n{{question}} {{reference}} {{candidate}} {{extra}}\n", ["unknown field(s) {{extra}}"]),
        ("<!-- user -->\n{{question}}\n", ["missing field(s) {{candidate}}, {{reference}}"]),
        ("no parts here {{question}} {{reference}} {{candidate}}\n", ["has no '<!-- user -->' part"]),
    ],
)
def test_a_template_that_does_not_render_is_a_config_error_naming_the_file(tmp_path, text, fragments):
    from mics_agents.errors import ConfigError

    (tmp_path / "judge.md").write_text(text)
    with pytest.raises(ConfigError, match="MICS_PROMPT_DIR") as caught:
        load_settings(prompt_dir=tmp_path)
    message = str(caught.value)
    assert "judge.md" in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_template_that_is_not_utf8_is_a_config_error(tmp_path):
    from mics_agents.errors import ConfigError

    (tmp_path / "intern.md").write_bytes(b"<!-- user -->\n\xff {{question}} {{prefix}}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(prompt_dir=tmp_path)


# The judge template before it said that an unclear match is No (its text at commit 2a9934c).
JUDGE_BEFORE_THE_UNCLEAR_RULE = """<!-- system -->
You grade answers to medical questions against a reference answer. You reply with a single word.
<!-- user -->
## Question
{{question}}

## Reference answer
{{reference}}

## Candidate answer
{{candidate}}

Does the candidate answer mean the same as the reference answer (the same option, diagnosis, finding
or value; wording may differ)? Reply with one word: Yes or No.
"""


def test_the_judge_is_told_that_an_unclear_match_is_no():
    _, user = load_prompt("judge").render(question="Which organism?", reference="Enterococcus",
                                          candidate="E. faecalis")
    text = " ".join(user.split())
    assert "Say Yes only when you are sure it does" in text
    assert "When you cannot tell" in text and "say No" in text
    # The rule comes before the reply format, so a one-word reply has read it.
    assert text.index("When you cannot tell") < text.index("Reply with one word: Yes or No.")


async def test_the_judge_rule_changed_the_prompt_version_so_cached_verdicts_are_asked_again(tmp_path):
    """A judge reply cached under the old template must not answer the new one: the version is part of the key."""
    from mics_agents.agents import Judge

    (tmp_path / "judge.md").write_text(JUDGE_BEFORE_THE_UNCLEAR_RULE, encoding="utf-8")
    old, new = load_prompt("judge", tmp_path), load_prompt("judge")
    assert old.version != new.version
    keys = []
    for prompt_dir in (tmp_path, None):
        model = FunctionModel("judge/j", lambda request: "Yes")
        judge = Judge(model, load_settings(cache_path=None, prompt_dir=prompt_dir))
        assert (await judge.ask("Which organism?", "E. faecalis", "Enterococcus"))[0] is True
        [request] = model.requests
        keys.append(request.cache_key("judge/j"))
        assert request.prompt_version == (old if prompt_dir else new).version
    assert keys[0] != keys[1]
