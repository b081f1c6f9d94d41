"""The SQLite ledger: the shared contract, plus what only a file shared by many processes can get wrong."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import tokenbudget.ledger.sqlite as sqlite_mod
from ledger_contract import (
    T0,
    LedgerContract,
    assert_account_exact,
    assert_lease_frees_a_dead_holder,
    contend,
    full_event,
    ledger_machine_test,
    run_children,
)
from tokenbudget.errors import ConfigError, LedgerError
from tokenbudget.events import CallEvent
from tokenbudget.ledger import Allowance, Grant, Ledger, MemoryLedger, Refusal, Reservation, open_ledger
from tokenbudget.ledger.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteLedger, default_ledger_path

POSIX = os.name == "posix"
SPAWN = multiprocessing.get_context("spawn")


class TestSQLiteLedger(LedgerContract):
    answers_nowait = True

    @pytest.fixture
    def make_ledger(self, tmp_path: Path) -> Callable[[], Ledger]:
        return lambda: SQLiteLedger(tmp_path / "ledger.db")


def _make(stack: ExitStack) -> Ledger:
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="tb-ledger-"))
    led = SQLiteLedger(os.path.join(tmp, "ledger.db"))
    stack.callback(led.close)
    return led


TestSQLiteLedgerMachine = ledger_machine_test(_make, max_examples=40, steps=40)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(path: Path) -> Iterator[SQLiteLedger]:
    led = SQLiteLedger(path)
    try:
        yield led
    finally:
        led.close()


def _event(n: int, cost: int, keys: tuple[str, ...], now: float = T0) -> CallEvent:
    return CallEvent(id=f"e{n}", time=now, provider="openai", model="gpt-4o-mini", cost_micros=cost, budget_keys=keys)




# -- persistence, URLs, defaults -----------------------------------------------------------------------------------
def test_survives_reopen_and_two_handles_share_one_file(path: Path) -> None:
    a = Allowance("k", "s", limit_micros=1000)
    one = SQLiteLedger(path)
    two = SQLiteLedger(path)
    r = one.reserve([a], 700, 0, lease_seconds=60, now=T0)
    assert isinstance(r, Reservation)
    assert isinstance(two.reserve([a], 301, 0, lease_seconds=60, now=T0), Refusal)
    assert two.settle(r, 500, 0, _event(1, 500, r.keys), now=T0)
    assert one.settle(r, 500, 0, _event(2, 500, r.keys), now=T0) is False
    one.close()
    two.close()
    three = SQLiteLedger(path)
    assert three.balance(a, now=T0).spent_micros == 500
    assert [e.id for e in three.events()] == ["e1"]
    three.close()


def test_url_is_absolute_and_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    led = SQLiteLedger("rel/ledger.db")
    assert led.path == tmp_path / "rel" / "ledger.db"
    assert led.url == "sqlite:///" + str(tmp_path / "rel" / "ledger.db")
    again = open_ledger(led.url)
    assert isinstance(again, SQLiteLedger) and again.path == led.path
    led.close()
    again.close()


def test_open_ledger_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import platformdirs

    assert isinstance(open_ledger("memory://"), MemoryLedger)
    monkeypatch.chdir(tmp_path)
    rel = open_ledger("sqlite:///data/rel.db")
    assert isinstance(rel, SQLiteLedger) and rel.path == tmp_path / "data" / "rel.db" and rel.path.exists()
    absolute = open_ledger("sqlite:///" + str(tmp_path / "abs.db"))
    assert isinstance(absolute, SQLiteLedger) and absolute.path == tmp_path / "abs.db"
    monkeypatch.setattr(platformdirs, "user_state_dir", lambda app: str(tmp_path / "state" / app))
    assert default_ledger_path() == tmp_path / "state" / "tokenbudget" / "ledger.db"
    default = open_ledger(None)
    assert isinstance(default, SQLiteLedger) and default.path == tmp_path / "state" / "tokenbudget" / "ledger.db"
    for led in (rel, absolute, default):
        led.close()


@pytest.mark.parametrize("url", ["postgres://db/x", "sqlite://", "sqlite:///", "memory", "", "file:///tmp/x.db"])
def test_open_ledger_rejects_unknown_forms(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_ledger(url)
    assert info.value.key == "ledger"
    assert "memory://" in str(info.value) and "sqlite:///" in str(info.value) and "redis://" in str(info.value)


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://cache.internal:6380/1"])
def test_open_ledger_redis_missing_says_what_to_install(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenbudget.ledger.redis", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"tokenbudget\[redis\]") as info:
        open_ledger(url)
    assert info.value.key == "ledger"


def test_open_ledger_redis_is_imported_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []

    class FakeRedisLedger(MemoryLedger):
        def __init__(self, url: str, **options: Any) -> None:
            super().__init__()
            made.append(url)

    fake = types.ModuleType("tokenbudget.ledger.redis")
    fake.RedisLedger = FakeRedisLedger  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tokenbudget.ledger.redis", fake)
    assert isinstance(open_ledger("redis://h:1/2"), FakeRedisLedger)
    assert made == ["redis://h:1/2"]


def test_lazy_exports() -> None:
    import tokenbudget.ledger as pkg

    assert pkg.SQLiteLedger is SQLiteLedger
    assert pkg.default_ledger_path is default_ledger_path
    with pytest.raises(AttributeError):
        _ = pkg.NoSuchLedger


# -- files -----------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_file_and_directory_are_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "ledger.db"
    old = os.umask(0)
    try:
        led = SQLiteLedger(path)
        r = led.reserve([Allowance("k", "s")], 1, 1, lease_seconds=60, now=T0)
        assert isinstance(r, Reservation)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        sidecars = [Path(str(path) + s) for s in ("-wal", "-shm")]
        assert any(p.exists() for p in sidecars)
        for p in sidecars:
            if p.exists():
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        led.close()
    finally:
        os.umask(old)


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_existing_file_permissions_are_left_alone(path: Path) -> None:
    SQLiteLedger(path).close()
    os.chmod(path, 0o640)  # e.g. a deliberately group-shared ledger
    SQLiteLedger(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_corrupt_file_is_a_ledger_error_naming_the_file(path: Path) -> None:
    path.write_bytes(b"this is not a database, it only looks like one\n" * 200)
    with pytest.raises(LedgerError) as info:
        SQLiteLedger(path)
    assert str(path) in str(info.value) and "Move it aside" in str(info.value)


def test_file_in_an_uncreatable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LedgerError) as info:
        SQLiteLedger(blocker / "ledger.db")
    assert str(blocker) in str(info.value)


# -- schema ----------------------------------------------------------------------------------------------------------
def _user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def _indexes(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        conn.close()


def test_new_file_is_at_the_latest_schema(ledger: SQLiteLedger, path: Path) -> None:
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 2
    assert _user_version(path) == SCHEMA_VERSION
    assert "grants_scope" in _indexes(path)


def test_migrates_a_version_1_file(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO accounts (key, scope, spent_micros, reserved_micros) VALUES ('k', 's', 300, 200)")
    conn.execute(
        "INSERT INTO reservations (id, keys, micros, tokens, expires_at, state, created_at) "
        "VALUES ('r1', '[\"k\"]', 200, 0, ?, 'held', ?)",
        (T0 + 60, T0),
    )
    conn.execute(
        "INSERT INTO events (id, time, provider, model, operation, status, decision, cost_micros, budget_keys) "
        "VALUES ('old', ?, 'openai', 'gpt-4o', 'chat', 'ok', 'allow', 300, '[\"k\"]')",
        (T0 - 1,),
    )
    conn.execute("INSERT INTO grants (id, scope, micros, tokens, created_at) VALUES ('g', 's', 1000, 0, ?)", (T0,))
    conn.execute("COMMIT")
    conn.close()
    assert _user_version(path) == 1 and "grants_scope" not in _indexes(path)

    led = SQLiteLedger(path)
    assert _user_version(path) == SCHEMA_VERSION
    assert "grants_scope" in _indexes(path)
    a = Allowance("k", "s", limit_micros=1000)
    bal = led.balance(a, now=T0)
    assert (bal.spent_micros, bal.reserved_micros, bal.limit_micros, bal.granted_micros) == (300, 200, 2000, 1000)
    [old] = led.events()
    assert old.id == "old" and old.cost_micros == 300 and old.budget_keys == ("k",) and old.tags == {}
    held = led.active_reservations(now=T0)
    assert [r.id for r in held] == ["r1"]
    assert led.settle(held[0], 150, 0, _event(1, 150, ("k",)), now=T0)
    assert led.settle(held[0], 150, 0, None, now=T0) is False
    bal = led.balance(a, now=T0)
    assert (bal.spent_micros, bal.reserved_micros) == (450, 0)
    led.close()


def test_a_newer_schema_is_refused(path: Path) -> None:
    SQLiteLedger(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="newer tokenbudget") as info:
        SQLiteLedger(path)
    assert str(path) in str(info.value)


def test_a_failing_migration_changes_nothing(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    SQLiteLedger(path).close()
    broken = (*MIGRATIONS, ("CREATE TABLE half_done (x INTEGER)", "THIS IS NOT SQL"))
    monkeypatch.setattr(sqlite_mod, "MIGRATIONS", broken)
    monkeypatch.setattr(sqlite_mod, "SCHEMA_VERSION", len(broken))
    with pytest.raises(LedgerError, match="migrating"):
        SQLiteLedger(path)
    assert _user_version(path) == len(MIGRATIONS)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0
    conn.close()


def test_concurrent_first_open_migrates_once(path: Path) -> None:
    errors: list[BaseException] = []
    opened: list[SQLiteLedger] = []
    barrier = threading.Barrier(8)

    def open_it() -> None:
        barrier.wait()
        try:
            opened.append(SQLiteLedger(path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == 8
    assert _user_version(path) == SCHEMA_VERSION
    for led in opened:
        led.close()


def test_events_use_the_time_index(ledger: SQLiteLedger, path: Path) -> None:
    conn = sqlite3.connect(path)
    plan = " ".join(
        str(row[-1])
        for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM events WHERE time < ? AND (time, seq) > (?, ?) "
            "ORDER BY time, seq LIMIT 10",
            (1.0, 0.0, 0),
        )
    )
    conn.close()
    assert "events_time" in plan and "TEMP B-TREE" not in plan


# -- failures --------------------------------------------------------------------------------------------------------
def test_locked_file_is_a_ledger_error_and_nothing_half_written(path: Path) -> None:
    a = Allowance("k", "s", limit_micros=1000)
    led = SQLiteLedger(path, busy_timeout=0.2)
    r = led.reserve([a], 400, 4, lease_seconds=600, now=T0)
    assert isinstance(r, Reservation)

    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    blocker.execute("UPDATE accounts SET reserved_micros = reserved_micros + 999")  # never committed
    started = time.monotonic()
    with pytest.raises(LedgerError) as info:
        led.reserve([a], 100, 0, lease_seconds=600, now=T0)
    assert 0.15 <= time.monotonic() - started < 5
    assert str(path) in str(info.value) and "busy_timeout" in str(info.value)
    with pytest.raises(LedgerError, match="settle"):
        led.settle(r, 300, 3, _event(1, 300, r.keys), now=T0)
    with pytest.raises(LedgerError):
        led.record(_event(2, 0, ()))
    # Readers are not blocked by a writer in WAL mode, and see only committed state.
    assert led.balance(a, now=T0).reserved_micros == 400
    blocker.execute("ROLLBACK")

    # The ledger holds no lock of its own after the failures...
    probe = sqlite3.connect(path, isolation_level=None, timeout=0)
    probe.execute("BEGIN IMMEDIATE")
    probe.execute("ROLLBACK")
    probe.close()
    blocker.close()
    # ...and retrying the failed settle charges exactly once.
    assert led.settle(r, 300, 3, _event(1, 300, r.keys), now=T0) is True
    assert led.settle(r, 300, 3, _event(3, 300, r.keys), now=T0) is False
    bal = led.balance(a, now=T0)
    assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (300, 0, 3, 0)
    assert_account_exact(led, a, now=T0)
    assert [e.id for e in led.events()] == ["e1"]
    led.close()


def test_threads_wait_for_each_other_not_fail(ledger: SQLiteLedger) -> None:
    a = Allowance("k", "s")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(50):
                r = ledger.reserve([a], 10, 1, lease_seconds=60, now=T0)
                assert isinstance(r, Reservation)
                ledger.settle(r, 10, 1, _event(i, 10, r.keys), now=T0)
                ledger.balance(a, now=T0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ledger.balance(a, now=T0).spent_micros == 8 * 50 * 10
    assert_account_exact(ledger, a, now=T0)


def test_disk_full_mid_run_leaves_the_ledger_exact(ledger: SQLiteLedger) -> None:
    a = Allowance("k", "s")
    # Cap the file at its current size on the pooled connection: the next page it needs fails with SQLITE_FULL.
    conn = ledger._checkout()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    ledger._checkin(conn)
    failed_at = None
    pending: list[Reservation] = []
    for i in range(10_000):
        try:
            r = ledger.reserve([a], 7, 1, lease_seconds=600, now=T0)
            assert isinstance(r, Reservation)
            pending.append(r)
            ledger.settle(r, 7, 1, _event(i, 7, r.keys), now=T0)
            pending.pop()
        except LedgerError as exc:
            assert "disk is full" in str(exc) and str(ledger.path) in str(exc)
            failed_at = i
            break
    assert failed_at is not None
    # The failed connection was dropped; the next one has no cap, so outstanding work can finish exactly once.
    for r in pending:
        assert ledger.settle(r, 7, 1, _event(10**6, 7, r.keys), now=T0) is True
    assert_account_exact(ledger, a, now=T0)
    assert ledger.balance(a, now=T0).reserved_micros == 0


def _readonly_attempt(path: str, out: Any) -> None:
    """Child: try the ledger as a user who may read the file but not write it."""
    if os.geteuid() == 0:  # root ignores file modes: become nobody
        os.setgid(65534)
        os.setuid(65534)
    messages = []
    try:
        led = SQLiteLedger(path)
    except LedgerError as exc:
        messages.append(str(exc))
    else:
        a = Allowance("k", "s", limit_micros=1000)
        try:
            led.reserve([a], 1, 0, lease_seconds=60, now=T0)
        except LedgerError as exc:
            messages.append(str(exc))
    out.put(messages)


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_read_only_file_is_a_ledger_error_and_the_ledger_stays_exact() -> None:
    a = Allowance("k", "s", limit_micros=1000)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:  # a directory the unprivileged child can reach
        os.chmod(tmp, 0o755)
        path = Path(tmp) / "ledger.db"
        led = SQLiteLedger(path)
        r = led.reserve([a], 500, 0, lease_seconds=600, now=T0)
        assert isinstance(r, Reservation)
        files = [p for p in Path(tmp).iterdir()]
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in files}
        try:
            for p in files:
                os.chmod(p, 0o444)
            os.chmod(tmp, 0o555)
            out = SPAWN.Queue()
            child = SPAWN.Process(target=_readonly_attempt, args=(str(path), out))
            child.start()
            messages = out.get(timeout=60)
            child.join(60)
            assert child.exitcode == 0
        finally:
            os.chmod(tmp, 0o755)
            for p, mode in modes.items():
                os.chmod(p, mode)
        assert len(messages) == 1, messages
        assert str(path) in messages[0] and "read-only" in messages[0]
        assert led.settle(r, 450, 0, _event(1, 450, r.keys), now=T0) is True
        bal = led.balance(a, now=T0)
        assert (bal.spent_micros, bal.reserved_micros) == (450, 0)
        assert_account_exact(led, a, now=T0)
        led.close()


# -- many processes --------------------------------------------------------------------------------------------------
def _contend(path: str, key: str, limit: int, amount: int, threads: int, attempts: int, barrier: Any, out: Any) -> None:
    led = SQLiteLedger(path, busy_timeout=60)
    contend(led, Allowance(key, "shared", limit_micros=limit), amount, threads, attempts, barrier, out)


def test_processes_and_threads_never_overspend(path: Path) -> None:
    procs_n, threads_n, attempts, amount, k = 4, 16, 3, 1_234, 100
    limit = k * amount
    SQLiteLedger(path).close()  # create and migrate once, up front
    results = run_children(_contend, procs_n, (str(path), "team:2026", limit, amount, threads_n, attempts))
    errors = [e for _, errs in results for e in errs]
    assert errors == []
    ok = sum(t[0] for t, _ in results)
    refused = sum(t[1] for t, _ in results)
    over = sum(t[2] for t, _ in results)
    assert ok == k and ok + refused == procs_n * threads_n * attempts and over == 0

    led = SQLiteLedger(path)
    a = Allowance("team:2026", "shared", limit_micros=limit)
    now = time.time()
    bal = led.balance(a, now=now)
    assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (limit, 0, k, 0)
    events = list(led.events())
    assert len(events) == k and sum(e.cost_micros for e in events) == limit
    assert led.active_reservations(now=now) == []
    led.close()


def _reserve_and_hang(path: str, limit: int, now: float, out: Any) -> None:
    led = SQLiteLedger(path)
    r = led.reserve([Allowance("k", "s", limit_micros=limit)], limit, 0, lease_seconds=30, now=now)
    out.put(r)
    time.sleep(600)


def _hang_inside_a_transaction(path: str, out: Any) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE accounts SET reserved_micros = reserved_micros + 777, spent_micros = spent_micros + 1")
    out.put("holding")
    time.sleep(600)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_holder_blocks_only_until_its_lease_ends(path: Path) -> None:
    limit = 1000
    a = Allowance("k", "s", limit_micros=limit)
    SQLiteLedger(path).close()
    out = SPAWN.Queue()
    child = SPAWN.Process(target=_reserve_and_hang, args=(str(path), limit, T0, out))
    child.start()
    try:
        held = out.get(timeout=60)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(30)
    assert isinstance(held, Reservation) and held.expires_at == T0 + 30
    assert child.exitcode == -signal.SIGKILL

    led = SQLiteLedger(path, busy_timeout=1)
    assert_lease_frees_a_dead_holder(led, a, held, limit)  # the lease ends: the dead process's hold is free

    # A process killed mid-transaction leaves nothing behind, and its lock dies with it.
    out2 = SPAWN.Queue()
    child = SPAWN.Process(target=_hang_inside_a_transaction, args=(str(path), out2))
    child.start()
    try:
        assert out2.get(timeout=60) == "holding"
    finally:
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(30)
    led.record(_event(2, 0, ()))  # takes the write lock
    bal = led.balance(a, now=T0 + 30)
    assert (bal.spent_micros, bal.reserved_micros) == (limit, 0)
    led.close()


def _use_inherited(led: SQLiteLedger, out: Any) -> None:
    a = Allowance("k", "s")
    r = led.reserve([a], 5, 0, lease_seconds=60, now=T0)
    assert isinstance(r, Reservation)
    out.put(led.settle(r, 5, 0, _event(9, 5, r.keys), now=T0))


@pytest.mark.skipif(not POSIX or "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_does_not_reuse_the_parents_connections(ledger: SQLiteLedger) -> None:
    a = Allowance("k", "s")
    r = ledger.reserve([a], 5, 0, lease_seconds=60, now=T0)  # the pool now holds a live connection
    assert isinstance(r, Reservation)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_use_inherited, args=(ledger, out))
    child.start()
    assert out.get(timeout=60) is True
    child.join(30)
    assert child.exitcode == 0
    assert ledger.settle(r, 5, 0, _event(8, 5, r.keys), now=T0)
    assert ledger.balance(a, now=T0).spent_micros == 10
    assert_account_exact(ledger, a, now=T0)


def test_full_event_survives_other_processes(path: Path) -> None:
    led = SQLiteLedger(path)
    led.record(full_event(3))
    led.close()
    assert list(SQLiteLedger(path).events()) == [full_event(3)]


def test_throughput_smoke(ledger: SQLiteLedger) -> None:
    """Not a benchmark: catches a regression to one fsync per commit (which would be ~100x slower)."""
    a = Allowance("k", "s", limit_micros=10**15)
    n = 500
    started = time.perf_counter()
    for i in range(n):
        r = ledger.reserve([a], 100, 10, lease_seconds=60, now=T0)
        assert isinstance(r, Reservation)
        ledger.settle(r, 90, 9, _event(i, 90, r.keys), now=T0)
    rate = n / (time.perf_counter() - started)
    assert rate > 300, f"{rate:.0f} reserve+settle pairs/s"


# -- statements per call (each is a round through the sqlite3 module on the caller's thread) -----------------------
def _traced(ledger: SQLiteLedger) -> list[str]:
    """Every statement the ledger's (only) pooled connection runs from now on."""
    conn = ledger._checkout()
    assert ledger._idle == []  # the next operation gets this very connection back
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    ledger._checkin(conn)
    return seen


