"""Estimator: exact where tiktoken is, documented approximations elsewhere, cached, never crashing on odd input."""

from __future__ import annotations

import base64
import logging
import math
import os
import random
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tokenbudget import estimate
from tokenbudget.calls import CallRequest
from tokenbudget.errors import ConfigError
from tokenbudget.estimate import Estimator

_SHARED = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_SHARED)

O200K = tiktoken.get_encoding("o200k_base")
CL100K = tiktoken.get_encoding("cl100k_base")


def chat(model: str = "gpt-4o", **body: Any) -> CallRequest:
    return CallRequest(provider="openai", operation="chat", model=model, body=body)


def claude(model: str = "claude-sonnet-4-5", **body: Any) -> CallRequest:
    return CallRequest(provider="anthropic", operation="chat", model=model, body=body, api="anthropic")


def claude_text(text: str) -> int:
    return math.ceil(len(CL100K.encode_ordinary(text)) * 11 / 10)


@pytest.fixture
def est() -> Estimator:
    return Estimator()


# ---------------------------------------------------------------------------------------------------------------------
# images built byte by byte (no Pillow)


def png(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def jpeg(width: int, height: int, exif_bytes: int = 0) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + exif_bytes) + b"\x00" * exif_bytes if exif_bytes else b""
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + app1 + sof0 + b"\xff\xd9"


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00;"


def webp(width: int, height: int, kind: str) -> bytes:
    if kind == "VP8X":
        payload = b"\x00" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    elif kind == "VP8L":
        bits = (width - 1) | ((height - 1) << 14)
        payload = b"\x2f" + bits.to_bytes(4, "little")
    else:
        payload = b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", width, height)
    chunk = kind.encode() + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def pdf(pages: int) -> bytes:
    objects = [b"1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj"]
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages)).encode()
    objects.append(b"2 0 obj << /Type /Pages /Kids [" + kids + b"] /Count " + str(pages).encode() + b" >> endobj")
    objects += [f"{3 + i} 0 obj << /Type /Page /Parent 2 0 R >> endobj".encode() for i in range(pages)]
    return b"%PDF-1.4\n" + b"\n".join(objects) + b"\n%%EOF\n"


# ---------------------------------------------------------------------------------------------------------------------
# encodings


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-4.5", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5.1-codex", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4", "o200k_base"),
        ("gpt-oss-120b", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("ft:gpt-4o-mini:acme::abc123", "o200k_base"),
        ("GPT-4O", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("davinci-002", "cl100k_base"),
        ("babbage-002", "cl100k_base"),
        ("text-davinci-003", "cl100k_base"),
        ("claude-sonnet-4-5", "cl100k_base"),
        ("us.anthropic.claude-3-5-haiku-20241022-v1:0", "cl100k_base"),
        ("my-inhouse-llama", "o200k_base"),
        ("", "o200k_base"),
    ],
)
def test_encoding_name(est: Estimator, model: str, expected: str) -> None:
    assert est.encoding_name(model) == expected


def test_text_tokens_match_tiktoken(est: Estimator) -> None:
    for text in ["hello world", "Grüße, 世界! 🎉", "def f(x):\n    return x ** 2\n", "  spaced   out  ", "1234567"]:
        assert est.text_tokens("gpt-4o", text) == len(O200K.encode(text))
        assert est.text_tokens("gpt-4", text) == len(CL100K.encode(text))
        assert est.text_tokens("claude-opus-4-1", text) == claude_text(text)
    assert est.text_tokens("gpt-4o", "") == 0


def test_special_token_text_never_raises(est: Estimator) -> None:
    text = "before <|endoftext|> middle <|im_start|> after"
    expected = len(O200K.encode(text, disallowed_special=()))
    assert est.text_tokens("gpt-4o", text) == expected
    base = est.input_tokens(chat(messages=[{"role": "user", "content": "x"}]))
    got = est.input_tokens(chat(messages=[{"role": "user", "content": text}]))
    assert got - base == expected - 1


def test_chunked_encoding_is_exact() -> None:
    rng = random.Random(7)
    vocab = [
        "the",
        "cat",
        "Über",
        "naïve",
        "東京",
        "🎉",
        "x=1;",
        "foo()",
        "'s",
        "I'm",
        "123456",
        "3.14",
        "--",
        "...",
        "\n",
    ]
    seps = [" ", " ", " ", "  ", "\n", "\t", ", ", ""]
    text = "".join(rng.choice(vocab) + rng.choice(seps) for _ in range(60_000))
    assert len(text) > 5 * estimate.CHUNK_CHARS
    for encoding in (O200K, CL100K):
        assert estimate._encode_len(encoding, text) == len(encoding.encode_ordinary(text))


