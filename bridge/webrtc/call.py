"""`WebRtcCall`: one browser call, joining its peer connection to its `CallSession`.

    peer.on_audio (48 kHz) -> inbound LineAudio.receive -> 16 kHz frames -> session.feed
    peer pulls every 20 ms  -> outbound LineAudio.next_frame (agent audio at the peer's send
                               rate, 24 kHz) + session.frame_sent

The outbound `LineAudio` is the session's AudioSink; the inbound one only resamples (two
rates: the decoder gives 48 kHz, the encoder takes 24 kHz, the models' own rate).
    session events          -> data channel  {"event": kind, "data": {...}}
    data channel            -> {"type": "dtmf", "digits": "5"} | {"type": "hangup"} | {"type": "ping", "t": n}

States, moved by the peer's events: ANSWERED (answer sent) -> CONNECTED (ICE + DTLS up:
the session is answered, media flows) -> ENDED. A call that does not connect within
`connect_timeout` ends with "ice-timeout"; a connection that fails or closes ends it with
"connection-lost"; a connected call that has received no audio for `media_timeout` seconds
ends with "media-timeout" (the page is told why over the data channel). aiortc's ICE
consent checks (RFC 7675: one check every 4-6 s, closed after 6 failures) catch a vanished
browser only after about half a minute, and never a peer that keeps answering them but
sends no audio. `end()` is idempotent (concurrent callers share one end), closes the
peer, ends the session, and reports once to the leg (`on_connected` first, when it
connected).

Event loop only. The two audio callbacks are the 20 ms hot path: no logging, no JSON.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from agent.once import BackgroundTasks, Once
from agent.session import CallSession

from ..line_audio import LineAudio
from .metrics import WebRtcMetrics, end_reason_label

if TYPE_CHECKING:  # the peer module imports aiortc; the leg loads it only when it starts
    from .peer import WebRtcPeer

__all__ = ["WebRtcCall", "CallPhase", "MAX_MESSAGE_CHARS"]

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 1024  # a page message is a keypad press or a ping; anything longer is ignored


class CallPhase(enum.Enum):
    ANSWERED = "answered"
    CONNECTED = "connected"
    ENDED = "ended"


PeerFactory = Callable[..., "WebRtcPeer"]


class WebRtcCall:
    def __init__(self, call_id: str, session: CallSession, inbound: LineAudio, outbound: LineAudio,
                 metrics: WebRtcMetrics, *,
                 make_peer: PeerFactory, connect_timeout: float, media_timeout: float = 0.0,
                 on_ended: Callable[["WebRtcCall"], None],
                 on_connected: Callable[["WebRtcCall"], None] | None = None) -> None:
        self.call_id = call_id
        self.session = session
        self.phase = CallPhase.ANSWERED
        self.created = time.monotonic()
        self.end_reason: str | None = None
        self._inbound = inbound
        self._outbound = outbound
        self._metrics = metrics
        self._on_ended = on_ended
        self._on_connected = on_connected
        self._connect_timeout = connect_timeout
        self._media_timeout = media_timeout  # 0: never
        self._heard = (0, 0.0)  # (the peer's frames_in, when it last moved)
        self._ending = Once()
        self._timer: asyncio.TimerHandle | None = None  # the connect timer, then the media check
        self._bg = BackgroundTasks()
        self.peer = make_peer(on_audio=self._audio_in, pull_audio=self._audio_out,
                              on_message=self._message, on_state=self._state)
        metrics.peers.inc()
        session.on_event(self._event)
        session.on_hangup_request(self._hangup_requested)

    async def accept(self, offer_sdp: str) -> str:
        """The answer SDP; starts the connect timer. PeerFailed: the caller ends the call."""
        answer = await self.peer.accept(offer_sdp)
        self._timer = asyncio.get_running_loop().call_later(self._connect_timeout, self._connect_timed_out)
        return answer

    # ---- the hot path -----------------------------------------------------------------

    def _audio_in(self, pcm: np.ndarray) -> None:
        feed = self.session.feed
        for frame in self._inbound.receive(pcm):
            feed(frame)

    def _audio_out(self) -> np.ndarray:
        self.session.frame_sent()
        return self._outbound.next_frame()

    # ---- events -----------------------------------------------------------------------

    def _event(self, kind: str, data: dict) -> None:
        self.send(kind, data)

    def send(self, kind: str, data: dict) -> None:
        if self.peer.send(json.dumps({"event": kind, "data": data}, separators=(",", ":"))):
            self._metrics.messages.labels(direction="out").inc()

    def _state(self, state: str) -> None:
        if self.phase is CallPhase.ENDED:
            return
        if state == "connected" and self.phase is CallPhase.ANSWERED:
            self.phase = CallPhase.CONNECTED
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._on_connected is not None:
                self._on_connected(self)
            if self._media_timeout:
                self._heard = (self.peer.stats.frames_in, time.monotonic())
                self._timer = asyncio.get_running_loop().call_later(self._media_period, self._check_media)
            self._metrics.connect.observe(time.monotonic() - self.created)
            self.session.line.set_source(self.peer.line_stats)  # polled once a second (agent/quality.py)
            self._bg.spawn(self.session.answered())
            log.info("call %s: connected in %.0f ms", self.call_id, (time.monotonic() - self.created) * 1000)
        elif state == "channel-open":
            self.send("hello", {"call_id": self.call_id})
        elif state in ("failed", "closed"):
            self._bg.spawn(self.end("connection-lost"))

    def _message(self, text: str) -> None:
        self._metrics.messages.labels(direction="in").inc()
        if len(text) > MAX_MESSAGE_CHARS:
            self.send("error", {"message": f"message over {MAX_MESSAGE_CHARS} characters ignored"})
            return
        try:
            message = json.loads(text)
            kind = message["type"]
        except (ValueError, TypeError, KeyError):
            self.send("error", {"message": 'messages are JSON objects with a "type"'})
            return
        if kind == "dtmf":
            try:
                self.session.dtmf(str(message.get("digits", "")))
            except ValueError as exc:
                self.send("error", {"message": str(exc)})
        elif kind == "ping":
            self.send("pong", {"t": message.get("t")})
        elif kind == "hangup":
            self._bg.spawn(self.end("remote-hangup"))
        else:
            self.send("error", {"message": f"unknown message type {str(kind)[:40]!r}"})

    def _connect_timed_out(self) -> None:
        if self.phase is CallPhase.ANSWERED:
            log.info("call %s: no connection within %.0f s", self.call_id, self._connect_timeout)
            self._bg.spawn(self.end("ice-timeout"))

    @property
    def _media_period(self) -> float:
        return min(1.0, self._media_timeout / 4)

    def _check_media(self) -> None:
        """Every second or so while connected: has any audio come since the last check?
        (The peer counts frames on the hot path; this reads the count, not each frame.)"""
        if self.phase is not CallPhase.CONNECTED:
            return
        frames, since = self._heard
        now = time.monotonic()
        if self.peer.stats.frames_in != frames:
            self._heard = (self.peer.stats.frames_in, now)
        elif now - since >= self._media_timeout:
            self._timer = None
            log.info("call %s: no audio from the browser for %.1f s; hanging up", self.call_id, now - since)
            self._bg.spawn(self._hangup_requested("media-timeout"))
            return
        self._timer = asyncio.get_running_loop().call_later(self._media_period, self._check_media)

    async def _hangup_requested(self, reason: str) -> None:
        """The operator (POST /calls/{id}/hangup), a drain or the media timeout hangs up:
        tell the page why."""
        self.send("hangup", {"reason": reason})
        await self.end(reason)

    # ---- the end ----------------------------------------------------------------------

    async def _last_stats(self) -> None:
        """The line's figures once more while the peer is open: the call's record has them."""
        try:
            stats = await self.peer.line_stats()
        except Exception:
            log.debug("call %s: final line stats failed", self.call_id, exc_info=True)
            return
        if stats is not None:
            self.session.line.update(stats)

    async def end(self, reason: str) -> None:
        await self._ending.run(lambda: self._end(reason))

    async def _end(self, reason: str) -> None:
        connected = self.phase is CallPhase.CONNECTED
        self.end_reason = reason
        self.phase = CallPhase.ENDED
        if self._timer is not None:
            self._timer.cancel()
        if connected:
            await self._last_stats()
        try:
            await self.peer.close()
        finally:
            try:
                await self.session.end(reason)
            finally:
                stats = self.peer.stats
                m = self._metrics
                m.peers.dec()
                m.ended.labels(reason=end_reason_label(reason)).inc()
                m.decode_errors.inc(stats.decode_errors)
                m.late_packets.inc(stats.late_packets)
                m.send_resyncs.inc(stats.resyncs)
                m.handler_errors.inc(stats.handler_errors)
                if stats.handler_errors:
                    log.warning("call %s: the audio handler failed on %d frames", self.call_id,
                                stats.handler_errors)
                log.info("webrtc call %s ended (%s): packets in=%d out=%d decode_errors=%d late=%d resyncs=%d",
                         self.call_id, reason, stats.frames_in, self.session.frames_out, stats.decode_errors,
                         stats.late_packets, stats.resyncs)
                self._on_ended(self)
