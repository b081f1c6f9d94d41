"""Which budgets cover a call, and the calendar windows they count in.

A rule's ``scope`` is a path of ``kind:value`` parts. A concrete value must match the caller; ``*`` matches any
caller that has that attribute and gives each distinct value its own allowance, which is how a team budget is
allocated per person (``team:search/user:*``). ``model:GLOB`` matches the requested model with ``fnmatch``.
"""

from __future__ import annotations

import fnmatch
from datetime import datetime, timedelta
from functools import lru_cache
from typing import NamedTuple
from zoneinfo import ZoneInfo

from .config import BudgetRule
from .errors import ConfigError
from .ledger.base import Allowance
from .money import usd_to_micros
from .principal import Principal

__all__ = ["Policy", "RuleMatch", "parse_scope", "window"]

_KINDS = ("org", "team", "user", "tag", "model")


class _Part(NamedTuple):  # a NamedTuple, not a dataclass: cheaper to define at import (see guard._Reserve)
    kind: str
    key: str | None  # tag key
    value: str | None  # None for bare "org"; "*" = per distinct value


@lru_cache(maxsize=1024)
def parse_scope(scope: str) -> tuple[_Part, ...]:
    """Parse and validate a scope pattern; raises ConfigError naming the part that is wrong."""
    if not isinstance(scope, str) or not scope.strip():
        raise ConfigError("a scope is a non-empty string such as 'org' or 'team:search/user:*'", key="scope")
    parts: list[_Part] = []
    for raw in scope.strip().split("/"):
        kind, sep, value = raw.partition(":")
        if kind not in _KINDS:
            raise ConfigError(
                f"unknown scope part {raw!r} in {scope!r}; allowed: org, team:NAME, user:NAME, tag:KEY=VALUE, "
                "model:GLOB (values may be *)",
                key="scope",
            )
        if kind == "org":
            parts.append(_Part("org", None, value or None))
            continue
        if not sep or not value:
            raise ConfigError(
                f"scope part {raw!r} in {scope!r} needs a value, e.g. {kind}:NAME or {kind}:*", key="scope"
            )
        if kind == "tag":
            tkey, eq, tval = value.partition("=")
            if not eq or not tkey or not tval:
                raise ConfigError(f"tag scope {raw!r} must look like tag:KEY=VALUE or tag:KEY=*", key="scope")
            parts.append(_Part("tag", tkey, tval))
        else:
            parts.append(_Part(kind, None, value))
    return tuple(parts)


def _resolve(parts: tuple[_Part, ...], principal: Principal, model: str) -> str | None:
    """The concrete scope this caller is charged under, or None when the rule does not cover it."""
    out: list[str] = []
    for p in parts:
        if p.kind == "org":
            if p.value not in (None, "*") and p.value != principal.org:
                return None
            out.append("org" if p.value is None else f"org:{principal.org}")
            continue
        if p.kind == "model":
            if not fnmatch.fnmatchcase(model, p.value or ""):
                return None
            out.append(f"model:{p.value}")
            continue
        if p.kind == "tag":
            actual = principal.tags.get(p.key or "")
            if actual is None or (p.value != "*" and actual != p.value):
                return None
            out.append(f"tag:{p.key}={actual}")
            continue
        actual = principal.team if p.kind == "team" else principal.user
        if actual is None or (p.value != "*" and actual != p.value):
            return None
        out.append(f"{p.kind}:{actual}")
    return "/".join(out)


@lru_cache(maxsize=4096)
def _window_cached(period: str, tz: str, bucket: int) -> tuple[float, float]:
    zone = ZoneInfo(tz)
    t = datetime.fromtimestamp(bucket, zone)
    if period == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=1, hours=2)).replace(hour=0)
    elif period == "week":
        day = t.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=t.weekday())
        start = day
        end = (start + timedelta(days=7, hours=2)).replace(hour=0)
    elif period == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = (start + timedelta(days=32)).replace(day=1)
        end = nxt
    else:  # pragma: no cover - validated by config
        raise ValueError(period)
    # Re-anchor to the zone: arithmetic across a DST change keeps the wall-clock hour we asked for.
    start = start.replace(tzinfo=zone)
    end = end.replace(tzinfo=zone)
    return start.timestamp(), end.timestamp()


