"""Scale of the commands that read a whole run (issue 29): peak RSS and wall time of ``mics run`` finding every
item done (resume), ``mics merge`` of 4 shards, ``mics report`` and ``mics dataset build``, over N synthetic
items.

Each item is a real search record: the largest record of a ``mics demo`` run, its tree repeated until the line
is about 12 KB, under its own id. Each command runs as its own process: its peak RSS is the kernel's
``ru_maxrss`` for that process (``os.wait4``), its peak anonymous RSS (heap, without mapped files' pages) is
sampled from ``/proc``, and its CPU time (user + system) is told apart from its wall time, which other work on
the machine stretches. Not part of the test suite.

    python -m benchmarks.scale --items 10000 100000 --out benchmarks/results/scale.json

``--previous FILE`` keeps an earlier result file's figures: a command measured again gets the earlier figure
as its ``before`` field, and commands and sizes not measured again stay as they were (say, only
``dataset_build`` measured after a change to it: ``--skip resume merge report --previous
benchmarks/results/scale.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "mics_agents" / "examples"
MICS = [sys.executable, "-m", "mics_agents"]
TARGET_LINE_BYTES = 12_000
SHARDS = 4
# A command that needs more address space than this is stopped and reported, not left to exhaust the machine.
DEFAULT_MEMORY_CAP_GB = 12.0
# Models for mics run's start-up checks: a resumed run with every item done sends no call.
RUN_ENVIRONMENT = {
    "MICS_MENTORS": "hosted_vllm/mentor-a,hosted_vllm/mentor-b",
    "MICS_INTERNS": "hosted_vllm/intern-1",
    "MICS_JUDGE": "hosted_vllm/judge",
    "HOSTED_VLLM_API_BASE": "http://127.0.0.1:9/v1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "COLUMNS": "200",
}


def template_records(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the largest record of a ``mics demo`` run, the example case it was searched from)."""
    output = folder / "demo.jsonl"
    subprocess.run([*MICS, "demo", "--output", str(output), "--cache", ""], cwd=folder, check=True,
                   capture_output=True)
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    record = max(records, key=lambda r: len(json.dumps(r)))
    cases = [json.loads(line) for line in (EXAMPLES / "cases.jsonl").read_text(encoding="utf-8").splitlines()]
    case = next(case for case in cases if case["id"] == record["rid"])
    return record, case


