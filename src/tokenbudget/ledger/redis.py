"""A ledger in Redis, shared by every process on every machine of a fleet.

Why it is exact, and what it costs:

* Reserve and settle are each ONE Lua script (``register_script``: EVALSHA, reloaded automatically after a server
  restart or failover). Redis runs a script to completion before any other command, so "does it fit under every
  enforced allowance?" and "hold it on all of them" are one step: all or none, whatever the interleaving of
  processes and machines. The client never reads, computes and writes back.
* Every key lives under one hash tag, ``{<key_prefix>}``. A reservation touches several budget accounts (org,
  team, user, function...) plus the holds and the lease index, and the reserve script also sweeps expired holds of
  *any* account. Redis Cluster runs a script only if every key it touches is in one slot, so the only way to make
  cross-scope reservations atomic on a cluster is to put the whole ledger in one slot. The trade-off: one prefix is
  served by one primary (sharding does not spread it). A primary does ~100k such scripts a second, far more than a
  fleet makes LLM calls; tenants that need more can use separate prefixes, each its own slot.
* A hold is a field in one hash plus its expiry in a sorted set scored by ``expires_at``. The reserve script gives
  back every hold whose lease ended (at the ``now`` the caller passed, so fake clocks work), so a machine that dies
  mid-call blocks its budget only until its lease ends. Reads (balance, active reservations) never sweep: they
  subtract ended holds instead, so a report run with ``--now`` in the future cannot release live holds.
* Settle is idempotent through a per-reservation marker key (TTL: the rest of the lease plus ``settled_ttl``), set
  in the same script that drops the hold, charges the accounts and appends the event to a Stream. Reserve is
  idempotent by reservation id too, so the one retry redis-py makes on a dropped connection cannot hold twice.
* Windowed accounts carry ``EXPIREAT window_end + window_grace``: yesterday's budget disappears by itself. Totals
  persist. Events are a Stream capped at about ``events_maxlen`` entries.

When Redis is unreachable or slow (every call is bounded by ``connect_timeout``/``socket_timeout`` and at most one
retry), ``on_error`` decides: ``"closed"`` refuses reservations with :class:`~tokenbudget.errors.LedgerUnavailable`;
``"open"`` lets them through with a local reservation. Either way a *settle* that cannot reach Redis is not lost:
the money was already spent, so the charge and its event go to a local SQLite spool and a background thread
replays them, exactly once (the settle script's marker), when Redis answers again. After a failure Redis is not
tried again for a short, growing interval (at most :data:`_MAX_BACKOFF` seconds), so an outage costs each call
microseconds, not a timeout.
"""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import operator
import os
import socket
import sqlite3
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.exceptions
from redis._parsers.base import BaseParser
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..errors import ConfigError, LedgerError, LedgerUnavailable
from ..events import CallEvent
from .base import Allowance, Balance, Grant, Ledger, Refusal, Reservation, check_retention, effective_limits

