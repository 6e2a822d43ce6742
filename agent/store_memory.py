"""The in-memory session store: the embedded default, when no `--redis` is given.

Model: one process is the only bridge, so every call is held here and nothing is lost
to an outage. Leases still expire if nobody renews them (a session task that died
without ending its call), and `reap_expired` ends such calls with reason
"lease-expired", as in Redis. Ended calls are forgotten `retention` seconds after they
ended; `_forget_at` keeps them in end order so pruning costs O(1) per call.

Not thread-safe: use it from the event loop thread only, like every store.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

from .errors import DuplicateCall, StaleSession
from .store import (ENDED_EVENT, LEASE_EXPIRED, CallEvent, CallRecord, SessionStore,
                    StoreConfig, _apply_changes, _ended_record)

__all__ = ["MemoryStore"]


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit={limit!r}: must be an int >= 1")


class MemoryStore(SessionStore):
    name = "memory"

    def __init__(self, config: StoreConfig | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(config)
        self._clock = clock
        self._records: dict[str, CallRecord] = {}
        self._leases: dict[str, float] = {}  # live call id -> lease expiry (epoch seconds)
        self._events: dict[str, deque[CallEvent]] = {}
        self._forget_at: OrderedDict[str, float] = OrderedDict()  # ended id -> when to drop

    async def _start(self) -> None:
        pass

    async def _close(self) -> None:
        pass

    @property
    def available(self) -> bool:
        return self._started and not self._closing.started

    async def ping(self) -> bool:
        return self.available

    def _prune(self, now: float) -> None:
        while self._forget_at:
            call_id, when = next(iter(self._forget_at.items()))
            if when > now:
                break
            del self._forget_at[call_id]
            self._records.pop(call_id, None)
            self._events.pop(call_id, None)

    # -- writes -------------------------------------------------------------------------

    async def put(self, record: CallRecord) -> None:
        self._check_open()
        if not record.live:
            raise ValueError(f"put() takes a live call; {record.call_id!r} is {record.state}")
        now = self._clock()
        self._prune(now)
        old = self._records.get(record.call_id)
        if old is not None and old.live:
            raise DuplicateCall(record.call_id)
        self._forget_at.pop(record.call_id, None)
        self._events.pop(record.call_id, None)  # a reused id starts a fresh stream
        self._records[record.call_id] = record
        self._leases[record.call_id] = now + self.config.lease_ttl

    async def update(self, call_id: str, **changes: Any) -> CallRecord:
        self._check_open()
        record = self._records.get(call_id)
        if record is None:
            raise StaleSession(call_id, "not in the store")
        if not record.live:
            raise StaleSession(call_id, f"ended ({record.end_reason})", record)
        new = _apply_changes(record, changes)
        self._records[call_id] = new
        return new

    async def renew(self, call_ids: Iterable[str]) -> list[str]:
        self._check_open()
        until = self._clock() + self.config.lease_ttl
        lost = []
        for call_id in dict.fromkeys(call_ids):
            if call_id in self._leases:
                self._leases[call_id] = until
            else:
                lost.append(call_id)
        return lost

    def _end(self, record: CallRecord, reason: str, now: float) -> CallRecord:
        new = _ended_record(record, reason, now)
        self._records[record.call_id] = new
        del self._leases[record.call_id]
        self._forget_at[record.call_id] = now + self.config.retention
        self._push(record.call_id, CallEvent(ENDED_EVENT, {"reason": reason}, now))
        return new

    async def end(self, call_id: str, reason: str, *, now: float | None = None) -> CallRecord:
        self._check_open()
        record = self._records.get(call_id)
        if record is None:
            raise StaleSession(call_id, "not in the store")
        if not record.live:
            return record
        return self._end(record, reason, self._clock() if now is None else now)

    def _push(self, call_id: str, event: CallEvent) -> None:
        stream = self._events.get(call_id)
        if stream is None:
            stream = self._events[call_id] = deque(maxlen=self.config.events_maxlen)
        stream.append(event)

    async def append_event(self, call_id: str, event: CallEvent) -> None:
        self._check_open()
        self._prune(self._clock())
        if call_id not in self._records:
            raise StaleSession(call_id, "not in the store")
        self._push(call_id, event)

    async def reap_expired(self, now: float | None = None) -> list[CallRecord]:
        self._check_open()
        t = self._clock() if now is None else now
        expired = [cid for cid, until in self._leases.items() if until <= t]
        return [self._end(self._records[cid], LEASE_EXPIRED, t) for cid in expired]

    # -- reads --------------------------------------------------------------------------

    async def get(self, call_id: str) -> CallRecord | None:
        self._check_open()
        self._prune(self._clock())
        return self._records.get(call_id)

    async def list_calls(self, *, live_only: bool = False) -> list[CallRecord]:
        self._check_open()
        now = self._clock()
        self._prune(now)
        if live_only:
            calls = [self._records[cid] for cid, until in self._leases.items() if until > now]
        else:
            calls = list(self._records.values())
        return sorted(calls, key=lambda r: (r.started_at, r.call_id))

    async def live_count(self) -> int:
        self._check_open()
        now = self._clock()
        return sum(1 for until in self._leases.values() if until > now)

    async def events(self, call_id: str, limit: int = 100) -> list[CallEvent]:
        self._check_open()
        _check_limit(limit)
        self._prune(self._clock())
        stream = self._events.get(call_id)
        return list(stream)[-limit:] if stream else []