def test_a_call_costs_few_statements_and_balance_is_one_read(ledger: SQLiteLedger) -> None:
    a = Allowance("k", "s", limit_micros=1000)
    w = Allowance("w", "ws", limit_micros=1, enforce=False)
    seen = _traced(ledger)
    r = ledger.reserve([a, w], 100, 10, lease_seconds=60, now=T0)
    assert isinstance(r, Reservation)
    assert seen[0] == "BEGIN IMMEDIATE" and seen[-1] == "COMMIT" and len(seen) == 5, seen
    seen.clear()
    assert ledger.settle(r, 40, 4, _event(1, 40, r.keys), now=T0)
    assert seen[0] == "BEGIN IMMEDIATE" and seen[-1] == "COMMIT" and len(seen) == 5, seen
    seen.clear()
    bal = ledger.balance(a, now=T0)
    assert len(seen) == 1 and seen[0].startswith("SELECT"), seen  # no BEGIN/COMMIT: one statement is one snapshot
    assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (40, 0, 4, 0)
    conn = ledger._checkout()
    assert not conn.in_transaction  # the read left no snapshot pinned
    ledger._checkin(conn)
    seen.clear()
    assert ledger.settle(r, 40, 4, _event(2, 40, r.keys), now=T0) is False  # a repeat reads the row and stops
    assert len(seen) == 4, seen


