"""The streaming v1 CosyVoice decoder's window (model/cosyvoice_decoder.py): quality against
the whole utterance decoded at once, cost per push and added latency, for a grid of
`DecoderSettings.context_tokens` (past codes, and their mel, re-fed to the flow as its
prompt) x `overlap_frames` (mel frames HiFT repeats, cross-fades and holds back). Issue
#13: pick the window from a measured table, quality against cost.

One utterance of random spoken v1 codes (3.6 s: 180 codes, 18 pushes of 10), streamed by
each setting, against the same codes decoded at once (one flow call, one HiFT call). The
tiny random v1 build (`CosyVoiceDecoder.random("v1")`, no voice prompt), 10 Euler steps,
CPU, float32, one thread.

How the comparison is made fair. A flow call starts its Euler solver from noise: streamed
windows and one whole-utterance call can never agree bit for bit if each call draws its own
(and this random flow's mel depends on its noise more than on its codes: see the line
above the table). So both start from the same noise per frame: one (80, frames) draw for
the utterance; the whole call takes all of it, each streamed flow call the slice under its
window (the context's frames, then the new chunk's), passed as the flow's `noise` argument.
What is left is what the window changes: the flow sees only `context_tokens` codes of the
past and none of the future (the v1 flow is non-causal), and v1's length regulator
stretches each chunk's codes to its frames on their own. HiFT runs with its noise off
(its harmonic source made with `stochastic=False`, as the chunk-edge test of
tests/unit/test_cosyvoice_decoder.py), so the waveform differences are the windowing's,
not new random draws.

Columns:

- mel vs whole: the streamed chunks' mel, concatenated, against the whole call's: relative
  L2 of the (natural-log) mel, and the largest absolute difference. Depends on
  context_tokens only (overlap is HiFT's). No window reaches it: the whole call also sees
  the future and stretches the codes to frames on another grid.
- mel vs unbounded: the same against a stream that keeps all its past as context
  (context_tokens = the utterance's codes, same noise): what truncating the context alone
  costs, the part of the difference context_tokens controls.
- seam (the click measure of the unit test): the streamed audio against HiFT run once over
  the stream's own mel; relative RMS of the difference within 64 samples of each chunk edge
  (largest edge, mean of edges), and away from the edges ("inside"). A click is an edge
  well above inside. Depends on overlap_frames.
- audio vs whole: the streamed audio against HiFT once over the whole call's mel, relative
  RMS near the edges and inside: both effects together, end to end.
- cost: ms per push in the steady state (the context full), flow, HiFT and total: CPU time
  of the pushing thread (one torch thread: the ops run on it), median over `--rounds`
  pushes per setting, which the shared box's other load inflates far less than wall time
  (at a load of 4 on the 2 cores: CPU ms +20%, wall ms +60%); "wall ms": the same pushes'
  wall time, for reference. The settings'
  streams are pushed in turn, round by round, so drifting load hits all of them alike.
  These streams use the decoder as served (its own noise, HiFT's noise on).
- latency: what the held-back tail adds to every chunk, overlap_frames x 256 / 22050 s.
- baseline: the defaults (context_tokens=20, overlap_frames=8), measured in the same run;
  "cost x" is the setting's total CPU ms over the baseline's; "whole x", "unbounded x" and
  "seam x" its mel vs whole, mel vs unbounded and largest edge seam error over the
  baseline's.

The recommendation under the table is derived from these numbers. The two settings act on
different halves (context on the flow, overlap on HiFT), so each is chosen on its own
axis, at the other's default.

- context_tokens: its error is graded (no threshold says "good enough" on random weights),
  so the knee of error against cost: mel vs unbounded and flow CPU ms (pooled over the
  overlaps: the flow does not depend on them), both scaled to 0..1 over the axis, each
  context scored (1 - error) - cost (the share of the quality gain it gets less the share
  of the cost it pays); the knee is the best score, the point farthest below the chord. It
  replaces the default only if it scores more than 0.1 above it: closer than that is within
  the cost columns' run-to-run noise.
- overlap_frames: a click is there or not, so the least added latency without one, by the
  unit test's criterion (largest edge under 0.12 and under twice inside + 0.02).

Reading it with random weights: the untrained flow's attention spreads over its whole
window, so a context's truncation error decays slowly and smoothly with its length (a
trained flow's need not): the context knee is a cost/quality trade on
this build, not evidence about the official flow. HiFT's seam is its convolutions'
zero-padded borders, whose reach in samples is set by the layout (the tiny build keeps
the official kernels, dilations and up-sampling, only fewer channels), so the overlap
knee should carry over better; both are worth re-measuring with the official weights.

    python bench/decoder_window.py [--seconds 3.6] [--rounds 12] [--steps 10] [--threads 1]
                                   [--seed 1]

About 1.5 minutes on the idle 2-core development box, 2.5 when it is busy; `--seconds`
and `--rounds` make it shorter.
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
from model.cosyvoice_decoder import CosyVoiceDecoder, DecoderSettings  # noqa: E402

CHUNK = 10  # codes per push: one model chunk
CONTEXTS = (0, 5, 10, 20, 40)
OVERLAPS = (0, 2, 4, 8, 12)
EDGE = 64  # samples either side of a chunk edge: the click measure's window
BASE = DecoderSettings()  # context_tokens=20, overlap_frames=8
MARGIN = 0.1  # a knee replaces the default only if it scores this much higher (see `pick`)


def rel(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Relative L2 (RMS) of a - b against b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.sum((a - b) ** 2) / np.sum(b ** 2)))


class FixedNoise:
    """The quality decoder's hooks: each flow call starts from the utterance's noise under
    its window (`noise`, instead of the stream's generator), its mel is recorded; HiFT's
    source is made with its noise off (`source` is what `forward` and the decoder's batched
    HiFT both call). One stream at a time: `start()` before each."""

    def __init__(self, decoder: CosyVoiceDecoder, noise: torch.Tensor) -> None:
        self.noise = noise
        self.flow_inference, self.hift_forward = decoder.flow.inference, decoder.hift.forward
        hift_source = decoder.hift.source
        self.start()

        def flow(token, prompt_token, prompt_feat, embedding, noise=None, *args, generator=None, frames=None,
                 **kwargs):
            context = prompt_feat.shape[1]  # the context's frames (the random voice has no prompt)
            window = self.noise[:, :, self.offset - context:self.offset + frames]
            assert self.offset >= context and window.shape[2] == context + frames, (self.offset, context, frames)
            mel = self.flow_inference(token, prompt_token, prompt_feat, embedding, window, *args, frames=frames,
                                      **kwargs)
            self.offset += frames
            self.mels.append(mel[0].clone())
            return mel

        def source(f0, *, stochastic=True, generator=None):
            self.sources += 1
            return hift_source(f0, stochastic=False, generator=generator)
        decoder.flow.inference = flow
        decoder.hift.source = source

    def start(self) -> None:
        self.offset = self.sources = 0
        self.mels: list[torch.Tensor] = []


def whole(decoder: CosyVoiceDecoder, hooks: FixedNoise, codes: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The utterance decoded at once: one flow call over all its codes (all the noise), one
    HiFT call (noise off) over all its mel."""
    embedding = torch.from_numpy(decoder.voice.embedding)[None]
    with torch.inference_mode():
        mel = hooks.flow_inference(torch.from_numpy(codes)[None], torch.zeros(1, 0, dtype=torch.long),
                                   torch.zeros(1, 0, 80), embedding, hooks.noise)[0]
        audio = hooks.hift_forward(mel[None], stochastic=False)[0][0].numpy()
    return mel, audio


def sensitivity(decoder: CosyVoiceDecoder, hooks: FixedNoise, codes: np.ndarray, seed: int) -> dict:
    """How much the whole call's mel moves with another noise draw, and with the second half's
    codes changed (measured on the first and the second half): what the flow's output
    depends on at all, to read the mel column against."""
    rng = np.random.default_rng(seed + 1)
    embedding = torch.from_numpy(decoder.voice.embedding)[None]
    empty = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80)

    def flow(c, noise):
        with torch.inference_mode():
            return hooks.flow_inference(torch.from_numpy(c)[None], *empty, embedding, noise)[0]
    ref = flow(codes, hooks.noise)
    other_noise = torch.randn(hooks.noise.shape, generator=torch.Generator().manual_seed(seed + 1))
    half = len(codes) // 2
    changed = codes.copy()
    changed[half:] = rng.integers(0, decoder.codebook_size, len(codes) - half)
    moved = flow(changed, hooks.noise)
    f = decoder.mel_frames(half)
    return {"noise": rel(flow(codes, other_noise), ref), "codes_after": rel(moved[:, f:], ref[:, f:]),
            "codes_before": rel(moved[:, :f], ref[:, :f])}


