"""Anthropic SDK <-> guard translation: ``messages.create`` (incl. stream), ``messages.stream``, beta messages.

Anthropic reports ``input_tokens`` *without* cache reads and writes; the OTel convention (and our
:class:`~tokenbudget.calls.Usage`) counts them in, so they are added here. Stream deltas carry cumulative
usage: each ``message_delta`` overwrites, never adds.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..calls import CallRequest, Usage
from ..streams import StreamMeter
from .base import decision_changes, field_of, jsonable, server_of

if TYPE_CHECKING:
    from ..guard import Ticket

__all__ = ["PATCHES", "AnthropicAdapter"]


_get = field_of


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _apply_usage(usage: Usage, u: Any) -> None:
    """Overwrite ``usage`` with the fields present in an Anthropic usage object (cumulative semantics)."""
    uncached = _get(u, "input_tokens")
    read = _get(u, "cache_read_input_tokens")
    created = _get(u, "cache_creation_input_tokens")
    breakdown = _get(u, "cache_creation")
    if read is not None:
        usage.cache_read_tokens = _int(read)
    if breakdown is not None:
        usage.cache_write_tokens = _int(_get(breakdown, "ephemeral_5m_input_tokens"))
        usage.cache_write_1h_tokens = _int(_get(breakdown, "ephemeral_1h_input_tokens"))
    elif created is not None:
        usage.cache_write_tokens, usage.cache_write_1h_tokens = _int(created), 0
    if uncached is not None:
        usage.input_tokens = (
            _int(uncached) + usage.cache_read_tokens + usage.cache_write_tokens + usage.cache_write_1h_tokens
        )
    out = _get(u, "output_tokens")
    if out is not None:
        usage.output_tokens = _int(out)


def usage_from(obj: Any) -> Usage | None:
    u = _get(obj, "usage")
    if u is None:
        return None
    usage = Usage()
    _apply_usage(usage, u)
    model, rid, stop = _get(obj, "model"), _get(obj, "id"), _get(obj, "stop_reason")
    usage.response_model = model if isinstance(model, str) else None
    usage.response_id = rid if isinstance(rid, str) else None
    usage.finish_reasons = [stop] if isinstance(stop, str) else []
    return usage


def output_from(obj: Any) -> Any:
    """A message's ``content`` blocks, as JSON data."""
    return jsonable(_get(obj, "content"))


class MessagesStreamMeter(StreamMeter):
    def __init__(self, ticket: Ticket, *, hide_usage_chunk: bool = False) -> None:
        super().__init__(ticket)
        self.usage = Usage(exact=False)
        self.started = False
        self.ended = False
        self.blocks: list[str] = []  # content_block_start events: a few per message, what each block is

    def observe(self, data: str, event: str | None) -> bool:
        if event == "content_block_delta":
            self.chunks.append(data)
        elif event == "content_block_start":
            self.blocks.append(data)
        elif event == "message_start":
            message = json.loads(data).get("message") or {}
            _apply_usage(self.usage, message.get("usage") or {})
            self.usage.response_model = message.get("model")
            self.usage.response_id = message.get("id")
            self.started = True
        elif event == "message_delta":
            payload = json.loads(data)
            _apply_usage(self.usage, payload.get("usage") or {})
            stop = (payload.get("delta") or {}).get("stop_reason")
            if stop:
                self.usage.finish_reasons = [stop]
        elif event == "message_stop":
            self.ended = True
        return True

    def _usage(self) -> Usage:
        usage = self.usage
        if self.ended:
            usage.exact = True
            return usage
        if not self.started or not usage.input_tokens:  # a stream translated from chat chunks reports input last
            usage.input_tokens = self.ticket.input_tokens
        text = []
        for raw in self.chunks:
            try:
                delta = json.loads(raw).get("delta") or {}
            except ValueError:
                continue
            text.append(delta.get("text") or delta.get("partial_json") or delta.get("thinking") or "")
        usage.output_tokens = max(usage.output_tokens, self.count_text("".join(text)))
        return usage

    def _output(self) -> Any:
        """The ``content`` blocks an unstreamed call would have returned: each block as it started, with its text,
        thinking or tool input (the JSON parts joined, then parsed) filled in from the deltas."""
        blocks: dict[int, dict[str, Any]] = {}
        for raw in self.blocks:
            start = json.loads(raw)
            blocks[start.get("index", 0)] = dict(start.get("content_block") or {})
        partial: dict[int, list[str]] = {}
        for raw in self.chunks:
            payload = json.loads(raw)
            index = payload.get("index", 0)
            block = blocks.setdefault(index, {"type": "text", "text": ""})
            delta = payload.get("delta") or {}
            kind = delta.get("type")
            if kind == "text_delta":
                block["text"] = (block.get("text") or "") + (delta.get("text") or "")
            elif kind == "thinking_delta":
                block["thinking"] = (block.get("thinking") or "") + (delta.get("thinking") or "")
            elif kind == "input_json_delta":
                partial.setdefault(index, []).append(delta.get("partial_json") or "")
        for index, parts in partial.items():
            text = "".join(parts)
            try:
                blocks[index]["input"] = json.loads(text) if text else {}
            except ValueError:  # cut short mid-JSON: keep what arrived
                blocks[index]["input"] = text
        return [blocks[i] for i in sorted(blocks)]


class AnthropicAdapter:
    provider = "anthropic"

    def describe(self, client: Any, options: Any, stream: bool) -> CallRequest | None:
        if getattr(options, "method", "post").lower() != "post" or options.url != "/v1/messages":
            return None
        body = options.json_data
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return None
        max_out = body.get("max_tokens")
        host, port = server_of(client)
        return CallRequest(
            provider="anthropic",
            operation="chat",
            model=body["model"],
            body=body,
            stream=stream or bool(body.get("stream")),
            max_output_tokens=max_out if isinstance(max_out, int) else None,
            server_address=host,
            server_port=port,
            api="anthropic",
        )

    def rewrite(self, options: Any, ticket: Ticket) -> bool:
        body: dict[str, Any] = options.json_data
        changes = decision_changes(body, ticket, "max_tokens")
        if changes:
            options.json_data = {**body, **changes}
        return False

    def usage(self, response: Any) -> Usage | None:
        return usage_from(response)

    def output(self, response: Any) -> Any:
        return output_from(response)

    def stream_meter(self, ticket: Ticket, hide_usage_chunk: bool) -> StreamMeter:
        return MessagesStreamMeter(ticket)


PATCHES = (
    ("anthropic._base_client", "SyncAPIClient.request", "sync"),
    ("anthropic._base_client", "AsyncAPIClient.request", "async"),
    ("anthropic._streaming", "Stream._iter_events", "events"),
    ("anthropic._streaming", "AsyncStream._iter_events", "aevents"),
)
