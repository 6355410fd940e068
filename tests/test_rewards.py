"""The grpo stage's rewards against hand-made completions: the grader's verdicts, the format rule, and judge outages
(None for every reward of that completion, counted, the next batch graded as usual)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mics_agents import load_settings
from mics_agents.errors import ModelCallError, ModelRequestsForbidden
from mics_agents.models import FunctionModel
from training.rewards import GraderRewards, completion_text, format_reward

from .openai_server import OpenAIServer, request_from_openai

OPTIONS_QUESTION = "Which organism grows?\nA. E. coli\nB. E. faecalis\nC. Klebsiella"
OPEN_QUESTION = "Urine grows Gram-positive cocci in chains. Which organism?"


def line(answer: str) -> str:
    return f"### Step 1: Read the culture.\n\n### The final answer is: {answer}"


def as_message(text: str) -> list[dict]:
    """A completion as TRL passes a conversational one."""
    return [{"role": "assistant", "content": text}]


def judge_by(verdict):
    """A judge test double: ``verdict(candidate, reference)`` says Yes or No; the candidate and reference are read
    from the judge prompt's sections."""

    def reply(request) -> str:
        text = request.messages[-1].plain_text()
        return "Yes" if verdict(_section(text, "Candidate answer"), _section(text, "Reference answer")) else "No"

    return reply


def _section(text: str, heading: str) -> str:
    import re

    match = re.search(rf"^## {heading}[^\n]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1).strip().split("\n\n")[0] if match else ""


def settings(tmp_path, **overrides):
    values = {"cache_path": tmp_path / "cache.sqlite", "max_retries": 0, "judge_attempts": 1}
    values.update(overrides)
    return load_settings(**values)


async def both(rewards: GraderRewards, completions, questions, answers, **kwargs):
    """accuracy and format as TRL calls them: concurrently, on one loop, with the same lists."""
    prompts = [[{"role": "user", "content": q}] for q in questions]
    metrics: list[tuple[str, float]] = []
    accuracy_reward, format_reward_function = rewards.functions(["accuracy", "format"])
    accuracy, form = await asyncio.gather(
        accuracy_reward(prompts, completions, question=questions, answer=answers,
                        log_metric=lambda name, value: metrics.append((name, value)), **kwargs),
        format_reward_function(prompts, completions, question=questions, answer=answers, **kwargs),
    )
    return accuracy, form, dict(metrics)


# --- the format rule ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("### The final answer is: B", 1.0),  # answer-only items have no steps
        (line("E. coli") + "\n\n", 1.0),  # trailing blank lines are the end all the same
        ("### Step 1: look.", 0.0),  # no final-answer line
        ("### The final answer is: A\n### The final answer is: B", 0.0),  # two of them
        ("The final answer is: A\n\n### The final answer is: B", 0.0),  # a second one, worded loosely
        ("### The final answer is: B\nbecause of the chains", 0.0),  # not at the end
        ("### The final answer is:", 0.0),  # no answer after it
        ("### the final answer is: B", 0.0),  # not the line the curriculum taught
        ("### The final answer is: B. The final answer is: C", 0.0),  # two answers on one line
        ("", 0.0),
    ],
)
def test_the_format_reward(text, expected):
    assert format_reward(text) == expected


def test_completion_text_reads_every_shape_and_repairs_broken_bytes():
    assert completion_text("plain") == "plain"
    assert completion_text(as_message("x")) == "x"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == "ab"
    repaired = completion_text("\udcff\udcfe answer")
    repaired.encode("utf-8")  # would raise on a lone surrogate
    assert repaired.endswith(" answer") and "\ufffd" in repaired


# --- accuracy by the grader's rules (no judge) ----------------------------------------------------------------------


async def test_rule_verdicts_cost_nothing_and_an_option_letter_is_the_option():
    rewards = GraderRewards()
    completions = [
        as_message(line("E. faecalis")),  # exact
        as_message(line("B")),  # the option letter of the reference's text
        as_message(line("A. E. coli")),  # another option: shares the initial, is wrong
        as_message("### Step 1: chains of cocci."),  # no final-answer line
    ]
    questions = [OPTIONS_QUESTION] * 4
    accuracy, form, metrics = await both(rewards, completions, questions, ["E. faecalis"] * 4)
    assert accuracy == [1.0, 1.0, 0.0, 0.0]
    assert form == [1.0, 1.0, 1.0, 0.0]
    assert rewards.counts == {"exact": 1, "option": 2, "unparsed": 1}
    assert metrics == {"accuracy/unscored": 0.0, "accuracy/by_judge": 0.0}


