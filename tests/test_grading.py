"""The grading rules (mics_agents.grading), each tried with the inputs most likely to fool it."""

from __future__ import annotations

import pytest

from mics_agents.grading import (
    GRADER_VERSION,
    Grader,
    grade_by_rules,
    leading_yes_no,
    normalize,
    resolve_option,
    token_recall,
)

MC = "Which lesion is shown?\nA. Simple cyst\nB. Hepatocellular carcinoma\nC. Hemangioma\nD. E. coli abscess"
MC_PAREN = "Best next step?\n(A) CT angiography\n(B) MRI\n(C) Observation"
OPEN = "What is the most likely diagnosis?"
YN = "Is there a pneumothorax?"
JUDGE = None  # the rules leave it open: a judge (or, without one, recall) decides

# (question, candidate, reference, expected) with expected = (correct, how) or JUDGE.
CASES = [
    # exact, after normalisation
    (OPEN, "Brain abscess", "brain abscess", (True, "exact")),
    (OPEN, "  **The answer is: Brain  Abscess.** ", "Brain abscess", (True, "exact")),
    (OPEN, "The pancreas", "pancreas", (True, "exact")),
    (OPEN, "an aneurysm", "Aneurysm.", (True, "exact")),
    (OPEN, "5mm", "5 mm", (True, "exact")),
    (OPEN, "\\boxed{Pneumonia}", "pneumonia", (True, "exact")),
    # an article inside an answer is part of it: "hepatitis A" is not "hepatitis"
    (OPEN, "Hepatitis", "Hepatitis A", JUDGE),
    (OPEN, "Type aortic dissection", "Type A aortic dissection", JUDGE),
    (OPEN, "Vitamin A deficiency", "Vitamin deficiency", JUDGE),
    (OPEN, "Left", "left.", (True, "exact")),
    # abbreviated genera: a leading "E." without options is part of the answer
    (OPEN, "E. faecalis endocarditis", "E. coli pyelonephritis", JUDGE),
    (OPEN, "E. coli", "E. coli pyelonephritis", JUDGE),
    (OPEN, "S. aureus", "S. epidermidis", JUDGE),
    (OPEN, "B. fragilis", "B", JUDGE),
    (OPEN, "A", "A. baumannii", JUDGE),
    # letters are only letters when the options were parsed
    ("Pick one", "B", "C", JUDGE),
    # options by letter, by text, and mixed
    (MC, "B", "B. Hepatocellular carcinoma", (True, "option")),
    (MC, "(B)", "B", (True, "option")),
    (MC, "**B.** Hepatocellular carcinoma", "B", (True, "option")),
    (MC, "hepatocellular carcinoma", "B", (True, "option")),
    (MC, "The answer is B", "B. Hepatocellular carcinoma", (True, "option")),
    (MC, "Option C", "B", (False, "option")),
    (MC, "C. Hemangioma", "B. Hepatocellular carcinoma", (False, "option")),
    (MC, "Simple cyst", "B", (False, "option")),
    (MC, "(b)", "B. Hepatocellular carcinoma", (True, "option")),
    (MC, "E. coli abscess", "D", (True, "option")),  # an option's text that starts like a letter
    (MC, "E", "D", JUDGE),  # not an option: the judge says what it means
    (MC, "B. Hemangioma", "B", JUDGE),  # a letter and another option's text contradict each other
    (MC, "a cyst", "A", JUDGE),  # lower-case prose is not the letter a
    (MC_PAREN, "(A) CT angiography", "A", (True, "option")),
    (MC_PAREN, "MRI", "(B) MRI", (True, "option")),
    (MC_PAREN, "observation", "A", (False, "option")),
    # yes/no questions: the candidate's leading yes or no decides
    (YN, "No.", "no", (True, "exact")),
    (YN, "No, the lung is fully expanded", "no", (True, "yes_no")),
    (YN, "Yes, it is not normal", "no", (False, "yes_no")),
    (YN, "**Yes** - a small apical one", "yes", (True, "yes_no")),
    (YN, "Normal", "no", JUDGE),
    (YN, "None seen", "no", JUDGE),
    (YN, "Not excluded", "no", JUDGE),
    (YN, "Nothing abnormal", "no", JUDGE),
    (YN, "no-reflow phenomenon", "no", JUDGE),
    (YN, "Yesterday's film showed one", "yes", JUDGE),
    (YN, "It is present", "yes", JUDGE),
    # modality and anatomy words inside longer answers are not matches
    ("Which modality?", "MRI showing an infarct", "ct", JUDGE),
    ("Which modality?", "CT", "ct", (True, "exact")),
    ("Which organ?", "Liver and spleen", "liver", JUDGE),
    # numbers, units, negations
    (OPEN, "5 cm", "5 mm", JUDGE),
    (OPEN, "15 mm", "5 mm", JUDGE),
    (OPEN, "No fracture", "Fracture", JUDGE),
    (OPEN, "Fracture of the pacemaker lead", "Pacemaker lead fracture", JUDGE),
    (OPEN, "", "pneumonia", (False, "unparsed")),
]


