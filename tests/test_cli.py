"""The ``tokenbudget`` command: reports built from a ledger the guard filled through the real SDKs, budgets with
their config limits and grants, top spenders, exit codes, the console script, and the demo end to end."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import tokenbudget
from tokenbudget.calls import Usage
from tokenbudget.cli import main
from tokenbudget.cli import report as rp
from tokenbudget.clock import ManualClock
from tokenbudget.config import BudgetRule
from tokenbudget.events import CallEvent
from tokenbudget.ledger.base import Balance, Grant, Reservation
from tokenbudget.ledger.sqlite import SQLiteLedger
from tokenbudget.pricing import PriceBook
from tokenbudget.testing import Fault, Reply, StandInServer

T0 = 1_767_261_600.0  # 2026-01-01T10:00:00Z
DAY0 = 1_767_225_600  # 2026-01-01T00:00:00Z
NOW = "2026-01-01T18:00"

CONFIG = """\
ledger = {ledger}
org = "acme"
timezone = "UTC"

[[budgets]]
scope = "org"
limit_usd = 10.0
period = "month"

[[budgets]]
scope = "team:search/user:*"
limit_usd = 0.01
period = "day"
on_exhaust = "downgrade"

[[budgets]]
scope = "team:research"
limit_usd = 0.01
period = "day"

[[budgets]]
scope = "team:support"
limit_tokens = 100000
period = "total"
name = "tokens"