def test_settle_and_read_reads_in_the_settles_own_statements(ledger: SQLiteLedger) -> None:
    """The balances come back from the account update itself: no read of their own, no second transaction."""
    a = Allowance("k", "s", limit_micros=1000, limit_tokens=100)
    w = Allowance("w", "ws", limit_micros=1, enforce=False)
    ledger.grant(Grant("g", "s", 50, 5, created_at=T0, expires_at=None))
    seen = _traced(ledger)
    first = ledger.reserve([a, w], 100, 10, lease_seconds=60, now=T0)
    second = ledger.reserve([a, w], 100, 10, lease_seconds=60, now=T0)
    assert isinstance(first, Reservation) and isinstance(second, Reservation)
    seen.clear()
    assert ledger.settle(first, 40, 4, _event(1, 40, first.keys), now=T0)
    ledger.balance(a, now=T0)
    apart = list(seen)
    seen.clear()
    charged, balances = ledger.settle_and_read(second, 30, 3, _event(2, 30, second.keys), now=T0, allowances=[a])
    assert charged is True
    assert len(seen) == len(apart) - 1 == 5 and seen.count("BEGIN IMMEDIATE") == 1, (seen, apart)
    assert not any(sql.startswith("SELECT") for sql in seen), seen
    assert balances == {"k": ledger.balance(a, now=T0)}
    assert (balances["k"].spent_micros, balances["k"].reserved_micros, balances["k"].limit_micros) == (70, 0, 1050)


