"""`MediaTicker`: one clock for every SIP call's audio in this process.

Why one ticker: measured here, one shared tick doing read/write for all calls cost a
quarter of the Python CPU of a task per call (docs/sip.md). It ticks every 10 ms, twice
per 20 ms frame: each call reads what arrived at every tick and writes when its next frame
is due. Reading at the frame rate alone let arrival jitter (the stack's receive clock is
not in phase with ours) starve an echo's playout for one frame now and then, and each
starved frame added 20 ms of echo delay for the rest of the call (measured: 40 -> 120 ms
within five seconds); reading twice per frame kept it flat. Ticks are scheduled on
absolute deadlines (`loop.call_at`), so they do not drift; a tick that runs late is
measured, and if it ran more than a whole period late the schedule restarts from now
(each call then skips the backlog itself: see SipCall._write and _feed).

One tick runs three phases over the calls: every call reads (its line audio is staged in
one `ResampleBatch`), the batch resamples all of it to 16 kHz at once; every call feeds its
session (what the agent plays is staged in a second batch), that batch resamples to each
line's rate at once; every call writes. Per call that is the order a call alone would take,
and the same samples (bridge/media/batch_resample.py); per tick it is one numpy product
per direction, rate pair and chunk size instead of one per call and chunk.

EVENT LOOP THREAD. The tick never awaits, never logs; a call that raises is counted and
dropped from the tick, so one broken call cannot stop the others' audio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from ..media.batch_resample import ResampleBatch
from .metrics import SipMetrics

__all__ = ["MediaTicker"]

log = logging.getLogger(__name__)

PERIOD = 0.01


class _Ticking(Protocol):
    def media_read(self, now: float, inbound: ResampleBatch) -> bool: ...
    def media_feed(self, now: float, inbound: ResampleBatch, outbound: ResampleBatch) -> None: ...
    def media_write(self, now: float, outbound: ResampleBatch) -> None: ...


class MediaTicker:
    def __init__(self, metrics: SipMetrics, period: float = PERIOD) -> None:
        self.metrics = metrics
        self.period = period
        self._calls: list[_Ticking] = []
        self._handle: asyncio.TimerHandle | None = None
        self._next = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.errors = 0
        self._inbound = ResampleBatch()  # kept from tick to tick: their staging arrays stay
        self._outbound = ResampleBatch()

    def add(self, call: _Ticking) -> None:
        self._calls.append(call)

    def remove(self, call: _Ticking) -> None:
        try:
            self._calls.remove(call)
        except ValueError:
            pass

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._next = self._loop.time() + self.period
        self._handle = self._loop.call_at(self._next, self._tick)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _failed(self, call: _Ticking) -> None:
        self.errors += 1
        self.remove(call)
        if self.errors == 1 or self.errors % 100 == 0:
            log.exception("media tick failed for a call (%d so far); its audio stops", self.errors)

    def _run(self, batch: ResampleBatch) -> bool:
        """Resample a phase's batch. It holds validated int16 only, so this does not fail;
        if it ever did, the tick's remaining phases are skipped (counted), not the ticker."""
        try:
            batch.run()
            return True
        except Exception:
            self.errors += 1
            return False

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self.metrics.tick_lateness.observe(max(0.0, now - self._next))
        t0 = time.perf_counter()
        inbound, outbound = self._inbound, self._outbound
        inbound.clear()
        outbound.clear()
        reading: list[_Ticking] = []
        for call in list(self._calls):
            try:
                if call.media_read(now, inbound):
                    reading.append(call)
            except Exception:
                self._failed(call)
        feeding: list[_Ticking] = []
        if self._run(inbound):
            for call in reading:
                try:
                    call.media_feed(now, inbound, outbound)
                    feeding.append(call)
                except Exception:
                    self._failed(call)
        if self._run(outbound):
            for call in feeding:
                try:
                    call.media_write(now, outbound)
                except Exception:
                    self._failed(call)
        self.metrics.tick_duration.observe(time.perf_counter() - t0)
        self._next += self.period
        if self._next <= now:  # more than a period late: restart the schedule from now
            self._next = now + self.period
        self._handle = loop.call_at(self._next, self._tick)
