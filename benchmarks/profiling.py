"""Where tokenbudget's per-call time goes: ``python -m benchmarks.profiling [--cprofile sync|stream]``.

Without options it times each step of the guarded path on its own, with no SDK and no network, so each figure is
that step's cost per call in µs (median of many). With ``--cprofile sync|stream`` it runs real SDK calls against
the stand-in server under cProfile and prints tokenbudget's functions by cumulative time per call. Used to write
the optimisation notes in docs/performance.md; not part of ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ._stats import median


def _us(fn: Callable[[], Any], n: int = 3000, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean µs per call of ``n`` calls (setup excluded)."""
    out = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        out.append((time.perf_counter_ns() - t0) / n / 1000.0)
    return median(out)


def steps() -> list[tuple[str, float]]:
    """Each step of one guarded OpenAI chat call, timed alone."""
    from opentelemetry import trace

    import tokenbudget
    from tokenbudget import calls as tcalls
    from tokenbudget.events import CallEvent
    from tokenbudget.guard import _limited, _principal_attrs
    from tokenbudget.integrations.openai import OpenAIAdapter, usage_from
    from tokenbudget.ledger.base import Reservation
    from tokenbudget.principal import current_principal

    from ._env import setup_otel

    otel = setup_otel()
    guard = tokenbudget.Guard(tokenbudget.Settings(ledger="memory://", budget_usd=1_000_000.0))
    body = {"model": "gpt-4o-mini", "max_tokens": 256, "messages": [
        {"role": "system", "content": "You are a concise assistant for an internal engineering help desk."},
        {"role": "user", "content": "Our nightly export job started failing after the database upgrade."}]}

    def req() -> tcalls.CallRequest:
        return tcalls.CallRequest(provider="openai", operation="chat", model="gpt-4o-mini", body=body, stream=False,
                                  max_output_tokens=256, server_address="127.0.0.1", server_port=8080, api="openai")

    usage = tcalls.Usage(input_tokens=40, output_tokens=12, response_model="gpt-4o-mini", response_id="chatcmpl-1",
                         finish_reasons=["stop"])
    r = req()
    price = guard.prices.price("gpt-4o-mini", "openai")
    principal = current_principal(guard.default_principal)
    now = guard.clock.now()
    matches = guard.policy.matches(principal, r.model, now)
    allowances = tuple(m.allowance for m in matches)
    counter = iter(range(10**9))

    def fresh_body_req() -> tcalls.CallRequest:
        first: Any = body["messages"]
        b = {**body, "messages": [first[0], {"role": "user", "content": f"[{next(counter)}] question"}]}
        return tcalls.CallRequest(provider="openai", operation="chat", model="gpt-4o-mini", body=b, api="openai")

    def full() -> None:
        t = guard.begin(req())
        t.ok(usage)
        otel.exporter.clear() if len(otel.exporter._finished_spans) > 5000 else None

    def begin_timed(n: int = 3000, repeats: int = 7) -> float:
        """Settles each ticket before the next begin (untimed), so the ledger never holds more than one hold."""
        out = []
        clock = time.perf_counter_ns
        for _ in range(repeats):
            gc.collect()
            total = 0
            for _ in range(n):
                t0 = clock()
                t = guard.begin(req())
                total += clock() - t0
                t.ok(usage)
            out.append(total / n / 1000.0)
            otel.exporter.clear()
        return median(out)

    def settle_timed(n: int = 3000, repeats: int = 7) -> float:
        """Begins each ticket right before settling it (untimed), so only one hold is ever open."""
        out = []
        clock = time.perf_counter_ns
        for _ in range(repeats):
            gc.collect()
            total = 0
            for _ in range(n):
                t = guard.begin(req())
                t0 = clock()
                t.ok(usage)
                total += clock() - t0
            out.append(total / n / 1000.0)
            otel.exporter.clear()
        return median(out)

    def remaining_timed() -> float:
        t = guard.begin(req())
        v = _us(lambda: [guard.ledger.balance(a, now=now) for a in _limited(t)])
        t.ok(usage)
        return v

    def holds_cost(open_holds: int) -> float:
        """reserve + settle while ``open_holds`` other calls are in flight (long streams, many async tasks)."""
        held = [ledger.reserve(allowances, 100, 300, lease_seconds=600, now=now) for _ in range(open_holds)]
        v = _us(reserve_settle, n=500)
        for h in held:
            assert isinstance(h, Reservation)
            ledger.settle(h, 0, 0, None, now=now)
        return v

    ledger = guard.ledger
    span_attrs = {"gen_ai.operation.name": "chat"}
    tracer = guard.telemetry._tracer

    def reserve_settle() -> None:
        res = ledger.reserve(allowances, 100, 300, lease_seconds=600, now=now)
        assert isinstance(res, Reservation)
        ledger.settle(res, 10, 52, None, now=now)

    def event() -> CallEvent:
        return CallEvent(id="x", time=now, provider="openai", model="gpt-4o-mini", operation="chat", status="ok",
                         decision="allow", original_model=None, org=None, team=None, user="u", tags={},
                         function=None, run_id=None, cost_micros=1, estimated_micros=2, original_estimated_micros=2,
                         budget_keys=("org@total",), duration_s=0.1)

    def tel_finish() -> None:
        span = guard.telemetry.start(r)
        guard.telemetry.finish(span, r, usage=usage, cost_micros=20, estimated_micros=200, decision="allow",
                               status="ok", remaining_micros=10**9, original_model=None,
                               principal_attrs=_principal_attrs(principal, None), duration_s=0.5)

    span_start = _us(lambda: guard.telemetry.start(r).end())
    adapter = OpenAIAdapter()

    class _Opts:
        method = "post"
        url = "/chat/completions"
        json_data = body

    class _Client:
        class base_url:
            host = "127.0.0.1"
            port = 8080

    parsed = {"id": "chatcmpl-1", "model": "gpt-4o-mini", "choices": [{"finish_reason": "stop"}],
              "usage": {"prompt_tokens": 40, "completion_tokens": 12, "prompt_tokens_details": {"cached_tokens": 0},
                        "completion_tokens_details": {"reasoning_tokens": 0}}}
    results = [
        ("guard.begin + ticket.ok (whole guard, memory ledger)", _us(full)),
        ("  guard.begin (plan, policy, span start, reserve, Ticket)", begin_timed()),
        ("  ticket.ok -> Guard._settle", settle_timed()),
        ("    ledger.balance per budget (span remaining + alerts)", remaining_timed()),
        ("    telemetry.start + finish (span + 3 histograms + counter)", _us(tel_finish)),
        ("      of which telemetry.start + span.end alone", span_start),
        ("    CallEvent(...) construction", _us(event)),
        ("  MemoryLedger.reserve + settle (no event)", _us(reserve_settle)),
        ("  MemoryLedger.reserve + settle, 1,000 other calls in flight", holds_cost(1000)),
        ("  Estimator.input_tokens, cached prompt", _us(lambda: guard.estimator.input_tokens(r))),
        ("  Estimator.input_tokens, new user text each call", _us(lambda: guard.estimator.input_tokens(
            fresh_body_req()), n=1000)),
        ("  PriceBook.price (cached)", _us(lambda: guard.prices.price("gpt-4o-mini", "openai"))),
        ("  PriceBook.worst_case_micros", _us(lambda: guard.prices.worst_case_micros(price, 40, 256))),
        ("  PriceBook.cost_micros", _us(lambda: guard.prices.cost_micros(price, usage))),
        ("  Policy.matches (1 rule)", _us(lambda: guard.policy.matches(principal, "gpt-4o-mini", now))),
        ("  current_principal", _us(lambda: current_principal(guard.default_principal))),
        ("  uuid.uuid4().hex", _us(lambda: uuid.uuid4().hex)),
        ("  threading.Lock()", _us(threading.Lock)),
        ("  clock.now()", _us(guard.clock.now)),
        ("  OpenAIAdapter.describe", _us(lambda: adapter.describe(_Client, _Opts, False))),
        ("  openai usage_from(dict)", _us(lambda: usage_from(parsed))),
        ("  trace.use_span (enter + exit)", _us(lambda: _use_span(trace, tracer, span_attrs))),
    ]
    guard.close()
    return results


