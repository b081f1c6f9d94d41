"""``opentelemetry-instrument python app.py`` guards an app with no code change, configured from the environment.

Registered under the ``opentelemetry_instrumentor`` entry point group. Settings come from ``TOKENBUDGET_*``
variables and ``TOKENBUDGET_CONFIG`` exactly as for :func:`tokenbudget.install`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

__all__ = ["TokenBudgetInstrumentor"]


class TokenBudgetInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    def instrumentation_dependencies(self) -> Collection[str]:
        # Either SDK is enough; the guard patches whichever is importable, now or later.
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        from ._runtime import install

        install(tracer_provider=kwargs.get("tracer_provider"), meter_provider=kwargs.get("meter_provider"))

    def _uninstrument(self, **kwargs: Any) -> None:
        from ._runtime import uninstall

        uninstall()
