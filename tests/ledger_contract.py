"""The contract every :class:`~tokenbudget.ledger.base.Ledger` must keep, as a reusable test suite.

A backend's test module subclasses :class:`LedgerContract` and provides a ``make_ledger`` fixture returning a
zero-argument factory; it may also build a stateful test with :func:`ledger_machine_test`. Everything here passes
``now=`` explicitly and never sleeps, so any store (memory, SQLite, Redis) can run it quickly and deterministically.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time
import unittest
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as tally
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tokenbudget.events import CallEvent
from tokenbudget.ledger import Allowance, Grant, Ledger, Refusal, Reservation

__all__ = ["T0", "LedgerContract", "LedgerMachine", "full_event", "ledger_machine_test"]

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
LEASE = 60.0


def _ev(n: int, time: float, cost: int = 0, keys: tuple[str, ...] = (), **kw: Any) -> CallEvent:
    return CallEvent(id=f"e{n}", time=time, provider="openai", model="gpt-4o-mini", cost_micros=cost, budget_keys=keys,
                     **kw)  # fmt: skip


def full_event(n: int = 1, time: float = T0 + 0.123456789) -> CallEvent:
    """An event with every field set away from its default, so a lossy store cannot pass by accident."""
    return CallEvent(
        id=f"evt-{n}-\u00e9",
        time=time,
        provider="anthropic",
        model="claude-haiku-4-5",
        operation="messages.stream",
        status="partial",
        decision="downgrade",
        original_model="claude-opus-4-1",
        org="acme",
        team="ml \u2713",
        user="ana@example.com",
        tags={"feature": "search", "\u00fcn\u00efc\u00f8de": "\u6f22\u5b57 \U0001f600", "empty": "", "q": 'a"b\\c'},
        function="app.pipeline.summarise",
        run_id="run-42",
        input_tokens=1234,
        output_tokens=567,
        cache_read_tokens=89,
        cache_write_tokens=10,
        cache_write_1h_tokens=11,
        reasoning_tokens=12,
        cost_micros=9_007_199_254_740_993,  # above 2**53: must not pass through a float
        estimated_micros=13_579,
        original_estimated_micros=24_680,
        budget_keys=("org:acme:2026-01", "team:ml:2026-01-01"),
        duration_s=1.2345678901234,
    )


class LedgerContract:
    """Semantics of the Ledger ABC; subclasses supply ``make_ledger`` (a fixture returning a factory)."""

    @pytest.fixture
    def make_ledger(self) -> Callable[[], Ledger]:
        raise NotImplementedError("subclasses provide a make_ledger fixture returning a Ledger factory")

    @pytest.fixture
    def ledger(self, make_ledger: Callable[[], Ledger]) -> Iterator[Ledger]:
        led = make_ledger()
        try:
            yield led
        finally:
            led.close()

    # -- reserve ---------------------------------------------------------------------------------------------------
    def test_reserve_fits_and_holds(self, ledger: Ledger) -> None:
        a = Allowance("team:ml:2026-01-01", "team:ml", limit_micros=1000, window_end=T0 + 86400)
        r = ledger.reserve([a], 600, 50, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        assert (r.keys, r.micros, r.tokens, r.expires_at) == ((a.key,), 600, 50, T0 + LEASE)
        bal = ledger.balance(a, now=T0)
        assert (bal.key, bal.scope, bal.limit_micros, bal.limit_tokens) == (a.key, a.scope, 1000, None)
        assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (0, 600, 0, 50)
        assert bal.remaining_micros == 400 and bal.remaining_tokens is None
        assert ledger.active_reservations(now=T0) == [r]

    def test_reservation_ids_are_unique(self, ledger: Ledger) -> None:
        a = Allowance("k", "s")
        ids = set()
        for _ in range(50):
            r = ledger.reserve([a], 1, 1, lease_seconds=LEASE, now=T0)
            assert isinstance(r, Reservation)
            ids.add(r.id)
        assert len(ids) == 50

    def test_refuses_over_limit_and_fits_exactly_at_it(self, ledger: Ledger) -> None:
        a = Allowance("k", "s", limit_micros=1000)
        assert isinstance(ledger.reserve([a], 600, 0, lease_seconds=LEASE, now=T0), Reservation)
        refusal = ledger.reserve([a], 401, 7, lease_seconds=LEASE, now=T0)
        assert isinstance(refusal, Refusal)
        assert refusal.allowance == a
        assert (refusal.requested_micros, refusal.requested_tokens) == (401, 7)
        assert (refusal.balance.limit_micros, refusal.balance.reserved_micros, refusal.balance.spent_micros) == (
            1000, 600, 0,
        )  # fmt: skip
        assert isinstance(ledger.reserve([a], 400, 0, lease_seconds=LEASE, now=T0), Reservation)
        assert isinstance(ledger.reserve([a], 1, 0, lease_seconds=LEASE, now=T0), Refusal)
        assert ledger.balance(a, now=T0).reserved_micros == 1000

    def test_all_or_none_when_the_last_allowance_refuses(self, ledger: Ledger) -> None:
        a = Allowance("org:2026-01", "org", limit_micros=10_000)
        b = Allowance("team:2026-01-01", "team", limit_micros=10_000, limit_tokens=10_000)
        c = Allowance("user:2026-01-01", "user", limit_micros=100)
        refusal = ledger.reserve([a, b, c], 500, 5, lease_seconds=LEASE, now=T0)
        assert isinstance(refusal, Refusal) and refusal.allowance == c
        for x in (a, b, c):
            bal = ledger.balance(x, now=T0)
            assert (bal.reserved_micros, bal.reserved_tokens, bal.spent_micros) == (0, 0, 0), x
        assert ledger.active_reservations(now=T0) == []
        r = ledger.reserve([a, b], 500, 5, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation) and r.keys == (a.key, b.key)
        assert ledger.balance(a, now=T0).reserved_micros == ledger.balance(b, now=T0).reserved_micros == 500
        assert ledger.balance(c, now=T0).reserved_micros == 0

    def test_refusal_names_the_first_allowance_that_says_no(self, ledger: Ledger) -> None:
        a = Allowance("a", "a", limit_micros=100)
        b = Allowance("b", "b", limit_micros=100)
        refusal = ledger.reserve([a, b], 101, 0, lease_seconds=LEASE, now=T0)
        assert isinstance(refusal, Refusal) and refusal.allowance == a

    def test_unenforced_allowance_is_counted_but_never_refuses(self, ledger: Ledger) -> None:
        warn = Allowance("w", "w", limit_micros=100, limit_tokens=10, enforce=False)
        hard = Allowance("h", "h", limit_micros=1000)
        r = ledger.reserve([warn, hard], 500, 50, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        bal = ledger.balance(warn, now=T0)
        assert (bal.reserved_micros, bal.reserved_tokens) == (500, 50)
        assert bal.remaining_micros == -400
        assert ledger.settle(r, 700, 70, None, now=T0)
        assert ledger.balance(warn, now=T0).spent_micros == 700
        r2 = ledger.reserve([warn], 10_000, 10_000, lease_seconds=LEASE, now=T0)
        assert isinstance(r2, Reservation)
        refusal = ledger.reserve([warn, hard], 400, 0, lease_seconds=LEASE, now=T0)
        assert isinstance(refusal, Refusal) and refusal.allowance == hard

    def test_token_limits(self, ledger: Ledger) -> None:
        t = Allowance("t", "t", limit_tokens=1000)
        r = ledger.reserve([t], 10**12, 600, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        refusal = ledger.reserve([t], 0, 401, lease_seconds=LEASE, now=T0)
        assert isinstance(refusal, Refusal)
        assert refusal.balance.limit_tokens == 1000 and refusal.balance.remaining_tokens == 400
        assert refusal.balance.limit_micros is None
        assert isinstance(ledger.reserve([t], 0, 400, lease_seconds=LEASE, now=T0), Reservation)
        ledger.settle(r, 0, 550, None, now=T0)
        bal = ledger.balance(t, now=T0)
        assert (bal.spent_tokens, bal.reserved_tokens) == (550, 400)
        assert isinstance(ledger.reserve([t], 0, 50, lease_seconds=LEASE, now=T0), Reservation)
        assert isinstance(ledger.reserve([t], 0, 1, lease_seconds=LEASE, now=T0), Refusal)

    def test_both_limits_must_fit(self, ledger: Ledger) -> None:
        a = Allowance("k", "s", limit_micros=100, limit_tokens=100)
        assert isinstance(ledger.reserve([a], 100, 101, lease_seconds=LEASE, now=T0), Refusal)
        assert isinstance(ledger.reserve([a], 101, 100, lease_seconds=LEASE, now=T0), Refusal)
        assert isinstance(ledger.reserve([a], 100, 100, lease_seconds=LEASE, now=T0), Reservation)

    def test_allowance_without_limits_always_fits(self, ledger: Ledger) -> None:
        a = Allowance("k", "s")
        for _ in range(3):
            assert isinstance(ledger.reserve([a], 10**15, 10**9, lease_seconds=LEASE, now=T0), Reservation)
        assert ledger.balance(a, now=T0).reserved_micros == 3 * 10**15

    def test_new_period_key_starts_empty(self, ledger: Ledger) -> None:
        day1 = Allowance("team:2026-01-01", "team", limit_micros=100)
        day2 = Allowance("team:2026-01-02", "team", limit_micros=100)
        r = ledger.reserve([day1], 100, 0, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        ledger.settle(r, 100, 0, None, now=T0)
        assert isinstance(ledger.reserve([day1], 1, 0, lease_seconds=LEASE, now=T0), Refusal)
        assert isinstance(ledger.reserve([day2], 100, 0, lease_seconds=LEASE, now=T0 + 86400), Reservation)
        assert ledger.spent(day1, now=T0) == 100 and ledger.spent(day2, now=T0) == 0

    # -- settle ----------------------------------------------------------------------------------------------------
    def test_settle_charges_once_and_is_idempotent(self, ledger: Ledger) -> None:
        a = Allowance("a", "a", limit_micros=1000, limit_tokens=1000)
        b = Allowance("b", "b")
        r = ledger.reserve([a, b], 600, 50, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        first = _ev(1, T0 + 1, 450, r.keys)
        assert ledger.settle(r, 450, 40, first, now=T0 + 1) is True
        for x in (a, b):
            bal = ledger.balance(x, now=T0 + 1)
            assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (450, 0, 40, 0)
        assert ledger.settle(r, 450, 40, _ev(2, T0 + 2, 450, r.keys), now=T0 + 2) is False
        assert ledger.commit(r, 999, 9, _ev(3, T0 + 3, 999, r.keys), now=T0 + 3) is False
        assert ledger.release(r, _ev(4, T0 + 4), now=T0 + 4) is False
        bal = ledger.balance(a, now=T0 + 5)
        assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (450, 0, 40, 0)
        assert list(ledger.events()) == [first]
        assert ledger.active_reservations(now=T0 + 5) == []

    def test_settle_and_read_gives_the_balances_right_after_the_settle(self, ledger: Ledger) -> None:
        # Each budget's figures must come out as a separate balance() read would give them: other calls' holds
        # and spend, active grants, and this call's charge, for the allowances asked about and no others.
        a = Allowance("a", "team:a", limit_micros=10_000, limit_tokens=1_000)
        b = Allowance("b", "b", limit_micros=5_000)
        other = Allowance("o", "o", limit_micros=9_000)
        ledger.grant(Grant("g1", "team:a", 700, 70, created_at=T0, expires_at=T0 + 100))
        ledger.grant(Grant("g-old", "team:a", 999, 99, created_at=T0 - 20, expires_at=T0 - 10))
        before = ledger.reserve([a], 300, 30, lease_seconds=LEASE, now=T0)
        assert isinstance(before, Reservation)
        ledger.settle(before, 250, 25, None, now=T0)
        held = ledger.reserve([a, b], 400, 40, lease_seconds=LEASE, now=T0)  # another call, still in flight
        r = ledger.reserve([a, b, other], 600, 60, lease_seconds=LEASE, now=T0)
        assert isinstance(held, Reservation) and isinstance(r, Reservation)
        charged, balances = ledger.settle_and_read(r, 450, 45, _ev(1, T0 + 1, 450, r.keys), now=T0 + 1,
                                                   allowances=[a, b])
        assert charged is True
        assert set(balances) == {"a", "b"}
        for x in (a, b):
            assert balances[x.key] == ledger.balance(x, now=T0 + 1)
        got_a, got_b = balances["a"], balances["b"]
        assert (got_a.spent_micros, got_a.reserved_micros, got_a.spent_tokens, got_a.reserved_tokens) == (
            700, 400, 70, 40)
        assert (got_a.limit_micros, got_a.limit_tokens, got_a.granted_micros) == (10_700, 1_070, 700)
        assert (got_b.spent_micros, got_b.reserved_micros, got_b.remaining_micros) == (450, 400, 4_150)
        again, balances = ledger.settle_and_read(r, 450, 45, None, now=T0 + 2, allowances=[a])
        assert again is False and balances["a"].spent_micros == 700  # idempotent: no second charge
        assert [e.id for e in ledger.events()] == ["e1"]

    def test_nowait_steps_do_what_the_waiting_ones_do_or_nothing(self, ledger: Ledger) -> None:
        # The async guard asks for each step at once first: an answer must be the one the sync step would give, and
        # None must mean nothing happened (the guard then awaits the async step, which must not find it done).
        a = Allowance("a", "team:a", limit_micros=1_000, limit_tokens=100)
        done = 0

        def reserve(micros: int, tokens: int, now: float) -> Reservation | Refusal:
            nonlocal done
            got = ledger.reserve_nowait([a], micros, tokens, lease_seconds=LEASE, now=now)
            if got is None:
                return ledger.reserve([a], micros, tokens, lease_seconds=LEASE, now=now)
            done += 1
            return got

        r1 = reserve(600, 60, T0)
        assert isinstance(r1, Reservation)
        refusal = reserve(401, 1, T0)
        assert isinstance(refusal, Refusal) and refusal.balance.reserved_micros == 600
        settled = ledger.settle_and_read_nowait(r1, 500, 50, _ev(1, T0 + 1, 500, r1.keys), now=T0 + 1,
                                                allowances=[a])
        if settled is None:
            settled = ledger.settle_and_read(r1, 500, 50, _ev(1, T0 + 1, 500, r1.keys), now=T0 + 1, allowances=[a])
        else:
            done += 1
        assert settled == (True, {"a": ledger.balance(a, now=T0 + 1)})
        assert (settled[1]["a"].spent_micros, settled[1]["a"].reserved_micros) == (500, 0)
        again = ledger.settle_and_read_nowait(r1, 500, 50, None, now=T0 + 2, allowances=[a])
        assert again is None or again[0] is False
        read = ledger.balance_nowait(a, now=T0 + 2)
        assert read is None or read == ledger.balance(a, now=T0 + 2)
        assert [e.id for e in ledger.events()] == ["e1"]
        if self.answers_nowait:
            assert done == 3 and read is not None

    answers_nowait: ClassVar[bool] = False
    """Whether this backend answers the ``*_nowait`` steps when nothing else uses it (memory, SQLite)."""

    def test_commit_is_settle(self, ledger: Ledger) -> None:
        a = Allowance("a", "a", limit_micros=1000)
        r = ledger.reserve([a], 600, 0, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        assert ledger.commit(r, 300, 3, now=T0) is True
        assert ledger.balance(a, now=T0).spent_micros == 300
        assert list(ledger.events()) == []

    def test_settle_charges_actual_even_above_the_estimate(self, ledger: Ledger) -> None:
        a = Allowance("a", "a", limit_micros=1000)
        r = ledger.reserve([a], 100, 10, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        assert ledger.settle(r, 1200, 20, None, now=T0)
        bal = ledger.balance(a, now=T0)
        assert (bal.spent_micros, bal.reserved_micros, bal.remaining_micros) == (1200, 0, -200)
        assert isinstance(ledger.reserve([a], 0, 0, lease_seconds=LEASE, now=T0), Refusal)

    def test_release_charges_nothing_and_frees_the_hold(self, ledger: Ledger) -> None:
        a = Allowance("a", "a", limit_micros=1000)
        r = ledger.reserve([a], 1000, 10, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        assert isinstance(ledger.reserve([a], 1, 0, lease_seconds=LEASE, now=T0), Refusal)
        err = _ev(1, T0, 0, r.keys, status="error")
        assert ledger.release(r, err, now=T0) is True
        bal = ledger.balance(a, now=T0)
        assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (0, 0, 0, 0)
        assert ledger.release(r, now=T0) is False
        assert ledger.settle(r, 500, 5, None, now=T0) is False
        assert ledger.balance(a, now=T0).spent_micros == 0
        assert list(ledger.events()) == [err]
        assert isinstance(ledger.reserve([a], 1000, 0, lease_seconds=LEASE, now=T0), Reservation)

    # -- leases ----------------------------------------------------------------------------------------------------
    def test_expired_lease_returns_the_hold_and_a_late_settle_charges_once(self, ledger: Ledger) -> None:
        a = Allowance("a", "a", limit_micros=1000, limit_tokens=100)
        r = ledger.reserve([a], 800, 80, lease_seconds=10, now=T0)
        assert isinstance(r, Reservation) and r.expires_at == T0 + 10
        assert isinstance(ledger.reserve([a], 300, 0, lease_seconds=10, now=T0 + 9.5), Refusal)
        assert ledger.balance(a, now=T0 + 9.5).reserved_micros == 800
        assert [x.id for x in ledger.active_reservations(now=T0 + 9.5)] == [r.id]
        # The lease ends at expires_at exactly.
        bal = ledger.balance(a, now=T0 + 10)
        assert (bal.reserved_micros, bal.reserved_tokens) == (0, 0)
        assert ledger.active_reservations(now=T0 + 10) == []
        r2 = ledger.reserve([a], 300, 20, lease_seconds=10, now=T0 + 10)
        assert isinstance(r2, Reservation)
        # The late settle charges what was spent but must not give back the (already returned) hold again.
        assert ledger.settle(r, 800, 80, _ev(1, T0 + 12, 800, r.keys), now=T0 + 12) is True
        bal = ledger.balance(a, now=T0 + 12)
        assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (800, 300, 80, 20)
        assert ledger.settle(r, 800, 80, _ev(2, T0 + 13, 800, r.keys), now=T0 + 13) is False
        assert ledger.settle(r2, 300, 20, _ev(3, T0 + 14, 300, r2.keys), now=T0 + 14) is True
        bal = ledger.balance(a, now=T0 + 14)
        assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (1100, 0, 100, 0)
        assert [e.id for e in ledger.events()] == ["e1", "e3"]

    def test_expired_hold_is_gone_before_any_other_reserve(self, ledger: Ledger) -> None:
        a = Allowance("a", "a", limit_micros=1000)
        r = ledger.reserve([a], 1000, 0, lease_seconds=5, now=T0)
        assert isinstance(r, Reservation)
        assert ledger.balance(a, now=T0 + 6).reserved_micros == 0
        assert ledger.active_reservations(now=T0 + 6) == []
        assert ledger.settle(r, 700, 0, None, now=T0 + 7) is True
        bal = ledger.balance(a, now=T0 + 7)
        assert (bal.spent_micros, bal.reserved_micros) == (700, 0)

    def test_late_release_after_expiry_charges_nothing(self, ledger: Ledger) -> None:
        a = Allowance("a", "a", limit_micros=1000)
        r = ledger.reserve([a], 900, 9, lease_seconds=5, now=T0)
        assert isinstance(r, Reservation)
        assert isinstance(ledger.reserve([a], 50, 0, lease_seconds=5, now=T0 + 5), Reservation)
        assert ledger.release(r, now=T0 + 8) is True
        bal = ledger.balance(a, now=T0 + 8)
        assert (bal.spent_micros, bal.reserved_micros, bal.reserved_tokens) == (0, 50, 0)  # only the second hold
        assert ledger.release(r, now=T0 + 9) is False

    def test_settle_before_the_sweep_drops_the_hold_once(self, ledger: Ledger) -> None:
        a = Allowance("a", "a", limit_micros=1000)
        r = ledger.reserve([a], 400, 0, lease_seconds=5, now=T0)
        assert isinstance(r, Reservation)
        # Settled after its lease but before anything looked: the hold goes exactly once.
        assert ledger.settle(r, 100, 0, None, now=T0 + 50)
        bal = ledger.balance(a, now=T0 + 60)
        assert (bal.spent_micros, bal.reserved_micros) == (100, 0)
        r2 = ledger.reserve([a], 900, 0, lease_seconds=5, now=T0 + 60)
        assert isinstance(r2, Reservation)
        assert ledger.balance(a, now=T0 + 60).reserved_micros == 900

    # -- grants ----------------------------------------------------------------------------------------------------
    def test_grants_raise_limits_only_while_active_and_only_for_their_scope(self, ledger: Ledger) -> None:
        a = Allowance("team:ml:2026-01-01", "team:ml", limit_micros=1000, limit_tokens=100)
        other = Allowance("team:web:2026-01-01", "team:web", limit_micros=1000)
        unlimited = Allowance("team:ml:total", "team:ml")
        r = ledger.reserve([a], 900, 0, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        ledger.settle(r, 900, 90, None, now=T0)
        assert isinstance(ledger.reserve([a], 200, 0, lease_seconds=LEASE, now=T0), Refusal)
        g = Grant("g1", "team:ml", 500, 50, created_at=T0 + 10, expires_at=T0 + 100, reason="demo", granted_by="ops")
        ledger.grant(g)
        # Not yet active.
        refusal = ledger.reserve([a], 200, 0, lease_seconds=LEASE, now=T0 + 5)
        assert isinstance(refusal, Refusal) and refusal.balance.limit_micros == 1000
        bal = ledger.balance(a, now=T0 + 10)
        assert (bal.limit_micros, bal.limit_tokens, bal.granted_micros, bal.granted_tokens) == (1500, 150, 500, 50)
        ob = ledger.balance(other, now=T0 + 10)
        assert (ob.limit_micros, ob.granted_micros) == (1000, 0)
        ub = ledger.balance(unlimited, now=T0 + 10)
        assert (ub.limit_micros, ub.limit_tokens, ub.granted_micros) == (None, None, 500)
        r2 = ledger.reserve([a], 200, 10, lease_seconds=LEASE, now=T0 + 10)
        assert isinstance(r2, Reservation)
        ledger.settle(r2, 200, 10, None, now=T0 + 10)
        refusal = ledger.reserve([a], 401, 0, lease_seconds=LEASE, now=T0 + 20)
        assert isinstance(refusal, Refusal)
        assert (refusal.balance.limit_micros, refusal.balance.granted_micros) == (1500, 500)
        # Expired at expires_at exactly.
        bal = ledger.balance(a, now=T0 + 100)
        assert (bal.limit_micros, bal.granted_micros, bal.spent_micros) == (1000, 0, 1100)
        assert isinstance(ledger.reserve([a], 0, 0, lease_seconds=LEASE, now=T0 + 100), Refusal)

    def test_grants_add_up_and_can_be_permanent(self, ledger: Ledger) -> None:
        a = Allowance("k", "s", limit_micros=100)
        ledger.grant(Grant("g1", "s", 50, 0, created_at=T0, expires_at=None))
        ledger.grant(Grant("g2", "s", 25, 0, created_at=T0, expires_at=T0 + 10))
        assert ledger.balance(a, now=T0 + 1).limit_micros == 175
        assert ledger.balance(a, now=T0 + 10**6).limit_micros == 150

    def test_grants_listing(self, ledger: Ledger) -> None:
        g1 = Grant("g1", "s", 50, 5, created_at=T0, expires_at=T0 + 10, reason="launch day", granted_by="ana")
        g2 = Grant("g2", "t", 70, 0, created_at=T0 + 5, expires_at=None)
        g3 = Grant("g3", "s", 1, 1, created_at=T0 + 20, expires_at=T0 + 30)
        for g in (g1, g2, g3):
            ledger.grant(g)
        assert sorted(ledger.grants(), key=lambda g: g.id) == [g1, g2, g3]
        assert sorted(g.id for g in ledger.grants(now=T0)) == ["g1"]
        assert sorted(g.id for g in ledger.grants(now=T0 + 5)) == ["g1", "g2"]
        assert sorted(g.id for g in ledger.grants(now=T0 + 10)) == ["g2"]
        assert sorted(g.id for g in ledger.grants(now=T0 + 25)) == ["g2", "g3"]

    # -- balance and reservations ----------------------------------------------------------------------------------
    def test_balance_of_an_unseen_key(self, ledger: Ledger) -> None:
        a = Allowance("never", "nobody", limit_micros=5, limit_tokens=6)
        bal = ledger.balance(a, now=T0)
        assert (bal.key, bal.scope, bal.limit_micros, bal.limit_tokens) == ("never", "nobody", 5, 6)
        assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (0, 0, 0, 0)
        assert (bal.granted_micros, bal.granted_tokens) == (0, 0)
        assert ledger.spent(a, now=T0) == 0

    def test_active_reservations(self, ledger: Ledger) -> None:
        a = Allowance("a", "a")
        b = Allowance("b", "b")
        r1 = ledger.reserve([a], 1, 1, lease_seconds=10, now=T0)
        r2 = ledger.reserve([a, b], 2, 2, lease_seconds=100, now=T0)
        r3 = ledger.reserve([b], 3, 3, lease_seconds=100, now=T0)
        r4 = ledger.reserve([b], 4, 4, lease_seconds=100, now=T0)
        assert all(isinstance(r, Reservation) for r in (r1, r2, r3, r4))
        assert sorted(ledger.active_reservations(now=T0), key=lambda r: r.micros) == [r1, r2, r3, r4]
        assert isinstance(r2, Reservation) and isinstance(r3, Reservation)
        ledger.settle(r2, 2, 2, None, now=T0)
        ledger.release(r3, now=T0)
        assert sorted(ledger.active_reservations(now=T0), key=lambda r: r.micros) == [r1, r4]  # any order
        assert ledger.active_reservations(now=T0 + 10) == [r4]
        assert ledger.active_reservations(now=T0 + 100) == []
        assert ledger.balance(b, now=T0 + 100).reserved_micros == 0

    def test_accounts_lists_spend_and_holds_per_key(self, ledger: Ledger) -> None:
        a = Allowance("team:ml:2026-01-01", "team:ml", limit_micros=1000)
        b = Allowance("org:2026-01", "org", limit_micros=10_000)
        r = ledger.reserve([a, b], 300, 3, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        ledger.settle(r, 200, 2, None, now=T0)
        assert isinstance(ledger.reserve([a], 100, 1, lease_seconds=LEASE, now=T0), Reservation)
        try:
            listed = ledger.accounts()
        except NotImplementedError:
            pytest.skip(f"{type(ledger).__name__} does not list accounts")
        accounts = {x.key: x for x in listed}
        assert set(accounts) == {a.key, b.key}
        got = accounts[a.key]
        assert (got.scope, got.spent_micros, got.reserved_micros, got.spent_tokens, got.reserved_tokens) == (
            "team:ml", 200, 100, 2, 1,
        )  # fmt: skip
        assert (accounts[b.key].spent_micros, accounts[b.key].reserved_micros) == (200, 0)

    # -- events ----------------------------------------------------------------------------------------------------
    def test_events_in_time_order_with_since_and_until(self, ledger: Ledger) -> None:
        a = Allowance("a", "a")
        r = ledger.reserve([a], 10, 0, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        ledger.record(_ev(5, T0 + 5))
        ledger.record(_ev(1, T0 + 1))
        ledger.settle(r, 10, 0, _ev(3, T0 + 3, 10, r.keys), now=T0 + 3)
        ledger.record(_ev(2, T0 + 2, status="denied", decision="deny"))
        ledger.record(_ev(4, T0 + 3))  # same time as e3
        ledger.record(_ev(0, T0 - 100))
        times = [e.time for e in ledger.events()]
        assert times == sorted(times) and len(times) == 6
        assert [e.id for e in ledger.events()][:3] == ["e0", "e1", "e2"]
        assert [e.id for e in ledger.events()][-1] == "e5"
        assert [e.id for e in ledger.events(since=T0 + 2, until=T0 + 3)] == ["e2"]  # since inclusive, until not
        assert sorted(e.id for e in ledger.events(since=T0 + 3)) == ["e3", "e4", "e5"]
        assert [e.id for e in ledger.events(until=T0 + 1)] == ["e0"]
        assert list(ledger.events(since=T0 + 6)) == []
        assert list(ledger.events(since=T0 + 3, until=T0 + 3)) == []

    def test_events_is_an_iterator(self, ledger: Ledger) -> None:
        for i in range(3):
            ledger.record(_ev(i, T0 + i))
        it = ledger.events()
        assert next(it).id == "e0"
        assert [e.id for e in it] == ["e1", "e2"]

    def test_many_events_stream_in_order(self, ledger: Ledger) -> None:
        n = 1500  # more than one page for stores that stream in pages
        for i in range(n):
            ledger.record(_ev(i, T0 + (i * 7919 % n)))
        times = [e.time for e in ledger.events()]
        assert times == sorted(times) and len(times) == n
        assert len(list(ledger.events(since=T0 + 100, until=T0 + 1100))) == 1000

    def test_call_event_round_trips_every_field(self, ledger: Ledger) -> None:
        ev = full_event(1)
        default = CallEvent(id="", time=0.0, provider="", model="")
        for f in dataclasses.fields(CallEvent):
            assert getattr(ev, f.name) != getattr(default, f.name), f"full_event() leaves {f.name} at its default"
        a = Allowance("k", "s")
        r = ledger.reserve([a], 1, 1, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        settled = full_event(2, time=T0 + 1)
        ledger.settle(r, 1, 1, settled, now=T0 + 1)
        ledger.record(ev)
        sparse = CallEvent(id="sparse", time=T0 + 2, provider="openai", model="gpt-4o")
        ledger.record(sparse)
        got = list(ledger.events())
        assert got == [ev, settled, sparse]
        assert isinstance(got[0].budget_keys, tuple) and isinstance(got[0].tags, dict)
        assert type(got[0].cost_micros) is int and type(got[0].time) is float

    # -- async ------------------------------------------------------------------------------------------------------
    async def test_async_reserve_and_settle(self, ledger: Ledger) -> None:
        a = Allowance("a", "a", limit_micros=100)
        r = await ledger.areserve([a], 100, 1, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        assert isinstance(await ledger.areserve([a], 1, 1, lease_seconds=LEASE, now=T0), Refusal)
        assert await ledger.asettle(r, 40, 1, None, now=T0) is True
        assert await ledger.asettle(r, 40, 1, None, now=T0) is False
        assert ledger.spent(a, now=T0) == 40

    async def test_async_settle_and_read(self, ledger: Ledger) -> None:
        a = Allowance("a", "a", limit_micros=100)
        r = await ledger.areserve([a], 100, 1, lease_seconds=LEASE, now=T0)
        assert isinstance(r, Reservation)
        charged, balances = await ledger.asettle_and_read(r, 40, 1, None, now=T0, allowances=[a])
        assert charged is True and balances == {"a": ledger.balance(a, now=T0)}
        assert (balances["a"].spent_micros, balances["a"].reserved_micros) == (40, 0)
        charged, balances = await ledger.asettle_and_read(r, 40, 1, None, now=T0, allowances=[a])
        assert charged is False and balances["a"].spent_micros == 40


# -- stateful ---------------------------------------------------------------------------------------------------------

_SCOPES: dict[str, dict[str, Any]] = {
    "m": {"limit_micros": 1000},  # money
    "t": {"limit_tokens": 100},  # tokens
    "b": {"limit_micros": 1500, "limit_tokens": 150},  # both
    "w": {"limit_micros": 300, "limit_tokens": 30, "enforce": False},  # warn: counted, never refuses
    "u": {},  # no limit at all
}


@dataclasses.dataclass
class _Held:
    res: Reservation
    ended: bool = False


class LedgerMachine(RuleBasedStateMachine):
    """Random reserve/settle/release/expiry/rollover against a ledger, checked against an exact model after each step.

    Subclasses set :attr:`factory` (see :func:`ledger_machine_test`). The model is deliberately naive: holds are a
    list, expiry is ``expires_at <= now``, and totals are recomputed from scratch.
    """

    factory: ClassVar[Callable[[ExitStack], Ledger]]

    def __init__(self) -> None:
        super().__init__()
        self.stack = ExitStack()
        self.ledger = type(self).factory(self.stack)
        self.now = T0
        self.period = 0
        self.seen: dict[str, Allowance] = {}
        self.holds: list[_Held] = []
        self.spent: Counter[str] = Counter()
        self.spent_tokens: Counter[str] = Counter()
        self.late: Counter[str] = Counter()  # charged by settles that came after their lease: may exceed limits
        self.late_tokens: Counter[str] = Counter()
        self.n = 0

    def teardown(self) -> None:
        self.stack.close()

    def _allowance(self, scope: str) -> Allowance:
        a = Allowance(f"{scope}:p{self.period}", scope, **_SCOPES[scope])
        self.seen[a.key] = a
        return a

    def _held_now(self, key: str) -> tuple[int, int]:
        m = t = 0
        for h in self.holds:
            if not h.ended and h.res.expires_at > self.now:
                n = h.res.keys.count(key)
                m += n * h.res.micros
                t += n * h.res.tokens
        return m, t

    @initialize()
    def start(self) -> None:
        for scope in _SCOPES:
            self._allowance(scope)

    @rule(
        scopes=st.lists(st.sampled_from(sorted(_SCOPES)), min_size=1, max_size=len(_SCOPES), unique=True),
        micros=st.integers(0, 700),
        tokens=st.integers(0, 70),
        lease=st.sampled_from([1.0, 2.5, 5.0, 30.0]),
    )
    def reserve(self, scopes: list[str], micros: int, tokens: int, lease: float) -> None:
        allowances = [self._allowance(s) for s in scopes]
        expected: Allowance | None = None
        for a in allowances:
            if not a.enforce:
                continue
            held_m, held_t = self._held_now(a.key)
            over_m = a.limit_micros is not None and self.spent[a.key] + held_m + micros > a.limit_micros
            over_t = a.limit_tokens is not None and self.spent_tokens[a.key] + held_t + tokens > a.limit_tokens
            if over_m or over_t:
                expected = a
                break
        got = self.ledger.reserve(allowances, micros, tokens, lease_seconds=lease, now=self.now)
        if expected is not None:
            tally(f"refused by {expected.scope}")
            assert isinstance(got, Refusal), f"expected a refusal by {expected.key}, got {got}"
            assert got.allowance == expected
            assert got.balance.spent_micros == self.spent[expected.key]
            assert got.balance.reserved_micros == self._held_now(expected.key)[0]
        else:
            assert isinstance(got, Reservation), f"expected a reservation, got {got}"
            assert got.keys == tuple(a.key for a in allowances)
            assert (got.micros, got.tokens, got.expires_at) == (micros, tokens, self.now + lease)
            self.holds.append(_Held(got))

    def _end(self, h: _Held, micros: int, tokens: int, event: CallEvent | None) -> None:
        late = h.res.expires_at <= self.now
        first = not h.ended
        tally("settle again" if not first else "late settle" if late else "settle in time")
        assert self.ledger.settle(h.res, micros, tokens, event, now=self.now) is first
        if first:
            h.ended = True
            for key in h.res.keys:
                self.spent[key] += micros
                self.spent_tokens[key] += tokens
                if late:
                    self.late[key] += micros
                    self.late_tokens[key] += tokens

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data(), with_event=st.booleans())
    def settle(self, data: st.DataObject, with_event: bool) -> None:
        h = data.draw(st.sampled_from(self.holds))
        micros = data.draw(st.integers(0, h.res.micros))
        tokens = data.draw(st.integers(0, h.res.tokens))
        self.n += 1
        event = (
            CallEvent(
                id=f"s{self.n}",
                time=self.now,
                provider="p",
                model="m",
                cost_micros=micros,
                input_tokens=tokens,
                budget_keys=h.res.keys,
            )
            if with_event
            else None
        )
        if event is None and not h.ended and micros + tokens:
            # Every charge must be visible in the events, or the totals check below would be meaningless.
            event = CallEvent(
                id=f"s{self.n}",
                time=self.now,
                provider="p",
                model="m",
                cost_micros=micros,
                input_tokens=tokens,
                budget_keys=h.res.keys,
            )
        self._end(h, micros, tokens, event)

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(self.holds))
        self._end(h, 0, 0, None)

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 2.5, 5.0, 40.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def rollover(self) -> None:
        self.period += 1

    @rule()
    def record_denied(self) -> None:
        self.n += 1
        self.ledger.record(CallEvent(id=f"d{self.n}", time=self.now, provider="p", model="m", status="denied",
                                     decision="deny"))  # fmt: skip

    @invariant()
    def balances_match_the_model(self) -> None:
        for key, a in self.seen.items():
            bal = self.ledger.balance(a, now=self.now)
            held_m, held_t = self._held_now(key)
            assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (
                self.spent[key], held_m, self.spent_tokens[key], held_t,
            ), key  # fmt: skip
            if a.enforce and a.limit_micros is not None:
                assert bal.spent_micros - self.late[key] + bal.reserved_micros <= a.limit_micros, key
            if a.enforce and a.limit_tokens is not None:
                assert bal.spent_tokens - self.late_tokens[key] + bal.reserved_tokens <= a.limit_tokens, key

    @invariant()
    def holds_match_the_model(self) -> None:
        want = sorted(h.res.id for h in self.holds if not h.ended and h.res.expires_at > self.now)
        assert sorted(r.id for r in self.ledger.active_reservations(now=self.now)) == want

    @invariant()
    def totals_equal_the_recorded_events(self) -> None:
        by_key: Counter[str] = Counter()
        tokens_by_key: Counter[str] = Counter()
        last = float("-inf")
        for e in self.ledger.events():
            assert e.time >= last
            last = e.time
            for key in e.budget_keys:
                by_key[key] += e.cost_micros
                tokens_by_key[key] += e.input_tokens
        for key in self.seen:
            assert by_key[key] == self.spent[key], key
            assert tokens_by_key[key] == self.spent_tokens[key], key


def ledger_machine_test(
    factory: Callable[[ExitStack], Ledger], *, max_examples: int = 25, steps: int = 30
) -> type[unittest.TestCase]:
    """A unittest ``TestCase`` running :class:`LedgerMachine` on ledgers from ``factory``.

    ``factory`` receives an :class:`ExitStack` for cleanup (temp dirs, connections, flushing a Redis db).
    """

    machine = type("BoundLedgerMachine", (LedgerMachine,), {"factory": staticmethod(factory)})
    case: type[unittest.TestCase] = machine.TestCase  # type: ignore[attr-defined]
    case.settings = settings(  # type: ignore[attr-defined]
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    return case


def contend(led: Ledger, allowance: Allowance, amount: int, threads: int, attempts: int, barrier: Any,
            out: Any) -> None:  # fmt: skip
    """Body of a child process: ``threads`` threads each try ``attempts`` reserve+settle pairs on one allowance.

    Puts ``([ok, refused, over-limit observations], errors)`` on ``out`` and closes ``led``. Shared by the SQLite and
    Redis many-process tests, so both ledgers are raced the same way.
    """
    limit = allowance.limit_micros
    assert limit is not None
    totals = [0, 0, 0]
    lock = threading.Lock()
    errors: list[str] = []
    start = threading.Barrier(threads)

    def run(t: int) -> None:
        ok = refused = over = 0
        try:
            start.wait()
            for i in range(attempts):
                now = time.time()
                r = led.reserve([allowance], amount, 1, lease_seconds=600, now=now)
                if isinstance(r, Refusal):
                    refused += 1
                    continue
                ok += 1
                bal = led.balance(allowance, now=now)
                if bal.spent_micros + bal.reserved_micros > limit:
                    over += 1
                ev = CallEvent(id=f"{os.getpid()}-{t}-{i}", time=now, provider="p", model="m", cost_micros=amount,
                               budget_keys=r.keys)  # fmt: skip
                assert led.settle(r, amount, 1, ev, now=now) is True
                assert led.settle(r, amount, 1, ev, now=now) is False
        except BaseException as exc:
            errors.append(repr(exc))
        with lock:
            totals[0] += ok
            totals[1] += refused
            totals[2] += over

    barrier.wait(120)
    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    led.close()
    out.put((totals, errors))


_SPAWN = multiprocessing.get_context("spawn")


def run_children(target: Callable[..., None], n: int, args: tuple[Any, ...]) -> list[Any]:
    """Start ``n`` spawned processes running ``target(*args, barrier, out)``; their reports, once all exited 0."""
    barrier = _SPAWN.Barrier(n)
    out = _SPAWN.Queue()
    procs = [_SPAWN.Process(target=target, args=(*args, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():  # pragma: no cover - only on failure
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return results


def assert_account_exact(led: Ledger, a: Allowance, *, now: float) -> None:
    """Spend equals the recorded events, to the micro-dollar, and no hold is left that is not an active one."""
    bal = led.balance(a, now=now)
    assert bal.spent_micros == sum(e.cost_micros for e in led.events() if a.key in e.budget_keys)
    assert bal.reserved_micros == sum(r.micros for r in led.active_reservations(now=now) if a.key in r.keys)


def assert_lease_frees_a_dead_holder(led: Ledger, a: Allowance, held: Reservation, limit: int) -> None:
    """A killed process held the whole budget with a 30 s lease from T0: refused until the lease ends, free after."""
    refusal = led.reserve([a], 1, 0, lease_seconds=30, now=T0 + 29.9)
    assert isinstance(refusal, Refusal) and refusal.balance.reserved_micros == limit
    assert [r.id for r in led.active_reservations(now=T0 + 29.9)] == [held.id]
    assert led.balance(a, now=T0 + 30).reserved_micros == 0
    mine = led.reserve([a], limit, 0, lease_seconds=30, now=T0 + 30)
    assert isinstance(mine, Reservation)
    event = CallEvent(id="e1", time=T0 + 30, provider="openai", model="gpt-4o-mini", cost_micros=limit,
                      budget_keys=mine.keys)  # fmt: skip
    assert led.settle(mine, limit, 0, event, now=T0 + 30)
    bal = led.balance(a, now=T0 + 30)
    assert (bal.spent_micros, bal.reserved_micros) == (limit, 0)
    assert_account_exact(led, a, now=T0 + 30)
