"""The Redis ledger against a real redis-server: the shared contract, a fleet of processes racing for one budget,
dead machines, Redis dying mid-run under both ``on_ledger_error`` choices, and reports identical to SQLite's.

Server: ``TOKENBUDGET_TEST_REDIS_URL`` when set (CI starts one), else a ``redis-server`` this module starts on a free
port. Tests that stop and restart Redis always start their own. Without a ``redis-server`` binary the tests skip,
unless ``CI`` is set: there a missing server is a failure, not a silent skip.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

import tokenbudget
from ledger_contract import (
    T0,
    LedgerContract,
    assert_account_exact,
    assert_lease_frees_a_dead_holder,
    contend,
    ledger_machine_test,
    run_children,
)
from ticker import Ticker
from tokenbudget.clock import ManualClock
from tokenbudget.config import Settings
from tokenbudget.errors import LedgerError, LedgerUnavailable
from tokenbudget.events import CallEvent
from tokenbudget.guard import Guard
from tokenbudget.ledger import Allowance, Grant, Ledger, MemoryLedger, Refusal, Reservation, open_ledger
from tokenbudget.ledger.redis import RedisLedger
from tokenbudget.testing import Reply, StandInServer

pytestmark = pytest.mark.redis

SPAWN = multiprocessing.get_context("spawn")
REDIS_BIN = shutil.which("redis-server")


# -- servers ----------------------------------------------------------------------------------------------------------
def _need_binary() -> str:
    if REDIS_BIN is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI is set: the Redis ledger must be tested in CI")
        pytest.skip("no redis-server binary (apt-get install redis-server); with CI set this fails instead")
    return REDIS_BIN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A redis-server of our own, in its own temp dir, that a test may stop and start again on the same port."""

    def __init__(self, *extra: str, persist: bool = False) -> None:
        self.binary = _need_binary()
        self.dir = tempfile.mkdtemp(prefix="tb-redis-")
        self.port = _free_port()
        self.extra = extra
        self.persist = persist
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", self.dir,
                "--appendonly", "yes" if self.persist else "no", "--daemonize", "no", *self.extra]  # fmt: skip
        if self.persist:
            args += ["--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5, **self._auth())
            try:
                if client.ping():
                    return self
            except redis.exceptions.RedisError:  # refused while starting, LOADING while reading its AOF
                pass
            finally:
                client.close()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def _auth(self) -> dict[str, str]:
        if "--requirepass" in self.extra:
            return {"password": self.extra[self.extra.index("--requirepass") + 1]}
        return {}

    def stop(self) -> None:
        """SIGTERM: with persistence the AOF is complete on disk; without it everything is gone, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


_SHARED: list[RedisServer] = []


def shared_url() -> str:
    """The CI server if there is one, else one server for this whole module (started on first use)."""
    url = os.environ.get("TOKENBUDGET_TEST_REDIS_URL")
    if url:
        return url
    if not _SHARED:
        server = RedisServer().start()
        _SHARED.append(server)
        atexit.register(server.close)
    return _SHARED[0].url


@pytest.fixture(scope="module", autouse=True)
def _stop_shared_server() -> Iterator[None]:
    yield
    while _SHARED:
        _SHARED.pop().close()


def _unique_prefix() -> str:
    return f"tbtest-{uuid.uuid4().hex[:12]}"


def _drop_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        names = list(client.scan_iter(match="{" + prefix + "}*", count=1000))
        if names:
            client.delete(*names)
    except redis.exceptions.RedisError:  # pragma: no cover - the server may be the one a test stopped
        pass
    finally:
        client.close()


@pytest.fixture
def redis_url() -> str:
    return shared_url()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    p = _unique_prefix()
    yield p
    _drop_prefix(redis_url, p)


@pytest.fixture
def make(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Callable[..., RedisLedger]]:
    """Ledgers on this test's prefix with a spool in tmp_path (never the user's state dir); closed afterwards."""
    opened: list[RedisLedger] = []

    def factory(url: str | None = None, **kw: Any) -> RedisLedger:
        kw.setdefault("key_prefix", prefix)
        kw.setdefault("spool_path", tmp_path / "spool.db")
        led = RedisLedger(url or redis_url, **kw)
        opened.append(led)
        return led

    yield factory
    for led in opened:
        led.close()


@pytest.fixture
def own() -> Iterator[Callable[..., RedisServer]]:
    """Servers this test may stop and restart (never the shared one)."""
    servers: list[RedisServer] = []

    def start(*extra: str, persist: bool = False) -> RedisServer:
        server = RedisServer(*extra, persist=persist).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _event(n: int | str, cost: int, keys: tuple[str, ...], now: float = T0, **kw: Any) -> CallEvent:
    return CallEvent(id=f"e{n}", time=now, provider="openai", model="gpt-4o-mini", cost_micros=cost,
                     budget_keys=keys, **kw)  # fmt: skip


def _replay_spool(led: RedisLedger) -> None:
    """Replay the spool now that Redis is back, and wait until the background replayer is done with it too."""
    led.replay_spool()
    _wait_for_empty_spool(led)


def _wait_for_empty_spool(led: RedisLedger, timeout: float = 10.0) -> None:
    """The background thread may be replaying at the same moment: wait for it rather than race it."""
    deadline = time.monotonic() + timeout
    while led.spooled() and time.monotonic() < deadline:
        time.sleep(0.02)




# -- the contract -----------------------------------------------------------------------------------------------------
class TestRedisLedger(LedgerContract):
    @pytest.fixture
    def make_ledger(self, make: Callable[..., RedisLedger]) -> Callable[[], Ledger]:
        return make


def _make_for_machine(stack: ExitStack) -> Ledger:
    url = shared_url()
    p = _unique_prefix()
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="tb-spool-"))
    stack.callback(_drop_prefix, url, p)
    led = RedisLedger(url, key_prefix=p, spool_path=os.path.join(tmp, "spool.db"))
    stack.callback(led.close)
    return led


TestRedisLedgerMachine = ledger_machine_test(_make_for_machine, max_examples=40, steps=40)


# -- URLs, credentials, wiring ----------------------------------------------------------------------------------------
def test_open_ledger_and_the_guard_route_redis_urls_with_on_ledger_error(redis_url: str, prefix: str) -> None:
    url = f"{redis_url}?key_prefix={prefix}"
    led = open_ledger(url, on_error="open")
    assert isinstance(led, RedisLedger) and led.on_error == "open" and led.key_prefix == prefix
    again = open_ledger(led.url)  # self.url (password-free) round-trips
    assert isinstance(again, RedisLedger) and again.key_prefix == prefix
    led.close()
    again.close()
    guard = Guard(Settings(ledger=url, on_ledger_error="open"))
    assert isinstance(guard.ledger, RedisLedger) and guard.ledger.on_error == "open"
    guard.close()
    guard = Guard(Settings(ledger=url))
    assert isinstance(guard.ledger, RedisLedger) and guard.ledger.on_error == "closed"
    guard.close()


def test_password_never_shown_and_env_credentials(
    own: Callable[..., RedisServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = own("--requirepass", "s3cret-pw")
    a = Allowance("k", "s", limit_micros=10)
    with_pw = RedisLedger(f"redis://:s3cret-pw@127.0.0.1:{server.port}/0", spool_path=tmp_path / "s.db")
    assert "s3cret" not in with_pw.url and "***" in with_pw.url and "s3cret" not in repr(with_pw)
    assert isinstance(with_pw.reserve([a], 1, 0, lease_seconds=60, now=T0), Reservation)
    with_pw.close()

    monkeypatch.setenv("TOKENBUDGET_REDIS_PASSWORD", "s3cret-pw")
    from_env = RedisLedger(server.url, spool_path=tmp_path / "s.db")
    assert isinstance(from_env.reserve([a], 1, 0, lease_seconds=60, now=T0), Reservation)
    from_env.close()

    # A wrong password is a configuration error, loud under both policies: failing open would hide it for good.
    monkeypatch.delenv("TOKENBUDGET_REDIS_PASSWORD")
    for policy in ("closed", "open"):
        wrong = RedisLedger(f"redis://:not-the-pw@127.0.0.1:{server.port}/0?key_prefix=x", on_error=policy,
                            spool_path=tmp_path / "s.db")  # fmt: skip
        with pytest.raises(LedgerError) as info:
            wrong.reserve([a], 1, 0, lease_seconds=60, now=T0)
        assert not isinstance(info.value, LedgerUnavailable)
        assert "password" in str(info.value) and "not-the-pw" not in str(info.value)
        assert "***" in str(info.value) or wrong.url in str(info.value)
        wrong.close()
    assert "s3cret" not in caplog.text and "not-the-pw" not in caplog.text


def test_tls_rediss_url(own: Callable[..., RedisServer], tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days",
         "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    tls_port = _free_port()
    try:
        server = own("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                     "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")  # fmt: skip
    except RuntimeError:
        pytest.skip("this redis-server was built without TLS")
    del server
    led = RedisLedger(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}", spool_path=tmp_path / "s.db")
    a = Allowance("k", "s", limit_micros=100)
    r = led.reserve([a], 100, 0, lease_seconds=60, now=T0)
    assert isinstance(r, Reservation) and led.settle(r, 60, 0, _event(1, 60, r.keys), now=T0)
    assert led.balance(a, now=T0).spent_micros == 60 and [e.id for e in led.events()] == ["e1"]
    led.close()
    # Plain text against the TLS port is not a ledger: it fails, bounded, instead of hanging.
    plain = RedisLedger(f"redis://127.0.0.1:{tls_port}/0", spool_path=tmp_path / "s.db")
    started = time.monotonic()
    with pytest.raises(LedgerError):
        plain.reserve([a], 1, 0, lease_seconds=60, now=T0)
    assert time.monotonic() - started < 5
    plain.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"key_prefix": "a{b"}, {"key_prefix": ""}, {"on_error": "maybe"}, {"socket_timeout": 0},
        {"window_grace": -1}, {"events_maxlen": 0}, {"events_maxlen": None}, {"max_connections": 0},
    ],
)  # fmt: skip
def test_bad_settings_are_config_errors(redis_url: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(tokenbudget.ConfigError) as caught:
        RedisLedger(redis_url, **kwargs)
    if "window_grace" in kwargs or "events_maxlen" in kwargs:  # checked as the other ledgers check them
        assert caught.value.key == next(iter(kwargs))


# -- layout, cluster slot, retention ----------------------------------------------------------------------------------
def test_every_key_shares_one_cluster_slot_and_windows_expire(
    make: Callable[..., RedisLedger], redis_url: str, prefix: str
) -> None:
    led = make(window_grace=3600, settled_ttl=600, events_maxlen=100)
    now = time.time()
    day = Allowance("team:ml:today", "team:ml", limit_micros=10**9, window_end=now + 86_400)
    total = Allowance("org:total", "org", limit_micros=10**9)
    led.grant(Grant("g", "team:ml", 5, 0, created_at=now, expires_at=None))
    r = led.reserve([day, total], 10, 1, lease_seconds=60, now=now)
    held = led.reserve([day], 10, 1, lease_seconds=60, now=now)
    assert isinstance(r, Reservation) and isinstance(held, Reservation)
    assert led.settle(r, 7, 1, _event(1, 7, r.keys, now), now=now)
    client = redis.Redis.from_url(redis_url)
    acct = ("{" + prefix + "}:acct:").encode()
    ttl_day = client.ttl(acct + b"team:ml:today")
    assert 86_400 + 3600 - 120 <= ttl_day <= 86_400 + 3600 + 2  # EXPIREAT window_end + grace
    assert client.ttl(acct + b"org:total") == -1  # a total budget persists
    assert 600 + 60 - 30 <= client.ttl(("{" + prefix + "}:done:" + r.id).encode()) <= 600 + 60 + 1
    for i in range(1000):
        led.record(_event(f"d{i}", 0, (), now, status="denied", decision="deny"))
    names = list(client.scan_iter(match="{" + prefix + "}*"))
    assert len({key_slot(n) for n in names}) == 1 and len(names) >= 7
    assert 100 <= client.xlen("{" + prefix + "}:events") < 400  # MAXLEN ~ 100 (trimmed by whole macro nodes)
    # A window that already ended (a fake clock, a clock behind the server) still lives `grace` from now.
    old = Allowance("team:ml:2026-01-01", "team:ml", window_end=T0 + 86_400)
    assert isinstance(led.reserve([old], 1, 0, lease_seconds=60, now=T0), Reservation)
    assert 3600 - 5 <= client.ttl(acct + b"team:ml:2026-01-01") <= 3600 + 2
    client.close()


def test_accounts_lists_every_account(make: Callable[..., RedisLedger]) -> None:
    led = make()
    a, b = Allowance("team:a:2026-01-01", "team:a", limit_micros=100), Allowance("org", "org")
    r = led.reserve([a, b], 40, 4, lease_seconds=60, now=T0)
    assert isinstance(r, Reservation)
    led.settle(r, 30, 3, None, now=T0)
    held = led.reserve([b], 5, 1, lease_seconds=60, now=T0)
    assert isinstance(held, Reservation)
    assert led.accounts() == [
        tokenbudget.ledger.Balance("org", "org", None, None, 30, 5, 3, 1),
        tokenbudget.ledger.Balance("team:a:2026-01-01", "team:a", None, None, 30, 0, 3, 0),
    ]


def test_reads_never_sweep_live_holds(make: Callable[..., RedisLedger]) -> None:
    """A report run with --now in the future must not give back holds that are still live in real time."""
    led = make()
    a = Allowance("k", "s", limit_micros=100)
    r = led.reserve([a], 100, 0, lease_seconds=60, now=T0)
    assert isinstance(r, Reservation)
    assert led.balance(a, now=T0 + 10**6).reserved_micros == 0
    assert led.active_reservations(now=T0 + 10**6) == []
    assert led.balance(a, now=T0).reserved_micros == 100  # still held: nothing was swept
    assert led.active_reservations(now=T0) == [r]


def test_a_retried_reserve_holds_once(make: Callable[..., RedisLedger], redis_url: str) -> None:
    """The retry redis-py makes after a lost reply runs the same script with the same id: it must not hold twice."""
    led = make()
    a = Allowance("k", "s", limit_micros=1000)
    res, keys, args, _meta = led._reserve_call([a], 300, 3, 60, T0)
    assert int(led._reserve_script(keys, args)[0]) == 1
    assert int(led._reserve_script(keys, args)[0]) == 1
    assert led.balance(a, now=T0).reserved_micros == 300
    assert led.active_reservations(now=T0) == [res]


class _ScriptCounter:
    """Scripts a server ran (``EVALSHA`` calls in ``INFO commandstats``) since :meth:`reset`. Every ledger step is a
    script, so a second round trip shows as a second one (a command a script runs inside itself is counted under its
    own name, and a script that had to be loaded first as a failed call)."""

    def __init__(self, port: int) -> None:
        self.admin = redis.Redis(port=port)
        self.reset()

    def reset(self) -> None:
        self.admin.config_resetstat()

    def since(self) -> tuple[int, int]:
        """(scripts run, scripts refused): the latter counts NOSCRIPT replies and errors."""
        row = self.admin.info("commandstats").get("cmdstat_evalsha", {})
        return int(row.get("calls", 0)), int(row.get("failed_calls", 0)) + int(row.get("rejected_calls", 0))

    def close(self) -> None:
        self.admin.close()


def _settle_and_read_scene(led: RedisLedger) -> tuple[Reservation, list[Allowance]]:
    """Three budgets with everything a balance has: spend, another call's live hold, an ended (unswept) hold, a
    grant. Returns a reservation on all three, ready to settle."""
    a = Allowance("a", "team:a", limit_micros=10_000, limit_tokens=1_000)
    b = Allowance("b", "b", limit_micros=5_000)
    c = Allowance("c", "c", limit_tokens=900)
    led.grant(Grant("g", "team:a", 700, 70, created_at=T0 - 1, expires_at=T0 + 100))
    ended = led.reserve([a, c], 100, 10, lease_seconds=1, now=T0)  # its lease ends before the read below
    live = led.reserve([a, b], 400, 40, lease_seconds=600, now=T0)
    r = led.reserve([a, b, c], 600, 60, lease_seconds=600, now=T0)
    assert all(isinstance(x, Reservation) for x in (ended, live, r)) and isinstance(r, Reservation)
    warm = led.reserve([Allowance("w", "w")], 1, 0, lease_seconds=600, now=T0)
    assert isinstance(warm, Reservation) and led.settle(warm, 1, 0, None, now=T0)  # the settle script is loaded
    return r, [a, b, c]


def test_settle_and_read_is_one_round_trip(own: Callable[..., RedisServer], tmp_path: Path) -> None:
    """The settle script itself returns the balances: one EVALSHA and nothing else, however many budgets, with the
    very figures separate balance() reads give (the default implementation would run one more script per budget)."""
    server = own()
    led = RedisLedger(server.url, spool_path=tmp_path / "s.db")
    r, allowances = _settle_and_read_scene(led)
    counter = _ScriptCounter(server.port)
    charged, balances = led.settle_and_read(r, 450, 45, _event(1, 450, r.keys), now=T0 + 2, allowances=allowances)
    assert counter.since() == (1, 0)
    assert charged is True
    assert balances == {x.key: led.balance(x, now=T0 + 2) for x in allowances}
    assert balances["a"].reserved_micros == 400  # the ended hold is subtracted, like balance() does (not swept)
    assert (balances["a"].spent_micros, balances["a"].granted_micros, balances["c"].spent_tokens) == (450, 700, 45)

    counter.reset()
    again, balances = led.settle_and_read(r, 450, 45, None, now=T0 + 2, allowances=allowances[:1])
    assert counter.since() == (1, 0)
    assert again is False and balances == {"a": led.balance(allowances[0], now=T0 + 2)}
    counter.close()
    led.close()


async def test_async_settle_and_read_is_one_round_trip(own: Callable[..., RedisServer], tmp_path: Path) -> None:
    server = own()
    led = RedisLedger(server.url, spool_path=tmp_path / "s.db")
    r, allowances = _settle_and_read_scene(led)
    warm = await led.areserve(allowances, 1, 0, lease_seconds=600, now=T0)  # connected, and the scripts loaded
    assert isinstance(warm, Reservation) and await led.asettle(warm, 0, 0, None, now=T0)
    counter = _ScriptCounter(server.port)
    charged, balances = await led.asettle_and_read(r, 450, 45, _event(1, 450, r.keys), now=T0 + 2,
                                                   allowances=allowances)  # fmt: skip
    assert counter.since() == (1, 0)
    assert charged is True and balances == {x.key: led.balance(x, now=T0 + 2) for x in allowances}
    counter.close()
    await led.aclose()


async def test_settle_and_read_while_redis_is_down_spools_the_charge_and_reads_nothing(
    own: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """Redis cannot answer the balances, so none are made up (an empty mapping: unknown); the charge is spooled as a
    settle's would be, reported as done, and lands once Redis is back."""
    server = own(persist=True)
    led = RedisLedger(server.url, spool_path=tmp_path / "s.db", on_error="closed")
    a = Allowance("a", "a", limit_micros=10_000)
    r1 = led.reserve([a], 300, 3, lease_seconds=600, now=T0)
    r2 = led.reserve([a], 300, 3, lease_seconds=600, now=T0)
    assert isinstance(r1, Reservation) and isinstance(r2, Reservation)
    server.stop()
    assert led.settle_and_read(r1, 200, 2, _event(1, 200, r1.keys), now=T0, allowances=[a]) == (True, {})
    assert await led.asettle_and_read(r2, 100, 1, _event(2, 100, r2.keys), now=T0, allowances=[a]) == (True, {})
    assert led.spooled() == 2
    server.start()
    _replay_spool(led)
    bal = led.balance(a, now=T0)
    assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens) == (300, 0, 3)
    assert sorted(e.id for e in led.events()) == ["e1", "e2"]
    assert led.settle_and_read(r1, 200, 2, None, now=T0, allowances=[a]) == (False, {"a": bal})
    await led.aclose()


