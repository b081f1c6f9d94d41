"""The HTML dashboard: one offline file, every user-supplied name escaped, and charts that a real browser draws.

The Chromium test renders the page headless and asserts on what it drew: the DOM after parsing (bars per team
chart, legend entries, burn-down paths, no injected elements) and the screenshot's pixels (the bar colours are on
screen, the page is not blank).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections import Counter, defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tokenbudget.cli import main
from tokenbudget.cli import report as rp
from tokenbudget.cli.dashboard import PALETTE, DashboardData, render
from tokenbudget.config import BudgetRule, Settings
from tokenbudget.events import CallEvent
from tokenbudget.ledger import MemoryLedger
from tokenbudget.ledger.base import Allowance, Grant, Reservation
from tokenbudget.money import usd_to_micros
from tokenbudget.policy import Policy
from tokenbudget.principal import Principal

T0 = 1_767_254_400.0  # 2026-01-01T08:00:00Z
EVIL_TEAM = "<script>alert('team')</script>"
EVIL_USER = '"><img src=x onerror=alert(1)>'
EVIL_MODEL = "gpt-4o-mini</title><script>alert(3)</script>"
TEAMS = ("search", "research", EVIL_TEAM)
MODELS = ("gpt-4o", EVIL_MODEL)

RULES = (
    BudgetRule(scope="org", limit_usd=50, period="month"),
    BudgetRule(scope="team:*", limit_usd=2.0, period="day", on_exhaust="downgrade"),
)
SETTINGS = Settings(budgets=RULES, prices={EVIL_MODEL: {"input": 0.15, "output": 0.6}})


def _fill(ledger: MemoryLedger) -> list[CallEvent]:
    """Charges made the way the guard makes them: reserve against each rule's allowance, then settle with the event.

    Team i calls model j in hour h when (i + j + h) is not divisible by 3, so each chart has a known number of bars.
    One research call is a downgrade (gpt-4o asked, gpt-4o-mini ran) and one is denied.
    """
    policy = Policy(RULES)
    events: list[CallEvent] = []
    n = 0
    for h in range(5):
        for i, team in enumerate(TEAMS):
            for j, model in enumerate(MODELS):
                if (i + j + h) % 3 == 0:
                    continue
                n += 1
                t = T0 + h * 3600 + i * 60 + j
                user = EVIL_USER if team == EVIL_TEAM else f"{team}-user{h % 2}"
                principal = Principal(org="acme", team=team, user=user)
                allowances = [m.allowance for m in policy.matches(principal, model, t)]
                downgraded = team == "research" and h == 2 and j == 1
                cost = 450 if downgraded else (i + 1) * 10_000 + j * 1000 + h  # 450: 1000 in, 500 out at gpt-4o-mini
                res = ledger.reserve(allowances, cost * 2, 2000, lease_seconds=60, now=t)
                assert isinstance(res, Reservation)
                ev = CallEvent(
                    id=f"e{n}", time=t, provider="openai", model=model, org="acme", team=team, user=user,
                    input_tokens=1000, output_tokens=500, cost_micros=cost,
                    budget_keys=tuple(a.key for a in allowances),
                    decision="downgrade" if downgraded else "allow", original_model="gpt-4o" if downgraded else None,
                    estimated_micros=cost * 2, original_estimated_micros=cost * 20 if downgraded else 0,
                )  # fmt: skip
                ledger.settle(res, cost, 1500, ev, now=t)
                events.append(ev)
    denied = CallEvent(id="d1", time=T0 + 3 * 3600, provider="openai", model="gpt-4o", team="research", user="r",
                       status="denied", decision="deny", budget_keys=("team:research",))  # fmt: skip
    ledger.record(denied)
    events.append(denied)
    ledger.grant(Grant("g1", "team:search", usd_to_micros(1.5), 0, T0, T0 + 86_400, reason="<b>launch</b>"))
    return events


def expected_bars(events: list[CallEvent]) -> dict[str, int]:
    cells: dict[str, set[tuple[float, str]]] = defaultdict(set)
    for e in events:
        if e.cost_micros > 0 and e.team is not None:
            cells[e.team].add((e.time - e.time % 3600, e.model))
    return {team: len(c) for team, c in cells.items()}


@pytest.fixture
def page() -> tuple[str, list[CallEvent]]:
    ledger = MemoryLedger()
    events = _fill(ledger)
    data = DashboardData.collect(ledger, SETTINGS, now=T0 + 6 * 3600, since=T0 - 3600, until=None)
    return render(data, title="acme <dashboard>"), events


class Doc(HTMLParser):
    """Elements with their attributes and the figure (chart) each sits in: what a browser would build."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None], str | None]] = []
        self.text: list[str] = []
        self.figure: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "figure":
            self.figure = a.get("data-team") or a.get("data-account")
        self.elements.append((tag, a, self.figure))

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self.figure = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def having(self, tag: str, cls: str) -> list[tuple[str, dict[str, str | None], str | None]]:
        return [e for e in self.elements if e[0] == tag and cls in (e[1].get("class") or "").split()]


