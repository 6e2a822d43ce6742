"""The pitch half of CosyVoice's HiFT vocoder: mel -> f0 -> harmonic excitation.

HiFT is a neural source-filter vocoder: before any waveform is generated, a small
convolutional network predicts f0 from the mel, and a sum of harmonic sines at that f0 is
handed to the generator (`cosyvoice_hift`) as an excitation it shapes. This module is that
source; our own code after the public upstream (FunAudioLLM/CosyVoice, `ConvRNNF0Predictor`,
`SineGen`, `SineGen2`, `SourceModuleHnNSF`).

    mel (B, 80, T) -> 5 x (weight-normed Conv1d k3 + ELU) -> Linear(width, 1) -> |.| = f0 (B, T) Hz
    f0 -> repeat each frame `upsample` times (samples per mel frame)
       -> harmonics k = 1..H+1: sin of the running phase of k * f0, amplitude `alpha`,
          zero where f0 <= voiced threshold, plus Gaussian noise
       -> Linear(H+1, 1) -> tanh = source (B, 1, T * upsample)

The two official families accumulate the phase differently, and the difference is audible
at a chunk boundary, so both are kept exactly:

- `"SineGen"` (v1, 22 050 Hz): the phase is a per-sample float32 running sum of k*f0/sr,
  wrapped to [0, 1) after summing, times 2*pi; a random initial phase per overtone.
- `"SineGen2"` (v2, 24 000 Hz): the per-sample increment k*f0/sr (wrapped) is taken per mel
  frame, summed per frame, times 2*pi, then multiplied by `upsample` and linearly
  interpolated back to samples (torch's `interpolate`, align_corners=False). Upstream also
  adds a random initial phase to the first *sample*'s increment, but its downsampling to
  frames reads only samples 239 and 240 of each 480 (linear, half-pixel), so that draw never
  reaches the output; we do not make it. Because f0 is constant within a frame, taking the
  increment per frame is bit-identical to upstream's downsampling of the repeated signal.

Randomness (`stochastic=True`, upstream's only mode): noise with std `sigma` where voiced
and `alpha / 3` where unvoiced, and (SineGen) initial phases uniform in [-pi, pi) for the
overtones. `stochastic=False` makes both zero: the reference vectors were made that way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["F0Predictor", "HarmonicSource", "SINE_GENERATORS"]

SINE_GENERATORS = ("SineGen", "SineGen2")


class F0Predictor(nn.Module):
    """Upstream's `ConvRNNF0Predictor` (there is no RNN in it): `condnet` alternates a
    weight-normed Conv1d (k3, pad 1) and an ELU, `layers` times; a Linear gives one value per
    frame, and its absolute value is f0 in Hz. State dict: `condnet.{0,2,4,..}.*`,
    `classifier.*`."""

    def __init__(self, in_channels: int, channels: int, layers: int) -> None:
        super().__init__()
        parts: list[nn.Module] = []
        for i in range(layers):
            parts.append(weight_norm(nn.Conv1d(in_channels if i == 0 else channels, channels, 3, padding=1)))
            parts.append(nn.ELU())
        self.condnet = nn.Sequential(*parts)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: Tensor) -> Tensor:
        """(B, in_channels, T) mel -> (B, T) f0 in Hz, never negative."""
        x = self.condnet(mel).transpose(1, 2)
        return torch.abs(self.classifier(x).squeeze(-1))


class HarmonicSource(nn.Module):
    """Upstream's `SourceModuleHnNSF` with its sine generator: frame-rate f0 in, the
    sample-rate excitation out. Its only parameters are `l_linear` (H+1 -> 1), which merges
    the harmonics; the generator registers it as `m_source`."""

    def __init__(self, *, sample_rate: int, upsample: int, harmonics: int, alpha: float, sigma: float,
                 voiced_threshold: float, variant: str) -> None:
        super().__init__()
        if variant not in SINE_GENERATORS:
            raise ValueError(f"sine generator must be one of {SINE_GENERATORS}, got {variant!r}")
        self.sample_rate = sample_rate
        self.upsample = upsample  # samples per f0 frame
        self.harmonics = harmonics  # overtones above the fundamental
        self.alpha = alpha
        self.sigma = sigma
        self.voiced_threshold = voiced_threshold
        self.variant = variant
        self.l_linear = nn.Linear(harmonics + 1, 1)

    def forward(self, f0: Tensor, *, stochastic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """(B, T) f0 in Hz -> (B, 1, T * upsample) source."""
        with torch.no_grad():  # upstream builds the sines without a graph too
            sines = self.sines(f0, stochastic=stochastic, generator=generator)
        return torch.tanh(self.l_linear(sines)).transpose(1, 2)

    def sines(self, f0: Tensor, *, stochastic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """(B, T) f0 -> (B, T * upsample, H+1) harmonic sines, gated by voicing, plus noise."""
        order = torch.arange(1, self.harmonics + 2, dtype=f0.dtype, device=f0.device)
        f0_samples = f0.repeat_interleave(self.upsample, dim=1).unsqueeze(-1)  # (B, L, 1)
        if self.variant == "SineGen":
            sines = self._sinegen(f0_samples, order, stochastic, generator)
        else:
            sines = self._sinegen2(f0, order)
        voiced = (f0_samples > self.voiced_threshold).to(sines.dtype)
        sines = sines * voiced
        if stochastic:
            noise_std = voiced * self.sigma + (1 - voiced) * self.alpha / 3
            sines = sines + noise_std * torch.randn(sines.shape, generator=generator, dtype=sines.dtype,
                                                    device=sines.device)
        return sines

    def _sinegen(self, f0_samples: Tensor, order: Tensor, stochastic: bool,
                 generator: torch.Generator | None) -> Tensor:
        # Per-sample running sum, wrapped after summing (float32 loses the fraction slowly
        # over ~1e5 samples: that is upstream's rounding and the reference's).
        increment = f0_samples * order / self.sample_rate  # (B, L, H+1)
        theta = 2 * math.pi * (torch.cumsum(increment, dim=1) % 1)
        if stochastic:
            start = torch.rand((theta.shape[0], 1, theta.shape[2]), generator=generator, dtype=theta.dtype,
                               device=theta.device) * (2 * math.pi) - math.pi
            start[:, :, 0] = 0  # the fundamental starts at phase 0
            theta = theta + start
        return self.alpha * torch.sin(theta)

    def _sinegen2(self, f0: Tensor, order: Tensor) -> Tensor:
        # Per-frame increment and running sum; the per-sample phase is the frame phase
        # (times the frame length in samples) linearly interpolated.
        increment = (f0.unsqueeze(-1) * order / self.sample_rate) % 1  # (B, T, H+1)
        phase = torch.cumsum(increment, dim=1) * 2 * math.pi
        phase = F.interpolate(phase.transpose(1, 2) * self.upsample, scale_factor=self.upsample, mode="linear")
        return torch.sin(phase.transpose(1, 2)) * self.alpha