__all__ = ["RedisLedger"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
OnError = Literal["closed", "open"]

_MAX_BACKOFF = 2.0
"""Longest pause (seconds) before Redis is tried again after a failure. Short: under ``closed`` the pause refuses
calls even if Redis is already back, and the background thread probes meanwhile anyway."""
_FIRST_BACKOFF = 0.05
_PAGE = 1000
_META_CAP = 65_536
"""Reservations whose account metadata this process remembers (for settles that must recreate an account)."""
_SECRET_QUERY = ("pass", "auth", "token", "secret")

# -- Lua --------------------------------------------------------------------------------------------------------------
# Amounts travel as decimal strings and are added with HINCRBY, so spend stays exact 64-bit integers on the server.
# Comparisons against limits happen in Lua numbers (doubles): exact below 2**53 micro-dollars ($9 billion).
# A hold is packed as a JSON array of strings: [micros, tokens, expires_at, key1, key2, ...].
# Rolling deploys: each library version runs its own scripts (by SHA) on the same keys, so what the scripts and the
# client store is a format shared by all versions: account hashes (scope, sm, rm, st, rt; EXPIREAT set when the
# account is created), holds, lease scores, settle markers, grant rows and event JSON. Changes to a script that only
# drop redundant commands (reserve writing the scope only when creating an account, settle checking an account's
# existence once) read and write exactly what the previous scripts did, so old and new may run side by side.

_PRELUDE = """
local function neg(s)
  if s == '0' then return '0' end
  if string.sub(s, 1, 1) == '-' then return string.sub(s, 2) end
  return '-' .. s
end
local function drop_hold(packed, acct_prefix, live)
  local h = cjson.decode(packed)
  for j = 4, #h do
    local acct = acct_prefix .. h[j]
    local here = redis.call('EXISTS', acct) == 1
    if live then live[acct] = here end
    if here then
      redis.call('HINCRBY', acct, 'rm', neg(h[1]))
      redis.call('HINCRBY', acct, 'rt', neg(h[2]))
    end
  end
end
local function granted(gkey, now_s, now)
  local gm, gt = 0, 0
  for _, row in ipairs(redis.call('ZRANGEBYSCORE', gkey, '(' .. now_s, '+inf')) do
    local m, t, created = string.match(row, '^[^|]*|([^|]*)|([^|]*)|(.*)$')
    if tonumber(created) <= now then
      gm = gm + tonumber(m)
      gt = gt + tonumber(t)
    end
  end
  return gm, gt
end
"""

_RESERVE = (
    _PRELUDE
    + """
-- KEYS: 1 holds hash, 2 lease zset, 3 settled marker of this reservation,
--       3+i account of allowance i, 3+n+i grants zset of allowance i's scope
-- ARGV: 1 account key prefix, 2 now, 3 reservation id, 4 micros, 5 tokens, 6 expires_at, 7 packed hold, 8 n,
--       then per allowance at b = 8+5(i-1): b+1 scope, b+2 limit micros, b+3 limit tokens ('' = none),
--       b+4 enforce ('1'/'0'), b+5 EXPIREAT of a new account ('' = never)
local holds, lease, rid = KEYS[1], KEYS[2], ARGV[3]
if redis.call('HEXISTS', holds, rid) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then
  return {1}  -- a retry of a reserve that already ran
end
local now_s = ARGV[2]
local now = tonumber(now_s)
for _, old in ipairs(redis.call('ZRANGEBYSCORE', lease, '-inf', now_s)) do
  local packed = redis.call('HGET', holds, old)
  if packed then
    drop_hold(packed, ARGV[1])
    redis.call('HDEL', holds, old)
  end
  redis.call('ZREM', lease, old)
end
local micros, tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
local n = tonumber(ARGV[8])
local scoped = {}  -- accounts the check found with their scope already set: no HSETNX needed
for i = 1, n do
  local b = 8 + 5 * (i - 1)
  if ARGV[b + 4] == '1' then
    local lm, lt = ARGV[b + 2], ARGV[b + 3]
    local a = redis.call('HMGET', KEYS[3 + i], 'sm', 'rm', 'st', 'rt', 'scope')
    local gm, gt = granted(KEYS[3 + n + i], now_s, now)
    local sm, rm = tonumber(a[1]) or 0, tonumber(a[2]) or 0
    local st, rt = tonumber(a[3]) or 0, tonumber(a[4]) or 0
    if (lm ~= '' and sm + rm + micros > tonumber(lm) + gm) or (lt ~= '' and st + rt + tokens > tonumber(lt) + gt) then
      return {0, i, a[1] or '0', a[2] or '0', a[3] or '0', a[4] or '0', gm, gt}
    end
    if a[5] then scoped[i] = true end
  end
end
for i = 1, n do
  local b = 8 + 5 * (i - 1)
  local k = KEYS[3 + i]
  if not scoped[i] and redis.call('HSETNX', k, 'scope', ARGV[b + 1]) == 1 and ARGV[b + 5] ~= '' then
    redis.call('EXPIREAT', k, ARGV[b + 5])
  end
  redis.call('HINCRBY', k, 'rm', ARGV[4])
  redis.call('HINCRBY', k, 'rt', ARGV[5])
end
redis.call('HSET', holds, rid, ARGV[7])
redis.call('ZADD', lease, ARGV[6], rid)
return {1}
"""
)

_SETTLE = (
    _PRELUDE
    + """
-- KEYS: 1 holds hash, 2 lease zset, 3 settled marker, 4 events stream, 4+i account of the reservation's key i,
--       then per balance to read (j = 1..m) at c = 4+n+2(j-1): c+1 its account, c+2 the grants zset of its scope
-- ARGV: 1 account key prefix, 2 reservation id, 3 micros, 4 tokens, 5 marker TTL (s), 6 event JSON ('' = none),
--       7 events maxlen, 8 n, then per key at b = 8+2(i-1): b+1 scope, b+2 EXPIREAT ('' = unknown / never);
--       a known scope lets a charge recreate an account Redis lost (restart without persistence, expiry);
--       then at r = 8+2n: r+1 now, r+2 m (absent = 0), r+2+j allowance key of balance j
-- Returns 1 (charged) or 0 (already settled); with m > 0, {that, then per balance sm, rm, st, rt, gm, gt}: the
-- balance script's figures, read in the same step (settle_and_read).
local function settle()
  if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
  local rid = ARGV[2]
  local packed = redis.call('HGET', KEYS[1], rid)
  local live = {}  -- account -> exists, as drop_hold found it (releasing a hold neither creates nor deletes one)
  if packed then
    drop_hold(packed, ARGV[1], live)
    redis.call('HDEL', KEYS[1], rid)
    redis.call('ZREM', KEYS[2], rid)
  end
  if ARGV[3] ~= '0' or ARGV[4] ~= '0' then
    local n = tonumber(ARGV[8])
    for i = 1, n do
      local k = KEYS[4 + i]
      local b = 8 + 2 * (i - 1)
      local here = live[k]
      if here == nil then here = redis.call('EXISTS', k) == 1 end
      if not here and ARGV[b + 1] ~= '' then
        redis.call('HSET', k, 'scope', ARGV[b + 1])
        if ARGV[b + 2] ~= '' then redis.call('EXPIREAT', k, ARGV[b + 2]) end
        here = true
      end
      if here then
        redis.call('HINCRBY', k, 'sm', ARGV[3])
        redis.call('HINCRBY', k, 'st', ARGV[4])
      end
    end
  end
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[5])
  if ARGV[6] ~= '' then
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'e', ARGV[6])
  end
  return 1
end
local charged = settle()
local n = tonumber(ARGV[8])
local r = 8 + 2 * n
local m = tonumber(ARGV[r + 2] or '0')
if m == 0 then return charged end
local now_s = ARGV[r + 1]
local now = tonumber(now_s)
local out = {charged}
local ended = nil  -- holds past their lease, decoded once for every balance that has holds at all
for j = 1, m do
  local c = 4 + n + 2 * (j - 1)
  local key = ARGV[r + 2 + j]
  local a = redis.call('HMGET', KEYS[c + 1], 'sm', 'rm', 'st', 'rt')
  local rm, rt = tonumber(a[2]) or 0, tonumber(a[4]) or 0
  if a[2] then
    if ended == nil then
      ended = {}
      for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_s)) do
        local p = redis.call('HGET', KEYS[1], old)
        if p then ended[#ended + 1] = cjson.decode(p) end
      end
    end
    for _, h in ipairs(ended) do
      for x = 4, #h do
        if h[x] == key then
          rm = rm - tonumber(h[1])
          rt = rt - tonumber(h[2])
        end
      end
    end
  end
  local gm, gt = granted(KEYS[c + 2], now_s, now)
  out[#out + 1] = a[1] or '0'
  out[#out + 1] = rm
  out[#out + 1] = a[3] or '0'
  out[#out + 1] = rt
  out[#out + 1] = gm
  out[#out + 1] = gt
end
return out
"""
)

_BALANCE = (
    _PRELUDE
    + """
-- KEYS: 1 holds hash, 2 lease zset, 3 account, 4 grants zset of its scope.  ARGV: 1 now, 2 allowance key.
-- Read-only: holds past their lease are subtracted, not swept.
local a = redis.call('HMGET', KEYS[3], 'sm', 'rm', 'st', 'rt')
local rm, rt = tonumber(a[2]) or 0, tonumber(a[4]) or 0
if a[2] then
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])) do
    local packed = redis.call('HGET', KEYS[1], rid)
    if packed then
      local h = cjson.decode(packed)
      for j = 4, #h do
        if h[j] == ARGV[2] then
          rm = rm - tonumber(h[1])
          rt = rt - tonumber(h[2])
        end
      end
    end
  end
end
local gm, gt = granted(KEYS[4], ARGV[1], tonumber(ARGV[1]))
return {a[1] or '0', rm, a[3] or '0', rt, gm, gt}
"""
)

_ACTIVE = """
-- KEYS: 1 holds hash, 2 lease zset.  ARGV: 1 now.  Holds whose lease has not ended, as id, packed, id, packed...
local out = {}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')) do
  local packed = redis.call('HGET', KEYS[1], rid)
  if packed then
    out[#out + 1] = rid
    out[#out + 1] = packed
  end
end
return out
"""

_GRANT = """
-- KEYS: 1 grant sequence, 2 grants list (for listing), 3 grants zset of the scope (scored by expiry, for reserve)
-- ARGV: 1 grant JSON, 2 micros, 3 tokens, 4 created_at, 5 expiry score ('+inf' = never)
local seq = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[3], ARGV[5], seq .. '|' .. ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4])
redis.call('RPUSH', KEYS[2], ARGV[1])
return seq
"""


# -- helpers ----------------------------------------------------------------------------------------------------------
class _Ids:
    """Reservation ids: 96 random bits per process, then a counter. Unique across a fleet like 128 random bits per
    id, without a ``getrandom`` system call and its hex conversion on every reservation."""

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        self.prefix = os.urandom(12).hex()
        self.seq = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.seq):08x}"  # next() on a count is atomic under the GIL


_IDS = _Ids()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_IDS.renew)  # a forked child must not reuse its parent's ids


def _new_id() -> str:
    return _IDS.next()


def _num(x: float) -> str:
    """Exact decimal text of a time: ``repr`` of a float round-trips, so Redis compares what Python compared."""
    return repr(float(x))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
"""``json.dumps`` with these options builds a new encoder on every call."""


def _dumps(obj: Any) -> str:
    return _ENCODER.encode(obj)


_EVENT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(CallEvent))
_event_values = operator.attrgetter(*_EVENT_FIELDS)


def _event_json_any(event: CallEvent) -> str:
    """``CallEvent.to_json`` without ``dataclasses.asdict``'s deep copy: that copy was ~12% of a pair's client CPU.
    Same JSON shape, read back by ``CallEvent.from_json``."""
    data = dict(zip(_EVENT_FIELDS, _event_values(event), strict=True))
    data["budget_keys"] = list(event.budget_keys)
    return _dumps(data)


_str = json.encoder.encode_basestring  # what _ENCODER (ensure_ascii=False) writes for a str, in C
_isfinite = math.isfinite


def _opt(x: str | None) -> str:
    return "null" if x is None else _str(x)


