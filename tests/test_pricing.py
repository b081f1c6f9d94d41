"""Prices: exact micro-dollar costs worked by hand, catalog resolution, overrides, unknown models, worst cases.

Expected costs are written as ``tokens x USD/MTok`` so each can be checked on paper: 1 token at $1/MTok = 1 µ$.
"""

from __future__ import annotations

import logging
import math
from decimal import ROUND_HALF_UP, Decimal

import genai_prices
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbudget.calls import Usage
from tokenbudget.errors import ConfigError, UnknownModelError
from tokenbudget.pricing import CATALOG_SOURCE, ModelPrice, PriceBook, max_output_tokens_for


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook()


# --------------------------------------------------------------------------------------------------------------
# Exact costs, by hand
# --------------------------------------------------------------------------------------------------------------


def test_gpt_4o_plain(book: PriceBook) -> None:
    p = book.price("gpt-4o")
    assert (p.model, p.provider, p.source) == ("gpt-4o", "openai", CATALOG_SOURCE)
    assert (p.input, p.output, p.cache_read) == (2_500_000, 10_000_000, 1_250_000)  # $2.50, $10, $1.25 /MTok
    # 1000 x $2.50 + 500 x $10 = 2500 + 5000 µ$
    assert book.cost_micros(p, Usage(input_tokens=1000, output_tokens=500)) == 7500


def test_cached_input_is_charged_at_the_cached_rate(book: PriceBook) -> None:
    p = book.price("gpt-4o")
    # input_tokens is the total: 600 uncached x $2.50 + 400 cached x $1.25 + 100 x $10
    usage = Usage(input_tokens=1000, cache_read_tokens=400, output_tokens=100)
    assert book.cost_micros(p, usage) == 1500 + 500 + 1000

    mini = book.price("gpt-4o-mini")
    # 8000 x $0.15 + 2000 x $0.075 + 1000 x $0.60
    usage = Usage(input_tokens=10_000, cache_read_tokens=2_000, output_tokens=1_000)
    assert book.cost_micros(mini, usage) == 1200 + 150 + 600


def test_openai_cache_writes_cost_the_input_rate(book: PriceBook) -> None:
    p = book.price("gpt-4o")
    assert p.cache_write == p.cache_write_1h == p.input


def test_anthropic_5m_and_1h_cache_writes(book: PriceBook) -> None:
    opus = book.price("claude-opus-4-1")
    assert (opus.input, opus.cache_write, opus.cache_write_1h, opus.cache_read) == (
        15_000_000,
        18_750_000,
        30_000_000,
        1_500_000,
    )
    # 8000 x $15 + 2000 x $18.75 (5-minute write)
    assert book.cost_micros(opus, Usage(input_tokens=10_000, cache_write_tokens=2_000)) == 120_000 + 37_500
    # 8000 x $15 + 2000 x $30 (1-hour write)
    assert book.cost_micros(opus, Usage(input_tokens=10_000, cache_write_1h_tokens=2_000)) == 120_000 + 60_000


def test_every_token_kind_at_once(book: PriceBook) -> None:
    sonnet = book.price("claude-sonnet-4-5")
    usage = Usage(
        input_tokens=10_000, cache_read_tokens=4_000, cache_write_tokens=1_000, cache_write_1h_tokens=1_000,
        output_tokens=2_000,
    )  # fmt: skip
    # 4000 x $3 + 4000 x $0.30 + 1000 x $3.75 + 1000 x $6 + 2000 x $15
    assert book.cost_micros(sonnet, usage) == 12_000 + 1_200 + 3_750 + 6_000 + 30_000


def test_reasoning_tokens_are_not_charged_twice(book: PriceBook) -> None:
    o3 = book.price("o3")
    # the 4000 reasoning tokens are inside the 5000 output tokens: 1000 x $2 + 5000 x $8
    usage = Usage(input_tokens=1000, output_tokens=5000, reasoning_tokens=4000)
    assert book.cost_micros(o3, usage) == 2_000 + 40_000


