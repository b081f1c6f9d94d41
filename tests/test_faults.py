"""Faults through the real OpenAI and Anthropic SDKs: the caller gets the SDK's own error (or its result, or a
``LedgerError`` when the ledger itself is broken) and the ledger stays exact.

"Exact" (:func:`assert_exact`): every event id once, no reservation left held, and for every budget account the spent
money and tokens equal the sum over the events charged to it. Statuses and charges follow docs/concepts.md: an error
status charges nothing, a call given up after sending charges the estimated input, a stream cut short charges the
input plus the output received (counted with the estimator).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

import tokenbudget
from tokenbudget.events import CallEvent
from tokenbudget.ledger import Allowance, Ledger
from tokenbudget.ledger.sqlite import SQLiteLedger
from tokenbudget.testing import Fault, Reply, StandInServer

MSG = [{"role": "user", "content": "please count these words for me"}]
MAX_TOKENS = 200
TEXT = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
IN, OUT = 1200, 10  # what the stand-in reports for a complete answer


# -- the two vendors, one interface ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Vendor:
    name: str
    model: str
    input_pico: int  # per token, from the vendor price list (checked in test_pricing)
    output_pico: int

    @property
    def sdk(self) -> Any:
        return openai if self.name == "openai" else anthropic

    def client(self, srv: StandInServer, *, is_async: bool = False, max_retries: int = 0, timeout: float = 30.0,
               base_url: str | None = None) -> Any:
        if self.name == "openai":
            cls: Any = openai.AsyncOpenAI if is_async else openai.OpenAI
            url = base_url or srv.openai_base_url
        else:
            cls = anthropic.AsyncAnthropic if is_async else anthropic.Anthropic
            url = base_url or srv.anthropic_base_url
        return cls(base_url=url, api_key="sk-test", max_retries=max_retries, timeout=timeout)

    def body(self, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": MSG, "max_tokens": MAX_TOKENS}
        if stream:
            body["stream"] = True
        return body

    def create(self, client: Any) -> Callable[..., Any]:
        return client.chat.completions.create if self.name == "openai" else client.messages.create  # type: ignore[no-any-return]

    def estimate(self, guard: tokenbudget.Guard, stream: bool = False) -> int:
        return guard.estimator.input_tokens(tokenbudget.CallRequest(
            provider=self.name, operation="chat", model=self.model, body=self.body(stream), stream=stream,
            max_output_tokens=MAX_TOKENS, api=self.name))

    def cost(self, inp: int, out: int) -> int:
        return (inp * self.input_pico + out * self.output_pico + 500_000) // 1_000_000

    def partial_output(self, guard: tokenbudget.Guard, received: str, started: bool) -> int:
        """Output tokens charged for a stream cut short after ``received`` arrived."""
        counted = guard.estimator.text_tokens(self.model, received) if received else 0
        # Anthropic's message_start already reports output_tokens=1; the meter keeps the larger figure.
        return max(1, counted) if self.name == "anthropic" and started else counted

    def partial_input(self, guard: tokenbudget.Guard, started: bool) -> int:
        """Input charged for a stream cut short: Anthropic sends its figure in message_start, OpenAI only at the end."""
        return IN if self.name == "anthropic" and started else self.estimate(guard, stream=True)

    def text(self, item: Any) -> str:
        """The text one stream item (chunk / event) or one whole response carries."""
        if self.name == "openai":
            choices = getattr(item, "choices", None) or []
            if not choices:
                return ""
            c = choices[0]
            msg = getattr(c, "message", None)
            if msg is not None:
                return msg.content or ""
            return c.delta.content or ""
        if getattr(item, "type", None) == "message":
            return "".join(getattr(b, "text", "") for b in item.content)
        if getattr(item, "type", None) == "content_block_delta":
            return getattr(item.delta, "text", "") or ""
        return ""


OPENAI = Vendor("openai", "gpt-4o-mini", 150_000, 600_000)
ANTHROPIC = Vendor("anthropic", "claude-haiku-4-5", 1_000_000, 5_000_000)
VENDORS = [pytest.param(OPENAI, id="openai"), pytest.param(ANTHROPIC, id="anthropic")]
MODES = ["sync", "async", "sync-stream", "async-stream"]
STREAM_MODES = ["sync-stream", "async-stream"]


async def call(vendor: Vendor, srv: StandInServer, mode: str, **client_kw: Any) -> str:
    """One call in ``mode`` through the real SDK, stream read to the end; returns the text the caller received."""
    is_async, stream = mode.startswith("async"), mode.endswith("stream")
    client = vendor.client(srv, is_async=is_async, **client_kw)
    create = vendor.create(client)
    if not is_async:
        result = create(**vendor.body(stream))
        return "".join(vendor.text(i) for i in result) if stream else vendor.text(result)
    result = await create(**vendor.body(stream))
    return "".join([vendor.text(i) async for i in result]) if stream else vendor.text(result)


# -- the ledger is exact ---------------------------------------------------------------------------------------------
def assert_exact(
    guard: tokenbudget.Guard, *, calls: int | None = None, ledger: Ledger | None = None
) -> list[CallEvent]:
    """No lost, duplicated or half-settled call: ids unique, nothing held, every account equals its events."""
    led = ledger or guard.ledger
    now = guard.clock.now() if ledger is None else time.time()
    events = list(led.events())
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), "an event was recorded twice"
    if calls is not None:
        assert len(events) == calls, [(e.status, e.cost_micros) for e in events]
    assert led.active_reservations(now=now) == [], "a reservation was left held"
    charged = [e for e in events if e.status != "denied"]
    keys = {k for e in charged for k in e.budget_keys}
    for key in keys:
        bal = led.balance(Allowance(key, key), now=now)
        mine = [e for e in charged if key in e.budget_keys]
        assert bal.spent_micros == sum(e.cost_micros for e in mine), key
        assert bal.spent_tokens == sum(e.input_tokens + e.output_tokens for e in mine), key
        assert (bal.reserved_micros, bal.reserved_tokens) == (0, 0), key
    with contextlib.suppress(NotImplementedError):  # a ledger that can list its accounts: none is unexplained
        for acct in led.accounts():
            if "~alert@" in acct.key:  # the alerts module's once-per-threshold markers, not a budget
                continue
            assert acct.key in keys or acct.spent_micros == 0, acct
            assert (acct.reserved_micros, acct.reserved_tokens) == (0, 0), acct
    for e in events:
        if e.status in ("error", "unsent", "denied"):
            assert e.cost_micros == 0 and e.input_tokens == e.output_tokens == 0, e
    return events


def only_event(guard: tokenbudget.Guard) -> CallEvent:
    (event,) = assert_exact(guard, calls=1)
    return event


def assert_sdk_error(exc: BaseException) -> None:
    """The caller sees the SDK's (or its HTTP/JSON library's) error, never one of ours in its place."""
    assert not isinstance(exc, tokenbudget.TokenBudgetError), exc


@pytest.fixture
def g(srv: StandInServer, otel: Any) -> tokenbudget.Guard:
    srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
    return tokenbudget.install({"ledger": "memory://"}, budget_usd=5.0)


# -- HTTP error statuses, with and without SDK retries ---------------------------------------------------------------
@pytest.mark.parametrize("status", [429, 500, 529])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_error_status_charges_nothing(g: tokenbudget.Guard, srv: StandInServer, otel: Any, vendor: Vendor,
                                            mode: str, status: int) -> None:
    srv.push(Fault(status=status))
    with pytest.raises(vendor.sdk.APIStatusError) as info:
        await call(vendor, srv, mode)
    assert info.value.status_code == status
    event = only_event(g)
    assert (event.status, event.cost_micros) == ("error", 0)
    (span,) = otel.spans()
    assert span.attributes["tokenbudget.status"] == "error"


@pytest.mark.parametrize("status", [429, 500, 529])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_sdk_retry_then_success_charges_exactly_one_call(g: tokenbudget.Guard, srv: StandInServer, otel: Any,
                                                               vendor: Vendor, mode: str, status: int) -> None:
    srv.push(Fault(status=status), Fault(status=status))
    text = await call(vendor, srv, mode, max_retries=2)
    assert text == TEXT
    assert len(srv.requests) == 3 and srv.pending == 0
    event = only_event(g)
    assert (event.status, event.input_tokens, event.output_tokens) == ("ok", IN, OUT)
    assert event.cost_micros == vendor.cost(IN, OUT)
    assert len(otel.spans()) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_sdk_retries_exhausted_charge_nothing(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                                    mode: str) -> None:
    srv.push(Fault(status=500), Fault(status=429), Fault(status=529))
    with pytest.raises(vendor.sdk.APIStatusError):
        await call(vendor, srv, mode, max_retries=2)
    assert len(srv.requests) == 3
    assert only_event(g).status == "error"


# -- timeouts, resets, refused connections ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_timeout_charges_estimated_input(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                               mode: str) -> None:
    srv.push(Fault(delay=4.0))
    with pytest.raises(vendor.sdk.APITimeoutError):  # wide enough that a loaded CI box still connects in time
        await call(vendor, srv, mode, timeout=0.6)
    event = only_event(g)
    est = vendor.estimate(g, stream=mode.endswith("stream"))
    assert (event.status, event.input_tokens, event.output_tokens) == ("abandoned", est, 0)
    assert event.cost_micros == vendor.cost(est, 0) > 0


@pytest.mark.parametrize("mode", ["sync", "async-stream"])
@pytest.mark.parametrize("vendor", VENDORS)
async def test_timeout_then_retry_success_charges_the_answer_once(g: tokenbudget.Guard, srv: StandInServer,
                                                                  vendor: Vendor, mode: str) -> None:
    srv.push(Fault(delay=4.0))
    assert await call(vendor, srv, mode, timeout=1.0, max_retries=1) == TEXT
    assert len(srv.requests) == 2
    event = only_event(g)
    assert (event.status, event.cost_micros) == ("ok", vendor.cost(IN, OUT))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_connection_reset_charges_estimated_input(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                                        mode: str) -> None:
    srv.push(Fault(reset=True))
    with pytest.raises(vendor.sdk.APIConnectionError) as info:
        await call(vendor, srv, mode)
    assert not isinstance(info.value, vendor.sdk.APITimeoutError)
    event = only_event(g)
    est = vendor.estimate(g, stream=mode.endswith("stream"))
    assert (event.status, event.input_tokens, event.cost_micros) == ("abandoned", est, vendor.cost(est, 0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_connection_refused_charges_nothing(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                                  mode: str) -> None:
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}" + ("/v1" if vendor.name == "openai" else "")
    with pytest.raises(vendor.sdk.APIConnectionError):
        await call(vendor, srv, mode, base_url=base)
    event = only_event(g)
    assert (event.status, event.cost_micros) == ("unsent", 0)


# -- malformed and truncated answers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("vendor", VENDORS)
async def test_malformed_body_charges_estimated_input(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                                      mode: str) -> None:
    """HTTP 200 with a body that is not JSON: the vendor answered (and billed), we could not read what."""
    srv.push(Fault(malformed=True))
    with pytest.raises(Exception) as info:  # the SDK's own parse error
        await call(vendor, srv, mode)
    assert_sdk_error(info.value)
    event = only_event(g)
    est = vendor.estimate(g)
    assert (event.status, event.input_tokens, event.cost_micros) == ("abandoned", est, vendor.cost(est, 0))


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("vendor", VENDORS)
async def test_truncated_body_charges_estimated_input(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                                      mode: str) -> None:
    srv.push(Fault(truncate_after=20))
    with pytest.raises(vendor.sdk.APIConnectionError):
        await call(vendor, srv, mode)
    event = only_event(g)
    est = vendor.estimate(g)
    assert (event.status, event.input_tokens, event.cost_micros) == ("abandoned", est, vendor.cost(est, 0))


async def read_stream_until_error(vendor: Vendor, srv: StandInServer, mode: str) -> tuple[BaseException, str]:
    """Read a stream that is going to fail; return the error and the text received before it."""
    received: list[str] = []
    client = vendor.client(srv, is_async=mode.startswith("async"))
    try:
        if mode.startswith("async"):
            stream = await vendor.create(client)(**vendor.body(True))
            async for item in stream:
                received.append(vendor.text(item))
        else:
            for item in vendor.create(client)(**vendor.body(True)):
                received.append(vendor.text(item))
    except Exception as exc:
        return exc, "".join(received)
    raise AssertionError("the stream did not fail")


def assert_partial(g: tokenbudget.Guard, vendor: Vendor, received: str, *, started: bool = True) -> CallEvent:
    """One abandoned event charging the input and the output received (``started``: the first event arrived)."""
    event = only_event(g)
    inp, out = vendor.partial_input(g, started), vendor.partial_output(g, received, started)
    assert (event.status, event.input_tokens, event.output_tokens) == ("abandoned", inp, out)
    assert event.cost_micros == vendor.cost(inp, out)
    return event


@pytest.mark.parametrize("mode", STREAM_MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_malformed_stream_charges_input_plus_received(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                                            mode: str) -> None:
    srv.push(Fault(malformed=True))
    exc, received = await read_stream_until_error(vendor, srv, mode)
    assert_sdk_error(exc)
    assert_partial(g, vendor, received)


@pytest.mark.parametrize("after", [0, 2, 5])
@pytest.mark.parametrize("mode", STREAM_MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_truncated_stream_charges_input_plus_received(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                                            mode: str, after: int) -> None:
    srv.push(Fault(truncate_after=after))
    exc, received = await read_stream_until_error(vendor, srv, mode)
    assert_sdk_error(exc)
    if after == 5:
        assert received  # some text did arrive, and it is charged
    assert_partial(g, vendor, received, started=after > 0)


@pytest.mark.parametrize("mode", STREAM_MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_error_event_mid_stream_charges_input_plus_received(g: tokenbudget.Guard, srv: StandInServer,
                                                                  vendor: Vendor, mode: str) -> None:
    srv.push(Fault(status=529 if vendor.name == "anthropic" else 500, truncate_after=5))
    exc, received = await read_stream_until_error(vendor, srv, mode)
    assert isinstance(exc, vendor.sdk.APIError)
    assert received
    assert_partial(g, vendor, received)


# -- asyncio cancellation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
@pytest.mark.parametrize("vendor", VENDORS)
async def test_cancel_mid_call_charges_estimated_input(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                                       stream: bool) -> None:
    srv.push(Fault(delay=5.0))
    task = asyncio.create_task(call(vendor, srv, "async-stream" if stream else "async"))
    await arrived(srv)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    event = only_event(g)
    est = vendor.estimate(g, stream=stream)
    assert (event.status, event.input_tokens, event.cost_micros) == ("abandoned", est, vendor.cost(est, 0))


@pytest.mark.parametrize("closing", ["async-with", "dropped"])
@pytest.mark.parametrize("vendor", VENDORS)
async def test_cancel_mid_stream_charges_input_plus_received(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                                             closing: str) -> None:
    received: list[str] = []

    async def consume() -> None:
        client = vendor.client(srv, is_async=True)
        stream = await vendor.create(client)(**vendor.body(True))
        async with contextlib.AsyncExitStack() as stack:
            if closing == "async-with":
                await stack.enter_async_context(stream)
            async for item in stream:
                received.append(vendor.text(item))
                if sum(1 for t in received if t) == 3:
                    asyncio.current_task().cancel()  # type: ignore[union-attr]
                    await asyncio.sleep(0)  # the cancel lands here, in the caller's loop

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(consume())
    await settled_eventually(g)
    assert_partial(g, vendor, "".join(received))


async def arrived(srv: StandInServer) -> None:
    """Wait until the stand-in has the request (it records it before any delay)."""
    for _ in range(1000):
        if srv.requests:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the request never arrived")


async def settled_eventually(g: tokenbudget.Guard, calls: int = 1) -> None:
    """A dropped async stream settles when its response is garbage collected (after the loop finalises it)."""
    deadline = time.monotonic() + 10
    while len(list(g.ledger.events())) < calls and time.monotonic() < deadline:
        gc.collect()
        await asyncio.sleep(0.01)


# -- Ctrl-C ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ctrl_c_once_sent(srv: StandInServer) -> Iterator[None]:
    """Deliver SIGINT to the main thread once the server has the request, while the caller waits for the answer."""
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    stop = threading.Event()

    def press() -> None:
        while not srv.requests and not stop.is_set():
            time.sleep(0.005)
        if not stop.is_set():
            time.sleep(0.05)
            signal.pthread_kill(main, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    t = threading.Thread(target=press, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
@pytest.mark.parametrize("vendor", VENDORS)
def test_ctrl_c_mid_call_charges_estimated_input(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                                 stream: bool) -> None:
    srv.push(Fault(delay=5.0))
    client = vendor.client(srv)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), ctrl_c_once_sent(srv):
        vendor.create(client)(**vendor.body(stream))
    assert time.monotonic() - started < 4  # interrupted, not answered
    event = only_event(g)
    est = vendor.estimate(g, stream=stream)
    assert (event.status, event.input_tokens, event.cost_micros) == ("abandoned", est, vendor.cost(est, 0))


@pytest.mark.parametrize("closing", ["with", "dropped"])
@pytest.mark.parametrize("vendor", VENDORS)
def test_ctrl_c_mid_stream_charges_input_plus_received(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                                       closing: str) -> None:
    received: list[str] = []

    def consume() -> None:
        stream = vendor.create(vendor.client(srv))(**vendor.body(True))
        with contextlib.ExitStack() as stack:
            if closing == "with":
                stack.enter_context(stream)
            for item in stream:
                received.append(vendor.text(item))
                if sum(1 for t in received if t) == 3:
                    raise KeyboardInterrupt  # what Ctrl-C does while the caller handles a chunk

    with pytest.raises(KeyboardInterrupt) as info:
        consume()
    del info  # the traceback holds the dropped stream's frame
    gc.collect()
    assert_partial(g, vendor, "".join(received))


@pytest.mark.parametrize("vendor", VENDORS)
async def test_ctrl_c_mid_async_stream_charges_input_plus_received(g: tokenbudget.Guard, srv: StandInServer,
                                                                   vendor: Vendor) -> None:
    received: list[str] = []
    client = vendor.client(srv, is_async=True)
    try:
        async with await vendor.create(client)(**vendor.body(True)) as stream:
            async for item in stream:
                received.append(vendor.text(item))
                if sum(1 for t in received if t) == 2:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("not interrupted")
    assert_partial(g, vendor, "".join(received))


# -- the caller's own hooks fail -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_raising_event_listener_does_not_break_the_call(g: tokenbudget.Guard, srv: StandInServer,
                                                              vendor: Vendor, mode: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    seen: list[CallEvent] = []

    def broken(event: CallEvent) -> None:
        seen.append(event)
        raise RuntimeError("listener bug")

    g.listeners.append(broken)
    g.listeners.append(seen.append)  # a later listener still hears about the call
    assert await call(vendor, srv, mode) == TEXT
    assert await call(vendor, srv, mode) == TEXT
    events = assert_exact(g, calls=2)
    assert [e.cost_micros for e in events] == [vendor.cost(IN, OUT)] * 2
    assert [e.id for e in seen] == [events[0].id] * 2 + [events[1].id] * 2
    assert sum("listener failed" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("vendor", VENDORS)
def test_raising_alert_callback_does_not_break_the_call(srv: StandInServer, vendor: Vendor,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    alerts = pytest.importorskip("tokenbudget.alerts")
    if not hasattr(tokenbudget, "on_alert"):
        pytest.skip("tokenbudget.on_alert is not exported yet")
    # One call costs just over half of the budget: the 50 % threshold alert fires after it.
    per_call = vendor.cost(IN, OUT)
    budgets = [{"scope": "org", "limit_usd": per_call * 1.9 / 1e6}]
    guard = tokenbudget.install({"ledger": "memory://", "budgets": budgets})
    srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
    got: list[Any] = []

    def broken(alert: Any) -> None:
        raise RuntimeError("callback bug")

    unsubscribe = [tokenbudget.on_alert(broken), tokenbudget.on_alert(got.append)]
    try:
        client = vendor.client(srv)
        result = vendor.create(client)(**{**vendor.body(False), "max_tokens": 10})
        assert vendor.text(result) == TEXT
        manager = alerts.get_manager(guard)
        assert manager is not None and manager.flush(5.0)
    finally:
        for fn in unsubscribe:
            fn()
    assert got and got[0].kind == "threshold"  # the alert was raised and reached the next callback
    assert any("on_alert callback failed" in r.getMessage() for r in caplog.records)
    assert only_event(guard).cost_micros == per_call


class BrokenProcessor(SpanProcessor):
    """A span processor with a bug: raises from every hook."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        raise RuntimeError("processor bug on start")

    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("processor bug on end")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_raising_span_processor_does_not_break_the_call(srv: StandInServer, vendor: Vendor, mode: str) -> None:
    tp = TracerProvider()
    tp.add_span_processor(BrokenProcessor())
    guard = tokenbudget.install({"ledger": "memory://"}, budget_usd=5.0, tracer_provider=tp)
    srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
    assert await call(vendor, srv, mode) == TEXT
    assert only_event(guard).cost_micros == vendor.cost(IN, OUT)


