"""The CosyVoice decoder's cost per chunk of audio (model/cosyvoice_decoder.py): one push =
one model chunk of 10 speech codes (v1: 200 ms of audio at 50 Hz, v2: 400 ms at 25 Hz),
flow matching then HiFT, for B = 1, 8, 32 calls' streams. The decoder is not batched across
sessions yet: a tick's B pushes run one after another, as the serving pool runs them today.

Per family, Euler steps and B, in the steady state (each stream past its first two pushes,
so its flow prompt carries the full context):

- ms per chunk and session: flow, HiFT, and the whole push (median over pushes);
- real-time factor: compute seconds / audio seconds of one session's chunk (< 1 keeps up);
- a tick of B sessions: all B pushes one after another, against the chunk period;
- time from a chunk's codes to its own first sample: the wait behind the streams before it
  in the tick, its push, then the held-back overlap played first (overlap_frames x hop:
  93 ms v1, 160 ms v2), the latency the cross-fade costs; p50 and the last stream's;
- sessions one core keeps in real time: the chunk period over one push;
- baseline: the same pushes with steps=10 (upstream's default), this run: its total over
  this row's total.

    python bench/decoder.py [--shape tiny|full] [--device cpu|cuda] [--families v1,v2]
                            [--steps 10,4,2] [--sessions 1,8,32] [--threads 1]

`--shape full`: the official sizes (flow 105/113 M parameters, HiFT 21 M) with random
weights: slow on a CPU (seconds a push); defaults then to B = 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import median, table  # noqa: E402
from model.cosyvoice_decoder import CosyVoiceDecoder, DecoderSettings, Voice  # noqa: E402
from model.cosyvoice_flow import CosyVoiceFlow, FlowConfig  # noqa: E402
from model.cosyvoice_hift import HiFTConfig, HiFTGenerator  # noqa: E402

CHUNK = 10  # codes per push: one model chunk
WARM = 2  # unmeasured pushes per stream: the context fills up


class Timers:
    """Seconds spent in the flow and in HiFT, by wrapping the two modules' entry points."""

    def __init__(self, decoder: CosyVoiceDecoder, device: str) -> None:
        self.flow = self.hift = 0.0
        self.device = device
        flow_inference, hift_forward = decoder.flow.inference, decoder.hift.forward

        def timed_flow(*args, **kwargs):
            t0 = time.perf_counter()
            out = flow_inference(*args, **kwargs)
            self.sync()
            self.flow += time.perf_counter() - t0
            return out

        def timed_hift(*args, **kwargs):
            t0 = time.perf_counter()
            out = hift_forward(*args, **kwargs)
            self.sync()
            self.hift += time.perf_counter() - t0
            return out
        decoder.flow.inference = timed_flow
        decoder.hift.forward = timed_hift

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def build(family: str, shape: str, device: str) -> CosyVoiceDecoder:
    if shape == "tiny":
        d = CosyVoiceDecoder.random(family, seed=0)
        flow, hift, voice = d.flow, d.hift, d.voice
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            flow = CosyVoiceFlow(FlowConfig.official_v1() if family == "v1" else FlowConfig.official_v2())
            hift = HiFTGenerator(HiFTConfig.official_v1() if family == "v1" else HiFTConfig.official_v2())
            voice = Voice(torch.randn(192).numpy().astype(np.float32))
    return CosyVoiceDecoder(flow.to(device), hift.to(device), voice)


def new_stream(decoder: CosyVoiceDecoder, device: str):
    return decoder.new_stream()  # its generator is on the decoder's device


def measure(decoder: CosyVoiceDecoder, timers: Timers, sessions: int, rounds: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    streams = [new_stream(decoder, timers.device) for _ in range(sessions)]
    pool = [rng.integers(0, decoder.codebook_size, CHUNK) for _ in range(16)]
    for r in range(WARM):
        for i, s in enumerate(streams):
            s.push(pool[(r + i) % len(pool)])
    push, flow, hift, ready, ticks = [], [], [], [], []
    for r in range(rounds):
        tick = time.perf_counter()
        for i, s in enumerate(streams):
            timers.flow = timers.hift = 0.0
            t0 = time.perf_counter()
            s.push(pool[(WARM + r + i) % len(pool)])
            timers.sync()
            t1 = time.perf_counter()
            push.append(t1 - t0)
            flow.append(timers.flow)
            hift.append(timers.hift)
            ready.append(t1 - tick)  # the codes of every stream in the tick came at its start
        ticks.append(time.perf_counter() - tick)
    return {"push": median(push), "flow": median(flow), "hift": median(hift), "tick": median(ticks),
            "ready_p50": median(ready), "ready_max": max(ready)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--families", default="v1,v2")
    ap.add_argument("--steps", default="10,4,2", help="Euler steps; 10 (the baseline) is always measured")
    ap.add_argument("--sessions", default=None, help="default: 1,8,32 (tiny) or 1 (full)")
    ap.add_argument("--rounds", type=int, default=16, help="measured pushes per stream at B = 1 (fewer as B grows, "
                    "at least 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared box)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    steps = sorted({10, *(int(s) for s in args.steps.split(","))}, reverse=True)
    sizes = [int(b) for b in (args.sessions or ("1,8,32" if args.shape == "tiny" else "1")).split(",")]
    if args.shape == "full" and args.device == "cpu":
        print("warning: --shape full on a CPU is slow (seconds a push, minutes for the table)", file=sys.stderr)

    rows = []
    for family in args.families.split(","):
        base = build(family, args.shape, args.device)
        timers = Timers(base, args.device)
        results = {}
        for n_steps in steps:
            decoder = CosyVoiceDecoder(base.flow, base.hift, base.voice, DecoderSettings(steps=n_steps))
            for b in sizes:
                rounds = max(2, math.ceil(args.rounds / b))
                results[n_steps, b] = measure(decoder, timers, b, rounds, args.seed)
        chunk_s = CHUNK / base.token_rate
        overlap_s = DecoderSettings().overlap_frames * base.hift.config.samples_per_frame / base.sample_rate
        for n_steps in steps:
            for b in sizes:
                r, ref = results[n_steps, b], results[10, b]
                rows.append([family, n_steps, b, f"{r['flow'] * 1000:.1f}", f"{r['hift'] * 1000:.1f}",
                             f"{r['push'] * 1000:.1f}", f"{r['push'] / chunk_s:.3f}",
                             f"{r['tick'] * 1000:.0f} / {chunk_s * 1000:.0f}",
                             f"{(r['ready_p50'] + overlap_s) * 1000:.0f} / {(r['ready_max'] + overlap_s) * 1000:.0f}",
                             f"{int(chunk_s // r['push'])}", f"{ref['push'] / r['push']:.2f}x"])
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {args.threads} thread(s)"
    print(f"CosyVoice decoder per chunk (10 codes: 200 ms v1, 400 ms v2), {args.shape} shapes, random weights, "
          f"{device}, float32; B streams decoded one after another (not batched across sessions yet); "
          f"latency includes the held-back overlap (93 ms v1, 160 ms v2); baseline = steps=10, this run")
    print(table(["family", "steps", "B", "flow ms", "HiFT ms", "total ms", "RTF", "tick ms (B) / period",
                 "codes -> own first sample ms p50 / last", "sessions / core", "vs 10 steps"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
