"""The engine: one model, a fixed number of session slots, one thread and one clock that
steps every live session together.

Model of operation
- One clock. The engine ticks once per chunk period; tick k's deadline is `t0 + k·period`.
  A session joins the clock once, when its audio starts (`EngineSession.align`): its
  first chunk is shortened (padded with leading silence) so that its chunks complete just
  before the engine's ticks, `grace` ahead of the deadline. Every later chunk completes one
  period after the previous one, so all sessions' chunks arrive together, and a frame
  that is up to `grace` late (network jitter) still makes its tick. While no session is on
  the clock its phase is free: the first session to align sets it, unpadded.
- A tick steps as soon as every session expected at it has sent its chunk, or at its
  deadline with those that have: a lone session on an idle engine never waits for a
  deadline (continuous batching's good part). A chunk whose tick has already been
  stepped (late beyond the grace, or sent after a stall) is stepped at once, batched with
  any other such chunk ("catch-up"); a session that misses two ticks stops holding the
  others back until it sends again.
- One tick, in order, all as batches on this thread and the model's device: the tokenizer
  over every audio chunk of the tick (`TickTokenizer`), then the LLM step for every
  session with a chunk of codes (`BatchStepper.step`), then the speech decoder over every
  stepped session's speech codes (`TickDecoder`, when the engine has one): a chunk's result
  carries its audio.
- A step computes only the rows that step: before each step the stepping sessions are
  moved into rows [0, m) (`_pack`; the stepper has one spare row for the moves), so rows
  computed == sessions stepped. In the steady state every session steps every tick and
  nothing moves.
- Admission (`open_session`) answers at once, on the caller's thread: a free slot, and a
  projected tick (tokenizer + LLM + decoder, from the measured cost of the rows actually
  computed)
  for one more session within `headroom` of the chunk period. The engine warms up at start
  at several batch sizes, so admission has measurements before the first call.
  Otherwise `EngineFull`.
- Deadlines: a chunk's result is due one chunk period after the chunk arrived; a later
  delivery is counted. A session's backlog is bounded: when `max_backlog` chunks wait,
  the oldest is answered with silence (counted as dropped).
- Session handles carry an id that is never reused: a handle used after close raises
  `StaleSession` instead of reaching the next caller.

Only the engine thread touches the stepper, the tokenizer streams and the rows ("ENGINE
THREAD" below); the clock, the queues and the session table are shared under `_cv`.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from .codec import DecoderStream, SpeechDecoder, SpeechTokenizer, TokenizerStream
from .codec_batcher import TickDecoder, TickTokenizer
from .config import SamplingConfig
from .engine_metrics import EngineMetrics
from .errors import EngineFull, StaleSession
from .futures import fail, resolve
from .omniflatten import BatchStepper, ChunkResult, OmniFlatten
from .worker_thread import WorkerThread

__all__ = ["Engine", "EngineSession", "EngineStats", "StepCosts"]

log = logging.getLogger(__name__)

GRACE = 0.05  # a chunk completes this long before its tick: 40 ms of jitter + handing over
WARMUP_TIMEOUT = 300.0  # start() waits this long for the warm-up at most


@dataclass
class _Pending:
    ids: list[int] | None  # a chunk of user speech ids, or
    pcm: np.ndarray | None  # a chunk of audio to tokenize first
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float
    tick: int | None  # the tick it belongs to; None: step as soon as possible


@dataclass
class _SessionState:
    prompt: tuple[int, ...]
    sampling: SamplingConfig | None
    queue: collections.deque = field(default_factory=collections.deque)
    on_clock: bool = False  # aligned and not paused: its chunks belong to ticks
    next_tick: int = 0  # the tick its next chunk belongs to (when on_clock)
    last_submit: float = -math.inf
    row: int | None = None  # ENGINE THREAD: assigned when the open command runs
    stream: TokenizerStream | None = None  # ENGINE THREAD
    voice: DecoderStream | None = None  # ENGINE THREAD
    voice_name: str | None = None  # the decoder's voice (None: its default)
    codes: collections.deque = field(default_factory=collections.deque)  # ENGINE THREAD


@dataclass(frozen=True)
class EngineStats:
    slots: int
    open_sessions: int
    steps: int
    missed_deadlines: int
    dropped_chunks: int
    rows_computed: int = 0  # rows of every LLM step, summed
    sessions_stepped: int = 0  # sessions of every LLM step, summed
    occupancy_sum: float = 0.0  # per step: sessions stepped / sessions live, summed
    catch_up_steps: int = 0  # steps of chunks that missed their tick

    @property
    def occupancy(self) -> float:
        """Mean over steps of sessions stepped / sessions live."""
        return self.occupancy_sum / self.steps if self.steps else 0.0

    @property
    def rows_per_session(self) -> float:
        """Rows computed / rows needed (1.0: nothing computed for nothing)."""
        return self.rows_computed / self.sessions_stepped if self.sessions_stepped else 0.0


class StepCosts:
    """Measured seconds of one batched pass by batch size (an EWMA per size), and a
    projection for sizes not measured: linear between measured neighbours, scaled linearly
    up from the largest smaller one (pessimistic on a GPU, where batching is nearly free).

    A size's figure is only refreshed by passes of that size, and admission keeps the
    engine from reaching a size it believes too slow: so a figure older than `max_age`
    seconds is forgotten (its size is projected from fresher ones, or admitted without
    data), or one slow warm-up on a busy machine would refuse that size for ever."""

    def __init__(self, alpha: float = 0.2, max_age: float = 30.0) -> None:
        self.alpha = alpha
        self.max_age = max_age
        self._seconds: dict[int, float] = {}
        self._when: dict[int, float] = {}

    def record(self, size: int, seconds: float) -> None:
        old = self._seconds.get(size)
        self._seconds[size] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        self._when[size] = time.monotonic()

    def project(self, size: int) -> float | None:
        now = time.monotonic()
        for stale in [b for b, t in self._when.items() if now - t > self.max_age]:
            del self._seconds[stale], self._when[stale]
        if size in self._seconds:
            return self._seconds[size]
        sizes = sorted(self._seconds)
        if not sizes:
            return None
        i = bisect.bisect_left(sizes, size)
        if i == len(sizes):
            b = sizes[-1]
            return self._seconds[b] * size / b
        hi = sizes[i]
        if i == 0:
            return self._seconds[hi]
        lo = sizes[i - 1]
        w = (size - lo) / (hi - lo)
        return (1 - w) * self._seconds[lo] + w * self._seconds[hi]

    def table(self) -> dict[int, float]:
        return dict(self._seconds)


class EngineSession:
    """One call's handle on the engine. Methods run on the asyncio side; `close()` frees
    the slot at once."""

    def __init__(self, engine: "Engine", session_id: int) -> None:
        self._engine = engine
        self.id = session_id
        self.closed = False

    def align(self, first_frame: float, frame_seconds: float = 0.02) -> int:
        """Put this session on the engine's clock, its audio having started with a frame
        that arrived at `first_frame` (time.monotonic()). Returns how many frames of
        silence lead its first chunk, which is `lead_frames` longer than a chunk (then
        `chunk frames + lead - that` real frames complete it just before a tick). Once
        per call start, and again after `pause()`."""
        return self._engine._align(self, first_frame, frame_seconds)

    def lead_frames(self, frame_seconds: float = 0.02) -> int:
        """Frames the first chunk of audio carries beyond a chunk: the tokenizer's
        look-ahead, rounded up to whole frames. With it every chunk's push completes its
        own codes, so the look-ahead costs a caller one frame, not a chunk period."""
        return self._engine.lead_frames(frame_seconds)

    def pause(self) -> None:
        """Off the clock (hold): the engine stops waiting for this session's chunks."""
        self._engine._pause(self.id)

    def submit(self, user_ids: Sequence[int]) -> asyncio.Future:
        """A chunk of user speech ids; the future gives its ChunkResult."""
        return self._engine._submit(self, list(user_ids), None)

    async def step(self, user_ids: Sequence[int]) -> ChunkResult:
        return await self.submit(user_ids)

    def submit_audio(self, pcm16k: np.ndarray) -> asyncio.Future:
        """A chunk of audio (float32 at the tokenizer's rate, one chunk period; the first
        after `align` `lead_frames` longer); the future gives the list of ChunkResults its
        codes completed (one; none for a first chunk sent without the lead)."""
        return self._engine._submit(self, None, np.asarray(pcm16k, dtype=np.float32))

    async def step_audio(self, pcm16k: np.ndarray) -> list[ChunkResult]:
        return await self.submit_audio(pcm16k)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._engine._close(self.id)


