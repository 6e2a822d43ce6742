"""Reading a manifest's audio: a WAV file as float32 samples in [-1, 1] at 16 kHz, one
row per channel (a synthesised dialogue is one stereo file: caller and assistant).

Other rates are resampled (scipy's polyphase filter: ASR/TTS corpora come at 22.05,
24 or 48 kHz); dialogues are written at 16 kHz, so theirs pass through untouched.
"""

from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np

__all__ = ["AudioError", "read_audio", "read_channel", "read_channels"]


class AudioError(ValueError):
    """An audio file is missing or not a mono PCM/float WAV. Nothing was tokenized."""

    def __init__(self, path: object, why: str) -> None:
        self.path = path
        super().__init__(f"{path}: {why}")


def read_audio(path: str | Path, sample_rate: int = 16000) -> tuple[np.ndarray, int]:
    """(samples at `sample_rate` as (channels, n), the file's own rate)."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    path = Path(path)
    try:
        rate, data = wavfile.read(path)
    except FileNotFoundError:
        raise AudioError(path, "no such audio file") from None
    except (ValueError, EOFError) as exc:
        raise AudioError(path, f"not a readable WAV file ({exc})") from None
    data = data[:, None] if data.ndim == 1 else data
    if data.dtype == np.uint8:
        pcm = (data.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.integer):
        pcm = data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    else:
        pcm = data.astype(np.float32)
    if rate != sample_rate:
        g = gcd(rate, sample_rate)
        pcm = resample_poly(pcm, sample_rate // g, rate // g, axis=0).astype(np.float32)
    return np.ascontiguousarray(pcm.T, dtype=np.float32), int(rate)


def read_channels(manifest: str | Path, audio: str, sample_rate: int = 16000) -> np.ndarray:
    """A manifest entry's audio file as (channels, n) (a relative path is relative to the
    manifest's folder)."""
    from .manifest import resolve_audio

    return read_audio(resolve_audio(manifest, audio), sample_rate)[0]


def read_channel(manifest: str | Path, audio: str, column: int | None, sample_rate: int = 16000) -> np.ndarray:
    """One channel of it: `column`, or the first when None."""
    return read_channels(manifest, audio, sample_rate)[column or 0]