def test_throughput_smoke(make: Callable[..., RedisLedger]) -> None:
    """Not a benchmark: catches a regression to several round trips per step (or a reconnect per call)."""
    led = make()
    a = Allowance("k", "s", limit_micros=10**15)
    n = 500
    started = time.perf_counter()
    for i in range(n):
        r = led.reserve([a], 100, 10, lease_seconds=60, now=T0)
        assert isinstance(r, Reservation)
        led.settle(r, 90, 9, _event(i, 90, r.keys), now=T0)
    rate = n / (time.perf_counter() - started)
    assert rate > 200, f"{rate:.0f} reserve+settle pairs/s"


def test_scripts_run_no_redundant_commands(own: Callable[..., RedisServer], tmp_path: Path) -> None:
    """Reserve reads whether an enforced account exists (its scope) with its figures, so it writes the scope only
    when creating the account; settle checks each account's existence once, releasing and charging with that
    answer. Counted in ``INFO commandstats`` (commands a script runs count under their own names)."""
    server = own()
    led = RedisLedger(server.url, spool_path=tmp_path / "s.db", window_grace=60)
    a = Allowance("day", "team", limit_micros=10**9, window_end=time.time() + 3600)
    first = led.reserve([a], 100, 10, lease_seconds=60, now=T0)
    assert isinstance(first, Reservation) and led.settle(first, 90, 9, None, now=T0)
    admin = redis.Redis(port=server.port)
    acct = b"{tokenbudget}:acct:day"
    assert admin.hget(acct, "scope") == b"team" and 3600 <= admin.ttl(acct) <= 3661  # created with scope and expiry
    admin.config_resetstat()
    r = led.reserve([a], 100, 10, lease_seconds=60, now=T0)
    assert isinstance(r, Reservation) and led.settle(r, 80, 8, _event(1, 80, r.keys), now=T0)
    stats = admin.info("commandstats")
    assert "cmdstat_hsetnx" not in stats and "cmdstat_expireat" not in stats  # the account had its scope already
    assert stats["cmdstat_exists"]["calls"] == 3  # reserve: its marker; settle: its marker, the account once
    assert led.balance(a, now=T0).spent_micros == 170 and led.balance(a, now=T0).reserved_micros == 0
    admin.close()
    led.close()


