"""``capture_content``: the model's answer on the call's span (``gen_ai.output.messages``), streamed or not.

Through the real SDKs against the stand-in server. The answer is put on the span in the API's own unstreamed shape
(chat ``choices``, Responses ``output``, Anthropic ``content``), so a streamed call must show exactly what the same
call unstreamed shows; off by default, where no answer text may reach a span.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

import tokenbudget
from tokenbudget.testing import Reply, StandInServer, ToolCall

MSG = [{"role": "user", "content": "what is the weather"}]
TEXT = "Forty two kittens are napping in Oslo today."
TOOL = ToolCall("get_weather", {"city": "Oslo", "unit": "celsius"}, id="call_7")


def _capture() -> None:
    tokenbudget.install({"ledger": "memory://", "capture_content": True})


def _answer(otel: Any) -> Any:
    """The one span's ``gen_ai.output.messages``, parsed."""
    (span,) = otel.spans()
    return json.loads(span.attributes["gen_ai.output.messages"])


def _chat(client: Any, stream: bool, **kw: Any) -> None:
    if stream:
        for _ in client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True, **kw):
            pass
    else:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, **kw)


def _messages(client: Any, how: str) -> None:
    kw: dict[str, Any] = {"model": "claude-haiku-4-5", "max_tokens": 200, "messages": MSG}
    if how == "create":
        client.messages.create(**kw)
    elif how == "stream=True":
        for _ in client.messages.create(stream=True, **kw):
            pass
    else:  # the helper, which posts itself instead of calling create
        with client.messages.stream(**kw) as s:
            s.until_done()


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_off_by_default_no_answer_reaches_a_span(
    guard: tokenbudget.Guard, openai_client: Any, anthropic_client: Any, srv: StandInServer, otel: Any, stream: bool
) -> None:
    srv.reply = Reply(text=TEXT)
    _chat(openai_client, stream)
    _messages(anthropic_client, "stream=True" if stream else "create")
    spans = otel.spans()
    assert len(spans) == 2
    for span in spans:
        attrs = dict(span.attributes or {})
        assert "gen_ai.output.messages" not in attrs and "kittens" not in repr(attrs)


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_openai_chat_text_answer(openai_client: Any, srv: StandInServer, otel: Any, stream: bool) -> None:
    _capture()
    srv.reply = Reply(text=TEXT)
    _chat(openai_client, stream)
    (choice,) = _answer(otel)
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == TEXT
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_openai_chat_tool_call_answer(openai_client: Any, srv: StandInServer, otel: Any, stream: bool) -> None:
    _capture()
    srv.reply = Reply(tool_call=TOOL)
    _chat(openai_client, stream)
    (choice,) = _answer(otel)
    (call,) = choice["message"]["tool_calls"]
    assert call["id"] == "call_7" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}
    assert choice["finish_reason"] == "tool_calls"


def test_a_streamed_answer_reads_as_the_same_call_unstreamed(openai_client: Any, srv: StandInServer,
                                                              otel: Any) -> None:  # fmt: skip
    """The rebuilt choices carry the same fields and values the SDK's own unstreamed choices do."""
    _capture()
    for reply in (Reply(text=TEXT), Reply(tool_call=TOOL)):
        srv.reply = reply
        seen = []
        for stream in (False, True):
            otel.exporter.clear()
            _chat(openai_client, stream)
            (choice,) = _answer(otel)
            message = choice["message"]
            seen.append((choice["index"], choice["finish_reason"], message.get("content"), message.get("tool_calls")))
        assert seen[0] == seen[1]


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_openai_legacy_completion_answer(openai_client: Any, srv: StandInServer, otel: Any, stream: bool) -> None:
    _capture()
    srv.reply = Reply(text=TEXT)
    result = openai_client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say it", stream=stream,
                                              max_tokens=50)  # fmt: skip
    if stream:
        for _ in result:
            pass
    (choice,) = _answer(otel)
    assert choice["text"] == TEXT and choice["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_openai_responses_answer(openai_client: Any, srv: StandInServer, otel: Any, stream: bool) -> None:
    _capture()
    srv.reply = Reply(text=TEXT)
    result = openai_client.responses.create(model="gpt-4o-mini", input="what is the weather", stream=stream)
    if stream:
        for _ in result:
            pass
    output = _answer(otel)
    texts = [part["text"] for item in output if item["type"] == "message" for part in item["content"]]
    assert texts == [TEXT]


@pytest.mark.parametrize("how", ["create", "stream=True", "messages.stream"])
def test_anthropic_text_answer(anthropic_client: Any, srv: StandInServer, otel: Any, how: str) -> None:
    _capture()
    srv.reply = Reply(text=TEXT)
    _messages(anthropic_client, how)
    assert _answer(otel) == [{"type": "text", "text": TEXT}]


@pytest.mark.parametrize("how", ["create", "stream=True", "messages.stream"])
def test_anthropic_tool_use_answer(anthropic_client: Any, srv: StandInServer, otel: Any, how: str) -> None:
    _capture()
    srv.reply = Reply(tool_call=TOOL)
    _messages(anthropic_client, how)
    (block,) = _answer(otel)
    assert (block["type"], block["name"], block["input"]) == ("tool_use", "get_weather",
                                                             {"city": "Oslo", "unit": "celsius"})  # fmt: skip


async def test_async_calls_capture_the_answer_too(async_openai_client: Any, async_anthropic_client: Any,
                                                  srv: StandInServer, otel: Any) -> None:  # fmt: skip
    _capture()
    srv.reply = Reply(text=TEXT)
    async for _ in await async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True):
        pass
    await async_anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=200, messages=MSG)
    answers = sorted((json.loads(s.attributes["gen_ai.output.messages"]) for s in otel.spans()), key=len)
    assert [a[0].get("text") or a[0]["message"]["content"] for a in answers] == [TEXT, TEXT]


