"""CosyVoice's HiFT vocoder: 80-bin log-mel -> waveform, both official families, loadable
from the released `hift.pt`. Our own code after the public upstream (FunAudioLLM/CosyVoice,
`cosyvoice/hifigan/generator.py`); the pitch source is in `cosyvoice_f0`.

    mel (B, 80, T) -> f0 (B, T) -> harmonic source s (B, 1, T * hop_total)
    s -> STFT (n_fft 16, hop 4, Hann, centred) -> 18 channels (9 real, 9 imaginary)
    mel -> conv_pre (k7) -> per stage i: leaky ReLU(0.1) -> ups[i] (ConvTranspose x rate)
        [-> reflect-pad one frame on the left after the last stage]
        -> + source_resblocks[i](source_downs[i](STFT of s))
        -> mean of the stage's resblocks (kernels 3/7/11, dilations 1/3/5, Snake)
    -> leaky ReLU(0.01) -> conv_post (k7, 18 channels)
    -> magnitude exp(first 9) clipped to 100, phase sin(last 9) -> iSTFT -> clamp +-0.99

Families: v1 (CosyVoice-300M) 22 050 Hz, ups x8 x8 (k16 k16), sine source "SineGen";
v2 (CosyVoice2-0.5B) 24 000 Hz, ups x8 x5 x3 (k16 k11 k7), one more source branch, sine
source "SineGen2". Both: n_fft 16 / hop 4, so 256 (v1) or 480 (v2) samples per mel frame.

Invariants:

- `state_dict()` names, shapes, dtypes and order equal the official checkpoints'
  (`m_source`, `conv_pre`, `ups`, `source_downs`, `source_resblocks`, `resblocks`,
  `conv_post`, `f0_predictor`); weight norm is torch's parametrization
  (`<conv>.parametrizations.weight.original0` = g, `original1` = v). `load_hift` also takes
  the older `weight_g` / `weight_v` keys and a `generator.` prefix, and refuses anything else
  by name.
- T mel frames give exactly T * `samples_per_frame` samples; the source has that length too.
- `cache_source` replaces the first samples of the source, as upstream's streaming does:
  the caller passes the previous chunk's last source samples for the mel frames it repeats,
  so the excitation's phase runs on across the chunk boundary.
- Randomness (noise, SineGen's initial phases) is on by default, as upstream;
  `stochastic=False` turns it off (`cosyvoice_f0` says what it is).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from .cosyvoice_f0 import SINE_GENERATORS, F0Predictor, HarmonicSource
from .errors import CheckpointError, ConfigInvalid
from .state_dicts import check_state, read_state_file

__all__ = ["HiFTConfig", "HiFTGenerator", "load_hift", "hift_state_from_checkpoint"]

_MAGNITUDE_LIMIT = 100.0  # upstream clips the iSTFT magnitude at 1e2
_SNAKE_EPS = 1e-9  # upstream's Snake guard against alpha = 0
_FINAL_LRELU_SLOPE = 0.01  # upstream calls leaky_relu with torch's default before conv_post


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class HiFTConfig:
    """Sizes and settings of a HiFT generator. The defaults are the official v1
    (CosyVoice-300M, 22 050 Hz); `official_v2()` is CosyVoice2-0.5B. `from_cosyvoice` reads
    upstream's constructor arguments (a recipe's `hift:` section, or the reference fixtures'
    `config.json["hift"]`)."""

    sample_rate: int = 22050
    in_channels: int = 80
    base_channels: int = 512
    upsample_rates: tuple[int, ...] = (8, 8)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    istft_n_fft: int = 16
    istft_hop: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    harmonics: int = 8  # overtones above the fundamental (upstream nb_harmonics): 9 sines
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std where voiced (alpha / 3 where unvoiced)
    voiced_threshold: float = 10.0  # Hz; f0 above it is voiced
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_channels: int = 512  # f0 predictor width (upstream cond_channels)
    f0_layers: int = 5  # f0 predictor convolutions (hardcoded upstream)
    sine_generator: str = "SineGen"  # "SineGen" (v1) or "SineGen2" (v2): see cosyvoice_f0

    def __post_init__(self) -> None:
        for f in fields(self):  # accept lists from JSON, store tuples
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(tuple(v) if isinstance(v, list) else v for v in value))
        for name in ("sample_rate", "in_channels", "base_channels", "istft_n_fft", "istft_hop", "f0_channels",
                     "f0_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigInvalid(name, f"must be a positive integer, got {value!r}")
        if self.harmonics < 0:
            raise ConfigInvalid("harmonics", f"must be >= 0, got {self.harmonics}")
        if self.istft_n_fft % 2 or self.istft_hop > self.istft_n_fft:
            raise ConfigInvalid("istft_n_fft", f"must be even and at least istft_hop={self.istft_hop}, "
                                f"got {self.istft_n_fft}")
        stages = len(self.upsample_rates)
        if stages < 1:
            raise ConfigInvalid("upsample_rates", "needs at least one stage")
        for name in ("upsample_kernel_sizes", "source_resblock_kernel_sizes", "source_resblock_dilation_sizes"):
            if len(getattr(self, name)) != stages:
                raise ConfigInvalid(name, f"needs one entry per upsampling stage ({stages}), got {getattr(self, name)}")
        for rate, kernel in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if rate < 1 or kernel < rate or (kernel - rate) % 2:
                raise ConfigInvalid("upsample_kernel_sizes", f"kernel {kernel} for rate {rate}: must be >= the "
                                    "rate and differ from it by an even number, or a stage is not exactly x rate")
        if self.base_channels % 2 ** stages:
            raise ConfigInvalid("base_channels", f"{self.base_channels} is not divisible by 2**{stages}")
        if len(self.resblock_dilation_sizes) != len(self.resblock_kernel_sizes) or not self.resblock_kernel_sizes:
            raise ConfigInvalid("resblock_dilation_sizes", "needs one entry per resblock kernel")
        if self.sine_generator not in SINE_GENERATORS:
            raise ConfigInvalid("sine_generator", f"must be one of {SINE_GENERATORS}, got {self.sine_generator!r}")

    @classmethod
    def official_v1(cls) -> HiFTConfig:
        """CosyVoice-300M's HiFT (22 050 Hz, 256 samples per mel frame)."""
        return cls()

    @classmethod
    def official_v2(cls) -> HiFTConfig:
        """CosyVoice2-0.5B's HiFT (24 000 Hz, 480 samples per mel frame)."""
        return cls(sample_rate=24000, upsample_rates=(8, 5, 3), upsample_kernel_sizes=(16, 11, 7),
                   source_resblock_kernel_sizes=(7, 7, 11),
                   source_resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)), sine_generator="SineGen2")

    @classmethod
    def from_cosyvoice(cls, hift: Mapping[str, Any], source: str | None = None) -> HiFTConfig:
        """From upstream's `HiFTGenerator` constructor arguments (as in a recipe's `hift:`
        section, `f0_predictor` nested; a `class` entry is allowed). The sine generator
        follows upstream's rule: SineGen at 22 050 Hz, SineGen2 otherwise."""
        data = dict(hift)
        klass = data.pop("class", "HiFTGenerator")
        if klass != "HiFTGenerator":
            raise ConfigInvalid("class", f"expected HiFTGenerator, got {klass!r}", source)
        f0 = dict(data.pop("f0_predictor", {}))
        istft = dict(data.pop("istft_params", {"n_fft": 16, "hop_len": 4}))
        names = {"in_channels": "in_channels", "base_channels": "base_channels", "nb_harmonics": "harmonics",
                 "sampling_rate": "sample_rate", "nsf_alpha": "nsf_alpha", "nsf_sigma": "nsf_sigma",
                 "nsf_voiced_threshold": "voiced_threshold", "upsample_rates": "upsample_rates",
                 "upsample_kernel_sizes": "upsample_kernel_sizes", "resblock_kernel_sizes": "resblock_kernel_sizes",
                 "resblock_dilation_sizes": "resblock_dilation_sizes",
                 "source_resblock_kernel_sizes": "source_resblock_kernel_sizes",
                 "source_resblock_dilation_sizes": "source_resblock_dilation_sizes",
                 "lrelu_slope": "lrelu_slope", "audio_limit": "audio_limit"}
        for key in data:
            if key not in names:
                raise ConfigInvalid(key, "unknown HiFTGenerator argument", source)
        kwargs: dict[str, Any] = {names[k]: v for k, v in data.items()}
        if set(istft) != {"n_fft", "hop_len"}:
            raise ConfigInvalid("istft_params", f"expected n_fft and hop_len, got {sorted(istft)}", source)
        kwargs.update(istft_n_fft=istft["n_fft"], istft_hop=istft["hop_len"])
        f0.pop("class", None)
        if f0.get("num_class", 1) != 1:
            raise ConfigInvalid("f0_predictor.num_class", f"must be 1, got {f0['num_class']}", source)
        if f0.get("in_channels", kwargs.get("in_channels", 80)) != kwargs.get("in_channels", 80):
            raise ConfigInvalid("f0_predictor.in_channels", "must equal in_channels", source)
        if "cond_channels" in f0:
            kwargs["f0_channels"] = f0["cond_channels"]
        if "voiced_threshold" in kwargs:
            kwargs["voiced_threshold"] = float(kwargs["voiced_threshold"])
        rate = kwargs.get("sample_rate", cls.sample_rate)
        kwargs["sine_generator"] = "SineGen" if rate == 22050 else "SineGen2"
        try:
            return cls(**kwargs)
        except ConfigInvalid as exc:
            if source is None:
                raise
            raise ConfigInvalid(exc.field, str(exc).split(": ", 1)[-1], source) from None

    @property
    def samples_per_frame(self) -> int:
        """Output samples per mel frame: the upsampling product times the iSTFT hop."""
        return math.prod(self.upsample_rates) * self.istft_hop

    @property
    def stft_bins(self) -> int:
        return self.istft_n_fft // 2 + 1


