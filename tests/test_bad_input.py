"""Bad input: every config key mistyped, absurd limits, overlapping rules, unknown scopes and models, odd content.

Each case ends in one of two ways: a clear :class:`tokenbudget.TokenBudgetError` subclass naming the problem (before
anything is sent), or a call that behaves as it would without tokenbudget -- the SDK's answer with a correct charge,
or the SDK's own error with nothing left reserved. Never some other exception out of the guard.
"""

from __future__ import annotations

import base64
import datetime
import logging
import math
import struct
import types
import typing
import zlib
from pathlib import Path
from typing import Any, Literal

import pydantic
import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenbudget
from test_faults import ANTHROPIC, IN, OPENAI, OUT, TEXT, VENDORS, Vendor, assert_exact, only_event
from tokenbudget.calls import CallRequest
from tokenbudget.config import Settings, load_settings
from tokenbudget.estimate import Estimator
from tokenbudget.guard import Guard
from tokenbudget.ledger import MemoryLedger
from tokenbudget.testing import Reply, StandInServer

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture
def g(srv: StandInServer) -> tokenbudget.Guard:
    srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
    return tokenbudget.install({"ledger": "memory://"}, budget_usd=5.0)


# -- every config key, wrongly typed ---------------------------------------------------------------------------------
class Opaque:
    """Not a str, number, bool, mapping or sequence: no setting accepts it."""


# Values of one JSON-ish kind each, and the kinds a field of each annotation accepts (pydantic's lax mode converts
# between some of them: an int is a valid float, 0/1 are valid bools, any mapping is a valid model).
SAMPLES: dict[str, Any] = {
    "str": "some text", "int": 7, "float": 2.5, "bool": True, "list": ["a", 1], "dict": {"x": {"y": 1}},
    "bytes": b"\xff\xfe", "opaque": Opaque(),
}  # fmt: skip
ACCEPTS: dict[str, set[str]] = {
    "str": {"str"}, "int": {"int", "bool"}, "float": {"int", "float", "bool"}, "bool": {"bool"},
    "dict": {"dict"}, "tuple": {"list"}, "model": {"dict"}, "literal": set(),
}  # fmt: skip


def _kinds(annotation: Any) -> set[str]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if annotation is type(None):
        return set()
    if origin is Literal:
        return {"literal"}
    if origin is dict:
        return {"dict"}
    if origin is tuple:
        return {"tuple"}
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return {"model"}
    for kind in ("bool", "int", "float", "str"):
        if annotation is {"bool": bool, "int": int, "float": float, "str": str}[kind]:
            return {kind}
    raise AssertionError(f"no wrong-type samples for {annotation!r}: teach _kinds about it")


def wrong_values(annotation: Any) -> list[tuple[str, Any]]:
    accepted = set().union(*(ACCEPTS[k] for k in _kinds(annotation)))
    return [(kind, value) for kind, value in SAMPLES.items() if kind not in accepted]


WRONG = [
    pytest.param(key, value, id=f"{key}-{kind}")
    for key, field in Settings.model_fields.items()
    for kind, value in wrong_values(field.annotation)
]


def test_every_settings_key_gets_several_wrong_types() -> None:
    covered = {p.values[0] for p in WRONG}
    assert covered == set(Settings.model_fields)
    for key in Settings.model_fields:
        assert sum(1 for p in WRONG if p.values[0] == key) >= 4, key


@pytest.mark.parametrize(("key", "value"), WRONG)
def test_wrong_type_is_a_config_error_naming_the_key(srv: StandInServer, key: str, value: Any) -> None:
    with pytest.raises(tokenbudget.ConfigError) as info:
        tokenbudget.install({"ledger": "memory://"}, **{key: value})
    err = info.value
    assert err.key is not None and err.key.split(".")[0] == key, str(err)
    assert f"{key}" in str(err) and "Traceback" not in str(err)
    assert not tokenbudget.installed()
    with pytest.raises(tokenbudget.ConfigError) as again:  # the same through a config dict
        load_settings({key: value})
    assert again.value.key is not None and again.value.key.split(".")[0] == key


