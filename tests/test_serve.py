"""mics serve with a stand-in for vLLM: replicas start, become healthy, are joined in a Router config
that mics uses to spread intern calls, and stop on Ctrl-C."""

from __future__ import annotations

import json
import shlex
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
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


# -- printed commands are safe to paste ---------------------------------------------------------------------------


def hostile_config(tmp_path: Path, marker: Path) -> dict:
    """Shell syntax in every field a printed line holds; each would create ``marker``(-N) if a shell ran it."""
    def inject(n: int) -> list[str]:
        target = f"{marker}-{n}"
        return [f"0;touch {target}", f"$(touch {target}a)", f"`touch {target}b`", f"x\ntouch {target}c", f"'; touch {target}d; '"]

    names = iter(range(100))
    return {
        "router_config": str(tmp_path / "$(touch x)router;.yaml"),
        "log_dir": str(tmp_path / "logs"),
        "python": inject(next(names))[1],
        "launcher": ["true", "{python}", "--arg={{literal}}"],  # a harmless launcher: runs nothing
        "models": [{
            "name": inject(next(names))[0],
            "model": inject(next(names))[1],
            "served_model_name": inject(next(names))[2],
            "dtype": inject(next(names))[3],
            "lora_modules": {inject(next(names))[4]: inject(next(names))[0]},
            "extra_args": inject(next(names)),
            "env": {"SAFE_NAME": inject(next(names))[1], "OTHER": inject(next(names))[3]},
            "mm_processor_kwargs": {"fps": inject(next(names))[2]},
            "replicas": [
                {"gpus": gpus, "port": 8001 + index, "host": inject(next(names))[index % 5]}
                for index, gpus in enumerate(inject(next(names)))
            ] + [{"host": inject(next(names))[3], "port": 9001, "launch": False}],
        }],
    }


def run_pasted(text: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", text], cwd=cwd, capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"], "HOME": str(cwd)})


def test_every_printed_line_runs_only_its_own_command(tmp_path):
    from mics_agents.serve import dry_run_commands, launch_command, launch_env

    marker = tmp_path / "pwned"
    config = ServeConfig.model_validate(hostile_config(tmp_path, marker))
    commands = dry_run_commands(config)
    spec = config.models[0]
    launched = [replica for replica in spec.replicas if replica.launch]
    for command, replica in zip(commands, launched):  # each is exactly its environment and its argv
        words = shlex.split(command)
        env = launch_env(spec, replica)
        assert words[:len(env)] == [f"{name}={value}" for name, value in env.items()]
        assert words[len(env):] == launch_command(config, spec, replica)
    assert commands[len(launched)].startswith("# ") and "\n" not in commands[len(launched)]

    written = tmp_path / "$(touch x)router;.yaml"
    for command in commands:  # each pasted alone
        result = run_pasted(command, tmp_path)
        assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("pwned*")) and not (tmp_path / "x").exists(), "a pasted command ran an injected one"
    assert yaml.safe_load(written.read_text()) == router_config(config), "the here-document writes the Router config"
    written.unlink()
    result = run_pasted("\n".join(commands) + "\n", tmp_path)  # and all of them at once, as printed
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("pwned*")) and not (tmp_path / "x").exists()
    assert yaml.safe_load(written.read_text()) == router_config(config)


def test_a_line_that_equals_the_heredoc_end_cannot_end_it_early(tmp_path):
    from mics_agents.serve import dry_run_commands

    data = config_dict(tmp_path, [8001])
    data["launcher"] = ["true"]
    data["models"][0]["name"] = "MICS_ROUTER_CONFIG\ntouch pwned\nMICS_ROUTER_CONFIG"
    commands = dry_run_commands(ServeConfig.model_validate(data))
    assert run_pasted("\n".join(commands), tmp_path).returncode == 0
    assert not (tmp_path / "pwned").exists()
    assert yaml.safe_load((tmp_path / "router.yaml").read_text())["model_list"][0]["model_name"] == data["models"][0]["name"]


