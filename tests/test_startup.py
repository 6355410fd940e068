"""Broken settings and failed start-ups through the real ``mics`` process (issue 15): each exits 2 within
10 s with one line saying what to fix, leaves the user's files as they were, and, for everything but a
Router config LiteLLM itself refuses, never imports LiteLLM (a stand-in ``litellm`` on PYTHONPATH records
any import)."""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .test_run_process import MICS, chiron_record

START_LIMIT = 10.0  # CPU seconds; each case takes well under one without LiteLLM (a few with it)


@dataclass
class Case:
    fragments: list[str]
    env: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    setup: Callable[[Path], None] | None = None
    output: str = "out.jsonl"
    data: str = "cases.jsonl"
    command: str = "run"
    imports_litellm: bool = False


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def newer_schema(folder: Path) -> None:
    with sqlite3.connect(folder / "cache.sqlite") as db:
        db.execute("CREATE TABLE calls (key TEXT)")
        db.execute("PRAGMA user_version = 999")


ROUTER_OK_ENTRY = "model_list:\n  - model_name: openai/judge\n    litellm_params: {model: openai/judge}\n"
PLAIN_INPUT = json.dumps({"id": "a", "question": "Which lobe?", "answer": "Left upper lobe"}) + "\n"
CHIRON_INPUT = json.dumps(chiron_record("c-1", "Which lobe?", "Left upper lobe", [], 1)) + "\n"

CASES = {
    "nan temperature": Case(["MICS_INTERN_TEMPERATURES", "finite number", "got 'nan'"],
                            env={"MICS_INTERN_TEMPERATURES": "nan"}),
    "concurrency override 0": Case(["MICS_MODEL_CONCURRENCY_OVERRIDES", "'openai/mentor-a' is 0", ">= 1"],
                                   env={"MICS_MODEL_CONCURRENCY_OVERRIDES": '{"openai/mentor-a": 0}'}),
    "concurrency override -1": Case(["MICS_MODEL_CONCURRENCY_OVERRIDES", "is -1"],
                                    env={"MICS_MODEL_CONCURRENCY_OVERRIDES": '{"openai/mentor-a": -1}'}),
    "concurrency override true": Case(["MICS_MODEL_CONCURRENCY_OVERRIDES", "'openai/judge' is true, not a number"],
                                      env={"MICS_MODEL_CONCURRENCY_OVERRIDES": '{"openai/judge": true}'}),
    "concurrency overrides not JSON": Case(["MICS_MODEL_CONCURRENCY_OVERRIDES", "not valid JSON"],
                                           env={"MICS_MODEL_CONCURRENCY_OVERRIDES": "{mentor: 4"}),
    "infinite timeout": Case(["MICS_REQUEST_TIMEOUT", "finite number"], env={"MICS_REQUEST_TIMEOUT": "inf"}),
    "garbage cache file": Case(["MICS_CACHE_PATH", "is not an SQLite database"],
                               setup=lambda d: write(d / "cache.sqlite", "garbage\n" * 100)),
    "newer cache schema": Case(["MICS_CACHE_PATH", "schema version 999, newer than this mics-agents knows"],
                               setup=newer_schema),
    "cache in a folder that cannot be made": Case(["MICS_CACHE_PATH", "cannot be created"],
                                                  extra=["--cache", "/proc/no-such-dir/cache.sqlite"]),
    "prompt dir missing": Case(["MICS_PROMPT_DIR", "'/nonexistent/prompts' is not a folder"],
                               env={"MICS_PROMPT_DIR": "/nonexistent/prompts"}),
    "prompt that does not render": Case(
        ["MICS_PROMPT_DIR", "mentor.md", "does not render", "unknown field(s) {{patient}}"],
        env={"MICS_PROMPT_DIR": "prompts"},
        setup=lambda d: write(d / "prompts" / "mentor.md",
                              "<!-- user -->\n{{case_info}} {{question}} {{answer}} {{prefix}} {{patient}}\n")),
    "router without model_name": Case(["MICS_ROUTER_CONFIG", "model_list entry 1 lacks model_name"],
                                      extra=["--router-config", "router.yaml"],
                                      setup=lambda d: write(d / "router.yaml", "model_list:\n  - litellm_params: {model: openai/x}\n")),
    "router not UTF-8": Case(["MICS_ROUTER_CONFIG", "is not UTF-8 text"], extra=["--router-config", "router.yaml"],
                             setup=lambda d: write(d / "router.yaml", b"model_list:\n  - model_name: \xff\xfe\n")),
    "router with an unknown router_settings key": Case(
        ["MICS_ROUTER_CONFIG", "LiteLLM refused", "no_such_router_setting"], extra=["--router-config", "router.yaml"],
        setup=lambda d: write(d / "router.yaml", ROUTER_OK_ENTRY + "router_settings:\n  no_such_router_setting: 1\n"),
        imports_litellm=True),
    "plain input given as the output": Case(["cases.jsonl is not an output of mics-agents", "Is it your input file?"],
                                            output="cases.jsonl"),
    "Chiron input given as the output": Case(["chiron.jsonl is not an output of mics-agents", "no 'gt_answer'"],
                                             output="chiron.jsonl",
                                             setup=lambda d: write(d / "chiron.jsonl", CHIRON_INPUT)),
    "a [] line in the output": Case(["out.jsonl is not an output", "JSON list, not an object"],
                                    setup=lambda d: write(d / "out.jsonl", "[]\n")),
    "an error that is not ours in the failed file": Case(
        ["out_failed.jsonl is not a failed file of mics-agents", "its 'error' is not an object"],
        setup=lambda d: write(d / "out_failed.jsonl", json.dumps({"rid": "a", "error": "oops"}) + "\n")),
    "an edited line in the middle": Case(
        ["out.jsonl:2 is not a line mics-agents writes"],
        setup=lambda d: write(d / "out.jsonl", json.dumps({"rid": "a", "gt_answer": "x"}) + "\n"
                              + json.dumps({"id": "b", "question": "q", "answer": "x"}) + "\n")),
    "output is a folder": Case(["is a folder"], output="outdir", setup=lambda d: (d / "outdir").mkdir()),
    "output is /dev/null": Case(["/dev/null is not a regular file", "--output"], output="/dev/null"),
    "output is a FIFO": Case(["pipe is not a regular file"], output="pipe", setup=lambda d: os.mkfifo(d / "pipe")),
    "output is a symlink to a folder": Case(["is a folder"], output="alias.jsonl",
                                            setup=lambda d: ((d / "outdir").mkdir(), (d / "alias.jsonl").symlink_to(d / "outdir"))),
    "output is a symlink loop": Case(["loop.jsonl cannot be resolved"], output="loop.jsonl",
                                     setup=lambda d: ((d / "loop.jsonl").symlink_to(d / "back.jsonl"),
                                                      (d / "back.jsonl").symlink_to(d / "loop.jsonl"))),
    "json summary in a missing folder": Case(["--json-summary", "does not exist"],
                                             extra=["--json-summary", "nowhere/summary.json"]),
    "failed file is /dev/null": Case(["/dev/null is not a regular file", "--failed"], extra=["--failed", "/dev/null"]),
    "image folder missing": Case(["--image-dir", "'/nonexistent/images' is not a folder"],
                                 extra=["--image-dir", "/nonexistent/images"]),
    "unknown provider": Case(["no-such-provider/x"], env={"MICS_JUDGE": "no-such-provider/x"}, imports_litellm=True),
    "input missing": Case(["input file 'missing.jsonl' not found"], data="missing.jsonl"),
    "input is a folder": Case(["is not a file"], data="indir", setup=lambda d: (d / "indir").mkdir()),
    "mics generate with a garbage cache": Case(["MICS_CACHE_PATH", "is not an SQLite database"], command="generate",
                                               setup=lambda d: write(d / "cache.sqlite", "garbage\n" * 100)),
}


