"""PCM16 values at the media boundary: validation and conversion, shared by every module.

The model: audio inside the bridge is signed 16-bit linear PCM, mono, in the machine's
native byte order (little-endian on every platform we run on), held either as `bytes`
(what codecs and sockets speak) or as a 1-D `numpy.int16` array (what the DSP computes on).
`as_int16` turns either into an array *view* without copying; callers that keep the data
past the call must copy it.

Rates are plain integers in hertz; `check_rate` is the one place that says what is valid.
"""

from __future__ import annotations

import operator

import numpy as np

from bridge.media.errors import BadFrameSize, BadPcm, UnsupportedRate

__all__ = ["MAX_RATE", "MIN_RATE", "PcmLike", "as_int16", "check_rate", "frame_samples"]

MIN_RATE = 1_000
MAX_RATE = 384_000

PcmLike = bytes | bytearray | memoryview | np.ndarray

_INT16 = np.dtype(np.int16)


def check_rate(rate: object, what: str = "rate") -> int:
    """Return `rate` as an int, or raise `UnsupportedRate` naming `what`."""
    if isinstance(rate, bool):
        raise UnsupportedRate(f"{what}={rate!r}: a sample rate is an integer in Hz, not a bool")
    try:
        value = operator.index(rate)  # int or numpy integer; refuses 16000.0 and "16000"
    except TypeError:
        raise UnsupportedRate(f"{what}={rate!r}: a sample rate is an integer in Hz") from None
    if not MIN_RATE <= value <= MAX_RATE:
        raise UnsupportedRate(f"{what}={value}: must be between {MIN_RATE} and {MAX_RATE} Hz")
    return value


def frame_samples(rate: int, frame_ms: object) -> int:
    """Samples in one frame of `frame_ms` milliseconds at `rate`; must be a whole number."""
    numeric = (int, float, np.integer, np.floating)
    if isinstance(frame_ms, bool) or not isinstance(frame_ms, numeric):
        raise BadFrameSize(f"frame_ms={frame_ms!r}: must be a number of milliseconds")
    if not frame_ms > 0:
        raise BadFrameSize(f"frame_ms={frame_ms!r}: must be positive")
    exact = rate * float(frame_ms) / 1000.0
    n = round(exact)
    if n < 1 or abs(exact - n) > 1e-9:
        raise BadFrameSize(
            f"frame_ms={frame_ms!r} at {rate} Hz is {exact:g} samples; "
            "a frame must hold a whole number"
        )
    return n


def as_int16(pcm: object) -> np.ndarray:
    """View `pcm` (bytes-like of even length, or a 1-D int16 array) as a 1-D int16 array.

    Never copies a contiguous input. Raises `BadPcm` for odd byte counts, other dtypes,
    other shapes. An empty input gives an empty array: whether empty is allowed is the
    caller's decision.
    """
    if type(pcm) is bytes:  # the common case first: a payload off the wire
        if len(pcm) & 1:
            raise BadPcm(f"PCM16 needs an even number of bytes, got {len(pcm)}")
        return np.frombuffer(pcm, _INT16)
    if isinstance(pcm, np.ndarray):
        if pcm.dtype != _INT16:
            raise BadPcm(f"PCM16 array must have dtype int16, got {pcm.dtype}")
        if pcm.ndim != 1:
            raise BadPcm(f"PCM16 array must be 1-D (mono), got shape {pcm.shape}")
        return pcm
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        nbytes = pcm.nbytes if isinstance(pcm, memoryview) else len(pcm)
        if nbytes & 1:
            raise BadPcm(f"PCM16 needs an even number of bytes, got {nbytes}")
        if isinstance(pcm, memoryview) and not pcm.c_contiguous:
            raise BadPcm("PCM16 memoryview must be contiguous")
        return np.frombuffer(pcm, _INT16)  # a dtype object, not np.int16: faster
    raise BadPcm(f"PCM16 must be bytes-like or an int16 array, got {type(pcm).__name__}")
