"""The engine under real call arrivals: N sessions start at uniformly random moments within
one second, their 20 ms frames arrive with jitter, on the real clock, and each sends its
audio chunk by chunk (the tokenizer runs on the engine's tick: its time counts). Measured
in the steady state (every session started, none ended yet):

- occupancy: mean over LLM steps of sessions stepped / sessions live (1: one batch a tick);
- rows computed / rows needed (1: no row computed for nothing);
- p99 of a tick's work (tokenizer + LLM) against the budget, the serving engine's
  admission limit (0.8 x chunk period; here admission is by slots alone, so every N runs);
- sessions held in real time: at least 99% of a session's chunks answered within one
  chunk period of being sent, none dropped;
- throughput against single steps: N x the median tick of one session / the median tick
  of N, for the whole tick (tokenizer + LLM) and for the LLM step alone.

Baseline, in the same run on the same arrivals: the engine without its clock (every chunk
stepped as soon as it arrives, rows not packed: the scheduling before the clock).

    python bench/engine.py [--config tiny|qwen2-0.5b] [--sessions 1,8,16,32] [--seconds 12]
                           [--jitter 0.04] [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import os
import random
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from bench._common import make_model, median, pct, table  # noqa: E402
from model.engine import Engine, EngineStats  # noqa: E402
from model.s3_tokenizer import S3Config, S3Tokenizer  # noqa: E402

FRAME = 0.02
SAMPLES = 320


def make_tokenizer(config: str, device: str) -> S3Tokenizer:
    if config == "tiny":  # what `duplexline serve` builds without --model
        return S3Tokenizer.random(S3Config(width=64, heads=4, layers=2, codebook_size=4096), seed=0, device=device)
    return S3Tokenizer.random(S3Config(), seed=0, device=device)  # the full-size v1 architecture


class Caller:
    """One call's side: frames into chunks, the first aligned to the engine's clock."""

    def __init__(self, engine: Engine, rng: random.Random) -> None:
        self.engine = engine
        self.session = engine.open_session()
        self.frames_per_chunk = round(engine.period / FRAME)
        # The first chunk also carries the tokenizer's look-ahead (as the agent's does).
        self.buf = np.zeros((self.frames_per_chunk + self.session.lead_frames(FRAME)) * SAMPLES, np.float32)
        self.target = len(self.buf) // SAMPLES
        self.fill = -1  # not aligned yet
        self.noise = (0.05 * np.random.default_rng(rng.randrange(1 << 30)).standard_normal(
            self.buf.size)).astype(np.float32)
        self.delays: list[float] = []
        self.dropped = 0
        self.futures: list[asyncio.Future] = []

    def frame(self, now: float) -> None:
        if self.fill < 0:
            self.fill = self.session.align(now, FRAME)
        i = self.fill
        self.buf[i * SAMPLES:(i + 1) * SAMPLES] = self.noise[i * SAMPLES:(i + 1) * SAMPLES]
        self.fill += 1
        if self.fill == self.target:
            chunk = self.buf[:self.target * SAMPLES].copy()
            self.fill, self.target = 0, self.frames_per_chunk
            sent = time.monotonic()
            fut = self.session.submit_audio(chunk)
            fut.add_done_callback(lambda f, sent=sent: self._done(f, sent))
            self.futures.append(fut)

    def _done(self, fut: asyncio.Future, sent: float) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.dropped += 1
            return
        self.delays.append(time.monotonic() - sent)
        if any(r.dropped for r in fut.result()):
            self.dropped += 1

    def held(self, period: float) -> bool:
        on_time = sum(1 for d in self.delays if d <= period)
        return not self.dropped and on_time >= 0.99 * len(self.futures)


async def run_calls(engine: Engine, n: int, seconds: float, jitter: float, seed: int) -> dict:
    rng = random.Random(seed)
    starts = sorted(rng.uniform(0, 1.0) for _ in range(n))
    loop_start = time.monotonic() + 0.1
    callers: list[Caller | None] = [None] * n
    events: list[tuple[float, int, int]] = []
    frames = int(seconds / FRAME)
    for c, start in enumerate(starts):
        t = 0.0
        for i in range(frames):
            t = max(t, loop_start + start + i * FRAME + rng.uniform(0, jitter))  # in order, late by jitter
            events.append((t, c, i))
    heapq.heapify(events)
    steady_from = loop_start + starts[-1] + 1.0
    steady_to = loop_start + starts[0] + seconds - 0.3
    snap: dict[str, tuple[EngineStats, int]] = {}
    while events:
        now = time.monotonic()
        if "from" not in snap and now >= steady_from:
            snap["from"] = (engine.stats(), len(engine.recent_ticks))
        if "to" not in snap and now >= steady_to:
            snap["to"] = (engine.stats(), len(engine.recent_ticks))
        t, c, i = events[0]
        if t > now:
            await asyncio.sleep(t - now)
            continue
        heapq.heappop(events)
        if callers[c] is None:
            callers[c] = Caller(engine, rng)
        callers[c].frame(now)
    live = [c for c in callers if c is not None]
    await asyncio.wait_for(asyncio.gather(*(f for c in live for f in c.futures), return_exceptions=True), 60)
    for c in live:
        c.session.close()
    (a, ia), (b, ib) = snap["from"], snap.get("to", (engine.stats(), len(engine.recent_ticks)))
    ticks = list(engine.recent_ticks)[ia:ib]
    steps = b.steps - a.steps
    return {
        "occupancy": (b.occupancy_sum - a.occupancy_sum) / steps if steps else 0.0,
        "rows": (b.rows_computed - a.rows_computed) / max(1, b.sessions_stepped - a.sessions_stepped),
        "ticks": [t[1] for t in ticks],
        "full": [t for t in ticks if t[0] == n],  # ticks of all N sessions: (n, total, tokenizer, llm)
        "held": sum(c.held(engine.period) for c in live),
        "steps": steps,
        "catch_up": b.catch_up_steps - a.catch_up_steps,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "qwen2-0.5b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--sessions", default=None, help="default: 1,8,16,32 (cpu) or 1,8,16,32,64,128,256 (cuda)")
    ap.add_argument("--seconds", type=float, default=12.0, help="each session's call length")
    ap.add_argument("--jitter", type=float, default=0.04, help="frames arrive up to this late (uniform)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    default = "1,8,16,32,64,128,256" if args.device == "cuda" else "1,8,16,32"
    sizes = [int(b) for b in (args.sessions or default).split(",")]
    if sizes[0] != 1:
        sizes = [1] + sizes  # the single-session baseline
    torch.set_grad_enabled(False)
    model = make_model(args.config, args.device, dtype, args.context)
    tok = make_tokenizer(args.config, args.device)
    slots = max(sizes)
    # Admission by slots alone: every N is measured, whether or not it fits the period.
    engines = {mode: Engine(model, slots, tokenizer=tok, registry=CollectorRegistry(), headroom=None,
                            clock=(mode == "clock"), warmup=(mode == "clock")).start()
               for mode in ("clock", "baseline")}
    period = model.config.chunk_seconds
    budget = 0.8 * period  # the serving engine's admission limit (headroom 0.8)
    results: dict[tuple[str, int], dict] = {}
    for n in sizes:
        for mode, engine in engines.items():
            results[mode, n] = asyncio.run(run_calls(engine, n, args.seconds, args.jitter, args.seed + n))
    for engine in engines.values():
        engine.close()
    def medians(r: dict) -> tuple[float, float]:  # a full tick's median: whole, LLM step alone
        full = r["full"]
        return median([t[1] for t in full]), median([t[3] for t in full])

    single, single_llm = medians(results["clock", 1])
    rows = []
    for n in sizes:
        r, base = results["clock", n], results["baseline", n]
        whole, llm = medians(r) if r["full"] else (float("nan"), float("nan"))
        p99 = pct(r["ticks"], 99) if r["ticks"] else float("nan")
        rows.append([n, f"{r['occupancy']:.1%}", f"{base['occupancy']:.1%}",
                     f"{r['occupancy'] / base['occupancy']:.1f}x" if base["occupancy"] else "-",
                     f"{r['rows']:.2f}", f"{base['rows']:.2f}", f"{r['steps']} ({r['catch_up']})",
                     f"{p99 * 1000:.0f} / {budget * 1000:.0f}", f"{r['held']}/{n} ({base['held']}/{n})",
                     f"{n * single / whole:.1f}x / {n * single_llm / llm:.1f}x"])
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"engine under real arrivals, {args.config} + its S3 tokenizer, {device} {dtype}, chunk period "
          f"{period * 1000:.0f} ms, jitter up to {args.jitter * 1000:.0f} ms, {args.seconds:.0f} s calls started "
          f"within 1 s; steady state only; baseline = the same arrivals without the engine's clock, this run")
    print(table(["N", "occupancy", "baseline", "ratio", "rows computed/needed", "baseline", "steps (catch-up)",
                 "p99 tick ms / budget", "held in real time (baseline)",
                 "throughput vs single: tick / LLM step"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