def test_long_context_tier_applies_to_the_whole_call(book: PriceBook) -> None:
    sonnet = book.price("claude-sonnet-4-5")
    assert sonnet.tier_threshold == 200_000 and sonnet.tier is not None
    # at the threshold: base prices, 200_000 x $3 + 1000 x $15
    assert book.cost_micros(sonnet, Usage(input_tokens=200_000, output_tokens=1000)) == 600_000 + 15_000
    # one token over: every token at the tier, 200_001 x $6 + 1000 x $22.50
    assert book.cost_micros(sonnet, Usage(input_tokens=200_001, output_tokens=1000)) == 1_200_006 + 22_500
    # cache reads count towards the threshold: 50_001 x $6 + 150_000 x $0.60
    usage = Usage(input_tokens=200_001, cache_read_tokens=150_000)
    assert book.cost_micros(sonnet, usage) == 300_006 + 90_000


def test_tier_fields_the_catalog_omits_follow_the_tier_input(book: PriceBook) -> None:
    p = book.price("gpt-5.4")  # tiered input / cached input / output, no cache-write price
    assert p.tier is not None and p.tier_threshold == 272_000
    assert p.tier.input == 5_000_000 and p.tier.cache_write == p.tier.cache_write_1h == p.tier.input


def test_rounding_is_half_up_once(book: PriceBook) -> None:
    mini = book.price("gpt-4o-mini")  # $0.15/MTok in
    assert book.cost_micros(mini, Usage(input_tokens=3)) == 0  # 0.45 µ$
    assert book.cost_micros(mini, Usage(input_tokens=4)) == 1  # 0.60 µ$
    assert book.cost_micros(mini, Usage(input_tokens=10)) == 2  # 1.50 µ$
    # rounded once over the sum: 3 uncached (0.45) + 3 cached (0.225) = 0.675 µ$ -> 1; per part it would be 0 + 0
    assert book.cost_micros(mini, Usage(input_tokens=6, cache_read_tokens=3)) == 1


def test_batch_uses_the_catalog_batch_prices_where_it_has_them(book: PriceBook) -> None:
    p = book.price("gpt-4o")
    assert p.batch_discount == 0.5 and p.batch is not None
    # OpenAI's batch halves input and output but not cached input on gpt-4o:
    # 600 x $1.25 + 400 x $1.25 + 500 x $5
    usage = Usage(input_tokens=1000, cache_read_tokens=400, output_tokens=500)
    assert book.cost_micros(p, usage, batch=True) == 750 + 500 + 2500
    # gpt-5 halves cached input too: 600 x $0.625 + 400 x $0.0625 + 500 x $5
    assert book.cost_micros(book.price("gpt-5"), usage, batch=True) == 375 + 25 + 2500


def test_batch_falls_back_to_the_vendor_discount(book: PriceBook) -> None:
    opus = book.price("claude-opus-4-1")  # Anthropic batch is 50 %; the catalog has no variant for this model
    assert opus.batch is None and opus.batch_discount == 0.5
    # (1000 x $15 + 500 x $75) / 2
    assert book.cost_micros(opus, Usage(input_tokens=1000, output_tokens=500), batch=True) == (15_000 + 37_500) // 2
    haiku = book.price("claude-3-5-haiku-latest")  # $0.80/MTok in
    # 1 token: 0.8 µ$ -> 1; at half price 0.4 µ$ -> 0 (one rounding, after the discount)
    assert book.cost_micros(haiku, Usage(input_tokens=1)) == 1
    assert book.cost_micros(haiku, Usage(input_tokens=1), batch=True) == 0
    # 5 tokens: 4 µ$; half price 2 µ$
    assert book.cost_micros(haiku, Usage(input_tokens=5), batch=True) == 2


def test_batch_without_a_batch_api_charges_full_price() -> None:
    book = PriceBook({"local-llm": {"input": 1, "output": 2}})
    p = book.price("local-llm")
    assert p.provider == "custom" and p.batch_discount is None
    usage = Usage(input_tokens=1000, output_tokens=1000)
    assert book.cost_micros(p, usage, batch=True) == book.cost_micros(p, usage) == 1000 + 2000


