"""Cross-protocol downgrade: pure translations, stream translators, and the real SDKs against the stand-in server."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

import tokenbudget
from tokenbudget.errors import ConfigError
from tokenbudget.integrations.translate import (
    DEFAULT_MAX_TOKENS,
    AnthropicEventsToOpenAIChunks,
    OpenAIChunksToAnthropicEvents,
    SSEParser,
    anthropic_request_to_openai,
    anthropic_response_to_openai,
    openai_request_to_anthropic,
    openai_response_to_anthropic,
    translated_for_estimate,
)
from tokenbudget.testing import Fault, Reply, StandInServer, ToolCall

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
PNG = "iVBORw0KGgo="


# ---------------------------------------------------------------------------------------------------------------
# requests


def test_anthropic_request_to_openai() -> None:
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 300,
        "system": [
            {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Use tools."},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather in Paris?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "21C"}]},
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
        "tools": [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER_SCHEMA}],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 5,
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }
    assert anthropic_request_to_openai(body, "metacode-7b") == {
        "model": "metacode-7b",
        "max_tokens": 300,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "u-1",
        "tools": [
            {
                "type": "function",
                "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA, "description": "Weather"},
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "messages": [
            {"role": "system", "content": "You are terse.\n\nUse tools."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather in Paris?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "21C"},
            {"role": "user", "content": "And tomorrow?"},
        ],
    }


def test_openai_request_to_anthropic() -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather in Paris?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"city":"Paris"}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "w", "arguments": '{"city":"Rome"}'}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "25C"}]},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [{"type": "function", "function": {"name": "w", "parameters": WEATHER_SCHEMA, "strict": True}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_completion_tokens": 200,
        "temperature": 1.5,
        "top_p": 0.5,
        "stop": "END",
        "user": "u-1",
        "seed": 7,
        "n": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": WEATHER_SCHEMA}},
    }
    assert openai_request_to_anthropic(body, "metaclaude") == {
        "model": "metaclaude",
        "max_tokens": 200,
        "temperature": 1.0,
        "top_p": 0.5,
        "stop_sequences": ["END"],
        "stream": True,
        "metadata": {"user_id": "u-1"},
        "output_config": {"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}},
        "tools": [{"name": "w", "input_schema": WEATHER_SCHEMA, "strict": True}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "system": "You are terse.\n\nUse tools.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather in Paris?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "call_1", "name": "w", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "w", "input": {"city": "Rome"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "21C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "25C"},
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ],
    }


def test_max_tokens_default_and_precedence() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert openai_request_to_anthropic({"messages": msgs}, "m")["max_tokens"] == DEFAULT_MAX_TOKENS
    assert openai_request_to_anthropic({"messages": msgs, "max_tokens": 9}, "m")["max_tokens"] == 9
    both = {"messages": msgs, "max_tokens": 9, "max_completion_tokens": 11}
    assert openai_request_to_anthropic(both, "m")["max_tokens"] == 11
    # The guard reserves for what the target will actually be allowed to write.
    body, cap = translated_for_estimate({"model": "gpt-4o", "messages": msgs}, "openai", "anthropic", None)
    assert cap == DEFAULT_MAX_TOKENS and body["messages"] == msgs


def test_request_round_trip_is_lossless_for_translatable_features() -> None:
    body = {
        "model": "m",
        "max_tokens": 50,
        "system": "sys",
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]},
        ],
        "tools": [{"name": "w", "description": "d", "input_schema": WEATHER_SCHEMA}],
        "tool_choice": {"type": "auto"},
        "stop_sequences": ["X"],
        "temperature": 0.5,
    }
    assert openai_request_to_anthropic(anthropic_request_to_openai(body, "m"), "m") == body


class _Omit:
    """Stands in for the SDKs' ``Omit``/``NotGiven`` placeholders, which are matched by class name."""


_Omit.__name__ = "Omit"