@pytest.mark.parametrize(
    ("env", "value"),
    [("TOKENBUDGET_BUDGET_USD", "lots"), ("TOKENBUDGET_LEASE_SECONDS", "-5"), ("TOKENBUDGET_ON_EXHAUST", "panic"),
     ("TOKENBUDGET_UNKNOWN_MODEL", "ignore"), ("TOKENBUDGET_CAPTURE_CONTENT", "perhaps"),
     ("TOKENBUDGET_TIMEZONE", "Mars/Olympus"), ("TOKENBUDGET_ON_LEDGER_ERROR", "ajar"),
     ("TOKENBUDGET_BUDGET_USD", "nan"), ("TOKENBUDGET_BUDGET_USD", "inf")],
)  # fmt: skip
def test_wrong_environment_value_names_variable_source_and_key(monkeypatch: pytest.MonkeyPatch, env: str,
                                                               value: str) -> None:
    from tokenbudget.config import _ENV_KEYS

    monkeypatch.setenv(env, value)
    with pytest.raises(tokenbudget.ConfigError) as info:
        tokenbudget.install({"ledger": "memory://"})
    assert info.value.key == _ENV_KEYS[env]
    assert "environment" in str(info.value)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.binary(max_size=4),
    st.builds(Opaque), st.datetimes(), st.sampled_from(["raise", "warn", "org", "team:*", "UTC", "day", "gpt-4o-mini"]),
)  # fmt: skip
RULE_KEYS = ["scope", "limit_usd", "limit_tokens", "period", "on_exhaust", "downgrade_at", "min_output_tokens", "name",
             "model", "input", "output", "url", "thresholds", "webhook", "max_output_tokens", "api"]  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.sampled_from(RULE_KEYS),
                                                                inner, max_size=4),
    max_leaves=8,
)
configs = st.dictionaries(st.sampled_from([k for k in Settings.model_fields if k != "ledger"] + ["no_such_key"]),
                          values, max_size=4)


@FUZZ
@given(configs)
def test_config_loader_fuzz_only_ever_says_config_error(data: dict[str, Any]) -> None:
    try:
        resolved = load_settings(data)
    except tokenbudget.ConfigError as exc:
        assert exc.key or exc.source
        return
    try:  # what validated must also build a guard (prices, scopes and time zones are checked there)
        Guard(resolved, ledger=MemoryLedger()).close()
    except tokenbudget.TokenBudgetError:
        pass


