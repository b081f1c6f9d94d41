"""One OpenTelemetry span per call and the GenAI client metrics, named by the semantic-convention constants.

Only reads what the guard decided. With no OTel SDK configured the API hands out non-recording spans and no-op
instruments, so nothing breaks and nothing is printed.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as ga
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as gm
from opentelemetry.semconv.attributes import error_attributes, server_attributes
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from .calls import CallRequest, Usage
from .money import micros_to_usd

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = ["ATTR_COST", "ATTR_DECISION", "ATTR_ESTIMATED_COST", "ATTR_REMAINING", "Telemetry"]

ATTR_COST = "tokenbudget.cost_usd"
ATTR_ESTIMATED_COST = "tokenbudget.estimated_cost_usd"
ATTR_DECISION = "tokenbudget.decision"
ATTR_REMAINING = "tokenbudget.budget.remaining_usd"
ATTR_ORIGINAL_MODEL = "tokenbudget.original_model"
ATTR_BUDGET = "tokenbudget.budget.scope"
ATTR_STATUS = "tokenbudget.status"
ATTR_TEAM = "tokenbudget.team"
ATTR_USER = "tokenbudget.user"
ATTR_FUNCTION = "tokenbudget.function"
COST_METRIC = "tokenbudget.cost"

_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)

_VERSION = "0.1.0"

_METRIC_CACHE_SIZE = 1024
_MetricSets = tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]


class Telemetry:
    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        capture_content: bool = False,
    ) -> None:
        self.capture_content = capture_content
        self._tracer = trace.get_tracer("tokenbudget", _VERSION, tracer_provider=tracer_provider)
        meter = metrics.get_meter("tokenbudget", _VERSION, meter_provider=meter_provider)
        self._tokens = meter.create_histogram(
            gm.GEN_AI_CLIENT_TOKEN_USAGE, unit="{token}", description="Tokens used per call, by gen_ai.token.type",
            explicit_bucket_boundaries_advisory=list(_TOKEN_BUCKETS),
        )
        self._duration = meter.create_histogram(
            gm.GEN_AI_CLIENT_OPERATION_DURATION, unit="s", description="Duration of GenAI client operations",
            explicit_bucket_boundaries_advisory=list(_DURATION_BUCKETS),
        )
        self._cost = _cost_totals(meter_provider or metrics.get_meter_provider(), meter)
        self._metric_cache: dict[tuple[Any, ...], _MetricSets] = {}

    def start(self, request: CallRequest) -> Span:
        attrs: dict[str, Any] = {
            ga.GEN_AI_OPERATION_NAME: request.operation,
            ga.GEN_AI_PROVIDER_NAME: request.provider,
            ga.GEN_AI_REQUEST_MODEL: request.model,
            ga.GEN_AI_REQUEST_STREAM: request.stream,
        }
        if request.max_output_tokens is not None:
            attrs[ga.GEN_AI_REQUEST_MAX_TOKENS] = request.max_output_tokens
        if request.server_address:
            attrs[server_attributes.SERVER_ADDRESS] = request.server_address
            if request.server_port:
                attrs[server_attributes.SERVER_PORT] = request.server_port
        if self.capture_content:
            attrs.update(_content_attributes(request))
        try:
            return self._tracer.start_span(f"{request.operation} {request.model}", kind=SpanKind.CLIENT,
                                           attributes=attrs)
        except Exception:  # a broken span processor must not break the call: go on without a span
            logging.getLogger("tokenbudget").exception("tokenbudget could not start a span")
            return trace.INVALID_SPAN

    def finish(
        self,
        span: Span,
        request: CallRequest,
        *,
        usage: Usage | None,
        cost_micros: int,
        estimated_micros: int,
        decision: str,
        status: str,
        remaining_micros: int | None,
        original_model: str | None,
        principal_attrs: Mapping[str, str],
        duration_s: float,
        error: BaseException | None = None,
        budget_scope: str | None = None,
        output: Any = None,
    ) -> None:
        response_model = usage.response_model if usage is not None else None
        error_type = _error_type(error) if error is not None else None
        key, sets = self._metric_sets(request, response_model or None, error_type, principal_attrs)
        self._duration.record(duration_s, sets[0])
        if usage is not None:
            self._tokens.record(usage.input_tokens, sets[1])
            if request.operation != "embeddings":
                self._tokens.record(usage.output_tokens, sets[2])
        if cost_micros:
            self._cost.add(key, sets[3], cost_micros)

        if not span.is_recording():
            span.end()
            return
        attrs: dict[str, Any] = {
            ATTR_COST: micros_to_usd(cost_micros),
            ATTR_ESTIMATED_COST: micros_to_usd(estimated_micros),
            ATTR_DECISION: decision,
            ATTR_STATUS: status,
            **principal_attrs,
        }
        if remaining_micros is not None:
            attrs[ATTR_REMAINING] = micros_to_usd(remaining_micros)
        # The guard may have changed these since the span started (downgrade, clamp).
        if original_model:
            attrs[ATTR_ORIGINAL_MODEL] = original_model
            attrs[ga.GEN_AI_REQUEST_MODEL] = request.model
            span.update_name(f"{request.operation} {request.model}")
        if decision == "clamp" and request.max_output_tokens is not None:
            attrs[ga.GEN_AI_REQUEST_MAX_TOKENS] = request.max_output_tokens
        if budget_scope:
            attrs[ATTR_BUDGET] = budget_scope
        if usage is not None:
            attrs[ga.GEN_AI_USAGE_INPUT_TOKENS] = usage.input_tokens
            attrs[ga.GEN_AI_USAGE_OUTPUT_TOKENS] = usage.output_tokens
            attrs[ga.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = usage.cache_read_tokens
            attrs[ga.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS] = usage.cache_write_tokens + usage.cache_write_1h_tokens
            if usage.reasoning_tokens:
                attrs[ga.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = usage.reasoning_tokens
            if usage.response_model:
                attrs[ga.GEN_AI_RESPONSE_MODEL] = usage.response_model
            if usage.response_id:
                attrs[ga.GEN_AI_RESPONSE_ID] = usage.response_id
            if usage.finish_reasons:
                attrs[ga.GEN_AI_RESPONSE_FINISH_REASONS] = list(usage.finish_reasons)
        if output is not None and self.capture_content:
            attrs[ga.GEN_AI_OUTPUT_MESSAGES] = _content_text(output)
        if error is not None:
            attrs[error_attributes.ERROR_TYPE] = error_type
            span.set_status(Status(StatusCode.ERROR, _safe_message(error)))
        span.set_attributes(attrs)
        span.end()

    def _metric_sets(
        self, request: CallRequest, response_model: str | None, error_type: str | None,
        principal_attrs: Mapping[str, str],
    ) -> tuple[tuple[Any, ...], _MetricSets]:
        """The four metric attribute dicts of a call, built once per distinct key and then reused as-is.

        The dicts are shared between calls, so they are never mutated after they are built.
        """
        key = (request.operation, request.provider, request.model, response_model, request.server_address or None,
               error_type, *principal_attrs.items())
        sets = self._metric_cache.get(key)
        if sets is None:
            base: dict[str, Any] = {
                ga.GEN_AI_OPERATION_NAME: request.operation,
                ga.GEN_AI_PROVIDER_NAME: request.provider,
                ga.GEN_AI_REQUEST_MODEL: request.model,
            }
            if response_model:
                base[ga.GEN_AI_RESPONSE_MODEL] = response_model
            if request.server_address:
                base[server_attributes.SERVER_ADDRESS] = request.server_address
            if error_type is not None:
                base[error_attributes.ERROR_TYPE] = error_type
            sets = (
                base,
                {**base, ga.GEN_AI_TOKEN_TYPE: "input"},
                {**base, ga.GEN_AI_TOKEN_TYPE: "output"},
                {**base, **principal_attrs},
            )
            if len(self._metric_cache) >= _METRIC_CACHE_SIZE:
                self._metric_cache.clear()
            self._metric_cache[key] = sets
        return key, sets

    def refused(self, span: Span, error: BaseException, *, decision: str, estimated_micros: int) -> None:
        """A call stopped before sending: the span says why, and nothing was charged."""
        try:
            self._refused(span, error, decision=decision, estimated_micros=estimated_micros)
        except Exception:  # a broken span processor must not replace the caller's error with its own
            logging.getLogger("tokenbudget").exception("tokenbudget could not finish a span")

    def _refused(self, span: Span, error: BaseException, *, decision: str, estimated_micros: int) -> None:
        if span.is_recording():
            span.set_attributes(
                {
                    error_attributes.ERROR_TYPE: _error_type(error),
                    ATTR_DECISION: decision,
                    ATTR_STATUS: "denied",
                    ATTR_COST: 0.0,
                    ATTR_ESTIMATED_COST: micros_to_usd(estimated_micros),
                }
            )
            span.set_status(Status(StatusCode.ERROR, _safe_message(error)))
        span.end()


class _CostTotals:
    """``tokenbudget.cost`` as an asynchronous counter over totals kept here, in exact micro-dollars.

    A synchronous counter's ``add`` copies, validates and hashes its eight attributes on every call (~10 µs, a tenth
    of the guard's own cost); adding an int to a dict entry costs well under a microsecond, and the SDK reads the
    totals only when a reader collects. Exported exactly as before: a monotonic sum in USD per attribute set. One
    set of totals per meter provider, shared by every guard, so two guards never report the same series twice.
    """

    _LIMIT = 2000  # distinct attribute sets kept, as the SDK's default cardinality limit; the rest go to overflow
    _OVERFLOW: tuple[Any, ...] = ("otel.metric.overflow",)

    def __init__(self, meter: metrics.Meter) -> None:
        self._lock = threading.Lock()
        self._totals: dict[tuple[Any, ...], list[Any]] = {}
        meter.create_observable_counter(
            COST_METRIC, callbacks=[self._observe], unit="USD", description="Money charged to budgets"
        )

    def add(self, key: tuple[Any, ...], attributes: Mapping[str, Any], micros: int) -> None:
        with self._lock:
            entry = self._totals.get(key)
            if entry is None:
                if len(self._totals) >= self._LIMIT:
                    key, attributes = self._OVERFLOW, {"otel.metric.overflow": True}
                    entry = self._totals.get(key)
                if entry is None:
                    entry = self._totals[key] = [attributes, 0]
            entry[1] += micros

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            snapshot = [(attributes, micros) for attributes, micros in self._totals.values()]
        return [Observation(micros_to_usd(micros), attributes) for attributes, micros in snapshot]


_COST_TOTALS: dict[int, tuple[Callable[[], Any], _CostTotals]] = {}
_COST_TOTALS_LOCK = threading.Lock()


def _same(value: Any) -> Any:
    return value


def _cost_totals(provider: Any, meter: metrics.Meter) -> _CostTotals:
    """The totals of ``provider``, found by identity: providers need not be hashable (logfire's proxy is not)."""
    with _COST_TOTALS_LOCK:
        key = id(provider)
        hit = _COST_TOTALS.get(key)
        if hit is not None and hit[0]() is provider:
            return hit[1]
        totals = _CostTotals(meter)
        try:
            ref: Callable[[], Any] = weakref.ref(provider, lambda _r: _COST_TOTALS.pop(key, None))
        except TypeError:  # no weak references to it: keep it (providers live as long as the process anyway)
            ref = functools.partial(_same, provider)
        _COST_TOTALS[key] = (ref, totals)
        return totals


def _error_type(error: BaseException) -> str:
    return type(error).__qualname__


def _safe_message(error: BaseException) -> str:
    """Vendor error bodies can echo the request; keep the status line only, never headers or prompt text."""
    status = getattr(error, "status_code", None)
    body = getattr(error, "body", None)
    if isinstance(status, int) or body is not None:  # an SDK's API error: its message is the vendor's own text
        kind = getattr(error, "type", None)
        if kind is None and isinstance(body, dict):
            inner = body.get("error", body)
            kind = inner.get("type") if isinstance(inner, dict) else None
        parts = [type(error).__qualname__]
        if isinstance(status, int):
            parts.append(f"HTTP {status}")
        if isinstance(kind, str) and kind.isidentifier() and len(kind) <= 64:
            parts.append(kind)
        return " ".join(parts)
    text = str(error)
    return text if len(text) <= 200 else text[:200] + "..."


def _content_attributes(request: CallRequest) -> dict[str, str]:
    """Prompt content, only when the user opted in with ``capture_content=True`` (it may hold secrets or PII)."""
    body = request.body
    out: dict[str, str] = {}
    for field, attr in (("messages", ga.GEN_AI_INPUT_MESSAGES), ("input", ga.GEN_AI_INPUT_MESSAGES),
                        ("prompt", ga.GEN_AI_INPUT_MESSAGES), ("system", ga.GEN_AI_SYSTEM_INSTRUCTIONS),
                        ("instructions", ga.GEN_AI_SYSTEM_INSTRUCTIONS)):  # fmt: skip
        value = body.get(field)
        if value is not None and attr not in out:
            out[attr] = _content_text(value)
    return out


_MAX_CONTENT = 100_000  # characters per attribute: one huge prompt must not become a multi-megabyte span


def _content_text(value: Any) -> str:
    """Content as the JSON text a span attribute carries, in the vendor's own shape, cut at :data:`_MAX_CONTENT`."""
    import json

    try:
        return json.dumps(value, default=str, ensure_ascii=False)[:_MAX_CONTENT]
    except (TypeError, ValueError):
        return str(value)[:_MAX_CONTENT]
