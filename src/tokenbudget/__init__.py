"""tokenbudget: a client-side budget guard for the OpenAI and Anthropic SDKs.

``tokenbudget.install()`` makes every SDK call estimate its worst case, reserve it against every budget that covers
it, commit what the vendor really billed, and emit one OpenTelemetry span with the GenAI token attributes and cost.
"""

from __future__ import annotations

from ._runtime import active_guard, install, installed, uninstall
from .account import grant, remaining, spend
from .alerts import Alert, on_alert
from .budget import budget
from .calls import CallRequest, Usage
from .config import BudgetRule, DowngradeTarget, Settings
from .errors import BudgetExceeded, ConfigError, LedgerError, LedgerUnavailable, TokenBudgetError, UnknownModelError
from .events import CallEvent
from .guard import Guard
from .principal import Principal, scope

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
