"""The ``tokenbudget`` command: reports, budgets, grants and the dashboard, read straight from the ledger.

Exit codes: 0 done; 1 the command could not be carried out (ledger unreachable or missing, a file not writable);
2 the command line or the config is wrong. Errors are one line on stderr, never a traceback: the people running
this are looking at money, not debugging tokenbudget.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..config import Settings, load_settings
from ..errors import ConfigError, LedgerError, TokenBudgetError
from ..events import CallEvent
from ..ledger import open_ledger
from ..ledger.base import Ledger
from . import report as rp

__all__ = ["main"]

_FORMATS = ("table", "csv", "json")


class UsageError(Exception):
    """A wrong command line found after parsing (a bad time, a bad grouping): exit 2."""


@dataclass
class Context:
    """What every command needs: resolved settings, where the ledger is, and which moment counts as "now"."""

    settings: Settings
    ledger_url: str | None
    now: float
    out: IO[str]
    err: IO[str]

    @property
    def tz(self) -> str:
        return self.settings.timezone

    def open(self, *, create: bool = False) -> Ledger:
        """Open the ledger; read-only commands refuse to create an empty file where a typo pointed them."""
        if not create:
            path = _sqlite_path(self.ledger_url)
            if path is not None and not path.exists():
                raise LedgerError(
                    f"no ledger at {path}: nothing has been recorded there. Check --ledger or the `ledger` setting "
                    "(tokenbudget.toml, TOKENBUDGET_LEDGER)"
                )
        return open_ledger(self.ledger_url)

    def when(self, text: str | None, key: str) -> float | None:
        if text is None:
            return None
        try:
            return rp.parse_when(text, now=self.now, tz=self.tz, key=key)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None


def _sqlite_path(url: str | None) -> Path | None:
    if url is None:
        from ..ledger.sqlite import default_ledger_path

        return default_ledger_path()
    text = url.strip()
    if text.lower().startswith("sqlite:///"):
        return Path(os.path.abspath(os.path.expanduser(text[len("sqlite:///") :])))
    return None


# -- output ----------------------------------------------------------------------------------------------------------
def _console(out: IO[str]) -> Any:
    from rich.console import Console

    wide = None if out.isatty() else max(120, int(os.environ.get("COLUMNS", "0") or 0), 170)
    return Console(file=out, width=wide, highlight=False, soft_wrap=False)


def print_table(
    out: IO[str],
    title: str | None,
    columns: Sequence[tuple[str, str]],
    rows: Iterable[Sequence[str]],
    *,
    footer: Sequence[str] | None = None,
    caption: str | None = None,
) -> None:
    """A rich table whose cells are plain text: names come from users, so ``[bold]`` in one must print as is."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=Text(title) if title else None, box=box.SIMPLE_HEAVY, show_footer=footer is not None,
        caption=Text(caption) if caption else None, title_justify="left", caption_justify="left",
    )
    for i, (name, justify) in enumerate(columns):
        table.add_column(
            Text(name), justify="right" if justify == "r" else "left",
            footer=Text(footer[i]) if footer is not None else "", no_wrap=justify == "r",
        )
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    _console(out).print(table)


def write_records(out: IO[str], fmt: str, records: list[dict[str, Any]]) -> None:
    if fmt == "json":
        json.dump(records, out, indent=2, default=str)
        out.write("\n")
        return
    if not records:
        return
    writer = csv.DictWriter(out, fieldnames=list(records[0]), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: ("" if v is None else v) for k, v in rec.items()})


def _int(n: int) -> str:
    return f"{n:,}"


def _pct(frac: float | None) -> str:
    return "-" if frac is None else f"{frac * 100:.1f}%"


# -- commands --------------------------------------------------------------------------------------------------------
def _events(ledger: Ledger, since: float | None, until: float | None) -> list[CallEvent]:
    return list(ledger.events(since, until))


def _savings(ctx: Context) -> rp.Savings:
    from ..pricing import PriceBook

    return rp.Savings(PriceBook(ctx.settings.prices, unknown_model="raise"))