def stand_in_litellm(folder: Path) -> Path:
    """A ``litellm`` package that records being imported, then fails: nothing before it may import it."""
    package = folder / "no-litellm" / "litellm"
    package.mkdir(parents=True)
    marker = folder / "litellm-imported"
    (package / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nraise ImportError('LiteLLM imported during start-up')\n"
    )
    return folder / "no-litellm"


def env_for(folder: Path, case: Case) -> dict[str, str]:
    env = {
        name: value for name, value in os.environ.items()
        if not name.startswith("MICS_") and not name.endswith(("_API_KEY", "_API_BASE", "_BASE_URL"))
    }
    env.update(
        MICS_MENTORS="openai/mentor-a,openai/mentor-b", MICS_INTERNS="openai/intern-1", MICS_JUDGE="openai/judge",
        OPENAI_API_BASE="http://127.0.0.1:9/v1", OPENAI_API_KEY="sk-test", LITELLM_LOCAL_MODEL_COST_MAP="True",
        COLUMNS="40",  # narrow on purpose: the message is one line whatever the width
    )
    if not case.imports_litellm:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stand_in_litellm(folder)), env.get("PYTHONPATH")]))
    env.update(case.env)
    return env


@pytest.mark.parametrize("name", list(CASES))
def test_a_broken_start_exits_2_at_once_with_one_line_and_touches_nothing(tmp_path, name):
    case = CASES[name]
    write(tmp_path / "cases.jsonl", PLAIN_INPUT)
    if case.setup:
        case.setup(tmp_path)
    env = env_for(tmp_path, case)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    entries_before = set(tmp_path.rglob("*"))
    args = [case.command] + (["qa"] if case.command == "generate" else [])
    args += [case.data, "--output", case.output, *(["--cache", "cache.sqlite"] if "--cache" not in case.extra else []),
             *case.extra]
    # CPU time of the child, not wall time: a loaded machine stretches the one, not the other.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([*MICS, *args], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=START_LIMIT + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert elapsed < START_LIMIT, f"took {elapsed:.1f} s of CPU"
    assert len(lines) == 1, result.stderr
    for fragment in case.fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.stderr
    if not case.imports_litellm:
        assert not (tmp_path / "litellm-imported").exists(), "LiteLLM was imported before the check"
    # The user's files are as they were, and nothing is new: not even the lock file beside the output, since
    # every check that can end the command runs before it is made.
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path.name} was changed"
    new = set(tmp_path.rglob("*")) - entries_before
    assert not new, new