def test_cookbook_message_overhead(est: Estimator) -> None:
    # The example from OpenAI's cookbook "How to count tokens with tiktoken", counted by its num_tokens_from_messages.
    messages = [
        {
            "role": "system",
            "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
            "into plain English.",
        },
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Things working well together will increase revenue.",
        },
        {
            "role": "system",
            "name": "example_user",
            "content": "Let's circle back when we have more time to touch base "
            "on opportunities for increased leverage.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Let's talk later when we're less busy about how to do better.",
        },
        {
            "role": "user",
            "content": "This late pivot means we don't have time to boil the ocean for the client project.",
        },
    ]

    def cookbook(encoding: tiktoken.Encoding) -> int:
        tokens = 0
        for message in messages:
            tokens += 3
            for key, value in message.items():
                tokens += len(encoding.encode(value))
                if key == "name":
                    tokens += 1
        return tokens + 3

    assert est.input_tokens(chat("gpt-4o", messages=messages)) == cookbook(O200K)
    assert est.input_tokens(chat("gpt-4o-mini", messages=messages)) == cookbook(O200K)
    assert est.input_tokens(chat("gpt-4-0613", messages=messages)) == cookbook(CL100K)


def test_tool_calls_tools_and_response_format(est: Estimator) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    base = est.input_tokens(chat(messages=[{"role": "user", "content": "hi"}]))
    with_tools = est.input_tokens(chat(messages=[{"role": "user", "content": "hi"}], tools=[tool, tool]))
    tool_json = estimate._json(tool)
    assert with_tools - base == 2 * (len(O200K.encode(tool_json)) + 10) + 12

    args = '{"city": "Paris"}'
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    enc = O200K.encode
    expected = (
        3 + len(enc("assistant")) + len(enc("get_weather")) + len(enc(args))
        + 3 + len(enc("tool")) + len(enc("call_1")) + len(enc("sunny"))
        + 3
    )  # fmt: skip
    assert est.input_tokens(chat(messages=messages)) == expected

    schema = {"name": "out", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}
    fmt = est.input_tokens(chat(messages=[], response_format={"type": "json_schema", "json_schema": schema}))
    assert fmt == 3 + len(O200K.encode(estimate._json(schema)))
    assert est.input_tokens(chat(messages=[], response_format={"type": "json_object"})) == 3


# ---------------------------------------------------------------------------------------------------------------------
# images


def image_cost(est: Estimator, model: str, url: str, detail: str | None = None) -> int:
    spec: dict[str, Any] = {"url": url} if detail is None else {"url": url, "detail": detail}
    with_image = chat(model, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": spec}]}])
    without = chat(model, messages=[{"role": "user", "content": []}])
    return est.input_tokens(with_image) - est.input_tokens(without)


def test_image_header_parsing() -> None:
    assert estimate._image_dims(png(640, 480)) == (640, 480)
    assert estimate._image_dims(jpeg(800, 600)) == (800, 600)
    assert estimate._image_dims(gif(33, 44)) == (33, 44)
    for kind in ("VP8X", "VP8L", "VP8 "):
        assert estimate._image_dims(webp(300, 200, kind)) == (300, 200)
    assert estimate._image_dims(b"not an image at all") is None
    url = data_url(jpeg(2048, 4096, exif_bytes=60_000), "image/jpeg")  # SOF far past the first base64 chunk
    assert estimate._b64_image_dims(url, url.index(",") + 1) == (2048, 4096)


@pytest.mark.parametrize(
    ("image", "detail", "expected"),
    [
        (png(1024, 1024), "low", 85),
        (png(4000, 3000), "low", 85),
        (png(512, 512), "high", 255),
        (png(1024, 1024), "high", 765),
        (png(1024, 1024), "auto", 765),
        (png(1024, 1024), None, 765),
        (jpeg(2048, 4096), "high", 1105),
        (gif(100, 100), "high", 255),
        (webp(1536, 512, "VP8X"), "high", 85 + 170 * 3),
    ],
)
def test_openai_image_tiles(est: Estimator, image: bytes, detail: str | None, expected: int) -> None:
    assert image_cost(est, "gpt-4o", data_url(image), detail) == expected


def test_openai_image_defaults_and_model_rules(est: Estimator) -> None:
    assert image_cost(est, "gpt-4o", "https://example.com/cat.png", "high") == 765  # size unknown: 1024x1024
    assert image_cost(est, "gpt-4o", "data:image/png;base64,!!!not-base64!!!", "high") == 765
    assert image_cost(est, "gpt-4o-mini", data_url(png(512, 512)), "high") == 2833 + 5667
    assert image_cost(est, "gpt-4o-mini", data_url(png(512, 512)), "low") == 2833
    assert estimate._patch_count(1800, 2400) == 1452  # OpenAI's documented example
    assert estimate._patch_count(1024, 1024) == 1024
    assert image_cost(est, "gpt-4.1-mini", data_url(png(1024, 1024)), "low") == math.ceil(1024 * 1.62)
    assert image_cost(est, "o4-mini", data_url(png(1800, 2400))) == math.ceil(1452 * 1.72)


def test_responses_api(est: Estimator) -> None:
    enc = O200K.encode
    assert est.input_tokens(chat(input="Tell me a joke")) == 3 + 1 + len(enc("Tell me a joke")) + 3
    body: dict[str, Any] = {
        "instructions": "Be brief.",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in this image?"},
                    {"type": "input_image", "image_url": data_url(png(512, 512)), "detail": "high"},
                ],
            },
            {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"q": 1}'},
            {"type": "function_call_output", "call_id": "c1", "output": "found it"},
            {"type": "item_reference", "id": "msg_1"},
        ],
        "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
    }
    expected = (
        3 + len(enc("Be brief."))
        + 3 + 1 + len(enc("What is in this image?")) + 255
        + len(enc("lookup")) + len(enc('{"q": 1}'))
        + len(enc("found it"))
        + len(enc(estimate._json(body["tools"][0]))) + 10 + 12
        + 3
    )  # fmt: skip
    assert est.input_tokens(chat(**body)) == expected
    assert est.input_tokens(chat(previous_response_id="resp_1")) == 3  # server-side history is not visible


