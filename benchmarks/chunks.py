"""Per-chunk streaming overhead, measured directly on tokenbudget's stream meters.

The SDK reads a stream through ``Stream._iter_events``; tokenbudget wraps that generator once per stream in
``StreamMeter.tee``, which calls ``observe`` on every event. So the per-chunk cost is exactly: one more generator
layer plus ``observe``. It is measured as a slope -- (time for a long stream - time for a short one) / extra chunks,
for the meter and for a plain pass-through generator alike -- so the once-per-stream settle cancels out. Events are
the SDK's own ``ServerSentEvent`` objects with vendor-shaped JSON, as the stand-in server sends them.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator
from typing import Any

from ._stats import median, summary_us


def _openai_events(n: int) -> list[Any]:
    from openai._streaming import ServerSentEvent

    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini",
            "system_fingerprint": "fp_bench", "usage": None}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> Any:
        data = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return ServerSentEvent(data=json.dumps(data))

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": f" word{i}"}) for i in range(n)]
    events.append(chunk({}, "stop"))
    usage = {"prompt_tokens": 120, "completion_tokens": n, "total_tokens": 120 + n,
             "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
    events.append(ServerSentEvent(data=json.dumps({**base, "choices": [], "usage": usage})))
    events.append(ServerSentEvent(data="[DONE]"))
    return events


def _anthropic_events(n: int) -> list[Any]:
    from anthropic._streaming import ServerSentEvent

    def ev(name: str, data: dict[str, Any]) -> Any:
        return ServerSentEvent(event=name, data=json.dumps(data))

    message: dict[str, Any] = {
               "id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-haiku-4-5", "content": [],
               "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 120, "output_tokens": 1, "cache_read_input_tokens": 0,
                         "cache_creation_input_tokens": 0}}
    events = [ev("message_start", {"type": "message_start", "message": message}),
              ev("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}),
              ev("ping", {"type": "ping"})]
    events += [ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": f" word{i}"}}) for i in range(n)]
    events.append(ev("content_block_stop", {"type": "content_block_stop", "index": 0}))
    events.append(ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                          "stop_sequence": None},
                                       "usage": {"output_tokens": n}}))
    events.append(ev("message_stop", {"type": "message_stop"}))
    return events


def _passthrough(events: list[Any]) -> Iterator[Any]:
    yield from events  # what the SDK's own ``_iter_events`` generator costs per event, give or take


def _meter_for(vendor: str, ticket: Any) -> Any:
    if vendor == "openai":
        from tokenbudget.integrations.openai import ChatStreamMeter

        return ChatStreamMeter(ticket, hide_usage_chunk=True)
    from tokenbudget.integrations.anthropic import MessagesStreamMeter

    return MessagesStreamMeter(ticket)


def run(*, repeats: int, low: int = 16, high: int = 1024) -> list[dict[str, Any]]:
    import tokenbudget
    from tokenbudget.calls import CallRequest

    guard = tokenbudget.Guard(tokenbudget.Settings(ledger="memory://", budget_usd=1_000_000.0))
    out: list[dict[str, Any]] = []
    for vendor in ("openai", "anthropic"):
        make = _openai_events if vendor == "openai" else _anthropic_events
        streams = {n: make(n) for n in (low, high)}
        model = "gpt-4o-mini" if vendor == "openai" else "claude-haiku-4-5"
        request = CallRequest(
            provider=vendor, operation="chat", model=model, body={"model": model, "messages": [
                {"role": "user", "content": "hi"}]}, stream=True, max_output_tokens=256, api=vendor,
        )
        times: dict[tuple[str, int], list[int]] = {(k, n): [] for k in ("bare", "meter") for n in (low, high)}
        clock = time.perf_counter_ns
        gc.collect()
        for _ in range(repeats):
            for n in (low, high):  # interleaved: bare, meter, bare, meter ...
                events = streams[n]
                t0 = clock()
                for _sse in _passthrough(events):
                    pass
                times[("bare", n)].append(clock() - t0)
                meter = _meter_for(vendor, guard.begin(request))
                t0 = clock()
                for _sse in meter.tee(_passthrough(events)):
                    pass
                times[("meter", n)].append(clock() - t0)
        med = {k: median(v) for k, v in times.items()}
        slope_meter = (med[("meter", high)] - med[("meter", low)]) / (high - low)
        slope_bare = (med[("bare", high)] - med[("bare", low)]) / (high - low)
        per_chunk_ns = slope_meter - slope_bare
        fixed_ns = (med[("meter", low)] - med[("bare", low)]) - per_chunk_ns * low
        out.append({
            "name": f"{vendor} stream meter, per chunk", "median_us": per_chunk_ns / 1000.0,
            "method": f"slope over {low}..{high} chunks, meter.tee minus a pass-through generator",
            "repeats": repeats,
        })
        out.append({
            "name": f"{vendor} stream meter, once per stream (settle)", "median_us": fixed_ns / 1000.0,
            "method": "intercept of the same fit: finish() -> Ticket.ok -> ledger settle + span end",
            "repeats": repeats,
        })
        out.append({
            "name": f"{vendor} stream of {high} chunks through the meter", **summary_us(times[("meter", high)]),
        })
    guard.close()
    return out
