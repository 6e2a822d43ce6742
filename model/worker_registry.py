"""Worker placement through Redis: workers (processes running the engine) advertise
themselves, bridges pick one with a free slot.

Keys, under `prefix` (default "duplexline"):
- `{prefix}:workers`      sorted set of worker ids scored by lease expiry (unix ms).
- `{prefix}:worker:{id}`  hash, one `WorkerInfo` as strings (draining "0"/"1"), with a
                          TTL of one lease.

Lease. A worker calls `publish` every second and whenever its free count changes; each
publish rewrites its hash, renews the TTL and moves its expiry in the sorted set, in
one atomic step. A worker that stops publishing (crashed, partitioned) vanishes after
`lease_seconds`: its hash expires on its own, and `workers()` prunes expired members
from the sorted set before reading. Expiry times are Redis's clock (TIME inside the
scripts), so workers' and bridges' clocks need not agree.

Reservations are only a hint. `reserve` takes one from `free` atomically, so bridges
racing on one worker never take more than it advertised; but the worker's next publish
overwrites `free` with its own count, and a session may be refused anyway (the engine
measured its step time, or another bridge's call arrived first). The worker has the last
word: it refuses when full, the bridge calls `release` and tries the next worker.

A publish touches two keys in one script (hash and sorted set, different hash slots):
one Redis (or a managed Redis), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Awaitable, Sequence, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from .errors import ModelError

__all__ = ["WorkerInfo", "WorkerRegistry", "RegistryUnavailable"]

T = TypeVar("T")

log = logging.getLogger(__name__)

# "Redis cannot take this now", as opposed to a bug (which propagates as is).
_OUTAGE = (redis_errors.ConnectionError, redis_errors.TimeoutError,
           redis_errors.ReadOnlyError, redis_errors.OutOfMemoryError,
           OSError, asyncio.TimeoutError)

_OP_TIMEOUT = 2.0  # seconds for one round trip; placement must not hang a call setup
_MAX_CONNECTIONS = 16

# Redis's own clock in ms: one clock for every lease, whatever the hosts' clocks say.
_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

# KEYS: hash, zset. ARGV: lease ms, worker id, then field/value pairs.
_PUBLISH = _NOW_MS + """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), ARGV[2])
"""

# KEYS: zset. Returns the ids whose lease has not expired.
_LIVE = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# KEYS: hash. A missing hash gives nils: no reservation, and nothing is created.
_RESERVE = """
local h = redis.call('HMGET', KEYS[1], 'draining', 'free')
local free = tonumber(h[2])
-- tostring: only a canonical integer, which HINCRBY accepts
if h[1] ~= '0' or not free or tostring(free) ~= h[2] or free < 1 then return 0 end
redis.call('HINCRBY', KEYS[1], 'free', -1)
return 1
"""

_RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'free', 'slots')
local free, slots = tonumber(h[1]), tonumber(h[2])
if not free or not slots or tostring(free) ~= h[1] or free >= slots then return 0 end
redis.call('HINCRBY', KEYS[1], 'free', 1)
return 1
"""


class RegistryUnavailable(ModelError):
    """Redis cannot be reached (or did not answer in time). Nothing was placed; the
    message names the URL. Retry later, or refuse the call."""


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    address: str  # "host:port" the worker's WebSocket listens on (advertised)
    model_id: str  # which model it serves
    slots: int  # total session slots
    free: int  # free slots as last published, minus bridges' reservations since
    step_p99: float  # seconds, measured engine tick p99 (0.0 if unknown)
    draining: bool
    updated: float  # unix time of the worker's last publish


def _encode(info: WorkerInfo) -> list[str]:
    # repr() of a float is exact: what was published is what is read back.
    return ["worker_id", info.worker_id, "address", info.address, "model_id", info.model_id,
            "slots", str(int(info.slots)), "free", str(int(info.free)),
            "step_p99", repr(float(info.step_p99)), "draining", "1" if info.draining else "0",
            "updated", repr(float(info.updated))]


def _decode(fields: dict[str, str]) -> WorkerInfo:
    """Raises KeyError or ValueError when a field is missing or garbled."""
    draining = fields["draining"]
    if draining not in ("0", "1"):
        raise ValueError(f"draining={draining!r}")
    step_p99, updated = float(fields["step_p99"]), float(fields["updated"])
    if not (math.isfinite(step_p99) and math.isfinite(updated)):
        raise ValueError("step_p99 or updated not finite")
    return WorkerInfo(worker_id=fields["worker_id"], address=fields["address"],
                      model_id=fields["model_id"], slots=int(fields["slots"]),
                      free=int(fields["free"]), step_p99=step_p99,
                      draining=draining == "1", updated=updated)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))


