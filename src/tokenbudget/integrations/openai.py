"""OpenAI SDK <-> guard translation: chat completions (incl. ``parse``), responses, completions, embeddings."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..calls import CallRequest, Usage
from ..streams import StreamMeter
from .base import decision_changes, field_of, jsonable, server_of

if TYPE_CHECKING:
    from ..guard import Ticket

__all__ = ["PATCHES", "OpenAIAdapter"]

_OPERATIONS = {
    "/chat/completions": "chat",
    "/completions": "text_completion",
    "/embeddings": "embeddings",
    "/responses": "chat",
    "/responses/compact": "chat",
}
_MAX_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


_get = field_of


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def usage_from(obj: Any) -> Usage | None:
    """Usage of a ChatCompletion / Completion / Response / embeddings result, as object or JSON dict."""
    u = _get(obj, "usage")
    if u is None:
        return None
    if _get(u, "input_tokens") is not None:  # Responses API
        usage = Usage(
            input_tokens=_int(_get(u, "input_tokens")),
            output_tokens=_int(_get(u, "output_tokens")),
            cache_read_tokens=_int(_get(_get(u, "input_tokens_details"), "cached_tokens")),
            cache_write_tokens=_int(_get(_get(u, "input_tokens_details"), "cache_write_tokens")),
            reasoning_tokens=_int(_get(_get(u, "output_tokens_details"), "reasoning_tokens")),
        )
        status = _get(obj, "status")
        usage.finish_reasons = [status] if isinstance(status, str) else []
    else:
        usage = Usage(
            input_tokens=_int(_get(u, "prompt_tokens")),
            output_tokens=_int(_get(u, "completion_tokens")),
            cache_read_tokens=_int(_get(_get(u, "prompt_tokens_details"), "cached_tokens")),
            cache_write_tokens=_int(_get(_get(u, "prompt_tokens_details"), "cache_write_tokens")),
            reasoning_tokens=_int(_get(_get(u, "completion_tokens_details"), "reasoning_tokens")),
        )
        choices = _get(obj, "choices") or ()
        usage.finish_reasons = [r for r in (_get(c, "finish_reason") for c in choices) if isinstance(r, str)]
    model = _get(obj, "model")
    rid = _get(obj, "id")
    usage.response_model = model if isinstance(model, str) else None
    usage.response_id = rid if isinstance(rid, str) else None
    return usage


def output_from(obj: Any) -> Any:
    """The answer of a Responses (``output``), chat or completion (``choices``) result, as JSON data in that shape;
    None for embeddings (vectors are not content)."""
    out = _get(obj, "output")
    return jsonable(out if out is not None else _get(obj, "choices"))


class ChatStreamMeter(StreamMeter):
    """Chat / legacy completion chunks: usage rides on the last chunk when ``include_usage`` is set."""

    def __init__(self, ticket: Ticket, *, hide_usage_chunk: bool = False) -> None:
        super().__init__(ticket, hide_usage_chunk=hide_usage_chunk)
        self.reported: Usage | None = None

    def observe(self, data: str, event: str | None) -> bool:
        if not data.startswith("{"):
            return True
        if '"usage":{' in data or '"usage": {' in data:
            chunk = json.loads(data)
            self.reported = usage_from(chunk)
            if self.hide_usage_chunk and not chunk.get("choices"):
                return False
        self.chunks.append(data)
        return True

    def _usage(self) -> Usage:
        if self.reported is not None:
            usage = self.reported
            if not usage.finish_reasons:
                usage.finish_reasons = self._finish_reasons()
            return usage
        text: list[str] = []
        model = rid = None
        for raw in self.chunks:
            try:
                chunk = json.loads(raw)
            except ValueError:
                continue
            model, rid = model or chunk.get("model"), rid or chunk.get("id")
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                text.append(delta.get("content") or choice.get("text") or "")
                for call in delta.get("tool_calls") or ():
                    fn = call.get("function") or {}
                    text.append((fn.get("name") or "") + (fn.get("arguments") or ""))
        usage = Usage(input_tokens=self.ticket.input_tokens, output_tokens=self.count_text("".join(text)), exact=False)
        usage.response_model, usage.response_id = model, rid
        return usage

    def _output(self) -> Any:
        """The ``choices`` an unstreamed call would have returned: each choice's text, tool calls (arguments joined
        by call index) and finish reason, rebuilt from the deltas."""
        choices: dict[int, dict[str, Any]] = {}
        for raw in self.chunks:
            for c in json.loads(raw).get("choices") or ():
                choice = choices.setdefault(c.get("index", 0), {"index": c.get("index", 0)})
                if c.get("finish_reason"):
                    choice["finish_reason"] = c["finish_reason"]
                if "text" in c:  # a legacy completion
                    choice["text"] = choice.get("text", "") + (c.get("text") or "")
                    continue
                delta = c.get("delta") or {}
                message = choice.setdefault("message", {"role": delta.get("role") or "assistant"})
                if delta.get("content"):
                    message["content"] = message.get("content", "") + delta["content"]
                for call in delta.get("tool_calls") or ():
                    calls = message.setdefault("tool_calls", {})
                    slot = calls.setdefault(call.get("index", 0), {"type": "function", "function": {"arguments": ""}})
                    if call.get("id"):
                        slot["id"] = call["id"]
                    fn = call.get("function") or {}
                    if fn.get("name"):
                        slot["function"]["name"] = fn["name"]
                    slot["function"]["arguments"] += fn.get("arguments") or ""
        for choice in choices.values():
            calls = choice.get("message", {}).get("tool_calls")
            if calls is not None:
                choice["message"]["tool_calls"] = [calls[i] for i in sorted(calls)]
        return [choices[i] for i in sorted(choices)]

    def _finish_reasons(self) -> list[str]:
        for raw in reversed(self.chunks[-3:]):
            if '"finish_reason":"' in raw or '"finish_reason": "' in raw:
                try:
                    chunk = json.loads(raw)
                except ValueError:
                    return []
                return [c["finish_reason"] for c in chunk.get("choices") or () if c.get("finish_reason")]
        return []


class ResponsesStreamMeter(StreamMeter):
    """Responses API events: usage arrives with ``response.completed`` / ``incomplete`` / ``failed``."""

    def __init__(self, ticket: Ticket, *, hide_usage_chunk: bool = False) -> None:
        super().__init__(ticket)
        self.reported: Usage | None = None
        self.final: Any = None

    def observe(self, data: str, event: str | None) -> bool:
        if '"usage":{' in data or '"usage": {' in data:
            payload = json.loads(data)
            response = payload.get("response") or payload
            self.reported = usage_from(response)
            self.final = response
        elif "output_text.delta" in data[:64] or "arguments.delta" in data[:64]:
            self.chunks.append(data)
        return True

    def _usage(self) -> Usage:
        if self.reported is not None:
            return self.reported
        text = []
        for raw in self.chunks:
            try:
                text.append(json.loads(raw).get("delta") or "")
            except ValueError:
                continue
        return Usage(input_tokens=self.ticket.input_tokens, output_tokens=self.count_text("".join(text)), exact=False)

    def _output(self) -> Any:
        """The final response's ``output`` when it came; else the text and tool-call arguments that arrived."""
        if self.final is not None:
            return output_from(self.final)
        text: list[str] = []
        arguments: list[str] = []
        for raw in self.chunks:
            event = json.loads(raw)
            (arguments if "arguments" in (event.get("type") or "") else text).append(event.get("delta") or "")
        out: list[dict[str, Any]] = []
        if text:
            out.append({"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": "".join(text)}]})  # fmt: skip
        if arguments:
            out.append({"type": "function_call", "arguments": "".join(arguments)})
        return out


