"""Streaming S3 tokenization: one call's 16 kHz audio becomes speech codes as it arrives,
many calls batched (docs/tokenizer.md: how the window was chosen, and what it costs).

Model of operation. Codes are made on a fixed grid of steps: step `i` finalises codes
`[i*S, (i+1)*S)` (S = `step_tokens`, H = samples per code) once the audio reaches
`(i+1)*S*H + lookahead` samples, so a step's codes come out exactly the look-ahead after
the step's audio. The encoder sees `[i*S*H - lookback, (i+1)*S*H + lookahead)`:

- `stream_encoder="reencode"`: the whole window, every step (compute: window / step times
  the audio);
- `stream_encoder="cache"`: only the step's frames and the look-ahead's (their features
  too), attending to the keys and values each earlier frame had at every layer when it was
  new, kept for `lookback` codes (oldest first) with each code's loudest mel bin for the
  features' floor (compute: about (step + look-ahead) / step times the audio). v2's FSMN
  memory (a convolution over each layer's values, 15 codes each side) reads its left
  context from the same cached values; its right context ends with the look-ahead.
  The look-ahead frames are provisional: they are encoded again, as the next step's
  frames. The first step, and the first step of each long-audio segment (see below),
  encodes its whole window and fills the cache from it.

Invariants:

- Codes depend only on the audio, never on how it was split into pushes or batched with
  other calls; the buffer never holds more than one window of samples (and a cached stream
  a fixed `2 * layers * lookback codes * width` cache).
- `stream_positions="utterance"`: every frame gets the position whole-utterance `encode`
  gives it: its index within its segment of the long-audio rule (30 s segments every 26 s;
  segment k owns codes from 2 s after its start, the first from 0), and a window never
  reaches back before its segment's start, as `encode`'s segment does not. So a stream
  reproduces `encode` exactly for an encoder whose context (convolutions, and attention
  that matters) fits inside look-back and look-ahead (tests check this). One exception:
  an utterance 28-30 s long is one segment to `encode`, so its last 2 s get other
  positions in a stream, which cannot know the utterance will end.
  `"window"` (the legacy behaviour) restarts positions at each window's first frame.
- The log-mel floor (max - 8 decades) is the window's maximum, as `s3_frontend` says.
- `flush()` returns the codes of the audio not yet coded, as many as `encode` gives for
  the total length, and resets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .codec import TokenizerStream
from .s3_frontend import n_frames

if TYPE_CHECKING:
    from .s3_tokenizer import S3Tokenizer

__all__ = ["S3TokenizerStream"]

# Codes of audio a cached step's convolutions need before its first code: conv2 sees
# conv1 outputs 2j-1..2j+1, conv1 sees mel frames around those, the STFT 200 samples more;
# two codes cover it at 50 and at 25 Hz.
_CONV_CONTEXT_CODES = 2


class _Step(NamedTuple):
    """One stream's encoder pass: the `window` of audio, whose first code has position
    `position`, gives `count` codes from window code `take`. `full`: encode every frame of
    the window (a cached stream then refills its cache from it)."""

    window: np.ndarray
    position: int
    take: int
    count: int
    full: bool


class _Kept(NamedTuple):
    """What a cached stream keeps of a step, per code up to the step's end: each layer's
    keys and values `(layers, n, width)`, and the loudest log-mel bin `(n,)`."""

    keys: torch.Tensor
    values: torch.Tensor
    peaks: torch.Tensor


class S3TokenizerStream(TokenizerStream):
    """One call's streaming tokenizer (see the module docstring). Build with
    `S3Tokenizer.new_stream()`. Not thread-safe: one call, one thread at a time."""

    def __init__(self, tokenizer: S3Tokenizer) -> None:
        c = tokenizer.config
        self._tok = tokenizer
        self._config = c
        self._per_token = c.samples_per_token
        self._step = c.step_tokens
        self._lookahead = c.lookahead_samples
        self._cached = c.stream_encoder == "cache"
        self._utterance_positions = c.stream_positions == "utterance"
        history = c.lookback_tokens
        if self._cached:
            history = max(history, _CONV_CONTEXT_CODES)
        self._history = history * self._per_token
        self._buf = np.zeros(self._history + self._step * self._per_token + self._lookahead, np.float32)
        self._ring = c.lookback_tokens
        if self._cached:
            shape = (c.layers, self._ring, c.width)
            self._keys = torch.zeros(shape, device=tokenizer.device, dtype=tokenizer.dtype)
            self._values = torch.zeros(shape, device=tokenizer.device, dtype=tokenizer.dtype)
            self._peaks = torch.zeros(self._ring, device=tokenizer.device)  # loudest log-mel bin per code
        self.reset()

    @property
    def capacity(self) -> int:
        """Samples the buffer can hold (fixed)."""
        return len(self._buf)

    @property
    def buffered(self) -> int:
        """Samples held now (<= capacity)."""
        return self._n

    @property
    def emitted(self) -> int:
        """Codes returned since the last reset."""
        return self._emitted

    @property
    def latency_samples(self) -> int:
        """Samples a step's last code waits for after its own audio: the look-ahead."""
        return self._lookahead

    def reset(self) -> None:
        self._start = 0  # absolute sample index of self._buf[0]
        self._n = 0  # samples held
        self._emitted = 0  # == step index * step tokens, until flush
        self._pending = np.zeros(0, np.float32)  # pushed audio that did not fit the buffer yet
        self._segment = -1  # first code of the segment the cache was filled in; -1: none
        self._filled = 0  # valid rows of the cache (its last rows)

    def push(self, pcm16k: np.ndarray) -> np.ndarray:
        return self._tok.push_many([self], [pcm16k])[0]

    def flush(self) -> np.ndarray:
        """End of the utterance: return the codes of the audio not yet coded (as many as
        whole-utterance encoding gives for the total length), then reset."""
        total = self._config.tokens_for_samples(self._start + self._n)
        codes = np.zeros(0, dtype=np.int64)
        if total > self._emitted:
            with torch.inference_mode():
                plan = self._plan(self._start + self._n, total - self._emitted)
                codes = run_steps(self._tok, [self], [plan], commit=False)[0]
        self.reset()
        return codes

    # The step, in parts, so that run_steps can batch many streams' windows. --------

    def _append(self, pcm: np.ndarray) -> None:
        self._pending = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        self._append_pending()

    def _append_pending(self) -> None:
        take = min(len(self._pending), len(self._buf) - self._n)
        if take:
            self._buf[self._n:self._n + take] = self._pending[:take]
            self._n += take
            self._pending = self._pending[take:]

    def _step_end(self) -> int:
        """Absolute sample the current step needs before it can run."""
        return (self._emitted + self._step) * self._per_token + self._lookahead

    def _ready(self) -> bool:
        return self._start + self._n >= self._step_end()

    def _plan(self, end: int | None = None, count: int | None = None) -> _Step:
        """The pass for the current step (or, from flush, for the audio up to `end`)."""
        end = self._step_end() if end is None else end
        count = self._step if count is None else count
        first = self._start // self._per_token  # the window's first code
        segment, position = 0, 0
        if self._utterance_positions:
            segment = self._config.segment_start(self._emitted)
            first = max(first, segment)
            position = first - segment
        window = self._buf[first * self._per_token - self._start:end - self._start]
        full = not self._cached or segment != self._segment
        return _Step(window, position, self._emitted - first, count, full)

    def _commit(self, kept: _Kept | None, full: bool) -> None:
        """Keep the step's keys, values and peaks (cached streams: codes up to the step's
        end) and slide the buffer by one step."""
        if self._cached:
            assert kept is not None
            if full:  # (a cached stream always has utterance positions)
                self._segment = self._config.segment_start(self._emitted)
                self._filled = 0
            self._remember(kept)
        self._emitted += self._step
        new_start = max(0, self._emitted * self._per_token - self._history)
        shift = new_start - self._start
        if shift:
            # numpy copes with the overlap; this is one window's memmove per step.
            self._buf[:self._n - shift] = self._buf[shift:self._n]
            self._n -= shift
            self._start = new_start

    def _remember(self, kept: _Kept) -> None:
        """Append the step's rows, dropping the oldest: the cache stays in time order (v2's
        FSMN convolves the newest values), its `_filled` valid rows last."""
        ring = self._ring
        n = min(ring, kept.keys.shape[1])
        if n == 0:
            return
        for cache, new in ((self._keys, kept.keys), (self._values, kept.values), (self._peaks[None], kept.peaks[None])):
            cache[:, :ring - n] = cache[:, n:].clone()
            cache[:, ring - n:] = new[:, -n:]
        self._filled = min(ring, self._filled + n)


