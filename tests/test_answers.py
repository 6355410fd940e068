"""Parsing of steps, final answers, option lists and judge verdicts (grading rules: test_grading.py)."""

import pytest

from mics_agents.answers import parse_options, parse_solution, parse_verdict, render_steps
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


def test_option_lists():
    question = "Which?\nA. Cyst\n(B) Hepatocellular carcinoma\nC) Hemangioma\nD: Abscess"
    options = parse_options(question)
    assert options == {"A": "Cyst", "B": "Hepatocellular carcinoma", "C": "Hemangioma", "D": "Abscess"}
    # Prose that happens to contain "A." is not a list of options.
    assert parse_options("A. single line only") == {}
    assert parse_options("Options:\nB. x\nC. y") == {}
    assert parse_options("E. coli pyelonephritis or\nF. something") == {}


@pytest.mark.parametrize("reply, verdict", [("Yes", True), ("no.", False), ("**Yes**, same", True), ("'No'", False)])
def test_verdicts_are_read_strictly(reply, verdict):
    assert parse_verdict(reply) is verdict


@pytest.mark.parametrize("reply", ["The answer is yes", "Not sure", "yesterday", "", "I would say no"])
def test_a_verdict_must_start_with_yes_or_no(reply):
    with pytest.raises(MalformedReplyError):
        parse_verdict(reply)


# -- the published exact final-answer line (MICS_INTERN_ANSWER_LINE=exact) ---------------------------------


def test_the_exact_line_takes_only_the_published_marker():
    from mics_agents.answers import extract_exact_final_answer

    assert extract_exact_final_answer("### The final answer is: B. HCC") == "B. HCC"
    assert extract_exact_final_answer("x\n### The final answer is: A\n### The final answer is: **C**") == "C"
    for loose in ("**The final answer is:** B", "### The Final Answer is: B", "###The final answer is: B",
                  "The final answer is: B", "### The final answer is B", "B"):
        assert extract_exact_final_answer(loose) is None, loose
        assert parse_solution(loose).final_answer in (None, "B")  # the loose reader takes what it can
    assert extract_exact_final_answer("### The final answer is:   \n") is None  # a marker with nothing after it
