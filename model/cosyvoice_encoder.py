"""The token encoder of CosyVoice's flow decoder: a Conformer without convolution module
or macaron feed-forward (WeNet/ESPnet layout), v2's up-sampling variant, and v1's length
regulator. Plain torch, our own code; upstream (FunAudioLLM/CosyVoice) was read for the
layer names, shapes and arithmetic only.

    token embeddings (B, n, D)
    -> embed: Linear + LayerNorm, x * sqrt(D), relative position table (computed)
    -> [v2] pre-lookahead: conv k=L+1 over the next L tokens, LeakyReLU, causal conv k3, + input
    -> `num_blocks` pre-norm layers: rel-pos self-attention (pos_bias_u/v), SiLU feed-forward
    -> [v2] up-sample x2 (nearest repeat, causal conv k5), up_embed (Linear + LayerNorm,
       x * sqrt(D), a new table), `num_up_blocks` more layers
    -> after_norm                                                  (B, n or 2n, D)

Invariants:

- State-dict names and order equal upstream's (`embed.out.0/1`, `after_norm`,
  `pre_lookahead_layer.conv1/2`, `encoders.N.self_attn.linear_q/k/v/out/pos`,
  `pos_bias_u/v`, `feed_forward.w_1/w_2`, `norm_ff`, `norm_mha`, `up_layer.conv`,
  `up_embed.out.0/1`, `up_encoders.N.*`); nothing else is stored: the position table is
  a pure function of the length.
- The relative table is ESPnet's (rows for distances T-1 .. -(T-1), sin/cos interleaved),
  each value computed from exactly the float32 product upstream computes, so it is
  bit-identical however long the utterance.
- Streaming (v2) changes only the attention masks: chunks of `static_chunk_size` tokens
  (twice that after up-sampling) counted from the first prompt token, each seeing itself
  and everything before; or any `ChunkGrid` (size, offset, chunks seen to the left).
  Look-ahead tokens given as `context` feed only the pre-lookahead convolution; they
  produce no output frames.
- `forward_span` computes one chunk of a grid with caches (past keys and values, the
  causal convolutions' last inputs) and equals `forward` over the whole utterance on the
  same grid: attention and convolutions see exactly the same frames either way.
- v1's length regulator interpolates the prompt and the new tokens separately, and with
  more than 2 x `edge_tokens` new tokens the first and last `edge_tokens` separately again,
  so chunk boundaries land on fixed mel frames (upstream's streaming overlap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigInvalid
from .stream_cache import StreamCache, causal_pad

__all__ = ["EncoderConfig", "ConformerEncoder", "LengthRegulator", "ChunkGrid", "chunk_keep_mask",
           "attention_keep_mask"]

_NORM_EPS_LAYER = 1e-12  # norm_mha / norm_ff, as WeNet builds them
_NORM_EPS_OUT = 1e-5  # embed.out.1 and after_norm


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes of the encoder. Defaults are the official v1 (CosyVoice-300M) encoder;
    `EncoderConfig.official_v2()` adds the pre-lookahead and up-sampling stage.

    `pre_lookahead_len` 0 and `up_stride` 0 mean "no such layer" (v1). Upstream hardcodes
    512 channels for the pre-lookahead and up-sampling convolutions; we take the encoder
    width, which is 512 at the official size and lets the small reference builds load."""

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    static_chunk_size: int = 0  # tokens per attention chunk when streaming (v2: 25)
    pre_lookahead_len: int = 0  # v2: 3
    up_stride: int = 0  # v2: 2
    num_up_blocks: int = 0  # v2: 4

    def __post_init__(self) -> None:
        for name in ("input_size", "output_size", "attention_heads", "linear_units", "num_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigInvalid(f"encoder.{name}", f"must be a positive int, got {value!r}")
        for name in ("static_chunk_size", "pre_lookahead_len", "up_stride", "num_up_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigInvalid(f"encoder.{name}", f"must be an int >= 0, got {value!r}")
        if self.output_size % self.attention_heads:
            raise ConfigInvalid("encoder.output_size", f"{self.output_size} is not divisible by "
                                f"attention_heads={self.attention_heads}")
        if self.output_size % 2:
            raise ConfigInvalid("encoder.output_size", f"the sin/cos position table needs an even width, "
                                f"got {self.output_size}")
        if (self.up_stride == 0) != (self.num_up_blocks == 0):
            raise ConfigInvalid("encoder.up_stride", "up_stride and num_up_blocks are both 0 (v1) or both "
                                f"positive (v2), got {self.up_stride} and {self.num_up_blocks}")
        if self.upsamples and self.input_size != self.output_size:
            raise ConfigInvalid("encoder.input_size", "up_embed is a Linear(input_size -> output_size) applied "
                                f"to the encoder output, so input_size must equal output_size "
                                f"({self.input_size} != {self.output_size})")

    @property
    def upsamples(self) -> bool:
        return self.up_stride > 0

    @property
    def out_frames_per_token(self) -> int:
        return self.up_stride if self.upsamples else 1

    @classmethod
    def official_v1(cls) -> EncoderConfig:
        return cls()

    @classmethod
    def official_v2(cls) -> EncoderConfig:
        return cls(static_chunk_size=25, pre_lookahead_len=3, up_stride=2, num_up_blocks=4)


# --------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class ChunkGrid:
    """Chunk-causal attention: chunk c holds positions [c * size - offset, (c + 1) * size -
    offset); a query sees its whole chunk and `left` chunks before it (all when < 0).
    size <= 0: full attention."""

    size: int
    offset: int = 0
    left: int = -1

    def scaled(self, factor: int) -> ChunkGrid:
        """The same grid counted in frames, `factor` frames per token."""
        return ChunkGrid(self.size * factor, self.offset * factor, self.left)


def chunk_keep_mask(size: int, chunk: int, left_chunks: int = -1, device: torch.device | str | None = None,
                    offset: int = 0) -> Tensor:
    """(size, size) bool: query i may attend key j, on the grid `ChunkGrid(chunk, offset,
    left_chunks)`. `chunk` <= 0 means full attention."""
    if chunk <= 0:
        return torch.ones(size, size, dtype=torch.bool, device=device)
    block = torch.div(torch.arange(size, device=device) + offset, chunk, rounding_mode="floor")
    keep = block[None, :] <= block[:, None]
    if left_chunks >= 0:
        keep &= block[None, :] >= (block - left_chunks)[:, None]
    return keep


def attention_keep_mask(valid: Tensor, grid: ChunkGrid) -> Tensor:
    """(B, T) valid frames -> (B, 1 or T, T) bool keep mask. A query row with no key left
    attends to every key instead (as upstream forces it); such rows are padding, which no
    valid frame ever reads."""
    if grid.size <= 0:
        keep = valid[:, None, :]
    else:
        keep = valid[:, None, :] & chunk_keep_mask(valid.shape[1], grid.size, grid.left, valid.device,
                                                   grid.offset)[None]
    empty = ~keep.any(dim=-1, keepdim=True)
    if bool(empty.any()):
        keep = keep | empty
    return keep


# --------------------------------------------------------------------------- layers


def _relative_table(high: int, low: int, width: int, device: torch.device) -> Tensor:
    """(1, high-low+1, width): row r is relative distance high-r (ESPnet's layout for
    high = T-1, low = -(T-1)), even columns sin, odd columns cos of distance *
    10000^(-2i/width), in float32: a distance's row is the same in any table."""
    rate = torch.exp(torch.arange(0, width, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / width))
    distance = torch.arange(high, low - 1, -1, dtype=torch.float32, device=device)
    angle = distance[:, None] * rate[None, :]
    table = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).reshape(high - low + 1, width)
    return table[None]


def _rel_shift(scores: Tensor, first_query: int) -> Tensor:
    """(B, H, Tq, R) scores against a table of distances high .. -(Tq-1) -> (B, H, Tq, Tk)
    with [i, j] taken at distance (first_query + i) - j, queries being keys first_query ..
    first_query + Tq - 1 (Tk = first_query + Tq, high = Tk - 1)."""
    tq = scores.shape[2]
    tk = first_query + tq
    rows = torch.arange(tq, device=scores.device)[:, None]
    index = (tk - 1) - (first_query + rows) + torch.arange(tk, device=scores.device)[None, :]
    return scores.gather(-1, index.expand(*scores.shape[:2], tq, tk))


class _LinearEmbed(nn.Module):
    """`out.0` Linear, `out.1` LayerNorm; then x * sqrt(width) and the position table."""

    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=_NORM_EPS_OUT))
        self.xscale = math.sqrt(odim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x) * self.xscale


