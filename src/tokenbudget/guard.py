"""Before and after one call: estimate, price, reserve against every matching budget, then settle exactly once.

The negotiation (which budgets, what to do when one says no) is written once as a generator that *asks* for
ledger operations; :meth:`Guard.begin` answers them synchronously and :meth:`Guard.abegin` with ``await``, so sync
and async calls follow the same rules.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, TypeVar, overload

from .budget import active_function_allowances, rule_for_function_allowance
from .calls import CallRequest, Usage
from .clock import Clock, SystemClock
from .config import BudgetRule, DowngradeTarget, Settings
from .errors import BudgetExceeded, ConfigError, LedgerError, LedgerUnavailable
from .events import CallEvent
from .ledger import open_ledger
from .ledger.base import Allowance, Balance, Ledger, Refusal, Reservation
from .money import micros_to_usd
from .policy import Policy, RuleMatch
from .principal import Principal, current_principal, default_principal
from .telemetry import Telemetry

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .estimate import Estimator
    from .pricing import ModelPrice, PriceBook

__all__ = ["Guard", "Ticket"]

log = logging.getLogger("tokenbudget")
_T = TypeVar("_T")

EventListener = Callable[[CallEvent], None]
BudgetListener = Callable[[CallEvent, tuple[Allowance, ...], Mapping[str, Balance]], None]
"""Also given the configured budgets (allowances) the call was charged to, empty for calls refused before sending,
and their balances right after the call (by allowance key, for the limited ones), so listeners need not re-read."""


_Settlement = tuple[CallEvent, "CallEvent | None", int, int, float, float]
"""What :meth:`Guard._settlement` works out: the event, the event to record (or None), cost, tokens, now, duration."""


# The guard's internal records are NamedTuples, not dataclasses: on Python 3.11 each @dataclass compiles its methods
# with exec() when the module is imported, about a millisecond apiece, and start-up is one of the guard's costs.
class _Reserve(NamedTuple):
    allowances: tuple[Allowance, ...]
    micros: int
    tokens: int


class _Balances(NamedTuple):
    allowances: tuple[Allowance, ...]


class _Plan(NamedTuple):
    request: CallRequest
    price: ModelPrice
    input_tokens: int
    max_output: int
    micros: int
    tokens: int


@dataclass(slots=True)
class Ticket:
    """One guarded call in flight: its reservation, span and what the guard decided. Settles exactly once."""

    guard: Guard
    request: CallRequest
    price: ModelPrice
    input_tokens: int
    reserved_micros: int
    reservation: Reservation
    matches: list[RuleMatch]
    principal: Principal
    span: Span
    started: float
    decision: str = "allow"
    original_model: str | None = None
    original_estimated_micros: int = 0
    route: DowngradeTarget | None = None
    function: str | None = None
    run_id: str | None = None
    output: Any = None
    """With ``capture_content`` only: what the model answered, as JSON-able data in the vendor's own shape (set by
    the SDK layer before it settles; it goes on the span as ``gen_ai.output.messages`` and nowhere else)."""
    settled: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def estimated_micros(self) -> int:
        return self.reserved_micros

    @property
    def capture_content(self) -> bool:
        """Whether the user opted in to prompt and completion text on spans: only then is :attr:`output` worth
        building."""
        return self.guard.telemetry.capture_content

    def _claim(self) -> bool:
        with self._lock:
            if self.settled:
                return False
            self.settled = True
            return True

    def ok(self, usage: Usage) -> None:
        """The vendor answered and reported (or we counted) usage: charge it."""
        if self._claim():
            self.guard._settle(self, usage, "ok" if usage.exact else "partial", None)

    def error(self, exc: BaseException) -> None:
        """The vendor answered with an error status: it bills nothing, so we charge nothing."""
        if self._claim():
            self.guard._settle(self, None, "error", exc)

    def abandoned(self, exc: BaseException | None, usage: Usage | None = None) -> None:
        """The client gave up after sending: the vendor may bill the input, so charge the estimate (or what we saw)."""
        if self._claim():
            if usage is None:
                usage = Usage(input_tokens=self.input_tokens, exact=False)
            self.guard._settle(self, usage, "abandoned", exc)

    def unsent(self, exc: BaseException) -> None:
        """The request never left (connection refused, bad arguments): nothing to charge."""
        if self._claim():
            self.guard._settle(self, None, "unsent", exc)

    # Async forms: an async caller's settlement awaits the ledger (Redis, SQLite in a thread) instead of blocking
    # its event loop. Exception paths keep the sync forms: they must finish even while a task is being cancelled.
    async def aok(self, usage: Usage) -> None:
        if self._claim():
            await self.guard._asettle(self, usage, "ok" if usage.exact else "partial", None)

    async def aabandoned(self, exc: BaseException | None, usage: Usage | None = None) -> None:
        if self._claim():
            if usage is None:
                usage = Usage(input_tokens=self.input_tokens, exact=False)
            await self.guard._asettle(self, usage, "abandoned", exc)


class Guard:
    """The active budget guard. :func:`tokenbudget.install` creates one; tests may create their own."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        ledger: Ledger | None = None,
        clock: Clock | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        prices: PriceBook | None = None,
        estimator: Estimator | None = None,
    ) -> None:
        from .estimate import Estimator
        from .pricing import PriceBook

        self.settings = settings or Settings()
        s = self.settings
        self.clock: Clock = clock or SystemClock()
        self.ledger: Ledger = ledger if ledger is not None else open_ledger(s.ledger, on_error=s.on_ledger_error)
        self.prices = prices or PriceBook(s.prices, unknown_model=s.unknown_model)
        self.estimator = estimator or Estimator()
        self.policy = Policy(s.all_rules(), s.timezone)
        self.telemetry = Telemetry(tracer_provider, meter_provider, capture_content=s.capture_content)
        self.default_principal = default_principal(s.org, s.team, s.user, s.tags)
        self.listeners: list[EventListener] = []
        self.budget_listeners: list[BudgetListener] = []
        self._brownout = any(r.downgrade_at is not None for r in s.all_rules())
        self._deferred: list[tuple[Reservation, int, int, CallEvent | None, float]] = []
        """Settlements the ledger refused (locked, full, down): retried before the next reservation and at close."""
        self._deferred_lock = threading.Lock()

    # -- before ------------------------------------------------------------------------------------------------
    def _plan(self, request: CallRequest) -> _Plan:
        price = self.prices.price(request.model, _price_provider(request))
        input_tokens = self.estimator.input_tokens(request)
        if request.operation == "embeddings":
            max_output = 0
        else:
            max_output = request.max_output_tokens if request.max_output_tokens is not None else price.max_output_tokens
            if not 0 <= max_output <= 1_000_000_000:  # the vendor would refuse it; the ledgers could not hold it
                raise ConfigError(f"max_tokens={max_output} is not a usable output limit (0 to 1,000,000,000)",
                                  key="max_tokens", source=f"{request.provider} {request.model}")
        may_cache = request.api == "anthropic" and _has_cache_control(request.body)
        micros = self.prices.worst_case_micros(price, input_tokens, max_output, may_write_cache=may_cache)
        return _Plan(request, price, input_tokens, max_output, micros, input_tokens + max_output)

    def _negotiate(
        self, request: CallRequest
    ) -> Generator[_Reserve | _Balances, Reservation | Refusal | list[Balance], Ticket]:
        now = self.clock.now()
        principal = current_principal(self.default_principal)
        plan = self._plan(request)
        matches = self.policy.matches(principal, request.model, now)
        fn_allowances, function, run_id = active_function_allowances()
        span = self.telemetry.start(request)
        decision = "allow"
        original_model: str | None = None
        original_micros = plan.micros
        route: DowngradeTarget | None = None

        try:
            if self._brownout:
                brown = [m for m in matches if m.rule.downgrade_at is not None]
                if brown:
                    balances = yield _Balances(tuple(m.allowance for m in brown))
                    assert isinstance(balances, list)
                    for m, bal in zip(brown, balances, strict=True):
                        target = self._target(request.model)
                        if target is not None and _fraction_spent(bal) >= (m.rule.downgrade_at or 0.0):
                            plan, route = self._downgraded(plan, target), target
                            original_model, decision = request.model, "downgrade"
                            matches = self.policy.matches(principal, plan.request.model, now)
                            break

            for _attempt in range(4):
                allowances = tuple(m.allowance for m in matches) + fn_allowances
                result = yield _Reserve(allowances, plan.micros, plan.tokens)
                if isinstance(result, Reservation):
                    ticket = Ticket(
                        self, plan.request, plan.price, plan.input_tokens, plan.micros, result, matches, principal,
                        span, time.perf_counter(), decision, original_model, original_micros, route, function, run_id,
                    )
                    if any(not a.enforce for a in allowances) and decision == "allow":
                        balances = yield _Balances(tuple(a for a in allowances if not a.enforce))
                        assert isinstance(balances, list)
                        if any(b.remaining_micros is not None and b.remaining_micros < 0 for b in balances) or any(
                            b.remaining_tokens is not None and b.remaining_tokens < 0 for b in balances
                        ):
                            ticket.decision = "warn"
                            log.warning("budget exceeded (warn only): %s %s", plan.request.model, principal.team)
                    return ticket
                assert isinstance(result, Refusal)
                rule = _rule_for(result.allowance, matches)
                policy = rule.on_exhaust if rule is not None else "raise"
                if policy == "clamp" and rule is not None and decision != "clamp":
                    clamped = self._clamped(plan, result, rule)
                    if clamped is not None:
                        plan, decision = clamped, "clamp"
                        continue
                if policy == "downgrade" and decision != "downgrade":
                    target = self._target(plan.request.model)
                    if target is not None:
                        original_model, decision = plan.request.model, "downgrade"
                        plan, route = self._downgraded(plan, target), target
                        matches = self.policy.matches(principal, plan.request.model, now)
                        continue
                raise self._exceeded(result, plan)
            assert isinstance(result, Refusal)
            raise self._exceeded(result, plan)
        except BaseException as exc:
            self.telemetry.refused(span, exc, decision="deny", estimated_micros=plan.micros)
            if isinstance(exc, BudgetExceeded):
                self._record_denied(plan, principal, exc, original_model, function, run_id)
            raise

    def begin(self, request: CallRequest) -> Ticket:
        """Reserve for ``request`` or raise :class:`BudgetExceeded`; may rewrite the model or max tokens."""
        gen = self._negotiate(request)
        ask = next(gen)
        while True:
            try:
                answer = self._answer(ask)
            except BaseException as exc:
                self._fail_negotiation(gen, exc)
            try:
                ask = gen.send(answer)
            except StopIteration as stop:
                ticket: Ticket = stop.value
                return ticket

    async def abegin(self, request: CallRequest) -> Ticket:
        await self.estimator.await_encoding(request.model)  # a first load must not stall the caller's event loop
        gen = self._negotiate(request)
        ask = next(gen)
        cancelled: BaseException | None = None
        while True:
            try:
                # At once when the ledger need not wait (memory, an uncontended SQLite file): no thread, no task.
                answer = self._answer(ask, nowait=True)
                if answer is None:
                    # A ledger working in a thread may finish the reservation after the caller was cancelled: take its
                    # answer anyway, so no hold is orphaned, and give the hold back below (the request was never sent).
                    waited, caught = await self._through_cancel(self._aanswer(ask))
                    answer, cancelled = waited, cancelled or caught
            except BaseException as exc:
                self._fail_negotiation(gen, exc)
            try:
                ask = gen.send(answer)
            except StopIteration as stop:
                ticket: Ticket = stop.value
                if cancelled is not None:
                    ticket.unsent(cancelled)
                    raise cancelled from None
                return ticket
            except BaseException as exc:
                if cancelled is not None:
                    raise cancelled from exc
                raise

    @overload
    def _answer(self, ask: _Reserve | _Balances) -> Reservation | Refusal | list[Balance]: ...
    @overload
    def _answer(self, ask: _Reserve | _Balances, *, nowait: bool) -> Reservation | Refusal | list[Balance] | None: ...
    def _answer(
        self, ask: _Reserve | _Balances, *, nowait: bool = False
    ) -> Reservation | Refusal | list[Balance] | None:
        """The ledger's answer to one step of the negotiation. ``nowait``: through the ledger's nowait forms (see
        :meth:`Ledger.reserve_nowait`), so None when the ledger would have to wait (the waiting forms never are)."""
        if self._deferred:
            self._settle_deferred()
        now = self.clock.now()
        ledger = self.ledger
        if isinstance(ask, _Reserve):
            reserve = ledger.reserve_nowait if nowait else ledger.reserve
            return reserve(ask.allowances, ask.micros, ask.tokens, lease_seconds=self.settings.lease_seconds, now=now)
        balance = ledger.balance_nowait if nowait else ledger.balance
        out: list[Balance] = []
        for a in ask.allowances:
            bal = balance(a, now=now)
            if bal is None:
                return None
            out.append(bal)
        return out

    def _fail_negotiation(self, gen: Generator[Any, Any, Any], exc: BaseException) -> NoReturn:
        """The ledger failed while the negotiation waited for its answer: raise the caller's error inside the
        negotiation, which ends the call's span with it and re-raises it. (Left suspended, the negotiation ended the
        span only when collected, as a ``GeneratorExit``; an async caller's traceback could keep it, and the span,
        alive.) The one place a ledger's own error becomes :class:`LedgerUnavailable` for every ledger step."""
        if isinstance(exc, LedgerError) and not isinstance(exc, LedgerUnavailable):
            error = LedgerUnavailable(f"the budget ledger ({self.ledger.url}) refused the reservation: {exc}")
            error.__cause__, error.__suppress_context__ = exc, True
            exc = error
        gen.throw(exc)
        raise exc  # pragma: no cover - the negotiation re-raises what it is thrown

    async def _aanswer(self, ask: _Reserve | _Balances) -> Reservation | Refusal | list[Balance]:
        if self._deferred:
            self._settle_deferred()
        now = self.clock.now()
        if isinstance(ask, _Reserve):
            return await self.ledger.areserve(
                ask.allowances, ask.micros, ask.tokens, lease_seconds=self.settings.lease_seconds, now=now
            )
        return [await self.ledger.abalance(a, now=now) for a in ask.allowances]

    # -- policies ----------------------------------------------------------------------------------------------
    def _target(self, model: str) -> DowngradeTarget | None:
        table = self.settings.downgrade
        target = table.get(model) or table.get("*")
        if target is None or target.model == model:
            return None
        return target

    def _downgraded(self, plan: _Plan, target: DowngradeTarget) -> _Plan:
        req = plan.request
        api = target.api or req.api
        new = replace(req, model=target.model, body={**req.body, "model": target.model}, api=api)
        if api != req.api:  # estimate what the target will be sent, in its protocol
            from .integrations.translate import translated_for_estimate

            new.body, new.max_output_tokens = translated_for_estimate(new.body, req.api, api, new.max_output_tokens)
        if target.base_url:
            from urllib.parse import urlsplit

            parts = urlsplit(target.base_url)
            new.server_address, new.server_port = parts.hostname, parts.port
        return self._plan(new)

    def _clamped(self, plan: _Plan, refusal: Refusal, rule: BudgetRule) -> _Plan | None:
        bal = refusal.balance
        room_micros = bal.remaining_micros
        room_tokens = bal.remaining_tokens
        price = plan.price
        max_out = plan.max_output
        if room_micros is not None:
            input_cost = self.prices.worst_case_micros(price, plan.input_tokens, 0)
            per_token = max(price.output, 1)
            affordable = ((room_micros - input_cost) * 1_000_000) // per_token
            max_out = min(max_out, int(affordable))
        if room_tokens is not None:
            max_out = min(max_out, room_tokens - plan.input_tokens)
        if max_out < rule.min_output_tokens or max_out >= plan.max_output:
            return None
        req = plan.request
        new = replace(req, max_output_tokens=max_out)
        micros = self.prices.worst_case_micros(price, plan.input_tokens, max_out)
        return _Plan(new, price, plan.input_tokens, max_out, micros, plan.input_tokens + max_out)

    def _exceeded(self, refusal: Refusal, plan: _Plan) -> BudgetExceeded:
        b = refusal.balance
        return BudgetExceeded(
            refusal.allowance.scope,
            limit=None if b.limit_micros is None else micros_to_usd(b.limit_micros),
            spent=micros_to_usd(b.spent_micros),
            reserved=micros_to_usd(b.reserved_micros),
            requested=micros_to_usd(refusal.requested_micros),
            limit_tokens=b.limit_tokens,
            spent_tokens=b.spent_tokens,
            requested_tokens=refusal.requested_tokens,
            model=plan.request.model,
        )

    # -- after -------------------------------------------------------------------------------------------------
    def _settle(self, ticket: Ticket, usage: Usage | None, status: str, exc: BaseException | None) -> None:
        settlement = self._settlement(ticket, usage, status)
        self._settle_by(self.ledger.settle_and_read, ticket, usage, status, exc, settlement)

    def _settle_by(
        self, step: Callable[..., tuple[bool, dict[str, Balance]] | None], ticket: Ticket, usage: Usage | None,
        status: str, exc: BaseException | None, settlement: _Settlement,
    ) -> bool:
        """Charge ``settlement`` with the sync ``step`` (``settle_and_read`` or its nowait form), then end the span and
        tell the listeners. False, with nothing done, when the nowait form says it would wait. A ledger that fails
        leaves the charge to be retried (see :meth:`settle_deferred`); the span and listeners still get the call."""
        event, record, cost, tokens, now, duration = settlement
        try:
            done = step(ticket.reservation, cost, tokens, record, now=now, allowances=self._balances_wanted(ticket))
        except Exception:
            self._settle_failed(ticket, cost, tokens, record, now)
            done = (False, {})
        if done is None:
            return False
        self._finish(ticket, event, usage, cost, status, done[1], duration, exc)
        return True

    async def _asettle(self, ticket: Ticket, usage: Usage | None, status: str, exc: BaseException | None) -> None:
        settlement = self._settlement(ticket, usage, status)
        if self._settle_by(self.ledger.settle_and_read_nowait, ticket, usage, status, exc, settlement):
            return
        # The answer is in hand, so the charge is owed: a cancel that lands while the ledger commits must not cut the
        # commit (or the span) short. Finish the settlement, then pass the cancel on to the caller.
        _, cancelled = await self._through_cancel(self._asettle_now(ticket, usage, status, exc, settlement))
        if cancelled is not None:
            raise cancelled

    async def _through_cancel(self, ledger_work: Coroutine[Any, Any, _T]) -> tuple[_T, asyncio.CancelledError | None]:
        """Run ``ledger_work`` to its end even if the caller is cancelled meanwhile; return its result and the cancel
        (if one came), for the caller to pass on once the ledger is consistent. (A ledger that can answer without
        waiting never gets here: the nowait steps answer first, and no cancel can land inside them.)"""
        work = asyncio.ensure_future(ledger_work)
        cancelled: asyncio.CancelledError | None = None
        while True:
            try:
                return await asyncio.shield(work), cancelled
            except asyncio.CancelledError as caught:
                if work.cancelled():
                    raise
                cancelled = caught

    async def _asettle_now(
        self, ticket: Ticket, usage: Usage | None, status: str, exc: BaseException | None, settlement: _Settlement
    ) -> None:
        event, record, cost, tokens, now, duration = settlement
        balances: dict[str, Balance] = {}
        try:
            _, balances = await self.ledger.asettle_and_read(
                ticket.reservation, cost, tokens, record, now=now, allowances=self._balances_wanted(ticket)
            )
        except Exception:
            self._settle_failed(ticket, cost, tokens, record, now)
        self._finish(ticket, event, usage, cost, status, balances, duration, exc)

    def _settle_failed(self, ticket: Ticket, cost: int, tokens: int, record: CallEvent | None, now: float) -> None:
        log.exception("tokenbudget could not settle a call in the ledger %s; retrying later", self.ledger.url)
        with self._deferred_lock:  # settle is idempotent: a retry never charges twice
            self._deferred.append((ticket.reservation, cost, tokens, record, now))

    def _finish(
        self, ticket: Ticket, event: CallEvent, usage: Usage | None, cost: int, status: str,
        balances: dict[str, Balance], duration: float, exc: BaseException | None,
    ) -> None:
        remaining = min(
            (b.remaining_micros for b in balances.values() if b.remaining_micros is not None), default=None
        )
        try:
            self.telemetry.finish(
                ticket.span, ticket.request, usage=usage, cost_micros=cost, estimated_micros=ticket.reserved_micros,
                decision=ticket.decision, status=status, remaining_micros=remaining,
                original_model=ticket.original_model,
                principal_attrs=_principal_attrs(ticket.principal, ticket.function),
                duration_s=duration, error=exc, output=ticket.output,
            )
        except Exception:
            log.exception("tokenbudget could not finish a span")
        self._notify(
            event, tuple(m.allowance for m in ticket.matches), balances
        )

    def _settlement(self, ticket: Ticket, usage: Usage | None, status: str) -> _Settlement:
        """What a settled call costs and the event that records it (pure: no ledger, no telemetry)."""
        cost = 0 if usage is None else self.prices.cost_micros(ticket.price, usage)
        tokens = 0 if usage is None else usage.total_tokens
        now = self.clock.now()
        duration = time.perf_counter() - ticket.started
        p = ticket.principal
        event = CallEvent(
            id=ticket.reservation.id,
            time=now,
            provider=ticket.request.provider,
            model=ticket.request.model,
            operation=ticket.request.operation,
            status=status,
            decision=ticket.decision,
            original_model=ticket.original_model,
            org=p.org,
            team=p.team,
            user=p.user,
            tags=dict(p.tags),
            function=ticket.function,
            run_id=ticket.run_id,
            cost_micros=cost,
            estimated_micros=ticket.reserved_micros,
            original_estimated_micros=ticket.original_estimated_micros,
            budget_keys=ticket.reservation.keys,
            duration_s=duration,
        )
        if usage is not None:
            event.input_tokens = usage.input_tokens
            event.output_tokens = usage.output_tokens
            event.cache_read_tokens = usage.cache_read_tokens
            event.cache_write_tokens = usage.cache_write_tokens
            event.cache_write_1h_tokens = usage.cache_write_1h_tokens
            event.reasoning_tokens = usage.reasoning_tokens
        record = event if self.settings.record_events else None
        return event, record, cost, tokens, now, duration

    def _balances_wanted(self, ticket: Ticket) -> list[Allowance]:
        """The limited budgets whose post-settle balances someone reads (the span's remaining USD, threshold
        alerts): read once, in the settle's own step, for both; none when nobody reads them."""
        if self.budget_listeners or ticket.span.is_recording():
            return _limited(ticket)
        return []

    def _record_denied(
        self, plan: _Plan, principal: Principal, exc: BudgetExceeded, original: str | None, fn: str | None,
        run_id: str | None,
    ) -> None:
        event = CallEvent(
            id=os.urandom(16).hex(), time=self.clock.now(), provider=plan.request.provider, model=plan.request.model,
            operation=plan.request.operation, status="denied", decision="deny", original_model=original,
            org=principal.org, team=principal.team, user=principal.user, tags=dict(principal.tags), function=fn,
            run_id=run_id, estimated_micros=plan.micros, budget_keys=(exc.scope,),
        )
        if self.settings.record_events:
            try:
                self.ledger.record(event)
            except Exception:
                log.exception("tokenbudget could not record a denied call")
        self._notify(event)

    def _notify(
        self, event: CallEvent, allowances: tuple[Allowance, ...] = (), balances: Mapping[str, Balance] | None = None
    ) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("a tokenbudget event listener failed; the call is unaffected")
        for budget_listener in self.budget_listeners:
            try:
                budget_listener(event, allowances, balances or {})
            except Exception:
                log.exception("a tokenbudget event listener failed; the call is unaffected")

    def _settle_deferred(self) -> None:
        with self._deferred_lock:
            pending, self._deferred = self._deferred, []
        for i, (reservation, micros, tokens, event, at) in enumerate(pending):
            try:
                self.ledger.settle(reservation, micros, tokens, event, now=at)
            except Exception as exc:
                with self._deferred_lock:
                    self._deferred[:0] = pending[i:]
                log.warning("tokenbudget still cannot settle %d call(s) in the ledger %s: %s", len(pending) - i,
                            self.ledger.url, exc)
                return

    def settle_deferred(self) -> int:
        """Retry the settlements the ledger refused earlier (locked, full, down); returns how many are still owed.

        The guard retries them before its next reservation and in :meth:`close`; this is for the moments in
        between that matter, such as interpreter exit.
        """
        if self._deferred:
            self._settle_deferred()
        return len(self._deferred)

    def close(self) -> None:
        self.settle_deferred()
        self.ledger.close()


