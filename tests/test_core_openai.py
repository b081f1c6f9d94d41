"""Issue 3 acceptance, OpenAI side: exact usage and cost on spans and in the ledger, sync / async / streaming."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pydantic
import pytest

import tokenbudget
from tokenbudget.testing import Fault, Reply, StandInServer

# gpt-4o-mini: $0.15 / MTok input, $0.075 cached input, $0.60 output (vendor price list, checked in test_pricing).
MINI_IN, MINI_CACHED, MINI_OUT = 0.15, 0.075, 0.60


def mini_cost_micros(inp: int, out: int, cached: int = 0) -> int:
    pico = (inp - cached) * 150_000 + cached * 75_000 + out * 600_000
    return (pico + 500_000) // 1_000_000


def spent_micros(guard: tokenbudget.Guard) -> int:
    return sum(e.cost_micros for e in guard.ledger.events())


def only_span(otel: Any) -> Any:
    spans = otel.spans()
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


def assert_no_holds(guard: tokenbudget.Guard) -> None:
    assert guard.ledger.active_reservations(now=guard.clock.now()) == []


def test_chat_sync_exact_usage_cost_and_span(
    guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer, otel: Any
) -> None:
    srv.reply = Reply(text="hi there", input_tokens=1000, output_tokens=500, cached_tokens=200, reasoning_tokens=50)
    r = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=600
    )
    assert r.choices[0].message.content == "hi there"
    span = only_span(otel)
    a = span.attributes
    assert span.name == "chat gpt-4o-mini"
    assert span.kind.name == "CLIENT"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.request.max_tokens"] == 600
    assert a["gen_ai.usage.input_tokens"] == 1000
    assert a["gen_ai.usage.output_tokens"] == 500
    assert a["gen_ai.usage.cache_read.input_tokens"] == 200
    assert a["gen_ai.usage.reasoning.output_tokens"] == 50
    assert a["gen_ai.response.id"] == r.id
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["server.address"] == "127.0.0.1"
    expected = mini_cost_micros(1000, 500, cached=200)
    assert expected == 120 + 15 + 300
    assert a["tokenbudget.cost_usd"] == pytest.approx(expected / 1e6)
    assert a["tokenbudget.decision"] == "allow"
    assert a["tokenbudget.budget.remaining_usd"] == pytest.approx(5.0 - expected / 1e6)
    assert a["tokenbudget.estimated_cost_usd"] > 0
    assert spent_micros(guard) == expected
    assert_no_holds(guard)


async def test_chat_async(guard: tokenbudget.Guard, async_openai_client: Any, srv: StandInServer, otel: Any) -> None:
    srv.reply = Reply(input_tokens=321, output_tokens=123)
    await async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    a = only_span(otel).attributes
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (321, 123)
    assert spent_micros(guard) == mini_cost_micros(321, 123)
    assert_no_holds(guard)


def test_stream_hides_injected_usage_chunk(
    guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer, otel: Any
) -> None:
    srv.reply = Reply(text="one two three", input_tokens=40, output_tokens=3)
    # What the caller sees without tokenbudget:
    tokenbudget.uninstall()
    bare = [
        c.model_dump()
        for c in openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
        )
    ]
    tokenbudget.install({"ledger": "memory://"}, budget_usd=5.0)
    guard = tokenbudget.active_guard()
    assert guard is not None
    srv.clear()
    chunks = list(
        openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    assert srv.requests[-1].body["stream_options"] == {"include_usage": True}  # the guard asked for usage
    assert all(c.choices for c in chunks)  # ... and hid the usage-only chunk
    assert len(chunks) == len(bare)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two three"
    a = only_span(otel).attributes
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (40, 3)
    assert a["gen_ai.request.stream"] is True
    assert spent_micros(guard) == mini_cost_micros(40, 3)
    assert_no_holds(guard)


def test_stream_keeps_usage_chunk_when_caller_asked(
    guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer
) -> None:
    srv.reply = Reply(input_tokens=10, output_tokens=4)
    chunks = list(
        openai_client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert spent_micros(guard) == mini_cost_micros(10, 4)


async def test_async_stream(guard: tokenbudget.Guard, async_openai_client: Any, srv: StandInServer, otel: Any) -> None:
    srv.reply = Reply(text="a b c d", input_tokens=77, output_tokens=4)
    stream = await async_openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
    )
    got = [c async for c in stream]
    assert all(c.choices for c in got)
    assert spent_micros(guard) == mini_cost_micros(77, 4)
    assert only_span(otel).attributes["gen_ai.usage.input_tokens"] == 77
    assert_no_holds(guard)


def test_budget_exceeded_before_any_byte(openai_client: Any, srv: StandInServer, otel: Any) -> None:
    guard = tokenbudget.install({"ledger": "memory://"}, budget_usd=0.0001)
    with pytest.raises(tokenbudget.BudgetExceeded) as info:
        openai_client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello"}], max_tokens=1000
        )
    assert srv.requests == []
    err = info.value
    assert isinstance(err, tokenbudget.TokenBudgetError)
    assert err.scope == "org" and err.limit == pytest.approx(0.0001) and err.spent == 0 and err.requested > 0.0001
    assert spent_micros(guard) == 0
    assert_no_holds(guard)
    span = only_span(otel)
    assert span.attributes["error.type"] == "BudgetExceeded"
    assert [e.status for e in guard.ledger.events()] == ["denied"]


async def test_budget_exceeded_async_before_any_byte(async_openai_client: Any, srv: StandInServer) -> None:
    tokenbudget.install({"ledger": "memory://"}, budget_usd=0.0001)
    with pytest.raises(tokenbudget.BudgetExceeded):
        await async_openai_client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello"}], max_tokens=1000, stream=True
        )
    assert srv.requests == []


@pytest.mark.parametrize("status", [429, 500])
def test_error_status_charges_nothing(
    guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer, otel: Any, status: int
) -> None:
    srv.push(Fault(status=status))
    with pytest.raises(openai.APIStatusError) as info:
        openai_client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == status
    assert spent_micros(guard) == 0
    assert_no_holds(guard)
    assert [e.status for e in guard.ledger.events()] == ["error"]
    assert only_span(otel).attributes["error.type"] in ("RateLimitError", "InternalServerError")


async def test_error_status_async_stream(
    guard: tokenbudget.Guard, async_openai_client: Any, srv: StandInServer
) -> None:
    srv.push(Fault(status=500))
    with pytest.raises(openai.InternalServerError):
        await async_openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
        )
    assert spent_micros(guard) == 0
    assert_no_holds(guard)


def test_timeout_charges_estimated_input(guard: tokenbudget.Guard, srv: StandInServer) -> None:
    client = openai.OpenAI(base_url=srv.openai_base_url, api_key="k", max_retries=0, timeout=0.6)
    srv.push(Fault(delay=3.0))
    messages = [{"role": "user", "content": "please count these words for me"}]
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    est = guard.estimator.input_tokens(
        tokenbudget.CallRequest(
            provider="openai",
            operation="chat",
            model="gpt-4o-mini",
            body={"model": "gpt-4o-mini", "messages": messages},
        )
    )
    (event,) = guard.ledger.events()
    assert event.status == "abandoned" and event.input_tokens == est and event.output_tokens == 0
    assert event.cost_micros == mini_cost_micros(est, 0)
    assert_no_holds(guard)


async def test_cancel_charges_estimated_input(
    guard: tokenbudget.Guard, async_openai_client: Any, srv: StandInServer
) -> None:
    srv.push(Fault(delay=2.0))
    task = asyncio.create_task(
        async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    )
    for _ in range(500):
        if srv.requests:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (event,) = guard.ledger.events()
    assert event.status == "abandoned" and event.cost_micros > 0
    assert_no_holds(guard)


def test_abandoned_stream_charged_input_plus_received_output(
    guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer, otel: Any
) -> None:
    srv.reply = Reply(text=" ".join(["word"] * 50), input_tokens=100, output_tokens=50)
    stream = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
    )
    received = []
    for chunk in stream:
        received.append(chunk.choices[0].delta.content or "")
        if len(received) == 5:
            break
    stream.close()
    (event,) = guard.ledger.events()
    assert event.status == "abandoned"
    out = guard.estimator.text_tokens("gpt-4o-mini", "".join(received))
    assert event.output_tokens == out and out > 0
    assert event.input_tokens == guard.estimator.input_tokens(
        tokenbudget.CallRequest(
            provider="openai",
            operation="chat",
            model="gpt-4o-mini",
            body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
        )
    )
    assert event.cost_micros == mini_cost_micros(event.input_tokens, out)
    assert_no_holds(guard)
    assert only_span(otel).attributes["tokenbudget.status"] == "abandoned"


def test_abandoned_stream_garbage_collected(guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer) -> None:
    import gc

    srv.reply = Reply(text="a b c d e f", input_tokens=100, output_tokens=6)

    def consume_two() -> None:
        stream = openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
        )
        it = iter(stream)
        next(it)
        next(it)

    consume_two()
    gc.collect()
    (event,) = guard.ledger.events()
    assert event.status == "abandoned" and event.output_tokens > 0
    assert_no_holds(guard)


def test_truncated_stream_settles(guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer) -> None:
    srv.reply = Reply(text="a b c d e f g h", input_tokens=100, output_tokens=8)
    srv.push(Fault(truncate_after=3))
    with pytest.raises(Exception):  # noqa: B017 - the SDK's own error for a cut connection
        list(
            openai_client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    (event,) = guard.ledger.events()
    assert event.status == "abandoned" and event.cost_micros > 0
    assert_no_holds(guard)


class Answer(pydantic.BaseModel):
    city: str


def test_parse_is_guarded(guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer, otel: Any) -> None:
    srv.reply = Reply(text='{"city": "Paris"}', input_tokens=30, output_tokens=7)
    r = openai_client.chat.completions.parse(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], response_format=Answer
    )
    assert r.choices[0].message.parsed == Answer(city="Paris")
    assert spent_micros(guard) == mini_cost_micros(30, 7)
    assert len(otel.spans()) == 1


def test_chat_stream_helper_is_guarded(guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer) -> None:
    srv.reply = Reply(text="x y", input_tokens=12, output_tokens=2)
    with openai_client.chat.completions.stream(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.content == "x y"
    assert spent_micros(guard) == mini_cost_micros(12, 2)
    assert_no_holds(guard)


def test_responses_create_and_stream(
    guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer, otel: Any
) -> None:
    srv.reply = Reply(text="resp", input_tokens=90, output_tokens=10, cached_tokens=30, reasoning_tokens=4)
    r = openai_client.responses.create(model="gpt-4o-mini", input="hello", max_output_tokens=100)
    assert r.output_text == "resp"
    events = list(openai_client.responses.create(model="gpt-4o-mini", input="hello", stream=True))
    assert events[-1].type == "response.completed"
    cost = mini_cost_micros(90, 10, cached=30)
    assert [e.cost_micros for e in guard.ledger.events()] == [cost, cost]
    spans = otel.spans()
    assert [s.attributes["gen_ai.usage.cache_read.input_tokens"] for s in spans] == [30, 30]
    assert [s.attributes["gen_ai.usage.reasoning.output_tokens"] for s in spans] == [4, 4]
    assert_no_holds(guard)


async def test_responses_async_stream_helper(
    guard: tokenbudget.Guard, async_openai_client: Any, srv: StandInServer
) -> None:
    srv.reply = Reply(text="resp", input_tokens=9, output_tokens=1)
    async with async_openai_client.responses.stream(model="gpt-4o-mini", input="hi") as s:
        final = await s.get_final_response()
    assert final.output_text == "resp"
    assert spent_micros(guard) == mini_cost_micros(9, 1)


def test_completions_and_embeddings(
    guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer, otel: Any
) -> None:
    srv.reply = Reply(text="done", input_tokens=20, output_tokens=1)
    openai_client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say done", max_tokens=5)
    list(openai_client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say done", max_tokens=5, stream=True))
    srv.reply = Reply(input_tokens=8)
    openai_client.embeddings.create(model="text-embedding-3-small", input="hello world")
    ops = [s.attributes["gen_ai.operation.name"] for s in otel.spans()]
    assert ops == ["text_completion", "text_completion", "embeddings"]
    events = list(guard.ledger.events())
    # gpt-3.5-turbo-instruct: $1.50 in / $2.00 out; text-embedding-3-small: $0.02 / MTok
    assert [e.cost_micros for e in events] == [32, 32, 0]
    assert events[2].input_tokens == 8
    assert_no_holds(guard)


def test_raw_and_streaming_response_paths(guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer) -> None:
    srv.reply = Reply(input_tokens=100, output_tokens=10)
    raw = openai_client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.parse().usage.prompt_tokens == 100
    with openai_client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
    ) as resp:
        assert resp.parse().usage.completion_tokens == 10
    with openai_client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
    ) as resp:
        assert len(list(resp.parse())) > 0
    assert [e.cost_micros for e in guard.ledger.events()] == [mini_cost_micros(100, 10)] * 3
    assert_no_holds(guard)


def test_azure_client_is_guarded(guard: tokenbudget.Guard, srv: StandInServer, otel: Any) -> None:
    client = openai.AzureOpenAI(azure_endpoint=srv.url, api_key="k", api_version="2024-10-21", max_retries=0)
    srv.reply = Reply(input_tokens=10, output_tokens=2)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert "/openai/deployments/gpt-4o-mini/chat/completions" in srv.requests[-1].path
    assert only_span(otel).attributes["gen_ai.provider.name"] == "azure.ai.openai"
    assert spent_micros(guard) == mini_cost_micros(10, 2)


def test_client_created_before_install(srv: StandInServer) -> None:
    client = openai.OpenAI(base_url=srv.openai_base_url, api_key="k", max_retries=0)
    guard = tokenbudget.install({"ledger": "memory://"}, budget_usd=1)
    srv.reply = Reply(input_tokens=10, output_tokens=2)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert spent_micros(guard) == mini_cost_micros(10, 2)


def test_unknown_model_refused_before_sending(guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer) -> None:
    with pytest.raises(tokenbudget.UnknownModelError, match="metacode-7b"):
        openai_client.chat.completions.create(model="metacode-7b", messages=[{"role": "user", "content": "x"}])
    assert srv.requests == []


def test_price_override_for_in_house_model(openai_client: Any, srv: StandInServer) -> None:
    guard = tokenbudget.install({"ledger": "memory://", "prices": {"metacode-7b": {"input": 0.10, "output": 0.40}}})
    srv.reply = Reply(input_tokens=1000, output_tokens=1000)
    openai_client.chat.completions.create(
        model="metacode-7b", messages=[{"role": "user", "content": "x"}], max_tokens=2000
    )
    assert spent_micros(guard) == 100 + 400


def test_calls_other_endpoints_pass_through(guard: tokenbudget.Guard, openai_client: Any, otel: Any) -> None:
    with pytest.raises(openai.APIStatusError):  # the stand-in does not serve /models; the guard must not care
        openai_client.models.list()
    assert otel.spans() == []
