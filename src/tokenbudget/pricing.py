"""Prices per model, resolved once from the genai-prices catalog into integer pico-dollars per token.

``genai_prices.calc_price`` walks a unit registry and sums Decimals on every call (~150 µs); the guard prices every
LLM call twice (worst case before, actual after), so a model is resolved once into a frozen :class:`ModelPrice` of
ints and cached, and a call's cost is a handful of integer multiplications rounded once to micro-dollars.

User overrides (``prices={...}``, ``[prices.*]`` in tokenbudget.toml) are USD per million tokens, layered over the
catalog field by field, and validated up front so a typo fails at install time, not on the first call.

The catalog (``genai_prices``: ~10 ms to import, ~15 ms more to build its snapshot) is loaded on the first price
lookup, not when this module is imported: ``install()`` does not pay for it. Overrides are checked without it, except
one that gives only some prices, which needs the catalog to know whether the model has the rest.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from importlib.metadata import version as _dist_version
from typing import TYPE_CHECKING, Literal, NamedTuple

from .calls import Usage
from .errors import ConfigError, UnknownModelError
from .money import Micros, micros_from_pico, pico_per_token

if TYPE_CHECKING:
    from genai_prices import types as _gp

__all__ = [
    "CATALOG_SOURCE",
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "FALLBACK_INPUT_USD_PER_MTOK",
    "FALLBACK_OUTPUT_USD_PER_MTOK",
    "ModelPrice",
    "PriceBook",
    "max_output_tokens_for",
]

logger = logging.getLogger("tokenbudget.pricing")

CATALOG_SOURCE = f"genai-prices {_dist_version('genai_prices')}"  # genai_prices.__version__, without importing it
"""``ModelPrice.source`` of a price taken unchanged from the bundled (or auto-updated) catalog."""

DEFAULT_MAX_OUTPUT_TOKENS = 16384
"""Worst-case output for a model neither the table below nor the catalog's context window says anything about."""

FALLBACK_INPUT_USD_PER_MTOK = 15
FALLBACK_OUTPUT_USD_PER_MTOK = 75
"""``unknown_model="warn"`` charges this by default: Claude Opus 4.0/4.1 list price, dearer than any common model
of either vendor except the *-pro* reasoning tiers, so an unpriced model over-charges rather than slips through."""

_BATCH_DISCOUNT: Mapping[str, float] = {"openai": 0.5, "anthropic": 0.5}
"""Vendors with a Batch API at half price. Used when the catalog has no batch variant for a model (e.g. Anthropic's
3.x and 4.0/4.1 models, and overrides); where it has one, the catalog's batch prices win, because OpenAI does not
discount cached input on gpt-4o / gpt-4.1 batches."""

# Maximum output tokens by model-name prefix (longest prefix wins). genai-prices has no such field, yet a call that
# sets no max_tokens can produce this many, so it is the reservation's worst case. Source: the vendors' model pages
# (platform.openai.com/docs/models, docs.anthropic.com/en/docs/about-claude/models), as known in early 2026; models
# released after that (claude-opus-4-7+, gpt-5.5+, gpt-6*) fall to the family rows or to min(context_window, 32768).
# Over-stating only reserves more than needed; under-stating lets a call overrun its budget, so unsure rows err high.
# Anthropic requires max_tokens on every request, so the Claude rows matter only when an adapter cannot see it.
_MAX_OUTPUT_BY_PREFIX: Mapping[str, int] = {
    # OpenAI
    "text-embedding": 0,
    "omni-moderation": 0,
    "moderation": 0,
    "gpt-3.5-turbo": 4096,
    "gpt-4": 8192,
    "gpt-4-turbo": 4096,
    "gpt-4-1106": 4096,
    "gpt-4-0125": 4096,
    "gpt-4o": 16384,
    "gpt-4o-2024-05-13": 4096,
    "gpt-4o-mini": 16384,
    "chatgpt-4o": 16384,
    "gpt-4.1": 32768,
    "gpt-4.5": 16384,
    "gpt-5": 128000,
    "gpt-5-chat": 16384,
    "o1": 100000,
    "o1-mini": 65536,
    "o1-preview": 32768,
    "o3": 100000,
    "o4-mini": 100000,
    "codex-mini": 100000,
    # Anthropic
    "claude-2": 4096,
    "claude-3-haiku": 4096,
    "claude-3-sonnet": 4096,
    "claude-3-opus": 4096,
    "claude-3-5-haiku": 8192,
    "claude-3-5-sonnet": 8192,
    "claude-3-7-sonnet": 64000,
    "claude-haiku": 64000,
    "claude-sonnet": 64000,
    "claude-opus": 128000,
    "claude-opus-4-0": 32000,
    "claude-opus-4-1": 32000,
    "claude-opus-4-2025": 32000,  # claude-opus-4-20250514
    "claude-opus-4-5": 64000,
    "claude-opus-4-6": 128000,
}
_MAX_OUTPUT_PREFIXES = tuple(sorted(_MAX_OUTPUT_BY_PREFIX, key=len, reverse=True))
_UNKNOWN_MAX_OUTPUT_CAP = 32768


