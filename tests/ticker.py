"""A probe for "the event loop kept running": counts 10 ms sleeps while a test awaits something else."""

from __future__ import annotations

import asyncio
from types import TracebackType


class Ticker:
    """``async with Ticker() as t: ...``; ``t.ticks`` stays near 0 if a sync call blocked the loop meanwhile."""

    def __init__(self, every: float = 0.01) -> None:
        self.every = every
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.ticks += 1

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
