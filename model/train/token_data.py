"""What the trainer reads: any dataset of token sequences with a loss mask.

A dataset is anything with `__len__` and `__getitem__(i)` returning
`{"input_ids": LongTensor[T], "loss_mask": BoolTensor[T]}` (loss_mask[t]: token t is a
target, objective.py). If it has a `collate(batch)` the trainer uses it; otherwise
`pad_collate`. Either must pad on the right with loss_mask False; a batch may carry
`attention_mask` (True on real tokens) for counting tokens and for left padding.

`TokenJsonlDataset` reads the simplest such file: one JSON object per line with
`input_ids` (ints) and `loss_mask` (0/1 or booleans, same length). Handy for tests, for
data made elsewhere, and for checking a run end to end without speech.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch

__all__ = ["TokenDataset", "pad_collate", "TokenJsonlDataset", "DataError"]


class DataError(ValueError):
    """A training sample or data file is malformed. Nothing was trained; fix the named file."""


class TokenDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, torch.Tensor]: ...


def pad_collate(batch: Sequence[Mapping[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    loss = torch.zeros((len(batch), width), dtype=torch.bool)
    real = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, sample in enumerate(batch):
        n = len(sample["input_ids"])
        if len(sample["loss_mask"]) != n:
            raise DataError(f"sample {row} of the batch: {n} input_ids but {len(sample['loss_mask'])} loss_mask values")
        ids[row, :n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        loss[row, :n] = torch.as_tensor(sample["loss_mask"], dtype=torch.bool)
        real[row, :n] = True
    return {"input_ids": ids, "loss_mask": loss, "attention_mask": real}


class TokenJsonlDataset:
    def __init__(self, path: str | Path, vocab_size: int | None = None) -> None:
        self.path = Path(path)
        self.samples: list[dict[str, torch.Tensor]] = []
        try:
            lines = self.path.read_text().splitlines()
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read ({exc.strerror})") from None
        for number, line in enumerate(lines, 1):
            if line.strip():
                self.samples.append(self._parse(line, number, vocab_size))
        if not self.samples:
            raise DataError(f"{self.path}: no samples")

    def _parse(self, line: str, number: int, vocab_size: int | None) -> dict[str, torch.Tensor]:
        where = f"{self.path}:{number}"
        try:
            obj: Any = json.loads(line)
            ids = torch.tensor(obj["input_ids"], dtype=torch.long)
            mask = torch.tensor(obj["loss_mask"], dtype=torch.bool)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"{where}: expected {{\"input_ids\": [...], \"loss_mask\": [...]}} ({exc})") from None
        if ids.ndim != 1 or ids.shape != mask.shape or len(ids) < 2:
            raise DataError(f"{where}: input_ids and loss_mask must be lists of the same length >= 2")
        if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DataError(f"{where}: token ids must lie in [0, {vocab_size})")
        return {"input_ids": ids, "loss_mask": mask}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]
