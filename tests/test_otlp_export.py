"""What an OpenTelemetry Collector receives: spans and metrics sent through the standard OTLP/HTTP exporters to a
local receiver, decoded from protobuf the way the Collector decodes them.

docs/otel-collector.md builds its spend-by-team-by-model and token queries on exactly these names and attributes.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import tokenbudget
from tokenbudget.testing import Reply, StandInServer


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        receiver: Receiver = self.server.receiver  # type: ignore[attr-defined]
        with receiver.lock:
            receiver.posts.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Receiver:
    """The OTLP/HTTP receiver of a Collector, reduced to "store what was POSTed"."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.posts: list[tuple[str, str, bytes]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.receiver = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def bodies(self, path: str) -> list[bytes]:
        with self.lock:
            return [b for p, ctype, b in self.posts if p == path and ctype == "application/x-protobuf"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.httpd.shutdown()
    r.httpd.server_close()


def attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        assert isinstance(kv, KeyValue)
        out[kv.key] = value(kv.value)
    return out


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(value(x) for x in v.array_value.values)
    return getattr(v, kind) if kind else None


def test_spans_and_metrics_reach_an_otlp_receiver(receiver: Receiver, srv: StandInServer) -> None:
    import anthropic
    import openai

    resource = Resource.create({"service.name": "checkout"})
    span_exporter = OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces", compression=Compression.Gzip)
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(SimpleSpanProcessor(span_exporter))
    metric_exporter = OTLPMetricExporter(endpoint=f"{receiver.endpoint}/v1/metrics")
    mp = MeterProvider(
        resource=resource, metric_readers=[PeriodicExportingMetricReader(metric_exporter, export_interval_millis=3.6e6)]
    )
    tokenbudget.install({"ledger": "memory://", "budget_usd": 5.0}, tracer_provider=tp, meter_provider=mp)
    try:
        oai = openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-test", max_retries=0)
        ant = anthropic.Anthropic(base_url=srv.anthropic_base_url, api_key="sk-ant-test", max_retries=0)
        srv.reply = Reply(input_tokens=1000, output_tokens=500, cached_tokens=200)
        with tokenbudget.scope(team="search", user="ann"):
            for _ in range(2):
                oai.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=600, messages=[{"role": "user", "content": "q"}]
                )
        srv.reply = Reply(input_tokens=2000, output_tokens=300)
        with tokenbudget.scope(team="research", user="dee"):
            ant.messages.create(model="claude-haiku-4-5", max_tokens=400, messages=[{"role": "user", "content": "q"}])
        assert mp.force_flush(timeout_millis=10_000)
        assert tp.force_flush(timeout_millis=10_000)
    finally:
        tokenbudget.uninstall()
        tp.shutdown()
        mp.shutdown()

    # -- traces: one span per call with the GenAI token attributes and the cost ---------------------------------
    spans = []
    for body in receiver.bodies("/v1/traces"):
        req = ExportTraceServiceRequest.FromString(body)
        for rs in req.resource_spans:
            assert attrs(rs.resource.attributes)["service.name"] == "checkout"
            for ss in rs.scope_spans:
                assert ss.scope.name == "tokenbudget"
                spans.extend(ss.spans)
    assert sorted(s.name for s in spans) == ["chat claude-haiku-4-5", "chat gpt-4o-mini", "chat gpt-4o-mini"]
    mini = attrs(next(s for s in spans if s.name == "chat gpt-4o-mini").attributes)
    cost_mini = (800 * 150_000 + 200 * 75_000 + 500 * 600_000 + 500_000) // 1_000_000  # $0.15 / $0.075 / $0.60 per M
    assert mini["gen_ai.provider.name"] == "openai"
    assert mini["gen_ai.request.model"] == "gpt-4o-mini"
    assert mini["gen_ai.usage.input_tokens"] == 1000
    assert mini["gen_ai.usage.output_tokens"] == 500
    assert mini["gen_ai.usage.cache_read.input_tokens"] == 200
    assert mini["tokenbudget.cost_usd"] == pytest.approx(cost_mini / 1e6)
    assert mini["tokenbudget.team"] == "search" and mini["tokenbudget.user"] == "ann"
    assert mini["tokenbudget.decision"] == "allow"
    haiku = attrs(next(s for s in spans if s.name == "chat claude-haiku-4-5").attributes)
    assert haiku["gen_ai.provider.name"] == "anthropic"
    assert (haiku["gen_ai.usage.input_tokens"], haiku["gen_ai.usage.output_tokens"]) == (2000, 300)
    cost_haiku = 2000 * 1 + 300 * 5  # $1 / $5 per M
    assert haiku["tokenbudget.cost_usd"] == pytest.approx(cost_haiku / 1e6)

    # -- metrics: the cost counter by provider/model/team/user, the token histogram by type -------------------------
    metrics: dict[str, Any] = {}
    for body in receiver.bodies("/v1/metrics"):
        req = ExportMetricsServiceRequest.FromString(body)
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    metrics[m.name] = m  # cumulative: the last export holds the totals
    cost = metrics["tokenbudget.cost"]
    assert cost.unit == "USD"
    assert cost.sum.is_monotonic
    team_model = ("tokenbudget.team", "gen_ai.provider.name", "gen_ai.request.model", "tokenbudget.user")
    by_team_model = {
        tuple(a[k] for k in team_model): p.as_double
        for p in cost.sum.data_points
        for a in [attrs(p.attributes)]
    }
    assert by_team_model == {
        ("search", "openai", "gpt-4o-mini", "ann"): pytest.approx(2 * cost_mini / 1e6),
        ("research", "anthropic", "claude-haiku-4-5", "dee"): pytest.approx(cost_haiku / 1e6),
    }
    tokens = metrics["gen_ai.client.token.usage"]
    assert tokens.unit == "{token}"
    sums = {
        (a["gen_ai.request.model"], a["gen_ai.token.type"]): (p.sum, p.count)
        for p in tokens.histogram.data_points
        for a in [attrs(p.attributes)]
    }
    assert sums == {
        ("gpt-4o-mini", "input"): (2000, 2), ("gpt-4o-mini", "output"): (1000, 2),
        ("claude-haiku-4-5", "input"): (2000, 1), ("claude-haiku-4-5", "output"): (300, 1),
    }  # fmt: skip
    assert list(tokens.histogram.data_points[0].explicit_bounds)[:3] == [1, 4, 16]
    assert "gen_ai.client.operation.duration" in metrics
