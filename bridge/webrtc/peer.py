"""`WebRtcPeer`: one browser call's RTCPeerConnection. The only module that imports aiortc
and PyAV (libopus itself is bridge/media/opus.py); everything it hands out is numpy PCM, text and plain callbacks.

    browser ── Opus/RTP ──► aiortc receiver ──► decode ──► on_audio(int16 mono: 16 kHz, 320
                                                         fast; 48 kHz, 960 stock)
    browser ◄── Opus/RTP ── aiortc sender ◄── encode ◄── pull_audio() every 20 ms (int16 mono
                                                         24 kHz, 480: SEND_RATE)
    browser ◄─ data channel ─► send(text) / on_message(text)

Two media paths (`--webrtc-media`), the same on the wire:

- `stock`: aiortc as shipped. Received frames go through aiortc's jitter buffer and a
  decoder thread per call, come back to the loop through two queues, and a reader task
  per call takes them; sent frames are raw PCM that aiortc measures (RFC 6465 level, a
  pure-Python loop over every sample) and encodes in the default thread pool (stereo,
  96 kbit/s, complexity 10). Measured: 10 calls per core.
- `fast` (default): the receiver decodes on the loop thread the moment a packet arrives,
  straight to 16 kHz, and calls `on_audio` directly (no thread, no queue, no task
  wake-up; newest-wins ordering instead of aiortc's 4-frame prefetch, so 60 ms less
  delay), and the sender is handed Opus packets this module encoded itself on the loop
  thread (mono 24 kHz in, 32 kbit/s, CELT low-delay, complexity 0; silence from a cache),
  which skips the level loop, the thread pool and most of the encoder's work. Both use
  libopus's own API (bridge/media/opus.py), not PyAV's wrapper. docs/webrtc.md has the
  figures.
  docs/webrtc.md has the profile behind it and what is left.

The fast receive path replaces two private attributes of aiortc's `RTCRtpReceiver`
(its jitter buffer and decoder queue), so aiortc is pinned (1.16.0) and
`_install_fast_receive` checks they exist and raises `PeerFailed` otherwise; a test
covers it.

Event loop only. `close()` is idempotent. The hot path (`_FastDecoder.put`,
`_PacedTrack.recv`) never logs: errors are counted in `PeerStats`.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import threading
from dataclasses import dataclass
from typing import Callable

import av
import numpy as np
from aiortc import (RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender,
                    RTCSessionDescription)
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpreceiver import RTCRtpReceiver

from agent.once import Once
from agent.quality import LineStats

from ..media.opus import OpusDecoder, OpusEncoder
from .config import IceServer
from .errors import PeerFailed
from .sdp import announce_public_address

__all__ = ["WebRtcPeer", "PeerStats", "LINE_RATE", "FAST_RECEIVE_RATE", "SEND_RATE", "FRAME_SAMPLES",
           "aiortc_version"]

log = logging.getLogger(__name__)

LINE_RATE = 48000  # Opus runs its RTP clock at 48 kHz, and aiortc's decoder gives 48 kHz
FAST_RECEIVE_RATE = 16000  # the fast path decodes to the agent's rate directly
SEND_RATE = 24000  # what the fast path hands libopus: the speech models speak at 22.05/24 kHz
FRAME_SAMPLES = 960  # 20 ms at 48 kHz
_FRAME_SECONDS = 0.02
_TIME_BASE = fractions.Fraction(1, LINE_RATE)
_MAX_LAG_FRAMES = 10  # the sender fell this far behind (a stalled loop): resync, don't burst
_ENCODER_BITRATE = 32000
# libopus complexity 0-10. Measured here through PyAV (CELT, mono, thread CPU time): 24 kHz
# input at complexity 0 ~60 us a frame, 1 ~73, 5 ~95, 10 ~130; 48 kHz at 10 ~150. Through
# libopus's own API (bridge/media/opus.py) complexity 0 costs ~36 us. At 32 kbit/s
# complexity 0 still carries a voice cleanly (docs/webrtc.md).
_ENCODER_COMPLEXITY = 0

AudioIn = Callable[[np.ndarray], None]
AudioOut = Callable[[], np.ndarray]
TextIn = Callable[[str], None]
StateChange = Callable[[str], None]


def aiortc_version() -> str:
    import aiortc

    return aiortc.__version__


@dataclass
class PeerStats:
    """Counted on the hot path instead of logged; the call reads them when it ends."""

    frames_in: int = 0
    decode_errors: int = 0
    late_packets: int = 0  # arrived after a newer one: dropped (fast path)
    resyncs: int = 0  # the send clock was more than _MAX_LAG_FRAMES behind
    handler_errors: int = 0


# ---- receive ---------------------------------------------------------------------------------


class _NewestWins:
    """Stands in for aiortc's audio jitter buffer on the fast path: one Opus packet is one
    frame, so a packet newer than the last is a frame now; an older one is late and
    dropped. No 4-frame prefetch and no stall after a lost packet."""

    capacity = 16  # read by aiortc for nothing on the audio path; kept for the interface

    def __init__(self, stats: PeerStats) -> None:
        self._last: int | None = None
        self._stats = stats

    def add(self, packet) -> tuple[bool, JitterFrame | None]:
        seq = packet.sequence_number
        if self._last is not None and (seq == self._last or ((seq - self._last) & 0xFFFF) >= 0x8000):
            self._stats.late_packets += 1
            return False, None
        self._last = seq
        return False, JitterFrame(packet._data, packet.timestamp)


class _FastDecoder:
    """Stands in for the receiver's decoder queue. aiortc calls `put((codec, frame))` on the
    loop thread: decode there, straight to 16 kHz mono (libopus does the band-limiting; no
    48 kHz step and no resampler after it), and hand the PCM to the call. The decoder
    thread aiortc still starts waits in `get()` until `put(None)` at stop, then ends as it
    would."""

    def __init__(self, on_audio: AudioIn, stats: PeerStats) -> None:
        self._decoder = OpusDecoder(FAST_RECEIVE_RATE)
        self._on_audio = on_audio
        self._stats = stats
        self._stopped = threading.Event()

    def put(self, item) -> None:  # LOOP THREAD (from aiortc's receiver)
        if item is None:
            self._stopped.set()
            return
        try:
            pcm = self._decoder.decode(item[1].data)
        except Exception:  # OpusError, or a payload ctypes cannot pass: never into aiortc's loop
            self._stats.decode_errors += 1
            return
        self._stats.frames_in += 1
        try:
            self._on_audio(pcm)
        except Exception:  # one call's bug must not stop aiortc's receive loop
            self._stats.handler_errors += 1

    def get(self):  # aiortc's DECODER THREAD: nothing to do until the receiver stops
        self._stopped.wait()
        return None


def _install_fast_receive(receiver: RTCRtpReceiver, on_audio: AudioIn, stats: PeerStats) -> None:
    """Swap the receiver's jitter buffer and decoder queue before it starts (they are
    name-mangled privates of aiortc 1.16; checked here so an upgrade fails loudly)."""
    for name in ("_RTCRtpReceiver__jitter_buffer", "_RTCRtpReceiver__decoder_queue",
                 "_RTCRtpReceiver__decoder_thread"):
        if not hasattr(receiver, name):
            raise PeerFailed(f"aiortc {aiortc_version()} has no RTCRtpReceiver.{name}: the fast "
                             "media path needs aiortc 1.16 (or run with --webrtc-media stock)")
    if getattr(receiver, "_RTCRtpReceiver__decoder_thread") is not None:
        raise PeerFailed("the receiver has started already: install the fast path before connecting")
    setattr(receiver, "_RTCRtpReceiver__jitter_buffer", _NewestWins(stats))
    setattr(receiver, "_RTCRtpReceiver__decoder_queue", _FastDecoder(on_audio, stats))


async def _read_stock(track: MediaStreamTrack, on_audio: AudioIn, stats: PeerStats) -> None:
    """The stock path's reader task: aiortc's frames are s16 stereo interleaved."""
    try:
        while True:
            frame = await track.recv()
            stats.frames_in += 1
            try:
                on_audio(np.ascontiguousarray(frame.to_ndarray()[0, ::2]))
            except Exception:
                stats.handler_errors += 1
    except (MediaStreamError, asyncio.CancelledError):
        return


# ---- send ------------------------------------------------------------------------------------


def _opus_encoder(rate: int) -> OpusEncoder:
    return OpusEncoder(rate, bitrate=_ENCODER_BITRATE, complexity=_ENCODER_COMPLEXITY,
                       application="restricted-lowdelay")


_SILENCE_PACKETS: dict[int, bytes] = {}


def _silence_packet(rate: int) -> bytes:
    """The Opus packet for 20 ms of digital silence (CELT's 3-byte silence frame), made
    once per process by a throw-away encoder in its steady state."""
    packet = _SILENCE_PACKETS.get(rate)
    if packet is None:
        encoder = _opus_encoder(rate)
        zeros = np.zeros(rate // 50, np.int16)
        for _ in range(4):
            packet = encoder.encode(zeros)
        _SILENCE_PACKETS[rate] = packet
    return packet


class _OpusEncoder:
    """Mono Opus from 24 kHz PCM at 32 kbit/s, CELT low-delay, complexity 0: a fraction of
    aiortc's stereo 48 kHz 96 kbit/s complexity-10 encode behind a resampler (figures in
    docs/webrtc.md), and clean for a voice line (12 kHz audio bandwidth: the models' own).
    Packets carry the 48 kHz RTP clock whatever the input rate, as Opus wants.

    Silence costs nothing: a frame of zeros (nothing queued for playout: the assistant is
    not talking) is sent as a cached silence packet without running libopus, and the
    first frame after silence starts a fresh encoder, so its state matches what the
    browser's decoder just had (silence) instead of the speech before the pause."""

    def __init__(self, rate: int = SEND_RATE) -> None:
        self._encoder = _opus_encoder(rate)
        self._silence = _silence_packet(rate)
        self._after_silence = False
        self._pts = 0
        self.silent_frames = 0

    def encode(self, pcm: np.ndarray) -> list[av.Packet]:
        if not pcm.any():
            packet = av.Packet(self._silence)
            self._after_silence = True
            self.silent_frames += 1
        else:
            if self._after_silence:
                self._encoder.reset()
                self._after_silence = False
            packet = av.Packet(self._encoder.encode(pcm))
        packet.pts = self._pts  # the RTP clock runs at 48 kHz whatever the input rate
        packet.time_base = _TIME_BASE
        self._pts += FRAME_SAMPLES
        return [packet]


class _PacedTrack(MediaStreamTrack):
    """The outgoing track: every 20 ms on the call's own clock, pull one frame from the
    call and hand it to aiortc: an encoded Opus packet (fast) or raw PCM (stock)."""

    kind = "audio"

    def __init__(self, pull_audio: AudioOut, stats: PeerStats, *, encode: bool, rate: int = SEND_RATE) -> None:
        super().__init__()
        self._rate = rate
        self._silence = np.zeros(rate // 50, np.int16)
        self._pull = pull_audio
        self._stats = stats
        self._encoder = _OpusEncoder() if encode else None
        self._time_base = fractions.Fraction(1, rate)
        self._start: float | None = None
        self._n = 0

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._start is None:
            self._start = now
        due = self._start + self._n * _FRAME_SECONDS
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > _MAX_LAG_FRAMES * _FRAME_SECONDS:
            self._stats.resyncs += 1  # a stalled loop: drop the lag instead of bursting
            self._start = now - self._n * _FRAME_SECONDS
        try:
            pcm = self._pull()
        except Exception:
            self._stats.handler_errors += 1
            pcm = self._silence
        self._n += 1
        if self._encoder is not None:
            return self._encoder.encode(pcm)[0]  # one packet per frame, always
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._rate
        frame.time_base = self._time_base
        frame.pts = (self._n - 1) * len(pcm)
        return frame


# ---- the peer --------------------------------------------------------------------------------


def _opus_only(kind: str = "audio") -> list:
    return [c for c in RTCRtpSender.getCapabilities(kind).codecs if c.mimeType.lower() == "audio/opus"]


class WebRtcPeer:
    """One peer connection. `accept(offer)` returns the answer SDP; media and data start
    when the browser connects (`on_state("connected")`). Callbacks run on the loop."""

    SEND_RATE = SEND_RATE  # pull_audio's PCM

    @staticmethod
    def receive_rate(fast: bool) -> int:
        """on_audio's PCM rate: 16 kHz decoded directly on the fast path, aiortc's 48 kHz
        on the stock one."""
        return FAST_RECEIVE_RATE if fast else LINE_RATE

    def __init__(self, *, ice_servers: tuple[IceServer, ...], public_address: str | None, fast: bool,
                 on_audio: AudioIn, pull_audio: AudioOut, on_message: TextIn, on_state: StateChange) -> None:
        self.stats = PeerStats()
        self._fast = fast
        self._public_address = public_address
        self._on_audio = on_audio
        self._on_message = on_message
        self._on_state = on_state
        servers = [RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
                   for s in ice_servers]
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        self._track = _PacedTrack(pull_audio, self.stats, encode=fast)
        self._channel = None
        self._reader: asyncio.Task | None = None
        self._closing = Once()
        self._pc.on("connectionstatechange", self._state_changed)
        self._pc.on("datachannel", self._datachannel)
        self._pc.on("track", self._remote_track)

    async def accept(self, offer_sdp: str) -> str:
        """Take the browser's offer, return the answer (all host candidates included, so no
        trickle is needed). PeerFailed when aiortc refuses it; the caller closes."""
        transceiver = self._pc.addTransceiver("audio", direction="sendrecv")
        transceiver.setCodecPreferences(_opus_only())
        transceiver.sender.replaceTrack(self._track)
        if self._fast:
            _install_fast_receive(transceiver.receiver, self._on_audio, self.stats)
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            answer = await self._pc.createAnswer()
            await self._pc.setLocalDescription(answer)
        except PeerFailed:
            raise
        except Exception as exc:  # aiortc raises ValueError, OperationError, InvalidStateError...
            raise PeerFailed(f"the offer could not be taken ({type(exc).__name__}: {exc})") from None
        if transceiver.receiver.track is None or transceiver.mid is None:
            raise PeerFailed("the offer's audio section was not matched to the call's transceiver")
        sdp = self._pc.localDescription.sdp
        if self._public_address:
            sdp = announce_public_address(sdp, self._public_address)
        return sdp

    async def line_stats(self) -> LineStats | None:
        """The browser's stream as aiortc received it (getStats: no I/O, a few objects;
        the call polls it once a second, never per packet); None before any packet."""
        report = await self._pc.getStats()
        inbound = next((s for s in report.values() if s.type == "inbound-rtp"), None)
        if inbound is None:
            return None
        remote = next((s for s in report.values() if s.type == "remote-inbound-rtp"), None)
        rtt = getattr(remote, "roundTripTime", None)
        # aiortc reports jitter in RTP clock units (Opus: 48 kHz), not the seconds W3C names
        return LineStats(inbound.packetsReceived, max(0, inbound.packetsLost), 1000.0 * inbound.jitter / LINE_RATE,
                         None if rtt is None else 1000.0 * rtt)

    def send(self, text: str) -> bool:
        """Send on the data channel; False (nothing sent) while it is not open."""
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return False
        try:
            channel.send(text)
        except Exception:  # closing under us: the call is ending anyway
            return False
        return True

    async def close(self) -> None:
        """Close the peer connection (idempotent; concurrent callers share one close)."""
        await self._closing.run(self._close)

    async def _close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        try:
            await self._pc.close()
        except Exception:
            log.debug("peer close failed", exc_info=True)
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    # ---- aiortc's events --------------------------------------------------------------

    def _state_changed(self) -> None:
        self._on_state(self._pc.connectionState)

    def _datachannel(self, channel) -> None:
        if self._channel is not None:  # one channel per call; a second one is closed
            channel.close()
            return
        self._channel = channel
        channel.on("message", self._message)
        channel.on("open", lambda: self._on_state("channel-open"))
        if channel.readyState == "open":
            self._on_state("channel-open")

    def _message(self, message) -> None:
        if isinstance(message, str):
            self._on_message(message)

    def _remote_track(self, track) -> None:
        if track.kind == "audio" and not self._fast and self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(
                _read_stock(track, self._on_audio, self.stats), name="webrtc-reader")
