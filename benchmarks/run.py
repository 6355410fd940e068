"""Measure mics-agents: search throughput against its lower bound and baselines, resume cost, memory with
many queued items, and start-up time. Prints a table and saves JSON.

    python -m benchmarks.run all --out benchmarks/results/latest.json
    python -m benchmarks.run throughput --items 200 --latency 0.1 --concurrency 64

Model calls go over real HTTP to ``benchmarks.latency_server`` in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MENTORS = ["openai/mentor-a", "openai/mentor-b"]
INTERNS = ["openai/intern-1", "openai/intern-2"]
JUDGE = "openai/judge"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def latency_server(
    latency: float, jitter: float = 0.0, error_rate: float = 0.0, bucket_rate: float = 0.0, *,
    prefix_capacity: int | None = None, as_openai_base: bool = True, distinct_samples: bool = False,
) -> Iterator[int]:
    """A latency server in its own process; its port. ``as_openai_base``: point ``OPENAI_API_BASE`` at it."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.latency_server", "--port", str(port), "--latency", str(latency),
         "--jitter", str(jitter), "--error-rate", str(error_rate), "--lifetime", "3600",
         "--bucket-rate", str(bucket_rate),
         *(["--count-prefixes", "--prefix-capacity", str(prefix_capacity)] if prefix_capacity is not None else []),
         *(["--distinct-samples"] if distinct_samples else [])],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"latency server did not start: {line!r}")
        if as_openai_base:
            os.environ["OPENAI_API_BASE"] = f"http://127.0.0.1:{port}/v1"
        os.environ.setdefault("OPENAI_API_KEY", "sk-benchmark")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def server_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        return json.loads(response.read())


def server_requests(port: int) -> int:
    return int(server_stats(port)["requests"])


def make_dataset(path: Path, items: int) -> Path:
    with open(path, "w") as handle:
        for index in range(items):
            handle.write(json.dumps({
                "id": f"bench-{index}",
                "question": f"Case {index}: which finding best explains the presentation?\nA. Mass\nB. Cyst\nC. Abscess\nD. Normal",
                "answer": "ABCD"[index % 4],
                "case_info": f"Patient {index} with fever and a focal lesion on imaging.",
            }) + "\n")
    return path


def _settings(cache: Path | None, concurrency: int, **extra: Any):
    extra.setdefault("transport", os.environ.get("MICS_TRANSPORT", "auto"))
    from mics_agents.config import load_settings

    values: dict[str, Any] = dict(
        mentors=MENTORS, interns=INTERNS, judge=JUDGE, cache_path=cache, model_concurrency=concurrency,
        max_calls_in_flight=concurrency, retry_initial_wait=0.05, retry_max_wait=1.0,
    )
    return load_settings(**{**values, **extra})


def _critical_rounds(record: dict[str, Any]) -> int:
    """Sequential call rounds of one item: per iteration a mentor round (unless every candidate was
    reused), an intern round, and a judge round when any sample needed the judge."""
    rounds = 0
    for depth in sorted({node["depth"] for node in record["tree"]}):
        nodes = [node for node in record["tree"] if node["depth"] == depth]
        rounds += 0 if all(node["reused"] for node in nodes) else 1
        rounds += 1
        rounds += 1 if any(s["judged_by"] == "judge" for node in nodes for s in node["samples"]) else 0
    return rounds


async def _mics_run(data: Path, output: Path, cache: Path | None, concurrency: int, items_in_flight: int) -> dict[str, Any]:
    from mics_agents.runner import BatchRun, RunOptions, run_id_for
    from mics_agents.search import Searcher

    searcher = await Searcher.open(_settings(cache, concurrency), run_id=run_id_for(output))
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        stats = await BatchRun(searcher, RunOptions(data=data, output=output, concurrency=items_in_flight)).run()
        return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "stats": stats.as_dict()}
    finally:
        await searcher.aclose()


def _records(output: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in output.read_text().splitlines()] if output.exists() else []
    failed = output.with_name(output.stem + "_failed.jsonl")
    if failed.exists():
        records += [json.loads(line)["search"] for line in failed.read_text().splitlines() if "search" in json.loads(line)]
    return records


async def _bare_loop(kind: str, calls: int, concurrency: int) -> dict[str, Any]:
    """``calls`` identical-size chat calls at ``concurrency``, through bare litellm or the openai SDK."""
    messages = [{"role": "system", "content": "You are an intern."},
                {"role": "user", "content": "## Question\nWhich finding?\nA. Mass\nB. Cyst\n\n## Reasoning so far\n### Step 1: x\n\n## Your task\nanswer"}]
    semaphore = asyncio.Semaphore(concurrency)
    if kind == "litellm":
        import litellm

        async def one(index: int) -> None:
            async with semaphore:
                await litellm.acompletion(model="openai/intern-1", messages=messages, temperature=0.3, num_retries=0, max_retries=0)
    else:
        import openai

        client = openai.AsyncOpenAI(base_url=os.environ["OPENAI_API_BASE"], api_key="sk-benchmark", max_retries=0)

        async def one(index: int) -> None:
            async with semaphore:
                await client.chat.completions.create(model="intern-1", messages=messages, temperature=0.3)

    await asyncio.gather(*(one(i) for i in range(min(concurrency, calls))))  # warm-up: connections, imports
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(calls)))
    elapsed, used = time.perf_counter() - wall, time.process_time() - cpu
    return {"calls": calls, "wall_s": elapsed, "calls_per_s": calls / elapsed, "cpu_ms_per_call": 1000 * used / calls}


