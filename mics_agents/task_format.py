"""The one task format a trained model sees in training and in evaluation: the question, then the same
instruction (``prompts/eval.md``), and a target that ends with ``### The final answer is: <answer>``.

``mics dataset build`` writes every question-answer sample's prompt with :func:`task_prompt` and its
target with :func:`final_answer_line`; ``mics eval`` sends :func:`task_prompt` and reads that line. A model
is therefore never penalised for the format it was taught.
"""

from __future__ import annotations

from pathlib import Path

from .prompts import load_prompt

__all__ = [
    "ANSWER_HINTS",
    "task_prompt",
    "image_labels",
    "strip_task_instruction",
    "final_answer_line",
    "task_template_version",
    "write_task_format",
]

# What the final-answer line should hold, by answer type.
ANSWER_HINTS = {"choice": " (the letter of one option)", "closed": " (yes or no)", "open": ""}


def task_prompt(question: str, answer_type: str = "open", prompt_dir: Path | None = None) -> str:
    """The user turn for ``question``: the question, then the instruction with its answer hint."""
    system, user = load_prompt("eval", prompt_dir).render(
        question=question.strip(), answer_hint=ANSWER_HINTS.get(answer_type, "")
    )
    return f"{system}\n\n{user}" if system else user


def image_labels(count: int) -> tuple[list[str], str]:
    """The text before each of ``count`` images and the text between the last image and the prompt.

    Several images are named ``Image-1``, ``Image-2``, ... where they stand (InternVL's multi-image
    convention, the one the LLaVA, ShareGPT and InternVL exports write: ``Image-1: <image>\nImage-2: <image>\n``),
    so a target or a question that says "Image 2" points at a known image; one image, or none, is not named.
    """
    if count < 2:
        return [""] * count, ""
    return ["Image-1: ", *(f"\nImage-{index}: " for index in range(2, count + 1))], "\n"


def strip_task_instruction(text: str, prompt_dir: Path | None = None) -> str:
    """The question inside a user turn :func:`task_prompt` wrote (a curriculum sample read back for
    evaluation); text without the instruction is returned as it is."""
    marker = "\x00QUESTION\x00"
    for answer_type in ANSWER_HINTS:
        before, after = task_prompt(marker, answer_type, prompt_dir).split(marker, 1)
        if text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after):
            return text[len(before) : len(text) - len(after)].strip()
    return text.strip()


def final_answer_line(answer: str) -> str:
    return f"### The final answer is: {answer.strip()}"


def task_template_version(prompt_dir: Path | None = None) -> str:
    """The instruction's version, recorded in model cards and evaluation results."""
    return load_prompt("eval", prompt_dir).version


def write_task_format(path: Path, prompt_dir: Path | None = None) -> None:
    """Record the task format a curriculum was built with (``curriculum/task_format.json``), for the model card."""
    import json

    record = {
        "template": "eval",
        "template_version": task_template_version(prompt_dir),
        "user_turn": task_prompt("<question>", "open", prompt_dir),
        "answer_hints": ANSWER_HINTS,
        "target_ends_with": final_answer_line("<answer>"),
    }
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
