"""Client CPU of intern calls with images sent as data URLs and by reference (``file://`` URLs into a media
folder, issue 30), and where it goes (cProfile).

Calls go through the model stack as a search sends them (limits, retries, sanitizing, validation; no cache) to
``benchmarks.latency_server`` in its own process, as ``hosted_vllm/`` deployments of a Router config, once
without ``model_info.media_dir`` (data URLs) and once with it (file URLs). Each case has its own 3 random images
of ~0.5 MB, shared by its calls; CPU is the process time over all threads (user + system) of the calls, after a
warm-up call:

    python -m benchmarks.images_by_reference --out benchmarks/results/images_by_reference.json
    python -m benchmarks.images_by_reference --profile 40 --out benchmarks/results/images_profile.json

``--profile N`` runs the same calls under cProfile (the event loop's thread; file writes happen in worker
threads, which cProfile does not see) and keeps the N entries with the most own time, and the N with the most
time below them. Profiled runs are slower; their CPU figures are not the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import json
import os
import pstats
import random
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from .run import latency_server, machine  # noqa: E402


def _router_config(folder: Path, port: int, media_dir: Path | None) -> Path:
    import yaml

    info: dict[str, Any] = {"supports_n": True}
    if media_dir is not None:
        info["media_dir"] = str(media_dir)
    path = folder / f"router-{'file' if media_dir else 'data'}.yaml"
    path.write_text(yaml.safe_dump({"model_list": [{
        "model_name": "intern-1",
        "litellm_params": {"model": "hosted_vllm/intern-1", "api_base": f"http://127.0.0.1:{port}/v1"},
        "model_info": info,
    }]}))
    return path


async def _calls(config: Path, cases: int, calls_per_case: int, concurrency: int, seed: int,
                 profiler: cProfile.Profile | None) -> dict[str, Any]:
    from mics_agents.config import load_settings
    from mics_agents.models.base import ChatMessage, ImagePart, ModelRequest, TextPart
    from mics_agents.models.factory import open_models

    settings = load_settings(interns=["intern-1"], mentors=["openai/m"], judge="openai/m", cache_path=None,
                             router_config=config, model_concurrency=concurrency, max_calls_in_flight=concurrency)
    (model,) = open_models(["intern-1"], settings)
    rng = random.Random(seed)
    case_images = []
    for case in range(cases):
        parts = []
        for index in range(3):
            data = rng.randbytes(rng.randint(450_000, 550_000))
            parts.append(ImagePart(data, "image/png", hashlib.sha256(data).hexdigest(), f"{case}-{index}"))
        case_images.append(tuple(parts))

    def request(case: int, call: int) -> ModelRequest:
        prefix = "\n".join(f"### Step {step}: finding {case}.{call}.{step}" for step in range(1 + call % 4))
        return ModelRequest(
            messages=(
                ChatMessage.text("system", "You are an intern."),
                ChatMessage("user", (*case_images[case], TextPart(
                    f"## Question\nCase {case}: which finding?\nA. Mass\nB. Cyst\n\n"
                    f"## Reasoning so far\n{prefix}\n\n## Your task\nanswer"))),
            ),
            temperature=(0.3, 0.7, 1.0)[call % 3],
            max_tokens=32,
        )

    semaphore = asyncio.Semaphore(concurrency)

    async def one(case: int, call: int) -> None:
        async with semaphore:
            await model.request(request(case, call))

    warm_up = ImagePart(b"warm-up", "image/png", hashlib.sha256(b"warm-up").hexdigest())
    try:
        await model.request(ModelRequest(messages=(ChatMessage("user", (warm_up, TextPart("warm up"))),), temperature=0.0))
        if profiler is not None:
            profiler.enable()
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(case, call) for case in range(cases) for call in range(calls_per_case)))
        elapsed, used = time.perf_counter() - wall, time.process_time() - cpu
        if profiler is not None:
            profiler.disable()
    finally:
        await model.aclose()
    calls = cases * calls_per_case
    return {"calls": calls, "wall_s": elapsed, "calls_per_s": calls / elapsed, "cpu_ms_per_call": 1000 * used / calls,
            "calls_per_cpu_s": calls / used if used else None}


def _build_cost(mode: str, folder: Path, bodies: int) -> float:
    """Microseconds of CPU to build one request body of an intern call with 3 images (their parts already made:
    each is made once per image), without sending it."""
    import inspect

    from mics_agents.models.base import ChatMessage, ImagePart, ModelRequest, TextPart
    from mics_agents.models.direct import request_pieces

    rng = random.Random(7)
    images = []
    for index in range(3):
        data = rng.randbytes(500_000)
        images.append(ImagePart(data, "image/png", hashlib.sha256(data).hexdigest(), f"b-{index}"))
    media = None
    if mode == "file":
        from mics_agents.media import MediaFolder

        media = MediaFolder(folder / "media")
    takes_media = "media" in inspect.signature(request_pieces).parameters  # not before issue 30
    extra = {"temperature": 0.7, "max_tokens": 32}

    def build(call: int) -> list[bytes]:
        request = ModelRequest(
            messages=(ChatMessage.text("system", "You are an intern."),
                      ChatMessage("user", (*images, TextPart(f"## Question\nWhich finding?\n\n## Reasoning so far\n"
                                                             f"### Step 1: finding {call}\n\n## Your task\nanswer")))),
            temperature=0.7, max_tokens=32,
        )
        return request_pieces(request, "intern-1", extra, media) if takes_media else request_pieces(request, "intern-1", extra)

    build(0)  # each image's part made once
    start = time.process_time()
    for call in range(bodies):
        build(call)
    return 1e6 * (time.process_time() - start) / bodies


def _top(profiler: cProfile.Profile, count: int, calls: int) -> dict[str, list[dict[str, Any]]]:
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, function), (_, calls_made, own, below, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = file.split("site-packages/")[-1].split("/work/main/")[-1]
        rows.append({"function": f"{where}:{line}({function})", "calls_per_call": round(calls_made / calls, 2),
                     "own_us_per_call": round(1e6 * own / calls, 2), "cumulative_us_per_call": round(1e6 * below / calls, 2)})
    return {
        "by_own_time": sorted(rows, key=lambda row: -row["own_us_per_call"])[:count],
        "by_cumulative_time": sorted(rows, key=lambda row: -row["cumulative_us_per_call"])[:count],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--calls-per-case", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating")
    parser.add_argument("--modes", default="data,file")
    parser.add_argument("--profile", type=int, default=0, help="profile instead, keeping this many entries")
    parser.add_argument("--bodies", type=int, default=20_000, help="request bodies built for the build cost (0: skip)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    results: dict[str, Any] = {"machine": machine(), "cases": args.cases, "calls_per_case": args.calls_per_case,
                               "images_per_call": 3, "image_bytes": "450-550 kB each", "concurrency": args.concurrency,
                               "latency_s": args.latency}
    with tempfile.TemporaryDirectory() as scratch, latency_server(args.latency, as_openai_base=False) as port:
        folder = Path(scratch)
        configs = {"data": _router_config(folder, port, None), "file": _router_config(folder, port, folder / "media")}
        modes = args.modes.split(",")
        if args.bodies and not args.profile:
            for mode in modes:
                results.setdefault("build_us_per_body", {})[mode] = [_build_cost(mode, folder, args.bodies) for _ in range(3)]
                print(f"{mode}: building a body takes {min(results['build_us_per_body'][mode]):.1f} us CPU", flush=True)
        for repeat in range(1 if args.profile else args.repeats):
            for mode in modes:
                profiler = cProfile.Profile() if args.profile else None
                outcome = asyncio.run(_calls(configs[mode], args.cases, args.calls_per_case, args.concurrency,
                                             seed=repeat, profiler=profiler))
                if profiler is not None:
                    outcome["profile"] = _top(profiler, args.profile, outcome["calls"])
                results.setdefault(mode, []).append(outcome)
                print(f"{mode}: {outcome['cpu_ms_per_call']:.3f} ms CPU/call, {outcome['calls_per_s']:.0f} calls/s",
                      flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