def test_completions_and_embeddings(est: Estimator) -> None:
    def run(operation: str, field: str, value: Any) -> int:
        return est.input_tokens(CallRequest("openai", operation, "text-embedding-3-small", {field: value}))

    words = len(CL100K.encode("hello world"))
    for operation, field in (("embeddings", "input"), ("text_completion", "prompt")):
        assert run(operation, field, "hello world") == words
        assert run(operation, field, ["hello world", "hello world"]) == 2 * words
        assert run(operation, field, [1, 2, 3, 4]) == 4
        assert run(operation, field, [[1, 2], [3, 4, 5]]) == 5
        assert run(operation, field, ("hello world",)) == words
    with pytest.raises(ConfigError) as info:
        run("embeddings", "model_only", None)
    assert info.value.key == "input"


# ---------------------------------------------------------------------------------------------------------------------
# Anthropic


def test_anthropic_text_uses_documented_factor(est: Estimator) -> None:
    text = "Hello, Claude. Please summarise the attached quarterly report in three bullet points."
    got = est.input_tokens(claude(messages=[{"role": "user", "content": text}]))
    assert got == claude_text(text) + estimate.CLAUDE_TOKENS_PER_MESSAGE + estimate.CLAUDE_REQUEST_OVERHEAD
    assert got > len(CL100K.encode(text))  # the factor rounds up


def test_anthropic_blocks(est: Estimator) -> None:
    system = [{"type": "text", "text": "You are terse."}]
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}},
            ],
        },
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "the user wants weather", "signature": "sig"},
            {"type": "tool_use", "id": "tu1", "name": "weather", "input": {"city": "Oslo"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "tu1", "content": [{"type": "text", "text": "cold"}]},
        ]},
    ]  # fmt: skip
    images = {(1000, 1000): 1334, (200, 200): 54, (2000, 1000): 1600}
    for (width, height), image_tokens in images.items():
        messages[0]["content"][1]["source"]["data"] = base64.b64encode(png(width, height)).decode()
        got = est.input_tokens(claude(system=system, messages=messages))
        text = ["You are terse.", "look", "the user wants weather", "weather", '{"city":"Oslo"}', "cold"]
        text_tokens = sum(len(CL100K.encode_ordinary(t)) for t in text)
        assert got == math.ceil(text_tokens * 1.1) + image_tokens + 3 * 3 + 3

    url_image = {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}}
    base = est.input_tokens(claude(messages=[{"role": "user", "content": []}]))
    assert est.input_tokens(claude(messages=[{"role": "user", "content": [url_image]}])) - base == 1600


