"""``python -m benchmarks``: every section in one process, a table per section, then the targets."""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import SECTIONS, report

# (rounds, batch, warmup) for the per-call matrix; the other sections scale with --quick too.
FULL = {"rounds": 30, "batch": 10, "warmup": 2}
QUICK = {"rounds": 1, "batch": 3, "warmup": 1}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--json", metavar="PATH", help="also write every result (and the machine) as JSON to PATH")
    p.add_argument("--quick", action="store_true", help="a short smoke run: every section, tiny sizes")
    p.add_argument("--only", action="append", metavar="NAME", default=[],
                   help=f"run only this section (repeatable, or comma separated): {', '.join(SECTIONS)}")
    p.add_argument("--rounds", type=int, help="rounds of the per-call matrix (default 30; --quick 1)")
    p.add_argument("--batch", type=int, help="timed calls per variant, scenario and round (default 10)")
    p.add_argument("--warmup", type=int, help="untimed calls before each batch (default 2)")
    p.add_argument("--setup-peers", action="store_true", help="create/refresh the peer venvs, then exit")
    p.add_argument("--peer-worker", metavar="PEER", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)

    if args.peer_worker:
        from . import peers

        result = peers.worker(args.peer_worker, **sizes)
        Path(args.json).write_text(json.dumps(_clean(result), indent=1, default=str, allow_nan=False))
        return 0
    if args.setup_peers:
        from . import peers

        peers.setup(log=_log)
        return 0

    only = [s.strip() for item in args.only for s in item.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        _parser().error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    selected = [s for s in SECTIONS if not only or s in only]

    from ._env import clean_environment, machine, setup_otel, source_state, versions

    clean_environment()
    otel = setup_otel()  # before anything asks for a tracer: every variant runs under the same OTel SDK setup
    results: dict[str, Any] = {
        "meta": {"started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
                 "sizes": sizes, "machine": machine(), "versions": versions(), "source": source_state(),
                 "argv": sys.argv[1:]},
        "sections": {},
    }
    t_all = time.monotonic()
    for name in selected:
        t0 = time.monotonic()
        _log(f"== {name}")
        section = _RUNNERS[name](args.quick, sizes, otel)
        section["seconds"] = round(time.monotonic() - t0, 1)
        results["sections"][name] = section
        print(f"\n## {name} ({section['seconds']} s)\n")
        print(section.pop("_text"))
        sys.stdout.flush()
        if args.json:  # after every section, so a long run that is cut short still leaves its results
            Path(args.json).write_text(json.dumps(_clean(results), indent=1, default=str, allow_nan=False))
    results["targets"] = report.evaluate_targets(results)
    results["meta"]["seconds"] = round(time.monotonic() - t_all, 1)
    m = results["meta"]["machine"]
    print("\n## targets\n")
    print(report.targets_table(results["targets"]))
    v = results["meta"]["versions"]
    print(f"\n{m['nproc']} CPUs, {m['cpu']}, Python {m['python']}; openai {v.get('openai')}, "
          f"anthropic {v.get('anthropic')}; load average at start {m['loadavg_at_start']}; "
          f"speed probe sum(range(1000)) {m.get('speed_probe_us')} µs; {results['meta']['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(_clean(results), indent=1, default=str, allow_nan=False))
    return 0


def _clean(obj: Any) -> Any:
    """JSON has no NaN or infinity: a value that could not be measured is null."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------------
# sections


def _calls(quick: bool, sizes: dict[str, int], otel: Any) -> dict[str, Any]:
    from tokenbudget.testing import StandInServer

    from . import calls
    from ._redis import RedisServer, redis_unavailable_reason

    notes: list[str] = []
    check = calls.UninstallCheck()
    redis_reason = redis_unavailable_reason()
    with StandInServer() as server, tempfile.TemporaryDirectory(prefix="tb-bench-calls-") as tmp:
        clients = calls.make_clients(server)
        traced = calls.make_clients(server, anthropic_tracing=True)
        scenarios = calls.all_scenarios()
        loop = asyncio.new_event_loop()
        redis = RedisServer() if redis_reason is None else None
        try:
            # Bare before tokenbudget was ever installed in this process, to check uninstall() leaves no cost.
            pristine = calls.run_matrix(scenarios, [calls.bare_variant()], server=server, clients=clients, otel=otel,
                                        loop=loop, rounds=max(1, sizes["rounds"] // 5), batch=sizes["batch"],
                                        warmup=sizes["warmup"])
            variants = [
                calls.bare_variant(),
                calls.tokenbudget_variant("tokenbudget-memory", "memory://"),
                calls.tokenbudget_variant("tokenbudget-sqlite", f"sqlite:///{Path(tmp) / 'ledger.db'}"),
                calls.otel_floor_variant(),
            ]
            if redis is not None:
                variants.append(calls.tokenbudget_variant("tokenbudget-redis", redis.start()))
            else:
                notes.append(f"Redis ledger not measured: {redis_reason}")
            variants.append(calls.Variant(
                "anthropic-sdk-otel", vendors=("anthropic",), clients=traced,
                note="the Anthropic SDK's own OTel spans (open_telemetry left on), no tokenbudget",
            ))

            def after(v: calls.Variant) -> None:
                if v.name.startswith("tokenbudget"):
                    check.verify()

            cells = calls.run_matrix(scenarios, variants, server=server, clients=clients, otel=otel, loop=loop,
                                     rounds=sizes["rounds"], batch=sizes["batch"], warmup=sizes["warmup"],
                                     after_disable=after, progress=_log)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            if redis is not None:
                redis.stop()
    rows = calls.summarize(cells, variants)
    before = {r["scenario"]: r for r in calls.summarize(pristine, [calls.bare_variant()])}
    uninstall_rows = []
    for r in rows:
        if r["variant"] == "bare":
            b = before[r["scenario"]]
            uninstall_rows.append({"scenario": r["scenario"], "bare_before_install_us": b["median_us"],
                                   "bare_after_uninstall_us": r["median_us"],
                                   "ratio": r["median_us"] / b["median_us"],
                                   "cpu_ratio": r["cpu_median_us"] / b["cpu_median_us"]})
    identity = "yes" if not check.failures else "NO: " + ", ".join(sorted(set(check.failures)))
    text = report.calls_table(rows)
    text += "\n\nuninstall(): originals restored after every one of " \
            f"{check.checks} uninstalls: {identity}; bare after uninstall / bare before any install, median wall " \
            "(caller CPU): " + ", ".join(f"{u['scenario']} {u['ratio']:.3f} ({u['cpu_ratio']:.3f})"
                                         for u in uninstall_rows)
    text += f"\nstreams: {calls.STREAM_CHUNKS} chunks per streamed reply; all variants run under the OTel SDK " \
            "(SimpleSpanProcessor -> InMemorySpanExporter, InMemoryMetricReader)."
    for n in notes:
        text += f"\nnote: {n}"
    return {"rows": rows, "uninstall": {"checks": check.checks, "identity_restored": not check.failures,
                                        "failures": sorted(set(check.failures)), "bare_before_after": uninstall_rows},
            "notes": notes, "stream_chunks": calls.STREAM_CHUNKS, "_text": text}


def _peers(quick: bool, sizes: dict[str, int], otel: Any) -> dict[str, Any]:
    from . import peers

    # --quick runs only the first peer that is installed, to stay a smoke test.
    entries = peers.run_all(rounds=sizes["rounds"], batch=sizes["batch"], warmup=sizes["warmup"], log=_log,
                            limit=1 if quick else None)
    text = report.peers_table(entries)
    text += "\n\nEach peer ran in its own venv and process with the same harness; its ratios are to bare in that " \
            "process, and tokenbudget-memory ran there too as a yardstick."
    return {"entries": entries, "_text": text}


def _chunks(quick: bool, sizes: dict[str, int], otel: Any) -> dict[str, Any]:
    from tokenbudget.testing import StandInServer

    from . import calls, chunks

    rows = chunks.run(repeats=5 if quick else 60)
    low, high = 8, 256
    scenarios = [calls.Scenario(v, "stream", chunks=n, label=f"{v}.stream@{n}")
                 for v in ("openai", "anthropic") for n in (low, high)]
    with StandInServer() as server:
        clients = calls.make_clients(server)
        loop = asyncio.new_event_loop()
        try:
            variants = [calls.bare_variant(), calls.tokenbudget_variant("tokenbudget-memory", "memory://")]
            cells = calls.run_matrix(scenarios, variants, server=server, clients=clients, otel=otel, loop=loop,
                                     rounds=max(2, sizes["rounds"] // 2), batch=sizes["batch"],
                                     warmup=sizes["warmup"])
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    e2e_rows = calls.summarize(cells, variants)
    rows += calls.chunk_slopes(e2e_rows, low, high)
    text = report.simple_table(rows, [("measurement", "name", 0), ("median µs", "median_us", 3),
                                      ("p99 µs", "p99_us", 1)])
    text += "\n\n" + report.calls_table(e2e_rows)
    text += "\n(per chunk: slope between short and long streams, so the once-per-stream settle cancels out; the " \
            "end-to-end slope includes SDK and socket noise and is a cross-check of the meter figure)"
    return {"rows": rows, "end_to_end": e2e_rows, "_text": text}


def _estimate(quick: bool, sizes: dict[str, int], otel: Any) -> dict[str, Any]:
    from . import estimation

    section = estimation.run(quick=quick)
    section["_text"] = report.estimate_tables(section)
    return section


def _ledger(quick: bool, sizes: dict[str, int], otel: Any) -> dict[str, Any]:
    from . import ledgers
    from ._redis import RedisServer, redis_unavailable_reason

    urls = {"memory": "memory://", "sqlite": "sqlite:///{tmp}/ledger.db"}
    reason = redis_unavailable_reason()
    redis = RedisServer() if reason is None else None
    try:
        if redis is not None:
            urls["redis"] = redis.start()
        if quick:
            rows = ledgers.run(ledgers=urls, seconds=0.1, repeats=1, threads=(1, 8), procs=(4,))
        else:
            rows = ledgers.run(ledgers=urls, seconds=1.0, repeats=3)
    finally:
        if redis is not None:
            redis.stop()
    text = report.simple_table(rows, [("ledger, concurrency", "name", 0), ("pairs/s (median)", "median_per_s", 0),
                                      ("min", "min_per_s", 0), ("max", "max_per_s", 0),
                                      ("µs/pair", "median_us", 1), ("runs", "runs", 0)])
    section: dict[str, Any] = {"rows": rows}
    if reason is not None:
        section["redis_skipped"] = reason
        text += f"\nnote: Redis ledger not measured: {reason}"
    section["_text"] = text
    return section


def _startup(quick: bool, sizes: dict[str, int], otel: Any) -> dict[str, Any]:
    from . import startup

    rows = startup.run(repeats=1 if quick else 15)
    text = report.simple_table(rows, [("measurement", "name", 0), ("median ms", "median_ms", 1),
                                      ("p99 ms", "p99_ms", 1), ("n", "n", 0)])
    return {"rows": rows, "_text": text}


_RUNNERS = {
    "calls": _calls,
    "peers": _peers,
    "chunks": _chunks,
    "estimate": _estimate,
    "ledger": _ledger,
    "startup": _startup,
}