class WorkerRegistry:
    """Workers `publish` and `withdraw`; bridges list `workers()` and `reserve` a slot."""

    def __init__(self, url: str, *, prefix: str = "duplexline",
                 lease_seconds: float = 3.0) -> None:
        if not (lease_seconds > 0 and math.isfinite(lease_seconds)):
            raise ValueError(f"lease_seconds={lease_seconds!r}: must be > 0")
        self.url = url
        self._shown = _redact(url)  # never log a password
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._k_workers = f"{prefix}:workers"
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._warned: set[str] = set()  # garbled hashes already logged, until they heal

    def _k_worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def _redis(self) -> Redis:
        if self._client is None:
            raise RuntimeError("WorkerRegistry used before connect()")
        return self._client

    async def _io(self, operation: Awaitable[T]) -> T:
        """One round trip; an outage becomes RegistryUnavailable naming the URL."""
        try:
            async with asyncio.timeout(_OP_TIMEOUT):
                return await operation
        except _OUTAGE as exc:
            raise RegistryUnavailable(
                f"Redis at {self._shown} unavailable ({type(exc).__name__}: {exc})") from None

    async def _script(self, name: str, keys: list[str], args: Sequence[object] = ()) -> object:
        if not self._scripts:
            raise RuntimeError("WorkerRegistry used before connect()")
        return await self._io(self._scripts[name](keys=keys, args=args))

    async def connect(self) -> None:
        if self._client is not None:
            return
        pool = BlockingConnectionPool.from_url(
            self.url, max_connections=_MAX_CONNECTIONS, timeout=None, decode_responses=True,
            # Timeouts are ours (_io): redis-py's socket_timeout can swallow a cancellation
            # on 3.11. No retries inside redis-py: an outage must reach the caller now.
            socket_timeout=None, socket_connect_timeout=_OP_TIMEOUT,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        client = Redis(connection_pool=pool)
        try:
            async with asyncio.timeout(_OP_TIMEOUT):
                await client.ping()
        except _OUTAGE as exc:
            await client.aclose()
            await pool.disconnect()
            raise RegistryUnavailable(
                f"cannot reach Redis at {self._shown} ({type(exc).__name__}: {exc}); check "
                "the Redis URL and that redis-server is running") from None
        self._client = client
        # EVALSHA, loading the script again if Redis lost it (restart, SCRIPT FLUSH).
        self._scripts = {name: client.register_script(source) for name, source in (
            ("publish", _PUBLISH), ("live", _LIVE), ("reserve", _RESERVE), ("release", _RELEASE))}

    async def close(self) -> None:
        client, self._client, self._scripts = self._client, None, {}
        if client is not None:
            await client.aclose()
            await client.connection_pool.disconnect()

    async def publish(self, info: WorkerInfo) -> None:
        # DEL first inside the script: the hash is exactly this info, no leftover fields.
        await self._script("publish", [self._k_worker(info.worker_id), self._k_workers],
                           [self._lease_ms, info.worker_id, *_encode(info)])

    async def withdraw(self, worker_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._k_worker(worker_id))
            pipe.zrem(self._k_workers, worker_id)
            await self._io(pipe.execute())

    async def workers(self, model_id: str | None = None, *,
                      include_draining: bool = False) -> list[WorkerInfo]:
        """Live workers, best first: most free slots, then fastest step, then id."""
        ids = await self._script("live", [self._k_workers])
        assert isinstance(ids, list)
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(self._k_worker(worker_id))
            hashes = await self._io(pipe.execute())
        found = []
        for worker_id, fields in zip(ids, hashes):
            if not fields:
                continue  # its hash expired after the prune, or it withdrew meanwhile
            info = self._decode_or_warn(worker_id, fields)
            if info is None:
                continue
            if model_id is not None and info.model_id != model_id:
                continue
            if info.draining and not include_draining:
                continue
            found.append(info)
        return sorted(found, key=lambda w: (-w.free, w.step_p99, w.worker_id))

    def _decode_or_warn(self, worker_id: str, fields: dict[str, str]) -> WorkerInfo | None:
        try:
            info = _decode(fields)
            if info.worker_id != worker_id:
                raise ValueError(f"worker_id={info.worker_id!r} under another id's key")
        except (KeyError, ValueError) as exc:
            if worker_id not in self._warned:  # once per bad hash, not once per lookup
                self._warned.add(worker_id)
                log.warning("skipping worker %s at Redis %s: garbled hash (%s: %s)",
                            self._k_worker(worker_id), self._shown, type(exc).__name__, exc)
            return None
        self._warned.discard(worker_id)
        return info

    async def reserve(self, worker_id: str) -> bool:
        """Take one free slot of a live, non-draining worker; False if it has none."""
        return bool(await self._script("reserve", [self._k_worker(worker_id)]))

    async def release(self, worker_id: str) -> None:
        """Give back a reservation that was not used (the worker refused the session)."""
        await self._script("release", [self._k_worker(worker_id)])
