"""mics serve with a stand-in for vLLM: replicas start, become healthy, are joined in a Router config
that mics uses to spread intern calls, and stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from mics_agents.serve import ServeConfig, launch_command, router_config

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
        return json.loads(response.read())


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def config_dict(tmp_path: Path, ports: list[int], remote_port: int | None = None) -> dict:
    replicas = [{"gpus": str(index), "port": port} for index, port in enumerate(ports)]
    if remote_port:
        replicas.append({"port": remote_port, "launch": False})
    return {
        "router_config": str(tmp_path / "router.yaml"),
        "log_dir": str(tmp_path / "logs"),
        "launcher": ["{python}", "-m", "tests.fake_vllm"],
        "startup_timeout": 60,
        "models": [{
            "name": "qwen-intern",
            "model": "/models/Qwen2.5-VL-7B-Instruct",
            "served_model_name": "qwen",
            "max_model_len": 4096,
            "lora_modules": {"chiron": "/runs/chiron/adapter"},
            "replicas": replicas,
        }],
    }


def test_launch_command_and_router_config(tmp_path):
    config = ServeConfig.model_validate(config_dict(tmp_path, [8001, 8002], remote_port=9001))
    spec = config.models[0]
    command = launch_command(config, spec, spec.replicas[1])
    assert command[:3] == [sys.executable, "-m", "tests.fake_vllm"]
    assert command[3:] == ["--model", "/models/Qwen2.5-VL-7B-Instruct", "--served-model-name", "qwen",
                           "--host", "127.0.0.1", "--port", "8002", "--tensor-parallel-size", "1",
                           "--max-model-len", "4096", "--enable-lora", "--lora-modules", "chiron=/runs/chiron/adapter"]
    routes = router_config(config)["model_list"]
    pool = [route["litellm_params"]["api_base"] for route in routes if route["model_name"] == "qwen-intern"]
    assert pool == ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1", "http://127.0.0.1:9001/v1"]
    assert {route["litellm_params"]["model"] for route in routes if route["model_name"] == "qwen-intern"} == {"hosted_vllm/qwen"}
    assert {route["litellm_params"]["model"] for route in routes if route["model_name"] == "qwen-intern:chiron"} == {"hosted_vllm/chiron"}
    assert all(route["model_info"] == {"supports_n": True} for route in routes)  # vLLM takes n


async def test_serve_starts_replicas_routes_interns_over_them_and_stops(tmp_path):
    from mics_agents.config import load_settings
    from mics_agents.models.factory import open_model
    from mics_agents.models.providers import load_router
    from mics_agents.models import ChatMessage, ModelRequest

    ports = [free_port(), free_port()]
    remote = free_port()
    # A replica "on another machine": already running, not launched by mics serve.
    elsewhere = subprocess.Popen([sys.executable, "-m", "tests.fake_vllm", "--model", "m", "--served-model-name", "qwen",
                                  "--port", str(remote), "--startup-delay", "0", "--lifetime", "60"], cwd=ROOT,
                                 stdout=subprocess.DEVNULL)
    config_path = tmp_path / "interns.yaml"
    config_path.write_text(yaml.safe_dump(config_dict(tmp_path, ports, remote_port=remote)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    serve = subprocess.Popen([sys.executable, "-m", "mics_agents", "serve", "--config", str(config_path)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "router.yaml").exists():
            assert serve.poll() is None, serve.communicate()
            assert time.monotonic() < deadline, "replicas never became healthy"
            time.sleep(0.2)
        assert all(listening(port) for port in ports)
        assert [stats(port)["cuda_visible_devices"] for port in ports] == ["0", "1"]

        settings = load_settings(cache_path=None, router_config=tmp_path / "router.yaml", retry_initial_wait=0.01)
        intern = open_model("qwen-intern", settings, router=load_router(settings.router_config))
        requests = [
            ModelRequest((ChatMessage.text("user", f"## Question\nq{i}?\n\n## Reasoning so far\n(none)"),), 0.3)
            for i in range(30)
        ]
        import asyncio

        try:
            replies = await asyncio.gather(*(intern.request(request) for request in requests))
            samples = await intern.request_samples(requests[0], [0, 1, 2])  # one request with n=3
        finally:
            await intern.aclose()
        assert all("### The final answer is:" in reply.text for reply in [*replies, *samples])
        assert len(samples) == 3
        served = [stats(port)["requests"] for port in [*ports, remote]]
        assert sum(served) == 31 and all(count > 0 for count in served), served

        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=30)
        assert not any(listening(port) for port in ports), "launched replicas are stopped"
        assert listening(remote), "a replica mics serve did not start is left alone"
        output = serve.stdout.read()
        assert "MICS_ROUTER_CONFIG=" in output and "MICS_INTERNS=qwen-intern" in output
    finally:
        for process in (serve, elsewhere):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_replica_that_dies_during_startup_stops_the_others(tmp_path):
    ports = [free_port(), free_port()]
    data = config_dict(tmp_path, ports)
    data["models"][0]["extra_args"] = ["--no-such-flag"]  # the stand-in, like vLLM, refuses unknown flags
    config_path = tmp_path / "interns.yaml"
    config_path.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "mics_agents", "serve", "--config", str(config_path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "exited with code" in result.stderr and "logs" in result.stderr
    assert not (tmp_path / "router.yaml").exists()
    assert not any(listening(port) for port in ports)
