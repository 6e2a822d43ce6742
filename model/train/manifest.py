"""The training manifest: JSONL, one entry (a JSON object) per line, version 1.

Two kinds of entry, told apart by their fields (a line with `turns` is a dialogue; a
pair may say `"kind": "pair"`, a dialogue `"kind": "dialogue"`). Every line carries
`"version": 1`. Paths are relative to the manifest's folder, or absolute. Blank lines
are skipped. Keys this schema does not name are kept as `extra` (written back
unchanged), so a generator may add its own bookkeeping without breaking readers.

    pair: one utterance and its transcript (stage 1: ASR and TTS)
      {"version": 1, "kind": "pair", "id": "ls-0001", "audio": "pairs/0001.wav",
       "text": "hello there", "sample_rate": 16000, "duration": 1.42}
      audio: a mono WAV file; sample_rate, duration: optional (a given rate must match
        the file's; other rates than 16 kHz are resampled)

    dialogue: a two-channel conversation (stages 2 and 3). What `duplexline data synth`
    writes (bridge/data_manifest.py, docs/training.md) is one of these:
      {"version": 1, "id": "s0-000042", "audio": "audio/s0-000042.wav",
       "channels": {"user": 0, "assistant": 1}, "sample_rate": 16000, "duration": 9.8,
       "pattern": "respond",
       "turns": [{"speaker": "user", "text": "what time is it", "start": 0.3, "end": 1.9},
                 {"speaker": "assistant", "text": "it is nine", "start": 2.3, "end": 3.6,
                  "planned_end": 4.1},
                 {"speaker": "user", "text": "mhm", "start": 2.8, "end": 3.1, "backchannel": true}]}
      the audio, either: `audio` (one 16 kHz WAV file) and `channels` (which column is
        the user's and which the assistant's); or `user_audio` and `assistant_audio`
        (two mono 16 kHz files). Each channel is silent where its speaker is.
      sample_rate: must be 16000 (the speech tokenizer's)
      duration: seconds (> 0); turn times are seconds from the start, 0 <= start < end <=
        duration (5 ms of rounding allowed); turns of one speaker do not overlap (a channel
        speaks one turn at a time); turns of the two speakers may (interruptions,
        backchannels)
      pattern: optional free-form label of the timing pattern ("respond", "interrupt",
        "wait", ...), kept for evaluation
      turns[].text: what the turn says (an interrupted turn: what it meant to say)
      turns[].planned_end: optional, an interrupted assistant turn: where its speech
        would have ended (> end); its audio stops at `end`
      turns[].backchannel: optional, true for a backchannel ("mhm") inside the other
        speaker's turn; not a turn of its own in half-duplex samples

Ids are non-empty strings, unique within a manifest. Errors name the file and the line.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

__all__ = ["VERSION", "SAMPLE_RATE", "ManifestError", "PairEntry", "DialogueEntry", "DialogueTurn", "Entry",
           "parse_entry", "read_manifest", "write_manifest", "resolve_audio"]

VERSION = 1
SAMPLE_RATE = 16000  # the speech tokenizer's rate; dialogues are stored at it
SPEAKERS = ("user", "assistant")
_TIME_SLACK = 0.005  # seconds of rounding allowed past the duration


class ManifestError(ValueError):
    """A manifest line is malformed. Nothing was read past it; fix that line."""

    def __init__(self, path: object, line: int | None, why: str) -> None:
        self.path, self.line = path, line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {why}")


@dataclass(frozen=True)
class DialogueTurn:
    speaker: str  # "user" or "assistant"
    text: str
    start: float  # seconds
    end: float
    extra: dict[str, Any] = field(default_factory=dict)
    planned_end: float | None = None  # interrupted: where the speech would have ended
    backchannel: bool = False

    @property
    def interrupted(self) -> bool:
        return self.planned_end is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"speaker": self.speaker, "text": self.text, "start": self.start, "end": self.end}
        if self.planned_end is not None:
            out["planned_end"] = self.planned_end
        if self.backchannel:
            out["backchannel"] = True
        return {**out, **self.extra}


@dataclass(frozen=True)
class PairEntry:
    id: str
    audio: str
    text: str
    sample_rate: int | None = None
    duration: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    kind = "pair"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": VERSION, "kind": self.kind, "id": self.id, "audio": self.audio,
                               "text": self.text}
        if self.sample_rate is not None:
            out["sample_rate"] = self.sample_rate
        if self.duration is not None:
            out["duration"] = self.duration
        return {**out, **self.extra}


@dataclass(frozen=True)
class DialogueEntry:
    """`user_channel`/`assistant_channel`: the columns of one multi-channel file (then
    `user_audio == assistant_audio`); None: two mono files."""

    id: str
    user_audio: str
    assistant_audio: str
    duration: float
    turns: tuple[DialogueTurn, ...]
    sample_rate: int = SAMPLE_RATE
    pattern: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    user_channel: int | None = None
    assistant_channel: int | None = None
    kind = "dialogue"

    def to_json(self) -> dict[str, Any]:
        # No "kind": the turns say it, and the synth's own reader takes no other keys.
        out: dict[str, Any] = {"version": VERSION, "id": self.id}
        if self.user_channel is not None:
            out["audio"] = self.user_audio
            out["channels"] = {"user": self.user_channel, "assistant": self.assistant_channel}
        else:
            out["user_audio"], out["assistant_audio"] = self.user_audio, self.assistant_audio
        out["sample_rate"], out["duration"] = self.sample_rate, self.duration
        if self.pattern is not None:
            out["pattern"] = self.pattern
        out["turns"] = [t.to_json() for t in self.turns]
        return {**out, **self.extra}


Entry = Union[PairEntry, DialogueEntry]

_PAIR_KEYS = {"version", "kind", "id", "audio", "text", "sample_rate", "duration"}
_DIALOGUE_KEYS = {"version", "kind", "id", "audio", "channels", "user_audio", "assistant_audio", "sample_rate",
                  "duration", "pattern", "turns"}
_TURN_KEYS = {"speaker", "text", "start", "end", "planned_end", "backchannel"}


class _Bad(Exception):
    """A field's problem, before the file and line are known."""


