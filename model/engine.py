"""The engine: one model, a fixed number of session slots, and one thread that steps
every ready session together.

Model of operation
- Every session sends one user chunk per chunk period. The engine thread runs a
  continuous batching loop: whenever chunks are waiting, it steps all sessions that have
  one as one batch (`BatchStepper.step`); chunks that arrive during a step join the next.
  Under load the batch fills up by itself; when idle a lone chunk is stepped at once.
- Live sessions occupy rows [0, open) of the cache: closing a session moves the highest
  row into the hole, so a step computes only as many rows as there are open sessions.
  Only the engine thread touches the stepper ("ENGINE THREAD" below).
- Admission (`open_session`) answers at once, on the caller's thread: a free slot, and a
  projected step time for one more session within `headroom` of the chunk period
  (projected from step times measured at the nearest batch size). Otherwise `EngineFull`.
- Deadlines: a chunk's result is due one chunk period after the chunk arrived; a later
  delivery is counted. A session's backlog is bounded: when `max_backlog` chunks wait,
  the oldest is answered with silence (counted as dropped), so audio stays continuous and
  nothing piles up behind a slow step.
- Session handles carry an id that is never reused: a handle used after close raises
  `StaleSession` instead of reaching the next caller.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from prometheus_client import CollectorRegistry

from .config import SamplingConfig
from .engine_metrics import EngineMetrics
from .errors import EngineFull, StaleSession
from .futures import fail, resolve
from .omniflatten import BatchStepper, ChunkResult, OmniFlatten
from .worker_thread import WorkerThread

__all__ = ["Engine", "EngineSession", "EngineStats"]

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    ids: list[int]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float


@dataclass
class _SessionState:
    prompt: tuple[int, ...]
    sampling: SamplingConfig | None
    queue: collections.deque = field(default_factory=collections.deque)
    row: int | None = None  # ENGINE THREAD: assigned when the open command runs


@dataclass(frozen=True)
class EngineStats:
    slots: int
    open_sessions: int
    steps: int
    missed_deadlines: int
    dropped_chunks: int


class EngineSession:
    """One call's handle on the engine. `step()` from the asyncio side; `close()` frees the
    slot at once."""

    def __init__(self, engine: "Engine", session_id: int) -> None:
        self._engine = engine
        self.id = session_id
        self.closed = False

    async def step(self, user_ids: Sequence[int]) -> ChunkResult:
        return await self._engine._submit(self, list(user_ids))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._engine._close(self.id)


class Engine(WorkerThread):
    """close() (WorkerThread's) stops the thread; pending chunks fail with StaleSession."""

    def __init__(self, model: OmniFlatten, slots: int, *, registry: CollectorRegistry | None = None,
                 headroom: float = 0.8, max_backlog: int = 2) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        if not 0 < headroom <= 1:
            raise ValueError("headroom must be in (0, 1]")
        super().__init__("duplexline-engine")
        self.model = model
        self.period = model.config.chunk_seconds
        self.headroom = headroom
        self.max_backlog = max(1, max_backlog)
        self._stepper = BatchStepper(model, slots)
        self.metrics = EngineMetrics(registry)
        self.metrics.slots_total.set(slots)
        self.metrics.chunk_period.set(self.period)
        self._sessions: dict[int, _SessionState] = {}
        self._commands: list[tuple[str, int]] = []
        self._next_id = 1
        self._draining = False
        self._step_time: dict[int, float] = {}  # batch-size bucket -> EWMA of step seconds
        self._steps = self._missed = self._dropped = 0
        self._silence = self._silent_result()

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._start_thread():
            log.info("engine: %d slots on %s (%s), %.1f MiB of KV cache per slot, chunk period %.0f ms",
                     self._stepper.slots, self.model.device, self.model.config.dtype,
                     self._stepper.cache.bytes_per_slot / 2**20, self.period * 1000)
        return self

    def drain(self) -> None:
        """Refuse new sessions from now on; open ones go on."""
        with self._cv:
            self._draining = True

    @property
    def slots(self) -> int:
        return self._stepper.slots

    @property
    def bytes_per_slot(self) -> int:
        return self._stepper.cache.bytes_per_slot

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(self._stepper.slots, len(self._sessions), self._steps, self._missed, self._dropped)

    # ---- admission -------------------------------------------------------------------------

    def projected_step_seconds(self, batch: int) -> float | None:
        """Step time expected for `batch` sessions, from the nearest measured batch size
        (scaled linearly up from a smaller one: pessimistic on a GPU). None without data."""
        bucket = 1 << max(0, math.ceil(math.log2(max(batch, 1))))
        if bucket in self._step_time:
            return self._step_time[bucket]
        smaller = [b for b in self._step_time if b < bucket]
        if not smaller:
            return None
        b = max(smaller)
        return self._step_time[b] * bucket / b

    def open_session(self, prompt: Sequence[int] = (), sampling: SamplingConfig | None = None) -> EngineSession:
        """Admit a session or raise EngineFull at once (refuse the call before answering)."""
        with self._cv:
            reason = None
            if self._draining or self._stopping:
                reason, detail = "draining", "the engine is draining"
            elif len(self._sessions) >= self._stepper.slots:
                reason, detail = "no_slot", f"all {self._stepper.slots} slots are in use"
            else:
                projected = self.projected_step_seconds(len(self._sessions) + 1)
                if projected is not None and projected > self.headroom * self.period:
                    reason = "deadline"
                    detail = (f"a step for {len(self._sessions) + 1} sessions is projected at "
                              f"{projected * 1000:.0f} ms, over {self.headroom:.0%} of the "
                              f"{self.period * 1000:.0f} ms chunk period")
            if reason is not None:
                self.metrics.refusals.labels(reason=reason).inc()
                raise EngineFull(reason, detail)
            sid = self._next_id
            self._next_id += 1
            self._sessions[sid] = _SessionState(tuple(prompt), sampling)
            self._commands.append(("open", sid))
            self.metrics.slots_used.set(len(self._sessions))
            self._cv.notify_all()
        return EngineSession(self, sid)

    def _close(self, sid: int) -> None:
        with self._cv:
            state = self._sessions.pop(sid, None)
            if state is None:
                return
            self._commands.append(("close", sid))
            self.metrics.slots_used.set(len(self._sessions))
            self._cv.notify_all()
        for p in state.queue:
            p.loop.call_soon_threadsafe(fail, p.future, StaleSession(f"session {sid} was closed"))
        state.queue.clear()

    # ---- submission (event loop thread) ----------------------------------------------------

    async def _submit(self, handle: EngineSession, ids: list[int]) -> ChunkResult:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        dropped = None
        with self._cv:
            state = self._sessions.get(handle.id)
            if state is None or handle.closed:
                raise StaleSession(f"session {handle.id} is closed")
            if len(ids) != self.model.layout.user:
                raise ValueError(f"a chunk takes {self.model.layout.user} user tokens, got {len(ids)}")
            if len(state.queue) >= self.max_backlog:
                dropped = state.queue.popleft()
                self._dropped += 1
            state.queue.append(_Pending(ids, fut, loop, time.monotonic()))
            self._cv.notify_all()
        if dropped is not None:
            self.metrics.dropped_chunks.inc()
            dropped.future.set_result(self._silence)
        return await fut

    def _silent_result(self) -> ChunkResult:
        lay, v = self.model.layout, self.model.vocab
        ids = (v.silent_text,) * lay.text + (v.silent_speech,) * lay.speech
        return ChunkResult(ids[:lay.text], (-1,) * lay.speech, ids, 0, dropped=True)

    # ---- the loop (ENGINE THREAD) ----------------------------------------------------------

    def _apply(self, commands: list[tuple[str, int]], rows: dict[int, int]) -> None:
        stepper = self._stepper
        for kind, sid in commands:
            if kind == "open":
                with self._cv:
                    state = self._sessions.get(sid)
                if state is None:  # closed before it ever opened
                    continue
                row = len(rows)
                stepper.open(row, state.prompt, state.sampling)
                rows[sid] = row
            else:
                row = rows.pop(sid, None)
                if row is None:
                    continue
                stepper.close(row)
                last = len(rows)  # pack: move the highest row into the hole
                if row != last:
                    mover = next(s for s, r in rows.items() if r == last)
                    stepper.move(last, row)
                    rows[mover] = row

    @torch.inference_mode()
    def _run(self) -> None:
        rows: dict[int, int] = {}  # session id -> cache row
        while True:
            with self._cv:
                while not self._stopping and not self._commands and not any(
                        s.queue for s in self._sessions.values()):
                    self._cv.wait()
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
            self._apply(commands, rows)
            with self._cv:
                work = {sid: s.queue.popleft() for sid, s in self._sessions.items()
                        if s.queue and sid in rows}
            if not work:
                continue
            try:
                results, report = self._stepper.step({rows[sid]: p.ids for sid, p in work.items()})
            except Exception as exc:  # a broken step must not kill the thread silently
                log.exception("engine step failed for %d sessions", len(work))
                for p in work.values():
                    p.loop.call_soon_threadsafe(fail, p.future, exc)
                continue
            now = time.monotonic()
            missed = 0
            for sid, p in work.items():
                if now - p.arrived > self.period:
                    missed += 1
                p.loop.call_soon_threadsafe(resolve, p.future, results[rows[sid]])
            self._record(report.stepped, report.seconds, missed)
        with self._cv:
            leftovers = [p for s in self._sessions.values() for p in s.queue]
        for p in leftovers:
            p.loop.call_soon_threadsafe(fail, p.future, StaleSession("the engine stopped"))

    def _record(self, batch: int, seconds: float, missed: int) -> None:
        m = self.metrics
        m.step_seconds.observe(seconds)
        m.batch_size.observe(batch)
        lay = self.model.layout
        m.tokens.labels(stream="text").inc(batch * lay.text)
        m.tokens.labels(stream="speech").inc(batch * lay.speech)
        if missed:
            m.missed_deadlines.inc(missed)
        bucket = 1 << max(0, math.ceil(math.log2(batch)))
        old = self._step_time.get(bucket)
        self._step_time[bucket] = seconds if old is None else 0.8 * old + 0.2 * seconds
        with self._cv:
            self._steps += 1
            self._missed += missed