# -- negative, absurd, overlapping, unknown --------------------------------------------------------------------------
ABSURD = [
    ({"budget_usd": math.nan}, "budget_usd"), ({"budget_usd": math.inf}, "budget_usd"),
    ({"budget_usd": -0.01}, "budget_usd"), ({"budget_tokens": -1}, "budget_tokens"),
    ({"budgets": [{"scope": "org", "limit_usd": math.nan}]}, "budgets.0.limit_usd"),
    ({"budgets": [{"scope": "org", "limit_usd": -math.inf}]}, "budgets.0.limit_usd"),
    ({"budgets": [{"scope": "org", "limit_usd": -1}]}, "budgets.0.limit_usd"),
    ({"budgets": [{"scope": "org", "limit_tokens": -5}]}, "budgets.0.limit_tokens"),
    ({"budgets": [{"scope": "org", "limit_tokens": 2.5}]}, "budgets.0.limit_tokens"),
    ({"budgets": [{"scope": "org"}]}, "budgets.0"),
    ({"budgets": [{"scope": "org", "limit_usd": 1, "downgrade_at": math.nan}]}, "budgets.0.downgrade_at"),
    ({"budgets": [{"scope": "org", "limit_usd": 1, "downgrade_at": 1.5}]}, "budgets.0.downgrade_at"),
    ({"budgets": [{"scope": "org", "limit_usd": 1, "min_output_tokens": 0}]}, "budgets.0.min_output_tokens"),
    ({"lease_seconds": 0}, "lease_seconds"), ({"lease_seconds": math.nan}, "lease_seconds"),
    ({"lease_seconds": math.inf}, "lease_seconds"), ({"lease_seconds": 1e308}, "lease_seconds"),
    ({"alerts": {"thresholds": [math.nan]}}, "alerts.thresholds"),
    ({"alerts": {"thresholds": [0]}}, "alerts.thresholds"),
    ({"alerts": {"spike_factor": math.nan}}, "alerts.spike_factor"),
    ({"alerts": {"webhook": {"url": "https://example.invalid/x", "retries": 10**9}}}, "alerts.webhook.retries"),
    ({"prices": {"my-model": {"input": math.nan, "output": 1}}}, "prices.my-model.input"),
    ({"prices": {"my-model": {"input": 1, "output": -1}}}, "prices.my-model.output"),
    ({"prices": {"my-model": {"input": math.inf, "output": 1}}}, "prices.my-model.input"),
    ({"prices": {"my-model": {"input": 1e308, "output": 1}}}, "prices.my-model.input"),
    ({"prices": {"my-model": {"input": 1, "output": 1e30}}}, "prices.my-model.output"),
    ({"prices": {"m": {"input": 1, "output": 1, "max_output_tokens": 10**30}}}, "prices.m.max_output_tokens"),
    ({"prices": {"m": {"input": 1, "output": 1, "context_window": 10**30}}}, "prices.m.context_window"),
]  # fmt: skip


@pytest.mark.parametrize(("config", "key"), ABSURD, ids=[k + "=" + repr(c)[:40] for c, k in ABSURD])
def test_negative_nan_infinite_and_absurd_settings_are_refused(srv: StandInServer, config: dict[str, Any],
                                                               key: str) -> None:
    with pytest.raises(tokenbudget.ConfigError) as info:
        tokenbudget.install({"ledger": "memory://", **config})
    assert info.value.key == key, str(info.value)
    assert not tokenbudget.installed() and srv.requests == []


@pytest.mark.parametrize("ledger", ["memory", "sqlite"])
@pytest.mark.parametrize(
    "config",
    [{"budget_usd": 1e308}, {"budget_tokens": 10**30},
     {"budgets": [{"scope": "org", "limit_usd": 1e308, "limit_tokens": 2**80, "period": "day"}]},
     {"prices": {"gpt-4o-mini": {"input": 999_999, "output": 999_999}}}],
    ids=["usd-1e308", "tokens-1e30", "rule-1e308", "dearest-allowed-price"],
)  # fmt: skip
def test_huge_but_valid_limits_work_and_stay_exact(tmp_path: Path, srv: StandInServer, ledger: str,
                                                   config: dict[str, Any]) -> None:
    url = "memory://" if ledger == "memory" else f"sqlite:///{tmp_path}/l.db"
    guard = tokenbudget.install({"ledger": url, **config})
    srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
    for vendor in (OPENAI, ANTHROPIC):
        assert vendor.text(vendor.create(vendor.client(srv))(**vendor.body(False))) == TEXT
    events = assert_exact(guard, calls=2)
    if "prices" in config:
        assert events[0].cost_micros == (IN + OUT) * 999_999
    else:
        assert [e.cost_micros for e in events] == [OPENAI.cost(IN, OUT), ANTHROPIC.cost(IN, OUT)]


