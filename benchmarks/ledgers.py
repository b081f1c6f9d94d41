"""Ledger throughput: reserve + settle pairs per second, as the guard does them for every call.

Each pair reserves against one total budget and settles with a ``CallEvent`` (the guard records one per call by
default). Threads share one ledger object; processes each open their own handle on the same store (SQLite file,
Redis server). The memory ledger lives in one process, so it has no multi-process figure. Runs are interleaved
round-robin over (ledger, concurrency) and repeated; the median run is reported.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ._stats import median


def _allowance() -> Any:
    from tokenbudget.ledger.base import Allowance

    return Allowance(key="org@total", scope="org", limit_micros=10**18, limit_tokens=None)


def _event(i: int) -> Any:
    from tokenbudget.events import CallEvent

    return CallEvent(id=f"bench-{i}", time=time.time(), provider="openai", model="gpt-4o-mini", input_tokens=120,
                     output_tokens=40, cost_micros=42, estimated_micros=200, budget_keys=("org@total",))


def _pairs_until(ledger: Any, deadline: float, start_gate: float | None = None) -> int:
    allowance = (_allowance(),)
    now = time.time
    if start_gate is not None:
        while now() < start_gate:
            time.sleep(0.0005)
    done = 0
    while now() < deadline:
        t = now()
        res = ledger.reserve(allowance, 200, 160, lease_seconds=600.0, now=t)
        ledger.settle(res, 42, 160, _event(done), now=t)
        done += 1
    return done


def _threads(url: str, threads: int, seconds: float) -> float:
    from tokenbudget.ledger import open_ledger

    ledger = open_ledger(url)
    try:
        _pairs_until(ledger, time.time() + 0.05)  # connect, migrate, warm up
        counts = [0] * threads
        start = time.time() + 0.1
        deadline = start + seconds

        def work(k: int) -> None:
            counts[k] = _pairs_until(ledger, deadline, start)

        pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return sum(counts) / seconds
    finally:
        ledger.close()


def _proc_main(url: str, seconds: float, ready: Any, go: Any, start_at: Any, out: Any) -> None:
    from ._env import clean_environment

    clean_environment()
    from tokenbudget.ledger import open_ledger

    ledger = open_ledger(url)
    try:
        _pairs_until(ledger, time.time() + 0.05)  # connect, migrate, warm up
        ready.put(1)
        go.wait(120)
        start = start_at.value
        out.put(_pairs_until(ledger, start + seconds, start))
    finally:
        ledger.close()


def _processes(url: str, procs: int, seconds: float) -> float:
    """``procs`` spawned processes, each with its own handle on the store, all starting at the same instant."""
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    workers = [ctx.Process(target=_proc_main, args=(url, seconds, ready, go, start_at, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    for _ in workers:
        ready.get(timeout=120)
    start_at.value = time.time() + 0.2
    go.set()
    total: float = sum(out.get(timeout=120 + seconds) for _ in workers)
    for w in workers:
        w.join(timeout=30)
    return total / seconds


def run(*, ledgers: dict[str, str], seconds: float, repeats: int, threads: tuple[int, ...] = (1, 8, 64),
        procs: tuple[int, ...] = (1, 4)) -> list[dict[str, Any]]:
    """``ledgers`` maps a name to a URL; ``{tmp}`` in a URL becomes a fresh directory per run."""
    configs: list[tuple[str, str, int]] = []
    for name in ledgers:
        configs += [(name, "threads", t) for t in threads]
        if name != "memory":
            configs += [(name, "processes", p) for p in procs if p > 1]
    results: dict[tuple[str, str, int], list[float]] = {c: [] for c in configs}
    for r in range(repeats):
        shift = r % len(configs)
        for cfg in configs[shift:] + configs[:shift]:
            name, kind, n = cfg
            with tempfile.TemporaryDirectory(prefix="tb-bench-ledger-") as tmp:
                url = ledgers[name].replace("{tmp}", str(Path(tmp)))
                if url.startswith("redis"):
                    _flush_redis(url)
                rate = _threads(url, n, seconds) if kind == "threads" else _processes(url, n, seconds)
            results[cfg].append(rate)
    rows = []
    for (name, kind, n), rates in results.items():
        label = f"{n} thread{'s' if n > 1 else ''}, 1 process" if kind == "threads" else f"{n} processes x 1 thread"
        rows.append({"name": f"{name}: {label}", "ledger": name, "kind": kind, "concurrency": n,
                     "median_per_s": median(rates), "min_per_s": min(rates), "max_per_s": max(rates),
                     "median_us": 1e6 / median(rates) if median(rates) else float("nan"), "runs": len(rates)})
    return rows


def _flush_redis(url: str) -> None:
    try:
        import redis

        redis.Redis.from_url(url).flushdb()
    except Exception:
        pass
