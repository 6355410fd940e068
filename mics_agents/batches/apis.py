"""The two batch APIs behind one small interface: create a batch, look at it, list recent ones, read its
results, cancel it.

OpenAI's goes through the official ``openai`` client (files, then a batch over the uploaded file).
Anthropic's is three plain HTTP calls, spoken with httpx: the official ``anthropic`` client would be one
more dependency for them. Neither client retries on its own (``max_retries=0``): a create whose reply was
lost may have made a batch, so only the caller, which records what it sends and checks by listing before
it sends again, may repeat one.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import MicsError
from ..models.base import check_request_allowed
from ..models.transport import RETRYABLE_4XX

__all__ = ["BatchAPI", "BatchAPIError", "RemoteBatch", "OpenAIBatches", "AnthropicBatches", "open_batch_api",
           "METADATA_KEY"]

# The metadata key an OpenAI batch carries our batch key under: a restart finds the batch by it.
METADATA_KEY = "mics_batch"
# One HTTP call to a batch API (not the batch: that takes hours) may take this long.
CALL_TIMEOUT_S = 600.0
ANTHROPIC_VERSION = "2023-06-01"


class BatchAPIError(MicsError):
    """A batch API call failed. ``refused``: the provider said no (a 4xx that asking again would not change),
    so nothing was created; otherwise (a dropped connection, a timeout, a 5xx, a 429) it may have been."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def refused(self) -> bool:
        return self.status is not None and 400 <= self.status < 500 and self.status not in RETRYABLE_4XX


@dataclass
class RemoteBatch:
    """A batch as the provider shows it."""

    id: str
    status: str
    ended: bool
    created_at: float
    request_count: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    input_file_id: str | None = None
    counts: str = ""
    output_file_id: str | None = None
    error_file_id: str | None = None
    results_url: str | None = None
    errors: str = ""


class BatchAPI(ABC):
    provider: str

    def __init__(self, endpoint: str, api_key: str | None) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.api_key = api_key

    def _check_allowed(self) -> None:
        check_request_allowed(f"{self.provider} batches", [self.endpoint])

    @abstractmethod
    async def retrieve(self, batch_id: str) -> RemoteBatch: ...

    @abstractmethod
    def list_since(self, since: float) -> AsyncIterator[RemoteBatch]:
        """Batches created at or after ``since`` (epoch seconds), most recent first."""

    @abstractmethod
    def results(self, batch: RemoteBatch) -> AsyncIterator[dict[str, Any]]:
        """The batch's result lines as JSON objects (OpenAI: the output file, then the error file)."""

    @abstractmethod
    async def cancel(self, batch_id: str) -> None: ...

    async def aclose(self) -> None:  # noqa: B027 - optional
        pass


class OpenAIBatches(BatchAPI):
    provider = "openai"

    def __init__(self, endpoint: str, api_key: str | None) -> None:
        super().__init__(endpoint, api_key)
        import openai

        self._errors = openai
        self._client = openai.AsyncOpenAI(api_key=api_key or "unused", base_url=self.endpoint, max_retries=0,
                                          timeout=CALL_TIMEOUT_S)

    def _failed(self, doing: str, exc: Exception) -> BatchAPIError:
        status = getattr(exc, "status_code", None)
        text = " ".join(str(exc).split())[:300]
        return BatchAPIError(f"OpenAI batch API at {self.endpoint}: {doing} failed: {type(exc).__name__}"
                             f"{f' (HTTP {status})' if status else ''}: {text}",
                             status=status if isinstance(status, int) else None)

    async def upload(self, path: Path) -> str:
        """Upload a JSONL input file (purpose ``batch``); its file id."""
        self._check_allowed()
        try:
            uploaded = await self._client.files.create(file=path, purpose="batch")
        except self._errors.OpenAIError as exc:
            raise self._failed("uploading the input file", exc) from exc
        return str(uploaded.id)

    async def create(self, input_file_id: str, batch_key: str) -> RemoteBatch:
        self._check_allowed()
        try:
            batch = await self._client.batches.create(
                input_file_id=input_file_id, endpoint="/v1/chat/completions", completion_window="24h",
                metadata={METADATA_KEY: batch_key},
            )
        except self._errors.OpenAIError as exc:
            raise self._failed("creating the batch", exc) from exc
        return self._remote(batch)

    async def retrieve(self, batch_id: str) -> RemoteBatch:
        self._check_allowed()
        try:
            return self._remote(await self._client.batches.retrieve(batch_id))
        except self._errors.OpenAIError as exc:
            raise self._failed(f"looking at batch {batch_id}", exc) from exc

    async def list_since(self, since: float) -> AsyncIterator[RemoteBatch]:  # type: ignore[override]
        self._check_allowed()
        try:
            async for batch in self._client.batches.list(limit=100):
                remote = self._remote(batch)
                if remote.created_at < since:
                    return
                yield remote
        except self._errors.OpenAIError as exc:
            raise self._failed("listing batches", exc) from exc

    async def results(self, batch: RemoteBatch) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        self._check_allowed()
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            try:
                async with self._client.files.with_streaming_response.content(file_id) as response:
                    async for line in response.iter_lines():
                        if line.strip():
                            yield _json_line(line, f"file {file_id}")
            except self._errors.OpenAIError as exc:
                raise self._failed(f"reading file {file_id} of batch {batch.id}", exc) from exc

    async def cancel(self, batch_id: str) -> None:
        self._check_allowed()
        try:
            await self._client.batches.cancel(batch_id)
        except self._errors.OpenAIError as exc:
            raise self._failed(f"cancelling batch {batch_id}", exc) from exc

    @staticmethod
    def _remote(batch: Any) -> RemoteBatch:
        counts = batch.request_counts
        total = getattr(counts, "total", None) if counts is not None else None
        errors = getattr(batch, "errors", None)
        error_text = "; ".join(str(getattr(item, "message", "")) for item in (getattr(errors, "data", None) or []))
        return RemoteBatch(
            id=str(batch.id), status=str(batch.status),
            ended=batch.status in ("completed", "failed", "expired", "cancelled"),
            created_at=float(batch.created_at or 0), request_count=total,
            metadata=dict(batch.metadata or {}), input_file_id=batch.input_file_id,
            counts=(f"{counts.completed} done, {counts.failed} failed of {counts.total}" if counts is not None else ""),
            output_file_id=batch.output_file_id, error_file_id=batch.error_file_id, errors=error_text,
        )

    async def aclose(self) -> None:
        await self._client.close()


