"""`SipCall`: one SIP call between the stack (a bridge/sip/backends/ module) and the agent's
`CallSession`, in either direction.

States move on stack events only:

    RINGING --established--> ACTIVE <--remote hold/resume, operator hold--> HELD
       |                        |                                             |
       +--------closed----------+------------------closed---------------------+--> ENDED

Dead calls are reaped, so a vanished far end cannot hold an engine slot (and a drain)
forever: an inbound call answered but not established (no ACK) within `ACK_TIMEOUT` is
hung up as "no-ack" (the stack alone would keep it 32 s, retransmitting the 200 OK); an
ACTIVE call that has read no caller audio for `media_timeout` seconds is hung up as
"media-timeout". The stack's `read()` gives nothing at all while no RTP arrives (no
concealment or silence; measured with PCMU and Opus, by a far end that never sent and by
one stopped mid-call), so an empty read is the signal. A HELD call is spared (a held far
end rightly sends nothing) and its clock restarts on resume.

Media: the shared ticker (bridge/sip/media.py) calls `media_tick(now)` every 10 ms. It reads
what the stack received (PCM at the codec's rate; Opus is 48 kHz stereo, folded to mono),
turns it into 16 kHz frames (`LineAudio.receive`) and hands them to the session on the
call's own 20 ms grid, one frame behind the first arrival (see `_feed`: the stack's
receive clock is out of phase with ours and jumps at a re-INVITE; a missing frame is
concealed with silence so the model's clock never stops). It writes the agent's playout at
the line rate, self-clocked: frame n is written once `now >= t0 + n·20 ms`, two frames
ahead, so the stack's transmit clock never starves and a stalled tick never turns into a
burst of queued delay. A re-INVITE may change the codec: the format is probed again and
the line audio rebuilt at the new rate. On hold nothing is fed or played.

The session's sink is `LineSink`, which forwards to the `LineAudio` of the current
format (a call is admitted before its codec's rate is known to us).

Hot path (`media_tick`): no logging, no awaiting; problems are counted.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
from typing import Callable

import numpy as np

from agent.call import FRAME_SAMPLES
from agent.once import BackgroundTasks
from agent.quality import LineStats
from agent.session import FRAME_SECONDS, CallSession

from ..line_audio import LineAudio
from .metrics import SipMetrics
from .stack import (AudioFormat, CallEvent, CallEventKind, MediaInactive, MediaRestarted, RtpStats, StackCall,
                    StackError)

__all__ = ["SipCall", "SipCallState", "LineSink"]

log = logging.getLogger(__name__)

_AHEAD = 2  # frames queued in the stack beyond the one on the wire
_MAX_BEHIND = 5  # after a stall longer than this many frames, skip ahead instead of bursting
_READ_FRAMES = 4  # most frames taken from the stack per tick
_IN_CUSHION = 0.02  # caller frames reach the session this long after they arrive
_IN_MAX = 3  # most caller frames queued before the session
_TRIM_WINDOW = 25  # frames (0.5 s): a queue that never ran dry this long loses a frame
_SILENCE = np.zeros(FRAME_SAMPLES, np.int16)
_RESYNC_TICKS = 100  # check the stack's transmit queue once a second
ACK_TIMEOUT = 8.0  # seconds from answering to ESTABLISHED (the ACK): a 200 OK lost 7 times over


class SipCallState(enum.Enum):
    RINGING = "ringing"
    ACTIVE = "active"
    HELD = "held"
    ENDED = "ended"


class LineSink:
    """The agent's AudioSink for a call whose line rate is learnt when media starts (and
    may change at a re-INVITE: a recording's tap moves to each new line)."""

    def __init__(self) -> None:
        self._line: LineAudio | None = None
        self._tap: Callable[[np.ndarray], None] | None = None

    @property
    def line(self) -> LineAudio | None:
        return self._line

    @line.setter
    def line(self, line: LineAudio | None) -> None:
        self._line = line
        if line is not None and self._tap is not None:
            line.tap(self._tap)

    def tap(self, listener: Callable[[np.ndarray], None]) -> None:
        self._tap = listener
        if self._line is not None:
            self._line.tap(listener)

    def play(self, pcm: np.ndarray, rate: int) -> None:
        if self.line is not None:
            self.line.play(pcm, rate)

    def flush(self) -> float:
        return self.line.flush() if self.line is not None else 0.0

    @property
    def depth_ms(self) -> float:
        return self.line.depth_ms if self.line is not None else 0.0


