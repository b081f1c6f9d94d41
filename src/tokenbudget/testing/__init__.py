"""Test support: an in-process stand-in for the OpenAI and Anthropic APIs, driven by the real SDK clients.

Stdlib only, so importing it never drags vendor SDKs or test frameworks into a production install.
"""

from __future__ import annotations

from .server import Fault, RecordedRequest, Reply, StandInServer, ToolCall, estimate_input_tokens

__all__ = ["Fault", "RecordedRequest", "Reply", "StandInServer", "ToolCall", "estimate_input_tokens"]
