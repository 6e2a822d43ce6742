"""Shared helpers for the model and engine benchmarks (not a benchmark itself)."""

from __future__ import annotations

import random
import statistics
import time

from model.checkpoint import build_model, qwen2_05b_config, tiny_config
from model.omniflatten import BatchStepper, OmniFlatten

CONFIGS = {"tiny": tiny_config, "qwen2-0.5b": qwen2_05b_config}


def make_model(name: str, device: str, dtype: str, context: int) -> OmniFlatten:
    return build_model(CONFIGS[name](dtype=dtype, context_length=context), seed=0, device=device)


def user_chunks(model: OmniFlatten, seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    v = model.vocab
    return [[v.speech_id(rng.randrange(v.speech_codes)) for _ in range(model.layout.user)] for _ in range(n)]


def sync(model: OmniFlatten) -> None:
    if model.device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def time_steps(stepper: BatchStepper, rows: list[int], chunks: list[list[int]], steps: int) -> list[float]:
    """Seconds of each batched step of `rows` (one warm-up step not counted)."""
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        stepper.step({r: chunks[(i + r) % len(chunks)] for r in rows})
        sync(stepper.model)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def table(header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


median = statistics.median
