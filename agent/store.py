"""The session state store: what every bridge and operator can know about a call.

Model. A call is one `CallRecord` (who, over what, in which state, held by which bridge
and engine worker, frame counts) plus a capped stream of `CallEvent`s. A live call (any
state but ended) is a *lease*: `put` grants it for `StoreConfig.lease_ttl` seconds and
the bridge holding the call renews it with `renew` every `renew_interval` (see
`keep_leases`). A bridge that crashes stops renewing, so its calls expire and any
bridge's `reap_expired` marks them ended with reason "lease-expired": the live-call
count stays true without the dead bridge's help.

Invariants, for every backend (tests/integration/test_store_contract.py checks them):
- `state is ENDED` exactly when `end_reason` and `ended_at` are set; an ended record
  never becomes live again, and the first reason to end it wins.
- A live call whose lease has expired is neither counted by `live_count` nor listed
  by `list_calls(live_only=True)`, even before a reaper marks it ended.
- Ended calls stay readable for `retention` seconds, then vanish.
- The event stream of a call keeps its latest `events_maxlen` events (Redis: about),
  and every ended call's stream gets an "ended" event with the reason.
- Writes on the call path (`put`, `update`, `renew`, `end`, `append_event` on a call
  this store holds) never raise because the backend is down: see `StoreUnavailable`.

Backends: `MemoryStore` (agent/store_memory.py, the embedded default: one process is
the only bridge) and `RedisStore` (agent/store_redis.py, `--redis redis://...`: shared
by bridges, survives a Redis restart by rewriting what it holds). `create_store`
(agent/store_factory.py) picks; this module imports neither backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import inspect
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, ClassVar, Iterable

from .errors import InvalidConfig, StoreClosed, StoreUnavailable
from .once import Once

__all__ = [
    "Transport",
    "CallState",
    "CallRecord",
    "CallEvent",
    "StoreConfig",
    "SessionStore",
    "LEASE_EXPIRED",
    "ENDED_EVENT",
    "UPDATABLE",
    "keep_leases",
]

log = logging.getLogger(__name__)

LEASE_EXPIRED = "lease-expired"
"""`end_reason` of a call reaped because its bridge stopped renewing the lease."""

ENDED_EVENT = "ended"
"""Kind of the event every ended call's stream gets, with `data["reason"]`."""

_MAX_ID_LEN = 256


class Transport(enum.StrEnum):
    SIP = "sip"
    WEBRTC = "webrtc"


class CallState(enum.StrEnum):
    RINGING = "ringing"
    ACTIVE = "active"
    ON_HOLD = "on-hold"
    ENDING = "ending"
    ENDED = "ended"

    @property
    def live(self) -> bool:
        return self is not CallState.ENDED


def _check_time(name: str, value: object, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"CallRecord.{name}={value!r}: must be a finite epoch time in seconds")


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One call as the store knows it. Times are float epoch seconds. Immutable: a change
    is a new record (`dataclasses.replace`, or `SessionStore.update`)."""

    call_id: str
    transport: Transport
    remote: str  # the other party: SIP From URI, or the browser's address
    started_at: float
    last_activity: float
    state: CallState = CallState.RINGING
    bridge: str = ""  # the bridge process holding the call
    worker: str = ""  # the engine worker holding its model session ("" before admission)
    frames_in: int = 0
    frames_out: int = 0
    frames_late: int = 0
    end_reason: str | None = None
    ended_at: float | None = None

    def __post_init__(self) -> None:
        cid = self.call_id
        if not isinstance(cid, str) or not cid or len(cid) > _MAX_ID_LEN \
                or any(c.isspace() or not c.isprintable() for c in cid):
            # Ids become Redis keys and log fields: no whitespace, no control characters.
            raise ValueError(f"CallRecord.call_id={cid!r}: must be 1..{_MAX_ID_LEN} printable "
                             "characters without whitespace")
        # Accept the enums' string values (from the wire or a caller) but store enums.
        object.__setattr__(self, "transport", Transport(self.transport))
        object.__setattr__(self, "state", CallState(self.state))
        for name in ("remote", "bridge", "worker"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"CallRecord.{name}={getattr(self, name)!r}: must be a string")
        _check_time("started_at", self.started_at)
        _check_time("last_activity", self.last_activity)
        _check_time("ended_at", self.ended_at, optional=True)
        for name in ("frames_in", "frames_out", "frames_late"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"CallRecord.{name}={n!r}: must be an int >= 0")
        ended = self.state is CallState.ENDED
        if ended != bool(self.end_reason) or ended != (self.ended_at is not None):
            raise ValueError(f"CallRecord {cid!r}: state {self.state} needs end_reason and "
                             "ended_at set exactly when the call has ended")

    @classmethod
    def new(cls, call_id: str, transport: Transport | str, remote: str, *, bridge: str = "",
            worker: str = "", state: CallState = CallState.RINGING,
            now: float | None = None) -> "CallRecord":
        """A record for a call that starts now (ringing unless told)."""
        t = time.time() if now is None else now
        return cls(call_id=call_id, transport=Transport(transport), remote=remote,
                   started_at=t, last_activity=t, state=state, bridge=bridge, worker=worker)

    @property
    def live(self) -> bool:
        return self.state.live


@dataclass(frozen=True, slots=True)
class CallEvent:
    """Something that happened on a call: DTMF, barge-in, hold, hang-up. `data` holds
    JSON values; keep it small, it is stored per event."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"CallEvent.kind={self.kind!r}: must be a non-empty string")
        if not isinstance(self.data, dict) or not all(isinstance(k, str) for k in self.data):
            raise ValueError(f"CallEvent.data={self.data!r}: must be a dict with string keys")
        try:  # every backend stores JSON; a caller bug surfaces here, not at a later flush
            json.dumps(self.data, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"CallEvent.data of {self.kind!r} is not JSON: {exc}") from None
        _check_time("time", self.time)


