"""Cross-protocol downgrade: an Anthropic-SDK call served by a chat-completions server, or the reverse.

A budget may route a call to a cheaper in-house model that speaks the other wire protocol. The caller wrote code
against its own SDK, so it must get that SDK's own objects back (``Message``, ``Stream[RawMessageStreamEvent]``,
``messages.stream()``, ``ChatCompletion``, ``Stream[ChatCompletionChunk]``), its own exception classes, and the
guard's meters must keep reading the caller's protocol. So the request is translated before it leaves, the answer
(JSON or SSE, translated lazily as the upstream stream is read) is rebuilt as an HTTP response in the caller's
protocol, and the caller SDK's own ``_process_response`` turns it into objects.

Translated both ways
    Text; system prompts (Anthropic ``system`` <-> leading ``system``/``developer`` messages); images (base64 and
    URL); base64 PDFs (Anthropic ``document`` <-> chat ``file`` part) and plain-text documents (as text); tool
    definitions (``input_schema`` <-> ``function.parameters``, ``strict``); ``tool_choice`` (auto/any=required/
    none/one named tool) and parallel tool calls; assistant ``tool_use`` <-> ``tool_calls``; tool results; stop
    reasons <-> finish reasons; ``max_tokens``; ``temperature``; ``top_p``; stop sequences; ``metadata.user_id`` <->
    ``user``; a JSON-schema output format (``output_config.format`` <-> ``response_format``); usage, including cache
    reads and (where a gateway reports them as ``prompt_tokens_details.cache_write_tokens``) cache writes, and
    reasoning/thinking token counts; mid-stream error events; HTTP errors (the body is reshaped so the caller's
    SDK raises its own class with the upstream message).

Usage conventions
    OpenAI ``prompt_tokens`` *includes* cached tokens; Anthropic ``input_tokens`` *excludes* cache reads and writes.
    So ``input_tokens = prompt_tokens - cached - cache_writes`` one way and ``prompt_tokens = input + read + write``
    the other. An OpenAI-shaped answer has no standard place for cache writes: they are reported in the
    non-standard ``prompt_tokens_details.cache_write_tokens`` and remain inside ``prompt_tokens``.

Dropped, with the reason (see ``_DROP_*``)
    Prompt-cache markers (``cache_control``, ``prompt_cache_*``: caching is the serving side's business); Anthropic
    ``thinking``/``top_k``/``service_tier``/``speed``/``inference_geo``/``diagnostics``/``context_management``/
    ``output_config.effort``; OpenAI ``seed``/``frequency_penalty``/``presence_penalty``/``store``/``metadata``/
    ``service_tier``/``prediction``/``verbosity``/``reasoning_effort``/``stream_options`` (Anthropic always streams
    usage); assistant thinking blocks and OpenAI ``reasoning_content`` (no place in the other protocol, and
    thinking signatures cannot be produced); image ``detail``; OpenAI ``name`` on messages. ``temperature`` above 1
    is clamped to 1 for Anthropic (its range is 0..1). System/developer messages after the first turn are hoisted
    into Anthropic's single ``system``. A tool result marked ``is_error`` is sent as text starting ``Error: ``.
    Text blocks of an assistant turn are concatenated (they are one reply split by citations or tool calls);
    system blocks are joined with a blank line.

Refused with :class:`~tokenbudget.errors.ConfigError` naming the field, before anything is sent
    Server tools (web search, code execution, bash, computer use, MCP servers, containers); ``n`` > 1; logprobs;
    ``logit_bias``; audio input/output; ``web_search_options``; ``moderation``; legacy ``functions``/
    ``function_call``; custom (non-function) tools and ``allowed_tools``; ``response_format: json_object`` (no
    schema to give Anthropic); images inside tool results (chat tool messages are text only); file ids and
    non-PDF documents; malformed tool-call arguments; unknown fields (silently dropping what we cannot name
    could change what the caller asked for). Only chat completions (not Responses, completions or embeddings)
    can be sent to an Anthropic server.

Known limits
    Only ``choices[0]`` is read (``n`` > 1 is refused up front). A stream whose message_start is synthesised from
    OpenAI chunks carries ``input_tokens: 0`` until the final ``message_delta`` (chat streams report usage last);
    if such a stream is cut short, the guard's meter charges its input estimate instead.
    Tool-call deltas for a tool call whose block was already closed (interleaved parallel calls, which OpenAI
    does not send) are still emitted at that block's index. An upstream that answers a streamed request with plain
    JSON is not supported. Query parameters of the caller's request (``beta=true``, Azure ``api-version``) and its
    client's default headers (which hold the caller's own API key) are never sent to the target.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol, TypeVar

from ..errors import ConfigError

__all__ = [
    "ANTHROPIC_VERSION",
    "DEFAULT_MAX_TOKENS",
    "AnthropicEventsToOpenAIChunks",
    "OpenAIChunksToAnthropicEvents",
    "SSEParser",
    "anthropic_request_to_openai",
    "anthropic_response_to_openai",
    "asend_translated",
    "openai_request_to_anthropic",
    "openai_response_to_anthropic",
    "send_translated",
    "translate_request",
    "translate_response",
    "translated_for_estimate",
]

JSON = dict[str, Any]

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
"""Anthropic requires ``max_tokens``; a chat caller that set none gets this cap (and the guard reserves for it)."""

_DROP_FROM_ANTHROPIC = {
    "cache_control": "prompt caching is managed by the chat-completions server itself",
    "thinking": "extended-thinking budgets have no chat-completions parameter",
    "top_k": "chat completions has no top_k parameter",
    "service_tier": "service tiers are vendor-specific",
    "inference_geo": "inference regions are vendor-specific",
    "speed": "speed modes are vendor-specific",
    "diagnostics": "Anthropic request diagnostics have no chat-completions equivalent",
    "context_management": "server-side context editing is Anthropic-specific; the full context is sent",
}
_REFUSE_FROM_ANTHROPIC = {
    "container": "code-execution containers run on Anthropic's servers only",
    "mcp_servers": "MCP connectors run on Anthropic's servers only",
}
_DROP_FROM_OPENAI = {
    "stream_options": "Anthropic streams always report usage",
    "seed": "Anthropic has no sampling seed",
    "frequency_penalty": "Anthropic has no frequency penalty",
    "presence_penalty": "Anthropic has no presence penalty",
    "store": "stored completions are OpenAI-specific",
    "metadata": "stored-completion metadata is OpenAI-specific",
    "service_tier": "service tiers are vendor-specific",
    "prediction": "predicted outputs only speed OpenAI up; the answer is the same without them",
    "verbosity": "Anthropic has no verbosity setting",
    "reasoning_effort": "reasoning effort levels do not map onto another vendor's models",
    "prompt_cache_key": "prompt caching is managed by the Anthropic-compatible server itself",
    "prompt_cache_options": "prompt caching is managed by the Anthropic-compatible server itself",
    "prompt_cache_retention": "prompt caching is managed by the Anthropic-compatible server itself",
}
_REFUSE_FROM_OPENAI = {
    "functions": "legacy function calling is not translated; use tools",
    "function_call": "legacy function calling is not translated; use tool_choice",
    "logit_bias": "Anthropic cannot bias token probabilities",
    "audio": "audio output is not available from an Anthropic server",
    "web_search_options": "web search runs on OpenAI's servers only",
    "moderation": "OpenAI moderation cannot run on an Anthropic server",
}
_ANTHROPIC_SERVER_TOOL = re.compile(
    r"^(web_search|web_fetch|code_execution|bash|text_editor|computer|memory|tool_search)"
)

_FINISH_FROM_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_STOP_FROM_FINISH = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _sentinel(value: Any) -> bool:
    """The SDKs' ``NotGiven``/``Omit`` placeholders, matched by name so neither SDK has to be importable."""
    return type(value).__name__ in ("NotGiven", "Omit")


