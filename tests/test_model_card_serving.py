"""The model card says how to serve what was trained at the image budget it was trained with, in commands that
are safe to paste (no GPU, no model: the card is rendered from a config and a manifest)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from training.config import CurriculumConfig
from training.manifest import Manifest
from training.model_card import render_model_card


def card(tmp_path: Path, image_budget: dict, *, merged: bool = False, base_model: str = "OpenGVLab/InternVL3-8B-hf") -> str:
    data = tmp_path / "stage1.jsonl"
    data.write_text("")
    config = CurriculumConfig(base_model=base_model, output_dir=str(tmp_path / "run"),
                              stages=[{"name": "stage1", "data": str(data)}])
    manifest = Manifest.open(tmp_path / "run", base_model=base_model, model_kind="vlm")
    manifest.data["image_budget"] = image_budget
    manifest.data["final"] = {"adapter": "adapter", "merged": "merged" if merged else None}
    return render_model_card(config, manifest)


def serve_lines(text: str) -> list[list[str]]:
    return [shlex.split(line) for line in text.splitlines() if line.startswith("vllm serve ")]


@pytest.mark.parametrize("budget, kwargs", [
    ({"max_patches": 6}, {"max_dynamic_patch": 6}),
    ({"min_pixels": 200704, "max_pixels": 1003520}, {"min_pixels": 200704, "max_pixels": 1003520}),
])
def test_the_serve_commands_carry_the_trained_budget_in_the_family_keys(tmp_path, budget, kwargs):
    commands = serve_lines(card(tmp_path, budget, merged=True))
    assert len(commands) == 2, "the adapter on its base model, and the merged model"
    for words in commands:
        assert json.loads(words[words.index("--mm-processor-kwargs") + 1]) == kwargs
    assert commands[0][commands[0].index("--lora-modules") + 1] == f"curriculum={tmp_path / 'run' / 'adapter'}"
    assert commands[1][2] == str(tmp_path / "run" / "merged")


def test_a_text_only_run_serves_without_a_budget(tmp_path):
    text = card(tmp_path, {})
    assert "--mm-processor-kwargs" not in text and len(serve_lines(text)) == 1


def test_a_base_model_holding_shell_syntax_is_quoted(tmp_path):
    folder = tmp_path / "models; touch pwned"
    text = card(tmp_path, {"max_patches": 6}, base_model=str(folder))
    assert serve_lines(text)[0][2] == str(folder)