def test_sdk_placeholders_are_ignored() -> None:
    body = {"model": "m", "max_tokens": 5, "messages": ({"role": "user", "content": "q"},), "tools": _Omit()}
    assert anthropic_request_to_openai(body, "m") == {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "q"}],
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"container": "c1"}, "container"),
        ({"output_config": {"format": {"type": "xml"}}}, "output_config.format"),
        ({"surprise": 1}, "surprise"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [{"type": "image", "source": {"type": "base64", "data": PNG}}],
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "server_tool_use"}]}]}, "messages[0].content[0]"),
    ],
)
def test_untranslatable_anthropic_fields_are_refused_by_name(body: dict[str, Any], field: str) -> None:
    full = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "q"}], **body}
    with pytest.raises(ConfigError) as info:
        anthropic_request_to_openai(full, "m")
    assert info.value.key == field
    assert f"{field}: " in str(info.value)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": [{"type": "custom", "custom": {"name": "c"}}]}, "tools[0]"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "w", "arguments": "{"}}],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0]"),
        ({"brand_new_option": True}, "brand_new_option"),
    ],
)
def test_untranslatable_openai_fields_are_refused_by_name(body: dict[str, Any], field: str) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "q"}], **body}
    with pytest.raises(ConfigError) as info:
        openai_request_to_anthropic(full, "m")
    assert info.value.key == field
    assert field in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# responses


def test_openai_response_to_anthropic_text_and_cache_usage() -> None:
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "metacode-7b",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}, "finish_reason": "length"}],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 9,
            "total_tokens": 109,
            "prompt_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 10},
            "completion_tokens_details": {"reasoning_tokens": 4},
        },
    }
    assert openai_response_to_anthropic(completion) == {
        "id": "chatcmpl-1",
        "type": "message",
        "role": "assistant",
        "model": "metacode-7b",
        "content": [{"type": "text", "text": "Hi."}],
        "stop_reason": "max_tokens",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 60,  # OpenAI's prompt_tokens include cache reads and writes; Anthropic's do not
            "output_tokens": 9,
            "cache_creation_input_tokens": 10,
            "cache_read_input_tokens": 30,
            "output_tokens_details": {"thinking_tokens": 4},
        },
    }


def test_openai_response_to_anthropic_tool_calls_and_stop_sequence() -> None:
    call = {"id": "call_9", "type": "function", "function": {"name": "w", "arguments": '{"city":"Oslo"}'}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    tools = openai_response_to_anthropic({"choices": [{"message": message, "finish_reason": "tool_calls"}]})
    assert tools["content"] == [{"type": "tool_use", "id": "call_9", "name": "w", "input": {"city": "Oslo"}}]
    assert tools["stop_reason"] == "tool_use"
    # vLLM says which stop string matched; Anthropic callers get it as stop_sequence.
    vllm = {"choices": [{"message": {"content": "a"}, "finish_reason": "stop", "stop_reason": "END"}]}
    assert (openai_response_to_anthropic(vllm)["stop_reason"], openai_response_to_anthropic(vllm)["stop_sequence"]) == (
        "stop_sequence",
        "END",
    )


def test_anthropic_response_to_openai() -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "metaclaude",
        "content": [
            {"type": "thinking", "thinking": "...", "signature": "s"},
            {"type": "text", "text": "Calling."},
            {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 60,
            "output_tokens": 9,
            "cache_read_input_tokens": 30,
            "cache_creation_input_tokens": 10,
            "output_tokens_details": {"thinking_tokens": 3},
        },
    }
    out = anthropic_response_to_openai(message)
    assert out["object"] == "chat.completion" and out["id"] == "msg_1" and out["model"] == "metaclaude"
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Calling."
    assert choice["message"]["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "w", "arguments": '{"city":"Paris"}'}}
    ]
    assert out["usage"] == {
        "prompt_tokens": 100,
        "completion_tokens": 9,
        "total_tokens": 109,
        "prompt_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 10},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    # and back: the numbers survive both conventions
    assert openai_response_to_anthropic(out)["usage"] == message["usage"]


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        (None, "stop"),
    ],
)
def test_stop_reasons(stop: str | None, finish: str) -> None:
    message: dict[str, Any] = {"content": [{"type": "text", "text": "x"}], "stop_reason": stop, "usage": {}}
    assert anthropic_response_to_openai(message)["choices"][0]["finish_reason"] == finish


