"""Polyphase FIR tables for rational-ratio resampling: designed once per rate pair, shared.

The model. Resampling `rate_in -> rate_out` is upsampling by L, low-pass filtering, and
downsampling by M, with L/M = rate_out/rate_in in lowest terms. The low-pass `h` runs at
the virtual rate `rate_in * L`; output m is

    y[m] = sum_k h[k] * x_up[m*M - k],   x_up[j*L] = x[j], zero elsewhere,

so it reads only the inputs x[j] with 0 <= m*M - j*L < len(h). The filter is a Kaiser
window design (scipy `kaiserord` + `firwin`): passband edge 0.85 and stopband edge 1.15 of
the narrower Nyquist frequency (min(rate_in, rate_out) / 2), 90 dB stopband, gain L (the
zero-stuffing loses a factor L). It is linear-phase, so every frequency is delayed by
exactly `(len(h) - 1) / 2` samples of the virtual rate: `delay_seconds`, between 0.8 and
2.4 ms for the rates the project uses.

The block matrix. Inputs are cut into blocks of B samples, B a multiple of M, so every
block starts at the same filter phase and yields the same Bo = B*L/M outputs. The Bo
outputs of a block depend only on that block's B inputs and the H = (len(h) - 1) // L
inputs before it, so one dense matrix `matrix` of shape (H + B, Bo) gives them all:

    outputs_of_block_b = inputs[b*B - H : b*B + B] @ matrix

A column of `matrix` is zero for every input later than its output's instant, so the
outputs that are due (there are ceil(T*L/M) after T inputs) never depend on inputs that
have not arrived. That lets a stream compute a partly filled last block with stale data
in its unfilled part (old samples or zeros: finite, so their zero weights cancel them
exactly) and keep only the outputs that are due: no added latency, any chunk size.
B is chosen near H/2 (and to divide the 20 ms frame), which keeps the matrix small (about
1.5 times the taps actually used per output) and the work one BLAS call per chunk.

Invariants: `design()` returns the same frozen, read-only object for the same pair (an
LRU cache shared by every stream in the process); nothing here holds stream state.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import signal

from bridge.media.errors import UnsupportedRate
from bridge.media.pcm import check_rate

__all__ = ["PolyphaseDesign", "design"]

ATTENUATION_DB = 90.0
PASSBAND_EDGE = 0.85  # of the narrower Nyquist frequency
STOPBAND_EDGE = 1.15

# Bounds that keep one design's tables small: L and M come from the rates' ratio in lowest
# terms (8000 -> 16000 is 2/1, 22050 -> 8000 is 160/441); a ratio like 16000/8001 would
# need a filter with ~10^6 taps and is refused rather than built.
_MAX_FACTOR = 1024
_MAX_MATRIX_ELEMENTS = 1 << 22  # 16 MiB of float32
_MIN_BLOCK = 16  # inputs per block at least, so a tiny H does not mean many tiny rows


@dataclass(frozen=True, eq=False)
class PolyphaseDesign:
    """The shared tables for one rate pair. Build with `design()`, never directly."""

    rate_in: int
    rate_out: int
    up: int  # L
    down: int  # M
    taps: np.ndarray  # h, float64, at rate_in * up, gain `up`; empty for the identity
    history: int  # H: inputs before a block that its outputs read
    block_in: int  # B: inputs per block, a multiple of `down`
    block_out: int  # Bo = B * up / down
    matrix: np.ndarray  # (H + B, Bo) float32, read-only
    delay_seconds: float

    @property
    def identity(self) -> bool:
        """True when the rates are equal: a stream passes samples through untouched."""
        return self.up == self.down

    def outputs_after(self, total_inputs: int) -> int:
        """Outputs due after `total_inputs` inputs since the stream began: ceil(T*L/M)."""
        return -(-total_inputs * self.up // self.down)


def design(rate_in: int, rate_out: int) -> PolyphaseDesign:
    """The tables for `rate_in -> rate_out`, built once per process and shared.

    Raises `UnsupportedRate` for a rate that is not an integer in range or a ratio whose
    tables would be unreasonably large.
    """
    return _design(check_rate(rate_in, "rate_in"), check_rate(rate_out, "rate_out"))


@functools.lru_cache(maxsize=64)
def _design(rate_in: int, rate_out: int) -> PolyphaseDesign:
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    if up == down:
        empty = np.zeros((0, 0), np.float32)
        empty.flags.writeable = False
        return PolyphaseDesign(rate_in, rate_out, 1, 1, np.zeros(0), 0, 1, 1, empty, 0.0)
    if max(up, down) > _MAX_FACTOR:
        raise UnsupportedRate(
            f"{rate_in} -> {rate_out} Hz reduces to {up}/{down}; factors above {_MAX_FACTOR} "
            "need an unreasonably long filter: use rates with a larger common divisor"
        )
    taps = _prototype(rate_in, rate_out, up)
    history = (len(taps) - 1) // up
    block_in = _block_size(rate_in, down, history)
    block_out = block_in * up // down
    if (history + block_in) * block_out > _MAX_MATRIX_ELEMENTS:
        raise UnsupportedRate(
            f"{rate_in} -> {rate_out} Hz needs a {history + block_in}x{block_out} filter matrix; "
            "use rates with a larger common divisor"
        )
    matrix = _block_matrix(taps, up, down, history, block_in, block_out)
    taps.flags.writeable = False
    matrix.flags.writeable = False
    delay = (len(taps) - 1) / 2 / (rate_in * up)
    return PolyphaseDesign(
        rate_in, rate_out, up, down, taps, history, block_in, block_out, matrix, delay
    )


def _prototype(rate_in: int, rate_out: int, up: int) -> np.ndarray:
    """Kaiser-window low-pass at the virtual rate rate_in*up, gain `up`."""
    virtual = rate_in * up
    nyquist = min(rate_in, rate_out) / 2
    width = (STOPBAND_EDGE - PASSBAND_EDGE) * nyquist
    numtaps, beta = signal.kaiserord(ATTENUATION_DB, width / (virtual / 2))
    cutoff = (PASSBAND_EDGE + STOPBAND_EDGE) / 2 * nyquist
    taps = signal.firwin(numtaps, cutoff, window=("kaiser", beta), fs=virtual)
    return taps * up  # zero-stuffing divided the signal's level by `up`: give it back


def _block_size(rate_in: int, down: int, history: int) -> int:
    """Smallest multiple of M that is at least max(H/2, _MIN_BLOCK), preferring one that
    divides the 20 ms frame so steady 20 ms traffic never computes a partial block.

    Why H/2: a block costs (H + B) * Bo multiply-adds for Bo outputs, so smaller blocks
    waste less on the zero triangle of the matrix, but each block is a row that BLAS
    copies (the rows overlap in the buffer); measured on 20 ms frames, B near H/2 was
    fastest for every pair (8 -> 16 kHz: 6.3 µs at B = 20 against 6.9 at B = 40).
    """
    target = max(-(-history // 2), _MIN_BLOCK)
    if rate_in % 50 == 0:
        frame = rate_in // 50
        for b in range(down, frame + 1, down):
            if b >= target and frame % b == 0:
                return b
    return down * -(-target // down)


def _block_matrix(
    taps: np.ndarray, up: int, down: int, history: int, block_in: int, block_out: int
) -> np.ndarray:
    """matrix[c, i]: weight of input (block start - H + c) in the block's output i."""
    matrix = np.zeros((history + block_in, block_out), np.float64)
    n = len(taps)
    for i in range(block_out):
        position = i * down  # output i's instant on the virtual-rate grid, from block start
        last = position // up  # newest input it reads, from block start
        phase = position - last * up
        k = np.arange((n - 1 - phase) // up + 1)  # k-th input back from `last`
        matrix[history + last - k, i] = taps[phase + k * up]
    return matrix.astype(np.float32)