def max_output_tokens_for(*names: str, context_window: int | None = None) -> int:
    """The worst-case output of a call that sets no max: first name matching the table, else a context-bound guess."""
    for name in names:
        low = _bare_name(name)
        for prefix in _MAX_OUTPUT_PREFIXES:
            if low.startswith(prefix):
                return _MAX_OUTPUT_BY_PREFIX[prefix]
    if context_window:
        return min(context_window, _UNKNOWN_MAX_OUTPUT_CAP)
    return DEFAULT_MAX_OUTPUT_TOKENS


_PRICE_FIELDS = ("input", "output", "cache_read", "cache_write", "cache_write_1h")
_CATALOG_KEYS: Mapping[str, str] = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cache_read": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
    "cache_write_1h": "cache_write_1h_mtok",
}


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's prices as integer pico-dollars per token, so costing a call is exact integer arithmetic.

    Long-context pricing is a chain: when a call's total input (cache reads and writes included) exceeds
    ``tier_threshold``, every token of the call is charged at ``tier`` (which may chain further) — Anthropic's and
    OpenAI's rule, and genai-prices'.
    """

    model: str
    provider: str
    input: int
    output: int
    cache_read: int
    cache_write: int
    cache_write_1h: int
    tier_threshold: int | None = None
    tier: ModelPrice | None = None
    context_window: int | None = None
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    batch_discount: float | None = None
    """Fraction off the whole call on the vendor's Batch API; applied when ``batch`` (exact prices) is absent."""
    batch: ModelPrice | None = None
    """The catalog's own Batch API prices, when it has them (not every field is halved)."""
    source: str = CATALOG_SOURCE
    _batch_keep: tuple[int, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in (*_PRICE_FIELDS, "max_output_tokens"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"ModelPrice.{name} must be a non-negative int, got {value!r}")
        if (self.tier is None) != (self.tier_threshold is None):
            raise ValueError("ModelPrice.tier and ModelPrice.tier_threshold must be set together")
        if self.tier_threshold is not None and self.tier_threshold < 0:
            raise ValueError(f"ModelPrice.tier_threshold must be non-negative, got {self.tier_threshold!r}")
        if self.batch_discount is not None:
            if not 0 <= self.batch_discount <= 1:
                raise ValueError(f"ModelPrice.batch_discount must be between 0 and 1, got {self.batch_discount!r}")
            # str() so 0.3 means three tenths, not the binary float nearest it.
            keep = 1 - Fraction(str(self.batch_discount))
            object.__setattr__(self, "_batch_keep", (keep.numerator, keep.denominator))

    def at(self, input_tokens: int) -> ModelPrice:
        """The tier that prices a call with this many input tokens in total."""
        p = self
        while p.tier is not None and p.tier_threshold is not None and input_tokens > p.tier_threshold:
            p = p.tier
        return p


# ---------------------------------------------------------------------------------------------------------------
# Override validation
# ---------------------------------------------------------------------------------------------------------------

_OVERRIDE_PRICE_KEYS: Mapping[str, str] = {
    "input": "input",
    "output": "output",
    "cached_input": "cache_read",
    "cache_read": "cache_read",
    "cache_write": "cache_write",
    "cache_write_1h": "cache_write_1h",
}
_OVERRIDE_OTHER_KEYS = ("max_output_tokens", "context_window", "provider", "batch_discount")
_ALLOWED_KEYS_TEXT = ", ".join((*_OVERRIDE_PRICE_KEYS, *_OVERRIDE_OTHER_KEYS))


class _Override(NamedTuple):  # a NamedTuple, not a dataclass: cheaper to define at import (see guard._Reserve)
    prices: Mapping[str, int]
    """Canonical price field -> pico-dollars per token; only the fields the user gave."""
    max_output_tokens: int | None = None
    context_window: int | None = None
    provider: str | None = None
    batch_discount: float | None = None
    has_batch_discount: bool = False


MAX_USD_PER_MTOK = 1_000_000
MAX_TOKENS = 1_000_000_000
"""Bounds for overrides: with them a call's worst case stays far inside the 64-bit integers every ledger stores."""


def _usd_per_mtok(value: object, key: str) -> int:
    allowed = "must be a non-negative number of USD per million tokens"
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise ConfigError(f"{allowed}, got {type(value).__name__} {value!r}", key=key)
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except InvalidOperation:
        raise ConfigError(f"{allowed}, got {value!r}", key=key)
    if not number.is_finite() or number < 0:
        raise ConfigError(f"{allowed}, got {value!r}", key=key)
    if number > MAX_USD_PER_MTOK:  # dearer than any model by far: a typo, and amounts the ledgers cannot hold
        raise ConfigError(f"{allowed} up to {MAX_USD_PER_MTOK:,}, got {value!r}", key=key)
    return pico_per_token(number)


def _token_count(value: object, key: str, *, positive: bool) -> int:
    allowed = "must be a positive integer number of tokens" if positive else "must be a non-negative integer"
    if isinstance(value, bool):
        raise ConfigError(f"{allowed}, got {value!r}", key=key)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < (1 if positive else 0) or value > MAX_TOKENS:
        raise ConfigError(f"{allowed} up to {MAX_TOKENS:,}, got {value!r}", key=key)
    return value


def _parse_override(raw: object, path: str, *, require_prices: bool = False) -> _Override:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"must be a table of prices (e.g. {{'input': 0.1, 'output': 0.4}}), got {raw!r}", key=path)
    prices: dict[str, int] = {}
    given_as: dict[str, str] = {}
    max_output: int | None = None
    context_window: int | None = None
    provider: str | None = None
    batch_discount: float | None = None
    has_batch_discount = False
    for name, value in raw.items():
        key = f"{path}.{name}"
        if not isinstance(name, str):
            raise ConfigError(f"field names must be strings; allowed: {_ALLOWED_KEYS_TEXT}", key=key)
        if name in _OVERRIDE_PRICE_KEYS:
            canonical = _OVERRIDE_PRICE_KEYS[name]
            if canonical in given_as:
                raise ConfigError(f"duplicates {path}.{given_as[canonical]}; give only one of them", key=key)
            given_as[canonical] = name
            prices[canonical] = _usd_per_mtok(value, key)
        elif name == "max_output_tokens":
            max_output = _token_count(value, key, positive=False)
        elif name == "context_window":
            context_window = _token_count(value, key, positive=True)
        elif name == "provider":
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"must be a provider name such as 'openai', got {value!r}", key=key)
            provider = value.strip().lower()
        elif name == "batch_discount":
            allowed = "must be a fraction between 0 and 1 (0.5 = half price on the Batch API), or None"
            if value is None:
                batch_discount = None
            else:
                if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
                    raise ConfigError(f"{allowed}, got {value!r}", key=key)
                try:
                    number = Decimal(str(value).strip())
                except InvalidOperation:
                    raise ConfigError(f"{allowed}, got {value!r}", key=key)
                if not number.is_finite() or not 0 <= number <= 1:
                    raise ConfigError(f"{allowed}, got {value!r}", key=key)
                batch_discount = float(number)
            has_batch_discount = True
        else:
            raise ConfigError(f"unknown field {name!r}; allowed: {_ALLOWED_KEYS_TEXT}", key=key)
    if require_prices:
        missing = [name for name in ("input", "output") if name not in prices]
        if missing:
            raise ConfigError(
                f"is not in the genai-prices catalog, so it needs {' and '.join(missing)} (USD per million tokens)",
                key=path,
            )
    return _Override(prices, max_output, context_window, provider, batch_discount, has_batch_discount)


