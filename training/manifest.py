"""The run manifest: ``OUTPUT/manifest.json`` records what each stage trained on and where it stands.

Per stage: its kind (``sft``, ``dpo``, ``grpo``; an entry without one is an sft stage of an earlier version), status
(``pending``, ``running``, ``done``, ``skipped``), the stage file with its sha256, sample (pair, prompt) and image
counts, the rows trained and those left out by the length policy (by reason), the hyperparameters, the last
checkpoint, the stage's adapter and its metrics (a dpo stage's: TRL's reward accuracies and margins too; a grpo
stage's: the first and last logged rewards, total and per function, and the completions a judge outage left out).
A grpo stage also records the rows it did not make prompts of (``left_out``: no reference, repeats) and its
``rewards``: each function with its weight and definition, the judge (or recall for open answers) and the grader
version. ``init_adapter`` records
the adapter a run started from, when it did not start from the base model. A rerun reads it to skip finished
stages and resume the running one, and refuses to continue on a stage file that changed since. ``trainer`` names what trained the run:
a run that an earlier version started with its own trainer (format 1) is refused on resume unless allowed.
It is rewritten atomically (temp file + rename), by the main process only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .errors import DataChangedError, ManifestError

__all__ = ["Manifest", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2
# What trains the stages now: TRL's SFTTrainer (prompt-completion, completion-only loss) and the length policy that
# drops what would not fit. Format 1 manifests were written by this package's own collator on transformers' Trainer,
# which cut long answers at max_length.
TRAINER = "trl-sft"
LEGACY_TRAINER = "transformers-trainer"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Manifest:
    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(
        cls, output_dir: Path, *, base_model: str, model_kind: str, allow_trainer_change: bool = False
    ) -> "Manifest":
        """Read the manifest of ``output_dir`` or start a new one; refuse one made for another base model or
        (unless allowed) one that another trainer started."""
        path = Path(output_dir) / MANIFEST_NAME
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ManifestError(
                    f"{path} is not valid JSON ({exc.msg}). Restore it, or use a new output_dir to start over."
                ) from None
            if data.get("base_model") != base_model:
                raise ManifestError(
                    f"{path.parent} holds a run of base model {data.get('base_model')!r}, not {base_model!r}. "
                    "Use a new output_dir for another base model."
                )
            manifest = cls(path, data)
            manifest._check_trainer(allow_trainer_change)
            return manifest
        return cls(
            path,
            {
                "format": FORMAT_VERSION,
                "trainer": TRAINER,
                "base_model": base_model,
                "model_kind": model_kind,
                "created": _now(),
                "updated": _now(),
                "stages": [],
                "final": None,
            },
        )

    def _check_trainer(self, allow_change: bool) -> None:
        trainer = self.data.get("trainer", LEGACY_TRAINER)
        if trainer == TRAINER:
            return
        started = [entry["name"] for entry in self.stages if entry.get("status") != "pending"]
        if started and not allow_change:
            raise ManifestError(
                f"{self.path.parent} was started by an earlier version of this package with its own trainer "
                f"({trainer}; stages {started}), which cut answers longer than max_length. This version trains with "
                "TRL's SFTTrainer and leaves such samples out, so continuing would change the data mid-run. Start "
                "again in a new output_dir, or pass --allow-trainer-change to continue this run with the new trainer "
                "(finished stages are kept; a running stage resumes from its last checkpoint)."
            )
        if started:
            self.data.setdefault("trainer_changes", []).append({"from": trainer, "to": TRAINER, "at": _now()})
        self.data["trainer"] = TRAINER
        self.data["format"] = FORMAT_VERSION

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.data["stages"]

    def stage(self, name: str) -> dict[str, Any] | None:
        return next((entry for entry in self.stages if entry["name"] == name), None)

    def check_stage_order(self, names: list[str]) -> None:
        """Stages already started must be the first stages of the config, in the same order."""
        recorded = [entry["name"] for entry in self.stages if entry["status"] != "pending"]
        if names[: len(recorded)] != recorded:
            raise ManifestError(
                f"{self.path.parent} trained the stages {recorded} in this order, but the config now lists {names}. "
                "Keep the finished stages first and in order, or use a new output_dir."
            )

    def check_kinds(self, kinds: dict[str, str]) -> None:
        """A started stage keeps its kind: the same name with another kind is another stage."""
        for entry in self.stages:
            recorded = entry.get("kind", "sft")
            wanted = kinds.get(entry["name"])
            if entry["status"] != "pending" and wanted is not None and wanted != recorded:
                raise ManifestError(
                    f"Stage {entry['name']!r} was started as a {recorded} stage, but the config now makes it a "
                    f"{wanted} stage. Give the new stage another name, or use a new output_dir."
                )

    def check_data(self, name: str, sha256: str, data_path: str, *, allow_change: bool) -> None:
        """Refuse a started stage whose file changed, unless allowed (then the change is recorded)."""
        entry = self.stage(name)
        if entry is None or entry["status"] == "pending" or entry.get("data_sha256") == sha256:
            return
        if not allow_change:
            raise DataChangedError(
                f"Stage {name!r} is {entry['status']} but its stage file {data_path} changed since (sha256 "
                f"{entry.get('data_sha256', '?')[:12]}... then, {sha256[:12]}... now). Restore the file, use a new "
                "output_dir to train on the new data, or pass --allow-data-change to continue anyway."
            )
        entry.setdefault("previous_data_sha256", []).append(entry.get("data_sha256"))
        entry["data_sha256"] = sha256

    def check_settings(self, name: str, settings: dict[str, Any]) -> None:
        """A running stage must resume with the hyperparameters it started with (its LR schedule depends on them)."""
        entry = self.stage(name)
        if entry is None or entry["status"] != "running":
            return
        before = entry.get("hyperparameters") or {}
        changed = {
            key: (before[key], value) for key, value in settings.items() if key in before and before[key] != value
        }
        if changed:
            details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
            raise ManifestError(
                f"Stage {name!r} started with other settings ({details}); resuming would change its schedule. "
                f"Restore them, or delete {self.path.parent / name} to restart this stage from its beginning."
            )

    def update_stage(self, name: str, **fields: Any) -> dict[str, Any]:
        entry = self.stage(name)
        if entry is None:
            entry = {"name": name, "status": "pending"}
            self.stages.append(entry)
        entry.update(fields)
        return entry

    def save(self) -> None:
        self.data["updated"] = _now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(temporary, self.path)
