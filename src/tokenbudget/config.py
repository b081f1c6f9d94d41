"""Settings: one pydantic model for the TOML file, the dict given to ``install(config=...)``, keyword settings and
the environment. Every mistake becomes a :class:`~tokenbudget.ConfigError` that names the file, the key and what
is allowed, so nobody reads a pydantic traceback to find a typo.

Precedence, lowest first: ``[tool.tokenbudget]`` in the nearest ``pyproject.toml`` (only when nothing else names a
file) < the file named by ``TOKENBUDGET_CONFIG`` or ``install(config=PATH)`` / ``install(config=DICT)`` <
``TOKENBUDGET_*`` environment variables < keyword settings given to :func:`tokenbudget.install`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

__all__ = ["AlertSettings", "BudgetRule", "DowngradeTarget", "Settings", "load_settings"]

Period = Literal["hour", "day", "week", "month", "total"]
OnExhaust = Literal["raise", "downgrade", "clamp", "warn"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _finite_non_negative(value: float | None, what: str) -> float | None:
    if value is not None and (math.isnan(value) or math.isinf(value) or value < 0):
        raise ValueError(f"{what} must be a finite number >= 0")
    return value


class BudgetRule(_Model):
    """One ``[[budgets]]`` table: an allowance for every principal that ``scope`` matches."""

    scope: str = "org"
    """``org``, ``team:NAME``, ``user:NAME``, ``tag:KEY=VALUE``, ``model:GLOB``, joined with ``/``; ``*`` as a value
    gives each distinct value its own allowance (``team:search/user:*``)."""
    limit_usd: float | None = None
    limit_tokens: int | None = Field(default=None, ge=0)
    period: Period = "total"
    on_exhaust: OnExhaust = "raise"
    downgrade_at: float | None = Field(default=None, ge=0.0, le=1.0)
    """Route calls to the cheaper model once this fraction of the budget is spent (0 = always)."""
    min_output_tokens: int = Field(default=64, ge=1)
    """``clamp``: the smallest ``max_tokens`` worth sending; below it the call is refused instead."""
    name: str | None = None

    @field_validator("limit_usd")
    @classmethod
    def _limit(cls, v: float | None) -> float | None:
        return _finite_non_negative(v, "limit_usd")

    @model_validator(mode="after")
    def _has_limit(self) -> BudgetRule:
        if self.limit_usd is None and self.limit_tokens is None:
            raise ValueError("a budget needs limit_usd and/or limit_tokens")
        from .policy import parse_scope  # local: policy imports config

        parse_scope(self.scope)
        return self


class DowngradeTarget(_Model):
    """Where a call goes when its budget says downgrade: a cheaper model, possibly an in-house server."""

    model: str
    base_url: str | None = None
    api: Literal["openai", "anthropic"] | None = None
    """Protocol the target speaks; defaults to the caller's. A different one makes the guard translate."""
    api_key_env: str | None = None
    """Name of the environment variable that holds the target's API key (the key itself never goes in config)."""


class WebhookSettings(_Model):
    url: str
    timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    retries: int = Field(default=3, ge=0, le=10)


class AlertSettings(_Model):
    thresholds: tuple[float, ...] = (0.5, 0.8, 1.0)
    spike_factor: float = Field(default=4.0, gt=1.0)
    spike_window_seconds: float = Field(default=300.0, gt=0)
    spike_baseline_seconds: float = Field(default=86_400.0, gt=0)
    spike_min_usd: float = Field(default=5.0, ge=0)
    cooldown_seconds: float = Field(default=3_600.0, ge=0)
    webhook: WebhookSettings | None = None

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        for t in v:
            if not 0 < t <= 10:
                raise ValueError("each threshold is a fraction of the budget, e.g. 0.5 for 50 %")
        return tuple(sorted(v))


