"""64 concurrent callers against a budget that affords exactly 10 calls: exactly 10 go out, the rest never leave."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import anthropic
import openai
import pytest

import tokenbudget
from tokenbudget.testing import Reply, StandInServer

MESSAGES = [{"role": "user", "content": "hi"}]


def _install_affording(n: int, probe: tokenbudget.CallRequest) -> tuple[tokenbudget.Guard, int]:
    guard = tokenbudget.install({"ledger": "memory://"}, budget_usd=1000)
    ticket = guard.begin(probe)
    per_call = ticket.reserved_micros
    ticket.unsent(RuntimeError("probe"))
    limit_usd = (per_call * n + per_call // 2) / 1e6  # room for n, not for n + 1
    return tokenbudget.install({"ledger": "memory://"}, budget_usd=limit_usd), per_call


def _chat_probe(model: str, max_tokens: int, api: str = "openai") -> tokenbudget.CallRequest:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens}
    return tokenbudget.CallRequest(
        provider=api, operation="chat", model=model, body=body, max_output_tokens=max_tokens, api=api
    )


def test_64_threads_exactly_10_openai(srv: StandInServer) -> None:
    guard, _per_call = _install_affording(10, _chat_probe("gpt-4o", 1000))
    # The server bills the full worst case, so every committed call costs what it reserved.
    srv.reply = Reply(input_tokens=guard.estimator.input_tokens(_chat_probe("gpt-4o", 1000)), output_tokens=1000)
    client = openai.OpenAI(base_url=srv.openai_base_url, api_key="k", max_retries=0)
    barrier = threading.Barrier(64)
    ok: list[int] = []
    refused: list[int] = []

    def call(i: int) -> None:
        barrier.wait()
        try:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1000)
            ok.append(i)
        except tokenbudget.BudgetExceeded:
            refused.append(i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 10 and len(refused) == 54
    assert len(srv.requests) == 10
    events = [e for e in guard.ledger.events() if e.status == "ok"]
    assert len(events) == 10
    total = sum(e.cost_micros for e in events)
    assert total <= guard.policy.matches(guard.default_principal, "gpt-4o", 0)[0].allowance.limit_micros
    assert guard.ledger.active_reservations(now=guard.clock.now()) == []


async def test_64_tasks_exactly_10_anthropic(srv: StandInServer) -> None:
    probe = _chat_probe("claude-sonnet-4-6", 1000, api="anthropic")
    guard, _per_call = _install_affording(10, probe)
    srv.reply = Reply(input_tokens=guard.estimator.input_tokens(probe), output_tokens=1000)
    client = anthropic.AsyncAnthropic(base_url=srv.anthropic_base_url, api_key="k", max_retries=0)
    start = asyncio.Event()

    async def call() -> bool:
        await start.wait()
        try:
            await client.messages.create(model="claude-sonnet-4-6", messages=MESSAGES, max_tokens=1000)
            return True
        except tokenbudget.BudgetExceeded:
            return False

    tasks = [asyncio.create_task(call()) for _ in range(64)]
    await asyncio.sleep(0)
    start.set()
    results = await asyncio.gather(*tasks)
    assert sum(results) == 10
    assert len(srv.requests) == 10
    limit = guard.policy.matches(guard.default_principal, "claude-sonnet-4-6", 0)[0].allowance.limit_micros
    assert sum(e.cost_micros for e in guard.ledger.events()) <= limit
    assert guard.ledger.active_reservations(now=guard.clock.now()) == []


@pytest.mark.parametrize("stream", [False, True])
async def test_64_tasks_openai_async_never_overspend(srv: StandInServer, stream: bool) -> None:
    guard, _per_call = _install_affording(10, _chat_probe("gpt-4o", 500))
    srv.reply = Reply(input_tokens=guard.estimator.input_tokens(_chat_probe("gpt-4o", 500)), output_tokens=500)
    client = openai.AsyncOpenAI(base_url=srv.openai_base_url, api_key="k", max_retries=0)

    async def call() -> bool:
        try:
            r = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=500, stream=stream)
            if stream:
                async for _ in r:
                    pass
            return True
        except tokenbudget.BudgetExceeded:
            return False

    results = await asyncio.gather(*(call() for _ in range(64)))
    assert sum(results) == 10 and len(srv.requests) == 10
    assert guard.ledger.active_reservations(now=guard.clock.now()) == []
