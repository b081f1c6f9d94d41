"""What keeps a long-running ledger from growing with time: ended windows' accounts and the events beyond a cap.

The memory and SQLite ledgers, driven with explicit ``now`` (the Redis ledger expires accounts by the server's own
clock and caps its stream with ``XADD MAXLEN ~``; its tests are in test_ledger_redis.py). Both stores drop only what
a fresh store would also show as empty: an account is dropped only when its window ended more than ``window_grace``
ago and nothing is held on it.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tokenbudget.ledger.sqlite as sqlite_mod
from ledger_contract import T0, _ev
from tokenbudget import ConfigError
from tokenbudget.ledger import Allowance, Ledger, MemoryLedger, Reservation, SQLiteLedger

# Settles after which both stores have looked for what to drop: the SQLite prune runs every _PRUNE_EVERY settles,
# the memory sweep at the first settle a minute (of ledger time) after the last one.
ROUND = sqlite_mod._PRUNE_EVERY


@pytest.fixture(params=["memory", "sqlite"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Ledger]]:
    made: list[Ledger] = []

    def factory(**options: Any) -> Ledger:
        led: Ledger
        led = MemoryLedger(**options) if request.param == "memory" else SQLiteLedger(tmp_path / "r.db", **options)
        made.append(led)
        return led

    yield factory
    for led in made:
        led.close()


def _pairs(led: Ledger, a: Allowance, n: int, now: float, *, start: int = 0) -> None:
    for i in range(start, start + n):
        r = led.reserve([a], 10, 1, lease_seconds=10, now=now)
        assert isinstance(r, Reservation)
        assert led.settle(r, 7, 1, _ev(i, now, 7, r.keys), now=now) is True


def _keys(led: Ledger) -> set[str]:
    return {b.key for b in led.accounts()}


def test_an_ended_windows_account_goes_after_the_grace_once_nothing_is_held(make: Callable[..., Ledger]) -> None:
    led = make(window_grace=100)
    ended = Allowance("team:a@day1", "team:a", limit_micros=10**9, window_end=T0 + 10)
    busy = Allowance("team:b@day1", "team:b", limit_micros=10**9, window_end=T0 + 10)
    total = Allowance("org", "org", limit_micros=10**9)
    today = Allowance("team:a@day9", "team:a", limit_micros=10**9, window_end=T0 + 10**6)
    _pairs(led, ended, 3, T0)
    _pairs(led, total, 1, T0)
    held = led.reserve([busy], 500, 5, lease_seconds=10**6, now=T0)  # a long call still running in that window
    assert isinstance(held, Reservation)

    _pairs(led, today, ROUND, T0 + 100)  # ended 90 s ago: within the grace
    assert _keys(led) == {ended.key, busy.key, total.key, today.key}
    _pairs(led, today, ROUND, T0 + 200)  # 190 s ago: past it
    assert _keys(led) == {busy.key, total.key, today.key}
    assert led.balance(busy, now=T0 + 200).reserved_micros == 500  # the hold kept its account
    assert led.balance(total, now=T0 + 200).spent_micros == 7  # a total budget's account is never dropped

    assert led.settle(held, 300, 3, None, now=T0 + 300) is True
    _pairs(led, today, ROUND, T0 + 400)
    assert _keys(led) == {total.key, today.key}
    assert led.balance(today, now=T0 + 400).spent_micros == 7 * 3 * ROUND


def test_a_zero_grace_drops_an_ended_window_at_the_next_look(make: Callable[..., Ledger]) -> None:
    led = make(window_grace=0)
    hour = Allowance("u@h1", "u", limit_micros=10**9, window_end=T0 + 3600)
    _pairs(led, hour, ROUND, T0 + 3599)
    assert _keys(led) == {hour.key}
    other = Allowance("u@h2", "u", limit_micros=10**9, window_end=T0 + 7200)
    _pairs(led, other, ROUND, T0 + 3660)  # a minute on: the memory ledger looks again
    assert _keys(led) == {other.key}


def test_events_are_capped_at_about_the_newest_maxlen(make: Callable[..., Ledger]) -> None:
    led = make(events_maxlen=100)
    a = Allowance("k", "s", limit_micros=10**12)
    n = 3 * ROUND  # the last settle of each round prunes (SQLite): 100 events are left exactly
    for i in range(n):
        _pairs(led, a, 1, T0 + i, start=i)
    ids = [e.id for e in led.events()]
    assert 100 <= len(ids) <= 100 + 100 // 16, len(ids)
    assert ids == [f"e{i}" for i in range(n - len(ids), n)]  # the newest, in order
    assert led.balance(a, now=T0 + n).spent_micros == 7 * n  # trimming events changes no account


def test_without_a_cap_every_event_is_kept(make: Callable[..., Ledger]) -> None:
    led = make()
    a = Allowance("k", "s", limit_micros=10**12)
    _pairs(led, a, 2 * ROUND, T0)
    assert len(list(led.events())) == 2 * ROUND


def test_a_cap_set_on_a_long_history_catches_up_in_bounded_steps(tmp_path: Path) -> None:
    """A file that kept 6,000 events, reopened with a cap of 500: one prune deletes at most _EVENT_TRIM of them
    (a bounded write transaction), the next reaches the cap."""
    path = tmp_path / "long.db"
    led = SQLiteLedger(path)
    conn = led._checkout()
    conn.execute("BEGIN")
    conn.executemany(sqlite_mod._INSERT_EVENT, (sqlite_mod._event_params(_ev(i, T0 + i)) for i in range(6000)))
    conn.execute("COMMIT")
    led._checkin(conn)
    led.close()

    led = SQLiteLedger(path, events_maxlen=500)
    a = Allowance("k", "s", limit_micros=10**12)
    _pairs(led, a, ROUND, T0 + 10**4, start=10**4)
    assert _count_events(path) == 6000 + ROUND - sqlite_mod._EVENT_TRIM
    _pairs(led, a, ROUND, T0 + 10**4, start=2 * 10**4)
    assert _count_events(path) == 500
    led.close()


def _count_events(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        conn.close()


def test_the_prune_seeks_ranges_of_primary_keys_and_scans_no_table(tmp_path: Path) -> None:
    """Accounts and events are pruned like reservations: by a range of the primary key, never a table scan."""
    path = tmp_path / "plan.db"
    led = SQLiteLedger(path, window_grace=0, events_maxlen=10)
    conn = led._checkout()
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    led._checkin(conn)
    _pairs(led, Allowance("k@1", "k", limit_micros=10**9, window_end=T0), ROUND, T0 + 1)
    pruning = [sql for sql in seen if "FROM accounts WHERE key >" in sql or ("events" in sql and "INSERT" not in sql)]
    assert len(pruning) == 4, pruning  # find the slice's end (or not), delete in it; find min/max seq, delete
    reader = sqlite3.connect(path)
    try:
        for sql in pruning:
            plan = " ".join(str(row[-1]) for row in reader.execute("EXPLAIN QUERY PLAN " + sql))
            assert not re.search(r"SCAN (accounts|events|reservations)", plan), (sql, plan)
    finally:
        reader.close()
    assert _keys(led) == set() and _count_events(path) == 10  # and it did prune
    led.close()


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"window_grace": -1}, "window_grace"),
        ({"window_grace": float("inf")}, "window_grace"),
        ({"window_grace": float("nan")}, "window_grace"),
        ({"window_grace": "7d"}, "window_grace"),
        ({"events_maxlen": 0}, "events_maxlen"),
        ({"events_maxlen": 2.5}, "events_maxlen"),
        ({"events_maxlen": True}, "events_maxlen"),
    ],
)
def test_bad_retention_settings_are_config_errors_naming_the_field(
    make: Callable[..., Ledger], options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: must be") as caught:
        make(**options)
    assert caught.value.key == field
