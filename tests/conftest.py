"""Shared fixtures: the real SDK clients against the in-process stand-in server, real OTel SDK with in-memory
exporters, and a guard installed per test with a memory ledger unless a test asks otherwise."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_SHARED = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_SHARED)
# Tests never read the developer's own config or ledger.
os.environ.pop("TOKENBUDGET_CONFIG", None)
os.environ.pop("TOKENBUDGET_LEDGER", None)
os.environ.setdefault("OPENAI_API_KEY", "sk-test-not-a-real-key")
os.environ.setdefault("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key")

from opentelemetry import metrics, trace  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

import tokenbudget  # noqa: E402
from tokenbudget.testing import StandInServer  # noqa: E402

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
trace.set_tracer_provider(_PROVIDER)
_READER = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[_READER]))


class Otel:
    exporter = _EXPORTER
    reader = _READER

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def metric_points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        out: list[Any] = []
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        out.extend(m.data.data_points)
        return out


@pytest.fixture
def otel() -> Iterator[Otel]:
    _EXPORTER.clear()
    yield Otel()
    _EXPORTER.clear()


@pytest.fixture(scope="session")
def server() -> Iterator[StandInServer]:
    with StandInServer() as srv:
        yield srv


@pytest.fixture
def srv(server: StandInServer) -> Iterator[StandInServer]:
    """The session server, reset to its default reply and an empty request log for each test."""
    server.reset() if hasattr(server, "reset") else server.clear()
    yield server
    server.reset() if hasattr(server, "reset") else server.clear()


@pytest.fixture(autouse=True)
def _uninstalled() -> Iterator[None]:
    tokenbudget.uninstall()
    yield
    tokenbudget.uninstall()


@pytest.fixture
def guard(otel: Otel) -> Iterator[tokenbudget.Guard]:
    """tokenbudget installed with a $5 memory-ledger budget."""
    yield tokenbudget.install(ledger_url_memory(), budget_usd=5.0)


def ledger_url_memory() -> dict[str, Any]:
    return {"ledger": "memory://"}


@pytest.fixture
def openai_client(srv: StandInServer) -> Any:
    import openai

    return openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-test", max_retries=0)


@pytest.fixture
def async_openai_client(srv: StandInServer) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=srv.openai_base_url, api_key="sk-test", max_retries=0)


@pytest.fixture
def anthropic_client(srv: StandInServer) -> Any:
    import anthropic

    return anthropic.Anthropic(base_url=srv.anthropic_base_url, api_key="sk-ant-test", max_retries=0)


@pytest.fixture
def async_anthropic_client(srv: StandInServer) -> Any:
    import anthropic

    return anthropic.AsyncAnthropic(base_url=srv.anthropic_base_url, api_key="sk-ant-test", max_retries=0)
