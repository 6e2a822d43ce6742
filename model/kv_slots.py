"""A preallocated key/value cache with one row per session slot.

Layout per layer: keys and values [slots, kv_heads, capacity + 1, head_dim]. Cache column
c of a slot holds the token at position c: positions stay inside [0, capacity), the range
the model was trained on, however long the call. The extra last column is a trash column:
padding tokens of a batched step write there, and no query ever attends to it.

A forward pass covers rows [0, rows) at once; each row feeds `fed[b]` real tokens (0 for a
slot that is not stepping this round, which is then computed but masked and discarded).
`prepare()` sets that up; the backbone's attention layers then call `update()` once per
layer, which writes the new keys and values in place and returns the cache up to the
longest used length.

Rolling (`drop()`): when a slot's next chunk would not fit, the oldest whole chunks after
the fixed prefix are dropped and the kept tail moves left. Its keys were rotated (RoPE) for
their old positions; a rotation by -shift re-positions them (StreamingLLM), since rotations
compose. Values carry no position and just move. The rotation is computed in float32 but
stored in the cache's dtype, so in bfloat16 every drop re-rounds every kept key: callers
drop in hops (a share of the context at once, `roll_hop_fraction`), which bounds how often
any key is re-rounded by the window rather than by the length of the call
(docs/engine.md, "The rolling context").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SlotKVCache", "StepPlan"]


@dataclass
class StepPlan:
    """One forward pass: which cache column each input token writes, and the mask."""

    write_index: torch.Tensor  # long [rows, T]
    position_ids: torch.Tensor  # long [rows, T]
    mask: torch.Tensor  # bool [rows, 1, T, span]
    rows: int
    span: int


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SlotKVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int,
                 inv_freq: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        self.slots = slots
        self.capacity = capacity
        self.trash = capacity
        shape = (slots, kv_heads, capacity + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.lengths = [0] * slots  # host copy: tokens cached per slot
        self._inv_freq = inv_freq.to(device=device, dtype=torch.float32)
        self._plan: StepPlan | None = None
        self.device = device

    @property
    def bytes_per_slot(self) -> int:
        k = self.keys[0]
        return 2 * len(self.keys) * k[0].numel() * k.element_size()

    # ---- the forward pass --------------------------------------------------------------

    def prepare(self, fed: list[int], width: int) -> StepPlan:
        """Plan a forward pass of `width` tokens per row over rows [0, len(fed)), row b
        feeding fed[b] real tokens. Raises if a row would overflow its capacity."""
        rows = len(fed)
        lengths = self.lengths[:rows]
        for b, n in enumerate(fed):
            if lengths[b] + n > self.capacity:
                raise RuntimeError(f"slot {b}: {lengths[b]}+{n} tokens exceed the cache of {self.capacity}")
        span = max(l + n for l, n in zip(lengths, fed)) or 1
        dev = self.device
        length_t = torch.tensor(lengths, device=dev)[:, None]
        fed_t = torch.tensor(fed, device=dev)[:, None]
        j = torch.arange(width, device=dev)[None, :]
        real = j < fed_t
        write_index = torch.where(real, length_t + j, torch.full_like(j, self.trash))
        # A padding query repeats the last real position, an idle row position 0: their
        # outputs are discarded, they only need to be finite.
        last = torch.minimum(j, (fed_t - 1).clamp(min=0))
        position_ids = torch.where(fed_t > 0, length_t + last, torch.zeros_like(j))
        cols = torch.arange(span, device=dev)[None, None, :]
        mask = cols <= position_ids[:, :, None]
        self._plan = StepPlan(write_index, position_ids, mask[:, None], rows, span)
        return self._plan

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_: object):
        """Called by each attention layer: key/value [rows, heads, T, dim]."""
        plan = self._plan
        assert plan is not None, "prepare() must run before the forward pass"
        rows = torch.arange(plan.rows, device=key.device)[:, None]
        k_all, v_all = self.keys[layer_idx], self.values[layer_idx]
        k_all[rows, :, plan.write_index] = key.transpose(1, 2)
        v_all[rows, :, plan.write_index] = value.transpose(1, 2)
        return k_all[: plan.rows, :, : plan.span], v_all[: plan.rows, :, : plan.span]

    def commit(self, fed: list[int]) -> None:
        for b, n in enumerate(fed):
            self.lengths[b] += n
        self._plan = None

    # ---- slot management ---------------------------------------------------------------

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's cache into slot dst (packing live slots low)."""
        n = self.lengths[src]
        for k, v in zip(self.keys, self.values):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0

    def drop(self, slot: int, start: int, count: int) -> None:
        """Remove cache columns [start, start + count) of a slot; later columns move left by
        `count` and their keys are re-rotated to their new positions (one rounding to the
        cache's dtype per call, whatever `count`: drop much at once, not often)."""
        n = self.lengths[slot]
        if count <= 0:
            return
        if start + count > n:
            raise ValueError(f"slot {slot}: cannot drop {count} tokens at {start} of {n}")
        tail = n - start - count
        freqs = -float(count) * self._inv_freq
        emb = torch.cat((freqs, freqs))
        cos, sin = emb.cos(), emb.sin()
        for k, v in zip(self.keys, self.values):
            moved = k[slot, :, start + count:n].float()
            k[slot, :, start:start + tail] = (moved * cos + _rotate_half(moved) * sin).to(k.dtype)
            v[slot, :, start:start + tail] = v[slot, :, start + count:n].clone()
        self.lengths[slot] = n - count
