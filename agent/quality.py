"""Line quality per call: packet loss, jitter and round-trip time as the transport's stack
measures them (RTCP), a MOS estimate (agent/emodel.py), frames the bridge concealed, and
dead air (no caller audio for `dead_air_seconds`).

One `LineQuality` rides on each `CallSession` (`session.line`). Who feeds it, and on which
path:
- the transport hands in the stack's figures as `LineStats`, off the media path: SIP when
  the stack reports an RTCP exchange (an event, every few seconds) and at the end; WebRTC
  through `set_source`, which `watch_lines` awaits once a second (aiortc's getStats), and
  once more before the peer closes;
- the transport (SIP: a frame missing at its instant) and the session (frames its clock
  found lost) count `concealed` frames;
- `frame()`, from `CallSession.feed`: the 20 ms path. Two reductions over 320 samples and
  a time stamp, nothing else: deciding about dead air waits for `tick()`.

`tick()` runs once a second for every live call (`watch_lines`, one task per process):
it polls the source and reports a stretch of dead air once, as the "dead-air" event and
`duplexline_line_dead_air_total`; the stretch ends when the caller is heard again. Dead air
is judged only while the call is answered and not on hold (`listen`/`pause`): a held
caller rightly sends nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

import numpy as np

from .emodel import mos
from .quality_metrics import QualityMetrics

__all__ = ["LineStats", "LineQuality", "watch_lines", "VOICE_PEAK", "PERIOD"]

log = logging.getLogger(__name__)

PERIOD = 1.0  # seconds between ticks
# A frame whose peak reaches this (about -44 dBFS) is caller audio: above the noise floor of
# a quiet line, far below speech. Silence from a phone or a muted browser stays under it.
VOICE_PEAK = 200

StatsSource = Callable[[], Awaitable["LineStats | None"]]
EventSink = Callable[[str, dict], None]


@dataclass(frozen=True)
class LineStats:
    """The caller's stream as the bridge's stack received it, in our units."""

    packets: int  # RTP packets received
    lost: int  # packets the sender sent that never arrived (sequence gaps)
    jitter_ms: float  # inter-arrival jitter (RFC 3550)
    rtt_ms: float | None = None  # RTCP round trip; None until one was measured

    @property
    def loss(self) -> float:
        expected = self.packets + self.lost
        return self.lost / expected if expected else 0.0


class LineQuality:
    def __init__(self, transport: str, metrics: QualityMetrics, emit: EventSink, *,
                 dead_air_seconds: float = 0.0) -> None:
        self.transport = transport
        self.stats: LineStats | None = None
        self.concealed = 0  # caller frames filled with silence because none arrived
        self.dead_air = 0  # stretches of dead air reported
        self.dead_air_seconds = dead_air_seconds  # 0: off
        self._metrics = metrics
        self._emit = emit
        self._source: StatsSource | None = None
        self._heard_at: float | None = None  # last caller audio; None: not listening
        self._silent = False  # inside a stretch of dead air already reported
        self._done = False

    # ---- the transport and the session --------------------------------------------------

    def set_source(self, source: StatsSource | None) -> None:
        """A coroutine function that reads the stack's figures; awaited once a second."""
        self._source = source

    def update(self, stats: LineStats) -> None:
        self.stats = stats

    def listen(self, now: float) -> None:
        """The call is answered (or resumed): dead air counts from `now` (with dead air
        off, nothing is watched: `frame` then costs nothing)."""
        self._heard_at = now if self.dead_air_seconds else None
        self._silent = False

    def pause(self) -> None:
        """On hold: no dead air until `listen` again."""
        self._heard_at = None

    def frame(self, pcm: np.ndarray, now: float) -> None:
        """One caller frame (the 20 ms path): is it audio?"""
        if self._heard_at is not None and (pcm.max() >= VOICE_PEAK or pcm.min() <= -VOICE_PEAK):
            self._heard_at = now
            self._silent = False

    # ---- once a second ---------------------------------------------------------------------

    async def tick(self, now: float) -> None:
        if self._done:
            return
        if self._source is not None:
            try:
                stats = await self._source()
            except Exception:  # a closing peer; the next tick or the end tries again
                log.debug("line stats failed", exc_info=True)
                stats = None
            if stats is not None and not self._done:
                self.stats = stats
        heard = self._heard_at
        if (self.dead_air_seconds and heard is not None and not self._silent
                and now - heard >= self.dead_air_seconds):
            self._silent = True
            self.dead_air += 1
            self._metrics.dead_air.labels(transport=self.transport).inc()
            self._emit("dead-air", {"seconds": round(now - heard, 1)})

    # ---- reading it ----------------------------------------------------------------------

    def summary(self, codec: str | None) -> dict:
        """The `quality` object of /calls/{id} and the CDR (docs/quality.md). Figures the
        stack never reported (no media) are null."""
        s = self.stats
        out: dict = {"packets": None, "packets_lost": None, "loss": None, "jitter_ms": None, "rtt_ms": None,
                     "mos": None, "concealed_frames": self.concealed, "dead_air": self.dead_air}
        if s is not None:
            out.update({"packets": s.packets, "packets_lost": s.lost, "loss": round(s.loss, 4),
                        "jitter_ms": round(s.jitter_ms, 1),
                        "rtt_ms": None if s.rtt_ms is None else round(s.rtt_ms, 1),
                        "mos": round(mos(s.rtt_ms or 0.0, s.jitter_ms, s.loss, codec), 2)})
        return out

    def finish(self, codec: str | None) -> dict:
        """The call ended: its summary, observed once in the metrics."""
        self._done = True
        self._source = None
        summary = self.summary(codec)
        m, t = self._metrics, self.transport
        m.concealed.labels(transport=t).inc(self.concealed)
        if summary["loss"] is not None:
            m.loss.labels(transport=t).observe(summary["loss"])
            m.jitter.labels(transport=t).observe(summary["jitter_ms"] / 1000)
            m.mos.labels(transport=t).observe(summary["mos"])
            if summary["rtt_ms"] is not None:
                m.rtt.labels(transport=t).observe(summary["rtt_ms"] / 1000)
        return summary


async def watch_lines(lines: Callable[[], Iterable[LineQuality]], clock: Callable[[], float],
                      period: float = PERIOD) -> None:
    """Tick every live call's line once per `period` until cancelled (one task per
    process, next to the media path, never on it)."""
    while True:
        await asyncio.sleep(period)
        now = clock()
        results = await asyncio.gather(*(line.tick(now) for line in lines()), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("line quality tick failed", exc_info=result)
