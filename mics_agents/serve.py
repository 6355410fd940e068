"""``mics serve``: local interns on vLLM. One OpenAI-compatible vLLM server per configured replica, a
health wait, and a LiteLLM Router config that maps each intern name to all of its replicas.

vLLM serves, LiteLLM's Router spreads calls and fails over; this module only starts, watches and stops
processes and writes the config that joins them. Replicas on other machines (``launch: false``) are
routed to without being started here.

A LoRA adapter from ``training/`` is served with the image budget it was trained with (InternVL tiles, Qwen
pixels), read from what training saved with it. vLLM takes the base model's processor for every adapter and one
``--mm-processor-kwargs`` for the whole server, so one server serves adapters of one budget only; the budget
goes to vLLM in the family's own keys and is recorded per deployment in the Router config (``image_budget``).

    router_config: interns_router.yaml        # written once every replica is healthy
    models:
      - name: qwen-intern                      # the name MICS_INTERNS uses
        model: Qwen/Qwen2.5-VL-7B-Instruct     # a local path or a hub id vLLM can load
        tensor_parallel_size: 1
        max_model_len: 8192
        lora_modules: {chiron: runs/chiron/adapter}   # training's OUTPUT/adapter
        extra_args: [--gpu-memory-utilization, "0.9"]
        replicas:
          - {gpus: "0", port: 8001}
          - {gpus: "1", port: 8002}
          - {host: gpu2.internal, port: 8001, launch: false}
    media_dir: mics_media                     # optional: images by file:// URL (see media.py)

With ``media_dir``, every replica started here may read that folder and nothing wider
(``--allowed-local-media-path``), and its deployments say so in the Router config (``model_info.media_dir``):
``mics run`` then writes each prepared image there once and sends its path. Replicas elsewhere
(``launch: false``) are declared to read no folder, and get data URLs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from string import Formatter
from typing import Any

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from .config import load_yaml_model
from .errors import ConfigError, MicsError

__all__ = [
    "ServeConfig",
    "ModelSpec",
    "Replica",
    "load_serve_config",
    "router_config",
    "launch_command",
    "dry_run_commands",
    "trained_image_budget",
    "vllm_image_kwargs",
    "server_image_budget",
    "served_image_budget",
    "InternServers",
]

DEFAULT_LAUNCHER = ["{python}", "-m", "vllm.entrypoints.openai.api_server"]
MM_PROCESSOR_FLAG = "--mm-processor-kwargs"
MEDIA_FLAG = "--allowed-local-media-path"
# The keys of vLLM's --mm-processor-kwargs that set an image budget: InternVL's tiles, Qwen2-VL/2.5-VL's pixels.
IMAGE_BUDGET_KEYS = ("max_dynamic_patch", "min_pixels", "max_pixels")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Replica(BaseModel):
    host: str = Field(default="127.0.0.1", description="Where the server listens (or runs, for launch: false).")
    port: int = Field(ge=1, le=65535)
    gpus: str | None = Field(default=None, description="CUDA_VISIBLE_DEVICES for this replica, e.g. '0,1'.")
    launch: bool = Field(default=True, description="Start it here; false for a server already running elsewhere.")
    max_parallel_requests: int | None = Field(default=None, ge=1, description="Router limit for this replica.")

    @property
    def api_base(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


class ModelSpec(BaseModel):
    name: str = Field(description="The intern's name in MICS_INTERNS and the Router's model_name.")
    model: str = Field(description="Model path or id vLLM loads.")
    served_model_name: str | None = Field(default=None, description="Name vLLM serves it as [default: name].")
    tensor_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int | None = Field(default=None, ge=16)
    dtype: str | None = None
    lora_modules: dict[str, str] = Field(default_factory=dict, description="LoRA name -> adapter folder.")
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    mm_processor_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM --mm-processor-kwargs for the whole server; the adapters' trained image budget is added.",
    )
    replicas: list[Replica]

    @model_validator(mode="before")
    @classmethod
    def _processor_kwargs_from_extra_args(cls, data: Any) -> Any:
        """``--mm-processor-kwargs`` in extra_args is taken as the setting it is, so it can be checked against
        the adapters' image budget (and is not passed twice)."""
        if not isinstance(data, dict) or not isinstance(data.get("extra_args"), list):
            return data
        args, found = list(data["extra_args"]), None
        for index, arg in enumerate(args):
            if arg == MM_PROCESSOR_FLAG:
                if index + 1 == len(args):
                    raise ValueError(f"extra_args: {MM_PROCESSOR_FLAG} needs a JSON object after it")
                found, del_range = args[index + 1], slice(index, index + 2)
                break
            if isinstance(arg, str) and arg.startswith(MM_PROCESSOR_FLAG + "="):
                found, del_range = arg.split("=", 1)[1], slice(index, index + 1)
                break
        if found is None:
            return data
        if data.get("mm_processor_kwargs"):
            raise ValueError(f"extra_args: give {MM_PROCESSOR_FLAG} once, as mm_processor_kwargs or in extra_args")
        try:
            kwargs = json.loads(found) if isinstance(found, str) else None
        except json.JSONDecodeError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise ValueError(f"extra_args: {MM_PROCESSOR_FLAG} takes a JSON object, not {found!r}")
        del args[del_range]
        return {**data, "extra_args": args, "mm_processor_kwargs": kwargs}

    @field_validator("extra_args")
    @classmethod
    def _no_media_flag(cls, args: list[str]) -> list[str]:
        if any(isinstance(arg, str) and (arg == MEDIA_FLAG or arg.startswith(MEDIA_FLAG + "=")) for arg in args):
            raise ValueError(
                f"extra_args: give the folder as the config's media_dir, not {MEDIA_FLAG}: mics serve passes it "
                "to vLLM and writes it into the Router config, so that mics run sends images by file:// URL there"
            )
        return args

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [name for name in env if not _ENV_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an environment variable name (letters, digits and _, not first a digit)")
        return env

    @field_validator("replicas")
    @classmethod
    def _some_replicas(cls, replicas: list[Replica]) -> list[Replica]:
        if not replicas:
            raise ValueError("give at least one replica")
        return replicas

    @property
    def wire_name(self) -> str:
        return self.served_model_name or self.name


class ServeConfig(BaseModel):
    models: list[ModelSpec]
    router_config: Path = Field(default=Path("interns_router.yaml"), description="Where to write the Router config.")
    log_dir: Path = Field(default=Path("vllm_logs"), description="One log file per launched replica.")
    python: str = Field(default_factory=lambda: sys.executable, description="Interpreter that has vLLM.")
    launcher: list[str] = Field(default_factory=lambda: list(DEFAULT_LAUNCHER), description="Server command.")
    startup_timeout: float = Field(default=1200.0, gt=0, description="Seconds to wait for each replica's /health.")
    routing_strategy: str = Field(default="least-busy", description="LiteLLM Router routing strategy.")
    cooldown_time: float = Field(default=30.0, ge=0, description="Seconds a failing replica is left out.")
    allowed_fails: int = Field(default=3, ge=0, description="Failures in a minute before a cooldown.")
    media_dir: Path | None = Field(
        default=None,
        description="A folder the replicas started here read images from (vLLM's --allowed-local-media-path, "
        "nothing wider): mics run writes each prepared image there once and sends its file:// URL.",
    )

    @field_validator("media_dir")
    @classmethod
    def _narrow_media_dir(cls, value: Path | None) -> Path | None:
        """The folder, absolute and resolved as vLLM compares it; not the root or the home folder, whose every
        file a request could then name."""
        if value is None or str(value).strip() == "":
            return None
        resolved = value.expanduser().resolve()
        if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
            raise ValueError(f"{str(value)!r} would let the servers read every file under {str(resolved)!r}; "
                             "give a folder of its own, e.g. mics_media")
        if resolved.exists() and not resolved.is_dir():
            raise ValueError(f"{str(value)!r} is a file; give the folder the servers read images from")
        return resolved

    @field_validator("launcher")
    @classmethod
    def _launcher_template(cls, launcher: list[str]) -> list[str]:
        if not launcher:
            raise ValueError("give the command that starts a server, e.g. ['{python}', '-m', 'vllm.entrypoints.openai.api_server']")
        for index, part in enumerate(launcher):
            try:
                fields = [(name, spec, conversion) for _, name, spec, conversion in Formatter().parse(part)
                          if name is not None]
                unknown = [name for name, _, _ in fields if name != "python"]
                dressed = [name for name, spec, conversion in fields if spec or conversion]
                problem = (f"unknown placeholder {{{unknown[0]}}}" if unknown
                           else f"{{python}} takes no format spec or conversion (got {{{dressed[0]}...}})" if dressed
                           else None)
            except ValueError as exc:  # a lone brace
                problem = str(exc)
            if problem:
                raise ValueError(
                    f"launcher[{index}] {part!r}: {problem}; the one placeholder is {{python}} (the interpreter), "
                    "and a literal brace is doubled ({{ or }})"
                )
        return launcher


def load_serve_config(path: Path) -> ServeConfig:
    """The serve config of ``path``, with every model's image budget checked (:func:`server_image_budget`)."""
    config = load_yaml_model(path, ServeConfig, "--config", "serve config")
    for spec in config.models:
        try:
            server_image_budget(spec)
        except ConfigError as exc:
            raise ConfigError(f"--config {str(path)!r}: {exc}") from None
    return config


# -- image budget -----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON ({exc}): restore it from the training output") from None


def _training_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of the training run that wrote ``folder`` (its ``adapter/``, ``merged/`` or a stage's
    ``adapter/``), or None."""
    for root in (folder.parent, folder.parent.parent):
        manifest = _read_json(root / "manifest.json")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), list):
            continue
        final = manifest.get("final") if isinstance(manifest.get("final"), dict) else {}
        written = {final.get("adapter"), final.get("merged")}
        written |= {stage.get("adapter") for stage in manifest["stages"] if isinstance(stage, dict)}
        if os.path.relpath(folder, root) in written - {None}:
            return manifest
    return None


def _processor_budget(folder: Path) -> dict[str, int] | None:
    """The image budget on the processor saved in ``folder``, in training's terms (``max_patches``, or
    ``min_pixels``/``max_pixels``). Newer transformers nest the image processor in processor_config.json."""
    processor = _read_json(folder / "processor_config.json")
    image_processor = processor.get("image_processor") if isinstance(processor, dict) else None
    if not isinstance(image_processor, dict):
        image_processor = _read_json(folder / "preprocessor_config.json")
    if not isinstance(image_processor, dict):
        return None
    if _is_int(image_processor.get("max_patches")):
        return {"max_patches": image_processor["max_patches"]}
    size = image_processor.get("size") if isinstance(image_processor.get("size"), dict) else {}
    # Training sets the budget on ``size``; the flat min_pixels/max_pixels of older processors may be stale then.
    for low, high in ((size.get("shortest_edge"), size.get("longest_edge")),
                      (image_processor.get("min_pixels"), image_processor.get("max_pixels"))):
        if _is_int(low) and _is_int(high):
            return {"min_pixels": low, "max_pixels": high}
    return None


def _is_int(value: Any) -> bool:
    return type(value) is int


def trained_image_budget(folder: str | Path) -> dict[str, int] | None:
    """The image budget a model folder was trained with, in training's terms (``{"max_patches": 6}`` or
    ``{"min_pixels": ..., "max_pixels": ...}``): for a LoRA adapter (or a merged model that a training manifest
    names), from the processor saved with it, else from the training run's ``manifest.json``. None for a folder
    training did not write (a base model serves with its own budget), one without images, or a hub id."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    manifest = _training_manifest(folder)
    if manifest is None and not (folder / "adapter_config.json").is_file():
        return None
    budget = _processor_budget(folder)
    if budget is None and manifest is not None and isinstance(manifest.get("image_budget"), dict):
        budget = {key: value for key, value in manifest["image_budget"].items() if _is_int(value)} or None
    return budget


