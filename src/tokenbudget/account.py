"""Asking the ledger from code: what is left, what was spent, and topping an allowance up with a grant."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone

from .errors import ConfigError, TokenBudgetError
from .guard import Guard
from .ledger.base import Grant
from .money import micros_to_usd, usd_to_micros
from .principal import current_principal

__all__ = ["grant", "parse_duration", "remaining", "spend"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, *, key: str = "expires") -> float:
    """``90s``, ``15m``, ``12h``, ``7d``, ``2w`` -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"expected a duration such as 30m, 12h, 7d or 2w, got {text!r}", key=key)
    return float(m.group(1)) * _UNIT[m.group(2)]


def _guard() -> Guard:
    from ._runtime import active_guard

    g = active_guard()
    if g is None:
        raise TokenBudgetError("tokenbudget is not installed; call tokenbudget.install() first")
    return g


def remaining(scope: str | None = None, *, model: str = "*") -> float | None:
    """Dollars left in the tightest budget covering ``scope`` (default: the current caller); None if unlimited.

    ``scope`` is a resolved scope such as ``"team:search"`` or ``"team:search/user:ann"``. Money held by calls in
    flight counts as spent, so an agent can ask "can I afford one more step?" and trust the answer.
    """
    g = _guard()
    now = g.clock.now()
    principal = current_principal(g.default_principal)
    best: int | None = None
    from .budget import active_function_allowances

    fn_allowances, _, _ = active_function_allowances()
    allowances = [m.allowance for m in g.policy.matches(principal, model, now)]
    if scope is None:
        allowances.extend(fn_allowances)
    else:
        allowances = [a for a in allowances if a.scope == scope]
        if not allowances:
            allowances = _allowances_for_scope(g, scope, now)
    for a in allowances:
        rem = g.ledger.balance(a, now=now).remaining_micros
        if rem is not None and (best is None or rem < best):
            best = rem
    return None if best is None else micros_to_usd(best)


def _allowances_for_scope(g: Guard, scope: str, now: float) -> list:  # type: ignore[type-arg]
    """Allowances of rules whose resolved scope is ``scope`` for some caller (e.g. another team's budget)."""
    from .principal import Principal

    principal = Principal()
    for part in scope.split("/"):
        kind, _, value = part.partition(":")
        if kind == "team":
            principal = principal.merged(None, value, None, None)
        elif kind == "user":
            principal = principal.merged(None, None, value, None)
        elif kind == "org" and value:
            principal = principal.merged(value, None, None, None)
        elif kind == "tag":
            k, _, v = value.partition("=")
            principal = principal.merged(None, None, None, {k: v})
    return [m.allowance for m in g.policy.matches(principal, "*", now) if m.allowance.scope == scope]


def spend(
    *,
    team: str | None = None,
    user: str | None = None,
    model: str | None = None,
    function: str | None = None,
    since: datetime | float | None = None,
    until: datetime | float | None = None,
) -> float:
    """Dollars charged to matching calls between ``since`` and ``until`` (from the recorded events)."""
    g = _guard()
    lo = since.timestamp() if isinstance(since, datetime) else since
    hi = until.timestamp() if isinstance(until, datetime) else until
    total = 0
    for e in g.ledger.events(lo, hi):
        if team is not None and e.team != team:
            continue
        if user is not None and e.user != user:
            continue
        if model is not None and e.model != model:
            continue
        if function is not None and e.function != function:
            continue
        total += e.cost_micros
    return micros_to_usd(total)


def grant(
    scope: str,
    amount_usd: float = 0.0,
    *,
    tokens: int = 0,
    expires: str | float | datetime | timedelta | None = "7d",
    reason: str = "",
    granted_by: str | None = None,
) -> Grant:
    """Top up every allowance of ``scope`` (e.g. ``"team:search"``) by ``amount_usd`` until ``expires``.

    ``expires`` is a duration (``"12h"``, ``"7d"``, seconds, a ``timedelta``), an absolute ``datetime``, or None
    for a grant that never lapses. Recorded in the ledger, so every process sees it and reports show it.
    """
    g = _guard()
    return make_grant(g, scope, amount_usd, tokens=tokens, expires=expires, reason=reason, granted_by=granted_by)


def make_grant(
    g: Guard,
    scope: str,
    amount_usd: float,
    *,
    tokens: int = 0,
    expires: str | float | datetime | timedelta | None,
    reason: str,
    granted_by: str | None,
) -> Grant:
    from .policy import parse_scope

    parse_scope(scope.split("#")[0])
    if amount_usd < 0 or tokens < 0:
        raise ConfigError("a grant adds budget; amount and tokens must be >= 0", key="amount")
    now = g.clock.now()
    if expires is None:
        expires_at = None
    elif isinstance(expires, datetime):
        expires_at = (expires if expires.tzinfo else expires.replace(tzinfo=timezone.utc)).timestamp()
    elif isinstance(expires, timedelta):
        expires_at = now + expires.total_seconds()
    elif isinstance(expires, str):
        expires_at = now + parse_duration(expires)
    else:
        expires_at = now + float(expires)
    record = Grant(
        id=uuid.uuid4().hex, scope=scope, micros=usd_to_micros(amount_usd), tokens=tokens, created_at=now,
        expires_at=expires_at, reason=reason, granted_by=granted_by,
    )
    g.ledger.grant(record)
    return record