def cmd_report(args: argparse.Namespace, ctx: Context) -> int:
    try:
        by = rp.parse_by(args.by)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    since = ctx.when(args.since, "--since")
    until = ctx.when(args.until, "--until")
    ledger = ctx.open()
    try:
        events = _events(ledger, since, until)
        grants = ledger.grants(now=ctx.now) if args.format == "table" else []
    finally:
        ledger.close()
    rows = rp.group_events(events, by, tz=ctx.tz, savings=_savings(ctx))
    if args.format != "table":
        write_records(ctx.out, args.format, [rp.report_record(r, by) for r in rows])
        return 0
    with_runs = "function" in by
    cols: list[tuple[str, str]] = [(b, "l") for b in by]
    cols += [("calls", "r"), ("denied", "r"), ("downgraded", "r"), ("errors", "r"), ("abandoned", "r"),
             ("input tok", "r"), ("output tok", "r"), ("cost", "r"), ("saved", "r")]  # fmt: skip
    if with_runs:
        cols += [("runs", "r"), ("failed", "r"), ("cost/run", "r"), ("cost/ok run", "r")]
    total = rp.Totals()
    body: list[list[str]] = []
    for r in rows:
        t = r.totals
        for name in ("calls", "denied", "downgraded", "errors", "abandoned", "input_tokens", "output_tokens",
                     "cost_micros", "saved_micros", "runs", "failed_runs", "run_cost_micros"):  # fmt: skip
            setattr(total, name, getattr(total, name) + getattr(t, name))
        cells = [*r.group, _int(t.calls), _int(t.denied), _int(t.downgraded), _int(t.errors), _int(t.abandoned),
                 _int(t.input_tokens), _int(t.output_tokens), rp.fmt_usd(t.cost_micros),
                 rp.fmt_usd(t.saved_micros)]  # fmt: skip
        if with_runs:
            cells += [_int(t.runs), _int(t.failed_runs), rp.fmt_usd(t.cost_per_run_micros),
                      rp.fmt_usd(t.cost_per_success_micros)]  # fmt: skip
        body.append(cells)
    footer = ["total", *[""] * (len(by) - 1), _int(total.calls), _int(total.denied), _int(total.downgraded),
              _int(total.errors), _int(total.abandoned), _int(total.input_tokens), _int(total.output_tokens),
              rp.fmt_usd(total.cost_micros), rp.fmt_usd(total.saved_micros)]  # fmt: skip
    if with_runs:
        footer += [_int(total.runs), _int(total.failed_runs), rp.fmt_usd(total.cost_per_run_micros),
                   rp.fmt_usd(total.cost_per_success_micros)]  # fmt: skip
    span = (
        f"{rp.utc_iso(since, ctx.tz) if since is not None else 'the beginning'} to "
        f"{rp.utc_iso(until, ctx.tz) if until is not None else 'now'}"
    )
    caption = "saved = what downgraded calls' real usage would have cost at the model asked for, minus what it cost"
    if with_runs:
        caption += "; cost/ok run = cost of all finished runs / runs that did not raise"
    if not rows:
        ctx.out.write(f"No calls recorded from {span} in {ledger.url}.\n")
        return 0
    print_table(ctx.out, f"Spend by {', '.join(by)}, {span}", cols, body, footer=footer, caption=caption)
    if grants:
        listed = ", ".join(
            f"{g.scope} +{rp.fmt_usd(g.micros)} "
            + (f"until {rp.utc_iso(g.expires_at, ctx.tz)}" if g.expires_at is not None else "(no expiry)")
            for g in sorted(grants, key=lambda g: g.created_at)
        )
        ctx.out.write(f"Active grants (see `tokenbudget budgets`): {listed}\n")
    return 0


