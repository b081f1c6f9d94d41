"""Every error tokenbudget raises derives from :class:`TokenBudgetError`, so callers can tell ours from the SDK's."""

from __future__ import annotations

__all__ = [
    "BudgetExceeded",
    "ConfigError",
    "LedgerError",
    "LedgerUnavailable",
    "TokenBudgetError",
    "UnknownModelError",
]


class TokenBudgetError(Exception):
    """Base class: raised by tokenbudget itself, never by the wrapped SDK."""


class ConfigError(TokenBudgetError, ValueError):
    """A setting is wrong. The message names where it came from, the key, and what is allowed."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        self.key = key
        self.source = source
        prefix = ""
        if source:
            prefix += f"{source}: "
        if key:
            prefix += f"{key}: "
        super().__init__(prefix + message)


class UnknownModelError(TokenBudgetError, LookupError):
    """The model has no price, so the call cannot be reserved; raised before any byte is sent."""

    def __init__(self, model: str, provider: str | None = None) -> None:
        self.model = model
        self.provider = provider
        where = f" (provider {provider})" if provider else ""
        super().__init__(
            f"no price is known for model {model!r}{where}. Price it with "
            f"tokenbudget.install(prices={{{model!r}: {{'input': USD_PER_MTOK, 'output': USD_PER_MTOK}}}}) "
            f'or a [prices.{model!r}] table in tokenbudget.toml, or set unknown_model = "warn" to charge '
            "the stated fallback price instead."
        )


class BudgetExceeded(TokenBudgetError):
    """A reservation did not fit; raised before the request leaves the process.

    Amounts are in USD (``limit``/``spent``/``reserved``/``requested``) and, where the budget counts tokens,
    tokens (``limit_tokens``/``spent_tokens``/``requested_tokens``).
    """

    def __init__(
        self,
        scope: str,
        *,
        limit: float | None,
        spent: float,
        reserved: float = 0.0,
        requested: float,
        limit_tokens: int | None = None,
        spent_tokens: int = 0,
        requested_tokens: int = 0,
        model: str | None = None,
    ) -> None:
        self.scope = scope
        self.limit = limit
        self.spent = spent
        self.reserved = reserved
        self.requested = requested
        self.limit_tokens = limit_tokens
        self.spent_tokens = spent_tokens
        self.requested_tokens = requested_tokens
        self.model = model
        if limit is not None and (limit_tokens is None or requested + spent + reserved > limit):
            detail = (
                f"limit ${limit:.6f}, spent ${spent:.6f}, reserved ${reserved:.6f}, "
                f"this call needs up to ${requested:.6f}"
            )
        else:
            detail = f"limit {limit_tokens} tokens, used {spent_tokens}, this call needs up to {requested_tokens}"
        on = f" for {model}" if model else ""
        super().__init__(f"budget {scope!r} exhausted{on}: {detail}")


class LedgerError(TokenBudgetError):
    """The ledger could not record or answer; budgets could not be checked."""


class LedgerUnavailable(LedgerError):
    """The ledger is unreachable and ``on_ledger_error = "closed"`` refuses calls until it returns."""
