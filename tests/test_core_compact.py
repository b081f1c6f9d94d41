"""``responses.compact`` posts directly to /responses/compact: it is billed, so it is guarded like ``create``."""

from __future__ import annotations

from typing import Any

import tokenbudget
from tokenbudget.testing import Reply, StandInServer


def micros_gpt5(inp: int, out: int) -> int:
    # gpt-5: $1.25 / MTok input, $10 / MTok output
    return (inp * 1_250_000 + out * 10_000_000 + 500_000) // 1_000_000


def test_compact_is_guarded(guard: tokenbudget.Guard, openai_client: Any, srv: StandInServer, otel: Any) -> None:
    srv.reply = Reply(input_tokens=4000, output_tokens=300)
    compacted = openai_client.responses.compact(model="gpt-5", input="a long conversation")
    assert compacted.object == "response.compaction"
    (event,) = guard.ledger.events()
    assert (event.input_tokens, event.output_tokens) == (4000, 300)
    assert event.cost_micros == micros_gpt5(4000, 300)
    (span,) = otel.spans()
    assert span.attributes["gen_ai.usage.input_tokens"] == 4000
    assert guard.ledger.active_reservations(now=guard.clock.now()) == []


async def test_compact_async_refused_before_sending(async_openai_client: Any, srv: StandInServer) -> None:
    tokenbudget.install({"ledger": "memory://"}, budget_usd=0.0001)
    try:
        await async_openai_client.responses.compact(model="gpt-5", input="a long conversation")
    except tokenbudget.BudgetExceeded:
        pass
    else:  # pragma: no cover - the assertion below explains
        raise AssertionError("compact was not refused")
    assert srv.requests == []