_SPAN: Any = None


def _use_span(trace: Any, tracer: Any, attrs: Any) -> None:
    global _SPAN
    if _SPAN is None:
        _SPAN = tracer.start_span("x", attributes=attrs)
    with trace.use_span(_SPAN, end_on_exit=False, record_exception=False, set_status_on_exception=False):
        pass


def cprofile(kind: str, calls: int = 2000, top: int = 45) -> str:
    """Real SDK calls (OpenAI chat, sync or streamed) with tokenbudget installed, under cProfile."""
    import asyncio

    import tokenbudget
    from tokenbudget.testing import StandInServer

    from . import calls as bc
    from ._env import clean_environment, setup_otel

    clean_environment()
    otel = setup_otel()
    with StandInServer() as server:
        clients = bc.make_clients(server)
        scenario = bc.Scenario("openai", "stream" if kind == "stream" else "sync")
        server.reply = scenario.reply()
        fn = scenario.bind(clients)
        tokenbudget.install(config={"ledger": "memory://", "budget_usd": 1_000_000.0})
        for _ in range(50):
            fn()
        otel.clear()
        prof = cProfile.Profile()
        prof.enable()
        for i in range(calls):
            fn()
            if i % 500 == 0:
                otel.exporter.clear()
        prof.disable()
        tokenbudget.uninstall()
        del asyncio
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative")
    # Per-call figures: divide by the number of SDK calls.
    print(f"cProfile of {calls} guarded OpenAI {kind} calls; times are totals, divide by {calls} for per call",
          file=buf)
    stats.print_stats("tokenbudget|wrapt|opentelemetry|json|uuid", top)
    return buf.getvalue()


