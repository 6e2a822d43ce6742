"""`duplexline data synth`: synthetic two-channel phone dialogues for training.

    duplexline data synth --out DIR [--count N] [--seed S] [--dialogues FILE]
        [--patterns respond=1,interrupt=1,wait=1] [--snr 15,30|off] [--noise white,pink]
        [--law ulaw|alaw|none] [--backchannel P] [--gap|--pause|--cut LOW,HIGH] [--jobs N]

Writes DIR/audio/ID.wav (stereo 16 kHz PCM16: left the caller after the phone line, right
the assistant), one DIR/manifest.jsonl line per dialogue (docs/training.md) and
DIR/synth.json (the settings). Resumable: dialogue ids are `s{seed}-{index:06d}` and
every dialogue depends only on (seed, index), so a rerun skips the ids the manifest
already holds and writes the rest; a rerun with other settings is refused, not mixed in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Light imports only: the command line builds every parser at start-up. numpy, scipy and
# the synthesis modules are imported when the command runs.
from .data_errors import DataError
from .data_manifest import LAWS, NOISES, PATTERNS, append_record, read_manifest

__all__ = ["add_arguments", "add_synth_parser", "run_synth", "synth"]

DEFAULT_COUNT = 100
# The defaults of SynthConfig (data_render), repeated so that building the parser needs no
# numpy; tests/unit/test_data_synth.py checks they agree.
DEFAULT_PATTERNS = "respond=1,interrupt=1,wait=1"
DEFAULT_SNR = "15,30"
DEFAULT_NOISE = "white,pink"
DEFAULT_BACKCHANNEL = 0.2
DEFAULT_TIMING = {"gap": (0.2, 0.8), "pause": (0.5, 1.5), "cut": (0.2, 0.6)}  # data_layout.Timing's
MANIFEST = "manifest.jsonl"
SETTINGS = "synth.json"


# -- the command line -------------------------------------------------------------------

def _patterns(text: str) -> tuple[tuple[str, float], ...]:
    out = {}
    for item in text.split(","):
        name, eq, weight = item.partition("=")
        name = name.strip()
        if name not in PATTERNS or not eq:
            raise argparse.ArgumentTypeError(f"{item!r}: give NAME=WEIGHT with NAME one of {', '.join(PATTERNS)}")
        try:
            out[name] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be a number") from None
        if not out[name] >= 0:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be 0 or more")
    if not sum(out.values()) > 0:
        raise argparse.ArgumentTypeError("at least one pattern needs a weight above 0")
    return tuple((p, out[p]) for p in PATTERNS if p in out)


def _snr(text: str) -> tuple[float, float] | None:
    if text == "off":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give LOW,HIGH in dB (e.g. 15,30) or off") from None
    if not -20 <= lo <= hi <= 80:
        raise argparse.ArgumentTypeError(f"{text!r}: need -20 <= LOW <= HIGH <= 80")
    return lo, hi


def _span(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give LOW,HIGH in seconds (e.g. 0.2,0.8)") from None
    if not 0 <= lo <= hi <= 10:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LOW <= HIGH <= 10 seconds")
    return lo, hi


def _noises(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(","))
    if not kinds or any(k not in NOISES for k in kinds):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {', '.join(NOISES)}")
    return kinds


def _probability(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not 0 <= p <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a probability from 0 to 1")
    return p


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of 1 or more")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `duplexline data synth`."""
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: audio/ID.wav, manifest.jsonl, synth.json (created; a rerun resumes)")
    parser.add_argument("--count", type=_positive, default=None, metavar="N",
                        help=f"dialogues to write (default {DEFAULT_COUNT}; with --dialogues, one per dialogue "
                        "in the file; more cycles through it in new voices and timings)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; ids are s{SEED}-{INDEX} (default 0)")
    parser.add_argument("--dialogues", metavar="FILE", default=None,
                        help='JSONL of text dialogues, one per line: {"turns": [{"speaker": "user"|"assistant", '
                        '"text": "..."}, ...]} (default: the built-in templates)')
    parser.add_argument("--patterns", type=_patterns, default=_patterns(DEFAULT_PATTERNS), metavar="P=W,...",
                        help=f"timing patterns and their weights (default {DEFAULT_PATTERNS})")
    parser.add_argument("--snr", type=_snr, default=_snr(DEFAULT_SNR), metavar="LOW,HIGH",
                        help="noise on the caller's channel at a random SNR in this range, dB over active "
                        f"speech (default {DEFAULT_SNR}); off: no noise")
    parser.add_argument("--noise", type=_noises, default=_noises(DEFAULT_NOISE), metavar="KINDS",
                        help=f"noise kinds drawn from (default {DEFAULT_NOISE})")
    parser.add_argument("--law", choices=(*LAWS, "none"), default="ulaw",
                        help="the caller's phone line: 8 kHz G.711 u-law or A-law, or none (default ulaw)")
    parser.add_argument("--backchannel", type=_probability, default=DEFAULT_BACKCHANNEL, metavar="P",
                        help="chance of a backchannel (mhm, okay, ...) on the other channel during a turn "
                        f"segment of 2 s or more (default {DEFAULT_BACKCHANNEL})")
    for name, help_text in (("gap", "from one speaker's end to the other's start"),
                            ("pause", "wait pattern: the caller's pause mid-turn"),
                            ("cut", "interrupt pattern: from the caller's onset to the assistant's stop")):
        default = DEFAULT_TIMING[name]
        parser.add_argument(f"--{name}", type=_span, default=default, metavar="LOW,HIGH",
                            help=f"{help_text}, seconds drawn uniformly (default {default[0]},{default[1]})")
    parser.add_argument("--jobs", type=_positive, default=min(4, os.cpu_count() or 1), metavar="N",
                        help="dialogues synthesised at once (threads; default: CPUs, at most 4)")