# What `update` may change. Identity and start are fixed by `put`; the end by `end`.
UPDATABLE = frozenset({"state", "remote", "bridge", "worker", "last_activity",
                       "frames_in", "frames_out", "frames_late"})


def _apply_changes(record: CallRecord, changes: dict[str, Any]) -> CallRecord:
    """The record with `changes` applied, for backends. TypeError names a field `update`
    may not touch; ValueError a bad value (ending goes through `end`, with a reason)."""
    bad = sorted(set(changes) - UPDATABLE)
    if bad:
        raise TypeError(f"update() cannot change {', '.join(bad)}; "
                        f"allowed: {', '.join(sorted(UPDATABLE))}")
    if "state" in changes and CallState(changes["state"]) is CallState.ENDED:
        raise ValueError("update(state=ended) is not allowed: call end(call_id, reason)")
    return dataclasses.replace(record, **changes)


def _ended_record(record: CallRecord, reason: str, now: float) -> CallRecord:
    """The record ended now with `reason`, for backends."""
    if not isinstance(reason, str) or not reason:
        raise ValueError(f"end reason {reason!r}: must be a non-empty string")
    return dataclasses.replace(record, state=CallState.ENDED, end_reason=reason, ended_at=now)


@dataclass(frozen=True)
class StoreConfig:
    """How the store keeps calls. Validated here, naming the bad field (InvalidConfig)."""

    lease_ttl: float = 15.0  # seconds a live call stays live without renewal
    renew_interval: float = 5.0  # how often the holding bridge renews (keep_leases)
    retention: float = 3600.0  # seconds an ended call stays readable (/calls/{id})
    events_maxlen: int = 1000  # events kept per call (Redis trims approximately)
    key_prefix: str = "duplexline:"  # Redis keys live under this prefix
    op_timeout: float = 1.0  # Redis: connect and command timeout, seconds
    health_interval: float = 1.0  # Redis: check period when up, longest retry wait when down

    def __post_init__(self) -> None:
        for name in ("lease_ttl", "renew_interval", "op_timeout", "health_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise InvalidConfig(name, value, "must be a positive number of seconds")
        if self.renew_interval > self.lease_ttl / 2:
            # One late renewal must not expire a healthy call.
            raise InvalidConfig("renew_interval", self.renew_interval,
                                f"must be at most half of lease_ttl ({self.lease_ttl})")
        if isinstance(self.retention, bool) or not isinstance(self.retention, (int, float)) \
                or not math.isfinite(self.retention) or self.retention < 0:
            raise InvalidConfig("retention", self.retention, "must be >= 0 seconds")
        if isinstance(self.events_maxlen, bool) or not isinstance(self.events_maxlen, int) \
                or self.events_maxlen < 1:
            raise InvalidConfig("events_maxlen", self.events_maxlen, "must be an int >= 1")
        if not isinstance(self.key_prefix, str) or not self.key_prefix \
                or any(c.isspace() for c in self.key_prefix):
            raise InvalidConfig("key_prefix", self.key_prefix,
                                "must be a non-empty string without whitespace")


class SessionStore(ABC):
    """The interface both backends implement, and their shared lifecycle.

    `start()` before use (or `async with`); `close()` is idempotent and concurrent
    callers await the same close. Calls after `close()` raise StoreClosed.

    `errors_total` (failed backend operations) and `outages_total` (times the backend
    became unreachable) only grow; the metrics layer reads them. Always 0 in memory.
    """

    name: ClassVar[str]

    def __init__(self, config: StoreConfig | None = None) -> None:
        self.config = config if config is not None else StoreConfig()
        self.errors_total = 0
        self.outages_total = 0
        self._started = False
        self._closing = Once()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Connect. StoreUnavailable if the backend cannot be reached (nothing started)."""
        if self._closing.started:
            raise StoreClosed(f"{self.name} store was closed")
        if not self._started:
            await self._start()
            self._started = True

    async def close(self) -> None:
        """Stop background work, flush what can be flushed, release connections."""
        await self._closing.run(self._close)

    async def __aenter__(self) -> "SessionStore":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closing.started:
            raise StoreClosed(f"{self.name} store was closed")
        if not self._started:
            raise RuntimeError(f"{self.name} store not started: await start() or use async with")

    @abstractmethod
    async def _start(self) -> None: ...

    @abstractmethod
    async def _close(self) -> None: ...

    # -- health -----------------------------------------------------------------------

    @property
    @abstractmethod
    def available(self) -> bool:
        """Whether the backend was reachable at the last contact (cheap; no I/O)."""

    @abstractmethod
    async def ping(self) -> bool:
        """One round trip to the backend, for /readyz. Never raises."""

    # -- calls ------------------------------------------------------------------------

    @abstractmethod
    async def put(self, record: CallRecord) -> None:
        """Start tracking a live call and grant its lease. DuplicateCall if a live call
        with this id exists. An ended call of the same id (within retention) is replaced,
        events included."""

    @abstractmethod
    async def update(self, call_id: str, **changes: Any) -> CallRecord:
        """Change fields of a live call (see UPDATABLE) and return the new record.
        StaleSession if the call is not live (ended, reaped, unknown); TypeError for a
        field that cannot change. Does not renew the lease."""

    @abstractmethod
    async def get(self, call_id: str) -> CallRecord | None:
        """The record, live or ended within retention; None if unknown."""

    @abstractmethod
    async def list_calls(self, *, live_only: bool = False) -> list[CallRecord]:
        """Calls ordered by start time. live_only: live with an unexpired lease."""

    @abstractmethod
    async def live_count(self) -> int:
        """How many calls are live with an unexpired lease, on every bridge."""

    @abstractmethod
    async def renew(self, call_ids: Iterable[str]) -> list[str]:
        """Extend the leases of these calls, which this store holds. Returns the ids that
        are no longer live (ended, reaped by another bridge, or unknown): the caller
        should hang those up. Never raises because the backend is down."""

    @abstractmethod
    async def end(self, call_id: str, reason: str, *, now: float | None = None) -> CallRecord:
        """Mark the call ended with `reason` and append an "ended" event. Ending an
        ended call returns it unchanged (the first reason wins). StaleSession if the
        call is unknown."""

    @abstractmethod
    async def append_event(self, call_id: str, event: CallEvent) -> None:
        """Add an event to the call's capped stream. StaleSession if the call is
        unknown (ended calls within retention accept events)."""

    @abstractmethod
    async def events(self, call_id: str, limit: int = 100) -> list[CallEvent]:
        """The latest `limit` events of the call, oldest first ([] if none or unknown)."""

    @abstractmethod
    async def reap_expired(self, now: float | None = None) -> list[CallRecord]:
        """Mark every live call whose lease expired (at `now`, default the clock) ended
        with reason LEASE_EXPIRED; return the records so reaped."""


async def keep_leases(store: SessionStore, live_ids: Callable[[], Iterable[str]],
                      on_lost: Callable[[str], object] | None = None, *,
                      reap: bool = True,
                      before_renew: Callable[[], Awaitable[None]] | None = None) -> None:
    """Renew this bridge's leases every `renew_interval` until cancelled, and reap any
    bridge's expired calls. `live_ids()` names the calls this bridge holds right now;
    `on_lost(call_id)` (may be async) is told of each one the store no longer counts as
    live, so the caller hangs it up. Run it as a task next to the calls it renews: if the
    event loop stalls, the leases lapse, which is the point. `before_renew()` runs first in
    each period (the holder flushes its per-call counters there)."""
    interval = store.config.renew_interval
    while True:
        if before_renew is not None:
            try:
                await before_renew()
            except Exception:
                log.exception("before_renew failed")
        for call_id in await store.renew(list(live_ids())):
            if on_lost is None:
                continue
            try:
                result = on_lost(call_id)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # one call's clean-up never stops the others' leases
                log.exception("on_lost(%r) failed", call_id)
        if reap:
            try:
                await store.reap_expired()
            except StoreUnavailable:
                pass  # the store logs the outage once; try again next period
        await asyncio.sleep(interval)