def widened(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its tree's nodes repeated (ids and parents shifted, each copy after its parent) until
    its line is about TARGET_LINE_BYTES."""
    tree = record["tree"]
    size = len(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
    nodes = list(tree)
    copy = 0
    while size < TARGET_LINE_BYTES:
        copy += 1
        shift = copy * len(tree)
        for node in tree:
            if size >= TARGET_LINE_BYTES:
                break
            added = {**node, "id": node["id"] + shift, "selected": False,
                     "parent": None if node["parent"] is None else node["parent"] + shift}
            nodes.append(added)
            size += len(json.dumps(added, ensure_ascii=False, separators=(",", ":"))) + 1
    return {**record, "tree": nodes}


def write_run(folder: Path, items: int, record: dict[str, Any], case: dict[str, Any]) -> dict[str, Path]:
    """The cases, a finished run over them (one success line per item) and the same run split in 4 shards."""
    head, tail = json.dumps({**record, "rid": "@"}, ensure_ascii=False, separators=(",", ":")).split('"@"', 1)
    case_head, case_tail = json.dumps({**case, "id": "@"}, ensure_ascii=False).split('"@"', 1)
    paths = {"cases": folder / "cases.jsonl", "output": folder / "mics.jsonl"}
    shard_paths = [folder / f"shard{index}.jsonl" for index in range(SHARDS)]
    with open(paths["cases"], "w", encoding="utf-8") as cases, open(paths["output"], "w", encoding="utf-8") as output:
        shards = [open(path, "w", encoding="utf-8") for path in shard_paths]
        try:
            for index in range(items):
                rid = json.dumps(f"case-{index:07d}")
                line = f"{head}{rid}{tail}\n"
                cases.write(f"{case_head}{rid}{case_tail}\n")
                output.write(line)
                shards[index % SHARDS].write(line)
        finally:
            for shard in shards:
                shard.close()
    paths.update({f"shard{index}": path for index, path in enumerate(shard_paths)})
    return paths


class _AnonymousPeak(threading.Thread):
    """The largest ``RssAnon`` of a process, sampled every 20 ms: its heap, without the pages of files it maps
    (``ru_maxrss`` counts those too: the datasets library reads the Arrow files it writes through a memory map,
    whose pages the kernel can drop at any time)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kib = 0

    def run(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while True:
            try:
                text = status.read_text()
            except OSError:
                return
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            if "RssAnon" not in fields:  # exited: a zombie has no memory
                return
            self.peak_kib = max(self.peak_kib, int(fields["RssAnon"].split()[0]))
            time.sleep(0.02)


def measure(command: list[str], folder: Path, memory_cap_gb: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``command`` as a child process: its wall time, its peak RSS, its exit code and last output line."""
    cap = int(memory_cap_gb * 2**30)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    log = folder / "command.log"
    started = time.perf_counter()
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=folder, stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, preexec_fn=limit_memory)
        anonymous = _AnonymousPeak(process.pid)
        anonymous.start()
        _, status, usage = os.wait4(process.pid, 0)
        anonymous.join()
    wall = time.perf_counter() - started
    lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "peak_rss_anon_mb": round(anonymous.peak_kib / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "exit_code": os.waitstatus_to_exitcode(status),
        "last_line": lines[-1][:300] if lines else "",
    }


def measure_all(items: int, record: dict[str, Any], case: dict[str, Any], memory_cap_gb: float,
                skip: set[str]) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"mics-scale-{items}-"))
    try:
        paths = write_run(folder, items, record, case)
        result: dict[str, Any] = {
            "items": items,
            "output_mb": round(paths["output"].stat().st_size / 1e6, 1),
            "line_bytes": round(paths["output"].stat().st_size / items),
        }
        commands = {
            "resume": ([*MICS, "run", str(paths["cases"]), "--image-dir", str(EXAMPLES / "images"),
                        "--output", str(paths["output"]), "--cache", str(folder / "cache.sqlite"),
                        "--json-summary", str(folder / "resume.json")], RUN_ENVIRONMENT),
            "merge": ([*MICS, "merge", *(str(paths[f"shard{i}"]) for i in range(SHARDS)),
                       "--output", str(folder / "merged.jsonl")], None),
            "report": ([*MICS, "report", str(paths["output"]), "--html", str(folder / "report.html")], None),
            "dataset_build": ([*MICS, "dataset", "build", "--mics", str(paths["output"]), "--cases",
                               str(paths["cases"]), "--image-dir", str(EXAMPLES / "images"), "--judge", "none",
                               "--output", str(folder / "dataset")], {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}),
        }
        for name, (command, env) in commands.items():
            if name in skip:
                continue
            load = round(os.getloadavg()[0], 2)
            result[name] = {**measure(command, folder, memory_cap_gb, env), "load_average_1min": load}
            if name == "resume" and result[name]["exit_code"] == 0:
                summary = json.loads((folder / "resume.json").read_text(encoding="utf-8"))
                result[name]["last_line"] = f"{summary['already_done']} done before, {summary['calls']} model calls"
            print(f"{items} items, {name}: {result[name]}", file=sys.stderr, flush=True)
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def with_previous(results: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """``results`` over ``previous``: each command measured now carries its earlier figure as ``before`` (and
    the load the earlier measurement began under); the rest of ``previous`` stays."""
    load = previous["machine"].get("load_average_1min")
    # Each earlier figure keeps the load it was measured under (older files name one load for all).
    earlier = {run["items"]: {name: {"load_average_1min": load, **figures} if isinstance(figures, dict) else figures
                              for name, figures in run.items()}
               for run in previous.get("runs", [])}
    runs = []
    for items in sorted({*earlier, *(run["items"] for run in results["runs"])}):
        run = dict(earlier.get(items, {}))
        measured = next((run for run in results["runs"] if run["items"] == items), None)
        for name, figures in (measured or {}).items():
            if isinstance(figures, dict) and name in run:
                figures = {**figures, "before": {key: value for key, value in run[name].items() if key != "before"}}
            run[name] = figures
        runs.append(run)
    return {**results, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--skip", nargs="*", default=[], choices=["resume", "merge", "report", "dataset_build"],
                        help="commands not to measure")
    parser.add_argument("--memory-cap-gb", type=float, default=DEFAULT_MEMORY_CAP_GB)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--previous", type=Path, default=None,
                        help="an earlier result file: its figures become the before fields of those measured again")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mics-scale-template-") as folder:
        record, case = template_records(Path(folder))
    record = widened(record)
    results = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
                    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    # Other work on the machine when the measurement began (wall times stretch with it; CPU
                    # times and memory much less).
                    "load_average_1min": round(os.getloadavg()[0], 2)},
        "memory_cap_gb": args.memory_cap_gb,
        "runs": [measure_all(items, record, case, args.memory_cap_gb, set(args.skip)) for items in args.items],
    }
    if args.previous is not None:
        results = with_previous(results, json.loads(args.previous.read_text(encoding="utf-8")))
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