def test_custom_batch_discount_is_exact() -> None:
    book = PriceBook({"m": {"input": 1, "output": 1, "batch_discount": 0.3}})
    # $1 of input at 30 % off: 700_000 µ$ exactly (0.3 read as three tenths, not as a binary float)
    assert book.cost_micros(book.price("m"), Usage(input_tokens=1_000_000), batch=True) == 700_000


def test_embeddings_have_no_output(book: PriceBook) -> None:
    p = book.price("text-embedding-3-small")
    assert (p.input, p.output, p.max_output_tokens) == (20_000, 0, 0)
    assert book.cost_micros(p, Usage(input_tokens=100_000)) == 2_000  # 100_000 x $0.02


# --------------------------------------------------------------------------------------------------------------
# Cross-check against genai-prices' own calculator
# --------------------------------------------------------------------------------------------------------------


def _genai_micros(model: str, provider: str, usage: Usage, *, batch: bool = False) -> int:
    """genai-prices' cache_write_tokens is every write (5m + 1h); ours is the 5-minute part only."""
    gp_usage = genai_prices.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens + usage.cache_write_1h_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
    )
    calc = genai_prices.calc_price(
        gp_usage, model, provider_id=provider, price_context={"processing": "batch"} if batch else None
    )
    return int((calc.total_price * 1_000_000).to_integral_value(rounding=ROUND_HALF_UP))


_CROSS_MODELS = [
    "gpt-4o",
    "gpt-4o-mini",
    "o3",
    "gpt-5",
    "gpt-4.1-nano",
    "gpt-5.4",
    "o1-pro",
    "claude-sonnet-4-5",
    "claude-haiku-4-5",
    "claude-opus-4-1",
    "claude-3-5-haiku-latest",
    "text-embedding-3-small",
]
_CROSS_USAGES = [
    Usage(input_tokens=1000, output_tokens=500),
    Usage(input_tokens=12_345, output_tokens=6_789, cache_read_tokens=4_000),
    Usage(
        input_tokens=5_000,
        output_tokens=700,
        cache_read_tokens=333,
        cache_write_tokens=1_234,
        cache_write_1h_tokens=777,
    ),
    Usage(input_tokens=250_000, output_tokens=3_000, cache_read_tokens=100_000, cache_write_tokens=20_000),
    Usage(input_tokens=300_001, output_tokens=1),
]


@pytest.mark.parametrize("model", _CROSS_MODELS)
def test_cost_agrees_with_genai_prices(book: PriceBook, model: str) -> None:
    p = book.price(model)
    for usage in _CROSS_USAGES:
        assert book.cost_micros(p, usage) == _genai_micros(p.model, p.provider, usage), usage


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-5", "gpt-5.4", "claude-sonnet-4-5", "claude-haiku-4-5"])
def test_batch_cost_agrees_with_genai_prices(book: PriceBook, model: str) -> None:
    p = book.price(model)
    assert p.batch is not None
    for usage in _CROSS_USAGES:
        assert book.cost_micros(p, usage, batch=True) == _genai_micros(p.model, p.provider, usage, batch=True), usage


_usages = st.builds(
    lambda uncached, read, write, write_1h, out: Usage(
        input_tokens=uncached + read + write + write_1h,
        cache_read_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=write_1h,
        output_tokens=out,
    ),
    st.integers(0, 300_000),
    st.integers(0, 100_000),
    st.integers(0, 50_000),
    st.integers(0, 50_000),
    st.integers(0, 100_000),
)


@settings(max_examples=60, deadline=None)
@given(model=st.sampled_from(["gpt-4o-mini", "claude-sonnet-4-5", "claude-opus-4-1", "gpt-5.4"]), usage=_usages)
def test_cost_agrees_with_genai_prices_for_any_usage(book: PriceBook, model: str, usage: Usage) -> None:
    p = book.price(model)
    assert book.cost_micros(p, usage) == _genai_micros(p.model, p.provider, usage)


