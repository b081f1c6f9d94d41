"""``tokenbudget demo``: two simulated working days of a small company, offline, in a few seconds.

Everything a newcomer would otherwise need an API key, money and a week of traffic for: the real ``openai`` and
``anthropic`` clients talk to the bundled stand-in server, a :class:`~tokenbudget.clock.ManualClock` moves through
the days, and the guard does what it does in production on a fresh SQLite ledger: per-person allowances with a
downgrade, a team budget that clamps, a warn-only budget, an org cap, per-run budgets on agent functions, and a
runaway agent stopped before its next call leaves the process. Then the same report, budgets and top tables the CLI
prints, and the dashboard, are made from that ledger.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import random
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

__all__ = ["run_demo"]

LEDGER_NAME = "ledger.db"
CONFIG_NAME = "tokenbudget.toml"
DASHBOARD_NAME = "tokenbudget-dashboard.html"

_CONFIG = """\
# The demo company's budgets. Explore the demo ledger with, for example:
#   tokenbudget --config {config} report --by team,model
ledger = {ledger}
org = "acme"
timezone = "UTC"

# The whole company: a monthly cap.
[[budgets]]
scope = "org"
limit_usd = 40.0
period = "month"

# Search allocates $0.40 a day to each person. Past 60 % of it, their gpt-4o calls run on gpt-4o-mini; when even
# that does not fit, the call is downgraded (and refused only if the cheaper call does not fit either).
[[budgets]]
scope = "team:search/user:*"
limit_usd = 0.40
period = "day"
on_exhaust = "downgrade"
downgrade_at = 0.6

[[budgets]]
scope = "team:search"
limit_usd = 3.0
period = "day"

# Research shares $0.90 a day. Near the end, replies are shortened (max_tokens clamped to what is left) rather
# than refused; below 128 output tokens a call is refused.
[[budgets]]
scope = "team:research"
limit_usd = 0.90
period = "day"
on_exhaust = "clamp"
min_output_tokens = 128

# Support is only watched: past $0.25 a day calls still go through, marked "warn".
[[budgets]]
scope = "team:support"
limit_usd = 0.25
period = "day"
on_exhaust = "warn"

[downgrade]
"gpt-4o" = "gpt-4o-mini"
"claude-sonnet-4-5" = "claude-haiku-4-5"
"""

_VOCABULARY = (
    "the query ranking index shard latency user click result page search model embed vector recall paper method "
    "data table figure claim ticket refund order account reply policy draft summary note plan step tool call code "
    "test error trace budget cost token review merge deploy cache metric alert team owner week day hour report"
)
_WORDS = tuple(_VOCABULARY.split(" "))


def _missing_sdks() -> list[str]:
    return [m for m in ("openai", "anthropic") if importlib.util.find_spec(m) is None]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


class _Narrator:
    """Prints the moments worth seeing (first downgrade of a person, first clamp, refusals) as the guard decides."""

    def __init__(self, out: IO[str], clock: Any) -> None:
        self.out = out
        self.clock = clock
        self.seen: set[tuple[str, str | None, str | None]] = set()
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def say(self, text: str) -> None:
        stamp = datetime.fromtimestamp(self.clock.now(), timezone.utc).strftime("%a %H:%M")
        self.out.write(f"  {stamp}  {text}\n")

    def __call__(self, event: Any) -> None:
        with self.lock:
            self.counts[event.decision] = self.counts.get(event.decision, 0) + 1
            if event.operation == "function_run":
                return
            day = datetime.fromtimestamp(event.time, timezone.utc).strftime("%Y-%m-%d")
            key = (f"{event.decision}:{day}", event.team, event.user if event.decision == "downgrade" else None)
            if event.decision not in ("downgrade", "clamp", "warn") or key in self.seen:
                return
            self.seen.add(key)
        who = f"{event.user} ({event.team})" if event.user else str(event.team)
        if event.decision == "downgrade":
            self.say(f"DOWNGRADE  {who} passed 60 % of the day's allowance: {event.original_model} -> {event.model}")
        elif event.decision == "clamp":
            self.say(f"CLAMP      team {event.team} is nearly out: max_tokens cut to fit what is left of its budget")
        elif event.decision == "warn":
            self.say(f"WARN       team {event.team} is over its warn-only budget; calls continue, marked 'warn'")


class _DemoServer:
    """The stand-in server, answering like a model that stops at ``max_tokens`` (so a clamp really caps the bill)."""

    def __init__(self) -> None:
        from ..testing import StandInServer
        from ..testing.server import Reply

        demo = self

        class Server(StandInServer):
            def _record(self, request: Any) -> None:
                demo.local.body = request.body
                # No request log: the demo sends hundreds of requests and never reads them back.

            def _take(self) -> tuple[Any, int]:
                item, serial = super()._take()
                body = getattr(demo.local, "body", None) or {}
                cap = body.get("max_tokens") or body.get("max_completion_tokens")
                if isinstance(item, Reply) and isinstance(cap, int) and (item.output_tokens or 0) > cap:
                    item = dataclasses.replace(item, output_tokens=cap, stop_reason="max_tokens")
                return item, serial

        self.local = threading.local()
        self.server = Server()

    def __enter__(self) -> Any:
        return self.server.start()

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


@contextmanager
def _isolated_env() -> Iterator[None]:
    """The demo's budgets are the demo's: a developer's TOKENBUDGET_* variables must not leak into them."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("TOKENBUDGET_")}
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """The narrator says what matters; the guard's own warnings (warn budgets) would repeat it on every call."""
    log = logging.getLogger("tokenbudget")
    level, propagate = log.level, log.propagate
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
        log.propagate = propagate


