"""The synthetic-dialogue manifest: one JSON object per line, schema version 1.

The schema is documented in docs/training.md ("Synthetic phone dialogues"); `validate`
is its executable form, used both when a line is written and when one is read, so a
manifest that loads is one the training loader can trust. Times are seconds from the
start of the dialogue's audio; paths are relative to the manifest's folder.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePosixPath

from model.train.manifest import VERSION, ManifestError, parse_entry

from .data_errors import DataError

__all__ = ["LAWS", "NOISES", "PATTERNS", "VERSION", "append_record", "read_manifest", "validate"]

# The schema's vocabulary; the modules that make the data take it from here. This module
# (and the training manifest it builds on) stays free of numpy and scipy so the command
# line can import it at start-up.
PATTERNS = ("respond", "interrupt", "wait")
LAWS = ("ulaw", "alaw")
NOISES = ("white", "pink")
_KEYS = {"version", "id", "audio", "channels", "sample_rate", "duration", "pattern", "snr_db", "noise",
         "line", "source", "voices", "turns"}
_TURN_KEYS = {"speaker", "text", "start", "end", "segments"}
_TURN_OPTIONAL = {"planned_end", "backchannel"}
_EPS = 1e-3  # times are written rounded to 0.1 ms


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(record: object) -> dict:
    """Return `record` if it is a valid version-1 line of the synth; raise ValueError
    saying why not. The general dialogue schema (ids, audio channels, times, turns) is
    the training manifest's (model/train/manifest.py); this adds what the synth writes
    besides: exactly its keys, a stereo file beside the manifest, the pattern, noise,
    line and voices, and each turn's segments."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if set(record) != _KEYS:
        missing, extra = sorted(_KEYS - set(record)), sorted(set(record) - _KEYS)
        raise ValueError(f"keys differ from the schema: missing {missing}, unknown {extra}")
    try:
        parse_entry(record)
    except ManifestError as exc:
        raise ValueError(str(exc).removeprefix("<entry>: ")) from None
    audio = record["audio"]
    if PurePosixPath(audio).is_absolute() or ".." in audio.split("/"):
        raise ValueError(f"audio {audio!r} must be a path relative to the manifest's folder")
    if record["channels"] != {"user": 0, "assistant": 1}:
        raise ValueError("channels must be {'user': 0, 'assistant': 1} (a stereo file)")
    if record["pattern"] not in PATTERNS:
        raise ValueError(f"pattern {record['pattern']!r} is not one of {PATTERNS}")
    if (record["snr_db"] is None) != (record["noise"] is None):
        raise ValueError("snr_db and noise are both null (no noise) or both set")
    if record["snr_db"] is not None and not _number(record["snr_db"]):
        raise ValueError("snr_db must be a number or null")
    if record["noise"] is not None and record["noise"] not in NOISES:
        raise ValueError(f"noise {record['noise']!r} is not one of {NOISES} or null")
    if record["line"] is not None and record["line"] not in LAWS:
        raise ValueError(f"line {record['line']!r} is not one of {LAWS} or null")
    if not isinstance(record["source"], str):
        raise ValueError("source must be a string")
    voices = record["voices"]
    if not isinstance(voices, dict) or set(voices) != {"user", "assistant"} or not all(
            isinstance(v, str) for v in voices.values()):
        raise ValueError("voices must be {'user': str, 'assistant': str}")
    previous = -1.0
    for i, turn in enumerate(record["turns"]):
        try:
            _turn(turn)
        except ValueError as exc:
            raise ValueError(f"turn {i}: {exc}") from None
        if turn["start"] < previous:
            raise ValueError(f"turn {i}: turns must be in order of start time")
        previous = turn["start"]
    return record


def _turn(turn: dict) -> None:
    """What the general schema leaves open: the synth's keys and the segments."""
    if not _TURN_KEYS <= set(turn) <= _TURN_KEYS | _TURN_OPTIONAL:
        raise ValueError(f"needs keys {sorted(_TURN_KEYS)}, optional {sorted(_TURN_OPTIONAL)}")
    if not turn["text"]:
        raise ValueError("text must be a non-empty string")
    segments = turn["segments"]
    if not isinstance(segments, list) or not segments:
        raise ValueError("segments must be a non-empty list")
    last = turn["start"]
    for seg in segments:
        if not isinstance(seg, dict) or set(seg) != {"start", "end", "text"}:
            raise ValueError("a segment is {'start', 'end', 'text'}")
        if not (_number(seg["start"]) and _number(seg["end"]) and last - _EPS <= seg["start"] < seg["end"]):
            raise ValueError("segments must be in order, each with start < end")
        if not isinstance(seg["text"], str) or not seg["text"]:
            raise ValueError("a segment's text must be a non-empty string")
        last = seg["end"]
    if abs(segments[0]["start"] - turn["start"]) > _EPS or abs(segments[-1]["end"] - turn["end"]) > _EPS:
        raise ValueError("the first segment starts at start and the last ends at end")
    if "backchannel" in turn and turn["backchannel"] is not True:
        raise ValueError("backchannel is true when present")


def read_manifest(path: str | Path, *, repair: bool = False) -> list[dict]:
    """All records of a manifest, each validated; an error names the file and line.

    `repair`: a last line without its newline that does not parse (a run killed while
    writing it) is cut off the file instead of refused, so the run can resume.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from None
    lines = data.split(b"\n")
    torn = lines.pop()  # after the last newline: b"" unless the last write was cut short
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            records.append(_parse(line, f"{path}:{number}"))
    if torn.strip():
        try:
            records.append(_parse(torn, f"{path}:{len(lines) + 1}"))
        except DataError:
            if not repair:
                raise
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(torn))
    return records


def _parse(line: bytes, where: str) -> dict:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    try:
        return validate(obj)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from None


def append_record(path: str | Path, record: dict) -> None:
    """Validate and append one line, flushed to disk: a line in the manifest means its
    audio (written before it) is complete."""
    line = json.dumps(validate(record), ensure_ascii=False, separators=(",", ":")) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
