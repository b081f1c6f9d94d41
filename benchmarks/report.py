"""Plain-text tables of the results, and the targets with PASS / FAIL / SKIP."""

from __future__ import annotations

import math
from typing import Any


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(header)))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs)

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def calls_table(rows: list[dict[str, Any]]) -> str:
    out = []
    last = None
    for r in rows:
        scenario = r["scenario"] if r["scenario"] != last else ""
        last = r["scenario"]
        out.append([scenario, r["variant"], _f(r["median_us"]), _f(r["p99_us"]), _f(r.get("ratio"), 3),
                    _f(r.get("overhead_us")), _f(r.get("cpu_median_us")), _f(r.get("cpu_ratio"), 3),
                    _f(r.get("cpu_overhead_us")), _f(r.get("spans_per_call"), 2), str(r["n"])])
    header = ["scenario", "variant", "median µs", "p99 µs", "x bare", "+µs", "CPU µs", "CPU x bare", "CPU +µs",
              "spans/call", "calls"]
    return _table(header, out, right=set(range(2, len(header))))


def peers_table(entries: list[dict[str, Any]]) -> str:
    parts = []
    for e in entries:
        if e.get("skipped"):
            parts.append(f"{e['peer']}: NOT MEASURED -- {e['skipped']}")
            continue
        parts.append(f"{e['peer']} ({e['label']}), its own venv/process:")
        parts.append(calls_table(e["rows"]))
    return "\n\n".join(parts)


def simple_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, int]]) -> str:
    """``columns``: (header, key, digits)."""
    out = [[_f(r.get(key), digits) if key != "name" else str(r["name"]) for _, key, digits in columns] for r in rows]
    return _table([h for h, _, _ in columns], out, right=set(range(1, len(columns))))


def estimate_tables(section: dict[str, Any]) -> str:
    a = simple_table(section["rows"], [("prompt", "name", 0), ("tokens", "tokens", 0), ("median µs", "median_us", 1),
                                       ("p99 µs", "p99_us", 1), ("x fresh", "ratio_to_fresh", 4), ("n", "n", 0)])
    ag = section["agent"]
    b_rows = [{"name": f"call {k}", "median_us": v, "ratio": v / ag["call1_us"]} for k, v in ag["call_us"].items()]
    b = simple_table(b_rows, [("agent conversation", "name", 0), ("median µs", "median_us", 1),
                              ("x call 1", "ratio", 2)])
    text = a + "\n\n" + b + f"\n({ag['turns']} calls, one new {ag['tokens_per_message']}-token message per call, " \
                              f"{ag['reps']} conversations)"
    plan = section.get("agent_plan") or {}
    if plan:
        c_rows = [{"name": f"Guard._plan, {api}", "call1_us": v["call1_us"], "median_us": v["median_us"],
                   "ratio": v["ratio_last_to_first"]} for api, v in plan.items()]
        text += "\n\n" + simple_table(c_rows, [("same conversation through", "name", 0), ("call 1 µs", "call1_us", 1),
                                                ("call 200 µs", "median_us", 1), ("x call 1", "ratio", 2)])
    return text


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    s = results.get("sections", {})
    out: list[dict[str, Any]] = []

    def add(target: str, value: float | None, limit: float, *, unit: str, higher_is_better: bool = False,
            skip: str | None = None, cpu: float | None = None) -> None:
        if skip is not None or value is None or (isinstance(value, float) and math.isnan(value)):
            out.append({"target": target, "measured": None, "limit": limit, "unit": unit, "status": "SKIP",
                        "why": skip or "not measured"})
            return
        ok = value >= limit if higher_is_better else value <= limit
        entry = {"target": target, "measured": value, "limit": limit, "unit": unit, "status": "PASS" if ok else
                 "FAIL", "op": ">=" if higher_is_better else "<="}
        if cpu is not None and not math.isnan(cpu):
            entry["cpu_measured"] = cpu
            entry["cpu_status"] = "PASS" if (cpu >= limit if higher_is_better else cpu <= limit) else "FAIL"
        out.append(entry)

    calls = {(r["scenario"], r["variant"]): r for r in s.get("calls", {}).get("rows", [])}

    def call_ratio(scenario: str, variant: str, key: str = "ratio") -> float | None:
        r = calls.get((scenario, variant))
        return None if r is None else r.get(key)

    if "calls" in s:
        for vendor, limit in (("openai", 1.10), ("anthropic", 1.15)):
            for mode in ("sync", "async"):
                sc = f"{vendor}.{mode}"
                add(f"memory ledger + OTel SDK, {vendor} {mode}", call_ratio(sc, "tokenbudget-memory"), limit,
                    unit="x bare", cpu=call_ratio(sc, "tokenbudget-memory", "cpu_ratio"))
        for vendor in ("openai", "anthropic"):
            for mode in ("stream", "astream"):
                sc = f"{vendor}.{mode}"
                add(f"streamed ({mode}), memory ledger, {vendor}", call_ratio(sc, "tokenbudget-memory"), 1.05,
                    unit="x bare", cpu=call_ratio(sc, "tokenbudget-memory", "cpu_ratio"))
        add("SQLite ledger, openai sync", call_ratio("openai.sync", "tokenbudget-sqlite"), 1.25, unit="x bare",
            cpu=call_ratio("openai.sync", "tokenbudget-sqlite", "cpu_ratio"))
    if "chunks" in s:
        per_chunk = [r["median_us"] for r in s["chunks"]["rows"] if r["name"].endswith("per chunk")]
        add("per-chunk streaming overhead (worst vendor)", max(per_chunk) if per_chunk else None, 2.0, unit="µs/chunk")
    if "estimate" in s:
        est = s["estimate"]
        add("estimate: agent call 200 vs call 1", est["agent"]["ratio_last_to_first"], 2.0, unit="x call 1")
        add("estimate: repeated 1M-token prompt vs fresh encode", est["repeated_1m_ratio"], 0.10, unit="x fresh")
    if "ledger" in s:
        led = {(r["ledger"], r["kind"], r["concurrency"]): r for r in s["ledger"]["rows"]}
        sq = led.get(("sqlite", "threads", 1))
        add("SQLite reserve+commit, one process (1 thread)", sq["median_per_s"] if sq else None, 5000,
            unit="/s", higher_is_better=True)
        rd = led.get(("redis", "threads", 8))
        add("Redis reserve+commit, 8 threads", rd["median_per_s"] if rd else None, 20000, unit="/s",
            higher_is_better=True, skip=None if rd else s["ledger"].get("redis_skipped", "not measured"))
    if "startup" in s:
        st = s["startup"]["rows"][0]
        add("import tokenbudget + install() beyond the SDKs", st["median_ms"], 50.0, unit="ms")
    return out


def targets_table(targets: list[dict[str, Any]]) -> str:
    rows = []
    for t in targets:
        digits = 0 if t["unit"] == "/s" else (3 if t["unit"].startswith("x") else 2)
        measured = "-" if t["measured"] is None else f"{_f(float(t['measured']), digits)} {t['unit']}"
        limit = f"{t.get('op', '')} {_f(float(t['limit']), digits)} {t['unit']}".strip()
        cpu = "" if t.get("cpu_measured") is None else f"{_f(float(t['cpu_measured']), digits)} {t['unit']}"
        rows.append([t["target"], measured, limit, t["status"] + (f" ({t['why']})" if t.get("why") else ""),
                     cpu, t.get("cpu_status", "")])
    return _table(["target", "measured (wall)", "limit", "result", "caller CPU", "CPU result"], rows,
                  right={1, 2, 4})