# ---------------------------------------------------------------------------------------------------------------
# Catalog lookups
# ---------------------------------------------------------------------------------------------------------------

_DATE_SUFFIX = re.compile(r"(?:[-@]\d{4}-\d{2}-\d{2}|[-@]\d{8}|-latest)$")
_OPENAI_NAME = re.compile(r"^(?:gpt-|chatgpt-|o\d|text-embedding-|codex-|davinci|babbage|omni-moderation)")
_BEDROCK_PREFIX = re.compile(r"^(?:[a-z]+\.)*anthropic\.")
_BEDROCK_SUFFIX = re.compile(r"-v\d+(?::\d+)?$")


def _bare_name(name: str) -> str:
    """``openai/gpt-4o`` -> ``gpt-4o``; ``us.anthropic.claude-x-20250929-v1:0`` -> ``claude-x-20250929``."""
    low = name.lower().rsplit("/", 1)[-1]
    if _BEDROCK_PREFIX.match(low):
        low = _BEDROCK_SUFFIX.sub("", _BEDROCK_PREFIX.sub("", low))
    return low


def _alias_candidates(ref: str) -> list[tuple[str, str | None]]:
    """Spellings genai-prices misses but people send: routers' ``vendor/model``, snapshots newer than the catalog."""
    out: list[tuple[str, str | None]] = []
    if "/" in ref:
        vendor, _, rest = ref.partition("/")
        out.append((rest.rsplit("/", 1)[-1], vendor or None))
    for name, hint in [*out, (ref, None)]:
        stripped = _DATE_SUFFIX.sub("", name)
        if stripped != name and stripped:
            out.append((stripped, hint))
    return out