class OpenAIAdapter:
    provider = "openai"

    def describe(self, client: Any, options: Any, stream: bool) -> CallRequest | None:
        if getattr(options, "method", "post").lower() != "post":
            return None
        operation = _OPERATIONS.get(options.url)
        body = options.json_data
        if operation is None or not isinstance(body, dict):
            return None
        model = body.get("model")
        if not isinstance(model, str):
            return None
        max_out = next((body[f] for f in _MAX_FIELDS if isinstance(body.get(f), int)), None)
        host, port = server_of(client)
        provider = "azure.ai.openai" if type(client).__name__.endswith("AzureOpenAI") else "openai"
        return CallRequest(
            provider=provider,
            operation=operation,
            model=model,
            body=body,
            stream=stream or bool(body.get("stream")),
            max_output_tokens=max_out,
            server_address=host,
            server_port=port,
            api="openai",
        )

    def rewrite(self, options: Any, ticket: Ticket) -> bool:
        req = ticket.request
        body: dict[str, Any] = options.json_data
        present = next((f for f in _MAX_FIELDS if f in body), None)
        field = present or ("max_output_tokens" if options.url.startswith("/responses") else "max_completion_tokens")
        changes = decision_changes(body, ticket, field)
        hide = False
        if req.stream and req.operation in ("chat", "text_completion") and not options.url.startswith("/responses"):
            stream_options = body.get("stream_options")
            if not (isinstance(stream_options, dict) and stream_options.get("include_usage")):
                changes["stream_options"] = {**(stream_options or {}), "include_usage": True}
                hide = True
        if changes:
            options.json_data = {**body, **changes}
        return hide

    def usage(self, response: Any) -> Usage | None:
        return usage_from(response)

    def output(self, response: Any) -> Any:
        return output_from(response)

    def stream_meter(self, ticket: Ticket, hide_usage_chunk: bool) -> StreamMeter:
        if ticket.request.body.get("input") is not None and "messages" not in ticket.request.body:
            return ResponsesStreamMeter(ticket)
        return ChatStreamMeter(ticket, hide_usage_chunk=hide_usage_chunk)


PATCHES = (
    ("openai._base_client", "SyncAPIClient.request", "sync"),
    ("openai._base_client", "AsyncAPIClient.request", "async"),
    ("openai._streaming", "Stream._iter_events", "events"),
    ("openai._streaming", "AsyncStream._iter_events", "aevents"),
)
