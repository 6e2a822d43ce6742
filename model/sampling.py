"""Batched token sampling with per-row settings and per-row reproducible randomness.

Each row (a session) has its own temperature, top-k, top-p and seed. The random number
for a row's n-th sampled token is a pure function of (seed, n) (a SplitMix64 hash), not of
a shared generator's state, so a session samples the same tokens whether it steps alone or
in a batch with others, and whatever joins or leaves. temperature 0 means greedy (argmax).
"""

from __future__ import annotations

import torch

__all__ = ["uniform_from_counter", "sample_rows", "gate_speaking"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform_from_counter(seed: int, counter: int) -> float:
    """A uniform number in [0, 1) determined by (seed, counter) alone."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ counter) >> 11) / float(1 << 53)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """logits [n, V]; temperature, top_p, uniform float [n]; top_k long [n] (0 = off).
    Returns the chosen column per row (long [n]). Greedy rows take the argmax."""
    choice = logits.argmax(dim=-1)
    sampled_rows = temperature > 0
    if not bool(sampled_rows.any()):
        return choice
    rows = sampled_rows.nonzero().squeeze(1)
    x = logits[rows].float() / temperature[rows, None]
    sorted_x, order = x.sort(dim=-1, descending=True)
    rank = torch.arange(x.shape[-1], device=x.device)
    k = top_k[rows]
    keep = (k[:, None] <= 0) | (rank[None, :] < k[:, None])
    sorted_x = sorted_x.masked_fill(~keep, float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the first token always stays).
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(before >= top_p[rows, None], 0.0)
    cdf = probs.cumsum(dim=-1)
    target = uniform[rows, None].to(cdf.dtype) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target).clamp_(max=x.shape[-1] - 1).squeeze(1)
    choice[rows] = order.gather(1, pick[:, None]).squeeze(1)
    return choice


def gate_speaking(logits: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """logits [n, V] whose last column is the silent token; threshold float [n] (0 = off).
    Rows with a threshold keep either the silent column alone (when the other columns'
    total probability is below it) or every column but the silent one."""
    rows = threshold > 0
    if not bool(rows.any()):
        return logits
    silent_p = logits.float().softmax(dim=-1)[:, -1]
    speak = (1.0 - silent_p) >= threshold
    out = logits.clone()
    out[rows & speak, -1] = float("-inf")
    out[rows & ~speak, :-1] = float("-inf")
    return out