@pytest.mark.parametrize("where", ["on_start", "on_end"])
@pytest.mark.parametrize("vendor", VENDORS)
def test_raising_span_processor_keeps_errors_and_refusals_ours(srv: StandInServer, vendor: Vendor,
                                                               where: str) -> None:
    class OneBroken(SpanProcessor):
        def on_start(self, span: Span, parent_context: Context | None = None) -> None:
            if where == "on_start":
                raise RuntimeError("processor bug")

        def on_end(self, span: ReadableSpan) -> None:
            if where == "on_end":
                raise RuntimeError("processor bug")

    tp = TracerProvider()
    tp.add_span_processor(OneBroken())
    guard = tokenbudget.install({"ledger": "memory://"}, budget_usd=5.0, tracer_provider=tp)
    client = vendor.client(srv)
    srv.push(Fault(status=500))
    with pytest.raises(vendor.sdk.InternalServerError):
        vendor.create(client)(**vendor.body(False))
    assert only_event(guard).status == "error"
    tokenbudget.install({"ledger": "memory://"}, budget_usd=0.000_001, tracer_provider=tp)
    with pytest.raises(tokenbudget.BudgetExceeded):
        vendor.create(client)(**vendor.body(False))
    guard = tokenbudget.active_guard()  # type: ignore[assignment]
    assert guard is not None and [e.status for e in assert_exact(guard)] == ["denied"]
    assert len(srv.requests) == 1


