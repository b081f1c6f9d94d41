"""What each part of tokenbudget costs inside real calls: ``python -m benchmarks.ablation [openai.sync] [--rounds N]``.

Tight loops (``benchmarks.profiling``) undercount: inside real SDK calls every step costs 3-5x more, because the
SDK's own work evicts the caches between ours (tiktoken's rank tables, the OTel SDK's structures). So each part is
measured here by turning it off *inside* otherwise real guarded calls, interleaved with bare and the full install in
one process, and reading the difference. The variants are diagnostics, not configurations to ship:

* ``tokenbudget``: ``install()`` with the memory ledger, as in ``python -m benchmarks``;
* ``-alerts``: without the alerts listener; ``-estimate``: a constant instead of tiktoken;
* ``-metrics``: the three histogram records skipped; ``-finish``: the whole ``Telemetry.finish`` (metrics, end
  attributes) skipped, the span still ended; ``-otel``: no-op tracer and meter providers for tokenbudget only;
* ``+background``: ``Telemetry.finish`` handed to a worker thread (the caller does not wait for it);
* ``bare+include_usage`` (streams): the bare SDK asking for the usage chunk itself, what exact stream billing costs.

Not part of ``python -m benchmarks``; docs/performance.md quotes a run.
"""

from __future__ import annotations

import argparse
import gc
import queue
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from . import calls
from ._env import clean_environment, setup_otel

VARIANTS = ("bare", "tokenbudget", "-alerts", "-estimate", "-metrics", "-finish", "-otel", "+background")
STREAM_VARIANTS = ("bare", "bare+include_usage", "tokenbudget", "-finish", "-otel")


class _NoRecord:
    def record(self, *args: Any, **kwargs: Any) -> None:
        pass


def _background(guard: Any) -> None:
    work: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
    finish = guard.telemetry.finish

    def worker() -> None:
        while True:
            args, kwargs = work.get()
            finish(*args, **kwargs)

    threading.Thread(target=worker, daemon=True, name="ablation-telemetry").start()
    guard.telemetry.finish = lambda *args, **kwargs: work.put((args, kwargs))


def _degrade(guard: Any, variant: str) -> None:
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    from tokenbudget.telemetry import Telemetry

    if variant == "-alerts":
        guard.budget_listeners.clear()
    elif variant == "-estimate":
        guard.estimator.input_tokens = lambda request: 100
    elif variant == "-metrics":
        guard.telemetry._duration = guard.telemetry._tokens = _NoRecord()
    elif variant == "-finish":
        guard.telemetry.finish = lambda span, *args, **kwargs: span.end()
    elif variant == "-otel":
        guard.telemetry = Telemetry(NoOpTracerProvider(), NoOpMeterProvider())
    elif variant == "+background":
        _background(guard)


def _include_usage_call(clients: calls.Clients) -> Callable[[], None]:
    def call() -> None:
        with clients.openai.chat.completions.create(
            model=calls.OPENAI_MODEL, messages=calls.messages(), max_tokens=calls.MAX_TOKENS, stream=True,
            stream_options={"include_usage": True},
        ) as stream:
            for _ in stream:
                pass

    return call


def run(scenario: str, rounds: int, batch: int = 15) -> list[tuple[str, float, float]]:
    """(variant, caller CPU µs, wall µs) medians, bare first."""
    import tokenbudget
    from tokenbudget.testing import StandInServer

    clean_environment()
    otel = setup_otel()
    vendor, mode = scenario.split(".")
    if mode not in ("sync", "stream"):
        raise SystemExit("ablation runs sync scenarios only (openai.sync, anthropic.sync, openai.stream, ...)")
    server = StandInServer().start()
    try:
        clients = calls.make_clients(server)
        spec = calls.Scenario(vendor, mode)
        server.reply = spec.reply()
        plain = spec.bind(clients)
        names: tuple[str, ...] = STREAM_VARIANTS if mode == "stream" else VARIANTS
        if vendor != "openai":
            names = tuple(n for n in names if n != "bare+include_usage")
        cpu: dict[str, list[float]] = {n: [] for n in names}
        wall: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn = _include_usage_call(clients) if name == "bare+include_usage" else plain
                if not name.startswith("bare"):
                    guard = tokenbudget.install(config={"ledger": "memory://", "budget_usd": 1_000_000.0})
                    calls._wait_for_alert_seeding(guard)
                    _degrade(guard, name)
                try:
                    for _ in range(3):
                        fn()
                    otel.clear()
                    gc.collect()
                    c, w = [], []
                    for _ in range(batch):
                        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
                        fn()
                        w.append(time.perf_counter_ns() - w0)
                        c.append(time.thread_time_ns() - c0)
                    cpu[name].append(statistics.median(c) / 1000)
                    wall[name].append(statistics.median(w) / 1000)
                finally:
                    if not name.startswith("bare"):
                        tokenbudget.uninstall()
        return [(n, statistics.median(cpu[n]), statistics.median(wall[n])) for n in names]
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ablation")
    p.add_argument("scenario", nargs="?", default="openai.sync", help="openai.sync, anthropic.sync, openai.stream, ...")
    p.add_argument("--rounds", type=int, default=24)
    args = p.parse_args()
    rows = run(args.scenario, args.rounds)
    cpu0, wall0 = rows[0][1], rows[0][2]
    full = next((c for n, c, _ in rows if n == "tokenbudget"), cpu0)
    print(f"{args.scenario}, {args.rounds} rounds, medians per call; 'saves' = tokenbudget minus the variant (CPU)")
    print(f"{'variant':20s} {'CPU µs':>9s} {'x bare':>7s} {'saves':>7s} {'wall µs':>9s} {'x bare':>7s}")
    for name, c, w in rows:
        saves = f"{full - c:7.1f}" if not name.startswith("bare") and name != "tokenbudget" else ""
        print(f"{name:20s} {c:9.1f} {c / cpu0:7.3f} {saves:>7s} {w:9.1f} {w / wall0:7.3f}")


if __name__ == "__main__":
    main()