def test_a_reserve_plan_is_reused_until_its_window_ends(make: Callable[..., RedisLedger]) -> None:
    """Reserve arguments are built once per allowance tuple, but a window's EXPIREAT is never in the past: once
    ``window_end`` has passed, it follows the clock again (``_expireat``), so the plan is rebuilt on each use."""
    led = make(window_grace=0)
    total = (Allowance("org", "org", limit_micros=10),)
    assert led._plan(total) is led._plan(list(total)) is led._plan((Allowance("org", "org", limit_micros=10),))
    day = (Allowance("d", "t", limit_micros=10, window_end=time.time() + 0.2),)
    plan = led._plan(day)
    assert led._plan(day) is plan and plan.meta == [["t", led._expireat(day[0].window_end)]]
    time.sleep(0.3)
    later = led._plan(day)
    assert later is not plan and later.meta == [["t", led._expireat(day[0].window_end)]]
    assert int(later.args[-1]) >= time.time() - 1  # not the stale ceil(window_end)
    _res, _keys, args, meta = led._reserve_call(day, 5, 1, 60, T0)
    assert meta == later.meta and args[6] == json.dumps(["5", "1", repr(T0 + 60.0), "d"], separators=(",", ":"))


_texts = st.text(st.characters(codec="utf-8"), max_size=8)
_opt_texts = st.none() | _texts
_ints = st.integers(-(2**70), 2**70)
_floats = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        CallEvent, id=_texts, time=_floats, provider=_texts, model=_texts, operation=_texts, status=_texts,
        decision=_texts, original_model=_opt_texts, org=_opt_texts, team=_opt_texts, user=_opt_texts,
        tags=st.dictionaries(_texts, _texts, max_size=3), function=_opt_texts, run_id=_opt_texts,
        input_tokens=_ints, output_tokens=_ints, cache_read_tokens=_ints, cache_write_tokens=_ints,
        cache_write_1h_tokens=_ints, reasoning_tokens=_ints, cost_micros=_ints, estimated_micros=_ints,
        original_estimated_micros=_ints, budget_keys=st.lists(_texts, max_size=3).map(tuple), duration_s=_floats,
    )
)
def test_event_json_is_the_general_encoders_text(event: CallEvent) -> None:
    """The f-string fast path writes exactly what the general encoder writes (the stored format other versions of
    the library read from the same stream), and it round-trips."""
    from tokenbudget.ledger.redis import _event_json, _event_json_any

    assert _event_json(event) == _event_json_any(event)
    assert CallEvent.from_json(_event_json(event)) == event


