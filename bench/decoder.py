"""The CosyVoice decoder's cost per engine tick (model/cosyvoice_decoder.py), issue #13: what
B calls' speech costs to decode, batched as the engine runs it (`TickDecoder`: every
session's codes of one LLM step in one `decoder.push_many`), against the same B pushed
one after another (the old way, and the baseline); the real-time factor; the time from a
chunk's codes to its first audio sample; how many sessions one core (or one GPU) decodes
in real time; and, for v2, what the chunk caches buy against upstream's recompute.

One push = one model chunk of 10 speech codes: 200 ms of audio for v1 (50 Hz), 400 ms for
v2 (25 Hz). Random codes, no silence, one reply per stream (no utterance ends).

Table 1, per family (v1, v2) x Euler steps (10, 4, 2) x B (1, 8, 32), in the steady state
(each stream past its first pushes: v1's 20 context codes, v2's `left_chunks` = 2 chunks
of cached past, full). Each B gets its own B streams, kept in lockstep (same reply
length: v2's flows and both families' HiFT calls then fall in one batch each), measured
in rounds of one batched tick then one one-by-one tick on the same streams, so the load
of the shared box drifts over both alike:

- tick ms: `decoder.push_many(B streams)` (batched), and the B `stream.push` one after
  another (one-by-one); median over rounds; speed-up = one-by-one / batched;
- ms per session per 200 ms of audio: batched tick / B, scaled to 200 ms (v2's chunk is
  400 ms: halved);
- RTF: tick / the chunk's audio duration (< 1: the B sessions keep up), batched and
  one-by-one;
- vs 10 steps: the batched tick at 10 steps (this run, same B) over this row's;
- codes -> first sample: when the audio of a chunk's first code starts to play, counted
  from the tick's start (the chunk's codes came then): the tick (batched: every session's
  audio comes at its end; one-by-one: the last session's, after all B pushes), then the
  held-back latency every push's audio starts with: `overlap_frames` x hop of cross-fade
  tail (93 ms v1, 160 ms v2) plus v2's look-ahead `delay_frames` x hop (120 ms);
- flow / HiFT / rest ms of a tick: time inside `FlowStream.push_many` (v2) or
  `flow.inference` (v1), and inside `hift.f0` + `hift.source` + `hift.decode`, by
  wrapping them; the rest is the decoder's own Python and numpy (cross-fades, mutes,
  stacking). On a GPU they are timed in one extra round per B (a sync around each call),
  not in the timed rounds;
- sessions in real time: measured = the largest measured B whose batched tick is under
  the chunk period; extrapolated = the chunk period over the per-session cost at the
  largest measured B (the most amortised).

Table 2 (v2): the flow's cost for one chunk (10 codes) with the caches (`FlowStream`,
`left_chunks` = 2, the decoder's default) against upstream's streaming, which re-runs the
flow over every code of the reply so far at each chunk (`flow.inference(all codes,
streaming=stream.grid, finalize=False)`: the same grid, so the same mel: the table checks
it), at a reply length of 1, 5 and 25 chunks; the cached cost stays flat, the recompute
grows with the reply. The cached push is timed on copies of one stream (`FlowStream.copy`).

Table 3 (v2): the memory the flow caches hold per stream in the steady state (the
StreamCache objects `_encoder_tokens`, `_encoder_frames` and one `_estimator` per Euler
step: convolutions' last inputs, attention keys and values): tensor bytes (the views the
caches keep), and the bytes of the storages behind them (what stays allocated: a cache
entry is a slice of the tensor it was cut from). At the tiny shape (the stream of table
2) and at the official shape (the full v2 flow built on the CPU with random weights,
4 chunks at 1 Euler step: the estimator's caches are per step, so the per-step figure
times the steps), float32 (bfloat16: half).

Baselines, all measured in the same run: one-by-one pushes (table 1), 10 Euler steps
(table 1), the recompute (table 2).

Clock: on the CPU with one thread, the pushing thread's CPU time (`time.thread_time`: the
ops run on it; what a dedicated core would take: the shared development box's load
inflates wall time, not this), else wall time (`--clock` overrides). The header prints
the box's load and the wall / CPU ratio of the timed ticks.

    python bench/decoder.py [--shape tiny|full] [--device cpu|cuda] [--dtype float32|bfloat16]
                            [--families v1,v2] [--steps 10,4,2] [--sessions 1,8,32] [--rounds 8]
                            [--reps 3] [--threads 1] [--clock auto|cpu|wall] [--no-cache-tables]

Defaults: tiny random shapes (`CosyVoiceDecoder.random`), CPU, float32, 1 thread: about
100 s on the 2-core development box. `--shape full`: the official sizes (flow 105/113 M
parameters, HiFT 21 M) with random weights (the cost does not depend on the weights'
values); slow on a CPU (seconds a push), so B defaults to 1 there (`--shape full --rounds
2 --reps 1`: about 3 minutes, most of it table 2's recompute of 25 chunks). On a GPU:
`python bench/decoder.py --device cuda --dtype bfloat16 --shape full` (B = 1, 8, 32; the
header names the GPU). `--dtype bfloat16` casts the flow only; HiFT stays float32 (as
upstream's fp16 mode: its STFT has no bfloat16 kernel), and the bench casts HiFT's
inputs to float32 at its entry: `decode_many` hands HiFT the mel in the flow's dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from contextlib import contextmanager

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import median, table  # noqa: E402
from model.cosyvoice_decoder import CosyVoiceDecoder, DecoderSettings, Voice  # noqa: E402
from model.cosyvoice_flow import CosyVoiceFlow, FlowConfig  # noqa: E402
from model.cosyvoice_flow_stream import FlowStream  # noqa: E402
from model.cosyvoice_hift import HiFTConfig, HiFTGenerator  # noqa: E402
from model.stream_cache import StreamCache  # noqa: E402

CHUNK = 10  # codes per push: one model chunk
WARM = {"v1": 2, "v2": 3}  # unmeasured pushes per stream: v1's context, v2's cached past, full
REPLY_CHUNKS = (1, 5, 25)  # table 2's reply lengths


class Clock:
    def __init__(self, device: str, kind: str) -> None:
        self.device = device
        self.kind = kind
        self.now = time.thread_time if kind == "cpu" else time.perf_counter

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


class Probes:
    """Time spent in the flow and in HiFT, by wrapping their entry points while
    installed (`with probes.installed():`); counts only while `active`. Also casts HiFT's
    inputs to HiFT's dtype (the bfloat16 flow hands it bfloat16 mel)."""

    def __init__(self, decoder: CosyVoiceDecoder, clock: Clock) -> None:
        self.decoder = decoder
        self.clock = clock
        self.active = False
        self.flow = self.hift = 0.0

    def reset(self) -> None:
        self.flow = self.hift = 0.0

    def _timed(self, fn, slot: str):
        def wrapper(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            self.clock.sync()
            t0 = self.clock.now()
            out = fn(*args, **kwargs)
            self.clock.sync()
            setattr(self, slot, getattr(self, slot) + self.clock.now() - t0)
            return out
        return wrapper

    @contextmanager
    def installed(self):
        d = self.decoder
        hift = d.hift
        hift_dtype = next(hift.parameters()).dtype
        f0, source, decode = hift.f0, hift.source, hift.decode
        hift.f0 = self._timed(lambda mel: f0(mel.to(hift_dtype)), "hift")
        hift.source = self._timed(source, "hift")
        hift.decode = self._timed(lambda mel, src: decode(mel.to(hift_dtype), src.to(hift_dtype)), "hift")
        if d.family == "v2":
            push_many = FlowStream.__dict__["push_many"]
            FlowStream.push_many = staticmethod(self._timed(push_many.__func__, "flow"))
        else:
            d.flow.inference = self._timed(d.flow.inference, "flow")
        try:
            yield self
        finally:
            for name in ("f0", "source", "decode"):
                delattr(hift, name)
            if d.family == "v2":
                FlowStream.push_many = push_many
            else:
                del d.flow.inference


# ---------------------------------------------------------------------------- building


def build(family: str, shape: str, device: str, dtype: torch.dtype) -> tuple[CosyVoiceFlow, HiFTGenerator, Voice]:
    if shape == "tiny":
        d = CosyVoiceDecoder.random(family, seed=0)
        flow, hift, voice = d.flow, d.hift, d.voice
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            flow = CosyVoiceFlow(FlowConfig.official_v1() if family == "v1" else FlowConfig.official_v2())
            hift = HiFTGenerator(HiFTConfig.official_v1() if family == "v1" else HiFTConfig.official_v2())
            voice = Voice(torch.randn(192).numpy().astype(np.float32))
    # HiFT stays float32: its STFT has no bfloat16 kernel (upstream's fp16 mode halves the flow only).
    return flow.to(device, dtype), hift.to(device), voice


def decoder_for(parts: tuple, steps: int) -> CosyVoiceDecoder:
    # Note: CosyVoiceDecoder writes `steps` into the shared flow's config: build the next
    # one only when done with this one.
    return CosyVoiceDecoder(*parts, DecoderSettings(steps=steps))


# ---------------------------------------------------------------------------- table 1


def measure(decoder: CosyVoiceDecoder, probes: Probes, clock: Clock, sessions: int, rounds: int,
            rng: np.random.Generator) -> dict:
    def chunk() -> list[np.ndarray]:
        return [rng.integers(0, decoder.codebook_size, CHUNK) for _ in range(sessions)]

    streams = [decoder.new_stream() for _ in range(sessions)]
    for _ in range(WARM[decoder.family]):
        decoder.push_many(streams, chunk())
    on_cpu = clock.device != "cuda"
    res = {k: [] for k in ("batched", "one", "one_mean", "wall", "cpu", "bf", "bh", "br", "of", "oh")}

    def batched(split: bool) -> float:
        codes = chunk()
        probes.reset()
        probes.active = split
        clock.sync()
        w0, c0, t0 = time.perf_counter(), time.thread_time(), clock.now()
        decoder.push_many(streams, codes)
        clock.sync()
        t = clock.now() - t0
        probes.active = False
        if split:
            res["bf"].append(probes.flow)
            res["bh"].append(probes.hift)
            res["br"].append(t - probes.flow - probes.hift)
        if on_cpu:  # the header's load figure (a GPU's host thread spins in its syncs)
            res["wall"].append(time.perf_counter() - w0)
            res["cpu"].append(time.thread_time() - c0)
        return t

    def one_by_one(split: bool) -> tuple[float, float]:
        codes = chunk()
        probes.reset()
        probes.active = split
        clock.sync()
        t0 = clock.now()
        ready = []
        for s, c in zip(streams, codes):
            s.push(c)
            clock.sync()
            ready.append(clock.now() - t0)
        probes.active = False
        if split:
            res["of"].append(probes.flow)
            res["oh"].append(probes.hift)
        return ready[-1], sum(ready) / len(ready)

    for _ in range(rounds):
        res["batched"].append(batched(on_cpu))
        last, mean = one_by_one(on_cpu)
        res["one"].append(last)
        res["one_mean"].append(mean)
    if not on_cpu:  # the split, in a round of its own: its syncs would slow the timed ticks
        batched(True)
        one_by_one(True)
    return {k: median(v) if v else float("nan") for k, v in res.items()}


def sessions_in_real_time(results: dict, sizes: list[int], period: float) -> str:
    measured = max((b for b in sizes if results[b]["batched"] < period), default=0)
    top = max(sizes)
    extrapolated = period * top / results[top]["batched"]
    return f"{measured} / ~{int(extrapolated) if extrapolated >= 1 else round(extrapolated, 2)}"


# ---------------------------------------------------------------------------- tables 2 and 3


def cache_bytes(stream: FlowStream) -> dict:
    """Tensor bytes and storage bytes of the stream's flow caches."""
    def sizes(cache: StreamCache) -> tuple[int, int]:
        tensors = list(cache._convs.values()) + [t for kv in cache._attention.values() for t in kv]
        logical = sum(t.numel() * t.element_size() for t in tensors)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return logical, sum(storages.values())
    return {"tokens": sizes(stream._encoder_tokens), "frames": sizes(stream._encoder_frames),
            "step": sizes(stream._estimator[0]), "steps": len(stream._estimator)}


def flow_cache_table(decoder: CosyVoiceDecoder, clock: Clock, reps: int, seed: int) -> tuple[list, dict]:
    """Table 2's rows and the tiny stream's cache sizes (after the longest reply)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, decoder.codebook_size, CHUNK * max(REPLY_CHUNKS))
    stream = decoder.flow_stream()
    v = decoder.voice
    rows = []
    with torch.inference_mode():
        for n in range(1, max(REPLY_CHUNKS) + 1):
            new = codes[(n - 1) * CHUNK:n * CHUNK]
            if n not in REPLY_CHUNKS:
                stream.push(new)
                continue
            cached_times = []
            for _ in range(reps):
                copy = stream.copy()
                clock.sync()
                t0 = clock.now()
                copy.push(new)
                clock.sync()
                cached_times.append(clock.now() - t0)
            mel = stream.push(new)
            recompute_times = []
            for _ in range(reps):
                clock.sync()
                t0 = clock.now()
                whole = decoder.flow.inference(
                    torch.from_numpy(codes[:n * CHUNK])[None], torch.from_numpy(v.prompt_tokens).long()[None],
                    torch.from_numpy(v.prompt_mel)[None], torch.from_numpy(v.embedding)[None],
                    streaming=stream.grid, finalize=False)[0]
                clock.sync()
                recompute_times.append(clock.now() - t0)
            diff = (whole[:, -mel.shape[1]:].float().cpu() - mel.float().cpu()).abs().max().item()
            c, r = median(cached_times), median(recompute_times)
            rows.append([n, f"{n * CHUNK / decoder.token_rate:.1f}", f"{mel.shape[1]} / {whole.shape[1]}",
                         f"{c * 1000:.1f}", f"{r * 1000:.1f}", f"{r / c:.2f}x", f"{diff:.1e}"])
    return rows, cache_bytes(stream)


def full_v2_cache_bytes(seed: int) -> dict:
    """The official v2 flow's caches per stream in the steady state, from 4 chunks at 1
    Euler step on the CPU (float32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow = CosyVoiceFlow(dataclasses.replace(FlowConfig.official_v2(), n_timesteps=1)).eval()
    s = DecoderSettings()
    stream = FlowStream(flow, np.random.default_rng(seed).standard_normal(192).astype(np.float32),
                        np.zeros(0, np.int64), np.zeros((0, 80), np.float32), s.chunk_tokens or CHUNK,
                        s.left_chunks).prime()
    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        for _ in range(WARM["v2"] + 1):
            stream.push(rng.integers(0, 6561, CHUNK))
    return cache_bytes(stream)


def memory_rows(label: str, sizes: dict, steps: list[int]) -> list:
    kib = lambda b: f"{b / 1024:.0f}"  # noqa: E731
    pair = lambda t: f"{kib(t[0])} / {kib(t[1])}"  # noqa: E731
    enc = [sizes["tokens"][i] + sizes["frames"][i] for i in (0, 1)]
    totals = ", ".join(f"{n}: {kib(enc[0] + n * sizes['step'][0])} / {kib(enc[1] + n * sizes['step'][1])}"
                       for n in steps)
    return [[label, pair(sizes["tokens"]), pair(sizes["frames"]), pair(sizes["step"]), totals]]


# ---------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the flow's dtype (HiFT stays float32)")
    ap.add_argument("--families", default="v1,v2")
    ap.add_argument("--steps", default="10,4,2", help="Euler steps; 10 (the baseline) is always measured")
    ap.add_argument("--sessions", default=None, help="default: 1,8,32 (1 for --shape full on the CPU)")
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds at B = 1 (fewer as B grows, at least 2)")
    ap.add_argument("--reps", type=int, default=3, help="timed chunks per reply length in table 2")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared box)")
    ap.add_argument("--clock", default="auto", choices=["auto", "cpu", "wall"],
                    help="auto: CPU time on the CPU with one thread, else wall time")
    ap.add_argument("--no-cache-tables", action="store_true", help="skip tables 2 and 3")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if args.clock == "cpu" and (args.device == "cuda" or args.threads != 1):
        ap.error("--clock cpu needs --device cpu --threads 1 (the ops must run on the timing thread)")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    kind = args.clock if args.clock != "auto" else ("cpu" if args.device == "cpu" and args.threads == 1 else "wall")
    clock = Clock(args.device, kind)
    dtype = getattr(torch, args.dtype)
    families = args.families.split(",")
    steps = sorted({10, *(int(s) for s in args.steps.split(","))}, reverse=True)
    default_sizes = "1" if args.shape == "full" and args.device == "cpu" else "1,8,32"
    sizes = sorted(int(b) for b in (args.sessions or default_sizes).split(","))
    if args.shape == "full" and args.device == "cpu":
        print("warning: --shape full on a CPU is slow (seconds a push, minutes for the tables)", file=sys.stderr)

    rows, walls, cpus = [], [], []
    v2_parts = None
    for family in families:
        parts = build(family, args.shape, args.device, dtype)
        if family == "v2":
            v2_parts = parts
        results, meta = {}, None
        for n_steps in steps:
            decoder = decoder_for(parts, n_steps)
            probes = Probes(decoder, clock)
            rng = np.random.default_rng(args.seed)
            with probes.installed():
                for b in sizes:
                    r = measure(decoder, probes, clock, b, max(2, math.ceil(args.rounds / b)), rng)
                    results[n_steps, b] = r
                    if args.device == "cpu":
                        walls.append(r["wall"])
                        cpus.append(r["cpu"])
            chunk_s = CHUNK / decoder.token_rate
            hop = decoder.hift.config.samples_per_frame
            held_s = (decoder.settings.overlap_frames + decoder.delay_frames) * hop / decoder.sample_rate
            meta = chunk_s, held_s
        chunk_s, held_s = meta
        for n_steps in steps:
            per_b = {b: results[n_steps, b] for b in sizes}
            capacity = sessions_in_real_time(per_b, sizes, chunk_s)
            for b in sizes:
                r, ref = per_b[b], results[10, b]
                bt, ot = r["batched"], r["one"]
                rows.append([
                    family, n_steps, b, f"{bt * 1000:.0f}", f"{ot * 1000:.0f}", f"{ot / bt:.2f}x",
                    f"{bt / b / (chunk_s / 0.2) * 1000:.1f}", f"{bt / chunk_s:.3f} / {ot / chunk_s:.3f}",
                    f"{ref['batched'] / bt:.2f}x",
                    f"{(bt + held_s) * 1000:.0f} / {(ot + held_s) * 1000:.0f}",
                    f"{r['bf'] * 1000:.0f} / {r['bh'] * 1000:.0f} / {r['br'] * 1000:.0f}",
                    f"{r['of'] * 1000:.0f} / {r['oh'] * 1000:.0f}", capacity])

    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()} (one GPU)"
        unit = "GPU"
    else:
        where = f"CPU, {args.threads} thread(s)"
        unit = "core" if args.threads == 1 else f"{args.threads} threads"
    flow_dtype = args.dtype + (" flow, HiFT float32" if args.dtype != "float32" else "")
    clock_name = "CPU time of the pushing thread" if kind == "cpu" else "wall time"
    load_note = f"; box load {load:.1f} at the start" if args.device == "cpu" else ""
    if args.device == "cpu" and args.threads == 1:  # with more threads the ops run off the timing thread
        load_note += f", timed ticks' wall / CPU time = {sum(walls) / max(sum(cpus), 1e-9):.2f}"
    print(f"CosyVoice decoder per engine tick: {args.shape} shapes, random weights, {where}, {flow_dtype}; "
          f"clock: {clock_name}{load_note}")
    print(f"One chunk = 10 codes: 200 ms of audio (v1), 400 ms (v2). Held-back latency in 'codes -> first sample': "
          f"overlap 8 frames (v1 93 ms; v2 160 ms) + v2's look-ahead 3 codes (120 ms). Baselines (this run): "
          f"one-by-one pushes; 10 Euler steps. Sessions in real time per {unit}: measured (largest B with batched "
          f"tick < chunk period) / extrapolated (chunk period over per-session cost at B = {max(sizes)}).\n")
    print(table(["family", "steps", "B", "tick ms batched", "tick ms one-by-one", "speed-up",
                 "ms / session / 200 ms audio", "RTF batched / one-by-one", "vs 10 steps",
                 "codes -> first sample ms batched / one-by-one last", "flow / HiFT / rest ms (batched)",
                 "flow / HiFT ms (one-by-one)", f"sessions / {unit} in RT: meas. / extrap."], rows))

    if v2_parts is not None and not args.no_cache_tables:
        decoder = decoder_for(v2_parts, max(steps))
        cache_rows, run_sizes = flow_cache_table(decoder, clock, args.reps, args.seed)
        print(f"\nv2 flow per chunk (10 codes), {decoder.settings.steps} Euler steps, {args.shape} shape: with the "
              f"chunk caches (FlowStream, left_chunks={decoder.settings.left_chunks}) vs upstream's recompute of the "
              f"reply so far at every chunk (flow.inference(all codes, streaming=grid, finalize=False)); median of "
              f"{args.reps}; max |diff| = the chunk's mel, cached vs recomputed (same grid)\n")
        print(table(["reply chunks", "reply s", "frames out / recomputed", "cached ms", "recompute ms",
                     "recompute / cached", "max |diff| mel"], cache_rows))
        label = f"{args.shape} (measured, {args.dtype})"
        mem = memory_rows(label, run_sizes, steps)
        if args.shape == "tiny":
            mem += memory_rows("full (official v2, float32: 4 chunks at 1 step)", full_v2_cache_bytes(args.seed), steps)
        print(f"\nv2 flow caches per stream in the steady state (left_chunks={decoder.settings.left_chunks}), KiB: "
              f"tensor bytes / bytes of the storages they keep alive (a cache entry is a slice of a larger tensor)\n")
        print(table(["shape", "encoder tokens", "encoder frames", "estimator per Euler step",
                     "total at steps N: tensors / storages"], mem))
    print(f"\n(run time {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
