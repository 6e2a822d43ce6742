"""The agents a call can talk to, behind one small interface (`--agent`):

- `echo`: plays the caller's audio straight back, for line tests and latency measurement;
- `omniflatten`: the full-duplex model. Caller frames are cut into chunks of the model's
  chunk period, aligned once, when the audio starts, to the engine's clock (the first
  chunk is led by silence so that every chunk completes just before an engine tick, with
  every other call's), handed to the shared engine, which tokenizes (S3) and steps every
  call's chunk of one tick as one batch on its thread and device, and the assistant's
  speech codes decoded on a small thread pool and played: the event loop only moves
  buffers. Caller frames lost upstream (a stall the transport skipped) are replaced by
  silence (`lost`), so the chunks stay on the engine's clock.

Barge-in: the model has no interruption token; it stops talking. When a chunk starts with
silent speech right after a chunk that ended in speech, the assistant was cut off, so what
the caller has not heard yet is flushed at once. A chunk that ends its speech with
silence is a natural end of turn and is played out.

Time to first audio (`duplexline_agent_first_audio_seconds`): from the arrival of the
caller's last frame with speech in it (peak above SPEECH_PEAK, heard while the assistant
was not talking) to when the assistant's next reply starts playing: after the audio
already queued ahead of it, at the reply's first speech code.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import gc
import logging
import time
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

from model.codec import SpeechDecoder, SpeechTokenizer
from model.engine import Engine, EngineSession
from model.errors import EngineFull, StaleSession as EngineStale

from .call import FRAME_RATE, FRAME_SAMPLES, AudioSink, CallInfo, CallRefused
from .metrics import AgentMetrics

__all__ = ["Agent", "AgentSession", "EchoAgent", "OmniFlattenAgent", "Emit"]

log = logging.getLogger(__name__)

Emit = Callable[[str, dict], None]  # (event kind, data): to the transport and the store

# A caller frame whose peak passes this (-30 dBFS) holds speech; line noise and comfort
# noise stay well below. Cheap enough for every frame; the model itself needs no VAD.
SPEECH_PEAK = 1000
_MAX_PENDING = 3  # chunks whose results the session has not taken up yet


class AgentSession(ABC):
    """One call's conversation partner. Methods run on the event loop and never block."""

    @abstractmethod
    def feed(self, frame: np.ndarray) -> None:
        """One 20 ms frame of caller audio: int16 [320] at 16 kHz."""

    def set_hold(self, on: bool) -> None:
        """On hold: no frames are stepped and nothing is played until resumed."""

    def dtmf(self, digit: str) -> None:
        """A keypad digit from the caller."""

    def lost(self, frames: int) -> None:
        """`frames` caller frames were lost upstream (never arrived): the call's clock
        moved on without them."""

    @abstractmethod
    async def close(self) -> None:
        """Release what the session holds (its engine slot). Idempotent."""


class Agent(ABC):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def drain(self) -> None:
        """Refuse new sessions from now on."""

    @property
    def ready(self) -> bool:
        return True

    def describe(self) -> dict:
        return {"agent": self.name}

    @abstractmethod
    def open(self, info: CallInfo, sink: AudioSink, emit: Emit) -> AgentSession:
        """Admit a call or raise CallRefused at once, before it is answered."""


class _EchoSession(AgentSession):
    def __init__(self, sink: AudioSink) -> None:
        self._sink = sink
        self._hold = False

    def feed(self, frame: np.ndarray) -> None:
        if not self._hold:
            self._sink.play(frame, FRAME_RATE)  # int16 as it came: the sink takes PCM16 too

    def set_hold(self, on: bool) -> None:
        self._hold = on
        if on:
            self._sink.flush()

    async def close(self) -> None:
        return None


class EchoAgent(Agent):
    name = "echo"

    def open(self, info: CallInfo, sink: AudioSink, emit: Emit) -> AgentSession:
        return _EchoSession(sink)


