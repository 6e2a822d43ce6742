"""The learning-rate schedule: linear warm-up, then a cosine decay (the paper's "cosine").

`lr_factor(s)` multiplies the base rate for optimizer step s (0-based):
    s < warmup:  (s + 1) / warmup          (the first step already learns)
    after:       m + (1 - m) * (1 + cos(pi * p)) / 2,  p = (s - warmup) / (total - warmup)
where m is `min_ratio`. Past `total` the factor stays at m.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lr_factor", "cosine_scheduler", "default_warmup"]


def default_warmup(total_steps: int) -> int:
    """3% of the run, at least one step: a fine-tune of a pretrained backbone needs little."""
    return max(1, math.ceil(0.03 * total_steps))


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                     min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup ({warmup_steps}) <= total steps ({total_steps}) and total >= 1")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, min_ratio))
