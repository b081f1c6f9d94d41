"""An async caller's ledger steps never block its event loop: they wait in a thread (Redis, a contended SQLite file),
or run in place when they cannot wait (memory, an uncontended SQLite file)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest

import tokenbudget
from ticker import Ticker
from tokenbudget.events import CallEvent
from tokenbudget.ledger import MemoryLedger
from tokenbudget.ledger.base import Allowance, Balance, Reservation
from tokenbudget.ledger.sqlite import SQLiteLedger
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

    # It stands for a ledger whose steps would wait (Redis, a contended SQLite file), so it never answers in place.
    def reserve_nowait(self, *args: Any, **kwargs: Any) -> None:
        return None

    def settle_and_read_nowait(self, *args: Any, **kwargs: Any) -> None:
        return None

    def balance_nowait(self, *args: Any, **kwargs: Any) -> None:
        return None

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


async def _one_openai_call(ledger: Any, srv: StandInServer, client: Any, stream: bool) -> None:
    tokenbudget.install(ledger=ledger, budget_usd=1)
    srv.reply = Reply(input_tokens=10, output_tokens=3)
    r = await client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=stream)
    if stream:
        async for _ in r:
            pass


@pytest.mark.parametrize("stream", [False, True])
async def test_async_openai_settles_with_await(srv: StandInServer, async_openai_client: Any, stream: bool) -> None:
    ledger = LoopWatchingLedger()
    await _one_openai_call(ledger, srv, async_openai_client, stream)
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


class ThreadNotingSQLiteLedger(SQLiteLedger):
    """The real SQLite ledger, noting on which thread each reserve and settle transaction ran."""

    def __init__(self, path: Any) -> None:
        super().__init__(path)
        self.threads: list[tuple[str, int]] = []

    def _reserve(self, conn: Any, *args: Any) -> Any:
        self.threads.append(("reserve", threading.get_ident()))
        return super()._reserve(conn, *args)

    def _settle_and_read(self, conn: Any, *args: Any) -> Any:
        self.threads.append(("settle", threading.get_ident()))
        return super()._settle_and_read(conn, *args)


@pytest.mark.parametrize("stream", [False, True])
async def test_async_calls_on_an_uncontended_sqlite_file_skip_the_thread_hops(
    srv: StandInServer, async_openai_client: Any, tmp_path: Any, stream: bool
) -> None:
    """A local SQLite step takes tens of microseconds; two hops through asyncio.to_thread cost several times that.
    With nothing else holding the file, both transactions run in place on the event loop's thread."""
    ledger = ThreadNotingSQLiteLedger(tmp_path / "ledger.db")
    await _one_openai_call(ledger, srv, async_openai_client, stream)
    loop_thread = threading.get_ident()
    assert ledger.threads == [("reserve", loop_thread), ("settle", loop_thread)]
    (event,) = ledger.events()
    assert event.status == "ok" and event.input_tokens == 10


async def test_a_sqlite_file_locked_by_another_process_is_waited_for_off_the_event_loop(
    srv: StandInServer, async_openai_client: Any, tmp_path: Any
) -> None:
    """Another process's write transaction holds the file: the call's reserve waits in a worker thread (the loop
    keeps ticking meanwhile), then goes out and is charged once the file is free."""
    import asyncio
    import sqlite3

    ledger = ThreadNotingSQLiteLedger(tmp_path / "ledger.db")
    tokenbudget.install(ledger=ledger, budget_usd=1)
    srv.reply = Reply(input_tokens=10, output_tokens=3)
    other = sqlite3.connect(str(tmp_path / "ledger.db"), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    call = asyncio.create_task(async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG))
    try:
        async with Ticker() as ticker:
            await asyncio.sleep(0.4)
        assert not call.done() and srv.requests == []  # nothing is sent before the reservation
        assert ticker.ticks >= 10  # a loop stuck in SQLite's busy wait would not have ticked
        other.execute("COMMIT")
        await asyncio.wait_for(call, 10)
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()
    loop_thread = threading.get_ident()
    (kind, thread), *_ = ledger.threads
    assert kind == "reserve" and thread != loop_thread
    assert len(srv.requests) == 1
    (event,) = ledger.events()
    assert event.status == "ok" and event.cost_micros > 0
