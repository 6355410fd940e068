"""A stand-in for ``python -m vllm.entrypoints.openai.api_server`` in tests of ``mics serve``: it takes
the same arguments, answers /health, /v1/models and /v1/chat/completions (like the simulated intern),
counts what it served at /stats, and stops on SIGTERM or after --lifetime seconds."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time

from aiohttp import web

from mics_agents.models.base import ChatMessage, ModelRequest, TextPart
from mics_agents.models.simulated import simulated_reply


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--lora-modules", nargs="*", default=[])
    parser.add_argument("--startup-delay", type=float, default=0.5)
    parser.add_argument("--lifetime", type=float, default=120.0)
    args = parser.parse_args()
    served = {args.served_model_name, *(spec.split("=", 1)[0] for spec in args.lora_modules)}
    stats = {"requests": 0, "models": [], "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model"} for name in sorted(served)]})

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        if body["model"] not in served:
            return web.json_response({"error": {"message": f"model {body['model']} not served"}}, status=404)
        stats["requests"] += 1
        stats["models"].append(body["model"])
        messages = []
        for message in body["messages"]:
            content = message["content"]
            text = content if isinstance(content, str) else "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
            messages.append(ChatMessage(message["role"], (TextPart(text),)))
        count = int(body.get("n") or 1)  # vLLM answers n choices, each a sample of its own
        replies = [
            simulated_reply("intern", body["model"], ModelRequest(tuple(messages), float(body.get("temperature", 1.0)), sample_index=k))
            for k in range(count)
        ]
        return web.json_response({"id": "x", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                                  "choices": [{"index": k, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                                              for k, reply in enumerate(replies)],
                                  "usage": {"prompt_tokens": 10, "completion_tokens": 5 * count, "total_tokens": 10 + 5 * count}})

    async def report(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def serve() -> None:
        await asyncio.sleep(args.startup_delay)  # like a model loading
        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", completions)
        app.router.add_get("/stats", report)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        print(json.dumps({"listening": args.port, "argv": vars(args)}), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), timeout=args.lifetime)
        except asyncio.TimeoutError:
            pass
        await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
