"""What a call's agent talks to: a `VoiceEngine` that opens one `VoiceSession` per call,
takes the caller's audio chunk by chunk and gives back the model's tokens and the
assistant's audio. Two implementations behind this one interface (the agent cannot tell
them apart): `LocalVoiceEngine` (the engine, tokenizer and decoder in this process) and
`RemoteVoiceEngine` (model/worker_client.py: the same, on a shared worker over the
network, docs/worker.md).

A session's life: `align` once its audio starts (and after a pause, or a re-home), then
`submit_audio` per chunk (the first `lead_frames` longer), `pause` on hold, `close`.
Results come in order; each chunk's future gives the `VoiceChunk`s its codes completed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .codec import SpeechDecoder, SpeechTokenizer
from .engine import Engine, EngineSession

__all__ = ["VoiceChunk", "VoiceSession", "VoiceEngine", "LocalVoiceEngine", "LocalVoiceSession"]


@dataclass(frozen=True)
class VoiceChunk:
    """One chunk step of one call: the model's text ids and speech codes (-1: silent
    speech), and the assistant's audio for it (float32 at the decoder's rate)."""

    text_ids: tuple[int, ...]
    speech_codes: tuple[int, ...]
    pcm: np.ndarray
    dropped: bool = False  # the engine answered with silence (backlog full)


class VoiceSession(ABC):
    """One call's session. Event loop only.

    `on_rehome(reason)`: the session moved to another engine (its worker was lost or
    drained): chunks in flight failed with `Rehomed`; align again before the next chunk.
    `on_lost(reason)`: the session is gone for good (no room anywhere): end the call."""

    on_rehome: Callable[[str], None] | None = None
    on_lost: Callable[[str], None] | None = None
    chunk_seconds: float  # the model's chunk period
    decoder_rate: int  # the assistant's audio, samples per second
    silent_text: int  # the text id the model writes while it has nothing to say

    @abstractmethod
    def align(self, first_frame: float, frame_seconds: float = 0.02) -> int | asyncio.Future:
        """Put the session on its engine's clock (see `EngineSession.align`): the frames of
        silence that lead the first chunk, or a future of that number (a remote engine
        answers after a round trip; buffer the frames meanwhile)."""

    @abstractmethod
    def lead_frames(self, frame_seconds: float = 0.02) -> int: ...

    @abstractmethod
    def submit_audio(self, pcm16k: np.ndarray) -> asyncio.Future:
        """One chunk of float32 16 kHz audio; the future gives a list of VoiceChunk."""

    @abstractmethod
    def pause(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class VoiceEngine(ABC):
    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def drain(self) -> None:
        """Open no new sessions from now on."""

    @abstractmethod
    async def open_session(self) -> VoiceSession:
        """A session, or EngineFull (reason: no_slot, deadline, draining) at once."""

    @abstractmethod
    def describe(self) -> dict:
        """For /readyz: slots, sessions, device or workers."""

    @property
    def ready(self) -> bool:
        return True


class Rehomed(Exception):
    """A chunk's session moved to another engine before its result came back."""


class LocalVoiceEngine(VoiceEngine):
    """The engine in this process, the decoder on a small thread pool beside it."""

    def __init__(self, engine: Engine, tokenizer: SpeechTokenizer, decoder: SpeechDecoder, *,
                 threads: int = 2) -> None:
        self.engine = engine
        self.decoder = decoder
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="duplexline-codec")
        if engine.tokenizer is None:
            engine.attach_tokenizer(tokenizer)  # the engine tokenizes every tick's audio as one batch
        elif engine.tokenizer is not tokenizer:
            raise ValueError("the engine already has another speech tokenizer")

    async def start(self) -> None:
        # The engine warms up at start (its tick measured at several batch sizes, so that
        # admission has data before the first call): off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, self.engine.start)

    async def close(self) -> None:
        self.engine.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def drain(self) -> None:
        self.engine.drain()

    async def open_session(self) -> LocalVoiceSession:
        return LocalVoiceSession(self, self.engine.open_session())

    def describe(self) -> dict:
        stats = self.engine.stats()
        return {"engine": "local", "slots": stats.slots, "sessions": stats.open_sessions,
                "device": str(self.engine.model.device)}


class LocalVoiceSession(VoiceSession):
    def __init__(self, voice: LocalVoiceEngine, session: EngineSession) -> None:
        self._voice = voice
        self._session = session
        self._decoder = voice.decoder.new_stream()
        self.chunk_seconds = voice.engine.period
        self.decoder_rate = voice.decoder.sample_rate
        self.silent_text = voice.engine.model.vocab.silent_text
        self._tail: asyncio.Future | None = None  # the last chunk's decoding: the stream decodes in order

    def align(self, first_frame: float, frame_seconds: float = 0.02) -> int:
        return self._session.align(first_frame, frame_seconds)

    def lead_frames(self, frame_seconds: float = 0.02) -> int:
        return self._session.lead_frames(frame_seconds)

    def submit_audio(self, pcm16k: np.ndarray) -> asyncio.Future:
        step = self._session.submit_audio(pcm16k)
        task = asyncio.ensure_future(self._decode(step, self._tail))
        self._tail = task
        return task

    async def _decode(self, step: asyncio.Future, previous: asyncio.Future | None) -> list[VoiceChunk]:
        try:
            results = await step
        except asyncio.CancelledError:
            step.cancel()
            raise
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # its outcome is its own caller's
        loop = asyncio.get_running_loop()
        out = []
        for r in results:
            speech = np.asarray(r.speech_codes, dtype=np.int64)
            pcm = await loop.run_in_executor(self._voice.pool, self._decode_timed, speech)
            out.append(VoiceChunk(tuple(r.text_ids), tuple(r.speech_codes), pcm, r.dropped))
        return out

    def _decode_timed(self, speech: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        pcm = self._decoder.push(speech)
        self._voice.engine.metrics.decoder_seconds.observe(time.perf_counter() - t0)
        return pcm

    def pause(self) -> None:
        self._session.pause()

    def close(self) -> None:
        self._session.close()