@pytest.mark.parametrize("ledger", ["memory", "sqlite"])
@pytest.mark.parametrize("max_tokens", [-5, 0, 10**30])
@pytest.mark.parametrize("vendor", VENDORS)
def test_absurd_max_tokens_in_the_call(tmp_path: Path, srv: StandInServer, vendor: Vendor, max_tokens: int,
                                       ledger: str) -> None:
    """Either the vendor gets the call and answers (0 is an odd but valid ask), or tokenbudget names the argument."""
    url = "memory://" if ledger == "memory" else f"sqlite:///{tmp_path}/l.db"
    guard = tokenbudget.install({"ledger": url, "budget_usd": 5.0})
    srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
    client = vendor.client(srv)
    if max_tokens == 0:
        vendor.create(client)(**{**vendor.body(False), "max_tokens": 0})
        assert only_event(guard).status == "ok"
        return
    with pytest.raises(tokenbudget.TokenBudgetError) as info:
        vendor.create(client)(**{**vendor.body(False), "max_tokens": max_tokens})
    assert "max_tokens" in str(info.value) and str(max_tokens) in str(info.value)
    assert srv.requests == []
    assert_exact(guard, calls=0)


@pytest.mark.parametrize("ledger", ["memory", "sqlite"])
def test_overlapping_rules_charge_each_account_once_and_the_tightest_limit_wins(tmp_path: Path, srv: StandInServer,
                                                                                ledger: str) -> None:
    per_call = OPENAI.cost(IN, OUT)
    rules = [
        {"scope": "org", "limit_usd": 5},
        {"scope": "org", "limit_usd": 1},  # same scope and period: one account, the tighter limit
        {"scope": "team:search", "limit_usd": 4},
        {"scope": "team:*", "limit_usd": 3},  # resolves to team:search too: same account
        {"scope": "team:search/user:*", "limit_usd": 2},
        {"scope": "org", "limit_usd": 5, "name": "separate"},  # a named rule keeps its own account
        {"scope": "org", "limit_usd": 5, "period": "day"},  # another period: its own account
    ]
    url = "memory://" if ledger == "memory" else f"sqlite:///{tmp_path}/l.db"
    guard = tokenbudget.install({"ledger": url, "team": "search", "user": "ann", "budgets": rules})
    srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
    client = OPENAI.client(srv)
    OPENAI.create(client)(**OPENAI.body(False))
    (event,) = assert_exact(guard, calls=1)
    keys = event.budget_keys
    assert len(keys) == len(set(keys)) == 5, keys
    now = guard.clock.now()
    for key in keys:  # charged once per account, not once per rule
        assert guard.ledger.balance(tokenbudget.ledger.Allowance(key, key), now=now).spent_micros == per_call
    # The tightest limit of a shared account is the one enforced, in either order.
    for tight in ([*rules[:1], {"scope": "org", "limit_usd": 0.000_005}], [{"scope": "org", "limit_usd": 0.000_005},
                                                                            *rules[:1]]):
        tokenbudget.install({"ledger": "memory://", "budgets": tight})
        with pytest.raises(tokenbudget.BudgetExceeded) as info:
            OPENAI.create(client)(**{**OPENAI.body(False), "max_tokens": 10})
        assert info.value.scope == "org" and info.value.limit == pytest.approx(0.000_005)
    assert len(srv.requests) == 1


@pytest.mark.parametrize(
    "scope", ["department:x", "team", "user:", "tag:x", "tag:=v", "org/galaxy:*", "", "   ", "team:a//user:b"]
)
def test_unknown_scope_is_a_config_error_naming_it(srv: StandInServer, scope: str) -> None:
    with pytest.raises(tokenbudget.ConfigError) as info:
        tokenbudget.install({"ledger": "memory://", "budgets": [{"scope": scope, "limit_usd": 1}]})
    assert info.value.key is not None and info.value.key.startswith("budgets.0")
    assert "scope" in str(info.value)
    assert not tokenbudget.installed()


@pytest.mark.parametrize("vendor", VENDORS)
def test_unknown_model_raise_refuses_before_sending(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor) -> None:
    with pytest.raises(tokenbudget.UnknownModelError, match="mystery-model-7b"):
        vendor.create(vendor.client(srv))(**{**vendor.body(False), "model": "mystery-model-7b"})
    assert srv.requests == []
    assert_exact(g, calls=0)


