"""The LiteLLM transport: any provider string (``openai/gpt-4o``, ``gemini/...``, ``hosted_vllm/...``) sent
with ``litellm.acompletion``, or through a ``litellm.Router`` when its ``model_list`` has the name.

One attempt per call, under the transport's total deadline; LiteLLM's own retries are off, since the
retrying wrapper does them once, with backoff, jitter and Retry-After. A parameter a model refuses (an
o-series model and a temperature other than 1) is named once in a log line and then dropped by LiteLLM
(``drop_params``), instead of failing every call.
"""

from __future__ import annotations

import logging
from typing import Any

from .base import ModelRequest, ModelResponse
from .providers import cost_of, import_litellm, resolve_api_base, router_deployments, router_model_names
from .transport import Transport, choice_responses

__all__ = ["LiteLLMTransport"]


class LiteLLMTransport(Transport):
    """A model reached through ``litellm.acompletion``, or through ``router`` when it routes this name."""

    def __init__(
        self, name: str, *, timeout: float, router: Any | None = None, prices: tuple[float, float] | None = None
    ) -> None:
        super().__init__(name, timeout=timeout)
        self.prices = prices  # MICS_PRICES for this name, else LiteLLM's own price
        self.router = router if router is not None and name in router_model_names(router) else None
        self._api_bases: list[str | None] | None = None
        self._drop_params = False  # set once LiteLLM says this model refuses a parameter we send

    def endpoint_bases(self) -> list[str | None]:
        if self._api_bases is None:
            if self.router is not None:
                self._api_bases = [
                    resolve_api_base(params.get("model", self.name), params.get("api_base"))
                    for deployment in router_deployments(self.router)
                    if deployment["model_name"] == self.name
                    for params in [deployment.get("litellm_params") or {}]
                ]
            else:
                self._api_bases = [resolve_api_base(self.name)]
        return self._api_bases

    async def _complete(self, arguments: dict[str, Any]) -> Any:
        if self.router is not None:
            return await self.router.acompletion(**arguments)
        return await import_litellm().acompletion(**arguments)

    def _is_transient(self, exc: BaseException) -> bool:
        litellm = import_litellm()
        return isinstance(
            exc,
            (
                litellm.RateLimitError,
                litellm.Timeout,
                litellm.APIConnectionError,
                litellm.InternalServerError,
                litellm.ServiceUnavailableError,
                litellm.BadGatewayError,
                litellm.APIResponseValidationError,
            ),
        )

    async def _send(self, request: ModelRequest, timeout: float) -> ModelResponse:
        return (await self._complete_choices(request, 1, timeout))[0]

    async def _send_samples(self, request: ModelRequest, count: int, timeout: float) -> list[ModelResponse]:
        return await self._complete_choices(request, count, timeout)

    async def _complete_choices(self, request: ModelRequest, count: int, timeout: float) -> list[ModelResponse]:
        litellm = import_litellm()
        arguments: dict[str, Any] = {
            "model": self.name,
            "messages": request.openai_messages(),
            "temperature": request.temperature,
            "timeout": timeout,  # per read in the HTTP client; the whole attempt is bounded by the Transport
            "num_retries": 0,
            "max_retries": 0,
        }
        if request.max_tokens is not None:
            arguments["max_tokens"] = request.max_tokens
        if count > 1:
            arguments["n"] = count
        if self._drop_params:
            arguments["drop_params"] = True
        try:
            response = await self._complete(arguments)
        except litellm.UnsupportedParamsError as exc:
            if self._drop_params:
                raise
            # A reasoning model refusing a sampling temperature, say: say which parameter once per model,
            # then let LiteLLM drop what this model does not take, here and on every later call.
            self._drop_params = True
            reason = " ".join(str(exc).split()).removeprefix("litellm.UnsupportedParamsError: ")
            logging.getLogger("mics_agents").warning(
                "%s: %s Sending without it from now on (LiteLLM drop_params).", self.name, reason.split(" To drop")[0]
            )
            response = await self._complete({**arguments, "drop_params": True})
        usage = getattr(response, "usage", None)
        input_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        output_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        prices = self.prices
        total = cost_of(litellm, response) if prices is None else 0.0

        def price(tokens_in: int, tokens_out: int) -> float:
            if prices is not None:
                return tokens_in * prices[0] + tokens_out * prices[1]
            # LiteLLM's price of the whole reply, shared out over the samples by their tokens.
            tokens = input_tokens + output_tokens
            return total * (tokens_in + tokens_out) / tokens if tokens else total / count

        return choice_responses(
            self.name, list(getattr(response, "choices", None) or []), count,
            input_tokens=input_tokens, output_tokens=output_tokens, price=price,
        )
