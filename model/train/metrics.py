"""What a run reports (rank 0 only): one JSON line per logged step in OUT/train_log.jsonl,
the same scalars to TensorBoard when `torch.utils.tensorboard` imports (it needs the
optional `tensorboard` package), and a progress bar with ETA (tqdm when installed, else a
line on stderr every logged step)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "Progress", "LOG_NAME"]

LOG_NAME = "train_log.jsonl"


class MetricsLog:
    def __init__(self, out: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(out) / LOG_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        else:
            self.path.write_text("")
        self._file = self.path.open("a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out) / "tensorboard"))
        except ImportError:
            pass

    def _truncate_after(self, step: int) -> None:
        """Drop what an interrupted run logged after its last checkpoint: the resumed run
        logs those steps again."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True) -> None:
        self.total, self.step, self.enabled = total, initial, enabled
        self._initial, self._t0 = initial, time.monotonic()
        self._printed = 0.0  # the stderr fallback prints at most every 10 s
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, loss: float, lr: float) -> None:
        advanced, self.step = step - self.step, step
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(advanced)
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            return
        now = time.monotonic()
        if now - self._printed < 10.0 and step < self.total:
            return
        self._printed = now
        done = step - self._initial
        rate = done / max(now - self._t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} eta {_clock(eta)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
