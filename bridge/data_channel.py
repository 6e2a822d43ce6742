"""The caller's side of a synthetic call: level, background noise, and the phone line.

SNR definition (docs/training.md): over the *active* samples A of the clean user speech s,

    SNR = 10 log10( sum_{t in A} s[t]^2 / sum_{t in A} n[t]^2 )

where A is every sample of the 20 ms frames whose energy is within `ACTIVE_DB` (30 dB) of
the loudest frame of s. Measuring over active speech only keeps the SNR of a call from
depending on how much silence it has (the idea of ITU-T P.56's active level, simplified).

The phone line: 16 kHz -> 8 kHz -> G.711 encode and decode -> 16 kHz, through
bridge/media's resamplers and codec, as a call's audio reaches the engine. Both resampling
filters' group delays are taken off, so the line does not shift the manifest's times.
"""

from __future__ import annotations

import numpy as np
from scipy.fft import irfft, next_fast_len

from .data_manifest import LAWS, NOISES
from .media import Resampler, alaw_decode, alaw_encode, ulaw_decode, ulaw_encode

__all__ = ["ACTIVE_DB", "LAWS", "NOISES", "active_mask", "add_noise", "make_noise", "phone_line",
           "set_level", "to_int16"]

RATE = 16_000
LINE_RATE = 8_000
ACTIVE_FRAME = RATE // 50
ACTIVE_DB = 30.0
_CODECS = {"ulaw": (ulaw_encode, ulaw_decode), "alaw": (alaw_encode, alaw_decode)}
assert set(_CODECS) == set(LAWS)


def active_mask(x: np.ndarray) -> np.ndarray:
    """Per sample: inside a 20 ms frame within ACTIVE_DB of the loudest frame."""
    n = -(-x.size // ACTIVE_FRAME)
    padded = np.zeros(n * ACTIVE_FRAME, np.float64)
    padded[: x.size] = x
    energy = np.square(padded).reshape(n, ACTIVE_FRAME).mean(1)
    loud = energy > energy.max() * 10 ** (-ACTIVE_DB / 10) if energy.max() > 0 else energy > 0
    return np.repeat(loud, ACTIVE_FRAME)[: x.size]


def set_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    """Scale so the active samples' RMS is `dbfs` (full scale 1.0)."""
    mask = active_mask(x)
    rms = float(np.sqrt(np.mean(np.square(x[mask], dtype=np.float64)))) if mask.any() else 0.0
    return x if rms == 0 else (x * (10 ** (dbfs / 20) / rms)).astype(np.float32)


def make_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise: white, or pink (power falling 3 dB per octave, shaped in frequency)."""
    if kind == "white":
        noise = rng.standard_normal(n, np.float32)
    elif kind == "pink":
        size = next_fast_len(n, real=True)  # an awkward length makes the FFT many times slower
        spectrum = rng.standard_normal(size // 2 + 1) + 1j * rng.standard_normal(size // 2 + 1)
        f = np.arange(size // 2 + 1, dtype=np.float64)
        f[0] = np.inf  # no DC
        noise = irfft(spectrum / np.sqrt(f), size)[:n]
    else:
        raise ValueError(f"unknown noise {kind!r}; known: {', '.join(NOISES)}")
    return (noise / np.sqrt(np.mean(np.square(noise)))).astype(np.float32)


def add_noise(speech: np.ndarray, snr_db: float, kind: str,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(speech + noise, the noise added) with the SNR defined above exactly `snr_db`."""
    mask = active_mask(speech)
    noise = make_noise(kind, speech.size, rng)
    p_speech = np.mean(np.square(speech[mask], dtype=np.float64))
    p_noise = np.mean(np.square(noise[mask], dtype=np.float64))
    noise = (noise * np.sqrt(p_speech / p_noise / 10 ** (snr_db / 10))).astype(np.float32)
    return speech + noise, noise


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)


def phone_line(pcm: np.ndarray, law: str) -> np.ndarray:
    """int16 at 16 kHz through 8 kHz G.711 (`law`: ulaw or alaw) and back; same length."""
    encode, decode = _CODECS[law]
    down, up = Resampler(RATE, LINE_RATE), Resampler(LINE_RATE, RATE)
    delay = int(round((down.delay_seconds + up.delay_seconds) * RATE))
    padded = np.concatenate([pcm, np.zeros(delay + 2 * ACTIVE_FRAME, np.int16)])
    narrow = down.process(padded)
    line = np.frombuffer(decode(encode(narrow)), np.int16)
    wide = up.process(line)
    return wide[delay : delay + pcm.size].copy()
