"""Brown-out to an in-house model that speaks the OpenAI protocol, from the Anthropic SDK. Runs offline."""

from __future__ import annotations

import os

import anthropic

import tokenbudget
from tokenbudget.testing import Reply, StandInServer


def main() -> None:
    os.environ.setdefault("METACODE_KEY", "sk-in-house")
    with (
        StandInServer(Reply(input_tokens=500, output_tokens=200)) as vendor,
        StandInServer(Reply(text="answer from the in-house model", input_tokens=500, output_tokens=200)) as in_house,
    ):
        tokenbudget.install(
            {
                "ledger": "memory://",
                "budgets": [{"scope": "org", "limit_usd": 0.01, "on_exhaust": "downgrade", "downgrade_at": 0.5}],
                "downgrade": {
                    "claude-sonnet-4-6": {
                        "model": "metacode-7b",
                        "base_url": in_house.openai_base_url,
                        "api": "openai",
                        "api_key_env": "METACODE_KEY",
                    }
                },
                "prices": {"metacode-7b": {"input": 0.10, "output": 0.40}},
            }
        )
        client = anthropic.Anthropic(base_url=vendor.anthropic_base_url, api_key="sk-demo")
        for i in range(4):
            msg = client.messages.create(
                model="claude-sonnet-4-6", max_tokens=300, messages=[{"role": "user", "content": f"task {i}"}]
            )
            print(f"call {i}: {msg.model:<18} {msg.content[0].text!r}  spent ${tokenbudget.spend():.6f}")
        print(f"vendor requests: {len(vendor.requests)}, in-house requests: {len(in_house.requests)}")
        tokenbudget.uninstall()


if __name__ == "__main__":
    main()
