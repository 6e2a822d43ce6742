"""`StandInToneDecoder`: a stand-in for the CosyVoice flow + HiFT decoder, which cannot
run here without its weights. It is NOT speech: every code becomes a short tone whose
pitch is a function of the code (silent speech becomes silence), so the whole audio path
(engine -> decoder -> resampler -> playout) can run and be tested with audible,
checkable output.

Continuity: the oscillator's phase carries across codes and chunks, and the amplitude
ramps between codes, so a chunk boundary adds no click.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .codec import DecoderStream, SpeechDecoder
from .errors import CheckpointError

__all__ = ["StandInToneDecoder"]

KIND = "standin-tone"


class _ToneStream(DecoderStream):
    def __init__(self, decoder: "StandInToneDecoder") -> None:
        self._d = decoder
        self.reset()

    def reset(self) -> None:
        self._phase = 0.0
        self._amp = 0.0

    def push(self, codes: np.ndarray) -> np.ndarray:
        d = self._d
        n = d.samples_per_code
        out = np.empty(len(codes) * n, dtype=np.float32)
        t = np.arange(1, n + 1, dtype=np.float64)
        for i, code in enumerate(np.asarray(codes, dtype=np.int64)):
            silent = code < 0
            freq = 0.0 if silent else d.frequency(int(code))
            target = 0.0 if silent else d.amplitude
            amp = self._amp + (target - self._amp) * np.minimum(t / n * 4, 1.0)  # 1/4-code ramp
            phase = self._phase + 2 * np.pi * freq * t / d.sample_rate
            out[i * n:(i + 1) * n] = amp * np.sin(phase)
            self._phase = float(phase[-1] % (2 * np.pi))
            self._amp = target
        return out


class StandInToneDecoder(SpeechDecoder):
    """Stand-in decoder: code c -> a tone between low_hz and high_hz (not speech)."""

    def __init__(self, sample_rate: int = 22050, token_rate: int = 50, codebook_size: int = 4096,
                 low_hz: float = 300.0, high_hz: float = 3000.0, amplitude: float = 0.3) -> None:
        if sample_rate % token_rate:
            raise ValueError(f"sample_rate {sample_rate} is not a whole number of samples per "
                             f"code at {token_rate} Hz")
        self.sample_rate = sample_rate
        self.token_rate = token_rate
        self.codebook_size = codebook_size
        self.low_hz, self.high_hz, self.amplitude = low_hz, high_hz, amplitude
        self.samples_per_code = sample_rate // token_rate

    def frequency(self, code: int) -> float:
        # A log scale spreads the codes over the band a phone line carries.
        ratio = code / max(self.codebook_size - 1, 1)
        return float(self.low_hz * (self.high_hz / self.low_hz) ** ratio)

    def new_stream(self, voice: str | None = None) -> DecoderStream:
        self.check_voice(voice)  # tones have one voice
        return _ToneStream(self)

    def to_dict(self) -> dict:
        return {"kind": KIND, "sample_rate": self.sample_rate, "token_rate": self.token_rate,
                "codebook_size": self.codebook_size, "low_hz": self.low_hz,
                "high_hz": self.high_hz, "amplitude": self.amplitude}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "StandInToneDecoder":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(path, "decoder file is missing") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(path, f"not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise CheckpointError(path, f"expected a decoder of kind {KIND!r}")
        params = {k: v for k, v in data.items() if k != "kind"}
        try:
            return cls(**params)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(path, f"bad decoder settings: {exc}") from None
