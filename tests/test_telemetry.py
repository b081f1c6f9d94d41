"""Spans nest under the caller's span, metrics carry tokens/duration/cost, content stays out unless opted in."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
from opentelemetry import trace

import tokenbudget
from tokenbudget.testing import Reply, StandInServer

MSG = [{"role": "user", "content": "my secret prompt text"}]


def test_span_nests_under_current_span(guard: tokenbudget.Guard, openai_client: Any, otel: Any) -> None:
    tracer = trace.get_tracer("app")
    with tracer.start_as_current_span("agent step") as parent:
        openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    child = next(s for s in otel.spans() if s.name == "chat gpt-4o-mini")
    assert child.parent is not None and child.parent.span_id == parent.get_span_context().span_id
    assert child.context.trace_id == parent.get_span_context().trace_id


def test_metrics_tokens_duration_cost(
    guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer, otel: Any
) -> None:
    def total(name: str, **match: Any) -> float:
        pts = [p for p in otel.metric_points(name) if all(p.attributes.get(k) == v for k, v in match.items())]
        return sum(getattr(p, "sum", getattr(p, "value", 0)) for p in pts)

    before_in = total("gen_ai.client.token.usage", **{"gen_ai.token.type": "input", "gen_ai.request.model": "gpt-4o"})
    before_cost = total("tokenbudget.cost", **{"gen_ai.request.model": "gpt-4o", "tokenbudget.team": "search"})
    srv.reply = Reply(input_tokens=1000, output_tokens=100)
    with tokenbudget.scope(team="search", user="ann"):
        openai_client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert (
        total("gen_ai.client.token.usage", **{"gen_ai.token.type": "input", "gen_ai.request.model": "gpt-4o"})
        - before_in
        == 1000
    )
    assert total(
        "tokenbudget.cost", **{"gen_ai.request.model": "gpt-4o", "tokenbudget.team": "search"}
    ) - before_cost == pytest.approx(0.0035)  # $2.50 x 1000 + $10 x 100 per MTok
    durations = [
        p
        for p in otel.metric_points("gen_ai.client.operation.duration")
        if p.attributes.get("gen_ai.request.model") == "gpt-4o"
    ]
    assert durations and durations[0].count >= 1


def test_no_content_on_spans_by_default(guard: tokenbudget.Guard, openai_client: Any, otel: Any) -> None:
    openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    (span,) = otel.spans()
    assert "secret prompt" not in repr(dict(span.attributes or {}))


def test_content_on_spans_when_opted_in(openai_client: Any, otel: Any) -> None:
    tokenbudget.install({"ledger": "memory://", "capture_content": True})
    openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    (span,) = otel.spans()
    assert "secret prompt" in span.attributes["gen_ai.input.messages"]


def test_without_an_otel_sdk_nothing_breaks_and_nothing_is_printed(srv: StandInServer) -> None:
    code = textwrap.dedent(f"""
        import openai, tokenbudget
        g = tokenbudget.install(ledger="memory://", budget_usd=1)
        c = openai.OpenAI(base_url={srv.openai_base_url!r}, api_key="k", max_retries=0)
        c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "x"}}])
        print(sum(e.cost_micros for e in g.ledger.events()) > 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    assert out.stderr == ""