# -- a broken SQLite ledger ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's connection holding the ledger's write lock (and an uncommitted change) until exit."""
    blocker = sqlite3.connect(path, isolation_level=None, timeout=5)
    blocker.execute("BEGIN EXCLUSIVE")
    blocker.execute("UPDATE accounts SET spent_micros = spent_micros + 1")  # never committed
    try:
        yield blocker
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


@pytest.fixture
def sqlite_guard(tmp_path: Path, srv: StandInServer) -> tokenbudget.Guard:
    srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
    ledger = SQLiteLedger(tmp_path / "ledger.db", busy_timeout=0.2)
    return tokenbudget.install({"budget_usd": 5.0}, ledger=ledger)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_locked_ledger_refuses_before_sending(sqlite_guard: tokenbudget.Guard, srv: StandInServer,
                                                    vendor: Vendor, mode: str) -> None:
    g = sqlite_guard
    assert isinstance(g.ledger, SQLiteLedger)
    await call(vendor, srv, mode)
    with write_locked(g.ledger.path), pytest.raises(tokenbudget.LedgerError) as info:
        await call(vendor, srv, mode)
    assert isinstance(info.value, tokenbudget.LedgerUnavailable)
    assert str(g.ledger.path) in str(info.value) and "busy_timeout" in str(info.value)
    assert len(srv.requests) == 1  # the refused call never left
    await call(vendor, srv, mode)  # the lock is gone: calls work again
    events = assert_exact(g, calls=2)
    assert [e.cost_micros for e in events] == [vendor.cost(IN, OUT)] * 2


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_refused_reservation_shows_on_the_span_as_the_error_the_caller_got(
    otel: Any, sqlite_guard: tokenbudget.Guard, srv: StandInServer, mode: str
) -> None:
    """The span of a call the ledger could not reserve for is ended with that error, not with the GeneratorExit of
    the abandoned negotiation (which it used to show when the ledger failed mid-negotiation)."""
    g = sqlite_guard
    assert isinstance(g.ledger, SQLiteLedger)
    otel.exporter.clear()
    with write_locked(g.ledger.path), pytest.raises(tokenbudget.LedgerUnavailable):
        await call(OPENAI, srv, mode)
    (span,) = otel.spans()
    assert span.attributes["error.type"] == "LedgerUnavailable"
    assert span.attributes["tokenbudget.status"] == "denied" and span.status.status_code.name == "ERROR"
    assert srv.requests == []