class Engine(WorkerThread):
    """close() (WorkerThread's) stops the thread; pending chunks fail with StaleSession.

    `clock=False` runs the old schedule (every chunk stepped as soon as possible, rows not
    packed per step): the benchmark's baseline, nothing else. `headroom=None` admits by
    free slots alone (benchmarks that must run N sessions whatever the step costs)."""

    def __init__(self, model: OmniFlatten, slots: int, *, tokenizer: SpeechTokenizer | None = None,
                 decoder: SpeechDecoder | None = None, registry: CollectorRegistry | None = None, headroom: float | None = 0.8,
                 max_backlog: int = 2, grace: float = GRACE, warmup: bool = True, clock: bool = True) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        if headroom is not None and not 0 < headroom <= 1:
            raise ValueError("headroom must be in (0, 1], or None to admit by slots alone")
        super().__init__("duplexline-engine")
        self.model = model
        self.period = model.config.chunk_seconds
        if not 0 <= grace < self.period:
            raise ValueError(f"grace must be in [0, {self.period}) seconds")
        self.headroom = headroom
        self.max_backlog = max(1, max_backlog)
        self.grace = grace
        self.clock = clock
        self._slots = slots
        self._stepper = BatchStepper(model, slots + 1)  # + one spare row for packing moves
        self._tokenizer = TickTokenizer(tokenizer) if tokenizer is not None else None
        self._decoder = TickDecoder(decoder) if decoder is not None else None
        self.metrics = EngineMetrics(registry)
        self.metrics.slots_total.set(slots)
        self.metrics.chunk_period.set(self.period)
        self._sessions: dict[int, _SessionState] = {}
        self._commands: list[tuple[str, int]] = []
        self._next_id = 1
        self._draining = False
        self.llm_costs = StepCosts()  # by rows computed
        self.tokenizer_costs = StepCosts()  # by streams pushed
        self.decoder_costs = StepCosts()  # by streams pushed
        self._warmup = warmup
        self._warmed = threading.Event()
        self._t0: float | None = None  # tick k's deadline is t0 + k * period
        self._tick = 0  # the next tick to step
        self._steps = self._missed = self._dropped = 0
        self._rows = self._stepped = self._catch_ups = 0
        self._occupancy = 0.0
        # Recent ticks, for benchmarks: (sessions in the batch, seconds of the tick's work, of
        # which the tokenizer's, the LLM step's, the decoder's)
        self.recent_ticks: collections.deque[tuple[int, float, float, float, float]] = collections.deque(
            maxlen=10000)
        self._silence = self._silent_result()

    # ---- lifecycle -------------------------------------------------------------------------

    def attach_tokenizer(self, tokenizer: SpeechTokenizer) -> None:
        """Give the engine its speech tokenizer (before start)."""
        if self._thread is not None:
            raise RuntimeError("attach the tokenizer before starting the engine")
        self._tokenizer = TickTokenizer(tokenizer)

    @property
    def tokenizer(self) -> SpeechTokenizer | None:
        return self._tokenizer.tokenizer if self._tokenizer is not None else None

    def attach_decoder(self, decoder: SpeechDecoder) -> None:
        """Give the engine its speech decoder (before start): results carry their audio."""
        if self._thread is not None:
            raise RuntimeError("attach the decoder before starting the engine")
        self._decoder = TickDecoder(decoder)

    @property
    def decoder(self) -> SpeechDecoder | None:
        return self._decoder.decoder if self._decoder is not None else None

    def start(self) -> "Engine":
        """Start the thread and wait for its warm-up (blocking: call it off the event loop)."""
        if self._start_thread():
            log.info("engine: %d slots on %s (%s), %.1f MiB of KV cache per slot, chunk period %.0f ms, "
                     "tokenizer %s, decoder %s", self.slots, self.model.device, self.model.config.dtype,
                     self.bytes_per_slot / 2**20, self.period * 1000,
                     "on the engine" if self._tokenizer is not None else "none",
                     type(self.decoder).__name__ if self._decoder is not None else "none")
            if not self._warmed.wait(WARMUP_TIMEOUT):
                log.warning("engine warm-up still running after %.0f s; serving anyway", WARMUP_TIMEOUT)
        return self

    def drain(self) -> None:
        """Refuse new sessions from now on; open ones go on."""
        with self._cv:
            self._draining = True

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def bytes_per_slot(self) -> int:
        return self._stepper.cache.bytes_per_slot

    def tick_p99(self, last: int = 500) -> float:
        """The 99th percentile of the last `last` ticks' seconds (0.0 before any): what a
        worker publishes for placement."""
        ticks = [t[1] for t in list(self.recent_ticks)[-last:]]
        return float(np.percentile(ticks, 99)) if ticks else 0.0

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(self._slots, len(self._sessions), self._steps, self._missed, self._dropped,
                               self._rows, self._stepped, self._occupancy, self._catch_ups)

    # ---- admission -------------------------------------------------------------------------

    def projected_step_seconds(self, batch: int) -> float | None:
        """A tick's time expected for `batch` sessions: the tokenizer's and the decoder's
        (when the engine has them) plus the LLM step's, from the measured cost of that many
        rows. None without data."""
        llm = self.llm_costs.project(batch)
        if llm is None:
            return None
        if self._tokenizer is not None:
            llm += self.tokenizer_costs.project(batch) or 0.0
        if self._decoder is not None:
            llm += self.decoder_costs.project(batch) or 0.0
        return llm

    def open_session(self, prompt: Sequence[int] = (), sampling: SamplingConfig | None = None,
                     voice: str | None = None) -> EngineSession:
        """Admit a session or raise EngineFull at once (refuse the call before answering).
        `voice`: the decoder's voice for its speech (ValueError if it has none such)."""
        if voice is not None:
            if self._decoder is None:
                raise ValueError(f"voice {voice!r} asked of an engine without a speech decoder")
            self._decoder.decoder.check_voice(voice)
        with self._cv:
            reason = None
            if self._draining or self._stopping:
                reason, detail = "draining", "the engine is draining"
            elif len(self._sessions) >= self._slots:
                reason, detail = "no_slot", f"all {self._slots} slots are in use"
            elif self.headroom is not None:
                projected = self.projected_step_seconds(len(self._sessions) + 1)
                if projected is not None and projected > self.headroom * self.period:
                    reason = "deadline"
                    detail = (f"a tick for {len(self._sessions) + 1} sessions is projected at "
                              f"{projected * 1000:.0f} ms, over {self.headroom:.0%} of the "
                              f"{self.period * 1000:.0f} ms chunk period")
            if reason is not None:
                self.metrics.refusals.labels(reason=reason).inc()
                raise EngineFull(reason, detail)
            sid = self._next_id
            self._next_id += 1
            self._sessions[sid] = _SessionState(tuple(prompt), sampling, voice_name=voice)
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
            pending = list(state.queue)
            state.queue.clear()
            self._cv.notify_all()
        for p in pending:
            p.loop.call_soon_threadsafe(fail, p.future, StaleSession(f"session {sid} was closed"))

    # ---- the clock (any thread, under _cv) -------------------------------------------------

    def _deadline(self, k: int) -> float:
        assert self._t0 is not None
        return self._t0 + k * self.period

    def lead_frames(self, frame_seconds: float = 0.02) -> int:
        """See `EngineSession.lead_frames`."""
        if self._tokenizer is None:
            return 0
        return self._tokenizer.tokenizer.lead_frames(frame_seconds)

    def _align(self, handle: EngineSession, first_frame: float, frame_seconds: float) -> int:
        frames = round(self.period / frame_seconds)
        if frames < 1 or abs(frames * frame_seconds - self.period) > 1e-9:
            raise ValueError(f"a chunk of {self.period} s is not a whole number of {frame_seconds} s frames")
        with self._cv:
            state = self._sessions.get(handle.id)
            if state is None or handle.closed:
                raise StaleSession(f"session {handle.id} is closed")
            if not self.clock:
                return self.lead_frames(frame_seconds)
            others = any(s.on_clock for sid, s in self._sessions.items() if sid != handle.id)
            if self._t0 is None or not others:
                # The clock's phase is free: a tick right after this session's first full chunk.
                self._t0 = first_frame + (frames - 1) * frame_seconds + self.grace - self._tick * self.period
                n, pad = self._tick, 0
            else:
                # The first tick whose chunk can end at or after this first frame, and as many
                # real frames as complete by `grace` before it; silence leads the rest.
                n = math.ceil((first_frame + self.grace - self._t0) / self.period - 1e-9)
                room = self._deadline(n) - self.grace - first_frame
                real = min(frames, int(math.floor(room / frame_seconds + 1e-9)) + 1)
                pad = frames - real
            state.on_clock = True
            state.next_tick = n
            self._cv.notify_all()
        return pad + self.lead_frames(frame_seconds)

    def _pause(self, sid: int) -> None:
        with self._cv:
            state = self._sessions.get(sid)
            if state is not None:
                state.on_clock = False
                self._cv.notify_all()

    # ---- submission (event loop thread) ----------------------------------------------------

    def _submit(self, handle: EngineSession, ids: list[int] | None, pcm: np.ndarray | None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if ids is not None and len(ids) != self.model.layout.user:
            raise ValueError(f"a chunk takes {self.model.layout.user} user tokens, got {len(ids)}")
        if pcm is not None and self._tokenizer is None:
            raise RuntimeError("this engine has no speech tokenizer: submit speech ids")
        dropped = None
        now = time.monotonic()
        with self._cv:
            state = self._sessions.get(handle.id)
            if state is None or handle.closed:
                raise StaleSession(f"session {handle.id} is closed")
            if len(state.queue) >= self.max_backlog:
                dropped = state.queue.popleft()
                self._dropped += 1
            tick = None
            if state.on_clock and self._t0 is not None:
                # Its tick: the next in its sequence, but never later than the first tick
                # whose deadline its arrival makes (after a burst, a session must not stay
                # a period behind; two of its chunks then share a tick: one catches up).
                fits = max(self._tick, math.ceil((now - self._t0) / self.period - 1e-9))
                n = min(state.next_tick, fits)
                if n >= self._tick:
                    tick = n  # on time: waits for its tick
                    state.next_tick = n + 1
                else:
                    state.next_tick = self._tick  # its tick is gone: catch up now, then on time again
            state.last_submit = now
            state.queue.append(_Pending(ids, pcm, fut, loop, now, tick))
            self._cv.notify_all()
        if dropped is not None:
            self.metrics.dropped_chunks.inc()
            resolve(dropped.future, self._silence if dropped.ids is not None else [self._silence])
        return fut

    def _silent_result(self) -> ChunkResult:
        lay, v = self.model.layout, self.model.vocab
        ids = (v.silent_text,) * lay.text + (v.silent_speech,) * lay.speech
        return ChunkResult(ids[:lay.text], (-1,) * lay.speech, ids, 0, dropped=True)

    # ---- choosing what steps (ENGINE THREAD, under _cv) ------------------------------------

    def _choose(self, now: float) -> tuple[list[tuple[int, _Pending]], bool, float | None]:
        """(batch, catch-up?, seconds to wait). The batch: each chosen session's oldest
        chunk, taken off its queue; empty: wait that long (None: until notified)."""
        k = self._tick
        due_now, of_tick = [], []
        for sid, s in self._sessions.items():
            if not s.queue:
                continue
            tick = s.queue[0].tick
            if tick is None or tick < k:
                due_now.append(sid)
            elif tick == k:
                of_tick.append(sid)
        tick_ready = False
        timeout: float | None = None
        if self._t0 is not None and (of_tick or any(s.on_clock for s in self._sessions.values())):
            deadline = self._deadline(k)
            waiting = any(s.on_clock and k - 1 <= s.next_tick <= k for s in self._sessions.values())
            if of_tick and (not waiting or now >= deadline):
                tick_ready = True
            elif now >= deadline:  # a tick nobody sent a chunk for: move on
                self._tick = max(k + 1, math.ceil((now - self._t0) / self.period - 1e-9))
                return self._choose(now)
            else:
                timeout = deadline - now
        chosen = due_now + (of_tick if tick_ready else [])
        if tick_ready:
            self._tick = max(k + 1, math.ceil((now - self._t0) / self.period - 1e-9))
        batch = [(sid, self._sessions[sid].queue.popleft()) for sid in chosen]
        return batch, bool(due_now) and not tick_ready, timeout

    # ---- the loop (ENGINE THREAD) ----------------------------------------------------------

    @torch.inference_mode()
    def _run(self) -> None:
        try:
            if self._warmup:
                self._warm_up()
        except Exception:
            log.exception("engine warm-up failed; admission learns from live steps instead")
        finally:
            self._warmed.set()
        rows: dict[int, int] = {}  # session id -> cache row
        while True:
            with self._cv:
                while True:
                    if self._stopping:
                        break
                    if self._commands:
                        commands, self._commands = self._commands, []
                        batch = None
                        break
                    commands = []
                    batch, catch_up, timeout = self._choose(time.monotonic())
                    if batch:
                        live = sum(1 for s in self._sessions.values()
                                   if s.last_submit > time.monotonic() - 2 * self.period)
                        break
                    self._cv.wait(timeout)
                if self._stopping:
                    break
            if commands:
                self._apply(commands, rows)
                continue
            self._tick_step(batch, rows, catch_up, max(live, 1))
        with self._cv:
            leftovers = [p for s in self._sessions.values() for p in s.queue]
        for p in leftovers:
            p.loop.call_soon_threadsafe(fail, p.future, StaleSession("the engine stopped"))

    def _apply(self, commands: list[tuple[str, int]], rows: dict[int, int]) -> None:
        stepper = self._stepper
        for kind, sid in commands:
            if kind == "open":
                with self._cv:
                    state = self._sessions.get(sid)
                if state is None:  # closed before it ever opened
                    continue
                row = next(r for r in range(stepper.slots) if not stepper.is_open(r))
                stepper.open(row, state.prompt, state.sampling)
                rows[sid] = row
                if self._tokenizer is not None:
                    state.stream = self._tokenizer.new_stream()
                if self._decoder is not None:
                    state.voice = self._decoder.new_stream(state.voice_name)
            else:
                row = rows.pop(sid, None)
                if row is not None:
                    stepper.close(row)

    def _pack(self, stepping: list[int], rows: dict[int, int]) -> None:
        """Move the stepping sessions into rows [0, m): a step computes rows [0, highest
        stepping row], so packed, it computes exactly the rows that step. A row in the
        way goes to a free row above m (the stepper has one spare, so one exists)."""
        m = len(stepping)
        wanted = set(stepping)
        outside = [sid for sid in stepping if rows[sid] >= m]
        if not outside:
            return
        stepper = self._stepper
        at = {r: sid for sid, r in rows.items()}
        holes = sorted((r for r in range(m) if at.get(r) not in wanted), key=lambda r: r in at)
        for sid, hole in zip(outside, holes):
            occupant = at.get(hole)
            if occupant is not None:
                free = next(r for r in range(m, stepper.slots) if not stepper.is_open(r))
                stepper.move(hole, free)
                rows[occupant] = free
                at[free] = occupant
            src = rows[sid]
            stepper.move(src, hole)
            del at[src]
            rows[sid] = hole
            at[hole] = sid

    def _tick_step(self, batch: list[tuple[int, _Pending]], rows: dict[int, int], catch_up: bool,
                   live: int) -> None:
        """Tokenize the batch's audio, step the LLM for every session with a chunk of codes
        (again while any has another), decode each step's speech, resolve every chunk."""
        t0 = time.perf_counter()
        lay, vocab = self.model.layout, self.model.vocab
        results: dict[int, list[ChunkResult]] = {sid: [] for sid, _ in batch}
        pending = dict(batch)
        with self._cv:
            states = {sid: self._sessions.get(sid) for sid, _ in batch}
        try:
            audio = [sid for sid, p in batch if p.pcm is not None and states[sid] is not None]
            tok_seconds = 0.0
            if audio:
                assert self._tokenizer is not None
                codes, tok_seconds = self._tokenizer.push([states[sid].stream for sid in audio],
                                                          [pending[sid].pcm for sid in audio])
                for sid, c in zip(audio, codes):
                    states[sid].codes.extend(int(x) for x in c)
                self.tokenizer_costs.record(len(audio), tok_seconds)
                self.metrics.tokenizer_seconds.observe(tok_seconds)
            work = {}
            for sid, p in batch:
                if sid not in rows:
                    continue
                if p.ids is not None:
                    work[sid] = p.ids
                elif states[sid] is not None and len(states[sid].codes) >= lay.user:
                    work[sid] = [vocab.speech_id(states[sid].codes.popleft()) for _ in range(lay.user)]
            llm_seconds = dec_seconds = 0.0
            first = True
            while work:
                if self.clock:
                    self._pack(sorted(work, key=lambda s: rows[s]), rows)
                out, report = self._stepper.step({rows[sid]: ids for sid, ids in work.items()})
                llm_seconds += report.seconds
                self.llm_costs.record(report.rows, report.seconds)
                self._record_step(report.rows, report.stepped, live, catch_up or not first)
                stepped = {sid: out[rows[sid]] for sid in work}
                if self._decoder is not None:
                    stepped, seconds = self._decode(stepped, states)
                    dec_seconds += seconds
                for sid, result in stepped.items():
                    results[sid].append(result)
                first = False
                work = {sid: [vocab.speech_id(states[sid].codes.popleft()) for _ in range(lay.user)]
                        for sid in audio if sid in rows and len(states[sid].codes) >= lay.user}
        except Exception as exc:  # a broken step must not kill the thread silently
            log.exception("engine step failed for %d sessions", len(batch))
            for p in pending.values():
                p.loop.call_soon_threadsafe(fail, p.future, exc)
            return
        seconds = time.perf_counter() - t0
        now = time.monotonic()
        missed = 0
        for sid, p in batch:
            if now - p.arrived > self.period:
                missed += 1
            value = results[sid] if p.pcm is not None else (results[sid][0] if results[sid] else self._silence)
            p.loop.call_soon_threadsafe(resolve, p.future, value)
        self.recent_ticks.append((len(batch), seconds, tok_seconds, llm_seconds, dec_seconds))
        m = self.metrics
        m.step_seconds.observe(seconds)
        if missed:
            m.missed_deadlines.inc(missed)
        with self._cv:
            self._missed += missed

    def _decode(self, stepped: dict[int, ChunkResult],
                states: dict[int, _SessionState | None]) -> tuple[dict[int, ChunkResult], float]:
        """The step's speech codes to audio, one batch; results with their audio."""
        voiced = [sid for sid in stepped if states[sid] is not None and states[sid].voice is not None]
        if not voiced:
            return stepped, 0.0
        pcms, seconds = self._decoder.push([states[sid].voice for sid in voiced],
                                           [np.asarray(stepped[sid].speech_codes, np.int64) for sid in voiced])
        self.decoder_costs.record(len(voiced), seconds)
        self.metrics.decoder_seconds.observe(seconds)
        out = dict(stepped)
        for sid, pcm in zip(voiced, pcms):
            out[sid] = dataclasses.replace(stepped[sid], pcm=pcm)
        return out, seconds

    def _record_step(self, rows: int, stepped: int, live: int, catch_up: bool) -> None:
        m = self.metrics
        m.batch_size.observe(stepped)
        m.rows_computed.inc(rows)
        m.rows_stepped.inc(stepped)
        occupancy = min(1.0, stepped / live)
        m.occupancy.observe(occupancy)
        if catch_up:
            m.catch_up_steps.inc()
        lay = self.model.layout
        m.tokens.labels(stream="text").inc(stepped * lay.text)
        m.tokens.labels(stream="speech").inc(stepped * lay.speech)
        with self._cv:
            self._steps += 1
            self._rows += rows
            self._stepped += stepped
            self._occupancy += occupancy
            self._catch_ups += int(catch_up)

    # ---- warm-up (ENGINE THREAD, before the loop) ------------------------------------------

    def _warm_up(self) -> None:
        """Measure the tick at batch sizes 1, 2, 4, ... up to the slots (stopping once a size
        no longer fits the period: admission refuses beyond it anyway), so admission has
        data before the first call, and the first call does not pay for cold caches."""
        t_start = time.perf_counter()
        sizes = sorted({min(1 << i, self._slots) for i in range(self._slots.bit_length() + 1)})
        stepper, lay, vocab = self._stepper, self.model.layout, self.model.vocab
        chunk = [vocab.silent_speech] * lay.user
        tok_times: dict[int, float] = {}
        if self._tokenizer is not None:
            chunk_samples = round(self.period * self._tokenizer.tokenizer.sample_rate)
            # The tokenizer first (its cost can cap the sizes), then the LLM at those sizes.
            try:
                for b in sizes:
                    tok_times[b] = self._tokenizer.warm_up(b, chunk_samples)
                    if tok_times[b] > self.period:
                        sizes = [s for s in sizes if s <= b]
                        break
            finally:
                self._tokenizer.end_warm_up()
        dec_times: dict[int, float] = {}
        if self._decoder is not None:
            try:
                for b in sizes:
                    dec_times[b] = self._decoder.warm_up(b, lay.speech)
                    if tok_times.get(b, 0.0) + dec_times[b] > self.period:
                        sizes = [s for s in sizes if s <= b]
                        break
            finally:
                self._decoder.end_warm_up()
        measured = []
        for b in sizes:
            for r in range(b):
                stepper.open(r)
            try:
                times = []
                for i in range(3):
                    _, report = stepper.step({r: chunk for r in range(b)})
                    if i:
                        times.append(report.seconds)
            finally:
                for r in range(b):
                    stepper.close(r)
            for t in times:
                self.llm_costs.record(b, t)
            if b in tok_times:
                self.tokenizer_costs.record(b, tok_times[b])
            if b in dec_times:
                self.decoder_costs.record(b, dec_times[b])
            total = self.projected_step_seconds(b) or 0.0
            measured.append(f"{b}: {total * 1000:.0f}")
            if total > self.period:
                break
        log.info("engine warm-up in %.1f s: tick ms by batch size (%s) %s; admission keeps a tick "
                 "within %s", time.perf_counter() - t_start, " + ".join(["tokenizer"] * bool(tok_times) + ["LLM"] + ["decoder"] * bool(dec_times)),
                 ", ".join(measured), f"{self.headroom * self.period * 1000:.0f} ms" if self.headroom else
                 "the slots (no deadline)")

