"""Who is calling. A ``contextvars`` scope, so it follows asyncio tasks and ``asyncio.to_thread`` and nests."""

from __future__ import annotations

import contextvars
import getpass
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import MappingProxyType

__all__ = ["Principal", "current_principal", "scope"]


@dataclass(frozen=True, slots=True)
class Principal:
    org: str | None = None
    team: str | None = None
    user: str | None = None
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def merged(self, org: str | None, team: str | None, user: str | None, tags: Mapping[str, str] | None) -> Principal:
        return replace(
            self,
            org=org if org is not None else self.org,
            team=team if team is not None else self.team,
            user=user if user is not None else self.user,
            tags=MappingProxyType({**self.tags, **tags}) if tags else self.tags,
        )


_override: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("tokenbudget_principal", default=None)


def _login_name() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return None


def default_principal(org: str | None, team: str | None, user: str | None, tags: Mapping[str, str]) -> Principal:
    """Config first, then ``TOKENBUDGET_TEAM`` / ``TOKENBUDGET_USER``, then the login name for the user."""
    return Principal(
        org=org or os.environ.get("TOKENBUDGET_ORG") or None,
        team=team or os.environ.get("TOKENBUDGET_TEAM") or None,
        user=user or os.environ.get("TOKENBUDGET_USER") or _login_name(),
        tags=MappingProxyType(dict(tags)),
    )


def current_principal(default: Principal) -> Principal:
    over = _override.get()
    return default if over is None else default.merged(over.org, over.team, over.user, over.tags)


@contextmanager
def scope(
    *, org: str | None = None, team: str | None = None, user: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[Principal]:
    """Charge the calls made inside the block to this team / user / tags (inner scopes override outer ones)."""
    outer = _override.get() or Principal()
    inner = outer.merged(org, team, user, tags)
    token = _override.set(inner)
    try:
        yield inner
    finally:
        _override.reset(token)