def _guess_provider(ref: str) -> str | None:
    if ref.startswith("claude"):
        return "anthropic"
    if _OPENAI_NAME.match(ref):
        return "openai"
    return None


def _vendor_search(ref: str, provider: str | None) -> tuple[str, _gp.ModelInfo] | None:
    """The caller's provider, then OpenAI and Anthropic (Anthropic first for ``claude*``)."""
    from genai_prices import data_snapshot as _gp_snapshot  # the catalog loads on the first lookup, not at import

    providers = _gp_snapshot.get_snapshot().providers
    order: list[_gp.Provider] = []
    if provider and (given := _gp_snapshot.find_provider_by_id(providers, provider)) is not None:
        order.append(given)
    vendor_ids = ("anthropic", "openai") if ref.startswith("claude") else ("openai", "anthropic")
    for vendor_id in vendor_ids:
        vendor = next((p for p in providers if p.id == vendor_id), None)
        if vendor is not None and all(vendor is not seen for seen in order):
            order.append(vendor)
    for candidate in order:
        if (model := candidate.find_model(ref, all_providers=providers)) is not None:
            return candidate.id, model
    return None


def _any_provider_search(ref: str) -> tuple[str, _gp.ModelInfo] | None:
    """Every other provider: genai-prices' own guess from the name, then a scan (Bedrock, OpenRouter, Groq, ...)."""
    from genai_prices import data_snapshot as _gp_snapshot

    snapshot = _gp_snapshot.get_snapshot()
    try:
        guessed, guessed_model = snapshot.find_provider_model(ref, None, None, None)
    except LookupError:
        pass
    else:
        return guessed.id, guessed_model
    for candidate in snapshot.providers:
        if (model := candidate.find_model(ref)) is not None:
            return candidate.id, model
    return None


