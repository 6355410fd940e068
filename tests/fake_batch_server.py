"""A local fake of OpenAI's Batch API (files + batches) and Anthropic's Message Batches (create, retrieve, list,
results, cancel), with the online chat endpoints of both for calls that fall back, on 127.0.0.1.

Like :class:`~tests.openai_server.OpenAIServer` it runs in its own thread and loop and stops by itself after
``lifetime`` seconds; its state (files, batches, what was submitted) lives in the test process, so a ``mics
run`` killed and started again finds its batches where it left them. Replies come from a *brain* (the
simulated mentor, intern and judge by default), so a batched run and an online run get the same answers.

- ``delay``: seconds from a batch's creation until it ends (``hold = True`` keeps every batch in progress);
- ``outcome(custom_id, submissions_before)``: ``None`` (answer), ``"errored"`` or ``"expired"`` per request;
- ``submissions``: every custom_id in every batch created, in order (a paid request sent twice shows here).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from .openai_server import Brain, _message_text, simulated_brain

__all__ = ["FakeBatchServer"]

Outcome = Callable[[str, int], "str | None"]


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")


def openai_body_of_anthropic(params: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic ``params`` as the OpenAI chat body the brain reads (images back to data URLs)."""
    messages: list[dict[str, Any]] = []
    system = params.get("system")
    if isinstance(system, list):
        system = "\n".join(block.get("text", "") for block in system)
    if system:
        messages.append({"role": "system", "content": system})
    for message in params["messages"]:
        content = message["content"]
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": content})
            continue
        parts = []
        for block in content:
            if block["type"] == "text":
                parts.append({"type": "text", "text": block["text"]})
            elif block["type"] == "image":
                source = block["source"]
                parts.append({"type": "image_url", "image_url": {"url": f"data:{source['media_type']};base64,{source['data']}"}})
        messages.append({"role": message["role"], "content": parts})
    return {"model": params["model"], "messages": messages, "temperature": params.get("temperature", 1.0),
            "max_tokens": params.get("max_tokens")}


