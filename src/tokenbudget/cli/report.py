"""Pure functions from ledger records to the rows people read: shared by the CLI tables, CSV/JSON and the dashboard.

Nothing here opens a ledger, reads the clock or prints: callers pass the events, accounts, grants and "now", so
every number on a screen can be reproduced in a test from the same inputs.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from ..account import parse_duration
from ..calls import Usage
from ..config import BudgetRule
from ..errors import ConfigError, TokenBudgetError
from ..events import CallEvent
from ..ledger.base import Balance, Grant, Reservation
from ..money import micros_to_usd, usd_to_micros
from ..policy import parse_scope, window
from ..pricing import PriceBook

__all__ = [
    "NONE",
    "AccountKey",
    "BudgetRow",
    "ReportRow",
    "Savings",
    "TopRow",
    "Totals",
    "account_label",
    "bucket_start",
    "budget_rows",
    "burndown",
    "fmt_delta",
    "fmt_reset",
    "fmt_usd",
    "group_events",
    "group_key",
    "parse_account_key",
    "parse_by",
    "parse_when",
    "report_record",
    "rule_for_account",
    "scope_matches",
    "span_bucket",
    "spend_series",
    "top_spenders",
    "utc_iso",
    "window_label",
]

NONE = "(none)"
"""Shown where a call had no team/user/tag: a value nobody can type as a team name by accident."""

RUN_OPERATION = "function_run"
_SIMPLE_KEYS = (
    "team", "user", "org", "model", "provider", "function", "status", "decision", "operation", "day", "hour",
)
_RUN_KEYS = frozenset({"function", "day", "hour"})
"""Group keys a ``function_run`` event carries itself; runs with no calls can only be placed by these."""


# -- parsing ---------------------------------------------------------------------------------------------------------
def parse_by(text: str) -> tuple[str, ...]:
    """``team,model,tag:env`` -> validated keys, so a typo is a usage error and not an empty column."""
    keys: list[str] = []
    for raw in text.split(","):
        key = raw.strip()
        if not key:
            continue
        if key.startswith("tag:"):
            if len(key) == 4:
                raise ConfigError("tag: needs a tag name, e.g. tag:env", key="--by")
        elif key not in _SIMPLE_KEYS:
            raise ConfigError(
                f"unknown grouping {key!r}; allowed: {', '.join(_SIMPLE_KEYS)}, tag:KEY", key="--by"
            )
        if key not in keys:
            keys.append(key)
    if not keys:
        raise ConfigError("give at least one grouping, e.g. --by team,model", key="--by")
    return tuple(keys)


def parse_when(text: str, *, now: float, tz: str = "UTC", key: str = "--since") -> float:
    """``7d``/``24h`` (that long before ``now``), ``now``, or an ISO date/time (naive ones in ``tz``)."""
    value = text.strip()
    if value.lower() == "now":
        return now
    try:
        return now - parse_duration(value, key=key)
    except ConfigError:
        pass
    iso = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        raise ConfigError(
            f"expected a duration back from now (90m, 24h, 7d, 2w), 'now', or an ISO date/time such as 2026-01-31 "
            f"or 2026-01-31T09:00; got {text!r}",
            key=key,
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=ZoneInfo(tz))
    return when.timestamp()


# -- formatting ------------------------------------------------------------------------------------------------------
def fmt_usd(micros: int | None) -> str:
    """Cents hide the calls that matter at LLM prices, so small amounts keep four decimals."""
    if micros is None:
        return "-"
    usd = micros_to_usd(micros)
    sign = "-" if usd < 0 else ""
    if abs(usd) >= 100:
        return f"{sign}${abs(usd):,.2f}"
    return f"{sign}${abs(usd):,.4f}"


def _usd(micros: int | None) -> float | None:
    return None if micros is None else round(micros_to_usd(micros), 6)


# -- grouping --------------------------------------------------------------------------------------------------------
def _local(ts: float, tz: str) -> datetime:
    return datetime.fromtimestamp(ts, ZoneInfo(tz))


def group_key(event: CallEvent, key: str, tz: str = "UTC") -> str:
    """One event's value for one ``--by`` key."""
    if key == "day":
        return _local(event.time, tz).strftime("%Y-%m-%d")
    if key == "hour":
        return _local(event.time, tz).strftime("%Y-%m-%d %H:00")
    value = event.tags.get(key[4:]) if key.startswith("tag:") else getattr(event, key)
    return NONE if value is None or value == "" else str(value)


