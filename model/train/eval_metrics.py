"""The paper's turn-taking metrics (OmniFlatten, arXiv 2410.17799), on the assistant's
speaking sequence: one bool per step of the model's token clock, step `i` covering
`[i*step, (i+1)*step)` seconds of the dialogue (a chunk, or one speech code). Definitions
in docs/training.md, "Evaluating turn-taking"; this module is their executable form.

- Turn-taking, at a user turn `[start, end]` the assistant should answer: the response
  is the first speaking step from `e = floor(end / step)` (the step holding the user's
  end) on; its time `max(0, i*step - end)`, its steps `i - e`. Speaking over the user: a
  run of speaking steps holding more than `tolerance` seconds of steps wholly inside
  the turn (a backchannel is shorter; a run begun before the turn counts too).
- Interruption, at a user onset `o`: an event only when the assistant speaks in the last
  step starting before `o`. The stop is the first step from `s = floor(o / step)` on that
  starts `hold` silent steps (or silence to the end of the run); its time
  `max(0, i*step - o)`, its steps `i - s`.
- Either succeeds when found within `limit` (1.5 s) and, for turn-taking, without
  speaking over the user; Acc@k = successes with fewer than k steps / all events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .manifest import DialogueEntry

__all__ = ["KS", "LIMIT", "Outcome", "turn_taking", "interruption", "summarize", "turn_events",
           "interrupt_onsets"]

KS = (1, 5, 10, 25)
LIMIT = 1.5  # seconds: a slower response (or stop) is a failure, as in the paper
_EPS = 1e-6  # times on step boundaries must not fall into the step before by rounding


@dataclass(frozen=True)
class Outcome:
    """One event: `at` the user's end (turn-taking) or onset (interruption); `seconds`
    and `steps` to the response or stop (None: none in the run)."""

    at: float
    seconds: float | None
    steps: int | None
    success: bool
    over_talk: bool = False  # turn-taking only: spoke over the user


def _floor(t: float, step: float) -> int:
    return math.floor(t / step + _EPS)


def _runs(x: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every run of True."""
    edges = np.diff(np.concatenate([[0], x.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def turn_taking(speaking: Sequence[bool], step: float, start: float, end: float, *, tolerance: float = 0.6,
                limit: float = LIMIT) -> Outcome:
    x = np.asarray(speaking, dtype=bool)
    first_in = math.ceil(start / step - _EPS)  # the first step wholly inside the turn
    e = _floor(end, step)  # steps before it end by the user's end
    over = any((min(b, e) - max(a, first_in)) * step > tolerance + _EPS for a, b in _runs(x))
    hits = np.flatnonzero(x[e:])
    if not len(hits):
        return Outcome(end, None, None, False, over)
    i = e + int(hits[0])
    seconds = max(0.0, i * step - end)
    return Outcome(end, seconds, i - e, not over and seconds <= limit + _EPS, over)


def interruption(speaking: Sequence[bool], step: float, onset: float, *, hold: int,
                 limit: float = LIMIT) -> Outcome | None:
    """None when the assistant was silent at the onset: nothing to interrupt."""
    x = np.asarray(speaking, dtype=bool)
    before = math.ceil(onset / step - _EPS) - 1
    if not 0 <= before < len(x) or not x[before]:
        return None
    s = _floor(onset, step)
    for i in range(s, len(x)):
        if not x[i:i + hold].any():
            seconds = max(0.0, i * step - onset)
            return Outcome(onset, seconds, i - s, seconds <= limit + _EPS)
    return Outcome(onset, None, None, False)


def summarize(outcomes: Iterable[Outcome], step: float, ks: Sequence[int] = KS) -> dict:
    """Acc@k (fractions; None without events) and the mean seconds over successes."""
    out = list(outcomes)
    n = len(out)
    ok = [o.seconds for o in out if o.success]
    return {
        "events": n, "step_ms": round(step * 1000, 3),
        "acc": {str(k): (sum(o.success and o.steps < k for o in out) / n if n else None) for k in ks},
        "mean_ms": round(1000 * float(np.mean(ok)), 1) if ok else None,
        "successes": len(ok),
        "over_talk": sum(o.over_talk for o in out),
        "none_within_limit": sum(not o.success and not o.over_talk for o in out),
    }


def _spoken(entry: DialogueEntry):
    return sorted((t for t in entry.turns if not t.backchannel), key=lambda t: (t.start, t.speaker))


def turn_events(entry: DialogueEntry) -> list[tuple[float, float]]:
    """(start, end) of each user turn followed by an assistant turn, backchannels aside,
    in a dialogue not of the interrupt pattern (there the stop is what is measured)."""
    if entry.pattern == "interrupt":
        return []
    turns = _spoken(entry)
    return [(t.start, t.end) for t, nxt in zip(turns, turns[1:]) if t.speaker == "user" and nxt.speaker == "assistant"]


def interrupt_onsets(entry: DialogueEntry) -> list[float]:
    """Starts of user turns that begin inside an interrupted assistant turn (the synth's
    interrupt pattern: `start < onset < planned_end`)."""
    cut = [t for t in entry.turns if t.speaker == "assistant" and t.planned_end is not None]
    return [u.start for u in _spoken(entry)
            if u.speaker == "user" and any(a.start < u.start < a.planned_end for a in cut)]
