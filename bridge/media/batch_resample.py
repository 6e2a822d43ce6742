"""`ResampleBatch`: one tick's chunks of many `Resampler` streams, resampled together.

The model. A batch collects (stream, chunk) pairs during one tick and then computes every
output in one numpy operation per group; each stream's output is exactly, bit for bit,
what `stream.process(chunk)` would have returned, and each stream's state moves exactly as
`process` moves it. The batch adds no filter logic of its own: `add()` runs the stream's
own step (`Resampler._advance`: history, input copy, the cached plan) and copies the rows
the step would have multiplied into a staging array; `run()` multiplies them.

Groups and exactness. A group is one filter design (rate pair) and one row count (the
blocks a chunk touches: 8 for every steady 20 ms frame of 8 -> 16 kHz; 1-4 frames read in
a tick give 4 or so distinct counts). One `np.matmul` over the group's (streams, blocks,
H + B) stack calls the BLAS kernel once per stream with the same shapes as the per-stream
`np.dot` does, so the float32 sums are the same sums in the same order: stacking all rows
into one 2-D product would not be (OpenBLAS picks its kernel by row count, and a 1-row
product is a gemv: the last float bit differs, and after rounding about 1 % of samples
move by one LSB). The clip and the rounding are elementwise, done once per group.

Streams that the per-stream path handles outside the matrix product (empty chunks, the
identity, chunks over the step limit) are simply processed at `add()`: same result.

Use: `ticket = batch.add(stream, pcm)` for each chunk (in any order; a stream may appear
more than once, its chunks then follow each other as in `process`), `batch.run()`, then
`batch.result(ticket)` for each, then `batch.clear()` before the next tick (the staging
arrays are kept, so a steady tick allocates only each group's int16 output). A result is
a view of that group's output array for the tick: read it, do not write into it.
Malformed input raises `BadPcm` at `add()` before any state changes. Not thread-safe;
never logs.
"""

from __future__ import annotations

import numpy as np

from bridge.media.pcm import as_int16
from bridge.media.polyphase import PolyphaseDesign
from bridge.media.resample import _HI, _INT16, _LO, Resampler, _clip

__all__ = ["ResampleBatch"]

_EMPTY = np.empty(0, np.int16)
_EMPTY.flags.writeable = False


class _Group:
    """The staged rows of every chunk of one design touching `blocks` blocks."""

    __slots__ = ("matrix", "stage", "res", "count", "out")

    def __init__(self, d: PolyphaseDesign, blocks: int) -> None:
        self.matrix = d.matrix
        self.stage = np.empty((8, blocks, d.history + d.block_in), np.float32)
        self.res = np.empty((8, blocks, d.block_out), np.float32)
        self.count = 0
        self.out = _EMPTY  # the int16 outputs of the last run, flat

    def grow(self) -> None:
        stage = np.empty((2 * self.stage.shape[0], *self.stage.shape[1:]), np.float32)
        stage[: self.count] = self.stage[: self.count]
        self.stage = stage
        self.res = np.empty((stage.shape[0], *self.res.shape[1:]), np.float32)


class ResampleBatch:
    __slots__ = ("_groups", "_jobs", "_used")

    def __init__(self) -> None:
        self._groups: dict[tuple[PolyphaseDesign, int], _Group] = {}
        self._used: list[_Group] = []  # groups with rows this tick
        # Per ticket: an output array already, or (group, start, stop) in its flat output.
        self._jobs: list[np.ndarray | tuple[_Group, int, int]] = []

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, stream: Resampler, pcm: bytes | bytearray | memoryview | np.ndarray) -> int:
        """Consume `pcm` into `stream` now; its output is `result(ticket)` after `run()`."""
        if type(pcm) is np.ndarray and pcm.dtype is _INT16 and pcm.ndim == 1:
            x = pcm
        else:
            x = as_int16(pcm)
        n = x.shape[0]
        jobs = self._jobs
        if n > stream._limit or n == 0:  # the identity, empty or long chunks: no product
            jobs.append(stream.process(x))
            return len(jobs) - 1
        _, _, _, window, _, _, skip, count, _, _ = stream._advance(x, n)
        if not count:
            jobs.append(_EMPTY)
            return len(jobs) - 1
        blocks = window.shape[0]
        key = (stream._design, blocks)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(stream._design, blocks)
        i = group.count
        if i == 0:
            self._used.append(group)
        elif i == group.stage.shape[0]:
            group.grow()
        group.stage[i] = window  # item assignment: np.copyto's wrapper costs more than the copy
        group.count = i + 1
        start = i * blocks * group.res.shape[2] + skip
        jobs.append((group, start, start + count))
        return len(jobs) - 1

    def run(self) -> None:
        """Compute every staged output: one matmul, clip, rounding and cast per group."""
        for group in self._used:
            res = group.res[: group.count]
            np.matmul(group.stage[: group.count], group.matrix, out=res)
            _clip(res, _LO, _HI, out=res)
            group.out = np.rint(res, out=res).astype(_INT16).reshape(-1)

    def result(self, ticket: int) -> np.ndarray:
        """The output of `add()`'s chunk `ticket` (after `run()`): int16, possibly empty."""
        job = self._jobs[ticket]
        if type(job) is tuple:
            group, start, stop = job
            return group.out[start:stop]
        return job  # type: ignore[return-value]

    def clear(self) -> None:
        """Forget this tick's chunks (results already taken stay valid)."""
        for group in self._used:
            group.count = 0
        self._used.clear()
        self._jobs.clear()