@pytest.mark.parametrize("odd", [
    {"time": float("nan")}, {"time": float("inf")}, {"time": 5}, {"input_tokens": True}, {"cost_micros": 1.5},
    {"org": type("S", (str,), {})("x")}, {"budget_keys": ["a"]}, {"tags": {1: "x"}}, {"duration_s": -0.0},
])  # fmt: skip
def test_event_json_of_unusual_values_falls_back_to_the_general_encoder(odd: dict[str, Any]) -> None:
    from tokenbudget.ledger.redis import _event_json, _event_json_any

    event = CallEvent(**{"id": "e", "time": T0, "provider": "p", "model": "m", **odd})
    assert _event_json(event) == _event_json_any(event)


# -- group commit: many threads' calls in one pipelined batch --------------------------------------------------------
def _one_batch(led: RedisLedger, admin: redis.Redis, jobs: list[Callable[[], Any]],
               meanwhile: Callable[[], None] | None = None) -> list[Any]:  # fmt: skip
    """Run each job on its own thread while Redis holds writes (CLIENT PAUSE WRITE): the first job's script is sent
    and waits; every other one is sent behind it or queues for the next write, on the one connection, so they all run
    together once writes resume. ``meanwhile`` runs when all are queued (and before writes resume). Returns each
    job's result or exception."""
    group = led._batcher()
    admin.client_pause(5000, all=False)
    results: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(group._inflight) + len(group._unsent) < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.002)
        assert len(group._inflight) + len(group._unsent) == len(jobs), "the calls were not all pending together"
        if meanwhile is not None:
            meanwhile()
    finally:
        try:
            admin.client_unpause()
        except redis.exceptions.RedisError:
            pass  # the meanwhile may have stopped the server
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads), "a caller was left waiting"
    assert not group._inflight and not group._unsent  # nothing dangling: the next call is sent at once
    assert not group._reading and not group._writing and not group._halted
    return results