class FakeBatchServer:
    def __init__(self, brain: Brain = simulated_brain, *, delay: float = 0.0, lifetime: float = 300.0,
                 outcome: Outcome | None = None) -> None:
        self.brain = brain
        self.delay = delay
        self.lifetime = lifetime
        self.outcome = outcome or (lambda custom_id, before: None)
        self.hold = False
        self.port: int | None = None
        self.submissions: list[tuple[str, str]] = []  # (batch id, custom_id)
        self.online_calls: list[tuple[str, str]] = []  # (api, model)
        self.errors: list[str] = []
        self.files: dict[str, bytes] = {}
        self.openai_batches: dict[str, dict[str, Any]] = {}
        self.anthropic_batches: dict[str, dict[str, Any]] = {}
        self.results_read: Counter = Counter()  # batch id -> times its results were read
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._seen: Counter = Counter()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()

    # -- control ---------------------------------------------------------------------------------------

    @property
    def openai_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def submitted_twice(self) -> dict[str, int]:
        with self._lock:
            counts = Counter(custom_id for _, custom_id in self.submissions)
        return {custom_id: count for custom_id, count in counts.items() if count > 1}

    def batch_sizes(self) -> list[int]:
        with self._lock:
            return list(Counter(batch for batch, _ in self.submissions).values())

    def __enter__(self) -> "FakeBatchServer":
        self._thread = threading.Thread(target=self._run, name="fake-batch-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake batch server did not start within 10 s")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stopped is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        app = web.Application(client_max_size=256 * 1024 * 1024)
        routes = [
            ("POST", "/v1/files", self._upload), ("GET", "/v1/files/{id}/content", self._content),
            ("POST", "/v1/batches", self._openai_create), ("GET", "/v1/batches", self._openai_list),
            ("GET", "/v1/batches/{id}", self._openai_retrieve), ("POST", "/v1/batches/{id}/cancel", self._openai_cancel),
            ("POST", "/v1/chat/completions", self._openai_online),
            ("POST", "/v1/messages/batches", self._anthropic_create), ("GET", "/v1/messages/batches", self._anthropic_list),
            ("GET", "/v1/messages/batches/{id}", self._anthropic_retrieve),
            ("GET", "/v1/messages/batches/{id}/results", self._anthropic_results),
            ("POST", "/v1/messages/batches/{id}/cancel", self._anthropic_cancel),
            ("POST", "/v1/messages", self._anthropic_online),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
        self._ready.set()
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout=self.lifetime)
        except asyncio.TimeoutError:
            pass
        finally:
            await runner.cleanup()

    # -- answering -------------------------------------------------------------------------------------

    def _answer(self, body: dict[str, Any]) -> tuple[str, str, int, int]:
        """(text, finish reason, prompt tokens, completion tokens): one word is one token, as in OpenAIServer."""
        try:
            text = self.brain(str(body["model"]), body)
        except Exception as exc:
            with self._lock:
                self.errors.append(f"brain failed: {type(exc).__name__}: {exc}")
            raise
        budget = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        words = text.split(" ")
        if isinstance(budget, int) and len(words) > budget:
            text, finish = " ".join(words[:budget]), "length"
        prompt = sum(len(_message_text(message).split()) for message in body.get("messages", []))
        return text, finish, prompt, len(text.split())

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        text, finish, prompt, completion = self._answer(body)
        return {"id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}

    def _message(self, params: dict[str, Any]) -> dict[str, Any]:
        text, finish, prompt, completion = self._answer(openai_body_of_anthropic(params))
        return {"id": f"msg_{next(self._ids)}", "type": "message", "role": "assistant", "model": params["model"],
                "content": [{"type": "text", "text": text}],
                "stop_reason": "max_tokens" if finish == "length" else "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": prompt, "output_tokens": completion}}

    def _decide(self, custom_id: str) -> str | None:
        with self._lock:
            before = self._seen[custom_id]
            self._seen[custom_id] += 1
        return self.outcome(custom_id, before)

    def _due(self, batch: dict[str, Any]) -> bool:
        return not self.hold and time.time() >= batch["created_at"] + self.delay

    # -- OpenAI ----------------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if upload is None or form.get("purpose") != "batch":
            return web.json_response({"error": {"message": "file and purpose=batch required"}}, status=400)
        data = upload.file.read()
        file_id = f"file-{next(self._ids)}"
        with self._lock:
            self.files[file_id] = data
        return web.json_response({"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                  "filename": upload.filename, "purpose": "batch", "status": "processed"})

    async def _content(self, request: web.Request) -> web.Response:
        with self._lock:
            data = self.files.get(request.match_info["id"])
        if data is None:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    async def _openai_create(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            data = self.files.get(body.get("input_file_id"))
        if data is None:
            return web.json_response({"error": {"message": "input file not found"}}, status=404)
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        ids = [line["custom_id"] for line in lines]
        if len(set(ids)) != len(ids) or len({line["body"]["model"] for line in lines}) > 1:
            return web.json_response({"error": {"message": "duplicate custom_id or several models"}}, status=400)
        batch_id = f"batch_{next(self._ids)}"
        batch = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
                 "completion_window": body["completion_window"], "status": "in_progress", "created_at": time.time(),
                 "metadata": body.get("metadata") or {}, "lines": lines, "output_file_id": None, "error_file_id": None}
        with self._lock:
            self.openai_batches[batch_id] = batch
            self.submissions += [(batch_id, custom_id) for custom_id in ids]
        return web.json_response(self._openai_view(batch))

    def _openai_settle(self, batch: dict[str, Any], status: str = "completed") -> None:
        if batch["status"] != "in_progress":
            return
        output, errors = [], []
        for line in batch["lines"]:
            if status == "cancelled":
                errors.append({"id": f"r{next(self._ids)}", "custom_id": line["custom_id"], "response": None,
                               "error": {"code": "batch_cancelled", "message": "cancelled"}})
                continue
            outcome = self._decide(line["custom_id"])
            if outcome == "expired":
                errors.append({"id": f"r{next(self._ids)}", "custom_id": line["custom_id"], "response": None,
                               "error": {"code": "batch_expired", "message": "not run before the window closed"}})
            elif outcome == "errored":
                errors.append({"id": f"r{next(self._ids)}", "custom_id": line["custom_id"],
                               "response": {"status_code": 500, "body": {"error": {"message": "server error"}}}, "error": None})
            else:
                output.append({"id": f"r{next(self._ids)}", "custom_id": line["custom_id"],
                               "response": {"status_code": 200, "request_id": "x", "body": self._completion(line["body"])},
                               "error": None})
        for kind, rows in (("output_file_id", output), ("error_file_id", errors)):
            if rows:
                file_id = f"file-{next(self._ids)}"
                self.files[file_id] = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
                batch[kind] = file_id
        batch["status"] = status
        batch["counts"] = (len(output), len(errors))

    def _openai_view(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch["status"] == "in_progress" and self._due(batch):
            with self._lock:
                self._openai_settle(batch)
        done, failed = batch.get("counts", (0, 0))
        return {key: value for key, value in batch.items() if key not in ("lines", "counts")} | {
            "created_at": int(batch["created_at"]),
            "request_counts": {"total": len(batch["lines"]), "completed": done, "failed": failed}}

    async def _openai_retrieve(self, request: web.Request) -> web.Response:
        batch = self.openai_batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        return web.json_response(self._openai_view(batch))

    async def _openai_list(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", 20))
        after = request.query.get("after")
        ordered = sorted(self.openai_batches.values(), key=lambda batch: batch["created_at"], reverse=True)
        if after is not None:
            index = next((i for i, batch in enumerate(ordered) if batch["id"] == after), len(ordered))
            ordered = ordered[index + 1:]
        page = [self._openai_view(batch) for batch in ordered[:limit]]
        return web.json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit})

    async def _openai_cancel(self, request: web.Request) -> web.Response:
        batch = self.openai_batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        with self._lock:
            self._openai_settle(batch, "cancelled")
        return web.json_response(self._openai_view(batch))

    async def _openai_online(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            self.online_calls.append(("openai", body["model"]))
        return web.json_response(self._completion(body))

    # -- Anthropic -------------------------------------------------------------------------------------

    async def _anthropic_create(self, request: web.Request) -> web.Response:
        if not request.headers.get("anthropic-version"):
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "anthropic-version header required"}}, status=400)
        body = await request.json()
        requests = body.get("requests") or []
        ids = [entry["custom_id"] for entry in requests]
        if not requests or len(set(ids)) != len(ids) or any(len(custom_id) > 64 for custom_id in ids):
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "bad custom_ids"}}, status=400)
        if any("max_tokens" not in entry["params"] or entry["params"].get("temperature", 0) > 1 for entry in requests):
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "max_tokens required; temperature 0..1"}}, status=400)
        batch_id = f"msgbatch_{next(self._ids):06d}"
        batch = {"id": batch_id, "created_at": time.time(), "requests": requests, "status": "in_progress", "results": None}
        with self._lock:
            self.anthropic_batches[batch_id] = batch
            self.submissions += [(batch_id, custom_id) for custom_id in ids]
        return web.json_response(self._anthropic_view(batch))

    def _anthropic_settle(self, batch: dict[str, Any], canceled: bool = False) -> None:
        if batch["status"] != "in_progress":
            return
        results = []
        for entry in batch["requests"]:
            outcome = "canceled" if canceled else self._decide(entry["custom_id"])
            if outcome in ("expired", "canceled"):
                result: dict[str, Any] = {"type": outcome}
            elif outcome == "errored":
                result = {"type": "errored", "error": {"type": "error", "error": {"type": "api_error", "message": "overloaded"}}}
            else:
                result = {"type": "succeeded", "message": self._message(entry["params"])}
            results.append({"custom_id": entry["custom_id"], "result": result})
        batch["results"] = results
        batch["status"] = "ended"
        batch["ended_at"] = time.time()

    def _anthropic_view(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch["status"] == "in_progress" and self._due(batch):
            with self._lock:
                self._anthropic_settle(batch)
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if batch["results"] is None:
            counts["processing"] = len(batch["requests"])
        else:
            for row in batch["results"]:
                counts[row["result"]["type"]] += 1
        ended = batch["status"] == "ended"
        return {"id": batch["id"], "type": "message_batch", "processing_status": batch["status"],
                "request_counts": counts, "created_at": _iso(batch["created_at"]),
                "ended_at": _iso(batch["ended_at"]) if ended else None,
                "expires_at": _iso(batch["created_at"] + 86400), "cancel_initiated_at": None, "archived_at": None,
                "results_url": f"{self.anthropic_base}/v1/messages/batches/{batch['id']}/results" if ended else None}

    async def _anthropic_retrieve(self, request: web.Request) -> web.Response:
        batch = self.anthropic_batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response({"type": "error", "error": {"type": "not_found_error", "message": "no batch"}}, status=404)
        return web.json_response(self._anthropic_view(batch))

    async def _anthropic_list(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", 20))
        after = request.query.get("after_id")
        ordered = sorted(self.anthropic_batches.values(), key=lambda batch: batch["created_at"], reverse=True)
        if after is not None:
            index = next((i for i, batch in enumerate(ordered) if batch["id"] == after), len(ordered))
            ordered = ordered[index + 1:]
        page = [self._anthropic_view(batch) for batch in ordered[:limit]]
        return web.json_response({"data": page, "has_more": len(ordered) > limit,
                                  "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None})

    async def _anthropic_results(self, request: web.Request) -> web.Response:
        batch = self.anthropic_batches.get(request.match_info["id"])
        if batch is None or batch["results"] is None:
            return web.json_response({"type": "error", "error": {"type": "not_found_error", "message": "no results"}}, status=404)
        with self._lock:
            self.results_read[batch["id"]] += 1
        body = b"".join(json.dumps(row).encode() + b"\n" for row in batch["results"])
        return web.Response(body=body, content_type="application/binary")

    async def _anthropic_cancel(self, request: web.Request) -> web.Response:
        batch = self.anthropic_batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response({"type": "error", "error": {"type": "not_found_error", "message": "no batch"}}, status=404)
        with self._lock:
            self._anthropic_settle(batch, canceled=True)
        return web.json_response(self._anthropic_view(batch))

    async def _anthropic_online(self, request: web.Request) -> web.Response:
        params = await request.json()
        with self._lock:
            self.online_calls.append(("anthropic", params["model"]))
        return web.json_response(self._message(params))