def add_synth_parser(data_subparsers) -> argparse.ArgumentParser:
    """`synth` under a `data` command's subparsers, wired to `synth`."""
    parser = data_subparsers.add_parser(
        "synth", help="write synthetic two-channel phone dialogues for training",
        description="Speak text dialogues with espeak-ng in the paper's three timing patterns, add noise "
        "and the phone line on the caller's side, and write stereo WAVs plus a manifest (docs/training.md).")
    add_arguments(parser)
    parser.set_defaults(func=synth)
    return parser


def synth(args: argparse.Namespace) -> int:
    """Run `duplexline data synth`; exit status 0, or 2 with a message on bad input."""
    from .data_dialogues import load_dialogues
    from .data_layout import Timing
    from .data_render import SynthConfig
    from .data_speech import require_espeak

    try:
        require_espeak()
        dialogues = load_dialogues(args.dialogues) if args.dialogues else None
        config = SynthConfig(seed=args.seed, patterns=args.patterns, snr=args.snr, noises=args.noise,
                             law=None if args.law == "none" else args.law, backchannel=args.backchannel,
                             timing=Timing(gap=args.gap, pause=args.pause, cut=args.cut))
        count = args.count or (len(dialogues) if dialogues else DEFAULT_COUNT)
        started = time.monotonic()
        written, skipped = run_synth(Path(args.out), count, config, dialogues,
                                     dialogues_digest=_digest(args.dialogues), jobs=args.jobs)
    except DataError as exc:
        print(f"duplexline data synth: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output folder: permissions, a full disk
        print(f"duplexline data synth: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written} dialogues ({skipped} already there) to {Path(args.out) / MANIFEST} "
          f"in {time.monotonic() - started:.1f} s")
    return 0


def _digest(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None


# -- the run ----------------------------------------------------------------------------

def run_synth(out: Path, count: int, config, dialogues=None, *, dialogues_digest: str | None = None,
              jobs: int = 1, progress: bool = True) -> tuple[int, int]:
    """Write dialogues 0..count-1 (a `data_render.SynthConfig`, optional text dialogues)
    not already in `out`; return (written, skipped)."""
    from . import data_render
    from .data_render import dialogue_id

    (out / "audio").mkdir(parents=True, exist_ok=True)
    _check_settings(out / SETTINGS, {"version": 1, "config": config.describe(),
                                     "dialogues_sha256": dialogues_digest})
    manifest = out / MANIFEST
    done = {r["id"] for r in read_manifest(manifest, repair=True)} if manifest.exists() else set()
    todo = [i for i in range(count) if dialogue_id(config.seed, i) not in done]
    bar = _Progress(count, count - len(todo), progress)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        # Small batches: memory stays bounded and Ctrl-C waits for one batch only. map keeps
        # index order, so the manifest is in order and a killed run loses only a suffix.
        for first in range(0, len(todo), 4 * jobs):
            batch = todo[first : first + 4 * jobs]
            for result in pool.map(lambda i: data_render.synthesize(i, config, dialogues), batch):
                rel = f"audio/{result.id}.wav"
                _write_wav(out / rel, result.stereo, result.record["sample_rate"])
                rec = result.record
                append_record(manifest, {"version": rec["version"], "id": rec["id"], "audio": rel, **rec})
                bar.step()
    bar.close()
    return len(todo), count - len(todo)


def _check_settings(path: Path, settings: dict) -> None:
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable ({exc}); remove it only if the folder is yours to redo") from None
        now = json.loads(json.dumps(settings))  # tuples become lists, as in the file
        if before != now:
            was, is_ = before.get("config", {}), now["config"]
            keys = [k for k in sorted(set(was) | set(is_)) if was.get(k) != is_.get(k)]
            if before.get("dialogues_sha256") != now["dialogues_sha256"]:
                keys.append("dialogues")
            raise DataError(f"{path.parent} holds dialogues made with other settings (differing: "
                            f"{', '.join(keys) or 'version'}); use another --out, or the same settings to resume")
        return
    path.write_text(json.dumps(settings, indent=1) + "\n")


def _write_wav(path: Path, stereo, rate: int) -> None:
    tmp = path.with_suffix(".wav.part")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(stereo.astype("<i2").tobytes())
    os.replace(tmp, path)  # whole or absent: a killed run never leaves half a file


class _Progress:
    """tqdm when installed, else one stderr line per dialogue with an ETA."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._total, self._n, self._enabled = total, initial, enabled
        self._first, self._started, self._bar = initial, time.monotonic(), None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, initial=initial, unit="dialogue", file=sys.stderr)

    def step(self) -> None:
        self._n += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self._enabled:
            rate = (self._n - self._first) / max(time.monotonic() - self._started, 1e-9)
            print(f"\r{self._n}/{self._total} dialogues, ETA {(self._total - self._n) / rate:.0f} s",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled and self._n > self._first:
            print(file=sys.stderr)
