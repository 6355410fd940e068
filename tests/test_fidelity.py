"""Faithful to Chiron-o1 by default: what interns are asked, what mentors must not do, the published
defaults, and the vanilla arm of the paper's comparison."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mics_agents import Searcher
from mics_agents.agents import Case, Intern
from mics_agents.config import load_settings
from mics_agents.models import FunctionModel
from mics_agents.models.simulated import simulated_intern, simulated_judge, simulated_mentor
from mics_agents.prompts import load_prompt
from mics_agents.runner import BatchRun, RunOptions

GOLDEN = Path(__file__).parent / "golden"
FIELDS = {
    "mentor": {"case_info": "<CASE-RECORD>", "question": "<QUESTION>", "answer": "<ANSWER>", "prefix": "<PREFIX>"},
    "intern": {"question": "<QUESTION>", "prefix": "<PREFIX>"},
    "intern_continue": {"question": "<QUESTION>", "prefix": "<PREFIX>"},
    "judge": {"question": "<QUESTION>", "reference": "<REFERENCE>", "candidate": "<CANDIDATE>"},
}


def rendered(name: str) -> str:
    system, user = load_prompt(name).render(**FIELDS[name])
    return f"[system]\n{system}\n[user]\n{user}\n"


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_rendered_prompts_match_their_golden_files(name):
    """A prompt change is a change of what the data means: it must show up in review as a golden-file diff.
    Regenerate with UPDATE_GOLDEN=1 after reading the diff."""
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(rendered(name), encoding="utf-8")
    assert rendered(name) == path.read_text(encoding="utf-8")


def test_the_intern_is_asked_for_the_final_answer_only_and_never_sees_answer_or_record():
    text = rendered("intern")
    assert "<QUESTION>" in text and "<PREFIX>" in text
    assert "<ANSWER>" not in text and "<CASE-RECORD>" not in text
    assert "answer alone" in text and "### The final answer is:" in text and "### Step" not in text


@pytest.mark.parametrize(
    "rule, words",
    [
        ("rely only on the information given, invent nothing", ["Use only what is given", "Do not invent"]),
        ("reason as if the answer were unknown", ["does not yet know the answer", "Never say or hint that it was given"]),
        ("state image observations as read from the images", ["your own reading of them", "according to the"]),
        ("age, sex and complaint may be used", ["age, sex and presenting"]),
        ("fewer steps for simple cases, more for complex ones", ["a few steps for a simple question, more for a complex"]),
        ("continue the prefix unchanged, output only the continuation", ["Leave the steps above exactly as they are",
                                                                        "Write only what comes after them"]),
    ],
)
def test_the_mentor_prompt_carries_each_published_rule(rule, words):
    text = " ".join(rendered("mentor").split())
    for phrase in words:
        assert phrase in text, f"mentor prompt lost the rule: {rule}"


def test_published_defaults(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MICS_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.mentor_temperature == 1.2
    assert settings.mentor_max_tokens is None
    assert settings.mentor_image_max_side == 512 and settings.image_max_side == 1536
    assert settings.intern_temperatures == [1.2, 0.3]
    assert settings.intern_mode == "answer" and settings.strategy == "mics"
    # Published: the Qwen interns' processor's maximum (its minimum is left to the served processor); ours by
    # argued choice (README, fidelity table): a judge budget of 16 tokens, no path opening, images first for
    # mentors too, loose final-answer lines.
    assert (settings.intern_image_min_pixels, settings.intern_image_max_pixels) == (0, 1280 * 28 * 28)
    assert settings.judge_max_tokens == 16 and settings.path_opening == ""
    assert settings.mentor_images_first is True and settings.intern_answer_line == "loose"
    monkeypatch.setenv("MICS_MENTOR_MAX_TOKENS", "")
    assert load_settings().mentor_max_tokens is None
    monkeypatch.setenv("MICS_INTERN_MODE", "continue")
    assert load_settings().intern_mode == "continue"


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 60, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_mentors_get_images_at_512_px_and_interns_at_their_own_size(tmp_path):
    (tmp_path / "scan.png").write_bytes(png(1200, 800))
    mentor_sizes, intern_sizes = [], []

    def size_of(request) -> tuple[int, int]:
        [image] = request.messages[-1].images()
        return Image.open(io.BytesIO(image.data)).size

    def mentor(name):
        def reply(request):
            mentor_sizes.append(size_of(request))
            return "### Step 1: a\n\n### Step 2: b\n\n### The final answer is: Yes"
        return FunctionModel(name, reply)

    def intern(request):
        intern_sizes.append(size_of(request))
        return "### The final answer is: Yes"

    searcher = Searcher(mentors=[mentor("m/a"), mentor("m/b")], interns=[FunctionModel("i/1", intern)],
                        judge=simulated_judge(), settings=load_settings(cache_path=None))
    result = await searcher.search("Is there an effusion?", tmp_path / "scan.png", answer="Yes", rid="r")
    assert result.status == "success"
    assert set(mentor_sizes) == {(512, 341)} and set(intern_sizes) == {(1200, 800)}


async def test_continue_mode_asks_interns_for_their_steps_and_changes_the_prompt_version():
    answer_settings = load_settings(cache_path=None)
    continue_settings = load_settings(cache_path=None, intern_mode="continue")
    model = FunctionModel("i", lambda request: "### Step 1: x\n### The final answer is: y")
    case = Case(rid="r", question="Q?", answer="A")
    await Intern(model, answer_settings).finish(case, ["s"], 0.3, 0)
    await Intern(model, continue_settings).finish(case, ["s"], 0.3, 0)
    answer_request, continue_request = model.requests
    assert "answer alone" in answer_request.messages[-1].plain_text()
    assert "### Step k" in continue_request.messages[-1].plain_text()
    assert answer_request.prompt_version != continue_request.prompt_version


def write_cases(folder: Path, count: int) -> Path:
    (folder / "scan.png").write_bytes(png(32, 32))
    path = folder / "cases.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"c{i}", "question": f"Case {i}: what is the diagnosis?", "answer": f"Disease {i}",
                    "images": ["scan.png"], "case_info": f"note {i}"}) + "\n"
        for i in range(count)
    ))
    return path


class _Counted:
    def __init__(self, model: FunctionModel) -> None:
        self.model = model

    @property
    def calls(self) -> int:
        return len(self.model.requests)


async def run_arm(tmp_path: Path, strategy: str, data: Path) -> tuple[Path, dict[str, FunctionModel]]:
    models = {"m/a": simulated_mentor("m/a"), "m/b": simulated_mentor("m/b"), "i/1": simulated_intern("i/1")}
    searcher = Searcher(mentors=[models["m/a"], models["m/b"]], interns=[models["i/1"]], judge=simulated_judge(),
                        settings=load_settings(cache_path=None), strategy=strategy)
    output = tmp_path / f"{strategy}.jsonl"
    stats = await BatchRun(searcher, RunOptions(data=data, output=output, image_dir=tmp_path)).run()
    assert stats.ended == 5
    return output, models


async def test_the_vanilla_arm_asks_one_mentor_once_and_scores_the_whole_path(tmp_path):
    data = write_cases(tmp_path, 5)
    output, models = await run_arm(tmp_path, "vanilla", data)
    assert len(models["m/a"].requests) == 5 and models["m/b"].requests == []
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 5
    for record in records:
        steps = record["reasoning"].count("### Step ")
        assert record["strategy"] == "vanilla" and record["trend"] is None
        assert record["final_depth"] == str(steps) and record["generated_by"] == ["m/a"]
        assert record["search_id"] == ("1" if record["mics_score"] == 1.0 else "0")
        [node] = record["tree"]
        assert node["steps"] and len(node["steps"]) == steps
    # Interns were shown every step of the mentor's solution, never its final-answer line.
    prefixes = [request.messages[-1].plain_text() for request in models["i/1"].requests]
    assert all("### Step 1:" in text and "The final answer is: Disease" not in text for text in prefixes)


async def test_quality_control_leaves_vanilla_paths_out_unless_asked(tmp_path):
    from mics_agents.dataset.qc import QcOptions, quality_control

    vanilla = {"rid": "v", "strategy": "vanilla", "search_id": "1", "final_depth": "4", "trend": None,
               "reasoning": "### Step 1: x\n### The final answer is: A",
               "final_answer_grade": {"answer": "A", "correct": True, "judged_by": "exact", "grader_version": 2}}
    assert quality_control([vanilla]).dropped == {"vanilla": 1}
    assert [r["rid"] for r in quality_control([vanilla], QcOptions(include_vanilla=True)).kept] == ["v"]


async def test_the_comparison_lists_both_arms(tmp_path):
    from typer.testing import CliRunner

    from mics_agents.cli import app

    data = write_cases(tmp_path, 5)
    mics_output, _ = await run_arm(tmp_path, "mics", data)
    vanilla_output, _ = await run_arm(tmp_path, "vanilla", data)
    result = CliRunner().invoke(app, ["compare", str(mics_output), str(vanilla_output), "-o", str(tmp_path / "cmp.md")])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "cmp.md").read_text()
    assert "`mics.jsonl` (mics)" in table and "`vanilla.jsonl` (vanilla)" in table
    for row in ("full-score paths", "mean MICS-Score", "depth", "trend", "kept by quality control",
                "calls per kept path", "cost per kept path"):
        assert f"| {row} |" in table
    mixed = CliRunner().invoke(app, ["compare", str(mics_output), str(tmp_path)])
    assert mixed.exit_code == 1 and "not both" in " ".join(mixed.output.split())


async def test_a_parameter_the_model_refuses_is_dropped_and_named_once(tmp_path, monkeypatch, caplog):
    """o-series models take no temperature but 1: LiteLLM's drop_params sends the call without it, on the
    real HTTP path, and the log says so once for the model."""
    import logging

    from mics_agents.models import ChatMessage, ModelRequest
    from mics_agents.models.factory import open_models

    from .openai_server import OpenAIServer

    with OpenAIServer(lambda model, body: "### The final answer is: yes") as server:
        monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        # On LiteLLM's path (a local openai/ endpoint would go direct under MICS_TRANSPORT=auto).
        settings = load_settings(cache_path=None, max_retries=0, transport="litellm")
        [model] = open_models(["openai/o3-mini"], settings, None)
        try:
            with caplog.at_level(logging.WARNING, logger="mics_agents"):
                for temperature in (1.2, 0.3):
                    request = ModelRequest(messages=(ChatMessage.text("user", "Is it?"),), temperature=temperature,
                                           max_tokens=32)
                    assert (await model.request(request)).text.endswith("yes")
        finally:
            await model.aclose()
        bodies = [record.body for record in server.recorded()]
    assert len(bodies) == 2 and all("temperature" not in body for body in bodies)
    named = [r for r in caplog.records if "o3-mini" in r.getMessage() and "temperature" in r.getMessage()]
    assert len(named) == 1


async def test_a_caption_that_is_not_text_is_bad_input_for_search_too():
    from mics_agents.errors import InputError

    searcher = Searcher(mentors=[simulated_mentor("m/a"), simulated_mentor("m/b")], interns=[simulated_intern("i")],
                        judge=simulated_judge(), settings=load_settings(cache_path=None))
    with pytest.raises(InputError, match="caption"):
        await searcher.search("Q?", answer="A", case_info={"caption": 5})
