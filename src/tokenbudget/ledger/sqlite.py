"""A ledger in one SQLite file, shared safely by every process and thread on one machine.

Why SQLite and how it stays exact:

* Every reserve and settle is one ``BEGIN IMMEDIATE`` transaction. SQLite admits one writer at a time across all
  processes, so the check ("does it fit under every enforced allowance?") and the hold are a single atomic step,
  all-or-none across every allowance of the call. Threads of one process queue on a lock first, so they wait in
  order instead of polling SQLite's busy handler.
* WAL mode with ``synchronous=NORMAL``: readers never block the writer and a commit costs no ``fsync`` (the WAL is
  synced at checkpoints). A process crash loses nothing; a power cut may lose the last moments of spend, never
  corrupts the file.
* Idempotency lives in the ``reservations`` row: its state moves ``held`` -> ``settled`` (or ``held`` ->
  ``expired`` -> ``settled``) inside the same transaction that moves the money and writes the event, so a settle
  charges exactly once, even when it arrives after its lease expired and the hold was given back.
* A process that dies holding a reservation leaks nothing forever: the hold counts until ``expires_at``, and the
  next reserve after that sweeps it.
* The ``reservations`` table does not grow forever: a finished row (``settled`` or ``expired``) is only there to
  recognise a repeat settle, so once both its lease and its settle are ``settled_ttl`` in the past (the expiry of
  the Redis ledger's settled marker) it is deleted. See :class:`SQLiteLedger` for the trade-off.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..errors import LedgerError
from ..events import CallEvent
from .base import Allowance, Balance, Grant, Ledger, Refusal, Reservation, check_retention, effective_limits

_T = TypeVar("_T")

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SQLiteLedger", "default_ledger_path"]


def default_ledger_path() -> Path:
    """Where the ledger lives when none is configured: per user, outside any project, so budgets span them all."""
    import platformdirs

    return Path(platformdirs.user_state_dir("tokenbudget")) / "ledger.db"


# -- schema ----------------------------------------------------------------------------------------------------------

# CallEvent fields stored as their own column, in table order. A field added to CallEvent later round-trips through
# the ``extra`` JSON column until a migration gives it a column of its own.
_EVENT_COLUMNS: tuple[str, ...] = (
    "id", "time", "provider", "model", "operation", "status", "decision", "original_model", "org", "team", "user",
    "tags", "function", "run_id", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "cache_write_1h_tokens", "reasoning_tokens", "cost_micros", "estimated_micros", "original_estimated_micros",
    "budget_keys", "duration_s",
)  # fmt: skip
_JSON_COLUMNS = frozenset({"tags", "budget_keys"})
_EXTRA_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(CallEvent) if f.name not in _EVENT_COLUMNS)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the initial schema.
    (
        """CREATE TABLE accounts (
            key TEXT PRIMARY KEY NOT NULL,
            scope TEXT NOT NULL,
            spent_micros INTEGER NOT NULL DEFAULT 0,
            reserved_micros INTEGER NOT NULL DEFAULT 0,
            spent_tokens INTEGER NOT NULL DEFAULT 0,
            reserved_tokens INTEGER NOT NULL DEFAULT 0,
            window_end REAL
        ) WITHOUT ROWID""",
        """CREATE TABLE reservations (
            id TEXT PRIMARY KEY NOT NULL,
            keys TEXT NOT NULL,
            micros INTEGER NOT NULL,
            tokens INTEGER NOT NULL,
            expires_at REAL NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('held', 'settled', 'expired')),
            created_at REAL,
            settled_at REAL,
            spent_micros INTEGER,
            spent_tokens INTEGER
        ) WITHOUT ROWID""",
        "CREATE INDEX reservations_held ON reservations (expires_at) WHERE state = 'held'",
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY,
            "id" TEXT NOT NULL,
            "time" REAL NOT NULL,
            "provider" TEXT NOT NULL,
            "model" TEXT NOT NULL,
            "operation" TEXT NOT NULL,
            "status" TEXT NOT NULL,
            "decision" TEXT NOT NULL,
            "original_model" TEXT,
            "org" TEXT,
            "team" TEXT,
            "user" TEXT,
            "tags" TEXT NOT NULL DEFAULT '{}',
            "function" TEXT,
            "run_id" TEXT,
            "input_tokens" INTEGER NOT NULL DEFAULT 0,
            "output_tokens" INTEGER NOT NULL DEFAULT 0,
            "cache_read_tokens" INTEGER NOT NULL DEFAULT 0,
            "cache_write_tokens" INTEGER NOT NULL DEFAULT 0,
            "cache_write_1h_tokens" INTEGER NOT NULL DEFAULT 0,
            "reasoning_tokens" INTEGER NOT NULL DEFAULT 0,
            "cost_micros" INTEGER NOT NULL DEFAULT 0,
            "estimated_micros" INTEGER NOT NULL DEFAULT 0,
            "original_estimated_micros" INTEGER NOT NULL DEFAULT 0,
            "budget_keys" TEXT NOT NULL DEFAULT '[]',
            "duration_s" REAL NOT NULL DEFAULT 0,
            extra TEXT
        )""",
        "CREATE INDEX events_time ON events (time)",
        """CREATE TABLE grants (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL,
            scope TEXT NOT NULL,
            micros INTEGER NOT NULL,
            tokens INTEGER NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL,
            reason TEXT NOT NULL DEFAULT '',
            granted_by TEXT
        )""",
    ),
    # 2: every reserve sums the active grants of each allowance's scope.
    ("CREATE INDEX grants_scope ON grants (scope, created_at)",),
)
"""Schema migrations, applied in order in one transaction; ``PRAGMA user_version`` is how many have run.

Append only: never edit a released entry, a file somewhere is already at that version.
"""
SCHEMA_VERSION = len(MIGRATIONS)