class AnthropicBatches(BatchAPI):
    provider = "anthropic"

    def __init__(self, endpoint: str, api_key: str | None) -> None:
        # Whatever LiteLLM's variable holds (https://api.anthropic.com, .../v1, .../v1/messages): the root.
        root = endpoint.rstrip("/")
        for tail in ("/v1/messages", "/v1"):
            if root.endswith(tail):
                root = root[: -len(tail)]
        super().__init__(root, api_key)
        import httpx

        self._httpx = httpx
        headers = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
        if api_key:
            headers["x-api-key"] = api_key
        self._client = httpx.AsyncClient(base_url=self.endpoint, headers=headers, timeout=CALL_TIMEOUT_S)

    async def _call(self, method: str, path: str, doing: str, **kwargs: Any) -> Any:
        self._check_allowed()
        try:
            response = await self._client.request(method, path, **kwargs)
        except self._httpx.HTTPError as exc:
            raise BatchAPIError(f"Anthropic batch API at {self.endpoint}: {doing} failed: {type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:300]}") from exc
        if response.status_code >= 400:
            raise BatchAPIError(f"Anthropic batch API at {self.endpoint}: {doing} failed (HTTP {response.status_code}): "
                                f"{' '.join(response.text.split())[:300]}", status=response.status_code)
        try:
            return response.json()
        except ValueError as exc:
            raise BatchAPIError(f"Anthropic batch API at {self.endpoint}: {doing}: the reply is not JSON") from exc

    async def create(self, requests: list[dict[str, Any]]) -> RemoteBatch:
        body = json.dumps({"requests": requests}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return self._remote(await self._call("POST", "/v1/messages/batches", "creating a message batch", content=body))

    async def retrieve(self, batch_id: str) -> RemoteBatch:
        return self._remote(await self._call("GET", f"/v1/messages/batches/{batch_id}", f"looking at batch {batch_id}"))

    async def list_since(self, since: float) -> AsyncIterator[RemoteBatch]:  # type: ignore[override]
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = await self._call("GET", "/v1/messages/batches", "listing message batches", params=params)
            for item in page.get("data") or []:
                remote = self._remote(item)
                if remote.created_at < since:
                    return
                yield remote
            if not page.get("has_more") or not page.get("last_id"):
                return
            params = {"limit": 100, "after_id": page["last_id"]}

    async def results(self, batch: RemoteBatch) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        self._check_allowed()
        url = batch.results_url or f"/v1/messages/batches/{batch.id}/results"
        if url.startswith("http"):
            check_request_allowed("anthropic batches", [url])
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code >= 400:
                    text = (await response.aread()).decode("utf-8", "replace")
                    raise BatchAPIError(f"Anthropic batch API: reading the results of {batch.id} failed (HTTP "
                                        f"{response.status_code}): {' '.join(text.split())[:300]}",
                                        status=response.status_code)
                async for line in response.aiter_lines():
                    if line.strip():
                        yield _json_line(line, f"the results of {batch.id}")
        except self._httpx.HTTPError as exc:
            raise BatchAPIError(f"Anthropic batch API: reading the results of {batch.id} failed: "
                                f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc

    async def cancel(self, batch_id: str) -> None:
        await self._call("POST", f"/v1/messages/batches/{batch_id}/cancel", f"cancelling batch {batch_id}")

    @staticmethod
    def _remote(item: Any) -> RemoteBatch:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise BatchAPIError("Anthropic batch API: a reply without a message batch in it")
        counts = item.get("request_counts") if isinstance(item.get("request_counts"), dict) else {}
        numbers = {name: int(value) for name, value in counts.items() if isinstance(value, int)}
        return RemoteBatch(
            id=item["id"], status=str(item.get("processing_status")), ended=item.get("processing_status") == "ended",
            created_at=_epoch(item.get("created_at")), request_count=sum(numbers.values()) if numbers else None,
            counts=", ".join(f"{value} {name}" for name, value in numbers.items() if value),
            results_url=item.get("results_url") if isinstance(item.get("results_url"), str) else None,
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _epoch(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return 0.0


def _json_line(line: str | bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise BatchAPIError(f"a line of {where} is not JSON: {str(line)[:120]!r}") from exc
    if not isinstance(value, dict):
        raise BatchAPIError(f"a line of {where} is not a JSON object")
    return value


def open_batch_api(provider: str, endpoint: str) -> BatchAPI:
    """The API client for a provider at ``endpoint``, signed with the provider's key variable."""
    if provider == "openai":
        return OpenAIBatches(endpoint, os.environ.get("OPENAI_API_KEY") or None)
    return AnthropicBatches(endpoint, os.environ.get("ANTHROPIC_API_KEY") or None)