def window(period: str, tz: str, now: float) -> tuple[float, float]:
    """The calendar window (start, end) in ``tz`` containing ``now``; total budgets have (0, inf)."""
    if period == "total":
        return 0.0, float("inf")
    # Windows never start off the hour, so compute once per hour of time.
    bucket = int(now // 3600) * 3600
    start, end = _window_cached(period, tz, bucket)
    if not start <= now < end:  # pragma: no cover - only for zones with sub-hour offsets
        start, end = _window_cached(period, tz, int(now))
    return start, end


class RuleMatch(NamedTuple):
    rule: BudgetRule
    allowance: Allowance


class Policy:
    """Turns configured rules into the allowances one call must fit in."""

    def __init__(self, rules: tuple[BudgetRule, ...], timezone: str = "UTC") -> None:
        self.rules = rules
        self.timezone = timezone
        self._parsed = [(i, r, parse_scope(r.scope)) for i, r in enumerate(rules)]
        self._limits = [(None if r.limit_usd is None else usd_to_micros(r.limit_usd), r.limit_tokens) for r in rules]
        self._memo: dict[tuple[object, ...], tuple[RuleMatch, ...]] = {}

    def matches(self, principal: Principal, model: str, now: float) -> list[RuleMatch]:
        """Every allowance covering this caller and model at ``now``.

        The key is scope + period window (+ the rule's ``name`` if it has one), never the rule's position, so
        reordering the config does not reset anyone's spend. Two unnamed rules with the same scope and period share
        one account; the tighter limit wins.
        """
        # The answer depends on ``now`` only through the rules' windows, which change at most on the hour: memoize
        # per hour of time, and only when every window covers that whole hour (not so in sub-hour-offset zones).
        tags = principal.tags
        bucket = int(now // 3600)
        key = (principal.org, principal.team, principal.user, tuple(sorted(tags.items())) if tags else (), model,
               bucket)
        hit = self._memo.get(key)
        if hit is not None:
            return list(hit)
        out = self._matches(principal, model, now)
        lo, hi = bucket * 3600, (bucket + 1) * 3600
        if all(m.rule.period == "total" or _covers(m.rule.period, self.timezone, now, lo, hi) for m in out):
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = tuple(out)
        return out

    def _matches(self, principal: Principal, model: str, now: float) -> list[RuleMatch]:
        out: dict[str, RuleMatch] = {}
        for i, rule, parts in self._parsed:
            resolved = _resolve(parts, principal, model)
            if resolved is None:
                continue
            start, end = window(rule.period, self.timezone, now)
            named = f"#{rule.name}" if rule.name else ""
            key = (
                f"{resolved}{named}@{rule.period}"
                if rule.period == "total"
                else (f"{resolved}{named}@{rule.period}:{int(start)}")
            )
            lm, lt = self._limits[i]
            prior = out.get(key)
            if prior is not None:
                pa = prior.allowance
                lm = _tighter(pa.limit_micros, lm)
                lt = _tighter(pa.limit_tokens, lt)
                rule = prior.rule if prior.rule.on_exhaust != "warn" else rule
            allowance = Allowance(
                key=key,
                scope=resolved,
                limit_micros=lm,
                limit_tokens=lt,
                window_end=None if rule.period == "total" else end,
                enforce=rule.on_exhaust != "warn",
            )
            out[key] = RuleMatch(rule, allowance)
        return list(out.values())


_MEMO_SIZE = 4096


def _covers(period: str, tz: str, now: float, lo: float, hi: float) -> bool:
    start, end = window(period, tz, now)
    return start <= lo and hi <= end


def _tighter(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