def stream(decoder: CosyVoiceDecoder, hooks: FixedNoise, chunks: list[np.ndarray]) -> tuple[list[np.ndarray],
                                                                                         torch.Tensor]:
    """Push the chunks through a new stream: its pushes' audio and its flow calls' mel."""
    hooks.start()
    s = decoder.new_stream()
    outs = [s.push(c) for c in chunks]
    # The hooks must have seen every flow call and every HiFT call (noise off), or the
    # decoder has moved away from the entry points they wrap.
    assert len(hooks.mels) == len(chunks) and hooks.sources >= len(chunks), (len(hooks.mels), hooks.sources)
    return outs, torch.cat(hooks.mels, dim=1)


def quality(decoder: CosyVoiceDecoder, hooks: FixedNoise, chunks: list[np.ndarray], ref_mel: torch.Tensor,
            ref_audio: np.ndarray, unbounded_mel: torch.Tensor) -> dict:
    outs, mel = stream(decoder, hooks, chunks)
    assert mel.shape == ref_mel.shape, (mel.shape, ref_mel.shape)
    lead = decoder.settings.overlap_frames * decoder.hift.config.samples_per_frame
    assert not outs[0][:lead].any()
    y = np.concatenate(outs)[lead:]  # the held-back tail's silence ahead of the utterance dropped
    with torch.inference_mode():
        own = hooks.hift_forward(mel[None], stochastic=False)[0][0].numpy()[:len(y)]
    edges = np.cumsum([len(o) for o in outs])[:-1] - lead
    near = np.zeros(len(y), bool)
    for b in edges:
        near[b - EDGE:b + EDGE] = True
    per_edge = [rel(y[b - EDGE:b + EDGE], own[b - EDGE:b + EDGE]) for b in edges]
    vs_whole = ref_audio[:len(y)]
    return {"mel_rel": rel(mel, ref_mel), "mel_max": float((mel - ref_mel).abs().max()),
            "mel_trunc": rel(mel, unbounded_mel),
            "seam_max": max(per_edge), "seam_mean": float(np.mean(per_edge)), "seam_inside": rel(y[~near], own[~near]),
            "whole_edge": rel(y[near], vs_whole[near]), "whole_inside": rel(y[~near], vs_whole[~near])}


