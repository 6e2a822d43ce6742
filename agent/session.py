"""`CallSession`: one call as the agent layer sees it, from admission to the end.

States move on events: RINGING (admitted, not yet answered) -> ACTIVE (the transport
answered) <-> ON_HOLD -> ENDING -> ENDED. The session counts frames, measures how late
each caller frame arrives against the call's own 20 ms clock, forwards DTMF and turn
events, and keeps the store's record current (counts are flushed with the lease renewal,
not per frame). One session's failure ends that call only.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import numpy as np

from .agents import AgentSession
from .call import FRAME_SAMPLES, CallInfo
from .errors import StaleSession
from .metrics import AgentMetrics
from .once import BackgroundTasks, Once
from .store import CallEvent, CallState, SessionStore

__all__ = ["CallSession"]

log = logging.getLogger(__name__)

FRAME_SECONDS = 0.02
STORED_EVENTS = frozenset({"turn", "barge-in", "dtmf", "hold", "resume", "error", "hangup-requested"})

EventListener = Callable[[str, dict], None]
HangupHandler = Callable[[str], Awaitable[None]]


class CallSession:
    def __init__(self, info: CallInfo, store: SessionStore, metrics: AgentMetrics,
                 on_end: Callable[["CallSession"], None]) -> None:
        self.info = info
        self.state = CallState.RINGING
        self.started = time.monotonic()
        self.frames_in = self.frames_out = self.frames_late = 0
        self.end_reason: str | None = None
        self._store = store
        self._metrics = metrics
        self._on_end = on_end
        self._agent: AgentSession | None = None
        self._listeners: list[EventListener] = []
        self._hangup: HangupHandler | None = None
        self._clock0: float | None = None
        self._ending = Once()
        self._bg = BackgroundTasks()

    # ---- wiring (the manager and the transport) ------------------------------------------

    def attach(self, agent_session: AgentSession) -> None:
        self._agent = agent_session

    def on_event(self, listener: EventListener) -> None:
        """Called with (kind, data) for every event: text, turn, latency, barge-in, dtmf…"""
        self._listeners.append(listener)

    def on_hangup_request(self, handler: HangupHandler) -> None:
        """The transport's way to hang up the wire when the operator asks (POST hangup)."""
        self._hangup = handler

    def emit(self, kind: str, data: dict) -> None:
        for listener in self._listeners:
            try:
                listener(kind, data)
            except Exception:  # a broken listener must not break the call
                log.exception("event listener failed for %s", kind)
        if kind in STORED_EVENTS:
            self._bg.spawn(self._store_event(kind, data))

    # ---- the transport's calls -------------------------------------------------------------

    async def answered(self) -> None:
        """The transport answered the call (200 OK sent / WebRTC connected)."""
        self.state = CallState.ACTIVE
        await self._update(state=CallState.ACTIVE)

    def feed(self, frame: np.ndarray) -> None:
        """One caller frame: int16 [320] at 16 kHz. Event loop only; never blocks."""
        if len(frame) != FRAME_SAMPLES:
            raise ValueError(f"a frame is {FRAME_SAMPLES} samples at 16 kHz, got {len(frame)}")
        now = time.monotonic()
        n = self.frames_in
        self.frames_in += 1
        if self._clock0 is None:
            self._clock0 = now
        lateness = now - (self._clock0 + n * FRAME_SECONDS)
        if lateness < 0:  # early (jitter): the clock follows the earliest arrivals
            self._clock0 = now - n * FRAME_SECONDS
            lateness = 0.0
        self._metrics.frame_lateness.observe(lateness)
        if lateness > FRAME_SECONDS:
            self.frames_late += 1
            self._metrics.late_frames.inc()
        if self.state is CallState.ACTIVE and self._agent is not None:
            self._agent.feed(frame)
        elif self.state is CallState.ON_HOLD:
            self._metrics.dropped_frames.labels(reason="on_hold").inc()

    def frame_sent(self) -> None:
        self.frames_out += 1

    def dtmf(self, digit: str) -> None:
        if not digit or any(c not in "0123456789*#ABCD" for c in digit.upper()):
            raise ValueError(f"not a DTMF digit: {digit!r}")
        self._metrics.dtmf.inc(len(digit))
        log.info("call %s: DTMF %s", self.info.call_id, digit)
        if self._agent is not None:
            for d in digit.upper():
                self._agent.dtmf(d)
        self.emit("dtmf", {"digits": digit.upper()})

    async def set_hold(self, on: bool) -> None:
        if self.state not in (CallState.ACTIVE, CallState.ON_HOLD):
            return
        self.state = CallState.ON_HOLD if on else CallState.ACTIVE
        self._clock0 = None
        if self._agent is not None:
            self._agent.set_hold(on)
        self.emit("hold" if on else "resume", {})
        await self._update(state=self.state)

    async def request_hangup(self, reason: str) -> None:
        """Hang up from our side (operator, drain): the transport hangs up the wire, then
        ends the session; without a transport handler the session just ends."""
        self.emit("hangup-requested", {"reason": reason})
        if self._hangup is not None:
            try:
                await self._hangup(reason)
            except Exception:
                log.exception("call %s: transport hang-up failed", self.info.call_id)
        await self.end(reason)

    async def end(self, reason: str) -> None:
        """End the call (idempotent; concurrent callers await the same end)."""
        await self._ending.run(lambda: self._end(reason))

    async def _end(self, reason: str) -> None:
        self.end_reason = reason
        self.state = CallState.ENDING
        if self._agent is not None:
            try:
                await self._agent.close()
            except Exception:
                log.exception("call %s: agent session close failed", self.info.call_id)
        self.state = CallState.ENDED
        await self._bg.wait(2.0)  # queued event writes land before the end (the store never blocks long)
        await self.flush_counts()
        try:
            await self._store.end(self.info.call_id, reason)
        except StaleSession:
            pass  # reaped already: the store counts it as ended
        except Exception:
            log.exception("call %s: store end failed", self.info.call_id)
        self._on_end(self)
        log.info("call ended: id=%s transport=%s remote=%s reason=%s duration=%.1fs frames_in=%d "
                 "frames_out=%d late=%d", self.info.call_id, self.info.transport, self.info.remote,
                 reason, time.monotonic() - self.started, self.frames_in, self.frames_out, self.frames_late)

    # ---- store -------------------------------------------------------------------------------

    async def flush_counts(self) -> None:
        await self._update(frames_in=self.frames_in, frames_out=self.frames_out,
                           frames_late=self.frames_late, last_activity=time.time())

    async def _update(self, **changes) -> None:
        try:
            await self._store.update(self.info.call_id, **changes)
        except StaleSession:
            pass
        except Exception:
            log.exception("call %s: store update failed", self.info.call_id)

    async def _store_event(self, kind: str, data: dict) -> None:
        try:
            await self._store.append_event(self.info.call_id, CallEvent(kind, data))
        except StaleSession:
            pass
        except Exception:
            log.exception("call %s: store event failed", self.info.call_id)
