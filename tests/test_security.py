"""Secrets stay out of every sink by default: spans, metrics, logs, ledger events (and the SQLite file's bytes),
alert payloads and exception messages never hold the API key, the Authorization header, prompt text or the webhook
token. Ledger files are private (0600) from the moment they exist.

The planted secrets are distinctive strings; a sink "holds" one if the string (or, for the key, any 12-character
piece of it) appears anywhere in its serialised form. A positive control (``capture_content=True``) proves the grep
does find a prompt when one is there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tokenbudget
from test_faults import ANTHROPIC, IN, OPENAI, OUT, TEXT, Vendor
from tokenbudget.testing import Fault, Reply, StandInServer

OPENAI_KEY = "sk-PLANTED-openai-4f9c2e7a1b3d5f6e8a0c"
ANTHROPIC_KEY = "sk-ant-PLANTED-anthropic-9e8d7c6b5a4f3e2d1c0b"
PROMPT_SECRET = "PROMPT-SECRET-coral-7731-do-not-store"
WEBHOOK_TOKEN = "WEBHOOKTOKEN-xyzzy-5150-plugh"
ANSWER_SECRET = "ANSWER-SECRET-heron-2288-do-not-store"  # in the model's reply: completion text


def secrets() -> list[str]:
    """Every planted secret, plus the pieces a sink could hold without the whole (a key's 12-char windows)."""
    out = [PROMPT_SECRET, ANSWER_SECRET, WEBHOOK_TOKEN, f"Bearer {OPENAI_KEY}"]
    for key in (OPENAI_KEY, ANTHROPIC_KEY):
        body = key.split("PLANTED-", 1)[1]
        out += [key] + [body[i : i + 12] for i in range(0, len(body) - 11)]
    return out


def leaks(text: str) -> list[str]:
    return [s for s in secrets() if s in text]


def assert_clean(where: str, text: str) -> None:
    found = leaks(text)
    assert not found, f"{where} holds {found[:3]}: ...{text[max(0, text.find(found[0]) - 80):][:200]}..."


# -- a webhook receiver ----------------------------------------------------------------------------------------------
@dataclass
class Hook:
    url: str
    bodies: list[bytes] = field(default_factory=list)


@contextlib.contextmanager
def webhook_receiver() -> Iterator[Hook]:
    got: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        yield Hook(f"http://127.0.0.1:{port}/services/T000/B000/{WEBHOOK_TOKEN}?token={WEBHOOK_TOKEN}", got)
    finally:
        server.shutdown()
        server.server_close()


# -- the run ---------------------------------------------------------------------------------------------------------
@dataclass
class Sinks:
    guard: tokenbudget.Guard
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    alerts: list[Any]
    hook: Hook
    errors: list[BaseException]


def client(vendor: Vendor, srv: StandInServer, **kw: Any) -> Any:
    if vendor.name == "openai":
        return openai.OpenAI(base_url=srv.openai_base_url, api_key=OPENAI_KEY, max_retries=0, **kw)
    return anthropic.Anthropic(base_url=srv.anthropic_base_url, api_key=ANTHROPIC_KEY, max_retries=0, **kw)


def prompt(vendor: Vendor, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {**vendor.body(stream), "messages": [{"role": "user", "content": f"My password is {PROMPT_SECRET}."}],
            **extra}  # fmt: skip


def run_everything(srv: StandInServer, ledger_url: str, hook: Hook, *, capture_content: bool = False) -> Sinks:
    """Calls that end ok, in a vendor error (echoing the prompt back, as some do), denied, abandoned and timed out."""
    tp = TracerProvider()
    spans = InMemorySpanExporter()
    tp.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    alerts: list[Any] = []
    unsubscribe = tokenbudget.on_alert(alerts.append) if hasattr(tokenbudget, "on_alert") else None
    guard = tokenbudget.install(
        {"ledger": ledger_url, "team": "sec", "capture_content": capture_content,
         "budgets": [{"scope": "org", "limit_usd": 0.01}, {"scope": "user:broke", "limit_usd": 0.000_001}],
         "alerts": {"webhook": {"url": hook.url, "retries": 0}}},
        tracer_provider=tp, meter_provider=MeterProvider(metric_readers=[reader]),
    )  # fmt: skip
    srv.reply = Reply(text=f"{TEXT} {ANSWER_SECRET}", input_tokens=IN, output_tokens=OUT)
    errors: list[BaseException] = []
    echo = {"error": {"message": f"Invalid request: 'My password is {PROMPT_SECRET}.' is not allowed",
                      "type": "invalid_request_error", "param": "messages", "code": "bad_prompt"}}  # fmt: skip
    try:
        for vendor in (OPENAI, ANTHROPIC):
            c = client(vendor, srv)
            vendor.create(c)(**prompt(vendor))  # ok
            list(vendor.create(c)(**prompt(vendor, stream=True)))  # ok, streamed
            srv.push(Fault(status=400, body=echo))  # the vendor's error echoes the prompt
            with pytest.raises(vendor.sdk.BadRequestError) as bad:
                vendor.create(c)(**prompt(vendor))
            errors.append(bad.value)
            srv.push(Fault(status=500))
            with pytest.raises(vendor.sdk.InternalServerError):
                vendor.create(c)(**prompt(vendor))
            with tokenbudget.scope(user="broke"), pytest.raises(tokenbudget.BudgetExceeded) as denied:
                vendor.create(c)(**prompt(vendor))
            errors.append(denied.value)
            stream = vendor.create(c)(**prompt(vendor, stream=True))
            for n, _ in enumerate(stream):  # abandoned after a few events
                if n == 3:
                    break
            stream.close()
            srv.push(Fault(delay=1.0))
            with pytest.raises(vendor.sdk.APITimeoutError):
                vendor.create(client(vendor, srv, timeout=0.2))(**prompt(vendor))
            srv.push(Fault(status=529, truncate_after=4))  # an error event mid-stream, echoing the prompt
            with pytest.raises(vendor.sdk.APIError) as midstream:
                list(vendor.create(c)(**prompt(vendor, stream=True)))
            errors.append(midstream.value)
        try:
            from tokenbudget import alerts as alerts_module
        except ImportError:  # alerts not there (yet): their sinks are skipped below
            pass
        else:
            manager = alerts_module.get_manager(guard)
            if manager is not None:
                assert manager.flush(10.0)
    finally:
        if unsubscribe is not None:
            unsubscribe()
    return Sinks(guard, spans, reader, alerts, hook, errors)


def grep_everything(sinks: Sinks, caplog: pytest.LogCaptureFixture, db: Path | None) -> None:
    spans = sinks.spans.get_finished_spans()
    assert len(spans) >= 14
    for span in spans:  # name, every attribute, event, link and the status description
        assert_clean(f"span {span.name!r}", span.to_json())
    data = sinks.metrics.get_metrics_data()
    assert data is not None
    assert_clean("metrics", data.to_json())
    events = list(sinks.guard.ledger.events())
    assert {e.status for e in events} >= {"ok", "error", "denied", "abandoned"}
    assert_clean("ledger events", json.dumps([e.to_dict() for e in events]) + repr(events))
    for record in caplog.records:
        ours = record.name.split(".")[0] == "tokenbudget"
        # Every tokenbudget record at any level. Other libraries' records from INFO up: the SDKs' own DEBUG logs
        # print the request options (prompt included) by design; that is theirs to configure, not ours.
        if ours or record.levelno >= logging.INFO:
            text = record.getMessage() + (record.exc_text or "") + repr(getattr(record, "tokenbudget_alert", ""))
            if record.exc_info and record.exc_info[1] is not None:
                text += repr(record.exc_info[1]) + str(record.exc_info[1])
            assert_clean(f"log record {record.name}:{record.levelname}", text)
    for exc in sinks.errors:
        if isinstance(exc, tokenbudget.TokenBudgetError):
            assert_clean(f"{type(exc).__name__} message", str(exc) + repr(exc))
    if hasattr(tokenbudget, "on_alert"):
        assert sinks.alerts, "no alert fired: the alert sinks were not exercised"
        for alert in sinks.alerts:
            assert_clean("alert", json.dumps(alert.to_dict()) + json.dumps(alert.webhook_payload()) + repr(alert))
        assert sinks.hook.bodies, "the webhook received nothing"
        for body in sinks.hook.bodies:
            assert_clean("webhook payload", body.decode())
    if db is not None:
        tokenbudget.uninstall()  # close it, so the WAL is checkpointed into the file as well
        for part in sorted(db.parent.glob(db.name + "*")):
            raw = part.read_bytes()
            for s in secrets():
                assert s.encode() not in raw and s.encode("utf-16-le") not in raw, f"{part.name} holds {s}"


@pytest.fixture
def hook() -> Iterator[Hook]:
    with webhook_receiver() as h:
        yield h


@pytest.mark.parametrize("ledger", ["memory", "sqlite"])
def test_no_secret_reaches_any_sink(tmp_path: Path, srv: StandInServer, hook: Hook, ledger: str,
                                    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "private" / "ledger.db" if ledger == "sqlite" else None
    url = "memory://" if db is None else f"sqlite:///{db}"
    sinks = run_everything(srv, url, hook)
    assert any(r.headers.get("authorization") == f"Bearer {OPENAI_KEY}" for r in srv.requests)  # the key was used
    assert any(PROMPT_SECRET.encode() in r.raw for r in srv.requests)  # ... and the prompt sent
    grep_everything(sinks, caplog, db)


def test_the_grep_finds_a_prompt_when_content_capture_is_on(srv: StandInServer, hook: Hook) -> None:
    """Positive control: with ``capture_content=True`` (opt-in) the prompt and the answer are on the spans, and the
    grep says so."""
    sinks = run_everything(srv, "memory://", hook, capture_content=True)
    found = [leaks(s.to_json()) for s in sinks.spans.get_finished_spans()]
    assert any(PROMPT_SECRET in f for f in found)
    assert any(ANSWER_SECRET in f for f in found)


def test_the_file_grep_finds_what_the_ledger_stores(tmp_path: Path, srv: StandInServer) -> None:
    """Positive control for the byte grep: a name the ledger does store (the team) is found in the file."""
    db = tmp_path / "ledger.db"
    tokenbudget.install({"ledger": f"sqlite:///{db}", "team": PROMPT_SECRET})
    srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
    OPENAI.create(client(OPENAI, srv))(**prompt(OPENAI))
    tokenbudget.uninstall()
    assert any(PROMPT_SECRET.encode() in p.read_bytes() for p in db.parent.glob(db.name + "*"))


@pytest.mark.parametrize(
    ("config", "secret"),
    [({"ledger": "postgres://admin:DB-PASSWORD-8812@db.internal/budgets"}, "DB-PASSWORD-8812"),
     ({"ledger": "mysql://root:DB-PASSWORD-8812@db/x"}, "DB-PASSWORD-8812"),
     ({"alerts": {"webhook": {"url": f"https://hooks.example/services/{WEBHOOK_TOKEN}", "timeout_seconds": -1}}},
      WEBHOOK_TOKEN),
     ({"alerts": {"webhook": {"url": f"https://hooks.example/services/{WEBHOOK_TOKEN}", "retries": "many"}}},
      WEBHOOK_TOKEN),
     ({"alerts": {"webhook": {"url": f"https://hooks.example/{WEBHOOK_TOKEN}", "secret": 1}}}, WEBHOOK_TOKEN)],
)  # fmt: skip
def test_config_errors_do_not_echo_secrets(config: dict[str, Any], secret: str) -> None:
    with pytest.raises(tokenbudget.ConfigError) as info:
        tokenbudget.install({"ledger": "memory://", **config})
    text = str(info.value) + repr(info.value)
    assert secret not in text, text
    assert info.value.key is not None and info.value.key.split(".")[0] in config  # and it still names the key


def test_budget_exceeded_names_the_budget_not_the_call(srv: StandInServer) -> None:
    tokenbudget.install({"ledger": "memory://", "budget_usd": 0.000_001})
    for vendor in (OPENAI, ANTHROPIC):
        with pytest.raises(tokenbudget.BudgetExceeded) as info:
            vendor.create(client(vendor, srv))(**prompt(vendor))
        text = str(info.value) + repr(info.value) + repr(vars(info.value))
        assert_clean("BudgetExceeded", text)
        assert "'org'" in text and vendor.model in text
    assert srv.requests == []


# -- ledger files are private ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_ledger_files_are_0600_and_their_directory_0700(tmp_path: Path, srv: StandInServer, umask: int) -> None:
    db = tmp_path / "new" / "dir" / "ledger.db"
    old = os.umask(umask)
    try:
        guard = tokenbudget.install({"ledger": f"sqlite:///{db}", "budget_usd": 5.0})
        srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
        for vendor in (OPENAI, ANTHROPIC):  # writes: the -wal and -shm files exist now
            vendor.create(client(vendor, srv))(**prompt(vendor))
        assert len(list(guard.ledger.events())) == 2
        files = sorted(db.parent.glob(db.name + "*"))
        assert {p.name for p in files} >= {"ledger.db", "ledger.db-wal", "ledger.db-shm"}
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p.name, oct(p.stat().st_mode))
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
        tokenbudget.uninstall()
        for p in sorted(db.parent.glob(db.name + "*")):  # whatever is left after close is still private
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
    finally:
        os.umask(old)
