"""A team budget split per person, a monthly cap over it, and a per-run agent budget. Runs offline."""

from __future__ import annotations

import tempfile
from pathlib import Path

import anthropic

import tokenbudget
from tokenbudget.testing import Reply, StandInServer

CONFIG = {
    "budgets": [
        {"scope": "team:search/user:*", "limit_usd": 0.02, "period": "day"},  # each person: 2 cents a day
        {"scope": "team:search", "limit_usd": 10, "period": "month"},
    ],
}


@tokenbudget.budget(limit_usd=0.01)
def agent(client: anthropic.Anthropic, steps: int) -> int:
    done = 0
    for _ in range(steps):
        client.messages.create(model="claude-haiku-4-5", max_tokens=500, messages=[{"role": "user", "content": "go"}])
        done += 1
    return done


def main() -> None:
    db = Path(tempfile.mkdtemp()) / "ledger.db"
    with StandInServer(Reply(input_tokens=800, output_tokens=400)) as server:
        tokenbudget.install({**CONFIG, "ledger": f"sqlite:///{db}"})
        client = anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="sk-demo")
        for user in ("ann", "bob"):
            with tokenbudget.scope(team="search", user=user):
                try:
                    print(f"{user}: agent finished {agent(client, 20)} steps")
                except tokenbudget.BudgetExceeded as exc:
                    print(f"{user}: stopped: {exc}")
                print(f"{user}: ${tokenbudget.remaining('team:search/user:' + user):.4f} left today")
        print(f"team spend: ${tokenbudget.spend(team='search'):.4f} (ledger {db})")
        tokenbudget.uninstall()


if __name__ == "__main__":
    main()