def push_many(tokenizer: S3Tokenizer, streams: list[S3TokenizerStream], pcms: list[np.ndarray]) -> list[np.ndarray]:
    """Push each stream its audio (float32 arrays); every step that becomes ready runs,
    batched across streams. Call under inference_mode."""
    out: list[list[np.ndarray]] = [[] for _ in streams]
    for stream, pcm in zip(streams, pcms):
        stream._append(pcm)
    while True:
        rows = [i for i, s in enumerate(streams) if s._ready()]
        if not rows:
            break
        ready = [streams[i] for i in rows]
        for i, codes in zip(rows, run_steps(tokenizer, ready, [s._plan() for s in ready], commit=True)):
            out[i].append(codes)
        for stream in streams:
            stream._append_pending()
    return [np.concatenate(o) if o else np.zeros(0, dtype=np.int64) for o in out]


def run_steps(tokenizer: S3Tokenizer, streams: list[S3TokenizerStream], plans: list[_Step],
              commit: bool) -> list[np.ndarray]:
    """Run each stream's planned pass, one batch per shape; `commit`: each stream then
    keeps its step (cache rows, buffer slide). Call under inference_mode."""
    out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(plans)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(plans):
        groups.setdefault((streams[i]._cached, len(p.window), p.take, p.count, p.full), []).append(i)
    for rows in groups.values():
        group = [streams[i] for i in rows]
        codes, kept = _encode(tokenizer, group, [plans[i] for i in rows])
        for j, i in enumerate(rows):
            out[i] = codes[j]
            if commit:
                group[j]._commit(_Kept(kept.keys[j], kept.values[j], kept.peaks[j]) if kept else None,
                                 plans[i].full)
    return out