def inline(vendor: str = "openai", mode: str = "sync", calls: int = 1500, blocks: int = 10) -> list[tuple[str, float]]:
    """Real SDK calls against the stand-in server with timers around each step of tokenbudget, in place.

    Every wrapped function records the calling thread's CPU time; the table gives the median per call (inclusive:
    ``Guard.begin`` contains ``Guard._plan``, which contains ``Estimator.input_tokens``). The first line is the whole
    added CPU per call: tokenbudget installed minus bare, in interleaved blocks, without the timers.
    """
    import asyncio
    import functools
    from collections import defaultdict

    from opentelemetry import trace

    import tokenbudget
    from tokenbudget.integrations import anthropic as tb_anthropic
    from tokenbudget.integrations import base as tb_base
    from tokenbudget.integrations import openai as tb_openai
    from tokenbudget.testing import StandInServer

    from . import calls as bc
    from ._env import clean_environment, setup_otel

    clean_environment()
    otel = setup_otel()
    spent: dict[str, list[int]] = defaultdict(list)
    per_call: dict[str, int] = defaultdict(int)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            c0 = time.thread_time_ns()
            try:
                return fn(*a, **k)
            finally:
                per_call[name] += time.thread_time_ns() - c0

        return wrapper

    scenario = bc.Scenario(vendor, mode)
    cfg = {"ledger": "memory://", "budget_usd": 1_000_000.0}
    with StandInServer() as server:
        clients = bc.make_clients(server)
        server.reply = scenario.reply()
        fn = scenario.bind(clients)
        loop = asyncio.new_event_loop()

        def one() -> None:
            loop.run_until_complete(fn()) if scenario.is_async else fn()

        # 1. the whole added CPU, bare vs installed, interleaved blocks, no timers
        whole: dict[str, list[int]] = {"bare": [], "tb": []}
        for _ in range(blocks):
            for variant in ("bare", "tb"):
                tokenbudget.uninstall()
                if variant == "tb":
                    tokenbudget.install(config=cfg)
                for _ in range(3):
                    one()
                otel.clear()
                gc.collect()
                for _ in range(calls // blocks):
                    c0 = time.thread_time_ns()
                    one()
                    whole[variant].append(time.thread_time_ns() - c0)
        tokenbudget.uninstall()

        # 2. the same calls with a timer around each step
        guard = tokenbudget.install(config=cfg)
        adapter_cls = tb_openai.OpenAIAdapter if vendor == "openai" else tb_anthropic.AnthropicAdapter
        patches: list[tuple[Any, str, Any]] = []

        def patch(owner: Any, attr: str, label: str) -> None:
            original = getattr(owner, attr)
            patches.append((owner, attr, owner.__dict__.get(attr, None) if isinstance(owner, type) else None))
            setattr(owner, attr, timed(label, original))

        patch(guard, "begin", "guard.py Guard.begin (everything before sending)")
        patch(guard, "_plan", "guard.py Guard._plan (price + estimate + cache_control scan)")
        patch(guard.estimator, "input_tokens", "estimate.py Estimator.input_tokens")
        patch(guard.policy, "matches", "policy.py Policy.matches")
        patch(guard.telemetry, "start", "telemetry.py Telemetry.start (span start)")
        patch(guard.ledger, "reserve", "ledger/memory.py MemoryLedger.reserve")
        patch(guard, "_settle", "guard.py Guard._settle (everything after the answer)")
        patch(guard.ledger, "settle", "ledger/memory.py MemoryLedger.settle")
        patch(guard.ledger, "balance", "ledger/memory.py MemoryLedger.balance (post-call, span + alerts)")
        patch(guard.telemetry, "finish", "telemetry.py Telemetry.finish (metrics + span attrs + end)")
        patch(guard, "_notify", "guard.py Guard._notify (listeners: alerts)")
        patch(adapter_cls, "describe", f"integrations/{vendor}.py {adapter_cls.__name__}.describe")
        patch(adapter_cls, "usage", f"integrations/{vendor}.py {adapter_cls.__name__}.usage")
        patch(tb_base, "_after", "integrations/base.py _after (usage + settle)")
        patch(trace, "use_span", "opentelemetry trace.use_span (enter; exit not timed)")
        try:
            for _ in range(5):
                one()
            otel.clear()
            gc.collect()
            for i in range(calls):
                per_call.clear()
                one()
                for name, ns in per_call.items():
                    spent[name].append(ns)
                if i % 300 == 0:
                    otel.clear()
        finally:
            for owner, attr, original in reversed(patches):
                if isinstance(owner, type):
                    setattr(owner, attr, original)
                else:
                    try:
                        delattr(owner, attr)
                    except AttributeError:
                        setattr(owner, attr, original)
            tokenbudget.uninstall()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    bare, tb = median(whole["bare"]) / 1000, median(whole["tb"]) / 1000
    out = [(f"whole call, bare (caller CPU, {vendor} {mode})", bare), ("whole call, tokenbudget-memory", tb),
           ("  added by tokenbudget", tb - bare)]
    out += [(name, median(v) / 1000) for name, v in sorted(spent.items(), key=lambda kv: -median(kv[1]))]
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profiling")
    p.add_argument("--cprofile", choices=("sync", "stream"))
    p.add_argument("--inline", metavar="VENDOR.MODE", help="e.g. openai.sync, anthropic.stream, openai.async")
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    from ._env import clean_environment

    clean_environment()
    if args.cprofile:
        print(cprofile(args.cprofile, args.calls))
        return
    if args.inline:
        vendor, _, mode = args.inline.partition(".")
        for name, us in inline(vendor, mode or "sync", args.calls):
            print(f"{us:9.1f} µs  {name}")
        return
    for name, us in steps():
        print(f"{us:9.2f} µs  {name}")


if __name__ == "__main__":
    main()
