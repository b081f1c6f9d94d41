"""Process setup shared by every benchmark process: a clean environment and the OTel SDK with in-memory exporters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_SHARED_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"


def clean_environment() -> None:
    """Never read the developer's own tokenbudget config or ledger; never trace the SDKs behind our back."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ and _SHARED_TIKTOKEN.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(_SHARED_TIKTOKEN)
    for key in list(os.environ):
        if key.startswith("TOKENBUDGET_"):
            del os.environ[key]
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-not-a-real-key")
    os.environ.setdefault("ANTHROPIC_API_KEY", "sk-ant-bench-not-a-real-key")
    # Content capture stays at every contender's default: off (metadata only), as in tokenbudget.
    os.environ.pop("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", None)


class Otel:
    """The global tracer and meter providers of this process, exporting to memory (``clear`` between batches)."""

    def __init__(self, exporter: Any, reader: Any) -> None:
        self.exporter = exporter
        self.reader = reader

    def spans(self) -> int:
        return len(self.exporter.get_finished_spans())

    def clear(self) -> None:
        self.exporter.clear()
        if self.reader is not None:
            # Collecting resets nothing for cumulative temporality, but keeps the reader's own buffers from growing.
            self.reader.get_metrics_data()


_OTEL: Otel | None = None


def setup_otel() -> Otel:
    """Install the OTel SDK once per process: SimpleSpanProcessor -> InMemorySpanExporter, InMemoryMetricReader."""
    global _OTEL
    if _OTEL is not None:
        return _OTEL
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    _OTEL = Otel(exporter, reader)
    return _OTEL


def adopt_otel(exporter: Any, reader: Any = None) -> Otel:
    """For a peer that configures OTel itself (logfire): count spans through the exporter it was given."""
    global _OTEL
    _OTEL = Otel(exporter, reader)
    return _OTEL


def versions() -> dict[str, str]:
    from importlib import metadata

    out: dict[str, str] = {}
    for name in (
        "tokenbudget", "openai", "anthropic", "httpx2", "httpx", "opentelemetry-sdk", "wrapt", "tiktoken", "pydantic",
        "redis", "logfire", "opentelemetry-instrumentation-genai-openai", "opentelemetry-instrumentation-openai-v2",
        "opentelemetry-instrumentation-genai-anthropic",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def source_state() -> dict[str, Any]:
    """Which tokenbudget was measured: the checkout's commit, and whether src/ had uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head or None, "src_uncommitted_changes": bool(dirty)}


def machine() -> dict[str, Any]:
    import platform
    import sys

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "speed_probe_us": speed_probe(),
    }


def speed_probe() -> float:
    """µs per ``sum(range(1000))``, best of 5 x 2,000: how fast this machine runs plain Python, whatever tokenbudget's
    code. Ratios to bare compare across machines; pairs/s and milliseconds do not, and the machines of this
    workplace differed ~2.7x between sessions. The probe tells a reader which of the two changed."""
    import timeit

    return round(min(timeit.Timer("sum(range(1000))").repeat(5, 2000)) / 2000 * 1e6, 2)