@pytest.mark.parametrize("launcher, problem", [
    (["{"], "Single '{'"), (["{nope}"], "unknown placeholder {nope}"), (["x}"], "Single '}'"),
    (["{python.real}"], "unknown placeholder {python.real}"), (["{0}"], "unknown placeholder {0}"), ([], "give the command"),
])
def test_a_malformed_launcher_template_is_a_config_error_naming_it(tmp_path, launcher, problem):
    from mics_agents.errors import ConfigError
    from mics_agents.serve import load_serve_config

    data = config_dict(tmp_path, [8001])
    data["launcher"] = launcher
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as raised:
        load_serve_config(path)
    assert "launcher" in str(raised.value) and problem in str(raised.value)


def test_an_environment_name_that_is_not_one_is_refused(tmp_path):
    from mics_agents.errors import ConfigError
    from mics_agents.serve import load_serve_config

    data = config_dict(tmp_path, [8001])
    data["models"][0]["env"] = {"A=1 touch pwned; B": "x"}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="is not an environment variable name"):
        load_serve_config(path)


def cli(*args: str):
    from typer.testing import CliRunner

    from mics_agents.cli import app

    return CliRunner().invoke(app, ["serve", *args])


def test_the_cli_refuses_a_malformed_launcher_without_a_traceback(tmp_path):
    data = config_dict(tmp_path, [8001])
    data["launcher"] = ["{"]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    result = cli("--config", str(path), "--dry-run")
    assert result.exit_code == 2 and "launcher" in result.output and "Traceback" not in result.output
    assert not isinstance(result.exception, (KeyError, ValueError, IndexError))


def test_the_cli_dry_run_is_safe_to_paste(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(hostile_config(tmp_path, marker)))
    result = cli("--config", str(path), "--dry-run")
    assert result.exit_code == 0, result.output
    run_pasted(result.stdout, tmp_path)
    assert not list(tmp_path.glob("pwned*")) and not (tmp_path / "x").exists()


# -- an adapter is served with the image budget it was trained with -------------------------------------------------


def training_output(root: Path, processor: dict | None, *, manifest_budget: dict | None = None,
                    layout: str = "nested", stage_adapter: bool = False) -> Path:
    """A training output as training writes it: OUTPUT/manifest.json and OUTPUT/adapter/ (PEFT files and the
    processor saved with it). Returns the adapter folder."""
    adapter = root / ("stage1/adapter" if stage_adapter else "adapter")
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    if processor is not None:
        if layout == "nested":  # transformers 5: the image processor inside processor_config.json
            (adapter / "processor_config.json").write_text(json.dumps({"image_processor": processor}))
        else:
            (adapter / "preprocessor_config.json").write_text(json.dumps(processor))
    manifest = {"format": 2, "base_model": "base", "image_budget": manifest_budget or {},
                "stages": [{"name": "stage1", "status": "done", "adapter": "stage1/adapter"}],
                "final": {"adapter": "adapter", "merged": None}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return adapter


INTERNVL_6 = {"image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": True, "max_patches": 6,
              "min_patches": 1, "size": {"height": 448, "width": 448}}
QWEN_1280 = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "merge_size": 2,
             "size": {"shortest_edge": 256 * 28 * 28, "longest_edge": 1280 * 28 * 28}}


def budget_config(tmp_path: Path, lora_modules: dict[str, Path], **model: object) -> dict:
    data = config_dict(tmp_path, [8001, 8002])
    data["models"][0]["lora_modules"] = {name: str(path) for name, path in lora_modules.items()}
    data["models"][0].update(model)
    return data


def test_the_trained_budget_is_read_from_what_training_saved(tmp_path):
    from mics_agents.serve import trained_image_budget

    assert trained_image_budget(training_output(tmp_path / "a", INTERNVL_6)) == {"max_patches": 6}
    assert trained_image_budget(training_output(tmp_path / "b", QWEN_1280)) == {"min_pixels": 200704, "max_pixels": 1003520}
    # an older transformers: flat preprocessor_config.json whose min/max_pixels are stale beside the size training set
    stale = {**QWEN_1280, "min_pixels": 3136, "max_pixels": 12845056}
    assert trained_image_budget(training_output(tmp_path / "c", stale, layout="flat")) == {"min_pixels": 200704, "max_pixels": 1003520}
    # no processor saved with a stage's adapter: the run's manifest says it
    stage = training_output(tmp_path / "d", None, manifest_budget={"max_patches": 4}, stage_adapter=True)
    assert trained_image_budget(stage) == {"max_patches": 4}
    # a text-only run, a base model's own folder, a hub id: no trained budget
    assert trained_image_budget(training_output(tmp_path / "e", None)) is None
    base = tmp_path / "base-model"
    base.mkdir()
    (base / "preprocessor_config.json").write_text(json.dumps(QWEN_1280))
    assert trained_image_budget(base) is None and trained_image_budget("Qwen/Qwen2.5-VL-7B-Instruct") is None