# ---------------------------------------------------------------------------------------------------------------
# streams


def _events(raw: list[bytes]) -> list[tuple[str | None, Any]]:
    parser = SSEParser()
    out = parser.feed(b"".join(raw)) + parser.flush()
    return [(name, data if data == "[DONE]" else json.loads(data)) for name, data in out]


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-7", "object": "chat.completion.chunk", "model": "metacode-7b", "choices": choices, **extra}


def test_openai_chunks_to_anthropic_events() -> None:
    t = OpenAIChunksToAnthropicEvents()
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Let me "}),
        _chunk({"content": "check."}),
        _chunk(
            {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "w", "arguments": ""}}]}
        ),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "w", "arguments": '{"city":"Rome"}'}}]}),
        _chunk({}, "tool_calls"),
        _chunk(
            None, usage={"prompt_tokens": 50, "completion_tokens": 12, "prompt_tokens_details": {"cached_tokens": 20}}
        ),
    ]
    raw: list[bytes] = []
    for c in chunks:
        raw += t.feed(None, c)
    assert t.complete
    raw += t.close()
    assert t.close() == [] and t.feed(None, _chunk({"content": "late"})) == []
    assert all(r.startswith(b"event: ") for r in raw), "every Anthropic SSE event needs its event line"
    events = _events(raw)
    assert all(name == data["type"] for name, data in events)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    starts = [d for n, d in events if n == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert starts[1]["content_block"] == {"type": "tool_use", "id": "c1", "name": "w", "input": {}}
    partial = "".join(
        d["delta"].get("partial_json", "") for n, d in events if n == "content_block_delta" and d["index"] == 1
    )
    assert json.loads(partial) == {"city": "Paris"}
    assert events[0][1]["message"]["id"] == "chatcmpl-7" and events[0][1]["message"]["model"] == "metacode-7b"
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"] == {
        "input_tokens": 30,
        "output_tokens": 12,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 20,
    }


def test_openai_in_stream_error_becomes_anthropic_error_event() -> None:
    t = OpenAIChunksToAnthropicEvents()
    raw = t.feed(None, _chunk({"content": "a"})) + t.feed(None, {"error": {"message": "boom", "type": "server_error"}})
    name, data = _events(raw)[-1]
    assert name == "error" and data == {"type": "error", "error": {"type": "server_error", "message": "boom"}}
    assert t.close() == []