@pytest.mark.parametrize("question, candidate, reference, expected", CASES)
def test_rules(question, candidate, reference, expected):
    grade = grade_by_rules(question, candidate, reference)
    if expected is JUDGE:
        assert grade is None, f"{candidate!r} vs {reference!r} was decided by {grade}"
    else:
        assert grade is not None, f"{candidate!r} vs {reference!r} was left open"
        assert (grade.correct, grade.judged_by) == expected
        assert grade.version == GRADER_VERSION


def test_the_table_is_big_enough():
    assert len(CASES) >= 40


class _RecordingJudge:
    def __init__(self, verdict: bool) -> None:
        self.verdict = verdict
        self.asked: list[tuple[str, str]] = []

    async def ask(self, question, candidate, reference):
        self.asked.append((candidate, reference))
        return self.verdict, ()


async def test_the_judge_decides_what_the_rules_leave_open_and_only_that():
    judge = _RecordingJudge(False)
    grader = Grader(judge)
    grade = await grader.grade(OPEN, "E. faecalis endocarditis", "E. coli pyelonephritis")
    assert (grade.correct, grade.judged_by) == (False, "judge")
    assert judge.asked == [("E. faecalis endocarditis", "E. coli pyelonephritis")]
    exact = await grader.grade(OPEN, "brain abscess", "Brain abscess")
    assert exact.judged_by == "exact" and len(judge.asked) == 1


async def test_a_paraphrase_is_right_when_the_judge_says_so():
    grade = await Grader(_RecordingJudge(True)).grade(OPEN, "Fracture of the pacemaker lead", "Pacemaker lead fracture")
    assert (grade.correct, grade.judged_by) == (True, "judge")


async def test_without_a_judge_open_answers_get_recall_and_no_verdict():
    grader = Grader(None)
    grade = await grader.grade("Which modality?", "MRI showing an infarct", "ct")
    assert grade.correct is None and grade.judged_by == "recall" and grade.recall == 0.0
    partial = await grader.grade(OPEN, "right lower lobe pneumonia", "pneumonia of the left lower lobe")
    assert partial.correct is None and partial.recall == pytest.approx(3 / 6)


async def test_without_a_judge_a_yes_no_question_needs_a_leading_yes_or_no():
    grade = await Grader(None).grade(YN, "Normal", "no")
    assert (grade.correct, grade.judged_by) == (False, "yes_no")


async def test_given_options_count_even_when_the_question_does_not_list_them():
    options = {"A": "Cyst", "B": "Abscess"}
    grade = await Grader(None).grade("Which lesion?", "abscess", "B", options)
    assert (grade.correct, grade.judged_by) == (True, "option")


@pytest.mark.parametrize(
    "text, expected",
    [("No.", "no"), ("yes, small", "yes"), ("(No)", "no"), ("**YES**", "yes"), ("Normal", None),
     ("None", None), ("Not seen", None), ("no-reflow", None), ("yes/no", None), ("", None)],
)
def test_leading_yes_no(text, expected):
    assert leading_yes_no(text) == expected


def test_resolve_option_refuses_contradictions_and_unknown_letters():
    options = {"A": "Cyst", "B": "Abscess", "C": "Tumour"}
    assert resolve_option("B) Abscess", options) == "B"
    assert resolve_option("B) Tumour", options) is None
    assert resolve_option("F", options) is None
    assert resolve_option("B", {}) is None


def test_normalize_keeps_a_lone_article_like_answer():
    assert normalize("A") == "a"
    assert normalize("The answer is: The Liver.") == "liver"


def test_token_recall_counts_reference_tokens():
    assert token_recall("left upper lobe", "left lobe") == 1.0
    assert token_recall("", "left lobe") == 0.0
    assert token_recall("anything", "") == 0.0
