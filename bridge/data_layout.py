"""Timing of a synthetic dialogue: where each spoken clip goes on the two channels.

The paper's three patterns (OmniFlatten, arXiv 2410.17799, section on dialogue data):

    respond    every turn starts a gap (`Timing.gap`) after the other speaker's turn ends
    interrupt  the user starts speaking while the assistant speaks; the assistant's audio
               is cut `Timing.cut` after the user's onset (both channels active in between;
               onset and cut fall where the assistant is audible, and the user is still
               speaking at the cut, so the audio holds what the times claim)
    wait       the user's turn is split at a word boundary with a pause (`Timing.pause`);
               the assistant answers only after the second part

A dialogue's pattern applies wherever it can: every assistant turn long enough and
followed by a user turn is interrupted; every user turn of four words or more is split.
Where it applies nowhere (short turns in a user's file) the dialogue is laid out as
`respond` and says so. Backchannels ("mhm", ...) go on the other channel inside long
turn segments, away from that channel's own speech. Times are in samples at `RATE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .data_dialogues import Dialogue
from .data_manifest import PATTERNS
from .data_speech import RATE, TRIM_DB

__all__ = ["BACKCHANNELS", "PATTERNS", "Layout", "Placed", "Timing", "lay_out", "render"]

BACKCHANNELS = ("mhm", "okay", "right", "uh-huh", "I see", "yeah")

Speak = Callable[[str, str], np.ndarray]  # (speaker, text) -> float32 clip at RATE


@dataclass(frozen=True)
class Timing:
    """Ranges in seconds, each drawn uniformly per use."""

    lead: tuple[float, float] = (0.3, 0.8)  # silence before the first turn
    gap: tuple[float, float] = (0.2, 0.8)  # from one speaker's end to the other's start
    pause: tuple[float, float] = (0.5, 1.5)  # wait: the user's mid-turn pause
    cut: tuple[float, float] = (0.2, 0.6)  # interrupt: user onset to the assistant's cut
    interrupt_at: tuple[float, float] = (0.3, 0.7)  # interrupt: onset as a share of the turn
    min_before_interrupt: float = 0.5  # the assistant has spoken this long at the onset
    tail: float = 0.5  # silence after the last turn
    backchannel_min: float = 2.0  # a segment this long may get a backchannel
    backchannel_margin: float = 0.3  # clear of the segment's edges and the channel's speech
    fade: float = 0.01  # fade-out at a cut, so the cut is not a click


@dataclass
class Placed:
    """One turn (or backchannel) on the timeline."""

    speaker: str
    text: str
    segments: list[tuple[int, int, str]]  # (start, end, text spoken) in samples
    planned_end: int | None = None  # interrupted: where the uncut speech would have ended
    backchannel: bool = False

    @property
    def start(self) -> int:
        return self.segments[0][0]

    @property
    def end(self) -> int:
        return self.segments[-1][1]


@dataclass
class Layout:
    turns: list[Placed]  # by start time
    clips: list[tuple[str, int, np.ndarray]] = field(repr=False)  # (speaker, start, audio)
    pattern: str  # the pattern the audio holds
    samples: int  # the dialogue's length


def _s(seconds: float) -> int:
    return int(round(seconds * RATE))


def _draw(rng: np.random.Generator, span: tuple[float, float]) -> int:
    return _s(rng.uniform(*span))


def lay_out(dialogue: Dialogue, pattern: str, speak: Speak, rng: np.random.Generator,
            timing: Timing = Timing(), backchannel: float = 0.0) -> Layout:
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    turns = dialogue.turns
    placed: list[Placed] = []
    clips: list[tuple[str, int, np.ndarray]] = []
    applied = False
    next_start: int | None = None  # set by an interruption: the user's onset
    for i, turn in enumerate(turns):
        if not placed:
            start = _draw(rng, timing.lead)
        elif next_start is not None:
            start = next_start
        else:
            start = placed[-1].end + _draw(rng, timing.gap)
        next_start = None
        split = _split(turn.text, rng) if pattern == "wait" and turn.speaker == "user" else None
        if split:
            a, b = speak("user", split[0]), speak("user", split[1])
            second = start + len(a) + _draw(rng, timing.pause)
            clips += [("user", start, a), ("user", second, b)]
            placed.append(Placed("user", turn.text, [(start, start + len(a), split[0]),
                                                    (second, second + len(b), split[1])]))
            applied = True
            continue
        audio = speak(turn.speaker, turn.text)
        end, planned_end = start + len(audio), None
        following = turns[i + 1] if i + 1 < len(turns) else None
        if pattern == "interrupt" and turn.speaker == "assistant" and following and following.speaker == "user":
            # the user must still be speaking when the assistant stops
            talk = len(speak(following.speaker, following.text)) - _s(0.1)
            plan = _interruption(audio, talk, rng, timing)
            if plan:
                onset, cut = plan
                audio = _fade_out(audio[:cut], _s(timing.fade))
                planned_end, end, next_start = end, start + cut, start + onset
                applied = True
        clips.append((turn.speaker, start, audio))
        placed.append(Placed(turn.speaker, turn.text, [(start, end, turn.text)], planned_end))
    if backchannel > 0:
        _add_backchannels(placed, clips, speak, rng, timing, backchannel)
    placed.sort(key=lambda p: (p.start, p.speaker))
    samples = max(p.end for p in placed) + _s(timing.tail)
    return Layout(placed, clips, pattern if applied or pattern == "respond" else "respond", samples)


def render(layout: Layout) -> dict[str, np.ndarray]:
    """Both channels as float32 at RATE (full scale 1.0), clips summed into silence."""
    out = {"user": np.zeros(layout.samples, np.float32), "assistant": np.zeros(layout.samples, np.float32)}
    for speaker, start, audio in layout.clips:
        out[speaker][start : start + len(audio)] += audio
    return out


def _split(text: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """Split at a word boundary in the middle third, two words at least on each side."""
    words = text.split()
    if len(words) < 4:
        return None
    lo, hi = max(2, len(words) // 3), min(len(words) - 2, -(-2 * len(words) // 3))
    k = int(rng.integers(lo, max(lo, hi) + 1))
    return " ".join(words[:k]), " ".join(words[k:])


def _interruption(audio: np.ndarray, talk: int, rng: np.random.Generator,
                  timing: Timing) -> tuple[int, int] | None:
    """(onset, cut) in samples from the assistant turn's start, both where the assistant
    is audibly speaking (not in a pause between words, which would make the cut a lie),
    the cut at most `talk` after the onset; None if the turns are too short for that."""
    lo = _s(timing.min_before_interrupt)
    hi = len(audio) - _s(timing.cut[1]) - _s(0.1)
    if hi < lo:
        return None
    speaking = _speaking(audio)
    longest = min(timing.cut[1], talk / RATE)
    if longest < timing.cut[0]:
        return None
    for _ in range(20):
        onset = int(np.clip(round(rng.uniform(*timing.interrupt_at) * len(audio)), lo, hi))
        cut = onset + _draw(rng, (timing.cut[0], longest))
        if speaking[onset // _FRAME] and speaking[(cut - 1) // _FRAME]:
            return onset, cut
    return None


_FRAME = RATE // 100


def _speaking(audio: np.ndarray) -> np.ndarray:
    """Per 10 ms frame of a clip: within TRIM_DB of its loudest (as the clip was trimmed)."""
    n = -(-len(audio) // _FRAME)
    padded = np.zeros(n * _FRAME, np.float64)
    padded[: len(audio)] = audio
    energy = np.square(padded).reshape(n, _FRAME).mean(1)
    return energy > energy.max() * 10 ** (-TRIM_DB / 10)


def _fade_out(audio: np.ndarray, n: int) -> np.ndarray:
    audio = audio.copy()
    n = min(n, len(audio))
    audio[len(audio) - n :] *= np.linspace(1.0, 0.0, n, dtype=np.float32)
    return audio


def _add_backchannels(placed: list[Placed], clips: list, speak: Speak, rng: np.random.Generator,
                      timing: Timing, probability: float) -> None:
    margin, busy = _s(timing.backchannel_margin), {"user": [], "assistant": []}
    for p in placed:
        busy[p.speaker] += [(s, e) for s, e, _ in p.segments]
    for p in list(placed):
        other = "assistant" if p.speaker == "user" else "user"
        for s, e, _ in p.segments:
            if e - s < _s(timing.backchannel_min) or rng.uniform() >= probability:
                continue
            word = BACKCHANNELS[int(rng.integers(0, len(BACKCHANNELS)))]
            audio = speak(other, word)
            at = s + int(rng.uniform(0.4, 0.7) * (e - s)) - len(audio) // 2
            end = at + len(audio)
            clear = all(end + margin <= bs or at - margin >= be for bs, be in busy[other])
            if at - margin < s or end + margin > e or not clear:
                continue
            busy[other].append((at, end))
            clips.append((other, at, audio))
            placed.append(Placed(other, word, [(at, end, word)], backchannel=True))