def test_settle_and_read_reads_apart_when_the_returned_rows_are_not_enough(ledger: SQLiteLedger) -> None:
    """A hold past its lease (balance() leaves it out), a budget the call did not hold, or a repeat: the balances
    come from the full read, inside the settle's own transaction, and still equal balance()'s."""
    a = Allowance("k", "s", limit_micros=1000)
    b = Allowance("k2", "s2", limit_micros=1000)
    stale = ledger.reserve([a], 300, 3, lease_seconds=5, now=T0)  # never settled, past its lease at T0 + 10
    r = ledger.reserve([a], 100, 1, lease_seconds=60, now=T0)
    assert isinstance(stale, Reservation) and isinstance(r, Reservation)
    seen = _traced(ledger)
    charged, balances = ledger.settle_and_read(r, 50, 1, None, now=T0 + 10, allowances=[a])
    assert charged is True and seen.count("BEGIN IMMEDIATE") == 1 and seen[-1] == "COMMIT", seen
    assert balances == {"k": ledger.balance(a, now=T0 + 10)}
    assert (balances["k"].spent_micros, balances["k"].reserved_micros) == (50, 0)  # the stale hold is left out
    assert ledger.active_reservations(now=T0) == [stale]  # read around, not swept: as balance() does
    r2 = ledger.reserve([a], 100, 1, lease_seconds=60, now=T0 + 10)  # sweeps the stale hold
    assert isinstance(r2, Reservation)
    charged, balances = ledger.settle_and_read(r2, 20, 1, None, now=T0 + 10, allowances=[a, b])  # b: not held
    assert charged is True and balances == {x.key: ledger.balance(x, now=T0 + 10) for x in (a, b)}
    charged, balances = ledger.settle_and_read(r2, 20, 1, None, now=T0 + 10, allowances=[a])
    assert charged is False and balances["k"].spent_micros == 70
    # The same key asked about under another scope: its grants are that scope's, as balance() sums them.
    renamed = Allowance("k", "s-renamed", limit_micros=1000)
    ledger.grant(Grant("g", "s-renamed", 5, 0, created_at=T0, expires_at=None))
    r3 = ledger.reserve([a], 10, 0, lease_seconds=60, now=T0 + 10)
    assert isinstance(r3, Reservation)
    charged, balances = ledger.settle_and_read(r3, 10, 0, None, now=T0 + 10, allowances=[renamed])
    assert balances == {"k": ledger.balance(renamed, now=T0 + 10)} and balances["k"].limit_micros == 1005


