"""The S3 tokenizer's streaming window: how often streamed codes equal whole-utterance codes,
against the compute per second of audio and the latency the look-ahead adds.

Speech: English sentences spoken by espeak-ng (Debian `espeak-ng`) in several voices,
two sentences per utterance (a caller's turn, 6-8 s), resampled to 16 kHz. Each
utterance is streamed in 20 ms frames (all utterances batched, as the engine batches
calls) and flushed; its codes are compared with `encode` of the whole utterance.
Baseline, in the same run: `encode` of every whole utterance (compute 1.0x).

Model: the full-size v1 architecture (width 1280, 6 layers, 4096 codes, 50 Hz) with
random weights: `--init default` is `S3Tokenizer.random` (PyTorch's default init: the
positional embedding outweighs the audio features about 15:1, so codes mostly follow
position, not speech); `--init content` scales the convolutions up (He init x4) so codes
follow the audio. `--weights PATH` measures a real checkpoint instead (a folder written
by `S3Tokenizer.save`, or upstream's `speech_tokenizer_v1.onnx`). Lines above the table
say how much the model's codes depend on the audio at all: read agreement with them.

    python bench/tokenizer_window.py [--init default|content] [--weights PATH]
                                     [--grid full|quick] [--voices N] [--receptive-field]

`--receptive-field` prints, instead of the window table, how often a whole-utterance code
changes when 0.2 s of audio at a given distance in its past or future is silenced: what
look-back and look-ahead a model needs, whatever window is measured.

Columns: the window (a step's codes come out exactly the look-ahead after its audio:
that is the added latency); agreement of all streamed codes / of the newest code of each
step (the one with the least right context); GFLOP per second of audio (matmuls,
convolutions and attention, counted by torch's FlopCounterMode); CPU time relative to
the whole-utterance baseline (one thread, the utterances' streams batched together).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave

# The script's folder would shadow the `model` package: import from the repository root.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench._common import table  # noqa: E402
from model.s3_tokenizer import S3Config, S3Tokenizer  # noqa: E402

SENTENCES = [
    "Hello, I am calling about the invoice you sent me last week.",
    "Could you tell me when the technician will arrive tomorrow morning?",
    "My account number is four seven two, nine one eight.",
    "I would like to change my delivery address, please.",
    "Yes, that works for me. Thank you very much for your help.",
    "The weather has been terrible, so the shipment was delayed by two days.",
    "Can I speak to someone about my contract before Friday?",
    "No, the second payment never arrived, I checked twice.",
]
VOICES = ["en-us", "en-gb+f3", "en-gb-scotland+m3", "en-us+f4", "en-029+m2", "en-gb-x-rp+f2"]
FRAME = 320  # 20 ms at 16 kHz: the bridge's frame
STEP_SECONDS = 0.2  # one OmniFlatten user chunk at 50 Hz, as the default

# (encoder, positions, look-back s, look-ahead s)
QUICK = [("reencode", "window", 2.0, 0.0), ("reencode", "utterance", 2.0, 0.02)] + [
    ("cache", "utterance", lb, la) for lb in (0.4, 2.0) for la in (0.0, 0.02)]
FULL = ([("reencode", "window", 2.0, la) for la in (0.0, 0.02, 0.04)]
        + [("reencode", "utterance", lb, la) for lb in (0.4, 0.8, 1.2, 2.0) for la in (0.0, 0.02, 0.04, 0.12)]
        + [("cache", "utterance", lb, la) for lb in (0.4, 0.8, 1.2, 2.0, 4.0)
           for la in (0.0, 0.02, 0.04, 0.08, 0.12)]
        + [("cache", "utterance", 8.0, la) for la in (0.0, 0.02)])  # 8 s: all the past here


def speak(text: str, voice: str) -> np.ndarray:
    """espeak-ng's 22.05 kHz speech, resampled to 16 kHz float32."""
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-w", path, text], check=True, capture_output=True)
        with wave.open(path) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
    g = math.gcd(16000, rate)
    return resample_poly(pcm, 16000 // g, rate // g).astype(np.float32)


def utterances(voices: int) -> list[np.ndarray]:
    out = []
    for v, voice in enumerate(VOICES[:voices]):
        first = (2 * v) % len(SENTENCES)
        out.append(np.concatenate([speak(SENTENCES[first], voice), speak(SENTENCES[first + 1], voice)]))
    return out


def content_init(tok: S3Tokenizer, seed: int = 0, gain: float = 4.0) -> S3Tokenizer:
    """He-normal convolutions times `gain`: audio features (norm ~300) outweigh the
    positional embedding (norm ~25), as they must for codes that follow the speech."""
    generator = torch.Generator().manual_seed(seed + 1)
    encoder = tok.model.encoder
    with torch.no_grad():
        for conv in (encoder.conv1, encoder.conv2):
            fan_in = conv.weight.shape[1] * conv.weight.shape[2]
            w = torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in) * gain
            conv.weight.copy_(w.to(conv.weight))
            conv.bias.zero_()
    return tok