def vllm_image_kwargs(budget: Mapping[str, int]) -> dict[str, int]:
    """A trained image budget in the keys of vLLM's ``--mm-processor-kwargs``: InternVL's ``max_patches`` is
    vLLM's ``max_dynamic_patch``; Qwen2-VL/2.5-VL's ``min_pixels``/``max_pixels`` keep their names."""
    names = {"max_patches": "max_dynamic_patch", "min_pixels": "min_pixels", "max_pixels": "max_pixels"}
    return {names[key]: value for key, value in budget.items() if key in names}


def _describe(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in kwargs.items()) or "the base model's own"


def server_image_budget(spec: ModelSpec) -> dict[str, int] | None:
    """The image budget (vLLM keys) one server of ``spec`` runs with: the one its adapters (and its model, if
    training wrote it) were trained with, else what mm_processor_kwargs sets, else None (the base model's own).

    Raises :class:`ConfigError` if its adapters were trained with different budgets, or if mm_processor_kwargs
    sets a budget other than the trained one: vLLM applies one budget to every adapter of a server."""
    trained: dict[str, dict[str, int]] = {}
    for label, folder in [(f"model {spec.model}", spec.model),
                          *((f"adapter {name} ({path})", path) for name, path in spec.lora_modules.items())]:
        budget = trained_image_budget(folder)
        if budget:
            trained[label] = vllm_image_kwargs(budget)
    distinct = {tuple(sorted(kwargs.items())) for kwargs in trained.values()}
    if len(distinct) > 1:
        listed = "; ".join(f"{label}: {_describe(kwargs)}" for label, kwargs in trained.items())
        raise ConfigError(
            f"model {spec.name!r} serves adapters trained with different image budgets ({listed}), but vLLM applies "
            "one budget to every adapter of a server. Give each budget a models entry of its own, with its own "
            "replicas and ports."
        )
    explicit = {key: spec.mm_processor_kwargs[key] for key in IMAGE_BUDGET_KEYS if key in spec.mm_processor_kwargs}
    if not trained:
        return explicit or None
    label, budget = next(iter(trained.items()))
    differing = {key: value for key, value in explicit.items() if budget.get(key) != value}
    if differing:
        raise ConfigError(
            f"model {spec.name!r}: mm_processor_kwargs sets {_describe(differing)}, but {label} was trained with "
            f"{_describe(budget)}. Remove the setting (mics serve passes the trained budget), or serve that adapter "
            "under a models entry of its own."
        )
    return budget


