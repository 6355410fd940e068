"""``mics serve``: local interns on vLLM. One OpenAI-compatible vLLM server per configured replica, a
health wait, and a LiteLLM Router config that maps each intern name to all of its replicas.

vLLM serves, LiteLLM's Router spreads calls and fails over; this module only starts, watches and stops
processes and writes the config that joins them. Replicas on other machines (``launch: false``) are
routed to without being started here.

    router_config: interns_router.yaml        # written once every replica is healthy
    models:
      - name: qwen-intern                      # the name MICS_INTERNS uses
        model: Qwen/Qwen2.5-VL-7B-Instruct     # a local path or a hub id vLLM can load
        tensor_parallel_size: 1
        max_model_len: 8192
        lora_modules: {chiron: runs/chiron/final_adapter}
        extra_args: [--gpu-memory-utilization, "0.9"]
        replicas:
          - {gpus: "0", port: 8001}
          - {gpus: "1", port: 8002}
          - {host: gpu2.internal, port: 8001, launch: false}
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, field_validator

from .config import load_yaml_model
from .errors import MicsError

__all__ = ["ServeConfig", "ModelSpec", "Replica", "load_serve_config", "router_config", "InternServers"]

DEFAULT_LAUNCHER = ["{python}", "-m", "vllm.entrypoints.openai.api_server"]


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
    replicas: list[Replica]

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


def load_serve_config(path: Path) -> ServeConfig:
    return load_yaml_model(path, ServeConfig, "--config", "serve config")


def router_config(config: ServeConfig) -> dict[str, Any]:
    """The LiteLLM Router config: each intern name -> every replica, as ``hosted_vllm/<served name>``, each
    declaring ``supports_n`` (vLLM answers several samples of one request)."""
    model_list = []
    for spec in config.models:
        for replica in spec.replicas:
            params: dict[str, Any] = {"model": f"hosted_vllm/{spec.wire_name}", "api_base": replica.api_base}
            if replica.max_parallel_requests:
                params["max_parallel_requests"] = replica.max_parallel_requests
            model_list.append({"model_name": spec.name, "litellm_params": params, "model_info": {"supports_n": True}})
            for lora in spec.lora_modules:
                model_list.append({
                    "model_name": f"{spec.name}:{lora}",
                    "litellm_params": {**params, "model": f"hosted_vllm/{lora}"},
                    "model_info": {"supports_n": True},
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
    command = [part.format(python=config.python) for part in config.launcher]
    command += ["--model", spec.model, "--served-model-name", spec.wire_name, "--host", replica.host,
                "--port", str(replica.port), "--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.max_model_len:
        command += ["--max-model-len", str(spec.max_model_len)]
    if spec.dtype:
        command += ["--dtype", spec.dtype]
    if spec.lora_modules:
        command += ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in spec.lora_modules.items())]
    return command + list(spec.extra_args)


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
        env = {**os.environ, **spec.env}
        if replica.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = replica.gpus
        log_path = self.config.log_dir / f"{spec.name.replace('/', '_')}-{index}.log"
        self.log(f"starting {label}: {shlex.join(command)}  (log: {log_path})")
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