def _event_json(event: CallEvent) -> str:
    """:func:`_event_json_any`'s exact text, byte for byte, written with one f-string when every field has the type
    it is declared with (a finite float, a plain int, a plain str...): a third of the encoder's time, as the C encoder
    calls back into Python for each float and the dict it encodes must be built first. Anything else (a str subclass,
    a float in an int field, NaN...) goes to the general encoder. So the stored format is unchanged: any version's
    ``CallEvent.from_json`` reads it (a fleet mid-deploy shares one stream)."""
    e = event
    t, d, tags, bk = e.time, e.duration_s, e.tags, e.budget_keys
    ints = (e.input_tokens, e.output_tokens, e.cache_read_tokens, e.cache_write_tokens, e.cache_write_1h_tokens,
            e.reasoning_tokens, e.cost_micros, e.estimated_micros, e.original_estimated_micros)  # fmt: skip
    strs = (e.id, e.provider, e.model, e.operation, e.status, e.decision)
    opts = (e.original_model, e.org, e.team, e.user, e.function, e.run_id)
    if not (type(t) is float and type(d) is float and _isfinite(t) and _isfinite(d) and type(tags) is dict
            and type(bk) is tuple):  # fmt: skip
        return _event_json_any(event)
    for i in ints:
        if type(i) is not int:
            return _event_json_any(event)
    for s in strs:
        if type(s) is not str:
            return _event_json_any(event)
    for o in opts:
        if o is not None and type(o) is not str:
            return _event_json_any(event)
    for k in bk:
        if type(k) is not str:
            return _event_json_any(event)
    return (
        f'{{"id":{_str(strs[0])},"time":{t!r},"provider":{_str(strs[1])},"model":{_str(strs[2])},'
        f'"operation":{_str(strs[3])},"status":{_str(strs[4])},"decision":{_str(strs[5])},'
        f'"original_model":{_opt(opts[0])},"org":{_opt(opts[1])},"team":{_opt(opts[2])},"user":{_opt(opts[3])},'
        f'"tags":{_dumps(tags) if tags else "{}"},"function":{_opt(opts[4])},"run_id":{_opt(opts[5])},'
        f'"input_tokens":{ints[0]!r},"output_tokens":{ints[1]!r},"cache_read_tokens":{ints[2]!r},'
        f'"cache_write_tokens":{ints[3]!r},"cache_write_1h_tokens":{ints[4]!r},"reasoning_tokens":{ints[5]!r},'
        f'"cost_micros":{ints[6]!r},"estimated_micros":{ints[7]!r},"original_estimated_micros":{ints[8]!r},'
        f'"budget_keys":[{",".join([_str(k) for k in bk])}],"duration_s":{d!r}}}'
    )


def _unpack_hold(rid: Any, packed: Any) -> Reservation:
    h = json.loads(packed)
    return Reservation(_text(rid), tuple(h[3:]), int(h[0]), int(h[1]), float(h[2]))


def _default_spool_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir("tokenbudget")) / "spool.db"


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a reserve sends for one tuple of allowances, apart from the amounts, the time and the id. ``meta`` is
    shared by every reservation made with this plan (kept for their settles): never mutated. ``until``: the earliest
    ``window_end``, after which the accounts' EXPIREAT follows the clock and the plan is rebuilt on each use."""

    keys: tuple[str, ...]
    redis_keys: tuple[str, ...]
    args: tuple[str, ...]
    meta: list[list[str]]
    packed: str
    until: float | None


_PLAN_CAP = 4096
"""Distinct allowance tuples whose reserve arguments a ledger keeps (all dropped when full: windows roll over)."""


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a URL points, split into what redis-py needs and what may be shown to people."""

    redis_url: str
    redacted: str
    prefix: str | None
    password: str | None


def _parse_url(url: str) -> _Target:
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("redis", "rediss"):
        raise ConfigError(
            f"expected redis://HOST[:PORT][/DB] or rediss://..., got scheme {parts.scheme!r}", key="ledger"
        )
    prefix: str | None = None
    kept: list[tuple[str, str]] = []
    shown: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "key_prefix":
            prefix = value
            continue
        kept.append((name, value))
        shown.append((name, "***" if any(s in name.lower() for s in _SECRET_QUERY) else value))
    netloc = parts.netloc
    shown_netloc = netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        if ":" in userinfo:
            shown_netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    password = unquote(parts.password) if parts.password else None
    redis_url = urlunsplit((parts.scheme, netloc, parts.path, urlencode(kept), ""))
    if prefix is not None:
        shown.append(("key_prefix", prefix))
    redacted = urlunsplit((parts.scheme, shown_netloc, parts.path, urlencode(shown, safe="*{}:"), ""))
    return _Target(redis_url, redacted, prefix, password)


def _load_hiredis() -> Any:
    try:
        import hiredis
    except ImportError:  # pragma: no cover - the redis extra installs it; without it redis-py's own parser reads
        return None
    return hiredis


_hiredis: Any = _load_hiredis()
_parse_error = BaseParser.parse_error
"""redis-py's mapping of an error reply to its exception class (NOSCRIPT -> NoScriptError...)."""
_push_type: Any = getattr(_hiredis, "PushNotification", None)
"""RESP3 out-of-band messages (hiredis >= 3.2): not replies to any call."""

_TRANSIENT_REPLIES = ("OOM", "MISCONF", "READONLY", "LOADING", "MASTERDOWN", "BUSY", "TRYAGAIN", "CLUSTERDOWN",
                      "NOREPLICAS")  # fmt: skip