class Savings:
    """What downgrades saved: the downgraded call's real usage priced at the model that was asked for.

    Priced from tokens, not from reservations, because a reservation is a worst case: comparing two worst cases
    would credit a downgrade with output that was never generated. Falls back to the difference of the two
    estimates only when the original model has no price.
    """

    def __init__(self, prices: PriceBook | None = None) -> None:
        self.prices = prices if prices is not None else PriceBook(unknown_model="raise")

    def saved_micros(self, event: CallEvent) -> int:
        if event.decision != "downgrade" or not event.original_model or event.status in ("denied", "error", "unsent"):
            return 0
        usage = Usage(
            input_tokens=event.input_tokens, output_tokens=event.output_tokens,
            cache_read_tokens=event.cache_read_tokens, cache_write_tokens=event.cache_write_tokens,
            cache_write_1h_tokens=event.cache_write_1h_tokens, reasoning_tokens=event.reasoning_tokens,
        )
        try:
            price = self.prices.price(event.original_model)
        except TokenBudgetError:
            return max(0, event.original_estimated_micros - event.estimated_micros)
        return self.prices.cost_micros(price, usage) - event.cost_micros


@dataclass(slots=True)
class Totals:
    calls: int = 0
    ok: int = 0
    denied: int = 0
    downgraded: int = 0
    clamped: int = 0
    warned: int = 0
    errors: int = 0
    abandoned: int = 0
    partial: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micros: int = 0
    saved_micros: int = 0
    runs: int = 0
    """Finished ``@tokenbudget.budget`` runs (ok + failed)."""
    failed_runs: int = 0
    open_runs: int = 0
    """Runs seen in calls whose end was not recorded (still running, or the process died)."""
    run_cost_micros: int = 0
    """Cost of the calls made by finished runs: the numerator of the per-run figures."""
    run_costs: dict[str, int] = field(default_factory=dict, repr=False)
    """Cost per run id of this row's calls, until the runs are resolved."""

    def add_call(self, e: CallEvent, saved: int) -> None:
        self.calls += 1
        status = e.status
        if status == "ok":
            self.ok += 1
        elif status == "denied":
            self.denied += 1
        elif status in ("error", "unsent"):
            self.errors += 1
        elif status == "abandoned":
            self.abandoned += 1
        elif status == "partial":
            self.partial += 1
        if e.decision == "downgrade":
            self.downgraded += 1
        elif e.decision == "clamp":
            self.clamped += 1
        elif e.decision == "warn":
            self.warned += 1
        self.input_tokens += e.input_tokens
        self.output_tokens += e.output_tokens
        self.cache_read_tokens += e.cache_read_tokens
        self.cache_write_tokens += e.cache_write_tokens + e.cache_write_1h_tokens
        self.reasoning_tokens += e.reasoning_tokens
        self.cost_micros += e.cost_micros
        self.saved_micros += saved

    @property
    def ok_runs(self) -> int:
        return self.runs - self.failed_runs

    @property
    def cost_per_run_micros(self) -> int | None:
        return None if self.runs == 0 else round(self.run_cost_micros / self.runs)

    @property
    def cost_per_success_micros(self) -> int | None:
        """Failed runs' spend is part of what each success cost: it is divided over the successes only."""
        return None if self.ok_runs == 0 else round(self.run_cost_micros / self.ok_runs)


@dataclass(slots=True)
class ReportRow:
    group: tuple[str, ...]
    totals: Totals


