"""The agents a call can talk to, behind one small interface (`--agent`):

- `echo`: plays the caller's audio straight back, for line tests and latency measurement;
- `omniflatten`: the full-duplex model. Caller frames are cut into chunks of the model's
  chunk period, aligned once, when the audio starts, to the engine's clock (the first
  chunk is led by silence so that every chunk completes just before an engine tick, with
  every other call's), handed to the shared engine through a `VoiceEngine` (model/voice.py:
  in this process, or on a worker over the network), which tokenizes (S3) and steps every
  call's chunk of one tick as one batch and decodes the assistant's speech; the audio is
  played as it comes back: the event loop only moves buffers. When a remote engine's
  worker is lost the session moves to another (`rehomed`: it aligns afresh) or, with no
  room anywhere, the call ends (`worker-lost`). Caller frames lost upstream (a stall the transport skipped) are replaced by
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
import gc
import logging
import time
from abc import ABC, abstractmethod
from typing import Any, Awaitable, Callable, Mapping

import numpy as np

from model.codec import DEFAULT_VOICE
from model.errors import EngineFull, StaleSession as EngineStale
from model.voice import Rehomed, VoiceEngine, VoiceSession

from .call import FRAME_RATE, FRAME_SAMPLES, AudioSink, CallInfo, CallRefused
from .metrics import AgentMetrics

__all__ = ["Agent", "AgentSession", "EchoAgent", "OmniFlattenAgent", "Emit"]

log = logging.getLogger(__name__)

Emit = Callable[[str, dict], None]  # (event kind, data): to the transport and the store
Hangup = Callable[[str], Awaitable[None]]  # (reason): end the call from our side

# A caller frame whose peak passes this (-30 dBFS) holds speech; line noise and comfort
# noise stay well below. Cheap enough for every frame; the model itself needs no VAD.
SPEECH_PEAK = 1000
_MAX_PENDING = 3  # chunks whose results the session has not taken up yet


class AgentSession(ABC):
    """One call's conversation partner. Methods run on the event loop and never block."""

    worker: str | None = None  # the engine worker it runs on, when not this process

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

    def check_route_settings(self, settings: Mapping[str, Any]) -> None:
        """At start, for each route: ValueError if the route's settings hold anything this
        agent does not take (nothing an operator configured is silently ignored)."""
        if settings:
            raise ValueError(f"agent {self.name!r} takes no route settings, got {sorted(settings)}")

    @abstractmethod
    async def open(self, info: CallInfo, sink: AudioSink, emit: Emit, hangup: Hangup) -> AgentSession:
        """Admit a call or raise CallRefused, before it is answered. `hangup(reason)`
        ends the call from the agent's side (its engine is gone for good)."""


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

    async def open(self, info: CallInfo, sink: AudioSink, emit: Emit, hangup: Hangup) -> AgentSession:
        return _EchoSession(sink)