[downgrade]
"gpt-4o" = "gpt-4o-mini"
"""


@dataclass
class Filled:
    config: Path
    db: Path
    events: list[CallEvent]

    def args(self, *rest: str) -> list[str]:
        return ["--config", str(self.config), *rest]


def _write_config(tmp: Path, db: Path) -> Path:
    cfg = tmp / "tokenbudget.toml"
    cfg.write_text(CONFIG.format(ledger=json.dumps(f"sqlite:///{db}")), encoding="utf-8")
    return cfg


@pytest.fixture(scope="module")
def filled(server: StandInServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    """A SQLite ledger filled by the installed guard from real openai/anthropic SDK calls to the stand-in."""
    import anthropic
    import openai

    tmp = tmp_path_factory.mktemp("cli")
    db = tmp / "ledger.db"
    cfg = _write_config(tmp, db)
    clock = ManualClock(T0)
    server.clear()
    default = server.reply
    tokenbudget.uninstall()
    tokenbudget.install(cfg, clock=clock)
    oai = openai.OpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0)
    ant = anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="sk-ant-test", max_retries=0)

    def chat(model: str = "gpt-4o", max_tokens: int = 600) -> None:
        oai.chat.completions.create(model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": "hi"}])

    @tokenbudget.budget(limit_usd=1.0, name="agent")
    def agent(fail: bool) -> None:
        chat("gpt-4o-mini", 200)
        if fail:
            raise ValueError("the agent's answer was wrong")

    try:
        server.reply = Reply(input_tokens=1000, output_tokens=500)
        with tokenbudget.scope(team="search", user="ann", tags={"env": "prod"}):
            chat()  # $0.0075 of ann's $0.01 day
            clock.advance(3600)
            chat()  # does not fit: downgraded to gpt-4o-mini
        with tokenbudget.scope(team="search", user="bob", tags={"env": "dev"}):
            clock.advance(3600)
            server.push(Fault(status=500))
            with pytest.raises(openai.InternalServerError):
                chat()  # the vendor's error: nothing charged
            chat()
        server.reply = Reply(input_tokens=2000, output_tokens=1000)
        with tokenbudget.scope(team="research", user="dee"):
            clock.advance(3600)
            ant.messages.create(model="claude-haiku-4-5", max_tokens=1000, messages=[{"role": "user", "content": "q"}])
            with pytest.raises(tokenbudget.BudgetExceeded):
                ant.messages.create(
                    model="claude-haiku-4-5", max_tokens=1000, messages=[{"role": "user", "content": "q"}]
                )
        server.reply = Reply(input_tokens=1000, output_tokens=100)
        with tokenbudget.scope(team="support", user="fay"):
            clock.advance(3600)
            agent(False)
            agent(False)
            with pytest.raises(ValueError):
                agent(True)
        events = list(tokenbudget.active_guard().ledger.events())  # type: ignore[union-attr]
    finally:
        tokenbudget.uninstall()
        server.reply = default
        server.clear()
    yield Filled(cfg, db, events)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def calls(events: list[CallEvent]) -> list[CallEvent]:
    return [e for e in events if e.operation != "function_run"]


# -- report ----------------------------------------------------------------------------------------------------------
def test_the_guard_filled_the_ledger_as_expected(filled: Filled) -> None:
    by_status: dict[str, int] = defaultdict(int)
    for e in calls(filled.events):
        by_status[e.status] += 1
    assert by_status == {"ok": 7, "error": 1, "denied": 1}
    ann = [e for e in filled.events if e.user == "ann"]
    assert [(e.model, e.decision, e.cost_micros) for e in ann] == [
        ("gpt-4o", "allow", 7500), ("gpt-4o-mini", "downgrade", 450),
    ]  # fmt: skip
    assert ann[1].original_model == "gpt-4o"


def test_report_table_groups_by_team_and_model(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *filled.args("report", "--by", "team,model"))
    assert code == 0, err
    for word in ("search", "research", "support", "gpt-4o", "gpt-4o-mini", "claude-haiku-4-5", "total"):
        assert word in out
    assert "$0.0070" in out  # research's one call: 2000 x $1/M + 1000 x $5/M


def test_report_json_matches_the_events(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *filled.args("report", "--by", "team,model", "--format", "json"))
    assert code == 0
    rows = json.loads(out)
    expected: dict[tuple[str, str], int] = defaultdict(int)
    for e in calls(filled.events):
        expected[(e.team or rp.NONE, e.model)] += e.cost_micros
    assert {(r["team"], r["model"]): r["cost_micros"] for r in rows} == dict(expected)
    search_4o = next(r for r in rows if (r["team"], r["model"]) == ("search", "gpt-4o"))
    assert search_4o["calls"] == 3 and search_4o["errors"] == 1 and search_4o["cost_micros"] == 15_000
    assert search_4o["cost_usd"] == pytest.approx(0.015)
    research = next(r for r in rows if r["team"] == "research")
    assert (research["calls"], research["denied"], research["ok"]) == (2, 1, 1)
    assert research["input_tokens"] == 2000 and research["output_tokens"] == 1000
    assert [r["cost_micros"] for r in rows] == sorted((r["cost_micros"] for r in rows), reverse=True)


def test_report_downgrade_savings_price_real_usage_at_the_asked_model(
    filled: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, *filled.args("report", "--by", "user", "--format", "json"))
    assert code == 0
    ann = next(r for r in json.loads(out) if r["user"] == "ann")
    book = PriceBook()
    at_4o = book.cost_micros(book.price("gpt-4o"), Usage(input_tokens=1000, output_tokens=500))
    assert at_4o == 7500
    assert ann["downgraded"] == 1
    assert ann["saved_micros"] == at_4o - 450 == 7050


def test_report_csv_by_tag_and_hour(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *filled.args("report", "--by", "tag:env,hour", "--format", "csv"))
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    got = {(r["tag:env"], r["hour"]): int(r["calls"]) for r in rows}
    assert got[("prod", "2026-01-01 10:00")] == 1
    assert got[("prod", "2026-01-01 11:00")] == 1
    assert got[("dev", "2026-01-01 12:00")] == 2
    assert sum(got.values()) == len(calls(filled.events))
    assert {"cost_usd", "saved_usd", "denied", "downgraded", "abandoned"} <= set(rows[0])


def test_report_by_function_counts_runs_failures_and_cost_per_success(
    filled: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, *filled.args("report", "--by", "function", "--format", "json"))
    assert code == 0
    agent = next(r for r in json.loads(out) if r["function"] == "agent")
    per_call = 1000 * 150_000 // 1_000_000 + 100 * 600_000 // 1_000_000  # gpt-4o-mini: $0.15 / $0.60 per M
    assert per_call == 210
    assert (agent["runs"], agent["failed_runs"], agent["ok_runs"], agent["open_runs"]) == (3, 1, 2, 0)
    assert agent["cost_micros"] == 3 * per_call
    assert agent["cost_per_run_usd"] == pytest.approx(210 / 1e6)
    assert agent["cost_per_successful_run_usd"] == pytest.approx(315 / 1e6)  # the failed run's cost counts too
    code, out, _ = run(capsys, *filled.args("report", "--by", "function"))
    assert code == 0 and "cost/ok run" in out and "$0.0003" in out


def test_report_since_until_window(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, *filled.args("report", "--by", "team", "--since", "2026-01-01T11:30", "--until", "2026-01-01T12:30",
                             "--format", "json"),
    )  # fmt: skip
    assert code == 0
    assert [(r["team"], r["calls"]) for r in json.loads(out)] == [("search", 2)]
    code, out, _ = run(capsys, *filled.args("report", "--since", "24h", "--until", "now", "--now", "2026-01-01T09:00"))
    assert code == 0 and "No calls recorded" in out


# -- budgets and grants ----------------------------------------------------------------------------------------------
def _budgets(capsys: pytest.CaptureFixture[str], filled: Filled, *extra: str) -> dict[str, dict[str, Any]]:
    code, out, err = run(capsys, *filled.args("budgets", "--now", NOW, "--format", "json", *extra))
    assert code == 0, err
    return {r["key"]: r for r in json.loads(out)}


def test_budgets_show_limit_spent_remaining_and_reset(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _budgets(capsys, filled)
    ann = rows[f"team:search/user:ann@day:{DAY0}"]
    assert ann["policy"] == "downgrade"
    assert ann["limit_usd"] == pytest.approx(0.01)
    assert ann["spent_usd"] == pytest.approx(0.00795)
    assert ann["remaining_usd"] == pytest.approx(0.01 - 0.00795)
    assert ann["used_percent"] == pytest.approx(79.5)
    assert ann["window_end"] == DAY0 + 86_400
    research = rows[f"team:research@day:{DAY0}"]
    assert research["spent_usd"] == pytest.approx(0.007) and research["policy"] == "raise"
    org = rows["org@month:1767225600"]
    assert org["spent_usd"] == pytest.approx(sum(e.cost_micros for e in filled.events) / 1e6)
    tokens = rows["team:support#tokens@total"]
    assert tokens["limit_tokens"] == 100_000 and tokens["spent_tokens"] == 3 * 1100
    assert tokens["window_end"] is None
    assert not any(k.startswith("fn:") for k in rows)

    code, out, _ = run(capsys, *filled.args("budgets", "--now", NOW))
    assert code == 0
    assert "team:search/user:ann, day 2026-01-01" in out and "$0.0100" in out and "79.5%" in out
    assert "in 6h 0m (2026-01-02 00:00 UTC)" in out


def test_budgets_hide_ended_windows_unless_all(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *filled.args("budgets", "--now", "2026-01-02T10:00", "--format", "json"))
    assert code == 0
    keys = {r["key"] for r in json.loads(out)}
    assert f"team:search/user:ann@day:{DAY0}" not in keys and "org@month:1767225600" in keys
    code, out, _ = run(capsys, *filled.args("budgets", "--now", "2026-01-02T10:00", "--all", "--format", "json"))
    ended = next(r for r in json.loads(out) if r["key"] == f"team:search/user:ann@day:{DAY0}")
    assert ended["current"] is False


def test_grant_appears_in_budgets_and_raises_the_limit(
    filled: Filled, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "copy.db"
    with sqlite3.connect(filled.db) as src, sqlite3.connect(db) as dst:
        src.backup(dst)  # grants go into a copy: the module's ledger stays as the other tests expect it
    copy = Filled(_write_config(tmp_path, db), db, filled.events)
    before = _budgets(capsys, copy)[f"team:research@day:{DAY0}"]
    code, out, err = run(
        capsys, *copy.args("grant", "team:research", "0.5", "--expires", "7d", "--reason", "deadline <b>",
                           "--now", NOW, "--granted-by", "cfo"),
    )  # fmt: skip
    assert code == 0, err
    assert "team:research" in out and "$0.5000" in out and "deadline <b>" in out
    after = _budgets(capsys, copy)[f"team:research@day:{DAY0}"]
    assert after["granted_usd"] == pytest.approx(0.5)
    assert after["effective_limit_usd"] == pytest.approx(before["limit_usd"] + 0.5)
    assert after["remaining_usd"] == pytest.approx(before["remaining_usd"] + 0.5)

    code, out, _ = run(capsys, *copy.args("report", "--by", "team", "--now", NOW))
    assert code == 0 and "Active grants" in out and "team:research +$0.5000 until 2026-01-08" in out
    code, out, _ = run(capsys, *copy.args("grants", "--now", NOW, "--format", "json"))
    (g,) = json.loads(out)
    assert (g["scope"], g["amount_usd"], g["reason"], g["granted_by"]) == ("team:research", 0.5, "deadline <b>", "cfo")
    assert g["expires_at"] == pytest.approx(g["created_at"] + 7 * 86_400)
    code, out, _ = run(capsys, *copy.args("grants", "--now", "2026-02-01"))
    assert code == 0 and "No active grants" in out
    code, out, _ = run(capsys, *copy.args("grants", "--now", "2026-02-01", "--all"))
    assert "(expired)" in out

    code, _, err = run(capsys, *copy.args("grant", "team:nobody", "1", "--reason", "x", "--now", NOW))
    assert code == 0 and "no budget in the current config covers scope 'team:nobody'" in err


def test_grant_usage_errors(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in (
        (["grant", "team:research", "-1", "--reason", "x"], "AMOUNT_USD"),
        (["grant", "team:research", "1", "--reason", "x", "--expires", "soon"], "--expires"),
        (["grant", "squad:x", "1", "--reason", "x"], "unknown scope part"),
        (["grant", "team:research", "1"], "--reason"),
        (["grant", "team:research", "0", "--reason", "x"], "changes nothing"),
    ):
        code, _, err = run(capsys, *filled.args(*argv))
        assert code == 2, argv
        assert needle in err, (argv, err)
        assert "Traceback" not in err


# -- top -------------------------------------------------------------------------------------------------------------
def _synthetic(n_users: int, hours: int) -> list[CallEvent]:
    """Users spend u cents an hour yesterday and (u + growth) cents an hour today; user 3 is new today."""
    out = []
    for h in range(hours):
        for u in range(n_users):
            for day, extra in ((0, 0), (1, u % 3)):
                if u == 3 and day == 0:
                    continue
                t = DAY0 + day * 86_400 + h * 3600 + u
                out.append(
                    CallEvent(
                        id=f"{day}-{h}-{u}", time=t, provider="openai", model="gpt-4o-mini", team=f"team{u % 2}",
                        user=f"user{u}", cost_micros=(u + extra) * 10_000, input_tokens=100, output_tokens=10,
                    )
                )
    return out


def test_top_heaviest_and_fastest_growing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "syn.db"
    led = SQLiteLedger(db)
    for e in _synthetic(6, 24):
        led.record(e)
    led.close()
    base = ["--ledger", f"sqlite:///{db}", "top", "--now", "2026-01-03T00:00"]
    code, out, err = run(capsys, *base, "--format", "json", "--limit", "3")
    assert code == 0, err
    data = json.loads(out)
    assert [r["name"] for r in data["heaviest"]] == ["user5", "user4", "user2"]
    assert data["heaviest"][0]["spend_micros"] == 24 * (5 + 2) * 10_000
    assert data["heaviest"][0]["previous_micros"] == 24 * 5 * 10_000
    growing = data["growing"]
    assert growing[0]["name"] == "user3" and growing[0]["growth_ratio"] is None  # new today: no finite ratio
    assert [r["name"] for r in growing[1:]] == ["user2", "user5"]
    code, out, _ = run(capsys, *base, "--by", "team")
    assert code == 0 and "team1" in out and "Fastest-growing by team" in out and "new" not in out
    code, out, _ = run(capsys, "--ledger", f"sqlite:///{db}", "top", "--now", "2026-01-04T00:00", "--window", "1h")
    assert code == 0 and "No spend" in out


def test_top_rejects_bad_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "syn.db"
    SQLiteLedger(db).close()
    code, _, err = run(capsys, "--ledger", f"sqlite:///{db}", "top", "--window", "yesterday")
    assert code == 2 and "--window" in err


def test_report_on_a_large_synthetic_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "big.db"
    led = SQLiteLedger(db)
    events = _synthetic(40, 24)
    for e in events:
        led.record(e)
    led.close()
    code, out, _ = run(capsys, "--ledger", f"sqlite:///{db}", "report", "--by", "team,day", "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert sum(r["calls"] for r in rows) == len(events)
    assert sum(r["cost_micros"] for r in rows) == sum(e.cost_micros for e in events)
    assert {r["day"] for r in rows} == {"2026-01-01", "2026-01-02"}


# -- exit codes and help ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["report", "budgets", "top", "grant", "grants", "dashboard", "demo"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert "usage: tokenbudget" in out and command in out


def test_usage_errors_exit_2(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in (
        (filled.args("report", "--since", "last tuesday"), "--since"),
        (filled.args("report", "--until", "2026-13-45"), "--until"),
        (filled.args("report", "--by", "team,colour"), "unknown grouping 'colour'"),
        (filled.args("report", "--format", "xml"), "invalid choice"),
        (filled.args("budgets", "--now", "whenever"), "--now"),
        (["--ledger", "ftp://example/ledger", "report"], "unsupported ledger URL"),
        (["--config", "/nonexistent/tokenbudget.toml", "report"], "file not found"),
        (["frobnicate"], "invalid choice"),
    ):
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert needle in err, (argv, err)
        assert "Traceback" not in err
    code, _, err = run(capsys)
    assert code == 2 and "usage" in err


def test_runtime_errors_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "ledger.db"
    code, _, err = run(capsys, "--ledger", f"sqlite:///{missing}", "report")
    assert code == 1
    assert f"no ledger at {missing}" in err and "Traceback" not in err
    assert not missing.exists()  # a read never creates an empty ledger where a typo pointed
    bad = tmp_path / "not-a-ledger.db"
    bad.write_bytes(b"this is not a database" * 100)
    code, _, err = run(capsys, "--ledger", f"sqlite:///{bad}", "budgets")
    assert code == 1 and "not-a-ledger.db" in err and "Traceback" not in err
    db = tmp_path / "ok.db"
    SQLiteLedger(db).close()
    target = tmp_path / "no" / "dir" / "x.html"
    code, _, err = run(capsys, "--ledger", f"sqlite:///{db}", "dashboard", "-o", str(target))
    assert code == 1 and "cannot write" in err


def test_options_before_or_after_the_command(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    a = run(capsys, "--config", str(filled.config), "report", "--format", "json")
    b = run(capsys, "report", "--config", str(filled.config), "--format", "json")
    assert a[0] == b[0] == 0 and json.loads(a[1]) == json.loads(b[1])


def _script() -> str:
    found = Path(sys.executable).parent / "tokenbudget"
    if found.exists():
        return str(found)
    which = shutil.which("tokenbudget")
    assert which, "the tokenbudget console script is not installed (pip install -e .)"
    return which


def test_console_script(filled: Filled) -> None:
    proc = subprocess.run(
        [_script(), *filled.args("report", "--by", "team", "--format", "json")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert {r["team"] for r in json.loads(proc.stdout)} == {"search", "research", "support"}
    proc = subprocess.run([_script(), "report", "--since", "yesterday-ish"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--since" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([_script(), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("tokenbudget ")


# -- report.py pieces ------------------------------------------------------------------------------------------------
def test_rule_for_account_matches_scope_name_and_period() -> None:
    rules = (
        BudgetRule(scope="org", limit_usd=100, period="month"),
        BudgetRule(scope="team:search/user:*", limit_usd=5, period="day"),
        BudgetRule(scope="team:search/user:*", limit_usd=3, period="day"),  # same account: the tighter wins
        BudgetRule(scope="team:*", limit_usd=50, period="week", name="weekly"),
        BudgetRule(scope="tag:env=*", limit_tokens=1000, period="total"),
        BudgetRule(scope="team:research/model:gpt-4*", limit_usd=7, period="day"),
    )
    r = rp.rule_for_account("org@month:1767225600", rules)
    assert r is not None and r.limit_usd == 100
    r = rp.rule_for_account("team:search/user:ann@day:1767225600", rules)
    assert r is not None and r.limit_usd == 3
    assert rp.rule_for_account("team:search/user:ann@week:1767225600", rules) is None
    assert rp.rule_for_account("team:search@week:1767225600", rules) is None  # the weekly rule is named
    r = rp.rule_for_account("team:search#weekly@week:1767225600", rules)
    assert r is not None and r.limit_usd == 50
    r = rp.rule_for_account("tag:env=prod@total", rules)
    assert r is not None and r.limit_tokens == 1000
    assert rp.rule_for_account("team:research/model:gpt-4*@day:1767225600", rules) is not None
    assert rp.rule_for_account("team:research/model:gpt-4o@day:1767225600", rules) is None
    assert rp.rule_for_account("fn:agent#abc", rules) is None
    assert rp.parse_account_key("team:a/user:b#n@hour:3600") == rp.AccountKey(
        "team:a/user:b#n@hour:3600", "team:a/user:b", "n", "hour", 3600.0
    )


def test_rule_for_account_agrees_with_the_policy() -> None:
    """Every key the guard's own Policy makes maps back to the rule that made it."""
    from tokenbudget.policy import Policy
    from tokenbudget.principal import Principal

    rules = (
        BudgetRule(scope="org", limit_usd=1, period="month"),
        BudgetRule(scope="org:*", limit_usd=2, period="day"),
        BudgetRule(scope="team:*/user:*", limit_usd=3, period="week"),
        BudgetRule(scope="user:ann", limit_usd=4, period="hour", name="ann"),
        BudgetRule(scope="tag:project=*/model:claude-*", limit_usd=5, period="total"),
    )
    p = Principal(org="acme", team="search", user="ann", tags={"project": "x"})
    for m in Policy(rules).matches(p, "claude-haiku-4-5", T0):
        assert rp.rule_for_account(m.allowance.key, rules) == m.rule, m.allowance.key