def test_coalesced_calls_of_many_threads_stay_all_or_none_and_settle_exactly_once(
    make: Callable[..., RedisLedger], redis_url: str
) -> None:
    led = make(socket_timeout=10)
    admin = redis.Redis.from_url(redis_url)
    day = Allowance("day", "team", limit_micros=1000)
    total = Allowance("total", "org", limit_micros=10**9)
    led.settle(led.reserve([total], 1, 0, lease_seconds=60, now=T0), 0, 0, None, now=T0)  # scripts loaded

    # 16 reservations of 100 against 1000, all in one batch: exactly 10 fit, on both budgets or on neither.
    got = _one_batch(led, admin, [lambda: led.reserve([day, total], 100, 1, lease_seconds=60, now=T0)] * 16)
    assert led._batcher().largest >= 15
    held = [r for r in got if isinstance(r, Reservation)]
    refused = [r for r in got if isinstance(r, Refusal)]
    assert (len(held), len(refused)) == (10, 6)
    assert all(r.allowance.key == "day" for r in refused)
    assert led.balance(day, now=T0).reserved_micros == led.balance(total, now=T0).reserved_micros == 1000

    # Every reservation settled twice, both settles in one batch: each charges once, and only one of them says so.
    jobs: list[Callable[[], Any]] = []
    for i, r in enumerate(held):
        jobs += [lambda r=r, i=i: led.settle(r, 90, 1, _event(i, 90, r.keys), now=T0)] * 2
    done = _one_batch(led, admin, jobs)
    assert sum(d is True for d in done) == 10 and sum(d is False for d in done) == 10
    for r in held:
        assert sorted(d for j, d in enumerate(done) if held[j // 2] is r) == [False, True]
    for a in (day, total):
        bal = led.balance(a, now=T0)
        assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens) == (900, 0, 10)
    assert sorted(e.id for e in led.events()) == sorted(f"e{i}" for i in range(10))
    assert_account_exact(led, day, now=T0)
    admin.close()


def test_a_call_made_while_others_are_in_flight_is_written_at_once(
    make: Callable[..., RedisLedger], redis_url: str
) -> None:
    """Not held back until the reader next waits for a reply: Redis gets it while it still runs (here: holds) the
    earlier calls, so Redis and the callers' Python overlap instead of taking turns (this halved the pairs/s)."""
    led = make(socket_timeout=10)
    admin = redis.Redis.from_url(redis_url)
    a = Allowance("k", "s", limit_micros=10**6)
    led.settle(led.reserve([a], 1, 0, lease_seconds=60, now=T0), 1, 0, None, now=T0)
    group = led._batcher()
    sent: list[bool] = []

    def all_sent() -> None:
        deadline = time.monotonic() + 2
        while (group._unsent or group._writing) and time.monotonic() < deadline:
            time.sleep(0.002)
        sent.append(not group._unsent and len(group._inflight) == 4)

    got = _one_batch(led, admin, [lambda: led.reserve([a], 100, 1, lease_seconds=60, now=T0)] * 4,
                     meanwhile=all_sent)  # fmt: skip
    assert sent == [True], "calls waited for the reader instead of going out"
    assert all(isinstance(r, Reservation) for r in got) and led.balance(a, now=T0).reserved_micros == 400
    admin.close()


def test_a_connection_killed_mid_batch_resends_the_whole_batch_once(
    make: Callable[..., RedisLedger], redis_url: str
) -> None:
    """The batch's connection dies before Redis ran any of it: the one retry sends every call again, on a new
    connection, and each runs exactly once."""
    led = make(socket_timeout=10)
    admin = redis.Redis.from_url(redis_url)
    a = Allowance("k", "s", limit_micros=10**6)
    led.settle(led.reserve([a], 1, 0, lease_seconds=60, now=T0), 1, 0, None, now=T0)
    got = _one_batch(led, admin, [lambda: led.reserve([a], 100, 1, lease_seconds=60, now=T0)] * 8,
                     meanwhile=lambda: admin.client_kill_filter(_type="normal", skipme=True))  # fmt: skip
    assert all(isinstance(r, Reservation) for r in got), got
    assert led.balance(a, now=T0).reserved_micros == 800
    assert sorted(r.id for r in led.active_reservations(now=T0)) == sorted(r.id for r in got)
    admin.close()


def test_redis_dying_mid_batch_fails_every_waiter_and_spools_every_settle_once(
    own: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = own(persist=True)
    led = RedisLedger(server.url, spool_path=tmp_path / "spool.db", socket_timeout=10, on_error="closed")
    admin = redis.Redis(port=server.port)
    a = Allowance("k", "s", limit_micros=10**6)
    earlier = [led.reserve([a], 100, 1, lease_seconds=600, now=T0) for _ in range(4)]
    assert all(isinstance(r, Reservation) for r in earlier)

    jobs: list[Callable[[], Any]] = [lambda: led.reserve([a], 50, 1, lease_seconds=600, now=T0)] * 4
    jobs += [lambda r=r, i=i: led.settle(r, 70, 1, _event(i, 70, r.keys), now=T0) for i, r in enumerate(earlier)]
    got = _one_batch(led, admin, jobs, meanwhile=server.stop)
    # Reserves are refused (on_error="closed"); settles have spent their money: spooled, reported as charged.
    assert all(isinstance(r, LedgerUnavailable) for r in got[:4]), got
    assert got[4:] == [True] * 4
    assert led.spooled() == 4

    server.start()
    _replay_spool(led)
    bal = led.balance(a, now=T0)
    assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens) == (280, 0, 4)  # no refused reserve held
    assert sorted(e.id for e in led.events()) == ["e0", "e1", "e2", "e3"]
    assert led.replay_spool() == 0 and all(led.settle(r, 70, 1, None, now=T0) is False for r in earlier)
    assert isinstance(led.reserve([a], 1, 0, lease_seconds=60, now=T0), Reservation)  # and calls go on
    admin.close()
    led.close()


# -- a fleet racing for one budget ------------------------------------------------------------------------------------
def _contend(url: str, prefix: str, spool: str, limit: int, amount: int, threads: int, attempts: int, barrier: Any,
             out: Any) -> None:  # fmt: skip
    # Generous timeouts: 256 threads on a CI runner's two cores can starve one socket read past the 0.5 s default.
    led = RedisLedger(url, key_prefix=prefix, spool_path=spool, socket_timeout=10, connect_timeout=10)
    contend(led, Allowance("team:fleet", "team:fleet", limit_micros=limit), amount, threads, attempts, barrier, out)


def test_8_processes_x_32_threads_spend_exactly_the_budget(redis_url: str, prefix: str, tmp_path: Path) -> None:
    procs_n, threads_n, attempts, amount, k = 8, 32, 2, 1_234, 150
    limit = k * amount
    results = run_children(
        _contend, procs_n, (redis_url, prefix, str(tmp_path / "spool.db"), limit, amount, threads_n, attempts)
    )
    assert [e for _, errs in results for e in errs] == []
    ok = sum(t[0] for t, _ in results)
    refused = sum(t[1] for t, _ in results)
    assert ok == k and ok + refused == procs_n * threads_n * attempts
    assert sum(t[2] for t, _ in results) == 0

    led = RedisLedger(redis_url, key_prefix=prefix, spool_path=tmp_path / "spool.db")
    a = Allowance("team:fleet", "team:fleet", limit_micros=limit)
    now = time.time()
    bal = led.balance(a, now=now)
    assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (limit, 0, k, 0)
    events = list(led.events())
    assert len(events) == k and sum(e.cost_micros for e in events) == limit
    assert led.active_reservations(now=now) == [] and led.spooled() == 0
    led.close()


MAX_TOKENS = 40


def _sdk_contend(url: str, prefix: str, spool: str, base_url: str, limit_tokens: int, threads: int, attempts: int,
                 barrier: Any, out: Any) -> None:  # fmt: skip
    """Child: the real openai SDK, guarded by a Redis ledger, from ``threads`` threads."""
    import openai

    led = RedisLedger(url, key_prefix=prefix, spool_path=spool, socket_timeout=10, connect_timeout=10)
    tokenbudget.install(ledger=led, budget_tokens=limit_tokens, org="acme")
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0)
    counts = {"ok": 0, "refused": 0}
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def run() -> None:
        start.wait()
        for _ in range(attempts):
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": "hi"}]
                )
                key = "ok"
            except tokenbudget.BudgetExceeded:
                key = "refused"
            except BaseException as exc:
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                counts[key] += 1

    barrier.wait(120)
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    client.close()
    tokenbudget.uninstall()
    out.put((counts, errors))


