"""Issue 4 acceptance: principals and scopes, allocations, function budgets, periods, atomic multi-budget, policies."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import openai
import pytest

import tokenbudget
from tokenbudget.clock import ManualClock
from tokenbudget.testing import Reply, StandInServer

MSG = [{"role": "user", "content": "hi"}]
# 2026-03-10 12:00 UTC, a Tuesday
NOON = 1_773_144_000.0


def call(client: Any, model: str = "gpt-4o-mini", max_tokens: int = 100, **kw: Any) -> Any:
    return client.chat.completions.create(model=model, messages=MSG, max_tokens=max_tokens, **kw)


def events(guard: tokenbudget.Guard, status: str | None = None) -> list[tokenbudget.CallEvent]:
    return [
        e for e in guard.ledger.events() if e.operation != "function_run" and (status is None or e.status == status)
    ]


# -- who is calling ----------------------------------------------------------------------------------------------


def test_principal_defaults_from_config_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENBUDGET_TEAM", "env-team")
    monkeypatch.setenv("TOKENBUDGET_USER", "env-user")
    g = tokenbudget.install({"ledger": "memory://"})
    assert (g.default_principal.team, g.default_principal.user) == ("env-team", "env-user")
    g = tokenbudget.install({"ledger": "memory://", "team": "cfg-team"})
    assert (g.default_principal.team, g.default_principal.user) == ("cfg-team", "env-user")
    monkeypatch.delenv("TOKENBUDGET_USER")
    g = tokenbudget.install({"ledger": "memory://"})
    assert g.default_principal.user  # the login name


async def test_scope_follows_tasks_threads_and_nests(openai_client: Any, srv: StandInServer) -> None:
    guard = tokenbudget.install({"ledger": "memory://", "team": "default"})
    srv.reply = Reply(input_tokens=10, output_tokens=1)
    aclient = openai.AsyncOpenAI(base_url=srv.openai_base_url, api_key="k", max_retries=0)

    async def in_task() -> None:
        await aclient.chat.completions.create(model="gpt-4o-mini", messages=MSG)

    with tokenbudget.scope(team="search", user="ann", tags={"app": "bot"}):
        await asyncio.create_task(in_task())
        await asyncio.to_thread(call, openai_client)
        with tokenbudget.scope(user="bob", tags={"env": "prod"}):
            call(openai_client)
    call(openai_client)
    got = [(e.team, e.user, e.tags) for e in events(guard)]
    assert got[0] == ("search", "ann", {"app": "bot"})
    assert got[1] == ("search", "ann", {"app": "bot"})
    assert got[2] == ("search", "bob", {"app": "bot", "env": "prod"})
    assert got[3][0] == "default"


# -- allocations -------------------------------------------------------------------------------------------------


def test_team_budget_allocated_per_user(openai_client: Any, srv: StandInServer) -> None:
    guard = tokenbudget.install(
        {
            "ledger": "memory://",
            "budgets": [{"scope": "team:search/user:*", "limit_usd": 0.01}, {"scope": "team:search", "limit_usd": 1.0}],
        }
    )
    srv.reply = Reply(input_tokens=10, output_tokens=1)
    # gpt-4o-mini worst case for max_tokens=10000 is ~$0.006: one call fits a user's $0.01, two do not.
    with tokenbudget.scope(team="search", user="ann"):
        call(openai_client, max_tokens=10_000)
        call(openai_client, max_tokens=10_000)  # actual spend is tiny, so ann still has room
        with pytest.raises(tokenbudget.BudgetExceeded) as info:
            call(openai_client, max_tokens=20_000)
    assert info.value.scope == "team:search/user:ann"
    with tokenbudget.scope(team="search", user="bob"):
        call(openai_client, max_tokens=10_000)  # bob's allowance is his own
    with tokenbudget.scope(team="other", user="ann"):
        call(openai_client, max_tokens=50_000)  # not covered by team:search rules
    assert tokenbudget.remaining("team:search/user:ann") == pytest.approx(0.01 - 2 * 0.0000021, abs=1e-5)
    keys = {k for e in events(guard, "ok") for k in e.budget_keys}
    assert {"team:search/user:ann@total", "team:search/user:bob@total", "team:search@total"} <= keys


def test_multi_budget_reservation_is_all_or_none(openai_client: Any, srv: StandInServer) -> None:
    clock = ManualClock(NOON)
    guard = tokenbudget.install(
        {
            "ledger": "memory://",
            "team": "t",
            "budgets": [
                {"scope": "team:t", "limit_usd": 0.01, "period": "day"},
                {"scope": "team:t", "limit_usd": 1.0, "period": "month"},
            ],
        },
        clock=clock,
    )
    with pytest.raises(tokenbudget.BudgetExceeded) as info:
        call(openai_client, max_tokens=30_000)  # ~$0.018 worst case: fits the month, not the day
    assert "day" not in info.value.scope and info.value.limit == pytest.approx(0.01)
    for m in guard.policy.matches(guard.default_principal, "gpt-4o-mini", clock.now()):
        bal = guard.ledger.balance(m.allowance, now=clock.now())
        assert bal.reserved_micros == 0 and bal.spent_micros == 0  # the month was not touched either
    assert srv.requests == []


def test_period_rolls_over_with_injected_clock(openai_client: Any, srv: StandInServer) -> None:
    clock = ManualClock(NOON)
    guard = tokenbudget.install(
        {
            "ledger": "memory://",
            "team": "t",
            "timezone": "Europe/Berlin",
            "budgets": [{"scope": "team:t", "limit_usd": 0.001, "period": "day"}],
        },
        clock=clock,
    )
    srv.reply = Reply(input_tokens=1000, output_tokens=1000)  # $0.00075 each
    call(openai_client, max_tokens=1000)
    with pytest.raises(tokenbudget.BudgetExceeded):
        call(openai_client, max_tokens=1000)
    clock.advance(10 * 3600)  # 22:00 UTC = 23:00 in Berlin: same local day
    with pytest.raises(tokenbudget.BudgetExceeded):
        call(openai_client, max_tokens=1000)
    clock.advance(3600)  # midnight in Berlin: a new day
    call(openai_client, max_tokens=1000)
    assert len(events(guard, "ok")) == 2
    assert len({e.budget_keys for e in events(guard, "ok")}) == 2


@pytest.mark.parametrize("period,step", [("hour", 3600), ("week", 7 * 86400), ("month", 31 * 86400)])
def test_each_period_rolls(openai_client: Any, srv: StandInServer, period: str, step: int) -> None:
    clock = ManualClock(NOON)
    tokenbudget.install(
        {"ledger": "memory://", "budgets": [{"scope": "org", "limit_tokens": 1500, "period": period}]}, clock=clock
    )
    srv.reply = Reply(input_tokens=10, output_tokens=10)
    call(openai_client, max_tokens=1000)
    with pytest.raises(tokenbudget.BudgetExceeded) as info:
        call(openai_client, max_tokens=1490)
    assert info.value.limit_tokens == 1500
    clock.advance(step)
    call(openai_client, max_tokens=1480)


# -- function budgets --------------------------------------------------------------------------------------------


def test_function_budget_per_invocation_and_nested(openai_client: Any, srv: StandInServer) -> None:
    guard = tokenbudget.install({"ledger": "memory://"})
    srv.reply = Reply(input_tokens=10, output_tokens=1)

    @tokenbudget.budget(limit_usd=0.007)
    def step() -> None:
        call(openai_client, max_tokens=10_000)  # ~$0.006 worst case

    @tokenbudget.budget(limit_usd=0.02)
    def agent(n: int) -> int:
        for _ in range(n):
            step()
        call(openai_client, max_tokens=10_000)
        return n

    assert agent(2) == 2  # each step() invocation has its own $0.007
    assert agent(1) == 1  # ... and each agent() run its own $0.02

    @tokenbudget.budget(limit_usd=0.0001)
    def stingy() -> None:
        call(openai_client, max_tokens=10_000)

    with pytest.raises(tokenbudget.BudgetExceeded) as info:
        stingy()
    assert info.value.scope.startswith("fn:") and "stingy" in info.value.scope
    ok = events(guard, "ok")
    inner = [e for e in ok if e.function and e.function.endswith("step")]
    assert len(inner) == 3 and all(len(e.budget_keys) == 2 for e in inner)  # charged at both levels
    runs = [e for e in guard.ledger.events() if e.operation == "function_run"]
    assert [r.status for r in runs if r.function and r.function.endswith("stingy")] == ["error"]


async def test_function_budget_async_generator_and_block(async_openai_client: Any, srv: StandInServer) -> None:
    guard = tokenbudget.install({"ledger": "memory://"})
    srv.reply = Reply(input_tokens=10, output_tokens=1)

    @tokenbudget.budget(limit_usd=0.0001)
    async def poor() -> None:
        await async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=10_000)

    with pytest.raises(tokenbudget.BudgetExceeded):
        await poor()

    @tokenbudget.budget(limit_tokens=5000)
    async def agen() -> Any:
        for _ in range(3):
            r = await async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=2000)
            yield r

    got = []
    with pytest.raises(tokenbudget.BudgetExceeded):
        async for r in agen():  # 2 calls reserve 2 x ~2010 tokens; actual use is tiny, so a 3rd fits too
            got.append(r)
            if len(got) == 3:
                await async_openai_client.chat.completions.create(
                    model="gpt-4o-mini", messages=MSG, max_tokens=2000
                )  # outside: no fn budget
                raise tokenbudget.BudgetExceeded("x", limit=0, spent=0, requested=0)
    assert len(got) == 3

    @tokenbudget.budget(limit_usd=1)
    def gen() -> Any:
        from openai import OpenAI

        client = OpenAI(base_url=srv.openai_base_url, api_key="k", max_retries=0)
        yield client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
        yield client.chat.completions.create(model="gpt-4o-mini", messages=MSG)

    assert len(list(gen())) == 2
    fn_events = [e for e in events(guard, "ok") if e.function and e.function.endswith("<locals>.gen")]
    assert len(fn_events) == 2 and len({e.run_id for e in fn_events}) == 1

    async with tokenbudget.budget(limit_usd=0.0001, name="block"):
        with pytest.raises(tokenbudget.BudgetExceeded):
            await async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=10_000)


def test_function_budget_on_method(openai_client: Any, srv: StandInServer) -> None:
    tokenbudget.install({"ledger": "memory://"})

    class Agent:
        @tokenbudget.budget(limit_usd=0.0001)
        def run(self) -> None:
            call(openai_client, max_tokens=10_000)

    with pytest.raises(tokenbudget.BudgetExceeded):
        Agent().run()


# -- policies ----------------------------------------------------------------------------------------------------


def test_clamp_lowers_max_tokens_to_what_remains(openai_client: Any, srv: StandInServer, otel: Any) -> None:
    guard = tokenbudget.install(
        {
            "ledger": "memory://",
            "budgets": [{"scope": "org", "limit_usd": 0.001, "on_exhaust": "clamp", "min_output_tokens": 100}],
        }
    )
    srv.reply = Reply(input_tokens=10, output_tokens=5)
    call(openai_client, max_tokens=10_000)  # $0.006 worst case does not fit $0.001: clamped
    sent = srv.requests[-1].body
    assert 100 <= sent["max_tokens"] < 10_000
    # gpt-4o-mini: $0.60/MTok out -> $0.001 buys ~1666 output tokens minus the input
    assert sent["max_tokens"] <= 1666
    (span,) = otel.spans()
    assert span.attributes["tokenbudget.decision"] == "clamp"
    assert span.attributes["gen_ai.request.max_tokens"] == sent["max_tokens"]
    assert events(guard)[0].decision == "clamp"


def test_clamp_below_floor_raises(openai_client: Any, srv: StandInServer) -> None:
    tokenbudget.install(
        {
            "ledger": "memory://",
            "budgets": [{"scope": "org", "limit_usd": 0.00001, "on_exhaust": "clamp", "min_output_tokens": 100}],
        }
    )
    with pytest.raises(tokenbudget.BudgetExceeded):
        call(openai_client, max_tokens=10_000)
    assert srv.requests == []


def test_warn_lets_it_through_and_records(
    openai_client: Any, srv: StandInServer, otel: Any, caplog: pytest.LogCaptureFixture
) -> None:
    guard = tokenbudget.install(
        {"ledger": "memory://", "budgets": [{"scope": "org", "limit_usd": 0.0001, "on_exhaust": "warn"}]}
    )
    srv.reply = Reply(input_tokens=1000, output_tokens=1000)
    call(openai_client, max_tokens=1000)
    call(openai_client, max_tokens=1000)
    assert len(srv.requests) == 2
    assert [e.decision for e in events(guard)] == ["warn", "warn"]
    assert "warn" in caplog.text or "exceeded" in caplog.text
    assert otel.spans()[-1].attributes["tokenbudget.decision"] == "warn"


def test_downgrade_same_protocol(openai_client: Any, srv: StandInServer, otel: Any) -> None:
    guard = tokenbudget.install(
        {
            "ledger": "memory://",
            "budgets": [{"scope": "org", "limit_usd": 0.01, "on_exhaust": "downgrade"}],
            "downgrade": {"gpt-4o": "gpt-4o-mini"},
        }
    )
    srv.reply = Reply(input_tokens=100, output_tokens=100)
    call(openai_client, model="gpt-4o", max_tokens=2000)  # gpt-4o worst case ~$0.02 > $0.01; mini fits
    assert srv.requests[-1].body["model"] == "gpt-4o-mini"
    (span,) = otel.spans()
    assert span.attributes["tokenbudget.decision"] == "downgrade"
    assert span.attributes["tokenbudget.original_model"] == "gpt-4o"
    assert span.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    (e,) = events(guard)
    assert (e.model, e.original_model, e.decision) == ("gpt-4o-mini", "gpt-4o", "downgrade")
    assert e.original_estimated_micros > e.estimated_micros


def test_downgrade_target_that_does_not_fit_raises(openai_client: Any, srv: StandInServer) -> None:
    tokenbudget.install(
        {
            "ledger": "memory://",
            "budgets": [{"scope": "org", "limit_usd": 0.000001, "on_exhaust": "downgrade"}],
            "downgrade": {"gpt-4o": "gpt-4o-mini"},
        }
    )
    with pytest.raises(tokenbudget.BudgetExceeded) as info:
        call(openai_client, model="gpt-4o", max_tokens=2000)
    assert info.value.model == "gpt-4o-mini"
    assert srv.requests == []


def test_downgrade_to_in_house_server_same_protocol(
    openai_client: Any, srv: StandInServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INHOUSE_KEY", "sk-inhouse-secret")
    with StandInServer() as inhouse:
        guard = tokenbudget.install(
            {
                "ledger": "memory://",
                "budgets": [{"scope": "org", "limit_usd": 0.000001, "on_exhaust": "downgrade"}],
                "downgrade": {
                    "*": {"model": "metacode-7b", "base_url": inhouse.openai_base_url, "api_key_env": "INHOUSE_KEY"}
                },
                "prices": {"metacode-7b": {"input": 0, "output": 0}},
            }
        )
        r = call(openai_client, model="gpt-4o")
        assert r.model == "metacode-7b"
        assert srv.requests == [] and len(inhouse.requests) == 1
        assert inhouse.requests[0].headers["authorization"] == "Bearer sk-inhouse-secret"
    assert events(guard)[0].decision == "downgrade"


@pytest.mark.parametrize("at,expect", [(0.0, "gpt-4o-mini"), (0.8, "gpt-4o")])
def test_brownout_downgrade_at(openai_client: Any, srv: StandInServer, at: float, expect: str) -> None:
    tokenbudget.install(
        {
            "ledger": "memory://",
            "budgets": [{"scope": "org", "limit_usd": 1.0, "downgrade_at": at}],
            "downgrade": {"gpt-4o": "gpt-4o-mini"},
        }
    )
    call(openai_client, model="gpt-4o")
    assert srv.requests[-1].body["model"] == expect


def test_brownout_starts_at_80_percent(openai_client: Any, srv: StandInServer) -> None:
    guard = tokenbudget.install(
        {
            "ledger": "memory://",
            "budgets": [{"scope": "org", "limit_usd": 0.01, "downgrade_at": 0.8}],
            "downgrade": {"gpt-4o": "gpt-4o-mini"},
        }
    )
    srv.reply = Reply(input_tokens=1000, output_tokens=500)  # gpt-4o: $0.0025 + $0.005 = $0.0075 (75 %)
    call(openai_client, model="gpt-4o", max_tokens=500)
    srv.reply = Reply(input_tokens=200, output_tokens=10)  # $0.0006 more: 81 %
    call(openai_client, model="gpt-4o", max_tokens=100)  # sent at 75 %: still the requested model
    call(openai_client, model="gpt-4o", max_tokens=100)  # sent at 81 %: browned out
    assert [e.model for e in events(guard)] == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]
    assert [e.decision for e in events(guard)] == ["allow", "allow", "downgrade"]


# -- grants and asking the ledger --------------------------------------------------------------------------------


def test_grant_tops_up_until_it_expires(openai_client: Any, srv: StandInServer) -> None:
    clock = ManualClock(NOON)
    tokenbudget.install(
        {"ledger": "memory://", "team": "t", "budgets": [{"scope": "team:t", "limit_usd": 0.001}]}, clock=clock
    )
    with pytest.raises(tokenbudget.BudgetExceeded):
        call(openai_client, max_tokens=10_000)
    g = tokenbudget.grant("team:t", 0.01, expires="2h", reason="big eval run")
    assert g.expires_at == NOON + 7200
    assert tokenbudget.remaining("team:t") == pytest.approx(0.011)
    call(openai_client, max_tokens=10_000)
    clock.advance(7201)
    with pytest.raises(tokenbudget.BudgetExceeded):
        call(openai_client, max_tokens=10_000)


def test_spend_and_remaining(openai_client: Any, srv: StandInServer) -> None:
    tokenbudget.install({"ledger": "memory://", "budget_usd": 1.0})
    srv.reply = Reply(input_tokens=1000, output_tokens=1000)
    with tokenbudget.scope(team="a", user="x"):
        call(openai_client, max_tokens=1000)
    with tokenbudget.scope(team="b", user="y"):
        call(openai_client, max_tokens=1000)
    assert tokenbudget.spend() == pytest.approx(0.0015)
    assert tokenbudget.spend(team="a") == pytest.approx(0.00075)
    assert tokenbudget.remaining() == pytest.approx(1.0 - 0.0015)
    with pytest.raises(tokenbudget.ConfigError):
        tokenbudget.grant("nonsense:x", 1)


def test_not_installed_is_a_clear_error() -> None:
    with pytest.raises(tokenbudget.TokenBudgetError, match="install"):
        tokenbudget.remaining()


def test_env_config_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "tokenbudget.toml"
    cfg.write_text('ledger = "memory://"\nteam = "from-file"\n[[budgets]]\nscope = "org"\nlimit_usd = 3\n')
    monkeypatch.setenv("TOKENBUDGET_CONFIG", str(cfg))
    g = tokenbudget.install()
    assert g.default_principal.team == "from-file"
    assert g.policy.rules[0].limit_usd == 3


def test_pyproject_table(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.tokenbudget]\nledger = "memory://"\nteam = "py"\n')
    sub = tmp_path / "pkg"
    sub.mkdir()
    monkeypatch.chdir(sub)
    assert tokenbudget.install().default_principal.team == "py"
    assert os.environ.get("TOKENBUDGET_CONFIG") is None


def test_downgrade_to_in_house_without_key_env_never_forwards_the_vendor_key(srv: StandInServer) -> None:
    client = openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-VENDOR-SECRET", max_retries=0)
    with StandInServer() as inhouse:
        tokenbudget.install(
            {
                "ledger": "memory://",
                "budgets": [{"scope": "org", "limit_usd": 0.000001, "on_exhaust": "downgrade"}],
                "downgrade": {"*": {"model": "metacode-7b", "base_url": inhouse.openai_base_url}},
                "prices": {"metacode-7b": {"input": 0, "output": 0}},
            }
        )
        call(client, model="gpt-4o")
        (req,) = inhouse.requests
        assert "sk-VENDOR-SECRET" not in repr(req.headers)
