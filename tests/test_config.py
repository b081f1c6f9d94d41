"""Every configuration mistake is a ConfigError naming the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import tokenbudget
from tokenbudget.config import load_settings


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "tokenbudget.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "toml,key,fragment",
    [
        ('ledgr = "memory://"', "ledgr", "unknown key"),
        ("lease_seconds = -5", "lease_seconds", "greater than 0"),
        ('lease_seconds = "soon"', "lease_seconds", "number"),
        ("budget_usd = -1", "budget_usd", ">= 0"),
        ('unknown_model = "ignore"', "unknown_model", "'raise' or 'warn'"),
        ('timezone = "Mars/Olympus"', "timezone", "IANA"),
        ('[[budgets]]\nscope = "team:x"', "budgets.0", "limit_usd and/or limit_tokens"),
        ('[[budgets]]\nscope = "squad:x"\nlimit_usd = 1', "budgets.0", "unknown scope part"),
        ('[[budgets]]\nscope = "tag:env"\nlimit_usd = 1', "budgets.0", "tag:KEY=VALUE"),
        ('[[budgets]]\nscope = "team:x"\nlimit_usd = 1\nperiod = "fortnight"', "budgets.0.period", "'hour'"),
        ('[[budgets]]\nscope = "team:x"\nlimit_usd = 1\non_exhaust = "explode"', "budgets.0.on_exhaust", "'raise'"),
        ('[[budgets]]\nscope = "team:x"\nlimit_usd = 1\ndowngrade_at = 1.5', "budgets.0.downgrade_at", "1"),
        ('[[budgets]]\nscope = "team:x"\nlimit_tokens = -3', "budgets.0.limit_tokens", "greater than or equal to 0"),
        ("[[budgets]]\nscope = 7\nlimit_usd = 1", "budgets.0.scope", "string"),
        ('[downgrade]\n"gpt-4o" = 5', "downgrade.gpt-4o", ""),
        ("[alerts]\nthresholds = [0.5, 80]", "alerts.thresholds", "fraction"),
        (
            '[alerts.webhook]\nurl = "https://hooks.example/x"\ntimeout_seconds = 0',
            "alerts.webhook.timeout_seconds",
            "",
        ),
    ],
)
def test_bad_file_names_file_key_and_allowed(tmp_path: Path, toml: str, key: str, fragment: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(tokenbudget.ConfigError) as info:
        load_settings(path)
    msg = str(info.value)
    assert str(path) in msg
    assert info.value.key == key, msg
    assert fragment in msg


def test_bad_price_override_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[prices.metacode-7b]\ninput = -1\noutput = 0.4\n")
    with pytest.raises(tokenbudget.ConfigError, match=r"prices\.metacode-7b\.input"):
        tokenbudget.install(path)


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(tokenbudget.ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "budgets = [ oops"))
    with pytest.raises(tokenbudget.ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml")


def test_bad_keyword_settings_and_dict(tmp_path: Path) -> None:
    with pytest.raises(tokenbudget.ConfigError, match="budget_usd"):
        tokenbudget.install({"ledger": "memory://"}, budget_usd="lots")
    with pytest.raises(tokenbudget.ConfigError) as info:
        tokenbudget.install({"ledger": "memory://", "budgets": [{"scope": "org"}]})
    assert "install(config=...)" in str(info.value)
    with pytest.raises(tokenbudget.ConfigError, match="ledger"):
        tokenbudget.install({"ledger": "postgres://x"})
    with pytest.raises(tokenbudget.ConfigError, match="config"):
        tokenbudget.install(42)  # type: ignore[arg-type]
    assert not tokenbudget.installed()  # a failed install leaves nothing half-done


def test_env_mistake_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENBUDGET_BUDGET_USD", "ten dollars")
    with pytest.raises(tokenbudget.ConfigError) as info:
        tokenbudget.install({"ledger": "memory://"})
    assert "TOKENBUDGET_" in str(info.value) and info.value.key == "budget_usd"


def test_budget_decorator_arguments() -> None:
    with pytest.raises(tokenbudget.ConfigError):
        tokenbudget.budget()
    with pytest.raises(tokenbudget.ConfigError):
        tokenbudget.budget(limit_usd=-1)
    with pytest.raises(tokenbudget.ConfigError):
        tokenbudget.budget(limit_usd=float("nan"))


def test_same_keys_in_dict_and_file(tmp_path: Path) -> None:
    text = (
        'ledger = "memory://"\nteam = "search"\nlease_seconds = 600\n'
        '[[budgets]]\nscope = "team:search/user:*"\nlimit_usd = 50\nperiod = "day"\non_exhaust = "downgrade"\n'
        "downgrade_at = 0.8\n"
        '[[budgets]]\nscope = "team:search"\nlimit_usd = 5000\nperiod = "month"\n'
        '[downgrade]\n"claude-sonnet-4-6" = "metacode-7b"\n'
        "[prices.metacode-7b]\ninput = 0.10\noutput = 0.40\n"
    )
    import tomllib

    from_file = load_settings(write(tmp_path, text))
    from_dict = load_settings(tomllib.loads(text))
    assert from_file == from_dict
    assert from_file.downgrade["claude-sonnet-4-6"].model == "metacode-7b"
    g: Any = tokenbudget.install(from_dict)
    assert len(g.policy.rules) == 2