_INSERT_EVENT = "INSERT INTO events ({}, extra) VALUES ({}, ?)".format(
    ", ".join(f'"{c}"' for c in _EVENT_COLUMNS), ", ".join("?" for _ in _EVENT_COLUMNS)
)
_SELECT_EVENTS = "SELECT seq, {}, extra FROM events".format(", ".join(f'"{c}"' for c in _EVENT_COLUMNS))
_EVENT_BATCH = 512
_MAX_IDLE = 8
_MIN_SQLITE = (3, 24, 0)
_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)  # UPDATE ... RETURNING; older builds read the row first
_PAGE_SIZE = 1024
# Pruning finished reservations: every _PRUNE_EVERY settles (per ledger object), the next _PRUNE_SCAN rows of the
# primary key after a cursor are examined and the finished, old ones deleted. Examining more rows than settles add
# keeps the table within about 4/3 of a retention's worth of rows; one prune costs about a millisecond.
_PRUNE_EVERY = 256
_PRUNE_SCAN = 1024
_PRUNE_WHERE = "AND state != 'held' AND expires_at < ? AND (settled_at IS NULL OR settled_at < ?)"
_ENDED_WHERE = "AND window_end < ? AND reserved_micros = 0 AND reserved_tokens = 0"  # NULL (a total) never ends
# Events deleted by one prune at most, so a cap set on a file with millions of events catches up over a few hundred
# prunes instead of holding the write lock for one long delete (a prune comes every 256 settles: this outruns them).
_EVENT_TRIM = 4 * _PRUNE_SCAN
# Async callers' steps run in place on one connection that never waits and never checkpoints (a checkpoint fsyncs
# the file: no place for it on an event loop). After _NOWAIT_RUN such steps in a row, one step goes through a worker
# thread instead, on a pooled connection whose commit runs SQLite's automatic checkpoint when the WAL is due.
_NOWAIT_RUN = 64

# Connections inherited across fork() must never be used or closed by the child (SQLite forbids both); they are
# parked here so garbage collection cannot close them either.
_ABANDONED_AFTER_FORK: list[sqlite3.Connection] = []

# Bumped in a forked child, so a ledger notices the fork with an int compare instead of a getpid() system call per
# transaction. Where fork hooks do not exist (Windows) there is no fork either.
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_count_fork)


_id_lock = threading.Lock()
_last_ns = 0


def _new_id() -> str:
    """32 hex digits like a UUID, but time-first: new rows land on the same B-tree page (fewer pages per commit) and
    ids sort in creation order within a process. 64 random bits (reseeded after fork) keep processes apart."""
    global _last_ns
    with _id_lock:
        _last_ns = max(time.time_ns(), _last_ns + 1)
        ns = _last_ns
    return f"{ns:016x}{random.getrandbits(64):016x}"


_dumps = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode
_event_values = operator.attrgetter(*_EVENT_COLUMNS)
_TAGS_AT = _EVENT_COLUMNS.index("tags")
_KEYS_AT = _EVENT_COLUMNS.index("budget_keys")

# A process sees the same few budget-key tuples on every call: their JSON text (both ways) is memoized, bounded.
_MEMO_MAX = 1024
_keys_text: dict[tuple[str, ...], str] = {}
_keys_list: dict[str, tuple[str, ...]] = {}


def _dump_keys(keys: Sequence[str]) -> str:
    key = keys if isinstance(keys, tuple) else tuple(keys)
    text = _keys_text.get(key)
    if text is None:
        text = _dumps(key)
        if len(_keys_text) >= _MEMO_MAX:
            _keys_text.clear()
        _keys_text[key] = text
    return text


def _load_keys(text: str) -> tuple[str, ...]:
    keys = _keys_list.get(text)
    if keys is None:
        keys = tuple(json.loads(text))
        if len(_keys_list) >= _MEMO_MAX:
            _keys_list.clear()
        _keys_list[text] = keys
    return keys


def _event_params(event: CallEvent) -> list[Any]:
    params: list[Any] = list(_event_values(event))
    tags = params[_TAGS_AT]
    params[_TAGS_AT] = "{}" if tags == {} else _dumps(tags)
    params[_KEYS_AT] = _dump_keys(params[_KEYS_AT])
    params.append(_dumps({name: getattr(event, name) for name in _EXTRA_FIELDS}) if _EXTRA_FIELDS else None)
    return params


@functools.lru_cache(maxsize=64)
def _read_sql(n_keys: int, n_scopes: int) -> str:
    """Accounts of ``n_keys`` keys, active grants summed per scope of ``n_scopes`` scopes, and every hold past its
    lease (``(2, id, keys, micros, tokens)``), in one statement: one snapshot, one round through the sqlite3 module.
    Parameters: the keys, the scopes, then ``now`` three times. (``IN ()`` is valid SQLite, and false.)"""
    return (
        "SELECT 0, key, spent_micros, reserved_micros, spent_tokens, reserved_tokens FROM accounts "
        f"WHERE key IN ({', '.join('?' * n_keys)}) "
        "UNION ALL SELECT 1, scope, SUM(micros), SUM(tokens), 0, 0 FROM grants "
        f"WHERE scope IN ({', '.join('?' * n_scopes)}) AND created_at <= ? "
        "AND (expires_at IS NULL OR expires_at > ?) GROUP BY scope "
        "UNION ALL SELECT 2, id, keys, micros, tokens, 0 FROM reservations WHERE state = 'held' AND expires_at <= ?"
    )


@functools.lru_cache(maxsize=64)
def _hold_sql(n: int) -> str:
    """Add one hold to each of ``n`` accounts, creating those that do not exist yet (a key listed twice, twice)."""
    return (
        "INSERT INTO accounts (key, scope, reserved_micros, reserved_tokens, window_end) VALUES "
        + ", ".join(["(?, ?, ?, ?, ?)"] * n)
        + " ON CONFLICT (key) DO UPDATE SET "
        "reserved_micros = reserved_micros + excluded.reserved_micros, "
        "reserved_tokens = reserved_tokens + excluded.reserved_tokens"
    )


