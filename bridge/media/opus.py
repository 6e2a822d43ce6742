"""Opus through libopus's own C API (ctypes): mono, 20 ms frames, at the rate we want.

Why not PyAV, which aiortc already brings: its libopus wrapper always decodes at 48 kHz
(the bridge wants 16 kHz, so a resampler followed), and its encode path costs about twice
libopus's own work (measured here, CELT mono 24 kHz, complexity 0: ~80 us a frame through
PyAV, ~36 us through this module). libopus decodes any packet at 8, 12, 16, 24 or 48 kHz
itself, with its own band-limiting.

The library: the copy PyAV's wheel bundles (always present beside aiortc), else the
system's (`libopus.so.0`, Debian's libopus0). `OpusError` names what failed; a packet
that does not decode leaves the decoder usable for the next one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import weakref
from pathlib import Path

import numpy as np

from bridge.media.errors import BadPcm, MediaError, UnsupportedRate

__all__ = ["OpusDecoder", "OpusEncoder", "OpusError", "OPUS_RATES", "libopus_version"]

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
APPLICATIONS = {"voip": 2048, "audio": 2049, "restricted-lowdelay": 2051}
_SET_BITRATE, _SET_COMPLEXITY, _RESET_STATE = 4002, 4010, 4028
_MAX_PACKET = 1275  # the largest Opus frame (RFC 6716, 3.2.1)


class OpusError(MediaError):
    """libopus refused: the message carries its own words (e.g. "corrupted stream")."""


def _candidates() -> list[str]:
    found = []
    spec = importlib.util.find_spec("av")
    if spec is not None and spec.origin:
        found += sorted(str(p) for p in (Path(spec.origin).parent.parent / "av.libs").glob("libopus*.so*"))
    system = ctypes.util.find_library("opus")
    if system:
        found.append(system)
    return found


def _load() -> ctypes.CDLL:
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        p, i, i32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int32
        lib.opus_get_version_string.restype = ctypes.c_char_p
        lib.opus_strerror.restype, lib.opus_strerror.argtypes = ctypes.c_char_p, [i]
        lib.opus_decoder_create.restype = p
        lib.opus_decoder_create.argtypes = [i32, i, ctypes.POINTER(i)]
        lib.opus_decode.argtypes = [p, ctypes.c_char_p, i32, p, i, i]
        lib.opus_decoder_destroy.argtypes = [p]
        lib.opus_encoder_create.restype = p
        lib.opus_encoder_create.argtypes = [i32, i, i, ctypes.POINTER(i)]
        lib.opus_encode.argtypes = [p, p, i, p, i32]
        # variadic in C: fix only the two named parameters, pass the request's argument as a
        # c_int32 (ctypes then makes a variadic call, which some ABIs need)
        lib.opus_encoder_ctl.argtypes = [p, i]
        lib.opus_encoder_destroy.argtypes = [p]
        return lib
    raise OpusError("libopus not found: install PyAV (it bundles one; aiortc depends on it) "
                    "or Debian's libopus0")


_LIB: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = _load()
    return _LIB


def libopus_version() -> str:
    return _lib().opus_get_version_string().decode()


def _check(code: int, what: str) -> int:
    if code < 0:
        raise OpusError(f"{what}: {_lib().opus_strerror(code).decode()}")
    return code


def _check_rate(rate: int) -> None:
    if rate not in OPUS_RATES:
        raise UnsupportedRate(f"Opus runs at {', '.join(map(str, OPUS_RATES))} Hz, not {rate!r}")


class OpusEncoder:
    """Mono PCM16 at `rate`, 20 ms a call to `encode` -> one Opus packet (bytes)."""

    def __init__(self, rate: int, *, bitrate: int = 32000, complexity: int = 0,
                 application: str = "restricted-lowdelay") -> None:
        _check_rate(rate)
        if application not in APPLICATIONS:
            raise ValueError(f"application must be one of {sorted(APPLICATIONS)}")
        if not 0 <= complexity <= 10:
            raise ValueError("complexity must be 0..10")
        lib = _lib()
        err = ctypes.c_int()
        handle = lib.opus_encoder_create(rate, 1, APPLICATIONS[application], ctypes.byref(err))
        _check(err.value, "opus_encoder_create")
        self._handle = handle
        self._finalizer = weakref.finalize(self, lib.opus_encoder_destroy, handle)
        _check(lib.opus_encoder_ctl(handle, _SET_BITRATE, ctypes.c_int32(bitrate)), "bitrate")
        _check(lib.opus_encoder_ctl(handle, _SET_COMPLEXITY, ctypes.c_int32(complexity)), "complexity")
        self.rate = rate
        self.frame_samples = rate // 50
        self._out = ctypes.create_string_buffer(_MAX_PACKET)

    def encode(self, pcm: np.ndarray) -> bytes:
        if pcm.dtype != np.int16 or pcm.shape != (self.frame_samples,):
            raise BadPcm(f"Opus at {self.rate} Hz takes int16[{self.frame_samples}] (20 ms), "
                         f"got {pcm.dtype}{list(pcm.shape)}")
        pcm = np.ascontiguousarray(pcm)
        n = _check(_lib().opus_encode(self._handle, pcm.ctypes.data, self.frame_samples, self._out,
                                      _MAX_PACKET), "opus_encode")
        return self._out.raw[:n]

    def reset(self) -> None:
        """Back to a fresh stream's state (what a decoder that just heard silence has)."""
        _check(_lib().opus_encoder_ctl(self._handle, _RESET_STATE), "reset")


class OpusDecoder:
    """Opus packets (any mode, any rate they were made at) -> mono PCM16 at `rate`."""

    def __init__(self, rate: int) -> None:
        _check_rate(rate)
        lib = _lib()
        err = ctypes.c_int()
        handle = lib.opus_decoder_create(rate, 1, ctypes.byref(err))
        _check(err.value, "opus_decoder_create")
        self._handle = handle
        self._finalizer = weakref.finalize(self, lib.opus_decoder_destroy, handle)
        self.rate = rate
        self._max_samples = rate * 120 // 1000  # the longest Opus packet: 120 ms

    def decode(self, packet: bytes) -> np.ndarray:
        """A new int16 array: the packet's whole duration (20 ms for a browser's packets).
        OpusError for a packet libopus cannot decode; the decoder goes on with the next."""
        if not packet:
            raise OpusError("an empty packet (use packet loss concealment instead)")
        out = np.empty(self._max_samples, np.int16)
        n = _check(_lib().opus_decode(self._handle, packet, len(packet), out.ctypes.data,
                                      self._max_samples, 0), "opus_decode")
        return out[:n]