def test_anthropic_events_to_openai_chunks() -> None:
    t = AnthropicEventsToOpenAIChunks()
    usage0 = {"input_tokens": 40, "cache_read_input_tokens": 50, "cache_creation_input_tokens": 10, "output_tokens": 1}
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "message_start",
            {"type": "message_start", "message": {"id": "msg_5", "model": "metaclaude", "usage": usage0}},
        ),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 2,
                "content_block": {"type": "tool_use", "id": "toolu_3", "name": "w", "input": {}},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": '{"a":1}'},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 17}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    raw: list[bytes] = []
    for name, data in events:
        raw += t.feed(name, data)
    assert raw[-1] == b"data: [DONE]\n\n"
    assert t.close() == []
    chunks = [data for _, data in _events(raw)]
    assert chunks[-1] == "[DONE]"
    body = chunks[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "msg_5" for c in body)
    assert body[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in body if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Hi"
    calls = [tc for d in deltas for tc in d.get("tool_calls") or ()]
    assert calls[0] == {"index": 0, "id": "toolu_3", "type": "function", "function": {"name": "w", "arguments": ""}}
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"a":1}'
    assert body[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert body[-1]["choices"] == []
    assert body[-1]["usage"]["prompt_tokens"] == 100  # 40 uncached + 50 read + 10 written
    assert body[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 50
    assert body[-1]["usage"]["completion_tokens"] == 17  # message_delta usage is cumulative: it replaces


def test_anthropic_error_event_becomes_openai_error_chunk() -> None:
    t = AnthropicEventsToOpenAIChunks()
    raw = t.feed("error", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert _events(raw) == [
        (None, {"error": {"message": "busy", "type": "overloaded_error", "param": None, "code": None}})
    ]


def test_sse_parser_handles_any_chunking_and_line_endings() -> None:
    raw = b'event: a\r\ndata: {"x":1}\r\n\r\n: comment\n\ndata: line1\ndata: line2\n\nevent: b\rdata: 2\r\r'
    whole = SSEParser()
    expected = whole.feed(raw) + whole.flush()
    assert expected == [("a", '{"x":1}'), (None, "line1\nline2"), ("b", "2")]
    bytewise = SSEParser()
    got: list[tuple[str | None, str]] = []
    for i in range(len(raw)):
        got += bytewise.feed(raw[i : i + 1])
    assert got + bytewise.flush() == expected


# ---------------------------------------------------------------------------------------------------------------
# end to end, with the real SDKs


CLAUDE_TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER_SCHEMA}]
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def to_openai(srv: StandInServer, otel: Any, monkeypatch: pytest.MonkeyPatch) -> tokenbudget.Guard:
    """Claude calls downgraded to an in-house chat-completions server (a zero-priced model fits any budget)."""
    monkeypatch.setenv("METACODE_KEY", "mc-secret")
    return tokenbudget.install(
        {
            "ledger": "memory://",
            "budgets": [{"scope": "org", "limit_usd": 0.000001, "on_exhaust": "downgrade"}],
            "downgrade": {
                "claude-haiku-4-5": {
                    "model": "metacode-7b",
                    "base_url": srv.openai_base_url,
                    "api": "openai",
                    "api_key_env": "METACODE_KEY",
                }
            },
            "prices": {"metacode-7b": {"input": 0, "output": 0}},
        }
    )


@pytest.fixture
def to_anthropic(srv: StandInServer, otel: Any, monkeypatch: pytest.MonkeyPatch) -> tokenbudget.Guard:
    """GPT calls downgraded to an in-house Anthropic-messages server."""
    monkeypatch.setenv("METACLAUDE_KEY", "mcl-secret")
    return tokenbudget.install(
        {
            "ledger": "memory://",
            "budgets": [{"scope": "org", "limit_usd": 0.000001, "on_exhaust": "downgrade"}],
            "downgrade": {
                "gpt-4o-mini": {
                    "model": "metaclaude",
                    "base_url": srv.anthropic_base_url,
                    "api": "anthropic",
                    "api_key_env": "METACLAUDE_KEY",
                }
            },
            "prices": {"metaclaude": {"input": 0, "output": 0}},
        }
    )


def _settled(guard: tokenbudget.Guard, status: str = "ok") -> Any:
    (event,) = guard.ledger.events()
    assert event.status == status and event.decision == "downgrade" and event.cost_micros == 0
    assert guard.ledger.active_reservations(now=guard.clock.now()) == []
    return event


def test_anthropic_caller_served_by_chat_server(
    to_openai: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer, otel: Any
) -> None:
    srv.reply = Reply(text="Hi from metacode.", input_tokens=120, output_tokens=6, cached_tokens=20)
    m = anthropic_client.messages.create(
        model="claude-haiku-4-5", max_tokens=200, system="Be brief.", messages=MSG, stop_sequences=["END"]
    )
    assert isinstance(m, anthropic.types.Message)
    assert m.content[0].type == "text" and m.content[0].text == "Hi from metacode."
    assert m.stop_reason == "end_turn" and m.model == "metacode-7b"
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens, m.usage.output_tokens) == (100, 20, 6)
    (req,) = srv.requests
    assert req.method == "POST" and req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer mc-secret"
    assert "x-api-key" not in req.headers  # the caller's Anthropic key never goes to the in-house server
    assert req.body == {
        "model": "metacode-7b",
        "max_tokens": 200,
        "stop": ["END"],
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
    }
    event = _settled(to_openai)
    assert (event.model, event.original_model) == ("metacode-7b", "claude-haiku-4-5")
    assert (event.input_tokens, event.cache_read_tokens, event.output_tokens) == (120, 20, 6)
    (span,) = otel.spans()
    assert span.attributes["tokenbudget.decision"] == "downgrade"
    assert span.attributes["tokenbudget.original_model"] == "claude-haiku-4-5"
    assert span.attributes["gen_ai.usage.input_tokens"] == 120