def test_a_real_saved_processor_gives_its_budget(tmp_path):
    from tests.tiny_models import build_tiny_internvl, build_tiny_qwen2_5_vl, has_torchvision

    if not has_torchvision():
        pytest.skip("the tiny InternVL and Qwen2.5-VL processors need torchvision (the train extra)")
    from transformers import AutoProcessor

    from mics_agents.serve import trained_image_budget
    from training.modeling import apply_image_budget

    for build, budget in ((build_tiny_internvl, {"max_tiles": 5}),
                          (build_tiny_qwen2_5_vl, {"max_tiles": 6, "min_pixels": 64 * 4, "max_pixels": 64 * 40})):
        processor = AutoProcessor.from_pretrained(str(build(tmp_path / build.__name__)))
        applied = apply_image_budget(processor, **budget)
        adapter = training_output(tmp_path / f"{build.__name__}-run", None)
        processor.save_pretrained(str(adapter))  # as the Trainer saves it beside the adapter
        assert trained_image_budget(adapter) == applied


def test_the_launch_command_and_router_config_carry_the_trained_budget(tmp_path):
    from mics_agents.serve import served_image_budget

    adapter = training_output(tmp_path / "run", INTERNVL_6)
    config = ServeConfig.model_validate(budget_config(tmp_path, {"chiron": adapter}, mm_processor_kwargs={"fps": 1}))
    spec = config.models[0]
    command = launch_command(config, spec, spec.replicas[0])
    flag = command.index("--mm-processor-kwargs")
    assert json.loads(command[flag + 1]) == {"max_dynamic_patch": 6, "fps": 1}
    assert command.count("--mm-processor-kwargs") == 1
    routes = router_config(config)["model_list"]
    assert len(routes) == 4 and all(route["model_info"]["image_budget"] == {"max_dynamic_patch": 6} for route in routes)

    written = tmp_path / "router.yaml"
    written.write_text(yaml.safe_dump(router_config(config)))
    assert served_image_budget(written, "qwen-intern:chiron") == {"max_dynamic_patch": 6}
    assert served_image_budget(written, "qwen-intern") == {"max_dynamic_patch": 6}
    assert served_image_budget(written, "openai/gpt-4o") is None

    qwen = training_output(tmp_path / "qwen-run", QWEN_1280)
    config = ServeConfig.model_validate(budget_config(tmp_path, {"a": qwen, "b": qwen}))
    command = launch_command(config, config.models[0], config.models[0].replicas[1])
    assert json.loads(command[command.index("--mm-processor-kwargs") + 1]) == {"min_pixels": 200704, "max_pixels": 1003520}


def test_without_a_trained_budget_nothing_is_added(tmp_path):
    config = ServeConfig.model_validate(config_dict(tmp_path, [8001]))
    assert "--mm-processor-kwargs" not in launch_command(config, config.models[0], config.models[0].replicas[0])
    assert all("image_budget" not in route["model_info"] for route in router_config(config)["model_list"])


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_adapters_of_different_budgets_on_one_server_are_refused(tmp_path):
    from mics_agents.errors import ConfigError
    from mics_agents.serve import load_serve_config

    six = training_output(tmp_path / "six", INTERNVL_6)
    twelve = training_output(tmp_path / "twelve", {**INTERNVL_6, "max_patches": 12})
    path = write_config(tmp_path, budget_config(tmp_path, {"six": six, "twelve": twelve}))
    with pytest.raises(ConfigError) as raised:
        load_serve_config(path)
    message = str(raised.value)
    assert "different image budgets" in message and "adapter six" in message and "adapter twelve" in message
    assert "max_dynamic_patch 6" in message and "max_dynamic_patch 12" in message and "models entry of its own" in message

    result = cli("--config", str(path), "--dry-run")
    assert result.exit_code == 2 and "different image budgets" in result.output