def served_image_budget(router: str | Path | Mapping[str, Any], model_name: str) -> dict[str, Any] | None:
    """The image budget (vLLM keys) that the deployments of ``model_name`` in a Router config written by
    ``mics serve`` are served with, or None: not served with a trained or set budget, or not in the config.

    Raises :class:`ConfigError` if the config cannot be read or its deployments of ``model_name`` disagree."""
    if not isinstance(router, Mapping):
        try:
            router = yaml.safe_load(Path(router).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"Router config {str(router)!r} cannot be read: {exc}") from None
    model_list = router.get("model_list") if isinstance(router, Mapping) else None
    if not isinstance(model_list, list):
        raise ConfigError("the Router config has no model_list: give the file mics serve wrote")
    budgets = []
    for deployment in model_list:
        if isinstance(deployment, Mapping) and deployment.get("model_name") == model_name:
            info = deployment.get("model_info") if isinstance(deployment.get("model_info"), Mapping) else {}
            budget = info.get("image_budget")
            if budget is not None and not isinstance(budget, Mapping):
                raise ConfigError(f"the Router config's image_budget of {model_name!r} is not a mapping: {budget!r}")
            budgets.append(dict(budget) if budget else None)
    if any(budget != budgets[0] for budget in budgets):
        raise ConfigError(
            f"the deployments of {model_name!r} in the Router config are served with different image budgets "
            f"({'; '.join(_describe(budget or {}) for budget in budgets)}): serve them alike, or name them apart"
        )
    return budgets[0] if budgets else None