def _unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means "Redis cannot answer now" (fail over to the spool) rather than "this is wrong"."""
    if isinstance(exc, (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)):
        return False  # a wrong password or ACL is a configuration error: failing open would hide it
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, TimeoutError)):
        return True
    if isinstance(exc, redis.exceptions.ResponseError):
        return str(exc).split(" ", 1)[0].upper() in _TRANSIENT_REPLIES or isinstance(
            exc, (redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError, redis.exceptions.TryAgainError)
        )
    return False


# -- spool ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Spooled:
    seq: int
    rid: str
    keys: list[str]
    meta: list[list[str]]
    micros: int
    tokens: int
    expires_at: float
    event: str | None


class _Spool:
    """Charges and events Redis could not take, in a local SQLite file, until a replay pushes them.

    One table for every Redis ledger of this user, keyed by ``target`` (redacted URL and prefix) so a replay only
    pushes rows to the Redis they were meant for. A connection per operation: this runs only during outages.
    """

    _SCHEMA = """CREATE TABLE IF NOT EXISTS spool (
        seq INTEGER PRIMARY KEY,
        target TEXT NOT NULL,
        rid TEXT NOT NULL,
        keys TEXT NOT NULL,
        meta TEXT NOT NULL,
        micros INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        expires_at REAL NOT NULL,
        event TEXT,
        created_at REAL NOT NULL,
        UNIQUE (target, rid)
    )"""

    def __init__(self, path: Path, target: str) -> None:
        self.path = path
        self.target = target
        self._lock = threading.Lock()

    def exists(self) -> bool:
        return self.path.exists()

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.exists():
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                os.close(fd)
            conn = sqlite3.connect(str(self.path), timeout=5.0, isolation_level=None)
            conn.execute(self._SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerUnavailable(
                f"Redis is unreachable and the local spool {self.path} cannot be written either ({exc}): this "
                "charge could not be kept. Check that directory's permissions and free space, or set spool_path"
            ) from exc
        return conn

    def add(self, rid: str, keys: Sequence[str], meta: Sequence[Sequence[str]], micros: int, tokens: int,
            expires_at: float, event: str | None) -> bool:  # fmt: skip
        with self._lock:
            conn = self._connect()
            try:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO spool (target, rid, keys, meta, micros, tokens, expires_at, event, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (self.target, rid, _dumps(list(keys)), _dumps([list(m) for m in meta]), micros, tokens,
                     expires_at, event, time.time()),
                )  # fmt: skip
                return cur.rowcount == 1
            except sqlite3.Error as exc:
                raise LedgerUnavailable(f"Redis is unreachable and the local spool {self.path} failed: {exc}") from exc
            finally:
                conn.close()

    def batch(self, limit: int) -> list[_Spooled]:
        if not self.exists():
            return []
        with self._lock:
            conn = self._connect()
            try:
                rows = conn.execute(
                    "SELECT seq, rid, keys, meta, micros, tokens, expires_at, event FROM spool WHERE target = ? "
                    "ORDER BY seq LIMIT ?",
                    (self.target, limit),
                ).fetchall()
            finally:
                conn.close()
        return [_Spooled(s, r, json.loads(k), json.loads(m), mi, t, e, ev) for s, r, k, m, mi, t, e, ev in rows]

    def delete(self, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        with self._lock:
            conn = self._connect()
            try:
                conn.execute(f"DELETE FROM spool WHERE seq IN ({', '.join('?' * len(seqs))})", list(seqs))
            finally:
                conn.close()

    def count(self) -> int:
        if not self.exists():
            return 0
        with self._lock:
            conn = self._connect()
            try:
                return int(conn.execute("SELECT COUNT(*) FROM spool WHERE target = ?", (self.target,)).fetchone()[0])
            finally:
                conn.close()


# -- group commit -----------------------------------------------------------------------------------------------------
def _command(*args: str) -> bytes:
    """One command in RESP, as redis-py would send it (its general packer costs several times more per argument)."""
    text = "".join([f"${len(a)}\r\n{a}\r\n" for a in args])
    if text.isascii():  # then lengths in characters are lengths in bytes
        return f"*{len(args)}\r\n{text}".encode("ascii")
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode("utf-8")
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class _Lua:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> _Lua:
        return cls(source, hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest())

    def call(self, keys: Sequence[str], args: Sequence[str]) -> bytes:
        return _command("EVALSHA", self.sha, str(len(keys)), *keys, *args)


_PENDING: Any = object()


class _Waiter:
    """One script call: what to send, then its reply (or error).

    ``gate`` is a lock created held; the caller blocks on it until the reader hands over its reply, or the reading
    role itself (``promoted``). A waiter with no gate has nobody waiting: an internal ``SCRIPT LOAD``, or a call
    whose caller was interrupted. Its reply is still read (the stream is in order) and then dropped."""

    __slots__ = ("command", "error", "gate", "promoted", "reloaded", "reply", "retried", "script")

    def __init__(self, script: _Lua | None, command: bytes) -> None:
        self.script = script
        self.command = command
        self.reply: Any = _PENDING
        self.error: BaseException | None = None
        self.gate: Any = None
        self.promoted = False
        self.reloaded = False
        self.retried = False
        if script is not None:
            self.gate = _thread.allocate_lock()
            self.gate.acquire()

    def answered(self) -> bool:
        return self.reply is not _PENDING or self.error is not None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.reply


def _copy_error(exc: BaseException) -> BaseException:
    """A waiter's own instance of a batch-wide error: one exception object raised in several threads at once would
    collect all their tracebacks."""
    try:
        copy = type(exc)(*exc.args)
    except Exception:
        return exc
    copy.__cause__ = exc.__cause__
    return copy


def _io_error(exc: BaseException) -> redis.exceptions.RedisError:
    if isinstance(exc, redis.exceptions.RedisError):
        return exc
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return redis.exceptions.TimeoutError(f"Timeout talking to Redis: {exc}")
    return redis.exceptions.ConnectionError(f"Error talking to Redis: {exc!r}")


class _Replies:
    """The replies of one connection, in order. With hiredis an error reply comes back as an exception *object* (the
    answer of that one call; the stream is fine) while only a failure to read raises, so the two are never confused
    (redis-py raises both, and a few reply errors, like LOADING, are ``ConnectionError`` subclasses)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.sock = conn._sock
        self.reader: Any = None
        if _hiredis is not None:
            self.reader = _hiredis.Reader(replyError=_parse_error)
            self.buf = bytearray(65536)

    def next(self, before_waiting: Callable[[], None]) -> Any:
        """The next reply; ``before_waiting`` runs first if there is none buffered (the reader writes what queued)."""
        reader = self.reader
        if reader is None:
            before_waiting()
            try:
                return self.conn.read_response(disconnect_on_error=False)
            except redis.exceptions.ResponseError as exc:
                return exc
        while True:
            reply = reader.gets()
            if reply is False:
                before_waiting()
                n = self.sock.recv_into(self.buf)
                if not n:
                    raise redis.exceptions.ConnectionError("Redis closed the connection")
                reader.feed(self.buf, 0, n)
            elif _push_type is None or not isinstance(reply, _push_type):
                return reply


