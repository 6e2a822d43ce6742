"""Media DSP cost per 20 ms frame, against bare audioop G.711 measured in the same run.

Run from the repository root: `python bench/media.py`. Prints one table:

- baseline: `audioop.ulaw2lin` + `audioop.lin2ulaw` on one 20 ms frame (what a pure
  PCMU echo costs), the unit every other row is divided by;
- the phone call's inbound path (µ-law decode, 8 -> 16 kHz for the model), outbound path
  (model audio 24 -> 8 kHz, µ-law encode), and both together: one "call-frame", the work
  a call costs every 20 ms, target <= 20 µs on the project's 2-vCPU machines;
- the WebRTC and CosyVoice-300M resampling legs, one frame each.

"calls/core" assumes 50 frames a second in each direction, so a call-frame row gives the
calls one core could carry on DSP alone (1e6 / (50 * µs)); other rows give the same for
that leg alone. Each path runs its iterations in a tight loop after a warm-up; repeats are
interleaved round-robin across paths so that machine noise hits every row alike. The
table shows the median (what to expect on a busy shared machine; ratios and calls/core use
it) and the minimum (the cost without interference). BLAS is pinned to one thread: the
bridge runs one core's worth of calls per process, and 20 ms frames are far too small for
threads to help.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.media import Resampler, ulaw_decode, ulaw_encode

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ITERATIONS = 1000
REPEATS = 21
WARMUP = 500


def _speechlike(rate: int, seconds: float, seed: int) -> np.ndarray:
    """Band-limited noise at about -12 dBFS with a slow syllable-like envelope."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    noise = np.cumsum(rng.standard_normal(n))  # red-ish spectrum, like voiced speech
    noise -= np.convolve(noise, np.ones(64) / 64, mode="same")
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * np.arange(n) / rate) ** 2
    x = noise * envelope
    return np.clip(x / np.abs(x).max() * 8000, -32768, 32767).astype(np.int16)


def _frames(rate: int, seed: int) -> list[np.ndarray]:
    x = _speechlike(rate, 1.0, seed)
    step = rate // 50
    return [x[i : i + step].copy() for i in range(0, len(x) - step + 1, step)]


def _cycle(items: list) -> Callable[[], object]:
    """A callable returning the next item each call, cheaply (index over a list)."""
    state = [0]
    count = len(items)

    def nxt() -> object:
        i = state[0]
        state[0] = i + 1 if i + 1 < count else 0
        return items[i]

    return nxt


def _paths() -> list[tuple[str, Callable[[], object]]]:
    ulaw_frames = [audioop.lin2ulaw(f.tobytes(), 2) for f in _frames(8000, 1)]
    next_ulaw = _cycle(ulaw_frames)
    next_24k = _cycle(_frames(24000, 2))

    def baseline() -> object:
        return audioop.lin2ulaw(audioop.ulaw2lin(next_ulaw(), 2), 2)

    up = Resampler(8000, 16000)

    def inbound() -> object:
        return up.process(ulaw_decode(next_ulaw()))

    down = Resampler(24000, 8000)

    def outbound() -> object:
        return ulaw_encode(down.process(next_24k()))

    up2, down2 = Resampler(8000, 16000), Resampler(24000, 8000)

    def call_frame() -> object:
        up2.process(ulaw_decode(next_ulaw()))
        return ulaw_encode(down2.process(next_24k()))

    rows: list[tuple[str, Callable[[], object]]] = [
        ("baseline: audioop µ-law decode + encode", baseline),
        ("inbound: µ-law decode + 8->16 kHz", inbound),
        ("outbound: 24->8 kHz + µ-law encode", outbound),
        ("call-frame: inbound + outbound", call_frame),
    ]
    for rate_in, rate_out, label in [
        (16000, 48000, "WebRTC out (16 kHz model)"),
        (24000, 48000, "WebRTC out (24 kHz model)"),
        (48000, 16000, "WebRTC in"),
        (22050, 8000, "CosyVoice-300M out, phone"),
    ]:
        stream = Resampler(rate_in, rate_out)
        frames = _cycle(_frames(rate_in, rate_in))
        rows.append(
            (
                f"{rate_in / 1000:g}->{rate_out / 1000:g} kHz: {label}",
                lambda s=stream, f=frames: s.process(f()),
            )
        )
    return rows


def _measure(fn: Callable[[], object]) -> float:
    """Mean µs per call over ITERATIONS calls."""
    start = time.perf_counter_ns()
    for _ in range(ITERATIONS):
        fn()
    return (time.perf_counter_ns() - start) / ITERATIONS / 1000.0


def main() -> int:
    rows = _paths()
    for _, fn in rows:
        for _ in range(WARMUP):
            fn()
    samples: list[list[float]] = [[] for _ in rows]
    for _ in range(REPEATS):
        for i, (_, fn) in enumerate(rows):
            samples[i].append(_measure(fn))
    medians = [statistics.median(s) for s in samples]
    base = medians[0]

    name_width = max(len(name) for name, _ in rows)
    header = (
        f"{'path (per 20 ms frame)':<{name_width}}  {'µs med':>7}  {'µs min':>7}  "
        f"{'x base':>7}  {'calls/core':>10}"
    )
    print(header)
    print("-" * len(header))
    for (name, _), med, s in zip(rows, medians, samples, strict=True):
        calls = 1e6 / (50 * med)
        print(f"{name:<{name_width}}  {med:7.2f}  {min(s):7.2f}  {med / base:7.1f}  {calls:10.0f}")
    median, best = medians[3], min(samples[3])
    print(
        f"\ncall-frame: median {median:.1f} µs, min {best:.1f} µs; target <= 20 µs "
        f"(python {sys.version.split()[0]}, numpy {np.__version__}, "
        f"BLAS threads {os.environ['OPENBLAS_NUM_THREADS']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