class CpuTimers:
    """CPU seconds of this thread in the flow and in HiFT, by wrapping the modules' entry
    points: the flow's `inference`; HiFT's three parts `f0`, `source` and `decode`, which
    its `forward` and the decoder's batched HiFT step both call. With one torch thread the
    ops run on the calling thread, so its CPU time is the push's compute, which the shared
    box's other load inflates far less than the wall time."""

    def __init__(self, decoder: CosyVoiceDecoder) -> None:
        self.flow = self.hift = 0.0

        def timed(fn, part):
            def wrapper(*args, **kwargs):
                t0 = time.thread_time()
                out = fn(*args, **kwargs)
                setattr(self, part, getattr(self, part) + time.thread_time() - t0)
                return out
            return wrapper
        decoder.flow.inference = timed(decoder.flow.inference, "flow")
        for name in ("f0", "source", "decode"):
            setattr(decoder.hift, name, timed(getattr(decoder.hift, name), "hift"))


def cost(base: CosyVoiceDecoder, grid: list[DecoderSettings], chunks: list[np.ndarray], rounds: int) -> dict:
    """Median ms per push (flow, HiFT, total CPU; total wall) per setting, the context full;
    the settings' streams pushed in turn, round by round."""
    timers = CpuTimers(base)
    streams = {s: CosyVoiceDecoder(base.flow, base.hift, base.voice, s).new_stream() for s in grid}
    warm = math.ceil(max(s.context_tokens for s in grid) / CHUNK) + 1  # context full, a held tail
    for k in range(warm):
        for stream in streams.values():
            stream.push(chunks[k % len(chunks)])
    times: dict[DecoderSettings, dict[str, list[float]]] = {
        s: {"push": [], "flow": [], "hift": [], "wall": []} for s in grid}
    for r in range(rounds):
        codes = chunks[(warm + r) % len(chunks)]
        for s, stream in streams.items():
            timers.flow = timers.hift = 0.0
            t0, w0 = time.thread_time(), time.perf_counter()
            stream.push(codes)
            times[s]["push"].append(time.thread_time() - t0)
            times[s]["wall"].append(time.perf_counter() - w0)
            times[s]["flow"].append(timers.flow)
            times[s]["hift"].append(timers.hift)
            assert timers.flow > 0 and timers.hift > 0, "the timers no longer see the flow or HiFT"
    return {s: {k: median(v) * 1000 for k, v in t.items()} for s, t in times.items()}


