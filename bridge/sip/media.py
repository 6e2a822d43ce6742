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
(each call then skips the backlog itself: see SipCall.media_tick).

EVENT LOOP THREAD. The tick never awaits, never logs; a call that raises is counted and
dropped from the tick, so one broken call cannot stop the others' audio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from .metrics import SipMetrics

__all__ = ["MediaTicker"]

log = logging.getLogger(__name__)

PERIOD = 0.01


class _Ticking(Protocol):
    def media_tick(self, now: float) -> None: ...


class MediaTicker:
    def __init__(self, metrics: SipMetrics, period: float = PERIOD) -> None:
        self.metrics = metrics
        self.period = period
        self._calls: list[_Ticking] = []
        self._handle: asyncio.TimerHandle | None = None
        self._next = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.errors = 0

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

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self.metrics.tick_lateness.observe(max(0.0, now - self._next))
        t0 = time.perf_counter()
        for call in list(self._calls):
            try:
                call.media_tick(now)
            except Exception:
                self.errors += 1
                self.remove(call)
                if self.errors == 1 or self.errors % 100 == 0:
                    log.exception("media tick failed for a call (%d so far); its audio stops", self.errors)
        self.metrics.tick_duration.observe(time.perf_counter() - t0)
        self._next += self.period
        if self._next <= now:  # more than a period late: restart the schedule from now
            self._next = now + self.period
        self._handle = loop.call_at(self._next, self._tick)
