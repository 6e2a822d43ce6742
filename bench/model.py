"""Tokens per second of the OmniFlatten chunk step for one session (B = 1), for the tiny
test config and a Qwen2-0.5B-shaped config with random weights, against the chunk period
the step must keep up with (real-time factor = step time / chunk period).

    python bench/model.py [--device cpu|cuda] [--dtype float32|bfloat16] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import sys

# The script's folder would shadow the `model` package: import from the repository root.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench._common import make_model, median, pct, table, time_steps, user_chunks  # noqa: E402
from model.omniflatten import BatchStepper  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--configs", default="tiny,qwen2-0.5b")
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    torch.set_grad_enabled(False)
    rows = []
    for name in args.configs.split(","):
        model = make_model(name, args.device, dtype, context=1024)
        stepper = BatchStepper(model, 1)
        stepper.open(0)
        chunks = user_chunks(model, 0, 8)
        times = time_steps(stepper, [0], chunks, args.steps if name != "tiny" else 50)
        lay = model.layout
        tokens = lay.user + 1 + lay.decoded
        p50 = median(times)
        params = sum(p.numel() for p in model.backbone.parameters()) / 1e6
        rows.append([name, f"{params:.1f}M", tokens, f"{p50 * 1000:.1f}", f"{pct(times, 99) * 1000:.1f}",
                     f"{tokens / p50:.0f}", f"{lay.decoded / p50:.0f}", f"{p50 / model.config.chunk_seconds:.2f}"])
        del model, stepper
    print(f"chunk step, one session, {args.device} {dtype}; baseline = the chunk period "
          f"(real-time factor < 1 keeps up)")
    print(table(["config", "params", "tokens/step", "p50 ms", "p99 ms", "tokens/s", "decoded/s", "RTF"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
