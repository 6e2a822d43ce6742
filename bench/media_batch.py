"""One SIP media tick's resampling for N calls: per call (`Resampler.process` each) against
batched (`ResampleBatch`: one numpy product per direction), measured in the same run.

Run from the repository root: `python bench/media_batch.py`. A tick here is what a PCMU
echo call costs every 20 ms: its 20 ms read resampled 8 -> 16 kHz and the agent's 20 ms
frame resampled 16 -> 8 kHz, for each of N calls (10, 50, 200). Both ways are timed
round-robin (so machine noise hits them alike) on their own streams, and checked equal.
Prints µs per tick (median and minimum of the repeats) and per call, and the ratio of
medians. BLAS pinned to one thread, as in bench/media.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.media import Resampler
from bridge.media.batch_resample import ResampleBatch

CALLS = (10, 50, 200)
TICKS = 200
REPEATS = 15


def _rig(calls: int, seed: int):
    rng = np.random.default_rng(seed)
    reads = [rng.integers(-8000, 8000, 160, dtype=np.int16) for _ in range(calls)]
    plays = [rng.integers(-8000, 8000, 320, dtype=np.int16) for _ in range(calls)]

    ups = [Resampler(8000, 16000) for _ in range(calls)]
    downs = [Resampler(16000, 8000) for _ in range(calls)]

    def per_call() -> list[np.ndarray]:
        out = []
        for up, down, r, p in zip(ups, downs, reads, plays):
            out.append(up.process(r))
            out.append(down.process(p))
        return out

    bups = [Resampler(8000, 16000) for _ in range(calls)]
    bdowns = [Resampler(16000, 8000) for _ in range(calls)]
    inbound, outbound = ResampleBatch(), ResampleBatch()

    def batched() -> list[np.ndarray]:
        inbound.clear()
        outbound.clear()
        tin = [inbound.add(s, r) for s, r in zip(bups, reads)]
        inbound.run()
        got_in = [inbound.result(t) for t in tin]
        tout = [outbound.add(s, p) for s, p in zip(bdowns, plays)]
        outbound.run()
        out = []
        for a, t in zip(got_in, tout):
            out.append(a)
            out.append(outbound.result(t))
        return out

    return per_call, batched


def _time(fn) -> float:
    start = time.perf_counter_ns()
    for _ in range(TICKS):
        fn()
    return (time.perf_counter_ns() - start) / TICKS / 1000.0


def main() -> int:
    print(f"{'calls':>5}  {'per-call µs/tick':>16}  {'batched µs/tick':>15}  {'min per/batch':>13}  "
          f"{'µs/call per':>11}  {'µs/call batch':>13}  {'batched/per':>11}")
    for calls in CALLS:
        per_call, batched = _rig(calls, calls)
        for a, b in zip(per_call(), batched(), strict=True):  # same streams' history: equal
            assert np.array_equal(a, b), "batched output differs from per-call"
        for _ in range(20):
            per_call()
            batched()
        per, bat = [], []
        for _ in range(REPEATS):
            per.append(_time(per_call))
            bat.append(_time(batched))
        mp, mb = statistics.median(per), statistics.median(bat)
        print(f"{calls:5d}  {mp:16.1f}  {mb:15.1f}  {min(per):6.0f}/{min(bat):<6.0f}  "
              f"{mp / calls:11.2f}  {mb / calls:13.2f}  {mb / mp:11.2f}")
    print(f"\n(python {sys.version.split()[0]}, numpy {np.__version__}, "
          f"BLAS threads {os.environ['OPENBLAS_NUM_THREADS']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