def test_anthropic_caller_stream_true(to_openai: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer) -> None:
    srv.reply = Reply(text="one two three", input_tokens=40, output_tokens=3)
    with anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MSG, stream=True) as s:
        events = list(s)
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "one two three"
    assert events[-2].usage.input_tokens == 40 and events[-2].usage.output_tokens == 3
    assert srv.requests[0].body is not None and srv.requests[0].body["stream_options"] == {"include_usage": True}
    event = _settled(to_openai)
    assert (event.input_tokens, event.output_tokens) == (40, 3)


def test_anthropic_stream_helper_with_tool_call(
    to_openai: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer
) -> None:
    srv.reply = Reply(
        tool_call=ToolCall("get_weather", {"city": "Paris"}, id="call_42"), input_tokens=60, output_tokens=8
    )
    with anthropic_client.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=100,
        messages=MSG,
        tools=CLAUDE_TOOLS,
        tool_choice={"type": "any"},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (block,) = final.content
    assert block.type == "tool_use" and block.id == "call_42" and block.name == "get_weather"
    assert block.input == {"city": "Paris"}
    assert final.usage.input_tokens == 60 and final.usage.output_tokens == 8
    body = srv.requests[0].body
    assert body is not None
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA, "description": "Weather"},
        }
    ]
    assert body["tool_choice"] == "required" and body["stream"] is True
    _settled(to_openai)


def test_anthropic_tool_result_round_trip(
    to_openai: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer
) -> None:
    srv.reply = Reply(text="It is 21C.", stop_reason="length")
    m = anthropic_client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=100,
        tools=CLAUDE_TOOLS,
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "P"}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "21C"}]},
        ],
    )
    assert m.stop_reason == "max_tokens"
    body = srv.requests[0].body
    assert body is not None
    assert body["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"P"}'}
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": "21C"}


def test_anthropic_raw_response(to_openai: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer) -> None:
    raw = anthropic_client.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["request-id"].startswith("req_standin")  # the upstream's id, under the caller's header name
    assert isinstance(raw.parse(), anthropic.types.Message)
    _settled(to_openai)


async def test_anthropic_async_caller(
    to_openai: tokenbudget.Guard, async_anthropic_client: Any, srv: StandInServer
) -> None:
    srv.reply = Reply(text="async hello", input_tokens=30, output_tokens=2)
    m = await async_anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MSG)
    assert isinstance(m, anthropic.types.Message) and m.content[0].type == "text"
    assert m.content[0].text == "async hello"
    async with async_anthropic_client.messages.stream(model="claude-haiku-4-5", max_tokens=50, messages=MSG) as s:
        text = [t async for t in s.text_stream]
        final = await s.get_final_message()
    assert "".join(text) == "async hello" and final.usage.output_tokens == 2
    events = list(to_openai.ledger.events())
    assert [e.status for e in events] == ["ok", "ok"] and all(e.model == "metacode-7b" for e in events)
    assert [e.input_tokens for e in events] == [30, 30]


def test_upstream_error_is_the_callers_own_exception(
    to_openai: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer, otel: Any
) -> None:
    srv.push(Fault(status=500))
    with pytest.raises(anthropic.InternalServerError) as info:
        anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    assert "Stand-in server fault: HTTP 500" in str(info.value)
    _settled(to_openai, "error")
    (span,) = otel.spans()
    assert span.attributes["tokenbudget.decision"] == "downgrade"


def test_cut_translated_stream_charges_the_estimate(
    to_openai: tokenbudget.Guard, anthropic_client: Any, srv: StandInServer
) -> None:
    # Chat streams report usage last, so a translated message_start carries input_tokens 0: when the stream is cut
    # before the end, the guard must still charge its input estimate, as it does for a native stream.
    srv.push(Fault(truncate_after=2, reply=Reply(text="one two three four")))
    with (
        pytest.raises(Exception, match="incomplete"),
        anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MSG, stream=True) as s,
    ):
        list(s)
    event = _settled(to_openai, "abandoned")
    assert event.input_tokens > 0 and event.output_tokens >= 1


