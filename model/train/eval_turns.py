"""`duplexline eval turns`: the paper's turn-taking metrics on held-out dialogues, through
the streaming engine as a call runs (docs/training.md, "Evaluating turn-taking").

Each dialogue's caller channel goes to a session of the model folder's engine chunk by
chunk, as the agent sends it (agent/agents.py): aligned once, the first chunk led by the
tokenizer's look-ahead (`lead_frames` of silence), then one chunk period per submit; the
engine tokenizes, steps and decodes it as on a call, only as fast as it computes instead
of on the caller's clock (one session at a time, admitted by slots alone). The assistant
channel of the file is never fed: the model makes its own. The metrics (eval_metrics.py)
read the model's speech codes; the table, JSON and one example (stereo WAV, PNG
timeline) go to `--out`.

    python -m model.train.eval_turns --model FOLDER --manifest M [--limit N] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .eval_metrics import KS, LIMIT, Outcome, interrupt_onsets, interruption, summarize, turn_events, turn_taking
from .manifest import DialogueEntry

__all__ = ["PAPER", "EvalError", "DialogueRun", "EvalResult", "add_eval_parser", "run", "main", "evaluate",
           "stream_dialogue", "score", "reference_run", "format_table", "text_decoder"]

FRAME_SECONDS = 0.02  # the agent's frame: alignment and the lead are whole frames
SAMPLE_RATE = 16000

# OmniFlatten (arXiv 2410.17799 v2), its turn-taking table; k in tokens, on its token clock.
PAPER = {
    "OmniFlatten": {"turn_acc": [20.6, 53.6, 66.3, 71.7], "turn_ms": 193,
                    "interrupt_acc": [10.9, 30.9, 41.8, 51.8], "interrupt_ms": 287},
    "Moshi": {"turn_acc": [2.9, 18.8, 38.5, 55.1], "turn_ms": 553,
              "interrupt_acc": [0.0, 6.2, 14.8, 45.7], "interrupt_ms": 753},
}


class EvalError(RuntimeError):
    """The evaluation cannot run as asked (the message says why)."""


@dataclass
class DialogueRun:
    """What the model did on one dialogue: per chunk step its speech codes (-1: silent)
    and text ids; the decoder's audio only for the example (it is large)."""

    entry: DialogueEntry
    user: np.ndarray  # the caller's channel as fed, 16 kHz float32 (the example only; else empty)
    speech: np.ndarray  # (chunks, codes per chunk)
    text: np.ndarray  # (chunks, text slots)
    pcm: np.ndarray | None = None

    def speaking(self, per_code: bool = False) -> np.ndarray:
        on = self.speech >= 0
        return on.reshape(-1) if per_code else on.any(axis=1)


@dataclass
class EvalResult:
    report: dict
    runs: list[DialogueRun]
    table: str


# ---- streaming ---------------------------------------------------------------------------

async def stream_dialogue(session, user: np.ndarray, chunks: int) -> list:
    """`chunks` chunk steps of `user` (zero-padded) through a VoiceSession, as the agent
    sends a caller's audio; the VoiceChunks, one per step."""
    pad = session.align(time.monotonic(), FRAME_SECONDS)
    if isinstance(pad, asyncio.Future):
        pad = await pad
    lead = session.lead_frames(FRAME_SECONDS)
    if pad != lead:  # other sessions on the clock: the audio would shift against the chunks
        raise EvalError(f"the engine asked for {pad} frames of leading silence, not the {lead} of a lone call")
    size = round(session.chunk_seconds * SAMPLE_RATE)
    audio = np.zeros(chunks * size, np.float32)
    n = min(len(user), len(audio))
    audio[:n] = user[:n]
    out = []
    for k in range(chunks):
        piece = audio[k * size:(k + 1) * size]
        if k == 0:
            piece = np.concatenate([np.zeros(pad * round(FRAME_SECONDS * SAMPLE_RATE), np.float32), piece])
        got = await session.submit_audio(piece)
        if len(got) != 1 or got[0].dropped:
            raise EvalError(f"chunk {k} gave {len(got)} steps{' (dropped)' if got and got[0].dropped else ''}, "
                            "not one: the stream is out of step with the chunks")
        out.extend(got)
    return out


def tail_chunks(chunk_seconds: float, hold: int, limit: float = LIMIT) -> int:
    """Silent chunks fed past the audio's end: room for a last response or stop."""
    return math.ceil(limit / chunk_seconds - 1e-9) + hold + 1