def group_events(
    events: Iterable[CallEvent], by: Sequence[str], *, tz: str = "UTC", savings: Savings | None = None
) -> list[ReportRow]:
    """Calls grouped by ``by`` (dearest first); when ``function`` is a key, rows also carry their runs.

    A call belongs to the run of the innermost budgeted function it ran in; the end-of-run events say whether the
    run raised. Runs with no LLM call at all are counted only when every key is one a run event carries
    (function, day, hour).
    """
    sav = savings if savings is not None else Savings()
    rows: dict[tuple[str, ...], Totals] = {}
    run_end: dict[str, CallEvent] = {}
    run_only: list[CallEvent] = []
    for e in events:
        if e.operation == RUN_OPERATION:
            if e.run_id:
                run_end[e.run_id] = e
            run_only.append(e)
            continue
        k = tuple(group_key(e, b, tz) for b in by)
        t = rows.get(k)
        if t is None:
            t = rows[k] = Totals()
        t.add_call(e, sav.saved_micros(e))
        if e.run_id:
            t.run_costs[e.run_id] = t.run_costs.get(e.run_id, 0) + e.cost_micros
    if "function" in by:
        _attach_runs(rows, run_end, run_only, by, tz)
    out = [ReportRow(k, t) for k, t in rows.items()]
    out.sort(key=lambda r: (-r.totals.cost_micros, r.group))
    return out


def _attach_runs(
    rows: dict[tuple[str, ...], Totals],
    run_end: Mapping[str, CallEvent],
    run_events: Sequence[CallEvent],
    by: Sequence[str],
    tz: str,
) -> None:
    placed: set[str] = set()
    for t in rows.values():
        for rid, cost in t.run_costs.items():
            end = run_end.get(rid)
            if end is None:
                t.open_runs += 1
                continue
            placed.add(rid)
            t.runs += 1
            t.run_cost_micros += cost
            if end.status == "error":
                t.failed_runs += 1
    if not set(by) <= _RUN_KEYS:
        return
    for e in run_events:
        if not e.run_id or e.run_id in placed:
            continue
        k = tuple(group_key(e, b, tz) for b in by)
        row = rows.get(k)
        if row is None:
            row = rows[k] = Totals()
        row.runs += 1
        if e.status == "error":
            row.failed_runs += 1


def report_record(row: ReportRow, by: Sequence[str]) -> dict[str, Any]:
    """One row as the flat record CSV and JSON share (USD as floats for people, micros as ints for machines)."""
    t = row.totals
    rec: dict[str, Any] = dict(zip(by, row.group, strict=True))
    rec.update(
        calls=t.calls, ok=t.ok, denied=t.denied, downgraded=t.downgraded, clamped=t.clamped, warned=t.warned,
        errors=t.errors, abandoned=t.abandoned, partial=t.partial, input_tokens=t.input_tokens,
        output_tokens=t.output_tokens, cache_read_tokens=t.cache_read_tokens, cache_write_tokens=t.cache_write_tokens,
        reasoning_tokens=t.reasoning_tokens, cost_usd=_usd(t.cost_micros), cost_micros=t.cost_micros,
        saved_usd=_usd(t.saved_micros), saved_micros=t.saved_micros,
    )
    if "function" in by:
        rec.update(
            runs=t.runs, failed_runs=t.failed_runs, ok_runs=t.ok_runs, open_runs=t.open_runs,
            cost_per_run_usd=_usd(t.cost_per_run_micros), cost_per_successful_run_usd=_usd(t.cost_per_success_micros),
        )
    return rec


# -- budgets ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AccountKey:
    """An account key taken apart: ``team:search/user:ann#name@day:1764028800`` or ``org@total``."""

    key: str
    scope: str
    name: str | None
    period: str
    start: float | None


_PERIODS = frozenset({"hour", "day", "week", "month", "total"})


def parse_account_key(key: str) -> AccountKey | None:
    """``None`` for keys that are not a configured budget's (per-run ``fn:`` accounts, foreign keys)."""
    if key.startswith("fn:"):
        return None
    head, at, tail = key.rpartition("@")
    if not at or not head:
        return None
    period, _, start_text = tail.partition(":")
    if period not in _PERIODS:
        return None
    start: float | None = None
    if period != "total":
        try:
            start = float(start_text)
        except ValueError:
            return None
    scope, hash_, name = head.partition("#")
    return AccountKey(key, scope, name if hash_ else None, period, start)


def _part_matches(rule_part: Any, resolved: str) -> bool:
    kind, _, value = resolved.partition(":")
    if rule_part.kind == "org":
        if rule_part.value is None:
            return resolved == "org"
        return kind == "org" and (rule_part.value == "*" or value == rule_part.value)
    if kind != rule_part.kind:
        return False
    if rule_part.kind == "tag":
        tkey, _, tval = value.partition("=")
        return bool(tkey == rule_part.key and (rule_part.value == "*" or tval == rule_part.value))
    if rule_part.kind == "model":
        return bool(value == rule_part.value)  # the account keeps the rule's glob, not the model called
    return bool(rule_part.value == "*" or value == rule_part.value)


