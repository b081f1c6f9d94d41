"""The OTel floor: a wrapper that makes only the OpenTelemetry SDK calls tokenbudget makes per call, nothing else.

No estimate, no ledger, no price, no usage parsing: one CLIENT span started with the request attributes tokenbudget
sets, made current for the call, given the end attributes tokenbudget sets (fixed values, same count and types),
and ended; plus the three semantic-convention histogram records (duration, input tokens, output tokens). Its cost
over bare is what the OTel SDK alone charges for tokenbudget's telemetry, the part of tokenbudget's own cost that no
change to tokenbudget can remove while the spans and metrics stay as they are. Streams: the span ends when
``request`` returns, before the stream is read (a floor, not a copy of stream metering).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

_ATTRS_START: dict[str, Any] = {
    "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
    "gen_ai.request.stream": False, "gen_ai.request.max_tokens": 256, "server.address": "127.0.0.1",
    "server.port": 8080,
}  # fmt: skip
_ATTRS_END: dict[str, Any] = {
    "tokenbudget.cost_usd": 0.000123, "tokenbudget.estimated_cost_usd": 0.000456, "tokenbudget.decision": "allow",
    "tokenbudget.status": "ok", "tokenbudget.user": "bench", "tokenbudget.budget.remaining_usd": 999.5,
    "gen_ai.usage.input_tokens": 110, "gen_ai.usage.output_tokens": 12,
    "gen_ai.usage.cache_read.input_tokens": 0, "gen_ai.usage.cache_creation.input_tokens": 0,
    "gen_ai.response.model": "gpt-4o-mini", "gen_ai.response.id": "chatcmpl-1",
    "gen_ai.response.finish_reasons": ["stop"],
}  # fmt: skip
_METRIC_BASE = {
    "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
    "gen_ai.response.model": "gpt-4o-mini", "server.address": "127.0.0.1",
}  # fmt: skip
_METRIC_IN = {**_METRIC_BASE, "gen_ai.token.type": "input"}
_METRIC_OUT = {**_METRIC_BASE, "gen_ai.token.type": "output"}

_TARGETS = (
    ("openai._base_client", "SyncAPIClient"), ("openai._base_client", "AsyncAPIClient"),
    ("anthropic._base_client", "SyncAPIClient"), ("anthropic._base_client", "AsyncAPIClient"),
)  # fmt: skip


class OtelFloor:
    def __init__(self) -> None:
        from opentelemetry import context, metrics, trace

        self._context, self._trace = context, trace
        self._tracer = trace.get_tracer("otel-floor")
        meter = metrics.get_meter("otel-floor")
        self._duration = meter.create_histogram("gen_ai.client.operation.duration", unit="s")
        self._tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}")
        self._originals: list[tuple[Any, Any]] = []

    def _start(self) -> tuple[Any, Any, float]:
        span = self._tracer.start_span("chat gpt-4o-mini", kind=self._trace.SpanKind.CLIENT, attributes=_ATTRS_START)
        token = self._context.attach(self._trace.set_span_in_context(span))
        return span, token, time.perf_counter()

    def _end(self, span: Any, token: Any, started: float) -> None:
        self._context.detach(token)
        self._duration.record(time.perf_counter() - started, _METRIC_BASE)
        self._tokens.record(110, _METRIC_IN)
        self._tokens.record(12, _METRIC_OUT)
        span.set_attributes(_ATTRS_END)
        span.end()

    def _sync(self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        span, token, started = self._start()
        try:
            return wrapped(*args, **kwargs)
        finally:
            self._end(span, token, started)

    async def _async(self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        span, token, started = self._start()
        try:
            return await wrapped(*args, **kwargs)
        finally:
            self._end(span, token, started)

    def enable(self) -> None:
        import importlib

        import wrapt

        for module, cls in _TARGETS:
            owner = getattr(importlib.import_module(module), cls)
            self._originals.append((owner, owner.__dict__["request"]))
            wrapt.wrap_function_wrapper(owner, "request", self._async if cls.startswith("Async") else self._sync)

    def disable(self) -> None:
        for owner, original in self._originals:
            owner.request = original
        self._originals.clear()
