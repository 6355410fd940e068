"""The one place models are put together from settings: a transport for the name, and the wrappers.

    CachedModel(ValidatingModel(SanitizingModel(RetryingModel(LimitingModel(transport)))))

- the transport sends one attempt under a total deadline: :class:`~.direct.DirectTransport` for
  ``hosted_vllm/`` (and ``openai/`` on a base URL other than OpenAI's own API) unless
  ``MICS_TRANSPORT=litellm``, else :class:`~.litellm_model.LiteLLMTransport` (through the Router config when
  it routes the name). LiteLLM is imported only when a model goes through it;
- the limiting wrapper holds a slot for each attempt only, so a call backing off holds none;
- the retrying wrapper tries again after errors that may pass;
- the sanitizing wrapper masks secret values in a reply and repairs text UTF-8 cannot encode, so what is
  graded, cached and written is the same safe text;
- the validating wrapper refuses a reply the request's validator refuses, before the cache sees it;
- the caching wrapper answers repeated calls from the store.

Missing provider keys are reported here, before any call (:func:`~.providers.check_credentials`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Model
from .cached import CachedModel
from .limits import LimitingModel
from .retrying import RetryingModel
from .sanitizing import SanitizingModel
from .validating import ValidatingModel

if TYPE_CHECKING:
    from ..config import Settings
    from ..store import Store
    from .transport import Transport

__all__ = ["open_model", "open_models", "with_store", "open_router"]


def open_router(settings: "Settings") -> Any:
    """The ``litellm.Router`` of ``MICS_ROUTER_CONFIG``, or None."""
    from .providers import load_router

    return load_router(settings.router_config) if settings.router_config else None


def _transport(name: str, settings: "Settings", router: Any) -> "Transport":
    """The transport for ``name``, with ``supports_n`` set where its endpoint takes several samples in one
    request: Router deployments that all declare ``model_info: {supports_n: true}``, and ``hosted_vllm/``
    servers (vLLM takes ``n``)."""
    transport = _choose_transport(name, settings, router)
    if router is not None and name in _routed(router):
        from .providers import declares_n

        transport.supports_n = declares_n(router, name)
    else:
        transport.supports_n = name.startswith("hosted_vllm/")
    return transport


def _routed(router: Any) -> set[str]:
    from .providers import router_model_names

    return router_model_names(router)


def _choose_transport(name: str, settings: "Settings", router: Any) -> "Transport":
    prices = settings.prices_for(name)
    if router is not None:
        if name in _routed(router):
            if settings.transport != "litellm":
                from .direct import DirectTransport, direct_replicas

                replicas = direct_replicas(router, name)
                if replicas is not None:  # replicas of a server of one's own: one case, one replica
                    # LiteLLM 1.110 keeps them in router.settings() (the attributes are deprecated).
                    router_settings = router.settings() if callable(getattr(router, "settings", None)) else router
                    allowed_fails = getattr(router_settings, "allowed_fails", None)
                    return DirectTransport(
                        name, replicas, timeout=settings.request_timeout, prices=prices,
                        cooldown=float(getattr(router_settings, "cooldown_time", None) or 5.0),
                        allowed_fails=allowed_fails if isinstance(allowed_fails, int) else 3,
                        media_dir=settings.media_dir,
                    )
            from .litellm_model import LiteLLMTransport

            return LiteLLMTransport(name, timeout=settings.request_timeout, router=router, prices=prices)
    if settings.transport != "litellm":  # "auto" (and "direct", its old name)
        from .direct import DirectTransport, direct_endpoint

        endpoint = direct_endpoint(name)
        if endpoint is not None:
            from .providers import listed_prices

            # Without MICS_PRICES, priced as LiteLLM would price it (so --budget-usd stops alike), looked up when
            # a reply is first priced.
            return DirectTransport(name, endpoint, timeout=settings.request_timeout, prices=prices,
                                   media_dir=settings.media_dir, price_lookup=lambda: listed_prices(name))
    from .litellm_model import LiteLLMTransport

    return LiteLLMTransport(name, timeout=settings.request_timeout, prices=prices)


def open_model(name: str, settings: "Settings", *, router: Any = None) -> Model:
    """The uncached model ``name``: its transport, limited and retried as ``settings`` say. Add validation
    and the cache with :func:`with_store` (the Searcher does that itself)."""
    limited = LimitingModel(
        _transport(name, settings, router),
        limit=settings.concurrency_for(name),
        overall=settings.max_calls_in_flight,
        adaptive=settings.adaptive_concurrency,
    )
    return RetryingModel(
        limited,
        max_retries=settings.max_retries,
        initial_wait=settings.retry_initial_wait,
        max_wait=settings.retry_max_wait,
        max_retry_after=settings.max_retry_after,
    )


def with_store(model: Model, store: "Store | None", *, run_id: str | None = None, namespace: str = "") -> Model:
    """``model`` with replies sanitized and validated, and cached in ``store`` if there is one."""
    validated = ValidatingModel(SanitizingModel(model))
    if store is None:
        return validated
    return CachedModel(validated, store, run_id=run_id, namespace=namespace)


def open_models(
    names: list[str],
    settings: "Settings",
    store: "Store | None" = None,
    *,
    run_id: str | None = None,
    namespace: str | None = None,
) -> list[Model]:
    """Models for these names, validated and cached in ``store`` if given. ``namespace``: their cache
    namespace (default: ``MICS_CACHE_NAMESPACE`` for each name). Raises :class:`ConfigError` for a missing
    provider key before anything is sent."""
    from .providers import check_credentials

    router = open_router(settings)
    check_credentials(names, router)
    return [
        with_store(
            open_model(name, settings, router=router),
            store,
            run_id=run_id,
            namespace=settings.cache_namespace_for(name) if namespace is None else namespace,
        )
        for name in names
    ]