async def test_async_settle_and_read_uses_the_one_transaction_off_the_loop(ledger: SQLiteLedger) -> None:
    a = Allowance("k", "s", limit_micros=1000)
    r = ledger.reserve([a], 100, 1, lease_seconds=60, now=T0)
    assert isinstance(r, Reservation)
    seen = _traced(ledger)
    threads: set[int] = set()
    real = ledger._settle_and_read

    def spy(*args: Any) -> Any:
        threads.add(threading.get_ident())
        return real(*args)

    ledger._settle_and_read = spy  # type: ignore[method-assign]
    charged, balances = await ledger.asettle_and_read(r, 40, 1, None, now=T0, allowances=[a])
    assert charged is True and balances["k"].spent_micros == 40
    assert threads and threading.get_ident() not in threads  # ran on a worker thread, not the event loop's
    assert seen.count("BEGIN IMMEDIATE") == 1 and not any(sql.startswith("SELECT") for sql in seen), seen


def test_reserve_sweeps_expired_holds_it_read_in_the_same_statement(ledger: SQLiteLedger) -> None:
    a = Allowance("k", "s", limit_micros=1000)
    b = Allowance("k2", "s2", limit_micros=1000)
    old = ledger.reserve([a, b, a], 300, 3, lease_seconds=10, now=T0)  # k mentioned twice: held twice
    assert isinstance(old, Reservation)
    assert ledger.balance(a, now=T0).reserved_micros == 600
    # Past the lease, a balance leaves the hold out without sweeping; a reserve sweeps it and fits because of it.
    assert ledger.balance(a, now=T0 + 11).reserved_micros == 0
    assert [r.id for r in ledger.active_reservations(now=T0)] == [old.id]
    seen = _traced(ledger)
    new = ledger.reserve([a], 1000, 0, lease_seconds=60, now=T0 + 11)
    assert isinstance(new, Reservation)
    assert any("state = 'expired'" in sql for sql in seen), seen
    assert ledger.active_reservations(now=T0) == [new]
    for al, held in ((a, 1000), (b, 0)):
        bal = ledger.balance(al, now=T0 + 11)
        assert (bal.reserved_micros, bal.reserved_tokens) == (held, 0)
    # The late settle of the swept hold charges every mention once and gives nothing back twice.
    assert ledger.settle(old, 100, 1, _event(1, 100, old.keys), now=T0 + 12)
    assert ledger.settle(old, 100, 1, _event(2, 100, old.keys), now=T0 + 12) is False
    bal_a, bal_b = ledger.balance(a, now=T0 + 12), ledger.balance(b, now=T0 + 12)
    assert (bal_a.spent_micros, bal_a.reserved_micros, bal_a.spent_tokens) == (200, 1000, 2)
    assert (bal_b.spent_micros, bal_b.reserved_micros, bal_b.spent_tokens) == (100, 0, 1)