@pytest.mark.parametrize("setting", [
    {"mm_processor_kwargs": {"max_dynamic_patch": 12}},
    {"mm_processor_kwargs": {"max_pixels": 1003520}},  # a Qwen key on an InternVL adapter's server
    {"extra_args": ["--mm-processor-kwargs", '{"max_dynamic_patch": 12}']},
    {"extra_args": ['--mm-processor-kwargs={"max_dynamic_patch": 1}']},
])
def test_a_server_setting_other_than_the_trained_budget_is_refused(tmp_path, setting):
    from mics_agents.errors import ConfigError
    from mics_agents.serve import load_serve_config

    adapter = training_output(tmp_path / "run", INTERNVL_6)
    with pytest.raises(ConfigError, match="was trained with max_dynamic_patch 6"):
        load_serve_config(write_config(tmp_path, budget_config(tmp_path, {"chiron": adapter}, **setting)))


def test_a_server_setting_equal_to_the_trained_budget_is_passed_once(tmp_path):
    from mics_agents.serve import load_serve_config

    adapter = training_output(tmp_path / "run", INTERNVL_6)
    data = budget_config(tmp_path, {"chiron": adapter},
                         extra_args=["--gpu-memory-utilization", "0.9", "--mm-processor-kwargs", '{"max_dynamic_patch": 6}'])
    config = load_serve_config(write_config(tmp_path, data))
    command = launch_command(config, config.models[0], config.models[0].replicas[0])
    assert command.count("--mm-processor-kwargs") == 1 and command[-2:] == ["--gpu-memory-utilization", "0.9"]

    result = cli("--config", str(write_config(tmp_path, data)), "--dry-run")
    assert result.exit_code == 0, result.output
    assert '{"max_dynamic_patch": 6}' in result.stdout and "image_budget" in result.stdout


@pytest.mark.parametrize("extra_args, problem", [
    (["--mm-processor-kwargs"], "needs a JSON object"),
    (["--mm-processor-kwargs", "max_dynamic_patch=6"], "takes a JSON object"),
    (["--mm-processor-kwargs", "[6]"], "takes a JSON object"),
])
def test_a_malformed_processor_setting_is_a_config_error(tmp_path, extra_args, problem):
    from mics_agents.errors import ConfigError
    from mics_agents.serve import load_serve_config

    with pytest.raises(ConfigError, match=problem):
        load_serve_config(write_config(tmp_path, budget_config(tmp_path, {}, extra_args=extra_args)))


def test_a_corrupt_saved_processor_is_a_config_error_naming_it(tmp_path):
    from mics_agents.errors import ConfigError
    from mics_agents.serve import load_serve_config

    adapter = training_output(tmp_path / "run", INTERNVL_6)
    (adapter / "processor_config.json").write_text('{"image_processor": ')
    with pytest.raises(ConfigError, match="processor_config.json cannot be read as JSON"):
        load_serve_config(write_config(tmp_path, budget_config(tmp_path, {"chiron": adapter})))


def test_deployments_that_disagree_on_the_budget_are_refused_when_read_back(tmp_path):
    from mics_agents.errors import ConfigError
    from mics_agents.serve import served_image_budget

    router = {"model_list": [
        {"model_name": "m", "litellm_params": {}, "model_info": {"image_budget": {"max_dynamic_patch": 6}}},
        {"model_name": "m", "litellm_params": {}, "model_info": {"supports_n": True}},
    ]}
    with pytest.raises(ConfigError, match="different image budgets"):
        served_image_budget(router, "m")
    with pytest.raises(ConfigError, match="not a mapping"):
        served_image_budget({"model_list": [{"model_name": "m", "model_info": {"image_budget": 6}}]}, "m")
    with pytest.raises(ConfigError, match="cannot be read"):
        served_image_budget(tmp_path / "missing.yaml", "m")
    with pytest.raises(ConfigError, match="no model_list"):
        served_image_budget({"models": []}, "m")


@pytest.mark.parametrize("template", ["{python:x}", "{python!r}", "{python:{python}}", "{python:>99999999999999999999}"])
def test_a_launcher_placeholder_with_a_format_spec_is_a_config_error(template):
    from mics_agents.serve import ServeConfig

    with pytest.raises(Exception, match="takes no format spec or conversion"):
        ServeConfig.model_validate({"models": [], "launcher": [template, "-m", "vllm"]})