def _encode(tok: S3Tokenizer, streams: list[S3TokenizerStream],
            plans: list[_Step]) -> tuple[np.ndarray, _Kept | None]:
    """One batched pass over equal-shaped plans: codes (B, count), and for cached streams
    what they should keep of it (batched: keys and values (B, layers, n, width), peaks
    (B, n))."""
    p0 = plans[0]
    take, count = p0.take, p0.count
    model = tok.model
    encoder = model.encoder
    c = tok.config
    windows = torch.from_numpy(np.stack([p.window for p in plans]))
    n_codes = c.tokens_for_samples(len(p0.window))
    if n_frames(len(p0.window), c.hop) == 0 or n_codes <= take:
        return np.zeros((len(plans), 0), dtype=np.int64), None
    positions = torch.tensor([p.position for p in plans], device=tok.device)
    if not streams[0]._cached or len(p0.window) <= c.n_fft // 2:
        mel = tok.front_end.batch(windows).to(tok.device, tok.dtype)
        lengths = torch.full((len(plans),), mel.shape[2], device=tok.device)
        first = positions if bool(positions.any()) else None
        hidden, _ = encoder(mel, lengths, first)
        return _numpy(model.quantizer(hidden[:, take:take + count])), None
    per_code = 2 * c.stride  # mel frames per code
    # Only the new frames (after enough for the convolutions' left context) are encoded,
    # and only their features computed; the floor's peak also counts the look-back's codes.
    start = 0 if p0.full else max(0, take - _CONV_CONTEXT_CODES)
    log = tok.front_end.log_power_batch(windows, start * per_code)
    peak = log.amax(dim=(1, 2))
    if p0.full:
        b, width = len(plans), c.width
        past_k = past_v = log.new_zeros(b, c.layers, 0, width, dtype=tok.dtype)
        keep = torch.zeros(b, 0, dtype=torch.bool, device=tok.device)
    else:
        past_k = torch.stack([s._keys for s in streams])
        past_v = torch.stack([s._values for s in streams])
        rows = torch.arange(past_k.shape[2], device=tok.device)
        filled = torch.tensor([s._filled for s in streams], device=tok.device)
        keep = rows[None, :] >= past_k.shape[2] - filled[:, None]
        past_peaks = torch.stack([s._peaks for s in streams]).masked_fill(~keep, -torch.inf)
        if past_peaks.shape[1]:
            peak = torch.maximum(peak, past_peaks.amax(dim=1))
    mel = tok.front_end.normalise(log, peak).to(tok.device, tok.dtype)
    tail_codes = log.shape[2] // per_code
    peaks = log[..., :tail_codes * per_code].reshape(len(plans), c.n_mels, tail_codes, per_code).amax(dim=(1, 3))
    lengths = torch.full((len(plans),), mel.shape[2], device=tok.device)
    x, _ = encoder.features(mel, lengths)
    skip = 0 if p0.full else take - start
    hidden, keys, values = encoder.forward_cached(x[:, skip:], positions + (start + skip), past_k, past_v, keep)
    first = take if p0.full else 0
    codes = model.quantizer(hidden[:, first:first + count])
    # Keep the codes up to the step's end (never the provisional look-ahead).
    end = first + min(count, streams[0]._step)
    return _numpy(codes), _Kept(keys[:, :, :end], values[:, :, :end], peaks[:, skip:skip + end])


def _numpy(codes: torch.Tensor) -> np.ndarray:
    return codes.cpu().numpy().astype(np.int64, copy=False)
