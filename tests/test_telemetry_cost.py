"""``tokenbudget.cost`` is an observable counter over exact micro-dollar totals kept in-process."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tokenbudget.calls import CallRequest, Usage
from tokenbudget.telemetry import COST_METRIC, Telemetry, _CostTotals


def _points(reader: InMemoryMetricReader) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return [p for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            if m.name == COST_METRIC for p in m.data.data_points]  # fmt: skip


def _finish(t: Telemetry, user: str, micros: int) -> None:
    req = CallRequest(provider="openai", operation="chat", model="gpt-4o-mini", body={}, stream=False,
                      max_output_tokens=10, server_address="127.0.0.1", server_port=80, api="openai")
    t.finish(t.start(req), req, usage=Usage(input_tokens=1, output_tokens=1), cost_micros=micros, estimated_micros=1,
             decision="allow", status="ok", remaining_micros=None, original_model=None,
             principal_attrs={"tokenbudget.user": user}, duration_s=0.1)


def test_totals_are_exact_sums_of_micro_dollars() -> None:
    reader = InMemoryMetricReader()
    t = Telemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    for _ in range(10):
        _finish(t, "ann", 100_000)  # ten times $0.1: float adds would give 0.9999999999999999
    (point,) = _points(reader)
    assert point.value == 1.0 and point.attributes["tokenbudget.user"] == "ann"


def test_two_guards_on_one_provider_report_one_series_per_caller() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    first, second = Telemetry(meter_provider=provider), Telemetry(meter_provider=provider)
    _finish(first, "ann", 3)
    _finish(second, "ann", 4)
    _finish(second, "bob", 5)
    by_user = {p.attributes["tokenbudget.user"]: p.value for p in _points(reader)}
    assert by_user == {"ann": 7e-6, "bob": 5e-6}


def test_attribute_sets_beyond_the_limit_are_summed_under_overflow() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    totals = _CostTotals(provider.get_meter("t"))
    for i in range(_CostTotals._LIMIT + 5):
        totals.add(("k", i), {"i": i}, 1)
    points = _points(reader)
    assert len(points) == _CostTotals._LIMIT + 1
    (overflow,) = [p for p in points if p.attributes.get("otel.metric.overflow")]
    assert overflow.value == 5e-6
    assert round(sum(p.value for p in points) * 1e6) == _CostTotals._LIMIT + 5


class _UnhashableProvider(MeterProvider):
    """Like logfire's proxy meter provider: defines equality, so it has no hash."""

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = None  # type: ignore[assignment]


def test_a_meter_provider_without_a_hash_still_gets_its_totals() -> None:
    reader = InMemoryMetricReader()
    provider = _UnhashableProvider(metric_readers=[reader])
    first, second = Telemetry(meter_provider=provider), Telemetry(meter_provider=provider)
    _finish(first, "ann", 3)
    _finish(second, "ann", 4)
    assert [p.value for p in _points(reader)] == [7e-6]