def cmd_budgets(args: argparse.Namespace, ctx: Context) -> int:
    ledger = ctx.open()
    try:
        try:
            accounts = ledger.accounts()
        except NotImplementedError:
            raise LedgerError(f"the ledger at {ledger.url} cannot list its budget accounts") from None
        grants = ledger.grants()
        holds = ledger.active_reservations(now=ctx.now)
    finally:
        ledger.close()
    rows = rp.budget_rows(
        accounts, ctx.settings.all_rules(), grants, holds, now=ctx.now, tz=ctx.tz, include_past=args.all
    )
    if args.format != "table":
        write_records(ctx.out, args.format, [r.record() for r in rows])
        return 0
    if not rows:
        ctx.out.write(f"No budget accounts{' in the current windows' if not args.all else ''} in {ledger.url}.\n")
        return 0
    cols = [("budget", "l"), ("policy", "l"), ("limit", "r"), ("grants", "r"), ("spent", "r"), ("reserved", "r"),
            ("remaining", "r"), ("used", "r"), ("tokens", "r"), ("resets", "l")]  # fmt: skip
    body = []
    for r in rows:
        limit = rp.fmt_usd(r.limit_micros) if r.rule is not None else "? (no rule)"
        if r.rule is not None and r.limit_micros is None:
            limit = "-"
        tokens = _int(r.spent_tokens + r.reserved_tokens)
        if r.effective_limit_tokens is not None:
            tokens += f" / {_int(r.effective_limit_tokens)}"
        grants_cell = rp.fmt_usd(r.granted_micros) if r.granted_micros else "-"
        if r.granted_tokens:
            grants_cell += f" +{_int(r.granted_tokens)} tok"
        body.append([
            rp.account_label(r, ctx.tz), r.policy, limit, grants_cell, rp.fmt_usd(r.spent_micros),
            rp.fmt_usd(r.reserved_micros), rp.fmt_usd(r.remaining_micros), _pct(r.used_fraction), tokens,
            rp.fmt_reset(r.window_end, ctx.now, ctx.tz),
        ])  # fmt: skip
    caption = "used = (spent + reserved) / (limit + active grants); calls are refused when the next one would not fit"
    print_table(ctx.out, f"Budgets at {rp.utc_iso(ctx.now, ctx.tz)}", cols, body, caption=caption)
    return 0


def cmd_top(args: argparse.Namespace, ctx: Context) -> int:
    from ..account import parse_duration

    try:
        window_s = parse_duration(args.window, key="--window")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    start = ctx.now - window_s
    ledger = ctx.open()
    try:
        events = _events(ledger, start - window_s, None)
    finally:
        ledger.close()
    heaviest, growing = rp.top_spenders(events, by=args.by, start=start, window_s=window_s)
    heaviest, growing = heaviest[: args.limit], growing[: args.limit]
    if args.format == "json":
        json.dump(
            {"by": args.by, "window_seconds": window_s, "since": start, "heaviest": [r.record() for r in heaviest],
             "growing": [r.record() for r in growing]}, ctx.out, indent=2,
        )  # fmt: skip
        ctx.out.write("\n")
        return 0
    if args.format == "csv":
        recs = [{"list": "heaviest", **r.record()} for r in heaviest] + [
            {"list": "growing", **r.record()} for r in growing
        ]
        write_records(ctx.out, "csv", recs)
        return 0
    cols = [(args.by, "l"), ("spend", "r"), ("previous", "r"), ("change", "r"), ("x", "r"), ("calls", "r")]

    def cells(r: rp.TopRow) -> list[str]:
        ratio = r.growth_ratio
        change = rp.fmt_usd(r.growth_micros)
        return [r.name, rp.fmt_usd(r.current_micros), rp.fmt_usd(r.previous_micros),
                change if r.growth_micros < 0 else "+" + change, "new" if ratio is None else f"{ratio:.1f}x",
                _int(r.calls)]  # fmt: skip

    if not heaviest and not growing:
        ctx.out.write(f"No spend in the last {args.window} to {rp.utc_iso(ctx.now, ctx.tz)}.\n")
        return 0
    print_table(
        ctx.out, f"Heaviest spenders by {args.by}, last {args.window}", cols, [cells(r) for r in heaviest],
        caption=f"window ends {rp.utc_iso(ctx.now, ctx.tz)}; previous = the {args.window} before it",
    )
    print_table(
        ctx.out, f"Fastest-growing by {args.by}, last {args.window}", cols, [cells(r) for r in growing],
        caption="ranked by the change in dollars; x = spend / previous spend",
    )
    return 0


