"""``import tokenbudget`` + ``install()`` beyond importing the SDKs, in fresh interpreters, and the first call.

Each sample is a new ``python`` process that imports openai and anthropic first (untimed), then times
``import tokenbudget`` and ``tokenbudget.install(ledger="memory://")`` with ``perf_counter``. A second kind of
sample times the first guarded call in a fresh process against the first bare call in another fresh process, which
is where anything loaded lazily (the tokenizer, the price table) shows up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from ._stats import median, percentile

_IMPORT = r"""
import json, time
import openai, anthropic
t0 = time.perf_counter()
import tokenbudget
t1 = time.perf_counter()
tokenbudget.install(config={"ledger": "memory://", "budget_usd": 100.0})
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "install_s": t2 - t1}))
"""

_FIRST_CALL = r"""
import json, sys, time
import openai
from tokenbudget.testing import StandInServer
srv = StandInServer().start()
client = openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-bench", max_retries=0)
if sys.argv[1] == "tb":
    import tokenbudget
    tokenbudget.install(config={"ledger": "memory://", "budget_usd": 100.0})
msgs = [{"role": "user", "content": "Summarise the incident report in two sentences."}]
t0 = time.perf_counter()
client.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=64)
t1 = time.perf_counter()
client.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=64)
t2 = time.perf_counter()
srv.stop()
print(json.dumps({"first_s": t1 - t0, "second_s": t2 - t1}))
"""


def _python(code: str, *args: str, cwd: str) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"startup probe failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(*, repeats: int) -> list[dict[str, Any]]:
    # An empty working directory: no pyproject.toml for load_settings to find, as in a user's app.
    with tempfile.TemporaryDirectory(prefix="tb-bench-startup-") as cwd:
        imports: list[float] = []
        installs: list[float] = []
        totals: list[float] = []
        firsts: dict[str, list[float]] = {"bare": [], "tb": []}
        for _ in range(repeats):
            s = _python(_IMPORT, cwd=cwd)
            imports.append(s["import_s"] * 1e3)
            installs.append(s["install_s"] * 1e3)
            totals.append((s["import_s"] + s["install_s"]) * 1e3)
            for kind in ("bare", "tb"):  # interleaved
                firsts[kind].append(_python(_FIRST_CALL, kind, cwd=cwd)["first_s"] * 1e3)
    rows = [
        {"name": "import tokenbudget + install(), beyond the SDKs", "median_ms": median(totals),
         "p99_ms": percentile(totals, 99), "median_us": median(totals) * 1e3, "n": len(totals)},
        {"name": "  of which import tokenbudget", "median_ms": median(imports), "p99_ms": percentile(imports, 99),
         "median_us": median(imports) * 1e3, "n": len(imports)},
        {"name": "  of which install()", "median_ms": median(installs), "p99_ms": percentile(installs, 99),
         "median_us": median(installs) * 1e3, "n": len(installs)},
        {"name": "first OpenAI call in a fresh process, bare", "median_ms": median(firsts["bare"]),
         "p99_ms": percentile(firsts["bare"], 99), "median_us": median(firsts["bare"]) * 1e3, "n": repeats},
        {"name": "first OpenAI call in a fresh process, tokenbudget", "median_ms": median(firsts["tb"]),
         "p99_ms": percentile(firsts["tb"], 99), "median_us": median(firsts["tb"]) * 1e3, "n": repeats,
         "extra_ms": median(firsts["tb"]) - median(firsts["bare"])},
    ]
    return rows