def test_unknown_model_warn_charges_the_stated_fallback_and_logs_once_per_model(
    srv: StandInServer, caplog: pytest.LogCaptureFixture
) -> None:
    from tokenbudget.pricing import FALLBACK_INPUT_USD_PER_MTOK, FALLBACK_OUTPUT_USD_PER_MTOK

    caplog.set_level(logging.WARNING, logger="tokenbudget.pricing")
    guard = tokenbudget.install({"ledger": "memory://", "unknown_model": "warn", "budget_usd": 5.0})
    srv.reply = Reply(text=TEXT, input_tokens=IN, output_tokens=OUT)
    models = ["mystery-1", "mystery-1", "mystery-2", "mystery-1", "mystery-2"]
    for i, model in enumerate(models):
        vendor = (OPENAI, ANTHROPIC)[i % 2]
        vendor.create(vendor.client(srv))(**{**vendor.body(False), "model": model})
    fallback = (IN * FALLBACK_INPUT_USD_PER_MTOK + OUT * FALLBACK_OUTPUT_USD_PER_MTOK)  # micro-dollars exactly
    events = assert_exact(guard, calls=len(models))
    assert [e.cost_micros for e in events] == [fallback] * len(models)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tokenbudget.pricing"]
    assert len(warnings) == 2, warnings
    assert "'mystery-1'" in warnings[0] and "'mystery-2'" in warnings[1]


# -- content: non-text, huge, odd Unicode, unserialisable tools ------------------------------------------------------
def png(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def wav(seconds: int) -> bytes:
    rate = 8000
    data = b"\x00\x00" * rate * seconds
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
            + struct.pack("<I", len(data)) + data)  # fmt: skip


def non_text_messages(vendor: Vendor) -> list[dict[str, Any]]:
    image = base64.b64encode(png(1024, 1024)).decode()
    if vendor.name == "openai":
        return [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}", "detail": "high"}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav(3)).decode(), "format": "wav"}},
            {"type": "file", "file": {"file_id": "file-abc"}},
        ]}]  # fmt: skip
    pdf = base64.b64encode(b"%PDF-1.4\n1 0 obj << /Type /Page >> endobj\n2 0 obj << /Type /Page >> endobj\n").decode()
    return [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf}},
        {"type": "image", "source": {"type": "url", "url": "https://example.invalid/cat.png"}},
    ]}]  # fmt: skip


@pytest.mark.parametrize("vendor", VENDORS)
def test_non_text_content_is_estimated_and_charged(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor) -> None:
    client = vendor.client(srv)
    vendor.create(client)(**{**vendor.body(False), "messages": [{"role": "user", "content": "what is this"}]})
    vendor.create(client)(**{**vendor.body(False), "messages": non_text_messages(vendor)})
    text_only, rich = assert_exact(g, calls=2)
    # The reservation priced the image, audio, PDF pages and files: thousands of tokens, not the few words.
    extra_tokens = (rich.estimated_micros - text_only.estimated_micros) * 1_000_000 // vendor.input_pico
    assert extra_tokens >= (765 + 30 + 10_000 if vendor.name == "openai" else 1398 + 2 * 3000 + 1600), extra_tokens
    assert rich.status == "ok" and rich.cost_micros == vendor.cost(IN, OUT)