def build(args) -> tuple[S3Tokenizer, str]:
    if args.weights:
        path = args.weights
        tok = S3Tokenizer.from_onnx(path) if path.endswith(".onnx") else S3Tokenizer.load(path)
        return tok, f"weights {path}"
    tok = S3Tokenizer.random(S3Config(), seed=0)
    if args.init == "content":
        content_init(tok)
    return tok, f"full-size v1, random weights (--init {args.init}, seed 0)"


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV: 4 * batch * heads * queries * keys * head_dim."""
    *batch, tq, d = query
    return 4 * math.prod(batch) * tq * key[-2] * d


class Meter:
    """CPU seconds (this process, one thread) and FLOPs of what runs inside."""

    def __init__(self) -> None:
        aten = torch.ops.aten  # on the CPU, attention runs as the flash kernel, not counted by default
        self.flops = FlopCounterMode(display=False, custom_mapping={
            aten.scaled_dot_product_attention: _sdpa_flops,
            aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops})

    def __enter__(self):
        self.flops.__enter__()
        self.t0 = time.process_time()
        return self

    def __exit__(self, *exc):
        self.cpu = time.process_time() - self.t0
        self.flops.__exit__(*exc)
        self.total_flops = self.flops.get_total_flops()


def stream_all(tok: S3Tokenizer, audio: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Every utterance streamed in 20 ms frames, batched; codes and steps run (pre-flush)."""
    streams = [tok.new_stream() for _ in audio]
    parts: list[list[np.ndarray]] = [[] for _ in audio]
    longest = max(len(a) for a in audio)
    for i in range(0, longest, FRAME):
        live = [k for k, a in enumerate(audio) if i < len(a)]
        codes = tok.push_many([streams[k] for k in live], [audio[k][i:i + FRAME] for k in live])
        for k, c in zip(live, codes):
            parts[k].append(c)
    steps = [s.emitted // s._step for s in streams]
    return [np.concatenate(p + [s.flush()]) for p, s in zip(parts, streams)], steps


def calibrate(tok: S3Tokenizer, audio: list[np.ndarray], whole: list[np.ndarray]) -> tuple[float, float]:
    """How much the codes follow the speech: share of codes two different utterances have
    in common at the same positions (a tokenizer of speech: near 0), and share kept when
    -70 dBFS noise is added (a robust tokenizer: near 1)."""
    n = min(len(w) for w in whole)
    shared = np.mean([np.mean(whole[k][:n] == whole[(k + 1) % len(whole)][:n]) for k in range(len(whole))])
    rng = np.random.default_rng(0)
    noisy = [tok.encode(a + 10 ** (-70 / 20) * rng.standard_normal(len(a)).astype(np.float32)) for a in audio]
    kept = np.mean([np.mean(a == b) for a, b in zip(noisy, whole)])
    return float(shared), float(kept)


GAPS_MS = [0, 20, 100, 200, 500, 1000, 2000, 4000]  # bin edges of the gap between code and silenced audio


def receptive_field(tok: S3Tokenizer, audio: list[np.ndarray], whole: list[np.ndarray]) -> list[list[object]]:
    """How far a code's context reaches, whatever the window: silence 0.2 s of audio (every
    0.6 s) and count the whole-utterance codes that change, by the gap between the code and
    the silenced audio, which lies in the code's future (what look-ahead must cover) or in
    its past (look-back)."""
    per = tok.config.samples_per_token
    ms_per_code = 1000 / tok.token_rate
    block = round(0.2 * tok.token_rate)
    bins = len(GAPS_MS) + 1  # inside the block, then one bin per gap edge
    changed, counted = np.zeros((2, bins)), np.zeros((2, bins))
    for x, ref in zip(audio, whole):
        index = np.arange(len(ref))
        for b in range(0, len(ref) - block, 3 * block):
            y = x.copy()
            y[b * per:(b + block) * per] = 0
            diff = tok.encode(y) != ref
            inside = (index >= b) & (index < b + block)
            for side, gap in ((0, b - 1 - index), (1, index - (b + block))):  # 0: silenced audio in the future
                gap_ms = gap * ms_per_code
                which = np.where(inside, 0, np.searchsorted(GAPS_MS, gap_ms, side="right"))
                valid = inside | (gap >= 0)
                for k in range(bins):
                    m = valid & (which == k)
                    changed[side, k] += diff[m].sum()
                    counted[side, k] += m.sum()
    labels = ["inside the silenced 0.2 s", "adjacent"] + [
        f"{lo:g}-{hi:g} ms away" for lo, hi in zip(GAPS_MS[1:], GAPS_MS[2:])] + [f">= {GAPS_MS[-1]} ms away"]
    return [[label] + [f"{changed[s, k] / counted[s, k]:.1%}" if counted[s, k] else "-" for s in (0, 1)]
            for k, label in enumerate(labels)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", choices=["default", "content"], default="default")
    ap.add_argument("--weights", default=None, help="a saved tokenizer folder or speech_tokenizer_v1.onnx")
    ap.add_argument("--grid", choices=["full", "quick"], default="full")
    ap.add_argument("--voices", type=int, default=4, help=f"utterances, one per voice (2 to {len(VOICES)})")
    ap.add_argument("--receptive-field", action="store_true",
                    help="print, instead, how often a code changes when audio this far from it is silenced")
    args = ap.parse_args()
    if not 2 <= args.voices <= len(VOICES):
        ap.error(f"--voices must be 2 to {len(VOICES)}")
    if shutil.which("espeak-ng") is None:
        print("espeak-ng not found: `apt-get install espeak-ng` (Debian) speaks the test sentences", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # CPU time ratios on a shared machine: one thread, process time
    torch.set_grad_enabled(False)
    tok, what = build(args)
    audio = utterances(args.voices)
    seconds = sum(len(a) for a in audio) / 16000

    def baseline() -> tuple[list[np.ndarray], Meter]:
        with Meter() as m:
            codes = [tok.encode(a) for a in audio]
        return codes, m

    whole, base = baseline()
    if args.receptive_field:
        print(f"S3 receptive field: {what}; {len(audio)} espeak-ng utterances ({seconds:.1f} s); share of "
              f"whole-utterance codes that change when 0.2 s of audio is silenced, by distance")
        print(table(["distance from the silenced audio", "audio in the code's future (look-ahead)",
                     "in its past (look-back)"], receptive_field(tok, audio, whole)))
        return 0
    shared, kept = calibrate(tok, audio, whole)
    rows, cpu_base = [], [base.cpu]
    for encoder, positions, lookback, lookahead in (FULL if args.grid == "full" else QUICK):
        t = tok.with_streaming(stream_encoder=encoder, stream_positions=positions, step_seconds=STEP_SECONDS,
                               lookback_seconds=lookback, lookahead_seconds=lookahead)
        with Meter() as m:
            codes, steps = stream_all(t, audio)
        step = t.config.step_tokens
        agree = np.concatenate([c == w for c, w in zip(codes, whole)])
        newest = np.concatenate([(c == w)[step - 1:n * step:step] for c, w, n in zip(codes, whole, steps)])
        assert all(len(c) == len(w) for c, w in zip(codes, whole))
        rows.append([encoder, positions, f"{lookback:.1f}", f"{lookahead * 1000:.0f}",
                     f"{agree.mean():.1%}", f"{newest.mean():.1%}", f"{m.total_flops / seconds / 1e9:.1f}", m.cpu])
        if len(rows) % 8 == 0:  # the baseline again, through the run: the machine is shared
            cpu_base.append(baseline()[1].cpu)
    cpu_base.append(baseline()[1].cpu)
    ref_cpu = float(np.median(cpu_base))
    for r in rows:
        r[7] = f"{r[7] / ref_cpu:.1f}x"
    print(f"S3 streaming window: {what}; {len(audio)} espeak-ng utterances ({seconds:.1f} s, "
          f"{', '.join(VOICES[:len(audio)])}), step {STEP_SECONDS} s, 20 ms pushes")
    print(f"baseline = whole-utterance encode: {base.total_flops / seconds / 1e9:.1f} GFLOP per s of audio, "
          f"{ref_cpu:.2f} CPU s (median of {len(cpu_base)}, one thread)")
    print(f"codes follow the speech? two different utterances share {shared:.1%} of codes at equal "
          f"positions; -70 dBFS noise keeps {kept:.1%}")
    print(table(["encoder", "positions", "look-back s", "look-ahead = added latency ms", "agree total",
                 "agree newest", "GFLOP per s audio", "CPU vs whole"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