def test_without_returning_settle_reads_then_updates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite 3.24-3.34 has no UPDATE ... RETURNING: the same settle, one statement more."""
    monkeypatch.setattr(sqlite_mod, "_RETURNING", False)
    led = SQLiteLedger(path)
    a = Allowance("k", "s", limit_micros=1000)
    seen = _traced(led)
    r = led.reserve([a], 500, 5, lease_seconds=10, now=T0)
    assert isinstance(r, Reservation)
    seen.clear()
    assert led.settle(r, 200, 2, _event(1, 200, r.keys), now=T0)
    assert not any("RETURNING" in sql for sql in seen) and len(seen) == 6, seen
    assert led.settle(r, 200, 2, _event(2, 200, r.keys), now=T0) is False
    late = led.reserve([a], 300, 3, lease_seconds=10, now=T0)
    assert isinstance(late, Reservation)
    assert led.settle(late, 300, 3, _event(3, 300, late.keys), now=T0 + 20)  # expired: charged, nothing given back
    bal = led.balance(a, now=T0 + 20)
    assert (bal.spent_micros, bal.reserved_micros, bal.spent_tokens, bal.reserved_tokens) == (500, 0, 5, 0)
    assert_account_exact(led, a, now=T0 + 20)
    held = led.reserve([a], 100, 1, lease_seconds=10, now=T0 + 20)
    assert isinstance(held, Reservation)
    seen.clear()
    charged, balances = led.settle_and_read(held, 50, 1, None, now=T0 + 20, allowances=[a])
    assert charged is True and balances == {"k": led.balance(a, now=T0 + 20)}
    assert seen.count("BEGIN IMMEDIATE") == 1 and not any("RETURNING" in sql for sql in seen), seen
    assert (balances["k"].spent_micros, balances["k"].reserved_micros) == (550, 0)
    led.close()


def test_event_tags_and_keys_round_trip_through_the_memoized_encoding(ledger: SQLiteLedger) -> None:
    keys = ("org@total", "team@2026-01-01")
    for n, tags in enumerate(({}, {"b": "2", "a": "1"}, {})):
        ledger.record(CallEvent(id=f"t{n}", time=T0 + n, provider="openai", model="m", tags=tags, budget_keys=keys))
    ledger.record(CallEvent(id="t3", time=T0 + 3, provider="openai", model="m", tags={}, budget_keys=list(keys)))
    got = list(ledger.events())
    assert [e.tags for e in got] == [{}, {"a": "1", "b": "2"}, {}, {}]
    assert all(e.budget_keys == keys for e in got)


# -- pruning finished reservations -----------------------------------------------------------------------------------
def _rows(path: Path) -> dict[str, str]:
    """Every reservation row's state, by id, read straight from the file."""
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT id, state FROM reservations").fetchall())
    finally:
        conn.close()


def _pairs(led: Ledger, a: Allowance, n: int, now: float, *, lease: float = 10, cost: int = 7) -> list[Reservation]:
    done = []
    for _ in range(n):
        r = led.reserve([a], 10, 1, lease_seconds=lease, now=now)
        assert isinstance(r, Reservation)
        assert led.settle(r, cost, 1, _event(len(done), cost, r.keys, now), now=now) is True
        done.append(r)
    return done


def test_settled_ttl_must_be_positive(path: Path) -> None:
    with pytest.raises(ValueError, match="settled_ttl"):
        SQLiteLedger(path, settled_ttl=0)


