"""One synthetic dialogue, start to finish: text, voices, timing, levels, noise, the line.

Everything random comes from one generator seeded with (seed, index), so dialogue `index`
of a run is the same whatever else the run did: a resumed run writes what an unbroken one
would have, and the id names the dialogue exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .data_channel import add_noise, phone_line, set_level, to_int16
from .data_dialogues import Dialogue
from .data_layout import PATTERNS, Layout, Timing, lay_out, render
from .data_manifest import VERSION
from .data_speech import ASSISTANT_VOICE, RATE, speak, user_voice
from .data_templates import template_dialogue

__all__ = ["SynthConfig", "Synthesized", "dialogue_id", "synthesize"]

PEAK = 0.9  # headroom after noise: scale speech and noise together (the SNR stays)


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    patterns: tuple[tuple[str, float], ...] = (("respond", 1.0), ("interrupt", 1.0), ("wait", 1.0))
    snr: tuple[float, float] | None = (15.0, 30.0)  # dB range, None: no noise
    noises: tuple[str, ...] = ("white", "pink")
    law: str | None = "ulaw"  # None: no phone line (16 kHz straight through)
    backchannel: float = 0.2  # chance per long turn segment
    user_level: tuple[float, float] = (-28.0, -18.0)  # active RMS, dBFS
    assistant_level: float = -22.0
    timing: Timing = field(default_factory=Timing)

    def describe(self) -> dict:
        """Everything that shapes the output, as JSON: a resumed run must match it."""
        return asdict(self)


@dataclass
class Synthesized:
    id: str
    stereo: np.ndarray  # (samples, 2) int16: user (after the line), assistant
    record: dict  # the manifest line, less "audio"
    layout: Layout
    user_clean: np.ndarray  # float32, before noise
    user_noisy: np.ndarray  # float32, speech + noise, before the line
    assistant: np.ndarray  # float32


def dialogue_id(seed: int, index: int) -> str:
    return f"s{seed}-{index:06d}"


def synthesize(index: int, config: SynthConfig, dialogues: list[Dialogue] | None = None,
               pattern: str | None = None) -> Synthesized:
    """Dialogue `index`: from `dialogues` (cycled) or the built-in templates. `pattern`
    forces one (tests); by default it is drawn with the configured weights."""
    rng = np.random.default_rng([config.seed, index])
    names = [p for p, _ in config.patterns]
    weights = np.array([w for _, w in config.patterns], np.float64)
    drawn = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    pattern = pattern or drawn
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}")
    dialogue = dialogues[index % len(dialogues)] if dialogues else template_dialogue(rng)
    caller = user_voice(rng)
    voices = {"user": caller, "assistant": ASSISTANT_VOICE}
    layout = lay_out(dialogue, pattern, lambda who, text: speak(text, voices[who]), rng,
                     config.timing, config.backchannel)
    channels = render(layout)
    user = set_level(channels["user"], rng.uniform(*config.user_level))
    noisy, snr, kind = user, None, None
    if config.snr is not None:
        snr = float(rng.uniform(*config.snr))
        kind = config.noises[int(rng.integers(0, len(config.noises)))]
        noisy, _ = add_noise(user, snr, kind, rng)
    peak = float(np.abs(noisy).max())
    if peak > PEAK:
        user, noisy = user * (PEAK / peak), noisy * (PEAK / peak)
    assistant = set_level(channels["assistant"], config.assistant_level)
    assistant = assistant * min(1.0, PEAK / max(float(np.abs(assistant).max()), 1e-9))
    line = to_int16(noisy)
    if config.law is not None:
        line = phone_line(line, config.law)
    stereo = np.stack([line, to_int16(assistant)], axis=1)
    ident = dialogue_id(config.seed, index)
    record = {
        "version": VERSION,
        "id": ident,
        "channels": {"user": 0, "assistant": 1},
        "sample_rate": RATE,
        "duration": round(layout.samples / RATE, 4),
        "pattern": layout.pattern,
        "snr_db": None if snr is None else round(snr, 2),
        "noise": kind,
        "line": config.law,
        "source": dialogue.source,
        "voices": {who: v.describe() for who, v in voices.items()},
        "turns": [_turn_record(p) for p in layout.turns],
    }
    return Synthesized(ident, stereo, record, layout, user, noisy.astype(np.float32), assistant)


def _sec(samples: int) -> float:
    return round(samples / RATE, 4)


def _turn_record(p) -> dict:
    out = {"speaker": p.speaker, "text": p.text, "start": _sec(p.start), "end": _sec(p.end),
           "segments": [{"start": _sec(s), "end": _sec(e), "text": t} for s, e, t in p.segments]}
    if p.planned_end is not None:
        out["planned_end"] = _sec(p.planned_end)
    if p.backchannel:
        out["backchannel"] = True
    return out