def text_decoder(folder: Path, config) -> Callable[[Sequence[int]], str]:
    """Text ids to text as training encoded them (model/train/text.py): the backbone's
    tokenizer.json when it has one, else bytes; ids it cannot decode as ⟨id⟩."""
    path = folder / str(config.backbone) / "tokenizer.json"
    if path.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        return lambda ids: _printable(tok.decode([int(i) for i in ids]))

    def decode(ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(int(i))
                continue
            out.append(run.decode("utf-8", "replace"))
            run = bytearray()
            out.append(f"⟨{int(i)}⟩")
        out.append(run.decode("utf-8", "replace"))
        return _printable("".join(out))

    return decode


def _printable(s: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in s)


def _user_channel(manifest: Path, entry: DialogueEntry) -> np.ndarray:
    from .audio import read_channel

    return read_channel(manifest, entry.user_audio, entry.user_channel)


# ---- scoring ------------------------------------------------------------------------------

def score(runs: Sequence[DialogueRun], chunk_seconds: float, *, tolerance: float = 0.6, hold: int = 2,
          limit: float = LIMIT) -> dict:
    """Outcomes and summaries at two resolutions: `chunk` (a step is a chunk: what the
    model decides per step) and `code` (a step is one speech code: the paper's tokens)."""
    out: dict = {"turn_taking": {}, "interruption": {"onsets": sum(len(interrupt_onsets(r.entry)) for r in runs)},
                 "events": []}
    for res, per in (("chunk", 1), ("code", runs[0].speech.shape[1])):
        step = chunk_seconds / per
        turns, stops = [], []
        for r in runs:
            x = r.speaking(per_code=res == "code")
            for start, end in turn_events(r.entry):
                o = turn_taking(x, step, start, end, tolerance=tolerance, limit=limit)
                turns.append(o)
                out["events"].append({"dialogue": r.entry.id, "kind": "turn", "at": end, "res": res, **_event(o)})
            for onset in interrupt_onsets(r.entry):
                o = interruption(x, step, onset, hold=hold * per, limit=limit)
                stops += [o] if o is not None else []
                out["events"].append({"dialogue": r.entry.id, "kind": "interrupt", "at": onset, "res": res,
                                      "model_speaking": o is not None, **(_event(o) if o else {})})
        out["turn_taking"][res] = summarize(turns, step)
        out["interruption"][res] = summarize(stops, step)
    return out


def reference_run(run: DialogueRun, chunk_seconds: float) -> DialogueRun:
    """The manifest's own assistant as if it were the model: a speech code speaks when its
    middle falls inside an assistant turn (backchannels too). What imitating the data's
    timing exactly would score: the ceiling the data sets at this resolution."""
    n, per = run.speech.shape
    mid = (np.arange(n * per) + 0.5) * chunk_seconds / per
    on = np.zeros(n * per, bool)
    for t in run.entry.turns:
        if t.speaker == "assistant":
            on |= (mid >= t.start) & (mid < t.end)
    return DialogueRun(run.entry, np.zeros(0, np.float32), np.where(on, 0, -1).reshape(n, per), np.zeros((n, 0)))


def _event(o: Outcome) -> dict:
    return {"ms": None if o.seconds is None else round(o.seconds * 1000, 1), "steps": o.steps,
            "success": o.success, "over_talk": o.over_talk}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f} ms"


def format_table(report: dict) -> str:
    """The markdown table beside the paper's figures, and what it counted."""
    tt, it = report["turn_taking"], report["interruption"]
    head = ("| | k counts | turn-taking events | " + " | ".join(f"Acc@{k}" for k in KS) + " | mean response | "
            "interruption events | " + " | ".join(f"Acc@{k}" for k in KS) + " | mean stop |")
    lines = [head, "|" + "---|" * 14]
    ref = report["reference"]
    for who, res, name in (("this model", "chunk", "chunks"), ("this model", "code", "speech codes"),
                           ("the data's own assistant", "chunk", "chunks")):
        t, s = (tt, it) if who == "this model" else (ref["turn_taking"], ref["interruption"])
        t, s = t[res], s[res]
        ks = ", ".join(f"{k * t['step_ms']:g}" for k in KS)
        unit = f"{name} of {t['step_ms']:g} ms (k = {ks} ms)"
        lines.append(f"| {who} | {unit} | {t['events']} | " + " | ".join(_pct(t["acc"][str(k)]) for k in KS)
                     + f" | {_ms(t['mean_ms'])} | {s['events']} of {it['onsets']} onsets | "
                     + " | ".join(_pct(s["acc"][str(k)]) for k in KS) + f" | {_ms(s['mean_ms'])} |")
    for name, p in PAPER.items():
        lines.append(f"| {name} (paper) | tokens | — | " + " | ".join(f"{a:.1f} %" for a in p["turn_acc"])
                     + f" | {p['turn_ms']} ms | — | " + " | ".join(f"{a:.1f} %" for a in p["interrupt_acc"])
                     + f" | {p['interrupt_ms']} ms |")
    t, s = tt["chunk"], it["chunk"]
    lines += ["", f"{report['dialogues']} dialogues, chunk {report['chunk_seconds'] * 1000:g} ms. "
              f"Per chunk: turn-taking "
              f"{t['successes']} of {t['events']} answered within {report['limit_s']:g} s; spoke over the user "
              f"(a run over {report['overlap_tolerance_s']:g} s inside the user's turn) {t['over_talk']}; no answer "
              f"within {report['limit_s']:g} s {t['none_within_limit']}. Interruption: the model was speaking at "
              f"{s['events']} of {it['onsets']} user onsets (the events); stopped (silent for "
              f"{report['stop_hold_chunks']} chunks) within {report['limit_s']:g} s at {s['successes']}."]
    return "\n".join(lines)


