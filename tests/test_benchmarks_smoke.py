"""Smoke test of the benchmark harness: ``python -m benchmarks --quick --json`` runs end to end and reports every
section with numeric medians.

Speed is measured by the benchmarks, never asserted here: the subprocess timeout only guards against a hang.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("calls", "peers", "chunks", "estimate", "ledger", "startup")


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_run_reports_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    # No peer venvs here: the peers section must say why it measured nothing rather than fail or fake numbers.
    env["TB_BENCH_VENVS"] = str(tmp_path / "no-venvs")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "## targets" in proc.stdout

    data = json.loads(out.read_text())
    sections = data["sections"]
    assert set(SECTIONS) <= set(sections), sorted(sections)
    assert data["meta"]["machine"]["nproc"] >= 1
    probe = data["meta"]["machine"]["speed_probe_us"]  # tells machine changes from code changes across runs
    assert isinstance(probe, float) and 0 < probe < 10_000 and f"sum(range(1000)) {probe} µs" in proc.stdout
    assert data["meta"]["versions"]["openai"] and data["meta"]["versions"]["anthropic"]

    for name in ("calls", "chunks", "estimate", "ledger", "startup"):
        rows = sections[name]["rows"]
        assert rows, name
        for row in rows:
            assert _numeric(row["median_us"]), (name, row)

    calls = {(r["scenario"], r["variant"]) for r in sections["calls"]["rows"]}
    for vendor in ("openai", "anthropic"):
        for mode in ("sync", "async", "stream", "astream"):
            assert (f"{vendor}.{mode}", "bare") in calls
            assert (f"{vendor}.{mode}", "tokenbudget-memory") in calls
            assert (f"{vendor}.{mode}", "tokenbudget-sqlite") in calls
    for row in sections["calls"]["rows"]:
        assert _numeric(row["ratio"]) and _numeric(row["p99_us"]), row
        # Every guarded call made exactly one span; bare made none.
        assert row["spans_per_call"] == (0.0 if row["variant"] == "bare" else row["spans_per_call"])
        if row["variant"].startswith("tokenbudget"):
            assert row["spans_per_call"] == 1.0, row
    assert sections["calls"]["uninstall"]["identity_restored"] is True

    assert _numeric(sections["estimate"]["agent"]["median_us"])
    assert _numeric(sections["estimate"]["agent"]["ratio_last_to_first"])
    assert _numeric(sections["estimate"]["repeated_1m_ratio"])
    assert {r["ledger"] for r in sections["ledger"]["rows"]} >= {"memory", "sqlite"}

    entries = sections["peers"]["entries"]
    assert entries
    for entry in entries:
        assert entry.get("skipped") or all(_numeric(r["median_us"]) for r in entry["rows"]), entry

    statuses = {t["status"] for t in data["targets"]}
    assert statuses <= {"PASS", "FAIL", "SKIP"}
    assert len(data["targets"]) >= 10
