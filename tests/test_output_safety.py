"""The output belongs to one run however it is spelled, and store and disk failures are clear errors (issue 24):
a symlinked output while a run holds the real one, a file-size limit under the output, a cache SQLite will
not write, a run record that cannot be written."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from mics_agents.store import Store

from .openai_server import OpenAIServer
from .test_run_process import (  # noqa: F401 - launch is a fixture
    MICS, RUN_TIMEOUT, flat, launch, lines_by_item, mics_env, read_jsonl, run_args, run_mics, wait_until,
    write_dataset,
)


def test_every_spelling_of_a_running_runs_output_is_refused_with_its_holder(tmp_path, launch):
    data = write_dataset(tmp_path / "data")
    output, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    (tmp_path / "sub").mkdir()
    (tmp_path / "alias.jsonl").symlink_to(output)  # dangling until the run writes out.jsonl: still its file
    (tmp_path / "sub" / "link.jsonl").symlink_to(Path("..") / "alias.jsonl")  # a chain, and relative
    lock = tmp_path / "out.jsonl.lock"
    with OpenAIServer(latency=0.5, lifetime=120) as server:
        env = mics_env(server)
        owner = launch(run_args(data, output, cache), env, name="owner")
        wait_until(lambda: owner.process.poll() is not None or (lock.exists() and b"pid" in lock.read_bytes()),
                   timeout=RUN_TIMEOUT, what="the first run to take the lock")
        refused = {spelling: run_mics(run_args(data, Path(spelling), cache), env, tmp_path)
                   for spelling in ("alias.jsonl", "./sub/../out.jsonl", "sub/link.jsonl", str(output))}
        assert owner.process.poll() is None, "the first run must still be going"
        owner.process.send_signal(signal.SIGINT)  # enough: items in flight finish, the rest wait for a rerun
        assert owner.wait() in (0, 130), owner.err()  # 0 if the interrupt came after its last item started
        assert server.errors == []

    for spelling, result in refused.items():
        assert result.returncode == 2, (spelling, result.stderr)
        said = flat(result.stderr)
        assert f"pid {owner.process.pid} on {socket.gethostname()}" in said, (spelling, said)
    # No second lock beside the other names, and the owner's output is one run's: at most one line per item.
    assert not (tmp_path / "alias.jsonl.lock").exists() and not (tmp_path / "sub" / "link.jsonl.lock").exists()
    assert set(lines_by_item(output)) <= set(data.keys)


def limited_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_file_size_limit_under_the_output_stops_the_run_with_one_line_and_the_rerun_loses_nothing(tmp_path):
    data = write_dataset(tmp_path / "data")
    output = tmp_path / "out.jsonl"
    args = [*MICS, "run", str(data.path), "--image-dir", str(data.image_dir), "--output", str(output),
            "--concurrency", "2"]
    with OpenAIServer(lifetime=120) as server:
        env = mics_env(server, MICS_CACHE_PATH="")  # no cache: only the output files grow
        stopped = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                                 preexec_fn=limited_file_size(12_000))
        kept = read_jsonl(output) + (read_jsonl(tmp_path / "out_failed.jsonl")
                                     if (tmp_path / "out_failed.jsonl").exists() else [])
        left = output.read_bytes()
        resumed = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert server.errors == []

    assert stopped.returncode == 1, stopped.stderr
    said = flat(stopped.stderr)
    assert "Traceback" not in stopped.stderr and "defect" not in said
    assert f"cannot write {output}" in said or "out_failed.jsonl" in said, said
    assert "rerun the same command to resume" in said
    assert kept, "the lines written before the limit stand"
    assert 0 < len(left) <= 12_000 and left.endswith(b"\n"), "no torn line is left"
    assert resumed.returncode == 0, resumed.stderr
    outcomes = lines_by_item(output)
    assert sorted(outcomes) == sorted(data.keys)
    for record in kept:  # what stood before the limit stands as it was
        key = str(record.get("key", record["rid"]))
        if "error" not in record:
            assert outcomes[key] == record


def inject(folder: Path, code: str) -> dict[str, str]:
    """A sitecustomize module that changes the process under test (the failure to inject), on PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


# SQLite itself refuses every write: the connection is opened read-only, as on a read-only file or mount
# (CI runs as root, for whom chmod does not make a file read-only).
READ_ONLY_CACHE = """
import aiosqlite
_connect = aiosqlite.connect
def connect(database, *args, **kwargs):
    return _connect(f"file:{database}?mode=ro", *args, uri=True, **kwargs)
aiosqlite.connect = connect
"""


def make_cache(path: Path) -> None:
    async def create() -> None:
        async with await Store.open(path):
            pass
    asyncio.run(create())


