"""`CallManager`: admits calls, holds the live `CallSession`s, keeps their store records
and leases current, and drains.

Lifecycle: `start()` (call records, store, agent, lease loop), `drain()` (refuse new calls
with 503 and Retry-After; resolve when the last call ends or ask the rest to hang up after
the timeout), `close()` (idempotent; ends what is left, stops the agent and the store, then
flushes the call records: every ended or refused call's CDR and webhooks,
agent/call_records.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Iterable

from .agents import Agent
from .call import AudioSink, CallInfo, CallRefused
from .call_records import CallRecords
from .cdr import refused_record
from .errors import DuplicateCall
from .metrics import AgentMetrics
from .once import Once
from .quality import watch_lines
from .session import CallSession
from .store import CallRecord, CallState, SessionStore, Transport, keep_leases

__all__ = ["CallManager"]

log = logging.getLogger(__name__)


class CallManager:
    def __init__(self, agent: Agent, store: SessionStore, metrics: AgentMetrics, *,
                 bridge_id: str | None = None, worker_id: str = "local",
                 records: CallRecords | None = None, dead_air_seconds: float = 0.0) -> None:
        self.agent = agent
        self.dead_air_seconds = dead_air_seconds  # 0: off (agent/quality.py)
        self.records = records or CallRecords()
        self.store = store
        self.metrics = metrics
        self.bridge_id = bridge_id or f"bridge-{uuid.uuid4().hex[:8]}"
        self.worker_id = worker_id
        self.draining = False
        self._calls: dict[str, CallSession] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._lease_task: asyncio.Task | None = None
        self._line_task: asyncio.Task | None = None
        self._closing = Once()

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.records.start()
        try:
            await self.store.start()
        except BaseException:
            await self.records.close()
            raise
        try:
            await self.agent.start()
        except BaseException:
            await self.store.close()
            await self.records.close()
            raise
        self.metrics.watch_store(self.store)
        self._lease_task = asyncio.get_running_loop().create_task(
            keep_leases(self.store, lambda: list(self._calls), self._lease_lost,
                        before_renew=self._flush_counts), name="call-leases")
        self._line_task = asyncio.get_running_loop().create_task(
            watch_lines(lambda: [c.line for c in self._calls.values()], time.monotonic), name="call-lines")

    async def drain(self, timeout: float = 60.0) -> None:
        """Refuse new calls; wait up to `timeout` for live calls to end, then hang up the
        rest with reason "drain-timeout"."""
        if not self.draining:
            log.info("draining: refusing new calls, %d live", len(self._calls))
        self.draining = True
        self.agent.drain()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("drain timeout: hanging up %d calls", len(self._calls))
            await asyncio.gather(*(c.request_hangup("drain-timeout") for c in list(self._calls.values())),
                                 return_exceptions=True)

    async def close(self) -> None:
        await self._closing.run(self._close)

    async def _close(self) -> None:
        self.draining = True
        await asyncio.gather(*(c.request_hangup("shutdown") for c in list(self._calls.values())),
                             return_exceptions=True)
        for task in (self._lease_task, self._line_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.agent.close()
        await self.store.close()
        await self.records.close()  # after the last call's CDR was queued

    # ---- calls -------------------------------------------------------------------------------

    async def admit(self, info: CallInfo, sink: AudioSink) -> CallSession:
        """Open a session for a call that is not answered yet. CallRefused (with the SIP
        status to answer) when draining or the agent is full; nothing is left behind."""
        transport = str(info.transport)
        if self.draining:
            self.metrics.calls.labels(transport=transport, outcome="refused_draining").inc()
            raise self._refused(info, CallRefused(503, "Service Unavailable (draining)", retry_after=30))
        if info.call_id in self._calls:
            raise self._refused(info, CallRefused(482, "Loop Detected (duplicate call id)"))
        session = CallSession(info, self.store, self.metrics, self._ended, self.records.answered,
                              dead_air_seconds=self.dead_air_seconds)
        try:
            agent_session = await self.agent.open(info, sink, session.emit, session.request_hangup)
            session.attach(agent_session)
        except CallRefused as exc:
            self.metrics.calls.labels(transport=transport, outcome=f"refused_{exc.status}").inc()
            log.info("call %s from %s refused: %s", info.call_id, info.remote, exc)
            self._refused(info, exc)
            raise
        try:
            await self.store.put(CallRecord.new(info.call_id, info.transport, info.remote,
                                                bridge=self.bridge_id, worker=agent_session.worker or self.worker_id))
        except DuplicateCall:
            await session._agent.close()  # type: ignore[union-attr]
            raise self._refused(info, CallRefused(482, "Loop Detected (call id already live)")) from None
        self._calls[info.call_id] = session
        self._idle.clear()
        self.metrics.active_calls.labels(transport=transport).inc()
        log.info("call %s admitted: %s from %s to %r", info.call_id, transport, info.remote, info.local)
        records = self.records
        session.on_event(lambda kind, data: records.event(session, kind, data))
        records.started(session)
        if records.recorder is not None:
            records.recorder.attach(session, sink)
        return session

    def refused(self, info: CallInfo, sip_code: int | None, detail: str) -> None:
        """A call refused before admission (the SIP front door's 404 or 503, say): its CDR."""
        if not self.records.active:
            return
        self.records.ended(refused_record(info, bridge=self.bridge_id, sip_code=sip_code, detail=detail),
                           info.webhooks)

    def _refused(self, info: CallInfo, exc: CallRefused) -> CallRefused:
        self.refused(info, exc.status if info.transport is Transport.SIP else None, exc.reason)
        return exc

    def _ended(self, session: CallSession) -> None:
        if self._calls.pop(session.info.call_id, None) is None:
            return
        transport = str(session.info.transport)
        self.metrics.active_calls.labels(transport=transport).dec()
        self.metrics.calls.labels(transport=transport, outcome="completed").inc()
        try:
            if self.records.active:
                self.records.ended(session.record(self.bridge_id), session.info.webhooks)
        except Exception:  # a record must never stand in the way of the call's end
            log.exception("call %s: CDR failed", session.info.call_id)
        if not self._calls:
            self._idle.set()

    def get(self, call_id: str) -> CallSession | None:
        return self._calls.get(call_id)

    def live(self) -> Iterable[CallSession]:
        return list(self._calls.values())

    async def hangup(self, call_id: str, reason: str = "operator") -> bool:
        session = self._calls.get(call_id)
        if session is None:
            return False
        await session.request_hangup(reason)
        return True

    async def readiness(self) -> dict:
        store_ok = await self.store.ping()
        ready = store_ok and self.agent.ready and not self.draining
        return {"ready": ready, "draining": self.draining, "store": self.store.name,
                "store_reachable": store_ok, "calls": len(self._calls), **self.agent.describe()}

    async def _flush_counts(self) -> None:
        for session in list(self._calls.values()):
            if session.state is not CallState.ENDED:
                await session.flush_counts()

    async def _lease_lost(self, call_id: str) -> None:
        session = self._calls.get(call_id)
        if session is not None:
            log.warning("call %s: lease lost in the store; hanging up", call_id)
            await session.request_hangup("lease-lost")
