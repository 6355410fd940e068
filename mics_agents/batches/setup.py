"""Putting a batched run together: which models go through batches, at what price, and the searcher whose
batched models share one queue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..runner import MicsWorker
from .wire import BatchRoute

if TYPE_CHECKING:
    from ..config import Settings
    from .queue import BatchQueue

__all__ = ["batch_routes", "open_batch_worker", "BatchWorker"]

OPENAI_API = "https://api.openai.com/v1"
ANTHROPIC_API = "https://api.anthropic.com"
_ROLE_WORDS = {"mentors": "mentors", "mentor": "mentors", "interns": "interns", "intern": "interns", "judge": "judge"}


def _listed_prices(name: str, factor: float) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Online and batch USD per token from LiteLLM's table (read without importing LiteLLM); the batch price
    is the table's own where it lists one, else ``factor`` times the online price."""
    from ..models.providers import _bundled_price_table

    table = _bundled_price_table()
    entry = table.get(name) or table.get(name.partition("/")[2])
    if not isinstance(entry, dict):
        return None
    online = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
    if not all(isinstance(price, (int, float)) for price in online):
        return None
    batched = entry.get("input_cost_per_token_batches"), entry.get("output_cost_per_token_batches")
    if not all(isinstance(price, (int, float)) for price in batched):
        batched = (online[0] * factor, online[1] * factor)
    return (float(online[0]), float(online[1])), (float(batched[0]), float(batched[1]))


def _route(name: str, settings: "Settings") -> BatchRoute | None:
    from ..models.providers import configured_api_base

    provider, _, wire = name.partition("/")
    if provider not in ("openai", "anthropic") or not wire:
        return None
    endpoint = configured_api_base(provider) or (OPENAI_API if provider == "openai" else ANTHROPIC_API)
    own = settings.prices_for(name)
    if own is not None:
        online, batched = own, (own[0] * settings.batch_price_factor, own[1] * settings.batch_price_factor)
    else:
        listed = _listed_prices(name, settings.batch_price_factor)
        online, batched = listed if listed is not None else ((0.0, 0.0), (0.0, 0.0))
    return BatchRoute(provider, endpoint, wire, online, batched,  # type: ignore[arg-type]
                      anthropic_max_tokens=settings.batch_anthropic_max_tokens)


def batch_routes(settings: "Settings", router: Any = None) -> dict[str, BatchRoute]:
    """The run's models that go through batches (``MICS_BATCH_MODELS``), each with its route. A role word
    takes the role's ``openai/`` models on OpenAI's own API and its ``anthropic/`` models; a name given
    explicitly is batched on any base URL, and one whose provider has no batch API is a :class:`ConfigError`."""
    from ..models.providers import _is_public_api, configured_api_base, router_model_names

    roles = {"mentors": settings.search_mentors, "interns": list(settings.interns), "judge": [settings.judge]}
    everyone = {name for names in roles.values() for name in names}
    routed = router_model_names(router) if router is not None else set()
    chosen: dict[str, BatchRoute] = {}
    for entry in settings.batch_models:
        word = _ROLE_WORDS.get(entry.lower())
        if word is not None:
            for name in roles[word]:
                route = None if name in routed else _route(name, settings)
                if route is None:
                    continue
                base = configured_api_base("openai")
                if route.provider == "openai" and base and not _is_public_api("openai", base):
                    continue  # a server of one's own under openai/: batched only when named
                chosen[name] = route
            continue
        if entry not in everyone:
            raise ConfigError(f"MICS_BATCH_MODELS names {entry!r}, which is not a mentor, intern or judge of this run "
                              "(give role words: mentors, interns, judge, or model names as configured)")
        route = None if entry in routed else _route(entry, settings)
        if route is None:
            raise ConfigError(f"MICS_BATCH_MODELS names {entry!r}, which has no batch API here: only openai/ and "
                              "anthropic/ models (not Router names) go through batches. Remove it to keep it online.")
        chosen[entry] = route
    return chosen


class BatchWorker(MicsWorker):
    """The MICS worker of a batched run: its ``batches`` queue is the one the runner marks items for."""

    def __init__(self, searcher: Any, batches: "BatchQueue") -> None:
        super().__init__(searcher)
        self.batches = batches

    async def aclose(self) -> None:
        try:
            await self.batches.aclose()
        finally:
            await self.searcher.aclose()


async def open_batch_worker(
    settings: "Settings",
    *,
    run_id: str,
    output: Path,
    no_wait: bool = False,
    resubmit_canceled: bool = False,
    on_event: Callable[[str], None] | None = None,
) -> BatchWorker:
    """A searcher whose batched models queue their calls, and the queue (re-attached to the batches an
    earlier session of this output left open). What :meth:`Searcher.open` does, with batched models."""
    from ..models.factory import open_model, open_router
    from ..models.providers import check_credentials, import_litellm, needs_litellm
    from ..search import Searcher
    from ..store import Store
    from .ledger import BatchLedger, ledger_path
    from .model import BatchedModel
    from .queue import BatchQueue

    settings = settings.check_roles()
    if not settings.cache_path:
        raise ConfigError("--batch needs the cache (MICS_CACHE_PATH or --cache): batch results are kept there")
    names = [*settings.search_mentors, *settings.interns, settings.judge]
    if needs_litellm(names, settings.transport, settings.router_config):
        await asyncio.to_thread(import_litellm)
    router = open_router(settings)
    routes = batch_routes(settings, router)
    await asyncio.to_thread(check_credentials, names, router)
    store = await Store.open(settings.cache_path)
    try:
        ledger = await BatchLedger.open(ledger_path(output))
    except BaseException:
        await store.close()
        raise
    queue = BatchQueue(ledger, store, settings, run_id=run_id, no_wait=no_wait,
                       resubmit_canceled=resubmit_canceled, on_event=on_event)
    models: dict[str, Any] = {}

    def model(name: str) -> Any:
        if name not in models:
            online = open_model(name, settings, router=router)
            route = routes.get(name)
            models[name] = online if route is None else BatchedModel(
                name, queue, route, online, namespace=settings.cache_namespace_for(name))
        return models[name]

    try:
        searcher = Searcher(
            mentors=[model(name) for name in settings.search_mentors],
            interns=[model(name) for name in settings.interns],
            judge=model(settings.judge),
            settings=settings, store=store, owns_store=True, run_id=run_id,
        )
        await queue.start()
    except BaseException:
        for opened in models.values():
            await opened.aclose()
        await queue.aclose()
        await store.close()
        raise
    if routes:
        queue.on_event("batched: " + ", ".join(f"{name} ({route.provider} at {route.endpoint})"
                                               for name, route in routes.items()))
    return BatchWorker(searcher, queue)
