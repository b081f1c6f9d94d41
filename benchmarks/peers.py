"""Peer instrumentations, each in its own virtualenv and process, measured with the same harness as tokenbudget.

A peer's numbers are ratios to bare measured in *that* process (same interpreter, same SDK versions, same OTel
SDK setup), with tokenbudget's memory-ledger variant run there too as a same-process yardstick. Venvs live under
``/tmp/bench-venvs/`` (``TB_BENCH_VENVS`` overrides) and are made by ``python -m benchmarks --setup-peers``; a peer
whose venv is missing, or whose package cannot be installed, is reported as such, never faked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENVS = Path(os.environ.get("TB_BENCH_VENVS", "/tmp/bench-venvs"))
_BASE_PACKAGES = ("openai", "anthropic", "opentelemetry-sdk")


@dataclass(frozen=True)
class Peer:
    name: str
    venv: str
    packages: tuple[str, ...]
    label: str
    vendors: tuple[str, ...]
    pre: bool = False

    @property
    def python(self) -> Path:
        return VENVS / self.venv / "bin" / "python"


PEERS: tuple[Peer, ...] = (
    Peer("otel-genai", "otel",
         ("opentelemetry-instrumentation-genai-openai", "opentelemetry-instrumentation-genai-anthropic"),
         "OpenTelemetry official GenAI instrumentations (genai-openai + genai-anthropic)", ("openai", "anthropic"),
         pre=True),
    # 2.4b0 imports httpx (openai 3.x moved to httpx2) and opentelemetry.util.genai.instruments (gone in
    # opentelemetry-util-genai 1.2b0), and declares neither: both are pinned here so that it imports at all. httpx
    # below 1: this venv installs pre-releases, and httpx 1.0.dev6 has no `Timeout`, which openai's httpx2 shim reads.
    Peer("otel-openai-v2", "otelv2",
         ("opentelemetry-instrumentation-openai-v2", "opentelemetry-util-genai==1.1b0", "httpx<1"),
         "opentelemetry-instrumentation-openai-v2 (the official OpenAI instrumentation's older name; needs httpx and "
         "opentelemetry-util-genai 1.1b0 added by hand)", ("openai",), pre=True),
    Peer("logfire", "logfire", ("logfire",), "pydantic logfire instrument_openai() / instrument_anthropic()",
         ("openai", "anthropic")),
)


def setup(peers: tuple[Peer, ...] = PEERS, log: Any = print) -> None:
    """Create or refresh every peer venv (tokenbudget editable from this checkout, the SDKs, the peer package)."""
    VENVS.mkdir(parents=True, exist_ok=True)
    for peer in peers:
        venv = VENVS / peer.venv
        if not peer.python.exists():
            log(f"creating {venv}")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        cmd = [str(peer.python), "-m", "pip", "install", "-q", "-e", str(REPO), *_BASE_PACKAGES, *peer.packages]
        if peer.pre:
            cmd.insert(4, "--pre")
        log("  " + " ".join(cmd[2:]))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("WARNING"))[-1500:]
            log(f"  could not install {peer.name}: {tail}")
            (venv / "INSTALL_FAILED").write_text(tail)
        else:
            (venv / "INSTALL_FAILED").unlink(missing_ok=True)


def unavailable_reason(peer: Peer) -> str | None:
    venv = VENVS / peer.venv
    if (venv / "INSTALL_FAILED").exists():
        return "could not be installed: " + (venv / "INSTALL_FAILED").read_text().strip().splitlines()[-1][:300]
    if not peer.python.exists():
        return f"venv {venv} missing: run `python -m benchmarks --setup-peers`"
    return None


def run_all(
    *, rounds: int, batch: int, warmup: int, log: Any = print, limit: int | None = None
) -> list[dict[str, Any]]:
    """Each available peer in its own process; returns one entry per peer (rows, or why it did not run)."""
    out: list[dict[str, Any]] = []
    ran = 0
    for peer in PEERS:
        reason = unavailable_reason(peer)
        if reason is None and limit is not None and ran >= limit:
            reason = "not run in --quick (only the first installed peer is)"
        ran += reason is None
        entry: dict[str, Any] = {"peer": peer.name, "label": peer.label, "rows": []}
        if reason is not None:
            entry["skipped"] = reason
            log(f"  {peer.name}: skipped ({reason})")
            out.append(entry)
            continue
        log(f"  {peer.name}: running in {peer.python}")
        with tempfile.TemporaryDirectory(prefix="tb-bench-peer-") as tmp:
            result = Path(tmp) / "peer.json"
            cmd = [str(peer.python), "-m", "benchmarks", "--peer-worker", peer.name, "--json", str(result),
                   "--rounds", str(rounds), "--batch", str(batch), "--warmup", str(warmup)]
            t0 = time.monotonic()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600, check=False)
            if proc.returncode != 0 or not result.exists():
                entry["skipped"] = f"worker failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
                log(f"  {peer.name}: {entry['skipped']}")
            else:
                entry.update(json.loads(result.read_text()))
                entry["seconds"] = round(time.monotonic() - t0, 1)
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# inside the peer's venv


def _peer_variants(peer: Peer, server: Any, otel_exporter_holder: list[Any]) -> tuple[list[Any], Any]:
    """(variants, otel) for the worker; configures OTel the way the peer expects."""
    from . import calls
    from ._env import adopt_otel, setup_otel

    if peer.name == "logfire":
        import logfire  # type: ignore[import-not-found,unused-ignore]  # only in the logfire peer's venv
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        exporter = InMemorySpanExporter()
        logfire.configure(send_to_logfire=False, console=False, additional_span_processors=[
            SimpleSpanProcessor(exporter)], inspect_arguments=False)
        otel = adopt_otel(exporter)
        own = calls.make_clients(server)
        for client in (own.openai, own.aopenai):
            logfire.instrument_openai(client)
        for client in (own.anthropic, own.aanthropic):
            logfire.instrument_anthropic(client)
        peer_variant = calls.Variant("logfire", clients=own, note="logfire.instrument_openai/anthropic(client)")
        return [peer_variant], otel

    otel = setup_otel()
    variants = []
    if peer.name == "otel-genai":
        from opentelemetry.instrumentation.genai.anthropic import AnthropicInstrumentor
        from opentelemetry.instrumentation.genai.openai import OpenAIInstrumentor

        def enable() -> None:
            OpenAIInstrumentor().instrument()
            AnthropicInstrumentor().instrument()

        def disable() -> None:
            OpenAIInstrumentor().uninstrument()
            AnthropicInstrumentor().uninstrument()

        variants.append(calls.Variant("otel-genai", enable, disable, note="OpenAIInstrumentor + AnthropicInstrumentor"))
    elif peer.name == "otel-openai-v2":
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor as V2

        variants.append(calls.Variant("otel-openai-v2", lambda: V2().instrument(), lambda: V2().uninstrument(),
                                      vendors=("openai",), note="openai_v2.OpenAIInstrumentor"))
    return variants, otel


def worker(name: str, *, rounds: int, batch: int, warmup: int) -> dict[str, Any]:
    import asyncio

    from tokenbudget.testing import StandInServer

    from . import calls
    from ._env import clean_environment, versions

    clean_environment()
    peer = next(p for p in PEERS if p.name == name)
    with StandInServer() as server:
        peer_variants, otel = _peer_variants(peer, server, [])
        clients = calls.make_clients(server)
        variants = [calls.bare_variant(), *peer_variants,
                    calls.tokenbudget_variant("tokenbudget-memory", "memory://",
                                              note="same-process yardstick")]
        scenarios = calls.all_scenarios(peer.vendors)
        loop = asyncio.new_event_loop()
        try:
            cells = calls.run_matrix(scenarios, variants, server=server, clients=clients, otel=otel, loop=loop,
                                     rounds=rounds, batch=batch, warmup=warmup)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        rows = calls.summarize(cells, variants)
    for row in rows:
        if row["variant"] not in ("bare", "tokenbudget-memory") and row["spans_per_call"] == 0:
            row["note"] += " -- produced NO spans: not working with this SDK version"
    return {"rows": rows, "versions": versions(), "python": sys.executable}
