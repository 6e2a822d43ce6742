"""Text to speech for synthetic dialogues: Debian's espeak-ng, run as a subprocess.

espeak-ng writes a 22.05 kHz mono WAV to stdout (`--stdout`; the text goes on stdin, so a
turn that starts with '-' is never read as an option). The header's length fields are
placeholders when writing to a pipe, so the samples are everything after the header.
The speech is resampled to 16 kHz with scipy's `resample_poly` (zero-phase; 40 times
faster than the bridge's streaming resampler on whole clips at this 320/441 ratio, and no
stream is involved here) and trimmed of
espeak-ng's leading and trailing silence: a clip's first and last samples are then the
speech's, which is what makes the manifest's turn times the times of speech on the line.
"""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
import wave
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

from .data_errors import DataError

__all__ = ["ASSISTANT_VOICE", "RATE", "Voice", "require_espeak", "speak", "user_voice"]

RATE = 16_000
ESPEAK_RATE = 22_050
TRIM_DB = 40.0  # a 5 ms frame this far below the clip's loudest counts as silence
TRIM_FRAME = RATE // 200


@dataclass(frozen=True)
class Voice:
    name: str  # espeak-ng's -v: language[+variant]
    pitch: int  # -p, 0..99
    speed: int  # -s, words per minute

    def describe(self) -> str:
        return f"{self.name} pitch {self.pitch} speed {self.speed}"


# Callers: American, Caribbean and Scottish English, male and female variants; the
# assistant: one fixed British (received pronunciation) voice, as the model has one voice.
_USER_LANGS = ("en-us", "en-us", "en-029", "en-gb-scotland")
_USER_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5")
ASSISTANT_VOICE = Voice("en-gb-x-rp+f2", 50, 165)


def user_voice(rng: np.random.Generator) -> Voice:
    lang = _USER_LANGS[int(rng.integers(0, len(_USER_LANGS)))]
    variant = _USER_VARIANTS[int(rng.integers(0, len(_USER_VARIANTS)))]
    return Voice(f"{lang}+{variant}", int(rng.integers(30, 71)), int(rng.integers(145, 191)))


def require_espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise DataError("espeak-ng is not installed (needed to speak the dialogues): "
                        "`apt-get install espeak-ng` on Debian; scripts/system-packages.txt lists it")
    return path


@functools.lru_cache(maxsize=64)  # backchannels, and the turn an interruption peeks at
def speak(text: str, voice: Voice) -> np.ndarray:
    """`text` in `voice`: float32 at 16 kHz, full scale 1.0, silence trimmed; read-only."""
    cmd = [require_espeak(), "--stdout", "--stdin", "-v", voice.name, "-p", str(voice.pitch),
           "-s", str(voice.speed)]
    try:
        done = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise DataError(f"espeak-ng took over 120 s on {text[:60]!r}") from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise DataError(f"espeak-ng failed ({done.returncode}) with voice {voice.name}: {err}")
    pcm = _wav_samples(done.stdout).astype(np.float32) / 32768.0
    audio = _trim(resample_poly(pcm, 320, 441).astype(np.float32))  # 16000 / 22050
    if audio.size == 0:
        raise DataError(f"espeak-ng produced no speech for {text[:60]!r}")
    audio.flags.writeable = False
    return audio


def _wav_samples(data: bytes) -> np.ndarray:
    try:
        with wave.open(io.BytesIO(data)) as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, ESPEAK_RATE):
                raise DataError(f"espeak-ng wrote {w.getnchannels()} channel(s), {8 * w.getsampwidth()}-bit, "
                                f"{w.getframerate()} Hz; expected mono 16-bit {ESPEAK_RATE} Hz")
            frames = w.readframes(1 << 30)  # to the end: the piped header's count is a placeholder
    except (wave.Error, EOFError) as exc:
        raise DataError(f"espeak-ng's output is not a WAV file: {exc}") from None
    return np.frombuffer(frames[: len(frames) & ~1], "<i2").astype(np.int16)


def _trim(audio: np.ndarray) -> np.ndarray:
    n = audio.size // TRIM_FRAME
    if n == 0:
        return audio[:0]
    energy = np.square(audio[: n * TRIM_FRAME].reshape(n, TRIM_FRAME), dtype=np.float64).mean(1)
    loud = np.flatnonzero(energy > energy.max() * 10 ** (-TRIM_DB / 10))
    return audio[loud[0] * TRIM_FRAME : (loud[-1] + 1) * TRIM_FRAME].copy()
