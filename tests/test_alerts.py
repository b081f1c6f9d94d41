"""Alerts: a runaway agent is caught within minutes, a normal month pages no one, thresholds fire once per period,
and no sink (webhook, callback, logging) can slow down or break an LLM call.

Simulated time comes from a ``ManualClock`` given to the real guard. Where a simulated month through the SDKs would
take too long, the guard's own listeners are called with ``CallEvent``s (what the guard hands them after a call).
"""

from __future__ import annotations

import http.server
import json
import logging
import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import tokenbudget
import tokenbudget.alerts as alerts_mod
from tokenbudget.alerts import Alert, AlertManager, attach_alerts, get_manager, redact_url
from tokenbudget.calls import CallRequest, Usage
from tokenbudget.clock import ManualClock
from tokenbudget.config import AlertSettings
from tokenbudget.events import CallEvent
from tokenbudget.guard import Guard
from tokenbudget.ledger.base import Allowance, Refusal
from tokenbudget.ledger.memory import MemoryLedger
from tokenbudget.testing import Reply, StandInServer

MODEL = "agent-model"
PRICES = {MODEL: {"input": 1, "output": 1}}  # $1 per million tokens: one token costs one micro-dollar
DAY = 86_400.0
START = 1_767_225_600.0  # Thursday 2026-01-01 00:00 UTC (ManualClock's default)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


class Collected:
    """Alerts delivered to an ``on_alert`` callback (on the alerts thread)."""

    def __init__(self) -> None:
        self.items: list[Alert] = []
        self._lock = threading.Lock()

    def __call__(self, alert: Alert) -> None:
        with self._lock:
            self.items.append(alert)

    def of(self, kind: str) -> list[Alert]:
        with self._lock:
            return [a for a in self.items if a.kind == kind]


@pytest.fixture
def collected() -> Iterator[Collected]:
    c = Collected()
    unsubscribe = tokenbudget.on_alert(c)
    yield c
    unsubscribe()


def manager(guard: Guard) -> AlertManager:
    m = get_manager(guard)
    assert m is not None, "install() attaches alerts to its guard"
    assert m.seeded.wait(10)
    return m


def call(guard: Guard, usd: float, *, team: str = "search", user: str = "ann") -> None:
    """One guarded call through the real guard (reserve, price, settle, listeners) that costs ``usd``."""
    with tokenbudget.scope(team=team, user=user):
        ticket = guard.begin(
            CallRequest(
                provider="openai", operation="chat", model=MODEL,
                body={"model": MODEL, "messages": [{"role": "user", "content": "next step"}]}, max_output_tokens=1,
            )
        )
        ticket.ok(Usage(input_tokens=round(usd * 1_000_000), output_tokens=0))


def event(t: float, user: str, team: str, micros: int) -> CallEvent:
    return CallEvent(
        id=f"{user}-{t}", time=t, provider="openai", model=MODEL, team=team, user=user, cost_micros=micros,
        input_tokens=micros,
    )


def team_allowance(guard: Guard, clock: ManualClock, team: str = "search") -> Allowance:
    """The budget window a call by ``team`` is charged to right now (what the guard passes its listeners)."""
    principal = guard.default_principal.merged(None, team, "ann", None)
    (match,) = guard.policy.matches(principal, MODEL, clock.now())
    return match.allowance


def feed(guard: Guard, events: list[CallEvent]) -> None:
    """What the guard does after each call: hand the event to its listeners."""
    for e in events:
        for listener in guard.budget_listeners:
            listener(e, ())


# ---------------------------------------------------------------------------------------------------------------
# Synthetic traffic: 20 people in 4 teams, $2 to $600 a day each, office hours, lunch, lighter weekends,
# day-to-day swings, heavy-tailed call sizes, and bursts of up to 2.5x their normal rate for 5-30 minutes.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Profile:
    user: str
    team: str
    daily_usd: float
    start_hour: float
    hours: float
    weekend: float
    call_usd: float


