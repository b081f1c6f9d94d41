"""Vendor-neutral descriptions of one LLM call: what the adapter hands the guard, and what it hands back.

Adapters translate SDK arguments and responses into these; nothing above the adapters knows a vendor's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CallRequest", "Usage"]


@dataclass(slots=True)
class CallRequest:
    """What the guard needs to know before a request leaves."""

    provider: str
    """``gen_ai.provider.name``: ``"openai"``, ``"anthropic"``, ``"azure.ai.openai"``."""
    operation: str
    """``gen_ai.operation.name``: ``"chat"``, ``"text_completion"``, ``"embeddings"``, ``"generate_content"``."""
    model: str
    body: dict[str, Any]
    """The JSON body about to be sent; the guard may rewrite model / max tokens / stream options in a copy."""
    stream: bool = False
    max_output_tokens: int | None = None
    """What the caller capped output at; ``None`` means the model's maximum is the worst case."""
    server_address: str | None = None
    server_port: int | None = None
    api: str = "openai"
    """Wire protocol of the request (``"openai"`` or ``"anthropic"``); the estimator's overheads differ."""


@dataclass(slots=True)
class Usage:
    """Tokens a vendor billed. ``input_tokens`` is the total, cache reads and writes included (OTel convention)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    """Cache writes at the 5-minute rate (Anthropic), or unspecified TTL."""
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    """Part of ``output_tokens`` (billed as output); reported separately only."""
    response_model: str | None = None
    response_id: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    exact: bool = True
    """False when counted by tokenbudget (abandoned stream) rather than reported by the vendor."""

    @property
    def uncached_input_tokens(self) -> int:
        return max(0, self.input_tokens - self.cache_read_tokens - self.cache_write_tokens - self.cache_write_1h_tokens)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens
