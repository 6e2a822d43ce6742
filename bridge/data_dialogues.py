"""Text dialogues: the in-memory form, and the JSONL a user gives (`--dialogues FILE`).

One JSON object per line: {"turns": [{"speaker": "user"|"assistant", "text": "..."}, ...]}.
Blank lines are skipped; any other malformed line stops the load with an error naming the
file and line, so a typo is never silently dropped from a training set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .data_errors import DataError

__all__ = ["Dialogue", "Turn", "SPEAKERS", "load_dialogues", "parse_dialogue"]

SPEAKERS = ("user", "assistant")
MAX_TURNS = 64
MAX_TEXT = 2000  # characters per turn: espeak-ng takes anything, the layout wants phrases


@dataclass(frozen=True)
class Turn:
    speaker: str
    text: str


@dataclass(frozen=True)
class Dialogue:
    turns: tuple[Turn, ...]
    source: str  # where it came from, for the manifest: "template:NAME" or "FILE:LINE"


def parse_dialogue(obj: object, source: str) -> Dialogue:
    """Check one decoded JSON object; raise `DataError` prefixed with `source`."""
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(obj).__name__}")
    extra = set(obj) - {"turns", "id"}
    if extra:
        raise DataError(f"{source}: unknown key(s) {sorted(extra)}; a dialogue has 'turns'")
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source}: 'turns' must be a non-empty list")
    if len(turns) > MAX_TURNS:
        raise DataError(f"{source}: {len(turns)} turns, at most {MAX_TURNS}")
    out = []
    for i, turn in enumerate(turns):
        where = f"{source}: turn {i}"
        if not isinstance(turn, dict) or set(turn) != {"speaker", "text"}:
            raise DataError(f"{where}: must be an object with exactly 'speaker' and 'text'")
        speaker, text = turn["speaker"], turn["text"]
        if speaker not in SPEAKERS:
            raise DataError(f"{where}: speaker {speaker!r} is not 'user' or 'assistant'")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        if len(text) > MAX_TEXT:
            raise DataError(f"{where}: text of {len(text)} characters, at most {MAX_TEXT}")
        out.append(Turn(speaker, " ".join(text.split())))
    if {t.speaker for t in out} != set(SPEAKERS):
        raise DataError(f"{source}: a dialogue needs at least one user and one assistant turn")
    return Dialogue(tuple(out), source)


def load_dialogues(path: str | Path) -> list[Dialogue]:
    """Read a dialogue JSONL file; every line is checked before any is used."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read dialogues from {path}: {exc}") from None
    dialogues = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        dialogues.append(parse_dialogue(obj, where))
    if not dialogues:
        raise DataError(f"{path}: no dialogues in the file")
    return dialogues
