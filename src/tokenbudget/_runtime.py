"""Process-wide state: the active guard and the patches that route SDK calls through it.

Patches are applied with ``wrapt`` when an SDK module is imported (or at once, if it already is) and undone by
:func:`uninstall`, which puts back the very objects that were there before.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import sys
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import wrapt

from .clock import Clock
from .config import Settings, load_settings
from .guard import Guard
from .ledger.base import Ledger

if TYPE_CHECKING:
    from .events import CallEvent
    from .ledger.base import Allowance, Balance

__all__ = ["active_guard", "install", "installed", "uninstall"]

log = logging.getLogger("tokenbudget")

_lock = threading.RLock()
_guard: Guard | None = None
_patched: list[tuple[Any, str, Any]] = []  # (owner, attribute, original object from owner.__dict__)
_hooked: set[str] = set()

_SDKS = ("openai", "anthropic")

_alerts_lock = threading.Lock()
"""Guards attaching/detaching alert managers and replacing :class:`_PendingAlerts` (``alerts`` shares it)."""


def active_guard() -> Guard | None:
    return _guard


def installed() -> bool:
    return _guard is not None


def _resolve_owner(module: Any, dotted: str) -> tuple[Any, str]:
    parts = dotted.split(".")
    owner = module
    for p in parts[:-1]:
        owner = getattr(owner, p)
    return owner, parts[-1]


def _wrappers(sdk: str) -> tuple[Any, tuple[tuple[str, str, str], ...]]:
    from .integrations import base

    mod: Any
    if sdk == "openai":
        from .integrations import openai as mod

        adapter: Any = mod.OpenAIAdapter()
    else:
        from .integrations import anthropic as mod

        adapter = mod.AnthropicAdapter()
    table = {
        "sync": base.make_request_wrapper(adapter),
        "async": base.make_async_request_wrapper(adapter),
        "events": base.events_wrapper,
        "aevents": base.async_events_wrapper,
    }
    return table, mod.PATCHES


def _patch_sdk(sdk: str) -> None:
    with _lock:
        if _guard is None:
            return
        if any(getattr(owner, "__module__", "").split(".")[0] == sdk for owner, _, _ in _patched):
            return
        try:
            table, patches = _wrappers(sdk)
            for module_name, dotted, kind in patches:
                module = importlib.import_module(module_name)
                owner, attr = _resolve_owner(module, dotted)
                original = owner.__dict__[attr]
                wrapt.wrap_function_wrapper(owner, attr, table[kind])
                _patched.append((owner, attr, original))
            if sdk == "anthropic":
                _silence_anthropic_spans()
        except (AttributeError, KeyError, ImportError) as exc:
            log.warning(
                "tokenbudget could not wrap this version of the %s SDK (%s); its calls are NOT guarded", sdk, exc
            )


def _silence_anthropic_spans() -> None:
    """One call, one span: while tokenbudget is installed it emits the call's span and the SDK's own is off.

    The SDK asks ``BaseClient._tracer`` for a tracer on every call and makes no span when it is ``None``.
    """
    module = importlib.import_module("anthropic._base_client")
    owner = module.BaseClient
    if "_tracer" not in owner.__dict__:
        return
    original = owner.__dict__["_tracer"]
    owner._tracer = property(lambda self: None)
    _patched.append((owner, "_tracer", original))


def _on_import(module: Any) -> None:
    _patch_sdk(module.__name__)


class _PendingAlerts:
    """Stands in for a guard's alert manager until its first call settles, so ``install()`` need not import
    ``tokenbudget.alerts`` (and start the thread that seeds spike baselines from the ledger). The first call, any
    ``tokenbudget.alerts.get_manager``, or importing ``tokenbudget.alerts`` replaces it with the real manager, which
    seeds from the history up to ``installed_at``, exactly what an eager attach at install would have read.
    """

    __slots__ = ("guard", "installed_at")

    def __init__(self, guard: Guard) -> None:
        self.guard = weakref.ref(guard)  # the guard holds this in its listeners: no cycle
        self.installed_at = guard.clock.now()

    def __call__(
        self, event: CallEvent, allowances: tuple[Allowance, ...] = (), balances: Mapping[str, Balance] | None = None
    ) -> None:
        guard = self.guard()
        if guard is None:
            return
        from .alerts import get_manager

        manager = get_manager(guard)  # None: detached meanwhile (re-install, uninstall)
        if manager is not None:
            manager.on_event(event, allowances, balances)


def _attach_alerts(guard: Guard) -> None:
    if "tokenbudget.alerts" in sys.modules:  # already paid for (on_alert, an earlier call): attach as before
        from .alerts import attach_alerts

        attach_alerts(guard)
        return
    with _alerts_lock:
        guard.budget_listeners.append(_PendingAlerts(guard))


def _detach_alerts(guard: Guard) -> None:
    if "tokenbudget.alerts" in sys.modules:
        from .alerts import detach_alerts  # waits for an import in progress in another thread to finish

        detach_alerts(guard)
        return
    with _alerts_lock:  # not loaded: at most a stand-in to drop (alerts takes this lock before replacing one)
        guard.budget_listeners[:] = [f for f in guard.budget_listeners if not isinstance(f, _PendingAlerts)]


def install(
    config: str | os.PathLike[str] | Mapping[str, Any] | Settings | None = None,
    *,
    ledger: Ledger | str | None = None,
    clock: Clock | None = None,
    tracer_provider: Any = None,
    meter_provider: Any = None,
    **settings: Any,
) -> Guard:
    """Guard every OpenAI / Anthropic SDK call in this process; returns the active :class:`Guard`.

    ``config`` is a path to a TOML file, a dict with the same keys, or :class:`Settings`; keyword settings override
    it. ``ledger`` is a URL (``"sqlite:///budgets.db"``) or a ready :class:`Ledger`; ``clock``, ``tracer_provider``
    and ``meter_provider`` are for tests and for apps that do not use the global OpenTelemetry providers. Calling it
    again with no arguments returns the active guard; with new ones it replaces the guard (patches stay in place).
    """
    global _guard
    if isinstance(ledger, str):
        settings["ledger"] = ledger
        ledger = None
    elif ledger is not None and not isinstance(ledger, Ledger):
        from .errors import ConfigError

        raise ConfigError(
            f"expected a URL string or a Ledger, got {type(ledger).__name__}", key="ledger", source="install()"
        )
    with _lock:
        fresh_args = config is not None or settings or ledger is not None or clock is not None
        if _guard is not None and not fresh_args and tracer_provider is None and meter_provider is None:
            return _guard
        resolved = load_settings(config, **settings)
        new = Guard(
            resolved, ledger=ledger, clock=clock, tracer_provider=tracer_provider, meter_provider=meter_provider
        )
        _attach_alerts(new)
        old, _guard = _guard, new
        if old is not None:
            _detach_alerts(old)
        if old is not None and old.ledger is not new.ledger:
            old.close()
        for sdk in _SDKS:
            if sdk in _hooked:
                if sdk in sys.modules:
                    _patch_sdk(sdk)
                continue
            _hooked.add(sdk)
            wrapt.register_post_import_hook(_on_import, sdk)  # runs now if the SDK is already imported
        return new


@atexit.register
def _settle_at_exit() -> None:
    """A script that exits without ``uninstall()`` must not lose a charge its ledger refused a moment earlier (the
    answer came while another process held the SQLite lock, or Redis was away): one last try, then a warning."""
    guard = _guard
    if guard is None:
        return
    try:
        owed = guard.settle_deferred()
    except Exception:  # never turn a clean exit into a traceback
        logging.getLogger("tokenbudget").exception("tokenbudget could not settle its deferred calls at exit")
        return
    if owed:
        logging.getLogger("tokenbudget").warning(
            "tokenbudget exits with %d settled call(s) the ledger %s would not take; their holds lapse with the "
            "lease, and their cost is not charged", owed, guard.ledger.url,
        )


def uninstall() -> None:
    """Remove every patch, putting back the identical original objects, and close the guard's ledger."""
    global _guard
    with _lock:
        while _patched:
            owner, attr, original = _patched.pop()
            setattr(owner, attr, original)
        old, _guard = _guard, None
        if old is not None:
            _detach_alerts(old)
            old.close()