def test_untranslatable_call_is_refused_before_sending(
    to_anthropic: tokenbudget.Guard, openai_client: Any, srv: StandInServer
) -> None:
    with pytest.raises(ConfigError, match="n: "):
        openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG, n=2)
    assert srv.requests == []
    _settled(to_anthropic, "unsent")


def test_openai_caller_served_by_anthropic_server(
    to_anthropic: tokenbudget.Guard, openai_client: Any, srv: StandInServer, otel: Any
) -> None:
    srv.reply = Reply(text="Hi from metaclaude.", input_tokens=150, output_tokens=5, cached_tokens=40)
    c = openai_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "Be brief."}, *MSG],
        temperature=0.3,
        stop=["END"],
    )
    assert isinstance(c, openai.types.chat.ChatCompletion)
    assert c.choices[0].message.content == "Hi from metaclaude." and c.choices[0].finish_reason == "stop"
    assert c.usage is not None and c.usage.prompt_tokens == 150 and c.usage.completion_tokens == 5
    assert c.usage.prompt_tokens_details is not None and c.usage.prompt_tokens_details.cached_tokens == 40
    (req,) = srv.requests
    assert req.path == "/v1/messages"
    assert req.headers["anthropic-version"] == "2023-06-01" and req.headers["x-api-key"] == "mcl-secret"
    assert "authorization" not in req.headers
    assert req.body == {
        "model": "metaclaude",
        "max_tokens": DEFAULT_MAX_TOKENS,
        "temperature": 0.3,
        "stop_sequences": ["END"],
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "hello"}],
    }
    event = _settled(to_anthropic)
    assert (event.input_tokens, event.cache_read_tokens, event.output_tokens) == (150, 40, 5)
    (span,) = otel.spans()
    assert span.attributes["tokenbudget.original_model"] == "gpt-4o-mini"


def test_openai_caller_stream_and_tool_call(
    to_anthropic: tokenbudget.Guard, openai_client: Any, srv: StandInServer
) -> None:
    srv.reply = Reply(
        tool_call=ToolCall("get_weather", {"city": "Rome"}, id="toolu_7"), input_tokens=70, output_tokens=4
    )
    stream = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=MSG, tools=OPENAI_TOOLS, tool_choice="auto", stream=True
    )
    chunks = list(stream)
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert all(c.choices for c in chunks), "the usage chunk the caller did not ask for stays hidden"
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].id == "toolu_7" and calls[0].function is not None and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls if tc.function)) == {"city": "Rome"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    body = srv.requests[0].body
    assert body is not None and body["tools"] == [{"name": "get_weather", "input_schema": WEATHER_SCHEMA}]
    assert body["tool_choice"] == {"type": "auto"} and "stream_options" not in body
    event = _settled(to_anthropic)
    assert (event.input_tokens, event.output_tokens) == (70, 4)


def test_openai_caller_stream_with_usage(
    to_anthropic: tokenbudget.Guard, openai_client: Any, srv: StandInServer
) -> None:
    srv.reply = Reply(text="a b", input_tokens=20, output_tokens=2, cached_tokens=5)
    chunks = list(
        openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a b"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (20, 2)
    _settled(to_anthropic)


async def test_openai_async_caller(
    to_anthropic: tokenbudget.Guard, async_openai_client: Any, srv: StandInServer
) -> None:
    srv.reply = Reply(text="async hi", input_tokens=25, output_tokens=2)
    c = await async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=30)
    assert c.choices[0].message.content == "async hi"
    assert srv.requests[0].body is not None and srv.requests[0].body["max_tokens"] == 30
    stream = await async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "async hi"
    events = list(to_anthropic.ledger.events())
    assert [e.status for e in events] == ["ok", "ok"] and [e.output_tokens for e in events] == [2, 2]


async def test_openai_async_upstream_error(
    to_anthropic: tokenbudget.Guard, async_openai_client: Any, srv: StandInServer
) -> None:
    srv.push(Fault(status=500))
    with pytest.raises(openai.InternalServerError, match="Stand-in server fault"):
        await async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    _settled(to_anthropic, "error")
