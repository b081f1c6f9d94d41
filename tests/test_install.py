"""install() / uninstall(): idempotent, restores the identical originals, works before or after the SDK import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import anthropic._base_client as abc_
import anthropic._streaming as ast_
import openai._base_client as obc
import openai._streaming as ost

import tokenbudget

TARGETS = [
    (obc.SyncAPIClient, "request"),
    (obc.AsyncAPIClient, "request"),
    (ost.Stream, "_iter_events"),
    (ost.AsyncStream, "_iter_events"),
    (abc_.SyncAPIClient, "request"),
    (abc_.AsyncAPIClient, "request"),
    (ast_.Stream, "_iter_events"),
    (ast_.AsyncStream, "_iter_events"),
    (abc_.BaseClient, "_tracer"),
]


def test_uninstall_restores_identical_objects() -> None:
    before = [owner.__dict__[name] for owner, name in TARGETS]
    g1 = tokenbudget.install({"ledger": "memory://"})
    during = [owner.__dict__[name] for owner, name in TARGETS]
    assert all(a is not b for a, b in zip(before, during, strict=True))
    assert tokenbudget.install() is g1  # idempotent: no second layer of wrapping
    assert [owner.__dict__[name] for owner, name in TARGETS] == during
    tokenbudget.uninstall()
    after = [owner.__dict__[name] for owner, name in TARGETS]
    assert all(a is b for a, b in zip(before, after, strict=True))
    assert tokenbudget.active_guard() is None
    tokenbudget.uninstall()  # twice is harmless


def test_reinstall_with_new_settings_replaces_guard_not_patches() -> None:
    g1 = tokenbudget.install({"ledger": "memory://"}, budget_usd=1)
    wrapped = obc.SyncAPIClient.__dict__["request"]
    g2 = tokenbudget.install({"ledger": "memory://"}, budget_usd=2)
    assert g2 is not g1 and obc.SyncAPIClient.__dict__["request"] is wrapped


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_install_before_sdk_import_patches_on_import() -> None:
    out = _run("""
        import sys, tokenbudget
        tokenbudget.install(ledger="memory://")
        assert "openai" not in sys.modules
        import openai._base_client as b
        print(type(b.SyncAPIClient.__dict__["request"]).__name__)
    """)
    assert out == "FunctionWrapper"


def test_import_is_light() -> None:
    """Installing must not load tiktoken encodings or the SDKs themselves."""
    out = _run("""
        import sys, tokenbudget
        tokenbudget.install(ledger="memory://")
        print("openai" in sys.modules, "anthropic" in sys.modules, "tiktoken" in sys.modules)
    """)
    assert out == "False False False"


def test_opentelemetry_instrumentor_entry_point() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="opentelemetry_instrumentor") if e.name == "tokenbudget"]
    inst = ep.load()()
    inst.instrument()
    try:
        assert tokenbudget.installed()
    finally:
        inst.uninstrument()
    assert not tokenbudget.installed()