def router_config(config: ServeConfig) -> dict[str, Any]:
    """The LiteLLM Router config: each intern name -> every replica, as ``hosted_vllm/<served name>``, each
    declaring ``supports_n`` (vLLM answers several samples of one request) and, with a ``media_dir``, the
    folder it reads images from (``media_dir``: null for a replica not started here)."""
    model_list = []
    for spec in config.models:
        info: dict[str, Any] = {"supports_n": True}
        budget = server_image_budget(spec)
        if budget:
            info["image_budget"] = budget  # the whole server's: its base model and every adapter
        for replica in spec.replicas:
            params: dict[str, Any] = {"model": f"hosted_vllm/{spec.wire_name}", "api_base": replica.api_base}
            if replica.max_parallel_requests:
                params["max_parallel_requests"] = replica.max_parallel_requests
            replica_info = dict(info)
            if config.media_dir is not None:
                replica_info["media_dir"] = str(config.media_dir) if replica.launch else None
            model_list.append({"model_name": spec.name, "litellm_params": params, "model_info": replica_info})
            for lora in spec.lora_modules:
                model_list.append({
                    "model_name": f"{spec.name}:{lora}",
                    "litellm_params": {**params, "model": f"hosted_vllm/{lora}"},
                    "model_info": dict(replica_info),
                })
    return {
        "model_list": model_list,
        "router_settings": {
            "routing_strategy": config.routing_strategy,
            "cooldown_time": config.cooldown_time,
            "allowed_fails": config.allowed_fails,
        },
    }