def test_a_cache_sqlite_will_not_write_is_a_configuration_error_before_any_call(tmp_path):
    data = write_dataset(tmp_path / "data")
    cache, output = tmp_path / "cache.sqlite", tmp_path / "out.jsonl"
    make_cache(cache)
    with OpenAIServer(lifetime=60) as server:
        env = {**mics_env(server), **inject(tmp_path / "inject", READ_ONLY_CACHE)}
        result = run_mics(run_args(data, output, cache), env, tmp_path)
        assert server.count() == 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "cannot write to the cache database" in flat(result.stderr)
    assert str(cache) in flat(result.stderr) and "Traceback" not in result.stderr
    assert not output.exists() and not (tmp_path / "out.jsonl.lock").exists()


# Every write of the run record fails, as on a disk that filled up after the start; call writes still work.
FAILING_RUN_RECORD = """
import sqlite3
import aiosqlite
from mics_agents import store
_execute = aiosqlite.Connection.execute
def execute(self, sql, *args, **kwargs):
    if sql.startswith("INSERT INTO runs"):
        raise sqlite3.OperationalError("database or disk is full")
    return _execute(self, sql, *args, **kwargs)
aiosqlite.Connection.execute = execute
store.WRITE_RETRY_PAUSE = 0.01
"""


def test_a_run_record_that_cannot_be_written_is_a_warning_and_the_run_goes_on(tmp_path):
    data = write_dataset(tmp_path / "data")
    cache, output = tmp_path / "cache.sqlite", tmp_path / "out.jsonl"
    with OpenAIServer(lifetime=120) as server:
        env = {**mics_env(server), **inject(tmp_path / "inject", FAILING_RUN_RECORD)}
        result = run_mics(run_args(data, output, cache, "--limit", "2"), env, tmp_path)
        assert server.errors == []
    assert result.returncode == 0, result.stderr
    said = flat(result.stderr)
    assert "Warning:" in said and "database or disk is full" in said and "The run goes on" in said
    assert "Traceback" not in result.stderr
    assert len(lines_by_item(output)) == 2


@pytest.mark.parametrize("spelling", ["alias.jsonl", "./x/../out.jsonl"])
def test_the_library_lock_is_the_files_too(tmp_path, spelling):
    from mics_agents.errors import OutputBusyError
    from mics_agents.outputs import OutputLock

    (tmp_path / "x").mkdir()
    (tmp_path / "alias.jsonl").symlink_to(tmp_path / "out.jsonl")
    with OutputLock(tmp_path / "out.jsonl"):
        other = OutputLock(Path(os.path.relpath(tmp_path, Path.cwd())) / spelling)
        with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
            other.probe()
        with pytest.raises(OutputBusyError):
            other.acquire()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["alias.jsonl", "out.jsonl.lock", "x"]


