"""The stand-in server must look exactly like the vendors to their own SDKs, or every test built on it lies.

Clients are created with ``_strict_response_validation=True`` so each reply is validated against the SDK's pydantic
types (a missing required field fails here rather than surfacing as a silent None in some other test).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from pydantic import BaseModel

from tokenbudget.testing import Fault, Reply, StandInServer, ToolCall, estimate_input_tokens

MSGS: list[Any] = [{"role": "user", "content": "What is the weather like?"}]

# Vendor-neutral: input includes cache reads and writes, output includes reasoning.
EXACT = Reply(
    text="alpha beta gamma delta",
    input_tokens=1000,
    output_tokens=60,
    cached_tokens=300,
    cache_creation_tokens=200,
    cache_creation_1h_tokens=50,
    reasoning_tokens=20,
)
WEATHER = ToolCall("get_weather", {"city": "Paris", "unit": "celsius"})


@pytest.fixture(scope="module")
def server() -> Iterator[StandInServer]:
    with StandInServer() as srv:
        yield srv


@pytest.fixture
def srv(server: StandInServer) -> Iterator[StandInServer]:
    server.clear()
    server.reply = Reply()
    yield server
    assert server.errors == []
    server.clear()
    server.reply = Reply()


@pytest.fixture
def oai(srv: StandInServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=srv.openai_base_url, api_key="sk-test", max_retries=0, _strict_response_validation=True
    ) as client:
        yield client


@pytest.fixture
async def aoai(srv: StandInServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=srv.openai_base_url, api_key="sk-test", max_retries=0, _strict_response_validation=True
    ) as client:
        yield client


@pytest.fixture
def ant(srv: StandInServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=srv.anthropic_base_url, api_key="sk-ant-test", max_retries=0, _strict_response_validation=True
    ) as client:
        yield client


@pytest.fixture
async def aant(srv: StandInServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=srv.anthropic_base_url, api_key="sk-ant-test", max_retries=0, _strict_response_validation=True
    ) as client:
        yield client


def assert_chat_usage(usage: Any) -> None:
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (1000, 60, 1060)
    assert usage.prompt_tokens_details.cached_tokens == 300
    assert usage.prompt_tokens_details.cache_write_tokens == 200
    assert usage.completion_tokens_details.reasoning_tokens == 20


def assert_responses_usage(usage: Any) -> None:
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (1000, 60, 1060)
    assert usage.input_tokens_details.cached_tokens == 300
    assert usage.input_tokens_details.cache_write_tokens == 200
    assert usage.output_tokens_details.reasoning_tokens == 20


def assert_anthropic_usage(usage: Any) -> None:
    assert usage.input_tokens == 500  # 1000 minus cache reads and writes
    assert usage.cache_read_input_tokens == 300
    assert usage.cache_creation_input_tokens == 200
    assert usage.cache_creation.ephemeral_5m_input_tokens == 150
    assert usage.cache_creation.ephemeral_1h_input_tokens == 50
    assert usage.output_tokens == 60
    assert usage.output_tokens_details.thinking_tokens == 20


# ---------------------------------------------------------------------------------------------------------------------
# OpenAI chat completions


def test_chat_non_stream_exact_usage(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = EXACT
    completion = oai.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert completion.choices[0].message.content == "alpha beta gamma delta"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-4o-mini"
    assert_chat_usage(completion.usage)
    (request,) = srv.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.body is not None and request.body["messages"] == MSGS
    assert request.headers["authorization"] == "Bearer sk-test"


async def test_chat_non_stream_async(srv: StandInServer, aoai: openai.AsyncOpenAI) -> None:
    srv.reply = EXACT
    completion = await aoai.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert completion.choices[0].message.content == "alpha beta gamma delta"
    assert_chat_usage(completion.usage)


def test_chat_stream_include_usage(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = EXACT
    chunks = list(
        oai.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True, stream_options={"include_usage": True})
    )
    *content_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == "alpha beta gamma delta"
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    # Every earlier chunk carries an explicit "usage": null, as OpenAI sends it.
    assert all("usage" in c.model_fields_set and c.usage is None for c in content_chunks)
    assert usage_chunk.choices == []
    assert_chat_usage(usage_chunk.usage)


def test_chat_stream_without_include_usage_has_no_usage(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = EXACT
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True))
    assert all(c.choices for c in chunks)
    assert all("usage" not in c.model_fields_set for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "alpha beta gamma delta"


async def test_chat_stream_async_and_chunks(srv: StandInServer, aoai: openai.AsyncOpenAI) -> None:
    srv.reply = Reply(text="0123456789", chunks=3, input_tokens=7, output_tokens=3)
    stream = await aoai.chat.completions.create(
        model="gpt-4o", messages=MSGS, stream=True, stream_options={"include_usage": True}
    )
    pieces: list[str] = []
    usage = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert pieces == ["0123", "456", "789"]
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (7, 3)


def test_chat_stream_helper(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = EXACT
    with oai.chat.completions.stream(model="gpt-4o", messages=MSGS, stream_options={"include_usage": True}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "alpha beta gamma delta"
    assert_chat_usage(final.usage)


class Weather(BaseModel):
    city: str
    temperature: int


def test_chat_parse_json_schema(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = Reply(text='{"city": "Paris", "temperature": 21}')
    completion = oai.chat.completions.parse(model="gpt-4o", messages=MSGS, response_format=Weather)
    assert completion.choices[0].message.parsed == Weather(city="Paris", temperature=21)
    assert srv.requests[0].body is not None
    assert srv.requests[0].body["response_format"]["type"] == "json_schema"


TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}},
        },
    }
]


def test_chat_tool_call(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = Reply(tool_call=WEATHER)
    completion = oai.chat.completions.create(model="gpt-4o", messages=MSGS, tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_chat_tool_call_stream(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = Reply(tool_call=WEATHER)
    with oai.chat.completions.stream(model="gpt-4o", messages=MSGS, tools=TOOLS) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    calls = final.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_stop_reason_is_translated_per_vendor(srv: StandInServer, oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    srv.reply = Reply(stop_reason="max_tokens")
    assert oai.chat.completions.create(model="m", messages=MSGS).choices[0].finish_reason == "length"
    assert ant.messages.create(model="m", max_tokens=5, messages=MSGS).stop_reason == "max_tokens"
    response = oai.responses.create(model="m", input="hi")
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"


# ---------------------------------------------------------------------------------------------------------------------
# OpenAI legacy completions, embeddings


def test_legacy_completion(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = EXACT
    completion = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    assert completion.choices[0].text == "alpha beta gamma delta"
    assert_chat_usage(completion.usage)


async def test_legacy_completion_stream_include_usage(srv: StandInServer) -> None:
    # Streamed legacy chunks carry "finish_reason": null, as the real API sends them, which the SDK's Completion type
    # does not allow; so this one needs a non-strict client, like every real use of it.
    srv.reply = EXACT
    async with openai.AsyncOpenAI(base_url=srv.openai_base_url, api_key="k", max_retries=0) as aoai:
        await _legacy_stream(aoai)


async def _legacy_stream(aoai: openai.AsyncOpenAI) -> None:
    stream = await aoai.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "alpha beta gamma delta"
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].choices == []
    assert_chat_usage(chunks[-1].usage)

    stream = await aoai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True)
    assert all("usage" not in c.model_fields_set for c in [chunk async for chunk in stream])


def test_embeddings_float_and_default_base64(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = Reply(input_tokens=12)
    result = oai.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"], encoding_format="float")
    assert [len(d.embedding) for d in result.data] == [8, 8, 8]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (12, 12)

    # The SDK asks for base64 unless told otherwise and decodes it itself; that reply is not the typed shape,
    # exactly as with the real API, so use a non-strict client.
    with openai.OpenAI(base_url=srv.openai_base_url, api_key="sk", max_retries=0) as lenient:
        decoded = lenient.embeddings.create(model="text-embedding-3-small", input="a")
    assert srv.requests[-1].body is not None and srv.requests[-1].body["encoding_format"] == "base64"
    assert decoded.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# OpenAI Responses


def test_responses_non_stream(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = EXACT
    response = oai.responses.create(model="gpt-5-mini", input="hi", instructions="be brief")
    assert response.output_text == "alpha beta gamma delta"
    assert (response.status, response.model, response.instructions) == ("completed", "gpt-5-mini", "be brief")
    assert_responses_usage(response.usage)


async def test_responses_non_stream_async(srv: StandInServer, aoai: openai.AsyncOpenAI) -> None:
    srv.reply = EXACT
    response = await aoai.responses.create(model="gpt-5-mini", input="hi")
    assert response.output_text == "alpha beta gamma delta"
    assert_responses_usage(response.usage)


def test_responses_raw_stream_events(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = EXACT
    events = list(oai.responses.create(model="gpt-5", input="hi", stream=True))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "alpha beta gamma delta"
    last = events[-1]
    assert last.type == "response.completed"
    assert_responses_usage(last.response.usage)


def test_responses_stream_helper(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = EXACT
    with oai.responses.stream(model="gpt-5", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "alpha beta gamma delta"
    assert_responses_usage(final.usage)


async def test_responses_stream_helper_async_parse(srv: StandInServer, aoai: openai.AsyncOpenAI) -> None:
    srv.reply = Reply(text='{"city": "Oslo", "temperature": -3}', input_tokens=40, output_tokens=9)
    async with aoai.responses.stream(model="gpt-5", input="hi", text_format=Weather) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.output_parsed == Weather(city="Oslo", temperature=-3)
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (40, 9)


def test_responses_tool_call_stream(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = Reply(tool_call=WEATHER)
    tools: list[Any] = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": False}]
    with oai.responses.stream(model="gpt-5", input="hi", tools=tools) as stream:
        final = stream.get_final_response()
    (item,) = final.output
    assert item.type == "function_call"
    assert item.name == "get_weather"
    assert json.loads(item.arguments) == {"city": "Paris", "unit": "celsius"}


def test_responses_compact_and_input_tokens(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.reply = EXACT
    compacted = oai.responses.compact(model="gpt-5", input="a long conversation")
    assert compacted.object == "response.compaction"
    assert compacted.output[0].type == "compaction"
    assert_responses_usage(compacted.usage)
    assert srv.requests[-1].path == "/v1/responses/compact"

    counted = oai.responses.input_tokens.count(model="gpt-5", input="hi")
    assert counted.input_tokens == 1000


# ---------------------------------------------------------------------------------------------------------------------
# Azure


def test_azure_chat_uses_deployment_as_model(srv: StandInServer) -> None:
    srv.reply = EXACT
    with openai.AzureOpenAI(
        azure_endpoint=srv.url,
        api_key="azure-key",
        api_version="2024-10-21",
        max_retries=0,
        _strict_response_validation=True,
    ) as azure:
        completion = azure.chat.completions.create(model="my-gpt4o-deployment", messages=MSGS)
        chunks = list(
            azure.chat.completions.create(
                model="my-gpt4o-deployment", messages=MSGS, stream=True, stream_options={"include_usage": True}
            )
        )
    assert completion.model == "my-gpt4o-deployment"
    assert_chat_usage(completion.usage)
    assert_chat_usage(chunks[-1].usage)
    request = srv.requests[0]
    assert request.path == "/openai/deployments/my-gpt4o-deployment/chat/completions"
    assert request.query == {"api-version": "2024-10-21"}
    assert request.headers["api-key"] == "azure-key"


# ---------------------------------------------------------------------------------------------------------------------
# Anthropic


def test_messages_non_stream(srv: StandInServer, ant: anthropic.Anthropic) -> None:
    srv.reply = EXACT
    message = ant.messages.create(model="claude-sonnet-5-5", max_tokens=100, messages=MSGS)
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].type == "text" and message.content[0].text == "alpha beta gamma delta"
    assert (message.model, message.stop_reason) == ("claude-sonnet-5-5", "end_turn")
    assert_anthropic_usage(message.usage)
    (request,) = srv.requests
    assert request.path == "/v1/messages"
    # anthropic 2.x sends the API key as a bearer token, not as x-api-key.
    assert request.headers["authorization"] == "Bearer sk-ant-test"
    assert "anthropic-version" in request.headers


async def test_messages_non_stream_async(srv: StandInServer, aant: anthropic.AsyncAnthropic) -> None:
    srv.reply = EXACT
    message = await aant.messages.create(model="claude-haiku-5-5", max_tokens=100, messages=MSGS)
    assert_anthropic_usage(message.usage)


def test_messages_raw_stream(srv: StandInServer, ant: anthropic.Anthropic) -> None:
    srv.reply = EXACT
    events = list(ant.messages.create(model="claude-sonnet-5-5", max_tokens=100, messages=MSGS, stream=True))
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the ping is swallowed by the SDK
    start, delta = events[0], events[-2]
    assert start.type == "message_start"
    assert start.message.usage.output_tokens == 1
    assert start.message.usage.input_tokens == 500
    assert start.message.usage.cache_read_input_tokens == 300
    assert start.message.usage.cache_creation_input_tokens == 200
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "end_turn"
    assert (delta.usage.output_tokens, delta.usage.input_tokens) == (60, 500)
    assert (delta.usage.cache_read_input_tokens, delta.usage.cache_creation_input_tokens) == (300, 200)


def test_messages_stream_helper(srv: StandInServer, ant: anthropic.Anthropic) -> None:
    srv.reply = EXACT
    with ant.messages.stream(model="claude-sonnet-5-5", max_tokens=100, messages=MSGS) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "alpha beta gamma delta"
    assert_anthropic_usage(final.usage)


async def test_messages_stream_helper_async(srv: StandInServer, aant: anthropic.AsyncAnthropic) -> None:
    srv.reply = EXACT
    async with aant.messages.stream(model="claude-sonnet-5-5", max_tokens=100, messages=MSGS) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "alpha beta gamma delta"
    assert_anthropic_usage(final.usage)


async def test_messages_raw_stream_async(srv: StandInServer, aant: anthropic.AsyncAnthropic) -> None:
    srv.reply = EXACT
    stream = await aant.messages.create(model="claude-sonnet-5-5", max_tokens=100, messages=MSGS, stream=True)
    events = [e async for e in stream]
    assert events[-2].type == "message_delta" and events[-2].usage.output_tokens == 60


def test_beta_messages(srv: StandInServer, ant: anthropic.Anthropic) -> None:
    srv.reply = EXACT
    message = ant.beta.messages.create(model="claude-sonnet-5-5", max_tokens=100, messages=MSGS)
    assert_anthropic_usage(message.usage)
    with ant.beta.messages.stream(model="claude-sonnet-5-5", max_tokens=100, messages=MSGS) as stream:
        final = stream.get_final_message()
    assert_anthropic_usage(final.usage)
    assert {r.path for r in srv.requests} == {"/v1/messages"}


def test_beta_query_flag_is_accepted(srv: StandInServer) -> None:
    # anthropic 2.x keeps `beta=true` as an internal qualifier; older clients put it on the URL.
    with anthropic.Anthropic(
        base_url=srv.anthropic_base_url, api_key="k", max_retries=0, default_query={"beta": "true"}
    ) as client:
        message = client.beta.messages.create(model="claude-sonnet-5-5", max_tokens=100, messages=MSGS)
        counted = client.messages.count_tokens(model="claude-sonnet-5-5", messages=MSGS)
    assert message.content[0].type == "text"
    assert counted.input_tokens > 0
    assert [r.query for r in srv.requests] == [{"beta": "true"}] * 2


def test_messages_tool_use(srv: StandInServer, ant: anthropic.Anthropic) -> None:
    srv.reply = Reply(tool_call=WEATHER)
    tools: list[Any] = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    message = ant.messages.create(model="claude-sonnet-5-5", max_tokens=100, messages=MSGS, tools=tools)
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input == {"city": "Paris", "unit": "celsius"}

    with ant.messages.stream(model="claude-sonnet-5-5", max_tokens=100, messages=MSGS, tools=tools) as stream:
        final = stream.get_final_message()
    block = final.content[0]
    assert block.type == "tool_use" and block.input == {"city": "Paris", "unit": "celsius"}


def test_count_tokens(srv: StandInServer, ant: anthropic.Anthropic) -> None:
    srv.reply = Reply(input_tokens=321)
    assert ant.messages.count_tokens(model="claude-sonnet-5-5", messages=MSGS).input_tokens == 321
    assert srv.requests[-1].path == "/v1/messages/count_tokens"


# ---------------------------------------------------------------------------------------------------------------------
# Derived usage, queueing, recording


def test_derived_usage_is_deterministic(srv: StandInServer, oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    first = oai.chat.completions.create(model="gpt-4o", messages=MSGS)
    second = oai.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert first.usage == second.usage
    assert first.usage is not None
    assert first.usage.prompt_tokens == estimate_input_tokens(srv.requests[0].raw)
    assert first.usage.completion_tokens == 5  # "Hello from the stand-in model." is five words

    srv.reply = Reply(text="abcdefgh", chunks=4, cached_tokens=10)
    message = ant.messages.create(model="claude-sonnet-5-5", max_tokens=100, messages=MSGS)
    assert message.usage.output_tokens == 4
    assert message.usage.input_tokens == estimate_input_tokens(srv.requests[-1].raw)
    assert message.usage.cache_read_input_tokens == 10


def test_push_is_fifo_then_default(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.push(Reply(text="one"), Reply(text="two"))
    assert srv.pending == 2
    texts = [oai.chat.completions.create(model="m", messages=MSGS).choices[0].message.content for _ in range(3)]
    assert texts == ["one", "two", "Hello from the stand-in model."]
    assert srv.pending == 0
    assert len(srv.requests) == 3
    srv.clear()
    assert srv.requests == []


def test_reply_and_fault_validation() -> None:
    with pytest.raises(ValueError):
        Reply(input_tokens=10, cached_tokens=8, cache_creation_tokens=5)
    with pytest.raises(ValueError):
        Reply(output_tokens=3, reasoning_tokens=4)
    with pytest.raises(ValueError):
        Reply(cache_creation_tokens=1, cache_creation_1h_tokens=2)
    with pytest.raises(ValueError):
        Fault(status=200)


def test_reply_model_override(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.push(Reply(model="gpt-4o-2024-08-06"))
    assert oai.chat.completions.create(model="gpt-4o", messages=MSGS).model == "gpt-4o-2024-08-06"


def test_unknown_route_is_404(srv: StandInServer, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        oai.models.list()


# ---------------------------------------------------------------------------------------------------------------------
# Faults


@pytest.mark.parametrize(
    ("status", "openai_error", "anthropic_error"),
    [
        (429, openai.RateLimitError, anthropic.RateLimitError),
        (500, openai.InternalServerError, anthropic.InternalServerError),
        (529, openai.InternalServerError, anthropic.OverloadedError),
        (418, openai.APIStatusError, anthropic.APIStatusError),
    ],
)
def test_status_faults(
    srv: StandInServer,
    oai: openai.OpenAI,
    ant: anthropic.Anthropic,
    status: int,
    openai_error: type[Exception],
    anthropic_error: type[Exception],
) -> None:
    srv.push(Fault(status=status), Fault(status=status))
    with pytest.raises(openai_error) as oe:
        oai.chat.completions.create(model="m", messages=MSGS)
    with pytest.raises(anthropic_error) as ae:
        ant.messages.create(model="m", max_tokens=5, messages=MSGS)
    assert isinstance(oe.value, openai.APIStatusError) and oe.value.status_code == status
    assert isinstance(ae.value, anthropic.APIStatusError) and ae.value.status_code == status
    assert isinstance(ae.value.body, dict) and ae.value.body["type"] == "error"
    if status == 429:
        assert oe.value.response.headers["retry-after"] == "0"
    if status == 529:
        assert ae.value.body["error"]["type"] == "overloaded_error"


async def test_status_fault_async_stream(srv: StandInServer, aoai: openai.AsyncOpenAI) -> None:
    srv.push(Fault(status=429, body={"error": {"message": "slow down", "type": "tokens"}}, headers={"x-custom": "1"}))
    with pytest.raises(openai.RateLimitError) as err:
        await aoai.chat.completions.create(model="m", messages=MSGS, stream=True)
    assert "slow down" in err.value.message
    assert err.value.response.headers["x-custom"] == "1"


def test_retry_after_fault_succeeds(srv: StandInServer) -> None:
    srv.push(Fault(status=429), Fault(status=500))
    with openai.OpenAI(base_url=srv.openai_base_url, api_key="k", max_retries=2) as client:
        started = time.monotonic()
        completion = client.chat.completions.create(model="m", messages=MSGS)
    assert completion.choices[0].message.content == "Hello from the stand-in model."
    assert time.monotonic() - started < 1.0  # retry-after-ms: 1 keeps SDK retries immediate
    assert [r.headers["x-stainless-retry-count"] for r in srv.requests] == ["0", "1", "2"]


def test_delay_times_out_without_blocking_others(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.push(Fault(delay=5.0))
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            oai.with_options(timeout=0.4).chat.completions.create(model="m", messages=MSGS)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    while len(srv.requests) < 1:
        time.sleep(0.005)
    # While the first request sleeps, a second connection is served at once.
    started = time.monotonic()
    with openai.OpenAI(base_url=srv.openai_base_url, api_key="k", max_retries=0) as other:
        other.chat.completions.create(model="m", messages=MSGS)
    assert time.monotonic() - started < 0.3
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], openai.APITimeoutError)


async def test_delay_timeout_async(srv: StandInServer, aant: anthropic.AsyncAnthropic) -> None:
    srv.push(Fault(delay=5.0))
    with pytest.raises(anthropic.APITimeoutError):
        await aant.with_options(timeout=0.2).messages.create(model="m", max_tokens=5, messages=MSGS)


def test_delay_then_normal_answer(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.push(Fault(delay=0.05, reply=Reply(text="late")))
    started = time.monotonic()
    assert oai.chat.completions.create(model="m", messages=MSGS).choices[0].message.content == "late"
    assert time.monotonic() - started >= 0.05


def test_reset(srv: StandInServer, oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    srv.push(Fault(reset=True), Fault(reset=True))
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="m", messages=MSGS)
    with pytest.raises(anthropic.APIConnectionError):
        ant.messages.create(model="m", max_tokens=5, messages=MSGS)
    # The server is fine afterwards.
    assert oai.chat.completions.create(model="m", messages=MSGS).choices[0].message.content


async def test_reset_async(srv: StandInServer, aoai: openai.AsyncOpenAI) -> None:
    srv.push(Fault(reset=True))
    with pytest.raises(openai.APIConnectionError):
        await aoai.chat.completions.create(model="m", messages=MSGS)


def test_truncated_openai_stream_raises_after_partial_content(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.push(Fault(truncate_after=3, reply=EXACT))
    seen: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in oai.chat.completions.create(
            model="m", messages=MSGS, stream=True, stream_options={"include_usage": True}
        ):
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "alpha beta"  # role chunk, then two words, then the connection dropped


def test_truncated_anthropic_stream_raises(srv: StandInServer, ant: anthropic.Anthropic) -> None:
    srv.push(Fault(truncate_after=3))
    seen: list[str] = []
    # anthropic 2.x does not wrap transport errors raised while iterating a stream.
    with pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)):
        for event in ant.messages.create(model="m", max_tokens=5, messages=MSGS, stream=True):
            seen.append(event.type)
    assert seen == ["message_start", "content_block_start"]  # the third event was the (swallowed) ping


async def test_truncated_responses_stream_async(srv: StandInServer, aoai: openai.AsyncOpenAI) -> None:
    srv.push(Fault(truncate_after=5))
    seen: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async with aoai.responses.stream(model="m", input="hi") as stream:
            async for event in stream:
                seen.append(event.type)
    assert "response.completed" not in seen


def test_truncated_non_stream_body(srv: StandInServer, oai: openai.OpenAI) -> None:
    srv.push(Fault(truncate_after=10))
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="m", messages=MSGS)


def test_malformed_stream_raises(srv: StandInServer, oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    srv.push(Fault(malformed=True), Fault(malformed=True), Fault(malformed=True))
    with pytest.raises(ValueError):
        list(oai.chat.completions.create(model="m", messages=MSGS, stream=True))
    with pytest.raises(ValueError):
        list(ant.messages.create(model="m", max_tokens=5, messages=MSGS, stream=True))
    with pytest.raises(ValueError), oai.responses.stream(model="m", input="hi") as stream:
        stream.get_final_response()


async def test_malformed_stream_raises_async(srv: StandInServer, aant: anthropic.AsyncAnthropic) -> None:
    srv.push(Fault(malformed=True))
    with pytest.raises(ValueError):
        async with aant.messages.stream(model="m", max_tokens=5, messages=MSGS) as stream:
            await stream.get_final_message()


def test_error_mid_stream(srv: StandInServer, oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    srv.push(Fault(status=529, truncate_after=3), Fault(status=500, truncate_after=2))
    with pytest.raises(anthropic.APIStatusError) as ae:
        list(ant.messages.create(model="m", max_tokens=5, messages=MSGS, stream=True))
    assert isinstance(ae.value.body, dict) and ae.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(openai.APIError):
        list(oai.chat.completions.create(model="m", messages=MSGS, stream=True))


def test_stop_interrupts_delayed_requests() -> None:
    srv = StandInServer().start()
    srv.push(Fault(delay=30.0))
    errors: list[BaseException] = []

    def call() -> None:
        with openai.OpenAI(base_url=srv.openai_base_url, api_key="k", max_retries=0, timeout=5.0) as client:
            try:
                client.chat.completions.create(model="m", messages=MSGS)
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    while not srv.requests:
        time.sleep(0.005)
    started = time.monotonic()
    srv.stop()
    thread.join(timeout=5)
    assert time.monotonic() - started < 1.0
    assert len(errors) == 1 and isinstance(errors[0], openai.APIConnectionError)
    with pytest.raises(RuntimeError):
        _ = srv.url