def test_finished_reservations_past_the_ttl_are_pruned_and_recent_ones_kept(path: Path) -> None:
    """After enough settles, rows whose lease and settle are both more than ``settled_ttl`` old are gone (settled
    ones, and one expired and never settled); a row settled late, within the ttl, stays and still refuses a repeat."""
    led = SQLiteLedger(path, settled_ttl=100)
    a = Allowance("k", "s", limit_micros=10**9)
    old = _pairs(led, a, 10, T0)
    lost = led.reserve([a], 10, 1, lease_seconds=10, now=T0)  # its holder died: expired by the next reserve
    late = led.reserve([a], 10, 1, lease_seconds=10, now=T0)
    assert isinstance(lost, Reservation) and isinstance(late, Reservation)
    assert led.settle(late, 7, 1, None, now=T0 + 50) is True  # after its lease: settled at T0 + 50
    fresh = _pairs(led, a, sqlite_mod._PRUNE_EVERY - 11, T0 + 120)  # the last one prunes, at cutoff T0 + 20
    rows = _rows(path)
    assert not {r.id for r in [*old, lost]} & rows.keys()
    assert rows[late.id] == "settled" and all(rows[r.id] == "settled" for r in fresh)
    spent = led.balance(a, now=T0 + 120).spent_micros
    assert led.settle(late, 7, 1, None, now=T0 + 120) is False  # within the ttl a repeat charges nothing
    assert led.balance(a, now=T0 + 120).spent_micros == spent == 7 * (10 + 1 + len(fresh))
    led.close()


def test_a_held_reservation_is_never_pruned_however_old(path: Path) -> None:
    """A hold past its lease that no reserve has swept yet is still ``held``: deleting its row would keep its amount
    reserved in the accounts forever. Pruning leaves it, and the next reserve gives it back."""
    led = SQLiteLedger(path, settled_ttl=1)
    a = Allowance("k", "s", limit_micros=10**9)
    old = _pairs(led, a, 5, T0)
    stale = led.reserve([a], 500, 5, lease_seconds=5, now=T0)
    forever = led.reserve([a], 300, 3, lease_seconds=10**6, now=T0)
    open_ = [led.reserve([a], 10, 1, lease_seconds=10**6, now=T0) for _ in range(sqlite_mod._PRUNE_EVERY)]
    for r in open_:  # settles only, no reserve: nothing sweeps ``stale`` before the prune runs
        assert isinstance(r, Reservation)
        led.settle(r, 7, 1, None, now=T0 + 1000)
    rows = _rows(path)
    assert not {r.id for r in old} & rows.keys()  # the prune did run
    assert isinstance(stale, Reservation) and isinstance(forever, Reservation)
    assert rows[stale.id] == "held" and rows[forever.id] == "held"
    assert led.balance(a, now=T0 + 4).reserved_micros == 800
    assert isinstance(led.reserve([a], 1, 0, lease_seconds=1, now=T0 + 1000), Reservation)  # sweeps ``stale``
    assert led.accounts()[0].reserved_micros == 300 + 1
    led.close()


def test_pruning_changes_no_balance_and_no_event(tmp_path: Path) -> None:
    """The same calls on a ledger that prunes and on one that cannot (ttl far beyond the test) end identical."""
    pruning = SQLiteLedger(tmp_path / "pruning.db", settled_ttl=5)
    keeping = SQLiteLedger(tmp_path / "keeping.db", settled_ttl=10**9)
    a = Allowance("k", "s", limit_micros=10**9, limit_tokens=10**6)
    b = Allowance("w", "ws", limit_micros=10**9, enforce=False)
    for led in (pruning, keeping):
        for i in range(3 * sqlite_mod._PRUNE_EVERY):
            now = T0 + i
            r = led.reserve([a, b], 10, 2, lease_seconds=3, now=now)
            assert isinstance(r, Reservation)
            if i % 7:  # every 7th holder dies: its hold expires
                led.settle_and_read(r, i % 11, 1, _event(i, i % 11, r.keys, now), now=now, allowances=[a, b])
    assert len(_rows(tmp_path / "pruning.db")) < len(_rows(tmp_path / "keeping.db"))
    now = T0 + 3 * sqlite_mod._PRUNE_EVERY
    assert pruning.accounts() == keeping.accounts()
    assert [pruning.balance(x, now=now) for x in (a, b)] == [keeping.balance(x, now=now) for x in (a, b)]
    assert list(pruning.events()) == list(keeping.events())
    pruning.close()
    keeping.close()


# -- steps in place, for async callers ------------------------------------------------------------------------------
def _pair_as_the_async_guard_does(led: SQLiteLedger, a: Allowance, now: float, tally: list[int]) -> None:
    """A reserve and a settle as :class:`Guard` makes them for an async caller: at once if the ledger can, else the
    waiting form (which ``asettle_and_read`` runs in a worker thread). ``tally`` counts [in place, waited]."""
    r = led.reserve_nowait([a], 100, 10, lease_seconds=60, now=now)
    if r is None:
        tally[1] += 1
        r = led.reserve([a], 100, 10, lease_seconds=60, now=now)
    else:
        tally[0] += 1
    assert isinstance(r, Reservation)
    done = led.settle_and_read_nowait(r, 40, 4, _event(0, 40, r.keys, now), now=now, allowances=[a])
    if done is None:
        tally[1] += 1
        done = led.settle_and_read(r, 40, 4, _event(0, 40, r.keys, now), now=now, allowances=[a])
    else:
        tally[0] += 1
    assert done[0] is True