def test_anthropic_tools_documents_and_system_string(est: Estimator) -> None:
    tool = {"name": "weather", "description": "Get weather", "input_schema": {"type": "object"}}
    base = est.input_tokens(claude(system="sys", messages=[]))
    assert base == claude_text("sys") + 3
    with_tools = est.input_tokens(claude(system="sys", messages=[], tools=[tool]))
    text_tokens = len(CL100K.encode("sys")) + len(CL100K.encode(estimate._json(tool)))
    assert with_tools == math.ceil(text_tokens * 1.1) + 346 + 3

    def doc(source: dict[str, Any]) -> int:
        block = {"type": "document", "source": source}
        return est.input_tokens(claude(messages=[{"role": "user", "content": [block]}])) - est.input_tokens(
            claude(messages=[{"role": "user", "content": []}])
        )

    pdf_source = {"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(pdf(3)).decode()}
    assert doc(pdf_source) == 3 * estimate.PDF_TOKENS_PER_PAGE
    assert doc({"type": "url", "url": "https://example.com/a.pdf"}) == estimate.UNKNOWN_FILE_TOKENS
    assert doc({"type": "text", "media_type": "text/plain", "data": "plain words"}) == claude_text("plain words")
    # OpenAI's file part, same estimate
    part = {"type": "file", "file": {"file_data": data_url(pdf(2), "application/pdf")}}
    base = est.input_tokens(chat(messages=[{"role": "user", "content": []}]))
    assert est.input_tokens(chat(messages=[{"role": "user", "content": [part]}])) - base == 2 * 3000


def test_claude_through_openai_wire_uses_factor(est: Estimator) -> None:
    text = "Compatibility endpoints still bill Claude tokens."
    got = est.input_tokens(chat("claude-3-7-sonnet", messages=[{"role": "user", "content": text}]))
    raw = 3 + len(CL100K.encode("user")) + len(CL100K.encode(text)) + 3
    assert got == math.ceil((raw - 6) * 1.1) + 6


# ---------------------------------------------------------------------------------------------------------------------
# odd input


class PydMessage(BaseModel):
    role: str
    content: str | None = None


class NotGiven:
    def __bool__(self) -> bool:
        return False


class Unserialisable:
    def __repr__(self) -> str:
        return "<Unserialisable thing>"


def test_pydantic_tuples_none_and_numbers(est: Estimator) -> None:
    as_dicts = est.input_tokens(chat(messages=[{"role": "user", "content": "hi there"}]))
    assert est.input_tokens(chat(messages=[PydMessage(role="user", content="hi there")])) == as_dicts
    assert est.input_tokens(chat(messages=({"role": "user", "content": ("hi there",)},))) == as_dicts
    assert est.input_tokens(chat(messages=[{"role": "user", "content": None}])) == 3 + 1 + 3
    assert est.input_tokens(chat(messages=[{"role": "user", "content": 42}])) == 3 + 1 + len(O200K.encode("42")) + 3
    assert est.input_tokens(chat(messages=[{"role": "user", "content": "x"}], tools=NotGiven())) > 0
    assert est.input_tokens(chat(messages="just a string")) == 3 + len(O200K.encode("just a string")) + 3
    assert est.input_tokens(chat(messages=[7, None, b"bytes"])) > 9
    assert est.input_tokens(chat(messages=[{"role": "user", "content": [{"weird": object()}]}])) > 0


def test_lone_surrogates_and_odd_unicode(est: Estimator) -> None:
    text = "ok \ud800 broken \udfff pair \U0001f600 zero\u200bwidth"
    assert est.text_tokens("gpt-4o", text) == len(O200K.encode_ordinary(text))
    assert est.input_tokens(chat(messages=[{"role": "user", "content": text}])) > 0
    assert est.input_tokens(claude(messages=[{"role": "user", "content": text}])) > 0
    tool = {"name": "f\ud800", "input_schema": {"x": "\udc00"}}
    assert est.input_tokens(claude(messages=[], tools=[tool])) > 346


def test_unserialisable_and_circular_tool_schemas(est: Estimator) -> None:
    circular: dict[str, Any] = {"type": "object"}
    circular["self"] = circular
    tools: list[Any] = [
        {"type": "function", "function": {"name": "f", "parameters": {"x": Unserialisable(), "s": {1, 2}}}},
        {"type": "function", "function": {"name": "g", "parameters": circular}},
        {(1, 2): "tuple key"},
        Unserialisable(),
    ]
    got = est.input_tokens(chat(messages=[], tools=tools))
    assert got > 4 * 10 + 12 + 3
    assert est.input_tokens(claude(messages=[{"role": "user", "content": [{"type": "tool_use", "input": circular}]}]))


def test_huge_strings(est: Estimator) -> None:
    big = "lorem ipsum dolor sit amet " * 400_000  # 10.8 MB
    assert est.text_tokens("gpt-4o", big) == len(O200K.encode_ordinary(big))
    # one million spaces makes tiktoken itself panic (a BaseException); chunking must keep us clear of that
    spaces = "x" + " " * 1_000_000 + "y"
    assert est.input_tokens(chat(messages=[{"role": "user", "content": spaces}])) > 1000
    run = "a" * 300_000  # no split points at all: cut hard, still about right
    assert abs(est.text_tokens("gpt-4o", run) - len(O200K.encode_ordinary(run))) <= 300_000 // 4096 + 1


def test_nothing_countable_raises_config_error(est: Estimator) -> None:
    for body in ({}, {"messages": None}, {"messages": iter([{"role": "user", "content": "x"}])}):
        with pytest.raises(ConfigError) as info:
            est.input_tokens(chat(**body))
        assert info.value.key == "messages"
    with pytest.raises(ConfigError) as info:
        est.input_tokens(claude(messages=None))
    assert info.value.key == "messages"
    with pytest.raises(ConfigError) as info:
        est.input_tokens(CallRequest("openai", "chat", "gpt-4o", None))  # type: ignore[arg-type]
    assert info.value.key == "body"
    # wrong shape but something else is countable: estimate, don't refuse
    assert est.input_tokens(chat(messages=None, tools=[{"type": "function", "function": {"name": "f"}}])) > 0
    assert est.input_tokens(claude(messages=None, system="sys")) > 0
    assert est.input_tokens(chat(messages=[])) == 3
    with pytest.raises(ConfigError):
        Estimator(cache_chars=-1)


# ---------------------------------------------------------------------------------------------------------------------
# no encoding: estimate and warn once


def test_fallback_warns_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(name: str) -> Any:
        raise OSError(f"no cached {name} and no network")

    monkeypatch.setattr(estimate, "_REGISTRY", estimate._EncodingRegistry(broken))
    caplog.set_level(logging.WARNING, logger="tokenbudget.estimate")
    first, second = Estimator(), Estimator()
    text = "héllo wörld, fallback"
    expected = math.ceil(len(text.encode()) / 3.5)
    assert first.text_tokens("gpt-4o", text) == expected
    assert second.text_tokens("gpt-4", text) == expected
    assert first.text_tokens("claude-3-5-haiku", text) == math.ceil(expected * 1.1)
    assert first.encoding_name("gpt-4o") == "approx"
    got = second.input_tokens(chat(messages=[{"role": "user", "content": text}]))
    assert got == 3 + math.ceil(4 / 3.5) + expected + 3
    assert first.encode_calls == second.encode_calls == 0
    warnings = [r for r in caplog.records if r.name == "tokenbudget.estimate" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "TIKTOKEN_CACHE_DIR" in warnings[0].getMessage()


def test_slow_load_falls_back_then_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def slow(name: str) -> Any:
        release.wait(5)
        return tiktoken.get_encoding(name)

    registry = estimate._EncodingRegistry(slow, wait_seconds=0.05)
    monkeypatch.setattr(estimate, "_REGISTRY", registry)
    est = Estimator()
    text = "hello world " * 10
    assert est.text_tokens("gpt-4o", text) == math.ceil(len(text) / 3.5)
    release.set()
    registry._slots["o200k_base"].done.wait(5)
    assert est.text_tokens("gpt-4o", text) == len(O200K.encode(text))


def test_no_cache_in_fresh_process(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["TIKTOKEN_CACHE_DIR"] = str(tmp_path)  # empty: tiktoken would have to download
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        env[var] = "http://127.0.0.1:9"  # refused at once, with or without a real network
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    script = textwrap.dedent(
        """
        from tokenbudget import estimate
        assert not estimate._REGISTRY._slots, "encodings must not load at import"
        e = estimate.Estimator()
        print(e.text_tokens("gpt-4o", "abcdefg"), e.text_tokens("gpt-4", "abcdefg"), e.encoding_name("gpt-4o"))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "2", "approx"]
    assert result.stderr.count("cannot load tiktoken encoding") == 1


# ---------------------------------------------------------------------------------------------------------------------
# cache


def test_growing_conversation_work_is_flat(est: Estimator) -> None:
    rng = random.Random(3)
    words = ["plan", "tool", "result", "error", "retry", "file", "patch", "test", "ok", "diff", "agent", "step"]
    conversation: list[dict[str, Any]] = [{"role": "system", "content": "You are a coding agent. " * 20}]
    tools = [{"type": "function", "function": {"name": "run", "parameters": {"type": "object"}}}]
    work: list[tuple[int, int]] = []
    for turn in range(200):
        role = "user" if turn % 2 == 0 else "assistant"
        conversation.append({"role": role, "content": " ".join(rng.choice(words) for _ in range(60)) + f" #{turn}"})
        calls, chars = est.encode_calls, est.encoded_chars
        est.input_tokens(chat(messages=list(conversation), tools=tools))
        work.append((est.encode_calls - calls, est.encoded_chars - chars))
    first, last = work[0], work[-1]
    assert last[0] <= 2 * first[0]
    assert last[1] <= 2 * first[1]
    assert max(w[0] for w in work[2:]) == 1  # only the new message is tokenized
    # and the answer is still the uncached answer
    assert Estimator(cache_chars=0).input_tokens(chat(messages=conversation, tools=tools)) == est.input_tokens(
        chat(messages=conversation, tools=tools)
    )


def test_repeated_million_token_prompt_hits_cache(est: Estimator) -> None:
    prompt = "hello" + " hello" * 1_000_000
    request = chat(messages=[{"role": "user", "content": prompt}])
    first = est.input_tokens(request)
    assert first >= 1_000_000
    calls, chars, hits = est.encode_calls, est.encoded_chars, est.cache_hits
    assert est.input_tokens(request) == first
    copy = "".join(["hello", " hello" * 1_000_000])  # equal text, different object
    assert copy is not prompt
    assert est.input_tokens(chat(messages=[{"role": "user", "content": copy}])) == first
    assert (est.encode_calls, est.encoded_chars) == (calls, chars)
    assert est.cache_hits == hits + 4


def test_lru_budget_evicts_oldest() -> None:
    est = Estimator(cache_chars=3 * (10 + estimate.CACHE_ENTRY_OVERHEAD_CHARS))
    texts = [f"text-{i:05d}" for i in range(4)]  # 10 chars each: three fit
    for text in texts:
        est.text_tokens("gpt-4o", text)  # text_tokens never touches the cache
    assert est.cache_hits == est.cache_misses == 0
    for text in texts:
        est._count_texts("o200k_base", O200K, [text])
    assert est.encode_calls == 8
    est._count_texts("o200k_base", O200K, [texts[3], texts[2], texts[1]])
    assert est.encode_calls == 8
    est._count_texts("o200k_base", O200K, [texts[0]])  # evicted
    assert est.encode_calls == 9
    disabled = Estimator(cache_chars=0)
    for _ in range(3):
        disabled.input_tokens(chat(messages=[{"role": "user", "content": "same"}]))
    assert disabled.cache_hits == 0


def test_thread_safety() -> None:
    est = Estimator(cache_chars=2_000)  # small, so threads also evict under each other
    requests = [chat(messages=[{"role": "user", "content": f"message {i} " * (i + 1)}]) for i in range(30)]
    expected = [Estimator().input_tokens(r) for r in requests]
    failures: list[str] = []

    def worker(seed: int) -> None:
        order = list(range(len(requests)))
        random.Random(seed).shuffle(order)
        for _ in range(5):
            for i in order:
                if est.input_tokens(requests[i]) != expected[i]:
                    failures.append(f"request {i}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert est._used <= 2_000


# ---------------------------------------------------------------------------------------------------------------------
# fast path for plain chat requests, growing-conversation prefix reuse, preload

_WORDS = st.sampled_from(["plan", " tool", "résumé", " 🙂", "\n", "x" * 40, "<|endoftext|>", " ", "", "user", "42"])
_TEXT = st.lists(_WORDS, max_size=8).map("".join)
_ROLE = st.sampled_from(["user", "assistant", "system", "developer", "tool", "function", "critic", ""])
_OPENAI_MESSAGE = st.fixed_dictionaries(
    {"role": _ROLE, "content": st.one_of(_TEXT, st.none())}, optional={"name": _TEXT}
)
_ANTHROPIC_CONTENT = st.one_of(
    _TEXT,
    st.none(),
    _TEXT.map(lambda t: [{"type": "text", "text": t}]),
    _TEXT.map(lambda t: [{"type": "text", "text": t, "cache_control": {"type": "ephemeral"}}]),
)
_ANTHROPIC_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant"]), "content": _ANTHROPIC_CONTENT}
)
_TOOLS = st.one_of(st.none(), st.just([{"type": "function", "function": {"name": "run", "parameters": {}}}]))


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(_OPENAI_MESSAGE, max_size=16),
    model=st.sampled_from(["gpt-4o", "gpt-4", "claude-sonnet-4-5"]),
    tools=_TOOLS,
    grow=st.integers(0, 3),
)
def test_fast_path_matches_generic_openai(messages: list[dict[str, Any]], model: str, tools: Any, grow: int) -> None:
    est = Estimator()
    body: dict[str, Any] = {"tools": tools} if tools else {}
    for size in sorted({max(0, len(messages) - grow), len(messages)}):  # the second call reuses the first's prefix
        request = chat(model, messages=messages[:size], **body)
        assert est.input_tokens(request) == est._input_tokens_generic(request)
        assert est.input_tokens(request) == Estimator(cache_chars=0).input_tokens(request)


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(_ANTHROPIC_MESSAGE, max_size=16),
    system=st.one_of(st.none(), _TEXT),
    tools=st.one_of(st.none(), st.just([{"name": "run", "input_schema": {"type": "object"}}])),
    grow=st.integers(0, 3),
)
def test_fast_path_matches_generic_anthropic(
    messages: list[dict[str, Any]], system: str | None, tools: Any, grow: int
) -> None:
    est = Estimator()
    body: dict[str, Any] = {"system": system, "tools": tools}
    for size in sorted({max(0, len(messages) - grow), len(messages)}):
        request = claude(messages=messages[:size], **body)
        assert est.input_tokens(request) == est._input_tokens_generic(request)
        assert est.input_tokens(request) == Estimator(cache_chars=0).input_tokens(request)


def test_role_constants_match_tiktoken(est: Estimator) -> None:
    for name, encoder in (("o200k_base", O200K), ("cl100k_base", CL100K)):
        for role, tokens in estimate._ROLE_TOKENS[name].items():
            assert tokens == len(encoder.encode_ordinary(role))
    for role, tokens in estimate._APPROX_ROLE_TOKENS.items():
        assert tokens == estimate._approx_tokens(role)
    calls = est.encode_calls
    est.input_tokens(chat(messages=[{"role": "system", "content": "hi"}, {"role": "assistant", "content": "ho"}]))
    assert est.encode_calls == calls + 2  # the contents only, never a role name
    assert ("o200k_base", "system") not in est._cache and ("o200k_base", "assistant") not in est._cache


def test_growing_conversation_counts_only_new_messages(est: Estimator) -> None:
    rng = random.Random(5)
    words = ["plan", "tool", "result", "error", "retry", "file", "patch", "test", "ok", "diff"]
    conversation: list[dict[str, Any]] = [{"role": "system", "content": "You are a coding agent. " * 20}]
    for turn in range(200):
        role = "user" if turn % 2 == 0 else "assistant"
        conversation.append({"role": role, "content": " ".join(rng.choice(words) for _ in range(60)) + f" #{turn}"})
        lookups, misses = est.cache_lookups, est.cache_misses
        got = est.input_tokens(chat(messages=list(conversation)))
        if len(conversation) > estimate.PREFIX_MIN_MESSAGES:  # shorter lists are counted in full; then new text only
            assert (est.cache_lookups - lookups, est.cache_misses - misses) == (1, 1), turn
        if turn % 50 == 0:
            assert got == Estimator(cache_chars=0).input_tokens(chat(messages=conversation))
    # same list again: nothing at all is looked up
    lookups = est.cache_lookups
    expected = Estimator(cache_chars=0).input_tokens(chat(messages=conversation))
    assert est.input_tokens(chat(messages=conversation)) == expected
    assert est.cache_lookups == lookups
    # mutated in place: same dict, new content, new role, an added name; each is noticed and counted again
    conversation[10]["content"] = "a completely different message, much longer than before " * 5
    assert est.input_tokens(chat(messages=conversation)) == Estimator(cache_chars=0).input_tokens(
        chat(messages=conversation)
    )
    conversation[20]["role"] = "developer"
    conversation[30]["name"] = "alice"
    assert est.input_tokens(chat(messages=conversation)) == Estimator(cache_chars=0).input_tokens(
        chat(messages=conversation)
    )
    del conversation[40]["content"]
    conversation[40]["content"] = conversation[41]["content"]  # same keys re-added: order and values compared
    assert est.input_tokens(chat(messages=conversation)) == Estimator(cache_chars=0).input_tokens(
        chat(messages=conversation)
    )
    conversation[50] = {"role": "user", "content": [{"type": "text", "text": "parts: the generic walker"}]}
    assert est.input_tokens(chat(messages=conversation)) == Estimator(cache_chars=0).input_tokens(
        chat(messages=conversation)
    )


def test_growing_anthropic_conversation_and_mutated_block(est: Estimator) -> None:
    history: list[dict[str, Any]] = []
    for turn in range(60):
        content: Any = f"message {turn} " * 10
        if turn % 3 == 0:
            content = [{"type": "text", "text": content}]
        history.append({"role": "user" if turn % 2 == 0 else "assistant", "content": content})
        lookups = est.cache_lookups
        request = claude(messages=list(history), system="be brief")
        got = est.input_tokens(request)
        if len(history) > estimate.PREFIX_MIN_MESSAGES:
            assert est.cache_lookups - lookups == 2  # the new text and the system prompt
        assert got == est._input_tokens_generic(request)
    history[3]["content"][0]["text"] = "changed in place " * 30
    request = claude(messages=history, system="be brief")
    assert est.input_tokens(request) == Estimator(cache_chars=0).input_tokens(request)
    history[6]["content"].append({"type": "text", "text": "second block"})
    request = claude(messages=history, system="be brief")
    assert est.input_tokens(request) == Estimator(cache_chars=0).input_tokens(request)


def test_interleaved_conversations_each_reuse_their_prefix(est: Estimator) -> None:
    system = {"role": "system", "content": "shared system message"}  # one dict shared by every conversation
    conversations: list[list[dict[str, Any]]] = [[system] for _ in range(4)]
    for turn in range(30):
        for i, conversation in enumerate(conversations):
            conversation.append({"role": "user", "content": f"conversation {i} turn {turn} " * 5})
            lookups = est.cache_lookups
            got = est.input_tokens(chat(messages=conversation))
            if len(conversation) > estimate.PREFIX_MIN_MESSAGES:
                assert est.cache_lookups - lookups == 1  # the new text only
            assert got == est._input_tokens_generic(chat(messages=conversation))


def test_cache_bound_honest_without_lru_refresh() -> None:
    budget = 20_000
    est = Estimator(cache_chars=budget)
    rng = random.Random(11)
    texts = [f"{i} " + "w " * rng.choice([1, 10, 300, 700, 2_000]) for i in range(400)]
    for _ in range(3):
        for text in rng.sample(texts, 150):
            est.input_tokens(chat(messages=[{"role": "user", "content": text}]))
            assert est._used <= budget
            assert est._used == sum(len(t) + estimate.CACHE_ENTRY_OVERHEAD_CHARS for _, t in est._cache)
    # a long text (>= PROMOTE_CHARS) that keeps being hit survives a flood of new short texts; a short one does not
    est = Estimator(cache_chars=10 * (estimate.PROMOTE_CHARS + 100))
    long_text = "long " * (estimate.PROMOTE_CHARS // 5 + 1)
    est.input_tokens(chat(messages=[{"role": "user", "content": long_text}]))
    est.input_tokens(chat(messages=[{"role": "user", "content": "short text"}]))
    for i in range(2_000):
        est.input_tokens(chat(messages=[{"role": "user", "content": f"filler {i:06d}"}]))
        if i % 50 == 0:
            est.input_tokens(chat(messages=[{"role": "user", "content": long_text}]))
    assert ("o200k_base", long_text) in est._cache
    assert ("o200k_base", "short text") not in est._cache


def test_preload_returns_at_once_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    release = threading.Event()

    def slow(name: str) -> Any:
        release.wait(5)
        loaded.append(name)
        return tiktoken.get_encoding(name)

    registry = estimate._EncodingRegistry(slow, wait_seconds=10)
    monkeypatch.setattr(estimate, "_REGISTRY", registry)
    est = Estimator()
    t0 = time.perf_counter()
    est.preload()
    est.preload(["gpt-4o", "claude-sonnet-4-6", "gpt-4o-mini"])  # idempotent
    est.preload("gpt-4o")
    assert time.perf_counter() - t0 < 0.5  # never waits for the (blocked) loader
    deadline = time.monotonic() + 5
    while len(registry._slots) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert set(registry._slots) == {"o200k_base", "cl100k_base"}
    release.set()
    for slot in list(registry._slots.values()):
        assert slot.done.wait(5)
    assert sorted(loaded) == ["cl100k_base", "o200k_base"]  # each loaded once
    assert est.input_tokens(chat(messages=[{"role": "user", "content": "hello world"}])) == 3 + 1 + 2 + 3
    assert est.encoding_name("claude-sonnet-4-6") == "cl100k_base"
    assert sorted(loaded) == ["cl100k_base", "o200k_base"]


def test_preload_without_network_keeps_single_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(name: str) -> Any:
        raise OSError("no network")

    registry = estimate._EncodingRegistry(broken)
    monkeypatch.setattr(estimate, "_REGISTRY", registry)
    est = Estimator()
    with caplog.at_level(logging.WARNING, logger="tokenbudget.estimate"):
        est.preload()
        deadline = time.monotonic() + 5
        while not (len(registry._slots) == 2 and all(s.done.is_set() for s in registry._slots.values())):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert not caplog.records  # preloading never warns
        est.preload()
        request = chat(messages=[{"role": "user", "content": "hello world"}])
        assert est.input_tokens(request) == 3 + estimate._approx_tokens("user") + 4 + 3
        assert est.input_tokens(request) == est._input_tokens_generic(request)
        est.input_tokens(claude(messages=[{"role": "user", "content": "hi"}]))
    assert sum("cannot load tiktoken encoding" in r.getMessage() for r in caplog.records) == 1


def test_prefix_reused_when_the_system_dict_is_rebuilt_per_call(est: Estimator) -> None:
    system = "You are a careful coding agent."
    history: list[dict[str, Any]] = []
    for turn in range(40):
        history.append({"role": "user" if turn % 2 == 0 else "assistant", "content": f"turn {turn} " * 20})
        request = chat(messages=[{"role": "system", "content": system}, *history])  # a new system dict every call
        lookups = est.cache_lookups
        got = est.input_tokens(request)
        if turn + 1 > estimate.PREFIX_MIN_MESSAGES:
            assert est.cache_lookups - lookups == 1
        assert got == est._input_tokens_generic(request)
    # messages shifted between dicts but the same (key, value) sequence: same count, reused or not
    request = chat(messages=[{"role": "system"}, {"content": system, **history[0]}, *history[1:]])
    assert est.input_tokens(request) == Estimator(cache_chars=0).input_tokens(request)
    request = chat(messages=[{"role": "system", "content": system}, "a bare string", *history])
    assert est.input_tokens(request) == Estimator(cache_chars=0).input_tokens(request)
