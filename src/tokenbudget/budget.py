"""Per-invocation budgets for agent functions: ``@tokenbudget.budget(...)`` or ``with tokenbudget.budget(...)``.

Each invocation gets its own allowance, reserved against together with the configured budgets (all or none);
nested budgeted functions are charged at every level. The active runs live in a ``contextvars`` stack, so they
follow asyncio tasks and threads started with ``asyncio.to_thread``; generators re-enter their run on each step.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import uuid
from collections.abc import AsyncIterator, Callable, Generator
from types import TracebackType
from typing import Any, Literal, NamedTuple, TypeVar, overload

from .config import BudgetRule
from .errors import ConfigError
from .ledger.base import Allowance
from .money import usd_to_micros

__all__ = ["active_function_allowances", "budget", "rule_for_function_allowance"]

F = TypeVar("F", bound=Callable[..., Any])


class _Run(NamedTuple):  # a NamedTuple, not a dataclass: cheaper to define at import (see guard._Reserve)
    name: str
    run_id: str
    rule: BudgetRule
    allowance: Allowance


_runs: contextvars.ContextVar[tuple[_Run, ...]] = contextvars.ContextVar("tokenbudget_runs", default=())


def active_function_allowances() -> tuple[tuple[Allowance, ...], str | None, str | None]:
    """Allowances of every enclosing budgeted run, and the innermost run's name and id (for events)."""
    runs = _runs.get()
    if not runs:
        return (), None, None
    return tuple(r.allowance for r in runs), runs[-1].name, runs[-1].run_id


def rule_for_function_allowance(allowance: Allowance) -> BudgetRule | None:
    for run in _runs.get():
        if run.allowance.key == allowance.key:
            return run.rule
    return None


def _record_run_end(run: _Run, failed: bool) -> None:
    from ._runtime import active_guard
    from .events import CallEvent

    guard = active_guard()
    if guard is None or not guard.settings.record_events:
        return
    try:
        guard.ledger.record(
            CallEvent(
                id=run.run_id,
                time=guard.clock.now(),
                provider="tokenbudget",
                model="-",
                operation="function_run",
                status="error" if failed else "ok",
                decision="allow",
                function=run.name,
                run_id=run.run_id,
                budget_keys=(run.allowance.key,),
            )
        )
    except Exception:  # never let bookkeeping break the caller's function
        import logging

        logging.getLogger("tokenbudget").exception("could not record the end of budgeted run %s", run.name)


class budget:
    """An allowance for each invocation of a function (or each ``with`` block).

    ``on_exhaust`` is ``raise`` (default), ``downgrade``, ``clamp`` or ``warn``, as for configured budgets.
    """

    def __init__(
        self,
        limit_usd: float | None = None,
        *,
        limit_tokens: int | None = None,
        on_exhaust: Literal["raise", "downgrade", "clamp", "warn"] = "raise",
        name: str | None = None,
        min_output_tokens: int = 64,
    ) -> None:
        try:
            self.rule = BudgetRule(
                scope="org",
                limit_usd=limit_usd,
                limit_tokens=limit_tokens,
                on_exhaust=on_exhaust,
                min_output_tokens=min_output_tokens,
            )
        except Exception as exc:  # pydantic ValidationError -> our error type, naming the argument
            raise ConfigError(str(exc).splitlines()[-1].strip() if str(exc) else "invalid", key="budget()") from None
        self.name = name
        self._tokens: list[contextvars.Token[tuple[_Run, ...]]] = []
        self._active: list[_Run] = []

    # -- runs ----------------------------------------------------------------------------------------------------
    def _new_run(self, name: str) -> _Run:
        run_id = uuid.uuid4().hex
        rule = self.rule
        allowance = Allowance(
            key=f"fn:{name}#{run_id}",
            scope=f"fn:{name}",
            limit_micros=None if rule.limit_usd is None else usd_to_micros(rule.limit_usd),
            limit_tokens=rule.limit_tokens,
            window_end=None,
            enforce=rule.on_exhaust != "warn",
        )
        return _Run(name, run_id, rule, allowance)

    # -- context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> budget:
        run = self._new_run(self.name or "block")
        self._active.append(run)
        self._tokens.append(_runs.set((*_runs.get(), run)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _runs.reset(self._tokens.pop())
        _record_run_end(self._active.pop(), exc is not None)

    async def __aenter__(self) -> budget:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    @property
    def run_id(self) -> str | None:
        return self._active[-1].run_id if self._active else None

    # -- decorator ---------------------------------------------------------------------------------------------
    @overload
    def __call__(self, fn: F) -> F: ...
    @overload
    def __call__(self, fn: Any) -> Any: ...

    def __call__(self, fn: Any) -> Any:
        name = self.name or f"{fn.__module__}.{fn.__qualname__}"
        if inspect.isasyncgenfunction(fn):
            return functools.wraps(fn)(self._wrap_asyncgen(fn, name))
        if inspect.isgeneratorfunction(fn):
            return functools.wraps(fn)(self._wrap_gen(fn, name))
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                run = self._new_run(name)
                token = _runs.set((*_runs.get(), run))
                failed = True
                try:
                    result = await fn(*args, **kwargs)
                    failed = False
                    return result
                finally:
                    _runs.reset(token)
                    _record_run_end(run, failed)

            return run_async

        @functools.wraps(fn)
        def run_sync(*args: Any, **kwargs: Any) -> Any:
            run = self._new_run(name)
            token = _runs.set((*_runs.get(), run))
            failed = True
            try:
                result = fn(*args, **kwargs)
                failed = False
                return result
            finally:
                _runs.reset(token)
                _record_run_end(run, failed)

        return run_sync

    def _wrap_gen(
        self, fn: Callable[..., Generator[Any, Any, Any]], name: str
    ) -> Callable[..., Generator[Any, Any, Any]]:
        def run_gen(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
            run = self._new_run(name)
            ctx = contextvars.copy_context()
            ctx.run(lambda: _runs.set((*_runs.get(), run)))
            gen = ctx.run(fn, *args, **kwargs)
            failed = True
            try:
                value: Any = None
                while True:
                    try:
                        item = ctx.run(gen.send, value)
                    except StopIteration as stop:
                        failed = False
                        return stop.value
                    value = yield item
            finally:
                gen.close()
                _record_run_end(run, failed)

        return run_gen

    def _wrap_asyncgen(self, fn: Callable[..., AsyncIterator[Any]], name: str) -> Callable[..., AsyncIterator[Any]]:
        async def run_agen(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            run = self._new_run(name)
            token = _runs.set((*_runs.get(), run))
            failed = True
            try:
                agen = fn(*args, **kwargs)
                async for item in agen:
                    _runs.reset(token)
                    try:
                        yield item
                    finally:
                        token = _runs.set((*_runs.get(), run))
                failed = False
            finally:
                _runs.reset(token)
                _record_run_end(run, failed)

        return run_agen
