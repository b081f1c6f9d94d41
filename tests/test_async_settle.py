"""An async caller's settlement awaits the ledger instead of blocking its event loop (Redis, SQLite in a thread)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest

import tokenbudget
from tokenbudget.events import CallEvent
from tokenbudget.ledger import MemoryLedger
from tokenbudget.ledger.base import Allowance, Balance, Reservation
from tokenbudget.testing import Reply, StandInServer

MSG = [{"role": "user", "content": "hi"}]


class LoopWatchingLedger(MemoryLedger):
    """A memory ledger that notes which settlements ran on a thread with a running event loop, synchronously."""

    def __init__(self) -> None:
        super().__init__()
        self.sync_on_loop = 0
        self.async_settles = 0

    def _note_sync(self) -> None:
        import asyncio

        try:
            asyncio.get_running_loop()
            self.sync_on_loop += 1
        except RuntimeError:
            pass

    def settle(self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *,
               now: float) -> bool:
        self._note_sync()
        return super().settle(reservation, micros, tokens, event, now=now)

    def settle_and_read(self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *,
                        now: float, allowances: Sequence[Allowance]) -> tuple[bool, dict[str, Balance]]:
        self._note_sync()
        return super().settle_and_read(reservation, micros, tokens, event, now=now, allowances=allowances)

    async def asettle(self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *,
                      now: float) -> bool:
        self.async_settles += 1
        return MemoryLedger.settle(self, reservation, micros, tokens, event, now=now)

    async def asettle_and_read(self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *,
                               now: float, allowances: Sequence[Allowance]) -> tuple[bool, dict[str, Balance]]:
        self.async_settles += 1
        return MemoryLedger.settle_and_read(self, reservation, micros, tokens, event, now=now, allowances=allowances)


@pytest.mark.parametrize("stream", [False, True])
async def test_async_openai_settles_with_await(srv: StandInServer, async_openai_client: Any, stream: bool) -> None:
    ledger = LoopWatchingLedger()
    tokenbudget.install(ledger=ledger, budget_usd=1)
    srv.reply = Reply(input_tokens=10, output_tokens=3)
    r = await async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=stream)
    if stream:
        async for _ in r:
            pass
    assert (ledger.async_settles, ledger.sync_on_loop) == (1, 0)
    (event,) = ledger.events()
    assert event.status == "ok" and event.input_tokens == 10


@pytest.mark.parametrize("stream", [False, True])
async def test_async_anthropic_settles_with_await(srv: StandInServer, async_anthropic_client: Any,
                                                  stream: bool) -> None:
    ledger = LoopWatchingLedger()
    tokenbudget.install(ledger=ledger, budget_usd=1)
    srv.reply = Reply(input_tokens=10, output_tokens=3)
    if stream:
        async with async_anthropic_client.messages.stream(model="claude-haiku-4-5", max_tokens=10,
                                                          messages=MSG) as s:
            await s.get_final_message()
    else:
        await async_anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    assert (ledger.async_settles, ledger.sync_on_loop) == (1, 0)


def test_sync_callers_still_settle_synchronously(srv: StandInServer, openai_client: Any) -> None:
    ledger = LoopWatchingLedger()
    tokenbudget.install(ledger=ledger, budget_usd=1)
    openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert ledger.async_settles == 0 and len(list(ledger.events())) == 1
    assert threading.current_thread() is threading.main_thread()


async def test_a_first_encoding_load_waits_off_the_event_loop(monkeypatch: pytest.MonkeyPatch, srv: StandInServer,
                                                            async_openai_client: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The first estimate waits for tiktoken to load (¼ s from a cache, up to 15 s when fetched): an async caller
    waits in a thread, so its event loop keeps running. Here the loader finishes only when the loop itself releases
    it; a loop blocked in the wait would time out and send the call on the fallback estimate first."""
    import asyncio

    import tiktoken

    from tokenbudget import estimate

    release = threading.Event()

    def slow(name: str) -> Any:
        if not release.wait(10):
            raise TimeoutError("never released")
        return tiktoken.get_encoding(name)

    monkeypatch.setattr(estimate, "_REGISTRY", estimate._EncodingRegistry(slow, wait_seconds=2))
    ledger = MemoryLedger()
    tokenbudget.install(ledger=ledger, budget_usd=1)
    task = asyncio.create_task(
        async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5)
    )
    await asyncio.sleep(0.2)  # the call is waiting for the encoding; this loop is not
    assert srv.requests == [] and not task.done()
    release.set()
    await task
    assert len(srv.requests) == 1
    assert not any("cannot load tiktoken encoding" in r.getMessage() for r in caplog.records)
    (event,) = ledger.events()
    assert event.status == "ok"