class SipCall:
    def __init__(self, stack: StackCall, *, call_id: str, direction: str, metrics: SipMetrics,
                 local: str = "", sink: LineSink | None = None, media_timeout: float = 0.0) -> None:
        """`media_timeout`: seconds without caller audio before an ACTIVE call is hung up
        ("media-timeout"); 0 never."""
        self.stack = stack
        self.call_id = call_id
        self.direction = direction
        self.local = local
        self.metrics = metrics
        self.state = SipCallState.RINGING
        self.session: CallSession | None = None
        self.sink = sink or LineSink()
        self.end_reason = ""
        self.closed = asyncio.get_running_loop().create_future()
        self._hangup_reason: str | None = None
        self._transfer_to: str | None = None  # a blind transfer under way
        self._fmt: AudioFormat | None = None
        self._t0 = 0.0
        self._inq: collections.deque[np.ndarray] = collections.deque()
        self._in_t0: float | None = None
        self._fed = 0
        self._in_min = _IN_MAX  # fewest frames left queued after a feed, this window
        self.trimmed = 0  # caller frames dropped to keep the input queue short
        self._sent = 0
        self._ticks = 0
        self._read_bytes = 0
        self._counted_active = False
        self.media_timeout = media_timeout
        self._heard_at: float | None = None  # last caller audio read; None: clock not started
        self._reaping = False
        self._ack_timer: asyncio.TimerHandle | None = None
        self._bg = BackgroundTasks()
        stack.on_event(self._on_event)
        self._far_rtcp = False  # the far end sends RTCP reports (not every phone does)
        stack.on_rtcp(self._rtcp)

    # ---- session wiring --------------------------------------------------------------------

    def attach(self, session: CallSession) -> None:
        """Join the session. An inbound call is answered right after this, so the ACK
        clock starts here."""
        self.session = session
        session.on_hangup_request(self.hangup)
        if self.state is SipCallState.ENDED:  # the caller gave up while we were admitting
            self._bg.spawn(session.end(self.end_reason or "cancelled"))
        elif self.state is SipCallState.ACTIVE:
            self._bg.spawn(session.answered())
        elif self.direction == "in":
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_TIMEOUT, self._no_ack)

    async def hangup(self, reason: str = "operator") -> None:
        """Hang up the wire (our side); the session ends on the stack's CLOSED event."""
        if self.state is SipCallState.ENDED:
            return
        self._hangup_reason = reason
        try:
            await self.stack.hangup()
        except StackError as exc:
            # The stack is gone or refused: no close report will come, so end it here.
            log.warning("call %s: hang-up failed: %s", self.call_id, exc)
            self.finish(reason)
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), 5.0)
        except asyncio.TimeoutError:
            log.warning("call %s: no close report 5 s after hang-up; ending the session", self.call_id)
            self.finish(reason)

    async def set_hold(self, on: bool) -> None:
        """Operator hold: re-INVITE the far end, pause the session (no frames, no audio)."""
        if self.state not in (SipCallState.ACTIVE, SipCallState.HELD):
            raise StackError(f"call is {self.state.value}, not active")
        await self.stack.set_hold(on)
        await self._hold(on)

    async def transfer(self, uri: str, timeout: float = 30.0) -> None:
        if self.state not in (SipCallState.ACTIVE, SipCallState.HELD):
            raise StackError(f"call is {self.state.value}, not active")
        self._hangup_reason = "transferred"
        self._transfer_to = uri
        try:
            await self.stack.transfer(uri, timeout=timeout)
        except BaseException:
            self._hangup_reason = self._transfer_to = None
            raise

    async def send_dtmf(self, digits: str) -> None:
        await self.stack.send_dtmf(digits)
        self.metrics.dtmf_sent.inc(len(digits))

    # ---- stack events ------------------------------------------------------------------------

    def _on_event(self, event: CallEvent) -> None:
        kind = event.kind
        if kind is CallEventKind.ESTABLISHED:
            if self.state is SipCallState.RINGING:
                self._cancel_ack_timer()
                self.state = SipCallState.ACTIVE
                self.metrics.active.labels(direction=self.direction).inc()
                self._counted_active = True
                if self.session is not None:
                    self._bg.spawn(self.session.answered())
        elif kind is CallEventKind.CLOSED:
            reason = self._hangup_reason or (_remote_reason(event.text) if self.state is not SipCallState.RINGING
                                             else _unanswered_reason(event.text, self.direction))
            self.finish(reason, event.text)
        elif kind is CallEventKind.REMOTE_HOLD:
            self._bg.spawn(self._hold(True))
        elif kind is CallEventKind.REMOTE_RESUME:
            self._bg.spawn(self._hold(False))
        elif kind is CallEventKind.DTMF:
            if self.session is not None:
                try:
                    self.session.dtmf(event.text)
                except ValueError:
                    pass  # not a keypad digit: ignore rather than end the call
        elif kind is CallEventKind.AUDIO_WARNING:
            self.metrics.audio_warnings.labels(direction=event.text).inc()

    def _rtcp(self, stats: RtpStats) -> None:
        self._far_rtcp = True
        self._line(stats)

    def _line(self, stats: RtpStats) -> None:
        if self.session is not None:
            self.session.line.update(_line_stats(stats, self._far_rtcp))

    async def _hold(self, on: bool) -> None:
        if self.state not in (SipCallState.ACTIVE, SipCallState.HELD):
            return
        self.state = SipCallState.HELD if on else SipCallState.ACTIVE
        self.sink.flush()
        self._fmt = None  # media is re-probed (and re-clocked) on resume
        self._heard_at = None  # a held far end sends nothing: the media clock restarts on resume
        self._in_t0 = None
        self._inq.clear()
        if self.session is not None:
            await self.session.set_hold(on)

    def finish(self, reason: str, detail: str = "") -> None:
        """The call is over (the stack said so, or an outbound call failed): end the session."""
        if self.state is SipCallState.ENDED:
            return
        answered = self.state is not SipCallState.RINGING or reason == "no-ack"  # a 200 went out
        self.state = SipCallState.ENDED
        self.end_reason = reason
        self._cancel_ack_timer()
        if self._counted_active:
            self.metrics.active.labels(direction=self.direction).dec()
            self._counted_active = False
        stats = self.stack.stats
        if stats is not None:
            self.metrics.rtp_received.inc(stats.rx_packets)
            line = _line_stats(stats, self._far_rtcp)
            self.metrics.rtp_lost.inc(line.lost)
            self.metrics.rtp_late.inc(stats.jbuf_late)
            if self.session is not None:
                self.session.line.update(line)  # the final figures, before the session sums them up
        if not self.closed.done():
            self.closed.set_result(reason)
        log.info("SIP call %s %s ended: %s%s", self.call_id, self.direction, reason,
                 f" ({detail})" if detail and detail != reason else "")
        if self.session is not None:
            record = self.session.detail
            record.frames_dropped += self.trimmed
            if record.sip_code is None:
                record.sip_code = 200 if answered else _final_status(reason, detail)
            if reason == "transferred":  # told here, before the end: the far end's BYE can beat transfer()'s return
                self.session.emit("transferred", {"to": self._transfer_to})
            self._bg.spawn(self.session.end(reason))

    # ---- dead calls ---------------------------------------------------------------------

    def _cancel_ack_timer(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    def _no_ack(self) -> None:
        self._ack_timer = None
        if self.state is SipCallState.RINGING:
            log.info("call %s: answered but not established (no ACK) within %.0f s; hanging up",
                     self.call_id, ACK_TIMEOUT)
            self.metrics.reaped.labels(reason="no-ack").inc()
            self._bg.spawn(self.hangup("no-ack"))

    async def _reap(self, silent: float) -> None:
        log.info("call %s: no caller audio for %.1f s; hanging up", self.call_id, silent)
        self.metrics.reaped.labels(reason="media-timeout").inc()
        await self.hangup("media-timeout")

    # ---- media (the shared ticker; event loop thread; never logs) -------------------------

    def media_tick(self, now: float) -> None:
        if self.state is not SipCallState.ACTIVE or self.session is None:
            return
        if self._heard_at is None:
            self._heard_at = now  # active (again): the media clock starts
        try:
            if self._fmt is None:
                self._start_media(now)
            self._pump(now)
        except MediaRestarted:
            self._fmt = None  # the streams were replaced: probe again next tick
        except MediaInactive:
            pass  # no audio streams at all is no audio: the clock below still runs
        if self.media_timeout and not self._reaping and now - self._heard_at >= self.media_timeout:
            self._reaping = True
            self._bg.spawn(self._reap(now - self._heard_at))

    def _start_media(self, now: float) -> None:
        fmt = self.stack.audio_format()
        line = self.sink.line
        if line is None or line.line_rate != fmt.rx_rate:
            self.sink.line = LineAudio(fmt.rx_rate)
        self._fmt = fmt
        self._read_bytes = int(fmt.rx_rate * FRAME_SECONDS) * fmt.rx_channels * 2 * _READ_FRAMES
        self._t0 = now
        self._sent = 0
        self._ticks = 0

    def _pump(self, now: float) -> None:
        fmt = self._fmt
        line = self.sink.line
        assert fmt is not None and line is not None and self.session is not None
        data = self.stack.read(self._read_bytes)
        if data:
            self._heard_at = now
            pcm = np.frombuffer(data, dtype=np.int16)
            if fmt.rx_channels == 2:
                pcm = pcm[0::2]  # both channels carry the same voice; the resampler copies a view
            self._inq.extend(line.receive(pcm))
        self._feed(now)
        due = int((now - self._t0) / FRAME_SECONDS) + _AHEAD
        if due - self._sent > _MAX_BEHIND:
            self._sent = due - _AHEAD  # a stall: drop the backlog rather than queue delay
        while self._sent < due:
            frame = line.next_frame()
            if fmt.tx_channels == 2:
                frame = np.repeat(frame, 2)
            self.stack.write(frame)
            self._sent += 1
            self.session.frame_sent()
        self._ticks += 1
        if self._ticks % _RESYNC_TICKS == 0:
            self._resync()

    def _feed(self, now: float) -> None:
        """Hand caller frames to the session on the call's own 20 ms grid, one frame
        (`_IN_CUSHION`) behind the first arrival. The stack's receive clock is not in phase
        with ours and shifts when a re-INVITE replaces the streams; the cushion absorbs
        that, so the session sees a steady clock and its lateness measures our scheduling.
        A frame missing at its instant is concealed with silence (the model's clock must
        not stop); a queue grown past `_IN_MAX` frames is trimmed (no creeping delay)."""
        session = self.session
        assert session is not None
        if self._in_t0 is None:
            if not self._inq:
                return
            self._in_t0 = now + _IN_CUSHION
            self._fed = 0
        if now < self._in_t0:
            return
        due = int((now - self._in_t0) / FRAME_SECONDS) + 1
        if due - self._fed > _MAX_BEHIND:  # a stall of the whole process: skip, don't burst
            self._fed = due - 1
        while self._fed < due:
            if self._inq:
                session.feed(self._inq.popleft())
            else:
                session.line.concealed += 1
                session.feed(_SILENCE)
            self._fed += 1
            # A concealed frame leaves the real one queued behind: 20 ms more delay for
            # the rest of the call. So when the queue never ran dry for a whole window,
            # one frame is surplus: drop it (a jitter buffer that shrinks back).
            self._in_min = min(self._in_min, len(self._inq))
            if self._fed % _TRIM_WINDOW == 0:
                if self._in_min > 0:
                    self._inq.popleft()
                    self.trimmed += 1
                self._in_min = _IN_MAX
        while len(self._inq) > _IN_MAX:
            self._inq.popleft()
            self.trimmed += 1

    def _resync(self) -> None:
        """Follow the stack's transmit clock: keep about `_AHEAD` frames queued there."""
        fmt = self.stack.audio_format()
        frame_bytes = int(fmt.tx_rate * FRAME_SECONDS) * fmt.tx_channels * 2
        queued = fmt.tx_buffered // max(1, frame_bytes)
        if queued > _AHEAD + 2:
            self._sent += 1  # we run fast: write one frame less
        elif queued == 0:
            self._sent -= 1  # we run slow: write one frame more


def _line_stats(stats: RtpStats, far_rtcp: bool) -> LineStats:
    """The caller's stream in our terms. The stack computes its RTCP figures (RFC 3550 loss
    and jitter over the whole stream, RTT) only when the far end's RTCP report arrives:
    they stay 0 for a far end that sends none (Debian's baresip 1.0 does not). Then the
    jitter buffer's own counts stand in: its sequence gaps are the lost packets, except
    that the RFC 4733 DTMF packets the far end sends instead of audio count as gaps too
    (docs/quality.md). RFC 3550's cumulative loss is negative when duplicates outnumber
    losses: 0 then."""
    if far_rtcp:
        return LineStats(stats.rx_packets, max(0, stats.rx_lost), stats.rx_jitter_ms, stats.rtt_ms or None)
    return LineStats(stats.rx_packets, stats.jbuf_lost, float(stats.jbuf_jitter_ms), None)


def _final_status(reason: str, text: str) -> int | None:
    """The final status of an INVITE that was never answered, for its CDR."""
    if reason == "cancelled":
        return 487
    return int(text[:3]) if text[:3].isdigit() else None


def _unanswered_reason(text: str, direction: str) -> str:
    """A call that closed before it was established: what became of it."""
    status = text[:3] if text[:3].isdigit() else ""
    if direction == "in":
        return "cancelled"
    return {"486": "busy", "600": "busy", "603": "declined", "408": "no-answer", "480": "no-answer",
            "487": "no-answer"}.get(status, f"failed: {text[:60]}" if text else "failed")


def _remote_reason(text: str) -> str:
    """The stack's close text -> a short reason for the store and the logs."""
    low = text.lower()
    if not text or "connection reset" in low or "bye" in low:
        return "remote-hangup"
    if "transfer" in low:
        return "transferred"
    if "rtp" in low and "timeout" in low:
        return "rtp-timeout"
    return "remote-hangup" if low.startswith(("terminated", "call closed")) else f"closed: {text[:60]}"