def _get(obj: dict, key: str, kinds: tuple[type, ...], what: str, required: bool = True) -> Any:
    if key not in obj:
        if required:
            raise _Bad(f"missing {key!r} ({what})")
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _Bad(f"{key!r} must be {what}, got {value!r}")
    return value


def _text(obj: dict, key: str, required: bool = True, empty: bool = False) -> str | None:
    value = _get(obj, key, (str,), "a string", required)
    if value is not None and not empty and not value.strip():
        raise _Bad(f"{key!r} is empty")
    return value


def _seconds(obj: dict, key: str, required: bool = True) -> float | None:
    value = _get(obj, key, (int, float), "a number of seconds", required)
    if value is not None and not math.isfinite(value):
        raise _Bad(f"{key!r} must be finite, got {value!r}")
    return None if value is None else float(value)


def _turn(obj: Any, i: int, duration: float) -> DialogueTurn:
    if not isinstance(obj, dict):
        raise _Bad(f"turns[{i}] must be an object")
    try:
        speaker = _text(obj, "speaker")
        if speaker not in SPEAKERS:
            raise _Bad(f"'speaker' must be one of {SPEAKERS}, got {speaker!r}")
        text = _text(obj, "text", empty=True)
        start, end = _seconds(obj, "start"), _seconds(obj, "end")
    except _Bad as exc:
        raise _Bad(f"turns[{i}]: {exc}") from None
    if not 0.0 <= start < end <= duration + _TIME_SLACK:
        raise _Bad(f"turns[{i}]: needs 0 <= start < end <= duration ({duration}), got {start}..{end}")
    planned = _seconds(obj, "planned_end", required=False)
    if planned is not None and (speaker != "assistant" or planned <= end):
        raise _Bad(f"turns[{i}]: 'planned_end' belongs to an interrupted assistant turn, after its end")
    backchannel = obj.get("backchannel", False)
    if not isinstance(backchannel, bool):
        raise _Bad(f"turns[{i}]: 'backchannel' must be true or false, got {backchannel!r}")
    return DialogueTurn(speaker, text, start, end, {k: v for k, v in obj.items() if k not in _TURN_KEYS},
                        planned, backchannel)


def _channels(obj: dict) -> tuple[str, str, int | None, int | None]:
    """(user path, assistant path, user column, assistant column)."""
    if "audio" in obj:
        if "user_audio" in obj or "assistant_audio" in obj:
            raise _Bad("give 'audio' with 'channels', or 'user_audio' and 'assistant_audio', not both")
        path = _text(obj, "audio")
        ch = _get(obj, "channels", (dict,), "an object {\"user\": column, \"assistant\": column}")
        cols = [ch.get(k) for k in SPEAKERS]
        if set(ch) != set(SPEAKERS) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                               for c in cols) or cols[0] == cols[1]:
            raise _Bad(f"'channels' must give the user and the assistant each its own column, got {ch!r}")
        return path, path, cols[0], cols[1]
    if "channels" in obj:
        raise _Bad("'channels' goes with one 'audio' file")
    return _text(obj, "user_audio"), _text(obj, "assistant_audio"), None, None


