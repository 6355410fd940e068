"""``python -m training --config curriculum.yaml [--field value ...]``: the curriculum fine-tune.

Every config field is also a command-line option (``--learning-rate 2e-5`` or ``--learning_rate 2e-5``) that
overrides the YAML file. The same command runs on one process, or under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any, Sequence

import yaml

from .config import config_fields, load_config
from .errors import TrainingError

__all__ = ["main", "build_parser"]

EPILOG = """\
Stages run in order; each continues from the previous one's weights. Rerun the same command after a crash:
finished stages are skipped and the running one resumes from its last checkpoint. OUTPUT/manifest.json
records each stage's data hash, status, checkpoint and metrics.

Samples longer than max_length (image tokens included) are left out and counted, never cut: see the manifest,
the log, the model card and OUTPUT/STAGE/dropped.json.

A stage with kind: dpo trains TRL's DPOTrainer on the step preference pairs the dataset builder writes
(CURRICULUM/steps/pairs.jsonl), continuing the adapter of the stage before (or --init-adapter), with that adapter
as the DPO reference; a pair where prompt + chosen or prompt + rejected exceeds max_length is left out and counted.
See training/configs/curriculum_dpo.yaml.

Scale out with the usual launchers, same config:
  torchrun --nproc_per_node 8 -m training --config curriculum.yaml --deepspeed training/configs/deepspeed_zero1.json
  accelerate launch --config_file training/configs/fsdp.yaml -m training --config curriculum.yaml
FSDP and ZeRO-3 are refused for stages that mix text-only and image samples (they would hang); ZeRO-1/2 and DDP
are not affected.
"""


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _dashed(argument: str) -> str:
    if not argument.startswith("--"):
        return argument
    name, equals, value = argument.partition("=")
    return name.replace("_", "-") + equals + value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        usage="python -m training --config YAML [--FIELD VALUE ...]",
        description="Curriculum LoRA fine-tune of a vision-language (or text) model on the dataset builder's "
        "stage files. Defaults are the Chiron-o1 paper's.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="YAML", help="The curriculum config (see training/configs/curriculum.yaml)."
    )
    fields = parser.add_argument_group("config fields (each overrides the YAML file)")
    for spec in config_fields():
        names = [f"--{spec.name.replace('_', '-')}"]
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        help_text = f"{spec.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        if spec.type == "bool":
            fields.add_argument(
                *names, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif spec.type in {"str", "str | None"}:
            fields.add_argument(*names, dest=spec.name, default=None, metavar="TEXT", help=help_text)
        else:
            metavar = spec.type.upper() if spec.type in {"int", "float"} else "YAML"
            fields.add_argument(
                *names, dest=spec.name, default=None, type=_parse_value, metavar=metavar, help=help_text
            )
    return parser


def main(argv: Sequence[str] | None = None, *, callbacks: Sequence[Any] = ()) -> int:
    """Run the curriculum; return 0 when every stage is done, 2 on an error the message explains."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # TRL-style spellings (--learning_rate) are accepted too.
    argv = [_dashed(argument) for argument in argv]
    options = vars(parser.parse_args(argv))
    config_path = options.pop("config")
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(config_path, **options)
        from .curriculum import run_curriculum  # torch and transformers load only when there is work to do

        result = run_curriculum(config, callbacks=callbacks)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("training").info(
        "Curriculum done: adapter %s%s; manifest and model card in %s",
        result.adapter_dir,
        f", merged model {result.merged_dir}" if result.merged_dir else "",
        result.output_dir,
    )
    return 0
