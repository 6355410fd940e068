"""Every ```python and ```bash example of the manual runs, so an example that stops working fails the suite.

The rules (CONTRIBUTING.md, "Examples in the docs"):

- A fence tagged ``python`` or ``bash`` is run. ``text``, ``yaml``, ``json``, ``jsonl``, ``toml``, ``ini``,
  ``dockerfile`` and ``mermaid`` are shown, not run. Any other tag, a shell-like one (``sh``, ``console``...)
  included, and an untagged fence are errors: no example escapes by its tag.
- A block that must not run (it needs a GPU, a cluster, a real provider, model weights...) has, on the line just
  before its opening fence, ``<!-- skip-example: REASON -->``. A marker without a reason, or not followed by a
  fence, is an error.
- The runnable blocks of a page run in page order in one fresh temporary directory holding a copy of the
  package's example cases (``cases.jsonl``, ``images/chest_ct.png``): files persist from block to block, Python
  state does not. Each python block is its own ``python`` process, each bash block runs under
  ``bash -euo pipefail``. A block fails on a non-zero exit or after BLOCK_TIMEOUT seconds.
- The models are a local OpenAI-compatible server (tests/openai_server.py) that answers as a mentor, intern,
  judge or question writer according to the prompt, whatever the model is called. ``OPENAI_API_BASE`` and
  ``HOSTED_VLLM_API_BASE`` point at it; ``MICS_MENTORS``, ``MICS_INTERNS`` and ``MICS_JUDGE`` are set. An example
  may export other ``openai/`` or ``hosted_vllm/`` model names; it must not set ``*_API_BASE`` itself. Every
  process runs under the suite's ``local-only`` request policy (a ``sitecustomize`` on ``PYTHONPATH`` sets it),
  so a model of another provider fails the example instead of reaching the network.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.openai_server import OpenAIServer, prompt_brain

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "mics_agents" / "examples"
VENV_BIN = Path(sys.executable).parent

RUN_TAGS = {"python", "bash"}
SHOWN_TAGS = {"text", "yaml", "json", "jsonl", "toml", "ini", "dockerfile", "mermaid"}
BLOCK_TIMEOUT = 120.0
OUTPUT_TAIL = 3000

SKIP_MARKER = re.compile(r"^\s*<!--\s*skip-example:(?P<reason>.*?)-->\s*$")
ANY_MARKER = re.compile(r"^\s*<!--\s*skip-example\b")  # a marker, however malformed (not one quoted in prose)
FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")

ENVIRONMENT = {
    "MICS_MENTORS": "openai/mentor-a,openai/mentor-b",
    "MICS_INTERNS": "hosted_vllm/intern-1,openai/intern-2",
    "MICS_JUDGE": "openai/judge",
    "OPENAI_API_KEY": "sk-docs-example",
    "HOSTED_VLLM_API_KEY": "docs-example",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "NO_COLOR": "1",
    "COLUMNS": "100",
    "PYTHONUNBUFFERED": "1",
}

# Loaded first by every Python process of an example: the suite's request policy, set as soon as the model
# boundary is imported (importing it here would slow down every process that never calls a model).
SITECUSTOMIZE = '''\
import importlib.abc
import importlib.util
import sys


class _LocalOnly(importlib.abc.MetaPathFinder):
    """Sets the local-only request policy when mics_agents.models.base is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "mics_agents.models.base":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            module.set_request_policy("local-only")

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _LocalOnly())
'''


class ExampleError(Exception):
    """A page breaks the examples' rules, or one of its blocks failed."""


@dataclass
class Block:
    page: str  # the page as shown in messages, e.g. docs/guides/python.md
    line: int  # the line of the opening fence, 1-based
    tag: str
    code: str
    skip_reason: str | None = None


def _page_name(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def parse_page(path: Path) -> list[Block]:
    """Every fenced block of a page, with its skip marker; raises ExampleError on a rule broken."""
    name = _page_name(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, str] | None = None  # a skip marker waiting for its fence: (line, reason)
    index = 0
    while index < len(lines):
        line = lines[index]
        number = index + 1
        opening = FENCE_OPEN.match(line)
        if opening:
            indent, fence = opening.group("indent"), opening.group("fence")
            info = opening.group("info").strip()
            tag = info.split()[0].strip("{}").lstrip(".").lower() if info else ""
            body: list[str] = []
            index += 1
            closed = False
            while index < len(lines):
                closing = lines[index].strip()
                if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                    closed = True
                    break
                text = lines[index]
                body.append(text[len(indent):] if text.startswith(indent) else text.lstrip())
                index += 1
            index += 1
            if not closed:
                problems.append(f"{name}:{number}: the fence opened here is never closed")
            if not tag:
                problems.append(f"{name}:{number}: a fence without a language tag; use python or bash (run), or "
                                f"one of {', '.join(sorted(SHOWN_TAGS))} (shown only)")
            elif tag not in RUN_TAGS | SHOWN_TAGS:
                problems.append(f"{name}:{number}: fence tag {tag!r} is neither run (python, bash) nor shown only "
                                f"({', '.join(sorted(SHOWN_TAGS))}); write shell examples as bash")
            reason = None
            if pending is not None:
                reason = pending[1]
                pending = None
            blocks.append(Block(name, number, tag, "\n".join(body) + "\n", reason))
            continue
        if pending is not None:
            problems.append(f"{name}:{pending[0]}: a skip-example marker must be followed, on the next line, by "
                            "the fence it skips")
            pending = None
        marker = SKIP_MARKER.match(line)
        if marker:
            reason = marker.group("reason").strip()
            if not reason:
                problems.append(f"{name}:{number}: a skip-example marker needs a reason: "
                                "<!-- skip-example: needs a GPU -->")
            pending = (number, reason or "")
        elif ANY_MARKER.search(line):
            problems.append(f"{name}:{number}: a skip-example marker must be alone on its line, as "
                            "<!-- skip-example: REASON -->")
        index += 1
    if pending is not None:
        problems.append(f"{name}:{pending[0]}: a skip-example marker must be followed, on the next line, by the "
                        "fence it skips")
    if problems:
        raise ExampleError("\n".join(problems))
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    return [block for block in blocks if block.tag in RUN_TAGS and block.skip_reason is None]


def prepare_directory(workdir: Path) -> None:
    """The example cases and their images, as the examples expect them in the working directory."""
    shutil.copy(EXAMPLES / "cases.jsonl", workdir / "cases.jsonl")
    shutil.copytree(EXAMPLES / "images", workdir / "images")


def example_environment(base_url: str, workdir: Path, site_dir: Path) -> dict[str, str]:
    """The environment every block runs in: nothing of the machine's MICS_* or provider variables."""
    env = {
        name: value for name, value in os.environ.items()
        if not name.startswith(("MICS_", "PYTEST_")) and not name.endswith(("_API_KEY", "_API_BASE", "_BASE_URL"))
    }
    env.pop("VIRTUAL_ENV", None)
    home = workdir / ".home"
    home.mkdir(exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    env.update(ENVIRONMENT)
    env.update({
        "OPENAI_API_BASE": base_url,
        "HOSTED_VLLM_API_BASE": base_url,
        "MICS_CACHE_PATH": str(workdir / ".mics_cache.sqlite"),
        "HOME": str(home),
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(site_dir), str(ROOT)]),
        "VIRTUAL_ENV": str(VENV_BIN.parent),
    })
    return env


def _tail(text: str) -> str:
    return text if len(text) <= OUTPUT_TAIL else "..." + text[-OUTPUT_TAIL:]


def run_block(block: Block, workdir: Path, env: dict[str, str], timeout: float = BLOCK_TIMEOUT) -> None:
    """Run one block; raise ExampleError naming the page, the line and the output tail when it fails."""
    if block.tag == "python":
        command = [str(VENV_BIN / "python"), "-c", block.code]
    else:
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the block's whole process group: servers it started too
        output, _ = process.communicate()
        timed_out = True
    text = output.decode("utf-8", "replace")
    if timed_out or process.returncode != 0:
        what = f"did not finish in {timeout:.0f} s" if timed_out else f"exited {process.returncode}"
        raise ExampleError(
            f"{block.page}:{block.line}: the {block.tag} example {what} "
            f"(after {time.monotonic() - started:.1f} s)\n--- its output, last lines ---\n{_tail(text)}"
        )


def run_page(path: Path, workdir: Path, env: dict[str, str]) -> int:
    """Run a page's examples in order in ``workdir``; returns how many ran."""
    blocks = runnable(parse_page(path))
    prepare_directory(workdir)
    for block in blocks:
        run_block(block, workdir, env)
    return len(blocks)


def doc_pages() -> list[Path]:
    pages = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    return [page for page in pages if page.is_file() and "hooks" not in page.relative_to(ROOT).parts]


@pytest.fixture(scope="module")
def docs_server():
    with OpenAIServer(prompt_brain, lifetime=1800.0) as server:
        yield server


@pytest.fixture
def example_env(docs_server, tmp_path: Path):
    workdir = tmp_path / "work"
    site_dir = tmp_path / "site"
    workdir.mkdir()
    site_dir.mkdir()
    return workdir, example_environment(docs_server.base_url, workdir, site_dir)


@pytest.mark.parametrize("page", doc_pages(), ids=lambda page: _page_name(page))
def test_page_examples_run(page: Path, example_env, docs_server) -> None:
    workdir, env = example_env
    failure = None
    try:
        run_page(page, workdir, env)
    except ExampleError as exc:
        failure = str(exc)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    assert not docs_server.errors, f"{_page_name(page)}: the model server could not answer: {docs_server.errors}"


# -- the runner itself --------------------------------------------------------------------------------------


def _page(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broken.md"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_broken_example_fails_naming_its_page_and_line(example_env, tmp_path: Path) -> None:
    workdir, env = example_env
    page = _page(tmp_path, "# A page\n\n```bash\nls cases.jsonl images/chest_ct.png\n```\n\nText.\n\n"
                           "```python\nimport sys\nprint('about to fail')\nsys.exit(3)\n```\n")
    with pytest.raises(ExampleError) as caught:
        run_page(page, workdir, env)
    message = str(caught.value)
    assert f"{page}:9: the python example exited 3" in message
    assert "about to fail" in message


def test_files_persist_between_blocks_and_the_cli_reaches_the_local_server(example_env, tmp_path: Path,
                                                                           docs_server) -> None:
    workdir, env = example_env
    before = docs_server.count()
    page = _page(tmp_path, "```bash\necho hello > note.txt\n```\n\n```python\n"
                           "assert open('note.txt').read() == 'hello\\n'\n```\n\n"
                           "```bash\nmics search 'Is there a nodule? A. yes B. no' --answer A --image images/chest_ct.png"
                           "\n```\n")
    assert run_page(page, workdir, env) == 3
    assert docs_server.count() > before


def test_the_server_answers_by_prompt_whatever_the_models_are_called(example_env, tmp_path: Path) -> None:
    workdir, env = example_env
    page = _page(tmp_path, "```bash\nexport MICS_MENTORS=openai/gpt-4o,openai/gpt-4.1\n"
                           "export MICS_INTERNS=hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct\n"
                           "export MICS_JUDGE=openai/gpt-4o-mini\n"
                           "mics search 'Is there a nodule? A. yes B. no' --answer A --image images/chest_ct.png --json "
                           "> record.json\n```\n\n```python\nimport json\n"
                           "record = json.load(open('record.json'))\nassert record['final_answer_grade']['correct'], record\n"
                           "assert set(record['scores']) == {'openai/gpt-4o', 'openai/gpt-4.1'}, record\n```\n")
    assert run_page(page, workdir, env) == 2


def test_a_model_of_another_provider_is_refused_not_called(example_env, tmp_path: Path) -> None:
    workdir, env = example_env
    # What the model boundary asks before every call (mics refuses the same at start, but pays for LiteLLM first).
    page = _page(tmp_path, "```python\nfrom mics_agents.models.base import check_request_allowed\n"
                           "check_request_allowed('openai/gpt-4o', [None])\n```\n")
    with pytest.raises(ExampleError) as caught:
        run_page(page, workdir, env)
    assert "Only local model servers may be called" in str(caught.value)


def test_examples_run_under_the_local_only_request_policy(example_env, tmp_path: Path) -> None:
    workdir, env = example_env
    page = _page(tmp_path, "```python\nimport asyncio, mics_agents\n"
                           "from mics_agents.models import request_policy\nassert request_policy() == 'local-only'\n```\n")
    assert run_page(page, workdir, env) == 1


def test_a_failing_bash_pipe_fails(example_env, tmp_path: Path) -> None:
    workdir, env = example_env
    page = _page(tmp_path, "```bash\nfalse | cat\necho never\n```\n")
    with pytest.raises(ExampleError, match=r"broken.md:1: the bash example exited 1"):
        run_page(page, workdir, env)


def test_a_block_past_its_time_fails(example_env, tmp_path: Path) -> None:
    workdir, env = example_env
    block = Block("docs/slow.md", 7, "bash", "sleep 30\n")
    with pytest.raises(ExampleError, match=r"docs/slow.md:7: the bash example did not finish in 1 s"):
        run_block(block, workdir, env, timeout=1.0)


def test_skipped_and_shown_blocks_do_not_run(tmp_path: Path) -> None:
    page = _page(tmp_path, "<!-- skip-example: needs a GPU -->\n```bash\nexit 1\n```\n\n```text\nexit 1\n```\n\n"
                           "```yaml\na: 1\n```\n\n  ```python\n  print('indented, in a list')\n  ```\n")
    blocks = parse_page(page)
    assert [block.skip_reason for block in blocks] == ["needs a GPU", None, None, None]
    assert [(block.tag, block.line) for block in runnable(blocks)] == [("python", 14)]
    assert runnable(blocks)[0].code == "print('indented, in a list')\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<!-- skip-example: -->\n```bash\nls\n```\n", r"broken.md:1: a skip-example marker needs a reason"),
        ("<!-- skip-example:   -->\n```bash\nls\n```\n", r"broken.md:1: a skip-example marker needs a reason"),
        ("<!-- skip-example: needs a GPU -->\n\n```bash\nls\n```\n", r"broken.md:1: a skip-example marker must be "
                                                                      r"followed"),
        ("Text.\n<!-- skip-example: needs a GPU -->\n", r"broken.md:2: a skip-example marker must be followed"),
        ("```sh\nls\n```\n", r"broken.md:1: fence tag 'sh' is neither run"),
        ("```console\n$ ls\n```\n", r"broken.md:1: fence tag 'console' is neither run"),
        ("```shell\nls\n```\n", r"broken.md:1: fence tag 'shell' is neither run"),
        ("```\nls\n```\n", r"broken.md:1: a fence without a language tag"),
        ("```bash\nls\n", r"broken.md:1: the fence opened here is never closed"),
    ],
)
def test_pages_that_break_the_rules_fail(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ExampleError, match=problem):
        parse_page(_page(tmp_path, text))