_SCOPE_SEPARATOR = re.compile(r"/(?=org(?::|/|$)|team:|user:|tag:|model:)")
"""A ``/`` that starts the next scope part; one inside a name (``team:a/b``) is part of the name."""


def scope_matches(rule_scope: str, resolved_scope: str) -> bool:
    """Whether rule scope ``team:search/user:*`` could have produced the resolved scope ``team:search/user:ann``."""
    try:
        parts = parse_scope(rule_scope)
    except ConfigError:
        return False
    resolved = _SCOPE_SEPARATOR.split(resolved_scope)
    return len(parts) == len(resolved) and all(_part_matches(p, r) for p, r in zip(parts, resolved, strict=True))


def rule_for_account(key: str | AccountKey, rules: Sequence[BudgetRule]) -> BudgetRule | None:
    """The configured rule behind an account, found from its key's scope, ``#name`` and period.

    Unnamed rules with the same scope and period share one account and the tighter limit wins (as in
    :meth:`tokenbudget.policy.Policy.matches`), so several matches come back as one rule with the tightest limits.
    ``None`` when the current config has no such rule (it was removed, or the CLI was given another config).
    """
    parsed = parse_account_key(key) if isinstance(key, str) else key
    if parsed is None:
        return None
    found = [
        r for r in rules
        if r.period == parsed.period and (r.name or None) == parsed.name and scope_matches(r.scope, parsed.scope)
    ]
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    primary = next((r for r in found if r.on_exhaust != "warn"), found[0])
    usd = [r.limit_usd for r in found if r.limit_usd is not None]
    tokens = [r.limit_tokens for r in found if r.limit_tokens is not None]
    return primary.model_copy(
        update={"limit_usd": min(usd) if usd else None, "limit_tokens": min(tokens) if tokens else None}
    )


@dataclass(frozen=True, slots=True)
class BudgetRow:
    key: str
    scope: str
    name: str | None
    period: str
    window_start: float | None
    window_end: float | None
    """When the period resets; ``None`` for total budgets."""
    rule: BudgetRule | None
    limit_micros: int | None
    limit_tokens: int | None
    granted_micros: int
    granted_tokens: int
    spent_micros: int
    reserved_micros: int
    spent_tokens: int
    reserved_tokens: int
    current: bool
    """The window contains "now" (or the budget is a total); past windows only show with ``--all``."""

    @property
    def effective_limit_micros(self) -> int | None:
        return None if self.limit_micros is None else self.limit_micros + self.granted_micros

    @property
    def effective_limit_tokens(self) -> int | None:
        return None if self.limit_tokens is None else self.limit_tokens + self.granted_tokens

    @property
    def remaining_micros(self) -> int | None:
        lim = self.effective_limit_micros
        return None if lim is None else lim - self.spent_micros - self.reserved_micros

    @property
    def remaining_tokens(self) -> int | None:
        lim = self.effective_limit_tokens
        return None if lim is None else lim - self.spent_tokens - self.reserved_tokens

    @property
    def used_fraction(self) -> float | None:
        """Spent plus held over the grant-raised limit: the guard refuses on the same sum."""
        fractions: list[float] = []
        lm = self.effective_limit_micros
        if lm is not None:
            fractions.append((self.spent_micros + self.reserved_micros) / lm if lm else 1.0)
        lt = self.effective_limit_tokens
        if lt is not None:
            fractions.append((self.spent_tokens + self.reserved_tokens) / lt if lt else 1.0)
        return max(fractions) if fractions else None

    @property
    def policy(self) -> str:
        return self.rule.on_exhaust if self.rule is not None else "?"

    def record(self) -> dict[str, Any]:
        frac = self.used_fraction
        return {
            "key": self.key, "scope": self.scope, "name": self.name, "period": self.period,
            "window_start": self.window_start, "window_end": self.window_end, "policy": self.policy,
            "limit_usd": _usd(self.limit_micros), "granted_usd": _usd(self.granted_micros),
            "effective_limit_usd": _usd(self.effective_limit_micros), "spent_usd": _usd(self.spent_micros),
            "reserved_usd": _usd(self.reserved_micros), "remaining_usd": _usd(self.remaining_micros),
            "limit_tokens": self.limit_tokens, "granted_tokens": self.granted_tokens,
            "spent_tokens": self.spent_tokens, "reserved_tokens": self.reserved_tokens,
            "remaining_tokens": self.remaining_tokens, "used_percent": None if frac is None else round(frac * 100, 2),
            "current": self.current, "in_config": self.rule is not None,
        }


