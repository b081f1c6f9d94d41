"""Ledgers, and :func:`open_ledger`, which turns the ``ledger`` setting into one.

Backends other than memory are imported only when asked for, so ``import tokenbudget`` stays cheap and works on
Pythons built without ``sqlite3`` or installs without ``redis``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .base import Allowance, Balance, Grant, Ledger, Refusal, Reservation
from .memory import MemoryLedger

if TYPE_CHECKING:
    from .sqlite import SQLiteLedger, default_ledger_path

__all__ = [
    "Allowance",
    "Balance",
    "Grant",
    "Ledger",
    "MemoryLedger",
    "Refusal",
    "Reservation",
    "SQLiteLedger",
    "default_ledger_path",
    "open_ledger",
]

_FORMS = (
    "memory:// (this process only), sqlite:///PATH (sqlite:////absolute/path.db or sqlite:///relative/path.db), "
    "redis://HOST[:PORT][/DB] or rediss://... (a fleet; needs tokenbudget[redis]), or unset for the default SQLite "
    "file in the user state directory"
)


def open_ledger(url: str | None, *, on_error: str = "closed") -> Ledger:
    """Open the ledger a ``ledger`` setting names; ``None`` means the per-user SQLite file.

    ``on_error`` (the ``on_ledger_error`` setting) matters only to networked ledgers, which can be unreachable.
    """
    if url is None:
        from .sqlite import SQLiteLedger, default_ledger_path

        return SQLiteLedger(default_ledger_path())
    if not isinstance(url, str):
        raise ConfigError(f"expected a URL string, got {type(url).__name__}; allowed: {_FORMS}", key="ledger")
    text = url.strip()
    lower = text.lower()
    if lower == "memory://":
        return MemoryLedger()
    if lower.startswith("sqlite:///"):
        path = text[len("sqlite:///") :]
        if not path or path.endswith(("/", os.sep)):
            raise ConfigError(f"{url!r} names no file; allowed: {_FORMS}", key="ledger")
        if "\x00" in path or (not path.isprintable() and any("\ud800" <= c <= "\udfff" for c in path)):
            raise ConfigError(f"{url!r} is not a usable file name (NUL or lone surrogate); allowed: {_FORMS}",
                              key="ledger")
        from .sqlite import SQLiteLedger

        return SQLiteLedger(path)
    if lower.startswith(("redis://", "rediss://")):
        try:
            from .redis import RedisLedger  # type: ignore[import-not-found,unused-ignore]
        except ModuleNotFoundError as exc:
            if exc.name not in ("tokenbudget.ledger.redis", "redis") and not (exc.name or "").startswith("redis."):
                raise
            raise ConfigError(
                f"{_shown(url)!r} needs the Redis ledger; install it with `pip install 'tokenbudget[redis]'`",
                key="ledger",
            ) from exc
        ledger: Ledger = RedisLedger(text, on_error=on_error)
        return ledger
    raise ConfigError(f"unsupported ledger URL {_shown(url)!r}; allowed: {_FORMS}", key="ledger")


def _shown(url: str) -> str:
    """A ledger URL as it may appear in an error message: a password in it (``scheme://user:PASSWORD@host``) is ***."""
    import re

    return re.sub(r"(://[^/@:]*:)[^/]*@", r"\1***@", url)


def __getattr__(name: str) -> Any:
    if name in ("SQLiteLedger", "default_ledger_path"):
        from . import sqlite

        return getattr(sqlite, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