def test_in_place_steps_leave_checkpoints_and_pruning_to_a_thread(path: Path) -> None:
    """The in-place connection never checkpoints (an fsync on the event loop); every 64th step goes the waiting
    way, whose commit checkpoints when due, so the WAL stays near SQLite's own bound instead of growing by every
    commit, and pruning still runs (on the waiting path, never in place)."""
    led = SQLiteLedger(path, settled_ttl=10)
    a = Allowance("k", "s", limit_micros=10**12)
    tally = [0, 0]
    wal = Path(str(path) + "-wal")
    most_wal = most_rows = 0
    for i in range(3000):
        _pair_as_the_async_guard_does(led, a, T0 + i, tally)
        if i % 100 == 99:
            most_wal, most_rows = max(most_wal, wal.stat().st_size), max(most_rows, len(_rows(path)))
    in_place, waited = tally
    assert waited >= 6000 // (sqlite_mod._NOWAIT_RUN + 1) and in_place >= 6000 * 0.9, tally
    checkpoint_bytes = 4_096_000  # wal_autocheckpoint in bytes (see SQLiteLedger._connect)
    assert most_wal < 2 * checkpoint_bytes, most_wal  # 6,000 commits of ~4.5 KiB each would be ~27 MB
    assert most_rows < 2 * sqlite_mod._PRUNE_EVERY, most_rows
    assert led.balance(a, now=T0 + 3000).spent_micros == 40 * 3000
    led.close()


def test_a_write_lock_held_by_another_process_is_waited_for_in_a_thread(path: Path) -> None:
    """busy_timeout is zero in place: a reserve that would wait answers None at once, having done nothing."""
    led = SQLiteLedger(path, busy_timeout=5)
    a = Allowance("k", "s", limit_micros=1000)
    other = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.perf_counter()
        assert led.reserve_nowait([a], 100, 1, lease_seconds=60, now=T0) is None
        assert led.balance_nowait(a, now=T0) is not None  # WAL readers never wait for the writer
        assert time.perf_counter() - t0 < 0.5
        threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
        r = led.reserve([a], 100, 1, lease_seconds=60, now=T0)  # the waiting form waits it out
        assert isinstance(r, Reservation)
    finally:
        if other.in_transaction:
            time.sleep(0.5)
        other.close()
    assert led.balance(a, now=T0).reserved_micros == 100
    r2 = led.reserve_nowait([a], 100, 1, lease_seconds=60, now=T0)  # the lock is free again: in place
    assert isinstance(r2, Reservation)
    led.close()


@pytest.mark.parametrize("error", ["database is locked", "database or disk is full"])
def test_an_in_place_failure_rolls_back_then_waits_or_is_a_ledger_error(path: Path, error: str) -> None:
    """The charge is written, then the commit fails: nothing of it stays. Busy (another process) leaves the step to
    the waiting path (None); anything else is the LedgerError a sync caller would get."""
    led = SQLiteLedger(path)
    a = Allowance("k", "s", limit_micros=1000)
    r = led.reserve_nowait([a], 100, 1, lease_seconds=60, now=T0)
    assert isinstance(r, Reservation)
    real = led._settle_and_read

    def failing(conn: sqlite3.Connection, *args: Any) -> Any:
        real(conn, *args)
        raise sqlite3.OperationalError(error)

    led._settle_and_read = failing  # type: ignore[method-assign]
    if "locked" in error:
        assert led.settle_and_read_nowait(r, 40, 1, _event(1, 40, r.keys), now=T0, allowances=[a]) is None
    else:
        with pytest.raises(LedgerError, match="disk is full"):
            led.settle_and_read_nowait(r, 40, 1, _event(1, 40, r.keys), now=T0, allowances=[a])
    del led._settle_and_read
    bal = led.balance(a, now=T0)
    assert (bal.spent_micros, bal.reserved_micros) == (0, 100) and list(led.events()) == []  # rolled back
    assert led.settle_and_read_nowait(r, 40, 1, _event(1, 40, r.keys), now=T0, allowances=[a]) is not None
    assert led.balance(a, now=T0).spent_micros == 40
    led.close()


def test_the_table_stays_bounded_over_many_calls(path: Path) -> None:
    """5,000 calls a second apart with a 10 s ttl: the table holds about one prune interval of rows, not 5,000;
    settles of reservations made elsewhere (random ids, anywhere in the key order) are pruned too."""
    led = SQLiteLedger(path, settled_ttl=10)
    a = Allowance("k", "s", limit_micros=10**12)
    most = 0
    for i in range(5000):
        now = T0 + i
        if i % 10 == 9:  # after the account exists: a foreign settle charges only existing accounts
            foreign = Reservation(os.urandom(16).hex(), (a.key,), 10, 1, now + 5)
            assert led.settle(foreign, 7, 1, None, now=now) is True
        else:
            _pairs(led, a, 1, now, lease=5)
        if i % 100 == 99:
            most = max(most, len(_rows(path)))
    assert most < 2 * sqlite_mod._PRUNE_EVERY, most
    assert led.balance(a, now=T0 + 5000).spent_micros == 7 * 5000
    assert len(list(led.events())) == 4500
    led.close()


def test_pruning_reads_a_bounded_range_of_the_primary_key(ledger: SQLiteLedger, path: Path) -> None:
    """No statement of a prune scans the table: each seeks a range of the primary key."""
    a = Allowance("k", "s", limit_micros=10**9)
    _pairs(ledger, a, sqlite_mod._PRUNE_EVERY - 1, T0)
    seen = _traced(ledger)
    _pairs(ledger, a, 1, T0 + 10**6)
    prune = [sql for sql in seen if "FROM reservations WHERE id >" in sql]
    assert len(prune) == 2, seen
    conn = sqlite3.connect(path)
    try:
        for sql in prune:
            plan = " ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
            assert "USING PRIMARY KEY (id>?" in plan and "SCAN" not in plan, (sql, plan)
    finally:
        conn.close()
    assert len(_rows(path)) == 1  # and it did prune
