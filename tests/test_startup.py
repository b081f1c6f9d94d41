"""``import tokenbudget`` + ``install()`` leave the heavy parts for first use, and first use still does everything.

Each test runs a fresh interpreter (what is in ``sys.modules`` is the point). Nothing here is timed: the speed is
measured by ``python -m benchmarks --only startup``.

Deferred past ``install()``: the genai-prices catalog (first price lookup), tiktoken (first estimate), the alerts
module (first call; a stand-in listener holds its place), tomllib (only when a config file is read).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

HEAVY = ("genai_prices", "tiktoken", "tokenbudget.alerts", "tomllib")

_PRELUDE = """
import json, logging, sys
import openai
HEAVY = {heavy!r}

def loaded():
    return sorted(m for m in HEAVY if m in sys.modules)
"""


def _run(code: str, cwd: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("TOKENBUDGET_CONFIG", None)
    script = textwrap.dedent(_PRELUDE.format(heavy=HEAVY)) + textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=cwd,
                         env=env, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_install_defers_heavy_modules_and_the_first_call_loads_them(tmp_path: Path) -> None:
    out = _run(
        """
        import tokenbudget
        from tokenbudget.testing import StandInServer
        from tokenbudget._runtime import _PendingAlerts

        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record)
        logging.getLogger("tokenbudget.alerts").addHandler(Keep())

        guard = tokenbudget.install(config={"ledger": "memory://", "budget_tokens": 60})  # the call: 37 tokens, 62 %
        after_install = loaded()
        pending = [type(f).__name__ for f in guard.budget_listeners]

        srv = StandInServer().start()
        client = openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-test", max_retries=0)
        msgs = [{"role": "user", "content": "Summarise the incident report in two sentences."}]
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=16)
        after_call = loaded()

        from tokenbudget import alerts
        from tokenbudget.pricing import PriceBook
        manager = alerts.get_manager(guard)
        assert manager is not None and manager.flush(10) and manager.seeded.wait(10)
        (event,) = [e for e in guard.ledger.events() if e.status == "ok"]
        expected = PriceBook().cost_micros(
            PriceBook().price("gpt-4o-mini", "openai"),
            tokenbudget.Usage(input_tokens=event.input_tokens, output_tokens=event.output_tokens),
        )
        srv.stop()
        print(json.dumps({
            "after_install": after_install, "pending": pending, "after_call": after_call,
            "text": reply.choices[0].message.content is not None,
            "listeners_after": [f == manager.on_event for f in guard.budget_listeners],
            "stand_ins_left": any(isinstance(f, _PendingAlerts) for f in guard.budget_listeners),
            "cost": event.cost_micros, "expected": expected,
            "alerts": [getattr(r, "tokenbudget_alert", {}).get("kind") for r in records],
        }))
        """,
        tmp_path,
    )
    assert out["after_install"] == []
    assert out["pending"] == ["_PendingAlerts"]
    assert out["after_call"] == ["genai_prices", "tiktoken", "tokenbudget.alerts"]
    assert out["text"]
    # The first call priced right, and its threshold alert still fired through the manager that replaced the stand-in.
    assert out["cost"] == out["expected"] > 0
    assert out["listeners_after"] == [True] and not out["stand_ins_left"]
    assert "threshold" in out["alerts"], out


def test_bad_config_still_fails_at_install_without_the_catalog(tmp_path: Path) -> None:
    out = _run(
        """
        import tokenbudget
        cases = {
            "unknown key": {"ledger": "memory://", "budgte_usd": 1},
            "negative price": {"ledger": "memory://", "prices": {"my-model": {"input": -1, "output": 1}}},
            "unknown price field": {"ledger": "memory://", "prices": {"gpt-4o": {"inptu": 1.0}}},
            "not a number": {"ledger": "memory://", "prices": {"gpt-4o": {"input": "cheap", "output": 1}}},
        }
        seen = {}
        for name, config in cases.items():
            try:
                tokenbudget.install(config=config)
            except tokenbudget.ConfigError as exc:
                seen[name] = [exc.key, loaded()]
            else:
                seen[name] = None
        # A full override never loads the catalog ...
        tokenbudget.install(config={"ledger": "memory://", "prices": {"my-model": {"input": 1, "output": 2}}})
        seen["full override"] = loaded()
        # ... a partial one needs it to know the model has the other prices: still checked at install.
        try:
            tokenbudget.install(config={"ledger": "memory://", "prices": {"no-such-model-x": {"input": 1.0}}})
        except tokenbudget.ConfigError as exc:
            seen["partial override of an unknown model"] = [exc.key, "input" in str(exc) or "output" in str(exc)]
        else:
            seen["partial override of an unknown model"] = None
        print(json.dumps(seen))
        """,
        tmp_path,
    )
    assert out["unknown key"] == ["budgte_usd", []]
    assert out["negative price"] == ["prices.my-model.input", []]
    assert out["unknown price field"] == ["prices.gpt-4o.inptu", []]
    assert out["not a number"] == ["prices.gpt-4o.input", []]
    assert out["partial override of an unknown model"] == ["prices.no-such-model-x", True]
    assert out["full override"] == []


def test_unknown_model_is_refused_before_sending_on_the_first_call(tmp_path: Path) -> None:
    out = _run(
        """
        import tokenbudget
        from tokenbudget.testing import StandInServer
        tokenbudget.install(config={"ledger": "memory://", "budget_usd": 10})
        assert loaded() == []
        srv = StandInServer().start()
        client = openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-test", max_retries=0)
        try:
            client.chat.completions.create(model="no-such-model-x", messages=[{"role": "user", "content": "hi"}])
        except tokenbudget.UnknownModelError:
            refused = True
        else:
            refused = False
        print(json.dumps({"refused": refused, "requests": len(srv.requests), "loaded": loaded()}))
        srv.stop()
        """,
        tmp_path,
    )
    assert out["refused"] is True
    assert out["requests"] == 0
    assert "genai_prices" in out["loaded"]


def test_reinstall_and_uninstall_before_any_call_never_load_alerts(tmp_path: Path) -> None:
    out = _run(
        """
        import gc, weakref
        import tokenbudget
        g1 = tokenbudget.install(config={"ledger": "memory://", "budget_usd": 1})
        g2 = tokenbudget.install(config={"ledger": "memory://", "budget_usd": 2})
        first = g1.budget_listeners == []  # its stand-in went with it
        tokenbudget.uninstall()
        ref = weakref.ref(g1)
        del g1
        gc.collect()
        print(json.dumps({"first": first, "g2": g2.budget_listeners == [], "loaded": loaded(),
                          "collected": ref() is None}))
        """,
        tmp_path,
    )
    assert out == {"first": True, "g2": True, "loaded": [], "collected": True}


def test_importing_alerts_after_install_attaches_the_manager_at_once(tmp_path: Path) -> None:
    """Code that reaches for the manager right after install (tests, benchmarks) finds it, seeded as before."""
    out = _run(
        """
        import tokenbudget
        guard = tokenbudget.install(config={"ledger": "memory://", "budget_usd": 1})
        from tokenbudget import alerts
        manager = alerts._managers.get(guard)
        print(json.dumps({"attached": manager is not None and guard.budget_listeners == [manager.on_event],
                          "seeded": manager is not None and manager.seeded.wait(10)}))
        """,
        tmp_path,
    )
    assert out == {"attached": True, "seeded": True}


def test_on_alert_before_install_attaches_eagerly(tmp_path: Path) -> None:
    out = _run(
        """
        import tokenbudget
        tokenbudget.on_alert(lambda alert: None)  # loads alerts: nothing left to defer
        guard = tokenbudget.install(config={"ledger": "memory://", "budget_usd": 1})
        from tokenbudget import alerts
        manager = alerts._managers.get(guard)
        print(json.dumps({"attached": manager is not None and guard.budget_listeners == [manager.on_event]}))
        """,
        tmp_path,
    )
    assert out == {"attached": True}
