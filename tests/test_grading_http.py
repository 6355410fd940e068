"""Grading in a real search over HTTP (LiteLLM -> tests/openai_server.py): who is asked, what is cached,
and what a cut-off or unparsable reply counts as."""

from __future__ import annotations

import re
import threading

import pytest

from mics_agents import Searcher, load_settings

from .openai_server import OpenAIServer, request_from_openai

pytestmark = pytest.mark.filterwarnings("ignore:Items .* using the `ReadOnly` qualifier:UserWarning")

QUESTION = "A 70-year-old woman has fever and flank pain; urine grows Gram-negative rods. Diagnosis?"
ANSWER = "E. coli pyelonephritis"
MENTOR_REPLY = (
    "### Step 1: Fever with flank pain points to the kidney.\n\n"
    "### Step 2: Gram-negative rods in urine make E. coli the usual cause.\n\n"
    f"### The final answer is: {ANSWER}"
)


def section(body: dict, heading: str) -> str:
    text = request_from_openai(body).messages[-1].plain_text()
    match = re.search(rf"^## {heading}[^\n]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1).strip().split("\n\n")[0] if match else ""


def settings(server: OpenAIServer, tmp_path, **overrides):
    values = {
        "mentors": ["openai/mentor-a", "openai/mentor-b"],
        "interns": ["openai/intern-1", "openai/intern-2"],
        "judge": "openai/judge",
        "cache_path": tmp_path / "cache.sqlite",
        "max_depth": 1,
        "max_retries": 0,
        "request_timeout": 10.0,
    }
    values.update(overrides)
    return load_settings(**values)


async def search_once(config):
    async with await Searcher.open(config) as searcher:
        return await searcher.search(QUESTION, answer=ANSWER, rid="uti-1")


@pytest.fixture
def point_litellm_at(monkeypatch):
    def point(server: OpenAIServer) -> None:
        monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    return point


async def test_a_different_species_with_the_same_initial_is_wrong_and_the_judge_decides(tmp_path, point_litellm_at):
    def brain(model: str, body: dict) -> str:
        if model.startswith("mentor"):
            return MENTOR_REPLY
        if model == "intern-1":
            return "### The final answer is: E. faecalis endocarditis"
        if model == "intern-2":
            return f"### The final answer is: {ANSWER}"
        return "Yes" if section(body, "Candidate answer") == ANSWER else "No"

    with OpenAIServer(brain) as server:
        point_litellm_at(server)
        result = await search_once(settings(server, tmp_path))
        judge_candidates = [section(r.body, "Candidate answer") for r in server.recorded("openai/judge")]
    samples = [sample for node in result.tree for sample in node.samples]
    by_intern = {(s.intern, s.temperature): (s.correct, s.judged_by) for s in samples}
    assert {key: value for key, value in by_intern.items() if key[0] == "openai/intern-1"} == {
        ("openai/intern-1", 1.2): (False, "judge"),
        ("openai/intern-1", 0.3): (False, "judge"),
    }
    assert all(value == (True, "exact") for key, value in by_intern.items() if key[0] == "openai/intern-2")
    # Each candidate: intern-2 right at both temperatures, intern-1 wrong at both.
    assert [node.score for node in result.tree] == [0.5, 0.5]
    assert judge_candidates and set(judge_candidates) == {"E. faecalis endocarditis"}
    assert result.final_answer_grade.correct is True and result.final_answer_grade.judged_by == "exact"
    assert result.to_record()["final_answer_grade"]["grader_version"] == result.grader_version


async def test_an_unparsable_verdict_is_not_cached_so_a_rerun_succeeds(tmp_path, point_litellm_at):
    judge_calls = 0
    lock = threading.Lock()

    def brain(model: str, body: dict) -> str:
        nonlocal judge_calls
        if model.startswith("mentor"):
            return MENTOR_REPLY
        if model.startswith("intern"):
            return "### The final answer is: Escherichia coli infection of the kidney"
        with lock:
            judge_calls += 1
            first_run = judge_calls <= 2
        return "It depends on the culture." if first_run else "Yes"

    with OpenAIServer(brain) as server:
        point_litellm_at(server)
        config = settings(server, tmp_path, interns=["openai/intern-1"], intern_temperatures=[0.3], judge_attempts=2)
        first = await search_once(config)
        assert first.status == "model_error" and "no Yes/No verdict" in first.message
        assert server.count("openai/judge") == 2
        second = await search_once(config)
        assert second.status == "success" and second.mics_score == 1.0
        # The judge was asked again (its bad replies were never stored), the interns were not.
        assert server.count("openai/judge") == 3
        assert server.count("openai/intern-1") == 1


async def test_a_cut_off_intern_reply_is_asked_again_with_twice_the_budget(tmp_path, point_litellm_at):
    def brain(model: str, body: dict) -> str:
        if model.startswith("mentor"):
            return MENTOR_REPLY
        if model == "intern-1":  # 25 words: cut at 16, whole at 32
            return " ".join(["thinking"] * 20) + f" ### The final answer is: {ANSWER}"
        if model == "intern-2":  # 45 words: cut at 16 and at 32
            return " ".join(["thinking"] * 40) + f" ### The final answer is: {ANSWER}"
        return "No"

    with OpenAIServer(brain) as server:
        point_litellm_at(server)
        result = await search_once(settings(server, tmp_path, intern_max_tokens=16, intern_temperatures=[0.3]))
        budgets = {
            model: sorted(r.body.get("max_tokens") for r in server.recorded(f"openai/{model}"))
            for model in ("intern-1", "intern-2")
        }
    # Both mentors wrote the same steps, so the interns saw one prompt (the cache answers the twin):
    # once at the budget, once at twice the budget.
    assert budgets == {"intern-1": [16, 32], "intern-2": [16, 32]}
    samples = [sample for node in result.tree for sample in node.samples]
    first = [s for s in samples if s.intern == "openai/intern-1"]
    second = [s for s in samples if s.intern == "openai/intern-2"]
    assert all(s.correct and not s.truncated and s.judged_by == "exact" for s in first)
    assert all(not s.correct and s.truncated and s.judged_by == "truncated" for s in second)
    assert all(node.score == 0.5 for node in result.tree)
    assert result.usage.truncated_samples == {"openai/intern-2": 2}


def test_the_run_summary_names_models_whose_replies_were_cut_off():
    from rich.console import Console

    from mics_agents.progress import summary_table
    from mics_agents.results import Usage
    from mics_agents.runner import RunStats

    stats = RunStats()
    usage = Usage()
    for _ in range(3):
        usage.add_truncated("openai/intern-2")
    stats.truncated_samples.update(usage.truncated_samples)
    console = Console(width=300, record=True)
    console.print(summary_table(stats, output="out.jsonl", failed="out_failed.jsonl"))
    text = " ".join(console.export_text().split())
    assert "cut off" in text and "openai/intern-2 3" in text and "MICS_INTERN_MAX_TOKENS" in text
    assert stats.as_dict()["truncated_samples"] == {"openai/intern-2": 3}


async def test_an_intern_reply_without_an_answer_line_is_wrong_without_asking_the_judge(tmp_path, point_litellm_at):
    def brain(model: str, body: dict) -> str:
        if model.startswith("mentor"):
            return MENTOR_REPLY
        if model == "intern-1":
            return f"I believe this is {ANSWER}."
        return f"### The final answer is: {ANSWER}"

    with OpenAIServer(brain) as server:
        point_litellm_at(server)
        result = await search_once(settings(server, tmp_path))
        assert server.count("openai/judge") == 0
    samples = [sample for node in result.tree for sample in node.samples if sample.intern == "openai/intern-1"]
    assert samples and all(
        not s.correct and not s.format_ok and s.judged_by == "unparsed" and s.answer == "" for s in samples
    )