def window_label(period: str, start: float | None, tz: str = "UTC") -> str:
    """``day 2026-01-31``, ``month 2026-01``...: the epoch second in an account key means nothing to a reader."""
    if period == "total" or start is None:
        return "total"
    t = datetime.fromtimestamp(start, ZoneInfo(tz))
    fmt = {"hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d", "week": "of %Y-%m-%d", "month": "%Y-%m"}.get(period, "%Y-%m-%d")
    return f"{period} {t.strftime(fmt)}"


def account_label(row: BudgetRow, tz: str = "UTC") -> str:
    """``team:search/user:ann #name, day 2026-01-31``."""
    name = f" #{row.name}" if row.name else ""
    return f"{row.scope}{name}, {window_label(row.period, row.window_start, tz)}"


def budget_rows(
    accounts: Iterable[Balance],
    rules: Sequence[BudgetRule],
    grants: Iterable[Grant],
    reservations: Iterable[Reservation],
    *,
    now: float,
    tz: str = "UTC",
    include_past: bool = False,
) -> list[BudgetRow]:
    """Every budget account with its limit (from the rule that produced it), grants, holds and reset time.

    Holds come from the live reservations rather than the account row, so a hold whose lease ran out (its process
    died) no longer counts even if nothing has swept it yet.
    """
    held_micros: dict[str, int] = defaultdict(int)
    held_tokens: dict[str, int] = defaultdict(int)
    for r in reservations:
        if r.expires_at > now:
            for k in r.keys:
                held_micros[k] += r.micros
                held_tokens[k] += r.tokens
    active = [g for g in grants if g.created_at <= now and (g.expires_at is None or g.expires_at > now)]
    out: list[BudgetRow] = []
    for bal in accounts:
        parsed = parse_account_key(bal.key)
        if parsed is None:
            continue
        if parsed.period == "total" or parsed.start is None:
            start, end, current = None, None, True
        else:
            start, end = window(parsed.period, tz, parsed.start)
            start = parsed.start
            current = start <= now < end
        if not current and not include_past:
            continue
        rule = rule_for_account(parsed, rules)
        gm = sum(g.micros for g in active if g.scope == parsed.scope) if current else 0
        gt = sum(g.tokens for g in active if g.scope == parsed.scope) if current else 0
        out.append(
            BudgetRow(
                key=bal.key, scope=parsed.scope, name=parsed.name, period=parsed.period, window_start=start,
                window_end=end, rule=rule,
                limit_micros=None if rule is None or rule.limit_usd is None else usd_to_micros(rule.limit_usd),
                limit_tokens=None if rule is None else rule.limit_tokens, granted_micros=gm, granted_tokens=gt,
                spent_micros=bal.spent_micros, reserved_micros=held_micros.get(bal.key, 0),
                spent_tokens=bal.spent_tokens, reserved_tokens=held_tokens.get(bal.key, 0), current=current,
            )
        )

    def order(r: BudgetRow) -> tuple[float, str]:
        frac = r.used_fraction
        return (-(frac if frac is not None else -1.0), r.key)

    out.sort(key=order)
    return out


# -- top -------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TopRow:
    name: str
    current_micros: int
    previous_micros: int
    calls: int

    @property
    def growth_micros(self) -> int:
        return self.current_micros - self.previous_micros

    @property
    def growth_ratio(self) -> float | None:
        """``None`` for a spender new in this window: no finite ratio says "from nothing"."""
        if self.previous_micros <= 0:
            return None
        return self.current_micros / self.previous_micros

    def record(self) -> dict[str, Any]:
        ratio = self.growth_ratio
        return {
            "name": self.name, "spend_usd": _usd(self.current_micros), "previous_usd": _usd(self.previous_micros),
            "growth_usd": _usd(self.growth_micros), "growth_ratio": None if ratio is None else round(ratio, 4),
            "calls": self.calls, "spend_micros": self.current_micros, "previous_micros": self.previous_micros,
        }