@settings(max_examples=200, deadline=None)
@given(model=st.sampled_from(["gpt-4o-mini", "claude-sonnet-4-5", "claude-opus-4-1", "gpt-5.4"]), usage=_usages)
def test_worst_case_covers_any_actual_charge(book: PriceBook, model: str, usage: Usage) -> None:
    p = book.price(model)
    worst = book.worst_case_micros(p, usage.input_tokens, usage.output_tokens, may_write_cache=True)
    assert worst >= book.cost_micros(p, usage)
    assert worst >= book.cost_micros(p, usage, batch=True)


# --------------------------------------------------------------------------------------------------------------
# Resolution: aliases, dated snapshots, providers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "model", "provider"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o", "openai"),
        ("gpt-4o-2024-11-20", "gpt-4o", "openai"),
        ("GPT-4o", "gpt-4o", "openai"),
        ("gpt-4o-mini", "gpt-4o-mini", "openai"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini", "openai"),
        ("o3", "o3", "openai"),
        ("o3-2025-04-16", "o3", "openai"),
        ("o4-mini", "o4-mini", "openai"),
        ("gpt-5", "gpt-5", "openai"),
        ("gpt-5-2025-08-07", "gpt-5", "openai"),
        ("gpt-4.1-nano", "gpt-4.1-nano", "openai"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano", "openai"),
        ("text-embedding-3-small", "text-embedding-3-small", "openai"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5", "anthropic"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku-latest", "anthropic"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku-latest", "anthropic"),
        ("claude-opus-4-1", "claude-opus-4-1", "anthropic"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1", "anthropic"),
        ("claude-haiku-4-5", "claude-haiku-4-5", "anthropic"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5", "anthropic"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4-0", "anthropic"),
        # our alias step: routers' vendor/model spelling
        ("openai/gpt-4o", "gpt-4o", "openai"),
        ("anthropic/claude-sonnet-4-5", "claude-sonnet-4-5", "anthropic"),
    ],
)
def test_resolution(book: PriceBook, ref: str, model: str, provider: str) -> None:
    p = book.price(ref)
    assert (p.model, p.provider) == (model, provider)


def test_dated_snapshot_costs_the_same_as_its_alias(book: PriceBook) -> None:
    assert book.price("gpt-4o-2024-08-06") == book.price("gpt-4o")


def test_price_is_cached(book: PriceBook) -> None:
    assert book.price("gpt-4o-mini") is book.price("gpt-4o-mini")


def test_provider_hint(book: PriceBook) -> None:
    assert book.price("claude-sonnet-4-5", "anthropic").provider == "anthropic"
    assert book.price("gpt-4o", "openai").model == "gpt-4o"
    # OTel provider names resolve through genai-prices' provider matching
    assert book.price("gpt-4o", "azure.ai.openai").input == book.price("gpt-4o").input


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", 16384),
        ("gpt-4o-mini", 16384),
        ("gpt-4.1-nano", 32768),
        ("gpt-5", 128000),
        ("o3", 100000),
        ("o4-mini", 100000),
        ("gpt-3.5-turbo", 4096),
        ("gpt-4-turbo", 4096),
        ("claude-opus-4-1", 32000),
        ("claude-opus-4-20250514", 32000),
        ("claude-sonnet-4-5", 64000),
        ("claude-haiku-4-5", 64000),
        ("claude-3-7-sonnet-latest", 64000),
        ("claude-3-5-haiku-latest", 8192),
        ("text-embedding-3-small", 0),
    ],
)
def test_max_output_tokens(book: PriceBook, model: str, expected: int) -> None:
    assert book.price(model).max_output_tokens == expected


def test_max_output_tokens_for_unknown_names() -> None:
    assert max_output_tokens_for("metacode-7b", context_window=8000) == 8000
    assert max_output_tokens_for("metacode-7b", context_window=1_000_000) == 32768
    assert max_output_tokens_for("metacode-7b") == 16384
    assert max_output_tokens_for("us.anthropic.claude-3-5-haiku-20241022-v1:0") == 8192


# --------------------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------------------


