"""The ledger seam: where allowances are held, reserved against, settled, and recorded.

A call reserves its worst case against *every* allowance that covers it, all or none, then settles the
reservation exactly once with what it really cost. Implementations: :mod:`.memory` (one process),
:mod:`.sqlite` (every process on one machine), :mod:`.redis` (a fleet). All amounts are integer micro-dollars
and integer tokens; times are epoch seconds from the guard's clock, passed in so leases and periods are testable.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import ConfigError
from ..events import CallEvent

_T = TypeVar("_T")

__all__ = ["Allowance", "Balance", "Grant", "Ledger", "Refusal", "Reservation"]


@dataclass(frozen=True, slots=True)
class Allowance:
    """One budget window a call must fit in.

    ``key`` identifies the window (scope plus period start), so a new day is a new key with nothing spent;
    ``scope`` is what grants and reports refer to.
    """

    key: str
    scope: str
    limit_micros: int | None = None
    limit_tokens: int | None = None
    window_end: float | None = None
    """When this window closes (epoch seconds); ``None`` for a total budget. Lets stores expire old windows."""
    enforce: bool = True
    """``False`` for ``warn`` budgets: the call is counted but never refused."""


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    keys: tuple[str, ...]
    micros: int
    tokens: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Balance:
    key: str
    scope: str
    limit_micros: int | None
    limit_tokens: int | None
    spent_micros: int = 0
    reserved_micros: int = 0
    spent_tokens: int = 0
    reserved_tokens: int = 0
    granted_micros: int = 0
    granted_tokens: int = 0

    @property
    def remaining_micros(self) -> int | None:
        if self.limit_micros is None:
            return None
        return self.limit_micros - self.spent_micros - self.reserved_micros

    @property
    def remaining_tokens(self) -> int | None:
        if self.limit_tokens is None:
            return None
        return self.limit_tokens - self.spent_tokens - self.reserved_tokens


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a reservation did not fit: the first allowance that said no, with its balance at that moment."""

    allowance: Allowance
    balance: Balance
    requested_micros: int
    requested_tokens: int


@dataclass(frozen=True, slots=True)
class Grant:
    id: str
    scope: str
    micros: int
    tokens: int
    created_at: float
    expires_at: float | None
    reason: str = ""
    granted_by: str | None = None


def effective_limits(allowance: Allowance, grants_micros: int, grants_tokens: int) -> tuple[int | None, int | None]:
    lm = None if allowance.limit_micros is None else allowance.limit_micros + grants_micros
    lt = None if allowance.limit_tokens is None else allowance.limit_tokens + grants_tokens
    return lm, lt


def fits(balance: Balance, micros: int, tokens: int) -> bool:
    """Whether ``micros``/``tokens`` more fit under the (grant-raised) limits of ``balance``."""
    if (
        balance.limit_micros is not None
        and balance.spent_micros + balance.reserved_micros + micros > balance.limit_micros
    ):
        return False
    return not (
        balance.limit_tokens is not None
        and balance.spent_tokens + balance.reserved_tokens + tokens > balance.limit_tokens
    )


def check_retention(window_grace: float, events_maxlen: int | None) -> None:
    """The retention settings every built-in ledger takes, checked alike (a :class:`ConfigError` naming the one)."""
    if not (isinstance(window_grace, (int, float)) and 0 <= window_grace < math.inf):
        raise ConfigError(
            f"must be a finite number of seconds >= 0 (how long an ended window's account is kept), got "
            f"{window_grace!r}",
            key="window_grace",
        )
    if events_maxlen is not None and (
        not isinstance(events_maxlen, int) or isinstance(events_maxlen, bool) or events_maxlen < 1
    ):
        raise ConfigError(
            f"must be a whole number >= 1 (about how many of the newest events are kept), or None to keep them all; "
            f"got {events_maxlen!r}",
            key="events_maxlen",
        )


