"""A batched run (mics run --batch) on the local fake of both batch APIs: rounds, wall time, requests per batch,
and what the replies cost at the batch rate against online.

    python -m benchmarks.batch_run --cases 200 --batch-latency 2 --out benchmarks/results/batches.json

Mentors are one OpenAI and one Anthropic model, the judge OpenAI, all three batched; the intern is online (the
fake's chat endpoint), as a local vLLM intern would be. Every batch takes ``--batch-latency`` seconds from its
creation to its end. A *round* is a wave of batches submitted together (created within a second of each
other): a run's wall time is about its rounds times the batch latency, whatever the number of cases.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_batch_server import FakeBatchServer  # noqa: E402

PRICES = {name: {"input": 2.5e-6, "output": 1e-5} for name in ("openai/mentor-a", "anthropic/mentor-b", "openai/judge")}
DIAGNOSES = ["Tension pneumothorax", "Brain abscess", "Sigmoid volvulus", "Duodenal atresia", "Bowel perforation"]


def write_cases(folder: Path, count: int) -> Path:
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), ((index * 37) % 256, (index * 11) % 256, 120)).save(buffer, format="PNG")
        (images / f"scan{index}.png").write_bytes(buffer.getvalue())
        if index % 3 == 2:
            question, answer = f"Case {index}: which finding?\nA. Mass\nB. Cyst\nC. Normal", "ABC"[index % 3]
        else:
            question, answer = f"Case {index}: what is the most likely diagnosis?", DIAGNOSES[index % len(DIAGNOSES)]
        lines.append(json.dumps({"id": f"case-{index}", "question": question, "answer": answer,
                                 "images": [f"scan{index}.png"]}))
    path = folder / "cases.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def rounds(created: list[float], gap: float = 1.0) -> list[int]:
    """Batches per wave: batches created within ``gap`` seconds of the previous one are one round."""
    waves: list[int] = []
    last = None
    for moment in sorted(created):
        if last is None or moment - last > gap:
            waves.append(0)
        waves[-1] += 1
        last = moment
    return waves


async def batched_run(folder: Path, data: Path, fake: FakeBatchServer) -> dict:
    from mics_agents.batches import open_batch_worker
    from mics_agents.config import load_settings
    from mics_agents.runner import BatchRun, RunOptions, run_id_for

    output = folder / "out.jsonl"
    settings = load_settings(cache_path=str(folder / "cache.sqlite"))
    worker = await open_batch_worker(settings, run_id=run_id_for(output), output=output, on_event=lambda text: None)
    started = time.monotonic()
    try:
        stats = await BatchRun(worker, RunOptions(data=data, output=output, image_dir=data.parent / "images",
                                                  concurrency=settings.batch_items_in_flight)).run()
    finally:
        await worker.aclose()
    wall = time.monotonic() - started
    created = [batch["created_at"] for batch in fake.openai_batches.values()]
    created += [batch["created_at"] for batch in fake.anthropic_batches.values()]
    waves = rounds(created)
    sizes = fake.batch_sizes()
    summary = stats.as_dict()
    return {
        "cases": stats.total, "success": stats.success, "no_path": stats.no_path, "model_error": stats.model_error,
        "wall_s": round(wall, 2), "rounds": len(waves), "batches_per_round": waves,
        "batches": len(sizes), "requests_batched": sum(sizes),
        "requests_per_batch": {"mean": round(sum(sizes) / len(sizes), 1) if sizes else 0,
                               "min": min(sizes, default=0), "max": max(sizes, default=0)},
        "wall_per_round_s": round(wall / len(waves), 2) if waves else 0,
        "online_calls": len(fake.online_calls),
        "submitted_twice": len(fake.submitted_twice()),
        "batch_cost_usd": summary["batches"]["batch_cost_usd"],
        "online_cost_usd": summary["batches"]["online_cost_usd"],
        "spent_usd": round(stats.spent_usd, 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--batch-latency", type=float, default=2.0, help="seconds from a batch's creation to its end")
    parser.add_argument("--poll", type=float, default=0.25, help="MICS_BATCH_POLL_INTERVAL")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from mics_agents.models import set_request_policy

    set_request_policy("local-only")
    with tempfile.TemporaryDirectory() as temporary, FakeBatchServer(delay=args.batch_latency, lifetime=3600) as fake:
        folder = Path(temporary)
        for name in [name for name in os.environ if name.startswith("MICS_")]:
            del os.environ[name]
        os.environ.update(
            MICS_MENTORS="openai/mentor-a,anthropic/mentor-b", MICS_INTERNS="openai/intern-1", MICS_JUDGE="openai/judge",
            MICS_BATCH_MODELS="openai/mentor-a,anthropic/mentor-b,openai/judge", MICS_BATCH_POLL_INTERVAL=str(args.poll),
            MICS_PRICES=json.dumps(PRICES), OPENAI_API_BASE=fake.openai_base, OPENAI_API_KEY="sk-bench",
            ANTHROPIC_API_BASE=fake.anthropic_base, ANTHROPIC_API_KEY="sk-bench",
        )
        data = write_cases(folder, args.cases)
        result = asyncio.run(batched_run(folder, data, fake))
    result.update(batch_latency_s=args.batch_latency, poll_interval_s=args.poll,
                  machine={"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count()})
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
