"""S3 speech tokenizer: CosyVoice's supervised semantic tokenizer v1 (4096 codes, 50 Hz or
25 Hz) and, with `S3Config(version="v2")`, CosyVoice2's v2 (6561 FSQ codes, 25 Hz;
`s3_tokenizer_v2`), written in plain torch and loadable from the upstream weights.

v1 model (as the public `s3tokenizer` port describes it; our own code):

    16 kHz PCM -> log-mel (128 x 100 frames/s, `s3_frontend`)
    -> conv1 (k3, pad 1, stride 1 for 50 Hz / 2 for 25 Hz) -> GELU
    -> conv2 (k3, pad 1, stride 2) -> GELU -> + sinusoidal positions (1500 x width)
    -> `layers` pre-norm blocks (LayerNorm, self-attention with a bias-less key, LayerNorm,
       MLP width*4 GELU), padded frames masked
    -> L2-normalise -> nearest codebook row by Euclidean distance -> int64 code.

Invariants:

- `n` samples give `n // 160` mel frames and `ceil(frames / (2 * stride))` codes, so every
  whole second gives exactly `token_rate` codes (50 or 25).
- Module and buffer names follow the `s3tokenizer` package's state-dict layout
  (`encoder.conv1.weight`, `encoder.positional_embedding`, `encoder.blocks.N.attn.query.weight`,
  `encoder.blocks.N.mlp.0.weight`, `quantizer._codebook.embed`, ...): an official converted
  state dict loads with `strict=True`; `S3Tokenizer.from_onnx` does that conversion itself.
- Whole-utterance encoding attends over at most `max_seconds` (30 s); longer input is cut
  into 30 s windows overlapping by 4 s and each window keeps the middle of its overlaps,
  as upstream does.
- Streaming (`S3TokenizerStream`, in `s3_stream`) makes codes on a fixed grid of steps
  from a window of look-back + step + look-ahead; codes depend only on the audio, never on
  how it was pushed. With utterance positions a stream equals `encode` for any encoder
  whose context fits the window; how closely it does for the real one, and what each
  window costs, is measured in docs/tokenizer.md.
- The quantiser normalises the encoder output to unit length before the nearest-neighbour
  search, as upstream's `VectorQuantization.encode` does.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codec import SpeechTokenizer
from .errors import CheckpointError, ConfigInvalid
from .s3_frontend import LogMel, n_frames
from .s3_stream import S3TokenizerStream
from .state_dicts import check_state, read_state_file
from .s3_stream import push_many as _push_many

__all__ = [
    "S3Config",
    "S3Model",
    "S3Tokenizer",
    "S3TokenizerStream",
    "LEGACY_STREAMING",
    "VERSIONS",
    "build_s3_model",
    "tiny_config_for",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
]

WEIGHTS_FILE = "s3_tokenizer.safetensors"
CONFIG_FILE = "s3_tokenizer.json"
_FORMAT = "duplexline-s3-tokenizer/1"

_LONG_OVERLAP_SECONDS = 4  # upstream's overlap between 30 s windows for long audio
_TOKEN_EPS = 1e-6  # tolerance when a duration must be a whole number of codes


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class S3Config:
    """Sizes of the S3 tokenizer and of its streaming window.

    The defaults are the upstream v1 50 Hz model (`speech_tokenizer_v1.onnx`); the 25 Hz
    model differs only in `token_rate=25` (conv1 stride 2). `version="v2"` is CosyVoice2's
    `speech_tokenizer_v2.onnx` (FSMN + rotary blocks, FSQ codes): it must run at 25 Hz
    with 6561 codes; `S3Config.v2(**changes)` fills those in.

    Streaming (docs/tokenizer.md has the measurements behind the defaults): every
    `step_seconds` of audio (a whole number of codes) becomes final once
    `lookahead_seconds` more has arrived: the look-ahead is added latency. The encoder sees
    `lookback_seconds` of already-coded audio as left context. `stream_encoder` says how:

    - `"cache"`: each step encodes only its new frames (the step and the look-ahead); they
      attend to the keys and values the look-back frames had when they were new, kept
      per layer. Compute about (step + look-ahead) / step times the audio, whatever the
      look-back; memory `2 * layers * lookback codes * width` per stream.
    - `"reencode"`: each step re-encodes the whole window (look-back + step + look-ahead):
      compute window / step times the audio; memory one window of samples.

    `stream_positions`: `"utterance"` gives every frame the position whole-utterance
    `encode` gives it (frame index within its 30 s segment of the long-audio rule), so a
    stream reproduces `encode` exactly for any encoder whose context fits the window;
    `"window"` restarts positions at each window's first frame (the behaviour before the
    window was measured; reencode only).

    The previous behaviour is `LEGACY_STREAMING` (2.0 s look-back, no look-ahead,
    re-encoded with window positions): a saved config without the newer fields loads
    with it."""

    n_mels: int = 128
    width: int = 1280  # n_state
    heads: int = 20
    layers: int = 6
    codebook_size: int = 4096
    token_rate: int = 50  # codes per second: 50 (conv1 stride 1) or 25 (stride 2)
    n_fft: int = 400
    hop: int = 160
    sample_rate: int = 16000
    max_seconds: float = 30.0  # attention span of one encode; sets the 1500 positions
    step_seconds: float = 0.2  # one OmniFlatten user chunk at 50 Hz: codes come as the engine needs them
    lookback_seconds: float = 2.0
    lookahead_seconds: float = 0.02  # one 20 ms frame: covers the convolutions (docs/tokenizer.md)
    stream_encoder: str = "cache"
    stream_positions: str = "utterance"
    version: str = "v1"  # "v1" (Euclidean codebook) or "v2" (FSQ); docs/tokenizer.md

    @classmethod
    def v2(cls, **changes: Any) -> S3Config:
        """The v2 architecture at upstream's sizes (width 1280, 20 heads, 6 layers), 25 Hz,
        6561 codes; `changes` override any field (e.g. tiny widths)."""
        return cls(**{"version": "v2", "token_rate": 25, "codebook_size": V2_CODEBOOK_SIZE, **changes})

    def __post_init__(self) -> None:
        self._check_types()
        self._check_model()
        self._check_stream()

    def _check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            wanted = {"float": (int, float), "str": (str,)}.get(f.type, (int,))
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise ConfigInvalid(f.name, f"must be {f.type}, got {value!r}")

    def _check_model(self) -> None:
        for name in ("n_mels", "width", "heads", "layers", "n_fft", "hop", "sample_rate"):
            if getattr(self, name) < 1:
                raise ConfigInvalid(name, f"must be positive, got {getattr(self, name)}")
        if self.version not in VERSIONS:
            raise ConfigInvalid("version", f"must be one of {VERSIONS}, got {self.version!r}")
        if self.width % self.heads:
            raise ConfigInvalid("width", f"{self.width} is not divisible by heads={self.heads}")
        if self.version == "v1" and (self.width % 2 or self.width < 4):
            raise ConfigInvalid("width", f"the sinusoidal positions need an even width >= 4, got {self.width}")
        if self.version == "v2" and (self.width // self.heads) % 2:
            raise ConfigInvalid("heads", f"the rotary positions need an even head width, got "
                                f"{self.width}/{self.heads} = {self.width // self.heads}")
        if self.codebook_size < 2:
            raise ConfigInvalid("codebook_size", f"must be at least 2, got {self.codebook_size}")
        if self.version == "v2" and self.codebook_size != V2_CODEBOOK_SIZE:
            raise ConfigInvalid("codebook_size", f"v2's FSQ has {V2_CODEBOOK_SIZE} codes (8 dimensions of "
                                f"3 levels), got {self.codebook_size}")
        if self.version == "v2" and self.token_rate != 25:
            raise ConfigInvalid("token_rate", f"v2 runs at 25 Hz (conv1 stride 2), got {self.token_rate}")
        if self.hop > self.n_fft:
            raise ConfigInvalid("hop", f"{self.hop} is longer than n_fft={self.n_fft}")
        per_code = self.hop * 2 * self.token_rate
        if self.token_rate < 1 or self.sample_rate % per_code or self.sample_rate // per_code not in (1, 2):
            raise ConfigInvalid("token_rate", f"must make conv1's stride 1 or 2 (50 or 25 Hz at hop "
                                f"{self.hop}, {self.sample_rate} Hz), got {self.token_rate}")
        ctx = self.max_seconds * self.sample_rate / self.hop / 2
        if not self.max_seconds > _LONG_OVERLAP_SECONDS or abs(ctx - round(ctx)) > _TOKEN_EPS:
            raise ConfigInvalid("max_seconds", f"must be over {_LONG_OVERLAP_SECONDS} s and a whole "
                                f"number of 2-frame positions, got {self.max_seconds}")

    def _check_stream(self) -> None:
        rate = self.token_rate
        if self.stream_encoder not in _STREAM_ENCODERS:
            raise ConfigInvalid("stream_encoder", f"must be one of {_STREAM_ENCODERS}, got {self.stream_encoder!r}")
        if self.stream_positions not in _STREAM_POSITIONS:
            raise ConfigInvalid("stream_positions", f"must be one of {_STREAM_POSITIONS}, "
                                f"got {self.stream_positions!r}")
        if self.stream_encoder == "cache" and self.stream_positions != "utterance":
            raise ConfigInvalid("stream_positions", "the cache keeps each frame's keys from when it was new, "
                                "at its utterance position: use \"utterance\" (or stream_encoder \"reencode\")")
        if not self.step_seconds > 0 or not _whole(self.step_seconds * rate):
            raise ConfigInvalid("step_seconds", f"must be a positive whole number of codes (1/{rate} s), "
                                f"got {self.step_seconds}")
        if self.lookback_seconds < 0 or not _whole(self.lookback_seconds * rate):
            raise ConfigInvalid("lookback_seconds", f"must be >= 0 and a whole number of codes "
                                f"(1/{rate} s), got {self.lookback_seconds}")
        if self.lookahead_seconds < 0:
            raise ConfigInvalid("lookahead_seconds", f"must be >= 0, got {self.lookahead_seconds}")
        if self.stream_positions == "window":
            if self.window_seconds > self.max_seconds + _TOKEN_EPS:
                raise ConfigInvalid("lookback_seconds", f"look-back + step + look-ahead = {self.window_seconds:g} s "
                                    f"exceeds max_seconds={self.max_seconds}")
            return
        # Utterance positions: a step's codes lie inside one segment of the long-audio rule
        # and the look-ahead stays inside that segment's positions.
        if self.lookahead_seconds > _LONG_OVERLAP_SECONDS / 2:
            raise ConfigInvalid("lookahead_seconds", f"must be at most {_LONG_OVERLAP_SECONDS / 2:g} s with "
                                f"utterance positions, got {self.lookahead_seconds}")
        if self.first_segment_tokens % self.step_tokens or self.segment_hop_tokens % self.step_tokens:
            raise ConfigInvalid("step_seconds", f"must divide the long-audio segments "
                                f"({self.first_segment_tokens} and {self.segment_hop_tokens} codes) "
                                f"with utterance positions, got {self.step_tokens} codes")

    # Derived sizes ---------------------------------------------------------------

    @property
    def stride(self) -> int:
        """conv1's stride: 1 for 50 Hz, 2 for 25 Hz."""
        return self.sample_rate // (self.hop * 2 * self.token_rate)

    @property
    def n_ctx(self) -> int:
        """Rows of the positional embedding (1500 for 30 s, whatever the stride, as upstream)."""
        return round(self.max_seconds * self.sample_rate / self.hop / 2)

    @property
    def samples_per_token(self) -> int:
        return self.sample_rate // self.token_rate

    @property
    def step_tokens(self) -> int:
        """Codes finalised per streaming step."""
        return round(self.step_seconds * self.token_rate)

    @property
    def window_seconds(self) -> float:
        """Audio one re-encode covers: look-back + step + look-ahead."""
        return self.lookback_seconds + self.step_seconds + self.lookahead_seconds

    @property
    def lookback_tokens(self) -> int:
        return round(self.lookback_seconds * self.token_rate)

    @property
    def lookback_samples(self) -> int:
        return self.lookback_tokens * self.samples_per_token

    @property
    def lookahead_samples(self) -> int:
        return round(self.lookahead_seconds * self.sample_rate)

    @property
    def first_segment_tokens(self) -> int:
        """Codes whole-utterance `encode` takes from its first 30 s segment on long audio
        (the segment minus half the 4 s overlap)."""
        return round((self.max_seconds - _LONG_OVERLAP_SECONDS / 2) * self.token_rate)

    @property
    def segment_hop_tokens(self) -> int:
        """Codes between the starts of two long-audio segments (30 s - 4 s overlap)."""
        return round((self.max_seconds - _LONG_OVERLAP_SECONDS) * self.token_rate)

    def segment_start(self, code: int) -> int:
        """Index of the first code of the long-audio segment whose positions code `code`
        gets in whole-utterance `encode` (0 for the first 28 s)."""
        if code < self.first_segment_tokens:
            return 0
        return (1 + (code - self.first_segment_tokens) // self.segment_hop_tokens) * self.segment_hop_tokens

    def tokens_for_samples(self, n_samples: int) -> int:
        """Codes that whole-utterance encoding gives for `n_samples` samples."""
        return _conv_len(_conv_len(n_frames(n_samples, self.hop), self.stride), 2)

    # Serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> S3Config:
        """Exactly the fields of `S3Config`; an unknown or missing one raises ConfigInvalid.
        A config saved before the window was measured (`window_seconds`, no step, encoder
        or positions field) loads with the streaming it was saved with; one saved before
        v2 existed (no `version`) is v1."""
        if not isinstance(data, Mapping):
            raise ConfigInvalid("<root>", f"must be an object, got {type(data).__name__}", source)
        data = _upgrade_legacy(dict(data))
        data.setdefault("version", "v1")
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigInvalid(str(key), "unknown field", source)
        for name in names:
            if name not in data:
                raise ConfigInvalid(name, "missing", source)
        try:
            return cls(**data)
        except ConfigInvalid as exc:
            if source is None:
                raise
            # Same field and reason, now naming the file it came from.
            why = str(exc).split(": ", 1)[-1]
            raise ConfigInvalid(exc.field, why, source) from None


# Streaming as it was before docs/tokenizer.md measured it: a 2.2 s window re-encoded
# every 0.2 s with positions restarting per window, no look-ahead.
LEGACY_STREAMING: dict[str, Any] = dict(step_seconds=0.2, lookback_seconds=2.0, lookahead_seconds=0.0,
                                        stream_encoder="reencode", stream_positions="window")
_STREAM_ENCODERS = ("cache", "reencode")
VERSIONS = ("v1", "v2")
V2_CODEBOOK_SIZE = 3 ** 8  # FSQ: 8 dimensions of 3 levels
_STREAM_POSITIONS = ("utterance", "window")


def _upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config of the first format had `window_seconds` and none of the newer
    fields: the step is what the window left, the encoder and positions the legacy ones."""
    if "window_seconds" not in data or any(k in data for k in ("step_seconds", "stream_encoder", "stream_positions")):
        return data
    window = data.pop("window_seconds")
    lookback, lookahead = data.get("lookback_seconds"), data.get("lookahead_seconds")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (window, lookback, lookahead)):
        data["step_seconds"] = round(window - lookback - lookahead, 9)
    data.setdefault("stream_encoder", LEGACY_STREAMING["stream_encoder"])
    data.setdefault("stream_positions", LEGACY_STREAMING["stream_positions"])
    return data


def _whole(x: float) -> bool:
    return abs(x - round(x)) < _TOKEN_EPS


def _conv_len(length: int, stride: int) -> int:
    """Output length of a kernel-3, padding-1 convolution."""
    return (length - 1) // stride + 1 if length > 0 else 0


# --------------------------------------------------------------------------- modules


def _sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's positional embedding: sin of the first half of the channels, cos of the
    second, geometric timescales from 1 to `max_timescale`."""
    half = channels // 2
    increment = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-increment * torch.arange(half, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _LayerNorm(nn.LayerNorm):
    # In float32 whatever the weights' dtype, as upstream: half-precision variance of
    # 1280 channels loses too much.
    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)  # Whisper's key has no bias
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, keep: Tensor | None,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention of `x` (B, T, width), over `past` keys and values (B, P, width)
        first when given; `keep` masks keys (B, 1, 1, P + T). Returns the output and this
        call's keys and values (B, T, width), which a streaming cache keeps."""
        b, t, d = x.shape
        k, v = self.key(x), self.value(x)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))

        def split(y: Tensor) -> Tensor:
            return y.view(b, y.shape[1], self.heads, d // self.heads).transpose(1, 2)

        # Default scale 1/sqrt(head_dim) equals upstream's head_dim**-0.25 on both q and k.
        y = F.scaled_dot_product_attention(split(self.query(x)), split(keys), split(values), attn_mask=keep)
        return self.out(y.transpose(1, 2).reshape(b, t, d)), k, v


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = _Attention(width, heads)
        self.attn_ln = _LayerNorm(width)
        # Sequential so the keys are mlp.0 / mlp.2, as in the interchange layout.
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.mlp_ln = _LayerNorm(width)

    def forward(self, x: Tensor, keep: Tensor | None,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        y, k, v = self.attn(self.attn_ln(x), keep, past)
        x = x + y
        return x + self.mlp(self.mlp_ln(x)), k, v


def _length_mask(lengths: Tensor, size: int) -> Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class _ConvFrontEnd(nn.Module):
    """conv1 and conv2, shared by v1 and v2 (the same layers, names and strides)."""

    def __init__(self, config: S3Config) -> None:
        super().__init__()
        c = config
        self.stride = c.stride
        self.conv1 = nn.Conv1d(c.n_mels, c.width, kernel_size=3, stride=c.stride, padding=1)
        self.conv2 = nn.Conv1d(c.width, c.width, kernel_size=3, stride=2, padding=1)

    def features(self, mel: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The two convolutions: (B, n_mels, T) -> (B, T', width) and lengths. Local: a
        code's features see 5 mel frames (50 Hz) or 7 (25 Hz) around it."""
        padded = bool((lengths < mel.shape[2]).any())
        x = mel
        for conv, stride in ((self.conv1, self.stride), (self.conv2, 2)):
            if padded:  # zero the padding so the kernel sees what an unpadded input would
                x = x * _length_mask(lengths, x.shape[2])[:, None, :].to(x.dtype)
            x = F.gelu(conv(x))
            lengths = (lengths - 1) // stride + 1
        return x.transpose(1, 2), lengths


class _AudioEncoder(_ConvFrontEnd):
    def __init__(self, config: S3Config) -> None:
        super().__init__(config)
        c = config
        self.register_buffer("positional_embedding", _sinusoids(c.n_ctx, c.width))
        self.blocks = nn.ModuleList(_Block(c.width, c.heads) for _ in range(c.layers))

    def forward(self, mel: Tensor, lengths: Tensor, first_position: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`mel` (B, n_mels, T) with valid lengths (B,) -> hidden (B, T', width), lengths.
        Row b's first frame gets position `first_position[b]` (default 0)."""
        x, lengths = self.features(mel, lengths)
        padded = bool((lengths < x.shape[1]).any())
        x = x + self.positions(x.shape[1], first_position).to(x.dtype)
        keep = _length_mask(lengths, x.shape[1])[:, None, None, :] if padded else None
        for block in self.blocks:
            x = block(x, keep)[0]
        return x, lengths

    def positions(self, length: int, first: Tensor | None = None) -> Tensor:
        """Positional rows for `length` frames: (1, length, width) from 0, or (B, length,
        width) from each row's `first`."""
        table = self.positional_embedding
        last = length if first is None else int(first.max()) + length
        if last > table.shape[0]:
            raise ValueError(f"{last} positions exceed the encoder's {table.shape[0]}; cut the input into windows")
        if first is None:
            return table[None, :length]
        return table[first.to(table.device)[:, None] + torch.arange(length, device=table.device)[None, :]]

    def forward_cached(self, x: Tensor, first: Tensor, past_keys: Tensor, past_values: Tensor,
                       past_keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The blocks over new frames' features `x` (B, T, width), row b's first at position
        `first[b]`, that also attend to cached keys and values (B, layers, P, width),
        oldest first, of which `past_keep` (B, P) are valid. Returns hidden (B, T, width)
        and the new frames' keys and values (B, layers, T, width)."""
        b, t, _ = x.shape
        x = x + self.positions(t, first).to(x.dtype)
        keep = torch.cat([past_keep, past_keep.new_ones(b, t)], 1)[:, None, None, :]
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, keep, (past_keys[:, i], past_values[:, i]))
            keys.append(k)
            values.append(v)
        return x, torch.stack(keys, 1), torch.stack(values, 1)


class _EuclideanCodebook(nn.Module):
    def __init__(self, width: int, codebook_size: int) -> None:
        super().__init__()
        self.register_buffer("embed", torch.zeros(codebook_size, width))

    def forward(self, x: Tensor) -> Tensor:
        """Nearest row by Euclidean distance, in float32 so ties break as upstream's."""
        flat = x.reshape(-1, x.shape[-1]).float()
        embed = self.embed.float()
        dist = flat.square().sum(1, keepdim=True) - 2 * flat @ embed.t() + embed.square().sum(1)[None, :]
        return dist.argmin(dim=-1).view(x.shape[:-1])


class _VectorQuantizer(nn.Module):
    def __init__(self, width: int, codebook_size: int) -> None:
        super().__init__()
        self._codebook = _EuclideanCodebook(width, codebook_size)

    def forward(self, x: Tensor) -> Tensor:
        return self._codebook(F.normalize(x.float(), p=2.0, dim=-1))


class S3Model(nn.Module):
    """The S3 network: `encoder` and `quantizer`, named as the interchange state dict.
    Applications use `S3Tokenizer`; this is public for loading foreign state dicts."""

    def __init__(self, config: S3Config) -> None:
        super().__init__()
        if config.version != "v1":
            raise ConfigInvalid("version", f"S3Model is the v1 network, got {config.version!r}; use build_s3_model")
        self.config = config
        self.encoder = _AudioEncoder(config)
        self.quantizer = _VectorQuantizer(config.width, config.codebook_size)

    def forward(self, mel: Tensor, lengths: Tensor, first_position: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Log-mel (B, n_mels, T) and lengths (B,) -> int64 codes (B, T') and their lengths;
        `first_position` (B,) offsets each row's positions (default 0)."""
        hidden, out_lengths = self.encoder(mel, lengths, first_position)
        return self.quantizer(hidden), out_lengths


def build_s3_model(config: S3Config) -> nn.Module:
    """The network `config.version` names: `S3Model` (v1) or `S3ModelV2` (v2); both take
    (mel, lengths, first_position) and have `encoder` and `quantizer`."""
    if config.version == "v2":
        from .s3_tokenizer_v2 import S3ModelV2

        return S3ModelV2(config)
    return S3Model(config)


def tiny_config_for(token_rate: int, codebook_size: int, **changes: Any) -> S3Config:
    """The tiny tokenizer (width 64, 4 heads, 2 layers) for a model's speech codes:
    CosyVoice2's 6561 codes come from the v2 architecture (only FSQ makes 3**8 codes);
    any other size is v1's codebook."""
    tiny: dict[str, Any] = {"width": 64, "heads": 4, "layers": 2, **changes}
    if codebook_size == V2_CODEBOOK_SIZE:
        return S3Config.v2(token_rate=token_rate, **tiny)
    return S3Config(codebook_size=codebook_size, token_rate=token_rate, **tiny)


# --------------------------------------------------------------------------- tokenizer


class S3Tokenizer(SpeechTokenizer):
    """S3 tokenizer: whole-utterance `encode` and per-call `new_stream()`.

    Build with `random`, `load`, `from_state_dict_file` or `from_onnx`; the constructor
    takes an already built network (`build_s3_model`). Thread-safe for concurrent `encode` and streams
    (inference only; the weights are never written after loading)."""

    def __init__(self, model: nn.Module, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.config: S3Config = model.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        # The quantiser stays float32: half precision would move argmin ties (v1) and
        # rounding boundaries (v2).
        self.model.quantizer.float()
        self.sample_rate = self.config.sample_rate
        self.token_rate = self.config.token_rate
        self.codebook_size = self.config.codebook_size
        self.lookahead_samples = self.config.lookahead_samples
        c = self.config
        self.front_end = LogMel(c.sample_rate, c.n_fft, c.hop, c.n_mels, self.device)

    # Building ----------------------------------------------------------------

    @classmethod
    def random(cls, config: S3Config | None = None, seed: int = 0, *,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> S3Tokenizer:
        """Random weights (tests, tiny models); the same seed gives the same weights."""
        config = config or S3Config()
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_s3_model(config)
        if config.version == "v1":
            # Unit rows, as the encoder output is normalised before the search: random rows
            # of unequal length would let the shortest few win every frame.
            embed = torch.randn(config.codebook_size, config.width, generator=generator)
            model.quantizer._codebook.embed.copy_(F.normalize(embed, dim=-1))
        return cls(model, device=device, dtype=dtype)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], config: S3Config, *, source: object = "<state dict>",
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> S3Tokenizer:
        """From an interchange-layout state dict; `source` names it in errors."""
        model = build_s3_model(config)
        _check_state(model, state, source)
        model.load_state_dict(dict(state), strict=True)
        return cls(model, device=device, dtype=dtype)

    @classmethod
    def from_state_dict_file(cls, path: str | os.PathLike, config: S3Config, *,
                             device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32) -> S3Tokenizer:
        """From a `.pt`/`.pth`/`.bin` (torch.load, weights only) or `.safetensors` state dict,
        e.g. what upstream's `onnx2torch` writes."""
        path = Path(path)
        _require_file(path)
        state = read_state_file(path)
        return cls.from_state_dict(state, config, source=path, device=device, dtype=dtype)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, config: S3Config | None = None, *,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> S3Tokenizer:
        """From an upstream `speech_tokenizer_v1.onnx` or `speech_tokenizer_v2.onnx`-style
        file: its initializers are mapped to the module names. Version (v2: FSMN or FSQ
        weights present), sizes (mels, width, layers, codebook, stride, heads where the
        graph shows them) come from the file; a given `config` must agree with them and
        supplies the rest (streaming fields; heads when the graph hides them)."""
        path = Path(path)
        state, inferred = _read_onnx(path)
        config = _merge_inferred(path, inferred, config)
        return cls.from_state_dict(state, config, source=path, device=device, dtype=dtype)

    @classmethod
    def load(cls, folder: str | os.PathLike, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> S3Tokenizer:
        """From a folder written by `save`."""
        folder = Path(folder)
        config_path = folder / CONFIG_FILE
        config = _read_config(config_path)
        return cls.from_state_dict_file(folder / WEIGHTS_FILE, config, device=device, dtype=dtype)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `s3_tokenizer.safetensors` (float32) and `s3_tokenizer.json` into `folder`;
        each file is written to a temporary name first, so a crash leaves no half file."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.model.state_dict().items()}
        _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": _FORMAT}))
        text = json.dumps({"format": _FORMAT, "config": self.config.to_dict()}, indent=2)
        _atomic_write(folder / CONFIG_FILE, lambda tmp: tmp.write_text(text + "\n"))
        return folder

    def with_streaming(self, **changes: Any) -> S3Tokenizer:
        """The same weights (shared, not copied) under other streaming fields: `step_seconds`,
        `lookback_seconds`, `lookahead_seconds`, `stream_encoder`, `stream_positions`.
        E.g. `with_streaming(**LEGACY_STREAMING)` for the behaviour before the window was
        measured. Raises ConfigInvalid for any other field or a bad value."""
        for name in changes:
            if name not in LEGACY_STREAMING:
                raise ConfigInvalid(name, f"not a streaming field ({', '.join(LEGACY_STREAMING)})")
        other = copy.copy(self)
        other.config = replace(self.config, **changes)
        return other

    # Encoding ----------------------------------------------------------------

    def new_stream(self) -> S3TokenizerStream:
        return S3TokenizerStream(self)

    def encode(self, pcm16k: np.ndarray) -> np.ndarray:
        """Whole-utterance codes (int64, `tokens_for_samples(len)` of them)."""
        pcm = _as_pcm(pcm16k)
        with torch.inference_mode():
            mel = self.front_end(torch.from_numpy(pcm))
            max_frames = round(self.config.max_seconds * self.sample_rate / self.config.hop)
            if mel.shape[1] <= max_frames:
                return self._codes_for_mel(mel)
            return self._codes_for_long_mel(mel, max_frames)

    def log_mel(self, pcm16k: np.ndarray) -> Tensor:
        """The front end's features `(n_mels, frames)` for these samples."""
        with torch.inference_mode():
            return self.front_end(torch.from_numpy(_as_pcm(pcm16k)))

    def push_many(self, streams: list[S3TokenizerStream], pcms: list[np.ndarray]) -> list[np.ndarray]:
        """`stream.push(pcm)` for many calls' streams at once: every step that becomes
        ready is encoded in one batch per window shape. Same codes as pushing one by one."""
        pcms = [_as_pcm(p) for p in pcms]
        with torch.inference_mode():
            return _push_many(self, streams, pcms)

    def _codes_for_mel(self, mel: Tensor) -> np.ndarray:
        if mel.shape[1] == 0:
            return np.zeros(0, dtype=np.int64)
        x = mel[None].to(self.device, self.dtype)
        lengths = torch.tensor([mel.shape[1]], device=self.device)
        codes, _ = self.model(x, lengths)
        return codes[0].cpu().numpy().astype(np.int64, copy=False)

    def _codes_for_long_mel(self, mel: Tensor, max_frames: int) -> np.ndarray:
        """Upstream's long-audio rule: windows of `max_frames` every `max_frames - overlap`,
        each keeping all but half the overlap at its inner edges. The log-mel floor stays
        the whole utterance's, as upstream computes the mel once before cutting."""
        overlap = _LONG_OVERLAP_SECONDS * self.sample_rate // self.config.hop
        trim = (_LONG_OVERLAP_SECONDS // 2) * self.token_rate
        starts = range(0, mel.shape[1], max_frames - overlap)
        pieces = []
        for i, start in enumerate(starts):
            codes = self._codes_for_mel(mel[:, start:start + max_frames])
            left = 0 if i == 0 else trim
            right = len(codes) if i == len(starts) - 1 else len(codes) - trim
            pieces.append(codes[left:right])
        return np.concatenate(pieces)


def _as_pcm(pcm: np.ndarray) -> np.ndarray:
    pcm = np.asarray(pcm)
    if pcm.ndim != 1 or not np.issubdtype(pcm.dtype, np.floating):
        raise ValueError(f"expected 1-D float samples in [-1, 1] at 16 kHz, got {pcm.dtype} {pcm.shape}")
    return np.ascontiguousarray(pcm, dtype=np.float32)


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(path, "no such file")


def _read_config(path: Path) -> S3Config:
    _require_file(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"not a readable JSON tokenizer config ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != _FORMAT or "config" not in data:
        raise CheckpointError(path, f"expected a JSON object with format {_FORMAT!r} and a config")
    return S3Config.from_dict(data["config"], source=str(path))


def _check_state(model: nn.Module, state: Mapping[str, Tensor], source: object) -> None:
    c = model.config
    check_state(model, state, source, f"version={c.version} n_mels={c.n_mels} width={c.width} "
                f"layers={c.layers} codebook_size={c.codebook_size}")


# --------------------------------------------------------------------------- ONNX


# Initializer names upstream's converter knows for the two convolutions
# (v1 50 Hz, v1 25 Hz, v2, and our own exports).
_CONV_NAMES = {
    "onnx::Conv_1519": "encoder.conv1.weight", "onnx::Conv_1520": "encoder.conv1.bias",
    "onnx::Conv_1521": "encoder.conv2.weight", "onnx::Conv_1522": "encoder.conv2.bias",
    "onnx::Conv_2216": "encoder.conv1.weight", "onnx::Conv_2217": "encoder.conv1.bias",
    "onnx::Conv_2218": "encoder.conv2.weight", "onnx::Conv_2219": "encoder.conv2.bias",
    "encoders.conv1.weight": "encoder.conv1.weight", "encoders.conv1.bias": "encoder.conv1.bias",
    "encoders.conv2.weight": "encoder.conv2.weight", "encoders.conv2.bias": "encoder.conv2.bias",
}
# Block parameters are named by the node consuming them: "/blocks.3/attn/query/MatMul",
# v2's FSMN "/blocks.3/attn/fsmn_block/Conv".
_BLOCK_NODE = re.compile(
    r"blocks\.(\d+)/(attn_ln|mlp_ln|attn/query|attn/key|attn/value|attn/out|attn/fsmn_block|mlp/mlp\.0|mlp/mlp\.2)"
    r"/(MatMul|Add|Mul|Add_1|LayerNormalization|Conv)$")
# Which op's initializer is which parameter: linear layers are MatMul + Add, decomposed
# LayerNorms Mul (scale) + Add_1 (shift; their Add adds epsilon).
_BLOCK_ROLE = {("linear", "MatMul"): "weight", ("linear", "Add"): "bias",
               ("ln", "Mul"): "weight", ("ln", "Add_1"): "bias", ("fsmn", "Conv"): "weight"}
# v2's FSQ projection, by the initializer names upstream's converter maps (the graph calls
# it project_in, the converted state dict project_down); the weight is stored (in, out).
_FSQ_NAMES = {"quantizer.project_in.bias": "quantizer._codebook.project_down.bias",
              "onnx::MatMul_2536": "quantizer._codebook.project_down.weight"}
_CODEBOOK_NODE = re.compile(r"quantizer/.*_codebook/Pow_1$")


def _read_onnx(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    _require_file(path)
    try:
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(path)).graph
        arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    except Exception as exc:  # protobuf DecodeError, missing external data, bad raw_data, ...
        raise CheckpointError(path, f"cannot read the ONNX model ({type(exc).__name__}: {exc})") from exc
    state = _map_onnx(graph, arrays)
    inferred = _infer_sizes(path, graph, arrays, state)
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}, inferred


def _map_onnx(graph, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Torch-named arrays, in torch orientation (MatMul weights are stored (in, out))."""
    state: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if name in _CONV_NAMES:
            state[_CONV_NAMES[name]] = value
        elif name.endswith("positional_embedding"):
            state["encoder.positional_embedding"] = value
        elif name in _FSQ_NAMES and value.ndim in (1, 2) and value.shape[-1] == 8:
            state[_FSQ_NAMES[name]] = value.T if value.ndim == 2 else value
    conv_nodes = [n for n in graph.node if n.op_type == "Conv"]
    for index, node in enumerate(conv_nodes[:2]):
        if len(node.input) >= 3 and node.input[1] in arrays and node.input[1] not in _CONV_NAMES:
            which = "conv1" if "conv1" in node.name else "conv2" if "conv2" in node.name else f"conv{index + 1}"
            state.setdefault(f"encoder.{which}.weight", arrays[node.input[1]])
            state.setdefault(f"encoder.{which}.bias", arrays[node.input[2]])
    for node in graph.node:
        for key, value in _node_params(node, arrays):
            state[key] = value
    return state


def _node_params(node, arrays: dict[str, np.ndarray]):
    """(torch key, array) pairs for the initializers this node consumes."""
    if _CODEBOOK_NODE.search(node.name):
        for name in node.input:
            if name in arrays and arrays[name].ndim == 2:
                yield "quantizer._codebook.embed", arrays[name]
        return
    match = _BLOCK_NODE.search(node.name)
    if not match:
        return
    block, module, op = match.groups()
    prefix = f"encoder.blocks.{block}.{module.replace('/', '.').replace('mlp.mlp', 'mlp')}"
    if op == "LayerNormalization":  # opset >= 17 exports keep LayerNorm whole
        for key, name in zip(("weight", "bias"), node.input[1:3]):
            if name in arrays:
                yield f"{prefix}.{key}", arrays[name]
        return
    kind = "ln" if module.endswith("_ln") else "fsmn" if module.endswith("fsmn_block") else "linear"
    role = _BLOCK_ROLE.get((kind, op))
    if role is None:
        return
    for name in node.input:
        if name in arrays and arrays[name].ndim >= 1 and arrays[name].size > 1:
            value = arrays[name]
            yield f"{prefix}.{role}", value.T if value.ndim == 2 else value


def _infer_sizes(path: Path, graph, arrays: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> dict[str, Any]:
    conv1 = state.get("encoder.conv1.weight")
    if conv1 is None or conv1.ndim != 3:
        raise CheckpointError(path, "no conv1 weight (n_state x n_mels x 3) found: not an S3 tokenizer file")
    width, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    inferred: dict[str, Any] = {"width": width, "n_mels": n_mels}
    project = state.get("quantizer._codebook.project_down.weight")
    if project is not None or any(".fsmn_block." in k for k in state):
        inferred["version"] = "v2"
        if project is not None:
            inferred["codebook_size"] = 3 ** int(project.shape[0])
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks.")}
    inferred["layers"] = max(blocks) + 1 if blocks else 0
    embed = state.get("quantizer._codebook.embed")
    if embed is not None:
        if embed.shape[0] == width:  # stored (width, codes), as upstream's converter assumes
            embed = state["quantizer._codebook.embed"] = embed.T
        inferred["codebook_size"] = int(embed.shape[0])
    pos = state.get("encoder.positional_embedding")
    if pos is not None and pos.ndim == 2:
        inferred["n_ctx"] = int(pos.shape[0])
    stride = _conv1_stride(graph, arrays, state)
    if stride is not None:
        inferred["stride"] = stride
    heads = _attention_heads(graph, arrays, width)
    if heads is not None:
        inferred["heads"] = heads
    return inferred


def _conv1_stride(graph, arrays: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> int | None:
    weight = state.get("encoder.conv1.weight")
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and arrays.get(node.input[1]) is weight:
            for attr in node.attribute:
                if attr.name == "strides" and attr.ints:
                    return int(attr.ints[0])
            return 1  # ONNX's default stride
    return None


def _attention_heads(graph, arrays: dict[str, np.ndarray], width: int) -> int | None:
    """Heads from the (batch, time, heads, head_dim) Reshape in block 0's attention, when
    its target shape is a constant."""
    from onnx import numpy_helper

    constants = dict(arrays)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attr.t)
    for node in graph.node:
        if node.op_type == "Reshape" and re.search(r"blocks\.0/attn/", node.name) and len(node.input) > 1:
            shape = constants.get(node.input[1])
            if shape is not None and shape.ndim == 1 and shape.size == 4:
                heads, head_dim = int(shape[2]), int(shape[3])
                if heads > 0 and width % heads == 0 and head_dim in (-1, width // heads):
                    return heads
    return None


def _merge_inferred(path: Path, inferred: dict[str, Any], config: S3Config | None) -> S3Config:
    """The file's sizes win over defaults; a given config must agree with them."""
    version = inferred.get("version", "v1")
    base = config or (S3Config.v2() if version == "v2" else S3Config())
    sizes: dict[str, Any] = {k: inferred[k] for k in ("width", "n_mels", "layers", "codebook_size", "heads")
                             if k in inferred}
    sizes["version"] = version
    if "heads" not in sizes and config is None and inferred["width"] % 64 == 0:
        sizes["heads"] = inferred["width"] // 64  # Whisper-family heads are 64 wide (1280/20)
    if "stride" in inferred:
        if inferred["stride"] not in (1, 2):
            raise CheckpointError(path, f"conv1 stride {inferred['stride']}, expected 1 (50 Hz) or 2 (25 Hz)")
        sizes["token_rate"] = base.sample_rate // (base.hop * 2 * inferred["stride"])
    if "n_ctx" in inferred:
        sizes["max_seconds"] = inferred["n_ctx"] * 2 * base.hop / base.sample_rate
    if config is not None:
        mismatched = [f"{k}: file has {v}, config says {getattr(config, k)}"
                      for k, v in sizes.items() if getattr(config, k) != v]
        if mismatched:
            raise CheckpointError(path, "does not match the given config: " + "; ".join(mismatched))
        return config
    try:
        return replace(base, **sizes)
    except ConfigInvalid as exc:
        raise CheckpointError(path, f"sizes read from the file make no valid config ({exc}); "
                              "pass the config") from exc