def throughput(items: int, latency: float, concurrency: int, sequential_items: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder, latency_server(latency) as port:
        root = Path(folder)
        data = make_dataset(root / "data.jsonl", items)
        # Warm up imports and connections on a separate tiny run, so they do not count.
        warm = make_dataset(root / "warm.jsonl", 2)
        asyncio.run(_mics_run(warm, root / "warm_out.jsonl", None, concurrency, concurrency))

        before = server_requests(port)
        run = asyncio.run(_mics_run(data, root / "out.jsonl", root / "cache.sqlite", concurrency, concurrency))
        calls = server_requests(port) - before
        records = _records(root / "out.jsonl")
        critical = max(_critical_rounds(record) for record in records) * latency
        bound = max(critical, calls * latency / concurrency)

        seq_data = make_dataset(root / "seq.jsonl", sequential_items)
        before = server_requests(port)
        sequential = asyncio.run(_mics_run(seq_data, root / "seq_out.jsonl", None, 1, 1))
        seq_calls = server_requests(port) - before
        per_call = sequential["wall_s"] / seq_calls
        projected = per_call * calls

        calls_for_baselines = min(calls, 4000)
        litellm_loop = asyncio.run(_bare_loop("litellm", calls_for_baselines, concurrency))
        openai_loop = asyncio.run(_bare_loop("openai", calls_for_baselines, concurrency))
    return {
        "items": items, "latency_s": latency, "concurrency": concurrency, "model_calls": calls,
        "wall_s": run["wall_s"], "lower_bound_s": bound, "critical_path_s": critical,
        "ratio_to_bound": run["wall_s"] / bound, "calls_per_s": calls / run["wall_s"],
        "cpu_ms_per_call": 1000 * run["cpu_s"] / calls,
        "sequential": {"items_measured": sequential_items, "calls": seq_calls, "s_per_call": per_call,
                        "projected_wall_s": projected},
        "speedup_vs_sequential": projected / run["wall_s"],
        "bare_litellm": litellm_loop, "openai_sdk": openai_loop,
        "outcomes": {k: run["stats"][k] for k in ("success", "no_path", "model_error", "bad_input")},
    }


def _critical_rounds_full(record: dict[str, Any]) -> int:
    """``_critical_rounds``, plus the judge round that grades the selecting mentor's final answer when the rules
    could not (it runs after the last iteration)."""
    grade = record.get("final_answer_grade") or {}
    return _critical_rounds(record) + (1 if grade.get("judged_by") == "judge" else 0)


def _busy_over_time(spans: list[tuple[float, float]]) -> list[tuple[float, int]]:
    """Calls in flight as a step function: ``(time, calls in flight from then on)``, in time order."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda e: (e[0], e[1]))
    steps, busy = [], 0
    for at, change in events:
        busy += change
        steps.append((at, busy))
    return steps


def _slot_seconds(steps: list[tuple[float, int]], start: float, end: float, cap: int | None = None) -> float:
    """The integral of calls in flight (at most ``cap``) over ``[start, end]``."""
    total, busy, last = 0.0, 0, start
    for at, level in steps:
        if at > start:
            total += min(busy, cap or busy) * (min(at, end) - last)
            last = min(at, end)
        if at >= end:
            break
        busy = level
    if last < end:
        total += min(busy, cap or busy) * (end - last)
    return total


def occupancy(log: list[list], launched: float, exited: float, limits: dict[str, int], latency: float,
              items_in_flight: int) -> dict[str, Any]:
    """Where the time of a ``mics run`` goes, from the server's log of ``[model, case, arrived, answered]``.

    Per model: calls, busy slots on average over the process's life and over the span of its requests. For the
    busiest model (most calls per slot), the slot-seconds it left unused, by phase: start-up (launch to the
    first request), ramp-up (to the first time that model had every slot busy), steady (to the last item's first
    request: from then on fewer items remain in flight than were admitted), tail (to the last answer), and
    shutdown (to the process's exit). Each as the wall seconds it cost (unused slot-seconds / limit)."""
    by_model: dict[str, list[tuple[float, float]]] = {}
    first_at: dict[int, float] = {}
    last_at: dict[int, float] = {}
    for model, case, arrived, answered in log:
        answered = answered if answered is not None else arrived
        by_model.setdefault(model, []).append((arrived, answered))
        if case >= 0:
            first_at[case] = min(first_at.get(case, arrived), arrived)
            last_at[case] = max(last_at.get(case, answered), answered)
    wall = exited - launched
    models: dict[str, Any] = {}
    for model, spans in sorted(by_model.items()):
        steps = _busy_over_time(spans)
        first, last = min(s for s, _ in spans), max(e for _, e in spans)
        models[model] = {
            "calls": len(spans), "limit": limits[model],
            "mean_busy_slots_whole_process": _slot_seconds(steps, launched, exited) / wall,
            "mean_busy_slots_first_to_last_request": _slot_seconds(steps, first, last) / max(1e-9, last - first),
            "peak_busy_slots": max(level for _, level in steps),
            "mean_server_seconds_per_call": sum(e - s for s, e in spans) / len(spans),
        }
    busiest = max(models, key=lambda m: models[m]["calls"] / models[m]["limit"])
    limit = models[busiest]["limit"]
    steps = _busy_over_time(by_model[busiest])
    first_request = min(arrived for _, _, arrived, _ in log)
    last_answer = max((answered or arrived) for _, _, arrived, answered in log)
    full = next((at for at, level in steps if level >= limit), first_request)
    last_admitted = max(first_at.values()) if first_at else first_request
    bounds = [("start_up", launched, first_request), ("ramp_up", first_request, full),
              ("steady", full, max(full, last_admitted)), ("tail", max(full, last_admitted), last_answer),
              ("shutdown", last_answer, exited)]
    phases = {}
    for name, start, end in bounds:
        length = max(0.0, end - start)
        busy = _slot_seconds(steps, start, end, cap=limit) if length else 0.0
        phases[name] = {"wall_s": length, "mean_busy_slots": busy / length if length else None,
                        "unused_slot_s": limit * length - busy, "costs_wall_s": (limit * length - busy) / limit}
    # Items in flight over time (first request to last answer), sampled at the steady phase's answers.
    item_steps = _busy_over_time([(first_at[c], last_at[c]) for c in first_at])
    return {
        "models": models, "busiest_model": busiest, "phases_of_busiest": phases,
        "items_seen_by_server": len(first_at),
        "mean_items_with_calls_in_flight_steady": (
            _slot_seconds(item_steps, full, last_admitted) / (last_admitted - full) if last_admitted > full else None),
        "items_in_flight": items_in_flight,
    }


def process(items: int, latency: float, items_in_flight: int, mentors: int = 3, interns: int = 2,
            model_concurrency: int | None = None, max_calls_in_flight: int | None = None,
            keep_log: Path | None = None) -> dict[str, Any]:
    """The real ``mics run`` process over ``items`` cases with default settings (only the models, the server and
    the items in flight set; ``model_concurrency`` / ``max_calls_in_flight`` override the defaults): wall time
    from launch to exit, start-up included, against its lower bound, the largest of

    - the busiest model's calls x latency / its concurrency limit,
    - the longest item's critical path (its sequential mentor, intern and judge rounds x latency),
    - the sum of all items' critical paths x latency / items in flight;

    and, from the server's log of every request, each model's calls and busy slots over time, and where the
    busiest model's unused slots are (start-up, ramp-up, steady, tail, shutdown). Client CPU is the ``mics``
    process's own (``os.wait4``); the server's from ``/proc``, so a CPU-bound client shows."""
    from mics_agents.config import load_settings

    mentor_names = [f"openai/mentor-{chr(ord('a') + n)}" for n in range(mentors)]
    intern_names = [f"openai/intern-{n + 1}" for n in range(interns)]
    with tempfile.TemporaryDirectory() as folder, logging_latency_server(latency) as (port, server_pid):
        root = Path(folder)
        data = make_dataset(root / "data.jsonl", items)
        env = {name: value for name, value in os.environ.items() if not name.startswith("MICS_")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(MICS_MENTORS=",".join(mentor_names), MICS_INTERNS=",".join(intern_names), MICS_JUDGE=JUDGE)
        if model_concurrency is not None:
            env["MICS_MODEL_CONCURRENCY"] = str(model_concurrency)
        if max_calls_in_flight is not None:
            env["MICS_MAX_CALLS_IN_FLIGHT"] = str(max_calls_in_flight)
        if "MICS_TRANSPORT" in os.environ:
            env["MICS_TRANSPORT"] = os.environ["MICS_TRANSPORT"]
        settings = load_settings(mentors=mentor_names, interns=intern_names, judge=JUDGE,
                                 **({"model_concurrency": model_concurrency} if model_concurrency else {}))
        limits = {name: settings.concurrency_for(name) for name in [*mentor_names, *intern_names, JUDGE]}
        mics = str(Path(sys.executable).with_name("mics"))
        server_cpu_before = _process_cpu(server_pid)
        launched = time.time()
        child = subprocess.Popen(
            [mics, "run", str(data), "--output", str(root / "out.jsonl"), "--cache", str(root / "cache.sqlite"),
             "--concurrency", str(items_in_flight)], env=env, cwd=root, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, status, usage = os.wait4(child.pid, 0)
        exited = time.time()
        stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(stderr[-2000:])
        server_cpu = _process_cpu(server_pid) - server_cpu_before
        stats = server_stats(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/requests", timeout=60) as response:
            log = json.loads(response.read())
        if keep_log is not None:
            keep_log.write_text(json.dumps({"launched": launched, "exited": exited, "log": log}))
        records = _records(root / "out.jsonl")
    wall = exited - launched
    rounds = [_critical_rounds_full(record) for record in records]
    calls = {name: sum(1 for entry in log if entry[0] == name.split("/", 1)[1]) for name in limits}
    busiest = max(limits, key=lambda name: calls[name] / limits[name])
    bound_parts = {
        "busiest_model_s": calls[busiest] * latency / limits[busiest],
        "longest_item_s": max(rounds) * latency,
        "all_items_over_items_in_flight_s": sum(rounds) * latency / items_in_flight,
    }
    bound = max(bound_parts.values())
    first = stats.get("first_request_at")
    client_cpu = usage.ru_utime + usage.ru_stime
    analysis = occupancy([[entry[0] if "/" in entry[0] else f"openai/{entry[0]}", *entry[1:]] for entry in log],
                         launched, exited, limits, latency, items_in_flight)
    return {
        "items": items, "latency_s": latency, "items_in_flight": items_in_flight,
        "mentors": mentor_names, "interns": intern_names, "judge": JUDGE, "limits": limits,
        "max_calls_in_flight": settings.max_calls_in_flight if max_calls_in_flight is None else max_calls_in_flight,
        "model_calls": len(log), "calls_per_model": calls, "busiest_model": busiest,
        "records": len(records), "critical_rounds": {"max": max(rounds), "mean": statistics.mean(rounds)},
        "process_wall_s": wall, "lower_bound_s": bound, "lower_bound_parts": bound_parts,
        "ratio_to_bound": wall / bound,
        "first_request_after_launch_s": None if first is None else first - launched,
        "client_cpu_s": client_cpu, "client_cpu_share_of_wall": client_cpu / wall,
        "client_cpu_ms_per_call": 1000 * client_cpu / len(log),
        "server_cpu_s": server_cpu, "server_cpu_share_of_wall": server_cpu / wall,
        "occupancy": analysis,
    }


def process_compared(items: int, latency: float, items_in_flight: int, checkouts: list[str], repeats: int,
                     **options: Any) -> dict[str, Any]:
    """:func:`process` for each checkout's ``mics_agents`` (a folder put first on the ``mics`` process's
    PYTHONPATH; "" for the installed one), the checkouts alternating, ``repeats`` times: every run, and per
    checkout the run of median ratio and the spread."""
    import copy

    runs: dict[str, list[dict[str, Any]]] = {}
    saved = os.environ.get("PYTHONPATH")
    try:
        for _ in range(repeats):
            for checkout in checkouts:
                if checkout:
                    os.environ["PYTHONPATH"] = checkout
                elif saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved
                result = process(items, latency, items_in_flight, **options)
                result["load_average_1min"] = os.getloadavg()[0]
                runs.setdefault(checkout or "installed", []).append(result)
                print(f"{checkout or 'installed'}: {result['ratio_to_bound']:.3f}x its bound", file=sys.stderr, flush=True)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    summary = {}
    for label, results in runs.items():
        ordered = sorted(results, key=lambda r: r["ratio_to_bound"])
        median = copy.deepcopy(ordered[len(ordered) // 2])
        busiest = median["occupancy"]["busiest_model"]
        summary[label] = {
            "ratios": [round(r["ratio_to_bound"], 4) for r in results],
            "median_ratio": median["ratio_to_bound"],
            "busiest_mean_busy_slots": [round(r["occupancy"]["models"][r["occupancy"]["busiest_model"]]
                                              ["mean_busy_slots_first_to_last_request"], 2) for r in results],
            "client_cpu_s": [round(r["client_cpu_s"], 2) for r in results],
            "median_run": {**median, "occupancy": {**median["occupancy"], "busiest": busiest}},
        }
    return {"items": items, "latency_s": latency, "items_in_flight": items_in_flight, "repeats": repeats,
            "checkouts": checkouts, "summary": summary}


def queue(items: int, latency: float, items_in_flight: int, mentors: int = 3, interns: int = 2) -> dict[str, Any]:
    """The same search in this process (``BatchRun``, default settings), the first intern's limit sampled
    every 5 ms: its slots held and the calls waiting for one, and how late the event loop ran the sampler
    (its lag). In the steady part (after the first second, before the last), waiting calls that never fall to
    0 mean the items in flight kept the busiest model's queue from running dry: what remains between its
    busy slots and the limit is then the client's time per call, not the scheduling."""
    mentor_names = [f"openai/mentor-{chr(ord('a') + n)}" for n in range(mentors)]
    intern_names = [f"openai/intern-{n + 1}" for n in range(interns)]

    async def run(root: Path) -> dict[str, Any]:
        from mics_agents.models.limits import model_limit
        from mics_agents.runner import BatchRun, RunOptions
        from mics_agents.search import Searcher

        settings = _settings(root / "cache.sqlite", 32, mentors=mentor_names, interns=intern_names,
                             max_calls_in_flight=0)
        searcher = await Searcher.open(settings, run_id="queue")
        limit = model_limit(intern_names[0])
        samples: list[tuple[float, int, int]] = []
        lags: list[float] = []
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                asked = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - asked - 0.005)
                samples.append((time.perf_counter(), limit.in_flight, len(limit._waiters)))

        sampler = asyncio.create_task(sample())
        try:
            data = make_dataset(root / "data.jsonl", items)
            await BatchRun(searcher, RunOptions(data=data, output=root / "out.jsonl", concurrency=items_in_flight)).run()
        finally:
            done.set()
            await sampler
            await searcher.aclose()
        start, end = samples[0][0] + 1.0, samples[-1][0] - 1.0
        steady = [(held, waiting) for at, held, waiting in samples if start < at < end]
        lags.sort()
        return {
            "limit": 32, "samples": len(samples), "steady_samples": len(steady),
            "steady_mean_slots_held": statistics.mean(held for held, _ in steady),
            "steady_min_calls_waiting": min(waiting for _, waiting in steady),
            "steady_mean_calls_waiting": statistics.mean(waiting for _, waiting in steady),
            "steady_samples_with_no_call_waiting": sum(1 for _, waiting in steady if waiting == 0),
            "loop_lag_ms": {f"p{q}": 1000 * lags[min(len(lags) - 1, int(len(lags) * q / 100))] for q in (50, 90, 99)},
        }

    with tempfile.TemporaryDirectory() as folder, latency_server(latency):
        return {"items": items, "latency_s": latency, "items_in_flight": items_in_flight, "mentors": mentor_names,
                "interns": intern_names, **asyncio.run(run(Path(folder)))}


def first_request(items: int, repeats: int, checkouts: list[str], mentors: int = 3, interns: int = 2) -> dict[str, Any]:
    """How long after launch a ``mics run`` over ``items`` cases sends its first request (the server's request
    count, polled every 10 ms), per checkout (PYTHONPATH; "" for the installed one), alternating; the process is
    stopped once it has. Large inputs show what start-up does per line of input."""
    mentor_names = [f"openai/mentor-{chr(ord('a') + n)}" for n in range(mentors)]
    intern_names = [f"openai/intern-{n + 1}" for n in range(interns)]
    mics = str(Path(sys.executable).with_name("mics"))
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder, latency_server(0.1) as port:
        data = make_dataset(Path(folder) / "data.jsonl", items)
        for _ in range(repeats):
            for checkout in checkouts:
                with tempfile.TemporaryDirectory() as scratch:
                    env = {name: value for name, value in os.environ.items() if not name.startswith("MICS_")}
                    env.pop("PYTHONDONTWRITEBYTECODE", None)
                    if checkout:
                        env["PYTHONPATH"] = checkout
                    env.update(MICS_MENTORS=",".join(mentor_names), MICS_INTERNS=",".join(intern_names), MICS_JUDGE=JUDGE)
                    before = server_requests(port)
                    launched = time.perf_counter()
                    child = subprocess.Popen([mics, "run", str(data), "--output", f"{scratch}/out.jsonl", "--cache",
                                              f"{scratch}/cache.sqlite", "--concurrency", "64"], env=env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    try:
                        while server_requests(port) == before and time.perf_counter() - launched < 60:
                            time.sleep(0.01)
                        seconds.setdefault(checkout or "installed", []).append(round(time.perf_counter() - launched, 3))
                    finally:
                        child.kill()
                        child.wait()
    return {"items": items, "repeats": repeats, "first_request_after_launch_s": seconds}


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used, from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def logging_latency_server(latency: float) -> Iterator[tuple[int, int]]:
    """A latency server that logs every request (``GET /requests``); its port and process id."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.latency_server", "--port", str(port), "--latency", str(latency),
         "--lifetime", "3600", "--log-requests"], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"latency server did not start: {line!r}")
        os.environ["OPENAI_API_BASE"] = f"http://127.0.0.1:{port}/v1"
        os.environ.setdefault("OPENAI_API_KEY", "sk-benchmark")
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


async def _image_calls(
    transport: str, cases: int, calls_per_case: int, images: tuple[int, int], sizes: tuple[int, int],
    concurrency: int, seed: int,
) -> dict[str, Any]:
    """Intern-like calls with images through the model stack (limits, retries, validation; no cache): each
    case has its own images, shared by all its calls, as a search's candidates share their case's images."""
    import hashlib
    import random

    from mics_agents.models.base import ChatMessage, ImagePart, ModelRequest, TextPart
    from mics_agents.models.factory import open_models

    rng = random.Random(seed)
    settings = _settings(None, concurrency, transport=transport)
    (model,) = open_models(["openai/intern-1"], settings)
    case_images = []
    for case in range(cases):
        parts = []
        for index in range(rng.randint(*images)):
            data = rng.randbytes(rng.randint(*sizes))
            parts.append(ImagePart(data=data, mime="image/png", sha256=hashlib.sha256(data).hexdigest(), label=f"{case}-{index}"))
        case_images.append(tuple(parts))

    def request(case: int, call: int) -> ModelRequest:
        prefix = "\n".join(f"### Step {step}: finding {case}.{call}.{step}" for step in range(1 + call % 4))
        return ModelRequest(
            messages=(
                ChatMessage.text("system", "You are an intern."),
                ChatMessage("user", (*case_images[case], TextPart(f"## Question\nCase {case}: which finding?\nA. Mass\nB. Cyst\n\n"
                                                                   f"## Reasoning so far\n{prefix}\n\n## Your task\nanswer"))),
            ),
            temperature=(0.3, 0.7, 1.0)[call % 3],
            max_tokens=32,
        )

    semaphore = asyncio.Semaphore(concurrency)

    async def one(case: int, call: int) -> None:
        async with semaphore:
            await model.request(request(case, call))

    try:
        await one(0, 0)  # warm-up: imports and connections
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(case, call) for case in range(cases) for call in range(calls_per_case)))
        elapsed, used = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await model.aclose()
    calls = cases * calls_per_case
    sent = sum(len(image.data) for parts in case_images for image in parts) * calls_per_case
    return {"transport": transport, "calls": calls, "wall_s": elapsed, "calls_per_s": calls / elapsed,
            "cpu_ms_per_call": 1000 * used / calls, "image_mb_per_call": sent / calls / 1e6}


def images(cases: int, calls_per_case: int, concurrency: int, latency: float) -> dict[str, Any]:
    """Client CPU per call with images (process time over all threads / calls), per transport: 1-5 images of
    0.2-1 MB per case, and 3 images of ~0.5 MB (the target's case)."""
    results: dict[str, Any] = {"cases": cases, "calls_per_case": calls_per_case, "concurrency": concurrency,
                               "latency_s": latency}
    with latency_server(latency):
        for transport in ("auto", "litellm"):
            for label, count, size in (("1-5 images of 0.2-1 MB", (1, 5), (200_000, 1_000_000)),
                                       ("3 images of ~0.5 MB", (3, 3), (450_000, 550_000))):
                results.setdefault(label, {})[transport] = asyncio.run(
                    _image_calls(transport, cases, calls_per_case, count, size, concurrency, seed=1)
                )
    return results


async def _rate_limited_calls(port: int, seconds: float, limit: int, workers: int, adaptive: bool) -> dict[str, Any]:
    from mics_agents.models.base import ChatMessage, ModelRequest, TextPart
    from mics_agents.models.factory import open_model

    settings = _settings(None, limit, max_retries=50, adaptive_concurrency=adaptive)
    model = open_model("openai/intern-1", settings)
    done: list[float] = []
    failed = 0
    started = time.perf_counter()
    numbers = iter(range(10**9))

    async def worker() -> None:
        nonlocal failed
        while time.perf_counter() - started < seconds:
            number = next(numbers)
            text = f"## Question\nCase {number}: which finding?\n\n## Reasoning so far\n(none)\n\n## Your task\nanswer"
            try:
                await model.request(ModelRequest(messages=(ChatMessage("user", (TextPart(text),)),), temperature=0.3))
                done.append(time.perf_counter() - started)
            except Exception:
                failed += 1

    async def stats_at(moment: float) -> dict[str, Any]:
        await asyncio.sleep(moment)
        return await asyncio.to_thread(lambda: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats").read()))

    try:
        early_task = asyncio.create_task(stats_at(seconds - 20))
        await asyncio.gather(*(worker() for _ in range(workers)))
        early = await early_task
    finally:
        await model.aclose()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats") as response:
        end = json.loads(response.read())
    requests = end["requests"] - early["requests"]
    refused = end["rate_limited"] - early["rate_limited"]
    return {"adaptive": adaptive, "configured_limit": limit, "workers": workers,
            "throughput_last_20_s": sum(1 for at in done if seconds - 20 <= at < seconds) / 20,
            "requests_last_20_s": requests, "answered_429_last_20_s": refused,
            "share_429_last_20_s": refused / max(1, requests), "calls_failed": failed,
            "share_429_overall": end["rate_limited"] / max(1, end["requests"])}


def ratelimit(rate: float, seconds: float, limit: int, latency: float) -> dict[str, Any]:
    """A provider with a hidden token bucket of ``rate`` requests/s (429, Retry-After 1 beyond it), asked by
    2 x ``limit`` callers with a configured limit of ``limit`` in flight, for ``seconds``; with and without
    the adaptive limit."""
    results: dict[str, Any] = {"bucket_rate": rate, "seconds": seconds, "latency_s": latency}
    for adaptive in (True, False):
        with latency_server(latency, bucket_rate=rate) as port:
            results["adaptive" if adaptive else "fixed"] = asyncio.run(
                _rate_limited_calls(port, seconds, limit, 2 * limit, adaptive)
            )
    return results


def make_image_dataset(folder: Path, items: int, seed: int = 5) -> Path:
    """``make_dataset`` with one image per case (its own random pixels, ~50 KB as PNG)."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    data = make_dataset(folder / "data.jsonl", items)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    for record in records:
        name = f"{record['id']}.png"
        Image.frombytes("L", (160, 160), rng.randbytes(160 * 160)).save(folder / name)
        record["images"] = [name]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    return data


async def _fleet_run(data: Path, output: Path, config: Path, transport: str, concurrency: int) -> dict[str, Any]:
    from mics_agents.runner import BatchRun, RunOptions, run_id_for
    from mics_agents.search import Searcher

    # The published search shape: three mentors, three interns, two temperatures.
    settings = _settings(None, concurrency, transport=transport, router_config=config,
                         mentors=[*MENTORS, "openai/mentor-c"], interns=[f"intern-pool-{n}" for n in INTERN_POOLS])
    searcher = await Searcher.open(settings, run_id=run_id_for(output))
    try:
        stats = await BatchRun(searcher, RunOptions(data=data, output=output, concurrency=concurrency)).run()
        return stats.as_dict()
    finally:
        await searcher.aclose()


INTERN_POOLS = (1, 2, 3)


def affinity(items: int, replicas: int, latency: float, concurrency: int, capacities: list[int]) -> dict[str, Any]:
    """A search over ``items`` cases with images (three mentors, three interns, as published), each intern
    served by ``replicas`` replicas (a Router config's deployments; the three share the replica processes,
    each counting its own prefixes): per replica, intern requests whose images + question prefix it
    has seen (a prefix-cache hit), with each case's calls kept on one replica (the default, direct client) and
    spread by LiteLLM's Router (its default, random ``simple-shuffle``). Per prefix-cache capacity
    (prefixes per replica; 0: unbounded); mentors and the judge are on a server of their own."""
    import yaml

    results: dict[str, Any] = {"items": items, "replicas": replicas, "items_in_flight": concurrency,
                               "latency_s": latency, "runs": []}
    for capacity in capacities:
        for transport, routing in (("auto", "affinity (direct client)"), ("litellm", "random (LiteLLM Router)")):
            with tempfile.TemporaryDirectory() as folder, latency_server(latency), ExitStack() as fleet:
                root = Path(folder)
                ports = [fleet.enter_context(latency_server(latency, prefix_capacity=capacity, as_openai_base=False))
                         for _ in range(replicas)]
                config = root / "router.yaml"
                config.write_text(yaml.safe_dump({"model_list": [
                    {"model_name": f"intern-pool-{number}",
                     "litellm_params": {"model": f"openai/intern-{number}", "api_base": f"http://127.0.0.1:{port}/v1",
                                        "api_key": "os.environ/OPENAI_API_KEY"}}
                    for number in INTERN_POOLS for port in ports
                ]}))
                data = make_image_dataset(root, items)
                outcome = asyncio.run(_fleet_run(data, root / "out.jsonl", config, transport, concurrency))
                per_replica = [server_stats(port) for port in ports]
            calls = sum(stats["intern_requests"] for stats in per_replica)
            hits = sum(stats["prefix_hits"] for stats in per_replica)
            loads = [stats["intern_requests"] for stats in per_replica]
            results["runs"].append({
                "prefix_capacity": capacity, "routing": routing, "intern_requests": calls, "prefix_hits": hits,
                "hit_rate": hits / max(1, calls),
                # A case's first call to a replica cannot hit, however calls are routed: the share of the others.
                "hit_rate_after_first_contact": hits / max(1, calls - sum(stats["prefixes"] for stats in per_replica)),
                "intern_requests_per_replica": loads, "busiest_replica_vs_mean": max(loads) * len(loads) / max(1, calls),
                "outcomes": {k: outcome[k] for k in ("success", "no_path", "model_error", "bad_input")},
            })
    return results


def samples(items: int, per_temperature: int, latency: float, concurrency: int) -> dict[str, Any]:
    """A search over ``items`` cases with ``per_temperature`` intern samples per temperature, the interns
    behind a Router config: once declaring ``supports_n`` (the samples of one temperature are one request with
    ``n``) and once not (one request each). Requests, wall time and client CPU, same server, fresh caches."""
    import yaml

    results: dict[str, Any] = {"items": items, "samples_per_temperature": per_temperature, "latency_s": latency,
                               "items_in_flight": concurrency, "runs": []}
    for supports_n in (True, False):
        with tempfile.TemporaryDirectory() as folder, latency_server(latency, distinct_samples=True) as port:
            root = Path(folder)
            entry_info = {"model_info": {"supports_n": True}} if supports_n else {}
            config = root / "router.yaml"
            config.write_text(yaml.safe_dump({"model_list": [
                {"model_name": f"intern-pool-{number}", **entry_info,
                 "litellm_params": {"model": f"openai/intern-{number}", "api_base": f"http://127.0.0.1:{port}/v1",
                                    "api_key": "os.environ/OPENAI_API_KEY"}}
                for number in (1, 2)
            ]}))
            data = make_dataset(root / "data.jsonl", items)

            async def run() -> dict[str, Any]:
                from mics_agents.runner import BatchRun, RunOptions, run_id_for
                from mics_agents.search import Searcher

                settings = _settings(root / "cache.sqlite", concurrency, router_config=config,
                                     interns=["intern-pool-1", "intern-pool-2"], samples_per_temperature=per_temperature)
                searcher = await Searcher.open(settings, run_id=run_id_for(root / "out.jsonl"))
                try:
                    cpu, wall = time.process_time(), time.perf_counter()
                    stats = await BatchRun(searcher, RunOptions(data=data, output=root / "out.jsonl",
                                                                concurrency=concurrency)).run()
                    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                            "stats": stats.as_dict()}
                finally:
                    await searcher.aclose()

            outcome = asyncio.run(run())
            stats = server_stats(port)
        results["runs"].append({
            "supports_n": supports_n, "requests": stats["requests"], "intern_requests": stats["intern_requests"],
            "wall_s": outcome["wall_s"], "client_cpu_s": outcome["cpu_s"],
            "outcomes": {k: outcome["stats"][k] for k in ("success", "no_path", "model_error", "bad_input")},
        })
    return results


def resume(items: int, concurrency: int) -> dict[str, Any]:
    """A finished run of ``items`` items, then (1) the same command again and (2) the run with its output
    removed, so that every call replays from the cache."""
    with tempfile.TemporaryDirectory() as folder, latency_server(0.0) as port:
        root = Path(folder)
        data = make_dataset(root / "data.jsonl", items)
        first = asyncio.run(_mics_run(data, root / "out.jsonl", root / "cache.sqlite", concurrency, concurrency))
        calls = server_requests(port)
        rerun = asyncio.run(_mics_run(data, root / "out.jsonl", root / "cache.sqlite", concurrency, concurrency))
        after_rerun = server_requests(port)
        (root / "out.jsonl").unlink()
        root.joinpath("out_failed.jsonl").unlink(missing_ok=True)
        replay = asyncio.run(_mics_run(data, root / "out.jsonl", root / "cache.sqlite", concurrency, concurrency))
        after_replay = server_requests(port)
    return {
        "items": items, "first_run_s": first["wall_s"], "first_run_calls": calls,
        "rerun_s": rerun["wall_s"], "rerun_requests": after_rerun - calls,
        "replay_from_cache_s": replay["wall_s"], "replay_requests": after_replay - after_rerun,
        "cache_lookups_per_s": calls / replay["wall_s"],
    }


def memory(items: int, seconds: float) -> dict[str, Any]:
    """Peak RSS of a run over ``items`` queued items (stopped after ``seconds``)."""
    code = f"""
import asyncio, json, resource, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from benchmarks.run import make_dataset, _settings
from mics_agents.runner import BatchRun, RunOptions, run_id_for
from mics_agents.search import Searcher
from pathlib import Path
import tempfile
async def main():
    root = Path(tempfile.mkdtemp())
    data = make_dataset(root / "data.jsonl", {items})
    searcher = await Searcher.open(_settings(root / "c.sqlite", 64), run_id="mem")
    batch = BatchRun(searcher, RunOptions(data=data, output=root / "out.jsonl", concurrency=64))
    asyncio.get_running_loop().call_later({seconds}, batch.stop)
    stats = await batch.run()
    await searcher.aclose()
    print(json.dumps({{"ended": stats.ended, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
asyncio.run(main())
"""
    with latency_server(0.1):
        output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=os.environ)
    if output.returncode != 0:
        raise RuntimeError(output.stderr[-2000:])
    result = json.loads(output.stdout.strip().splitlines()[-1])
    return {"queued_items": items, "ran_s": seconds, **result}


def startup(repeats: int = 5) -> dict[str, Any]:
    def median_time(command: list[str]) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    mics = str(Path(sys.executable).with_name("mics"))
    return {
        "mics_help_s": median_time([mics, "--help"]),
        "import_mics_agents_s": median_time([sys.executable, "-c", "import mics_agents"]),
    }


def machine() -> dict[str, Any]:
    import litellm  # noqa: F401 - its version is part of the result

    from importlib.metadata import version

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "mics_agents"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "litellm": version("litellm"), "openai": version("openai"), "commit": commit,
            "mics_agents_uncommitted_changes": bool(dirty)}


def main() -> None:
    parser = argparse.ArgumentParser(description="mics-agents performance harness")
    parser.add_argument("what", choices=["throughput", "process", "queue", "first-request", "images", "ratelimit", "affinity", "samples", "resume",
                                         "memory", "startup", "all"])
    parser.add_argument("--samples-items", type=int, default=120)
    parser.add_argument("--samples-per-temperature", type=int, default=4)
    parser.add_argument("--affinity-items", type=int, default=120)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--prefix-capacities", default="0,16",
                        help="comma-separated prefixes a replica's cache holds (0: no bound)")
    parser.add_argument("--image-cases", type=int, default=20)
    parser.add_argument("--image-calls-per-case", type=int, default=30)
    parser.add_argument("--process-items", type=int, default=120)
    parser.add_argument("--process-mentors", type=int, default=3)
    parser.add_argument("--process-interns", type=int, default=2)
    parser.add_argument("--process-model-concurrency", type=int, default=None,
                        help="calls in flight per model (default: the settings' default, 32)")
    parser.add_argument("--process-max-calls-in-flight", type=int, default=None,
                        help="calls in flight over all models (default: the settings' default, no limit)")
    parser.add_argument("--process-log", type=Path, default=None, help="keep the server's request log here")
    parser.add_argument("--process-checkouts", default=None,
                        help="comma-separated folders whose mics_agents the process runs (PYTHONPATH), alternating; "
                             "empty entry: the installed one")
    parser.add_argument("--process-repeats", type=int, default=1)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sequential-items", type=int, default=3)
    parser.add_argument("--resume-items", type=int, default=1000)
    parser.add_argument("--memory-items", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine()}
    if args.what in ("startup", "all"):
        results["startup"] = startup()
    if args.what in ("throughput", "all"):
        results["throughput"] = throughput(args.items, args.latency, args.concurrency, args.sequential_items)
    if args.what in ("process", "all"):
        if args.process_checkouts is not None or args.process_repeats > 1:
            results["process"] = process_compared(
                args.process_items, args.latency, args.concurrency, (args.process_checkouts or "").split(","),
                args.process_repeats, mentors=args.process_mentors, interns=args.process_interns,
                model_concurrency=args.process_model_concurrency, max_calls_in_flight=args.process_max_calls_in_flight)
        else:
            results["process"] = process(args.process_items, args.latency, args.concurrency, args.process_mentors,
                                         args.process_interns, args.process_model_concurrency,
                                         args.process_max_calls_in_flight, args.process_log)
    if args.what == "first-request":
        results["first_request"] = first_request(args.process_items, args.process_repeats,
                                                 (args.process_checkouts or "").split(","), args.process_mentors,
                                                 args.process_interns)
    if args.what == "queue":
        results["queue"] = queue(args.process_items, args.latency, args.concurrency, args.process_mentors,
                                 args.process_interns)
    if args.what in ("images", "all"):
        results["images"] = images(args.image_cases, args.image_calls_per_case, args.concurrency, args.latency)
    if args.what in ("ratelimit", "all"):
        results["ratelimit"] = ratelimit(50.0, 30.0, 200, args.latency)
    if args.what in ("affinity", "all"):
        capacities = [int(value) for value in args.prefix_capacities.split(",")]
        results["affinity"] = affinity(args.affinity_items, args.replicas, args.latency, args.concurrency, capacities)
    if args.what in ("samples", "all"):
        results["samples"] = samples(args.samples_items, args.samples_per_temperature, args.latency, args.concurrency)
    if args.what in ("resume", "all"):
        results["resume"] = resume(args.resume_items, args.concurrency)
    if args.what in ("memory", "all"):
        results["memory"] = memory(args.memory_items, 15.0)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
