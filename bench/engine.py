"""Batching pays: one batched chunk step for B sessions against B single-session steps,
measured in the same run, and how many sessions fit in real time.

For each B: p50/p99 of the batched step, the time of B one-session steps (the baseline),
the throughput ratio, and whether p99 stays within half the chunk period (the budget that
leaves the other half for tokenizer, decoder and network). "fit" is the largest measured
B within that budget.

    python bench/engine.py [--config tiny|qwen2-0.5b] [--batches 1,4,16,32] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench._common import make_model, median, pct, sync, table, time_steps, user_chunks  # noqa: E402
from model.omniflatten import BatchStepper  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "qwen2-0.5b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--batches", default=None, help="default: 1,4,16,32 (cpu) or 1,4,16,32,64,128,256 (cuda)")
    ap.add_argument("--steps", type=int, default=10, help="batched steps timed per B")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=8, help="chunks stepped before timing (cache depth)")
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    batches = [int(b) for b in (args.batches or ("1,4,16,32,64,128,256" if args.device == "cuda" else "1,4,16,32")).split(",")]
    torch.set_grad_enabled(False)
    model = make_model(args.config, args.device, dtype, args.context)
    period = model.config.chunk_seconds
    chunks = user_chunks(model, 0, 16)
    stepper = BatchStepper(model, max(batches))
    rows = list(range(max(batches)))
    for r in rows:
        stepper.open(r)
    for i in range(args.prefill):  # give every slot some context, as in a live call
        stepper.step({r: chunks[(i + r) % len(chunks)] for r in rows})
    sync(model)

    out, fit = [], 0
    for b in batches:
        batched = time_steps(stepper, rows[:b], chunks, args.steps)
        single = time_steps(stepper, [0], chunks, max(3, args.steps // 2))
        p50, p99 = median(batched), pct(batched, 99)
        baseline = median(single) * b
        ok = p99 <= period / 2
        fit = b if ok else fit
        out.append([b, f"{p50 * 1000:.1f}", f"{p99 * 1000:.1f}", f"{baseline * 1000:.1f}",
                     f"{baseline / p50:.1f}x", f"{b * model.layout.decoded / p50:.0f}", "yes" if ok else "no"])
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"engine step, {args.config}, {name} {dtype}, chunk period {period * 1000:.0f} ms, "
          f"budget p99 <= {period * 500:.0f} ms; baseline = B single-session steps in this run")
    print(table(["B", "batched p50 ms", "p99 ms", "B singles ms", "throughput ratio", "tokens/s decoded",
                 "within budget"], out))
    print(f"sessions that fit in real time (largest B measured within budget): {fit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
