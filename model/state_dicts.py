"""Reading and checking state-dict files, for every module loaded by key name (the S3
tokenizer, CosyVoice's flow and HiFT): one set of rules, one style of error, each naming
the file and every key that is wrong before torch's terser message would."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from .errors import CheckpointError

__all__ = ["read_state_file", "check_state"]


def read_state_file(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """A flat {name: tensor} from a torch file (read with weights_only) or a .safetensors
    file; a single {"state_dict": {...}} style wrapper is unwrapped."""
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device=str(map_location))
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated zip, a bad pickle, a foreign object: each fails its own way
        raise CheckpointError(path, f"cannot read the state dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                 for k, v in state.items()):
        raise CheckpointError(path, "expected a flat mapping of parameter names to tensors")
    return dict(state)


def check_state(model: nn.Module, state: Mapping[str, Tensor], source: object, built_for: str, *,
                floats_only: bool = False) -> None:
    """CheckpointError naming every missing, unexpected and mis-shaped key (and, with
    `floats_only`, every non-float tensor), and what the model was built for."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in expected)
    wrong = [f"{k} is {tuple(state[k].shape)}, expected {expected[k]}"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    not_float = [f"{k} is {state[k].dtype}" for k in expected
                 if floats_only and k in state and not state[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {_few(wrong)}")
    if not_float:
        problems.append(f"not floating point: {_few(not_float)}")
    if problems:
        raise CheckpointError(source, "; ".join(problems) + f" (for {built_for})")


def _few(items: list[str], limit: int = 4) -> str:
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