class _OmniFlattenSession(AgentSession):
    def __init__(self, agent: "OmniFlattenAgent", voice: VoiceSession, sink: AudioSink,
                 emit: Emit, hangup: Hangup, transport: str) -> None:
        self._agent = agent
        self._first_audio = agent.metrics.first_audio.labels(transport=transport)
        self._caller_spoke_at: float | None = None  # the caller's latest speech frame; None once answered
        self._voice = voice
        self._sink = sink
        self._emit = emit
        self._hangup = hangup
        self._chunk_samples = int(round(voice.chunk_seconds * FRAME_RATE))
        # The first chunk after aligning also carries the tokenizer's look-ahead, so that
        # each chunk's codes are final when it arrives.
        lead = voice.lead_frames(FRAME_SAMPLES / FRAME_RATE) * FRAME_SAMPLES
        self._buf = np.zeros(self._chunk_samples + lead, dtype=np.float32)
        self._target = self._chunk_samples  # samples that complete the chunk being filled
        self._fill = 0
        self._aligned = False  # on the engine's clock (from the first frame after start/resume)
        self._aligning: list[np.ndarray] | None = None  # frames held while a remote engine aligns
        # Chunks handed to the engine, oldest first: (future of its results, chunk end).
        self._pending: collections.deque[tuple[asyncio.Future, float]] = collections.deque()
        self._wake = asyncio.Event()
        self._hold = False
        self._speaking = False
        self._last_code_speech = False
        self._closed = False
        voice.on_rehome = self._rehomed
        voice.on_lost = self._lost_engine
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
            self._voice.pause()
            self._unalign()
            return
        silence = np.zeros(FRAME_SAMPLES, np.float32)
        for _ in range(frames):
            self._push(silence)

    @property
    def worker(self) -> str | None:  # type: ignore[override]
        return getattr(self._voice, "worker", None)

    def _unalign(self) -> None:
        self._aligned = False
        self._aligning = None
        self._fill = 0

    def _push(self, samples: np.ndarray) -> None:
        if self._aligning is not None:
            self._aligning.append(samples)  # the engine's answer is on its way
            return
        if not self._aligned:
            # The first chunk: leading silence so that it, and every chunk after it,
            # completes just before one of the engine's ticks.
            try:
                pad = self._voice.align(time.monotonic(), FRAME_SAMPLES / FRAME_RATE)
            except EngineStale:
                return  # the engine closed the session: the call goes on in silence
            if isinstance(pad, asyncio.Future):
                held = self._aligning = [samples]
                pad.add_done_callback(lambda f: self._aligned_at(f, held))
                return
            self._start_chunk(pad)
        self._add(samples)

    def _aligned_at(self, fut: asyncio.Future, held: list[np.ndarray]) -> None:
        if self._aligning is not held or self._closed:
            return  # unaligned again (hold, re-home) meanwhile
        self._aligning = None
        if fut.cancelled() or fut.exception() is not None:
            return  # the next frame aligns again
        self._start_chunk(fut.result())
        for samples in held:
            self._add(samples)

    def _start_chunk(self, pad: int) -> None:
        self._fill = pad * FRAME_SAMPLES
        self._buf[:self._fill] = 0.0
        self._target = len(self._buf)
        self._aligned = True

    def _add(self, samples: np.ndarray) -> None:
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
            fut = self._voice.submit_audio(chunk)
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
            self._voice.pause()
            self._unalign()
            self._sink.flush()

    def _rehomed(self, reason: str) -> None:
        """Another engine took the session over: join its clock with the next frame."""
        self._unalign()
        self._agent.metrics.rehomes.labels(reason=reason).inc()
        self._emit("rehomed", {"reason": reason, "worker": self.worker})

    def _lost_engine(self, reason: str) -> None:
        if not self._closed:
            asyncio.get_running_loop().create_task(self._hangup(reason))

    async def _run(self) -> None:
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
                except Rehomed:
                    continue  # its engine is gone; the new one starts with the next chunk
                finally:
                    if self._pending and self._pending[0][0] is fut:
                        self._pending.popleft()
                m.chunk_step.observe(time.monotonic() - t_end)
                for result in results:
                    self._play(result, np.asarray(result.speech_codes, dtype=np.int64), result.pcm, t_end)
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
        self._sink.play(pcm, self._voice.decoder_rate)
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
            lead = int(np.argmax(is_speech)) / len(speech) * len(pcm) / self._voice.decoder_rate
            first_audio = max(0.0, now + queued_ahead + lead - self._caller_spoke_at)
            self._first_audio.observe(first_audio)
            first_audio_ms = round(first_audio * 1000, 1)
            self._caller_spoke_at = None
        if speaking != self._speaking:
            self._speaking = speaking
            self._emit("turn", {"assistant": "speaking" if speaking else "listening"})
        self._last_code_speech = len(speech) > 0 and bool(is_speech[-1])
        text = [t for t in result.text_ids if t != self._voice.silent_text]
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
        self._voice.close()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


class OmniFlattenAgent(Agent):
    name = "omniflatten"

    def __init__(self, voice: VoiceEngine, metrics: AgentMetrics, *,
                 detokenize: Callable[[list[int]], str] | None = None, default_voice: str | None = None) -> None:
        self.voice = voice
        self.default_voice = default_voice  # None: the decoder's default voice
        self.metrics = metrics
        self.detokenize = detokenize or (lambda ids: "".join(f"⟨{i}⟩" for i in ids))

    async def start(self) -> None:
        await self.voice.start()
        # Then the start-up heap (torch, transformers, the model: ~400k objects) leaves the
        # garbage collector's view. A full collection walks every tracked object holding
        # the GIL; measured here, one during eight live calls stalled the whole process for
        # 0.2 s idle and 1.3 s on a busy machine, and the SIP leg skipped every call's audio
        # for that long. Frozen objects are never scanned again; what calls create still is.
        gc.collect()
        gc.freeze()

    async def close(self) -> None:
        await self.voice.close()

    def drain(self) -> None:
        self.voice.drain()

    @property
    def ready(self) -> bool:
        return self.voice.ready

    def describe(self) -> dict:
        return {"agent": self.name, **self.voice.describe()}

    def check_route_settings(self, settings: Mapping[str, Any]) -> None:
        unknown = sorted(set(settings) - {"voice"})
        if unknown:
            raise ValueError(f"agent {self.name!r} takes 'voice', not {unknown}")
        if "voice" in settings:
            if not isinstance(settings["voice"], str):
                raise ValueError(f"'voice' must be a voice's name, got {settings['voice']!r}")
            self.voice.check_voice(settings["voice"])

    async def open(self, info: CallInfo, sink: AudioSink, emit: Emit, hangup: Hangup) -> AgentSession:
        name = info.settings.get("voice", self.default_voice)
        try:
            voice = await self.voice.open_session(name)
        except ValueError as exc:  # a voice the decoder lacks (a local engine's is checked at start; a worker's here)
            log.warning("call %s refused: %s", info.call_id, exc)
            raise CallRefused(503, "Service Unavailable (unknown voice)") from None
        except EngineFull as exc:
            if exc.reason == "draining":
                raise CallRefused(503, "Service Unavailable (draining)", retry_after=30) from None
            raise CallRefused(486, f"Busy Here ({exc.reason})") from None
        session = _OmniFlattenSession(self, voice, sink, emit, hangup, str(info.transport))
        emit("voice", {"name": name or DEFAULT_VOICE})  # which speaker answers: the route's, --voice, or the default
        return session