@functools.lru_cache(maxsize=64)
def _move_sql(n: int, returning: bool = False) -> str:
    """Move amounts on ``n`` accounts; ``returning``: and give back each one's figures after the move, with its scope's
    active grants summed (parameters: the amounts, the keys, then ``now`` four times), so a settle that must report
    balances reads them in the statement that changes them instead of in one more."""
    sql = (
        "UPDATE accounts SET reserved_micros = reserved_micros + ?, reserved_tokens = reserved_tokens + ?, "
        "spent_micros = spent_micros + ?, spent_tokens = spent_tokens + ? "
        f"WHERE key IN ({', '.join('?' * n)})"
    )
    if returning:
        active = (
            "FROM grants WHERE scope = accounts.scope AND created_at <= ? AND (expires_at IS NULL OR expires_at > ?)"
        )
        sql += (
            " RETURNING key, scope, spent_micros, reserved_micros, spent_tokens, reserved_tokens, "
            f"(SELECT SUM(micros) {active}), (SELECT SUM(tokens) {active})"
        )
    return sql


_SETTLE_HELD = (
    "UPDATE reservations SET state = 'settled', settled_at = ?, spent_micros = ?, spent_tokens = ? "
    "WHERE id = ? AND state = 'held' RETURNING keys, micros, tokens"
)
# The same, and whether any hold is past its lease (maybe this one): a balance leaves those out, so reading balances
# from the account rows alone is only exact when there are none. The partial index makes that one probe.
_SETTLE_HELD_PROBING = _SETTLE_HELD + ", EXISTS (SELECT 1 FROM reservations WHERE state = 'held' AND expires_at <= ?)"


def _balances_from_rows(rows: Sequence[Any], allowances: Sequence[Allowance]) -> dict[str, Balance] | None:
    """Balances of ``allowances`` from account rows returned by :func:`_move_sql` (``returning``); ``None`` when a row
    is missing or names another scope, where only :meth:`SQLiteLedger._read` says what ``balance()`` would."""
    by_key = {row[0]: row for row in rows}
    out: dict[str, Balance] = {}
    for a in allowances:
        row = by_key.get(a.key)
        if row is None or row[1] != a.scope:
            return None
        gm, gt = row[6] or 0, row[7] or 0
        lm, lt = effective_limits(a, gm, gt)
        out[a.key] = Balance(a.key, a.scope, lm, lt, row[2], row[3], row[4], row[5], gm, gt)
    return out


_NO_ACCOUNT = (0, 0, 0, 0)
_NO_GRANT = (0, 0)


def _balance_of(allowance: Allowance, accounts: dict[str, list[int]], granted: dict[str, tuple[int, int]]) -> Balance:
    spent_m, held_m, spent_t, held_t = accounts.get(allowance.key) or _NO_ACCOUNT
    gm, gt = granted.get(allowance.scope, _NO_GRANT)
    lm, lt = effective_limits(allowance, gm, gt)
    return Balance(allowance.key, allowance.scope, lm, lt, spent_m, held_m, spent_t, held_t, gm, gt)


def _event_from_row(row: Sequence[Any]) -> CallEvent:
    data: dict[str, Any] = {}
    for name, value in zip(_EVENT_COLUMNS, row[1:], strict=False):
        data[name] = json.loads(value) if name in _JSON_COLUMNS else value
    extra = row[len(_EVENT_COLUMNS) + 1]
    if extra:
        data.update(json.loads(extra))
    return CallEvent.from_dict(data)


# -- errors -----------------------------------------------------------------------------------------------------------

_CODE_BY_MESSAGE = (
    ("locked", 5),
    ("readonly", 8),
    ("read-only", 8),
    ("malformed", 11),
    ("full", 13),
    ("unable to open", 14),
    ("not a database", 26),
    ("i/o error", 10),
)


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if isinstance(code, int):
        return code & 0xFF
    text = str(exc).lower()
    for needle, primary in _CODE_BY_MESSAGE:
        if needle in text:
            return primary
    return None


def _delete_slice(
    conn: sqlite3.Connection, table: str, key: str, start: str, where: str, params: tuple[Any, ...]
) -> str:
    """Delete the rows matching ``where`` among the next :data:`_PRUNE_SCAN` of ``table`` after ``start`` in the order
    of its primary key ``key``; return where the next slice starts ("" again after the last row)."""
    last = conn.execute(
        f"SELECT {key} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT 1 OFFSET ?", (start, _PRUNE_SCAN - 1)
    ).fetchone()
    if last is None:  # fewer rows than a slice are left: take them all, and start over next time
        conn.execute(f"DELETE FROM {table} WHERE {key} > ? {where}", (start, *params))
        return ""
    conn.execute(f"DELETE FROM {table} WHERE {key} > ? AND {key} <= ? {where}", (start, last[0], *params))
    return str(last[0])


def _trim_events(conn: sqlite3.Connection, maxlen: int) -> None:
    """Keep about the ``maxlen`` newest events (by ``seq``, as Redis's ``XADD MAXLEN ~``), deleting at most
    :data:`_EVENT_TRIM` of the oldest. Two one-row seeks of the primary key, then a range of it."""
    lo, hi = conn.execute("SELECT (SELECT MIN(seq) FROM events), (SELECT MAX(seq) FROM events)").fetchone()
    if hi is None:
        return
    cut = min(hi - maxlen, lo + _EVENT_TRIM - 1)
    if cut >= lo:
        conn.execute("DELETE FROM events WHERE seq <= ?", (cut,))


