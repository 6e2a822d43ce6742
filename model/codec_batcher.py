"""`TickTokenizer` and `TickDecoder`: the speech tokenizer's and decoder's parts of an
engine tick.

Each call sends one chunk of audio per chunk period. The engine tokenizes every chunk of
one tick in one batched pass (`SpeechTokenizer.push_many`), on the engine's own thread and
device, right before the LLM step those codes feed: one thread, one clock, one batch per
stage. (Before, a separate tokenizer thread batched whatever pushes happened to wait
together; calls at random phases rarely did, and its Python-heavy passes fought the engine
and the event loop for the GIL.)

The decoder likewise: every session's speech codes of one LLM step in one batched pass
(`SpeechDecoder.push_many`), right after that step, so a session's audio comes back with
its step.

ENGINE THREAD: not thread-safe; the engine's thread is its only user.
"""

from __future__ import annotations

import time

import numpy as np

from .codec import DecoderStream, SpeechDecoder, SpeechTokenizer, TokenizerStream

__all__ = ["TickTokenizer", "TickDecoder"]


class TickTokenizer:
    def __init__(self, tokenizer: SpeechTokenizer) -> None:
        self.tokenizer = tokenizer
        self.batches = 0
        self._pool: list[TokenizerStream] = []  # warm-up streams

    def new_stream(self) -> TokenizerStream:
        return self.tokenizer.new_stream()

    def push(self, streams: list[TokenizerStream], pcms: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """Each stream's new codes for its chunk of audio (one chunk per stream: a stream
        twice in one batch would see its audio out of order), and the seconds it took."""
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("a stream appears twice in one tokenizer batch")
        t0 = time.perf_counter()
        codes = self.tokenizer.push_many(streams, pcms)
        self.batches += 1
        return codes, time.perf_counter() - t0

    def warm_up(self, size: int, chunk_samples: int, prefill_seconds: float = 3.0) -> float:
        """Seconds of one batched push of `chunk_samples` per stream for `size` streams.
        The streams persist across calls (a growing pool), each filled with
        `prefill_seconds` of noise before its first timed push, so every timed push
        re-encodes a full streaming window, as in a live call."""
        rng = np.random.default_rng(len(self._pool))
        fresh = [self.new_stream() for _ in range(max(0, size - len(self._pool)))]
        if fresh:
            noise = [(0.1 * rng.standard_normal(chunk_samples)).astype(np.float32) for _ in fresh]
            pushes = max(1, int(np.ceil(prefill_seconds * self.tokenizer.sample_rate / chunk_samples)))
            for _ in range(pushes):
                self.tokenizer.push_many(fresh, noise)
            self._pool += fresh
        noise = [(0.1 * rng.standard_normal(chunk_samples)).astype(np.float32) for _ in range(size)]
        return min(self.push(self._pool[:size], noise)[1] for _ in range(2))

    def end_warm_up(self) -> None:
        self._pool = []


class TickDecoder:
    def __init__(self, decoder: SpeechDecoder) -> None:
        self.decoder = decoder
        self._pool: list[DecoderStream] = []  # warm-up streams

    def new_stream(self, voice: str | None = None) -> DecoderStream:
        return self.decoder.new_stream(voice)

    def push(self, streams: list[DecoderStream], codes: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """Each stream's audio for its chunk of codes, and the seconds it took."""
        t0 = time.perf_counter()
        pcms = self.decoder.push_many(streams, codes)
        return pcms, time.perf_counter() - t0

    def warm_up(self, size: int, codes_per_chunk: int, prefill_chunks: int = 3) -> float:
        """Seconds of one batched push of a chunk of speech for `size` streams, each past
        `prefill_chunks` chunks of one reply (caches full, as in a live call)."""
        rng = np.random.default_rng(len(self._pool))
        codebook = getattr(self.decoder, "codebook_size", 1)

        def chunk(n: int) -> list[np.ndarray]:
            return [rng.integers(0, codebook, codes_per_chunk) for _ in range(n)]
        fresh = [self.new_stream() for _ in range(max(0, size - len(self._pool)))]
        for _ in range(prefill_chunks if fresh else 0):
            self.decoder.push_many(fresh, chunk(len(fresh)))
        self._pool += fresh
        return min(self.push(self._pool[:size], chunk(size))[1] for _ in range(2))

    def end_warm_up(self) -> None:
        self._pool = []