# ---- the run ------------------------------------------------------------------------------

def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise EvalError("torch sees no CUDA device; use --device cpu")
    return choice


async def evaluate(model: str | Path, manifest: str | Path, *, limit: int | None = None, out: str | Path | None = None,
                   device: str = "cpu", example: str | None = None, tolerance: float = 0.6, hold: int = 2,
                   progress: Callable[[str], None] | None = None) -> EvalResult:
    from prometheus_client import CollectorRegistry

    from ..checkpoint import load_model
    from ..engine import Engine
    from ..voice import LocalVoiceEngine
    from .manifest import read_manifest

    model, manifest = Path(model), Path(manifest)
    dialogues = [e for e in read_manifest(manifest) if isinstance(e, DialogueEntry)][:limit]
    if not dialogues:
        raise EvalError(f"{manifest}: no dialogues to evaluate")
    if example is not None and example not in {d.id for d in dialogues}:
        raise EvalError(f"--example {example!r} is not among the dialogues evaluated")
    example = example or dialogues[0].id
    loaded = load_model(model, device=device)
    if loaded.tokenizer is None:
        raise EvalError(f"{model} has no tokenizer/: the model cannot hear the caller")
    # One slot, admitted by slots alone, no warm-up: nothing here runs on the caller's clock.
    engine = Engine(loaded.model, 1, tokenizer=loaded.tokenizer, registry=CollectorRegistry(), headroom=None,
                    warmup=False)
    voice = LocalVoiceEngine(engine, loaded.tokenizer, loaded.decoder)
    await voice.start()
    period = engine.period
    extra = tail_chunks(period, hold)
    runs: list[DialogueRun] = []
    try:
        for i, entry in enumerate(dialogues, 1):
            t0 = time.perf_counter()
            user = _user_channel(manifest, entry)
            n = math.ceil(entry.duration / period - 1e-9) + extra
            session = await voice.open_session()
            try:
                chunks = await stream_dialogue(session, user, n)
            finally:
                session.close()
            keep = entry.id == example
            speech = np.array([c.speech_codes for c in chunks], np.int64)
            text = np.array([c.text_ids for c in chunks], np.int64).reshape(n, len(chunks[0].text_ids))  # two-stream: 0
            runs.append(DialogueRun(entry, user if keep else np.zeros(0, np.float32), speech, text,
                                    np.concatenate([c.pcm for c in chunks]) if keep else None))
            if progress is not None:
                progress(f"dialogue {i}/{len(dialogues)} {entry.id}: {n} chunks in {time.perf_counter() - t0:.1f} s")
    finally:
        await voice.close()
    report = {"model": str(model), "manifest": str(manifest), "dialogues": len(runs), "chunk_seconds": period,
              "codes_per_chunk": int(runs[0].speech.shape[1]), "limit_s": LIMIT, "overlap_tolerance_s": tolerance,
              "stop_hold_chunks": hold, "tail_chunks": extra, **score(runs, period, tolerance=tolerance, hold=hold),
              "paper": PAPER}
    ref = score([reference_run(r, period) for r in runs], period, tolerance=tolerance, hold=hold)
    report["reference"] = {k: ref[k] for k in ("turn_taking", "interruption")}
    decode = text_decoder(model, loaded.model.config)
    silent = loaded.model.vocab.silent_text
    ex = next(r for r in runs if r.entry.id == example)
    report["example"] = {"dialogue": example,
                         "text": decode([int(t) for t in ex.text.reshape(-1) if t != silent])}
    table = format_table(report)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_example(out, ex, period, loaded.decoder.sample_rate, decode, silent, model.name)
        report["example"].update(wav="example.wav", png="example.png")
        (out / "turns.md").write_text(f"# Turn-taking: {model}\n\n{table}\n\nExample {example}, the assistant's "
                                      f"text: {report['example']['text']!r}\n", encoding="utf-8")
        (out / "turns.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return EvalResult(report, runs, table)


def _write_example(out: Path, run: DialogueRun, period: float, rate: int, decode, silent: int, name: str) -> None:
    """example.wav (caller left, the model's audio right, 16 kHz, the dialogue's length)
    and example.png (the timeline)."""
    from math import gcd

    from scipy.io import wavfile
    from scipy.signal import resample_poly

    from .eval_png import timeline

    g = gcd(rate, SAMPLE_RATE)
    assistant = resample_poly(run.pcm, SAMPLE_RATE // g, rate // g) if rate != SAMPLE_RATE else run.pcm
    n = len(run.user)
    stereo = np.zeros((n, 2), np.float32)
    stereo[:, 0] = run.user
    m = min(n, len(assistant))
    stereo[:m, 1] = assistant[:m]
    # x 32768 as read_audio divides: a PCM16 caller channel comes back bit for bit.
    wavfile.write(out / "example.wav", SAMPLE_RATE, np.clip(np.round(stereo * 32768), -32768, 32767).astype(np.int16))
    e = run.entry
    texts = [decode([int(t) for t in row if t != silent]) if (row != silent).any() else "" for row in run.text]
    timeline(out / "example.png", title=f"{e.id} ({e.pattern or 'no pattern'}), model {name}: chunks of "
             f"{period * 1000:g} ms", duration=n / SAMPLE_RATE, user=run.user, sample_rate=SAMPLE_RATE,
             chunk_seconds=period, speaking=run.speaking(), texts=texts,
             turns=[(t.speaker, t.start, t.end, t.backchannel) for t in e.turns],
             turn_ends=[end for _, end in turn_events(e)], onsets=interrupt_onsets(e))


# ---- the command line ---------------------------------------------------------------------

def add_eval_parser(eval_subparsers) -> argparse.ArgumentParser:
    """`turns` under `duplexline eval` (bridge/cli.py passes the eval command's subparsers)."""
    p = eval_subparsers.add_parser(
        "turns", help="turn-taking and interruption metrics (the paper's Acc@k) through the streaming engine",
        description="Feed each dialogue's caller channel to the model's engine chunk by chunk as a call does, "
        "and measure when the assistant takes the turn and when it stops on an interruption "
        "(docs/training.md, 'Evaluating turn-taking').")
    p.add_argument("--model", required=True, metavar="FOLDER", help="the model folder to evaluate")
    p.add_argument("--manifest", required=True, metavar="M",
                   help="a dialogue manifest (e.g. data synth's manifest.jsonl)")
    p.add_argument("--limit", type=_positive, default=None, metavar="N", help="the first N dialogues only")
    p.add_argument("--out", metavar="DIR", help="write turns.md, turns.json, example.wav and example.png here")
    p.add_argument("--example", metavar="ID", help="the dialogue for example.wav/png (default: the first)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default auto (CUDA when available)")
    p.add_argument("--overlap-tolerance", type=_seconds, default=0.6, metavar="S",
                   help="seconds the assistant may speak inside the user's turn in one run (a backchannel) "
                   "before it counts as speaking over the user (default 0.6)")
    p.add_argument("--stop-hold", type=_positive, default=2, metavar="N",
                   help="chunks of silence that make a stop (default 2)")
    p.set_defaults(func=run)
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from ..errors import ModelError
    from .audio import AudioError
    from .manifest import ManifestError

    try:
        result = asyncio.run(evaluate(args.model, args.manifest, limit=args.limit, out=args.out,
                                      device=_device(args.device), example=args.example,
                                      tolerance=args.overlap_tolerance, hold=args.stop_hold,
                                      progress=lambda line: print(line, file=sys.stderr, flush=True)))
    except (EvalError, ModelError, ManifestError, AudioError, OSError) as exc:
        print(f"duplexline: {exc}", file=sys.stderr)
        return 2
    print(result.table)
    if args.out is not None:
        print(f"\nwrote turns.md, turns.json, example.wav and example.png to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train.eval_turns")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["turns", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
