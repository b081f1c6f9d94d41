"""One self-contained HTML file: charts drawn here as inline SVG, styles inline, no script, nothing fetched.

It is meant to be mailed, attached to a ticket or opened from a laptop on a plane, so it must not reach out: a
Content-Security-Policy of ``default-src 'none'`` makes the browser refuse any fetch even if one slipped in. Every
string that came from a ledger or a config (team, user, model, scope, grant reason) is user input and goes through
:func:`esc` on its way out; nothing is inserted raw.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from ..config import Settings
from ..events import CallEvent
from ..ledger.base import Grant, Ledger
from ..policy import window
from ..pricing import PriceBook
from . import report as rp

__all__ = ["DashboardData", "esc", "render"]

PALETTE = (
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
    "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#17becf",
)  # fmt: skip
MAX_TEAMS = 12
MAX_BURNDOWNS = 12
MAX_USERS = 15


def esc(value: object) -> str:
    """Text and attribute values alike: quotes are escaped too, so a name can never close an attribute."""
    return html.escape(str(value), quote=True)


@dataclass
class DashboardData:
    """Everything the page shows, gathered once; :func:`render` only draws it (so tests can feed it directly)."""

    now: float
    since: float | None
    until: float | None
    tz: str
    ledger_url: str
    events: list[CallEvent]
    budgets: list[rp.BudgetRow]
    grants: list[Grant]
    burn_events: list[CallEvent] = field(default_factory=list)
    """Events from the start of the oldest current budget window, for burn-down lines."""
    spent_outside: dict[str, int] = field(default_factory=dict)
    """Per account, spend the ledger holds that ``burn_events`` do not cover (earlier than them)."""
    savings: rp.Savings = field(default_factory=rp.Savings)

    @classmethod
    def collect(
        cls,
        ledger: Ledger,
        settings: Settings,
        *,
        now: float,
        since: float | None,
        until: float | None,
        prices: PriceBook | None = None,
    ) -> DashboardData:
        tz = settings.timezone
        try:
            accounts = ledger.accounts()
        except NotImplementedError:
            accounts = []
        budgets = rp.budget_rows(
            accounts, settings.all_rules(), ledger.grants(), ledger.active_reservations(now=now), now=now, tz=tz
        )
        starts = [b.window_start for b in budgets if b.window_start is not None]
        lo_candidates = [x for x in (since, *starts) if x is not None]
        lo = min(lo_candidates) if lo_candidates else None
        if any(b.period == "total" for b in budgets):
            lo = since  # totals burn over the period shown, starting from what was left at its start
        wide = list(ledger.events(lo, until))
        events = [e for e in wide if since is None or e.time >= since]
        charged: dict[str, int] = defaultdict(int)
        for e in wide:
            for k in e.budget_keys:
                charged[k] += e.cost_micros
        outside = {b.key: b.spent_micros - charged.get(b.key, 0) for b in budgets}
        return cls(
            now=now, since=since, until=until, tz=tz, ledger_url=ledger.url, events=events, budgets=budgets,
            grants=ledger.grants(now=now), burn_events=wide, spent_outside=outside,
            savings=rp.Savings(prices) if prices is not None else rp.Savings(),
        )


# -- svg primitives --------------------------------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".") if math.isfinite(x) else "0"


def _nice_max(value: float) -> float:
    """A round axis top (1, 2, 2.5, 5 x 10^n) above ``value``, so gridlines read as plain amounts."""
    if value <= 0:
        return 1.0
    exp = math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        top = m * 10.0**exp
        if top >= value:
            return top
    return 10.0 ** (exp + 1)  # pragma: no cover


def _usd_label(usd: float) -> str:
    if usd == 0:
        return "$0"
    if abs(usd) >= 100:
        return f"${usd:,.0f}"
    if abs(usd) >= 1:
        return f"${usd:,.2f}".rstrip("0").rstrip(".")
    return f"${usd:.4f}".rstrip("0").rstrip(".")


def _color_map(names: Iterable[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(set(names)))}


def _legend(colors: Mapping[str, str], kind: str) -> str:
    items = "".join(
        f'<li class="legend-item" data-{kind}="{esc(n)}"><span class="swatch" style="background:{c}"></span>'
        f"{esc(n)}</li>"
        for n, c in colors.items()
    )
    return f'<ul class="legend" data-legend="{esc(kind)}">{items}</ul>'


def _bucket_label(ts: float, bucket: str, tz: str) -> str:
    t = datetime.fromtimestamp(ts, ZoneInfo(tz))
    return t.strftime("%m-%d %H:00") if bucket == "hour" else t.strftime("%Y-%m-%d")


def stacked_bars(
    per_bucket: Mapping[float, Mapping[str, int]],
    buckets: Sequence[float],
    colors: Mapping[str, str],
    *,
    bucket: str,
    tz: str,
    label: str,
    y_max_micros: int | None = None,
) -> str:
    """One bar per time bucket, one ``rect.bar`` per (bucket, model) with spend, stacked in legend order."""
    w, h, left, bottom, top = 640, 220, 64, 28, 10
    plot_w, plot_h = w - left - 10, h - bottom - top
    highest = max((sum(v.values()) for v in per_bucket.values()), default=0)
    y_top = _nice_max((y_max_micros if y_max_micros is not None else highest) / 1e6)
    n = max(len(buckets), 1)
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.8)
    parts = [
        f'<svg class="chart stacked" role="img" aria-label="{esc(label)}" viewBox="0 0 {w} {h}" width="{w}" '
        f'height="{h}" data-series="{esc(label)}">'
    ]
    for i in range(5):
        v = y_top * i / 4
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<line class="grid" x1="{left}" x2="{w - 10}" y1="{_num(y)}" y2="{_num(y)}"/>')
        parts.append(
            f'<text class="ylab" x="{left - 6}" y="{_num(y + 4)}" text-anchor="end">{esc(_usd_label(v))}</text>'
        )
    step = max(1, math.ceil(n / 8))
    for i, b in enumerate(buckets):
        x = left + i * slot + (slot - bar_w) / 2
        y = top + plot_h
        for name in colors:
            micros = per_bucket.get(b, {}).get(name, 0)
            if micros <= 0:
                continue
            bh = plot_h * (micros / 1e6) / y_top
            y -= bh
            tip = f"{label} | {name} | {_bucket_label(b, bucket, tz)}: {rp.fmt_usd(micros)}"
            parts.append(
                f'<rect class="bar" data-model="{esc(name)}" x="{_num(x)}" y="{_num(y)}" width="{_num(bar_w)}" '
                f'height="{_num(max(bh, 0.5))}" fill="{colors[name]}"><title>{esc(tip)}</title></rect>'
            )
        if i % step == 0:
            parts.append(
                f'<text class="xlab" x="{_num(x + bar_w / 2)}" y="{h - 10}" text-anchor="middle">'
                f"{esc(_bucket_label(b, bucket, tz))}</text>"
            )
    parts.append(f'<line class="axis" x1="{left}" x2="{w - 10}" y1="{top + plot_h}" y2="{top + plot_h}"/>')
    parts.append("</svg>")
    return "".join(parts)


def horizontal_bars(items: Sequence[tuple[str, int]], *, label: str, css: str, color: str = PALETTE[0]) -> str:
    """Ranked amounts as ``rect.hbar`` rows, names on the left: long names stay readable."""
    row_h, left, w = 24, 180, 640
    h = max(row_h * len(items) + 10, 40)
    top_v = max((v for _, v in items), default=0)
    scale = (w - left - 110) / top_v if top_v > 0 else 0.0
    parts = [f'<svg class="chart {css}" role="img" aria-label="{esc(label)}" viewBox="0 0 {w} {h}" width="{w}" '
             f'height="{h}">']  # fmt: skip
    for i, (name, micros) in enumerate(items):
        y = 5 + i * row_h
        bw = max(micros * scale, 1.0)
        shown = name if len(name) <= 26 else name[:25] + "\u2026"
        parts.append(f'<text class="name" x="{left - 8}" y="{y + 16}" text-anchor="end">{esc(shown)}</text>')
        parts.append(
            f'<rect class="hbar" data-name="{esc(name)}" x="{left}" y="{y + 3}" width="{_num(bw)}" '
            f'height="{row_h - 6}" fill="{color}"><title>{esc(name)}: {esc(rp.fmt_usd(micros))}</title></rect>'
        )
        parts.append(f'<text class="val" x="{_num(left + bw + 6)}" y="{y + 16}">{esc(rp.fmt_usd(micros))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def burndown_chart(
    row: rp.BudgetRow, points: Sequence[tuple[float, int]], *, start: float, end: float, now: float, tz: str
) -> str:
    """Remaining money across the budget window: a ``path.burn`` falling from the (grant-raised) limit to zero."""
    w, h, left, bottom, top = 360, 150, 56, 22, 10
    plot_w, plot_h = w - left - 8, h - bottom - top
    limit = row.effective_limit_micros or 0
    lo_v = min(0, *(p[1] for p in points)) if points else 0
    hi_v = max(limit, *(p[1] for p in points)) if points else limit
    span_v = (hi_v - lo_v) or 1
    span_t = (end - start) or 1.0

    def xy(t: float, v: int) -> tuple[float, float]:
        x = left + plot_w * min(max((t - start) / span_t, 0.0), 1.0)
        y = top + plot_h * (hi_v - v) / span_v
        return x, y

    d: list[str] = []
    last_v: int | None = None
    for t, v in points:
        x, y = xy(t, v)
        if last_v is None:
            d.append(f"M{_num(x)},{_num(y)}")
        else:
            d.append(f"H{_num(x)}V{_num(y)}")  # spend is a step: flat until the next charge
        last_v = v
    if last_v is not None:
        x_end, _ = xy(min(now, end), last_v)
        d.append(f"H{_num(x_end)}")
    zx0, zy = xy(start, 0)
    zx1, _ = xy(end, 0)
    lx0, ly = xy(start, limit)
    label = f"{row.key}: {rp.fmt_usd(row.remaining_micros)} left of {rp.fmt_usd(limit)}"
    out = [
        f'<svg class="chart burndown" role="img" aria-label="{esc(label)}" viewBox="0 0 {w} {h}" width="{w}" '
        f'height="{h}" data-account="{esc(row.key)}">',
        f'<line class="limit" x1="{_num(lx0)}" x2="{_num(zx1)}" y1="{_num(ly)}" y2="{_num(ly)}"/>',
        f'<text class="ylab" x="{left - 4}" y="{_num(ly + 4)}" text-anchor="end">{esc(_usd_label(limit / 1e6))}</text>',
        f'<line class="zero" x1="{_num(zx0)}" x2="{_num(zx1)}" y1="{_num(zy)}" y2="{_num(zy)}"/>',
        f'<text class="ylab" x="{left - 4}" y="{_num(zy + 4)}" text-anchor="end">$0</text>',
    ]
    if d:
        out.append(f'<path class="burn" d="{"".join(d)}"><title>{esc(label)}</title></path>')
    fmt = "%m-%d %H:%M" if end - start <= 2 * 86_400 else "%Y-%m-%d"
    first = datetime.fromtimestamp(start, ZoneInfo(tz)).strftime(fmt)
    last = datetime.fromtimestamp(end, ZoneInfo(tz)).strftime(fmt)
    out.append(
        f'<text class="xlab" x="{left}" y="{h - 6}">{esc(first)}</text>'
        f'<text class="xlab" x="{w - 8}" y="{h - 6}" text-anchor="end">{esc(last)}</text>'
    )
    out.append("</svg>")
    return "".join(out)


# -- tables ----------------------------------------------------------------------------------------------------------
def _table(cls: str, header: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
    def cell(tag: str, i: int, value: str) -> str:
        align = ' class="n"' if i >= numeric_from else ""
        return f"<{tag}{align}>{esc(value)}</{tag}>"

    head = "".join(cell("th", i, c) for i, c in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# -- page ------------------------------------------------------------------------------------------------------------
_CSS = """
:root{--fg:#1d2433;--muted:#667085;--line:#e4e7ec;--bg:#f7f8fa;--card:#fff}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",
Arial,sans-serif;color:var(--fg);background:var(--bg)}
header{padding:20px 28px;background:#1d2433;color:#fff}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#c9d1e0}main{padding:20px 28px;max-width:1400px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin:0 0 18px}
h2{font-size:17px;margin:0 0 4px}p.note{margin:0 0 12px;color:var(--muted)}
.kpis{display:flex;flex-wrap:wrap;gap:12px;margin:0 0 18px}.kpi{background:var(--card);border:1px solid var(--line);
border-radius:8px;padding:12px 16px;min-width:150px}.kpi b{display:block;font-size:22px}.kpi span{color:var(--muted)}
.grid{stroke:#eef0f3}.axis{stroke:#98a2b3}.ylab,.xlab,.val,.name{font-size:11px;fill:#475467}
.limit{stroke:#98a2b3;stroke-dasharray:4 3}.zero{stroke:#d92d20;stroke-dasharray:2 3}
.burn{fill:none;stroke:#4e79a7;stroke-width:2}
.charts{display:flex;flex-wrap:wrap;gap:18px}.charts figure{margin:0}.charts figcaption{font-weight:600;margin:0 0 4px}
.legend{list-style:none;margin:6px 0 10px;padding:0;display:flex;flex-wrap:wrap;gap:6px 14px}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
table{border-collapse:collapse;width:100%;margin:8px 0 4px;font-size:13px}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
th{color:var(--muted);font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
details{margin-top:8px;overflow-x:auto}summary{cursor:pointer;color:var(--muted)}.empty{color:var(--muted);font-style:italic}
"""


def _kpis(totals: rp.Totals) -> str:
    cards = [
        ("spend", rp.fmt_usd(totals.cost_micros)),
        ("calls", f"{totals.calls:,}"),
        ("refused (denied)", f"{totals.denied:,}"),
        ("downgraded", f"{totals.downgraded:,}"),
        ("saved by downgrades", rp.fmt_usd(totals.saved_micros)),
        ("errors / abandoned", f"{totals.errors:,} / {totals.abandoned:,}"),
    ]
    inner = "".join(
        f'<div class="kpi" data-kpi="{esc(k)}"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for k, v in cards
    )
    return f'<div class="kpis">{inner}</div>'


def _sum(rows: Iterable[rp.ReportRow]) -> rp.Totals:
    total = rp.Totals()
    for r in rows:
        t = r.totals
        for name in ("calls", "denied", "downgraded", "errors", "abandoned", "cost_micros", "saved_micros",
                     "input_tokens", "output_tokens"):  # fmt: skip
            setattr(total, name, getattr(total, name) + getattr(t, name))
    return total


def _spend_section(data: DashboardData) -> str:
    calls = [e for e in data.events if e.operation != rp.RUN_OPERATION]
    end = data.until if data.until is not None else max([data.now, *(e.time for e in calls)])
    first = min((e.time for e in calls), default=None)
    bucket = rp.span_bucket(data.since, end, first)
    series = rp.spend_series(
        calls, bucket=bucket, series=lambda e: rp.group_key(e, "team"), stack=lambda e: e.model, tz=data.tz
    )
    intro = (
        '<h2>Spend over time per team, stacked by model</h2><p class="note">One bar per '
        f"{'hour' if bucket == 'hour' else 'day'} ({esc(data.tz)}); hover a segment for its amount. Teams share one "
        "scale so their bars compare directly.</p>"
    )
    if not series:
        return f'<section id="spend">{intro}<p class="empty">No spend in this period.</p></section>'
    models = {m for per in series.values() for b in per.values() for m in b}
    colors = _color_map(models)
    lo = min(b for per in series.values() for b in per)
    hi = max(b for per in series.values() for b in per)
    buckets: list[float] = []
    t = lo
    while t <= hi and len(buckets) < 2000:
        buckets.append(t)
        t = window(bucket, data.tz, t)[1]  # the window's own end: days of 23 or 25 hours stay one bar
    team_totals = sorted(((sum(sum(b.values()) for b in per.values()), team) for team, per in series.items()),
                         reverse=True)  # fmt: skip
    shown = team_totals[:MAX_TEAMS]
    y_max = max(sum(v.values()) for team in (t for _, t in shown) for v in series[team].values())
    figs = []
    for total, team in shown:
        chart = stacked_bars(series[team], buckets, colors, bucket=bucket, tz=data.tz, label=team, y_max_micros=y_max)
        figs.append(
            f'<figure data-team="{esc(team)}"><figcaption>{esc(team)} \u2014 {esc(rp.fmt_usd(total))}</figcaption>'
            f"{chart}</figure>"
        )
    more = ""
    if len(team_totals) > MAX_TEAMS:
        more = f'<p class="note">{len(team_totals) - MAX_TEAMS} smaller teams are in the table below.</p>'
    rows = rp.group_events(calls, ("team", "model"), tz=data.tz, savings=data.savings)
    table = _table(
        "t-team-model", ["team", "model", "calls", "denied", "downgraded", "input tok", "output tok", "cost", "saved"],
        ([*r.group, f"{r.totals.calls:,}", f"{r.totals.denied:,}", f"{r.totals.downgraded:,}",
          f"{r.totals.input_tokens:,}", f"{r.totals.output_tokens:,}", rp.fmt_usd(r.totals.cost_micros),
          rp.fmt_usd(r.totals.saved_micros)] for r in rows),
        numeric_from=2,
    )  # fmt: skip
    return (
        f'<section id="spend">{intro}{_legend(colors, "model")}<div class="charts">{"".join(figs)}</div>{more}'
        f"<details open><summary>Spend by team and model</summary>{table}</details></section>"
    )


def _users_section(data: DashboardData) -> str:
    rows = rp.group_events(data.events, ("user", "team"), tz=data.tz, savings=data.savings)
    per_user: dict[str, int] = defaultdict(int)
    for r in rows:
        per_user[r.group[0]] += r.totals.cost_micros
    ranked = sorted(((u, m) for u, m in per_user.items() if m > 0), key=lambda x: (-x[1], x[0]))[:MAX_USERS]
    intro = '<h2>Top users</h2><p class="note">Spend per user over the period.</p>'
    chart = (
        horizontal_bars(ranked, label="top users", css="top-users")
        if ranked else '<p class="empty">No spend in this period.</p>'
    )  # fmt: skip
    table = _table(
        "t-users", ["user", "team", "calls", "denied", "downgraded", "cost"],
        ([*r.group, f"{r.totals.calls:,}", f"{r.totals.denied:,}", f"{r.totals.downgraded:,}",
          rp.fmt_usd(r.totals.cost_micros)] for r in rows),
        numeric_from=2,
    )  # fmt: skip
    return f'<section id="users">{intro}{chart}<details><summary>Every user</summary>{table}</details></section>'


def _budgets_section(data: DashboardData) -> str:
    intro = (
        '<h2>Budget burn-down</h2><p class="note">Money left in each budget window (limit plus active grants) after '
        "every charge; the dashed red line is zero, where calls are refused, downgraded or clamped.</p>"
    )
    limited = [b for b in data.budgets if b.effective_limit_micros is not None]
    limited.sort(key=lambda b: (-(b.used_fraction or 0.0), b.key))
    figs = []
    for b in limited[:MAX_BURNDOWNS]:
        limit = b.effective_limit_micros or 0
        if b.period == "total" or b.window_start is None or b.window_end is None:
            start = data.since if data.since is not None else min((e.time for e in data.burn_events), default=data.now)
            end = max(data.now, max((e.time for e in data.burn_events), default=data.now))
        else:
            start, end = b.window_start, b.window_end
        begin = limit - data.spent_outside.get(b.key, 0)
        points = rp.burndown(data.burn_events, b.key, begin, start)
        chart = burndown_chart(b, points, start=start, end=end, now=data.now, tz=data.tz)
        cap = f"{rp.account_label(b, data.tz)} \u2014 {rp.fmt_usd(b.remaining_micros)} left ({b.policy})"
        figs.append(f'<figure data-account="{esc(b.key)}"><figcaption>{esc(cap)}</figcaption>{chart}</figure>')
    body = (
        f'<div class="charts">{"".join(figs)}</div>' if figs else '<p class="empty">No budget with a dollar limit.</p>'
    )
    table = _table(
        "t-budgets", ["budget", "policy", "limit", "grants", "spent", "reserved", "remaining", "used", "resets"],
        ([rp.account_label(b, data.tz), b.policy, rp.fmt_usd(b.limit_micros), rp.fmt_usd(b.granted_micros),
          rp.fmt_usd(b.spent_micros),
          rp.fmt_usd(b.reserved_micros), rp.fmt_usd(b.remaining_micros),
          "-" if b.used_fraction is None else f"{b.used_fraction * 100:.1f}%",
          rp.fmt_reset(b.window_end, data.now, data.tz)]
         for b in data.budgets),
        numeric_from=2,
    )  # fmt: skip
    grants = ""
    if data.grants:
        grants = "<h3>Active grants</h3>" + _table(
            "t-grants", ["scope", "amount", "tokens", "expires", "by", "reason"],
            ([g.scope, rp.fmt_usd(g.micros), f"{g.tokens:,}",
              "never" if g.expires_at is None else rp.utc_iso(g.expires_at, data.tz), g.granted_by or "-", g.reason]
             for g in data.grants),
            numeric_from=1,
        )  # fmt: skip
    return (
        f'<section id="budgets">{intro}{body}<details open><summary>Every budget</summary>{table}{grants}</details>'
        "</section>"
    )


def _savings_section(data: DashboardData) -> str:
    intro = (
        '<h2>Downgrade savings</h2><p class="note">What downgraded calls would have cost at the model that was asked '
        "for (their real tokens at its price), minus what they cost.</p>"
    )
    calls = [e for e in data.events if e.operation != rp.RUN_OPERATION and e.decision == "downgrade"]
    by_team = rp.group_events(calls, ("team",), tz=data.tz, savings=data.savings)
    items = [(r.group[0], r.totals.saved_micros) for r in by_team if r.totals.saved_micros > 0]
    chart = (
        horizontal_bars(items, label="downgrade savings by team", css="savings", color=PALETTE[2])
        if items else '<p class="empty">No downgraded calls in this period.</p>'
    )  # fmt: skip
    pairs: dict[tuple[str, str], rp.Totals] = {}
    for e in calls:
        t = pairs.setdefault((e.original_model or "?", e.model), rp.Totals())
        t.add_call(e, data.savings.saved_micros(e))
    table = _table(
        "t-savings", ["asked for", "ran on", "calls", "cost", "saved"],
        ([a, b, f"{t.calls:,}", rp.fmt_usd(t.cost_micros), rp.fmt_usd(t.saved_micros)]
         for (a, b), t in sorted(pairs.items(), key=lambda kv: -kv[1].saved_micros)),
        numeric_from=2,
    )  # fmt: skip
    return (
        f'<section id="savings">{intro}{chart}<details open><summary>By model pair</summary>{table}</details>'
        "</section>"
    )


def _functions_section(data: DashboardData) -> str:
    rows = rp.group_events(data.events, ("function",), tz=data.tz, savings=data.savings)
    rows = [r for r in rows if r.group[0] != rp.NONE]
    if not rows:
        return ""
    table = _table(
        "t-functions", ["function", "runs", "failed", "calls", "denied", "cost", "cost/run", "cost/ok run"],
        ([r.group[0], f"{r.totals.runs:,}", f"{r.totals.failed_runs:,}", f"{r.totals.calls:,}",
          f"{r.totals.denied:,}", rp.fmt_usd(r.totals.cost_micros), rp.fmt_usd(r.totals.cost_per_run_micros),
          rp.fmt_usd(r.totals.cost_per_success_micros)] for r in rows),
    )  # fmt: skip
    return (
        '<section id="functions"><h2>Budgeted functions</h2><p class="note">Runs of each '
        "<code>@tokenbudget.budget</code> function; cost/ok run divides all finished runs' spend by the runs that did "
        f"not raise, which is what one success really costs.</p>{table}</section>"
    )


def render(data: DashboardData, *, title: str = "tokenbudget dashboard") -> str:
    """The whole page as one string; every interpolated value is escaped."""
    totals = _sum(rp.group_events(data.events, ("team",), tz=data.tz, savings=data.savings))
    period = (
        f"{rp.utc_iso(data.since, data.tz) if data.since is not None else 'the beginning'} to "
        f"{rp.utc_iso(data.until, data.tz) if data.until is not None else 'now'}"
    )
    sub = f"{period} \u00b7 generated {rp.utc_iso(data.now, data.tz)} \u00b7 ledger {data.ledger_url}"
    csp = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{csp}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>{esc(sub)}</p></header><main>"
        f"{_kpis(totals)}{_spend_section(data)}{_users_section(data)}{_budgets_section(data)}"
        f"{_savings_section(data)}{_functions_section(data)}"
        "</main></body></html>\n"
    )
