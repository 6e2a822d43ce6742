"""The training loss: next-token cross entropy on the positions the loss mask selects.

`loss_mask[t]` marks token t as a target: the model predicts ids[t] from ids[:t]. So the
hidden state at t-1 is scored against ids[t] where loss_mask[t] is True; the user channel,
prompts and padding (mask False) cost nothing. Only the selected rows go through the
output head: with a 150k-row vocabulary the full logits would dwarf the rest.

It is one nn.Module so DDP and FSDP wrap it whole: their hooks run on its forward, which
would not happen if the loop called the backbone's parts from outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["CausalLMObjective", "is_right_padded"]


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is real tokens then padding: causal attention then never lets a
    real token see padding, so no mask needs to reach the backbone (the fast SDPA path)."""
    return bool((attention_mask.long().cummin(dim=1).values == attention_mask.long()).all())


class CausalLMObjective(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone  # a Hugging Face Qwen2ForCausalLM

    def forward(self, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The summed (not averaged) loss over the selected targets: the caller divides by
        the target count of the whole optimizer step, across micro-batches and ranks."""
        targets = loss_mask[:, 1:].bool()
        mask = None
        if attention_mask is not None and not is_right_padded(attention_mask):
            mask = attention_mask[:, :-1]
        hidden = self.backbone.model(input_ids=input_ids[:, :-1], attention_mask=mask,
                                     use_cache=False).last_hidden_state
        logits = self.backbone.lm_head(hidden[targets]).float()
        return F.cross_entropy(logits, input_ids[:, 1:][targets], reduction="sum")