def test_override_for_a_new_model() -> None:
    book = PriceBook({"metacode-7b": {"input": 0.10, "output": 0.40}})
    p = book.price("metacode-7b")
    assert (p.model, p.provider, p.source) == ("metacode-7b", "custom", "override")
    assert (p.input, p.output) == (100_000, 400_000)
    assert p.cache_read == p.cache_write == p.cache_write_1h == p.input
    assert p.max_output_tokens == 16384 and p.context_window is None
    # 1000 x $0.10 + 1000 x $0.40
    assert book.cost_micros(p, Usage(input_tokens=1000, output_tokens=1000)) == 500


def test_override_with_every_field() -> None:
    book = PriceBook(
        {
            "MetaCode-7B": {
                "input": "0.10",
                "output": 0.4,
                "cached_input": 0.01,
                "cache_write": 0.125,
                "cache_write_1h": 0.2,
                "max_output_tokens": 8192,
                "context_window": 32768,
                "provider": "OpenAI",
                "batch_discount": 0.5,
            }
        }
    )
    p = book.price("metacode-7b")
    assert (p.input, p.output, p.cache_read, p.cache_write, p.cache_write_1h) == (
        100_000,
        400_000,
        10_000,
        125_000,
        200_000,
    )
    assert (p.max_output_tokens, p.context_window, p.provider, p.batch_discount) == (8192, 32768, "openai", 0.5)


def test_override_uses_cache_read_spelling_too() -> None:
    assert PriceBook({"m": {"input": 1, "output": 1, "cache_read": 0.5}}).price("m").cache_read == 500_000


def test_partial_override_of_a_catalog_model(book: PriceBook) -> None:
    overridden = PriceBook({"gpt-4o": {"output": 12}})
    p = overridden.price("gpt-4o")
    catalog = book.price("gpt-4o")
    assert p.source == "override"
    assert (p.input, p.cache_read, p.context_window, p.max_output_tokens) == (
        catalog.input,
        catalog.cache_read,
        catalog.context_window,
        catalog.max_output_tokens,
    )
    assert p.output == 12_000_000
    # the catalog's batch prices no longer describe a negotiated price; the vendor discount applies instead
    assert p.batch is None and p.batch_discount == 0.5
    # dated snapshots of the overridden model use the override
    assert overridden.price("gpt-4o-2024-08-06").output == 12_000_000
    # 1000 x $2.50 + 1000 x $12
    assert overridden.cost_micros(p, Usage(input_tokens=1000, output_tokens=1000)) == 2500 + 12_000


def test_override_by_catalog_id_covers_its_aliases() -> None:
    book = PriceBook({"claude-3-5-haiku-latest": {"input": 0.5}})
    assert book.price("claude-3-5-haiku-20241022").input == 500_000


def test_override_of_a_tiered_model_replaces_the_field_at_every_tier() -> None:
    p = PriceBook({"claude-sonnet-4-5": {"input": 2}}).price("claude-sonnet-4-5")
    assert p.tier is not None
    assert (p.input, p.tier.input) == (2_000_000, 2_000_000)
    assert (p.output, p.tier.output) == (15_000_000, 22_500_000)


def test_override_input_moves_defaulted_cache_prices() -> None:
    # o1-pro has no cached-input price in the catalog, so it follows input, including an overridden input
    p = PriceBook({"o1-pro": {"input": 100}}).price("o1-pro")
    assert p.input == p.cache_read == 100_000_000