class _Probe(MemoryLedger):
    """Remembers what the guard reserves, to learn the worst case of the request the children will send."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[int, int]] = []

    def reserve(self, allowances: Any, micros: int, tokens: int, *, lease_seconds: float, now: float) -> Any:
        self.asked.append((micros, tokens))
        return super().reserve(allowances, micros, tokens, lease_seconds=lease_seconds, now=now)


def test_the_real_sdk_from_processes_and_threads_spends_exactly_the_budget(
    srv: StandInServer, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    import openai

    probe = _Probe()
    tokenbudget.install(ledger=probe, budget_tokens=10**9)
    with openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-test", max_retries=0) as probe_client:
        probe_client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": "hi"}]
        )
    tokenbudget.uninstall()
    worst = probe.asked[0][1]
    # Answer with exactly the worst case, so each call uses what it reserved and exactly K calls fit.
    srv.reply = Reply(input_tokens=worst - MAX_TOKENS, output_tokens=MAX_TOKENS)
    srv.clear()
    procs_n, threads_n, attempts, k = 2, 4, 3, 10
    results = run_children(
        _sdk_contend,
        procs_n,
        (redis_url, prefix, str(tmp_path / "spool.db"), srv.openai_base_url, k * worst, threads_n, attempts),
    )
    assert [e for _, errs in results for e in errs] == []
    assert sum(c["ok"] for c, _ in results) == k
    assert sum(c["refused"] for c, _ in results) == procs_n * threads_n * attempts - k
    assert len(srv.requests) == k  # refused calls never left their process

    led = RedisLedger(redis_url, key_prefix=prefix, spool_path=tmp_path / "spool.db")
    (acct,) = [b for b in led.accounts() if "~alert" not in b.key]  # alerts keep 1-micro marker accounts
    assert (acct.spent_tokens, acct.reserved_tokens) == (k * worst, 0)
    events = list(led.events())
    assert sum(1 for e in events if e.status == "ok") == k
    assert sum(1 for e in events if e.status == "denied") == procs_n * threads_n * attempts - k
    assert sum(e.cost_micros for e in events) == acct.spent_micros
    assert led.active_reservations(now=time.time()) == []
    led.close()


# -- a machine that dies mid-call -------------------------------------------------------------------------------------
def _reserve_and_hang(url: str, prefix: str, spool: str, limit: int, out: Any) -> None:
    led = RedisLedger(url, key_prefix=prefix, spool_path=spool)
    out.put(led.reserve([Allowance("k", "s", limit_micros=limit)], limit, 0, lease_seconds=30, now=T0))
    time.sleep(600)


def test_a_sigkilled_holder_blocks_only_until_its_lease_ends(
    make: Callable[..., RedisLedger], redis_url: str, prefix: str, tmp_path: Path
) -> None:
    limit = 1000
    a = Allowance("k", "s", limit_micros=limit)
    out = SPAWN.Queue()
    child = SPAWN.Process(target=_reserve_and_hang, args=(redis_url, prefix, str(tmp_path / "c.db"), limit, out))
    child.start()
    try:
        held = out.get(timeout=60)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert isinstance(held, Reservation) and held.expires_at == T0 + 30

    led = make()
    assert_lease_frees_a_dead_holder(led, a, held, limit)


# -- Redis dying mid-run ----------------------------------------------------------------------------------------------
def _chat(client: Any) -> Any:
    messages = [{"role": "user", "content": "q"}]
    return client.chat.completions.create(model="gpt-4o-mini", max_tokens=50, messages=messages)


def test_closed_refuses_while_redis_is_down_and_charges_nothing(
    own: Callable[..., RedisServer], srv: StandInServer, tmp_path: Path
) -> None:
    import openai

    server = own(persist=True)
    spool = tmp_path / "spool.db"
    led = RedisLedger(server.url, spool_path=spool, on_error="closed")
    a = Allowance("org", "org", limit_micros=10**6)
    r1 = led.reserve([a], 500, 5, lease_seconds=600, now=T0)
    in_flight = led.reserve([a], 300, 3, lease_seconds=600, now=T0)
    assert isinstance(r1, Reservation) and isinstance(in_flight, Reservation)
    assert led.settle(r1, 400, 4, _event(1, 400, r1.keys), now=T0)

    server.stop()
    started = time.monotonic()
    with pytest.raises(LedgerUnavailable) as info:
        led.reserve([a], 10, 1, lease_seconds=600, now=T0)
    assert time.monotonic() - started < 2.5  # bounded: connection refused, one retry
    assert "closed" in str(info.value) and led.url in str(info.value)
    started = time.monotonic()
    with pytest.raises(LedgerUnavailable):
        led.reserve([a], 10, 1, lease_seconds=600, now=T0)  # the breaker: no second wait
    assert time.monotonic() - started < 0.05
    with pytest.raises(LedgerUnavailable):
        led.balance(a, now=T0)

    # Through the guard and the real SDK: refused before any byte is sent.
    tokenbudget.install(ledger=led, budget_usd=1.0)
    client = openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-test", max_retries=0)
    with client, pytest.raises(LedgerUnavailable):
        _chat(client)
    assert srv.requests == []
    # A call that was already under way when Redis died has spent its money: its charge is spooled, not lost.
    assert led.settle(in_flight, 250, 2, _event(2, 250, in_flight.keys), now=T0) is True
    assert led.spooled() == 1

    server.start()
    _replay_spool(led)
    bal = led.balance(a, now=T0)
    assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens) == (650, 0, 6)
    assert [e.id for e in led.events()] == ["e1", "e2"]  # no event for the refused calls
    assert_account_exact(led, a, now=T0)
    tokenbudget.uninstall()


@pytest.mark.parametrize("persist", [True, False], ids=["aof", "no-persistence"])
def test_open_lets_calls_through_spools_and_replays_exactly_once(
    own: Callable[..., RedisServer], srv: StandInServer, tmp_path: Path, persist: bool
) -> None:
    import openai

    server = own(persist=persist)
    spool = tmp_path / "spool.db"
    led = RedisLedger(server.url, spool_path=spool, on_error="open")
    day = Allowance("team:ml:2026-01-01", "team:ml", limit_micros=1000, window_end=T0 + 86_400)
    total = Allowance("org", "org", limit_micros=10**6)
    r1 = led.reserve([day, total], 100, 1, lease_seconds=600, now=T0)
    r2 = led.reserve([day, total], 300, 3, lease_seconds=600, now=T0)
    assert isinstance(r1, Reservation) and isinstance(r2, Reservation)
    assert led.settle(r1, 100, 1, _event(1, 100, r1.keys), now=T0)

    server.stop()
    # Over the limit, but Redis cannot say so: failing open lets the call through with a local reservation.
    r3 = led.reserve([day, total], 900, 9, lease_seconds=600, now=T0 + 1)
    assert isinstance(r3, Reservation) and r3.keys == (day.key, total.key)
    assert led.balance(day, now=T0).spent_micros == 0  # spend unknown: reported as none, never an error
    assert led.settle(r3, 200, 2, _event(3, 200, r3.keys, T0 + 1), now=T0 + 1) is True
    assert led.settle(r3, 200, 2, _event(3, 200, r3.keys, T0 + 1), now=T0 + 1) is False  # once, even locally
    assert led.settle(r2, 250, 2, _event(2, 250, r2.keys, T0 + 2), now=T0 + 2) is True
    led.record(_event("d", 0, (), T0 + 3, status="denied", decision="deny"))

    # Through the guard and the real SDK: the call goes out, and its charge waits in the spool.
    tokenbudget.install(ledger=led, budget_usd=1.0)
    srv.reply = Reply(input_tokens=100, output_tokens=10)
    with openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-test", max_retries=0) as client:
        _chat(client)
    assert len(srv.requests) == 1
    tokenbudget.uninstall()  # closes the ledger: the spool stays on disk for whoever opens it next
    assert led.spooled() == 4  # r2, r3, the denied record, the SDK call
    snapshot = tmp_path / "spool-before-replay.db"
    shutil.copyfile(spool, snapshot)

    server.start()
    led = RedisLedger(server.url, spool_path=spool, on_error="open")  # a new process would pick the spool up
    _replay_spool(led)
    assert led.spooled() == 0 and led.replay_spool() == 0

    def state() -> tuple[Any, ...]:
        balances = [led.balance(x, now=T0 + 5) for x in (day, total)]
        return (
            [(b.spent_micros, b.reserved_micros, b.spent_tokens, b.reserved_tokens) for b in balances],
            sorted(e.id for e in led.events()),
        )

    (sdk,) = [e for e in led.events() if e.id not in ("e1", "e2", "e3", "ed")]
    assert sdk.cost_micros > 0 and sdk.status == "ok"
    spent = (100 if persist else 0) + 250 + 200  # without persistence the restart lost what Redis had before
    tokens = (1 if persist else 0) + 2 + 2
    want = ([(spent, 0, tokens, 0)] * 2, sorted({"e1", "e2", "e3", "ed", sdk.id} - (set() if persist else {"e1"})))
    assert state() == want
    accounts = {b.key: b for b in led.accounts()}
    # Accounts Redis had lost are recreated with their scope (and their window's expiry) by the replay.
    assert (accounts[day.key].scope, accounts[total.key].scope) == ("team:ml", "org")
    (guard_account,) = [b for k, b in accounts.items() if k not in (day.key, total.key)]
    assert (guard_account.spent_micros, guard_account.reserved_micros) == (sdk.cost_micros, 0)

    # Replaying the very same rows again (a crash between the push and the delete) charges nothing twice.
    shutil.copyfile(snapshot, spool)
    assert led.spooled() == 4  # r2, r3, the denied record, the SDK call
    assert led.replay_spool() == 4 and led.spooled() == 0
    assert state() == want
    led.close()


def test_a_slow_redis_times_out_bounded_and_a_timed_out_hold_ends_with_its_lease(
    own: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = own()
    led = RedisLedger(server.url, spool_path=tmp_path / "s.db", socket_timeout=0.3, connect_timeout=0.3)
    a = Allowance("k", "s", limit_micros=1000)
    assert isinstance(led.reserve([a], 1, 0, lease_seconds=5, now=T0), Reservation)  # connected and scripts loaded
    admin = redis.Redis(port=server.port)
    admin.client_pause(1200, all=True)
    started = time.monotonic()
    with pytest.raises(LedgerUnavailable):
        led.reserve([a], 500, 0, lease_seconds=5, now=T0)
    assert time.monotonic() - started < 1.5  # socket timeout, one retry: never stuck for the whole pause
    time.sleep(max(0.0, 1.3 - (time.monotonic() - started)))
    # Whatever the paused server did with the timed-out reserve, at most one hold exists and it ends with its lease.
    held = led.active_reservations(now=T0)
    assert sum(r.micros for r in held) in (1, 501)
    assert led.balance(a, now=T0 + 5).reserved_micros == 0
    assert isinstance(led.reserve([a], 1000, 0, lease_seconds=5, now=T0 + 5), Reservation)
    admin.close()
    led.close()


async def test_async_calls_never_block_the_loop(own: Callable[..., RedisServer], tmp_path: Path) -> None:
    server = own()
    led = RedisLedger(server.url, spool_path=tmp_path / "s.db", socket_timeout=0.4, connect_timeout=0.4,
                      on_error="open")  # fmt: skip
    a = Allowance("k", "s", limit_micros=100 * 7)
    results = await asyncio.gather(*(led.areserve([a], 7, 0, lease_seconds=60, now=T0) for _ in range(150)))
    assert sum(isinstance(r, Reservation) for r in results) == 100
    settled = await asyncio.gather(*(led.asettle(r, 7, 0, None, now=T0) for r in results if isinstance(r, Reservation)))
    assert all(settled) and (await led.abalance(a, now=T0)).spent_micros == 700

    admin = redis.Redis(port=server.port)
    admin.client_pause(1000, all=True)
    async with Ticker() as ticker:
        started = time.monotonic()
        r = await led.areserve([Allowance("other", "other")], 1, 0, lease_seconds=60, now=T0)  # times out: fails open
        waited = time.monotonic() - started
    assert isinstance(r, Reservation) and 0.3 < waited < 1.5
    assert ticker.ticks >= 0.5 * waited / 0.01  # the loop kept running while Redis did not answer
    assert await led.asettle(r, 1, 0, None, now=T0) is True  # to Redis, or to the spool if it is still paused
    await asyncio.to_thread(_wait_for_empty_spool, led)
    assert (await led.abalance(Allowance("other", "other"), now=T0)).spent_micros == 1
    admin.close()
    await led.aclose()
    led.close()


# -- the same report as SQLite ----------------------------------------------------------------------------------------
REPORT_CONFIG = """\
org = "acme"
timezone = "UTC"

