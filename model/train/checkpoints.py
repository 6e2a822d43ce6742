"""Training checkpoints: everything a resumed run needs to continue exactly.

    OUT/checkpoints/step-00000100.pt   {"step", "epoch", "micro", "elapsed", "model",
                                        "optimizer", "scheduler", "rng", "plan", "meta"}

Written to a temporary name and renamed, so a crash mid-write leaves the previous
checkpoint as the latest, never a truncated one. Only the newest `keep` are kept.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["checkpoint_dir", "checkpoint_path", "latest_checkpoint", "save_checkpoint", "load_checkpoint",
           "prune_checkpoints", "capture_rng", "restore_rng"]

_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def checkpoint_path(out: str | Path, step: int) -> Path:
    return checkpoint_dir(out) / f"step-{step:08d}.pt"


def _steps(out: str | Path) -> list[tuple[int, Path]]:
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(out: str | Path) -> Path | None:
    steps = _steps(out)
    return steps[-1][1] if steps else None


def save_checkpoint(out: str | Path, step: int, state: dict[str, Any]) -> Path:
    path = checkpoint_path(out, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    # Our own files: they hold numpy RNG state and plain Python values beside tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


def prune_checkpoints(out: str | Path, keep: int) -> None:
    if keep < 1:
        return
    for _, path in _steps(out)[:-keep]:
        path.unlink(missing_ok=True)


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
