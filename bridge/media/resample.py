"""Streaming resampler: one object per direction of one call, any chunk size, no added latency.

The model: a `Resampler` is a stream. After T input samples in total it has returned
exactly ceil(T * rate_out / rate_in) output samples, whatever the chunking, and output m
approximates the input signal at time m / rate_out - delay_seconds (the filter's exact
group delay, at most 2.4 ms for the project's rates). Chunked output equals whole-signal
output to within one LSB (float32 sums may round differently in different BLAS
blockings). The stream starts from silence: it behaves as if zeros had come before the
first sample.

What a stream holds: the last H + (T mod B) inputs as float32, at `origin` in a buffer
it owns (room for several frames, so the history is moved back to the start only every
few frames), T mod B, and a few cached "plans": the views one step of a given size at a
given position uses, built once because building views costs more than using them. The
filter itself (see `polyphase`) is shared by every stream of the same rate pair. One
chunk costs one int16 -> float32 copy into the buffer, one BLAS matrix product over the
blocks the chunk touches, a clip, a rounding and a cast to int16: about 5 µs for a 20 ms
frame of 8 -> 16 kHz on the project's machines (bench/media.py).

Empty input is a valid no-op: it returns an empty array and changes nothing (a jitter
buffer or a decoder may well yield nothing for a tick). Malformed input raises `BadPcm`
before any state changes. Output is rounded to nearest and clipped to int16 (the filter
can overshoot full-scale input by a few percent).

Not thread-safe: a stream belongs to one task. On the steady path it allocates only the
output array (and BLAS its copy of the window rows); it never logs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bridge.media.pcm import as_int16
from bridge.media.polyphase import PolyphaseDesign, design

try:  # the clip ufunc itself: np.clip's Python wrapper costs more than the whole FIR
    from numpy._core.umath import clip as _clip
except ImportError:  # numpy 1.x
    from numpy.core.umath import clip as _clip  # type: ignore[no-redef]

__all__ = ["Resampler"]

_INT16 = np.dtype(np.int16)
# 0-d arrays, not scalars: the ufunc then skips scalar conversion (about 1 µs a call).
_LO = np.array(-32768.0, np.float32)
_HI = np.array(32767.0, np.float32)
# A chunk longer than this many blocks is done in pieces, so one large write (seconds of
# model audio) does not grow the stream's buffers for good.
_MAX_BLOCKS = 64
_MAX_PLANS = 64


class _Plan(NamedTuple):
    """What one step of n inputs does, from one (origin, phase): all views, no copies."""

    move_to: np.ndarray | None  # history's new place when the buffer's end is near...
    move_from: np.ndarray | None  # ...and its old one
    dst: np.ndarray  # where the n new inputs go
    window: np.ndarray | None  # (blocks, H + B) overlapping rows of the buffer
    res: np.ndarray | None  # (blocks, Bo) float32 product
    flat: np.ndarray | None  # the due outputs within `res`
    count: int  # how many outputs are due
    next_origin: int
    next_phase: int


class Resampler:
    """Resample a PCM16 stream from `rate_in` to `rate_out` Hz, chunk by chunk.

    Raises `UnsupportedRate` for invalid rates or an unreasonable ratio. Equal rates give
    a pass-through with zero delay.
    """

    __slots__ = (
        "_design",
        "_matrix",
        "_limit",
        "_buf",
        "_res",
        "_plans",
        "_origin",
        "_phase",
        "_samples_in",
    )

    def __init__(self, rate_in: int, rate_out: int) -> None:
        self._design: PolyphaseDesign = design(rate_in, rate_out)
        d = self._design
        self._matrix = d.matrix
        # Chunks above this are cut into pieces; 0 marks the identity (pass-through).
        self._limit = 0 if d.identity else _MAX_BLOCKS * d.block_in
        # Room for about eight 20 ms frames, so the history is moved back to the buffer's
        # start only every few frames; grows (rarely) for larger chunks.
        frame_blocks = 0 if d.identity else -(-max(d.rate_in // 50, 1) // d.block_in)
        self._buf = np.zeros(d.history + d.block_in * 8 * frame_blocks, np.float32)
        self._res = np.empty((frame_blocks + 1, d.block_out), np.float32)
        self._plans: dict[tuple[int, int, int], _Plan] = {}
        self._origin = 0  # buf[origin : origin + H + phase] holds the history
        self._phase = 0  # T mod B: inputs of the current, incomplete block
        self._samples_in = 0

    # -- what the stream is -------------------------------------------------------------

    @property
    def rate_in(self) -> int:
        return self._design.rate_in

    @property
    def rate_out(self) -> int:
        return self._design.rate_out

    @property
    def delay_seconds(self) -> float:
        """Group delay: output sample m is the input signal at m / rate_out - delay."""
        return self._design.delay_seconds

    @property
    def samples_in(self) -> int:
        """Input samples consumed since construction or `reset()`."""
        return self._samples_in

    @property
    def samples_out(self) -> int:
        """Output samples returned since construction or `reset()`: ceil(in * L / M)."""
        return self._design.outputs_after(self._samples_in)

    def output_length(self, n: int) -> int:
        """How many samples the next `n` input samples will produce."""
        d = self._design
        return d.outputs_after(self._samples_in + n) - d.outputs_after(self._samples_in)

    # -- the work -----------------------------------------------------------------------

    def process(self, pcm: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
        """Consume a chunk of PCM16 (int16 array or bytes); return the due output samples
        as a new int16 array (possibly empty)."""
        # HOT PATH, once per frame per call: everything below is written to keep Python
        # overhead under the cost of the arithmetic (locals, no helper calls).
        if type(pcm) is np.ndarray and pcm.dtype is _INT16 and pcm.ndim == 1:
            x = pcm
        else:
            x = as_int16(pcm)
        n = x.shape[0]
        if n > self._limit or n == 0:
            return self._uncommon(x)
        plan = self._plans.get((self._origin, self._phase, n))
        if plan is None:
            plan = self._plan(n)
        move_to, move_from, dst, window, res, flat, count, self._origin, self._phase = plan
        self._samples_in += n
        if move_to is not None:
            np.copyto(move_to, move_from)  # history back to the buffer's start
        np.copyto(dst, x, casting="unsafe")  # int16 -> float32 is exact
        if not count:  # decimating, and this chunk did not complete an output
            return np.empty(0, np.int16)
        np.dot(window, self._matrix, out=res)
        _clip(flat, _LO, _HI, out=flat)
        # Round in place, then a plain cast: cheaper than one casting ufunc into int16.
        return np.rint(flat, out=flat).astype(_INT16)

    def process_bytes(self, data: bytes | bytearray | memoryview) -> bytes:
        """`process` for bytes in and bytes out (native-order PCM16)."""
        return self.process(data).tobytes()

    def reset(self) -> None:
        """Forget the stream: back to silence before the next sample, counters at zero."""
        self._buf.fill(0.0)
        self._origin = 0
        self._phase = 0
        self._samples_in = 0

    # -- internals ----------------------------------------------------------------------

    def _uncommon(self, x: np.ndarray) -> np.ndarray:
        """Empty chunks, the identity, and chunks too long for one step."""
        n = x.shape[0]
        if n == 0:
            return np.empty(0, np.int16)
        if not self._limit:
            self._samples_in += n
            return x.copy()
        limit = self._limit
        return np.concatenate([self.process(x[i : i + limit]) for i in range(0, n, limit)])

    def _plan(self, n: int) -> _Plan:
        """Work out, once per (origin, phase, n), the views a step of n inputs uses.

        Building views costs more than the arithmetic on a 20 ms frame, and steady
        traffic repeats the same few keys, so the plans are cached per stream.
        """
        d = self._design
        block, history, up, down, block_out = d.block_in, d.history, d.up, d.down, d.block_out
        phase, end = self._phase, self._phase + n
        blocks = -(-end // block)
        if history + block * blocks > self._buf.shape[0]:
            self._grow_buffer(history + block * 2 * blocks)
        key = (self._origin, phase, n)
        origin = self._origin
        buf = self._buf
        move_to = move_from = None
        if origin + history + block * blocks > buf.shape[0]:
            move_to = buf[: history + phase]
            move_from = buf[origin : origin + history + phase]
            origin = 0
        dst = buf[origin + history + phase : origin + history + end]

        # Outputs due, numbered from the current block's first output.
        first = -(-phase * up // down)
        stop = -(-end * up // down)
        window = res = flat = None
        if stop > first:
            b0 = first // block_out
            nb = (stop - 1) // block_out - b0 + 1
            if nb > self._res.shape[0]:
                self._res = np.empty((nb, block_out), np.float32)
                self._plans.clear()  # they hold views of the old array
            itemsize = buf.itemsize
            window = np.ndarray(
                (nb, history + block),
                np.float32,
                buf,
                (origin + b0 * block) * itemsize,
                (block * itemsize, itemsize),
            )
            res = self._res[:nb]
            flat = res.reshape(-1)[first - b0 * block_out : stop - b0 * block_out]
        done = end // block
        plan = _Plan(
            move_to,
            move_from,
            dst,
            window,
            res,
            flat,
            stop - first,
            origin + done * block,
            end - done * block,
        )
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _grow_buffer(self, size: int) -> None:
        """A chunk needs more room than the buffer has: reallocate, history first."""
        keep = self._design.history + self._phase
        buf = np.zeros(size, np.float32)
        buf[:keep] = self._buf[self._origin : self._origin + keep]
        self._buf = buf
        self._origin = 0
        self._plans.clear()