# --------------------------------------------------------------------------- layers


class _Snake(nn.Module):
    """x + sin(alpha * x)^2 / alpha, one alpha per channel (linear scale, as upstream)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + _SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class _ResBlock(nn.Module):
    """Per dilation d: x += conv2(snake(conv1_d(snake(x)))), both convs weight-normed and
    length-preserving (conv2 undilated)."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d,
                                                          padding=d * (kernel - 1) // 2)) for d in dilations)
        self.convs2 = nn.ModuleList(weight_norm(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2))
                                    for _ in dilations)
        self.activations1 = nn.ModuleList(_Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(_Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


# --------------------------------------------------------------------------- generator


class HiFTGenerator(nn.Module):
    """The HiFT vocoder (module docstring). Attribute names are upstream's, so its state
    dict loads strictly; build one with random weights here, or load with `load_hift`."""

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.config = c = config
        # Registration order is upstream's: it fixes the state dict's key order.
        self.m_source = HarmonicSource(sample_rate=c.sample_rate, upsample=c.samples_per_frame, harmonics=c.harmonics,
                                       alpha=c.nsf_alpha, sigma=c.nsf_sigma, voiced_threshold=c.voiced_threshold,
                                       variant=c.sine_generator)
        self.conv_pre = weight_norm(nn.Conv1d(c.in_channels, c.base_channels, 7, padding=3))
        width = [c.base_channels // 2 ** i for i in range(len(c.upsample_rates) + 1)]
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(width[i], width[i + 1], k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)))
        # Stage i adds the source's STFT brought to that stage's frame rate: the STFT runs at
        # the last stage's rate, so stage i's down-sampling factor is the product of the rates
        # of the stages after it.
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        channels_in = 2 * c.stft_bins
        for i, (k, d) in enumerate(zip(c.source_resblock_kernel_sizes, c.source_resblock_dilation_sizes)):
            factor = math.prod(c.upsample_rates[i + 1:])
            if factor == 1:
                self.source_downs.append(nn.Conv1d(channels_in, width[i + 1], 1))
            else:
                self.source_downs.append(nn.Conv1d(channels_in, width[i + 1], 2 * factor, factor, padding=factor // 2))
            self.source_resblocks.append(_ResBlock(width[i + 1], k, tuple(d)))
        self.resblocks = nn.ModuleList(
            _ResBlock(width[i + 1], k, tuple(d))
            for i in range(len(c.upsample_rates))
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
        self.conv_post = weight_norm(nn.Conv1d(width[-1], 2 * c.stft_bins, 7, padding=3))
        self.f0_predictor = F0Predictor(c.in_channels, c.f0_channels, c.f0_layers)
        # Periodic Hann, computed in float64 then rounded, as upstream's scipy window is.
        window = torch.hann_window(c.istft_n_fft, periodic=True, dtype=torch.float64).to(torch.float32)
        self.register_buffer("stft_window", window, persistent=False)

    # The three halves, usable alone (tests compare each with the reference) ----------

    def f0(self, mel: Tensor) -> Tensor:
        """(B, in_channels, T) log-mel -> (B, T) f0 in Hz."""
        return self.f0_predictor(mel)

    def source(self, f0: Tensor, *, stochastic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """(B, T) f0 -> (B, 1, T * samples_per_frame) harmonic source."""
        return self.m_source(f0, stochastic=stochastic, generator=generator)

    def decode(self, mel: Tensor, source: Tensor) -> Tensor:
        """(B, in_channels, T) mel and (B, 1, T * samples_per_frame) source -> (B, same) waveform."""
        c = self.config
        spec = torch.stft(source.squeeze(1), c.istft_n_fft, c.istft_hop, c.istft_n_fft, window=self.stft_window,
                          return_complex=True)  # centred, reflect-padded: frames * hop + 1 frames
        spec = torch.view_as_real(spec)
        s_stft = torch.cat([spec[..., 0], spec[..., 1]], dim=1)

        x = self.conv_pre(mel)
        n_kernels = len(c.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # one more frame, to the STFT's count
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            stage = self.resblocks[i * n_kernels:(i + 1) * n_kernels]
            xs = stage[0](x)
            for block in stage[1:]:
                xs = xs + block(x)
            x = xs / n_kernels
        x = self.conv_post(F.leaky_relu(x, _FINAL_LRELU_SLOPE))
        magnitude = torch.exp(x[:, :c.stft_bins]).clamp(max=_MAGNITUDE_LIMIT)
        phase = torch.sin(x[:, c.stft_bins:])  # upstream's; the sin is redundant but changes the values
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        audio = torch.istft(spec, c.istft_n_fft, c.istft_hop, c.istft_n_fft, window=self.stft_window)
        return torch.clamp(audio, -c.audio_limit, c.audio_limit)

    def forward(self, mel: Tensor, cache_source: Tensor | None = None, *, stochastic: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(B, in_channels, T) natural-log mel -> (speech (B, T * samples_per_frame) in
        [-audio_limit, audio_limit], source (B, 1, same)). `cache_source` (B, 1, n), n at
        most the source length, replaces the source's first n samples (streaming: keep the
        returned source's tail for the next chunk, whose mel repeats those frames)."""
        c = self.config
        if mel.dim() != 3 or mel.shape[1] != c.in_channels:
            raise ValueError(f"mel must be (batch, {c.in_channels}, frames), got {tuple(mel.shape)}")
        source = self.source(self.f0(mel), stochastic=stochastic, generator=generator)
        if cache_source is not None and cache_source.shape[-1]:
            n = cache_source.shape[-1]
            if n > source.shape[-1]:
                raise ValueError(f"cache_source has {n} samples, more than this chunk's {source.shape[-1]}")
            source = source.clone()
            source[:, :, :n] = cache_source
        return self.decode(mel, source), source


# --------------------------------------------------------------------------- loading


def hift_state_from_checkpoint(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Upstream's key styles -> ours: drop a `generator.` prefix (a training checkpoint's),
    and rename torch's older weight-norm keys (`weight_g` -> `parametrizations.weight.
    original0`, `weight_v` -> `original1`). Other keys pass unchanged, for the strict check."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key[len("generator."):] if key.startswith("generator.") else key
        if name.endswith(".weight_g"):
            name = name[:-len("weight_g")] + "parametrizations.weight.original0"
        elif name.endswith(".weight_v"):
            name = name[:-len("weight_v")] + "parametrizations.weight.original1"
        if name in out:
            raise KeyError(f"{key!r} and another key both give {name!r}")
        out[name] = value
    return out


def load_hift(path: str | os.PathLike, config: HiFTConfig, *, map_location: str | torch.device = "cpu"
              ) -> HiFTGenerator:
    """A `HiFTGenerator` for `config` with the weights of `path` (a torch state dict, read with
    weights_only=True), in eval mode. Every missing, unexpected or mis-shaped key raises
    CheckpointError naming the file, the key and both shapes; so does an unreadable file."""
    path = Path(path)
    state = read_state_file(path, map_location)
    try:
        state = hift_state_from_checkpoint(state)
    except KeyError as exc:
        raise CheckpointError(path, f"duplicate weight after renaming: {exc.args[0]}") from None
    model = HiFTGenerator(config)
    _check_state(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _check_state(model: HiFTGenerator, state: Mapping[str, Tensor], path: Path) -> None:
    c = model.config
    check_state(model, state, path, f"HiFT {c.sample_rate} Hz, base_channels={c.base_channels}, upsample_rates="
                f"{list(c.upsample_rates)}, f0_channels={c.f0_channels}", floats_only=True)
