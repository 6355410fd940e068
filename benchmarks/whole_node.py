"""One process, whole node (issue 30): the real ``mics run`` process against a zero-latency OpenAI-compatible
server in its own process (``benchmarks.zero_latency_server``), and how many intern calls it makes per second of
its own CPU.

    python -m benchmarks.whole_node --out benchmarks/results/whole_node.json
    python -m benchmarks.whole_node --modes text --items 200 --repeats 5        # one mode
    PYTHONPATH=/tmp/main-base python -m benchmarks.whole_node ...               # another checkout's mics_agents
    python -m benchmarks.whole_node --profile 30 --modes text,file              # cProfile of the mics process

Three mentors (``openai/``), two interns (``hosted_vllm/``, answer-only: the default ``MICS_INTERN_MODE``) and a
judge, every other setting at its default (64 items in flight, 32 calls per model), a fresh SQLite cache. Modes:

- ``text``: text cases;
- ``data``: each case with 3 images of ~0.5 MB (random RGB PNGs, 408 x 408, sent as they are), as data URLs;
- ``file``: the same cases with ``MICS_MEDIA_DIR`` set, so the interns get ``file://`` URLs (mentors keep data URLs).

Client CPU is the ``mics`` process's own (user + system, all threads: ``os.wait4``'s rusage). The process's CPU is
sampled from ``/proc`` while it runs, so the CPU it had used when the server saw its first request (start-up:
imports, settings, opening the cache and the first case) is told apart from the CPU of the calls after it.
Reported: intern calls per client CPU-second and client CPU per intern call, over the whole process and after
the first request; the time from launch to the first request.

The same intern requests (the server records their bodies, images once) are then sent by a plain ``openai`` SDK
loop (``AsyncOpenAI``, 64 in flight, same server) in a process of its own, which measures its CPU after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MENTORS = ["openai/mentor-a", "openai/mentor-b", "openai/mentor-c"]
INTERNS = ["hosted_vllm/intern-1", "hosted_vllm/intern-2"]
JUDGE = "openai/judge"
TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def zero_latency_server(record: bool = True) -> Iterator[int]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.zero_latency_server", "--port", str(port),
         *(["--record"] if record else [])], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"zero-latency server did not start: {line!r}")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as response:
        return json.loads(response.read())


def make_cases(folder: Path, items: int, images: bool, seed: int = 3) -> Path:
    """``items`` multiple-choice cases; with ``images``, each with 3 random RGB PNGs of ~0.5 MB of its own."""
    rng = random.Random(seed)
    records = []
    for index in range(items):
        record: dict[str, Any] = {
            "id": f"node-{index}",
            "question": f"Case {index}: which finding best explains the presentation?\nA. Mass\nB. Cyst\nC. Abscess\nD. Normal",
            "answer": "ABCD"[index % 4],
            "case_info": f"Patient {index} with fever and a focal lesion on imaging.",
        }
        if images:
            from PIL import Image

            names = []
            for number in range(3):
                name = f"node-{index}-{number}.png"
                side = 408 + rng.randrange(-12, 13)  # 3 x side^2 bytes of noise: 0.46-0.54 MB as PNG
                Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(folder / name, compress_level=1)
                names.append(name)
            record["images"] = names
        records.append(record)
    data = folder / f"cases-{'images' if images else 'text'}.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    return data


def _cpu_of(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) that process ``pid`` has used, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS


def run_mics(port: int, data: Path, folder: Path, media: bool, profile: Path | None = None,
             checkout: str | None = None) -> dict[str, Any]:
    """One ``mics run`` process over ``data``: its wall time, CPU (all, and sampled while it ran), the server's
    counts, and when the server saw its first request. ``checkout``: the mics_agents of that folder (PYTHONPATH)."""
    base = f"http://127.0.0.1:{port}/v1"
    env = {name: value for name, value in os.environ.items() if not name.startswith("MICS_")}
    # As installed: bytecode cached (a process that compiles its modules each time measures the compiler).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if checkout:
        env["PYTHONPATH"] = checkout
    env.update(MICS_MENTORS=",".join(MENTORS), MICS_INTERNS=",".join(INTERNS), MICS_JUDGE=JUDGE,
               OPENAI_API_BASE=base, OPENAI_API_KEY="sk-benchmark", HOSTED_VLLM_API_BASE=base,
               LITELLM_LOCAL_MODEL_COST_MAP="True")
    env.pop("OPENAI_BASE_URL", None)
    if media:
        env["MICS_MEDIA_DIR"] = str(folder / "media")
        (folder / "media").mkdir(exist_ok=True)
    output, cache = folder / "out.jsonl", folder / "cache.sqlite"
    for path in (output, cache, folder / "out_failed.jsonl"):
        path.unlink(missing_ok=True)
    mics = str(Path(sys.executable).with_name("mics"))
    command = [mics, "run", str(data), "--output", str(output), "--cache", str(cache)]
    if profile is not None:
        command = [sys.executable, "-m", "cProfile", "-o", str(profile), mics, *command[1:]]
    _get(port, "/reset-first")
    before = _get(port, "/stats")
    samples: list[tuple[float, float]] = []
    launched = time.time()
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            cpu = _cpu_of(process.pid)
            if cpu is not None:
                samples.append((time.time(), cpu))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"mics run exited {process.returncode}: {stderr[-2000:]}")
    after = _get(port, "/stats")
    counts = {key: after[key] - before.get(key, 0) for key in after if key.endswith(("requests", "parts"))}
    cpu = usage.ru_utime + usage.ru_stime
    first = after["first_request_at"]
    first_cpu = None
    if first is not None:
        # CPU when the first request came: the last sample taken before it (10 ms ticks).
        first_cpu = max((used for at, used in samples if at <= first), default=0.0)
    interns = counts["intern_requests"]
    outcome: dict[str, Any] = {
        "wall_s": wall, "client_cpu_s": cpu, "user_s": usage.ru_utime, "system_s": usage.ru_stime, **counts,
        "intern_calls_per_cpu_s": interns / cpu, "cpu_ms_per_intern_call": 1000 * cpu / interns,
        "cpu_ms_per_call": 1000 * cpu / counts["requests"],
        "first_request_after_launch_s": None if first is None else first - launched,
        "cpu_before_first_request_s": first_cpu,
        "records": sum(1 for _ in open(output)) if output.exists() else 0,
    }
    if first_cpu is not None:
        outcome["after_first_request"] = {
            "cpu_s": cpu - first_cpu, "intern_calls_per_cpu_s": interns / (cpu - first_cpu),
            "cpu_ms_per_intern_call": 1000 * (cpu - first_cpu) / interns,
            "cpu_ms_per_call": 1000 * (cpu - first_cpu) / counts["requests"],
        }
    return outcome


SDK_LOOP = r"""
import asyncio, json, os, sys, time
import openai

