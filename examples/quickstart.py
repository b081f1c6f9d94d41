"""A $0.01 budget, a few calls, and the refusal that comes before any byte is sent. Runs offline."""

from __future__ import annotations

import openai

import tokenbudget
from tokenbudget.testing import Reply, StandInServer


def main() -> None:
    with StandInServer(Reply(input_tokens=1200, output_tokens=300)) as server:
        guard = tokenbudget.install(ledger="memory://", budget_usd=0.01)
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="sk-demo")
        for i in range(10):
            try:
                client.chat.completions.create(
                    model="gpt-4o", max_tokens=400, messages=[{"role": "user", "content": f"question {i}"}]
                )
                print(f"call {i}: ok, ${tokenbudget.spend():.6f} spent, ${tokenbudget.remaining():.6f} left")
            except tokenbudget.BudgetExceeded as exc:
                print(f"call {i}: refused before sending: {exc}")
                break
        print(f"requests the server received: {len(server.requests)}")
        print(f"calls recorded: {sum(1 for _ in guard.ledger.events())}")
        tokenbudget.uninstall()


if __name__ == "__main__":
    main()