def _rule_for(allowance: Allowance, matches: Sequence[RuleMatch]) -> BudgetRule | None:
    for m in matches:
        if m.allowance.key == allowance.key:
            return m.rule
    return rule_for_function_allowance(allowance)


def _fraction_spent(b: Balance) -> float:
    fractions = []
    if b.limit_micros:
        fractions.append((b.spent_micros + b.reserved_micros) / b.limit_micros)
    elif b.limit_micros == 0:
        fractions.append(1.0)
    if b.limit_tokens:
        fractions.append((b.spent_tokens + b.reserved_tokens) / b.limit_tokens)
    return max(fractions, default=0.0)


def _price_provider(request: CallRequest) -> str | None:
    if request.provider in ("openai", "azure.ai.openai"):
        return "openai"
    if request.provider == "anthropic":
        return "anthropic"
    return None


_PLAIN = (str, int, float, bool, type(None), bytes)


def _has_cache_control(body: dict[str, Any]) -> bool:
    """Whether the system blocks, message content blocks or tools carry a ``cache_control`` marker.

    Walks the containers and looks at dict keys only, so the cost is the number of blocks, never the text length
    (a ``repr`` of the body cost 19 ms for a 1M-token prompt). Objects that are not plain containers (a pydantic
    model passed through) are still searched in their ``repr``.
    """
    stack: list[Any] = [body.get("system"), body.get("messages"), body.get("tools")]
    push = stack.append
    while stack:
        value = stack.pop()
        cls = type(value)
        if cls is str or value is None:
            continue
        if cls is dict or isinstance(value, dict):
            if "cache_control" in value:
                return True
            for v in value.values():
                if type(v) is not str:
                    push(v)
        elif cls is list or isinstance(value, (list, tuple)):
            for v in value:
                if type(v) is not str:
                    push(v)
        elif not isinstance(value, _PLAIN) and "cache_control" in repr(value):
            return True
    return False


_PRINCIPAL_ATTRS: dict[tuple[str | None, str | None, str | None], dict[str, str]] = {}


def _principal_attrs(p: Principal, function: str | None) -> dict[str, str]:
    """Span and cost-metric attributes of who called; one shared (never mutated) dict per distinct caller."""
    key = (p.team, p.user, function)
    hit = _PRINCIPAL_ATTRS.get(key)
    if hit is None:
        if len(_PRINCIPAL_ATTRS) >= 4096:
            _PRINCIPAL_ATTRS.clear()
        hit = _PRINCIPAL_ATTRS[key] = _build_principal_attrs(p, function)
    return hit


def _build_principal_attrs(p: Principal, function: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if p.team:
        out["tokenbudget.team"] = p.team
    if p.user:
        out["tokenbudget.user"] = p.user
    if function:
        out["tokenbudget.function"] = function
    return out


def _limited(ticket: Ticket) -> list[Allowance]:
    out = []
    for m in ticket.matches:
        if m.allowance.limit_micros is not None or m.allowance.limit_tokens is not None:
            out.append(m.allowance)
    return out