class _GroupCommit:
    """Reserve and settle scripts of every thread of this process, pipelined on one connection (group commit).

    A call is written as soon as it is made, by its own thread (the writer), unless another thread is writing
    already: then that one writes it along with its own, as one ``sendall``. One thread at a time (the reader) reads
    replies, in order, and hands each to its caller; when its own has come it passes the reading role to the oldest
    call still waiting. So the next calls go out while Redis is still running the previous ones and while the reader
    is busy: Redis and the callers' Python work overlap instead of taking turns (a batch-at-a-time commit left Redis
    idle while the threads built their next calls). A lone thread writes, then reads its own reply: one round trip,
    as a plain redis-py call. Redis runs each script atomically in arrival order, so pipelining changes nothing
    about what a script guarantees.

    TLS connections are serial (``_serial``): OpenSSL does not allow one thread to read while another writes, so
    there the reader writes what has queued only when nothing is in flight (a batch at a time).

    Failures: an error reply belongs to its call alone. NOSCRIPT (a restarted or failed-over server) queues a
    ``SCRIPT LOAD`` and the call again. A connection error or timeout (reading or writing) stops all writing; the
    reader waits for any write under way, drops the connection and resends, once, every call that got no reply on a
    new one, in order -- both scripts are idempotent by reservation id, so a call that ran but whose reply was lost
    cannot hold or charge twice. If that fails too, every unanswered call gets the error: none waits beyond the
    socket timeouts, none is left with nobody to send or read it. A caller interrupted by a signal leaves its call
    to be read and dropped, and passes the reading role on if it had it.
    """

    def __init__(self, pool: Any, pause: float) -> None:
        self.pid = os.getpid()
        self._pool = pool
        self._pause = pause
        self._conn: Any = None
        self._replies: _Replies | None = None
        self._serial = False
        self._mutex = threading.Lock()
        self._connect_lock = threading.Lock()
        self._unsent: list[_Waiter] = []
        self._inflight: deque[_Waiter] = deque()
        self._writing = False
        self._reading = False
        self._halted = False
        self._broken: BaseException | None = None
        self.largest = 0
        """Most calls pending at once (in flight or queued) on the connection so far (for tests and curiosity)."""

    # -- callers --------------------------------------------------------------------------------------------------
    def call(self, script: _Lua, command: bytes) -> Any:
        if self._replies is None:
            self._connect()  # a failure here is this caller's alone: nothing was queued
        me = _Waiter(script, command)
        try:
            with self._mutex:
                self._unsent.append(me)
                pending = len(self._unsent) + len(self._inflight)
                if pending > self.largest:
                    self.largest = pending
                lead = not self._reading
                if lead:
                    self._reading = True
                # Written now, even with others in flight (not held for the reader's next wait): Redis runs it while
                # the callers handle earlier replies. On TLS never (_serial): the reader writes, between its reads.
                write = not (self._serial or self._writing or self._halted)
                if write:
                    self._writing = True
            if write:
                self._write()
            if not lead:
                me.gate.acquire()  # released by the reader: answered, or promoted to read
                if not me.promoted:
                    return me.result()
            self._read(me)
        except BaseException:
            self._abandon(me)
            raise
        return me.result()

    def _abandon(self, me: _Waiter) -> None:
        """An interrupted caller (Ctrl-C): its call stays queued or in flight and is read and dropped; if the reading
        role is (or was just) handed to it, pass it on, or every call behind it would wait forever."""
        with self._mutex:
            me.gate = None
            promoted, me.promoted = me.promoted, False
            nxt = self._next_reader() if promoted else None
        if nxt is not None:
            nxt.release()

    # -- writing --------------------------------------------------------------------------------------------------
    def _write(self) -> None:
        """Holding the writing role: send everything queued, as one write each time round, until nothing is."""
        while True:
            with self._mutex:
                batch = self._unsent
                replies = self._replies
                if not batch or self._halted or self._broken is not None:
                    self._writing = False
                    return
                self._unsent = []
                self._inflight.extend(batch)
            try:
                if replies is None:
                    raise redis.exceptions.ConnectionError("no connection to Redis")
                replies.sock.sendall(b"".join([w.command for w in batch]))
            except BaseException as exc:
                # What reached Redis is unknown: the reader drops the connection and resends what got no reply.
                with self._mutex:
                    if self._broken is None:
                        self._broken = _io_error(exc)
                    self._writing = False
                if replies is not None:
                    _shutdown(replies.sock)  # wakes a reader blocked on this connection
                if not isinstance(exc, Exception):
                    raise
                return

    # -- reading --------------------------------------------------------------------------------------------------
    def _next_reader(self) -> Any:
        """Under the mutex: promote the oldest call someone waits for to reader and return its gate to release, or
        give the role up when there is none (the next call takes it)."""
        for queue in (self._inflight, self._unsent):
            for w in queue:
                if w.gate is not None and not w.answered():
                    w.promoted = True
                    return w.gate
        self._reading = False
        return None

    def _read(self, me: _Waiter) -> None:
        """Holding the reading role: read replies in order, handing each to its caller, until ``me`` has its own;
        then pass the role on."""
        try:
            while True:
                with self._mutex:
                    if me.answered():
                        break
                    broken, replies = self._broken, self._replies
                if broken is not None or replies is None:
                    self._recover(broken or redis.exceptions.ConnectionError("no connection to Redis"))
                    continue
                try:
                    reply = replies.next(self._flush)
                except BaseException as exc:
                    with self._mutex:
                        if self._broken is None:
                            self._broken = _io_error(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                with self._mutex:
                    w = self._inflight.popleft()
                self._deliver(w, reply)
        finally:
            with self._mutex:
                nxt = self._next_reader()
            if nxt is not None:
                nxt.release()

    def _flush(self) -> None:
        """The reader is about to wait for Redis: first send anything still queued, as one write (calls normally go
        out as they are made, by their own threads; on TLS only the reader writes, here, when nothing is in flight)."""
        with self._mutex:
            write = bool(self._unsent) and not (self._writing or self._halted or self._broken is not None
                                                or (self._serial and self._inflight))  # fmt: skip
            if write:
                self._writing = True
        if write:
            self._write()

    def _deliver(self, w: _Waiter, reply: Any) -> None:
        if isinstance(reply, redis.exceptions.NoScriptError) and w.script is not None and not w.reloaded:
            w.reloaded = True  # load the script, then run the call again (once)
            load = _Waiter(None, _command("SCRIPT", "LOAD", w.script.source))
            with self._mutex:
                self._unsent += [load, w]  # sent before the reader next waits
            return
        if isinstance(reply, BaseException):
            w.error = reply
        else:
            w.reply = reply
        gate = w.gate
        if gate is not None and not w.promoted:
            gate.release()

    # -- failures -------------------------------------------------------------------------------------------------
    def _recover(self, exc: BaseException) -> None:
        """Holding the reading role after a failure: stop the writers, drop the connection, resend every call that got
        no reply once on a new one (reading all the replies), and fail those that had their retry already."""
        with self._mutex:
            self._halted = True
        while True:
            with self._mutex:
                if not self._writing:
                    todo = [*self._inflight, *self._unsent]
                    self._inflight.clear()
                    self._unsent = []
                    break
            time.sleep(0.0002)  # a write under way ends within the socket timeout
        self._drop()
        again = [w for w in todo if not w.retried and not w.answered()]
        for w in todo:
            if w not in again and not w.answered():
                w.error = _copy_error(exc)
        try:
            if again:
                for w in again:
                    w.retried = True
                time.sleep(self._pause)
                self._exchange(again)
        except BaseException as failure:
            self._drop()
            for w in again:
                if not w.answered():
                    w.error = _copy_error(_io_error(failure)) if isinstance(failure, Exception) else (
                        redis.exceptions.ConnectionError(f"interrupted: {failure!r}"))
            if not isinstance(failure, Exception):
                self._resume(todo)
                raise
        self._resume(todo)

    def _exchange(self, waiters: list[_Waiter]) -> None:
        """Send ``waiters`` on a new connection and read all their replies (nobody else writes or reads meanwhile)."""
        self._connect(replace=True)
        replies = self._replies
        assert replies is not None
        todo = waiters
        while todo:
            replies.sock.sendall(b"".join([w.command for w in todo]))
            again: list[_Waiter] = []
            for w in todo:
                reply = replies.next(_nothing)
                if isinstance(reply, redis.exceptions.NoScriptError) and w.script is not None and not w.reloaded:
                    w.reloaded = True
                    again += [_Waiter(None, _command("SCRIPT", "LOAD", w.script.source)), w]
                elif isinstance(reply, BaseException):
                    w.error = reply
                else:
                    w.reply = reply
            todo = again

    def _resume(self, done: list[_Waiter]) -> None:
        """After a recovery: let writing go on (sending what queued meanwhile) and wake the calls it answered."""
        with self._mutex:
            self._halted = False
            self._broken = None
        for w in done:
            gate = w.gate
            if gate is not None and w.answered() and not w.promoted:
                gate.release()

    # -- the connection -------------------------------------------------------------------------------------------
    def _connect(self, replace: bool = False) -> None:
        """Our own connection, built like the pool's (URL options, credentials, timeouts, client name), but outside
        it: the group commit holds no pooled connection, so max_connections=1 cannot starve other calls."""
        with self._connect_lock:
            if self._replies is not None and not replace:
                return
            conn = self._pool.connection_class(**self._pool.connection_kwargs)
            try:
                conn.connect()
                replies = _Replies(conn)
            except BaseException:
                conn.disconnect()
                raise
            with self._mutex:
                self._conn, self._replies = conn, replies
                self._serial = isinstance(conn._sock, ssl.SSLSocket)

    def _drop(self) -> None:
        with self._connect_lock:
            with self._mutex:
                conn, self._conn, self._replies = self._conn, None, None
            if conn is not None:
                conn.disconnect()

    def close(self) -> None:
        self._drop()


def _nothing() -> None:
    pass


def _shutdown(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- the ledger -------------------------------------------------------------------------------------------------------
class RedisLedger(Ledger):
    """The fleet ledger: every machine pointed at one Redis shares every budget, exactly.

    ``url`` is ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` or ``rediss://`` for TLS; query options go to
    redis-py (``?ssl_cert_reqs=none``...), except ``key_prefix``, which overrides the argument so one URL setting
    can name a tenant. Credentials missing from the URL come from ``TOKENBUDGET_REDIS_USERNAME`` /
    ``TOKENBUDGET_REDIS_PASSWORD``. ``self.url`` has the password replaced by ``***``: it appears in messages.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "tokenbudget",
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        events_maxlen: int = 1_000_000,
        spool_path: str | os.PathLike[str] | None = None,
        on_error: OnError | str = "closed",
        max_connections: int = 64,
        window_grace: float = 7 * 86_400.0,
        settled_ttl: float = 86_400.0,
    ) -> None:
        target = _parse_url(url)
        prefix = target.prefix if target.prefix is not None else key_prefix
        if not prefix or any(c in prefix for c in "{}"):
            raise ConfigError(f"key_prefix must be non-empty and without braces, got {prefix!r}", key="ledger")
        if on_error not in ("closed", "open"):
            raise ConfigError(f"on_error must be 'closed' or 'open', got {on_error!r}", key="on_ledger_error")
        for name, value in (("socket_timeout", socket_timeout), ("connect_timeout", connect_timeout)):
            if not value > 0:
                raise ConfigError(f"{name} must be > 0 seconds (an unbounded wait could hang every call)")
        check_retention(window_grace, events_maxlen)
        if events_maxlen is None:
            raise ConfigError("Redis holds events in memory: give a number (default 1,000,000)", key="events_maxlen")
        if max_connections < 1 or settled_ttl <= 0:
            raise ConfigError("max_connections must be >= 1 and settled_ttl > 0")
        self.url = target.redacted
        self.key_prefix = prefix
        self.on_error: OnError = "open" if on_error == "open" else "closed"
        self.socket_timeout = float(socket_timeout)
        self.connect_timeout = float(connect_timeout)
        self.events_maxlen = int(events_maxlen)
        self.window_grace = float(window_grace)
        self.settled_ttl = float(settled_ttl)
        self._password = target.password or os.environ.get("TOKENBUDGET_REDIS_PASSWORD") or None

        tag = "{" + prefix + "}:"
        self._tag = tag
        self._acct = tag + "acct:"
        self._holds = tag + "holds"
        self._lease = tag + "lease"
        self._done = tag + "done:"
        self._events = tag + "events"
        self._grants = tag + "grants"
        self._grant_seq = tag + "grant_seq"
        self._scope_grants = tag + "gscope:"

        pool_kwargs: dict[str, Any] = {
            "max_connections": max_connections,
            # Waiting for a free pooled connection is bounded too; generous, as it means a burst, not an outage.
            "timeout": 2 * (self.connect_timeout + self.socket_timeout),
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.connect_timeout,
            "client_name": "tokenbudget",
        }
        user = os.environ.get("TOKENBUDGET_REDIS_USERNAME")
        password = os.environ.get("TOKENBUDGET_REDIS_PASSWORD")
        if user:
            pool_kwargs["username"] = user  # the URL's own credentials win (redis-py applies them last)
        if password:
            pool_kwargs["password"] = password
        # One retry, after a short pause: enough to replace a pooled connection Redis closed (restart, idle
        # timeout), bounded so a dead server costs a caller at most ~2 x (connect + socket timeout).
        self._pool = redis.BlockingConnectionPool.from_url(
            target.redis_url, retry=Retry(ExponentialBackoff(cap=0.05, base=0.005), 1), **pool_kwargs
        )
        self._client = redis.Redis(connection_pool=self._pool)
        self._reserve_script = self._client.register_script(_RESERVE)
        self._settle_script = self._client.register_script(_SETTLE)
        self._balance_script = self._client.register_script(_BALANCE)
        self._active_script = self._client.register_script(_ACTIVE)
        self._grant_script = self._client.register_script(_GRANT)
        self._reserve_lua = _Lua.of(_RESERVE)
        self._settle_lua = _Lua.of(_SETTLE)
        self._group: _GroupCommit | None = None
        self._async_lock = threading.Lock()
        self._executor: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None

        self._plans: dict[tuple[Allowance, ...], _Plan] = {}
        self._meta: OrderedDict[str, list[list[str]]] = OrderedDict()
        self._meta_lock = threading.Lock()

        self._spool = _Spool(
            Path(os.path.abspath(os.path.expanduser(os.fspath(spool_path)))) if spool_path else _default_spool_path(),
            f"{self.url}#{prefix}",
        )
        self._state_lock = threading.Lock()
        self._replay_lock = threading.Lock()
        self._failures = 0
        self._down_until = 0.0
        self._last_error = ""
        self._spool_dirty = self._spool.exists()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._closed = False
        if self._spool_dirty:
            self._ensure_worker()  # charges a previous process could not push

    def __repr__(self) -> str:
        return f"RedisLedger({self.url!r}, key_prefix={self.key_prefix!r}, on_error={self.on_error!r})"

    # -- availability ------------------------------------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def _fail(self, exc: BaseException, doing: str) -> LedgerError:
        """Translate a redis-py error; an unavailability also opens the breaker so the next calls fail fast."""
        detail = self._redact(f"{type(exc).__name__}: {exc}")
        if not _unavailable(exc):
            if isinstance(exc, (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)):
                return LedgerError(
                    f"Redis ledger {self.url}: {doing} was refused ({detail}). Check the username and password (in "
                    "the URL or TOKENBUDGET_REDIS_USERNAME / TOKENBUDGET_REDIS_PASSWORD) and the user's ACL (it "
                    f"needs ~{self._tag}* +@read +@write +evalsha +script|load +ping +hello +client|setname; see "
                    "docs/redis.md)"
                )
            return LedgerError(f"Redis ledger {self.url}: {doing} failed: {detail}")
        with self._state_lock:
            self._failures += 1
            first = self._failures == 1
            self._down_until = time.monotonic() + min(_MAX_BACKOFF, _FIRST_BACKOFF * 2 ** (self._failures - 1))
            self._last_error = detail
        if first:
            log.warning(
                "Redis ledger %s is unavailable (%s while %s); on_ledger_error=%s: %s", self.url, detail, doing,
                self.on_error,
                "calls go through and charges are spooled locally" if self.on_error == "open" else
                "calls are refused until it answers; charges of calls already made are spooled locally",
            )  # fmt: skip
        advice = "Check the server, the network and the URL"
        if doing == "reserve":
            advice = (
                'With on_ledger_error = "closed" calls are refused until Redis answers; nothing was reserved (a '
                "reserve that timed out may hold its amount until its lease ends). " + advice + ", or set "
                'on_ledger_error = "open" to let calls through and spool their charges'
            )
        return LedgerUnavailable(f"Redis ledger {self.url} is unavailable: {doing} failed ({detail}). {advice}")

    def _check_breaker(self, doing: str) -> None:
        if time.monotonic() < self._down_until:
            raise LedgerUnavailable(
                f"Redis ledger {self.url} is unavailable: {doing} not attempted, it failed moments ago "
                f"({self._last_error}); it is retried within {_MAX_BACKOFF:g}s"
            )

    def _healthy(self) -> None:
        if self._failures or self._spool_dirty:
            with self._state_lock:
                if self._failures:
                    log.info("Redis ledger %s answers again", self.url)
                self._failures = 0
                self._down_until = 0.0
            if self._spool_dirty:
                self._ensure_worker()

    def _run(self, doing: str, call: Callable[[], _T], *, probe: bool = False) -> _T:
        if not probe:
            self._check_breaker(doing)
        try:
            out = call()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise self._fail(exc, doing) from exc
        self._healthy()
        return out

    # -- argument building -------------------------------------------------------------------------------------------
    def _expireat(self, window_end: float | None) -> str:
        if window_end is None:
            return ""
        # Never in the past: a clock behind the server's (or a test's fake clock) must not delete a live account.
        return str(math.ceil(max(float(window_end), time.time()) + self.window_grace))

    def _reserve_call(
        self, allowances: Sequence[Allowance], micros: int, tokens: int, lease_seconds: float, now: float
    ) -> tuple[Reservation, list[str], list[Any], list[list[str]]]:
        micros, tokens = int(micros), int(tokens)
        plan = self._plan(allowances)
        rid = _new_id()
        res = Reservation(rid, plan.keys, micros, tokens, now + lease_seconds)
        m, t, exp = str(micros), str(tokens), _num(res.expires_at)
        # _dumps([m, t, exp, *res.keys]) exactly: digits and a float's repr need no escaping
        packed = f'["{m}","{t}","{exp}"{plan.packed}]'
        keys = [self._holds, self._lease, self._done + rid, *plan.redis_keys]
        args: list[Any] = [self._acct, _num(now), rid, m, t, exp, packed, *plan.args]
        return res, keys, args, plan.meta

    def _plan(self, allowances: Sequence[Allowance]) -> _Plan:
        """The reserve arguments that depend only on the allowances, built once per distinct tuple of them."""
        try:
            key = allowances if type(allowances) is tuple else tuple(allowances)
            plan = self._plans.get(key)
        except TypeError:  # an unhashable Allowance look-alike: build every time
            return self._new_plan(allowances)
        if plan is None or (plan.until is not None and time.time() > plan.until):
            plan = self._new_plan(allowances)
            if len(self._plans) >= _PLAN_CAP:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _new_plan(self, allowances: Sequence[Allowance]) -> _Plan:
        keys = tuple(a.key for a in allowances)
        redis_keys = [self._acct + k for k in keys] + [self._scope_grants + a.scope for a in allowances]
        args: list[str] = [str(len(allowances))]
        meta: list[list[str]] = []
        until: float | None = None
        for a in allowances:
            exp = self._expireat(a.window_end)
            if a.window_end is not None:
                # _expireat is window_end + grace while window_end is not past; after that it follows the clock
                end = float(a.window_end)
                until = end if until is None else min(until, end)
            meta.append([a.scope, exp])
            args += [
                a.scope,
                "" if a.limit_micros is None else str(int(a.limit_micros)),
                "" if a.limit_tokens is None else str(int(a.limit_tokens)),
                "1" if a.enforce else "0",
                exp,
            ]
        packed = "".join(["," + _str(k) for k in keys])
        return _Plan(keys, tuple(redis_keys), tuple(args), meta, packed, until)

    def _reserve_result(
        self, out: Any, res: Reservation, allowances: Sequence[Allowance], meta: list[list[str]]
    ) -> Reservation | Refusal:
        if int(out[0]) == 1:
            return self._remember(res, meta)
        a = allowances[int(out[1]) - 1]
        gm, gt = int(out[6]), int(out[7])
        lm, lt = effective_limits(a, gm, gt)
        bal = Balance(a.key, a.scope, lm, lt, int(out[2]), int(out[3]), int(out[4]), int(out[5]), gm, gt)
        return Refusal(a, bal, res.micros, res.tokens)

    def _remember(self, res: Reservation, meta: list[list[str]]) -> Reservation:
        """Keep each key's scope and expiry until the settle: if Redis lost an account meanwhile (a restart without
        persistence, or a local reservation under ``on_error = "open"`` it never saw), the charge recreates it."""
        with self._meta_lock:
            self._meta[res.id] = meta
            if len(self._meta) > _META_CAP:
                self._meta.popitem(last=False)
        return res

    def _meta_of(self, reservation: Reservation) -> list[list[str]]:
        with self._meta_lock:
            meta = self._meta.get(reservation.id)
        if meta is None or len(meta) != len(reservation.keys):
            return [["", ""] for _ in reservation.keys]
        return meta

    def _forget(self, rid: str) -> None:
        with self._meta_lock:
            self._meta.pop(rid, None)

    def _settle_call(
        self, rid: str, keys: Sequence[str], meta: Sequence[Sequence[str]], micros: int, tokens: int,
        expires_at: float, event: str | None, now: float, reads: Sequence[Allowance] = (),
    ) -> tuple[list[str], list[Any]]:  # fmt: skip
        ttl = math.ceil(max(float(expires_at) - float(now), 0.0) + self.settled_ttl)
        redis_keys = [self._holds, self._lease, self._done + rid, self._events, *(self._acct + k for k in keys)]
        args: list[Any] = [self._acct, rid, str(int(micros)), str(int(tokens)), str(ttl), event or "",
                           str(self.events_maxlen), str(len(keys))]  # fmt: skip
        for scope, exp in meta:
            args += [scope, exp]
        if reads:
            args += [_num(now), str(len(reads))]
            for a in reads:
                redis_keys += [self._acct + a.key, self._scope_grants + a.scope]
                args.append(a.key)
        return redis_keys, args

    def _read_results(self, out: Any, reads: Sequence[Allowance]) -> tuple[bool, dict[str, Balance]]:
        """The reply of a settle script asked for ``reads``: whether it charged, and their balances by key."""
        return int(out[0]) == 1, {a.key: self._balance_result(out[1 + 6 * j : 7 + 6 * j], a)
                                  for j, a in enumerate(reads)}  # fmt: skip

    def _balance_call(self, allowance: Allowance, now: float) -> tuple[list[str], list[Any]]:
        keys = [self._holds, self._lease, self._acct + allowance.key, self._scope_grants + allowance.scope]
        return keys, [_num(now), allowance.key]

    @staticmethod
    def _balance_result(out: Any, allowance: Allowance) -> Balance:
        gm, gt = int(out[4]), int(out[5])
        lm, lt = effective_limits(allowance, gm, gt)
        return Balance(allowance.key, allowance.scope, lm, lt, int(out[0]), int(out[1]), int(out[2]), int(out[3]),
                       gm, gt)  # fmt: skip

    # -- spool ------------------------------------------------------------------------------------------------------
    def _spool_settle(self, reservation: Reservation, meta: Sequence[Sequence[str]], micros: int, tokens: int,
                      event: str | None) -> bool:  # fmt: skip
        added = self._spool.add(reservation.id, reservation.keys, meta, micros, tokens, reservation.expires_at, event)
        with self._state_lock:
            self._spool_dirty = True
        self._ensure_worker()
        return added

    def _ensure_worker(self) -> None:
        with self._state_lock:
            if self._closed or (self._worker is not None and self._worker.is_alive()):
                return
            self._stop.clear()
            self._worker = threading.Thread(target=self._work, name="tokenbudget-redis-spool", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        """Replay the spool once Redis answers, probing with the breaker's backoff; exit when the spool is empty."""
        refused = 0
        while not self._stop.is_set():
            wait = self._down_until - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            try:
                self._replay(stop=self._stop)
            except LedgerUnavailable:
                if self._down_until <= time.monotonic():  # e.g. the spool itself failed: do not spin
                    self._stop.wait(_MAX_BACKOFF)
                continue
            except Exception:
                # Redis answers but refuses a row (a wrong key type, an ACL): keep the charge, retry ever more rarely.
                refused += 1
                log.exception("tokenbudget could not replay its Redis spool %s (attempt %d)", self._spool.path, refused)
                self._stop.wait(min(300.0, _MAX_BACKOFF * 2**refused))
                continue
            with self._state_lock:
                # Under the lock: a settle that spools after this check starts a new worker (see _spool_settle).
                if self._spool.count() == 0:
                    self._spool_dirty = False
                    self._worker = None
                    return

    def _replay(self, stop: threading.Event | None = None) -> int:
        with self._replay_lock:
            self._run("replaying the spool", self._client.ping, probe=True)
            pushed = 0
            while stop is None or not stop.is_set():
                rows = self._spool.batch(200)
                if not rows:
                    break
                done: list[int] = []
                try:
                    for row in rows:
                        keys, args = self._settle_call(row.rid, row.keys, row.meta, row.micros, row.tokens,
                                                       row.expires_at, row.event, time.time())  # fmt: skip
                        self._run("replaying the spool", functools.partial(self._settle_script, keys, args), probe=True)
                        done.append(row.seq)
                        pushed += 1
                finally:
                    self._spool.delete(done)
            if pushed:
                log.info("Redis ledger %s: replayed %d spooled charge(s)", self.url, pushed)
            return pushed

    def replay_spool(self) -> int:
        """Push spooled charges to Redis now (the background thread does this by itself); returns how many.

        Safe to call any number of times, from any process: the settle script charges each reservation once.
        Raises :class:`LedgerUnavailable` if Redis still does not answer.
        """
        return self._replay()

    def spooled(self) -> int:
        """Charges and events waiting in the local spool for this Redis ledger."""
        return self._spool.count()

    @property
    def spool_path(self) -> Path:
        return self._spool.path

    # -- Ledger ----------------------------------------------------------------------------------------------------
    def reserve(
        self, allowances: Sequence[Allowance], micros: int, tokens: int, *, lease_seconds: float, now: float
    ) -> Reservation | Refusal:
        res, keys, args, meta = self._reserve_call(allowances, micros, tokens, lease_seconds, now)
        command = self._reserve_lua.call(keys, args)
        try:
            out = self._run("reserve", lambda: self._batcher().call(self._reserve_lua, command))
        except LedgerUnavailable:
            if self.on_error == "open":
                return self._remember(res, meta)
            raise
        return self._reserve_result(out, res, allowances, meta)

    def settle(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float
    ) -> bool:
        return self.settle_and_read(reservation, micros, tokens, event, now=now, allowances=())[0]

    def settle_and_read(
        self, reservation: Reservation, micros: int, tokens: int, event: CallEvent | None, *, now: float,
        allowances: Sequence[Allowance],
    ) -> tuple[bool, dict[str, Balance]]:
        """:meth:`settle` whose script also reads the balances of ``allowances`` after charging: one round trip
        instead of one per budget, with exactly the figures :meth:`balance` would give (ended holds subtracted, not
        swept; active grants added), since no other command can run between the charge and the reads.

        When Redis cannot take the settle, it goes to the spool as with :meth:`settle` and the balances come back
        empty rather than read: Redis cannot answer them (a read would fail, or under ``on_error = "open"`` report
        nothing spent), and an empty mapping tells the guard's readers the figures are unknown, so they can ask
        :meth:`balance` themselves later. Raising instead would make the guard treat a charge kept safely in the
        spool as a failed settle.
        """
        meta = self._meta_of(reservation)
        payload = None if event is None else _event_json(event)
        keys, args = self._settle_call(reservation.id, reservation.keys, meta, micros, tokens, reservation.expires_at,
                                       payload, now, allowances)  # fmt: skip
        command = self._settle_lua.call(keys, args)
        try:
            out = self._run("settle", lambda: self._batcher().call(self._settle_lua, command))
        except LedgerUnavailable:
            # The call already happened: keep its charge locally whatever on_error says, and replay it later.
            done = self._spool_settle(reservation, meta, micros, tokens, payload)
            balances: dict[str, Balance] = {}
        else:
            done, balances = self._read_results(out, allowances) if allowances else (int(out) == 1, {})
        self._forget(reservation.id)
        return done, balances

    def balance(self, allowance: Allowance, *, now: float) -> Balance:
        keys, args = self._balance_call(allowance, now)
        try:
            out = self._run("reading a balance", lambda: self._balance_script(keys, args))
        except LedgerUnavailable:
            if self.on_error == "open":
                # Failing open: spend is unknown, so report none rather than refuse the call it is asked for.
                return Balance(allowance.key, allowance.scope, allowance.limit_micros, allowance.limit_tokens)
            raise
        return self._balance_result(out, allowance)

    def record(self, event: CallEvent) -> None:
        rid = "rec:" + _new_id()  # a marker, so the retry of a record whose reply was lost cannot add it twice
        payload = _event_json(event)
        keys, args = self._settle_call(rid, (), (), 0, 0, 0.0, payload, 0.0)
        command = self._settle_lua.call(keys, args)
        try:
            self._run("recording an event", lambda: self._batcher().call(self._settle_lua, command))
        except LedgerUnavailable:
            self._spool_settle(Reservation(rid, (), 0, 0, 0.0), (), 0, 0, payload)

    def events(self, since: float | None = None, until: float | None = None) -> Iterator[CallEvent]:
        """Stream order is arrival order; events are sorted by their own time (stable for equal times)."""
        lo = float("-inf") if since is None else float(since)
        hi = float("inf") if until is None else float(until)
        out: list[CallEvent] = []
        start: str | bytes = "-"
        while True:
            page: list[Any] = self._run("reading events", functools.partial(self._xrange, start))
            for _sid, fields in page:
                ev = CallEvent.from_json(_text(fields[b"e"]))
                if lo <= ev.time < hi:
                    out.append(ev)
            if len(page) < _PAGE:
                break
            start = b"(" + page[-1][0]
        out.sort(key=lambda e: e.time)
        return iter(out)

    def _xrange(self, start: str | bytes) -> list[Any]:
        return list(self._client.xrange(self._events, start, "+", count=_PAGE) or ())

    def grant(self, grant: Grant) -> None:
        row = [grant.id, grant.scope, int(grant.micros), int(grant.tokens), grant.created_at, grant.expires_at,
               grant.reason, grant.granted_by]  # fmt: skip
        keys = [self._grant_seq, self._grants, self._scope_grants + grant.scope]
        args = [_dumps(row), str(int(grant.micros)), str(int(grant.tokens)), _num(grant.created_at),
                "+inf" if grant.expires_at is None else _num(grant.expires_at)]  # fmt: skip
        self._run("recording a grant", lambda: self._grant_script(keys, args))

    def grants(self, *, now: float | None = None) -> list[Grant]:
        rows: list[Any] = self._run("reading grants", lambda: self._client.lrange(self._grants, 0, -1))
        out = [Grant(*json.loads(r)) for r in rows]
        if now is None:
            return out
        return [g for g in out if g.created_at <= now and (g.expires_at is None or g.expires_at > now)]

    def active_reservations(self, *, now: float) -> list[Reservation]:
        flat: list[Any] = self._run(
            "reading reservations", lambda: self._active_script([self._holds, self._lease], [_num(now)])
        )
        return [_unpack_hold(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]

    def accounts(self) -> list[Balance]:
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self._acct) + "*"

        def scan() -> list[Balance]:
            names = sorted(set(self._client.scan_iter(match=pattern, count=1000)))
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.hmget(name, "scope", "sm", "rm", "st", "rt")
            out = []
            for name, (scope, sm, rm, st, rt) in zip(names, pipe.execute(), strict=True):
                if scope is None:  # expired between SCAN and HMGET
                    continue
                key = _text(name)[len(self._acct) :]
                out.append(Balance(key, _text(scope), None, None, int(sm or 0), int(rm or 0), int(st or 0),
                                   int(rt or 0)))  # fmt: skip
            return out

        return self._run("listing accounts", scan)

    def close(self) -> None:
        """Stop the spool thread and drop connections. A pending spool stays on disk for the next ledger opened on
        it (or ``replay_spool()``): a thread started after close would hold connections nobody closes."""
        with self._state_lock:
            self._closed = True
        self._stop.set()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=self.connect_timeout + self.socket_timeout + 1.0)
        self._pool.disconnect()
        group = self._group
        if group is not None and group.pid == os.getpid():
            group.close()
        self._close_async()

    def _batcher(self) -> _GroupCommit:
        group = self._group
        if group is None or group.pid != os.getpid():
            with self._async_lock:
                group = self._group
                if group is None or group.pid != os.getpid():
                    # A fresh one after a fork: the parent's connection and locks are not this process's to use.
                    group = self._group = _GroupCommit(self._pool, pause=0.005)
        return group

    # -- async ------------------------------------------------------------------------------------------------------
    # The async forms are the base class's: the sync step in a worker thread, which joins the group commit,
    # pipelined with every other thread's calls on one connection, and keeps every fallback (spool, fail-open) of the
    # sync path. A native asyncio client on a private loop thread cost more CPU per call (two event loops and
    # redis-py's asyncio parser between the caller and the socket) and pipelined nothing. The threads are a pool of
    # this ledger's own, not the loop's default executor: a Redis outage then ties up only these, each for at most
    # the socket timeouts.
    _ASYNC_WORKERS = 32

    def _async_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        held = self._executor
        if held is None or held[0] != os.getpid():
            with self._async_lock:
                held = self._executor
                if held is None or held[0] != os.getpid():  # a fresh one after a fork: the parent's threads are gone
                    pool = concurrent.futures.ThreadPoolExecutor(self._ASYNC_WORKERS, "tokenbudget-redis")
                    held = self._executor = (os.getpid(), pool)
        return held[1]

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    def _close_async(self) -> None:
        with self._async_lock:
            held, self._executor = self._executor, None
        if held is not None and held[0] == os.getpid():
            held[1].shutdown(wait=False)  # a step under way finishes on its own; nothing new is taken