def _lookup(ref: str, provider: str | None) -> tuple[str, _gp.ModelInfo] | None:
    if (found := _vendor_search(ref, provider)) is not None:
        return found
    aliases = _alias_candidates(ref)
    for alias, hint in aliases:
        if (found := _vendor_search(alias, provider or hint)) is not None:
            return found
    if (found := _any_provider_search(ref)) is not None:
        return found
    for alias, _hint in aliases:
        if (found := _any_provider_search(alias)) is not None:
            return found
    return None


_Level = dict[str, int | None]


def _catalog_levels(prices: _gp.ModelPrice) -> list[tuple[int | None, _Level]]:
    """Flatten per-field tier lists into one chain of (threshold, prices) levels, the first with no threshold."""
    from genai_prices.types import TieredPrices

    raw: dict[str, Decimal | TieredPrices | None] = {}
    for name, key in _CATALOG_KEYS.items():
        value = getattr(prices, key, None)
        raw[name] = value if isinstance(value, Decimal | TieredPrices) else None
    starts = sorted({t.start for v in raw.values() if isinstance(v, TieredPrices) for t in v.tiers})
    levels: list[tuple[int | None, _Level]] = []
    for threshold in (None, *starts):
        level: _Level = {}
        for name, value in raw.items():
            if value is None:
                level[name] = None
            elif isinstance(value, Decimal):
                level[name] = pico_per_token(value)
            else:
                applicable = value.base
                if threshold is not None:
                    for tier in value.tiers:
                        if tier.start <= threshold:
                            applicable = tier.price
                level[name] = pico_per_token(applicable)
        levels.append((threshold, level))
    return levels


def _chain(
    levels: list[tuple[int | None, _Level]],
    *,
    model: str,
    provider: str,
    context_window: int | None,
    max_output_tokens: int,
    batch_discount: float | None,
    batch: ModelPrice | None,
    source: str,
) -> ModelPrice:
    """Build the tier chain from the top down, filling the catalog's gaps (no cache price -> charged as input)."""
    tier: ModelPrice | None = None
    tier_threshold: int | None = None
    for index in range(len(levels) - 1, -1, -1):
        threshold, level = levels[index]
        input_price = level["input"] or 0
        cache_write = level["cache_write"] if level["cache_write"] is not None else input_price
        top = index == 0
        tier = ModelPrice(
            model=model,
            provider=provider,
            input=input_price,
            output=level["output"] or 0,
            cache_read=level["cache_read"] if level["cache_read"] is not None else input_price,
            cache_write=cache_write,
            cache_write_1h=level["cache_write_1h"] if level["cache_write_1h"] is not None else cache_write,
            tier_threshold=tier_threshold,
            tier=tier,
            context_window=context_window,
            max_output_tokens=max_output_tokens,
            batch_discount=batch_discount if top else None,
            batch=batch if top else None,
            source=source,
        )
        tier_threshold = threshold
    assert tier is not None
    return tier


_MISSING: object = object()