@pytest.mark.parametrize("then", ["next-call", "uninstall"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_ledger_locked_while_the_call_runs_settles_once_it_is_back(
    sqlite_guard: tokenbudget.Guard, srv: StandInServer, vendor: Vendor, mode: str, then: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The answer arrives while another process holds the ledger: the caller gets it, and the charge is not lost."""
    g = sqlite_guard
    assert isinstance(g.ledger, SQLiteLedger)
    path = g.ledger.path
    srv.push(Fault(delay=0.3))
    locked = threading.Event()
    release = threading.Event()

    def hold_lock_while_the_vendor_thinks() -> None:
        while not srv.requests:
            time.sleep(0.005)
        with write_locked(path):
            locked.set()
            release.wait(10)

    holder = threading.Thread(target=hold_lock_while_the_vendor_thinks)
    holder.start()
    try:
        assert await call(vendor, srv, mode) == TEXT  # the caller has its answer
        assert locked.is_set()
    finally:
        release.set()
        holder.join()
    assert any("could not settle" in r.getMessage() for r in caplog.records)
    if then == "next-call":
        assert await call(vendor, srv, mode) == TEXT
        events = assert_exact(g, calls=2)
    else:
        tokenbudget.uninstall()
        events = assert_exact(g, calls=1, ledger=SQLiteLedger(path))
    assert all(e.cost_micros == vendor.cost(IN, OUT) and e.status == "ok" for e in events)


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
@pytest.mark.parametrize("vendor", VENDORS)
async def test_cancel_while_the_ledger_thread_reserves_leaves_no_hold(tmp_path: Path, srv: StandInServer,
                                                                      vendor: Vendor, stream: bool) -> None:
    """SQLite reserves in a worker thread: a cancel that lands meanwhile must not orphan the hold it makes."""
    ledger = SQLiteLedger(tmp_path / "ledger.db", busy_timeout=10)
    g = tokenbudget.install({"budget_usd": 5.0}, ledger=ledger)
    with write_locked(ledger.path):  # the reserve waits for the lock, in its thread
        task = asyncio.create_task(call(vendor, srv, "async-stream" if stream else "async"))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.sleep(0.05)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert srv.requests == []  # nothing was sent ...
    event = only_event(g)  # ... and the hold it made was given back, on the record
    assert (event.status, event.cost_micros) == ("unsent", 0)


@pytest.mark.parametrize("vendor", VENDORS)
async def test_cancel_while_the_ledger_commits_an_answer_still_charges_it(tmp_path: Path, srv: StandInServer,
                                                                          otel: Any, vendor: Vendor) -> None:
    """The answer arrived, so the vendor billed it: a cancel that lands while the commit waits for the ledger lets the
    commit and the span finish, then reaches the caller."""
    srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
    srv.push(Fault(delay=0.3))
    ledger = SQLiteLedger(tmp_path / "ledger.db", busy_timeout=10)
    g = tokenbudget.install({"budget_usd": 5.0}, ledger=ledger)
    task = asyncio.create_task(call(vendor, srv, "async"))
    for _ in range(200):  # until the request is at the server (reserved and sent)
        if srv.requests:
            break
        await asyncio.sleep(0.02)
    with write_locked(ledger.path):  # the commit that follows the answer waits for the lock, in its thread
        await asyncio.sleep(1.5)  # the answer (0.3 s late) is read; the settle is blocked (slack for a slow CI box)
        assert not task.done()
        task.cancel()
        await asyncio.sleep(0.05)
    with pytest.raises(asyncio.CancelledError):
        await task
    event = only_event(g)
    assert (event.status, event.cost_micros) == ("ok", vendor.cost(IN, OUT))
    (span,) = otel.spans()
    assert span.attributes["tokenbudget.status"] == "ok"
    assert span.attributes["tokenbudget.cost_usd"] == vendor.cost(IN, OUT) / 1e6


def test_full_disk_refuses_or_settles_later_and_stays_exact(sqlite_guard: tokenbudget.Guard,
                                                            srv: StandInServer) -> None:
    g = sqlite_guard
    assert isinstance(g.ledger, SQLiteLedger)
    client = OPENAI.client(srv)
    client.chat.completions.create(**OPENAI.body(False))
    # Cap the file at its current size on the pooled connection: the next page it needs fails with SQLITE_FULL.
    conn = g.ledger._checkout()
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    g.ledger._checkin(conn)
    answered = refused = 0
    for _ in range(2000):
        try:
            client.chat.completions.create(**OPENAI.body(False))
            answered += 1
        except tokenbudget.LedgerError as exc:
            assert "disk is full" in str(exc)
            refused += 1
        if conn not in g.ledger._idle:  # the capped connection failed and was dropped
            break
    else:
        raise AssertionError("the disk never filled")
    client.chat.completions.create(**OPENAI.body(False))  # a fresh connection: work resumes (and catches up)
    answered += 2
    assert len(srv.requests) == answered
    events = assert_exact(g, calls=answered)
    assert all(e.cost_micros == OPENAI.cost(IN, OUT) for e in events)


def _read_only_child(url: str, base_url: str, out: Any) -> None:
    """Child: call through the SDK as a user who may read the ledger file but not write it."""
    if os.geteuid() == 0:  # root ignores file modes: become nobody first
        os.setgid(65534)
        os.setuid(65534)
    result: dict[str, Any] = {}
    try:
        tokenbudget.install({"ledger": url, "budget_usd": 5.0})
        openai.OpenAI(base_url=base_url, api_key="k", max_retries=0).chat.completions.create(**OPENAI.body(False))
        result["outcome"] = "answered"
    except tokenbudget.LedgerError as exc:
        result.update(outcome="LedgerError", type=type(exc).__name__, message=str(exc))
    except BaseException as exc:
        result.update(outcome="other", type=type(exc).__name__, message=str(exc))
    out.put(result)


def test_read_only_ledger_is_a_ledger_error_and_nothing_is_sent(srv: StandInServer) -> None:
    srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:  # a directory the unprivileged child can reach
        os.chmod(tmp, 0o755)
        path = Path(tmp) / "ledger.db"
        guard = tokenbudget.install({"ledger": f"sqlite:///{path}", "budget_usd": 5.0})
        OPENAI.create(OPENAI.client(srv))(**OPENAI.body(False))
        tokenbudget.uninstall()
        files = list(Path(tmp).iterdir())
        modes = {p: p.stat().st_mode & 0o777 for p in files}
        try:
            for p in files:
                os.chmod(p, 0o444)
            os.chmod(tmp, 0o555)
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            child = ctx.Process(target=_read_only_child, args=(f"sqlite:///{path}", srv.openai_base_url, out))
            child.start()
            result = out.get(timeout=120)
            child.join(60)
        finally:
            os.chmod(tmp, 0o755)
            for p, mode in modes.items():
                os.chmod(p, mode)
        assert child.exitcode == 0
        assert result["outcome"] == "LedgerError", result
        assert str(path) in result["message"] and "read-only" in result["message"]
        assert len(srv.requests) == 1  # only the first call, made while the file was writable, was sent
        ledger = SQLiteLedger(path)
        events = assert_exact(guard, calls=1, ledger=ledger)
        assert events[0].cost_micros == OPENAI.cost(IN, OUT)
        ledger.close()


def test_log_names_the_ledger_when_settling_fails(sqlite_guard: tokenbudget.Guard, srv: StandInServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tokenbudget")
    g = sqlite_guard
    assert isinstance(g.ledger, SQLiteLedger)
    stream = OPENAI.client(srv).chat.completions.create(**OPENAI.body(True))
    with write_locked(g.ledger.path):
        assert "".join(OPENAI.text(c) for c in stream) == TEXT  # the stream ends while the ledger is locked
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("tokenbudget")]
    assert any(str(g.ledger.path) in m for m in messages), messages
    OPENAI.client(srv).chat.completions.create(**OPENAI.body(False))
    assert_exact(g, calls=2)


# -- no OpenTelemetry SDK at all -------------------------------------------------------------------------------------
def test_nothing_breaks_without_an_otel_sdk() -> None:
    """Only opentelemetry-api is a dependency: with no SDK importable and no provider set, calls work and settle."""
    script = textwrap.dedent("""
        import sys
        sys.modules["opentelemetry.sdk"] = None  # as if opentelemetry-sdk were not installed
        import anthropic, openai, tokenbudget
        from tokenbudget.testing import Fault, Reply, StandInServer
        with StandInServer(Reply(text="hi", input_tokens=10, output_tokens=2)) as srv:
            guard = tokenbudget.install({"ledger": "memory://", "budget_usd": 1.0})
            oc = openai.OpenAI(base_url=srv.openai_base_url, api_key="k", max_retries=0)
            ac = anthropic.Anthropic(base_url=srv.anthropic_base_url, api_key="k", max_retries=0)
            msg = [{"role": "user", "content": "x"}]
            oc.chat.completions.create(model="gpt-4o-mini", messages=msg)
            list(oc.chat.completions.create(model="gpt-4o-mini", messages=msg, stream=True))
            ac.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=msg)
            with ac.messages.stream(model="claude-haiku-4-5", max_tokens=10, messages=msg) as s:
                s.get_final_message()
            srv.push(Fault(status=500))
            try:
                oc.chat.completions.create(model="gpt-4o-mini", messages=msg)
            except openai.InternalServerError:
                pass
            try:
                oc.chat.completions.create(model="gpt-4o", messages=msg, max_tokens=100_000)
            except tokenbudget.BudgetExceeded:
                pass
            assert "opentelemetry.sdk" not in [m for m in sys.modules if sys.modules[m] is not None]
            print(sorted(e.status for e in guard.ledger.events()),
                  guard.ledger.active_reservations(now=guard.clock.now()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['denied', 'error', 'ok', 'ok', 'ok', 'ok'] []", done.stdout
    assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr


_EXIT_SCRIPT = r"""
import sqlite3, sys, threading, time
import openai, tokenbudget
from tokenbudget.ledger import SQLiteLedger
from tokenbudget.testing import Fault, Reply, StandInServer

path, mode = sys.argv[1], sys.argv[2]
srv = StandInServer().start()
srv.reply = Reply(text="ok", input_tokens=100, output_tokens=20)
tokenbudget.install({"budget_usd": 5.0}, ledger=SQLiteLedger(path, busy_timeout=0.2))
client = openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-test", max_retries=0)
srv.push(Fault(delay=0.4))
locked, release = threading.Event(), threading.Event()

def hold_the_lock_while_the_vendor_thinks():
    while not srv.requests:
        time.sleep(0.005)
    blocker = sqlite3.connect(path, isolation_level=None, timeout=5)
    blocker.execute("BEGIN EXCLUSIVE")
    locked.set()
    release.wait(10)
    blocker.execute("ROLLBACK")
    blocker.close()

holder = threading.Thread(target=hold_the_lock_while_the_vendor_thinks, daemon=mode != "released")
holder.start()
client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
assert locked.is_set()
if mode == "released":
    release.set()
    holder.join()
    print("exiting with the lock free", flush=True)
else:
    print("exiting with the lock still held", flush=True)  # by a daemon thread, still holding it at exit
"""


@pytest.mark.parametrize("mode", ["released", "still-locked"])
def test_a_charge_the_ledger_refused_is_settled_at_exit(tmp_path: Path, mode: str) -> None:
    """A script that gets its answer while another process holds the SQLite lock, then exits without
    ``uninstall()``: the exit hook settles the deferred charge (or, if the lock is still held, says it could not)."""
    import subprocess
    import sys

    path = tmp_path / "ledger.db"
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(path), mode], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "could not settle a call" in proc.stderr  # the charge was deferred while the lock was held
    events = list(SQLiteLedger(path).events())
    if mode == "released":
        assert [(e.status, e.input_tokens, e.output_tokens) for e in events] == [("ok", 100, 20)]
        assert "exits with" not in proc.stderr
    else:
        assert events == []
        assert "tokenbudget exits with 1 settled call(s) the ledger" in proc.stderr