def parse(html: str) -> Doc:
    doc = Doc()
    doc.feed(html)
    doc.close()
    return doc


_ALLOWED_ATTRS = {
    "class", "id", "lang", "charset", "http-equiv", "content", "name", "style", "role", "aria-label", "viewbox",
    "width", "height", "x", "y", "x1", "x2", "y1", "y2", "d", "fill", "text-anchor", "open", "data-team",
    "data-model", "data-series", "data-name", "data-account", "data-kpi", "data-legend",
}  # fmt: skip


def test_page_is_self_contained_and_escapes_every_name(page: tuple[str, list[CallEvent]]) -> None:
    html, _ = page
    low = html.lower()
    assert "<script" not in low and "<img" not in low and "javascript:" not in low
    assert "http://" not in low and "https://" not in low and "url(" not in low and "@import" not in low
    assert "default-src 'none'" in html  # the browser refuses any fetch, even one that slipped in
    doc = parse(html)
    assert {t for t, _, _ in doc.elements} <= {
        "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "p", "main", "section", "div",
        "b", "span", "ul", "li", "figure", "figcaption", "svg", "line", "text", "rect", "path", "details", "summary",
        "table", "thead", "tbody", "tr", "th", "td", "code",
    }  # fmt: skip
    assert {k for _, attrs, _ in doc.elements for k in attrs} <= _ALLOWED_ATTRS  # no src, href, on*
    text = "".join(doc.text)
    for name in (EVIL_TEAM, EVIL_USER, EVIL_MODEL, "<b>launch</b>", "acme <dashboard>"):
        assert name in text  # shown as the text it is
    assert html.count("<title>") == 1 + html.count("</title></rect>") + html.count("</title></path>")


def test_spend_chart_has_one_bar_per_hour_and_model_per_team(page: tuple[str, list[CallEvent]]) -> None:
    html, events = page
    doc = parse(html)
    bars = Counter(fig for _, _, fig in doc.having("rect", "bar"))
    assert dict(bars) == expected_bars(events)
    assert set(bars) == set(TEAMS)
    legend = {a.get("data-model") for _, a, _ in doc.having("li", "legend-item")}
    assert legend == set(MODELS)
    # Every bar is coloured as its model's legend entry.
    colours = {a.get("data-model"): a.get("fill") for _, a, _ in doc.having("rect", "bar")}
    assert set(colours.values()) <= set(PALETTE) and len(set(colours.values())) == len(MODELS)


def test_top_users_burn_down_savings_and_tables(page: tuple[str, list[CallEvent]]) -> None:
    html, events = page
    doc = parse(html)
    users = [a.get("data-name") for _, a, _ in doc.having("rect", "hbar") if "top-users" in _svg_classes(doc, a)]
    spend: dict[str, int] = defaultdict(int)
    for e in events:
        spend[e.user or rp.NONE] += e.cost_micros
    ranked = [u for u, m in sorted(spend.items(), key=lambda x: (-x[1], x[0])) if m > 0]
    assert users == ranked
    burns = doc.having("path", "burn")
    accounts = [a.get("data-account") for t, a, _ in doc.elements if t == "svg" and a.get("data-account")]
    assert len(burns) == len(accounts) == 1 + len(TEAMS)  # the org month and each team's day
    search = next(a for _, a, fig in burns if fig and fig.startswith("team:search@day"))
    charges = sum(1 for e in events if e.team == "search" and e.cost_micros)
    assert (search.get("d") or "").count("V") == charges  # one step down per charge
    text = "".join(doc.text)
    assert "$1.5000" in text and "<b>launch</b>" in text  # the grant raised search's limit and is listed
    saved = doc.having("rect", "hbar")
    savings = {a.get("data-name") for _, a, _ in saved if "savings" in _svg_classes(doc, a)}
    assert savings == {"research"}
    assert "$0.0070" in text  # 1000 in + 500 out at gpt-4o ($0.0075) minus the $0.00045 it cost
    assert "gpt-4o" in text and "refused (denied)" in text


def _svg_classes(doc: Doc, attrs: dict[str, str | None]) -> str:
    """The class of the svg holding an element (the parser keeps order, so the nearest svg before it)."""
    idx = next(i for i, e in enumerate(doc.elements) if e[1] is attrs)
    for tag, a, _ in reversed(doc.elements[:idx]):
        if tag == "svg":
            return a.get("class") or ""
    return ""


def test_empty_ledger_renders_a_page_without_charts() -> None:
    data = DashboardData.collect(MemoryLedger(), Settings(), now=T0, since=None, until=None)
    html = render(data)
    doc = parse(html)
    assert not doc.having("rect", "bar") and "No spend in this period." in html