class _RelPositionAttention(nn.Module):
    """Transformer-XL style self-attention: scores = (q + u) k^T + (q + v) (W_pos P)^T,
    the second term shifted from table rows to relative distances."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.linear_q = nn.Linear(width, width)
        self.linear_k = nn.Linear(width, width)
        self.linear_v = nn.Linear(width, width)
        self.linear_out = nn.Linear(width, width)
        self.linear_pos = nn.Linear(width, width, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, x: Tensor, keep: Tensor | None, table: Tensor, cache: StreamCache | None = None) -> Tensor:
        """`cache`: the keys and values of earlier chunks go in front of x's (x's queries
        see all of them, `keep` must be None) and x's are kept for the next chunk."""
        b, t, _ = x.shape
        h, d = self.heads, self.head_dim
        q = self.linear_q(x).view(b, t, h, d)
        k = self.linear_k(x).view(b, t, h, d).transpose(1, 2)
        v = self.linear_v(x).view(b, t, h, d).transpose(1, 2)
        first = 0
        if cache is not None:
            k, v, first = cache.keys_values(self, k, v)
        p = self.linear_pos(table).view(table.shape[0], -1, h, d).transpose(1, 2)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = _rel_shift(torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)), first)
        scores = (content + position) / math.sqrt(d)
        if keep is not None:
            drop = ~keep[:, None]
            weights = torch.softmax(scores.masked_fill(drop, -math.inf), dim=-1).masked_fill(drop, 0.0)
        else:
            weights = torch.softmax(scores, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, t, h * d)
        return self.linear_out(out)