[[budgets]]
scope = "org"
limit_usd = 10.0
period = "month"

[[budgets]]
scope = "team:search/user:*"
limit_usd = 0.01
period = "day"
on_exhaust = "downgrade"

[[budgets]]
scope = "team:research"
limit_usd = 0.01
period = "day"

[downgrade]
"gpt-4o" = "gpt-4o-mini"
"""


def _workload(srv: StandInServer, config: Path, ledger_url: str) -> None:
    """One fixed day of calls through the real SDKs, on a fake clock, into ``ledger_url``."""
    import anthropic
    import openai

    clock = ManualClock(T0 + 10 * 3600)
    tokenbudget.install(config, ledger=ledger_url, clock=clock)
    oai = openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-test", max_retries=0)
    ant = anthropic.Anthropic(base_url=srv.anthropic_base_url, api_key="sk-ant-test", max_retries=0)
    try:
        srv.reply = Reply(input_tokens=1000, output_tokens=500)
        with tokenbudget.scope(team="search", user="ann", tags={"env": "prod"}):
            oai.chat.completions.create(model="gpt-4o", max_tokens=600, messages=[{"role": "user", "content": "a"}])
            clock.advance(3600)
            oai.chat.completions.create(model="gpt-4o", max_tokens=600, messages=[{"role": "user", "content": "b"}])
        srv.reply = Reply(input_tokens=2000, output_tokens=1000)
        with tokenbudget.scope(team="research", user="dee"):
            clock.advance(3600)
            ant.messages.create(model="claude-haiku-4-5", max_tokens=1000, messages=[{"role": "user", "content": "q"}])
            with pytest.raises(tokenbudget.BudgetExceeded):
                ant.messages.create(
                    model="claude-haiku-4-5", max_tokens=1000, messages=[{"role": "user", "content": "q"}]
                )
        now = clock.now()
        grant = Grant("g1", "team:research", 5000, 0, now, now + 86_400, reason="deadline", granted_by="ops")
        tokenbudget.active_guard().ledger.grant(grant)  # type: ignore[union-attr]
    finally:
        oai.close()
        ant.close()
        tokenbudget.uninstall()


def test_report_from_redis_equals_report_from_sqlite(
    srv: StandInServer, redis_url: str, prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenbudget.cli import main  # here, not at the top: spawned children import this module too

    config = tmp_path / "tokenbudget.toml"
    config.write_text(REPORT_CONFIG, encoding="utf-8")
    urls = {"sqlite": f"sqlite:///{tmp_path / 'ledger.db'}", "redis": f"{redis_url}?key_prefix={prefix}"}
    for url in urls.values():
        _workload(srv, config, url)
    outputs: dict[str, list[str]] = {}
    for name, url in urls.items():
        outputs[name] = []
        for argv in (["report", "--by", "team,model", "--format", "json"],
                     ["report", "--by", "user,day", "--format", "json", "--since", "2026-01-01T11:00"],
                     ["budgets", "--all", "--format", "json", "--now", "2026-01-01T18:00"],
                     ["grants", "--all", "--format", "json", "--now", "2026-01-01T18:00"]):  # fmt: skip
            code = main(["--config", str(config), "--ledger", url, *argv])
            out, err = capsys.readouterr()
            assert code == 0, err
            outputs[name].append(out)
    assert outputs["redis"] == outputs["sqlite"]
    rows = json.loads(outputs["redis"][0])
    assert {r["team"] for r in rows} == {"search", "research"} and sum(r["denied"] for r in rows) == 1


# -- a cancel while the answer is being committed ---------------------------------------------------------------------
async def test_cancel_while_redis_commits_an_answer_still_charges_it(make: Callable[..., RedisLedger],
                                                                   redis_url: str, srv: Any, otel: Any) -> None:
    """With Redis the async commit is real I/O: a cancel landing in it must neither cut the commit (a hold left to its
    lease, nothing charged for an answered call) nor the span; the commit finishes, then the caller is cancelled."""
    import openai

    from tokenbudget.testing import Fault, Reply

    srv.reply = Reply(text="hello there", input_tokens=700, output_tokens=9)
    srv.push(Fault(delay=0.3))
    led = make(socket_timeout=5.0)
    g = tokenbudget.install({"budget_usd": 5.0}, ledger=led)
    client = openai.AsyncOpenAI(base_url=srv.openai_base_url, api_key="sk-test", max_retries=0)
    task = asyncio.create_task(client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=20))
    for _ in range(200):  # until the request is at the server (reserved and sent)
        if srv.requests:
            break
        await asyncio.sleep(0.02)
    admin = redis.Redis.from_url(redis_url)
    try:
        admin.client_pause(3000, all=False)  # writes wait: the settle script that follows the answer blocks
        await asyncio.sleep(1.5)  # the answer (0.3 s late) is read; the commit is waiting on Redis (CI slack)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        admin.client_unpause()
        admin.close()
    (event,) = list(led.events())
    price = g.prices.price("gpt-4o-mini", "openai")
    assert (event.status, event.input_tokens, event.output_tokens) == ("ok", 700, 9)
    assert event.cost_micros == g.prices.cost_micros(price, tokenbudget.calls.Usage(input_tokens=700, output_tokens=9))
    assert led.active_reservations(now=time.time()) == []
    (span,) = otel.spans()
    assert span.attributes["tokenbudget.status"] == "ok"
    tokenbudget.uninstall()