def test_dashboard_command_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tokenbudget.ledger.sqlite import SQLiteLedger

    db = tmp_path / "ledger.db"
    led = SQLiteLedger(db)
    allowance = Allowance(key="org@total", scope="org", limit_micros=1_000_000)
    for h in range(3):
        res = led.reserve([allowance], 5000, 100, lease_seconds=60, now=T0 + h * 3600)
        ev = CallEvent(id=f"x{h}", time=T0 + h * 3600, provider="openai", model="gpt-4o", team="ops", user="u",
                       cost_micros=4000, budget_keys=("org@total",))  # fmt: skip
        assert isinstance(res, Reservation)
        led.settle(res, 4000, 100, ev, now=T0 + h * 3600)
    led.close()
    cfg = tmp_path / "tb.toml"
    cfg.write_text(f'ledger = "sqlite:///{db}"\n[[budgets]]\nscope = "org"\nlimit_usd = 1.0\n', encoding="utf-8")
    out = tmp_path / "d.html"
    code = main(["--config", str(cfg), "dashboard", "-o", str(out), "--since", "2025-12-31", "--now", "2026-01-02"])
    printed = capsys.readouterr().out
    assert code == 0 and str(out) in printed
    doc = parse(out.read_text(encoding="utf-8"))
    assert len(doc.having("rect", "bar")) == 3
    assert len(doc.having("path", "burn")) == 1


# -- a real browser --------------------------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip

needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason="chromium is not installed (apt-get install chromium); in CI its absence fails the test",
)


def _chromium(*args: str) -> subprocess.CompletedProcess[bytes]:
    profile = tempfile.mkdtemp(prefix="tb-chromium-")
    try:
        return subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, timeout=120,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGBA/RGB bytes) of an 8-bit non-interlaced PNG, with the scanline filters undone."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and interlace == 0 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = prev[x]
            c = prev[x - channels] if x >= channels else 0
            if f == 1:
                line[x] = (line[x] + a) & 0xFF
            elif f == 2:
                line[x] = (line[x] + b) & 0xFF
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r) if channels == 3 else bytes(_rgb(r)) for r in rows]


def _rgb(rgba: bytes) -> bytearray:
    out = bytearray()
    for i in range(0, len(rgba), 4):
        out += rgba[i : i + 3]
    return out


def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


@pytest.mark.chromium
@needs_chromium
def test_chromium_draws_the_dashboard(page: tuple[str, list[CallEvent]], tmp_path: Path) -> None:
    html, events = page
    target = tmp_path / "dashboard.html"
    target.write_text(html, encoding="utf-8")
    url = target.as_uri()

    dom = _chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    doc = parse(dom.stdout.decode("utf-8"))
    bars = Counter(fig for _, _, fig in doc.having("rect", "bar"))
    assert dict(bars) == expected_bars(events)  # the browser built every bar, under its team's chart
    captions = [t for t in doc.text if " \u2014 $" in t]
    for team in TEAMS:
        assert any(c.startswith(team + " \u2014") for c in captions), team  # team names in the chart titles
    assert {a.get("data-model") for _, a, _ in doc.having("li", "legend-item")} == set(MODELS)
    assert len(doc.having("path", "burn")) == 1 + len(TEAMS)
    assert not [t for t, _, _ in doc.elements if t in ("script", "img", "iframe")]  # no name became markup

    shot = tmp_path / "dashboard.png"
    result = _chromium("--window-size=1000,2000", f"--screenshot={shot}", url)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    width, height, rows = read_png(shot.read_bytes())
    assert (width, height) == (1000, 2000)
    pixels: Counter[tuple[int, int, int]] = Counter()
    for row in rows:
        for i in range(0, len(row), 3):
            pixels[(row[i], row[i + 1], row[i + 2])] += 1
    white = pixels[(255, 255, 255)] + pixels[_hex("#f7f8fa")]
    assert white < width * height * 0.95, "the page is blank"
    assert pixels[_hex("#1d2433")] > 1000 * 40  # the header band
    model_colours = {_hex(PALETTE[i]) for i in range(len(MODELS))}
    for colour in model_colours:
        assert pixels[colour] > 500, f"no bars painted in {colour}"


def test_daily_bars_across_a_daylight_saving_change() -> None:
    """Berlin's 2026-03-29 has 23 hours: still one bar per calendar day, none lost or doubled."""
    ledger = MemoryLedger()
    start = 1_774_393_200.0  # 2026-03-25T00:00+01:00
    for d in range(9):
        ledger.record(CallEvent(id=f"d{d}", time=start + d * 86_400 + 12 * 3600, provider="openai", model="gpt-4o",
                                team="ops", cost_micros=1000))  # fmt: skip
    settings = Settings(timezone="Europe/Berlin")
    data = DashboardData.collect(ledger, settings, now=start + 10 * 86_400, since=start, until=None)
    doc = parse(render(data))
    bars = doc.having("rect", "bar")
    assert len(bars) == 9
    tips = sorted(t.split(" | ")[2].split(":")[0] for t in doc.text if t.startswith("ops | gpt-4o | "))
    assert tips == [f"2026-03-{d}" for d in range(25, 32)] + ["2026-04-01", "2026-04-02"]