def _poisson(rng: random.Random, lam: float) -> int:
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def normal_traffic(days: int, *, seed: int = 7, users: int = 20, burst_max: float = 2.5) -> list[CallEvent]:
    """Per-minute spend of every user over ``days`` days from START, time-ordered."""
    rng = random.Random(seed)
    profiles = []
    for i in range(users):
        daily = math.exp(math.log(2) + (math.log(600) - math.log(2)) * i / (users - 1))
        profiles.append(
            Profile(
                user=f"u{i:02d}", team=f"team{i % 4}", daily_usd=daily, start_hour=rng.uniform(7, 11),
                hours=rng.uniform(6, 10), weekend=rng.choice([0.0, 0.0, 0.1, 0.3]),
                call_usd=daily / rng.uniform(150, 600),
            )
        )
    out: list[tuple[float, str, str, int]] = []
    for p in profiles:
        for day in range(days):
            weekday = (3 + day) % 7  # day 0 is a Thursday
            mult = rng.lognormvariate(0, 0.3) * (p.weekend if weekday >= 5 else 1.0)
            if mult <= 0:
                continue
            begin = (p.start_hour + rng.gauss(0, 0.5)) * 60
            length = max(60.0, (p.hours + rng.gauss(0, 1)) * 60)
            lunch, lunch_len = begin + length * rng.uniform(0.4, 0.6), rng.uniform(20, 60)
            minutes = [m for m in range(int(begin), int(begin + length)) if not lunch <= m < lunch + lunch_len]
            calls_per_min = p.daily_usd * mult / len(minutes) / p.call_usd
            bursts = []
            for _ in range(_poisson(rng, 2.0)):
                b0 = rng.choice(minutes)
                bursts.append((b0, b0 + rng.uniform(5, 30), rng.uniform(1.5, burst_max)))
            for m in minutes:
                k = max([bm for b0, b1, bm in bursts if b0 <= m < b1], default=1.0)
                n = _poisson(rng, calls_per_min * k)
                if n:
                    usd = sum(p.call_usd * rng.lognormvariate(-0.32, 0.8) for _ in range(n))
                    t = START + day * DAY + m * 60 + rng.uniform(0, 59)
                    out.append((t, p.user, p.team, max(1, round(usd * 1e6))))
    out.sort()
    return [event(*row) for row in out]


def install_with_history(clock: ManualClock, history: list[CallEvent], **settings: Any) -> Guard:
    """A guard whose ledger already holds earlier calls, as after a restart with a persistent ledger."""
    ledger = MemoryLedger()
    for e in history:
        ledger.record(e)
    guard = tokenbudget.install(ledger=ledger, clock=clock, prices=PRICES, **settings)
    manager(guard)
    return guard


# ---------------------------------------------------------------------------------------------------------------
# (1) runaway agent, (2) a normal month
# ---------------------------------------------------------------------------------------------------------------


def test_runaway_agent_doubling_every_minute_is_caught_within_minutes(collected: Collected) -> None:
    history = normal_traffic(7)
    clock = ManualClock(START + 7 * DAY + 10.3 * 3600)  # the next Thursday, mid-morning
    guard = install_with_history(clock, history)
    m = manager(guard)
    assert len(m.spikes._series) == 24  # 20 users and 4 teams got their baselines from the ledger

    # u10 normally spends ~$55 a day; its agent loop calls every 5 s, starting at $0.10/min, doubling every minute.
    started, spent, detected = clock.now(), 0.0, None
    for _ in range(12 * 30):
        usd = 0.10 * 2 ** ((clock.now() - started) / 60) / 12
        call(guard, usd, team="team2", user="u10")
        spent += usd
        m.flush()
        if collected.of("spike"):
            detected = clock.now() - started
            break
        clock.advance(5)
    assert detected is not None, "the runaway was never flagged"
    alert = collected.of("spike")[0]
    print(f"\nrunaway flagged after {detected / 60:.1f} simulated minutes, ${spent:.2f} spent: {alert.message}")
    assert detected <= 8 * 60
    assert alert.scope == "user:u10" and alert.user == "u10" and alert.team == "team2"
    assert alert.severity == "critical" and alert.baseline_windows == 288
    assert alert.window_usd is not None and alert.trigger_usd is not None and alert.window_usd > alert.trigger_usd
    assert [a.scope for a in collected.of("spike")] == ["user:u10"]  # the team's alert would be the same page