def test_numeric_strings_are_accepted() -> None:
    assert PriceBook({"m": {"input": " 0.25 ", "output": "1e0"}}).price("m").output == 1_000_000


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        ({"m": {"input": -1, "output": 1}}, "prices.m.input", "non-negative number"),
        ({"m": {"input": 1, "output": math.nan}}, "prices.m.output", "non-negative number"),
        ({"m": {"input": math.inf, "output": 1}}, "prices.m.input", "non-negative number"),
        ({"m": {"input": "-inf", "output": 1}}, "prices.m.input", "non-negative number"),
        ({"m": {"input": "cheap", "output": 1}}, "prices.m.input", "non-negative number"),
        ({"m": {"input": "NaN", "output": 1}}, "prices.m.input", "non-negative number"),
        ({"m": {"input": True, "output": 1}}, "prices.m.input", "non-negative number"),
        ({"m": {"input": None, "output": 1}}, "prices.m.input", "non-negative number"),
        ({"m": {"input": [1], "output": 1}}, "prices.m.input", "non-negative number"),
        ({"m": {"input": 1, "output": 1, "cached_input": -0.5}}, "prices.m.cached_input", "non-negative number"),
        ({"m": {"input": 1, "output": 1, "cache_write_1h": "x"}}, "prices.m.cache_write_1h", "non-negative number"),
        ({"m": {"input": 1, "output": 1, "inptu": 1}}, "prices.m.inptu", "allowed: input, output"),
        ({"m": {"input": 1, "output": 1, "cached_input": 1, "cache_read": 1}}, "prices.m.cache_read", "only one"),
        ({"m": {"input": 1, "output": 1, "max_output_tokens": -1}}, "prices.m.max_output_tokens", "integer"),
        ({"m": {"input": 1, "output": 1, "max_output_tokens": 1.5}}, "prices.m.max_output_tokens", "integer"),
        ({"m": {"input": 1, "output": 1, "context_window": 0}}, "prices.m.context_window", "positive integer"),
        ({"m": {"input": 1, "output": 1, "context_window": "big"}}, "prices.m.context_window", "positive integer"),
        ({"m": {"input": 1, "output": 1, "provider": 3}}, "prices.m.provider", "provider name"),
        ({"m": {"input": 1, "output": 1, "batch_discount": 1.5}}, "prices.m.batch_discount", "between 0 and 1"),
        ({"m": {"input": 1, "output": 1, "batch_discount": "half"}}, "prices.m.batch_discount", "between 0 and 1"),
        ({"m": 0.1}, "prices.m", "table of prices"),
        ({"metacode-7b": {"input": 0.1}}, "prices.metacode-7b", "needs output"),
        ({"metacode-7b": {"cached_input": 0.1}}, "prices.metacode-7b", "needs input and output"),
        ({"": {"input": 1, "output": 1}}, "prices", "non-empty"),
        ({"M": {"input": 1, "output": 1}, "m": {"input": 1, "output": 1}}, "prices", "twice"),
    ],
)
def test_bad_overrides_name_the_key(overrides: dict[str, object], key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        PriceBook(overrides)  # type: ignore[arg-type]
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert hint in str(info.value)


def test_overrides_must_be_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        PriceBook([("m", {"input": 1})])  # type: ignore[arg-type]
    assert info.value.key == "prices"


def test_bad_unknown_model_setting() -> None:
    with pytest.raises(ConfigError) as info:
        PriceBook(unknown_model="ignore")  # type: ignore[arg-type]
    assert info.value.key == "unknown_model"


def test_bad_fallback_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        PriceBook(unknown_model="warn", fallback={"input": -3})
    assert info.value.key == "fallback.input"


# --------------------------------------------------------------------------------------------------------------
# Unknown models
# --------------------------------------------------------------------------------------------------------------


def test_unknown_model_raises(book: PriceBook) -> None:
    for _ in range(2):  # the miss is cached and still raises
        with pytest.raises(UnknownModelError) as info:
            book.price("metacode-7b", "openai")
        assert (info.value.model, info.value.provider) == ("metacode-7b", "openai")
        assert "metacode-7b" in str(info.value)


def test_models_not_priced_per_token_are_unknown(book: PriceBook) -> None:
    with pytest.raises(UnknownModelError):
        book.price("whisper-1")  # priced per audio hour in the catalog


def test_unknown_model_warns_once_and_charges_the_fallback(caplog: pytest.LogCaptureFixture) -> None:
    book = PriceBook(unknown_model="warn")
    with caplog.at_level(logging.WARNING, logger="tokenbudget.pricing"):
        p = book.price("metacode-7b")
        book.price("metacode-7b")
        book.price("metacode-7b", "openai")  # another cache key, same model: still one warning
    records = [r for r in caplog.records if r.name == "tokenbudget.pricing"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING and "metacode-7b" in records[0].getMessage()
    assert (p.source, p.model, p.provider) == ("fallback", "metacode-7b", "custom")
    assert (p.input, p.output) == (15_000_000, 75_000_000)
    # 1000 x $15 + 1000 x $75
    assert book.cost_micros(p, Usage(input_tokens=1000, output_tokens=1000)) == 15_000 + 75_000
    assert book.price("claude-9-experimental").provider == "anthropic"


def test_stated_fallback_price() -> None:
    book = PriceBook(unknown_model="warn", fallback={"input": 1, "output": 2, "max_output_tokens": 1000})
    p = book.price("metacode-7b")
    assert (p.input, p.output, p.max_output_tokens, p.source) == (1_000_000, 2_000_000, 1000, "fallback")


def test_known_models_never_use_the_fallback() -> None:
    assert PriceBook(unknown_model="warn").price("gpt-4o").source == CATALOG_SOURCE


# --------------------------------------------------------------------------------------------------------------
# Worst case and abandoned calls
# --------------------------------------------------------------------------------------------------------------


def test_worst_case_rounds_up(book: PriceBook) -> None:
    mini = book.price("gpt-4o-mini")
    assert book.worst_case_micros(mini, 3, 0) == 1  # 0.45 µ$ reserved as 1
    assert book.worst_case_micros(mini, 1, 0) == 1  # 0.15 µ$
    assert book.worst_case_micros(mini, 0, 0) == 0
    assert book.worst_case_micros(mini, 7, 0) == 2  # 1.05 µ$ -> 2 (a charge would round it to 1)
    assert book.cost_micros(mini, Usage(input_tokens=7)) == 1
    assert book.worst_case_micros(mini, 20, 0) == 3  # 3.00 µ$ exactly: no spurious extra micro
    # 1000 x $2.50 + 16_384 x $10
    gpt4o = book.price("gpt-4o")
    assert book.worst_case_micros(gpt4o, 1000, gpt4o.max_output_tokens) == 2_500 + 163_840


def test_worst_case_with_cache_writes_uses_the_dearest_input_rate(book: PriceBook) -> None:
    opus = book.price("claude-opus-4-1")
    # 1000 x $15 + 100 x $75, or 1000 x $30 (1-hour write) + 100 x $75
    assert book.worst_case_micros(opus, 1000, 100) == 15_000 + 7_500
    assert book.worst_case_micros(opus, 1000, 100, may_write_cache=True) == 30_000 + 7_500


def test_worst_case_uses_the_tier_over_the_threshold(book: PriceBook) -> None:
    sonnet = book.price("claude-sonnet-4-5")
    assert book.worst_case_micros(sonnet, 200_000, 1000) == 600_000 + 15_000
    assert book.worst_case_micros(sonnet, 200_001, 1000) == 1_200_006 + 22_500


def test_worst_case_rejects_negative_counts(book: PriceBook) -> None:
    with pytest.raises(ValueError):
        book.worst_case_micros(book.price("gpt-4o"), -1, 10)


def test_input_cost_of_an_abandoned_call(book: PriceBook) -> None:
    assert book.input_cost_micros(book.price("gpt-4o"), 1001) == 2503  # 2502.5 µ$ rounds half-up
    assert book.input_cost_micros(book.price("claude-sonnet-4-5"), 200_001) == 1_200_006  # tier input rate


# --------------------------------------------------------------------------------------------------------------
# ModelPrice itself
# --------------------------------------------------------------------------------------------------------------


def test_model_price_rejects_nonsense() -> None:
    base = {"model": "m", "provider": "custom", "input": 1, "output": 1, "cache_read": 1, "cache_write": 1}
    with pytest.raises(ValueError):
        ModelPrice(**base, cache_write_1h=-1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ModelPrice(**base, cache_write_1h=1, tier_threshold=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ModelPrice(**base, cache_write_1h=1, batch_discount=2.0)  # type: ignore[arg-type]


def test_prices_are_ints_converted_exactly(book: PriceBook) -> None:
    for model in _CROSS_MODELS:
        p = book.price(model)
        for value in (p.input, p.output, p.cache_read, p.cache_write, p.cache_write_1h):
            assert type(value) is int
    # $0.075/MTok is 75_000 pico-dollars per token, no float in between
    assert book.price("gpt-4o-mini").cache_read == int(Decimal("0.075") * 1_000_000)
