"""Money is an ``int`` of micro-dollars everywhere below the public API, so sums are exact.

Prices are kept as integer *pico*-dollars per token (USD per million tokens x 10^6): every catalog price with up
to six decimals is exact, and a call's cost is an integer product rounded once, at the end, to micro-dollars.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal

__all__ = ["Micros", "micros_from_pico", "micros_to_usd", "pico_per_token", "usd_to_micros"]

Micros = int
"""An amount of money in millionths of a US dollar."""

_MICRO = Decimal(1_000_000)


def usd_to_micros(usd: float | int | str | Decimal) -> Micros:
    """Convert a user-facing dollar amount; floats go through ``str`` so 0.1 means ten cents exactly."""
    value = usd if isinstance(usd, Decimal) else Decimal(str(usd))
    return int((value * _MICRO).to_integral_value(rounding=ROUND_HALF_UP))


def micros_to_usd(micros: Micros) -> float:
    """For display and span attributes only; never sum the result."""
    return micros / 1_000_000


def pico_per_token(usd_per_mtok: float | int | str | Decimal) -> int:
    """USD per million tokens -> pico-dollars per token (exact for prices with up to six decimals)."""
    value = usd_per_mtok if isinstance(usd_per_mtok, Decimal) else Decimal(str(usd_per_mtok))
    return int((value * _MICRO).to_integral_value(rounding=ROUND_CEILING))


def micros_from_pico(pico: int, *, round_up: bool = False) -> Micros:
    """Round a pico-dollar total to micro-dollars: half-up for charges, up for reservations (never under-reserve)."""
    if round_up:
        return -((-pico) // 1_000_000)
    return (pico + 500_000) // 1_000_000
