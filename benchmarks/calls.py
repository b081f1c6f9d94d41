"""Per-call cost of the real SDKs against the in-process stand-in server, bare and with each contender.

The harness is shared by this process (bare, tokenbudget with each ledger, the Anthropic SDK's own tracing) and by
the peer processes (bare, each peer instrumentation, tokenbudget again as a same-process yardstick). Every round
visits every scenario and, within it, every variant in a rotated order, switching variants between batches with
``tokenbudget.install()`` / ``uninstall()`` (or the peer's instrument / uninstrument): a few untimed warm-up calls,
then a batch of individually timed calls. The batches of one scenario follow each other within a second, so noise
from the machine hits all variants alike, and each variant's ratio to bare is taken per round (its batch median over
bare's batch median in the same round), then the median over rounds.

Each call is timed twice: wall clock (``perf_counter``, what the caller waits) and the calling thread's CPU time
(``thread_time``: the work done in the caller's thread, which other processes on a busy machine cannot inflate).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ._stats import median, ratio, summary_us

OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-haiku-4-5"
MAX_TOKENS = 256
STREAM_CHUNKS = 64

_SYSTEM = (
    "You are a concise assistant for an internal engineering help desk. Answer in plain English, cite the relevant "
    "runbook section when there is one, and say so when you are not sure rather than guessing."
)
_USER = (
    "Our nightly export job started failing after the database upgrade. The logs show a timeout while the job reads "
    "the orders table, but only for the largest tenant. What should I check first, and is there a safe way to retry "
    "the export for that tenant alone without rerunning everything else?"
)
_counter = itertools.count()


def messages() -> list[dict[str, str]]:
    """A realistic small chat turn; the user text is new on every call, as it is in production, so the estimator
    tokenizes fresh text each time (the system prompt repeats and is cached)."""
    return [{"role": "user", "content": f"[{next(_counter)}] {_USER}"}]


def reply_text(words: int) -> str:
    vocab = ("the", "export", "job", "reads", "orders", "in", "pages", "so", "check", "timeouts", "and", "retry")
    return " ".join(vocab[i % len(vocab)] for i in range(words))


# ---------------------------------------------------------------------------------------------------------------------
# clients and scenarios


@dataclass
class Clients:
    openai: Any
    aopenai: Any
    anthropic: Any
    aanthropic: Any


def make_clients(server: Any, *, anthropic_tracing: bool = False) -> Clients:
    import anthropic
    import openai

    otel_opt: Any = None if anthropic_tracing else False
    return Clients(
        openai.OpenAI(base_url=server.openai_base_url, api_key="sk-bench", max_retries=0),
        openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="sk-bench", max_retries=0),
        anthropic.Anthropic(
            base_url=server.anthropic_base_url, api_key="sk-ant-bench", max_retries=0, open_telemetry=otel_opt
        ),
        anthropic.AsyncAnthropic(
            base_url=server.anthropic_base_url, api_key="sk-ant-bench", max_retries=0, open_telemetry=otel_opt
        ),
    )


def _openai_sync(c: Clients) -> Callable[[], Any]:
    def call() -> Any:
        return c.openai.chat.completions.create(
            model=OPENAI_MODEL, messages=[{"role": "system", "content": _SYSTEM}, *messages()], max_tokens=MAX_TOKENS
        )

    return call


def _openai_stream(c: Clients) -> Callable[[], Any]:
    def call() -> Any:
        with c.openai.chat.completions.create(
            model=OPENAI_MODEL, messages=[{"role": "system", "content": _SYSTEM}, *messages()], max_tokens=MAX_TOKENS,
            stream=True,
        ) as stream:
            for _ in stream:
                pass

    return call


def _openai_async(c: Clients) -> Callable[[], Coroutine[Any, Any, Any]]:
    async def call() -> Any:
        return await c.aopenai.chat.completions.create(
            model=OPENAI_MODEL, messages=[{"role": "system", "content": _SYSTEM}, *messages()], max_tokens=MAX_TOKENS
        )

    return call


def _openai_astream(c: Clients) -> Callable[[], Coroutine[Any, Any, Any]]:
    async def call() -> Any:
        stream = await c.aopenai.chat.completions.create(
            model=OPENAI_MODEL, messages=[{"role": "system", "content": _SYSTEM}, *messages()], max_tokens=MAX_TOKENS,
            stream=True,
        )
        async with stream:
            async for _ in stream:
                pass

    return call


def _anthropic_sync(c: Clients) -> Callable[[], Any]:
    def call() -> Any:
        return c.anthropic.messages.create(
            model=ANTHROPIC_MODEL, system=_SYSTEM, messages=messages(), max_tokens=MAX_TOKENS
        )

    return call


def _anthropic_stream(c: Clients) -> Callable[[], Any]:
    def call() -> Any:
        with c.anthropic.messages.create(
            model=ANTHROPIC_MODEL, system=_SYSTEM, messages=messages(), max_tokens=MAX_TOKENS, stream=True
        ) as stream:
            for _ in stream:
                pass

    return call


def _anthropic_async(c: Clients) -> Callable[[], Coroutine[Any, Any, Any]]:
    async def call() -> Any:
        return await c.aanthropic.messages.create(
            model=ANTHROPIC_MODEL, system=_SYSTEM, messages=messages(), max_tokens=MAX_TOKENS
        )

    return call


def _anthropic_astream(c: Clients) -> Callable[[], Coroutine[Any, Any, Any]]:
    async def call() -> Any:
        stream = await c.aanthropic.messages.create(
            model=ANTHROPIC_MODEL, system=_SYSTEM, messages=messages(), max_tokens=MAX_TOKENS, stream=True
        )
        async with stream:
            async for _ in stream:
                pass

    return call


_FACTORIES: dict[tuple[str, str], Callable[[Clients], Callable[[], Any]]] = {
    ("openai", "sync"): _openai_sync,
    ("openai", "async"): _openai_async,
    ("openai", "stream"): _openai_stream,
    ("openai", "astream"): _openai_astream,
    ("anthropic", "sync"): _anthropic_sync,
    ("anthropic", "async"): _anthropic_async,
    ("anthropic", "stream"): _anthropic_stream,
    ("anthropic", "astream"): _anthropic_astream,
}


@dataclass(frozen=True)
class Scenario:
    vendor: str
    mode: str  # sync | async | stream | astream
    chunks: int = STREAM_CHUNKS
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or f"{self.vendor}.{self.mode}"

    @property
    def is_async(self) -> bool:
        return self.mode in ("async", "astream")

    @property
    def streams(self) -> bool:
        return self.mode in ("stream", "astream")

    def reply(self) -> Any:
        from tokenbudget.testing import Reply

        if self.streams:
            return Reply(text=reply_text(self.chunks), chunks=self.chunks)
        return Reply(text=reply_text(12))

    def bind(self, clients: Clients) -> Callable[[], Any]:
        return _FACTORIES[(self.vendor, self.mode)](clients)


def all_scenarios(vendors: tuple[str, ...] = ("openai", "anthropic")) -> list[Scenario]:
    return [Scenario(v, m) for v in vendors for m in ("sync", "async", "stream", "astream")]


# ---------------------------------------------------------------------------------------------------------------------
# variants


@dataclass
class Variant:
    """One way of calling: ``enable`` before its batches and ``disable`` after (both untimed)."""

    name: str
    enable: Callable[[], None] = lambda: None
    disable: Callable[[], None] = lambda: None
    vendors: tuple[str, ...] = ("openai", "anthropic")
    clients: Clients | None = None
    """Its own clients (for per-client instrumentations); None = the shared ones."""
    spans_expected: bool = True
    note: str = ""


def bare_variant() -> Variant:
    return Variant("bare", spans_expected=False, note="the SDK alone (Anthropic: open_telemetry=False)")


def _wait_for_alert_seeding(guard: Any) -> None:
    """install() rebuilds alert baselines from the ledger's history in a background thread; let it finish before
    timing, so a batch measures calls, not that one-off read competing for the GIL."""
    try:
        from tokenbudget import alerts

        manager = alerts._managers.get(guard)
    except (ImportError, AttributeError):
        return
    if manager is not None:
        manager.seeded.wait(30)


def tokenbudget_variant(name: str, ledger_url: str, note: str = "") -> Variant:
    import tokenbudget

    def enable() -> None:
        guard = tokenbudget.install(config={"ledger": ledger_url, "budget_usd": 1_000_000.0})
        _wait_for_alert_seeding(guard)

    def disable() -> None:
        tokenbudget.uninstall()

    return Variant(name, enable, disable, note=note or f"tokenbudget.install(ledger={ledger_url.split('?')[0]!r})")


def otel_floor_variant() -> Variant:
    from .floor import OtelFloor

    floor = OtelFloor()
    return Variant("otel-floor", floor.enable, floor.disable,
                   note="only the OTel SDK calls tokenbudget makes per call (span + 3 histogram records)")


class UninstallCheck:
    """Whether ``tokenbudget.uninstall()`` puts back the very objects the SDK classes had before any install."""

    def __init__(self) -> None:
        import anthropic._base_client as abc_
        import anthropic._streaming as ast_
        import openai._base_client as obc
        import openai._streaming as ost

        self._targets = [
            (obc.SyncAPIClient, "request"), (obc.AsyncAPIClient, "request"),
            (ost.Stream, "_iter_events"), (ost.AsyncStream, "_iter_events"),
            (abc_.SyncAPIClient, "request"), (abc_.AsyncAPIClient, "request"),
            (ast_.Stream, "_iter_events"), (ast_.AsyncStream, "_iter_events"),
            (abc_.BaseClient, "_tracer"),
        ]
        self._originals = [owner.__dict__.get(attr) for owner, attr in self._targets]
        self.checks = 0
        self.failures: list[str] = []

    def verify(self) -> None:
        self.checks += 1
        for (owner, attr), original in zip(self._targets, self._originals, strict=True):
            if owner.__dict__.get(attr) is not original:
                self.failures.append(f"{owner.__module__}.{owner.__qualname__}.{attr}")


# ---------------------------------------------------------------------------------------------------------------------
# the round-robin runner


@dataclass
class Cell:
    samples: list[int] = field(default_factory=list)
    batch_medians: list[float] = field(default_factory=list)
    cpu_samples: list[int] = field(default_factory=list)
    cpu_batch_medians: list[float] = field(default_factory=list)
    spans: int = 0
    calls: int = 0


Timings = tuple[list[int], list[int]]  # (wall ns, calling-thread CPU ns), one entry per call


def _time_sync(fn: Callable[[], Any], n: int) -> Timings:
    wall, cpu = [], []
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for _ in range(n):
        c0 = cpu_clock()
        t0 = clock()
        fn()
        t1 = clock()
        cpu.append(cpu_clock() - c0)
        wall.append(t1 - t0)
    return wall, cpu


async def _time_async(fn: Callable[[], Coroutine[Any, Any, Any]], n: int) -> Timings:
    wall, cpu = [], []
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for _ in range(n):
        c0 = cpu_clock()
        t0 = clock()
        await fn()
        t1 = clock()
        cpu.append(cpu_clock() - c0)
        wall.append(t1 - t0)
    return wall, cpu


def run_matrix(
    scenarios: list[Scenario],
    variants: list[Variant],
    *,
    server: Any,
    clients: Clients,
    otel: Any,
    loop: asyncio.AbstractEventLoop,
    rounds: int,
    batch: int,
    warmup: int,
    after_disable: Callable[[Variant], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Cell]]:
    cells: dict[str, dict[str, Cell]] = {s.name: {} for s in scenarios}
    bound: dict[tuple[str, str], Callable[[], Any]] = {}
    for v in variants:
        for s in scenarios:
            if s.vendor in v.vendors:
                bound[(v.name, s.name)] = s.bind(v.clients or clients)
                cells[s.name][v.name] = Cell()
    for r in range(rounds):
        for s in scenarios:
            mine = [v for v in variants if (v.name, s.name) in bound]
            shift = r % len(mine)
            server.reply = s.reply()
            for v in mine[shift:] + mine[:shift]:
                fn = bound[(v.name, s.name)]
                v.enable()
                try:
                    if s.is_async:
                        loop.run_until_complete(_time_async(fn, warmup))
                    else:
                        _time_sync(fn, warmup)
                    otel.clear()
                    gc.collect()
                    wall, cpu = loop.run_until_complete(_time_async(fn, batch)) if s.is_async else _time_sync(fn, batch)
                    cell = cells[s.name][v.name]
                    cell.samples.extend(wall)
                    cell.batch_medians.append(median(wall))
                    cell.cpu_samples.extend(cpu)
                    cell.cpu_batch_medians.append(median(cpu))
                    cell.spans += otel.spans()
                    cell.calls += batch
                finally:
                    v.disable()
                    if after_disable is not None:
                        after_disable(v)
        if progress is not None:
            progress(f"round {r + 1}/{rounds}")
    return cells


def summarize(cells: dict[str, dict[str, Cell]], variants: list[Variant]) -> list[dict[str, Any]]:
    """One row per (scenario, variant): median, p99, ratio to bare (paired per round), spans per call."""
    notes = {v.name: v.note for v in variants}
    rows: list[dict[str, Any]] = []
    for scenario, by_variant in cells.items():
        bare = by_variant.get("bare")
        for name, cell in by_variant.items():
            row: dict[str, Any] = {"scenario": scenario, "variant": name, **summary_us(cell.samples)}
            cpu = summary_us(cell.cpu_samples)
            row["cpu_median_us"], row["cpu_p99_us"] = cpu["median_us"], cpu["p99_us"]
            if bare is not None and bare.batch_medians:
                paired = [ratio(a, b) for a, b in zip(cell.batch_medians, bare.batch_medians, strict=False)]
                row["ratio"] = median(paired)
                row["ratio_p99"] = ratio(row["p99_us"], summary_us(bare.samples)["p99_us"])
                row["overhead_us"] = row["median_us"] - summary_us(bare.samples)["median_us"]
                paired_cpu = [ratio(a, b) for a, b in zip(cell.cpu_batch_medians, bare.cpu_batch_medians, strict=False)]
                row["cpu_ratio"] = median(paired_cpu)
                row["cpu_overhead_us"] = cpu["median_us"] - summary_us(bare.cpu_samples)["median_us"]
            row["spans_per_call"] = cell.spans / cell.calls if cell.calls else 0.0
            row["note"] = notes.get(name, "")
            rows.append(row)
    return rows


def chunk_slopes(rows: list[dict[str, Any]], low: int, high: int) -> list[dict[str, Any]]:
    """End-to-end per-chunk overhead: how much tokenbudget's extra time grows per streamed chunk."""
    out = []
    by = {(r["scenario"], r["variant"]): r for r in rows}
    for vendor in ("openai", "anthropic"):
        for variant in {r["variant"] for r in rows if r["variant"] != "bare"}:
            lo, hi = by.get((f"{vendor}.stream@{low}", variant)), by.get((f"{vendor}.stream@{high}", variant))
            if lo is None or hi is None:
                continue
            per_chunk = (hi["overhead_us"] - lo["overhead_us"]) / (high - low)
            per_chunk_cpu = (hi["cpu_overhead_us"] - lo["cpu_overhead_us"]) / (high - low)
            out.append({
                "name": f"{vendor} stream, end to end, wall ({variant})", "median_us": per_chunk,
                "method": f"(overhead at {high} chunks - overhead at {low}) / {high - low}",
            })
            out.append({
                "name": f"{vendor} stream, end to end, caller CPU ({variant})", "median_us": per_chunk_cpu,
                "method": f"(CPU overhead at {high} chunks - at {low}) / {high - low}",
            })
    return out