class PriceBook:
    """Model prices for one tokenbudget installation: the catalog, the user's overrides, and the unknown-model rule.

    ``price()`` is cached per ``(provider, model)``, misses included, so only a model's first call pays for the
    catalog walk; the cost methods take the resolved :class:`ModelPrice` and never touch the catalog.
    """

    def __init__(
        self,
        overrides: Mapping[str, Mapping[str, object]] | None = None,
        *,
        unknown_model: Literal["raise", "warn"] = "raise",
        fallback: Mapping[str, object] | None = None,
    ) -> None:
        if unknown_model not in ("raise", "warn"):
            raise ConfigError(f"must be 'raise' or 'warn', got {unknown_model!r}", key="unknown_model")
        self._unknown_model = unknown_model
        self._overrides: dict[str, _Override] = {}
        if overrides is not None:
            if not isinstance(overrides, Mapping):
                raise ConfigError(f"must be a table of model name -> prices, got {overrides!r}", key="prices")
            for name, raw in overrides.items():
                if not isinstance(name, str) or not name.strip():
                    raise ConfigError(f"model names must be non-empty strings, got {name!r}", key="prices")
                low = name.strip().lower()
                if low in self._overrides:
                    raise ConfigError(f"{name!r} is given twice (model names are case-insensitive)", key="prices")
                parsed = _parse_override(raw, f"prices.{name}")
                if (
                    not ("input" in parsed.prices and "output" in parsed.prices)
                    and _lookup(low, parsed.provider) is None
                ):
                    _parse_override(raw, f"prices.{name}", require_prices=True)
                self._overrides[low] = parsed
        if fallback is not None and not isinstance(fallback, Mapping):
            raise ConfigError(f"must be a table of prices, got {fallback!r}", key="fallback")
        fallback_raw: Mapping[str, object] = {
            "input": FALLBACK_INPUT_USD_PER_MTOK,
            "output": FALLBACK_OUTPUT_USD_PER_MTOK,
            **(fallback or {}),
        }
        self._fallback = _parse_override(fallback_raw, "fallback")
        self._cache: dict[tuple[str | None, str], ModelPrice | None] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    # -- lookups ---------------------------------------------------------------------------------------------------

    def price(self, model: str, provider: str | None = None) -> ModelPrice:
        """The price of ``model``; raises :class:`UnknownModelError` before any byte is sent if there is none."""
        key = (provider, model)
        hit = self._cache.get(key, _MISSING)
        if isinstance(hit, ModelPrice):
            return hit
        if hit is None:
            raise UnknownModelError(model, provider)
        with self._lock:
            hit = self._cache.get(key, _MISSING)
            if hit is _MISSING:
                hit = self._resolve(model, provider)
                self._cache[key] = hit
        if hit is None:
            raise UnknownModelError(model, provider)
        assert isinstance(hit, ModelPrice)
        return hit

    def _override_for(self, ref: str) -> _Override | None:
        if (found := self._overrides.get(ref)) is not None:
            return found
        stripped = _DATE_SUFFIX.sub("", ref)
        return self._overrides.get(stripped) if stripped != ref else None

    def _resolve(self, model: str, provider: str | None) -> ModelPrice | None:
        ref = model.strip().lower()
        wanted_provider = provider.strip().lower() if provider else None
        override = self._override_for(ref)
        found = _lookup(ref, (override.provider if override else None) or wanted_provider)
        if found is not None and override is None:
            override = self._overrides.get(found[1].id.lower())

        if found is not None:
            provider_id, info = found
            now = datetime.now(timezone.utc)
            standard = info.get_prices(now)
            if getattr(standard, "input_mtok", None) is not None:
                return self._from_catalog(ref, provider_id, info, standard, now, override)
            found = None  # priced per request, character or second, not per token: ours to price, or unknown

        if override is not None and "input" in override.prices and "output" in override.prices:
            levels: list[tuple[int | None, _Level]] = [(None, {f: override.prices.get(f) for f in _PRICE_FIELDS})]
            owner = override.provider or wanted_provider or "custom"
            return _chain(
                levels,
                model=model.strip(),
                provider=owner,
                context_window=override.context_window,
                max_output_tokens=self._max_output(override, ref, context_window=override.context_window),
                batch_discount=override.batch_discount if override.has_batch_discount else _BATCH_DISCOUNT.get(owner),
                batch=None,
                source="override",
            )

        if self._unknown_model == "raise":
            return None
        return self._fallback_price(model.strip(), ref, wanted_provider)

    def _from_catalog(
        self,
        ref: str,
        provider_id: str,
        info: _gp.ModelInfo,
        standard: _gp.ModelPrice,
        now: datetime,
        override: _Override | None,
    ) -> ModelPrice:
        levels = _catalog_levels(standard)
        context_window = info.context_window
        batch_discount = _BATCH_DISCOUNT.get(provider_id)
        batch: ModelPrice | None = None
        source = CATALOG_SOURCE
        if override is not None:
            source = "override"
            for _, level in levels:
                level.update(override.prices)
            if override.context_window is not None:
                context_window = override.context_window
            if override.has_batch_discount:
                batch_discount = override.batch_discount
            if override.provider is not None:
                provider_id = override.provider
        max_output = self._max_output(override, ref, info.id, context_window=context_window)
        if not (override and override.prices):
            # The catalog's batch prices, when it has them, are exact where a flat discount is not.
            batch_prices = info.get_prices(now, {"processing": "batch"})
            if batch_prices != standard and getattr(batch_prices, "input_mtok", None) is not None:
                batch = _chain(
                    _catalog_levels(batch_prices),
                    model=info.id,
                    provider=provider_id,
                    context_window=context_window,
                    max_output_tokens=max_output,
                    batch_discount=None,
                    batch=None,
                    source=source,
                )
        return _chain(
            levels,
            model=info.id,
            provider=provider_id,
            context_window=context_window,
            max_output_tokens=max_output,
            batch_discount=batch_discount,
            batch=batch,
            source=source,
        )

    @staticmethod
    def _max_output(override: _Override | None, *names: str, context_window: int | None) -> int:
        if override is not None and override.max_output_tokens is not None:
            return override.max_output_tokens
        return max_output_tokens_for(*names, context_window=context_window)

    def _fallback_price(self, model: str, ref: str, provider: str | None) -> ModelPrice:
        fb = self._fallback
        owner = fb.provider or provider or _guess_provider(ref) or "custom"
        if ref not in self._warned:
            self._warned.add(ref)
            logger.warning(
                "no price is known for model %r (provider %s); charging the fallback price "
                "(input %s, output %s pico-dollars per token). Price it with prices={%r: {'input': ..., "
                "'output': ...}} to charge what it really costs.",
                model,
                provider or "unknown",
                fb.prices["input"],
                fb.prices["output"],
                model,
            )
        return _chain(
            [(None, {f: fb.prices.get(f) for f in _PRICE_FIELDS})],
            model=model,
            provider=owner,
            context_window=fb.context_window,
            max_output_tokens=self._max_output(fb, ref, context_window=fb.context_window),
            batch_discount=fb.batch_discount if fb.has_batch_discount else _BATCH_DISCOUNT.get(owner),
            batch=None,
            source="fallback",
        )

    # -- costs (hot path: ints only) -------------------------------------------------------------------------------

    def cost_micros(self, price: ModelPrice, usage: Usage, *, batch: bool = False) -> Micros:
        """What the vendor charged, exactly: one integer sum of pico-dollars, rounded half-up once.

        Reasoning tokens are already inside ``output_tokens``, so they are not added again. ``batch=True`` on a
        model with no Batch API charges the full price.
        """
        keep: tuple[int, int] | None = None
        if batch:
            if price.batch is not None:
                price = price.batch
            else:
                keep = price._batch_keep
        total_in = usage.input_tokens
        p = price.at(total_in) if price.tier is not None else price
        cache_read = usage.cache_read_tokens
        cache_write = usage.cache_write_tokens
        cache_write_1h = usage.cache_write_1h_tokens
        uncached = total_in - cache_read - cache_write - cache_write_1h
        if uncached < 0:
            uncached = 0
        pico = (
            uncached * p.input
            + cache_read * p.cache_read
            + cache_write * p.cache_write
            + cache_write_1h * p.cache_write_1h
            + usage.output_tokens * p.output
        )
        if keep is None:
            return (pico + 500_000) // 1_000_000
        num, den = keep
        return (pico * num + den * 500_000) // (den * 1_000_000)

    def worst_case_micros(
        self, price: ModelPrice, input_tokens: int, max_output_tokens: int, *, may_write_cache: bool = False
    ) -> Micros:
        """The most a call can cost, rounded up so a reservation never falls short of the charge.

        With ``may_write_cache`` every input token is priced as if written to the cache at the dearer TTL; cache
        reads are never dearer than input, so they need no case.
        """
        if input_tokens < 0 or max_output_tokens < 0:
            raise ValueError(f"token counts must be non-negative, got {input_tokens}, {max_output_tokens}")
        p = price.at(input_tokens)
        rate = max(p.input, p.cache_write, p.cache_write_1h) if may_write_cache else p.input
        return micros_from_pico(input_tokens * rate + max_output_tokens * p.output, round_up=True)

    def input_cost_micros(self, price: ModelPrice, input_tokens: int) -> Micros:
        """What an abandoned call is charged: its estimated input at the input rate (no output was billed to us)."""
        return micros_from_pico(input_tokens * price.at(input_tokens).input)
