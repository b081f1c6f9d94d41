"""A stand-in for the OpenAI and Anthropic HTTP APIs that runs inside the test process.

The real SDK clients are pointed at it, so the code under test exercises the vendors' own request building,
response parsing, streaming, retries and error mapping, while the usage numbers it reports are exactly the ones a
test chose. It is deliberately cheap per request (keep-alive, one socket write per response, no sleeps unless a
`Fault` asks for one) because benchmarks measure the guard's overhead against it.

Usage is described once, vendor-neutrally, on a `Reply`, and each endpoint reports it in its vendor's convention:

* ``input_tokens`` is the whole prompt, *including* cache reads (``cached_tokens``) and cache writes
  (``cache_creation_tokens``). OpenAI reports it as is (``prompt_tokens``/``input_tokens``); Anthropic reports only
  the uncached remainder as ``input_tokens`` and the cache parts in their own fields.
* ``output_tokens`` *includes* ``reasoning_tokens``, as both vendors count them.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import socket
import socketserver
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "Fault",
    "RecordedRequest",
    "Reply",
    "StandInServer",
    "ToolCall",
    "estimate_input_tokens",
]

JSONDict = dict[str, Any]
Vendor = Literal["openai", "anthropic"]

_DEFAULT_TEXT = "Hello from the stand-in model."
_DEFAULT_MODEL = "stand-in-model"
_WORD = re.compile(r"\s*\S+")


def estimate_input_tokens(raw_body: bytes) -> int:
    """The prompt size the server reports when a `Reply` leaves ``input_tokens`` unset.

    A quarter of the request body's byte length (at least 1): crude, but deterministic and monotone in the prompt,
    which is all a test predicting or comparing it needs.
    """
    return max(1, len(raw_body) // 4)


@dataclass(frozen=True)
class ToolCall:
    """A function/tool call the model "decides" to make instead of answering with text."""

    name: str
    arguments: Mapping[str, object] = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True)
class Reply:
    """What the stand-in model answers; see the module docstring for how the token fields are meant.

    ``None`` token counts are derived deterministically: input from the request body (`estimate_input_tokens`, plus
    the cache fields), output as the number of streamed pieces plus ``reasoning_tokens``. ``chunks`` sets how many
    pieces the text streams in (default: one per word). ``stop_reason`` may use either vendor's vocabulary; it is
    translated for the other. ``tool_call`` replaces the text with a tool call.
    """

    text: str = _DEFAULT_TEXT
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_creation_1h_tokens: int = 0
    reasoning_tokens: int = 0
    chunks: int | None = None
    model: str | None = None
    stop_reason: str | None = None
    tool_call: ToolCall | None = None

    def __post_init__(self) -> None:
        # Reject impossible accounting here, where the test wrote it, not as a confusing number in some SDK object.
        for name in ("cached_tokens", "cache_creation_tokens", "cache_creation_1h_tokens", "reasoning_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.cache_creation_1h_tokens > self.cache_creation_tokens:
            raise ValueError("cache_creation_1h_tokens is part of cache_creation_tokens and cannot exceed it")
        if self.input_tokens is not None and self.input_tokens < self.cached_tokens + self.cache_creation_tokens:
            raise ValueError("input_tokens includes cached_tokens and cache_creation_tokens and cannot be smaller")
        if self.output_tokens is not None and self.output_tokens < self.reasoning_tokens:
            raise ValueError("output_tokens includes reasoning_tokens and cannot be smaller")
        if self.chunks is not None and self.chunks < 1:
            raise ValueError("chunks must be >= 1")


@dataclass(frozen=True)
class Fault:
    """A misbehaviour for one request, queued with `StandInServer.push`.

    ``delay`` waits first (without blocking other connections), then the rest applies; a fault with only a delay
    answers normally. ``status`` answers with that HTTP error in the vendor's JSON shape (``body`` replaces it,
    ``headers`` add to it); 429 and 5xx carry ``retry-after: 0`` and ``retry-after-ms: 1`` so SDK retries are
    immediate (Anthropic's 529 also ``x-should-retry: true``, as the real API sends). ``reset`` closes the
    connection without answering. ``truncate_after=N`` sends N SSE events and then drops the connection mid-body
    (for a non-streamed reply: N bytes of the body); combined with ``status`` on a streamed request it instead
    sends N events and then an in-stream error event, as vendors do when they fail mid-generation. ``malformed``
    puts an invalid JSON data line into a stream (or sends a non-JSON body). ``reply`` is what the faulty answer
    carries, instead of the server's default reply.
    """

    status: int | None = None
    body: Mapping[str, object] | None = None
    headers: Mapping[str, str] | None = None
    delay: float = 0.0
    reset: bool = False
    truncate_after: int | None = None
    malformed: bool = False
    reply: Reply | None = None

    def __post_init__(self) -> None:
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        if self.delay < 0:
            raise ValueError("delay must be >= 0")
        if self.truncate_after is not None and self.truncate_after < 0:
            raise ValueError("truncate_after must be >= 0")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received.

    ``headers`` keys are lower-cased; ``body`` is the parsed JSON object (None if absent or not an object); ``raw``
    is the body as sent, from which `estimate_input_tokens` derives default usage; ``time`` is `time.monotonic()` at
    arrival, so tests can measure gaps such as retry back-off.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: JSONDict | None
    time: float
    raw: bytes = b""


# --------------------------------------------------------------------------------------------------------------------
# Vendor vocabulary


_OPENAI_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_ANTHROPIC_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_OPENAI_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _split(text: str, chunks: int | None) -> list[str]:
    """Cut text into stream pieces that concatenate back to it exactly."""
    if not text:
        return []
    if chunks is None:
        pieces = _WORD.findall(text)
        if not pieces:
            return [text]
        tail = len(text) - sum(len(p) for p in pieces)
        if tail:
            pieces[-1] += text[-tail:]
        return pieces
    n = min(chunks, len(text))
    size, extra = divmod(len(text), n)
    out: list[str] = []
    start = 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(text[start:end])
        start = end
    return out


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _data_event(obj: object) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _named_event(name: str, obj: object) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


# --------------------------------------------------------------------------------------------------------------------
# One exchange: everything one reply looks like, in every endpoint's shape


class _Exchange:
    """Computes the numbers for one request once, so every shape of the answer (and every event) agrees."""

    def __init__(self, reply: Reply, body: JSONDict, raw: bytes, serial: int, model: str | None) -> None:
        self.reply = reply
        self.body = body
        self.serial = serial
        self.created = int(time.time())
        requested = body.get("model")
        self.model = reply.model or model or (requested if isinstance(requested, str) else None) or _DEFAULT_MODEL
        self.cached = reply.cached_tokens
        self.cache_write = reply.cache_creation_tokens
        self.cache_write_1h = reply.cache_creation_1h_tokens
        if reply.input_tokens is None:
            self.input = estimate_input_tokens(raw) + self.cached + self.cache_write
        else:
            self.input = reply.input_tokens
        self.fresh_input = self.input - self.cached - self.cache_write
        self.tool = reply.tool_call
        self.text = "" if self.tool is not None else reply.text
        self.pieces = _split(self.text, reply.chunks)
        self.args = json.dumps(dict(self.tool.arguments)) if self.tool is not None else ""
        self.arg_pieces = _split(self.args, reply.chunks or 2)
        self.reasoning = reply.reasoning_tokens
        if reply.output_tokens is None:
            self.output = max(1, len(self.pieces) + (1 if self.tool is not None else 0) + self.reasoning)
        else:
            self.output = reply.output_tokens
        stream_options = body.get("stream_options")
        self.include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True

    def ident(self, prefix: str) -> str:
        return f"{prefix}standin{self.serial:010d}"

    @property
    def tool_id(self) -> str:
        assert self.tool is not None
        return self.tool.id or self.ident("call_")

    def finish_reason(self) -> str:
        sr = self.reply.stop_reason
        if sr is None:
            return "tool_calls" if self.tool is not None else "stop"
        return _OPENAI_FINISH.get(sr, sr)

    def stop_reason(self) -> str:
        sr = self.reply.stop_reason
        if sr is None:
            return "tool_use" if self.tool is not None else "end_turn"
        return _ANTHROPIC_STOP.get(sr, sr)

    # ---- OpenAI usage

    def chat_usage(self) -> JSONDict:
        prompt_details: JSONDict = {"cached_tokens": self.cached, "audio_tokens": 0}
        if self.cache_write:
            prompt_details["cache_write_tokens"] = self.cache_write
        return {
            "prompt_tokens": self.input,
            "completion_tokens": self.output,
            "total_tokens": self.input + self.output,
            "prompt_tokens_details": prompt_details,
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def responses_usage(self) -> JSONDict:
        return {
            "input_tokens": self.input,
            "input_tokens_details": {"cached_tokens": self.cached, "cache_write_tokens": self.cache_write},
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.input + self.output,
        }

    # ---- OpenAI chat completions

    def _chat_base(self, obj: str) -> JSONDict:
        return {
            "id": self.ident("chatcmpl-"),
            "object": obj,
            "created": self.created,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": "fp_standin",
        }

    def chat(self) -> JSONDict:
        content = self.text if self.tool is None else None
        message: JSONDict = {"role": "assistant", "content": content, "refusal": None, "annotations": []}
        if self.tool is not None:
            message["tool_calls"] = [
                {"id": self.tool_id, "type": "function", "function": {"name": self.tool.name, "arguments": self.args}}
            ]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason()}
        return {**self._chat_base("chat.completion"), "choices": [choice], "usage": self.chat_usage()}

    def chat_stream(self) -> list[bytes]:
        base = self._chat_base("chat.completion.chunk")
        if self.include_usage:
            base["usage"] = None

        def chunk(delta: JSONDict, finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _data_event({**base, "choices": [choice]})

        if self.tool is not None:
            call = {
                "index": 0,
                "id": self.tool_id,
                "type": "function",
                "function": {"name": self.tool.name, "arguments": ""},
            }
            events = [chunk({"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]})]
            events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in self.arg_pieces]
        else:
            events = [chunk({"role": "assistant", "content": "", "refusal": None})]
            events += [chunk({"content": p}) for p in self.pieces]
        events.append(chunk({}, self.finish_reason()))
        if self.include_usage:
            events.append(_data_event({**base, "choices": [], "usage": self.chat_usage()}))
        events.append(b"data: [DONE]\n\n")
        return events

    # ---- OpenAI legacy completions

    def _legacy_finish(self) -> str:
        finish = self.finish_reason()
        return finish if finish in ("stop", "length", "content_filter") else "stop"

    def completion(self) -> JSONDict:
        choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": self._legacy_finish()}
        return {
            "id": self.ident("cmpl-"),
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_standin",
            "choices": [choice],
            "usage": self.chat_usage(),
        }

    def completion_stream(self) -> list[bytes]:
        base: JSONDict = {
            "id": self.ident("cmpl-"),
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_standin",
        }
        if self.include_usage:
            base["usage"] = None

        def chunk(text: str, finish: str | None) -> bytes:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return _data_event({**base, "choices": [choice]})

        events = [chunk(p, None) for p in self.pieces]
        events.append(chunk("", self._legacy_finish()))
        if self.include_usage:
            events.append(_data_event({**base, "choices": [], "usage": self.chat_usage()}))
        events.append(b"data: [DONE]\n\n")
        return events

    # ---- OpenAI embeddings

    def embeddings(self) -> JSONDict:
        raw_input = self.body.get("input")
        if isinstance(raw_input, list) and raw_input and not all(isinstance(x, int) for x in raw_input):
            items: list[object] = list(raw_input)
        else:
            items = [raw_input]
        as_base64 = self.body.get("encoding_format") == "base64"
        data: list[JSONDict] = []
        for index, item in enumerate(items):
            seed = zlib.crc32(repr(item).encode())
            vector = [((seed >> (4 * i)) & 0xFF) / 255.0 for i in range(8)]
            embedding: object = base64.b64encode(struct.pack("<8f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return {
            "object": "list",
            "data": data,
            "model": self.model,
            "usage": {"prompt_tokens": self.input, "total_tokens": self.input},
        }

    # ---- OpenAI Responses

    def _response_status(self) -> tuple[str, JSONDict | None]:
        finish = self.finish_reason()
        if finish == "length":
            return "incomplete", {"reason": "max_output_tokens"}
        if finish == "content_filter":
            return "incomplete", {"reason": "content_filter"}
        return "completed", None

    def _output_item(self, done: bool) -> JSONDict:
        status = "completed" if done else "in_progress"
        if self.tool is not None:
            return {
                "id": self.ident("fc_"),
                "type": "function_call",
                "status": status,
                "call_id": self.tool_id,
                "name": self.tool.name,
                "arguments": self.args if done else "",
            }
        content = [self._text_part(self.text)] if done else []
        return {"id": self.ident("msg_"), "type": "message", "status": status, "role": "assistant", "content": content}

    @staticmethod
    def _text_part(text: str) -> JSONDict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def response(self, *, final: bool) -> JSONDict:
        body = self.body
        instructions = body.get("instructions")
        text_config = body.get("text")
        tool_choice = body.get("tool_choice")
        status, incomplete = self._response_status() if final else ("in_progress", None)
        return {
            "id": self.ident("resp_"),
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": self.created if final else None,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": instructions if isinstance(instructions, str) else None,
            "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {},
            "model": self.model,
            "output": [self._output_item(done=True)] if final else [],
            "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": text_config if isinstance(text_config, dict) else {"format": {"type": "text"}},
            "tool_choice": tool_choice if isinstance(tool_choice, str) else "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation") or "disabled",
            "usage": self.responses_usage() if final else None,
            "user": None,
        }

    def responses(self) -> JSONDict:
        return self.response(final=True)

    def response_stream(self) -> list[bytes]:
        seq = itertools.count()
        item_id = self.ident("fc_" if self.tool is not None else "msg_")

        def ev(kind: str, **fields: object) -> bytes:
            return _named_event(kind, {"type": kind, "sequence_number": next(seq), **fields})

        events = [
            ev("response.created", response=self.response(final=False)),
            ev("response.in_progress", response=self.response(final=False)),
            ev("response.output_item.added", output_index=0, item=self._output_item(done=False)),
        ]
        where: JSONDict = {"item_id": item_id, "output_index": 0}
        if self.tool is not None:
            events += [ev("response.function_call_arguments.delta", **where, delta=p) for p in self.arg_pieces]
            events.append(ev("response.function_call_arguments.done", **where, arguments=self.args))
        else:
            where["content_index"] = 0
            events.append(ev("response.content_part.added", **where, part=self._text_part("")))
            events += [ev("response.output_text.delta", **where, delta=p, logprobs=[]) for p in self.pieces]
            events.append(ev("response.output_text.done", **where, text=self.text, logprobs=[]))
            events.append(ev("response.content_part.done", **where, part=self._text_part(self.text)))
        events.append(ev("response.output_item.done", output_index=0, item=self._output_item(done=True)))
        final = self.response(final=True)
        last = "response.completed" if final["status"] == "completed" else "response.incomplete"
        events.append(ev(last, response=final))
        return events

    def compacted(self) -> JSONDict:
        item = {
            "id": self.ident("cmp_"),
            "type": "compaction",
            "encrypted_content": base64.b64encode(self.text.encode()).decode(),
        }
        return {
            "id": self.ident("resp_"),
            "object": "response.compaction",
            "created_at": self.created,
            "output": [item],
            "usage": self.responses_usage(),
        }

    def input_token_count(self) -> JSONDict:
        return {"object": "response.input_tokens", "input_tokens": self.input}

    # ---- Anthropic messages

    def anthropic_usage(self, *, output: int, details: bool = True) -> JSONDict:
        usage: JSONDict = {
            "input_tokens": self.fresh_input,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cached,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.cache_write - self.cache_write_1h,
                "ephemeral_1h_input_tokens": self.cache_write_1h,
            },
            "output_tokens": output,
            "service_tier": "standard",
        }
        if self.reasoning and details:
            usage["output_tokens_details"] = {"thinking_tokens": self.reasoning}
        return usage

    def _content_blocks(self) -> list[JSONDict]:
        if self.tool is not None:
            tool_id = self.tool.id or self.ident("toolu_")
            return [{"type": "tool_use", "id": tool_id, "name": self.tool.name, "input": dict(self.tool.arguments)}]
        return [{"type": "text", "text": self.text}]

    def message(self, *, final: bool = True) -> JSONDict:
        """The whole Message, or (not final) the empty one a stream's message_start carries, with output 1."""
        return {
            "id": self.ident("msg_"),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self._content_blocks() if final else [],
            "stop_reason": self.stop_reason() if final else None,
            "stop_sequence": None,
            "usage": self.anthropic_usage(output=self.output)
            if final
            else self.anthropic_usage(output=1, details=False),
        }

    def message_stream(self) -> list[bytes]:
        events = [
            _named_event("message_start", {"type": "message_start", "message": self.message(final=False)}),
        ]
        if self.tool is not None:
            start = {**self._content_blocks()[0], "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in self.arg_pieces]
        else:
            start = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in self.pieces]
        block_start = {"type": "content_block_start", "index": 0, "content_block": start}
        events.append(_named_event("content_block_start", block_start))
        events.append(_named_event("ping", {"type": "ping"}))
        events += [
            _named_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d}) for d in deltas
        ]
        events.append(_named_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        usage = self.anthropic_usage(output=self.output)
        del usage["cache_creation"], usage["service_tier"]
        delta = {"stop_reason": self.stop_reason(), "stop_sequence": None}
        events.append(_named_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        events.append(_named_event("message_stop", {"type": "message_stop"}))
        return events

    def count_tokens(self) -> JSONDict:
        return {"input_tokens": self.input}


# --------------------------------------------------------------------------------------------------------------------
# Routing


_NON_STREAM: dict[str, tuple[Vendor, str]] = {
    "/chat/completions": ("openai", "chat"),
    "/completions": ("openai", "completion"),
    "/embeddings": ("openai", "embeddings"),
    "/responses": ("openai", "responses"),
    "/responses/compact": ("openai", "compacted"),
    "/responses/input_tokens": ("openai", "input_token_count"),
    "/messages": ("anthropic", "message"),
    "/messages/count_tokens": ("anthropic", "count_tokens"),
}
_STREAM = {
    "/chat/completions": "chat_stream",
    "/completions": "completion_stream",
    "/responses": "response_stream",
    "/messages": "message_stream",
}


def _route(path: str) -> tuple[str, str | None]:
    """Map every base-URL style the SDKs produce (``/v1/...``, Azure ``/openai/deployments/D/...``) to one route.

    Returns the route and, for Azure deployment URLs, the deployment name that stands in for the model.
    """
    deployment = None
    if path.startswith("/openai/"):
        path = path[len("/openai") :]
        if path.startswith("/deployments/"):
            parts = path.split("/", 3)  # "", "deployments", name, rest
            deployment, path = parts[2], "/" + (parts[3] if len(parts) > 3 else "")
    if path.startswith("/v1/"):
        path = path[len("/v1") :]
    return path.rstrip("/") or "/", deployment


def _error_body(vendor: Vendor, status: int, request_id: str) -> JSONDict:
    message = f"Stand-in server fault: HTTP {status}"
    if vendor == "anthropic":
        kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    kind, code = _OPENAI_ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# --------------------------------------------------------------------------------------------------------------------
# HTTP plumbing


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 resets connections when an async benchmark opens hundreds at once.
    request_queue_size = 1024
    standin: StandInServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (socket.getfqdn), which can stall for seconds on machines
        # without working DNS; nothing here uses that name.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (timeouts, resets, closed streams) are part of the job; anything else is recorded on
        # the StandInServer by the handler, so the default traceback printing is only noise.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # One write per response already; NODELAY keeps the kernel from holding small writes back on keep-alive.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.standin._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.standin._track(self.connection, add=False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        standin = self.server.standin
        split = urlsplit(self.path)
        raw = self._read_body()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        body: JSONDict | None = parsed if isinstance(parsed, dict) else None
        standin._record(
            RecordedRequest(
                method=self.command,
                path=split.path,
                query=dict(parse_qsl(split.query)),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                time=time.monotonic(),
                raw=raw,
            )
        )
        item, serial = standin._take()
        fault = item if isinstance(item, Fault) else None
        reply = item if isinstance(item, Reply) else (fault.reply if fault is not None else None) or standin.reply
        route, deployment = _route(split.path)
        vendor: Vendor = "anthropic" if route.startswith("/messages") else "openai"
        request_id = f"req_standin{serial:010d}"
        try:
            if fault is not None and fault.delay and standin._stopping.wait(fault.delay):
                self.close_connection = True
                return
            if fault is not None and fault.reset:
                self._reset()
                return
            stream = self.command == "POST" and body is not None and body.get("stream") is True and route in _STREAM
            if fault is not None and fault.status is not None and not (stream and fault.truncate_after is not None):
                self._send_error(vendor, fault.status, request_id, fault)
                return
            target = _NON_STREAM.get(route) if self.command == "POST" else None
            if target is None:
                self._send_error(vendor, 404, request_id, None)
                return
            exchange = _Exchange(reply, body or {}, raw, serial, deployment)
            if stream:
                self._send_stream(vendor, getattr(exchange, _STREAM[route])(), request_id, fault)
            else:
                self._send_json(vendor, getattr(exchange, target[1])(), request_id, fault)
        except OSError:
            self.close_connection = True
        except Exception as exc:  # a bug in the stand-in itself: make it visible to the test, not a silent hang
            standin._record_error(exc)
            try:
                self._send_error(vendor, 500, request_id, Fault(status=500, body={"error": {"message": repr(exc)}}))
            except OSError:
                self.close_connection = True

    # ---- writers

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        reason = self.responses.get(status, ("Overloaded" if status == 529 else "Error",))[0]
        lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @staticmethod
    def _id_header(vendor: Vendor, request_id: str) -> tuple[str, str]:
        return ("request-id" if vendor == "anthropic" else "x-request-id", request_id)

    def _send_json(self, vendor: Vendor, obj: JSONDict, request_id: str, fault: Fault | None) -> None:
        payload = b'{"id": "broken' if fault is not None and fault.malformed else _dumps(obj)
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            self._id_header(vendor, request_id),
        ]
        if fault is not None and fault.truncate_after is not None:
            self.wfile.write(self._head(200, headers) + payload[: fault.truncate_after])
            self._hang_up()
            return
        self.wfile.write(self._head(200, headers) + payload)

    def _send_error(self, vendor: Vendor, status: int, request_id: str, fault: Fault | None) -> None:
        custom = fault.body if fault is not None else None
        payload = _dumps(dict(custom) if custom is not None else _error_body(vendor, status, request_id))
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        headers.append(self._id_header(vendor, request_id))
        if status == 429 or status >= 500:
            headers += [("retry-after", "0"), ("retry-after-ms", "1")]
        if vendor == "anthropic" and status == 529:
            headers.append(("x-should-retry", "true"))
        if fault is not None and fault.headers:
            overridden = {k.lower() for k in fault.headers}
            headers = [(k, v) for k, v in headers if k.lower() not in overridden] + list(fault.headers.items())
        self.wfile.write(self._head(status, headers) + payload)

    def _send_stream(self, vendor: Vendor, events: list[bytes], request_id: str, fault: Fault | None) -> None:
        hang_up = False
        if fault is not None:
            if fault.malformed:
                garbage = b"data: {not json\n\n"
                if vendor == "anthropic":
                    garbage = b"event: content_block_delta\n" + garbage
                elif events[0].startswith(b"event:"):
                    garbage = b"event: response.output_text.delta\n" + garbage
                events.insert(min(2, len(events)), garbage)
            if fault.truncate_after is not None:
                events = events[: fault.truncate_after]
                if fault.status is not None:
                    custom = fault.body
                    error = dict(custom) if custom is not None else _error_body(vendor, fault.status, request_id)
                    events.append(_named_event("error", error) if vendor == "anthropic" else _data_event(error))
                else:
                    hang_up = True
        headers = [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"),
            ("Transfer-Encoding", "chunked"),
            self._id_header(vendor, request_id),
        ]
        parts = [self._head(200, headers)]
        for event in events:
            parts += [b"%x\r\n" % len(event), event, b"\r\n"]
        if hang_up:
            self.wfile.write(b"".join(parts))
            self._hang_up()
            return
        parts.append(b"0\r\n\r\n")
        self.wfile.write(b"".join(parts))

    def _hang_up(self) -> None:
        """End the connection after what was sent, so the client sees an incomplete body rather than a reset."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _reset(self) -> None:
        """Abort the connection with an RST and no answer at all, as a crashed proxy or a dropped peer would."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()


# --------------------------------------------------------------------------------------------------------------------
# Public server


class StandInServer:
    """An OpenAI- and Anthropic-compatible HTTP server on 127.0.0.1 with scripted replies and faults.

    Every request takes the next queued `Reply`/`Fault` (see `push`) or else `reply`. Point
    ``openai.OpenAI(base_url=srv.openai_base_url)``, ``openai.AzureOpenAI(azure_endpoint=srv.url)`` or
    ``anthropic.Anthropic(base_url=srv.anthropic_base_url)`` at it, with any API key.
    """

    def __init__(self, reply: Reply | None = None) -> None:
        self.reply: Reply = reply if reply is not None else Reply()
        self._lock = threading.Lock()
        self._queue: deque[Reply | Fault] = deque()
        self._requests: list[RecordedRequest] = []
        self._errors: list[BaseException] = []
        self._serial = itertools.count(1)
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> StandInServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.standin = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.name = f"StandInServer:{httpd.server_address[1]}"
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut open keep-alive connections, so no handler thread outlives the server."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> StandInServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- addresses

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("StandInServer is not running; call start() or use it as a context manager")
        host, port = cast("tuple[str, int]", self._httpd.server_address[:2])
        return f"http://{host}:{port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The Anthropic SDK appends ``/v1/messages`` itself, so its base is the bare origin."""
        return self.url

    # ---- scripting

    def push(self, *items: Reply | Fault) -> None:
        """Queue answers for the next requests, first in first out, ahead of the default `reply`."""
        with self._lock:
            self._queue.extend(items)

    @property
    def pending(self) -> int:
        """How many pushed answers no request has taken yet; a test can assert all its faults were exercised."""
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far (a copy: safe to hold while the server keeps serving)."""
        with self._lock:
            return list(self._requests)

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions raised inside the stand-in itself; each was also answered with HTTP 500."""
        with self._lock:
            return list(self._errors)

    def clear(self) -> None:
        """Forget recorded requests, errors and queued answers; the default reply stays."""
        with self._lock:
            self._requests.clear()
            self._errors.clear()
            self._queue.clear()

    # ---- used by the handler

    def _take(self) -> tuple[Reply | Fault, int]:
        with self._lock:
            item = self._queue.popleft() if self._queue else self.reply
            return item, next(self._serial)

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _record_error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)