def _in_transaction(conn: sqlite3.Connection, write: bool, step: Callable[..., _T], args: tuple[Any, ...]) -> _T:
    """``step(conn, *args)``: a write in ``BEGIN IMMEDIATE`` ... ``COMMIT``, a read as one autocommit statement."""
    if not write:
        return step(conn, *args)
    conn.execute("BEGIN IMMEDIATE")
    out = step(conn, *args)
    conn.execute("COMMIT")
    return out


class SQLiteLedger(Ledger):
    """The default ledger: one file per user, exact across every process on the machine.

    ``settled_ttl`` (seconds, default one day, the Redis ledger's default for its settled markers) is how long a
    finished reservation is remembered after both its lease and its settle: a settle repeated within it charges
    nothing. Past it the row is pruned, and a settle of that id is indistinguishable from one of a reservation made
    elsewhere (another store, a local reservation while Redis was down), which is charged: so the retention must
    exceed any window in which a settle can be repeated. The only repeats the guard makes are its retries of
    settles the ledger refused, on its next reservation or at close, in the same process; a day is far beyond
    that. Pruning runs inside a settle's transaction every few hundred settles and examines a bounded slice of the
    table, so no settle pays for more than about a millisecond of it and none scans the table. It judges age by
    the ``now`` the settles pass, like every other time rule here, so a clock far in the future prunes early.

    The same prune keeps the rest of the file from growing with time, as the Redis ledger's expiries do:
    ``window_grace`` (default 7 days, as Redis) after a window ends its account row is deleted once nothing is held
    on it (a total budget's account is kept forever), and ``events_maxlen`` (default ``None``: every event is kept,
    as this is the machine's spend history for reports) caps the events at about that many of the newest.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 10.0,
        settled_ttl: float = 86_400.0,
        window_grace: float = 7 * 86_400.0,
        events_maxlen: int | None = None,
    ) -> None:
        if busy_timeout < 0:
            raise ValueError("busy_timeout must be >= 0 seconds")
        if not settled_ttl > 0:
            raise ValueError("settled_ttl must be > 0 seconds")
        check_retention(window_grace, events_maxlen)
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise LedgerError(
                f"the SQLite ledger needs SQLite >= {'.'.join(map(str, _MIN_SQLITE))} (UPSERT); this Python has "
                f'{sqlite3.sqlite_version}. Use a newer Python build, or set ledger = "memory://" or a redis:// URL'
            )
        self.path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        self.url = "sqlite:///" + str(self.path)
        self.busy_timeout = float(busy_timeout)
        self.settled_ttl = float(settled_ttl)
        self.window_grace = float(window_grace)
        self.events_maxlen = events_maxlen
        self._settles = 0  # since the last prune; guarded by the write lock
        self._prune_from = ""  # the prune's cursors: the last reservation id / account key it examined ("" = start)
        self._accounts_from = ""
        self._pid = os.getpid()
        self._forks = _forks
        self._write_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._nowait_conn: sqlite3.Connection | None = None  # used only with the write lock held
        self._nowait_run = 0  # in-place steps since one last went through a thread; guarded by the write lock
        created = self._create_file()
        conn = self._connect(new_file=created)
        try:
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        if created:
            self._restrict_sidecars()
        self._checkin(conn)

    def __repr__(self) -> str:
        return f"SQLiteLedger({str(self.path)!r})"

    # -- files and connections ------------------------------------------------------------------------------------
    def _fail(self, exc: BaseException, doing: str) -> LedgerError:
        """Translate a low-level failure into one a person can act on: which file, what broke, what to do."""
        where = f"SQLite ledger {self.path}"
        if isinstance(exc, sqlite3.Error):
            code = _primary_code(exc)
            if code in (5, 6):
                advice = (
                    f"another process held the write lock for more than busy_timeout={self.busy_timeout:g}s. "
                    "Find it (e.g. `fuser` / `lsof` on the file) or raise busy_timeout; nothing was reserved or "
                    "charged"
                )
            elif code == 8:
                advice = (
                    "the file or its directory is read-only for this user. Fix its permissions (the -wal and -shm "
                    "files next to it need write access too) or point the `ledger` setting at a writable file"
                )
            elif code == 13:
                advice = "the disk is full. Free space on that filesystem; nothing was reserved or charged"
            elif code in (11, 26):
                advice = (
                    "the file is not a valid tokenbudget ledger (corrupt, or another program's file). Move it aside "
                    "(a fresh one is created on next use) and keep the old one if you need its history"
                )
            elif code == 14:
                advice = "it cannot be opened. Check that the directory exists and is writable by this user"
            else:
                advice = "check the file, its directory and free disk space"
            return LedgerError(f"{where}: {doing} failed: {exc}: {advice}")
        return LedgerError(f"{where}: {doing} failed: {exc}")

    def _create_file(self) -> bool:
        """Create the file 0600 before SQLite does, so spend data is never readable by others whatever the umask."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(
                f"SQLite ledger {self.path}: cannot create directory {self.path.parent}: {exc}. "
                "Create it or point the `ledger` setting elsewhere"
            ) from exc
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileExistsError:
            return False
        except OSError as exc:
            raise LedgerError(
                f"SQLite ledger {self.path}: cannot create the file: {exc}. Check the directory's permissions or "
                "point the `ledger` setting elsewhere"
            ) from exc
        try:
            os.chmod(self.path, 0o600)
        finally:
            os.close(fd)
        return True

    def _restrict_sidecars(self) -> None:
        # SQLite gives -wal/-shm the main file's mode; this is for platforms and versions where it does not.
        for suffix in ("-wal", "-shm"):
            try:
                os.chmod(str(self.path) + suffix, 0o600)
            except OSError:
                pass

    def _connect(self, *, new_file: bool = False) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                str(self.path),
                timeout=self.busy_timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # pooled: used by one thread at a time, closed from any
                cached_statements=64,
            )
        except sqlite3.Error as exc:
            raise self._fail(exc, "opening") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if new_file:
                # A commit writes each page it touched to the WAL; a pair touches ~9, so small pages measured ~1.5x
                # the throughput of the 4 KiB default. Only settable before the first table exists.
                conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
            mode = self._retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
            if mode is None or str(mode[0]).lower() != "wal":
                # e.g. a network filesystem without shared memory: cross-process locking cannot be trusted there.
                raise LedgerError(
                    f"SQLite ledger {self.path}: cannot switch to WAL mode (got {mode and mode[0]!r}). Put the "
                    "ledger on a local disk, not a network filesystem"
                )
            conn.execute("PRAGMA synchronous = NORMAL")
            # Checkpoint at SQLite's default WAL size in bytes (1000 pages of 4 KiB), not pages: with small pages
            # the default would checkpoint, and fsync, four times as often.
            page_size = int(conn.execute("PRAGMA page_size").fetchone()[0]) or _PAGE_SIZE
            conn.execute(f"PRAGMA wal_autocheckpoint = {max(1000, 4_096_000 // page_size)}")
        except sqlite3.Error as exc:
            conn.close()
            raise self._fail(exc, "opening") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _retry_busy(self, step: Callable[[], _T]) -> _T:
        """Retry ``step`` while SQLite says busy, up to ``busy_timeout``.

        Switching a new file to WAL and reading a WAL file another connection is just creating can report "locked"
        at once, without consulting the busy handler; many processes opening a fresh ledger together hit this.
        """
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.001
        while True:
            try:
                return step()
            except sqlite3.OperationalError as exc:
                if _primary_code(exc) not in (5, 6) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        try:
            self._retry_busy(lambda: self._migrate_once(conn))
        except sqlite3.Error as exc:
            raise self._fail(exc, "migrating the schema") from exc

    def _migrate_once(self, conn: sqlite3.Connection) -> None:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"SQLite ledger {self.path}: schema version {version} was written by a newer tokenbudget (this "
                f"one knows up to {SCHEMA_VERSION}). Upgrade tokenbudget, or point the `ledger` setting at "
                "another file"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated while we waited.
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version >= SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                return self._migrate_once(conn)  # now only checks
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _checkout(self) -> sqlite3.Connection:
        if _forks != self._forks:
            self._after_fork()
        with self._pool_lock:
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _checkin(self, conn: sqlite3.Connection) -> None:
        with self._pool_lock:
            if len(self._idle) < _MAX_IDLE and _forks == self._forks:
                self._idle.append(conn)
                return
        conn.close()

    def _discard(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        try:
            conn.close()
        except sqlite3.Error:
            pass

    def _after_fork(self) -> None:
        _ABANDONED_AFTER_FORK.extend(self._idle)
        self._idle = []
        if self._nowait_conn is not None:
            _ABANDONED_AFTER_FORK.append(self._nowait_conn)
            self._nowait_conn = None
        self._pool_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._pid = os.getpid()
        self._forks = _forks

    def _enter(self, doing: str, write: bool) -> threading.Lock | None:
        """Start of every transaction: notice a fork, and for a write take this process's write lock (or fail)."""
        if _forks != self._forks:
            self._after_fork()
        lock = self._write_lock if write else None
        if lock is not None and not lock.acquire(timeout=self.busy_timeout if self.busy_timeout > 0 else -1):
            raise LedgerError(
                f"SQLite ledger {self.path}: {doing} failed: another thread of this process held the ledger for "
                f"more than busy_timeout={self.busy_timeout:g}s; nothing was reserved or charged"
            )
        return lock

    def _run(self, doing: str, write: bool, step: Callable[..., _T], *args: Any) -> _T:
        """``step(conn, *args)`` in one transaction on a pooled connection (``BEGIN IMMEDIATE`` when ``write``); on
        any failure it is rolled back and the connection dropped. A read (``write=False``) is a single statement in
        autocommit mode: SQLite reads one consistent snapshot for it, without a ``BEGIN``/``COMMIT`` round.

        A plain function rather than a ``@contextmanager``: this is on every guarded call, and a generator-based
        context manager costs more than the rest of the Python around the SQL."""
        lock = self._enter(doing, write)
        try:
            conn = self._checkout()
            try:
                out = _in_transaction(conn, write, step, args)
            except sqlite3.Error as exc:
                self._discard(conn)
                raise self._fail(exc, doing) from exc
            except BaseException:
                self._discard(conn)
                raise
            self._checkin(conn)
            return out
        finally:
            if lock is not None:
                lock.release()

    def _run_nowait(self, doing: str, write: bool, step: Callable[..., _T], *args: Any) -> _T | None:
        """:meth:`_run` on the calling thread if nothing makes it wait, else ``None`` with nothing done.

        For async callers (see :meth:`Ledger.reserve_nowait`): a transaction here takes tens of microseconds with
        ``synchronous=NORMAL`` (a commit appends to the WAL without fsync), less than the two thread hops of
        ``asyncio.to_thread`` around it. Waiting is left to the thread path: this process's write lock held by another
        thread, another process's write lock on the file (the connection's busy timeout is zero), a checkpoint or a
        prune coming due, a fork."""
        lock = self._write_lock
        if _forks != self._forks or not lock.acquire(blocking=False):
            return None
        try:
            if self._nowait_run >= _NOWAIT_RUN or (write and self._settles >= _PRUNE_EVERY - 1):
                self._nowait_run = 0
                return None
            conn = self._nowait_conn
            if conn is None:
                conn = self._nowait_conn = self._connect_nowait()
            try:
                out = _in_transaction(conn, write, step, args)
            except sqlite3.Error as exc:
                busy = _primary_code(exc) in (5, 6)  # another process holds the file: wait for it in a thread
                if not busy or conn.in_transaction:  # a connection that only found the file locked is kept
                    self._nowait_conn = None
                    self._discard(conn)
                if busy:
                    return None
                raise self._fail(exc, doing) from exc
            except BaseException:
                self._nowait_conn = None
                self._discard(conn)
                raise
            self._nowait_run += 1
            return out
        finally:
            lock.release()

    def _connect_nowait(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        except sqlite3.Error as exc:
            conn.close()
            raise self._fail(exc, "opening") from exc
        return conn

    @contextmanager
    def _transaction(self, doing: str, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction on a pooled connection; on any failure it is rolled back and the connection dropped.

        For the rarer operations (reports, grants); the per-call ones use :meth:`_run`."""
        lock = self._enter(doing, write)
        try:
            conn = self._checkout()
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._discard(conn)
                raise self._fail(exc, doing) from exc
            except BaseException:
                self._discard(conn)
                raise
            self._checkin(conn)
        finally:
            if lock is not None:
                lock.release()

    # -- internals (inside a transaction) ----------------------------------------------------------------------------
    # Per-statement overhead in the sqlite3 module (and a GIL hand-off around each step), not SQLite's own work,
    # dominates these operations, so each does as few statements as it can: a reserve is BEGIN, one read (balances,
    # grants and expired holds together), one upsert of every hold, one insert, COMMIT; a settle is BEGIN, one
    # UPDATE ... RETURNING of its reservation, one update of its accounts, the event insert, COMMIT; a balance is one
    # SELECT; a settle that must report balances (the guard's, after every call) gets them back from its accounts
    # update, RETURNING the rows with their grants summed, so they cost no statement of their own. The SQL text of
    # each shape is built once (and so is prepared once per connection by the statement cache).

    @staticmethod
    def _move(
        conn: sqlite3.Connection, keys: Sequence[str], amounts: tuple[int, int, int, int], read_at: float | None = None
    ) -> list[Any] | None:
        """Add ``(reserved_micros, reserved_tokens, spent_micros, spent_tokens)`` to each key, once per mention.

        With ``read_at``, and every key mentioned once, also return the accounts' rows after the move with the grants
        active at ``read_at`` (see :func:`_move_sql`); otherwise ``None``."""
        if len(set(keys)) == len(keys):  # the usual case: every key once
            if read_at is None:
                conn.execute(_move_sql(len(keys)), (*amounts, *keys))
                return None
            return conn.execute(
                _move_sql(len(keys), True), (*amounts, *keys, read_at, read_at, read_at, read_at)
            ).fetchall()
        counts = Counter(keys)
        for n in sorted(set(counts.values())):
            group = [k for k, c in counts.items() if c == n]
            conn.execute(_move_sql(len(group)), (*(n * x for x in amounts), *group))
        return None

    def _sweep(self, conn: sqlite3.Connection, expired: Sequence[Any]) -> None:
        """Give back the holds of ``(id, keys, micros, tokens)`` rows whose lease ended, and mark them expired."""
        for rid, keys, micros, tokens in expired:
            self._move(conn, _load_keys(keys), (-micros, -tokens, 0, 0))
            conn.execute("UPDATE reservations SET state = 'expired' WHERE id = ? AND state = 'held'", (rid,))

    @staticmethod
    def _read(conn: sqlite3.Connection, allowances: Sequence[Allowance], now: float) -> tuple[list[Balance], list[Any]]:
        """Balances of ``allowances`` and the holds past their lease, in one statement.

        The balances already leave out the expired holds (as they will be once swept)."""
        accounts, granted, expired = SQLiteLedger._read_rows(conn, allowances, now)
        return [_balance_of(a, accounts, granted) for a in allowances], expired

    @staticmethod
    def _read_rows(
        conn: sqlite3.Connection, allowances: Sequence[Allowance], now: float
    ) -> tuple[dict[str, list[int]], dict[str, tuple[int, int]], list[Any]]:
        """What :meth:`_read` reads, before it becomes :class:`Balance` objects: accounts by key (``[spent_micros,
        reserved_micros, spent_tokens, reserved_tokens]``, expired holds already left out), active grants by scope,
        and the expired holds. A reserve checks the fit on these and builds a Balance only for a refusal."""
        if len(allowances) == 1:  # the usual case, without the de-duplication
            keys: Sequence[str] = (allowances[0].key,)
            scopes: Sequence[str] = (allowances[0].scope,)
        else:
            keys = list(dict.fromkeys(a.key for a in allowances))
            scopes = list(dict.fromkeys(a.scope for a in allowances))
        rows = conn.execute(_read_sql(len(keys), len(scopes)), (*keys, *scopes, now, now, now)).fetchall()
        accounts: dict[str, list[int]] = {}
        granted: dict[str, tuple[int, int]] = {}
        expired: list[Any] = []
        for kind, name, a, b, c, d in rows:
            if kind == 0:
                accounts[name] = [a, b, c, d]
            elif kind == 1:
                granted[name] = (int(a), int(b))
            else:
                expired.append((name, a, b, c))
        for _rid, held_keys, micros, tokens in expired:
            for key in _load_keys(held_keys):
                acct = accounts.get(key)
                if acct is not None:
                    acct[1] -= micros
                    acct[3] -= tokens
        return accounts, granted, expired

    def _reserve(
        self,
        conn: sqlite3.Connection,
        allowances: Sequence[Allowance],
        micros: int,
        tokens: int,
        lease_seconds: float,
        now: float,
    ) -> Reservation | Refusal:
        enforced = [a for a in allowances if a.enforce]
        accounts, granted, expired = self._read_rows(conn, enforced, now)
        if expired:
            self._sweep(conn, expired)
        for a in enforced:
            # fits() on the raw figures: a Balance (a frozen dataclass, slow to build) only for the refusal.
            spent_m, held_m, spent_t, held_t = accounts.get(a.key) or _NO_ACCOUNT
            gm, gt = granted.get(a.scope, _NO_GRANT)
            if (a.limit_micros is not None and spent_m + held_m + micros > a.limit_micros + gm) or (
                a.limit_tokens is not None and spent_t + held_t + tokens > a.limit_tokens + gt
            ):
                return Refusal(a, _balance_of(a, accounts, granted), micros, tokens)
        keys = tuple(a.key for a in allowances)
        res = Reservation(_new_id(), keys, micros, tokens, now + lease_seconds)
        if allowances:
            conn.execute(
                _hold_sql(len(allowances)),
                [x for a in allowances for x in (a.key, a.scope, micros, tokens, a.window_end)],
            )
        conn.execute(
            "INSERT INTO reservations (id, keys, micros, tokens, expires_at, state, created_at) "
            "VALUES (?, ?, ?, ?, ?, 'held', ?)",
            (res.id, _dump_keys(keys), micros, tokens, res.expires_at, now),
        )
        return res

    def _settle(
        self,
        conn: sqlite3.Connection,
        reservation: Reservation,
        micros: int,
        tokens: int,
        event: CallEvent | None,
        now: float,
    ) -> bool:
        return self._settle_and_read(conn, reservation, micros, tokens, event, now, ())[0]

    def _settle_and_read(
        self,
        conn: sqlite3.Connection,
        reservation: Reservation,
        micros: int,
        tokens: int,
        event: CallEvent | None,
        now: float,
        allowances: Sequence[Allowance],
    ) -> tuple[bool, dict[str, Balance]]:
        charged, rows = self._charge(conn, reservation, micros, tokens, event, now, bool(allowances))
        self._settles += 1
        if self._settles >= _PRUNE_EVERY:
            self._prune(conn, now)  # after the charge: its own row is never old, and the balances are unaffected
        if not allowances:
            return charged, {}
        if rows is not None:
            balances = _balances_from_rows(rows, allowances)
            if balances is not None:
                return charged, balances
        # A repeat, a late or foreign settle, a hold past its lease somewhere, a budget this call did not hold, or an
        # SQLite without RETURNING: the full read, still in this transaction (it sees the settle, and sweeps nothing,
        # exactly like balance()).
        read, _expired = self._read(conn, allowances, now)
        return charged, {b.key: b for b in read}

    def _charge(
        self,
        conn: sqlite3.Connection,
        reservation: Reservation,
        micros: int,
        tokens: int,
        event: CallEvent | None,
        now: float,
        read: bool,
    ) -> tuple[bool, list[Any] | None]:
        """The settle; with ``read``, also the charged accounts' rows as :func:`_move_sql` returns them when those
        alone give exact balances (the usual case), else ``None``."""
        rows: list[Any] | None = None
        # The usual case in one statement: a held reservation becomes settled, handing back what it held.
        if _RETURNING:
            if read:
                row = conn.execute(_SETTLE_HELD_PROBING, (now, micros, tokens, reservation.id, now)).fetchone()
                read = row is not None and not row[3]
            else:
                row = conn.execute(_SETTLE_HELD, (now, micros, tokens, reservation.id)).fetchone()
        else:
            read = False
            row = conn.execute(
                "SELECT keys, micros, tokens FROM reservations WHERE id = ? AND state = 'held'", (reservation.id,)
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE reservations SET state = 'settled', settled_at = ?, spent_micros = ?, spent_tokens = ? "
                    "WHERE id = ?",
                    (now, micros, tokens, reservation.id),
                )
        keys: Sequence[str]
        if row is not None:
            keys = _load_keys(row[0])
            held_m, held_t = row[1], row[2]
        else:
            held_m = held_t = 0
            known = conn.execute("SELECT state, keys FROM reservations WHERE id = ?", (reservation.id,)).fetchone()
            if known is None:
                # Not reserved here (another store, or a pruned row): charge the accounts that exist, and remember it.
                keys = reservation.keys
                conn.execute(
                    "INSERT INTO reservations (id, keys, micros, tokens, expires_at, state, created_at, settled_at, "
                    "spent_micros, spent_tokens) VALUES (?, ?, ?, ?, ?, 'settled', ?, ?, ?, ?)",
                    (reservation.id, _dump_keys(keys), reservation.micros, reservation.tokens,
                     reservation.expires_at, now, now, micros, tokens),
                )  # fmt: skip
            elif known[0] == "settled":
                return False, None
            else:  # expired: its hold was already given back
                keys = _load_keys(known[1])
                conn.execute(
                    "UPDATE reservations SET state = 'settled', settled_at = ?, spent_micros = ?, spent_tokens = ? "
                    "WHERE id = ?",
                    (now, micros, tokens, reservation.id),
                )
        if keys:
            rows = self._move(conn, keys, (-held_m, -held_t, micros, tokens), now if read else None)
        if event is not None:
            conn.execute(_INSERT_EVENT, _event_params(event))
        return True, rows

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        """Delete the finished reservations older than ``settled_ttl`` and the accounts of windows that ended more
        than ``window_grace`` ago with nothing held, each among the next :data:`_PRUNE_SCAN` rows of its table's
        primary key after that table's cursor; then trim the events to ``events_maxlen``.

        A slice of the primary key rather than an index on age: no index to update on every settle, no schema
        change for older versions sharing the file, and a bounded range whatever the ids look like (ours sort by
        time, foreign ones anywhere). A held row is never deleted, whatever its age, nor an account anything is held
        on (a hold past its lease still counts until a reserve sweeps it)."""
        self._settles = 0
        cutoff = now - self.settled_ttl
        self._prune_from = _delete_slice(conn, "reservations", "id", self._prune_from, _PRUNE_WHERE, (cutoff, cutoff))
        self._accounts_from = _delete_slice(
            conn, "accounts", "key", self._accounts_from, _ENDED_WHERE, (now - self.window_grace,)
        )
        if self.events_maxlen is not None:
            _trim_events(conn, self.events_maxlen)

    @staticmethod
    def _balance(conn: sqlite3.Connection, allowance: Allowance, now: float) -> Balance:
        return SQLiteLedger._read(conn, (allowance,), now)[0][0]

    # -- Ledger ----------------------------------------------------------------------------------------------------
    def reserve(
        self, allowances: Sequence[Allowance], micros: int, tokens: int, *, lease_seconds: float, now: float
    ) -> Reservation | Refusal:
        return self._run("reserve", True, self._reserve, allowances, micros, tokens, lease_seconds, now)

    def settle(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float
    ) -> bool:
        return self._run("settle", True, self._settle, reservation, micros, tokens, event, now)

    def settle_and_read(
        self,
        reservation: Reservation,
        micros: int,
        tokens: int,
        event: CallEvent | None,
        *,
        now: float,
        allowances: Sequence[Allowance],
    ) -> tuple[bool, dict[str, Balance]]:
        """One transaction: the account update that charges the call returns the balances (grants summed in the same
        statement), so the guard's post-call read costs no statement, lock or connection round of its own."""
        return self._run("settle", True, self._settle_and_read, reservation, micros, tokens, event, now, allowances)

    def balance(self, allowance: Allowance, *, now: float) -> Balance:
        # Read-only: holds past their lease are subtracted here rather than swept, so reports never take the write lock.
        return self._run("reading a balance", False, self._balance, allowance, now)

    def reserve_nowait(
        self, allowances: Sequence[Allowance], micros: int, tokens: int, *, lease_seconds: float, now: float
    ) -> Reservation | Refusal | None:
        return self._run_nowait("reserve", True, self._reserve, allowances, micros, tokens, lease_seconds, now)

    def settle_and_read_nowait(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float,
        allowances: Sequence[Allowance],
    ) -> tuple[bool, dict[str, Balance]] | None:
        return self._run_nowait(
            "settle", True, self._settle_and_read, reservation, micros, tokens, event, now, allowances
        )

    def balance_nowait(self, allowance: Allowance, *, now: float) -> Balance | None:
        return self._run_nowait("reading a balance", False, self._balance, allowance, now)

    def record(self, event: CallEvent) -> None:
        with self._transaction("recording an event", write=True) as conn:
            conn.execute(_INSERT_EVENT, _event_params(event))

    def events(self, since: float | None = None, until: float | None = None) -> Iterator[CallEvent]:
        """Stream in pages, each its own short read, so a slow consumer never pins a snapshot or a connection."""
        lo = float("-inf") if since is None else float(since)
        hi = float("inf") if until is None else float(until)
        return self._stream_events(lo, hi)

    def _stream_events(self, lo: float, hi: float) -> Iterator[CallEvent]:
        rows = self._events_page(f"{_SELECT_EVENTS} WHERE time >= ? AND time < ?", (lo, hi))
        while rows:
            for row in rows:
                yield _event_from_row(row)
            if len(rows) < _EVENT_BATCH:
                return
            last = rows[-1]
            rows = self._events_page(
                f"{_SELECT_EVENTS} WHERE time < ? AND (time, seq) > (?, ?)",  # row values: a keyset cursor on the index
                (hi, last[2], last[0]),
            )

    def _events_page(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        with self._transaction("reading events", write=False) as conn:
            return conn.execute(f"{sql} ORDER BY time, seq LIMIT {_EVENT_BATCH}", params).fetchall()

    def grant(self, grant: Grant) -> None:
        with self._transaction("recording a grant", write=True) as conn:
            conn.execute(
                "INSERT INTO grants (id, scope, micros, tokens, created_at, expires_at, reason, granted_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (grant.id, grant.scope, grant.micros, grant.tokens, grant.created_at, grant.expires_at, grant.reason,
                 grant.granted_by),
            )  # fmt: skip

    def grants(self, *, now: float | None = None) -> list[Grant]:
        sql = "SELECT id, scope, micros, tokens, created_at, expires_at, reason, granted_by FROM grants"
        params: tuple[Any, ...] = ()
        if now is not None:
            sql += " WHERE created_at <= ? AND (expires_at IS NULL OR expires_at > ?)"
            params = (now, now)
        with self._transaction("reading grants", write=False) as conn:
            rows = conn.execute(sql + " ORDER BY seq", params).fetchall()
        return [Grant(*row) for row in rows]

    def active_reservations(self, *, now: float) -> list[Reservation]:
        with self._transaction("reading reservations", write=False) as conn:
            rows = conn.execute(
                "SELECT id, keys, micros, tokens, expires_at FROM reservations "
                "WHERE state = 'held' AND expires_at > ? ORDER BY id",
                (now,),
            ).fetchall()
        return [Reservation(rid, tuple(json.loads(keys)), m, t, exp) for rid, keys, m, t, exp in rows]

    def accounts(self) -> list[Balance]:
        with self._transaction("listing accounts", write=False) as conn:
            rows = conn.execute(
                "SELECT key, scope, spent_micros, reserved_micros, spent_tokens, reserved_tokens FROM accounts "
                "ORDER BY key"
            ).fetchall()
        return [Balance(key, scope, None, None, sm, rm, st, rt) for key, scope, sm, rm, st, rt in rows]

    def close(self) -> None:
        """Close idle connections; the ledger stays usable and reconnects on next use."""
        if _forks != self._forks or os.getpid() != self._pid:
            self._after_fork()
            return
        with self._pool_lock:
            idle, self._idle = self._idle, []
        with self._write_lock:
            if self._nowait_conn is not None:
                idle.append(self._nowait_conn)
                self._nowait_conn = None
        for conn in idle:
            try:
                conn.close()
            except sqlite3.Error:
                pass
