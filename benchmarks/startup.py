"""``import tokenbudget`` + ``install()`` beyond importing the SDKs, in fresh interpreters, and the first call.

Each sample is a new ``python`` process that imports openai and anthropic first (untimed), then times
``import tokenbudget`` and ``tokenbudget.install(ledger="memory://")`` with ``perf_counter``. A second kind of
sample times the first guarded call in a fresh process against the first bare call in another fresh process, which
is where anything loaded lazily (the tokenizer, the price table, the alerts module) shows up.

Bytecode: an installed package is byte-compiled (pip does it; failing that, the first run writes ``__pycache__``),
so the target row runs with every module's ``.pyc`` cached, in a private ``PYTHONPYCACHEPREFIX`` warmed by one
untimed run. A development checkout run with ``PYTHONDONTWRITEBYTECODE=1`` instead compiles tokenbudget's own source
in every process (tens of ms for ~8k lines); the "source compiled" rows measure that case, with only tokenbudget's
``.pyc`` files removed from a copy of the warmed prefix. They are shown, not judged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
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


def _python(code: str, *args: str, cwd: str, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"startup probe failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _envs(root: str) -> tuple[dict[str, str], dict[str, str]]:
    """(every .pyc cached, tokenbudget compiled from source): both with their own pycache prefix under ``root``."""
    base = dict(os.environ)
    base.pop("PYTHONPROFILEIMPORTTIME", None)
    cached = {**base, "PYTHONPYCACHEPREFIX": os.path.join(root, "pyc")}
    cached.pop("PYTHONDONTWRITEBYTECODE", None)
    source = {**base, "PYTHONPYCACHEPREFIX": os.path.join(root, "pyc-source"), "PYTHONDONTWRITEBYTECODE": "1"}
    return cached, source


def _drop_tokenbudget_bytecode(prefix: str) -> None:
    spec = importlib.util.find_spec("tokenbudget")
    if spec is None or not spec.submodule_search_locations:
        return
    package_dir = os.path.abspath(next(iter(spec.submodule_search_locations)))
    shutil.rmtree(os.path.join(prefix, package_dir.lstrip(os.sep)), ignore_errors=True)


def _row(name: str, values: list[float], **extra: Any) -> dict[str, Any]:
    return {"name": name, "median_ms": median(values), "p99_ms": percentile(values, 99),
            "median_us": median(values) * 1e3, "n": len(values), **extra}


def run(*, repeats: int) -> list[dict[str, Any]]:
    # An empty working directory: no pyproject.toml for load_settings to find, as in a user's app.
    with tempfile.TemporaryDirectory(prefix="tb-bench-startup-") as cwd, \
            tempfile.TemporaryDirectory(prefix="tb-bench-pyc-") as pyc_root:
        cached, source = _envs(pyc_root)
        # Untimed: writes the .pyc of everything the probes import, then a copy without tokenbudget's own.
        _python(_IMPORT, cwd=cwd, env=cached)
        for kind in ("bare", "tb"):
            _python(_FIRST_CALL, kind, cwd=cwd, env=cached)
        shutil.copytree(cached["PYTHONPYCACHEPREFIX"], source["PYTHONPYCACHEPREFIX"])
        _drop_tokenbudget_bytecode(source["PYTHONPYCACHEPREFIX"])

        samples: dict[str, dict[str, list[float]]] = {
            mode: {"import": [], "install": [], "total": []} for mode in ("cached", "source")
        }
        firsts: dict[str, list[float]] = {"bare": [], "tb": []}
        for _ in range(repeats):
            for mode, env in (("cached", cached), ("source", source)):  # interleaved
                s = _python(_IMPORT, cwd=cwd, env=env)
                samples[mode]["import"].append(s["import_s"] * 1e3)
                samples[mode]["install"].append(s["install_s"] * 1e3)
                samples[mode]["total"].append((s["import_s"] + s["install_s"]) * 1e3)
            for kind in ("bare", "tb"):  # interleaved
                firsts[kind].append(_python(_FIRST_CALL, kind, cwd=cwd, env=cached)["first_s"] * 1e3)
    c, src = samples["cached"], samples["source"]
    return [
        _row("import tokenbudget + install(), beyond the SDKs", c["total"]),
        _row("  of which import tokenbudget", c["import"]),
        _row("  of which install()", c["install"]),
        _row("same, tokenbudget compiled from source (no .pyc)", src["total"]),
        _row("  of which import tokenbudget", src["import"]),
        _row("  of which install()", src["install"]),
        _row("first OpenAI call in a fresh process, bare", firsts["bare"]),
        _row("first OpenAI call in a fresh process, tokenbudget", firsts["tb"],
             extra_ms=median(firsts["tb"]) - median(firsts["bare"])),
    ]
