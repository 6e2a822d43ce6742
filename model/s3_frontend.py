"""The S3 tokenizer's front end: Whisper-style log-mel features from 16 kHz PCM, in torch.

Model (what the S3 encoder was trained on, so every step is fixed, not a choice):

- STFT with `n_fft` 400, hop 160 (100 frames/s), a periodic Hann window of 400 samples,
  centred frames (reflect padding of n_fft/2 at both ends);
- power spectrum, dropping the LAST FRAME (Whisper's `stft[..., :-1]`): `n` samples give
  exactly `n // hop` frames, which is what makes 1 s give 100 frames and 50 (or 25) codes;
- Slaney-style mel filters (librosa's default `norm="slaney"`, `htk=False`, 0 Hz..sr/2),
  computed here with numpy so librosa is not a dependency;
- `log10(max(mel, 1e-10))`, floored at `max - 8.0`, then `(x + 4) / 4`.

The floor uses the maximum over *the input given*. Whole-utterance encoding gives the whole
utterance; the streaming tokenizer gives its window (look-back + step + look-ahead), so in
streaming "max" is the loudest mel bin of the current window. A stream that encodes only
its new frames also computes only their features (`log_power_batch` from a first frame,
the same values as that part of the whole window's) and keeps each earlier code's loudest
bin from when it was new (its frames then had the same real context, except a window's
first frames, which the whole window reflect-pads). The two differ only where a frame lies more than 8 decades
(80 dB) below the maximum, i.e. in near silence next to loud speech (docs/tokenizer.md:
measured, not what limits streamed codes).

Inputs of `n <= n_fft // 2` samples cannot be reflect-padded; they are zero-padded instead
(they yield at most one frame, so this only matters for sub-frame fragments).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["slaney_mel_filters", "LogMel", "n_frames"]

# Slaney's auditory-toolbox mel scale (librosa htk=False): linear below 1 kHz, log above.
_F_SP = 200.0 / 3.0  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15 mels
_LOGSTEP = math.log(6.4) / 27.0  # log-spaced part: 27 mels per factor 6.4

LOG_FLOOR = 1e-10  # clamp before log10
DYNAMIC_RANGE = 8.0  # decades kept below the maximum


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    with np.errstate(divide="ignore"):
        logpart = _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-300) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, logpart, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = _F_SP * mel
    logpart = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, logpart, linear)


def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int,
                       fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Mel filter bank `(n_mels, n_fft // 2 + 1)` float32, equal to
    `librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)` (Slaney scale and
    Slaney area normalisation), which is what Whisper's `mel_filters.npz` holds."""
    fmax = sample_rate / 2.0 if fmax is None else fmax
    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    # n_mels + 2 edge frequencies, evenly spaced in mel: filter i spans edges i..i+2.
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    # librosa stores the triangles as float32, then scales by 2/(bandwidth) in float64;
    # doing the same rounding keeps the bank bit-compatible with Whisper's saved one.
    area_norm = 2.0 / (edges[2:] - edges[:-2])
    return (triangles.astype(np.float64) * area_norm[:, None]).astype(np.float32)


def n_frames(n_samples: int, hop: int = 160) -> int:
    """Mel frames for `n_samples` samples: centred STFT gives `1 + n // hop` frames and the
    last one is dropped."""
    return max(0, n_samples) // hop


class LogMel:
    """Callable front end holding the window and filter bank on one device.

    `__call__(pcm)` takes a 1-D float tensor (16 kHz, [-1, 1]) and returns
    `(n_mels, n // hop)` float32 log-mel features normalised as Whisper does.
    Not a `nn.Module`: it has no weights to save, and stays float32 whatever the encoder
    dtype (the log of tiny powers needs the range)."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, hop: int = 160,
                 n_mels: int = 128, device: torch.device | str = "cpu") -> None:
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop = hop
        self.n_mels = n_mels
        self.device = torch.device(device)
        self.window = torch.hann_window(n_fft, periodic=True, dtype=torch.float32, device=self.device)
        self.filters = torch.from_numpy(slaney_mel_filters(sample_rate, n_fft, n_mels)).to(self.device)

    def power_mel(self, pcm: torch.Tensor) -> torch.Tensor:
        """Mel power `(n_mels, frames)` before the log."""
        pcm = pcm.to(self.device, torch.float32).reshape(-1)
        frames = n_frames(pcm.numel(), self.hop)
        if frames == 0:
            return torch.zeros(self.n_mels, 0, device=self.device)
        # Reflect padding needs more samples than the pad; tiny inputs fall back to zeros.
        pad_mode = "reflect" if pcm.numel() > self.n_fft // 2 else "constant"
        spec = torch.stft(pcm, self.n_fft, self.hop, window=self.window, center=True,
                          pad_mode=pad_mode, return_complex=True)
        power = _power(spec[:, :frames])  # drops the last frame, as Whisper does
        return self.filters @ power

    def __call__(self, pcm: torch.Tensor) -> torch.Tensor:
        mel = self.power_mel(pcm)
        if mel.shape[1] == 0:
            return mel
        log = mel.clamp_min(LOG_FLOOR).log10()
        log = torch.maximum(log, log.max() - DYNAMIC_RANGE)
        return (log + 4.0) / 4.0

    def batch(self, pcm: torch.Tensor) -> torch.Tensor:
        """`(B, n)` windows of equal length -> `(B, n_mels, n // hop)`, each row exactly
        what `__call__` gives for it alone (the floor is per row)."""
        pcm = pcm.to(self.device, torch.float32)
        frames = n_frames(pcm.shape[1], self.hop)
        if frames == 0 or pcm.shape[1] <= self.n_fft // 2:
            return torch.stack([self(row) for row in pcm]) if len(pcm) else pcm.new_zeros(0, self.n_mels, frames)
        log = self.log_power_batch(pcm)
        return self.normalise(log, log.amax(dim=(1, 2)))

    def log_power_batch(self, pcm: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        """`(B, n)` windows (n > n_fft / 2) -> `log10(max(mel, 1e-10))` of frames
        `[first_frame, n // hop)`, before the floor: the values those frames have in the
        whole window's features, at the STFT cost of those frames alone."""
        pcm = pcm.to(self.device, torch.float32)
        frames = n_frames(pcm.shape[1], self.hop) - first_frame
        half = self.n_fft // 2
        # stft(center=True) reflect-pads the whole window; pad it the same way, then
        # transform only from the first wanted frame's start.
        padded = torch.nn.functional.pad(pcm[:, None], (half, half), mode="reflect")[:, 0]
        spec = torch.stft(padded[:, first_frame * self.hop:], self.n_fft, self.hop, window=self.window,
                          center=False, return_complex=True)
        return (self.filters @ _power(spec[..., :frames])).clamp_min(LOG_FLOOR).log10()

    @staticmethod
    def normalise(log: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """`(B, n_mels, frames)` log power, `(B,)` loudest bin of each row's window -> the
        encoder's features: floored `DYNAMIC_RANGE` below the peak, scaled as Whisper."""
        return (torch.maximum(log, peak[:, None, None] - DYNAMIC_RANGE) + 4.0) / 4.0


def _power(spec: torch.Tensor) -> torch.Tensor:
    """|spec|² as re² + im²: abs().square() without its square root (3.5x faster)."""
    return spec.real.square() + spec.imag.square()