class _OmniFlattenSession(AgentSession):
    def __init__(self, agent: "OmniFlattenAgent", engine_session: EngineSession, sink: AudioSink,
                 emit: Emit, transport: str) -> None:
        self._agent = agent
        self._first_audio = agent.metrics.first_audio.labels(transport=transport)
        self._caller_spoke_at: float | None = None  # the caller's latest speech frame; None once answered
        self._engine_session = engine_session
        self._sink = sink
        self._emit = emit
        self._dec = agent.decoder.new_stream()
        model = agent.engine.model
        self._vocab = model.vocab
        self._layout = model.layout
        self._chunk_samples = int(round(model.config.chunk_seconds * FRAME_RATE))
        # The first chunk after aligning also carries the tokenizer's look-ahead, so that
        # each chunk's codes are final when it arrives.
        lead = engine_session.lead_frames(FRAME_SAMPLES / FRAME_RATE) * FRAME_SAMPLES
        self._buf = np.zeros(self._chunk_samples + lead, dtype=np.float32)
        self._target = self._chunk_samples  # samples that complete the chunk being filled
        self._fill = 0
        self._aligned = False  # on the engine's clock (from the first frame after start/resume)
        # Chunks handed to the engine, oldest first: (future of its results, chunk end).
        self._pending: collections.deque[tuple[asyncio.Future, float]] = collections.deque()
        self._wake = asyncio.Event()
        self._hold = False
        self._speaking = False
        self._last_code_speech = False
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="omniflatten-session")

    def feed(self, frame: np.ndarray) -> None:
        if self._hold or self._closed:
            return
        # Caller speech while the assistant talks (a backchannel, an echo on the line) does
        # not wait for a reply; once it has gone quiet, the caller's turn is what it answers.
        if not self._speaking and max(int(frame.max()), -int(frame.min())) > SPEECH_PEAK:
            self._caller_spoke_at = time.monotonic()
        self._push(frame * (1.0 / 32768.0))

    def lost(self, frames: int) -> None:
        """Silence in place of lost frames keeps the chunks on the engine's clock; a gap
        longer than two chunks is not worth replaying: join the clock afresh instead."""
        if self._hold or self._closed or not self._aligned or frames <= 0:
            return
        if frames * FRAME_SAMPLES > 2 * self._chunk_samples:
            self._engine_session.pause()
            self._aligned = False
            self._fill = 0
            return
        silence = np.zeros(FRAME_SAMPLES, np.float32)
        for _ in range(frames):
            self._push(silence)

    def _push(self, samples: np.ndarray) -> None:
        if not self._aligned:
            # The first chunk: leading silence so that it, and every chunk after it,
            # completes just before one of the engine's ticks.
            try:
                pad = self._engine_session.align(time.monotonic(), FRAME_SAMPLES / FRAME_RATE)
            except EngineStale:
                return  # the engine closed the session: the call goes on in silence
            self._fill = pad * FRAME_SAMPLES
            self._buf[:self._fill] = 0.0
            self._target = len(self._buf)
            self._aligned = True
        n = len(samples)
        take = min(n, self._target - self._fill)
        self._buf[self._fill:self._fill + take] = samples[:take]
        self._fill += take
        if self._fill < self._target:
            return
        chunk, self._fill = self._buf[:self._target].copy(), 0
        self._target = self._chunk_samples
        if take < n:
            rest = samples[take:]
            self._buf[:len(rest)] = rest
            self._fill = len(rest)
        try:
            fut = self._engine_session.submit_audio(chunk)
        except EngineStale:
            return
        if len(self._pending) >= _MAX_PENDING:  # results not taken up: drop the oldest
            old, _ = self._pending.popleft()
            old.cancel()
            self._agent.metrics.dropped_frames.labels(reason="backlog").inc(self._chunk_samples // FRAME_SAMPLES)
        self._pending.append((fut, time.monotonic()))
        self._wake.set()

    def set_hold(self, on: bool) -> None:
        self._hold = on
        self._fill = 0
        if on:
            self._engine_session.pause()
            self._aligned = False
            self._sink.flush()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pool = self._agent.pool
        m = self._agent.metrics
        try:
            while True:
                while not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                fut, t_end = self._pending[0]
                try:
                    results = await fut
                except asyncio.CancelledError:
                    if fut.cancelled() and not self._closed:
                        continue  # dropped as backlog
                    raise
                finally:
                    if self._pending and self._pending[0][0] is fut:
                        self._pending.popleft()
                m.chunk_step.observe(time.monotonic() - t_end)
                for result in results:
                    speech = np.asarray(result.speech_codes, dtype=np.int64)
                    pcm = await loop.run_in_executor(pool, self._dec.push, speech)
                    self._play(result, speech, pcm, t_end)
        except (asyncio.CancelledError, EngineStale):
            return
        except Exception:
            log.exception("omniflatten session failed; the call goes on in silence")
            m.session_errors.labels(stage="pipeline").inc()
            self._emit("error", {"stage": "pipeline"})

    def _play(self, result, speech: np.ndarray, pcm: np.ndarray, t_end: float) -> None:
        m = self._agent.metrics
        if self._hold or self._closed:
            return
        starts_silent = len(speech) > 0 and speech[0] < 0
        if self._last_code_speech and starts_silent:
            t0 = time.monotonic()
            dropped = self._sink.flush()
            m.bargein_flush.observe(time.monotonic() - t0)
            m.bargeins.inc()
            self._emit("barge-in", {"flushed_ms": round(dropped, 1)})
        queued_ahead = self._sink.depth_ms / 1000.0
        self._sink.play(pcm, self._agent.decoder.sample_rate)
        now = time.monotonic()
        response = now - t_end
        m.response.observe(response)
        m.playout_depth.observe(self._sink.depth_ms / 1000.0)
        is_speech = speech >= 0
        speaking = bool(is_speech.any())
        first_audio_ms = None
        if speaking and not self._speaking and self._caller_spoke_at is not None:
            # The reply starts once the audio queued ahead of it has played, at its first
            # speech code within this chunk.
            lead = int(np.argmax(is_speech)) / len(speech) * len(pcm) / self._agent.decoder.sample_rate
            first_audio = max(0.0, now + queued_ahead + lead - self._caller_spoke_at)
            self._first_audio.observe(first_audio)
            first_audio_ms = round(first_audio * 1000, 1)
            self._caller_spoke_at = None
        if speaking != self._speaking:
            self._speaking = speaking
            self._emit("turn", {"assistant": "speaking" if speaking else "listening"})
        self._last_code_speech = len(speech) > 0 and bool(is_speech[-1])
        text = [t for t in result.text_ids if t != self._vocab.silent_text]
        if text:
            self._emit("text", {"ids": text, "text": self._agent.detokenize(text)})
        latency = {"response_ms": round(response * 1000, 1), "dropped": bool(result.dropped)}
        if first_audio_ms is not None:
            latency["first_audio_ms"] = first_audio_ms
        self._emit("latency", latency)

    def dtmf(self, digit: str) -> None:
        pass  # the model takes no keypad input; the event is logged and stored by the session

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        for fut, _ in self._pending:
            fut.cancel()
        self._pending.clear()
        self._engine_session.close()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


class OmniFlattenAgent(Agent):
    name = "omniflatten"

    def __init__(self, engine: Engine, tokenizer: SpeechTokenizer, decoder: SpeechDecoder,
                 metrics: AgentMetrics, *, detokenize: Callable[[list[int]], str] | None = None,
                 threads: int = 2) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.metrics = metrics
        self.detokenize = detokenize or (lambda ids: "".join(f"⟨{i}⟩" for i in ids))
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="duplexline-codec")
        if engine.tokenizer is None:
            engine.attach_tokenizer(tokenizer)  # the engine tokenizes every tick's audio as one batch
        elif engine.tokenizer is not tokenizer:
            raise ValueError("the engine already has another speech tokenizer")

    async def start(self) -> None:
        # The engine warms up at start (measuring its tick at several batch sizes, so that
        # admission has data before the first call): off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, self.engine.start)
        # Then the start-up heap (torch, transformers, the model: ~400k objects) leaves the
        # garbage collector's view. A full collection walks every tracked object holding
        # the GIL; measured here, one during eight live calls stalled the whole process for
        # 0.2 s idle and 1.3 s on a busy machine, and the SIP leg skipped every call's audio
        # for that long. Frozen objects are never scanned again; what calls create still is.
        gc.collect()
        gc.freeze()

    async def close(self) -> None:
        self.engine.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def drain(self) -> None:
        self.engine.drain()

    def describe(self) -> dict:
        stats = self.engine.stats()
        return {"agent": self.name, "slots": stats.slots, "sessions": stats.open_sessions,
                "device": str(self.engine.model.device)}

    def open(self, info: CallInfo, sink: AudioSink, emit: Emit) -> AgentSession:
        try:
            engine_session = self.engine.open_session()
        except EngineFull as exc:
            if exc.reason == "draining":
                raise CallRefused(503, "Service Unavailable (draining)", retry_after=30) from None
            raise CallRefused(486, f"Busy Here ({exc.reason})") from None
        return _OmniFlattenSession(self, engine_session, sink, emit, str(info.transport))