def test_mics_eval_with_a_garbage_cache_exits_2_before_litellm(tmp_path):
    case = Case([])
    write(tmp_path / "cache.sqlite", "garbage\n" * 100)
    write(tmp_path / "bench.jsonl", PLAIN_INPUT)
    result = subprocess.run(
        [*MICS, "eval", "--model", "openai/m", "--benchmark", "bench.jsonl", "--output", "results", "--cache",
         "cache.sqlite"], env=env_for(tmp_path, case), cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "is not an SQLite database" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "litellm-imported").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="glibc")
def test_the_cli_returns_freed_image_buffers_to_the_os():
    from mics_agents.images import return_freed_buffers_to_the_os

    assert return_freed_buffers_to_the_os() in (True, False)  # applied where glibc is there, harmless elsewhere


# -- lazy start-up (issue 30): what a run of local servers never needs is never loaded -----------------------


def test_a_run_of_local_servers_imports_neither_aiohttp_nor_tenacity_nor_parses_the_price_table(tmp_path):
    """Through the real process against the suite's server: a plain http:// run sends every call with the
    small keep-alive client, retries without tenacity, and prices local names without parsing LiteLLM's table."""
    from .openai_server import OpenAIServer

    probe = tmp_path / "probe.py"
    probe.write_text(
        "import atexit, json, sys, os\n"
        "def report():\n"
        "    from mics_agents.models import providers\n"
        "    json.dump({'aiohttp': 'aiohttp' in sys.modules, 'tenacity': 'tenacity' in sys.modules,\n"
        "               'litellm': 'litellm' in sys.modules,\n"
        "               'table_parsed': providers._bundled_price_table.cache_info().currsize},\n"
        "              open(os.environ['PROBE_OUT'], 'w'))\n"
        "atexit.register(report)\n"
        "from mics_agents.cli import main\n"
        "sys.argv = ['mics', *sys.argv[1:]]\n"
        "main()\n"
    )
    write(tmp_path / "cases.jsonl", json.dumps({"id": "q1", "question": "Which?\nA. Mass\nB. Cyst", "answer": "A",
                                                "case_info": "A patient."}) + "\n")
    with OpenAIServer() as server:
        env = {name: value for name, value in os.environ.items() if not name.startswith("MICS_")}
        env.pop("OPENAI_BASE_URL", None)
        env.update(MICS_MENTORS="openai/mentor-a,openai/mentor-b", MICS_INTERNS="hosted_vllm/intern-1", MICS_JUDGE="openai/judge",
                   OPENAI_API_BASE=server.base_url, OPENAI_API_KEY="sk-local-test-key", HOSTED_VLLM_API_BASE=server.base_url,
                   PROBE_OUT=str(tmp_path / "probe.json"), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        result = subprocess.run([sys.executable, str(probe), "run", "cases.jsonl", "--output", "out.jsonl", "--cache",
                                 "cache.sqlite"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert server.count() > 0
    seen = json.loads((tmp_path / "probe.json").read_text())
    assert seen == {"aiohttp": False, "tenacity": False, "litellm": False, "table_parsed": 0}


def test_a_name_the_price_table_lists_is_priced_at_the_first_reply_and_one_it_cannot_list_never_parses_it():
    from mics_agents.models import providers
    from mics_agents.models.direct import DirectEndpoint, DirectTransport

    providers._bundled_price_table.cache_clear()
    assert providers.listed_prices("openai/my-local-model-7b") is None
    assert providers.listed_prices("openai/gpt-4o-mini\"") is None  # a quote cannot sneak a key match in
    assert providers._bundled_price_table.cache_info().currsize == 0
    looked_up = []
    transport = DirectTransport("openai/gpt-4o-mini", DirectEndpoint("http://127.0.0.1:1/v1/chat/completions", None, "gpt-4o-mini"),
                                timeout=5, price_lookup=lambda: looked_up.append(1) or providers.listed_prices("openai/gpt-4o-mini"))
    assert not looked_up and providers._bundled_price_table.cache_info().currsize == 0
    price_in, price_out = transport.prices
    assert price_in > 0 and price_out > 0 and looked_up == [1]
    assert transport.prices == (price_in, price_out) and looked_up == [1]  # looked up once
    assert providers._bundled_price_table.cache_info().currsize == 1
    priced = DirectTransport("openai/gpt-4o-mini", DirectEndpoint("http://127.0.0.1:1/v1", None, "gpt-4o-mini"),
                             timeout=5, prices=(1.0, 2.0), price_lookup=lambda: looked_up.append(2))
    assert priced.prices == (1.0, 2.0) and looked_up == [1]  # MICS_PRICES: never looked up
