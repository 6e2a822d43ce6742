"""S3 tokenizer v2: CosyVoice2's `speech_tokenizer_v2` (25 Hz, 6561 codes), in plain torch.

Architecture (facts read from the public `s3tokenizer` package's `model_v2.py` and
`utils.onnx2torch`, Apache-2.0; docs/tokenizer.md cites them; this code is our own):

    16 kHz PCM -> log-mel (128 x 100 frames/s: the v1 front end, `s3_frontend`)
    -> conv1 (k3, pad 1, stride 2) -> GELU -> conv2 (k3, pad 1, stride 2) -> GELU: 25 Hz
    -> `layers` pre-norm blocks, no absolute positions:
         y = attn_ln(x)                  LayerNorm, eps 1e-6
         q, k, v = query(y), key(y), value(y)          (key has no bias, as in v1)
         q, k rotated per head (rotary, theta 10000, halves rotated: x*cos + [-x2, x1]*sin)
         x = x + out(softmax(q k^T / sqrt(head_dim)) v) + fsmn(v)
         x = x + mlp(mlp_ln(x))          LayerNorm, eps 1e-5; MLP width*4, GELU
       fsmn(v) = depthwise conv over time of v (kernel 31, zero padding 15 each side, no
       bias) + v, with padded frames zeroed before and after
    -> FSQ: project_down (width -> 8) in float32, tanh, x 0.999, round (half to even),
       + 1: eight digits in {0, 1, 2}; code = sum(digit_i * 3**i) (digit 0 least
       significant).

The state-dict keys are those the package gives a converted `speech_tokenizer_v2.onnx`:
`encoder.conv1/conv2.*`, `encoder.blocks.N.attn.{query,key,value,out}.*`,
`encoder.blocks.N.attn.fsmn_block.weight` (width, 1, 31), `encoder.blocks.N.{attn_ln,
mlp_ln}.*`, `encoder.blocks.N.mlp.{0,2}.*`, `quantizer._codebook.project_down.*`; the
rotary tables are computed, never stored.

Streaming (`s3_stream`) uses `forward_cached`: the new frames attend to cached rotated keys
and values, and their FSMN reads the last 15 cached values of each layer as its left
context (the memory is a convolution over values, so the value cache is its cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigInvalid
from .s3_tokenizer import _ConvFrontEnd, _LayerNorm, _length_mask

if TYPE_CHECKING:
    from .s3_tokenizer import S3Config

__all__ = ["S3ModelV2", "FSMN_KERNEL", "FSQ_DIMS", "rotate", "fsq_codes"]

FSMN_KERNEL = 31
FSMN_LEFT = (FSMN_KERNEL - 1) // 2  # 15 codes (0.6 s) of memory each side, per layer
FSQ_DIMS = 8
FSQ_LEVELS = 3
ROPE_THETA = 10000.0
# Upstream multiplies tanh by float32(0.999) (written 0.9990000128746033) before
# rounding, so a saturated tanh never rounds past +-1.
FSQ_SCALE = 0.9990000128746033


def rotate(x: Tensor, positions: Tensor) -> Tensor:
    """Rotary position embedding of `x` (B, T, heads, head_dim) at `positions` (B or 1, T):
    frequency i is theta**(-2i/head_dim), used by channels i and i + head_dim/2. Computed
    in float32 (upstream's tables are float32)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, 2 * half, 2, device=x.device).float() / (2 * half))
    angles = positions.to(x.device).float()[..., None] * inv_freq  # (B, T, half)
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def fsq_codes(h: Tensor) -> Tensor:
    """Projected activations (..., 8) -> int64 codes: base-3 number of round(0.999 tanh) + 1,
    first dimension least significant."""
    digits = (torch.tanh(h.float()) * FSQ_SCALE).round().long() + 1
    powers = FSQ_LEVELS ** torch.arange(h.shape[-1], device=h.device)
    return (digits * powers).sum(-1)


class _FSMNAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.fsmn_block = nn.Conv1d(width, width, FSMN_KERNEL, groups=width, bias=False)

    def forward(self, x: Tensor, positions: Tensor, keep: Tensor | None, pad: Tensor | None,
                past: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`x` (B, T, width) at `positions` (B or 1, T); `keep` masks keys (B, 1, 1, P + T),
        `pad` (B, T, 1) zeroes padded frames' values and memory. `past`: cached rotated keys,
        values (B, P, width), oldest first, and which are valid (B, P). Returns the output
        and this call's rotated keys and values (B, T, width), which a stream caches."""
        b, t, d = x.shape
        heads, hd = self.heads, d // self.heads
        q = rotate(self.query(x).view(b, t, heads, hd), positions)
        k = rotate(self.key(x).view(b, t, heads, hd), positions).reshape(b, t, d)
        v = self.value(x)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))

        def split(y: Tensor) -> Tensor:
            return y.view(b, y.shape[1], heads, hd).transpose(1, 2)

        # Default scale 1/sqrt(head_dim) equals upstream's head_dim**-0.25 on both q and k.
        y = F.scaled_dot_product_attention(q.transpose(1, 2), split(keys), split(values), attn_mask=keep)
        y = self.out(y.transpose(1, 2).reshape(b, t, d))
        left = None
        if past is not None and past[1].shape[1]:  # the memory's left context: cached values
            left = past[1][:, -FSMN_LEFT:] * past[2][:, -FSMN_LEFT:, None].to(v.dtype)
        return y + self.memory(v, pad, left), k, v

    def memory(self, v: Tensor, pad: Tensor | None, left: Tensor | None = None) -> Tensor:
        """FSMN memory of values `v` (B, T, width): the depthwise convolution (zero padded
        to 15 frames each side, beyond `left`, up to 15 earlier values) plus `v`."""
        if pad is not None:
            v = v * pad
        ctx = v if left is None else torch.cat([left, v], 1)
        ctx = F.pad(ctx.transpose(1, 2), (FSMN_LEFT - (ctx.shape[1] - v.shape[1]), FSMN_KERNEL - 1 - FSMN_LEFT))
        m = F.conv1d(ctx, self.fsmn_block.weight, groups=v.shape[2]).transpose(1, 2) + v
        return m if pad is None else m * pad