class _FeedForward(nn.Module):
    def __init__(self, width: int, units: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(width, units)
        self.w_2 = nn.Linear(units, width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w_1(x)
        return self.w_2(h * torch.sigmoid(h))  # swish, written as upstream writes it


class _ConformerLayer(nn.Module):
    """Pre-norm: x + attention(norm_mha(x)), then x + feed_forward(norm_ff(x))."""

    def __init__(self, width: int, heads: int, units: int) -> None:
        super().__init__()
        self.self_attn = _RelPositionAttention(width, heads)
        self.feed_forward = _FeedForward(width, units)
        self.norm_ff = nn.LayerNorm(width, eps=_NORM_EPS_LAYER)
        self.norm_mha = nn.LayerNorm(width, eps=_NORM_EPS_LAYER)

    def forward(self, x: Tensor, keep: Tensor | None, table: Tensor, cache: StreamCache | None = None) -> Tensor:
        x = x + self.self_attn(self.norm_mha(x), keep, table, cache)
        return x + self.feed_forward(self.norm_ff(x))


class _PreLookahead(nn.Module):
    """Each token sees the next `length` tokens through conv1 (zeros past the end, or the
    given look-ahead context), then two tokens back through the causal conv2; residual."""

    def __init__(self, channels: int, length: int) -> None:
        super().__init__()
        self.length = length
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=length + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: Tensor, context: Tensor | None = None, cache: StreamCache | None = None) -> Tensor:
        h = x.transpose(1, 2)
        if context is not None and context.shape[1]:
            if context.shape[1] > self.length:
                raise ValueError(f"look-ahead context of {context.shape[1]} tokens, at most {self.length}")
            h = torch.cat([h, context.transpose(1, 2)], dim=2)
            h = F.pad(h, (0, self.length - context.shape[1]))
        else:
            h = F.pad(h, (0, self.length))
        h = F.leaky_relu(self.conv1(h))
        h = self.conv2(causal_pad(h, self.conv2.kernel_size[0] - 1, cache, self))
        return h.transpose(1, 2) + x


class _RepeatUpsample(nn.Module):
    """x `stride`: repeat each frame, then a causal conv of 2*stride+1 taps."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, 2 * stride + 1)

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        h = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(causal_pad(h, 2 * self.stride, cache, self))


# --------------------------------------------------------------------------- encoder


class ConformerEncoder(nn.Module):
    """(B, n, input_size) token embeddings -> (B, n * out_frames_per_token, output_size).

    `lengths` (B,) marks padded tokens (keys only, as upstream); `context` (B, <= L,
    input_size) are look-ahead token embeddings (v2 streaming, not final); `streaming`
    switches to chunk attention."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        width = c.output_size
        # Registration order = upstream's state_dict order.
        self.embed = _LinearEmbed(c.input_size, width)
        self.after_norm = nn.LayerNorm(width, eps=_NORM_EPS_OUT)
        if c.pre_lookahead_len:
            self.pre_lookahead_layer = _PreLookahead(width, c.pre_lookahead_len)
        self.encoders = nn.ModuleList(
            _ConformerLayer(width, c.attention_heads, c.linear_units) for _ in range(c.num_blocks))
        if c.upsamples:
            self.up_layer = _RepeatUpsample(width, c.up_stride)
            self.up_embed = _LinearEmbed(width, width)
            self.up_encoders = nn.ModuleList(
                _ConformerLayer(width, c.attention_heads, c.linear_units) for _ in range(c.num_up_blocks))

    def forward(self, xs: Tensor, lengths: Tensor | None = None, context: Tensor | None = None,
                streaming: bool | ChunkGrid = False) -> Tensor:
        c = self.config
        if context is not None and not c.pre_lookahead_len:
            raise ValueError("look-ahead context needs a pre-lookahead layer (v2)")
        grid = self.grid(streaming)
        x = self.embed(xs)
        keep = self._keep(lengths, x.shape[0], x.shape[1], grid, x.device)
        table = _relative_table(x.shape[1] - 1, 1 - x.shape[1], c.output_size, x.device).to(x.dtype)
        if c.pre_lookahead_len:
            x = self.pre_lookahead_layer(x, None if context is None else self.embed(context))
        for layer in self.encoders:
            x = layer(x, keep, table)
        if c.upsamples:
            x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)
            x = self.up_embed(x)
            up_lengths = None if lengths is None else lengths * c.up_stride
            keep = self._keep(up_lengths, x.shape[0], x.shape[1], grid.scaled(c.up_stride), x.device)
            table = _relative_table(x.shape[1] - 1, 1 - x.shape[1], c.output_size, x.device).to(x.dtype)
            for layer in self.up_encoders:
                x = layer(x, keep, table)
        return self.after_norm(x)

    def forward_span(self, xs: Tensor, context: Tensor, tokens: StreamCache, frames: StreamCache) -> Tensor:
        """v2, one chunk of a grid with caches: xs (B, n, input) the chunk's token
        embeddings, `context` (B, <= L, input) the look-ahead tokens after it (fewer: the
        utterance ends there). `tokens` and `frames` carry the two attention stacks'
        state from the chunk before (their `keep`: the past positions the grid lets the
        next chunk see). Equals `forward` over the whole utterance on the same grid."""
        c = self.config
        if not c.upsamples:
            raise ValueError("forward_span is the chunk-causal (v2) encoder's")
        x = self.pre_lookahead_layer(self.embed(xs), self.embed(context), tokens)
        x = self._layers(self.encoders, x, tokens)
        x = self.up_layer(x.transpose(1, 2), frames).transpose(1, 2)
        return self.after_norm(self._layers(self.up_encoders, self.up_embed(x), frames))

    def _layers(self, layers: nn.ModuleList, x: Tensor, cache: StreamCache) -> Tensor:
        # Every layer holds the same past, so the table for this chunk's distances is shared.
        first = cache.past_length(layers[0].self_attn)
        table = _relative_table(first + x.shape[1] - 1, 1 - x.shape[1], self.config.output_size, x.device)
        for layer in layers:
            x = layer(x, None, table.to(x.dtype), cache)
        return x

    def grid(self, streaming: bool | ChunkGrid) -> ChunkGrid:
        """The token grid of a `streaming` argument: True = upstream's static chunks."""
        if isinstance(streaming, ChunkGrid):
            return streaming
        return ChunkGrid(self.config.static_chunk_size if streaming else 0)

    @staticmethod
    def _keep(lengths: Tensor | None, batch: int, size: int, grid: ChunkGrid, device: torch.device) -> Tensor | None:
        if lengths is None and grid.size <= 0:
            return None  # every key valid: plain softmax
        if lengths is None:
            valid = torch.ones(batch, size, dtype=torch.bool, device=device)
        else:
            valid = torch.arange(size, device=device)[None, :] < lengths.to(device)[:, None]
        return attention_keep_mask(valid, grid)