async def test_without_a_judge_a_shared_initial_is_not_the_answer():
    """No options parsed: "E." is part of the answer; without a judge the open answer gets recall, never a verdict
    from a substring or an initial."""
    rewards = GraderRewards()
    accuracy, _, _ = await both(
        rewards, [as_message(line("E. coli")), as_message(line("Enterococcus faecalis"))], [OPEN_QUESTION] * 2,
        ["E. faecalis"] * 2,
    )
    assert accuracy == [0.5, 0.5]  # one of the reference's two tokens each ("e" / "faecalis")
    assert rewards.counts == {"recall": 2}


async def test_garbage_bytes_and_two_final_answer_lines():
    rewards = GraderRewards()
    garbage = "\x00\udcff\ufffd\x1b[31m" + bytes(range(200, 256)).decode("latin-1")
    completions = [
        garbage,  # a plain-string completion of junk
        as_message(f"### The final answer is: {garbage}"),  # a marker followed by junk
        as_message("### The final answer is: E. coli\n### The final answer is: E. faecalis"),
    ]
    accuracy, form, _ = await both(rewards, completions, [OPEN_QUESTION] * 3, ["E. faecalis"] * 3)
    assert accuracy[0] == 0.0 and accuracy[1] == 0.0
    assert accuracy[2] == 1.0  # the last answer is the one read, as everywhere
    # Junk after one marker at the end has the taught shape (format) and is wrong (accuracy): the two apart.
    assert form == [0.0, 1.0, 0.0]


async def test_format_alone_asks_no_judge(tmp_path):
    def reply(request):
        raise AssertionError("format alone must not grade")

    rewards = GraderRewards(settings=settings(tmp_path), judge_model=FunctionModel("judge", reply))
    [only_format] = rewards.functions(["format"])
    assert await only_format([], [as_message(line("Enterococcus"))], question=[OPEN_QUESTION], answer=["x"]) == [1.0]
    assert not rewards.counts


def test_unknown_reward_names_are_refused():
    with pytest.raises(ValueError, match="accuracy, format"):
        GraderRewards().functions(["accuracy", "length"])
    assert [f.__name__ for f in GraderRewards().functions(["format", "accuracy"])] == ["format", "accuracy"]


# --- the judge -----------------------------------------------------------------------------------------------------


async def test_the_judge_decides_what_the_rules_leave_open(tmp_path):
    judge = FunctionModel("judge", judge_by(lambda candidate, reference: candidate == "Enterococcus faecalis"))
    rewards = GraderRewards(settings=settings(tmp_path), judge_model=judge)
    try:
        accuracy, _, metrics = await both(
            rewards,
            [as_message(line("E. coli")), as_message(line("Enterococcus faecalis")), as_message(line("E. faecalis"))],
            [OPEN_QUESTION] * 3,
            ["E. faecalis"] * 3,
        )
    finally:
        await rewards.aclose()
    assert accuracy == [0.0, 1.0, 1.0]
    assert rewards.counts == {"judge": 2, "exact": 1}
    assert metrics["accuracy/by_judge"] == pytest.approx(2 / 3)


async def test_a_judge_outage_leaves_the_completion_out_and_the_next_batch_is_graded(tmp_path):
    outage = {"on": True}

    def reply(request):
        if outage["on"]:
            raise ModelCallError("judge: timed out after 0 retries", model="judge")
        return judge_by(lambda candidate, reference: True)(request)

    rewards = GraderRewards(settings=settings(tmp_path), judge_model=FunctionModel("judge", reply))
    questions, answers = [OPEN_QUESTION] * 3, ["E. faecalis"] * 3
    try:
        first = [as_message(line("Enterococcus")), as_message(line("E. faecalis")), as_message("no answer")]
        accuracy, form, metrics = await both(rewards, first, questions, answers)
        # Not wrong: unknown, and every reward of it None, so TRL leaves it out of its group.
        assert accuracy == [None, 1.0, 0.0]
        assert form == [None, 1.0, 0.0]
        assert rewards.counts["unscored"] == 1
        assert metrics["accuracy/unscored"] == pytest.approx(1 / 3)

        outage["on"] = False
        second = [as_message(line("Enterococcus")), as_message(line("E. faecalis")), as_message("no answer")]
        accuracy, form, _ = await both(rewards, second, questions, answers)
        assert accuracy == [1.0, 1.0, 0.0] and form == [1.0, 1.0, 0.0]
        assert rewards.counts["unscored"] == 1
    finally:
        await rewards.aclose()


