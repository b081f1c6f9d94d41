"""The in-process ledger against the shared contract."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import pytest

from ledger_contract import LedgerContract, ledger_machine_test
from tokenbudget.ledger import Ledger, MemoryLedger


class TestMemoryLedger(LedgerContract):
    @pytest.fixture
    def make_ledger(self) -> Callable[[], Ledger]:
        return MemoryLedger


def _make(stack: ExitStack) -> Ledger:
    led = MemoryLedger()
    stack.callback(led.close)
    return led


TestMemoryLedgerMachine = ledger_machine_test(_make, max_examples=60, steps=50)