def launch_command(config: ServeConfig, spec: ModelSpec, replica: Replica) -> list[str]:
    """The argv that starts one replica's vLLM server (run without a shell)."""
    command = [part.format(python=config.python) for part in config.launcher]
    command += ["--model", spec.model, "--served-model-name", spec.wire_name, "--host", replica.host,
                "--port", str(replica.port), "--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.max_model_len:
        command += ["--max-model-len", str(spec.max_model_len)]
    if spec.dtype:
        command += ["--dtype", spec.dtype]
    if spec.lora_modules:
        command += ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in spec.lora_modules.items())]
    processor_kwargs = {**spec.mm_processor_kwargs, **(server_image_budget(spec) or {})}
    if processor_kwargs:
        command += [MM_PROCESSOR_FLAG, json.dumps(processor_kwargs, sort_keys=True)]
    if config.media_dir is not None:
        command += [MEDIA_FLAG, str(config.media_dir)]
    return command + list(spec.extra_args)


def launch_env(spec: ModelSpec, replica: Replica) -> dict[str, str]:
    """What a replica's server gets on top of this process's environment."""
    env = dict(spec.env)
    if replica.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = replica.gpus
    return env


def shell_line(config: ServeConfig, spec: ModelSpec, replica: Replica) -> str:
    """One replica's launch as a shell line: every value quoted, so pasting it runs this command and nothing else
    (names were checked to be variable names)."""
    assignments = [f"{name}={shlex.quote(value)}" for name, value in launch_env(spec, replica).items()]
    return " ".join([*assignments, shlex.join(launch_command(config, spec, replica))])