def test_an_abandoned_stream_shows_the_part_that_arrived(openai_client: Any, anthropic_client: Any,
                                                         srv: StandInServer, otel: Any) -> None:  # fmt: skip
    _capture()
    srv.reply = Reply(text=TEXT)
    stream = openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    next(iter(stream)), next(iter(stream)), next(iter(stream))
    stream.close()
    with anthropic_client.messages.stream(model="claude-haiku-4-5", max_tokens=200, messages=MSG) as s:
        pieces = iter(s.text_stream)
        next(pieces), next(pieces)
    by_name = {s.name.split()[1]: json.loads(s.attributes["gen_ai.output.messages"]) for s in otel.spans()}
    partial_chat = by_name["gpt-4o-mini"][0]["message"]["content"]
    partial_claude = by_name["claude-haiku-4-5"][0]["text"]
    for partial in (partial_chat, partial_claude):
        assert partial and TEXT.startswith(partial) and partial != TEXT
    assert {s.attributes["tokenbudget.status"] for s in otel.spans()} == {"abandoned"}


def test_raw_responses_capture_the_answer(openai_client: Any, anthropic_client: Any, srv: StandInServer,
                                          otel: Any) -> None:  # fmt: skip
    """``with_raw_response`` (body read at once) and ``with_streaming_response`` (body read later, on close)."""
    _capture()
    srv.reply = Reply(text=TEXT)
    openai_client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG).parse()
    with anthropic_client.messages.with_streaming_response.create(
        model="claude-haiku-4-5", max_tokens=200, messages=MSG
    ) as response:
        response.read()
    answers = {s.name.split()[1]: json.loads(s.attributes["gen_ai.output.messages"]) for s in otel.spans()}
    assert answers["gpt-4o-mini"][0]["message"]["content"] == TEXT
    assert answers["claude-haiku-4-5"] == [{"type": "text", "text": TEXT}]


def test_embeddings_carry_no_answer(openai_client: Any, otel: Any) -> None:
    _capture()
    openai_client.embeddings.create(model="text-embedding-3-small", input="hello")
    (span,) = otel.spans()
    assert "gen_ai.output.messages" not in (span.attributes or {})


def test_a_huge_answer_is_cut_to_the_attribute_limit(openai_client: Any, srv: StandInServer, otel: Any) -> None:
    _capture()
    srv.reply = Reply(text="word " * 30_000, chunks=40)
    _chat(openai_client, True)
    (span,) = otel.spans()
    assert len(span.attributes["gen_ai.output.messages"]) == 100_000


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_a_call_downgraded_to_the_other_protocol_shows_the_answer_as_the_caller_got_it(
    openai_client: Any, anthropic_client: Any, srv: StandInServer, otel: Any, stream: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The answer of a translated call is captured in the caller's protocol, as the caller's SDK received it."""
    monkeypatch.setenv("IN_HOUSE_KEY", "k")
    tokenbudget.install({
        "ledger": "memory://", "capture_content": True,
        "budgets": [{"scope": "org", "limit_usd": 0.000001, "on_exhaust": "downgrade"}],
        "downgrade": {
            "gpt-4o-mini": {"model": "metaclaude", "base_url": srv.anthropic_base_url, "api": "anthropic",
                            "api_key_env": "IN_HOUSE_KEY"},
            "claude-haiku-4-5": {"model": "metacode-7b", "base_url": srv.openai_base_url, "api": "openai",
                                 "api_key_env": "IN_HOUSE_KEY"},
        },
        "prices": {"metaclaude": {"input": 0, "output": 0}, "metacode-7b": {"input": 0, "output": 0}},
    })  # fmt: skip
    srv.reply = Reply(text=TEXT)
    _chat(openai_client, stream)  # served by an Anthropic-messages server
    _messages(anthropic_client, "stream=True" if stream else "create")  # served by a chat server
    answers = {s.attributes["tokenbudget.original_model"]: json.loads(s.attributes["gen_ai.output.messages"])
               for s in otel.spans()}  # fmt: skip
    assert answers["gpt-4o-mini"][0]["message"]["content"] == TEXT
    assert answers["claude-haiku-4-5"] == [{"type": "text", "text": TEXT}]
