"""No secret reaches a file the run writes, or the terminal (issue 15), even when the server echoes the key
in its error body, as some proxies do: provider key variables, Router YAML keys and bearer tokens are masked."""

from __future__ import annotations

import json
import subprocess

from .openai_server import OpenAIServer, simulated_brain
from .test_run_process import MICS, RUN_TIMEOUT, failed_path, lines_by_item, mics_env, write_dataset

API_KEY = "sk-proj-EchoedBack0123456789abcdefXYZ"
ROUTER_KEY = "router-deployment-key-0123456789"


def echoing_brain(model: str, body: dict) -> str:
    """mentor-b's server refuses every call with an error body that repeats the credentials it was sent."""
    if model.endswith("mentor-b"):
        raise ValueError(f"Incorrect API key provided: {API_KEY}. Router key {ROUTER_KEY}. "
                         f"Authorization: Bearer {API_KEY}")
    return simulated_brain(model, body)


def test_a_key_the_server_echoes_never_reaches_a_file_or_the_terminal(tmp_path):
    data = write_dataset(tmp_path / "data")
    config = tmp_path / "config"
    config.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    output = run_dir / "out.jsonl"
    with OpenAIServer(echoing_brain, lifetime=120) as server:
        router = config / "router.yaml"
        router.write_text(
            "model_list:\n"
            "  - model_name: openai/mentor-b\n"
            f"    litellm_params: {{model: openai/mentor-b, api_base: '{server.base_url}', api_key: {ROUTER_KEY}}}\n"
        )
        env = mics_env(server, OPENAI_API_KEY=API_KEY, MICS_MAX_RETRIES="1")
        result = subprocess.run(
            [*MICS, "run", str(data.path), "--image-dir", str(data.image_dir), "--output", str(output),
             "--cache", str(run_dir / "cache.sqlite"), "--router-config", str(router), "--limit", "3",
             "--json-summary", str(run_dir / "summary.json")],
            env=env, cwd=run_dir, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )
        echoed = [request for request in server.recorded("mentor-b") if request.status == 400]

    assert result.returncode == 0, result.stderr
    assert echoed, "the server echoed the key in its error body"
    records = lines_by_item(output)
    assert len(records) == 3 and all(record["error"]["kind"] == "model_error" for record in records.values())
    message = next(iter(records.values()))["error"]["message"]
    assert "Incorrect API key provided: [secret]" in message and "Bearer [secret]" in message, message

    written = [path for path in run_dir.rglob("*") if path.is_file()]
    assert failed_path(output) in written and run_dir / "cache.sqlite" in written
    for path in written:
        content = path.read_bytes()
        for secret in (API_KEY, ROUTER_KEY):
            assert secret.encode() not in content, f"{secret[:8]}... written to {path.name}"
    for stream in (result.stdout, result.stderr):
        assert API_KEY not in stream and ROUTER_KEY not in stream
    assert json.loads((run_dir / "summary.json").read_text())["model_error"] == 3
