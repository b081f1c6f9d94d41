"""Alerts: a budget crossing 50/80/100 %, and a principal suddenly spending far faster than it normally does.

Budgets stop runaway spend only where someone configured one; a spike alert is what tells a human, within minutes,
that an agent is looping at $300 every five minutes. Both are computed after each call from numbers the guard
already has (the call's cost, its time from the guard's clock, and the balances of the budgets it was charged to),
and delivered by a background thread, so a slow, hanging or broken sink never delays or breaks an LLM call.

See ``docs/alerts.md`` for what fires when and why the statistics are what they are.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import queue
import threading
import time
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from ._runtime import _alerts_lock, _PendingAlerts
from .config import AlertSettings, WebhookSettings
from .events import CallEvent
from .ledger.base import Allowance, Balance, Ledger, Refusal
from .money import micros_to_usd, usd_to_micros

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from .guard import Guard

__all__ = ["Alert", "AlertManager", "attach_alerts", "detach_alerts", "get_manager", "on_alert"]

log = logging.getLogger("tokenbudget.alerts")

AlertKind = Literal["threshold", "spike"]
Severity = Literal["info", "warning", "critical"]
AlertCallback = Callable[["Alert"], None]

MAD_TO_SIGMA = 1.4826
"""MAD x 1.4826 estimates the standard deviation of normally distributed data, so ``spike_factor`` reads as sigmas."""
TAIL_QUANTILE = 0.99
"""A window must also beat ``spike_factor`` x this quantile of the principal's windows (the 3rd busiest of 288):
LLM spend per window is heavy-tailed, so the median and MAD alone page on every normal burst."""
MIN_BASELINE_WINDOWS = 12
"""Active windows (an hour at the default 5-minute window) before a principal's own statistics are trusted."""
SEED_LOOKBACK_SECONDS = 7 * 86_400.0
"""How far back :func:`attach_alerts` reads the ledger's events to rebuild baselines after a restart."""
IDLE_FRACTION = 0.01
"""Windows that spent less than this fraction of ``spike_min_usd`` are idle and stay out of the baseline."""
SLOTS_PER_WINDOW = 10
"""The sliding window moves in steps of a tenth of its length: a spike is never split across two buckets."""
MAX_BASELINE_WINDOWS = 4096
MAX_PRINCIPALS = 10_000
MAX_THRESHOLD_KEYS = 100_000
ALERT_QUEUE_SIZE = 1000
WEBHOOK_QUEUE_SIZE = 100
WEBHOOK_BACKOFF_SECONDS = 0.5
"""First retry delay; doubles per attempt (capped at 30 s)."""


