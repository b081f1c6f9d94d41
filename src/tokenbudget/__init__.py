"""tokenbudget: a client-side budget guard for the OpenAI and Anthropic SDKs.

``tokenbudget.install()`` makes every SDK call estimate its worst case, reserve it against every budget that covers
it, commit what the vendor really billed, and emit one OpenTelemetry span with the GenAI token attributes and cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._runtime import active_guard, install, installed, uninstall
from .budget import budget
from .calls import CallRequest, Usage
from .config import BudgetRule, DowngradeTarget, Settings
from .errors import BudgetExceeded, ConfigError, LedgerError, LedgerUnavailable, TokenBudgetError, UnknownModelError
from .events import CallEvent
from .guard import Guard
from .principal import Principal, scope

if TYPE_CHECKING:
    from .account import grant, remaining, spend
    from .alerts import Alert, on_alert

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "BudgetExceeded",
    "BudgetRule",
    "CallEvent",
    "CallRequest",
    "ConfigError",
    "DowngradeTarget",
    "Guard",
    "LedgerError",
    "LedgerUnavailable",
    "Principal",
    "Settings",
    "TokenBudgetError",
    "UnknownModelError",
    "Usage",
    "__version__",
    "active_guard",
    "budget",
    "grant",
    "install",
    "installed",
    "on_alert",
    "remaining",
    "scope",
    "spend",
    "uninstall",
]

# Imported on first use: ``import tokenbudget`` stays light for code that never calls them.
_LAZY = {"grant": "account", "remaining": "account", "spend": "account", "Alert": "alerts", "on_alert": "alerts"}


def __getattr__(name: str) -> Any:
    import importlib

    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    if name in ("account", "alerts"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
