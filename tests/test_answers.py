"""Parsing of steps, final answers, option letters and judge verdicts."""

import pytest

from mics_agents.answers import (
    answer_letter,
    normalize_answer,
    parse_options,
    parse_solution,
    parse_verdict,
    quick_verdict,
    render_steps,
)
from mics_agents.errors import MalformedReplyError


def test_steps_and_answer_in_loose_formats():
    reply = (
        "Let me think this through.\n"
        "### Step 1: The CT shows a mass.\n"
        "**Step 2:** It enhances in the arterial phase.\n"
        "###Step3 It washes out.\n"
        "### **Step 4**: Cirrhosis is known.\n"
        "### The Final Answer is: **B. HCC**\n"
    )
    solution = parse_solution(reply)
    assert solution.steps == [
        "The CT shows a mass.",
        "It enhances in the arterial phase.",
        "It washes out.",
        "Cirrhosis is known.",
    ]
    assert solution.final_answer == "B. HCC"


@pytest.mark.parametrize(
    "reply, answer",
    [
        ("### The final answer is: Pneumonia", "Pneumonia"),
        ("###the final answer is:pneumonia", "pneumonia"),
        ("**The final answer is:** $\\boxed{C}$", "C"),
        ("THE FINAL ANSWER IS\n\n  Yes  \nbecause ...", "Yes"),
        ("no marker here", None),
        ("### The final answer is:   ", None),
    ],
)
def test_final_answer_extraction(reply, answer):
    assert parse_solution(reply).final_answer == answer


def test_answer_inside_a_step_header_is_not_a_step():
    solution = parse_solution("### Step 1: Findings.\n### Step 2: The final answer is B")
    assert solution.steps == ["Findings."]
    assert solution.final_answer == "B"


def test_render_steps_renumbers():
    assert render_steps(["a", "b"], start=3) == "### Step 3: a\n\n### Step 4: b"
    assert render_steps([]) == ""


def test_options_and_letters():
    question = "Which?\nA. Cyst\n(B) Hepatocellular carcinoma\nC) Hemangioma\nD: Abscess"
    options = parse_options(question)
    assert options == {"A": "Cyst", "B": "Hepatocellular carcinoma", "C": "Hemangioma", "D": "Abscess"}
    assert answer_letter("B", options) == "B"
    assert answer_letter("(C)", options) == "C"
    assert answer_letter("**D.** Abscess", options) == "D"
    assert answer_letter("The answer is A", options) == "A"
    assert answer_letter("hepatocellular carcinoma.", options) == "B"
    assert answer_letter("E", options) is None
    assert answer_letter("A 45-year-old man", {}) is None
    # Prose that happens to contain "A." is not a list of options.
    assert parse_options("A. single line only") == {}
    assert parse_options("Options:\nB. x\nC. y") == {}


def test_quick_verdicts():
    mc = "Which?\nA. Cyst\nB. HCC\nC. Hemangioma"
    assert quick_verdict(mc, "(B)", "B. HCC") == (True, "option")
    assert quick_verdict(mc, "HCC", "B") == (True, "option")
    assert quick_verdict(mc, "C", "B. HCC") == (False, "option")
    assert quick_verdict("Is there washout?", "**Yes.**", "yes") == (True, "exact")
    # Open questions with different wording go to the judge.
    assert quick_verdict("Diagnosis?", "hepatocellular carcinoma", "HCC") is None
    # Letters without parsed options only count when equal.
    assert quick_verdict("Pick one", "B", "C") is None


def test_normalize_answer():
    assert normalize_answer("  **The answer is: Brain  Abscess.** ") == "brain abscess"


@pytest.mark.parametrize("reply, verdict", [("Yes", True), ("no.", False), ("**Yes**, same", True), ("'No'", False)])
def test_verdicts_are_read_strictly(reply, verdict):
    assert parse_verdict(reply) is verdict


@pytest.mark.parametrize("reply", ["The answer is yes", "Not sure", "yesterday", "", "I would say no"])
def test_a_verdict_must_start_with_yes_or_no(reply):
    with pytest.raises(MalformedReplyError):
        parse_verdict(reply)
