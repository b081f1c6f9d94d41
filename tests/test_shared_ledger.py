"""Issue 4 acceptance: processes sharing one SQLite ledger through the real SDKs; a killed process's lease."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import tokenbudget
from tokenbudget.clock import ManualClock
from tokenbudget.testing import Fault, Reply, StandInServer

MSG = [{"role": "user", "content": "hi"}]
MAX_TOKENS = 1000


def _worker(ledger_url: str, base_url: str, limit_usd: float, threads: int, out: Any) -> None:
    import threading

    import openai

    import tokenbudget as tb

    tb.install(
        {
            "ledger": ledger_url,
            "team": "search",
            "budgets": [{"scope": "team:search", "limit_usd": limit_usd}, {"scope": "org", "limit_usd": 100}],
        }
    )
    client = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0)
    ok = refused = 0
    lock = threading.Lock()

    def one() -> None:
        nonlocal ok, refused
        try:
            client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=MAX_TOKENS)
            with lock:
                ok += 1
        except tb.BudgetExceeded:
            with lock:
                refused += 1

    ts = [threading.Thread(target=one) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    tb.uninstall()
    out.put((ok, refused))


def _per_call_micros() -> tuple[int, int]:
    guard = tokenbudget.Guard(tokenbudget.Settings(ledger="memory://"))
    request = tokenbudget.CallRequest(
        provider="openai",
        operation="chat",
        model="gpt-4o",
        body={"model": "gpt-4o", "messages": MSG, "max_tokens": MAX_TOKENS},
        max_output_tokens=MAX_TOKENS,
    )
    ticket = guard.begin(request)
    ticket.unsent(RuntimeError("probe"))
    return ticket.reserved_micros, ticket.input_tokens


def test_4_processes_x_16_threads_share_one_sqlite_ledger(tmp_path: Path, srv: StandInServer) -> None:
    per_call, input_tokens = _per_call_micros()
    k = 12
    limit_usd = (per_call * k + per_call // 2) / 1e6
    # The stand-in bills each call its full worst case, so exactly k calls fit, whatever the interleaving.
    srv.reply = Reply(input_tokens=input_tokens, output_tokens=MAX_TOKENS)
    url = f"sqlite:///{tmp_path}/shared.db"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, srv.openai_base_url, limit_usd, 16, q)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(ok for ok, _ in results) == k
    assert sum(r for _, r in results) == 64 - k
    assert len(srv.requests) == k

    from tokenbudget.ledger import open_ledger

    ledger = open_ledger(url)
    evs = [e for e in ledger.events() if e.status == "ok"]
    assert len(evs) == k and len({e.id for e in evs}) == k  # every call recorded exactly once
    assert sum(e.cost_micros for e in evs) <= int(limit_usd * 1e6)
    assert len([e for e in ledger.events() if e.status == "denied"]) == 64 - k
    assert ledger.active_reservations(now=time.time()) == []
    ledger.close()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkilled_process_gives_its_reservation_back_after_the_lease(tmp_path: Path, srv: StandInServer) -> None:
    url = f"sqlite:///{tmp_path}/lease.db"
    config = {"ledger": url, "lease_seconds": 30, "budgets": [{"scope": "org", "limit_usd": 0.015}]}
    srv.push(Fault(delay=60))  # the child's call hangs at the vendor
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import openai, tokenbudget
        tokenbudget.install({config!r})
        openai.OpenAI(base_url={srv.openai_base_url!r}, api_key="k", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=[{{"role": "user", "content": "hi"}}], max_tokens=1000)
    """),
        ],
        env={**os.environ},
    )
    deadline = time.time() + 60
    while not srv.requests and time.time() < deadline:
        time.sleep(0.05)
    assert srv.requests, "the child never sent its request"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    killed_at = time.time()

    # Right after the kill the hold (~$0.01 of $0.015) still blocks a second worst-case call ...
    clock = ManualClock(killed_at)
    tokenbudget.install(config, clock=clock)
    import openai

    client = openai.OpenAI(base_url=srv.openai_base_url, api_key="k", max_retries=0)
    with pytest.raises(tokenbudget.BudgetExceeded) as info:
        client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=1000)
    assert info.value.reserved > 0.009
    # ... and once its lease has run out, the money is back.
    clock.advance(31)
    srv.reply = Reply(input_tokens=10, output_tokens=10)
    client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=1000)
    guard = tokenbudget.active_guard()
    assert guard is not None
    assert guard.ledger.active_reservations(now=clock.now()) == []