def _prepare_dir(directory: str | None) -> Path:
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="tokenbudget-demo-"))
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):  # a fresh ledger each run; only the demo's own file is replaced
        (path / (LEDGER_NAME + suffix)).unlink(missing_ok=True)
    return path


def run_demo(*, directory: str | None, dashboard: bool, out: IO[str], err: IO[str]) -> int:
    missing = _missing_sdks()
    if missing:
        err.write(
            f"tokenbudget demo needs the {' and '.join(missing)} SDK{'s' if len(missing) > 1 else ''}: "
            "pip install 'tokenbudget[demo]'\n"
        )
        return 1
    from ..errors import TokenBudgetError

    root = _prepare_dir(directory)
    try:
        with _isolated_env(), _quiet_logs():
            return _run(root, dashboard=dashboard, out=out, err=err)
    except TokenBudgetError as exc:
        err.write(f"tokenbudget demo: error: {exc}\n")
        return 1


def _run(root: Path, *, dashboard: bool, out: IO[str], err: IO[str]) -> int:
    import anthropic
    import openai

    import tokenbudget

    from ..clock import ManualClock
    from ..config import load_file, validate_settings
    from ..ledger.sqlite import SQLiteLedger
    from ..testing.server import Reply
    from . import Context, cmd_budgets, cmd_report, cmd_top

    ledger_path = root / LEDGER_NAME
    config_path = root / CONFIG_NAME
    config_path.write_text(
        _CONFIG.format(ledger=json.dumps(f"sqlite:///{ledger_path}"), config=config_path), encoding="utf-8"
    )
    settings = validate_settings(*load_file(config_path))

    day = 86_400.0
    now_real = datetime.now(timezone.utc).timestamp()
    today = now_real - now_real % day
    clock = ManualClock(today - day + 9 * 3600)  # yesterday 09:00 UTC: two working days, the second one today

    out.write("tokenbudget demo: two simulated working days at acme, offline, through the real SDKs\n")
    out.write(f"  files in {root}: {LEDGER_NAME} (the ledger), {CONFIG_NAME} (the budgets)")
    out.write(f", {DASHBOARD_NAME}\n" if dashboard else "\n")

    rng = random.Random(7)
    narrator = _Narrator(out, clock)
    with _DemoServer() as srv:
        out.write(f"  stand-in OpenAI/Anthropic API at {srv.url} (no network, no keys, no cost)\n\n")
        guard = tokenbudget.install(settings, ledger=SQLiteLedger(ledger_path), clock=clock)
        guard.listeners.append(narrator)
        oai = openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-demo", max_retries=0)
        ant = anthropic.Anthropic(base_url=srv.anthropic_base_url, api_key="sk-ant-demo", max_retries=0)
        sim = _Company(tokenbudget, oai, ant, srv, Reply, rng, narrator)
        try:
            for d, busy in ((0, 0.5), (1, 1.0)):
                clock.set(today - day + d * day + 9 * 3600)
                narrator.say(f"--- {'yesterday' if d == 0 else 'today'}: the working day starts ---")
                for tick in range(34):  # 09:00 to 17:30 in quarter hours
                    sim.tick(busy, runaway=d == 1 and tick == 16)
                    clock.advance(900)
                narrator.say(f"--- the day ends: {sim.calls} calls so far ---")
        finally:
            tokenbudget.uninstall()

    now = clock.now()
    ctx = Context(settings, f"sqlite:///{ledger_path}", now, out, err)
    out.write("\nWhat it cost. `tokenbudget report --by team,model`:\n")
    cmd_report(argparse.Namespace(by="team,model", since=None, until=None, format="table"), ctx)
    out.write("\nAgent functions: runs, failures, cost per successful run. `tokenbudget report --by function`:\n")
    cmd_report(argparse.Namespace(by="function", since=None, until=None, format="table"), ctx)
    out.write("\nEvery budget now. `tokenbudget budgets`:\n")
    cmd_budgets(argparse.Namespace(all=False, format="table"), ctx)
    out.write("\nWho spends, and whose spend is growing. `tokenbudget top --by user`:\n")
    cmd_top(argparse.Namespace(window="24h", limit=5, by="user", format="table"), ctx)

    if dashboard:
        from .dashboard import DashboardData, render

        led = SQLiteLedger(ledger_path)
        try:
            data = DashboardData.collect(led, settings, now=now, since=None, until=None)
        finally:
            led.close()
        target = root / DASHBOARD_NAME
        target.write_text(render(data, title="tokenbudget demo: acme"), encoding="utf-8")
        out.write(f"\nDashboard: {target}\n")
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M")
    out.write(
        "\nExplore the same ledger yourself (--now replays the moment the simulation ended):\n"
        f"  tokenbudget --config {config_path} report --by user,model --now {stamp}\n"
        f"  tokenbudget --config {config_path} report --by day,team --format csv\n"
        f"  tokenbudget --config {config_path} budgets --now {stamp}\n"
        f"  tokenbudget --config {config_path} grant team:research 2 --expires 1d --reason 'deadline'\n"
        f"  tokenbudget --config {config_path} dashboard -o {root / 'again.html'}\n"
    )
    return 0


