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
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .codec import SpeechDecoder, SpeechTokenizer
from .engine import Engine, EngineSession
from .omniflatten import ChunkResult

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
    async def open_session(self, voice: str | None = None) -> VoiceSession:
        """A session speaking in `voice` (None: the decoder's default), or EngineFull
        (reason: no_slot, deadline, draining) at once; ValueError for a voice the decoder
        does not have."""

    def check_voice(self, voice: str) -> None:
        """ValueError if `voice` is known not to exist (at start, for the routes). A remote
        engine's workers check it when a session opens."""

    @abstractmethod
    def describe(self) -> dict:
        """For /readyz: slots, sessions, device or workers."""

    @property
    def ready(self) -> bool:
        return True


class Rehomed(Exception):
    """A chunk's session moved to another engine before its result came back."""


class LocalVoiceEngine(VoiceEngine):
    """The engine in this process, with the tokenizer and the decoder on its tick."""

    def __init__(self, engine: Engine, tokenizer: SpeechTokenizer, decoder: SpeechDecoder) -> None:
        self.engine = engine
        self.decoder = decoder
        # The engine tokenizes every tick's audio and decodes every step's speech as batches.
        if engine.tokenizer is None:
            engine.attach_tokenizer(tokenizer)
        elif engine.tokenizer is not tokenizer:
            raise ValueError("the engine already has another speech tokenizer")
        if engine.decoder is None:
            engine.attach_decoder(decoder)
        elif engine.decoder is not decoder:
            raise ValueError("the engine already has another speech decoder")

    async def start(self) -> None:
        # The engine warms up at start (its tick measured at several batch sizes, so that
        # admission has data before the first call): off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, self.engine.start)

    async def close(self) -> None:
        self.engine.close()

    def drain(self) -> None:
        self.engine.drain()

    async def open_session(self, voice: str | None = None) -> LocalVoiceSession:
        return LocalVoiceSession(self, self.engine.open_session(voice=voice))

    def check_voice(self, voice: str) -> None:
        self.decoder.check_voice(voice)

    def describe(self) -> dict:
        stats = self.engine.stats()
        return {"engine": "local", "slots": stats.slots, "sessions": stats.open_sessions,
                "device": str(self.engine.model.device)}


class LocalVoiceSession(VoiceSession):
    def __init__(self, voice: LocalVoiceEngine, session: EngineSession) -> None:
        self._voice = voice
        self._session = session
        self.chunk_seconds = voice.engine.period
        self.decoder_rate = voice.decoder.sample_rate
        self.silent_text = voice.engine.model.vocab.silent_text

    def align(self, first_frame: float, frame_seconds: float = 0.02) -> int:
        return self._session.align(first_frame, frame_seconds)

    def lead_frames(self, frame_seconds: float = 0.02) -> int:
        return self._session.lead_frames(frame_seconds)

    def submit_audio(self, pcm16k: np.ndarray) -> asyncio.Future:
        return asyncio.ensure_future(self._chunks(self._session.submit_audio(pcm16k)))

    async def _chunks(self, step: asyncio.Future) -> list[VoiceChunk]:
        try:
            results = await step
        except asyncio.CancelledError:
            step.cancel()
            raise
        return [VoiceChunk(tuple(r.text_ids), tuple(r.speech_codes), self._audio(r), r.dropped) for r in results]

    def _audio(self, result: ChunkResult) -> np.ndarray:
        """The engine decoded the step; a dropped chunk (never stepped) is silence."""
        if result.pcm is not None:
            return result.pcm
        decoder = self._voice.decoder
        return np.zeros(round(len(result.speech_codes) * decoder.sample_rate / decoder.token_rate), np.float32)

    def pause(self) -> None:
        self._session.pause()

    def close(self) -> None:
        self._session.close()
