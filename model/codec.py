"""The speech codec's two interfaces, so the engine and the agent do not care which
implementation runs: `SpeechTokenizer` (16 kHz PCM -> speech codes) and `SpeechDecoder`
(speech codes -> PCM at the decoder's rate). Both stream: state lives in a per-call
stream object made by `new_stream()`, the (large, shared) weights in the codec object.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

__all__ = ["SpeechTokenizer", "TokenizerStream", "SpeechDecoder", "DecoderStream", "DEFAULT_VOICE"]


class TokenizerStream(ABC):
    """One call's tokenizer state. Not thread-safe: one call, one thread at a time."""

    @abstractmethod
    def push(self, pcm16k: np.ndarray) -> np.ndarray:
        """Feed float32 samples at 16 kHz in [-1, 1]; return the int64 codes (0..codebook-1)
        that became final, possibly none. Codes come at the tokenizer's token rate."""

    @abstractmethod
    def reset(self) -> None:
        """Forget all audio (a new call on the same stream object)."""


class SpeechTokenizer(ABC):
    sample_rate: int = 16000
    token_rate: int  # codes per second (25 or 50)
    codebook_size: int
    # Samples a stream waits for past a code's own audio before the code is final (its
    # look-ahead): a caller's first chunk carries this much more audio, so every later
    # chunk completes its codes as it arrives (model/engine.py `lead_frames`).
    lookahead_samples: int = 0

    @abstractmethod
    def new_stream(self) -> TokenizerStream: ...

    @abstractmethod
    def encode(self, pcm16k: np.ndarray) -> np.ndarray:
        """Whole-utterance codes for float32 samples at 16 kHz."""

    def push_many(self, streams: list[TokenizerStream], pcms: list[np.ndarray]) -> list[np.ndarray]:
        """`push` on many streams (one per call). Implementations batch the work; this
        default does them one by one."""
        return [s.push(p) for s, p in zip(streams, pcms)]

    def lead_frames(self, frame_seconds: float = 0.02) -> int:
        """Frames of leading silence a call's first chunk carries beyond a chunk: the
        look-ahead rounded up to whole frames (the engine's `lead_frames`, and what
        training data streams the caller's channel with)."""
        return math.ceil(self.lookahead_samples / (frame_seconds * self.sample_rate) - 1e-9)


class DecoderStream(ABC):
    """One call's decoder state: continuity across chunks lives here."""

    @abstractmethod
    def push(self, codes: np.ndarray) -> np.ndarray:
        """Decode one chunk of speech codes (int64; -1 = silent speech) into float32 PCM at
        the decoder's rate, continuous with the previous chunk."""

    @abstractmethod
    def reset(self) -> None: ...


DEFAULT_VOICE = "default"


class SpeechDecoder(ABC):
    sample_rate: int  # 22050 or 24000
    token_rate: int
    voices: tuple[str, ...] = (DEFAULT_VOICE,)  # the speakers new_stream can take

    @abstractmethod
    def new_stream(self, voice: str | None = None) -> DecoderStream:
        """A stream in `voice` (None: the default); ValueError naming the known voices
        for any other."""

    def check_voice(self, voice: str | None) -> str:
        """`voice`, or the default for None; ValueError if this decoder has no such voice."""
        name = DEFAULT_VOICE if voice is None else voice
        if name not in self.voices:
            raise ValueError(f"no voice {name!r}: this decoder has {', '.join(sorted(self.voices))}")
        return name

    def push_many(self, streams: list[DecoderStream], codes: list[np.ndarray]) -> list[np.ndarray]:
        """`push` on many streams (one chunk each). Implementations batch the work; this
        default does them one by one."""
        return [s.push(c) for s, c in zip(streams, codes)]