@pytest.mark.parametrize("vendor", VENDORS)
def test_ten_megabyte_message(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor) -> None:
    big = "lorem ipsum dolor sit amet " * (10_000_000 // 27)
    srv.reply = Reply(text=TEXT, input_tokens=2_000_000, output_tokens=OUT)
    messages = [{"role": "user", "content": big}]
    vendor.create(vendor.client(srv))(**{**vendor.body(False), "messages": messages})
    assert len(srv.requests[-1].raw) > 10_000_000
    event = only_event(g)
    est = g.estimator.input_tokens(CallRequest(provider=vendor.name, operation="chat", model=vendor.model,
                                               body={"model": vendor.model, "messages": messages}, api=vendor.name))
    assert est > 1_500_000  # the whole message was counted, not a prefix
    assert event.estimated_micros >= est * vendor.input_pico // 1_000_000
    assert event.cost_micros == vendor.cost(2_000_000, OUT)


ODD_TEXTS = {
    "rtl": "\u202e\u05e9\u05dc\u05d5\u05dd \u0639\u0627\u0644\u0645\u202c mixed",
    "zwj": "family 👨\u200d👩\u200d👧\u200d👦 flag 🏳️\u200d🌈 skin 👍🏽",
    "nul": "before\x00after\x00",
    "combining": "e\u0301\u0301\u0301 Z\u0335\u0317\u0353a\u0336l\u0334g\u0337o",
    "special-token": "<|endoftext|><|im_start|>system",
    "lone-high-surrogate": "broken \ud800 pair",
    "lone-low-surrogate": "broken \udfff pair",
}


@pytest.mark.parametrize("name", list(ODD_TEXTS))
@pytest.mark.parametrize("vendor", VENDORS)
def test_odd_unicode_is_counted_or_left_to_the_sdk(g: tokenbudget.Guard, srv: StandInServer, vendor: Vendor,
                                                   name: str) -> None:
    text = ODD_TEXTS[name]
    messages = [{"role": "user", "content": text}]
    request = CallRequest(provider=vendor.name, operation="chat", model=vendor.model,
                          body={"model": vendor.model, "messages": messages}, api=vendor.name)
    empty = CallRequest(provider=vendor.name, operation="chat", model=vendor.model,
                        body={"model": vendor.model, "messages": [{"role": "user", "content": ""}]}, api=vendor.name)
    enc = tiktoken.get_encoding("o200k_base" if vendor.name == "openai" else "cl100k_base")
    exact = len(enc.encode_ordinary(text))
    if vendor.name == "openai":  # tiktoken is OpenAI's own tokenizer: the estimate is exact
        assert g.estimator.input_tokens(request) - g.estimator.input_tokens(empty) == exact
    else:  # Claude: cl100k x 1.10, rounded up, never below the cl100k count
        assert g.estimator.input_tokens(request) - g.estimator.input_tokens(empty) >= exact
    try:
        vendor.create(vendor.client(srv))(**{**vendor.body(False), "messages": messages})
    except tokenbudget.TokenBudgetError:
        raise
    except Exception as exc:  # the SDK cannot encode a lone surrogate as UTF-8 JSON: its error, nothing charged
        assert "surrogate" in name and isinstance(exc, UnicodeEncodeError), exc
        assert srv.requests == []
        assert (only_event(g).status, only_event(g).cost_micros) == ("unsent", 0)
        return
    assert "surrogate" not in name or srv.requests
    event = only_event(g)
    assert (event.status, event.cost_micros) == ("ok", vendor.cost(IN, OUT))


class Weird:
    def __repr__(self) -> str:
        return "<Weird>"


UNSERIALISABLE = {
    "set": {"a", "b"},
    "frozenset": frozenset({1}),
    "datetime": datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.timezone.utc),
    "object": Weird(),
    "bytes": b"\xff\x00",
    "nan": math.nan,
}


@pytest.mark.parametrize("kind", list(UNSERIALISABLE))
@pytest.mark.parametrize("vendor", VENDORS)
def test_unserialisable_tool_schema_is_estimated_or_left_to_the_sdk(g: tokenbudget.Guard, srv: StandInServer,
                                                                    vendor: Vendor, kind: str) -> None:
    bad = UNSERIALISABLE[kind]
    schema = {"type": "object", "properties": {"when": {"type": "string", "default": bad, "examples": [bad]}}}
    if vendor.name == "openai":
        tools: list[dict[str, Any]] = [{"type": "function", "function": {"name": "lookup", "parameters": schema}}]
    else:
        tools = [{"name": "lookup", "description": "look it up", "input_schema": schema}]
    with_tools = CallRequest(provider=vendor.name, operation="chat", model=vendor.model,
                             body={**vendor.body(False), "tools": tools}, api=vendor.name)
    without = CallRequest(provider=vendor.name, operation="chat", model=vendor.model, body=vendor.body(False),
                          api=vendor.name)
    assert g.estimator.input_tokens(with_tools) > g.estimator.input_tokens(without) + 10  # the schema was counted
    try:
        vendor.create(vendor.client(srv))(**{**vendor.body(False), "tools": tools})
    except tokenbudget.TokenBudgetError:
        raise
    except (TypeError, ValueError) as exc:  # the SDK could not serialise it: its own error, nothing sent or held
        assert "JSON" in str(exc) or "serializ" in str(exc), exc
        assert srv.requests == []
        event = only_event(g)
        assert (event.status, event.cost_micros) == ("unsent", 0)
        return
    assert srv.requests and only_event(g).cost_micros == vendor.cost(IN, OUT)


