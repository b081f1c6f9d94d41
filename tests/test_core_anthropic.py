"""Issue 3 acceptance, Anthropic side: input excludes cache in the API but includes it on spans; cumulative deltas."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

import tokenbudget
from tokenbudget.testing import Fault, Reply, StandInServer

# claude-haiku-4-5: $1 / MTok input, $0.10 cache read, $1.25 5-minute cache write, $2 1-hour write, $5 output.


def haiku_micros(uncached: int, out: int, read: int = 0, w5: int = 0, w1h: int = 0) -> int:
    pico = uncached * 1_000_000 + read * 100_000 + w5 * 1_250_000 + w1h * 2_000_000 + out * 5_000_000
    return (pico + 500_000) // 1_000_000


MSG = [{"role": "user", "content": "hello"}]


def spent(guard: tokenbudget.Guard) -> int:
    return sum(e.cost_micros for e in guard.ledger.events())


def no_holds(guard: tokenbudget.Guard) -> None:
    assert guard.ledger.active_reservations(now=guard.clock.now()) == []


def test_messages_create_with_cache(
    guard: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer, otel: Any
) -> None:
    # Reply counts are totals: 1000 input of which 200 cache reads and 300 cache writes (100 of them 1-hour).
    srv.reply = Reply(
        text="hi",
        input_tokens=1000,
        output_tokens=500,
        cached_tokens=200,
        cache_creation_tokens=300,
        cache_creation_1h_tokens=100,
    )
    m = anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=1000, messages=MSG)
    assert m.usage.input_tokens == 500  # the API's own figure excludes cache tokens
    (span,) = otel.spans()
    a = span.attributes
    assert span.name == "chat claude-haiku-4-5"
    assert a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.usage.input_tokens"] == 1000  # the convention includes them
    assert a["gen_ai.usage.cache_read.input_tokens"] == 200
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 300
    assert a["gen_ai.usage.output_tokens"] == 500
    expected = haiku_micros(500, 500, read=200, w5=200, w1h=100)
    assert expected == 500 + 20 + 250 + 200 + 2500
    assert spent(guard) == expected
    assert a["tokenbudget.cost_usd"] == pytest.approx(expected / 1e6)
    no_holds(guard)


def test_stream_usage_is_cumulative_not_added(
    guard: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer, otel: Any
) -> None:
    srv.reply = Reply(text="one two three four", input_tokens=50, output_tokens=500)
    with anthropic_client.messages.create(
        model="claude-haiku-4-5", max_tokens=1000, messages=MSG, stream=True
    ) as stream:
        events = list(stream)
    assert events[-1].type == "message_stop"
    (span,) = otel.spans()
    assert span.attributes["gen_ai.usage.output_tokens"] == 500  # not 501 (message_start's 1 + delta's 500)
    assert spent(guard) == haiku_micros(50, 500)
    no_holds(guard)


def test_messages_stream_helper(guard: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer, otel: Any) -> None:
    srv.reply = Reply(text="streamed text", input_tokens=70, output_tokens=2)
    with anthropic_client.messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=MSG) as s:
        final = s.get_final_message()
    assert final.content[0].text == "streamed text"
    assert spent(guard) == haiku_micros(70, 2)
    assert len(otel.spans()) == 1
    no_holds(guard)


async def test_async_create_stream_and_helper(
    guard: tokenbudget.Guard, async_anthropic_client: Any, srv: StandInServer
) -> None:
    srv.reply = Reply(text="a b", input_tokens=10, output_tokens=2)
    await async_anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    stream = await async_anthropic_client.messages.create(
        model="claude-haiku-4-5", max_tokens=10, messages=MSG, stream=True
    )
    _ = [e async for e in stream]
    async with async_anthropic_client.messages.stream(model="claude-haiku-4-5", max_tokens=10, messages=MSG) as s:
        await s.get_final_message()
    assert [e.cost_micros for e in guard.ledger.events()] == [haiku_micros(10, 2)] * 3
    no_holds(guard)


def test_beta_messages(guard: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer) -> None:
    srv.reply = Reply(input_tokens=10, output_tokens=2)
    anthropic_client.beta.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    assert spent(guard) == haiku_micros(10, 2)


def test_one_span_per_call_even_with_sdk_tracing(
    guard: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer, otel: Any
) -> None:
    """A global tracer provider is set (conftest), so anthropic would emit its own span; tokenbudget turns it off."""
    anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    spans = otel.spans()
    assert len(spans) == 1 and spans[0].instrumentation_scope.name == "tokenbudget"
    tokenbudget.uninstall()
    otel.exporter.clear()
    anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    assert [s.instrumentation_scope.name for s in otel.spans()] == ["com.anthropic.sdk.python"]


def test_exceeded_before_sending(anthropic_client: Any, srv: StandInServer) -> None:
    tokenbudget.install({"ledger": "memory://"}, budget_usd=0.001)
    with pytest.raises(tokenbudget.BudgetExceeded):
        anthropic_client.messages.create(model="claude-opus-4-1", max_tokens=4000, messages=MSG)
    with pytest.raises(tokenbudget.BudgetExceeded):
        anthropic_client.messages.stream(model="claude-opus-4-1", max_tokens=4000, messages=MSG).__enter__()
    assert srv.requests == []


@pytest.mark.parametrize("status", [429, 500, 529])
def test_error_statuses_charge_nothing(
    guard: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer, status: int
) -> None:
    srv.push(Fault(status=status))
    with pytest.raises(anthropic.APIStatusError):
        anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    assert spent(guard) == 0
    no_holds(guard)


def test_abandoned_stream(guard: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer) -> None:
    srv.reply = Reply(text=" ".join(["tok"] * 40), input_tokens=100, output_tokens=40)
    with anthropic_client.messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=MSG) as s:
        texts = []
        for text in s.text_stream:
            texts.append(text)
            if len(texts) == 4:
                break
    (event,) = guard.ledger.events()
    assert event.status == "abandoned"
    assert event.input_tokens == 100  # message_start told us the real input
    assert event.output_tokens == guard.estimator.text_tokens("claude-haiku-4-5", "".join(texts))
    assert event.cost_micros == haiku_micros(100, event.output_tokens)
    no_holds(guard)


def test_midstream_overloaded_error(guard: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer) -> None:
    srv.reply = Reply(text="a b c d e f", input_tokens=100, output_tokens=6)
    srv.push(Fault(status=529, truncate_after=4))
    with pytest.raises(anthropic.APIStatusError):
        list(anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG, stream=True))
    (event,) = guard.ledger.events()
    assert event.status == "abandoned" and event.input_tokens == 100
    no_holds(guard)