async def main(path, base, concurrency):
    recorded = json.load(open(path))
    images = recorded["images"]
    bodies = []
    for body in recorded["bodies"]:
        for message in body["messages"]:
            if not isinstance(message["content"], str):
                message["content"] = [{"type": "image_url", "image_url": {"url": images[part["image_url"]["image_ref"]]}}
                                      if part.get("type") == "image_url" else part for part in message["content"]]
        bodies.append(body)
    del recorded
    client = openai.AsyncOpenAI(base_url=base, api_key="sk-benchmark", max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(body):
        async with semaphore:
            await client.chat.completions.create(**body)

    await asyncio.gather(*(one(body) for body in bodies[:concurrency]))  # warm-up: imports, connections
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(body) for body in bodies))
    used, elapsed = time.process_time() - cpu, time.perf_counter() - wall
    await client.close()
    print(json.dumps({"calls": len(bodies), "concurrency": concurrency, "cpu_s": used, "wall_s": elapsed,
                      "intern_calls_per_cpu_s": len(bodies) / used, "cpu_ms_per_intern_call": 1000 * used / len(bodies)}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def sdk_loop(port: int, folder: Path, concurrency: int) -> dict[str, Any]:
    """The intern requests the server recorded, sent again by a plain ``openai`` SDK loop in its own process."""
    path = folder / "recorded.json"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/recorded", timeout=300) as response:
        path.write_bytes(response.read())
    result = subprocess.run([sys.executable, "-c", SDK_LOOP, str(path), f"http://127.0.0.1:{port}/v1", str(concurrency)],
                            capture_output=True, text=True, timeout=900)
    path.unlink()
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def _top(profile: Path, count: int, interns: int) -> list[dict[str, Any]]:
    import pstats

    stats = pstats.Stats(str(profile))
    rows = []
    for (file, line, function), (_, calls, own, below, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = file.split("site-packages/")[-1].split("/work/main/")[-1]
        rows.append({"function": f"{where}:{line}({function})", "calls_per_intern_call": round(calls / interns, 2),
                     "own_us_per_intern_call": round(1e6 * own / interns, 2),
                     "cumulative_us_per_intern_call": round(1e6 * below / interns, 2)})
    return sorted(rows, key=lambda row: -row["own_us_per_intern_call"])[:count]


def startup(port: int, folder: Path, launches: int, checkouts: list[str | None]) -> dict[str, Any]:
    """``launches`` launches of ``mics run`` over 4 text cases per checkout, interleaved (after one untimed launch
    each, which writes their bytecode caches): the time from launch to the server's first request, and the CPU
    the process had used by then."""
    data = make_cases(folder, 4, images=False)
    for checkout in checkouts:
        run_mics(port, data, folder, media=False, checkout=checkout)
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(launches):
        for checkout in checkouts:
            outcome = run_mics(port, data, folder, media=False, checkout=checkout)
            runs.setdefault(checkout or "installed", []).append(outcome)
    return {
        checkout: {
            "first_request_after_launch_s": sorted(run["first_request_after_launch_s"] for run in outcomes),
            "cpu_before_first_request_s": sorted(run["cpu_before_first_request_s"] for run in outcomes),
            "median_first_request_after_launch_s": statistics.median(run["first_request_after_launch_s"] for run in outcomes),
            "median_cpu_before_first_request_s": statistics.median(run["cpu_before_first_request_s"] for run in outcomes),
            "median_process_cpu_s": statistics.median(run["client_cpu_s"] for run in outcomes),
        }
        for checkout, outcomes in runs.items()
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out = {key: spread([run[key] for run in runs]) for key in
           ("intern_calls_per_cpu_s", "cpu_ms_per_intern_call", "cpu_ms_per_call", "client_cpu_s", "wall_s")}
    firsts = [run["first_request_after_launch_s"] for run in runs if run["first_request_after_launch_s"] is not None]
    if firsts:
        out["first_request_after_launch_s"] = spread(firsts)
    afters = [run["after_first_request"] for run in runs if "after_first_request" in run]
    if afters:
        out["after_first_request"] = {key: spread([a[key] for a in afters])
                                      for key in ("intern_calls_per_cpu_s", "cpu_ms_per_intern_call")}
    return out


def machine() -> dict[str, Any]:
    import platform
    from importlib.metadata import version

    import mics_agents

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(mics_agents.__file__).parent).stdout.strip()
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "aiohttp": version("aiohttp"), "openai": version("openai"),
            "mics_agents": str(Path(mics_agents.__file__).parent), "commit": commit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200, help="text cases")
    parser.add_argument("--image-items", type=int, default=60, help="cases with images")
    parser.add_argument("--modes", default="text,data,file")
    parser.add_argument("--repeats", type=int, default=3, help="mics runs per mode, the modes alternating")
    parser.add_argument("--sdk", action=argparse.BooleanOptionalAction, default=True,
                        help="also send the recorded intern requests with a plain openai SDK loop")
    parser.add_argument("--sdk-concurrency", type=int, default=64)
    parser.add_argument("--profile", type=int, default=0,
                        help="run each mode once under cProfile instead, keeping this many entries")
    parser.add_argument("--profile-dir", type=Path, help="keep the cProfile files (MODE.prof) here")
    parser.add_argument("--startup", type=int, default=0,
                        help="only measure start-up: this many launches over 4 cases per checkout, interleaved")
    parser.add_argument("--checkouts", default="",
                        help="comma-separated folders whose mics_agents to run (PYTHONPATH), interleaved; "
                             "empty: the installed one")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    modes = args.modes.split(",")
    checkouts: list[str | None] = [c for c in args.checkouts.split(",") if c] or [None]
    if args.startup:
        with tempfile.TemporaryDirectory() as scratch, zero_latency_server(record=False) as port:
            result = {"machine": machine(), "startup": startup(port, Path(scratch), args.startup, checkouts)}
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    results: dict[str, Any] = {
        "machine": machine(), "mentors": MENTORS, "interns": INTERNS, "judge": JUDGE,
        "settings": "defaults (64 items in flight, 32 calls per model, answer-only interns), fresh SQLite cache",
        "text_items": args.items, "image_items": args.image_items,
        "images": "3 per case, random RGB PNGs 396-420 px square, ~0.5 MB each", "modes": {},
    }
    results["checkouts"] = {
        checkout or "installed": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                                cwd=checkout or Path(__file__).resolve().parents[1]).stdout.strip()
        for checkout in checkouts
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        cases = {}
        if "text" in modes:
            cases["text"] = make_cases(folder, args.items, images=False)
        if "data" in modes or "file" in modes:
            cases["data"] = cases["file"] = make_cases(folder, args.image_items, images=True)
        for repeat in range(1 if args.profile else args.repeats):
            for mode, checkout in [(mode, checkout) for mode in modes for checkout in checkouts]:
                label = mode if len(checkouts) == 1 else f"{mode} @ {checkout or 'installed'}"
                entry = results["modes"].setdefault(label, {"runs": []})
                sdk = args.sdk and repeat == 0 and not args.profile and checkout == checkouts[-1]
                with zero_latency_server(record=sdk) as port:
                    profile = (args.profile_dir or folder) / f"{mode}.prof" if args.profile else None
                    outcome = run_mics(port, cases[mode], folder, media=mode == "file", profile=profile,
                                       checkout=checkout)
                    if profile is not None:
                        outcome["profile_top_by_own_time"] = _top(profile, args.profile, outcome["intern_requests"])
                    entry["runs"].append(outcome)
                    print(f"{label}: {outcome['intern_requests']} intern calls, {outcome['client_cpu_s']:.2f} s CPU: "
                          f"{outcome['intern_calls_per_cpu_s']:.0f} intern calls/CPU-s "
                          f"({outcome.get('after_first_request', {}).get('intern_calls_per_cpu_s', 0):.0f} after the "
                          f"first request), first request {outcome['first_request_after_launch_s']:.3f} s after launch",
                          flush=True)
                    if sdk:
                        entry["openai_sdk_loop"] = sdk_loop(port, folder, args.sdk_concurrency)
                        print(f"{label}: openai SDK loop {entry['openai_sdk_loop']['intern_calls_per_cpu_s']:.0f} "
                              f"calls/CPU-s", flush=True)
        for entry in results["modes"].values():
            if not args.profile:
                entry["summary"] = summary(entry["runs"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
