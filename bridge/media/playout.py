"""PlayoutBuffer: the audio the caller will hear next, taken out one frame per tick.

The model: a FIFO of PCM16 samples at one rate. The producer (the assistant's speech,
already at the leg's rate) pushes chunks of any size; the pacer pops exactly one frame
every `frame_ms` and sends it. When less than a frame is queued, the pop is padded with
silence: a pop never waits and never returns a short frame. Barge-in is `flush()`: every
queued sample goes at once, and the caller learns how much speech was cut (in ms).

Accounting (all counters only grow, until the object is dropped):
- `depth_samples` = pushed - popped - flushed - overflowed, at every moment;
- `overflow_samples`: with `max_ms` set, a push that would exceed it drops the *oldest*
  samples (the newest speech is the one worth hearing after a stall);
- `underruns`: times playback ran dry: a pop that found less than a frame while audio was
  expected, i.e. after a push, before `mark_end()` or `flush()`. Once counted, it is not
  counted again until the next push, so an idle assistant's silence costs nothing. A
  producer that calls `mark_end()` after its last chunk makes the natural end of an
  utterance not count; one that does not, counts one underrun per utterance.

Single-threaded by design: push and pop are called from the same asyncio event loop, so
there are no locks and nothing ever blocks. Do not share one buffer between threads.
Storage is one ring of int16 (fixed size with `max_ms`, doubling otherwise); a pop
allocates only the frame it returns.
"""

from __future__ import annotations

import numpy as np

from bridge.media.errors import BadFrameSize
from bridge.media.pcm import as_int16, check_rate, frame_samples

__all__ = ["PlayoutBuffer"]

_INITIAL_SECONDS = 1.0


class PlayoutBuffer:
    """A non-blocking playout FIFO of PCM16 at `rate` Hz, popped in `frame_ms` frames.

    `max_ms`: most audio held (None: unbounded); must hold at least one frame.
    """

    __slots__ = (
        "_rate",
        "_frame",
        "_cap",
        "_bounded",
        "_ring",
        "_head",
        "_size",
        "_expecting",
        "_ended",
        "underruns",
        "overflow_samples",
        "flushed_samples",
        "pushed_samples",
        "popped_samples",
    )

    def __init__(self, rate: int, frame_ms: float = 20, max_ms: float | None = None) -> None:
        self._rate = check_rate(rate)
        self._frame = frame_samples(self._rate, frame_ms)
        if max_ms is None:
            self._bounded = False
            self._cap = max(self._frame, int(self._rate * _INITIAL_SECONDS))
        else:
            if isinstance(max_ms, bool) or not isinstance(max_ms, (int, float)):
                raise BadFrameSize(f"max_ms={max_ms!r}: must be a number of milliseconds or None")
            cap = int(self._rate * max_ms / 1000)
            if cap < self._frame:
                raise BadFrameSize(f"max_ms={max_ms!r}: must hold at least one {frame_ms} ms frame")
            self._bounded = True
            self._cap = cap
        self._ring = np.zeros(self._cap, np.int16)
        self._head = 0  # index of the oldest queued sample
        self._size = 0
        self._expecting = False  # audio was pushed and has not run out or been ended
        self._ended = False
        self.underruns = 0
        self.overflow_samples = 0
        self.flushed_samples = 0
        self.pushed_samples = 0
        self.popped_samples = 0  # queued samples handed out, not counting padding

    @property
    def rate(self) -> int:
        return self._rate

    @property
    def frame_samples(self) -> int:
        return self._frame

    @property
    def depth_samples(self) -> int:
        return self._size

    @property
    def depth_ms(self) -> float:
        """Queued audio in milliseconds: how far behind real time the caller will hear
        anything pushed now."""
        return self._size * 1000.0 / self._rate

    @property
    def max_ms(self) -> float | None:
        return self._cap * 1000.0 / self._rate if self._bounded else None

    def push(self, pcm: bytes | bytearray | memoryview | np.ndarray) -> int:
        """Queue a chunk (bytes or int16 array; empty is a no-op). Returns how many of the
        oldest samples were dropped to stay within `max_ms` (0 unless full)."""
        x = as_int16(pcm)
        n = x.shape[0]
        if n == 0:
            return 0
        self.pushed_samples += n
        self._expecting = True
        self._ended = False
        dropped = 0
        cap = self._cap
        if self._size + n > cap:
            if self._bounded:
                dropped = self._size + n - cap
                if n >= cap:  # the chunk alone fills the ring: keep its newest part
                    x = x[n - cap :]
                    n = cap
                    self._head, self._size = 0, 0
                else:
                    self._head = (self._head + dropped) % cap
                    self._size -= dropped
                self.overflow_samples += dropped
            else:
                self._grow(self._size + n)
                cap = self._cap
        tail = (self._head + self._size) % cap
        first = min(n, cap - tail)
        self._ring[tail : tail + first] = x[:first]
        if first < n:
            self._ring[: n - first] = x[first:]
        self._size += n
        return dropped

    def pop_frame(self) -> np.ndarray:
        """Exactly one frame (a new int16 array): queued audio, padded with silence when
        less than a frame is queued. Never blocks."""
        size = self._frame
        take = min(size, self._size)
        if take < size:
            out = np.zeros(size, np.int16)
            if self._expecting and not self._ended:
                self.underruns += 1
            self._expecting = False
            if take == 0:
                return out
        else:
            out = np.empty(size, np.int16)
        head, cap = self._head, self._cap
        first = min(take, cap - head)
        out[:first] = self._ring[head : head + first]
        if first < take:
            out[first:take] = self._ring[: take - first]
        self._head = (head + take) % cap
        self._size -= take
        self.popped_samples += take
        return out

    def mark_end(self) -> None:
        """The producer has pushed the last sample of an utterance: when the buffer runs
        dry next, that is the end of speech, not an underrun."""
        self._ended = True

    def flush(self) -> float:
        """Drop everything queued (barge-in); return how many milliseconds were dropped."""
        dropped = self._size
        self.flushed_samples += dropped
        self._head = 0
        self._size = 0
        self._expecting = False
        return dropped * 1000.0 / self._rate

    def _grow(self, need: int) -> None:
        """Unbounded buffer full: reallocate at least doubled, oldest sample first."""
        cap = max(need, 2 * self._cap)
        ring = np.zeros(cap, np.int16)
        head, size, old = self._head, self._size, self._cap
        first = min(size, old - head)
        ring[:first] = self._ring[head : head + first]
        ring[first:size] = self._ring[: size - first]
        self._ring, self._cap, self._head = ring, cap, 0