def knee_scores(points: dict[int, tuple[float, float]]) -> dict[int, float]:
    """points: setting -> (error, cost). Both scaled to 0..1 over the axis; a setting's score
    is (1 - error) - cost: the share of the axis' quality gain it gets less the share of
    the cost it pays. The knee is the highest score (the point farthest below the chord)."""
    errors, costs = [e for e, _ in points.values()], [c for _, c in points.values()]
    scale = lambda v, vs: (v - min(vs)) / ((max(vs) - min(vs)) or 1.0)  # noqa: E731
    return {k: (1 - scale(e, errors)) - scale(c, costs) for k, (e, c) in points.items()}


def pick(scores: dict[int, float], default: int) -> int:
    """The knee, unless the default scores within MARGIN of it (the measurements' noise)."""
    best = max(scores, key=scores.get)
    return best if scores[best] - scores[default] > MARGIN else default


def no_click(r: dict) -> bool:
    """The unit test's criterion for no seam (tests/unit/test_cosyvoice_decoder.py,
    test_no_seam_at_chunk_edges): the largest edge under 0.12 and under twice the inside
    error plus 0.02."""
    return r["seam_max"] < 0.12 and r["seam_max"] < 2.0 * r["seam_inside"] + 0.02


def recommend(q: dict, c: dict, latency: dict) -> list[str]:
    """context_tokens: the knee of `knee_scores` (its quality is graded, no threshold), at
    the default overlap; its cost is its flow CPU ms pooled over all overlaps (the flow does
    not depend on the overlap): five times the pushes, steadier than one row's.
    overlap_frames: a click is there or not, so the knee is the least latency with no
    click (`no_click`), at the default context."""
    ctx_points = {n: (q[n, BASE.overlap_frames]["mel_trunc"], median(c[n, o]["flow"] for o in OVERLAPS))
                  for n in CONTEXTS}
    ctx_scores = knee_scores(ctx_points)
    best = max(ctx_scores, key=ctx_scores.get)
    ctx = pick(ctx_scores, BASE.context_tokens)
    ov_rows = {o: q[BASE.context_tokens, o] for o in OVERLAPS}
    clean = [o for o in OVERLAPS if no_click(ov_rows[o])]
    ov = clean[0] if clean else BASE.overlap_frames
    whole = [q[n, BASE.overlap_frames]["mel_rel"] for n in CONTEXTS]
    qb, cb = q[BASE.context_tokens, BASE.overlap_frames], c[BASE.context_tokens, BASE.overlap_frames]
    r, k = q[ctx, ov], c[ctx, ov]
    return [
        f"- context_tokens (overlap {BASE.overlap_frames}), mel vs unbounded / flow ms (all overlaps) / score: "
        + ", ".join(f"{n}: {e:.3f} / {t:.1f} / {ctx_scores[n]:+.2f}" for n, (e, t) in ctx_points.items())
        + f". Knee: {best}" + ("" if best == ctx else f"; the default {BASE.context_tokens} scores within "
                               f"{MARGIN} of it: keep it") + f". Mel vs whole moves only {min(whole):.3f}.."
        f"{max(whole):.3f} over the axis: no window comes near the whole call (random weights: see the docstring).",
        f"- overlap_frames (context {BASE.context_tokens}), largest edge / inside seam error / added latency ms: "
        + ", ".join(f"{o}: {ov_rows[o]['seam_max']:.3f} / {ov_rows[o]['seam_inside']:.3f} / {latency[o]:.0f}"
                    f"{'' if no_click(ov_rows[o]) else ' (click)'}" for o in OVERLAPS)
        + (f". Knee, the least latency without a click (the unit test's criterion): {ov}." if clean else
           ". Every overlap clicks by the unit test's criterion: keep the default.")
        + " HiFT ms: " + ", ".join(f"{o}: {c[BASE.context_tokens, o]['hift']:.1f}" for o in OVERLAPS) + ".",
        f"- Recommended: context_tokens={ctx}, overlap_frames={ov}: {k['push']:.1f} ms a push "
        f"({k['push'] / cb['push']:.2f}x the defaults'), {latency[ov]:.0f} ms added latency (defaults "
        f"{latency[BASE.overlap_frames]:.0f}), mel vs unbounded {r['mel_trunc']:.3f} (defaults {qb['mel_trunc']:.3f}), "
        f"vs whole {r['mel_rel']:.3f} ({qb['mel_rel']:.3f}), largest edge seam {r['seam_max']:.3f} "
        f"({qb['seam_max']:.3f}), audio vs whole at the edges {r['whole_edge']:.3f} ({qb['whole_edge']:.3f})."
        + (" The defaults are the knee." if (ctx, ov) == (BASE.context_tokens, BASE.overlap_frames) else ""),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.6, help="the utterance's length (pushes of 10 codes)")
    ap.add_argument("--rounds", type=int, default=12, help="measured pushes per setting for the cost columns")
    ap.add_argument("--steps", type=int, default=BASE.steps, help="Euler steps of the flow")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared box)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()

    grid = [DecoderSettings(steps=args.steps, context_tokens=n, overlap_frames=o) for n in CONTEXTS for o in OVERLAPS]
    # Two builds of the same weights: one hooked for quality, one as served for cost.
    probe = CosyVoiceDecoder.random("v1", seed=0, settings=grid[0])
    served = CosyVoiceDecoder.random("v1", seed=0, settings=grid[0])
    assert not len(probe.voice.prompt_tokens) and not len(probe.voice.prompt_mel)
    pushes = max(2, round(args.seconds * probe.token_rate / CHUNK))
    rng = np.random.default_rng(args.seed)
    codes = rng.integers(0, probe.codebook_size, pushes * CHUNK).astype(np.int64)
    chunks = [codes[i:i + CHUNK] for i in range(0, len(codes), CHUNK)]
    noise = torch.randn(1, 80, probe.mel_frames(len(codes)), generator=torch.Generator().manual_seed(args.seed))
    hooks = FixedNoise(probe, noise)

    ref_mel, ref_audio = whole(probe, hooks, codes)
    sens = sensitivity(probe, hooks, codes, args.seed)
    unbounded = DecoderSettings(steps=args.steps, context_tokens=len(codes))
    _, unbounded_mel = stream(CosyVoiceDecoder(probe.flow, probe.hift, probe.voice, unbounded), hooks, chunks)
    q = {}
    for s in grid:
        d = CosyVoiceDecoder(probe.flow, probe.hift, probe.voice, s)
        q[s.context_tokens, s.overlap_frames] = quality(d, hooks, chunks, ref_mel, ref_audio, unbounded_mel)
    c = {(s.context_tokens, s.overlap_frames): v for s, v in cost(served, grid, chunks, args.rounds).items()}
    hop, rate = probe.hift.config.samples_per_frame, probe.sample_rate
    latency = {o: o * hop / rate * 1000 for o in OVERLAPS}

    base_key = (BASE.context_tokens, BASE.overlap_frames)
    qb, cb = q[base_key], c[base_key]
    rows = []
    for n in CONTEXTS:
        for o in OVERLAPS:
            r, k = q[n, o], c[n, o]
            rows.append([f"{n}{' (base)' if (n, o) == base_key else ''}", o, f"{latency[o]:.0f}",
                         f"{r['mel_rel']:.3f}", f"{r['mel_max']:.2f}", f"{r['mel_trunc']:.3f}",
                         f"{r['seam_max']:.3f} / {r['seam_mean']:.3f} / {r['seam_inside']:.3f}",
                         f"{r['whole_edge']:.3f} / {r['whole_inside']:.3f}",
                         f"{k['flow']:.1f}", f"{k['hift']:.1f}", f"{k['push']:.1f}", f"{k['wall']:.1f}",
                         f"{k['push'] / cb['push']:.2f}x", f"{r['mel_rel'] / qb['mel_rel']:.2f}x",
                         f"{r['mel_trunc'] / qb['mel_trunc']:.2f}x", f"{r['seam_max'] / qb['seam_max']:.2f}x"])
    print(f"Streaming v1 CosyVoice decoder, windows against the whole utterance: tiny random build, "
          f"{len(codes)} codes ({len(codes) / probe.token_rate:.1f} s, {pushes} pushes of {CHUNK}), {args.steps} "
          f"Euler steps, cpu, {args.threads} thread(s), float32; same noise per frame for the streamed and the whole "
          f"flow, HiFT noise off for quality; cost: the decoder as served, CPU ms of the pushing thread, median of "
          f"{args.rounds} steady-state pushes; baseline = context_tokens={BASE.context_tokens}, "
          f"overlap_frames={BASE.overlap_frames}, this run")
    print(f"What the random flow's mel depends on (whole call, rel. L2): another noise draw {sens['noise']:.3f}; "
          f"the second half's codes changed: second half {sens['codes_after']:.3f}, first half "
          f"{sens['codes_before']:.3f} (non-causal: the future moves the past)")
    print(table(["context", "overlap", "latency ms", "mel vs whole rel L2", "mel max abs diff", "mel vs unbounded",
                 f"seam +-{EDGE}: edge max / mean / inside", "audio vs whole: edges / inside",
                 "flow ms", "HiFT ms", "total ms", "wall ms", "cost x", "whole x", "unbounded x", "seam x"], rows))
    print("\n".join(recommend(q, c, latency)))
    print(f"({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