def test_budget_rows_count_live_holds_and_active_grants_only() -> None:
    key = f"team:a@day:{DAY0}"
    accounts = [Balance(key, "team:a", None, None, spent_micros=1000, reserved_micros=999_999)]
    rules = (BudgetRule(scope="team:a", limit_usd=0.01, period="day"),)
    grants = [
        Grant("g1", "team:a", 5000, 0, created_at=T0 - 10, expires_at=T0 + 10),
        Grant("g2", "team:a", 7000, 0, created_at=T0 - 10, expires_at=T0 - 1),  # lapsed
        Grant("g3", "team:b", 9000, 0, created_at=T0 - 10, expires_at=None),  # another scope
    ]
    holds = [Reservation("r1", (key,), 300, 0, T0 + 60), Reservation("r2", (key,), 400, 0, T0 - 1)]
    (row,) = rp.budget_rows(accounts, rules, grants, holds, now=T0)
    assert (row.limit_micros, row.granted_micros, row.reserved_micros) == (10_000, 5000, 300)
    assert row.remaining_micros == 10_000 + 5000 - 1000 - 300
    assert row.window_end == DAY0 + 86_400 and row.current


def test_parse_when_forms() -> None:
    now = T0
    assert rp.parse_when("7d", now=now) == now - 7 * 86_400
    assert rp.parse_when("90m", now=now) == now - 5400
    assert rp.parse_when("now", now=now) == now
    assert rp.parse_when("2026-01-01", now=now) == DAY0
    assert rp.parse_when("2026-01-01T10:00Z", now=now) == T0
    assert rp.parse_when("2026-01-01T11:00+01:00", now=now) == T0
    assert rp.parse_when("2026-01-01", now=now, tz="Europe/Berlin") == DAY0 - 3600
    with pytest.raises(tokenbudget.ConfigError, match="ISO date"):
        rp.parse_when("last week", now=now)