def _kind(obj: dict) -> str:
    kind = obj.get("kind", "dialogue" if "turns" in obj else "pair")
    if kind not in ("pair", "dialogue"):
        raise _Bad(f"'kind' must be 'pair' or 'dialogue', got {kind!r}")
    return kind


def _parse(obj: Any) -> Entry:
    if not isinstance(obj, dict):
        raise _Bad("each line must be a JSON object")
    if "version" not in obj:
        raise _Bad(f"missing 'version' (this reader takes {VERSION})")
    if obj["version"] != VERSION or isinstance(obj["version"], bool):
        raise _Bad(f"'version' {obj['version']!r} is not supported (this reader takes {VERSION})")
    kind = _kind(obj)
    ident = _text(obj, "id")
    if kind == "pair":
        rate = _get(obj, "sample_rate", (int,), "an integer in Hz", required=False)
        if rate is not None and rate < 1:
            raise _Bad(f"'sample_rate' must be positive, got {rate}")
        duration = _seconds(obj, "duration", required=False)
        if duration is not None and duration <= 0:
            raise _Bad(f"'duration' must be positive, got {duration}")
        return PairEntry(ident, _text(obj, "audio"), _text(obj, "text"), rate, duration,
                         {k: v for k, v in obj.items() if k not in _PAIR_KEYS})
    rate = _get(obj, "sample_rate", (int,), "an integer in Hz")
    if rate != SAMPLE_RATE:
        raise _Bad(f"'sample_rate' must be {SAMPLE_RATE} for a dialogue (the tokenizer's rate), got {rate}")
    duration = _seconds(obj, "duration")
    if duration <= 0:
        raise _Bad(f"'duration' must be positive, got {duration}")
    raw_turns = _get(obj, "turns", (list,), "a list of turns")
    if not raw_turns:
        raise _Bad("'turns' is empty")
    turns = tuple(_turn(t, i, duration) for i, t in enumerate(raw_turns))
    for speaker in SPEAKERS:
        mine = sorted((t for t in turns if t.speaker == speaker), key=lambda t: t.start)
        for a, b in zip(mine, mine[1:]):
            if b.start < a.end - _TIME_SLACK:
                raise _Bad(f"two {speaker} turns overlap ({a.start}..{a.end} and {b.start}..{b.end}): "
                           "one channel speaks one turn at a time")
    user, assistant, user_ch, assistant_ch = _channels(obj)
    return DialogueEntry(ident, user, assistant, duration, turns, rate,
                         _text(obj, "pattern", required=False, empty=True),
                         {k: v for k, v in obj.items() if k not in _DIALOGUE_KEYS}, user_ch, assistant_ch)


def parse_entry(obj: Any, path: object = "<entry>", line: int | None = None) -> Entry:
    """One decoded JSON object as an entry; ManifestError naming `path:line` if invalid."""
    try:
        return _parse(obj)
    except _Bad as exc:
        raise ManifestError(path, line, str(exc)) from None


def read_manifest(path: str | os.PathLike) -> list[Entry]:
    """Every entry of a manifest, in file order; ManifestError at the first bad line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ManifestError(path, None, "no such manifest file") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(path, None, f"not UTF-8 text ({exc})") from None
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        entry = parse_entry(obj, path, number)
        if entry.id in seen:
            raise ManifestError(path, number, f"id {entry.id!r} already used on line {seen[entry.id]}")
        seen[entry.id] = number
        entries.append(entry)
    return entries


def write_manifest(path: str | os.PathLike, entries: Iterable[Entry]) -> Path:
    """Write entries as JSONL (each checked as a reader would); atomically, so a reader
    never sees half a file."""
    path = Path(path)
    lines, seen = [], set()
    for i, entry in enumerate(entries, 1):
        obj = entry.to_json()
        parse_entry(obj, path, i)  # what we write, we can read
        if entry.id in seen:
            raise ManifestError(path, i, f"id {entry.id!r} is used twice")
        seen.add(entry.id)
        lines.append(json.dumps(obj, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_audio(manifest: str | os.PathLike, audio: str) -> Path:
    """An entry's audio path: relative paths are relative to the manifest's folder."""
    p = Path(audio)
    return p if p.is_absolute() else Path(manifest).resolve().parent / p
