"""The velocity estimator of CosyVoice's flow matching: a 1-D U-Net with transformer
blocks (Matcha-TTS's decoder, diffusers' layer names). Plain torch, our own code; upstream
(FunAudioLLM/CosyVoice, Matcha-TTS, diffusers) was read for names, shapes and arithmetic only.

    [x, mu, spks repeated over time, cond] (B, 320, T), t (B,)
    t -> sinusoidal(320, scale 1000) -> time_mlp (Linear, SiLU, Linear)       (B, 4*C0)
    down block i: ResnetBlock1D -> n_blocks transformer blocks -> keep as skip
                  -> stride-2 conv (not last) / k3 conv (last)
    mid block:    ResnetBlock1D -> n_blocks transformer blocks
    up block i:   [x, skip] -> ResnetBlock1D -> transformer blocks
                  -> ConvTranspose(4, 2, 1) (not last) / k3 conv (last)
    final_block -> final_proj (k1) -> * mask                              (B, 80, T)

Two families, one class:

- v1 (`causal=False`): Block1D = Conv1d(k3, pad 1) + GroupNorm(8) + Mish (`block.0`,
  `block.1`); every attention sees every valid frame.
- v2 (`causal=True`): Block1D = left-padded Conv1d(k3) + LayerNorm over channels + Mish
  (`block.0`, `block.2`: index 1 and 3 are the transposes around the LayerNorm, as
  upstream numbers them); the k3 convs in the down/up blocks are left-padded too. With
  `streaming=True` attention is chunk-causal: chunks of `static_chunk_size` frames from
  frame 0, each seeing itself and (`num_decoding_left_chunks` < 0) everything before.

Invariants: padded frames (mask 0) never reach a valid frame: every conv input is
multiplied by the mask, and attention gives masked keys a -1e10 bias (upstream's
`mask_to_bias`), so a valid frame's output does not depend on what padding holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cosyvoice_encoder import ChunkGrid, attention_keep_mask
from .errors import ConfigInvalid
from .stream_cache import StreamCache, causal_pad

__all__ = ["EstimatorConfig", "FlowEstimator"]

_MASK_BIAS = -1.0e10  # upstream's additive bias for a masked key


@dataclass(frozen=True)
class EstimatorConfig:
    """Sizes of the U-Net. Defaults are the official v1 estimator; `official_v2()` is the
    causal one-level U-Net with 50-frame streaming chunks."""

    in_channels: int = 320  # x, mu, spks, cond: 4 x 80
    out_channels: int = 80
    channels: tuple[int, ...] = (256, 256)
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    causal: bool = False
    static_chunk_size: int = 0  # frames per attention chunk when streaming (v2: 50)
    num_decoding_left_chunks: int = -1  # chunks seen to the left when streaming; < 0: all

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        for name in ("in_channels", "out_channels", "attention_head_dim", "n_blocks", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigInvalid(f"estimator.{name}", f"must be a positive int, got {value!r}")
        if isinstance(self.num_mid_blocks, bool) or not isinstance(self.num_mid_blocks, int) or self.num_mid_blocks < 0:
            raise ConfigInvalid("estimator.num_mid_blocks", f"must be an int >= 0, got {self.num_mid_blocks!r}")
        if not self.channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels):
            raise ConfigInvalid("estimator.channels", f"must be a non-empty list of positive ints, "
                                f"got {self.channels!r}")
        if not self.causal and any(c % 8 for c in self.channels):
            raise ConfigInvalid("estimator.channels", f"GroupNorm(8) needs multiples of 8, got {self.channels}")
        if self.in_channels % 2:
            raise ConfigInvalid("estimator.in_channels", f"the sinusoidal time embedding needs an even width, "
                                f"got {self.in_channels}")
        if not isinstance(self.static_chunk_size, int) or self.static_chunk_size < 0:
            raise ConfigInvalid("estimator.static_chunk_size", f"must be an int >= 0, got {self.static_chunk_size!r}")

    @property
    def time_embed_dim(self) -> int:
        return self.channels[0] * 4

    @classmethod
    def official_v1(cls) -> EstimatorConfig:
        return cls()

    @classmethod
    def official_v2(cls) -> EstimatorConfig:
        return cls(channels=(256,), causal=True, static_chunk_size=50)


# --------------------------------------------------------------------------- building blocks


class _CausalConv1d(nn.Conv1d):
    """Conv1d whose output frame i sees input frames i-k+1 .. i (zeros before the start)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        return super().forward(causal_pad(x, self.kernel_size[0] - 1, cache, self))