class _Company:
    """The people and agents of the demo, one quarter hour at a time."""

    def __init__(
        self, tb: Any, oai: Any, ant: Any, srv: Any, reply: Any, rng: random.Random, narrator: _Narrator
    ) -> None:
        self.tb, self.oai, self.ant, self.srv, self.Reply, self.rng = tb, oai, ant, srv, reply, rng
        self.say = narrator.say
        self.calls = 0
        self.refused_noted: set[str] = set()
        self.tickets_failed = 0
        self.agent_steps = 0
        self.triage = tb.budget(limit_usd=0.02, name="support.triage_ticket")(self._triage)
        self.agent = tb.budget(limit_usd=0.25, name="research.agent")(self._agent)

    # -- calls ---------------------------------------------------------------------------------------------------
    def _answer(self, words: int) -> None:
        self.srv.reply = self.Reply(text=_text(self.rng, 12), output_tokens=words)

    def chat(self, model: str, prompt_words: int, max_tokens: int, answer: int) -> str:
        self._answer(answer)
        self.calls += 1
        r = self.oai.chat.completions.create(
            model=model, max_tokens=max_tokens,
            messages=[{"role": "system", "content": "You are helpful."},
                      {"role": "user", "content": _text(self.rng, prompt_words)}],
        )  # fmt: skip
        return str(r.choices[0].message.content or "")

    def claude(self, prompt: str, max_tokens: int, answer: int) -> str:
        self._answer(answer)
        self.calls += 1
        r = self.ant.messages.create(
            model="claude-sonnet-4-5", max_tokens=max_tokens, messages=[{"role": "user", "content": prompt}]
        )
        return "".join(getattr(b, "text", "") for b in r.content)

    def _refused(self, who: str, exc: Exception) -> None:
        if who not in self.refused_noted:
            self.refused_noted.add(who)
            self.say(f"REFUSED    {who}: {type(exc).__name__}: {exc} (never sent)")

    # -- people --------------------------------------------------------------------------------------------------
    def tick(self, busy: float, *, runaway: bool) -> None:
        rng, tb = self.rng, self.tb
        for user, rate in (("ann", 3.0), ("bob", 1.0), ("cy", 0.6)):
            for _ in range(self._n(rate * busy)):
                with tb.scope(team="search", user=user):
                    try:
                        self.chat("gpt-4o", rng.randint(500, 900), 400, rng.randint(150, 380))
                    except tb.BudgetExceeded as exc:
                        self._refused(f"{user} (search)", exc)
        for user, rate in (("dee", 1.0), ("eve", 0.8)):
            for _ in range(self._n(rate * busy)):
                with tb.scope(team="research", user=user):
                    try:
                        self.claude(_text(rng, rng.randint(700, 1200)), 1024, rng.randint(300, 800))
                    except tb.BudgetExceeded as exc:
                        self._refused(f"{user} (research)", exc)
        for user in ("fay", "gus"):
            for _ in range(self._n(1.2 * busy)):
                with tb.scope(team="support", user=user):
                    try:
                        self.triage()
                    except ValueError:
                        self.tickets_failed += 1
        if runaway:
            self.say("AGENT      eve starts research.agent: $0.25 per run, and a loop with no exit of its own")
            with tb.scope(team="research", user="eve"):
                try:
                    self.agent()
                except tb.BudgetExceeded as exc:
                    self.say(f"STOPPED    research.agent after {self.agent_steps} steps: {type(exc).__name__}: {exc}")
                    self.say("           the next call was never sent; the run is recorded as failed")

    def _n(self, rate: float) -> int:
        whole = int(rate)
        return whole + (1 if self.rng.random() < rate - whole else 0)

    # -- agents --------------------------------------------------------------------------------------------------
    def _triage(self) -> str:
        """Classify a ticket with the cheap model, draft the answer with the good one; one in six drafts is unusable."""
        kind = self.chat("gpt-4o-mini", 300, 20, 8)
        draft = self.chat("gpt-4o", self.rng.randint(400, 700), 500, self.rng.randint(150, 400))
        if self.rng.random() < 1 / 6:
            raise ValueError("draft failed the policy check")
        return kind + draft

    def _agent(self) -> None:
        """Keeps asking for "one more step" with the whole transcript each time: cost grows every step."""
        transcript = _text(self.rng, 600)
        self.agent_steps = 0
        while True:
            reply = self.claude(transcript, 1024, 700)
            self.agent_steps += 1
            transcript += " " + reply + " " + _text(self.rng, 500)
