"""`CallSession`: one call as the agent layer sees it, from admission to the end.

States move on events: RINGING (admitted, not yet answered) -> ACTIVE (the transport
answered) <-> ON_HOLD -> ENDING -> ENDED. The session counts frames, measures how late
each caller frame arrives against the call's own 20 ms clock (`FrameClock`), forwards DTMF
and turn events, and keeps the store's record current (counts are flushed with the lease
renewal, not per frame). One session's failure ends that call only.

Lateness says what the caller experiences. A transport that stalls (the whole process
paused for 400 ms, say) either delivers the frames late in a burst, or skips them (the SIP
leg does, rather than queue delay for the rest of the call). Skipped frames are lost, not
late: the frames after them are on time. A clock that only counted frames took every later
frame for 380 ms late, for the rest of the call (measured: one 0.4 s stall, 92-96% of each
call's frames "late"). So when late frames keep the regular pace with a steady offset, the
frames before them are counted lost once (`duplexline_agent_lost_frames_total`), the
agent hears silence in their place (keeping its chunks on the engine's clock), and the
clock moves on: one stall costs one late frame, plus what it lost.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import numpy as np

from .agents import AgentSession
from .call import FRAME_SAMPLES, CallInfo
from .cdr import CallDetail, call_record
from .errors import StaleSession
from .metrics import AgentMetrics
from .once import BackgroundTasks, Once
from .recording import CallRecording
from .quality import LineQuality
from .store import CallEvent, CallState, SessionStore

__all__ = ["CallSession", "FrameClock"]

log = logging.getLogger(__name__)

FRAME_SECONDS = 0.02
CONFIRM_FRAMES = 3  # late frames at a steady offset that show the frames before them were lost
STORED_EVENTS = frozenset({"turn", "barge-in", "dtmf", "hold", "resume", "error", "hangup-requested",
                           "rehomed", "voice", "transferred", "dead-air", "quality",
                           "recording"})

EventListener = Callable[[str, dict], None]
HangupHandler = Callable[[str], Awaitable[None]]


class FrameClock:
    """A call's frame clock, as the caller experiences it: `arrive(now)` for each frame
    gives the lateness of the frames judged by it, and how many frames were lost before
    them.

    Frame n is due at anchor + n·period, the anchor following the earliest arrivals
    (jitter makes frames late, never early). A frame more than a period late is held back
    until the frames after it show what happened: if the stream catches up (a burst), the
    held frames were delayed and count late; if `confirm` of them keep the regular pace at
    a steady offset, the frames before them never came: they count lost, the first held
    frame late (by the gap), and the clock moves on by the lost frames."""

    def __init__(self, period: float = FRAME_SECONDS, confirm: int = CONFIRM_FRAMES) -> None:
        self.period = period
        self.confirm = max(1, confirm)
        self.reset()

    def reset(self) -> None:
        self._anchor: float | None = None
        self._n = 0  # frames on the clock: arrived and lost
        self._held: list[float] = []  # offsets (arrival - n * period) of late frames not yet judged

    def arrive(self, now: float) -> tuple[list[float], int]:
        if self._anchor is None:
            self._anchor, self._n = now, 1
            return [0.0], 0
        offset = now - self._n * self.period
        self._n += 1
        anchor = self._anchor
        if offset - anchor <= self.period:  # on time: held frames were delayed, not lost
            judged = [h - anchor for h in self._held] + [max(0.0, offset - anchor)]
            self._held.clear()
            self._anchor = min(anchor, offset)
            return judged, 0
        self._held.append(offset)
        if len(self._held) < self.confirm:
            return [], 0
        if max(self._held) - min(self._held) < self.period / 2:
            lost = max(1, int(round((min(self._held) - anchor) / self.period)))
            shift = lost * self.period
            judged = [self._held[0] - anchor] + [max(0.0, h - shift - anchor) for h in self._held[1:]]
            self._anchor = min(anchor, min(self._held) - shift)
            self._n += lost
            self._held.clear()
            return judged, lost
        return [self._held.pop(0) - anchor], 0  # catching up (a burst): the oldest was late

    def finish(self) -> list[float]:
        """Lateness of the frames still held at the end of the call (late, by their offset)."""
        judged = [h - self._anchor for h in self._held] if self._anchor is not None else []
        self._held.clear()
        return judged


class CallSession:
    def __init__(self, info: CallInfo, store: SessionStore, metrics: AgentMetrics,
                 on_end: Callable[["CallSession"], None],
                 on_answer: Callable[["CallSession"], None] | None = None, *,
                 dead_air_seconds: float = 0.0) -> None:
        self.info = info
        self.detail = CallDetail()  # the CDR's facts; the transport adds the wire's
        self.line = LineQuality(str(info.transport), metrics.quality, self.emit, dead_air_seconds=dead_air_seconds)
        self.state = CallState.RINGING
        self.started = time.monotonic()
        self.frames_in = self.frames_out = self.frames_late = self.frames_lost = 0
        self.end_reason: str | None = None
        self._store = store
        self._metrics = metrics
        self._on_end = on_end
        self._on_answer = on_answer
        self._agent: AgentSession | None = None
        self.recording: CallRecording | None = None  # set at admission when the call is recorded (agent/recorder.py)
        self._listeners: list[EventListener] = []
        self._hangup: HangupHandler | None = None
        self._clock = FrameClock()
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
        self.detail.on_event(kind, data)
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
        if self.detail.answered_at is None:
            self.detail.answered_at = time.time()
            self.line.listen(time.monotonic())
            if self._on_answer is not None:
                self._on_answer(self)
        await self._update(state=CallState.ACTIVE)

    def feed(self, frame: np.ndarray) -> None:
        """One caller frame: int16 [320] at 16 kHz. Event loop only; never blocks."""
        if len(frame) != FRAME_SAMPLES:
            raise ValueError(f"a frame is {FRAME_SAMPLES} samples at 16 kHz, got {len(frame)}")
        self.frames_in += 1
        if self.recording is not None:
            self.recording.heard(frame)
        now = time.monotonic()
        judged, lost = self._clock.arrive(now)
        self._judge(judged)
        self.line.frame(frame, now)
        if lost:
            self.frames_lost += lost
            self.line.concealed += lost  # the agent hears silence in their place
            self._metrics.lost_frames.inc(lost)
        if self.state is CallState.ACTIVE and self._agent is not None:
            self._agent.feed(frame)
            if lost:
                self._agent.lost(lost)  # after this frame: the loss shows only now
        elif self.state is CallState.ON_HOLD:
            self._metrics.dropped_frames.labels(reason="on_hold").inc()
            self.detail.frames_dropped += 1

    def _judge(self, latenesses: list[float]) -> None:
        for lateness in latenesses:
            self._metrics.frame_lateness.observe(lateness)
            if lateness > FRAME_SECONDS:
                self.frames_late += 1
                self._metrics.late_frames.inc()

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
        self._judge(self._clock.finish())
        self._clock.reset()
        if on:
            self.line.pause()
        else:
            self.line.listen(time.monotonic())
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
        self.detail.ended_at = time.time()
        self.state = CallState.ENDING
        self._judge(self._clock.finish())
        if self._agent is not None:
            try:
                await self._agent.close()
            except Exception:
                log.exception("call %s: agent session close failed", self.info.call_id)
        self.state = CallState.ENDED
        if self.recording is not None:
            self.recording.close()  # no more frames: the writer finishes the file
        self.emit("quality", self.line.finish(self.detail.codec))  # stored: /calls/{id} shows it after the end
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
                 "frames_out=%d late=%d lost=%d", self.info.call_id, self.info.transport, self.info.remote,
                 reason, time.monotonic() - self.started, self.frames_in, self.frames_out, self.frames_late,
                 self.frames_lost)

    def record(self, bridge: str) -> dict:
        """The call's CDR (agent/cdr.py), once it has ended."""
        worker = self._agent.worker if self._agent is not None else None
        return call_record(self.info, self.detail, bridge=bridge, worker=worker, reason=self.end_reason or "error",
                           frames_in=self.frames_in, frames_out=self.frames_out, frames_late=self.frames_late,
                           frames_lost=self.frames_lost, quality=self.line.summary(self.detail.codec))

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