def test_a_month_of_normal_bursty_traffic_raises_no_alert(collected: Collected) -> None:
    traffic = normal_traffic(37, seed=11)
    history = [e for e in traffic if e.time < START + 7 * DAY]
    month = [e for e in traffic if e.time >= START + 7 * DAY]
    clock = ManualClock(START + 7 * DAY)
    guard = install_with_history(clock, history)
    feed(guard, month)
    m = manager(guard)
    assert m.flush()
    print(f"\n{len(month)} per-minute events over 30 days for 20 users: {len(collected.items)} alerts")
    assert collected.items == []

    # Not vacuous: every principal has a full baseline, and the same detector flags a real anomaly at once.
    assert all(s.baseline() is not None for s in m.spikes._series.values())
    base = m.spikes._series["user:u05"].baseline()
    assert base is not None
    t = month[-1].time + 60
    feed(guard, [event(t, "u05", "team1", int(max(6_000_000, 5 * base.tail)))])
    assert m.flush()
    assert [a.scope for a in collected.items] == ["user:u05"]


def test_without_history_only_a_rate_well_above_the_floor_alerts(collected: Collected) -> None:
    clock = ManualClock()
    guard = tokenbudget.install({"ledger": "memory://"}, clock=clock, prices=PRICES)
    m = manager(guard)
    t = clock.now()
    feed(guard, [event(t + i, "new", "t", 1_500_000) for i in range(12)])  # $18 in 12 s: under 4 x $5
    assert m.flush() and collected.items == []
    feed(guard, [event(t + 20, "new", "t", 3_000_000)])  # $21
    assert m.flush()
    (alert,) = collected.items
    assert alert.baseline_median_usd is None and alert.trigger_usd == 20.0 and "no history yet" in alert.message


def test_pennies_never_page() -> None:
    m = AlertManager(AlertSettings(), MemoryLedger())
    got: list[Alert] = []
    m.dispatcher.submit = lambda a, c: got.append(a)  # type: ignore[method-assign]
    t = START
    for i in range(12 * 24):  # a quiet day: a cent every 5 minutes
        m.on_event(event(t + 300 * i, "penny", "t", 10_000))
    for i in range(60):  # then 100x that rate: still only $4.80 in five minutes
        m.on_event(event(t + DAY + 5 * i, "penny", "t", 80_000))
    assert got == []


# ---------------------------------------------------------------------------------------------------------------
# (3) thresholds
# ---------------------------------------------------------------------------------------------------------------

DAILY_TEAM_BUDGET = [{"scope": "team:*", "limit_usd": 10, "period": "day"}]


def test_thresholds_fire_once_per_period_and_again_next_period(
    collected: Collected, openai_client: Any, srv: StandInServer
) -> None:
    clock = ManualClock(START + 9 * 3600)
    guard = tokenbudget.install({"ledger": "memory://", "budgets": DAILY_TEAM_BUDGET}, clock=clock, prices=PRICES)
    m = manager(guard)
    srv.reply = Reply(text="ok", input_tokens=1_000_000, output_tokens=0)  # $1 a call

    def day_of_calls() -> int:
        refused = 0
        for _ in range(14):
            try:
                with tokenbudget.scope(team="search", user="ann"):
                    openai_client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
                    )
            except tokenbudget.BudgetExceeded:
                refused += 1
            clock.advance(60)
        return refused

    assert day_of_calls() == 4  # 10 x $1 fit, then the budget refuses
    m.flush()
    first = collected.of("threshold")
    assert [(a.threshold, a.severity) for a in first] == [(0.5, "info"), (0.8, "warning"), (1.0, "critical")]
    assert [a.spent_usd for a in first] == [5.0, 8.0, 10.0]
    assert {a.scope for a in first} == {"team:search"} and len({a.budget_key for a in first}) == 1
    assert all(a.limit_usd == 10.0 and a.team == "search" and a.user == "ann" for a in first)
    assert "team:search (day) is 80% spent: $8.00 of $10.00" in first[1].message

    clock.advance(DAY)
    assert day_of_calls() == 4
    m.flush()
    both = collected.of("threshold")
    assert [a.threshold for a in both] == [0.5, 0.8, 1.0, 0.5, 0.8, 1.0]
    assert both[3].budget_key != both[0].budget_key  # a new day is a new budget window
    assert collected.of("spike") == []