def dry_run_commands(config: ServeConfig) -> list[str]:
    """What ``mics serve --dry-run`` prints, each entry a whole shell command (or comment) that is safe to paste
    as it is: the line that starts each replica, a comment for each replica that runs elsewhere, and a
    here-document that writes the Router config where ``mics serve`` writes it once every replica is healthy.
    An entry can span lines (a quoted value holding a newline, the here-document)."""
    commands = []
    if config.media_dir is not None and any(replica.launch for spec in config.models for replica in spec.replicas):
        commands.append(f"mkdir -p -- {shlex.quote(str(config.media_dir))}")  # vLLM refuses a folder that is not there
    for spec in config.models:
        for index, replica in enumerate(spec.replicas):
            if replica.launch:
                commands.append(shell_line(config, spec, replica))
            else:  # JSON-quoted: no newline of a name or host can end the comment
                commands.append(f"# {json.dumps(f'{spec.name}#{index}')} runs elsewhere, at {json.dumps(replica.api_base)}")
    router_text = yaml.safe_dump(router_config(config), sort_keys=False)
    delimiter = "MICS_ROUTER_CONFIG"
    while delimiter in router_text.splitlines():
        delimiter += "_END"
    commands.append("# The Router config mics serve writes once every replica is healthy:")
    commands.append(f"cat > {shlex.quote(str(config.router_config))} <<'{delimiter}'\n{router_text}{delimiter}")
    return commands


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False if the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _group_alive(pgid: int) -> bool:
    return _signal_group(pgid, 0)


def _healthy(replica: Replica) -> bool:
    try:
        with urllib.request.urlopen(f"http://{replica.host}:{replica.port}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class InternServers:
    """Starts the configured replicas, waits until each answers /health, writes the Router config, and
    stops everything it started on :meth:`stop` (SIGTERM, then SIGKILL after a grace period)."""

    def __init__(self, config: ServeConfig, *, log: Any = print) -> None:
        self.config = config
        self.log = log
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self) -> Path:
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        if self.config.media_dir is not None:
            self.config.media_dir.mkdir(parents=True, exist_ok=True)  # vLLM refuses a folder that is not there
        pending = []
        for spec in self.config.models:
            for index, replica in enumerate(spec.replicas):
                label = f"{spec.name}#{index} ({replica.host}:{replica.port})"
                if replica.launch:
                    pending.append((label, replica, self._launch(spec, replica, index, label)))
                else:
                    pending.append((label, replica, None))
        try:
            for label, replica, process in pending:
                self._wait_healthy(label, replica, process)
        except BaseException:
            self.stop()
            raise
        path = self.config.router_config
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(router_config(self.config), sort_keys=False), encoding="utf-8")
        return path

    def _launch(self, spec: ModelSpec, replica: Replica, index: int, label: str) -> subprocess.Popen:
        command = launch_command(self.config, spec, replica)
        env = {**os.environ, **launch_env(spec, replica)}
        log_path = self.config.log_dir / f"{spec.name.replace('/', '_')}-{index}.log"
        self.log(f"starting {label}: {shell_line(self.config, spec, replica)}  (log: {log_path})")
        handle = open(log_path, "ab")
        # A session of its own, so stopping it reaches vLLM's worker processes too.
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        handle.close()
        self.processes.append((label, process))
        return process

    def _wait_healthy(self, label: str, replica: Replica, process: subprocess.Popen | None) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        while time.monotonic() < deadline:
            if _healthy(replica):
                self.log(f"{label} is ready")
                return
            if process is not None and process.poll() is not None:
                raise MicsError(
                    f"{label} exited with code {process.returncode} before it was ready; see its log in "
                    f"{self.config.log_dir}/"
                )
            time.sleep(1.0)
        raise MicsError(f"{label} did not answer /health within {self.config.startup_timeout:.0f} s")

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM each launched replica's process group; what is still alive after ``grace`` seconds gets
        SIGKILL. vLLM's engine processes can outlive the API server by a moment, so the whole group is
        waited for, not just the server."""
        for label, process in self.processes:
            if process.poll() is None:
                self.log(f"stopping {label}")
            _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            while _group_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _signal_group(process.pid, signal.SIGKILL):
                self.log(f"killed what was left of process group {process.pid}")
            process.wait()
        self.processes.clear()

    async def wait_for_signal(self) -> None:
        """Block until SIGINT or SIGTERM (or until a launched replica dies)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            dead = [label for label, process in self.processes if process.poll() is not None]
            if dead:
                raise MicsError(f"{', '.join(dead)} stopped unexpectedly; see the logs in {self.config.log_dir}/")
            try:
                await asyncio.wait_for(stop.wait(), timeout=2.0)
            except asyncio.TimeoutError:
                continue
