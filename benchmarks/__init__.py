"""Benchmarks of tokenbudget against the bare OpenAI and Anthropic SDKs and against peer instrumentations.

Run ``python -m benchmarks`` (``--quick`` for a smoke run, ``--json PATH`` to keep the results, ``--only NAME`` for
one section). See ``docs/performance.md`` for what each number means and ``benchmarks/README.md`` for the nox
session. Nothing here is imported by the library itself.
"""

from __future__ import annotations

SECTIONS = ("calls", "peers", "chunks", "estimate", "ledger", "startup")
"""Every section, in the order they run and print."""