class Settings(_Model):
    """Everything tokenbudget can be told. The TOML file, the config dict and ``install(**settings)`` share keys."""

    ledger: str | None = None
    """``memory://``, ``sqlite:///PATH`` or ``redis://HOST:PORT/DB``; default: SQLite in the user's state dir."""
    org: str | None = None
    team: str | None = None
    user: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    lease_seconds: float = Field(default=600.0, gt=0, le=7 * 86_400)
    timezone: str = "UTC"
    budget_usd: float | None = None
    """Shorthand for one ``org`` budget of this many dollars over all time."""
    budget_tokens: int | None = Field(default=None, ge=0)
    on_exhaust: OnExhaust = "raise"
    """Policy of the ``budget_usd`` shorthand budget."""
    budgets: tuple[BudgetRule, ...] = ()
    downgrade: dict[str, DowngradeTarget] = Field(default_factory=dict)
    """Original model (or ``*``) -> cheaper target; a plain string is a model name."""
    prices: dict[str, dict[str, Any]] = Field(default_factory=dict)
    unknown_model: Literal["raise", "warn"] = "raise"
    capture_content: bool = False
    record_events: bool = True
    on_ledger_error: Literal["closed", "open"] = "closed"
    alerts: AlertSettings = Field(default_factory=AlertSettings)

    @field_validator("budget_usd")
    @classmethod
    def _budget(cls, v: float | None) -> float | None:
        return _finite_non_negative(v, "budget_usd")

    @field_validator("downgrade", mode="before")
    @classmethod
    def _downgrade(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: ({"model": t} if isinstance(t, str) else t) for k, t in v.items()}
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'") from None
        return v

    def all_rules(self) -> tuple[BudgetRule, ...]:
        """The ``budgets`` rules plus the ``budget_usd`` / ``budget_tokens`` shorthand as an org-wide rule."""
        if self.budget_usd is None and self.budget_tokens is None:
            return self.budgets
        shorthand = BudgetRule(
            scope="org",
            limit_usd=self.budget_usd,
            limit_tokens=self.budget_tokens,
            on_exhaust=self.on_exhaust,
            name="budget",
        )
        return (shorthand, *self.budgets)


# TOKENBUDGET_ORG / _TEAM / _USER are read by principal.default_principal *after* config: who is calling is a
# property of the code's deployment first, the shell second.
_ENV_KEYS: dict[str, str] = {
    "TOKENBUDGET_LEDGER": "ledger",
    "TOKENBUDGET_BUDGET_USD": "budget_usd",
    "TOKENBUDGET_ON_EXHAUST": "on_exhaust",
    "TOKENBUDGET_UNKNOWN_MODEL": "unknown_model",
    "TOKENBUDGET_LEASE_SECONDS": "lease_seconds",
    "TOKENBUDGET_CAPTURE_CONTENT": "capture_content",
    "TOKENBUDGET_TIMEZONE": "timezone",
    "TOKENBUDGET_ON_LEDGER_ERROR": "on_ledger_error",
}


def _describe_error(err: dict[str, Any]) -> tuple[str, str]:
    key = ".".join(str(p) for p in err.get("loc", ()) if p not in ("function-after[_has_limit()]",)) or "(top level)"
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        msg = "unknown key; see docs/configuration.md for the keys tokenbudget reads"
    elif kind == "literal_error":
        msg = f"{msg}, got {err.get('input')!r}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return key, msg


def validate_settings(data: Mapping[str, Any], source: str) -> Settings:
    try:
        return Settings.model_validate(dict(data))
    except ValidationError as exc:
        errors = exc.errors()
        key, msg = _describe_error(dict(errors[0]))
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(msg + more, key=key, source=source) from None
    except ConfigError as exc:
        raise ConfigError(str(exc), key=exc.key, source=source) from None


def _read_toml(path: Path) -> dict[str, Any]:
    # Imported here: most installs pass a dict or find no file, and the parser is ~1.5 ms of import.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except FileNotFoundError:
        raise ConfigError("file not found; check TOKENBUDGET_CONFIG or the path given to install()", source=str(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from None


def _find_pyproject(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    p = Path(path)
    data = _read_toml(p)
    if p.name == "pyproject.toml":
        data = data.get("tool", {}).get("tokenbudget", {})
    return data, str(p)


def _env_settings() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for env, key in _ENV_KEYS.items():
        value = os.environ.get(env)
        if value not in (None, ""):
            out[key] = value
    return out


def load_settings(
    config: str | os.PathLike[str] | Mapping[str, Any] | Settings | None = None, **settings: Any
) -> Settings:
    """Merge every source into one validated :class:`Settings`; raises :class:`ConfigError` naming the culprit."""
    if isinstance(config, Settings):
        base: dict[str, Any] = config.model_dump(exclude_defaults=True)
        source = "Settings"
    elif isinstance(config, Mapping):
        base, source = dict(config), "install(config=...)"
    elif config is not None:
        if not isinstance(config, (str, os.PathLike)):
            raise ConfigError(
                f"expected a path, a dict or None, got {type(config).__name__}", key="config", source="install()"
            )
        base, source = load_file(config)
    elif os.environ.get("TOKENBUDGET_CONFIG"):
        base, source = load_file(os.environ["TOKENBUDGET_CONFIG"])
    else:
        found = _find_pyproject(Path.cwd())
        base, source = load_file(found) if found else ({}, "defaults")
    validate_settings(base, source)  # name the file when the file itself is wrong
    env = _env_settings()
    if env:
        validate_settings({**base, **env}, "environment (TOKENBUDGET_*)")
    merged = {**base, **env, **settings}
    return validate_settings(merged, "install()" if settings else source)
