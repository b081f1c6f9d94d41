"""A ledger in this process's memory: the fastest, and forgotten at exit. One lock makes reserve all-or-none."""

from __future__ import annotations

import bisect
import math
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence

from ..events import CallEvent
from .base import Allowance, Balance, Grant, Ledger, Refusal, Reservation, check_retention, effective_limits, fits

__all__ = ["MemoryLedger"]

_SWEEP_EVERY = 60.0  # seconds of ledger time between two looks for ended windows


class _Account:
    """One allowance's running totals (a plain class: a dataclass costs ~1 ms of exec() at import on Python 3.11)."""

    __slots__ = ("reserved_micros", "reserved_tokens", "scope", "spent_micros", "spent_tokens", "window_end")

    def __init__(self, scope: str, window_end: float | None = None) -> None:
        self.scope = scope
        self.window_end = window_end
        self.spent_micros = self.reserved_micros = self.spent_tokens = self.reserved_tokens = 0


class MemoryLedger(Ledger):
    """``settled_ttl`` (seconds, default one day, as the Redis ledger's settled markers) is how long a settled
    reservation id is remembered after both its lease and its settle, so that a repeat settle within it charges
    nothing. Forgetting it keeps a long-running process's memory flat (one id per call otherwise); the price is that
    a settle repeated later is taken for a first one and charged, so the retention must exceed any window in which a
    settle can be repeated. The guard repeats only its own retries of refused settles, on its next reservation or
    at close, far inside a day. Age is judged by the ``now`` the settles pass.

    For the same reason ``window_grace`` (default 7 days, as the other ledgers) after a window ends its account is
    dropped once nothing is held on it (looked for at most once a minute of that time, one pass over the accounts),
    and ``events_maxlen`` (default ``None``: all kept) keeps about that many of the newest events."""

    def __init__(
        self, *, settled_ttl: float = 86_400.0, window_grace: float = 7 * 86_400.0, events_maxlen: int | None = None
    ) -> None:
        if not settled_ttl > 0:
            raise ValueError("settled_ttl must be > 0 seconds")
        check_retention(window_grace, events_maxlen)
        self.url = "memory://"
        self.settled_ttl = float(settled_ttl)
        self.window_grace = float(window_grace)
        self.events_maxlen = events_maxlen
        self._next_sweep = -math.inf  # no ended window is looked for before this
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._holds: dict[str, tuple[Reservation, float]] = {}
        self._next_expiry = math.inf  # no hold expires before this (it may be earlier than the true minimum)
        self._settled: set[str] = set()
        # (forget at, id) in settle order: settles come in about time order, so the front is the next to forget; one
        # settled out of order (a retry with its original time) is only forgotten late, never early.
        self._forget: deque[tuple[float, str]] = deque()
        self._events: list[CallEvent] = []
        self._event_times: list[float] = []
        self._grants: list[Grant] = []

    # -- internals (lock held) -------------------------------------------------------------------------------
    def _account(self, allowance: Allowance) -> _Account:
        acct = self._accounts.get(allowance.key)
        if acct is None:
            acct = self._accounts[allowance.key] = _Account(allowance.scope, window_end=allowance.window_end)
        return acct

    def _sweep_ended(self, now: float) -> None:
        """Drop the accounts of windows that ended ``window_grace`` before ``now`` with nothing held on them."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY
        cutoff = now - self.window_grace
        ended = [
            key for key, a in self._accounts.items()
            if a.window_end is not None and a.window_end < cutoff and not a.reserved_micros and not a.reserved_tokens
        ]  # fmt: skip
        for key in ended:
            del self._accounts[key]

    def _expire(self, now: float) -> None:
        if now < self._next_expiry:
            return
        earliest = math.inf
        for rid, (res, expires) in list(self._holds.items()):
            if expires <= now:
                self._drop_hold(res)
                del self._holds[rid]
            elif expires < earliest:
                earliest = expires
        self._next_expiry = earliest

    def _drop_hold(self, res: Reservation) -> None:
        for key in res.keys:
            acct = self._accounts.get(key)
            if acct is not None:
                acct.reserved_micros -= res.micros
                acct.reserved_tokens -= res.tokens

    def _granted(self, scope: str, now: float) -> tuple[int, int]:
        gm = gt = 0
        for g in self._grants:
            if g.scope == scope and (g.expires_at is None or g.expires_at > now) and g.created_at <= now:
                gm += g.micros
                gt += g.tokens
        return gm, gt

    def _balance(self, allowance: Allowance, now: float) -> Balance:
        acct = self._accounts.get(allowance.key) or _Account(allowance.scope)
        gm, gt = self._granted(allowance.scope, now) if self._grants else (0, 0)
        lm, lt = effective_limits(allowance, gm, gt)
        return Balance(
            allowance.key, allowance.scope, lm, lt, acct.spent_micros, acct.reserved_micros, acct.spent_tokens,
            acct.reserved_tokens, gm, gt,
        )

    def _record(self, event: CallEvent) -> None:
        if self._event_times and event.time < self._event_times[-1]:
            i = bisect.bisect_right(self._event_times, event.time)
            self._event_times.insert(i, event.time)
            self._events.insert(i, event)
        else:
            self._event_times.append(event.time)
            self._events.append(event)
        cap = self.events_maxlen
        if cap is not None and len(self._events) > cap + cap // 16:  # trimmed in steps: O(1) per event on average
            del self._events[: len(self._events) - cap]
            del self._event_times[: len(self._event_times) - cap]

    # -- Ledger ------------------------------------------------------------------------------------------------
    def reserve(
        self, allowances: Sequence[Allowance], micros: int, tokens: int, *, lease_seconds: float, now: float
    ) -> Reservation | Refusal:
        with self._lock:
            self._expire(now)
            for a in allowances:
                if a.enforce:
                    bal = self._balance(a, now)
                    if not fits(bal, micros, tokens):
                        return Refusal(a, bal, micros, tokens)
            keys = tuple(a.key for a in allowances)
            res = Reservation(os.urandom(16).hex(), keys, micros, tokens, now + lease_seconds)
            for a in allowances:
                acct = self._account(a)
                acct.reserved_micros += micros
                acct.reserved_tokens += tokens
            self._holds[res.id] = (res, res.expires_at)
            if res.expires_at < self._next_expiry:
                self._next_expiry = res.expires_at
            return res

    def settle(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float
    ) -> bool:
        with self._lock:
            return self._settle(reservation, micros, tokens, event, now)

    def settle_and_read(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float,
        allowances: Sequence[Allowance],
    ) -> tuple[bool, dict[str, Balance]]:
        with self._lock:
            charged = self._settle(reservation, micros, tokens, event, now)
            self._expire(now)
            return charged, {a.key: self._balance(a, now) for a in allowances}

    def _settle(self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, now: float) -> bool:
        forget = self._forget
        while forget and forget[0][0] <= now:
            self._settled.discard(forget.popleft()[1])
        if reservation.id in self._settled:
            return False
        self._settled.add(reservation.id)
        forget.append((max(now, reservation.expires_at) + self.settled_ttl, reservation.id))
        if self._holds.pop(reservation.id, None) is not None:
            self._drop_hold(reservation)
        for key in reservation.keys:
            acct = self._accounts.get(key)
            if acct is None:  # pragma: no cover - reserve always creates the account
                continue
            acct.spent_micros += micros
            acct.spent_tokens += tokens
        if event is not None:
            self._record(event)
        self._sweep_ended(now)
        return True

    def balance(self, allowance: Allowance, *, now: float) -> Balance:
        with self._lock:
            self._expire(now)
            return self._balance(allowance, now)

    def record(self, event: CallEvent) -> None:
        with self._lock:
            self._record(event)

    def events(self, since: float | None = None, until: float | None = None) -> Iterator[CallEvent]:
        with self._lock:
            lo = 0 if since is None else bisect.bisect_left(self._event_times, since)
            hi = len(self._events) if until is None else bisect.bisect_left(self._event_times, until)
            snapshot = self._events[lo:hi]
        return iter(snapshot)

    def grant(self, grant: Grant) -> None:
        with self._lock:
            self._grants.append(grant)

    def grants(self, *, now: float | None = None) -> list[Grant]:
        with self._lock:
            if now is None:
                return list(self._grants)
            return [g for g in self._grants if g.created_at <= now and (g.expires_at is None or g.expires_at > now)]

    def accounts(self) -> list[Balance]:
        with self._lock:
            return [
                Balance(key, a.scope, None, None, a.spent_micros, a.reserved_micros, a.spent_tokens, a.reserved_tokens)
                for key, a in self._accounts.items()
            ]

    def active_reservations(self, *, now: float) -> list[Reservation]:
        with self._lock:
            self._expire(now)
            return [r for r, _ in self._holds.values()]

    # Every step is a few microseconds under a lock held only as long: never worth a thread, never waits long.
    def reserve_nowait(
        self, allowances: Sequence[Allowance], micros: int, tokens: int, *, lease_seconds: float, now: float
    ) -> Reservation | Refusal | None:
        return self.reserve(allowances, micros, tokens, lease_seconds=lease_seconds, now=now)

    def settle_and_read_nowait(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float,
        allowances: Sequence[Allowance],
    ) -> tuple[bool, dict[str, Balance]] | None:
        return self.settle_and_read(reservation, micros, tokens, event, now=now, allowances=allowances)

    def balance_nowait(self, allowance: Allowance, *, now: float) -> Balance | None:
        return self.balance(allowance, now=now)

    async def areserve(
        self, allowances: Sequence[Allowance], micros: int, tokens: int, *, lease_seconds: float, now: float
    ) -> Reservation | Refusal:
        # The lock is held for microseconds and never across an await: no thread hop needed.
        return self.reserve(allowances, micros, tokens, lease_seconds=lease_seconds, now=now)

    async def abalance(self, allowance: Allowance, *, now: float) -> Balance:
        return self.balance(allowance, now=now)

    async def asettle(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float
    ) -> bool:
        return self.settle(reservation, micros, tokens, event, now=now)

    async def asettle_and_read(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float,
        allowances: Sequence[Allowance],
    ) -> tuple[bool, dict[str, Balance]]:
        return self.settle_and_read(reservation, micros, tokens, event, now=now, allowances=allowances)
