"""The record of one call as the ledger keeps it for reports. It never holds prompt or completion text."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CallEvent"]


@dataclass(slots=True)
class CallEvent:
    id: str
    time: float
    provider: str
    model: str
    operation: str = "chat"
    status: str = "ok"
    """``ok``; ``error`` (the vendor answered an error status: nothing charged); ``abandoned`` (the client gave up
    after sending: estimated input charged); ``denied`` (refused before sending); ``partial`` (stream cut short)."""
    decision: str = "allow"
    """``allow``, ``downgrade``, ``clamp``, ``warn`` or ``deny``."""
    original_model: str | None = None
    org: str | None = None
    team: str | None = None
    user: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    function: str | None = None
    """Qualified name of the innermost ``@tokenbudget.budget`` function the call ran in."""
    run_id: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micros: int = 0
    estimated_micros: int = 0
    original_estimated_micros: int = 0
    """What the call would have cost at the originally requested model (for downgrade savings)."""
    budget_keys: tuple[str, ...] = ()
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["budget_keys"] = list(self.budget_keys)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallEvent:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["budget_keys"] = tuple(known.get("budget_keys") or ())
        known["tags"] = dict(known.get("tags") or {})
        return cls(**known)

    @classmethod
    def from_json(cls, text: str) -> CallEvent:
        return cls.from_dict(json.loads(text))