class Ledger(abc.ABC):
    """Abstract ledger. Sync methods are the contract; async ones default to running them in a thread."""

    url: str = ""

    @abc.abstractmethod
    def reserve(
        self, allowances: Sequence[Allowance], micros: int, tokens: int, *, lease_seconds: float, now: float
    ) -> Reservation | Refusal:
        """Hold ``micros``/``tokens`` against every allowance, or none if any enforced one would overflow."""

    @abc.abstractmethod
    def settle(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float
    ) -> bool:
        """Drop the hold and charge ``micros``/``tokens`` to its keys, recording ``event`` in the same step.

        Idempotent: only the first settle of a reservation charges; later ones return ``False``. A reservation whose
        lease expired is still charged (the money was spent), but its hold is already gone.
        """

    def settle_and_read(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float,
        allowances: Sequence[Allowance],
    ) -> tuple[bool, dict[str, Balance]]:
        """:meth:`settle`, then the balances of ``allowances`` (by key) as they stand right after it.

        The guard wants those balances after every call (the span's remaining budget, threshold alerts). A ledger
        that can read them in the step that settles (same transaction, same script) overrides this to save one read
        per budget; the default settles and then reads, so a ledger written against the older contract still works.
        """
        charged = self.settle(reservation, micros, tokens, event, now=now)
        return charged, {a.key: self.balance(a, now=now) for a in allowances}

    def commit(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None = None, *, now: float
    ) -> bool:
        return self.settle(reservation, micros, tokens, event, now=now)

    def release(self, reservation: Reservation, event: CallEvent | None = None, *, now: float) -> bool:
        return self.settle(reservation, 0, 0, event, now=now)

    @abc.abstractmethod
    def balance(self, allowance: Allowance, *, now: float) -> Balance:
        """Current spend and holds of one allowance, with active grants added to its limits."""

    @abc.abstractmethod
    def record(self, event: CallEvent) -> None:
        """Record an event that has no reservation (a call refused before sending)."""

    @abc.abstractmethod
    def events(self, since: float | None = None, until: float | None = None) -> Iterator[CallEvent]:
        """Recorded events in time order, for reports."""

    @abc.abstractmethod
    def grant(self, grant: Grant) -> None:
        """Raise every allowance of ``grant.scope`` by the grant's amounts until it expires."""

    @abc.abstractmethod
    def grants(self, *, now: float | None = None) -> list[Grant]:
        """Grants, active at ``now`` if given, else all."""

    @abc.abstractmethod
    def active_reservations(self, *, now: float) -> list[Reservation]:
        """Holds whose lease has not expired (for reports and leak checks)."""

    def accounts(self) -> list[Balance]:
        """Every account the ledger holds: key, scope, spend and holds, without limits (those live in the config).

        For ``tokenbudget budgets``, which has no caller whose budgets to look up and must list them all.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list its accounts")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""

    # -- without waiting: for async callers -------------------------------------------------------------------------
    # An async guard first asks the ledger to do the step at once, on the event loop's own thread; only when that
    # would mean waiting (a lock held by another thread or process, a network round trip) does it await the async
    # form below, which runs the sync one in a worker thread. For a local store whose step takes microseconds, the
    # two thread hops of ``asyncio.to_thread`` cost several times the step itself. The defaults never try.

    def reserve_nowait(
        self, allowances: Sequence[Allowance], micros: int, tokens: int, *, lease_seconds: float, now: float
    ) -> Reservation | Refusal | None:
        """:meth:`reserve` done at once on the calling thread, or ``None`` (nothing done) if it would have to wait."""
        return None

    def settle_and_read_nowait(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float,
        allowances: Sequence[Allowance],
    ) -> tuple[bool, dict[str, Balance]] | None:
        """:meth:`settle_and_read` done at once on the calling thread, or ``None`` (nothing done) if it would wait."""
        return None

    def balance_nowait(self, allowance: Allowance, *, now: float) -> Balance | None:
        """:meth:`balance` read at once on the calling thread, or ``None`` if it would have to wait."""
        return None

    def _async_executor(self) -> concurrent.futures.Executor | None:
        """Where the async forms below run the sync steps: the event loop's default executor (``None``), unless a
        ledger whose steps can wait long (a network store during an outage) keeps a pool of its own."""
        return None

    async def _in_thread(self, step: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``step(*args, **kwargs)`` in a worker thread, with the caller's context, as ``asyncio.to_thread`` does."""
        run = functools.partial(contextvars.copy_context().run, step, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._async_executor(), run)

    async def areserve(
        self, allowances: Sequence[Allowance], micros: int, tokens: int, *, lease_seconds: float, now: float
    ) -> Reservation | Refusal:
        return await self._in_thread(self.reserve, allowances, micros, tokens, lease_seconds=lease_seconds, now=now)

    async def abalance(self, allowance: Allowance, *, now: float) -> Balance:
        return await self._in_thread(self.balance, allowance, now=now)

    async def asettle(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float
    ) -> bool:
        return await self._in_thread(self.settle, reservation, micros, tokens, event, now=now)

    async def asettle_and_read(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float,
        allowances: Sequence[Allowance],
    ) -> tuple[bool, dict[str, Balance]]:
        return await self._in_thread(
            self.settle_and_read, reservation, micros, tokens, event, now=now, allowances=allowances
        )

    def spent(self, allowance: Allowance, *, now: float) -> int:
        """Micro-dollars charged to ``allowance`` so far."""
        return self.balance(allowance, now=now).spent_micros
