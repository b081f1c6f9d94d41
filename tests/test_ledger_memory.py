"""The in-process ledger against the shared contract."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import pytest

from ledger_contract import T0, LedgerContract, _ev, ledger_machine_test
from tokenbudget.ledger import Allowance, Ledger, MemoryLedger, Reservation


class TestMemoryLedger(LedgerContract):
    @pytest.fixture
    def make_ledger(self) -> Callable[[], Ledger]:
        return MemoryLedger


def _make(stack: ExitStack) -> Ledger:
    led = MemoryLedger()
    stack.callback(led.close)
    return led


TestMemoryLedgerMachine = ledger_machine_test(_make, max_examples=60, steps=50)


# -- forgetting settled ids ------------------------------------------------------------------------------------------
def _pair(led: MemoryLedger, a: Allowance, now: float, *, lease: float = 10, cost: int = 7) -> Reservation:
    r = led.reserve([a], 10, 1, lease_seconds=lease, now=now)
    assert isinstance(r, Reservation)
    assert led.settle(r, cost, 1, _ev(int(now), now, cost, r.keys), now=now) is True
    return r


def test_settled_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="settled_ttl"):
        MemoryLedger(settled_ttl=-1)


def test_settled_ids_past_the_ttl_are_forgotten_and_recent_ones_refuse_a_repeat() -> None:
    led = MemoryLedger(settled_ttl=100)
    a = Allowance("k", "s", limit_micros=10**9)
    old = [_pair(led, a, T0) for _ in range(10)]
    late = led.reserve([a], 10, 1, lease_seconds=10, now=T0)
    assert isinstance(late, Reservation)
    assert led.settle(late, 7, 1, None, now=T0 + 50) is True  # after its lease: remembered until T0 + 150
    recent = _pair(led, a, T0 + 120)  # forgets what was done before T0 + 20
    assert led._settled == {late.id, recent.id} and not {r.id for r in old} & led._settled
    spent = led.balance(a, now=T0 + 120).spent_micros
    assert led.settle(late, 7, 1, None, now=T0 + 120) is False
    assert led.settle(recent, 7, 1, None, now=T0 + 149) is False
    assert led.balance(a, now=T0 + 149).spent_micros == spent == 7 * 12


def test_a_long_lease_is_remembered_past_its_settle_plus_ttl() -> None:
    """As the Redis marker (TTL: the rest of the lease plus ``settled_ttl``): forgotten only once both are past."""
    led = MemoryLedger(settled_ttl=10)
    a = Allowance("k", "s", limit_micros=10**9)
    r = led.reserve([a], 10, 1, lease_seconds=100, now=T0)
    assert isinstance(r, Reservation)
    assert led.settle(r, 7, 1, None, now=T0 + 1) is True
    _pair(led, a, T0 + 50)  # past settle + ttl, within the lease
    assert led.settle(r, 7, 1, None, now=T0 + 105) is False
    _pair(led, a, T0 + 111)
    assert r.id not in led._settled


def test_forgetting_changes_no_balance_no_hold_and_no_event() -> None:
    """The same calls on a ledger that forgets and on one that cannot end identical; a hold (not a settled id) is
    never dropped by it, however old."""
    forgetting, keeping = MemoryLedger(settled_ttl=5), MemoryLedger(settled_ttl=10**9)
    a = Allowance("k", "s", limit_micros=10**9, limit_tokens=10**6)
    b = Allowance("w", "ws", limit_micros=10**9, enforce=False)
    for led in (forgetting, keeping):
        assert isinstance(led.reserve([a], 500, 5, lease_seconds=10**6, now=T0), Reservation)
        for i in range(300):
            now = T0 + i
            r = led.reserve([a, b], 10, 2, lease_seconds=3, now=now)
            assert isinstance(r, Reservation)
            if i % 7:  # every 7th holder dies: its hold expires
                led.settle_and_read(r, i % 11, 1, _ev(i, now, i % 11, r.keys), now=now, allowances=[a, b])
    assert len(forgetting._settled) < 10 < len(keeping._settled)
    now = T0 + 300
    assert forgetting.accounts() == keeping.accounts()
    assert [forgetting.balance(x, now=now) for x in (a, b)] == [keeping.balance(x, now=now) for x in (a, b)]
    assert forgetting.balance(a, now=now).reserved_micros == 500
    assert list(forgetting.events()) == list(keeping.events())


def test_memory_stays_bounded_over_many_calls() -> None:
    led = MemoryLedger(settled_ttl=10)
    a = Allowance("k", "s", limit_micros=10**12)
    most = 0
    for i in range(5000):
        _pair(led, a, T0 + i, lease=5)
        most = max(most, len(led._settled), len(led._forget))
    assert most <= 5 + 10, most  # the lease plus the ttl, a call a second
    assert led.balance(a, now=T0 + 5000).spent_micros == 7 * 5000
    assert len(list(led.events())) == 5000