async def test_a_forbidden_request_is_an_error_not_an_outage(tmp_path):
    def reply(request):
        raise ModelRequestsForbidden("real model requests are switched off")

    rewards = GraderRewards(settings=settings(tmp_path), judge_model=FunctionModel("judge", reply))
    try:
        with pytest.raises(ModelRequestsForbidden):
            await both(rewards, [as_message(line("Enterococcus"))], [OPEN_QUESTION], ["E. faecalis"])
    finally:
        await rewards.aclose()


# --- over real HTTP, cached in the project's store, on TRL's own loop -----------------------------------------------


@pytest.fixture
def point_litellm_at(monkeypatch):
    def point(server: OpenAIServer) -> None:
        monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    return point


def _judge_reply(model: str, body: dict) -> str:
    text = request_from_openai(body).messages[-1].plain_text()
    return "Yes" if _section(text, "Candidate answer") == "Enterococcus faecalis" else "No"


def test_the_judge_over_http_on_trls_loop_is_cached_and_closed_there(tmp_path, point_litellm_at):
    """TRL runs async rewards on a daemon thread's loop: the store and clients open there on the first call, the
    second trainer's judge answers from the cache, and close() from the main thread closes them on that loop."""
    from trl.trainer.utils import shutdown_event_loop_in_daemon, start_event_loop_in_daemon

    thread, loop, ready = start_event_loop_in_daemon()
    ready.wait()
    completions = [as_message(line("Enterococcus faecalis")), as_message(line("E. coli"))]
    questions, answers = [OPEN_QUESTION] * 2, ["E. faecalis"] * 2
    try:
        with OpenAIServer(_judge_reply) as server:
            point_litellm_at(server)
            config = settings(tmp_path, request_timeout=10.0)
            for run in range(2):
                rewards = GraderRewards("openai/judge", settings=config)
                accuracy, form, _ = asyncio.run_coroutine_threadsafe(
                    both(rewards, completions, questions, answers), loop
                ).result(30)
                assert accuracy == [1.0, 0.0] and form == [1.0, 1.0]
                assert server.count("openai/judge") == 2  # the second run asked nothing
                assert rewards._loop is loop and threading.current_thread() is not thread
                with pytest.raises(RuntimeError, match="another event loop"):
                    asyncio.run(rewards.accuracy([], completions, question=questions, answer=answers))
                store = rewards._resources[-1]
                rewards.close()
                assert rewards._resources == [] and store._db._connection is None  # closed on its loop
    finally:
        shutdown_event_loop_in_daemon(thread, loop)


def test_a_judge_that_times_out_over_http_is_counted_not_wrong(tmp_path, point_litellm_at):
    from trl.trainer.utils import shutdown_event_loop_in_daemon, start_event_loop_in_daemon

    thread, loop, ready = start_event_loop_in_daemon()
    ready.wait()
    try:
        with OpenAIServer(_judge_reply) as server:
            point_litellm_at(server)
            server.inject("timeout", model="openai/judge", times=None, delay=3.0)
            rewards = GraderRewards("openai/judge", settings=settings(tmp_path, request_timeout=0.5, judge_timeout=0.5))
            accuracy, form, metrics = asyncio.run_coroutine_threadsafe(
                both(rewards, [as_message(line("Enterococcus faecalis")), as_message(line("E. faecalis"))],
                     [OPEN_QUESTION] * 2, ["E. faecalis"] * 2),
                loop,
            ).result(60)
            rewards.close()
        assert accuracy == [None, 1.0] and form == [None, 1.0]
        assert rewards.counts["unscored"] == 1 and metrics["accuracy/unscored"] == 0.5
    finally:
        shutdown_event_loop_in_daemon(thread, loop)