# ---------------------------------------------------------------------------------------------------------------
# The alert
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert. Holds names and numbers only: never prompt or completion text, never a key or a webhook URL."""

    kind: AlertKind
    scope: str
    """The budget's scope (``team:search``) for a threshold alert; the principal (``user:ann``) for a spike."""
    message: str
    time: float
    """Epoch seconds from the guard's clock, at the call that raised the alert."""
    severity: Severity
    budget_key: str | None = None
    """The budget window's ledger key (scope, name and period start): one threshold alert per key and threshold."""
    org: str | None = None
    team: str | None = None
    user: str | None = None
    model: str | None = None
    """The model of the call that raised the alert."""
    threshold: float | None = None
    fraction: float | None = None
    """Spent / limit (the larger of dollars and tokens) when the threshold alert fired."""
    spent_usd: float | None = None
    limit_usd: float | None = None
    spent_tokens: int | None = None
    limit_tokens: int | None = None
    window_seconds: float | None = None
    window_usd: float | None = None
    """Spend in the last ``window_seconds`` (spike)."""
    rate_usd_per_hour: float | None = None
    baseline_median_usd: float | None = None
    """Median spend of the principal's active windows; ``None`` while it has too little history."""
    baseline_mad_usd: float | None = None
    baseline_p99_usd: float | None = None
    baseline_windows: int | None = None
    """How many active windows the baseline was computed from (at most a day's worth by default)."""
    trigger_usd: float | None = None
    """The window spend above which this principal alerts (the larger of the statistical bound and the floor)."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def webhook_payload(self) -> dict[str, Any]:
        """Slack reads ``text``; every other receiver gets the same numbers as fields."""
        return {"text": self.message, "source": "tokenbudget", **self.to_dict()}


# ---------------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------------

_callbacks: list[AlertCallback] = []
_callbacks_lock = threading.Lock()


def on_alert(fn: AlertCallback) -> Callable[[], None]:
    """Call ``fn(alert)`` for every alert, on the alerts thread; returns a function that unsubscribes it.

    Module-wide rather than per guard, so it can be registered before :func:`tokenbudget.install` and survives a
    re-install. A callback that raises is logged and skipped; one that blocks delays later alerts, never calls.
    """
    with _callbacks_lock:
        _callbacks.append(fn)

    def unsubscribe() -> None:
        with _callbacks_lock:
            try:
                _callbacks.remove(fn)
            except ValueError:
                pass

    return unsubscribe


# ---------------------------------------------------------------------------------------------------------------
# Spike detection
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Baseline:
    median: float
    mad: float
    tail: float
    windows: int


@dataclass(frozen=True, slots=True)
class _Spike:
    window_micros: int
    trigger_micros: float
    baseline: _Baseline | None


class _Series:
    """One principal's recent spend: a sliding window of fine slots, and its last active windows as the baseline."""

    __slots__ = (
        "_closed", "_last_slot", "_open_micros", "_open_window", "_slot_ids", "_slot_micros", "_stats", "_sum", "cap",
        "last", "quiet_until",
    )

    def __init__(self, capacity: int) -> None:
        self._slot_ids = [-1] * SLOTS_PER_WINDOW
        self._slot_micros = [0] * SLOTS_PER_WINDOW
        self._last_slot = -1
        self._sum = 0
        """The sum of the slots in the window that ends at ``_last_slot``, kept as slots fill and fall out, so the
        spike check on every call costs a comparison instead of a pass over all the slots."""
        self._open_window = -1
        self._open_micros = 0
        self._closed: deque[int] = deque(maxlen=capacity)
        self._stats: _Baseline | None = None
        self.last = -math.inf
        self.quiet_until = -math.inf
        self.cap: int | None = None
        """During an incident, windows enter the baseline clipped to the trigger it started at: an incident raises
        the bar by at most ``spike_factor`` (so a sustained new workload is learned), never to its own level."""

    def add(self, t: float, micros: int, window: float, idle_micros: int) -> float:
        """Count ``micros`` at ``t`` and return the (clamped) time used, so late events never reopen old buckets."""
        t = max(t, self.last)
        self.last = t
        win = int(t // window)
        if win != self._open_window:
            value = self._open_micros
            if self.cap is not None:
                if (self._open_window + 1) * window <= self.quiet_until:
                    value = min(value, self.cap)
                else:
                    self.cap = None
            if self._open_window >= 0 and value > idle_micros:
                self._closed.append(value)
                self._stats = None
            self._open_window, self._open_micros = win, 0
        self._open_micros += micros
        slot = int(t // (window / SLOTS_PER_WINDOW))
        self._advance(slot)
        i = slot % SLOTS_PER_WINDOW
        if self._slot_ids[i] != slot:
            self._slot_ids[i], self._slot_micros[i] = slot, 0
        self._slot_micros[i] += micros
        self._sum += micros
        return t

    def _advance(self, slot: int) -> None:
        """Move the window's end to ``slot`` (never back: ``add`` clamps time), dropping the slots that fell out."""
        last = self._last_slot
        if slot <= last:
            return
        if slot - last >= SLOTS_PER_WINDOW:
            self._sum = 0
        else:
            ids, micros = self._slot_ids, self._slot_micros
            for gone in range(last - SLOTS_PER_WINDOW + 1, slot - SLOTS_PER_WINDOW + 1):
                if ids[gone % SLOTS_PER_WINDOW] == gone:
                    self._sum -= micros[gone % SLOTS_PER_WINDOW]
        self._last_slot = slot

    def window_micros(self, t: float, window: float) -> int:
        slot = int(t // (window / SLOTS_PER_WINDOW))
        if slot == self._last_slot:
            return self._sum
        oldest = slot - SLOTS_PER_WINDOW
        return sum(m for s, m in zip(self._slot_ids, self._slot_micros, strict=True) if oldest < s <= slot)

    def baseline(self) -> _Baseline | None:
        """Median, MAD and tail quantile of the closed active windows; ``None`` while there are too few to trust."""
        n = len(self._closed)
        if n < MIN_BASELINE_WINDOWS:
            return None
        if self._stats is None:
            values = sorted(self._closed)
            med = _median(values)
            mad = _median(sorted(abs(v - med) for v in values))
            self._stats = _Baseline(med, mad, float(values[min(n - 1, int(TAIL_QUANTILE * n))]), n)
        return self._stats

    def merge_history(self, older: _Series) -> None:
        """Put ``older`` (rebuilt from the ledger, all before this series began) in front of this series' history."""
        history = list(older._closed)
        if older._open_window == self._open_window:
            self._open_micros += older._open_micros
        elif older._open_window >= 0 and older._open_micros > 0:
            history.append(older._open_micros)
        self._closed = deque([*history, *self._closed], maxlen=self._closed.maxlen)
        self._stats = None
        for i, (slot, micros) in enumerate(zip(older._slot_ids, older._slot_micros, strict=True)):
            if slot == self._slot_ids[i]:
                self._slot_micros[i] += micros
            elif slot > self._slot_ids[i]:
                self._slot_ids[i], self._slot_micros[i] = slot, micros
        self._last_slot = last = max(self._last_slot, *self._slot_ids)
        oldest = last - SLOTS_PER_WINDOW
        self._sum = sum(m for s, m in zip(self._slot_ids, self._slot_micros, strict=True) if s > oldest)


def _median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return float(sorted_values[mid]) if n % 2 else (sorted_values[mid - 1] + sorted_values[mid]) / 2


class SpikeDetector:
    """Per-principal spend rate against that principal's own robust baseline, in memory and bounded.

    Why median and MAD of *active* windows: spend is heavy-tailed and a past incident must not become the new
    normal (a mean or standard deviation would), and nights, weekends and lunch breaks are idle windows that would
    drag the median to zero, turning the detector into a bare floor that pages every heavy user each morning.
    """

    def __init__(self, settings: AlertSettings) -> None:
        self.factor = settings.spike_factor
        self.window = settings.spike_window_seconds
        self.capacity = max(1, min(MAX_BASELINE_WINDOWS, round(settings.spike_baseline_seconds / self.window)))
        self.min_micros = usd_to_micros(settings.spike_min_usd)
        self.idle_micros = int(self.min_micros * IDLE_FRACTION)
        self.cooldown = settings.cooldown_seconds
        self._series: OrderedDict[str, _Series] = OrderedDict()

    def _get(self, key: str) -> _Series:
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = _Series(self.capacity)
            while len(self._series) > MAX_PRINCIPALS:
                self._series.popitem(last=False)
        else:
            self._series.move_to_end(key)
        return s

    def trigger(self, series: _Series) -> tuple[float, _Baseline | None]:
        base = series.baseline()
        if base is None:
            # Nothing known about this principal (new, or no history in the ledger): only a rate well above the
            # floor is news, so a new heavy user is not paged on their first busy five minutes.
            return self.factor * self.min_micros, None
        k = self.factor
        stat = max(base.median + k * MAD_TO_SIGMA * base.mad, k * base.median, k * base.tail)
        return max(stat, float(self.min_micros)), base

    def observe(self, key: str, t: float, micros: int) -> _Spike | None:
        """Count one call's cost; return the spike if this call starts a new incident for ``key``."""
        s = self._get(key)
        t = s.add(t, micros, self.window, self.idle_micros)
        current = s.window_micros(t, self.window)
        if current <= self.min_micros:
            return None
        trigger, base = self.trigger(s)
        if current <= trigger:
            return None
        if t < s.quiet_until:
            s.quiet_until = t + self.cooldown  # the incident goes on: stay quiet until it has been over a while
            return None
        s.quiet_until = t + self.cooldown
        s.cap = int(trigger)
        return _Spike(current, trigger, base)

    def count(self, key: str, t: float, micros: int) -> None:
        """Count without judging: history read back from the ledger."""
        self._get(key).add(t, micros, self.window, self.idle_micros)

    def merge_from(self, older: SpikeDetector) -> None:
        for key, series in older._series.items():
            mine = self._series.get(key)
            if mine is None:
                self._series[key] = series
                self._series.move_to_end(key, last=False)  # not seen live yet: first to go when full
            else:
                mine.merge_history(series)
        while len(self._series) > MAX_PRINCIPALS:
            self._series.popitem(last=False)

    def hush(self, key: str, until: float) -> None:
        """Keep ``key`` quiet until ``until`` (a team while one of its users is already alerting)."""
        s = self._series.get(key)
        if s is not None:
            if s.cap is None or s.quiet_until < s.last:
                s.cap = int(self.trigger(s)[0])
            s.quiet_until = max(s.quiet_until, until)


def _principal_keys(event: CallEvent) -> list[str]:
    keys = []
    if event.user:
        keys.append(f"user:{event.user}")
    if event.team:
        keys.append(f"team:{event.team}")
    if not keys:
        keys.append(f"org:{event.org}" if event.org else "org")
    return keys


# ---------------------------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------------------------


def _spent_fraction(b: Balance) -> float | None:
    fractions = []
    if b.limit_micros:
        fractions.append(b.spent_micros / b.limit_micros)
    if b.limit_tokens:
        fractions.append(b.spent_tokens / b.limit_tokens)
    return max(fractions) if fractions else None


def _severity(threshold: float) -> Severity:
    if threshold >= 1.0:
        return "critical"
    return "warning" if threshold >= 0.8 else "info"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.0f}%"


def _usd(micros: float) -> str:
    return f"${micros / 1_000_000:,.2f}"


# ---------------------------------------------------------------------------------------------------------------
# Delivery
# ---------------------------------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """What may be logged of a webhook URL: scheme and host. Slack-style URLs carry their secret in the path."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<webhook URL, redacted>"
    return f"{parts.scheme}://{host}{port}/<redacted>"


class _Scrubber(logging.Filter):
    """Keeps the webhook URL out of the HTTP client's own request log and out of its error messages."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.shown = redact_url(url)
        parts = urlsplit(url)
        tail = url[len(f"{parts.scheme}://{parts.netloc}") :]
        self.secrets = sorted(
            {s for s in (url, url.rstrip("/"), tail, parts.path, parts.query, parts.password or "") if len(s) > 1},
            key=len, reverse=True,
        )

    def scrub(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, self.shown if s.startswith(("http://", "https://")) else "<redacted>")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = self.scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class _WebhookWorker:
    """POSTs alerts from its own daemon thread: bounded queue, per-request timeout, retries with backoff."""

    def __init__(self, settings: WebhookSettings, *, backoff: float | None = None) -> None:
        self.url = settings.url
        self.timeout = settings.timeout_seconds
        self.retries = settings.retries
        self.backoff = WEBHOOK_BACKOFF_SECONDS if backoff is None else backoff
        self.shown = redact_url(settings.url)
        self._scrubber = _Scrubber(settings.url)
        self._queue: queue.Queue[Alert | None] = queue.Queue(maxsize=WEBHOOK_QUEUE_SIZE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def submit(self, alert: Alert) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            if self._thread is None:
                logging.getLogger("httpx2").addFilter(self._scrubber)
                self._thread = threading.Thread(target=self._run, name="tokenbudget-alerts-webhook", daemon=True)
                self._thread.start()
            try:
                self._queue.put_nowait(alert)
            except queue.Full:
                self.dropped += 1
                log.warning("alert webhook %s is backed up; dropped alert %s", self.shown, alert.id)
                return
            self._pending += 1

    def flush(self, timeout: float) -> bool:
        return _wait_idle(self, time.monotonic() + timeout)

    def close(self, timeout: float) -> None:
        with self._lock:
            self._stop.set()
            thread = self._thread
        if thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            thread.join(timeout)
            if not thread.is_alive():  # a request still in flight will log its URL when it ends: keep scrubbing
                logging.getLogger("httpx2").removeFilter(self._scrubber)

    def _run(self) -> None:
        try:
            import httpx2
        except ImportError:  # pragma: no cover - httpx2 comes with the SDKs and genai-prices
            log.error("alert webhook %s is configured but httpx2 is not installed; webhooks are off", self.shown)
            self._drain()
            return
        with httpx2.Client(timeout=httpx2.Timeout(self.timeout), follow_redirects=False) as client:
            while True:
                alert = self._queue.get()
                if alert is None:
                    return
                try:
                    if not self._stop.is_set():
                        self._deliver(client, alert)
                except Exception as exc:  # never let one alert kill the worker
                    log.warning("alert webhook %s: %s", self.shown, self._scrubber.scrub(repr(exc)))
                finally:
                    with self._idle:
                        self._pending -= 1
                        self._idle.notify_all()

    def _drain(self) -> None:
        while self._queue.get() is not None:
            with self._idle:
                self.failed += 1
                self._pending -= 1
                self._idle.notify_all()

    def _deliver(self, client: Any, alert: Alert) -> None:
        import httpx2

        body = json.dumps(alert.webhook_payload(), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "tokenbudget-alerts"}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt and self._stop.wait(min(30.0, self.backoff * 2 ** (attempt - 1))):
                break
            try:
                response = client.post(self.url, content=body, headers=headers)
            except httpx2.TimeoutException:
                problem = f"no answer within {self.timeout:g} s"
                continue
            except httpx2.HTTPError as exc:
                problem = self._scrubber.scrub(f"{type(exc).__name__}: {exc}")
                continue
            if 200 <= response.status_code < 300:
                self.sent += 1
                return
            problem = f"HTTP {response.status_code}"
            if response.status_code < 500 and response.status_code not in (408, 425, 429):
                break  # the receiver rejects this request; sending it again will not help
        self.failed += 1
        log.warning(
            "alert webhook %s gave up on alert %s after %d attempt(s): %s",
            self.shown, alert.id, attempt + 1, problem or "stopped",
        )


class _Dispatcher:
    """Hands each alert to every sink from one daemon thread, so the call that raised it has already returned."""

    def __init__(self, webhook: WebhookSettings | None, logger_provider: Any = None) -> None:
        self.webhook = _WebhookWorker(webhook) if webhook is not None else None
        self._logger_provider = logger_provider
        self._otel_logger: Any = None
        self._queue: queue.Queue[tuple[Alert, Context | None] | None] = queue.Queue(maxsize=ALERT_QUEUE_SIZE)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self.dropped = 0

    def submit(self, alert: Alert, context: Context | None) -> None:
        with self._lock:
            if self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tokenbudget-alerts", daemon=True)
                self._thread.start()
            try:
                self._queue.put_nowait((alert, context))
            except queue.Full:
                self.dropped += 1
                return
            self._pending += 1

    def flush(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        if not _wait_idle(self, deadline):
            return False
        if self.webhook is not None:
            return self.webhook.flush(max(0.0, deadline - time.monotonic()))
        return True

    def close(self, timeout: float = 1.0) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            thread.join(timeout)
        if self.webhook is not None:
            self.webhook.close(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            alert, context = item
            try:
                self._deliver(alert, context)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _deliver(self, alert: Alert, context: Context | None) -> None:
        try:
            log.warning("%s", alert.message, extra={"tokenbudget_alert": alert.to_dict()})
        except Exception:
            pass  # a broken logging handler is the application's to fix; the other sinks still get the alert
        try:
            self._emit_otel(alert, context)
        except Exception:
            log.debug("tokenbudget could not emit an OpenTelemetry log record for an alert", exc_info=True)
        with _callbacks_lock:
            callbacks = list(_callbacks)
        for fn in callbacks:
            try:
                fn(alert)
            except Exception:
                log.exception("an on_alert callback failed; the alert was delivered to the other sinks")
        if self.webhook is not None:
            self.webhook.submit(alert)

    def _emit_otel(self, alert: Alert, context: Context | None) -> None:
        """An OTel log record (the logs API ships with opentelemetry-api) linked to the trace the call ran in."""
        from opentelemetry._logs import LogRecord, SeverityNumber, get_logger

        if self._otel_logger is None:
            self._otel_logger = get_logger("tokenbudget.alerts", logger_provider=self._logger_provider)
        number = {"info": SeverityNumber.INFO, "warning": SeverityNumber.WARN, "critical": SeverityNumber.ERROR}
        fields = alert.to_dict().items()
        attributes = {f"tokenbudget.alert.{k}": v for k, v in fields if v is not None and k != "message"}
        self._otel_logger.emit(
            LogRecord(
                timestamp=int(alert.time * 1e9), context=context, severity_text=alert.severity.upper(),
                severity_number=number[alert.severity], body=alert.message, attributes=attributes,
                event_name="tokenbudget.alert",
            )
        )


# ---------------------------------------------------------------------------------------------------------------
# The manager: one per guard
# ---------------------------------------------------------------------------------------------------------------


class AlertManager:
    """Evaluates every settled call of one guard and queues the alerts it raises.

    It holds the guard's ledger and settings, not the guard, so a discarded guard and its manager can be collected.
    """

    def __init__(self, settings: AlertSettings, ledger: Ledger, *, logger_provider: Any = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self.thresholds = tuple(settings.thresholds)
        self._lowest = min(self.thresholds, default=math.inf)
        self.spikes = SpikeDetector(settings)
        self.dispatcher = _Dispatcher(settings.webhook, logger_provider)
        self._lock = threading.Lock()
        self._done: dict[str, tuple[float | None, set[float]]] = {}  # budget key -> (window end, thresholds handled)
        self.seeded = threading.Event()
        """Set once baselines were rebuilt from the ledger's history (or there was none to read)."""

    # -- the listener (runs on the call path: in-memory work, plus a balance read per budget until all fired) --
    def on_event(
        self, event: CallEvent, allowances: tuple[Allowance, ...] = (), balances: Mapping[str, Balance] | None = None
    ) -> None:
        try:
            alerts: list[Alert] = []
            if event.cost_micros > 0:
                alerts.extend(a for a in self._spikes(event) if self._claim_spike(a.scope, event.time))
            if allowances and (event.cost_micros > 0 or event.input_tokens + event.output_tokens > 0):
                alerts.extend(self._threshold_alerts(event, allowances, balances or {}))
            if alerts:
                context = _current_context()
                for alert in alerts:
                    self.dispatcher.submit(alert, context)
        except Exception:
            log.exception("tokenbudget could not evaluate alerts for a call; the call is unaffected")

    __call__ = on_event

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued alert reached every sink (tests, and ``atexit``); ``False`` on timeout."""
        return self.dispatcher.flush(timeout)

    def close(self, timeout: float = 1.0) -> None:
        self.dispatcher.close(timeout)

    # -- spikes -----------------------------------------------------------------------------------------------
    def _spikes(self, event: CallEvent) -> list[Alert]:
        out: list[Alert] = []
        with self._lock:
            alerted_user = False
            for key in _principal_keys(event):
                if key.startswith("team:") and alerted_user:
                    # The user's alert already names this incident; the team's would be the same page twice.
                    self.spikes.observe(key, event.time, event.cost_micros)
                    self.spikes.hush(key, event.time + self.spikes.cooldown)
                    continue
                spike = self.spikes.observe(key, event.time, event.cost_micros)
                if spike is None:
                    continue
                if key.startswith("user:"):
                    alerted_user = True
                    if event.team:
                        self.spikes.hush(f"team:{event.team}", event.time + self.spikes.cooldown)
                out.append(self._spike_alert(event, key, spike))
        return out

    def _spike_alert(self, event: CallEvent, key: str, spike: _Spike) -> Alert:
        w = self.spikes.window
        rate = spike.window_micros * 3600 / w
        base = spike.baseline
        basis = "no history yet" if base is None else f"normal busy window {_usd(base.tail)}"
        message = (
            f"tokenbudget: spend spike for {key}: {_usd(spike.window_micros)} in the last {w / 60:g} min "
            f"(~{_usd(rate)}/h; {basis}; alert above {_usd(spike.trigger_micros)})"
        )
        return Alert(
            kind="spike", scope=key, message=message, time=event.time, severity="critical", org=event.org,
            team=event.team, user=event.user, model=event.model, window_seconds=w,
            window_usd=micros_to_usd(spike.window_micros), rate_usd_per_hour=round(rate / 1e6, 2),
            baseline_median_usd=None if base is None else base.median / 1e6,
            baseline_mad_usd=None if base is None else base.mad / 1e6,
            baseline_p99_usd=None if base is None else base.tail / 1e6,
            baseline_windows=None if base is None else base.windows,
            trigger_usd=spike.trigger_micros / 1e6,
        )

    def _claim_spike(self, key: str, now: float) -> bool:
        """Whether this process sends the spike alert for ``key``: processes sharing a ledger that see one incident
        (each with its share of the principal's calls) page once per cooldown between them, not once each.

        A compare-and-set through the ledger's own reserve and settle: a marker account whose spent figure is the
        time, in whole seconds, until which the principal's spike alerts are taken. Read it (``q``); if that time is
        past, reserve ``now - q`` against a limit of ``now``, which fits only while the figure is still ``q`` with
        nothing held on it (so of two processes racing, one wins); then settle for ``now + cooldown - q``, which
        sets the figure to ``now + cooldown``. No event, and nothing stays held. The key ends in ``~alert@spike``,
        which no report mistakes for a budget."""
        cooldown = math.ceil(self.spikes.cooldown)
        if cooldown <= 0:
            return True
        marker = Allowance(key=f"{key}~alert@spike", scope=f"{key}~alert")
        t = int(now)
        try:
            taken_until = self.ledger.balance(marker, now=now).spent_micros
            if taken_until >= t:
                return False  # another process alerted for this principal within the cooldown
            limit = Allowance(marker.key, marker.scope, limit_micros=t)
            got = self.ledger.reserve([limit], t - taken_until, 0, lease_seconds=60.0, now=now)
            if isinstance(got, Refusal):
                return False  # another process claimed it between the read and the reserve
            self.ledger.settle(got, t + cooldown - taken_until, 0, None, now=now)
        except Exception:
            log.warning("tokenbudget could not record a spike alert in the ledger; sending it from here anyway")
        return True

    def seed(self, events: Iterable[CallEvent]) -> int:
        """Rebuild spend baselines from recorded events (oldest first) without alerting; returns how many counted.

        Without this every restart would start each principal cold, and a CLI agent that runs for twenty minutes
        would never have a baseline at all. Built aside and merged, so live calls are never blocked meanwhile.
        """
        older = SpikeDetector(self.settings)
        n = 0
        for e in events:
            if e.cost_micros <= 0 or e.status == "denied":
                continue
            for key in _principal_keys(e):
                older.count(key, e.time, e.cost_micros)
            n += 1
        with self._lock:
            self.spikes.merge_from(older)
        return n

    # -- thresholds -------------------------------------------------------------------------------------------
    def _threshold_alerts(
        self, event: CallEvent, allowances: Iterable[Allowance], balances: Mapping[str, Balance]
    ) -> list[Alert]:
        out: list[Alert] = []
        for a in allowances:
            if not a.limit_micros and not a.limit_tokens:
                continue
            entry = self._done.get(a.key)  # a peek without the lock: decided again under it below
            if entry is not None and len(entry[1]) >= len(self.thresholds):
                continue
            balance = balances.get(a.key) or self.ledger.balance(a, now=event.time)
            fraction = _spent_fraction(balance)
            if fraction is None or fraction < self._lowest:  # the common case: nothing to cross yet
                continue
            with self._lock:
                entry = self._done.get(a.key)
                if entry is None:
                    self._prune(event.time)
                    entry = self._done[a.key] = (a.window_end, set())
                crossed = [t for t in self.thresholds if fraction >= t and t not in entry[1]]
                entry[1].update(crossed)
            # Claim every crossed threshold in the ledger, so other processes sharing it stay quiet about them;
            # alert once, for the highest one this process won (a call that jumps 40 -> 100 % is one alert).
            won = [t for t in crossed if self._claim(a, t, event.time)]
            if won:
                out.append(self._threshold_alert(event, a, balance, fraction, max(won)))
        return out

    def _claim(self, allowance: Allowance, threshold: float, now: float) -> bool:
        """Test-and-set through the ledger's own all-or-none reserve: a 1-micro-dollar account per threshold.

        The key ends in ``@<threshold>``, which no report mistakes for a budget period.
        """
        marker = Allowance(
            key=f"{allowance.key}~alert@{threshold:g}", scope=f"{allowance.scope}~alert", limit_micros=1,
            window_end=allowance.window_end,
        )
        try:
            got = self.ledger.reserve([marker], 1, 0, lease_seconds=60.0, now=now)
            if isinstance(got, Refusal):
                return False
            self.ledger.settle(got, 1, 0, None, now=now)
        except Exception:
            log.warning("tokenbudget could not record a threshold alert in the ledger; sending it from here anyway")
        return True

    def _prune(self, now: float) -> None:
        if len(self._done) < MAX_THRESHOLD_KEYS:
            return
        for key, (end, _) in list(self._done.items()):
            if end is not None and end <= now:
                del self._done[key]
        while len(self._done) >= MAX_THRESHOLD_KEYS:
            del self._done[next(iter(self._done))]

    def _threshold_alert(self, event: CallEvent, a: Allowance, b: Balance, fraction: float, t: float) -> Alert:
        parts = []
        if b.limit_micros:
            parts.append(f"{_usd(b.spent_micros)} of {_usd(b.limit_micros)}")
        if b.limit_tokens:
            parts.append(f"{b.spent_tokens:,} of {b.limit_tokens:,} tokens")
        period = a.key.rpartition("@")[2].partition(":")[0]
        message = f"tokenbudget: budget {a.scope} ({period}) is {_pct(fraction)} spent: {', '.join(parts)}"
        if t >= 1.0:
            message += " - calls may now be refused, downgraded or clamped"
        return Alert(
            kind="threshold", scope=a.scope, message=message, time=event.time, severity=_severity(t), budget_key=a.key,
            org=event.org, team=event.team, user=event.user, model=event.model, threshold=t, fraction=fraction,
            spent_usd=micros_to_usd(b.spent_micros), limit_usd=None if b.limit_micros is None else b.limit_micros / 1e6,
            spent_tokens=b.spent_tokens, limit_tokens=b.limit_tokens,
        )


def _current_context() -> Context | None:
    try:
        from opentelemetry.context import get_current

        return get_current()
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------------------------

_managers: weakref.WeakKeyDictionary[Guard, AlertManager] = weakref.WeakKeyDictionary()
# Shared with tokenbudget._runtime, which stands in for a guard's manager until its first call (see
# ``_runtime._PendingAlerts``): attaching, detaching and replacing the stand-in are one critical section.
_managers_lock = _alerts_lock


def attach_alerts(guard: Guard, *, logger_provider: Any = None) -> None:
    """Evaluate alerts after every call of ``guard``; :func:`tokenbudget.install` does this for its guard.

    ``logger_provider`` is the OpenTelemetry ``LoggerProvider`` for alert log records (default: the global one).
    """
    with _managers_lock:
        if guard in _managers:
            return
        pending = _pending_of(guard)
        manager = _attach_locked(guard, pending, logger_provider)
    _start_seed(guard, manager, pending)


def _pending_of(guard: Guard) -> tuple[int, _PendingAlerts] | None:
    for index, listener in enumerate(guard.budget_listeners):
        if isinstance(listener, _PendingAlerts):
            return index, listener
    return None


def _attach_locked(guard: Guard, pending: tuple[int, _PendingAlerts] | None, logger_provider: Any) -> AlertManager:
    manager = AlertManager(guard.settings.alerts, guard.ledger, logger_provider=logger_provider)
    _managers[guard] = manager
    if pending is not None:  # take the stand-in's place, so listeners keep the order they were added in
        guard.budget_listeners[pending[0]] = manager.on_event
    else:
        guard.budget_listeners.append(manager.on_event)
    return manager


def _start_seed(guard: Guard, manager: AlertManager, pending: tuple[int, _PendingAlerts] | None) -> None:
    if guard.settings.record_events:
        # Seed up to the moment alerts were asked for (install() time for a stand-in): later events of this
        # process reach the manager live, and counting them twice would inflate the baseline.
        until = pending[1].installed_at if pending is not None else guard.clock.now()
        since = until - max(SEED_LOOKBACK_SECONDS, guard.settings.alerts.spike_baseline_seconds)
        threading.Thread(
            target=_seed, args=(manager, guard.ledger, since, until), name="tokenbudget-alerts-seed", daemon=True
        ).start()
    else:
        manager.seeded.set()


def _seed(manager: AlertManager, ledger: Ledger, since: float, until: float) -> None:
    try:
        manager.seed(ledger.events(since=since, until=until))
    except Exception as exc:
        log.info("tokenbudget alerts start without spend history (%s: %s); baselines build up from now on",
                 type(exc).__name__, exc)
    finally:
        manager.seeded.set()


def detach_alerts(guard: Guard, timeout: float = 1.0) -> None:
    """Stop evaluating ``guard``'s calls and stop its delivery threads (waiting at most ``timeout`` for each)."""
    with _managers_lock:
        manager = _managers.pop(guard, None)
        guard.budget_listeners[:] = [
            f for f in guard.budget_listeners
            if not isinstance(f, _PendingAlerts) and (manager is None or f != manager.on_event)
        ]
    if manager is not None:
        manager.close(timeout)


def get_manager(guard: Guard) -> AlertManager | None:
    """The guard's alert manager; one that :func:`tokenbudget.install` left pending until the first call is
    created now. ``None`` when alerts are not attached to ``guard``."""
    with _managers_lock:
        manager = _managers.get(guard)
        if manager is not None:
            return manager
        pending = _pending_of(guard)
        if pending is None:
            return None
        manager = _attach_locked(guard, pending, None)
    _start_seed(guard, manager, pending)
    return manager


@atexit.register
def _flush_at_exit() -> None:
    """A batch job that blows its budget and exits should still get its alert out: wait a little, not forever."""
    with _managers_lock:
        managers = list(_managers.values())
    deadline = time.monotonic() + 2.0
    for m in managers:
        m.flush(max(0.0, deadline - time.monotonic()))


def _wait_idle(worker: Any, deadline: float) -> bool:
    """Wait until a background worker has delivered everything queued (``_pending`` under ``_idle``)."""
    with worker._idle:
        while worker._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            worker._idle.wait(left)
    return True


def _attach_pending_of_active_guard() -> None:
    """Once this module is loaded, the installed guard's stand-in has nothing left to save: attach its manager now,
    so code that imports ``tokenbudget.alerts`` after ``install()`` finds it (and its seeding) as before."""
    from ._runtime import active_guard

    guard = active_guard()
    if guard is not None:
        get_manager(guard)


_attach_pending_of_active_guard()