# -- demo ------------------------------------------------------------------------------------------------------------
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBUDGET_")}
    env["TOKENBUDGET_BUDGET_USD"] = "0.0001"  # a developer's own settings must not leak into the demo
    started = time.monotonic()
    proc = subprocess.run(
        [_script(), "demo", "--dir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=120, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 30, f"the demo took {elapsed:.1f}s"
    assert "Traceback" not in proc.stdout + proc.stderr
    out = proc.stdout
    assert str(tmp_path / "demo") in out
    for needle in ("DOWNGRADE", "gpt-4o -> gpt-4o-mini", "CLAMP", "STOPPED", "research.agent", "BudgetExceeded",
                   "REFUSED", "support.triage_ticket", "cost/ok run", "Budgets at", "Heaviest spenders"):  # fmt: skip
        assert needle in out, needle
    page = (tmp_path / "demo" / "tokenbudget-dashboard.html").read_text(encoding="utf-8")
    assert page.count('class="bar"') > 20 and "research" in page and 'class="burn"' in page
    assert (tmp_path / "demo" / "tokenbudget.toml").exists() and (tmp_path / "demo" / "ledger.db").exists()

    # The ledger it leaves is the CLI's to explore, with the config it wrote.
    proc = subprocess.run(
        [_script(), "--config", str(tmp_path / "demo" / "tokenbudget.toml"), "report", "--by", "team", "--format",
         "json"], capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert {r["team"] for r in json.loads(proc.stdout)} == {"search", "research", "support"}


def test_demo_without_the_sdks_says_how_to_get_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tokenbudget.cli import demo

    monkeypatch.setattr(demo, "_missing_sdks", lambda: ["anthropic"])
    code, _, err = run(capsys, "demo", "--dir", str(tmp_path))
    assert code == 1
    assert err.strip() == "tokenbudget demo needs the anthropic SDK: pip install 'tokenbudget[demo]'"
    assert not list(tmp_path.iterdir())
