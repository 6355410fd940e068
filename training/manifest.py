"""The run manifest: ``OUTPUT/manifest.json`` records what each stage trained on and where it stands.

Per stage: status (``pending``, ``running``, ``done``), the stage file with its sha256, sample and image
counts, the hyperparameters, the last checkpoint, the stage's adapter and its metrics. A rerun reads it to skip
finished stages and resume the running one, and refuses to continue on a stage file that changed since.
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
FORMAT_VERSION = 1


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Manifest:
    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(cls, output_dir: Path, *, base_model: str, model_kind: str) -> "Manifest":
        """Read the manifest of ``output_dir`` or start a new one; refuse one made for another base model."""
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
            return cls(path, data)
        return cls(
            path,
            {
                "format": FORMAT_VERSION,
                "base_model": base_model,
                "model_kind": model_kind,
                "created": _now(),
                "updated": _now(),
                "stages": [],
                "final": None,
            },
        )

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