def test_a_call_jumping_over_thresholds_sends_one_alert_and_processes_sharing_a_ledger_send_it_once(
    collected: Collected,
) -> None:
    clock = ManualClock(START + 9 * 3600)
    guard = tokenbudget.install({"ledger": "memory://", "budgets": DAILY_TEAM_BUDGET}, clock=clock, prices=PRICES)
    m = manager(guard)
    call(guard, 9.0)  # 0 -> 90 %: one alert, for 80 %
    m.flush()
    assert [a.threshold for a in collected.of("threshold")] == [0.8]

    # A second process on the same ledger (its own manager, its own memory) sees the budget at 90 %, then 100 %.
    other = AlertManager(guard.settings.alerts, guard.ledger)
    other_got: list[Alert] = []
    other.dispatcher.submit = lambda a, c: other_got.append(a)  # type: ignore[method-assign]
    allowance = team_allowance(guard, clock)
    other.on_event(event(clock.now(), "ann", "search", 1), (allowance,))
    assert other_got == []  # 50 % and 80 % were already claimed in the ledger
    call(guard, 1.0)
    other.on_event(event(clock.now(), "ann", "search", 1), (allowance,))
    m.flush()
    assert [a.threshold for a in collected.of("threshold")] == [0.8, 1.0]
    assert other_got == []


# ---------------------------------------------------------------------------------------------------------------
# (4) webhook
# ---------------------------------------------------------------------------------------------------------------

SECRET_PATH = "/services/T0000/B0000/XyZsEcReTtOkEn"
SECRET_QUERY = "token=QuErYsEcReT"


class Receiver:
    """A webhook receiver on 127.0.0.1: records bodies; answers with ``statuses`` in turn, or hangs."""

    def __init__(self, statuses: list[int] | None = None, hang: float = 0.0) -> None:
        self.statuses = list(statuses or [200])
        self.hang = hang
        self.bodies: list[dict[str, Any]] = []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.bodies.append(json.loads(body))
                if outer.hang:
                    outer.release.wait(outer.hang)
                status = outer.statuses.pop(0) if len(outer.statuses) > 1 else outer.statuses[0]
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{SECRET_PATH}?{SECRET_QUERY}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(**kw: Any) -> Receiver:
        r = Receiver(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerts_mod, "WEBHOOK_BACKOFF_SECONDS", 0.05)


def webhook_guard(url: str, clock: ManualClock, *, timeout: float = 2.0, retries: int = 3) -> Guard:
    return tokenbudget.install(
        {
            "ledger": "memory://", "budgets": DAILY_TEAM_BUDGET,
            "alerts": {"webhook": {"url": url, "timeout_seconds": timeout, "retries": retries}},
        },
        clock=clock, prices=PRICES,
    )


def assert_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + str(record.__dict__)
        assert "XyZsEcReTtOkEn" not in text and "QuErYsEcReT" not in text, record.getMessage()