def _grant_guard(ctx: Context, ledger: Ledger) -> Any:
    from ..guard import Guard

    return Guard(ctx.settings, ledger=ledger, clock=_FixedClock(ctx.now))


class _FixedClock:
    def __init__(self, now: float) -> None:
        self._now = now

    def now(self) -> float:
        return self._now


def _login() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return None


def cmd_grant(args: argparse.Namespace, ctx: Context) -> int:
    from ..account import make_grant

    amount = args.amount_usd
    if not math.isfinite(amount) or amount < 0:
        raise UsageError(f"AMOUNT_USD must be a finite number >= 0, got {args.amount_usd}")
    if args.tokens < 0:
        raise UsageError("--tokens must be >= 0")
    if amount == 0 and args.tokens == 0:
        raise UsageError("a grant of $0 and 0 tokens changes nothing; give AMOUNT_USD and/or --tokens")
    expires: str | None = None if args.expires.strip().lower() in ("never", "none") else args.expires
    if expires is not None:
        try:
            from ..account import parse_duration

            parse_duration(expires, key="--expires")
        except ConfigError as exc:
            raise UsageError(str(exc) + " (or 'never')") from None
    ledger = ctx.open(create=True)
    try:
        guard = _grant_guard(ctx, ledger)
        try:
            g = make_grant(
                guard, args.scope, amount, tokens=args.tokens, expires=expires, reason=args.reason,
                granted_by=args.granted_by or _login(),
            )
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    finally:
        ledger.close()
    if not any(rp.scope_matches(r.scope, g.scope) for r in ctx.settings.all_rules()):
        ctx.err.write(
            f"tokenbudget: warning: no budget in the current config covers scope {g.scope!r}; the grant is recorded "
            "but raises nothing until one does (scopes look like team:search or team:search/user:ann)\n"
        )
    if args.format == "table":
        print_table(ctx.out, "Grant recorded", _GRANT_COLS, [_grant_cells(g, ctx)])
    else:
        write_records(ctx.out, args.format, [_grant_record(g)])
    return 0


_GRANT_COLS = [("id", "l"), ("scope", "l"), ("amount", "r"), ("tokens", "r"), ("granted", "l"), ("expires", "l"),
               ("by", "l"), ("reason", "l")]  # fmt: skip


def _grant_cells(g: Any, ctx: Context) -> list[str]:
    expires = "never" if g.expires_at is None else rp.utc_iso(g.expires_at, ctx.tz)
    if g.expires_at is not None and g.expires_at <= ctx.now:
        expires += " (expired)"
    return [g.id[:12], g.scope, rp.fmt_usd(g.micros), _int(g.tokens), rp.utc_iso(g.created_at, ctx.tz), expires,
            g.granted_by or "-", g.reason]  # fmt: skip


def _grant_record(g: Any) -> dict[str, Any]:
    return {
        "id": g.id, "scope": g.scope, "amount_usd": round(g.micros / 1e6, 6), "micros": g.micros, "tokens": g.tokens,
        "created_at": g.created_at, "expires_at": g.expires_at, "granted_by": g.granted_by, "reason": g.reason,
    }


def cmd_grants(args: argparse.Namespace, ctx: Context) -> int:
    ledger = ctx.open()
    try:
        grants = ledger.grants() if args.all else ledger.grants(now=ctx.now)
    finally:
        ledger.close()
    grants.sort(key=lambda g: g.created_at)
    if args.format != "table":
        write_records(ctx.out, args.format, [_grant_record(g) for g in grants])
        return 0
    if not grants:
        ctx.out.write("No active grants.\n" if not args.all else "No grants.\n")
        return 0
    title = "All grants" if args.all else f"Active grants at {rp.utc_iso(ctx.now, ctx.tz)}"
    print_table(ctx.out, title, _GRANT_COLS, [_grant_cells(g, ctx) for g in grants])
    return 0