def top_spenders(
    events: Iterable[CallEvent], *, by: str, start: float, window_s: float
) -> tuple[list[TopRow], list[TopRow]]:
    """(heaviest, fastest-growing) ``by`` user or team: spend since ``start`` against the window just before it.

    Growth is in dollars, not percent, so a user going from one cent to five does not outrank one going from
    $10 to $40; the ratio is shown beside it.
    """
    prev_start = start - window_s
    cur: dict[str, int] = defaultdict(int)
    prev: dict[str, int] = defaultdict(int)
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        if e.operation == RUN_OPERATION or e.time < prev_start:
            continue
        name = group_key(e, by)
        if e.time >= start:
            cur[name] += e.cost_micros
            calls[name] += 1
        else:
            prev[name] += e.cost_micros
    rows = [TopRow(n, cur.get(n, 0), prev.get(n, 0), calls.get(n, 0)) for n in set(cur) | set(prev)]
    heaviest = sorted((r for r in rows if r.current_micros > 0), key=lambda r: (-r.current_micros, r.name))
    growing = sorted((r for r in rows if r.growth_micros > 0), key=lambda r: (-r.growth_micros, r.name))
    return heaviest, growing


# -- time series -----------------------------------------------------------------------------------------------------
def bucket_start(ts: float, bucket: str, tz: str = "UTC") -> float:
    """Start of the hour or calendar day (in ``tz``) holding ``ts``."""
    return window("hour" if bucket == "hour" else "day", tz, ts)[0]


def spend_series(
    events: Iterable[CallEvent],
    *,
    bucket: str,
    series: Callable[[CallEvent], str],
    stack: Callable[[CallEvent], str],
    tz: str = "UTC",
) -> dict[str, dict[float, dict[str, int]]]:
    """series -> bucket start -> stack -> micros (e.g. team -> hour -> model -> spend), for stacked bar charts."""
    out: dict[str, dict[float, dict[str, int]]] = {}
    for e in events:
        if e.operation == RUN_OPERATION or e.cost_micros == 0:
            continue
        b = bucket_start(e.time, bucket, tz)
        per_bucket = out.setdefault(series(e), {}).setdefault(b, {})
        s = stack(e)
        per_bucket[s] = per_bucket.get(s, 0) + e.cost_micros
    return out


def burndown(events: Iterable[CallEvent], key: str, limit_micros: int, start: float) -> list[tuple[float, int]]:
    """(time, remaining micros) after each charge to account ``key``, starting from the full limit at ``start``.

    Uses the events' own ``budget_keys``, so it is exact for the account even when several rules overlap.
    """
    points: list[tuple[float, int]] = [(start, limit_micros)]
    remaining = limit_micros
    for e in events:
        if e.cost_micros and key in e.budget_keys and e.time >= start:
            remaining -= e.cost_micros
            points.append((e.time, remaining))
    return points


def span_bucket(since: float | None, until: float, first: float | None) -> str:
    """Hourly bars for up to three days of data, daily beyond: both keep a chart readable."""
    lo = since if since is not None else first
    if lo is None or math.isinf(lo):
        return "hour"
    return "hour" if until - lo <= 3 * 86_400 else "day"


def utc_iso(ts: float | None, tz: str = "UTC") -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M %Z")


def fmt_reset(end: float | None, now: float, tz: str = "UTC") -> str:
    """"in 5h 3m (2026-01-02 00:00 UTC)": how long the budget still has to last matters more than the date."""
    if end is None:
        return "never"
    delta = end - now
    when = utc_iso(end, tz)
    if delta <= 0:
        return f"ended {when}"
    return f"in {fmt_delta(delta)} ({when})"


def fmt_delta(seconds: float) -> str:
    td = timedelta(seconds=int(seconds))
    days, rest = td.days, td.seconds
    hours, minutes = rest // 3600, (rest % 3600) // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"