def _absent(value: Any) -> bool:
    return value is None or _sentinel(value)


def _plain(value: Any) -> Any:
    """A JSON-like copy of SDK params: placeholders dropped, tuples listed, pydantic models dumped.

    One-shot iterators are left as they are (never consumed): the SDK still has to send them.
    """
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if not _sentinel(v)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value if not _sentinel(v)]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _plain(dump(mode="json", exclude_unset=True, by_alias=True))
    return value


def _err(caller: str, target: str, key: str, message: str) -> ConfigError:
    return ConfigError(message, key=key, source=f"downgrade from the {caller} protocol to an {target} server")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _named_event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


def _data_event(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


def _obj(value: Any) -> JSON:
    """``value`` if it is a JSON object, else an empty one: vendors and gateways omit or null optional objects."""
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _text_of(content: Any) -> str:
    """Text of a string or a list of text parts/blocks (other parts ignored: callers check them first)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _data_url(url: str) -> tuple[str, str] | None:
    """``(media_type, base64 data)`` of a ``data:`` URL, else None."""
    match = re.match(r"^data:([^;,]+)(?:;[^,]*)?;base64,(.*)$", url, re.DOTALL)
    return (match.group(1), match.group(2)) if match else None


def _as_list(value: Any, caller: str, target: str, key: str) -> list[Any]:
    if isinstance(value, list):
        return value
    raise _err(caller, target, key, f"expected a list, got {type(value).__name__}")


def _parse_arguments(raw: Any) -> Any:
    """Tool-call arguments as an object; an unparseable string is kept under ``_unparsed_arguments``.

    Only used on answers, which have already been paid for: failing would lose them, so the raw text is kept.
    """
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str) or not raw.strip():
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {"_unparsed_arguments": raw}
    return parsed if isinstance(parsed, dict) else {"value": parsed}


# ----------------------------------------------------------------------------------------------------------------
# usage and stop reasons


def _openai_usage_to_anthropic(u: Any) -> JSON:
    if not isinstance(u, dict):
        return {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    details = _obj(u.get("prompt_tokens_details"))
    cached = _int(details.get("cached_tokens"))
    written = _int(details.get("cache_write_tokens"))
    out: JSON = {
        "input_tokens": max(0, _int(u.get("prompt_tokens")) - cached - written),
        "output_tokens": _int(u.get("completion_tokens")),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
    }
    completion = u.get("completion_tokens_details")
    if isinstance(completion, dict) and _int(completion.get("reasoning_tokens")):
        out["output_tokens_details"] = {"thinking_tokens": _int(completion.get("reasoning_tokens"))}
    return out


def _anthropic_usage_to_openai(u: Any) -> JSON:
    u = u if isinstance(u, dict) else {}
    read = _int(u.get("cache_read_input_tokens"))
    written = _int(u.get("cache_creation_input_tokens"))
    breakdown = u.get("cache_creation")
    if not written and isinstance(breakdown, dict):
        written = _int(breakdown.get("ephemeral_5m_input_tokens")) + _int(breakdown.get("ephemeral_1h_input_tokens"))
    prompt = _int(u.get("input_tokens")) + read + written
    output = _int(u.get("output_tokens"))
    prompt_details: JSON = {"cached_tokens": read}
    if written:
        prompt_details["cache_write_tokens"] = written
    thinking = u.get("output_tokens_details")
    reasoning = _int(thinking.get("thinking_tokens")) if isinstance(thinking, dict) else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _stop_from_finish(finish: Any, *, matched: Any = None, tool_calls: bool = False) -> tuple[str, str | None]:
    """Anthropic ``(stop_reason, stop_sequence)`` for a chat ``finish_reason``.

    vLLM-style servers report the matched stop string as ``stop_reason``; OpenAI does not say which one matched.
    Some servers say ``stop`` after emitting tool calls, which an Anthropic caller must see as ``tool_use``.
    """
    if tool_calls and finish in (None, "stop", "tool_calls", "function_call"):
        return "tool_use", None
    if finish == "stop" and isinstance(matched, str):
        return "stop_sequence", matched
    if isinstance(finish, str):
        return _STOP_FROM_FINISH.get(finish, "end_turn"), None
    return "end_turn", None


def _finish_from_stop(stop: Any) -> str:
    return _FINISH_FROM_STOP.get(stop, "stop") if isinstance(stop, str) else "stop"


# ----------------------------------------------------------------------------------------------------------------
# Anthropic request -> chat completions


def anthropic_request_to_openai(body: Mapping[str, Any], model: str) -> JSON:
    """A chat-completions body asking the same of ``model`` as an Anthropic Messages body.

    Streaming always asks for ``include_usage``: the caller's meter and ``get_final_message()`` need the usage
    that Anthropic streams carry by default.
    """
    src = _plain(dict(body))
    caller, target = "anthropic", "openai"
    out: JSON = {"model": model}
    messages: list[JSON] = []
    for key, value in src.items():
        if _absent(value) or key in ("model", "messages"):
            continue
        if key in _DROP_FROM_ANTHROPIC:
            continue
        if key in _REFUSE_FROM_ANTHROPIC:
            raise _err(caller, target, key, _REFUSE_FROM_ANTHROPIC[key])
        if key == "max_tokens":
            out["max_tokens"] = value
        elif key == "system":
            text = _system_text(value, caller, target)
            if text:
                messages.append({"role": "system", "content": text})
        elif key == "stream":
            if value:
                out["stream"] = True
                out["stream_options"] = {"include_usage": True}
        elif key == "stop_sequences":
            stops = _as_list(value, caller, target, key)
            if stops:
                out["stop"] = stops
        elif key in ("temperature", "top_p"):
            out[key] = value
        elif key == "metadata":
            if isinstance(value, dict) and isinstance(value.get("user_id"), str):
                out["user"] = value["user_id"]
        elif key == "output_config":
            fmt = value.get("format") if isinstance(value, dict) else None
            if isinstance(fmt, dict):
                if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
                    raise _err(caller, target, "output_config.format", "only a json_schema format can be translated")
                out["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True},
                }
            # output_config.effort is dropped: effort levels do not map onto another vendor's models.
        elif key == "tools":
            tools = [_anthropic_tool_to_openai(t, i) for i, t in enumerate(_as_list(value, caller, target, key))]
            if tools:
                out["tools"] = tools
        elif key == "tool_choice":
            continue  # after tools, below
        else:
            raise _err(caller, target, key, "no chat-completions equivalent is known for this field")
    choice = src.get("tool_choice")
    if isinstance(choice, dict):
        _anthropic_tool_choice(choice, out)
    elif not _absent(choice):
        raise _err(caller, target, "tool_choice", "expected an object such as {'type': 'auto'}")
    raw_messages = src.get("messages")
    for i, message in enumerate(_as_list(raw_messages, caller, target, "messages")):
        messages.extend(_anthropic_message_to_openai(message, i))
    out["messages"] = messages
    return out


def _system_text(value: Any, caller: str, target: str) -> str:
    if isinstance(value, str):
        return value
    blocks = _as_list(value, caller, target, "system")
    texts: list[str] = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type", "text") != "text" or not isinstance(block.get("text"), str):
            raise _err(caller, target, f"system[{j}]", "only text blocks can be a system prompt")
        texts.append(block["text"])
    return "\n\n".join(t for t in texts if t)


def _anthropic_tool_to_openai(tool: Any, i: int) -> JSON:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise _err("anthropic", "openai", where, "expected a tool object")
    kind = tool.get("type")
    if kind not in (None, "custom") or (isinstance(kind, str) and _ANTHROPIC_SERVER_TOOL.match(kind)):
        raise _err("anthropic", "openai", where, f"server tool {kind!r} runs on Anthropic's servers only")
    if not isinstance(tool.get("name"), str):
        raise _err("anthropic", "openai", f"{where}.name", "a tool needs a name")
    schema = tool.get("input_schema")
    fn: JSON = {"name": tool["name"], "parameters": schema if isinstance(schema, dict) else {"type": "object"}}
    if isinstance(tool.get("description"), str):
        fn["description"] = tool["description"]
    if isinstance(tool.get("strict"), bool):
        fn["strict"] = tool["strict"]
    return {"type": "function", "function": fn}


def _anthropic_tool_choice(choice: JSON, out: JSON) -> None:
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise _err("anthropic", "openai", "tool_choice", f"tool_choice type {kind!r} cannot be translated")
    if choice.get("disable_parallel_tool_use") and out.get("tools"):
        out["parallel_tool_calls"] = False


def _anthropic_image_to_openai(block: JSON, where: str) -> JSON:
    source = _obj(block.get("source"))
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        url = f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise _err("anthropic", "openai", f"{where}.source", "only base64 and URL images can be translated")
    return {"type": "image_url", "image_url": {"url": url}}


def _anthropic_document_to_openai(block: JSON, where: str) -> JSON:
    source = _obj(block.get("source"))
    kind = source.get("type")
    if kind == "text" and isinstance(source.get("data"), str):
        return {"type": "text", "text": source["data"]}
    if kind == "base64" and source.get("media_type") == "application/pdf" and isinstance(source.get("data"), str):
        title = block.get("title") if isinstance(block.get("title"), str) else "document.pdf"
        return {
            "type": "file",
            "file": {"filename": title, "file_data": f"data:application/pdf;base64,{source['data']}"},
        }
    raise _err("anthropic", "openai", f"{where}.source", "only plain-text and base64 PDF documents can be translated")


def _anthropic_tool_result_to_openai(block: JSON, where: str) -> JSON:
    content = block.get("content")
    if isinstance(content, list):
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _err(
                    "anthropic", "openai", f"{where}.content[{k}]", "chat-completions tool results can only be text"
                )
        text = "\n\n".join(p.get("text") or "" for p in content)
    elif isinstance(content, str):
        text = content
    elif content is None:
        text = ""
    else:
        raise _err("anthropic", "openai", f"{where}.content", "expected a string or a list of text blocks")
    if block.get("is_error"):
        text = "Error: " + text
    if not isinstance(block.get("tool_use_id"), str):
        raise _err("anthropic", "openai", f"{where}.tool_use_id", "a tool result needs the id of its tool_use")
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _anthropic_message_to_openai(message: Any, i: int) -> list[JSON]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _err("anthropic", "openai", where, "expected a message object")
    role = message.get("role")
    content = message.get("content")
    if role not in ("user", "assistant"):
        raise _err("anthropic", "openai", f"{where}.role", f"unknown role {role!r}")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    blocks = _as_list(content, "anthropic", "openai", f"{where}.content")
    if role == "user":
        tools: list[JSON] = []
        parts: list[JSON] = []
        for j, block in enumerate(blocks):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "tool_result":
                tools.append(_anthropic_tool_result_to_openai(block, at))
            elif kind == "text":
                parts.append({"type": "text", "text": block.get("text") or ""})
            elif kind == "image":
                parts.append(_anthropic_image_to_openai(block, at))
            elif kind == "document":
                parts.append(_anthropic_document_to_openai(block, at))
            else:
                raise _err("anthropic", "openai", at, f"a {kind!r} block cannot be sent to a chat-completions server")
        out: list[JSON] = list(tools)  # tool messages must directly follow the assistant's tool_calls
        if len(parts) == 1 and parts[0]["type"] == "text":
            out.append({"role": "user", "content": parts[0]["text"]})
        elif parts:
            out.append({"role": "user", "content": parts})
        return out
    texts: list[str] = []
    calls: list[JSON] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _err("anthropic", "openai", at, "a tool_use block needs an id and a name")
            arguments = json.dumps(block.get("input") or {}, separators=(",", ":"), ensure_ascii=False)
            calls.append(
                {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # reasoning cannot be replayed to another vendor's model
        else:
            raise _err("anthropic", "openai", at, f"a {kind!r} block cannot be sent to a chat-completions server")
    reply: JSON = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        reply["tool_calls"] = calls
    return [reply]


# ----------------------------------------------------------------------------------------------------------------
# chat completions request -> Anthropic


def openai_request_to_anthropic(body: Mapping[str, Any], model: str) -> JSON:
    """An Anthropic Messages body asking the same of ``model`` as a chat-completions body.

    ``max_tokens`` is mandatory on Anthropic: the caller's ``max_completion_tokens``/``max_tokens``, else
    :data:`DEFAULT_MAX_TOKENS`.
    """
    src = _plain(dict(body))
    caller, target = "openai", "anthropic"
    out: JSON = {"model": model, "max_tokens": DEFAULT_MAX_TOKENS}
    user_id: str | None = None
    for key, value in src.items():
        if _absent(value) or key in ("model", "messages", "tool_choice", "parallel_tool_calls"):
            continue
        if key in _DROP_FROM_OPENAI:
            continue
        if key in _REFUSE_FROM_OPENAI:
            raise _err(caller, target, key, _REFUSE_FROM_OPENAI[key])
        if key in ("max_tokens", "max_completion_tokens"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise _err(caller, target, key, "expected an integer")
            if key == "max_completion_tokens" or not isinstance(src.get("max_completion_tokens"), int):
                out["max_tokens"] = value
        elif key == "temperature":
            out["temperature"] = min(float(value), 1.0)  # Anthropic accepts 0..1
        elif key == "top_p":
            out["top_p"] = value
        elif key == "stop":
            stops = [value] if isinstance(value, str) else _as_list(value, caller, target, key)
            if stops:
                out["stop_sequences"] = stops
        elif key == "stream":
            if value:
                out["stream"] = True
        elif key == "n":
            if value != 1:
                raise _err(caller, target, key, "Anthropic returns one choice per request")
        elif key in ("logprobs", "top_logprobs"):
            if value:
                raise _err(caller, target, key, "Anthropic does not return log probabilities")
        elif key == "modalities":
            if value != ["text"]:
                raise _err(caller, target, key, "only text output is available from an Anthropic server")
        elif key in ("user", "safety_identifier"):
            if isinstance(value, str) and (key == "safety_identifier" or user_id is None):
                user_id = value
        elif key == "response_format":
            _openai_response_format(value, out)
        elif key == "tools":
            tools = [_openai_tool_to_anthropic(t, i) for i, t in enumerate(_as_list(value, caller, target, key))]
            if tools:
                out["tools"] = tools
        else:
            raise _err(caller, target, key, "no Anthropic equivalent is known for this field")
    if user_id is not None:
        out["metadata"] = {"user_id": user_id}
    _openai_tool_choice(src.get("tool_choice"), src.get("parallel_tool_calls"), out)
    system, messages = _openai_messages_to_anthropic(_as_list(src.get("messages"), caller, target, "messages"))
    if system:
        out["system"] = system
    out["messages"] = messages
    return out


def _openai_response_format(value: Any, out: JSON) -> None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return
    if kind == "json_schema":
        spec = _obj(value.get("json_schema"))
        if isinstance(spec.get("schema"), dict):
            out["output_config"] = {"format": {"type": "json_schema", "schema": spec["schema"]}}
            return
    raise _err("openai", "anthropic", "response_format", f"{kind!r} output needs a JSON schema to be translated")


def _openai_tool_to_anthropic(tool: Any, i: int) -> JSON:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise _err("openai", "anthropic", where, f"only function tools can be translated, got {kind!r}")
    fn = _obj(tool.get("function"))
    if not isinstance(fn.get("name"), str):
        raise _err("openai", "anthropic", f"{where}.function.name", "a function tool needs a name")
    params = fn.get("parameters")
    out: JSON = {"name": fn["name"], "input_schema": params if isinstance(params, dict) else {"type": "object"}}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    if isinstance(fn.get("strict"), bool):
        out["strict"] = fn["strict"]
    return out


def _openai_tool_choice(choice: Any, parallel: Any, out: JSON) -> None:
    if _absent(choice):
        result: JSON | None = None
    elif choice == "auto":
        result = {"type": "auto"}
    elif choice == "required":
        result = {"type": "any"}
    elif choice == "none":
        result = {"type": "none"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        fn = _obj(choice.get("function"))
        if not isinstance(fn.get("name"), str):
            raise _err("openai", "anthropic", "tool_choice.function.name", "a named tool choice needs a name")
        result = {"type": "tool", "name": fn["name"]}
    else:
        kind = choice.get("type") if isinstance(choice, dict) else choice
        raise _err("openai", "anthropic", "tool_choice", f"tool_choice {kind!r} cannot be translated")
    if parallel is False and out.get("tools") and (result is None or result["type"] != "none"):
        result = {**(result or {"type": "auto"}), "disable_parallel_tool_use": True}
    if result is not None:
        out["tool_choice"] = result


def _openai_user_part(part: Any, where: str) -> JSON:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return {"type": "text", "text": part.get("text") or ""}
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            raise _err("openai", "anthropic", f"{where}.image_url.url", "an image part needs a URL")
        inline = _data_url(url)
        if inline is not None:
            return {"type": "image", "source": {"type": "base64", "media_type": inline[0], "data": inline[1]}}
        return {"type": "image", "source": {"type": "url", "url": url}}
    if kind == "file":
        spec = _obj(part.get("file"))
        data = spec.get("file_data")
        inline = _data_url(data) if isinstance(data, str) else None
        if inline is None or inline[0] != "application/pdf":
            raise _err("openai", "anthropic", f"{where}.file", "only inline base64 PDF files can be translated")
        doc: JSON = {"type": "document", "source": {"type": "base64", "media_type": inline[0], "data": inline[1]}}
        if isinstance(spec.get("filename"), str):
            doc["title"] = spec["filename"]
        return doc
    raise _err("openai", "anthropic", where, f"a {kind!r} content part cannot be sent to an Anthropic server")


def _openai_messages_to_anthropic(messages: list[Any]) -> tuple[str, list[JSON]]:
    system: list[str] = []
    out: list[JSON] = []

    def add(role: str, blocks: list[JSON]) -> None:
        blocks = [b for b in blocks if not (b.get("type") == "text" and not b.get("text"))]
        if not blocks:
            return  # Anthropic rejects empty turns and empty text blocks
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _err("openai", "anthropic", where, "expected a message object")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            if not isinstance(content, (str, list)):
                raise _err("openai", "anthropic", f"{where}.content", "expected text")
            text = _text_of(content)
            if text:
                system.append(text)
        elif role == "user":
            parts = [content] if isinstance(content, str) else _as_list(content, "openai", "anthropic", where)
            add("user", [_openai_user_part(p, f"{where}.content[{j}]") for j, p in enumerate(parts)])
        elif role == "assistant":
            add("assistant", _openai_assistant_blocks(message, where))
        elif role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise _err("openai", "anthropic", f"{where}.tool_call_id", "a tool message needs its tool_call_id")
            if isinstance(content, list) and any(
                not (isinstance(p, dict) and p.get("type") == "text") for p in content
            ):
                raise _err("openai", "anthropic", f"{where}.content", "only text tool results can be translated")
            result: JSON = {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": _text_of(content)}
            add("user", [result])
        else:
            raise _err("openai", "anthropic", f"{where}.role", f"role {role!r} cannot be translated")
    for message in out:
        blocks = message["content"]
        if len(blocks) == 1 and blocks[0].get("type") == "text":
            message["content"] = blocks[0]["text"]
    return "\n\n".join(system), out


def _openai_assistant_blocks(message: JSON, where: str) -> list[JSON]:
    content = message.get("content")
    blocks: list[JSON] = []
    if isinstance(content, str):
        blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "refusal"):
                blocks.append({"type": "text", "text": part.get(kind) or ""})
            else:
                raise _err("openai", "anthropic", f"{where}.content[{j}]", f"a {kind!r} part cannot be translated")
    elif content is not None:
        raise _err("openai", "anthropic", f"{where}.content", "expected text")
    if message.get("audio") is not None:
        raise _err("openai", "anthropic", f"{where}.audio", "audio replies cannot be sent to an Anthropic server")
    if message.get("function_call") is not None:
        raise _err("openai", "anthropic", f"{where}.function_call", "legacy function calls are not translated")
    calls = message.get("tool_calls") or []
    for j, call in enumerate(_as_list(calls, "openai", "anthropic", f"{where}.tool_calls")):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise _err("openai", "anthropic", at, "only function tool calls can be translated")
        fn = _obj(call.get("function"))
        if not isinstance(call.get("id"), str) or not isinstance(fn.get("name"), str):
            raise _err("openai", "anthropic", at, "a tool call needs an id and a function name")
        raw = fn.get("arguments")
        try:
            arguments = json.loads(raw) if isinstance(raw, str) and raw.strip() else {}
        except ValueError:
            raise _err("openai", "anthropic", f"{at}.function.arguments", "arguments are not valid JSON") from None
        if not isinstance(arguments, dict):
            raise _err("openai", "anthropic", f"{at}.function.arguments", "arguments must be a JSON object")
        blocks.append({"type": "tool_use", "id": call["id"], "name": fn["name"], "input": arguments})
    return blocks


# ----------------------------------------------------------------------------------------------------------------
# responses


def openai_response_to_anthropic(data: Mapping[str, Any]) -> JSON:
    """An Anthropic Message for a ChatCompletion (``choices[0]``; the request never asks for more)."""
    choices = data.get("choices") or [{}]
    choice = _obj(choices[0])
    message = _obj(choice.get("message"))
    content: list[JSON] = []
    text = _text_of(message.get("content"))
    refusal = message.get("refusal")
    if text:
        content.append({"type": "text", "text": text})
    elif isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else None
        if fn is None:
            continue  # a non-function (custom) tool call: the request never defines one
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                "name": fn.get("name") or "",
                "input": _parse_arguments(fn.get("arguments")),
            }
        )
    has_tools = any(b["type"] == "tool_use" for b in content)
    stop_reason, stop_sequence = _stop_from_finish(
        choice.get("finish_reason"), matched=choice.get("stop_reason"), tool_calls=has_tools
    )
    return {
        "id": data.get("id") or f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": data.get("model") or "",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _openai_usage_to_anthropic(data.get("usage")),
    }


def anthropic_response_to_openai(data: Mapping[str, Any]) -> JSON:
    """A ChatCompletion for an Anthropic Message (thinking and server-tool blocks have no place in it)."""
    texts: list[str] = []
    calls: list[JSON] = []
    for block in data.get("content") or []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") or {}, separators=(",", ":"), ensure_ascii=False)
            calls.append(
                {
                    "id": block.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": block.get("name") or "", "arguments": arguments},
                }
            )
    message: JSON = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
        "annotations": [],
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": data.get("id") or f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": data.get("model") or "",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_from_stop(data.get("stop_reason")),
            }
        ],
        "usage": _anthropic_usage_to_openai(data.get("usage")),
    }


def translate_request(body: Mapping[str, Any], caller_api: str, target_api: str) -> JSON:
    """The body to send for a caller on ``caller_api`` to a server on ``target_api`` (same protocol: a copy)."""
    model = body.get("model")
    if not isinstance(model, str):
        raise _err(caller_api, target_api, "model", "a model name is required")
    if caller_api == target_api:
        return dict(body)
    if caller_api == "anthropic" and target_api == "openai":
        return anthropic_request_to_openai(body, model)
    if caller_api == "openai" and target_api == "anthropic":
        return openai_request_to_anthropic(body, model)
    raise _err(caller_api, target_api, "api", f"no translation from {caller_api!r} to {target_api!r}")


def translated_for_estimate(
    body: Mapping[str, Any], caller_api: str, target_api: str, max_output_tokens: int | None
) -> tuple[JSON, int | None]:
    """The body the target will be sent and its output cap, so the guard estimates and reserves in its protocol.

    If the body cannot be translated *yet* (a one-shot iterator the SDK has not listed, which must not be consumed
    here), the caller's body is kept: the same body fails or succeeds again at send time, before anything leaves.
    """
    try:
        out = translate_request(body, caller_api, target_api)
    except ConfigError:
        return dict(body), max_output_tokens
    cap = out.get("max_tokens")
    return out, cap if isinstance(cap, int) and not isinstance(cap, bool) else max_output_tokens


def translate_response(data: Mapping[str, Any], target_api: str, caller_api: str) -> JSON:
    if target_api == "openai" and caller_api == "anthropic":
        return openai_response_to_anthropic(data)
    if target_api == "anthropic" and caller_api == "openai":
        return anthropic_response_to_openai(data)
    return dict(data)


def _error_body(data: Any, status: int, caller_api: str) -> JSON:
    """The upstream error reshaped so the caller's SDK finds its message where it looks for it."""
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
    kind = error.get("type") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message:
        message = f"the downgrade target answered HTTP {status}" if status else "the downgrade target failed"
    if not isinstance(kind, str):
        kind = "api_error" if status >= 500 or status == 0 else "invalid_request_error"
    if caller_api == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


# ----------------------------------------------------------------------------------------------------------------
# streams


class _Translator(Protocol):
    @property
    def complete(self) -> bool: ...

    def feed(self, event_name: str | None, data: dict[str, Any]) -> list[bytes]: ...

    def close(self) -> list[bytes]: ...


class OpenAIChunksToAnthropicEvents:
    """Chat-completion chunks in, Anthropic SSE events out, for an Anthropic caller of a chat server.

    Chat streams report usage only after the finish reason, in a chunk of its own, so ``message_delta`` (which
    carries the stop reason *and* the cumulative usage) waits for :meth:`close`, called on ``[DONE]``.
    """

    def __init__(self, model: str | None = None) -> None:
        self._model = model
        self._started = False
        self._closed = False
        self._open: int | None = None
        self._open_kind: str | None = None
        self._next = 0
        self._tools: dict[int, int] = {}
        self._finish: str | None = None
        self._matched: str | None = None
        self._usage: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        """Whether the upstream said why it stopped, so a stream ending without ``[DONE]`` can still end well."""
        return self._finish is not None

    def feed(self, event_name: str | None, data: dict[str, Any]) -> list[bytes]:
        if self._closed:
            return []
        if data.get("error") is not None and not data.get("choices"):
            self._closed = True
            return [_named_event("error", _error_body(data, 0, "anthropic"))]
        out: list[bytes] = []
        if not self._started:
            out.append(self._start(data))
        if isinstance(data.get("usage"), dict):
            self._usage = data["usage"]
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = _obj(choice.get("delta"))
            for key in ("content", "refusal"):
                if isinstance(delta.get(key), str) and delta[key]:
                    out += self._text(delta[key])
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    out += self._tool(call)
            if isinstance(choice.get("finish_reason"), str):
                self._finish = choice["finish_reason"]
                if isinstance(choice.get("stop_reason"), str):
                    self._matched = choice["stop_reason"]
        return out

    def close(self) -> list[bytes]:
        if self._closed:
            return []
        self._closed = True
        out: list[bytes] = []
        if not self._started:
            out.append(self._start({}))
        out += self._close_block()
        stop_reason, stop_sequence = _stop_from_finish(
            self._finish, matched=self._matched, tool_calls=bool(self._tools)
        )
        usage = _openai_usage_to_anthropic(self._usage)
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        out.append(_named_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(_named_event("message_stop", {"type": "message_stop"}))
        return out

    def _start(self, chunk: dict[str, Any]) -> bytes:
        self._started = True
        message: JSON = {
            "id": chunk.get("id") or f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model") or self._model or "",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return _named_event("message_start", {"type": "message_start", "message": message})

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        index, self._open, self._open_kind = self._open, None, None
        return [_named_event("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _open_block(self, kind: str, block: JSON) -> tuple[int, list[bytes]]:
        out = self._close_block()
        index, self._next = self._next, self._next + 1
        self._open, self._open_kind = index, kind
        start = {"type": "content_block_start", "index": index, "content_block": block}
        return index, [*out, _named_event("content_block_start", start)]

    def _text(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        index = self._open
        if index is None or self._open_kind != "text":
            index, out = self._open_block("text", {"type": "text", "text": ""})
        delta = {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}
        return [*out, _named_event("content_block_delta", delta)]

    def _tool(self, call: dict[str, Any]) -> list[bytes]:
        position = call.get("index", 0) if isinstance(call.get("index"), int) else 0
        fn = _obj(call.get("function"))
        out: list[bytes] = []
        index = self._tools.get(position)
        if index is None:
            block: JSON = {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                "name": fn.get("name") or "",
                "input": {},
            }
            index, out = self._open_block("tool", block)
            self._tools[position] = index
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out.append(
                _named_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            )
        return out


class AnthropicEventsToOpenAIChunks:
    """Anthropic SSE events in, ``chat.completion.chunk`` data lines out, for a chat caller of an Anthropic server.

    The finish chunk, a usage chunk (the guard's meter hides it when the caller did not ask for usage) and
    ``[DONE]`` are sent on ``message_stop``, once the cumulative usage of the last ``message_delta`` is known.
    """

    def __init__(self, model: str | None = None) -> None:
        self._id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self._model = model or ""
        self._created = int(time.time())
        self._started = False
        self._closed = False
        self._tools: dict[int, int] = {}
        self._usage: dict[str, Any] = {}
        self._stop: str | None = None

    @property
    def complete(self) -> bool:
        """Whether the upstream said why it stopped, so a stream ending without ``message_stop`` can still end."""
        return self._stop is not None

    def feed(self, event_name: str | None, data: dict[str, Any]) -> list[bytes]:
        if self._closed:
            return []
        kind = data.get("type") if isinstance(data.get("type"), str) else event_name
        if kind == "error":
            self._closed = True
            return [_data_event(_error_body(data, 0, "openai"))]
        out: list[bytes] = []
        if not self._started and kind in ("message_start", "content_block_start", "content_block_delta"):
            out.append(self._begin(data.get("message") if kind == "message_start" else None))
        if kind == "content_block_start":
            out += self._block_start(data)
        elif kind == "content_block_delta":
            out += self._block_delta(data)
        elif kind == "message_delta":
            delta = _obj(data.get("delta"))
            if isinstance(delta.get("stop_reason"), str):
                self._stop = delta["stop_reason"]
            if isinstance(data.get("usage"), dict):
                self._usage.update({k: v for k, v in data["usage"].items() if v is not None})
        elif kind == "message_stop":
            out += self.close()
        return out

    def close(self) -> list[bytes]:
        if self._closed:
            return []
        self._closed = True
        out: list[bytes] = [] if self._started else [self._begin(None)]
        out.append(self._chunk({}, _finish_from_stop(self._stop)))
        usage_chunk = {**self._base(), "choices": [], "usage": _anthropic_usage_to_openai(self._usage)}
        out += [_data_event(usage_chunk), _DONE]
        return out

    def _base(self) -> JSON:
        return {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self._model}

    def _chunk(self, delta: JSON, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _data_event({**self._base(), "choices": [choice]})

    def _begin(self, message: Any) -> bytes:
        self._started = True
        if isinstance(message, dict):
            if isinstance(message.get("id"), str):
                self._id = message["id"]
            if isinstance(message.get("model"), str):
                self._model = message["model"]
            if isinstance(message.get("usage"), dict):
                self._usage.update({k: v for k, v in message["usage"].items() if v is not None})
        return self._chunk({"role": "assistant", "content": ""})

    def _block_start(self, data: dict[str, Any]) -> list[bytes]:
        block = _obj(data.get("content_block"))
        index = data.get("index", 0)
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if block.get("type") != "tool_use":
            return []  # thinking, server tools: no place in a chat completion
        position = len(self._tools)
        self._tools[index] = position
        call = {
            "index": position,
            "id": block.get("id") or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": block.get("name") or "", "arguments": ""},
        }
        out = [self._chunk({"tool_calls": [call]})]
        if isinstance(block.get("input"), dict) and block["input"]:
            arguments = json.dumps(block["input"], separators=(",", ":"), ensure_ascii=False)
            out.append(self._chunk({"tool_calls": [{"index": position, "function": {"arguments": arguments}}]}))
        return out

    def _block_delta(self, data: dict[str, Any]) -> list[bytes]:
        delta = _obj(data.get("delta"))
        kind = delta.get("type")
        if kind == "text_delta" and isinstance(delta.get("text"), str) and delta["text"]:
            return [self._chunk({"content": delta["text"]})]
        position = self._tools.get(data.get("index", 0))
        if kind == "input_json_delta" and position is not None and delta.get("partial_json"):
            return [
                self._chunk({"tool_calls": [{"index": position, "function": {"arguments": delta["partial_json"]}}]})
            ]
        return []


class SSEParser:
    """Incremental server-sent-events decoding: bytes in any chunking, ``(event, data)`` pairs out."""

    _LINE = re.compile(rb"\r\n|\r|\n")

    def __init__(self) -> None:
        self._buffer = b""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[tuple[str | None, str]]:
        self._buffer += chunk
        out: list[tuple[str | None, str]] = []
        start = 0
        buffer = self._buffer
        while True:
            match = self._LINE.search(buffer, start)
            if match is None or (match.group() == b"\r" and match.end() == len(buffer)):
                break  # no full line yet (a lone trailing \r may be the first half of \r\n)
            self._line(buffer[start : match.start()].decode("utf-8"), out)
            start = match.end()
        self._buffer = buffer[start:]
        return out

    def flush(self) -> list[tuple[str | None, str]]:
        out: list[tuple[str | None, str]] = []
        if self._buffer:
            self._line(self._buffer.decode("utf-8", errors="replace"), out)
            self._buffer = b""
        self._line("", out)
        return out

    def _line(self, line: str, out: list[tuple[str | None, str]]) -> None:
        if not line:
            if self._data or self._event is not None:
                out.append((self._event, "\n".join(self._data)))
            self._event, self._data = None, []
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)


class _Pump:
    """Upstream SSE events -> the translator -> bytes for the caller; shared by the sync and async streams."""

    def __init__(self, translator: _Translator, target_api: str) -> None:
        self.translator = translator
        self.target_api = target_api
        self.parser = SSEParser()
        self.done = False

    def push(self, events: list[tuple[str | None, str]]) -> bytes:
        out: list[bytes] = []
        for name, data in events:
            if self.done:
                break
            if self.target_api == "openai" and data.strip() == "[DONE]":
                self.done = True
                out += self.translator.close()
                break
            if not data.strip():
                continue
            payload = json.loads(data)
            if isinstance(payload, dict):
                out += self.translator.feed(name, payload)
                if (name == "message_stop" or payload.get("type") == "message_stop") and self.target_api == "anthropic":
                    self.done = True
        return b"".join(out)

    def finish(self) -> bytes:
        """At the upstream's end: finish cleanly only if it said why it stopped, else leave the stream cut short."""
        tail = self.push(self.parser.flush())
        if not self.done and self.translator.complete:
            tail += b"".join(self.translator.close())
        self.done = True
        return tail


def _new_translator(target_api: str, model: str | None) -> _Translator:
    if target_api == "openai":
        return OpenAIChunksToAnthropicEvents(model)
    return AnthropicEventsToOpenAIChunks(model)


class _SyncTranslatedStream:
    """The caller's SSE body, produced lazily while the upstream body is read; closing it closes the upstream."""

    def __init__(self, upstream: Any, pump: _Pump) -> None:
        self._upstream = upstream
        self._pump = pump

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._upstream.iter_bytes():
            out = self._pump.push(self._pump.parser.feed(chunk))
            if out:
                yield out
            if self._pump.done:
                break
        tail = self._pump.finish()
        if tail:
            yield tail

    def close(self) -> None:
        self._upstream.close()

    @property
    def elapsed(self) -> Any:
        return _elapsed(self._upstream)


class _AsyncTranslatedStream:
    """Async twin of :class:`_SyncTranslatedStream`."""

    def __init__(self, upstream: Any, pump: _Pump) -> None:
        self._upstream = upstream
        self._pump = pump

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._upstream.aiter_bytes():
            out = self._pump.push(self._pump.parser.feed(chunk))
            if out:
                yield out
            if self._pump.done:
                break
        tail = self._pump.finish()
        if tail:
            yield tail

    async def aclose(self) -> None:
        await self._upstream.aclose()

    @property
    def elapsed(self) -> Any:
        return _elapsed(self._upstream)


def _elapsed(response: Any) -> Any:
    try:
        return response.elapsed
    except RuntimeError:
        return None


_T = TypeVar("_T")


@lru_cache(maxsize=8)
def _stream_type(mixin: type[_T], base: type[Any]) -> type[_T]:
    """``mixin`` made a subclass of the HTTP library's byte-stream base, which ``Response`` checks with isinstance.

    Built at run time from the caller client's own HTTP module (``httpx2``, or ``httpx`` for older SDKs), so this
    module imports neither.
    """
    return type(mixin.__name__, (mixin, base), {})


# ----------------------------------------------------------------------------------------------------------------
# I/O glue


@dataclass
class _Call:
    client: Any
    http: Any
    sdk: Any
    options: Any
    request: Any
    cast_to: Any
    stream: bool
    stream_cls: Any
    caller_api: str
    target_api: str
    model: str | None


_PRIVATE_HEADERS = frozenset(
    {
        "authorization",
        "x-api-key",
        "api-key",
        "anthropic-version",
        "anthropic-beta",
        "openai-organization",
        "openai-project",
        "content-type",
        "content-length",
        "accept",
        "host",
        "user-agent",
        "x-stainless-retry-count",
        "x-stainless-timeout",
        "idempotency-key",
    }
)
_DROPPED_RESPONSE_HEADERS = frozenset({"content-type", "content-length", "content-encoding", "transfer-encoding"})


def _module_of(obj: Any) -> Any:
    return importlib.import_module(type(obj).__module__.split(".")[0])


def _http_module(http_client: Any) -> Any:
    """The HTTP library (``httpx2``, or ``httpx`` under older SDKs) of the SDK's client wrapper class."""
    for cls in type(http_client).__mro__:
        root = cls.__module__.split(".")[0]
        if root in ("httpx2", "httpx"):
            return importlib.import_module(root)
    raise TypeError(f"cannot tell which HTTP library {type(http_client).__name__} belongs to")


def _check_route(options: Any, caller_api: str, target_api: str) -> None:
    url = str(getattr(options, "url", ""))
    expected = "/chat/completions" if caller_api == "openai" else "/v1/messages"
    if url.rstrip("/") != expected:
        raise _err(
            caller_api, target_api, "url", f"only {expected} calls can be sent to a server of the other protocol"
        )


def _merged_body(options: Any) -> JSON:
    body = options.json_data
    extra = getattr(options, "extra_json", None)
    if isinstance(extra, Mapping) and isinstance(body, Mapping):
        body = {**body, **extra}
    if not isinstance(body, Mapping):
        raise ConfigError("the request has no JSON body to translate", key="body")
    plain: JSON = _plain(body)
    return plain


def _build(
    client: Any,
    options: Any,
    prepared: Any,
    cast_to: Any,
    stream: bool,
    stream_cls: Any,
    target_base_url: str,
    target_api: str,
    api_key: str | None,
    caller_api: str,
) -> _Call:
    _check_route(options, caller_api, target_api)
    body = _merged_body(prepared)
    payload = translate_request(body, caller_api, target_api)
    if stream:
        payload["stream"] = True
        if target_api == "openai":
            payload["stream_options"] = {"include_usage": True}
    else:
        payload.pop("stream", None)
        payload.pop("stream_options", None)
    base = target_base_url.rstrip("/")
    url = base + ("/chat/completions" if target_api == "openai" else "/v1/messages")
    headers: dict[str, str] = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream" if stream else "application/json",
        "User-Agent": f"{getattr(client, 'user_agent', 'python')} tokenbudget",
    }
    custom = getattr(options, "headers", None)
    if isinstance(custom, Mapping):
        headers.update({k: v for k, v in custom.items() if isinstance(v, str) and k.lower() not in _PRIVATE_HEADERS})
    if target_api == "anthropic":
        headers["anthropic-version"] = ANTHROPIC_VERSION
        if api_key:
            headers["x-api-key"] = api_key
    elif api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    timeout = getattr(options, "timeout", None)
    if timeout is None or _sentinel(timeout):
        timeout = getattr(client, "timeout", None)
    kwargs: JSON = {"headers": headers, "content": _dumps(payload)}
    if timeout is None or isinstance(timeout, (int, float)) or type(timeout).__name__ == "Timeout":
        kwargs["timeout"] = timeout
    request = client._client.build_request("POST", url, **kwargs)
    model = payload.get("model") if isinstance(payload.get("model"), str) else None
    return _Call(
        client,
        _http_module(client._client),
        _module_of(client),
        prepared,
        request,
        cast_to,
        stream,
        stream_cls,
        caller_api,
        target_api,
        model,
    )


def _max_retries(call: _Call) -> int:
    default = getattr(call.client, "max_retries", 0)
    getter = getattr(call.options, "get_max_retries", None)
    value = getter(default) if callable(getter) else default
    return value if isinstance(value, int) and hasattr(call.client, "_sleep_for_retry") else 0


def _connection_error(call: _Call, err: Exception) -> Exception:
    """The caller SDK's own exception for a failed send, chained so the guard can tell 'never sent' apart."""
    if isinstance(err, call.http.TimeoutException):
        timeout_error: Exception = call.sdk.APITimeoutError(request=call.request)
        return timeout_error
    connection_error: Exception = call.sdk.APIConnectionError(request=call.request)
    return connection_error


def _response_headers(upstream: Any, content_type: str) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _DROPPED_RESPONSE_HEADERS]
    request_id = upstream.headers.get("x-request-id") or upstream.headers.get("request-id")
    names = {k.lower() for k, _ in headers}
    if request_id:
        headers += [(k, request_id) for k in ("x-request-id", "request-id") if k not in names]
    return [*headers, ("content-type", content_type)]


def _status_error(call: _Call, upstream: Any) -> Exception:
    try:
        data = json.loads(upstream.content)
    except ValueError:
        data = {"error": {"message": upstream.text.strip()}} if upstream.text.strip() else None
    body = _error_body(data, upstream.status_code, call.caller_api)
    reshaped = call.http.Response(
        upstream.status_code,
        headers=_response_headers(upstream, "application/json"),
        content=_dumps(body),
        request=call.request,
    )
    error: Exception = call.client._make_status_error_from_response(reshaped)
    return error


def _json_response(call: _Call, upstream: Any) -> Any:
    try:
        data = json.loads(upstream.content)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise call.sdk.APIResponseValidationError(
            response=upstream, body=upstream.text, message=f"the downgrade target sent an unreadable answer: {exc}"
        ) from exc
    translated = translate_response(data, call.target_api, call.caller_api)
    response = call.http.Response(
        upstream.status_code,
        headers=_response_headers(upstream, "application/json"),
        content=_dumps(translated),
        request=call.request,
    )
    elapsed = _elapsed(upstream)
    if elapsed is not None:
        response.elapsed = elapsed
    return response


def _stream_response(call: _Call, upstream: Any, *, is_async: bool) -> Any:
    pump = _Pump(_new_translator(call.target_api, call.model), call.target_api)
    if is_async:
        stream: Any = _stream_type(_AsyncTranslatedStream, call.http.AsyncByteStream)(upstream, pump)
    else:
        stream = _stream_type(_SyncTranslatedStream, call.http.SyncByteStream)(upstream, pump)
    return call.http.Response(
        upstream.status_code,
        headers=_response_headers(upstream, "text/event-stream; charset=utf-8"),
        stream=stream,
        request=call.request,
    )


def send_translated(
    client: Any,
    options: Any,
    *,
    cast_to: Any,
    stream: bool,
    stream_cls: Any,
    target_base_url: str,
    target_api: str,
    api_key: str | None,
    caller_api: str,
) -> Any:
    """Send a downgraded call to a server of the other protocol and hand back the caller SDK's own result.

    ``options`` is the caller's request (already rewritten to the target model); retries follow the caller
    client's own policy, and errors become the caller SDK's own exceptions.
    """
    override = getattr(client, "_maybe_override_cast_to", None)
    if callable(override):
        cast_to = override(cast_to, options)
    prepare = getattr(client, "_copy_and_prepare", None)
    prepared = prepare(options) if callable(prepare) else options
    call = _build(
        client, options, prepared, cast_to, stream, stream_cls, target_base_url, target_api, api_key, caller_api
    )
    retries = _max_retries(call)
    for attempt in range(retries + 1):
        try:
            upstream = client._client.send(call.request, stream=stream)
        except Exception as err:
            if attempt < retries:
                client._sleep_for_retry(retries_taken=attempt, max_retries=retries, options=call.options, response=None)
                continue
            raise _connection_error(call, err) from err
        if upstream.status_code >= 400:
            if attempt < retries and client._should_retry(upstream):
                upstream.close()
                client._sleep_for_retry(
                    retries_taken=attempt, max_retries=retries, options=call.options, response=upstream
                )
                continue
            if stream:
                upstream.read()
            raise _status_error(call, upstream)
        break
    response = _stream_response(call, upstream, is_async=False) if stream else _json_response(call, upstream)
    return client._process_response(
        cast_to=call.cast_to, options=call.options, response=response, stream=stream, stream_cls=stream_cls
    )


async def asend_translated(
    client: Any,
    options: Any,
    *,
    cast_to: Any,
    stream: bool,
    stream_cls: Any,
    target_base_url: str,
    target_api: str,
    api_key: str | None,
    caller_api: str,
) -> Any:
    """Async twin of :func:`send_translated`."""
    override = getattr(client, "_maybe_override_cast_to", None)
    if callable(override):
        cast_to = override(cast_to, options)
    prepare = getattr(client, "_copy_and_prepare", None)
    prepared = prepare(options) if callable(prepare) else options
    if inspect.isawaitable(prepared):
        prepared = await prepared
    call = _build(
        client, options, prepared, cast_to, stream, stream_cls, target_base_url, target_api, api_key, caller_api
    )
    retries = _max_retries(call)
    for attempt in range(retries + 1):
        try:
            upstream = await client._client.send(call.request, stream=stream)
        except Exception as err:
            if attempt < retries:
                await client._sleep_for_retry(
                    retries_taken=attempt, max_retries=retries, options=call.options, response=None
                )
                continue
            raise _connection_error(call, err) from err
        if upstream.status_code >= 400:
            if attempt < retries and client._should_retry(upstream):
                await upstream.aclose()
                await client._sleep_for_retry(
                    retries_taken=attempt, max_retries=retries, options=call.options, response=upstream
                )
                continue
            if stream:
                await upstream.aread()
            raise _status_error(call, upstream)
        break
    response = _stream_response(call, upstream, is_async=True) if stream else _json_response(call, upstream)
    return await client._process_response(
        cast_to=call.cast_to, options=call.options, response=response, stream=stream, stream_cls=stream_cls
    )