def test_a_write_that_fails_is_cut_back_and_no_later_line_is_glued_to_it(tmp_path, monkeypatch):
    from mics_agents.errors import OutputWriteError
    from mics_agents.outputs import OutputFiles

    files = OutputFiles(tmp_path / "out.jsonl")
    record = {"rid": "a", "gt_answer": "x", "reasoning": "y" * 100}

    async def scenario() -> None:
        await files.append_success([record])
        real_write = os.write

        def half_then_full(fd: int, data) -> int:  # the disk fills half-way through the line
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "write", half_then_full)
        with pytest.raises(OutputWriteError, match="No space left on device"):
            await files.append_success([{**record, "rid": "b"}])
        monkeypatch.setattr(os, "write", real_write)
        with pytest.raises(OutputWriteError):  # the space came back, but the run has stopped writing
            await files.append_success([{**record, "rid": "c"}])
        await files.aclose()

    asyncio.run(scenario())
    assert [json.loads(line)["rid"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == ["a"]


def test_a_missing_image_folder_is_refused_before_the_run(tmp_path):
    data = write_dataset(tmp_path / "data")
    with OpenAIServer(lifetime=60) as server:
        result = run_mics(["run", str(data.path), "--image-dir", str(tmp_path / "nope"), "--output",
                           str(tmp_path / "out.jsonl"), "--cache", str(tmp_path / "c.sqlite")],
                          mics_env(server), tmp_path)
        assert server.count() == 0
    assert result.returncode == 2 and "--image-dir" in flat(result.stderr) and "is not a folder" in flat(result.stderr)
    assert not (tmp_path / "out.jsonl").exists()


def test_start_up_failures_leave_no_thread_tracebacks(tmp_path):
    """An unopenable cache at start-up: the one line, three times out of three, never an aiosqlite thread's
    'Event loop is closed'."""
    data = write_dataset(tmp_path / "data")
    with OpenAIServer(lifetime=60) as server:
        results = [run_mics(run_args(data, tmp_path / "out.jsonl", Path("/proc/c.sqlite")), mics_env(server), tmp_path)
                   for _ in range(3)]
    for result in results:
        assert result.returncode == 2, result.stderr
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr



def test_an_empty_cache_option_means_no_cache_as_the_empty_variable_does(tmp_path):
    data = write_dataset(tmp_path / "data")
    output = tmp_path / "out.jsonl"
    with OpenAIServer(lifetime=60) as server:
        result = run_mics(["run", str(data.path), "--image-dir", str(data.image_dir), "--output", str(output),
                           "--cache", "", "--limit", "1"], mics_env(server), tmp_path)
        assert server.count() > 0
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("*.sqlite*")), "no cache file is made"
    assert len(lines_by_item(output)) == 1


def test_the_failed_file_is_owned_too(tmp_path):
    """A second run that names a running run's failed file as its own --failed is refused: one journal, one owner."""
    from mics_agents.errors import OutputBusyError
    from mics_agents.outputs import OutputLock

    with OutputLock(tmp_path / "a.jsonl", tmp_path / "a_failed.jsonl"):
        other = OutputLock(tmp_path / "b.jsonl", tmp_path / "a_failed.jsonl")
        with pytest.raises(OutputBusyError, match="a_failed.jsonl is being written"):
            other.probe()
        with pytest.raises(OutputBusyError):
            other.acquire()
        assert not other._fds, "a refused acquire holds nothing"
    with OutputLock(tmp_path / "b.jsonl", tmp_path / "a_failed.jsonl"):  # free again once the first is gone
        pass


def test_the_demo_never_deletes_a_file_it_did_not_write(tmp_path):
    precious = tmp_path / "precious.jsonl"
    precious.write_text(json.dumps({"id": "x", "question": "q", "answer": "a"}) + "\n")
    (tmp_path / "precious_failed.jsonl").write_text("kept\n")
    result = run_mics(["demo", "--output", str(precious), "--cache", ""], {**os.environ}, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "not an output of mics-agents" in flat(result.stderr)
    assert json.loads(precious.read_text())["id"] == "x" and (tmp_path / "precious_failed.jsonl").read_text() == "kept\n"


def test_merge_refuses_a_fifo_or_a_file_it_did_not_write_and_keeps_the_mode(tmp_path):
    from mics_agents.errors import ForeignOutputError
    from mics_agents.outputs import merge_outputs

    shard = tmp_path / "shard.jsonl"
    shard.write_text(json.dumps({"rid": "a", "gt_answer": "x"}) + "\n")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ForeignOutputError, match="not a regular file"):
        merge_outputs([shard], tmp_path / "pipe")
    assert (tmp_path / "pipe").is_fifo()
    precious = tmp_path / "cases.jsonl"
    precious.write_text(json.dumps({"id": "a", "question": "q", "answer": "x"}) + "\n")
    with pytest.raises(ForeignOutputError, match="not an output of mics-agents"):
        merge_outputs([shard], precious)
    assert json.loads(precious.read_text())["question"] == "q"
    merged = tmp_path / "all.jsonl"
    merged.write_text("")
    merged.chmod(0o640)
    merge_outputs([shard], merged)
    assert merged.stat().st_mode & 0o777 == 0o640, "a rewritten file keeps its mode"
    assert (tmp_path / "all_failed.jsonl").stat().st_mode & 0o077, "a new one is readable as files usually are"


def test_a_report_never_replaces_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    result = run_mics(["report", str(tmp_path / "out.jsonl"), "--html", str(tmp_path / "pipe")], {**os.environ},
                      tmp_path)
    assert result.returncode == 2 and "--html" in flat(result.stderr) and (tmp_path / "pipe").is_fifo()


def test_dataset_build_onto_a_file_or_past_a_size_limit_is_one_line(tmp_path):
    from .test_cli import run as run_cli

    onto_file = tmp_path / "curriculum"
    onto_file.write_text("not a folder")
    examples = Path(__file__).resolve().parent.parent / "mics_agents" / "examples"
    args = ["dataset", "build", "--mics", str(tmp_path / "none.jsonl"), "--cases", str(examples / "cases.jsonl"),
            "--image-dir", str(examples / "images")]
    refused = run_cli(*args, "--output", str(onto_file), cwd=tmp_path)
    assert refused.returncode == 2 and "is a file" in flat(refused.stderr) and "Traceback" not in refused.stderr
    demo = run_cli("demo", "--cache", "", cwd=tmp_path)  # a real MICS output to build from
    assert demo.returncode == 0, demo.stderr
    args[3] = str(tmp_path / "mics_demo_output.jsonl")
    limited = subprocess.run([*MICS, *args, "--output", str(tmp_path / "big")], cwd=tmp_path, capture_output=True,
                             text=True, timeout=RUN_TIMEOUT, preexec_fn=limited_file_size(2_000))
    assert limited.returncode == 1, limited.stderr
    assert "Cannot write the curriculum" in flat(limited.stderr) and "Traceback" not in limited.stderr