# --------------------------------------------------------------------------- length regulator (v1)


class LengthRegulator(nn.Module):
    """v1: token-rate features (B, n, C) -> mel-rate features by linear interpolation, then
    `stages` x (Conv1d k3, GroupNorm(1), Mish) and a Conv1d k1 (`model.0` .. `model.{3*stages}`)."""

    def __init__(self, channels: int, stages: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(stages):
            layers += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(1, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, prompt: Tensor, tokens: Tensor, prompt_frames: int, frames: int,
                edge_tokens: int = 20, edge_frames: int = 34) -> Tensor:
        """(B, n1, C) prompt features and (B, n2, C) new-token features -> (B, prompt_frames
        + frames, C). With n2 > 2 * edge_tokens, the first and last `edge_tokens` become
        `edge_frames` frames each and the middle is interpolated on its own."""
        new = tokens.transpose(1, 2)
        if new.shape[2] > 2 * edge_tokens:
            middle = frames - 2 * edge_frames
            if middle < 1:
                raise ValueError(f"{frames} frames cannot hold two {edge_frames}-frame edges")
            new = torch.cat([_stretch(new[:, :, :edge_tokens], edge_frames),
                             _stretch(new[:, :, edge_tokens:-edge_tokens], middle),
                             _stretch(new[:, :, -edge_tokens:], edge_frames)], dim=2)
        else:
            new = _stretch(new, frames)
        if prompt.shape[1]:
            new = torch.cat([_stretch(prompt.transpose(1, 2), prompt_frames), new], dim=2)
        return self.model(new).transpose(1, 2)


def _stretch(x: Tensor, frames: int) -> Tensor:
    return F.interpolate(x.contiguous(), size=frames, mode="linear")