class _SwapTime(nn.Module):
    """(B, C, T) <-> (B, T, C); holds the Sequential slots upstream's transposes hold."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class _Block1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, causal: bool) -> None:
        super().__init__()
        if causal:
            self.block = nn.Sequential(_CausalConv1d(dim, dim_out, 3), _SwapTime(), nn.LayerNorm(dim_out),
                                       _SwapTime(), nn.Mish())
        else:
            self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(8, dim_out), nn.Mish())

    def forward(self, x: Tensor, mask: Tensor, cache: StreamCache | None = None) -> Tensor:
        if cache is None:
            return self.block(x * mask) * mask
        conv, *rest = self.block  # causal: the conv takes the chunk's past from the cache
        y = conv(x * mask, cache)
        for layer in rest:
            y = layer(y)
        return y * mask


class _ResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int, causal: bool) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = _Block1D(dim, dim_out, causal)
        self.block2 = _Block1D(dim_out, dim_out, causal)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, mask: Tensor, time: Tensor, cache: StreamCache | None = None) -> Tensor:
        h = self.block1(x, mask, cache) + self.mlp(time).unsqueeze(-1)
        h = self.block2(h, mask, cache)
        return h + self.res_conv(x * mask)


class _Attention(nn.Module):
    """diffusers' `Attention` layout: bias-less q/k/v, `to_out.0` Linear (`to_out.1` is
    dropout, no parameters)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x: Tensor, bias: Tensor | None, cache: StreamCache | None = None) -> Tensor:
        """`cache`: earlier chunks' keys and values in front (all visible: bias None)."""
        b, t, _ = x.shape

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        k, v = heads(self.to_k(x)), heads(self.to_v(x))
        if cache is not None:
            k, v, _ = cache.keys_values(self, k, v)
        out = F.scaled_dot_product_attention(heads(self.to_q(x)), k, v,
                                             attn_mask=None if bias is None else bias[:, None])
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class _GeluProj(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x))


class _FeedForward(nn.Module):
    """`net.0.proj` Linear + exact GELU, `net.1` dropout, `net.2` Linear (x4 width)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class _TransformerBlock(nn.Module):
    """Pre-norm self-attention then feed-forward (diffusers' BasicTransformerBlock with
    no cross-attention: `norm1`, `attn1`, `norm3`, `ff`)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = _Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = _FeedForward(dim)

    def forward(self, x: Tensor, bias: Tensor | None, cache: StreamCache | None = None) -> Tensor:
        x = self.attn1(self.norm1(x), bias, cache) + x
        return self.ff(self.norm3(x)) + x