# -- estimator fuzzing -----------------------------------------------------------------------------------------------
ESTIMATOR = Estimator()
leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40), st.binary(max_size=16),
    st.builds(Weird), st.datetimes(), st.just({1, 2}),
    st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,!!", "https://x/y.png", "text",
                     "image_url", "input_audio", "image", "document", "tool_use", "thinking", "base64", "user"]),
)  # fmt: skip
KEYS = ["role", "content", "type", "text", "image_url", "url", "detail", "source", "data", "media_type", "input_audio",
        "format", "tool_calls", "function", "name", "arguments", "parameters", "input", "file", "file_data", "file_id",
        "thinking", "tools", "cache_control", "messages", "system", "schema"]  # fmt: skip
anything = st.recursive(
    leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5) | st.sampled_from(KEYS), c, max_size=4),
    max_leaves=12,
)
BODY_KEYS = ["messages", "tools", "system", "input", "prompt", "instructions", "response_format", "functions"]


@FUZZ
@given(st.dictionaries(st.sampled_from(BODY_KEYS), anything, max_size=3), st.sampled_from(["openai", "anthropic"]),
       st.sampled_from(["gpt-4o-mini", "claude-haiku-4-5", "gpt-4.1-mini", "in-house-7b"]),
       st.sampled_from(["chat", "embeddings", "text_completion"]))  # fmt: skip
def test_estimator_fuzz_counts_or_names_the_problem(body: dict[str, Any], api: str, model: str, op: str) -> None:
    request = CallRequest(provider=api, operation=op, model=model, body={"model": model, **body}, api=api)
    try:
        n = ESTIMATOR.input_tokens(request)
    except tokenbudget.ConfigError as exc:
        assert exc.key in ("messages", "input", "prompt", "body"), exc
        return
    assert isinstance(n, int) and n >= 0


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), st.text(max_size=300)), min_size=1,
                max_size=6),
       st.sampled_from(["gpt-4o-mini", "claude-haiku-4-5"]))  # fmt: skip
def test_estimator_fuzz_text_is_bounded_by_its_bytes(turns: list[tuple[str, str]], model: str) -> None:
    """A token is at least one byte: any text-only prompt counts at most its UTF-8 size, plus fixed overheads."""
    api = "anthropic" if model.startswith("claude") else "openai"
    messages = [{"role": r, "content": t} for r, t in turns]
    n = ESTIMATOR.input_tokens(CallRequest(provider=api, operation="chat", model=model,
                                           body={"model": model, "messages": messages}, api=api))
    size = sum(len(t.encode("utf-8", "surrogatepass")) + len(r) for r, t in turns)
    assert 0 < n <= math.ceil(size * 1.1) + 5 * len(turns) + 6
    assert n == ESTIMATOR.input_tokens(CallRequest(provider=api, operation="chat", model=model,
                                                   body={"model": model, "messages": messages}, api=api))


@FUZZ
@given(st.text(max_size=500))
def test_estimator_fuzz_generated_text(text: str) -> None:
    for model in ("gpt-4o-mini", "claude-haiku-4-5"):
        n = ESTIMATOR.text_tokens(model, text)
        assert 0 <= n <= math.ceil(len(text.encode("utf-8", "surrogatepass")) * 1.1) + 1
        assert (n == 0) == (text == "")
