"""The Redis session store (`--redis redis://...`): shared by every bridge, and calls go
on when Redis does not.

Keys, under `StoreConfig.key_prefix` (default "duplexline:"):
- `call:<id>`   hash, one record (agent/store_codec.py) plus `rev`; an ended record
                expires `retention` seconds after it ended.
- `events:<id>` stream, the call's events, capped with XADD MAXLEN ~ events_maxlen;
                expires with its record.
- `live`        sorted set of live call ids scored by lease expiry (epoch seconds).
- `calls`       sorted set of recent call ids scored by last write, for listings.
- `store:<uuid>` one marker per store instance with a TTL: if it is missing at a health
                check, Redis lost our data (restart without persistence, FLUSHALL,
                failover) and we rewrite what we hold.

Model. This store *holds* the calls it `put` (this bridge's calls) and keeps the latest
record of each locally. Every write of a held record is the whole record with a revision
number, applied by a Lua script only if it is newer than what Redis has and never over
an ended record: so writes may be retried, reordered or replayed after an outage
without going back in time or reviving a call another bridge reaped. Reading a held
call is answered locally; other reads go to Redis.

Outages. A failed command marks the store down: a warning is logged once, writes are
only kept locally (dirty records, queued events) so the call path neither waits nor
raises, and the watcher task retries with backoff. When Redis answers again the watcher
rewrites every held record and queued event, then marks the store up and logs once.
After a recovery this store waits one lease TTL before reaping, so other bridges have
had time to renew calls whose leases lapsed while Redis was away. Failed commands are
counted in `errors_total`, outages in `outages_total`, for the metrics layer.

Lua scripts compute the keys of the calls they reap from the prefix, so the store
needs one Redis (or a managed Redis), not Redis Cluster. Lease times are wall-clock
epoch seconds: bridges' clocks must agree to well within `lease_ttl` (NTP).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Iterable, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .errors import (CorruptRecord, DuplicateCall, InvalidConfig, StaleSession,
                     StoreUnavailable)
from .store import (ENDED_EVENT, LEASE_EXPIRED, CallEvent, CallRecord, SessionStore,
                    StoreConfig, _apply_changes, _ended_record)
from .store_codec import (APPEND_SCRIPT, REAP_SCRIPT, WRITE_SCRIPT, decode_event, decode_record,
                          encode_event, encode_record, encode_time)

__all__ = ["RedisStore"]

T = TypeVar("T")

log = logging.getLogger(__name__)

# Errors that mean "Redis cannot take this now", not "this request is wrong": the
# store goes down and retries. Anything else is a bug and propagates.
_OUTAGE = (redis_errors.ConnectionError, redis_errors.TimeoutError,
           redis_errors.ReadOnlyError, redis_errors.OutOfMemoryError,
           OSError, asyncio.TimeoutError)

_KEEP_ENDED = 1024  # ended held records kept locally, for events appended after end()
_REAP_BATCH = 1000
_MAX_CONNECTIONS = 32

def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(slots=True)
class _Held:
    """A call this store holds: the latest record, and whether Redis has it."""

    record: CallRecord
    lease_until: float
    rev: int = 1
    written: bool = False  # reached Redis at least once (else a replay is a put)
    synced: bool = False  # Redis has `rev`


class RedisStore(SessionStore):
    name = "redis"

    def __init__(self, url: str, config: StoreConfig | None = None) -> None:
        super().__init__(config)
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidConfig("redis_url", url, "expected redis://HOST:PORT/DB")
        self.url = url
        self._shown = _redact(url)
        prefix = self.config.key_prefix
        self._k_live = prefix + "live"
        self._k_calls = prefix + "calls"
        self._owner = uuid.uuid4().hex
        self._k_marker = f"{prefix}store:{self._owner}"
        self._client: Redis | None = None
        self._held: dict[str, _Held] = {}
        self._dirty: set[str] = set()  # held ids whose latest rev Redis may lack
        self._pending: dict[str, deque[dict[str, str]]] = {}  # encoded events to XADD
        self._ended_order: deque[str] = deque()
        self._down = False
        self._down_since = 0.0
        self._reap_after = 0.0
        self._wake = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._warned_corrupt: set[str] = set()

    def _k_call(self, call_id: str) -> str:
        return f"{self.config.key_prefix}call:{call_id}"

    def _k_events(self, call_id: str) -> str:
        return f"{self.config.key_prefix}events:{call_id}"

    @property
    def _retention_ms(self) -> int:
        return max(1, int(self.config.retention * 1000))

    async def _io(self, operation: Awaitable[T]) -> T:
        """One Redis round trip, bounded by op_timeout (TimeoutError is an outage)."""
        async with asyncio.timeout(self.config.op_timeout):
            return await operation

    @property
    def _redis(self) -> Redis:
        assert self._client is not None, "RedisStore used before start()"
        return self._client

    # -- lifecycle ----------------------------------------------------------------------

    async def _start(self) -> None:
        c = self.config
        pool = BlockingConnectionPool.from_url(
            self.url, max_connections=_MAX_CONNECTIONS, timeout=None, decode_responses=True,
            # Command timeouts are ours (_io): redis-py's socket_timeout sends through
            # asyncio.wait_for, which on 3.11 can swallow a task's cancellation.
            socket_timeout=None, socket_connect_timeout=c.op_timeout,
            # No silent retries inside redis-py: a failed command must reach _outage so
            # a restarted Redis (data lost) is noticed and rewritten.
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        client = Redis(connection_pool=pool)
        try:
            await self._io(client.ping())
            await self._io(client.set(self._k_marker, "1", px=self._marker_ms))
        except _OUTAGE as exc:
            await client.aclose()
            await pool.disconnect()
            raise StoreUnavailable(f"cannot reach Redis at {self._shown} ({exc}); check "
                                   "--redis and that redis-server is running") from None
        self._client = client
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        log.info("session store: Redis at %s, keys under %r", self._shown, c.key_prefix)

    async def _close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
        client = self._client
        if client is None:
            return
        if not self._down and (self._dirty or any(self._pending.values())):
            try:  # best effort: calls that ended during shutdown
                async with asyncio.timeout(self.config.op_timeout):
                    await self._resync(everything=False)
            except asyncio.TimeoutError:
                pass
        if not self._down:
            try:
                await self._io(client.delete(self._k_marker))
            except _OUTAGE:
                pass
        unwritten = len(self._dirty) + sum(1 for q in self._pending.values() if q)
        if unwritten:
            log.warning("closing with %d calls' state not written to Redis at %s",
                        unwritten, self._shown)
        await client.aclose()
        await client.connection_pool.disconnect()

    @property
    def _marker_ms(self) -> int:
        return int(max(self.config.lease_ttl, 3 * self.config.health_interval) * 1000)

    # -- health -------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._started and not self._closing.started and not self._down

    async def ping(self) -> bool:
        if not self._started or self._closing.started:
            return False
        try:
            await self._io(self._redis.ping())
        except _OUTAGE as exc:
            self._outage(exc)
            return False
        if self._down:
            self._wake.set()  # answering again: let the watcher rewrite now
        return not self._down

    def _outage(self, exc: BaseException) -> None:
        self.errors_total += 1
        if self._down:
            return
        self._down = True
        self._down_since = time.monotonic()
        self.outages_total += 1
        log.warning("Redis at %s unavailable (%s: %s); calls go on, their state is kept "
                    "here and written back when Redis returns", self._shown,
                    type(exc).__name__, exc)
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        # asyncio.wait, not wait_for: on 3.11 a close() cancelling us just as wait_for
        # times out is swallowed as a timeout, and the watcher would never stop.
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({waiter}, timeout=seconds)
        finally:
            waiter.cancel()
        self._wake.clear()

    async def _watch(self) -> None:
        """Health checks while up; reconnect and rewrite while down, until closed."""
        first = min(0.05, self.config.health_interval)
        delay = first
        while not self._closing.started:  # also stops a watcher whose cancel got lost
            if self._down:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.health_interval)
                if await self._recover():
                    delay = first
            else:
                await self._sleep(self.config.health_interval)
                if not self._down:
                    await self._check()

    async def _check(self) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.exists(self._k_marker)
                pipe.set(self._k_marker, "1", px=self._marker_ms)
                existed, _ = await self._io(pipe.execute())
        except _OUTAGE as exc:
            self._outage(exc)
            return
        if not existed:
            log.warning("Redis at %s lost this store's keys (restart without persistence, "
                        "flush or failover); rewriting %d held calls", self._shown,
                        len(self._held))
            self._reap_after = time.time() + self.config.lease_ttl
            await self._resync(everything=True)
        elif self._dirty or any(self._pending.values()):
            await self._resync(everything=False)

    async def _recover(self) -> bool:
        try:
            # Connections to the old server are dead: drop them all before trying.
            await self._redis.connection_pool.disconnect()
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.exists(self._k_marker)
                pipe.set(self._k_marker, "1", px=self._marker_ms)
                kept, _ = await self._io(pipe.execute())
        except _OUTAGE:
            self.errors_total += 1
            return False
        # Keys kept (a network blip): what changed meanwhile is dirty. Keys lost (a
        # restart without persistence): everything held goes back, ended calls too.
        counts = await self._resync(everything=not kept)
        if counts is None:
            return False
        self._down = False  # no await since _resync saw nothing left: nothing slips by
        self._reap_after = time.time() + self.config.lease_ttl
        log.warning("Redis at %s is back after %.1f s%s; rewrote %d calls and %d events",
                    self._shown, time.monotonic() - self._down_since,
                    "" if kept else " with its data lost", *counts)
        return True

    async def _resync(self, *, everything: bool) -> tuple[int, int] | None:
        """Write dirty held records and queued events (every held record, if
        `everything`) until none are left. Returns (records, events) written, or None
        after marking the store down."""
        written = [0, 0]
        ids = set(self._held) if everything else set()
        while True:
            ids |= self._dirty
            self._dirty.clear()
            ids &= self._held.keys()
            queued = {cid: list(q) for cid, q in self._pending.items() if q}
            for cid in queued:
                self._pending[cid].clear()
            if not ids and not queued:
                return written[0], written[1]
            batch = [(cid, self._held[cid].rev) for cid in ids]
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for cid, _ in batch:
                        held = self._held[cid]
                        pipe.eval(*self._write_args(held))
                    for cid, events in queued.items():
                        for fields in events:
                            pipe.eval(*self._append_args(cid, fields, must_exist=False))
                    results = await self._io(pipe.execute())
            except _OUTAGE as exc:
                self._dirty |= ids
                for cid, events in queued.items():
                    later = self._pending.get(cid) or ()
                    self._pending[cid] = deque([*events, *later], self.config.events_maxlen)
                self._outage(exc)
                return None
            written[1] += sum(len(e) for e in queued.values())
            for (cid, rev), result in zip(batch, results):
                held = self._held.get(cid)
                if held is None:
                    continue
                if result == 1:
                    written[0] += 1
                    self._written(cid, held, rev)
                elif result == 0:
                    await self._adopt_lost(cid)
                else:
                    log.error("call %s, put while Redis was down, collides with a live call "
                              "of another bridge; that record stands, this one is dropped",
                              cid)
                    del self._held[cid]
                    self._pending.pop(cid, None)
            ids = set()

    # -- the write path -----------------------------------------------------------------

    def _write_args(self, held: _Held) -> tuple[Any, ...]:
        rec = held.record
        mode = "write" if held.written else "put"
        flat = [x for kv in encode_record(rec).items() for x in kv]
        keys = (self._k_call(rec.call_id), self._k_live, self._k_calls,
                self._k_events(rec.call_id))
        args = (rec.call_id, mode, held.rev, encode_time(held.lease_until), self._retention_ms,
                encode_time(time.time()), "0" if rec.live else "1", self._owner, *flat)
        return (WRITE_SCRIPT, len(keys), *keys, *args)

    def _append_args(self, call_id: str, fields: dict[str, str], *,
                     must_exist: bool) -> tuple[Any, ...]:
        flat = [x for kv in fields.items() for x in kv]
        return (APPEND_SCRIPT, 2, self._k_call(call_id), self._k_events(call_id),
                "1" if must_exist else "0", self.config.events_maxlen, *flat)

    def _written(self, call_id: str, held: _Held, rev: int) -> None:
        held.written = True
        if held.rev == rev:  # a newer local change is still on its way otherwise
            held.synced = True
            if not held.record.live:
                self._retire(call_id)

    def _retire(self, call_id: str) -> None:
        # Ended and written: keep a while for events appended after end(), then forget.
        self._ended_order.append(call_id)
        while len(self._ended_order) > _KEEP_ENDED:
            old = self._ended_order.popleft()
            held = self._held.get(old)
            if held is not None and not held.record.live and held.synced \
                    and not self._pending.get(old):
                del self._held[old]
                self._pending.pop(old, None)

    async def _write(self, call_id: str) -> int | None:
        """Write the held record now, or leave it dirty if Redis is down. Returns the
        script's result, None when deferred."""
        held = self._held[call_id]
        held.synced = False
        if self._down:
            self._dirty.add(call_id)
            return None
        rev = held.rev
        try:
            result = await self._io(self._redis.eval(*self._write_args(held)))
        except _OUTAGE as exc:
            self._dirty.add(call_id)
            self._outage(exc)
            return None
        if result == 1:
            self._written(call_id, held, rev)
        return int(result)

    async def _adopt_lost(self, call_id: str) -> CallRecord:
        """Redis has this held call ended (another bridge reaped it): take that record."""
        held = self._held[call_id]
        record: CallRecord | None = None
        try:
            fields = await self._io(self._redis.hgetall(self._k_call(call_id)))
            record = decode_record(fields, self._k_call(call_id)) if fields else None
        except _OUTAGE as exc:
            self._outage(exc)
        except CorruptRecord:
            pass
        if record is None or record.live:
            record = _ended_record(held.record, LEASE_EXPIRED, time.time())
        held.record, held.written, held.synced = record, True, True
        self._dirty.discard(call_id)
        self._retire(call_id)
        log.warning("call %s was ended in Redis (%s) while this bridge held it", call_id,
                    record.end_reason)
        return record

    async def put(self, record: CallRecord) -> None:
        self._check_open()
        if not record.live:
            raise ValueError(f"put() takes a live call; {record.call_id!r} is {record.state}")
        old = self._held.get(record.call_id)
        if old is not None and old.record.live:
            raise DuplicateCall(record.call_id)
        held = _Held(record, time.time() + self.config.lease_ttl)
        self._pending.pop(record.call_id, None)  # a reused id starts a fresh stream
        self._held[record.call_id] = held
        result = await self._write(record.call_id)
        if result == -1:
            if old is None:
                del self._held[record.call_id]
            else:
                self._held[record.call_id] = old
            raise DuplicateCall(record.call_id)

    async def update(self, call_id: str, **changes: Any) -> CallRecord:
        self._check_open()
        held = self._held.get(call_id)
        if held is None:
            raise StaleSession(call_id, "not held by this store")
        if not held.record.live:
            raise StaleSession(call_id, f"ended ({held.record.end_reason})", held.record)
        held.record = _apply_changes(held.record, changes)
        held.rev += 1
        new = held.record
        if await self._write(call_id) in (0, -1):  # reaped, or the id is another's
            lost = await self._adopt_lost(call_id)
            raise StaleSession(call_id, f"ended in the store ({lost.end_reason})", lost)
        return new

    async def renew(self, call_ids: Iterable[str]) -> list[str]:
        self._check_open()
        until = time.time() + self.config.lease_ttl
        lost: list[str] = []
        batch: list[tuple[str, int]] = []
        for call_id in dict.fromkeys(call_ids):
            held = self._held.get(call_id)
            if held is None or not held.record.live:
                lost.append(call_id)
                continue
            held.lease_until = until
            held.rev += 1
            held.synced = False
            batch.append((call_id, held.rev))
        if not batch:
            return lost
        if self._down:
            self._dirty.update(cid for cid, _ in batch)
            return lost
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for call_id, _ in batch:
                    held = self._held[call_id]
                    pipe.eval(*self._write_args(held))
                results = await self._io(pipe.execute())
        except _OUTAGE as exc:
            self._dirty.update(cid for cid, _ in batch)
            self._outage(exc)
            return lost
        for (call_id, rev), result in zip(batch, results):
            held = self._held.get(call_id)
            if held is None:
                continue
            if result == 1:
                self._written(call_id, held, rev)
            else:  # 0: reaped elsewhere; -1: a replayed put found another bridge's call
                await self._adopt_lost(call_id)
                lost.append(call_id)
        return lost

    async def end(self, call_id: str, reason: str, *, now: float | None = None) -> CallRecord:
        self._check_open()
        held = self._held.get(call_id)
        if held is None:
            record = await self._read_quietly(call_id)
            if record is not None and not record.live:
                return record
            raise StaleSession(call_id, "not held by this store")
        if not held.record.live:
            return held.record
        t = time.time() if now is None else now
        held.record = _ended_record(held.record, reason, t)
        held.rev += 1
        if await self._write(call_id) in (0, -1):
            return await self._adopt_lost(call_id)
        ended_event = CallEvent(ENDED_EVENT, {"reason": reason}, t)
        await self._append_held(call_id, encode_event(ended_event))
        return held.record

    async def _read_quietly(self, call_id: str) -> CallRecord | None:
        if self._down:
            return None
        try:
            fields = await self._io(self._redis.hgetall(self._k_call(call_id)))
        except _OUTAGE as exc:
            self._outage(exc)
            return None
        return decode_record(fields, self._k_call(call_id)) if fields else None

    async def _append_held(self, call_id: str, fields: dict[str, str]) -> None:
        queue = self._pending.get(call_id)
        if self._down or queue:  # behind events already queued, to keep their order
            if queue is None:
                queue = self._pending[call_id] = deque(maxlen=self.config.events_maxlen)
            queue.append(fields)
            return
        try:
            await self._io(self._redis.eval(*self._append_args(call_id, fields, must_exist=False)))
        except _OUTAGE as exc:
            self._pending[call_id] = deque([fields], maxlen=self.config.events_maxlen)
            self._outage(exc)

    async def append_event(self, call_id: str, event: CallEvent) -> None:
        self._check_open()
        fields = encode_event(event)
        if call_id in self._held:
            await self._append_held(call_id, fields)
            return
        if self._down:
            raise StoreUnavailable(f"Redis at {self._shown} is down; call {call_id!r} is not "
                                   "held here, so its event cannot be kept")
        try:
            args = self._append_args(call_id, fields, must_exist=True)
            appended = await self._io(self._redis.eval(*args))
        except _OUTAGE as exc:
            self._outage(exc)
            raise StoreUnavailable(f"Redis at {self._shown}: {exc}") from None
        if not appended:
            raise StaleSession(call_id, "not in the store")

    async def reap_expired(self, now: float | None = None) -> list[CallRecord]:
        self._check_open()
        if self._down or time.time() < self._reap_after:
            return []
        t = time.time() if now is None else now
        cutoff = t - self.config.retention - self.config.lease_ttl - 60
        try:
            ids = await self._io(self._redis.eval(
                REAP_SCRIPT, 2, self._k_live, self._k_calls, encode_time(t), _REAP_BATCH,
                self._k_call(""), self._retention_ms, LEASE_EXPIRED, encode_time(cutoff)))
            if not ids:
                return []
            ended_event = encode_event(CallEvent(ENDED_EVENT, {"reason": LEASE_EXPIRED}, t))
            async with self._redis.pipeline(transaction=False) as pipe:
                for call_id in ids:
                    pipe.eval(*self._append_args(call_id, ended_event, must_exist=True))
                    pipe.hgetall(self._k_call(call_id))
                results = await self._io(pipe.execute())
        except _OUTAGE as exc:
            self._outage(exc)
            return []
        reaped = []
        for call_id, fields in zip(ids, results[1::2]):
            record = self._decode_or_warn(fields, self._k_call(call_id))
            if record is None:
                continue
            reaped.append(record)
            held = self._held.get(call_id)
            if held is not None and held.record.live:  # our own lease lapsed
                held.record, held.written, held.synced = record, True, True
                self._dirty.discard(call_id)
                self._retire(call_id)
        log.info("reaped %d calls whose lease expired: %s", len(reaped),
                 ", ".join(r.call_id for r in reaped[:10]))
        return reaped

    # -- reads --------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException | None = None) -> StoreUnavailable:
        if exc is not None:
            self._outage(exc)
        return StoreUnavailable(f"Redis at {self._shown} is unavailable; retry later")

    def _decode_or_warn(self, fields: dict[str, str], key: str) -> CallRecord | None:
        if not fields:
            return None
        try:
            return decode_record(fields, key)
        except CorruptRecord as exc:
            if key not in self._warned_corrupt:
                self._warned_corrupt.add(key)
                log.warning("skipping %s", exc)
            return None

    async def get(self, call_id: str) -> CallRecord | None:
        self._check_open()
        held = self._held.get(call_id)
        if held is not None and (held.record.live or not held.synced or self._down):
            return held.record
        if self._down:
            raise self._unavailable()
        try:
            fields = await self._io(self._redis.hgetall(self._k_call(call_id)))
        except _OUTAGE as exc:
            if held is not None:
                self._outage(exc)
                return held.record
            raise self._unavailable(exc) from None
        return decode_record(fields, self._k_call(call_id)) if fields else None

    async def list_calls(self, *, live_only: bool = False) -> list[CallRecord]:
        self._check_open()
        if self._down:
            raise self._unavailable()
        now = time.time()
        try:
            if live_only:
                after_now = f"({encode_time(now)}"  # leases expiring later than now
                ids = await self._io(self._redis.zrangebyscore(self._k_live, after_now, "+inf"))
            else:
                ids = await self._io(self._redis.zrange(self._k_calls, 0, -1))
            async with self._redis.pipeline(transaction=False) as pipe:
                for call_id in ids:
                    pipe.hgetall(self._k_call(call_id))
                results = await self._io(pipe.execute()) if ids else []
        except _OUTAGE as exc:
            raise self._unavailable(exc) from None
        calls, gone = [], []
        for call_id, fields in zip(ids, results):
            held = self._held.get(call_id)
            record = held.record if held is not None and held.record.live \
                else self._decode_or_warn(fields, self._k_call(call_id))
            if record is None:
                gone.append(call_id)
            elif record.live or not live_only:
                calls.append(record)
        if gone and not live_only:
            try:  # their records expired: drop them from the index
                await self._io(self._redis.zrem(self._k_calls, *gone))
            except _OUTAGE as exc:
                self._outage(exc)
        return sorted(calls, key=lambda r: (r.started_at, r.call_id))

    async def live_count(self) -> int:
        self._check_open()
        if self._down:
            raise self._unavailable()
        try:
            after_now = f"({encode_time(time.time())}"
            return int(await self._io(self._redis.zcount(self._k_live, after_now, "+inf")))
        except _OUTAGE as exc:
            raise self._unavailable(exc) from None

    async def events(self, call_id: str, limit: int = 100) -> list[CallEvent]:
        self._check_open()
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit={limit!r}: must be an int >= 1")
        if self._down:
            raise self._unavailable()
        key = self._k_events(call_id)
        try:
            entries = await self._io(self._redis.xrevrange(key, count=limit))
        except _OUTAGE as exc:
            raise self._unavailable(exc) from None
        events = []
        for entry_id, fields in reversed(entries):
            try:
                events.append(decode_event(fields, f"{key} {entry_id}"))
            except CorruptRecord as exc:
                if key not in self._warned_corrupt:
                    self._warned_corrupt.add(key)
                    log.warning("skipping %s", exc)
        queued = self._pending.get(call_id)  # not yet in Redis: newer than what it has
        if queued:
            events.extend(decode_event(f) for f in queued)
        return events[-limit:]