def cmd_dashboard(args: argparse.Namespace, ctx: Context) -> int:
    from .dashboard import DashboardData, render

    since = ctx.when(args.since, "--since")
    until = ctx.when(args.until, "--until")
    ledger = ctx.open()
    try:
        data = DashboardData.collect(
            ledger, ctx.settings, now=ctx.now, since=since, until=until, prices=_savings(ctx).prices
        )
    finally:
        ledger.close()
    html = render(data, title=args.title)
    out = Path(args.output)
    try:
        out.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise LedgerError(f"cannot write {out}: {exc.strerror or exc}") from None
    ctx.out.write(f"Wrote {out} ({len(html.encode()):,} bytes; open it in any browser, it needs no network)\n")
    return 0


def cmd_demo(args: argparse.Namespace, ctx: Context) -> int:
    from .demo import run_demo

    return run_demo(directory=args.dir, dashboard=not args.no_dashboard, out=ctx.out, err=ctx.err)


# -- parser ----------------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, *, fmt: bool = True, now: bool = True) -> None:
    # SUPPRESS: options given before the command must not be reset by the subcommand's defaults.
    p.add_argument("--ledger", metavar="URL", default=argparse.SUPPRESS,
                   help="ledger to read (sqlite:///PATH, redis://..., memory://); default: the config's, else the "
                        "per-user SQLite file")  # fmt: skip
    p.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                   help="tokenbudget.toml or pyproject.toml with budgets; default: TOKENBUDGET_CONFIG, else the "
                        "nearest pyproject.toml")  # fmt: skip
    if now:
        p.add_argument("--now", metavar="TIME", default=argparse.SUPPRESS,
                       help="evaluate as of this ISO time (relative --since/--window and current budget windows "
                            "count back from it); default: the current time")  # fmt: skip
    if fmt:
        p.add_argument("--format", choices=_FORMATS, default="table", help="output format (default: table)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbudget",
        description="Budgets for the OpenAI and Anthropic SDKs: reports, budgets and grants from the ledger.",
        epilog="Start with `tokenbudget demo`. Each command has --help. Exit codes: 0 ok, 1 runtime error, 2 usage.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"tokenbudget {__version__}")
    parser.add_argument("--ledger", metavar="URL", default=None, help="ledger URL (also accepted after the command)")
    parser.add_argument("--config", metavar="PATH", default=None, help="config file (also accepted after the command)")
    parser.add_argument("--now", metavar="TIME", default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("report", help="spend and tokens grouped by team, user, model, tag, day, function...",
                       description="Spend, tokens, refusals, downgrades and their savings, grouped as you "
                                   "ask.")  # fmt: skip
    p.add_argument("--by", default="team,model", metavar="KEYS",
                   help="comma list of: team, user, org, model, provider, function, status, decision, operation, "
                        "day, hour, tag:KEY (default: team,model). With function, each row also shows its runs, "
                        "failed runs, cost per run and cost per successful run")  # fmt: skip
    p.add_argument("--since", metavar="WHEN", help="start: 7d, 24h, 90m (back from now) or an ISO date/time")
    p.add_argument("--until", metavar="WHEN", help="end (exclusive), same forms; default: now and later")
    _common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("budgets", help="every budget account: limit, grants, spent, reserved, remaining, reset",
                       description="Every budget account in the ledger with the limit of the config rule "
                                   "behind it.")  # fmt: skip
    p.add_argument("--all", action="store_true", help="include windows that have already ended (yesterday, ...)")
    _common(p)
    p.set_defaults(func=cmd_budgets)

    p = sub.add_parser("top", help="heaviest and fastest-growing spenders",
                       description="Heaviest spenders in a window, and those whose spend grew most against the "
                                   "window before it.")  # fmt: skip
    p.add_argument("--window", default="24h", help="window length: 1h, 24h, 7d... (default: 24h)")
    p.add_argument("--limit", type=int, default=10, help="rows per list (default: 10)")
    p.add_argument("--by", choices=("user", "team"), default="user", help="rank users or teams (default: user)")
    _common(p)
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("grant", help="top up a budget scope for a while",
                       description="Raise every budget of SCOPE (e.g. team:search or team:search/user:ann) by "
                                   "AMOUNT_USD until the grant expires. Every process sees it at once.")  # fmt: skip
    p.add_argument("scope", metavar="SCOPE", help="resolved scope, e.g. team:search, team:search/user:ann, org")
    p.add_argument("amount_usd", metavar="AMOUNT_USD", type=float, help="dollars to add (0 with --tokens)")
    p.add_argument("--expires", default="7d", help="duration until it lapses (12h, 7d, 2w) or 'never' (default: 7d)")
    p.add_argument("--reason", required=True, help="why (kept with the grant for whoever audits it)")
    p.add_argument("--tokens", type=int, default=0, help="tokens to add to token-limited budgets (default: 0)")
    p.add_argument("--granted-by", metavar="NAME", help="who grants it (default: your login name)")
    _common(p)
    p.set_defaults(func=cmd_grant)

    p = sub.add_parser("grants", help="list grants", description="Grants recorded in the ledger.")
    p.add_argument("--all", action="store_true", help="include expired grants")
    _common(p)
    p.set_defaults(func=cmd_grants)

    p = sub.add_parser("dashboard", help="write a self-contained HTML dashboard",
                       description="One offline HTML file: spend over time per team by model, top users, budget "
                                   "burn-down, downgrade savings, and the tables behind them.")  # fmt: skip
    p.add_argument("-o", "--output", default="tokenbudget-dashboard.html", metavar="FILE",
                   help="where to write it (default: tokenbudget-dashboard.html)")  # fmt: skip
    p.add_argument("--since", default="30d", metavar="WHEN", help="start of the period shown (default: 30d)")
    p.add_argument("--until", metavar="WHEN", help="end of the period shown (default: now and later)")
    p.add_argument("--title", default="tokenbudget dashboard", help="page title")
    _common(p, fmt=False)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("demo", help="simulate a small company offline and show what tokenbudget does",
                       description="Runs a simulated day of a small company through the real openai and anthropic "
                                   "SDKs against a local stand-in server, then prints the reports and writes the "
                                   "dashboard. Needs `pip install 'tokenbudget[demo]'`.")  # fmt: skip
    p.add_argument("--dir", metavar="DIR",
                   help="where to put the ledger, config and dashboard (default: a new temp dir)")  # fmt: skip
    p.add_argument("--no-dashboard", action="store_true", help="skip writing the HTML dashboard")
    p.set_defaults(func=cmd_demo)
    return parser


def _context(args: argparse.Namespace, out: IO[str], err: IO[str]) -> Context:
    settings = load_settings(args.config) if args.config else load_settings()
    url = args.ledger if args.ledger else settings.ledger
    now = time.time()
    if args.now:
        try:
            now = rp.parse_when(args.now, now=now, tz=settings.timezone, key="--now")
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    return Context(settings, url, now, out, err)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokenbudget`` console script; returns the exit code instead of raising it."""
    out, err = sys.stdout, sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    func: Callable[[argparse.Namespace, Context], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(err)
        return 2
    try:
        ctx = _context(args, out, err)
        return func(args, ctx)
    except (UsageError, ConfigError) as exc:
        err.write(f"tokenbudget {args.command}: error: {exc}\n")
        return 2
    except BrokenPipeError:  # `tokenbudget report | head`: the reader has all it wanted
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        except OSError:
            pass
        return 0
    except (TokenBudgetError, OSError) as exc:
        err.write(f"tokenbudget {args.command}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        err.write("tokenbudget: interrupted\n")
        return 130
