"""Framer: a PCM16 stream of any chunking in, frames of exactly `frame_ms` out.

The model: what goes in is one continuous stream; what comes out is that same stream cut
into consecutive frames of `frame_samples` samples (20 ms by default), oldest first. After
any sequence of pushes, the concatenation of every frame returned so far, followed by the
`pending_samples` held back, equals the concatenation of every input. `flush()` ends the
stream: it returns what is held back padded with zeros to one whole frame (or nothing).

Used both ways: a decoder's or jitter buffer's output into 20 ms frames for the model, and
the model's chunks (200 ms and more, in no fixed size) into 20 ms frames for pacing.

Frames are new arrays, never views of the caller's input, so the caller may reuse its
buffer. Not thread-safe: one framer belongs to one task.
"""

from __future__ import annotations

import numpy as np

from bridge.media.pcm import as_int16, check_rate, frame_samples

__all__ = ["Framer"]


class Framer:
    """Cut PCM16 into frames of exactly `frame_ms` milliseconds at `rate` Hz.

    Raises `UnsupportedRate` or `BadFrameSize` when the rate is invalid or the frame would
    not hold a whole number of samples.
    """

    __slots__ = ("_rate", "_frame_ms", "_frame", "_pending", "_fill")

    def __init__(self, rate: int, frame_ms: float = 20) -> None:
        self._rate = check_rate(rate)
        self._frame = frame_samples(self._rate, frame_ms)
        self._frame_ms = float(frame_ms)
        self._pending = np.zeros(self._frame, np.int16)
        self._fill = 0

    @property
    def rate(self) -> int:
        return self._rate

    @property
    def frame_ms(self) -> float:
        return self._frame_ms

    @property
    def frame_samples(self) -> int:
        return self._frame

    @property
    def frame_bytes(self) -> int:
        return 2 * self._frame

    @property
    def pending_samples(self) -> int:
        """Samples held back: fewer than one frame, always."""
        return self._fill

    def push(self, pcm: bytes | bytearray | memoryview | np.ndarray) -> list[np.ndarray]:
        """Add a chunk (bytes or int16 array, any length, empty allowed); return the
        frames it completed, oldest first (often none, possibly many)."""
        x = as_int16(pcm)
        n = x.shape[0]
        size = self._frame
        frames: list[np.ndarray] = []
        if n == 0:
            return frames
        i = 0
        fill = self._fill
        if fill:
            take = min(size - fill, n)
            self._pending[fill : fill + take] = x[:take]
            fill += take
            i = take
            if fill < size:
                self._fill = fill
                return frames
            frames.append(self._pending.copy())
        whole = (n - i) // size
        if whole:
            # One copy for all the whole frames; the rows are independent of the input.
            frames.extend(x[i : i + whole * size].reshape(whole, size).copy())
            i += whole * size
        rest = n - i
        self._pending[:rest] = x[i:]
        self._fill = rest
        return frames

    def flush(self) -> np.ndarray | None:
        """End of stream: the held-back samples padded with zeros to one whole frame, or
        None when nothing is held back. The framer is empty afterwards."""
        if not self._fill:
            return None
        frame = self._pending.copy()
        frame[self._fill :] = 0
        self._fill = 0
        return frame

    def reset(self) -> None:
        """Drop whatever is held back (a barge-in, a new stream)."""
        self._fill = 0