class _BlockV2(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = _FSMNAttention(width, heads)
        self.attn_ln = _LayerNorm(width, eps=1e-6)  # upstream's v2 attn_ln; mlp_ln keeps 1e-5
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.mlp_ln = _LayerNorm(width)

    def forward(self, x: Tensor, positions: Tensor, keep: Tensor | None, pad: Tensor | None,
                past: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        y, k, v = self.attn(self.attn_ln(x), positions, keep, pad, past)
        x = x + y
        return x + self.mlp(self.mlp_ln(x)), k, v


class _AudioEncoderV2(_ConvFrontEnd):
    def __init__(self, config: S3Config) -> None:
        super().__init__(config)
        self.blocks = nn.ModuleList(_BlockV2(config.width, config.heads) for _ in range(config.layers))

    def forward(self, mel: Tensor, lengths: Tensor, first_position: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`mel` (B, n_mels, T) with valid lengths (B,) -> hidden (B, T', width), lengths.
        Row b's first frame is at rotary position `first_position[b]` (default 0)."""
        x, lengths = self.features(mel, lengths)
        positions = _positions(x.shape[1], first_position, x.device)
        keep = pad = None
        if bool((lengths < x.shape[1]).any()):
            valid = _length_mask(lengths, x.shape[1])
            keep, pad = valid[:, None, None, :], valid[..., None].to(x.dtype)
        for block in self.blocks:
            x = block(x, positions, keep, pad)[0]
        return x, lengths

    def forward_cached(self, x: Tensor, first: Tensor, past_keys: Tensor, past_values: Tensor,
                       past_keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As v1's: new frames' features `x` (B, T, width) from position `first` (B,),
        cached keys and values (B, layers, P, width) oldest first, `past_keep` (B, P)."""
        b, t, _ = x.shape
        positions = _positions(t, first, x.device)
        keep = torch.cat([past_keep, past_keep.new_ones(b, t)], 1)[:, None, None, :]
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, positions, keep, None, (past_keys[:, i], past_values[:, i], past_keep))
            keys.append(k)
            values.append(v)
        return x, torch.stack(keys, 1), torch.stack(values, 1)


def _positions(length: int, first: Tensor | None, device: torch.device) -> Tensor:
    steps = torch.arange(length, device=device)[None, :]
    return steps if first is None else first.to(device)[:, None] + steps


class _FSQCodebook(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.project_down = nn.Linear(width, FSQ_DIMS)

    def forward(self, x: Tensor) -> Tensor:
        w, bias = self.project_down.weight, self.project_down.bias
        return fsq_codes(F.linear(x.float(), w.float(), bias.float()))


class _FSQuantizer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self._codebook = _FSQCodebook(width)

    def forward(self, x: Tensor) -> Tensor:
        return self._codebook(x)


class S3ModelV2(nn.Module):
    """The v2 network: `encoder` and `quantizer`, named as the converted state dict.
    Applications use `S3Tokenizer` with `S3Config.v2()`."""

    def __init__(self, config: S3Config) -> None:
        super().__init__()
        if config.version != "v2":
            raise ConfigInvalid("version", f"S3ModelV2 is the v2 network, got {config.version!r}")
        self.config = config
        self.encoder = _AudioEncoderV2(config)
        self.quantizer = _FSQuantizer(config.width)

    def forward(self, mel: Tensor, lengths: Tensor, first_position: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Log-mel (B, n_mels, T) and lengths (B,) -> int64 codes (B, T') and their lengths."""
        hidden, out_lengths = self.encoder(mel, lengths, first_position)
        return self.quantizer(hidden), out_lengths
