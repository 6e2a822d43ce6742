"""`StreamCache`: what a chunk-causal network keeps between chunks so that each chunk is
computed alone and still equals the whole sequence computed at once (CosyVoice2's flow,
model/cosyvoice_flow_stream.py): the last inputs of every causal convolution and the keys
and values of every self-attention, per layer (keyed by the module).

Keys and values are cut to the last `keep` positions after each chunk (None: all of
them); the owner sets `keep` to the span its attention grid lets the next chunk see.
Caches of several streams at the same point of their chunk grid `join` into one batch
and `split` back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StreamCache", "causal_pad"]


def causal_pad(x: Tensor, n: int, cache: StreamCache | None, module: nn.Module) -> Tensor:
    """x (B, C, T) with `n` frames in front for a causal convolution: zeros, or with a
    cache the frames before this chunk."""
    return F.pad(x, (n, 0)) if cache is None else cache.left_context(module, x, n)


class StreamCache:
    def __init__(self, keep: int | None = None) -> None:
        self.keep = keep
        self._convs: dict[nn.Module, Tensor] = {}  # (B, C, n) last inputs
        self._attention: dict[nn.Module, tuple[Tensor, Tensor]] = {}  # (B, H, T, d) keys, values

    def left_context(self, module: nn.Module, x: Tensor, n: int) -> Tensor:
        """x (B, C, T) with the module's last `n` input frames in front (zeros at the
        start of a stream, as a causal convolution's padding); keeps the new last `n`."""
        past = self._convs.get(module)
        if past is None:
            past = x.new_zeros(x.shape[0], x.shape[1], n)
        x = torch.cat([past, x], dim=2)
        self._convs[module] = x[:, :, x.shape[2] - n:].clone()  # not a view keeping the whole input alive
        return x

    def past_length(self, module: nn.Module) -> int:
        past = self._attention.get(module)
        return 0 if past is None else past[0].shape[2]

    def keys_values(self, module: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
        """(B, H, T, d) new keys and values -> all of them (the kept past first) and the
        number of past ones; keeps the last `keep`."""
        past = self._attention.get(module)
        first = 0
        if past is not None:
            first = past[0].shape[2]
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        cut = 0 if self.keep is None else max(0, k.shape[2] - self.keep)
        self._attention[module] = (k[:, :, cut:].clone(), v[:, :, cut:].clone()) if cut else (k, v)
        return k, v, first

    def clone(self) -> StreamCache:
        out = StreamCache(self.keep)
        out._convs = {m: t.clone() for m, t in self._convs.items()}
        out._attention = {m: (k.clone(), v.clone()) for m, (k, v) in self._attention.items()}
        return out

    @classmethod
    def join(cls, caches: list[StreamCache]) -> StreamCache:
        """One cache for the batch of `caches`' streams, in order. They must hold the same
        layers with the same lengths (streams at the same point of the same grid)."""
        out = cls(caches[0].keep)
        for module in caches[0]._convs:
            out._convs[module] = torch.cat([c._convs[module] for c in caches])
        for module in caches[0]._attention:
            out._attention[module] = (torch.cat([c._attention[module][0] for c in caches]),
                                      torch.cat([c._attention[module][1] for c in caches]))
        return out

    def split(self, sizes: list[int]) -> list[StreamCache]:
        """The inverse of `join`: one cache per stream, `sizes` rows each."""
        out = [StreamCache(self.keep) for _ in sizes]
        for module, x in self._convs.items():
            for cache, part in zip(out, x.split(sizes)):
                cache._convs[module] = part
        for module, (k, v) in self._attention.items():
            for cache, pk, pv in zip(out, k.split(sizes), v.split(sizes)):
                cache._attention[module] = (pk, pv)
        return out