def test_webhook_posts_slack_compatible_json(
    receiver_factory: Any, quick_backoff: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = receiver_factory()
    clock = ManualClock(START + 9 * 3600)
    guard = webhook_guard(r.url, clock)
    call(guard, 5.0)
    assert manager(guard).flush(5)
    (body,) = r.bodies
    assert body["text"].startswith("tokenbudget: budget team:search (day) is 50% spent")
    assert body["kind"] == "threshold" and body["threshold"] == 0.5 and body["scope"] == "team:search"
    assert body["spent_usd"] == 5.0 and body["limit_usd"] == 10.0 and body["severity"] == "info"
    assert body["source"] == "tokenbudget" and body["time"] == clock.now() and body["id"]
    assert "next step" not in json.dumps(body)  # prompt text never leaves in an alert
    assert manager(guard).dispatcher.webhook is not None and manager(guard).dispatcher.webhook.sent == 1
    assert_no_secret(caplog)


def test_hanging_webhook_never_delays_the_call_and_the_worker_gives_up(
    receiver_factory: Any, quick_backoff: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = receiver_factory(hang=5.0)
    clock = ManualClock(START + 9 * 3600)
    guard = webhook_guard(r.url, clock, timeout=0.3, retries=1)
    m = manager(guard)

    started = time.perf_counter()
    call(guard, 5.0)  # crosses 50 %: the alert goes to the hanging receiver
    call(guard, 3.0)  # crosses 80 % while the worker is stuck
    on_path = time.perf_counter() - started
    assert on_path < 0.5, f"the call path took {on_path:.3f} s with a hanging webhook"

    # The listener itself, timed on its own with the worker still hanging: $2 more reach the ledger (100 %).
    allowance = team_allowance(guard, clock)
    held = guard.ledger.reserve([allowance], 0, 0, lease_seconds=60, now=clock.now())
    assert not isinstance(held, Refusal)
    guard.ledger.settle(held, 2_000_000, 0, None, now=clock.now())
    t0 = time.perf_counter()
    m.on_event(event(clock.now(), "ann", "search", 2_000_000), (allowance,))
    assert time.perf_counter() - t0 < 0.5

    t0 = time.perf_counter()
    assert m.flush(10)
    waited = time.perf_counter() - t0
    assert len(r.bodies) == 6  # three alerts (50 %, 80 %, 100 %) x (1 try + 1 retry)
    worker = m.dispatcher.webhook
    assert worker is not None and worker.failed == 3 and worker.sent == 0
    assert waited < 3 * 2 * 0.3 + 2.0
    gave_up = [rec.getMessage() for rec in caplog.records if "gave up" in rec.getMessage()]
    assert gave_up and all(redact_url(r.url) in msg and "no answer within 0.3 s" in msg for msg in gave_up)
    assert_no_secret(caplog)


def test_webhook_500_then_200_is_retried(
    receiver_factory: Any, quick_backoff: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = receiver_factory(statuses=[500, 200])
    clock = ManualClock(START + 9 * 3600)
    guard = webhook_guard(r.url, clock)
    call(guard, 5.0)
    m = manager(guard)
    assert m.flush(5)
    assert len(r.bodies) == 2 and r.bodies[0] == r.bodies[1]
    assert m.dispatcher.webhook is not None and m.dispatcher.webhook.sent == 1 and m.dispatcher.webhook.failed == 0
    assert not [rec for rec in caplog.records if "gave up" in rec.getMessage()]
    assert_no_secret(caplog)


def test_webhook_down_gives_up_quietly(quick_backoff: None, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    url = f"http://127.0.0.1:{port}{SECRET_PATH}?{SECRET_QUERY}"
    caplog.set_level(logging.DEBUG)
    clock = ManualClock(START + 9 * 3600)
    guard = webhook_guard(url, clock, timeout=0.5, retries=2)
    call(guard, 5.0)
    m = manager(guard)
    assert m.flush(5)
    assert m.dispatcher.webhook is not None and m.dispatcher.webhook.failed == 1
    assert any("gave up" in rec.getMessage() and "after 3 attempt(s)" in rec.getMessage() for rec in caplog.records)
    assert_no_secret(caplog)


def test_redact_url() -> None:
    assert redact_url("https://hooks.slack.com/services/T/B/secret") == "https://hooks.slack.com/<redacted>"
    assert redact_url("https://u:pw@example.com:8443/x?token=1") == "https://example.com:8443/<redacted>"


def test_uninstall_stops_the_webhook_worker(receiver_factory: Any, quick_backoff: None) -> None:
    r = receiver_factory(hang=5.0)
    clock = ManualClock(START + 9 * 3600)
    guard = webhook_guard(r.url, clock, timeout=0.3, retries=5)
    call(guard, 5.0)
    m = manager(guard)
    deadline = time.monotonic() + 5
    while not r.bodies and time.monotonic() < deadline:
        time.sleep(0.01)
    worker = m.dispatcher.webhook
    assert worker is not None and worker._thread is not None
    t0 = time.perf_counter()
    tokenbudget.uninstall()
    assert time.perf_counter() - t0 < 2.5
    worker._thread.join(2)
    assert not worker._thread.is_alive()
    assert len(r.bodies) < 6  # it stopped retrying
    assert get_manager(guard) is None and guard.budget_listeners == []


# ---------------------------------------------------------------------------------------------------------------
# (5) callbacks, logging, OpenTelemetry
# ---------------------------------------------------------------------------------------------------------------


def test_callbacks_that_raise_or_block_do_not_break_or_slow_calls(
    collected: Collected, openai_client: Any, srv: StandInServer, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(alert: Alert) -> None:
        raise RuntimeError("the pager integration is broken")

    def slow(alert: Alert) -> None:
        time.sleep(0.6)

    unsubscribe = [tokenbudget.on_alert(broken), tokenbudget.on_alert(slow)]
    try:
        clock = ManualClock(START + 9 * 3600)
        guard = tokenbudget.install({"ledger": "memory://", "budgets": DAILY_TEAM_BUDGET}, clock=clock, prices=PRICES)
        srv.reply = Reply(text="fine", input_tokens=1_000_000, output_tokens=0)
        for _ in range(10):
            t0 = time.perf_counter()
            with tokenbudget.scope(team="search", user="ann"):
                r = openai_client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
                )
            assert r.choices[0].message.content == "fine"
            assert time.perf_counter() - t0 < 0.5
        assert manager(guard).flush(10)
    finally:
        for u in unsubscribe:
            u()
    assert [a.threshold for a in collected.of("threshold")] == [0.5, 0.8, 1.0]
    failures = [rec for rec in caplog.records if "on_alert callback failed" in rec.getMessage()]
    assert len(failures) == 3 and failures[0].exc_info is not None


def test_on_alert_unsubscribe() -> None:
    got: list[Alert] = []
    unsubscribe = tokenbudget.on_alert(got.append)
    clock = ManualClock(START + 9 * 3600)
    guard = tokenbudget.install({"ledger": "memory://", "budgets": DAILY_TEAM_BUDGET}, clock=clock, prices=PRICES)
    call(guard, 5.0)
    manager(guard).flush()
    unsubscribe()
    unsubscribe()  # twice is harmless
    call(guard, 3.0)
    manager(guard).flush()
    assert [a.threshold for a in got] == [0.5]


def test_alerts_are_logged_as_warnings_and_emitted_as_otel_log_records(caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    clock = ManualClock(START + 9 * 3600)
    guard = Guard(
        tokenbudget.Settings(budgets=DAILY_TEAM_BUDGET, prices=PRICES),  # type: ignore[arg-type]
        ledger=MemoryLedger(), clock=clock,
    )
    attach_alerts(guard, logger_provider=provider)
    try:
        caplog.set_level(logging.WARNING, logger="tokenbudget.alerts")
        call(guard, 8.0)
        m = get_manager(guard)
        assert m is not None and m.flush()
    finally:
        alerts_mod.detach_alerts(guard)
    (rec,) = [r for r in caplog.records if r.name == "tokenbudget.alerts"]
    assert rec.levelno == logging.WARNING and "80% spent" in rec.getMessage()
    assert rec.tokenbudget_alert["threshold"] == 0.8  # type: ignore[attr-defined]
    (log_data,) = exporter.get_finished_logs()
    lr = log_data.log_record
    assert lr.body == rec.getMessage() and lr.severity_text == "WARNING" and lr.event_name == "tokenbudget.alert"
    assert lr.attributes is not None and lr.attributes["tokenbudget.alert.kind"] == "threshold"
    assert lr.attributes["tokenbudget.alert.scope"] == "team:search"


# ---------------------------------------------------------------------------------------------------------------
# (6) cooldown
# ---------------------------------------------------------------------------------------------------------------


def test_cooldown_one_incident_is_one_alert_per_principal(collected: Collected) -> None:
    clock = ManualClock(START)
    guard = tokenbudget.install({"ledger": "memory://"}, clock=clock, prices=PRICES)
    m = manager(guard)
    t = START
    # A day of steady work: $1 per 5 minutes.
    feed(guard, [event(t + 60 * i, "bob", "data", 200_000) for i in range(24 * 60)])
    t += DAY
    # Incident: $60 per 5 minutes for three hours, far above the $16 trigger, all one incident.
    feed(guard, [event(t + 10 * i, "bob", "data", 2_000_000) for i in range(3 * 360)])
    m.flush()
    assert [a.scope for a in collected.items] == ["user:bob"]  # and not team:data for the same incident
    # Back to normal for longer than the cooldown, then a new incident: a new alert.
    t += 3 * 3600
    feed(guard, [event(t + 60 * i, "bob", "data", 200_000) for i in range(90)])
    t += 90 * 60
    feed(guard, [event(t + 10 * i, "bob", "data", 2_000_000) for i in range(60)])
    m.flush()
    assert [a.scope for a in collected.items] == ["user:bob", "user:bob"]
    assert collected.items[1].time - collected.items[0].time > guard.settings.alerts.cooldown_seconds


def _collecting(settings: AlertSettings, ledger: Any) -> tuple[AlertManager, list[Alert]]:
    m = AlertManager(settings, ledger)
    got: list[Alert] = []
    m.dispatcher.submit = lambda a, c: got.append(a)  # type: ignore[method-assign]
    return m, got


def test_processes_sharing_a_ledger_page_once_per_incident(tmp_path: Any) -> None:
    """Two processes (two managers, two handles on one SQLite file) each carry half of bob's calls: both see the
    incident, one pages; a new incident after the cooldown pages once again; the marker holds nothing."""
    from tokenbudget.ledger.sqlite import SQLiteLedger

    path = tmp_path / "shared.db"
    ledgers = [SQLiteLedger(path), SQLiteLedger(path)]
    pairs = [_collecting(AlertSettings(), led) for led in ledgers]

    def incident(t0: float) -> None:  # $2 every 10 s, alternating: $30 per 5 min in each process's view
        for i in range(60):
            pairs[i % 2][0].on_event(event(t0 + 10 * i, "bob", "data", 2_000_000))

    incident(START)
    assert sorted(len(got) for _, got in pairs) == [0, 1]  # each process alone would have paged: see below
    incident(START + 2 * 3600)  # after the cooldown (3600 s) and a quiet spell
    assert sum(len(got) for _, got in pairs) == 2
    assert all(a.scope == "user:bob" for _, got in pairs for a in got)
    assert ledgers[0].active_reservations(now=START + 3 * 3600) == []
    for led in ledgers:
        led.close()

    alone, got = _collecting(AlertSettings(), MemoryLedger())  # the control: one process, half the calls
    for i in range(0, 60, 2):
        alone.on_event(event(START + 10 * i, "bob", "data", 2_000_000))
    assert len(got) == 1


def test_racing_spike_claims_are_won_by_exactly_one(tmp_path: Any) -> None:
    """The claim is a compare-and-set in the ledger: eight threads, each with its own handle on one file, claim
    the same principal at the same instant; one wins, and after the cooldown one wins again."""
    from tokenbudget.ledger.sqlite import SQLiteLedger

    path = tmp_path / "race.db"
    managers = [AlertManager(AlertSettings(), SQLiteLedger(path)) for _ in range(8)]

    def claim(m: AlertManager, at: float, gate: threading.Barrier, won: list[bool]) -> None:
        gate.wait()
        won.append(m._claim_spike("user:eve", at))

    for now in (START, START + 3601):
        gate = threading.Barrier(len(managers))
        won: list[bool] = []
        threads = [threading.Thread(target=claim, args=(m, now, gate, won)) for m in managers]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(won) == [False] * 7 + [True]
    assert managers[0]._claim_spike("user:eve", START + 3601 + 3599) is False  # still within that cooldown
    assert managers[0]._claim_spike("user:ann", START + 3602) is True  # another principal is its own
    for m in managers:
        m.ledger.close()


def test_cooldown_setting_is_honoured() -> None:
    settings = AlertSettings(cooldown_seconds=0)
    m = AlertManager(settings, MemoryLedger())
    got: list[Alert] = []
    m.dispatcher.submit = lambda a, c: got.append(a)  # type: ignore[method-assign]
    for i in range(3):
        m.on_event(event(START + i, "eve", "x", 25_000_000))
    assert len(got) >= 2  # no cooldown: every reading above the trigger alerts


# -- the spike window's running sum ------------------------------------------------------------------------------


def _slow_window_sum(series: alerts_mod._Series, t: float, window: float) -> int:
    slot = int(t // (window / alerts_mod.SLOTS_PER_WINDOW))
    return sum(
        m for s, m in zip(series._slot_ids, series._slot_micros, strict=True)
        if slot - alerts_mod.SLOTS_PER_WINDOW < s <= slot
    )


@pytest.mark.parametrize("seed", range(6))
def test_the_running_window_sum_matches_a_full_recount(seed: int) -> None:
    """The spike check reads a running sum kept as slots fill and fall out; after every call it must equal a recount
    of the slots, through bursts, gaps shorter and longer than the window, late events and a history merge."""
    rng = random.Random(seed)
    window = 300.0
    series = alerts_mod._Series(capacity=48)
    t = START
    for n in range(3000):
        t += rng.choice([0.0, 0.5, 3.0, 29.0, 31.0, 61.0, 299.0, 301.0, 900.0])
        late = rng.random() < 0.05
        used = series.add(t - 50.0 if late else t, rng.randrange(0, 5000), window, 10)
        assert series.window_micros(used, window) == _slow_window_sum(series, used, window), n
        if n == 1500:  # a history rebuilt from the ledger is merged in front of the live series
            older = alerts_mod._Series(capacity=48)
            for k in range(40):
                older.add(t - 250.0 + k * 5.0, 700, window, 10)
            series.merge_history(older)
            assert series.window_micros(used, window) == _slow_window_sum(series, used, window)