class _Downsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _time_features(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """(B,) flow time in [0, 1] -> (B, dim): [sin, cos] of scale * t * 10000^(-i/(dim/2-1))."""
    half = dim // 2
    rate = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angle = scale * t.reshape(-1).unsqueeze(1) * rate.unsqueeze(0)
    return torch.cat((angle.sin(), angle.cos()), dim=-1).to(t.dtype)


# --------------------------------------------------------------------------- the U-Net


class FlowEstimator(nn.Module):
    """Velocity v(x, t | mu, spks, cond) for conditional flow matching.

    x, mu, cond: (B, 80, T); mask: (B, 1, T) with 1 for valid frames; t: (B,) or scalar;
    spks: (B, 80). Returns (B, 80, T), zero at masked frames."""

    def __init__(self, config: EstimatorConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        causal = c.causal
        time_dim = c.time_embed_dim

        def transformers(dim: int) -> nn.ModuleList:
            return nn.ModuleList(_TransformerBlock(dim, c.num_heads, c.attention_head_dim) for _ in range(c.n_blocks))

        def plain_conv(dim: int) -> nn.Module:
            return _CausalConv1d(dim, dim, 3) if causal else nn.Conv1d(dim, dim, 3, padding=1)

        self.time_mlp = _TimestepMLP(c.in_channels, time_dim)
        self.down_blocks = nn.ModuleList()
        self.mid_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        width = c.in_channels
        for i, out in enumerate(c.channels):
            last = i == len(c.channels) - 1
            self.down_blocks.append(nn.ModuleList([
                _ResnetBlock1D(width, out, time_dim, causal), transformers(out),
                plain_conv(out) if last else _Downsample(out)]))
            width = out
        for _ in range(c.num_mid_blocks):
            self.mid_blocks.append(nn.ModuleList([_ResnetBlock1D(width, width, time_dim, causal), transformers(width)]))
        ups = c.channels[::-1] + (c.channels[0],)
        for i in range(len(ups) - 1):
            last = i == len(ups) - 2
            out = ups[i + 1]
            self.up_blocks.append(nn.ModuleList([
                _ResnetBlock1D(2 * ups[i], out, time_dim, causal), transformers(out),
                plain_conv(out) if last else _Upsample(out)]))
        self.final_block = _Block1D(ups[-1], ups[-1], causal)
        self.final_proj = nn.Conv1d(ups[-1], c.out_channels, 1)

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor,
                streaming: bool | ChunkGrid = False, cache: StreamCache | None = None) -> Tensor:
        """`streaming`: True = upstream's static chunks, or a frame `ChunkGrid`. `cache`
        (causal only): x is one chunk of a grid, the cache holds the chunks before it
        (model/stream_cache.py); the mask must be all ones."""
        c = self.config
        if cache is not None and (not c.causal or len(c.channels) != 1):
            raise ValueError("only the causal one-level (v2) estimator computes chunk by chunk")
        time = self.time_mlp(_time_features(torch.as_tensor(t, dtype=x.dtype, device=x.device), c.in_channels))
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)
        if isinstance(streaming, ChunkGrid):
            grid = streaming
        else:
            grid = ChunkGrid(c.static_chunk_size if streaming else 0, 0, c.num_decoding_left_chunks)

        skips: list[Tensor] = []
        masks = [mask]
        for resnet, blocks, down in self.down_blocks:
            m = masks[-1]
            h = self._transformers(resnet(h, m, time, cache), m, blocks, grid, cache)
            skips.append(h)
            h = down(h * m) if cache is None else down(h * m, cache)  # causal: the last block's k3 conv
            masks.append(m[:, :, ::2])
        masks.pop()
        m = masks[-1]
        for resnet, blocks in self.mid_blocks:
            h = self._transformers(resnet(h, m, time, cache), m, blocks, grid, cache)
        for resnet, blocks, up in self.up_blocks:
            m = masks.pop()
            skip = skips.pop()
            h = torch.cat([h[:, :, :skip.shape[-1]], skip], dim=1)
            h = self._transformers(resnet(h, m, time, cache), m, blocks, grid, cache)
            h = up(h * m) if cache is None else up(h * m, cache)
        h = self.final_block(h, m, cache)
        return self.final_proj(h * m) * mask

    def _transformers(self, h: Tensor, mask: Tensor, blocks: nn.ModuleList, grid: ChunkGrid,
                      cache: StreamCache | None) -> Tensor:
        if cache is None:
            keep = attention_keep_mask(mask[:, 0] > 0, grid)
            keep = keep.expand(-1, h.shape[-1], -1)
            bias = (1.0 - keep.to(h.dtype)) * _MASK_BIAS
        else:
            bias = None
        y = h.transpose(1, 2)
        for block in blocks:
            y = block(y, bias, cache)
        return y.transpose(1, 2)
