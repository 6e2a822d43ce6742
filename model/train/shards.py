"""Speech codes for a manifest, made once and cached in shards on disk.

    manifest.jsonl --build_shards--> folder/index.json + shard-00000.npz, shard-00001.npz, ...

What each entry becomes (codes are the tokenizer's raw codes 0..codebook-1; text ids are
the text tokenizer's, text.py):

- pair: `speech` = whole-utterance `encode` of its audio; `text`.
- dialogue: its duration is cut into `n` chunk periods (the model's `chunk_seconds`,
  rounded up; both channels zero-padded to `n` whole periods).
  `user`: the user channel through the tokenizer's STREAM, pushed exactly as a live call
  pushes it (agent/agents.py, model/engine.py `lead_frames`): the first push carries the
  tokenizer's look-ahead as leading silence (`lead` samples: the look-ahead rounded up to
  whole 20 ms frames) before one chunk period of audio, every later push one period. So
  user code `j` covers the dialogue's samples `[j*H - lead, (j+1)*H - lead)` (H samples per
  code), chunk `k`'s codes are the ones the engine would feed at tick `k`, and the model
  learns from the codes it will hear on a call. `n * chunk codes` of them.
  `assistant`: whole-utterance `encode` of the assistant channel: code `j` covers
  `[j*H, (j+1)*H)`; `n * chunk codes`.
  `turns`: speaker, start, end (seconds) and text ids of each turn.

Resumable: the index records, per shard, a digest of its entries (their manifest JSON
and their audio files' sizes and mtimes). A run skips every shard whose file is there
with the same digest, and redoes any other: one a crash interrupted (it is written to a
temporary name first, then renamed, then recorded), one whose entries changed. A folder
built with another tokenizer (weights, config or streaming window), text tokenizer or
chunk period is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np
import torch

from ..codec import SpeechTokenizer
from ..config import OmniFlattenConfig
from .audio import read_audio, read_channels
from .manifest import DialogueEntry, Entry, PairEntry, read_manifest, resolve_audio
from .text import ByteTextTokenizer, TextTokenizer

__all__ = ["ShardError", "PairCodes", "DialogueCodes", "TurnCodes", "Record", "build_shards", "read_shards",
           "read_index", "lead_samples", "stream_user_codes", "tokenizer_digest", "INDEX_FILE"]

INDEX_FILE = "index.json"
_FORMAT = "duplexline-train-shards/1"
FRAME_SECONDS = 0.02  # the agent's frame: the lead is whole frames of it


class ShardError(ValueError):
    """A shard folder cannot be built or read as asked. What was built stays; the message
    says what to do."""


@dataclass(frozen=True)
class PairCodes:
    id: str
    speech: np.ndarray  # codes
    text: np.ndarray  # text ids


@dataclass(frozen=True)
class TurnCodes:
    speaker: str
    start: float  # seconds
    end: float
    text: np.ndarray  # text ids
    interrupted: bool = False  # its speech was cut at `end`; `text` is what it meant to say
    backchannel: bool = False


@dataclass(frozen=True)
class DialogueCodes:
    id: str
    duration: float
    user: np.ndarray  # streamed codes, chunk clock (see the module docstring)
    assistant: np.ndarray  # whole-utterance codes
    turns: tuple[TurnCodes, ...]
    token_rate: int
    lead_samples: int
    sample_rate: int = 16000
    pattern: str | None = None

    def _span(self, start: float, end: float, offset: int, length: int) -> tuple[int, int]:
        per = self.sample_rate / self.token_rate
        a = round((start * self.sample_rate + offset) / per)
        b = round((end * self.sample_rate + offset) / per)
        return min(max(a, 0), length), min(max(b, 0), length)

    def user_span(self, start: float, end: float) -> tuple[int, int]:
        """Indices of the user codes of seconds [start, end) (the stream lags by the lead)."""
        return self._span(start, end, self.lead_samples, len(self.user))

    def assistant_span(self, start: float, end: float) -> tuple[int, int]:
        return self._span(start, end, 0, len(self.assistant))


Record = Union[PairCodes, DialogueCodes]


def lead_samples(tokenizer: SpeechTokenizer, frame_seconds: float = FRAME_SECONDS) -> int:
    """Leading silence of a call's first push, in samples: the engine's lead frames."""
    return tokenizer.lead_frames(frame_seconds) * round(frame_seconds * tokenizer.sample_rate)


def stream_user_codes(tokenizer: SpeechTokenizer, pcms: list[np.ndarray], chunk_samples: int, lead: int,
                      done: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Each channel through its own stream, pushed as a call pushes it: `lead` zeros and one
    chunk first, then a chunk at a time; `ceil(len / chunk)` chunks' codes each. The
    streams push together (`push_many`), as the engine batches calls: codes depend only
    on the audio. `done(i)` as channel `i` finishes."""
    per_chunk = chunk_samples * tokenizer.token_rate / tokenizer.sample_rate
    if abs(per_chunk - round(per_chunk)) > 1e-9:
        raise ShardError(f"a chunk of {chunk_samples} samples is not a whole number of codes")
    per_chunk = round(per_chunk)
    chunks = [max(1, math.ceil(len(p) / chunk_samples)) for p in pcms]
    audio = [np.concatenate([np.zeros(lead, np.float32), p, np.zeros(n * chunk_samples - len(p), np.float32)])
             for p, n in zip(pcms, chunks)]
    streams = [tokenizer.new_stream() for _ in pcms]
    out: list[list[np.ndarray]] = [[] for _ in pcms]
    # Past the end a live call would go on; silence lets a step that waits for more audio
    # (a tokenizer step longer than a chunk) finish, and changes no earlier code.
    extra = 1 + math.ceil(tokenizer.lookahead_samples / chunk_samples)
    for k in range(max(chunks) + extra):
        rows = [i for i, n in enumerate(chunks) if k < n or sum(map(len, out[i])) < n * per_chunk]
        if not rows:
            break
        pieces = []
        for i in rows:
            a = 0 if k == 0 else lead + k * chunk_samples
            b = lead + (k + 1) * chunk_samples
            pieces.append(audio[i][a:b] if k < chunks[i] else np.zeros(chunk_samples, np.float32))
        for i, codes in zip(rows, tokenizer.push_many([streams[i] for i in rows], pieces)):
            out[i].append(codes)
            if done is not None and k == chunks[i] - 1:
                done(i)
    result = []
    for i, n in enumerate(chunks):
        codes = np.concatenate(out[i]) if out[i] else np.zeros(0, np.int64)
        if len(codes) < n * per_chunk:
            raise ShardError(f"the tokenizer's stream gave {len(codes)} codes for {n} chunks of "
                             f"{per_chunk}; its step or look-ahead does not fit the chunk")
        result.append(codes[:n * per_chunk])
    return result


def tokenizer_digest(tokenizer: SpeechTokenizer) -> str:
    """Identifies the codes a tokenizer makes: its class, config (streaming window
    included) and weights."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps([tokenizer.token_rate, tokenizer.codebook_size, tokenizer.lookahead_samples]).encode())
    config = getattr(tokenizer, "config", None)
    if hasattr(config, "to_dict"):
        h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    model = getattr(tokenizer, "model", None)
    if isinstance(model, torch.nn.Module):
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------- building


def _atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _entry_digest(manifest: Path, entries: list[Entry]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps(e.to_json(), sort_keys=True).encode())
        paths = [e.audio] if isinstance(e, PairEntry) else [e.user_audio, e.assistant_audio]
        for p in paths:
            try:
                st = resolve_audio(manifest, p).stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except FileNotFoundError:
                h.update(b"missing")
    return h.hexdigest()[:32]


class _Progress:
    """tqdm when installed, else one stderr line at most once a second, with an ETA."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar = None
        self.enabled, self.total, self.n = enabled, total, initial
        self._t0 = self._last = time.monotonic()
        self._start = initial
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, initial=initial, unit="entry", desc="tokenizing", file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and (time.monotonic() - self._last >= 1.0 or self.n == self.total):
            self._last = now = time.monotonic()
            rate = (self.n - self._start) / max(now - self._t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            print(f"\rtokenizing {self.n}/{self.total} entries, ETA {eta:.0f} s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def _text_ids(text_tok: TextTokenizer, text: str, text_size: int, where: str) -> np.ndarray:
    ids = np.asarray(text_tok.encode(text), dtype=np.int64)
    if len(ids) and not (0 <= ids.min() and ids.max() < text_size):
        raise ShardError(f"{where}: text id {int(ids.max())} outside the text vocabulary ({text_size})")
    return ids


def _shard(manifest: Path, entries: list[Entry], tok: SpeechTokenizer, text_tok: TextTokenizer,
           chunk_samples: int, lead: int, text_size: int, progress: _Progress) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    meta: list[dict[str, Any]] = []
    users: list[tuple[int, np.ndarray]] = []
    per_chunk = round(chunk_samples * tok.token_rate / tok.sample_rate)
    for i, e in enumerate(entries):
        where = f"{manifest}: entry {e.id!r}"
        if isinstance(e, PairEntry):
            pcm, rate = read_audio(resolve_audio(manifest, e.audio), tok.sample_rate)
            if e.sample_rate is not None and e.sample_rate != rate:
                raise ShardError(f"{where}: sample_rate {e.sample_rate}, but the file is {rate} Hz")
            if len(pcm) != 1:
                raise ShardError(f"{where}: {e.audio} has {len(pcm)} channels; a pair's audio is mono")
            arrays[f"e{i}.speech"] = np.asarray(tok.encode(pcm[0]), dtype=np.int64)
            arrays[f"e{i}.text"] = _text_ids(text_tok, e.text, text_size, where)
            meta.append({"kind": "pair", "id": e.id})
            progress.update(1)
            continue
        assert isinstance(e, DialogueEntry)
        n_samples = round(e.duration * tok.sample_rate)
        n = max(1, math.ceil(n_samples / chunk_samples))
        channels = []
        files: dict[str, np.ndarray] = {}  # a stereo file is read once for both channels
        for path, column in ((e.user_audio, e.user_channel), (e.assistant_audio, e.assistant_channel)):
            if path not in files:
                files[path] = read_channels(manifest, path, tok.sample_rate)
            if column is None and len(files[path]) != 1:
                raise ShardError(f"{where}: {path} has {len(files[path])} channels; name the user's and the "
                                 "assistant's in 'channels', or give each its own mono file")
            if column is not None and column >= len(files[path]):
                raise ShardError(f"{where}: {path} has no channel {column} (it has {len(files[path])})")
            pcm = files[path][column or 0]
            if len(pcm) > n * chunk_samples:
                raise ShardError(f"{where}: {path} lasts {len(pcm) / tok.sample_rate:.3f} s, past the "
                                 f"duration {e.duration} s: fix the manifest's duration")
            channels.append(np.pad(pcm, (0, n * chunk_samples - len(pcm))))
        assistant = np.asarray(tok.encode(channels[1]), dtype=np.int64)
        if len(assistant) != n * per_chunk:
            raise ShardError(f"{where}: the tokenizer gave {len(assistant)} codes for {n} chunks; "
                             f"expected {n * per_chunk}")
        arrays[f"e{i}.assistant"] = assistant
        users.append((i, channels[0]))
        for j, t in enumerate(e.turns):
            arrays[f"e{i}.text{j}"] = _text_ids(text_tok, t.text, text_size, where)
        meta.append({"kind": "dialogue", "id": e.id, "duration": e.duration, "pattern": e.pattern,
                     "turns": [[t.speaker, t.start, t.end, t.interrupted, t.backchannel] for t in e.turns]})
    if users:
        codes = stream_user_codes(tok, [p for _, p in users], chunk_samples, lead, lambda _: progress.update(1))
        for (i, _), c in zip(users, codes):
            arrays[f"e{i}.user"] = np.asarray(c, dtype=np.int64)
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def build_shards(manifest: str | os.PathLike, out: str | os.PathLike, config: OmniFlattenConfig,
                 tokenizer: SpeechTokenizer, text_tokenizer: TextTokenizer | None = None, *,
                 shard_size: int = 32, progress: bool = True) -> dict[str, Any]:
    """Tokenize the manifest's audio and text into `out` (see the module docstring);
    returns the index. Finished shards of an earlier run are kept. Memory: one shard's
    audio at a time (a dialogue of 60 s is 7.7 MB of float32 for its two channels)."""
    manifest, out = Path(manifest), Path(out)
    if shard_size < 1:
        raise ShardError(f"shard_size must be at least 1, got {shard_size}")
    if tokenizer.token_rate != config.speech_token_rate or tokenizer.codebook_size != config.speech_codebook_size:
        raise ShardError(f"the tokenizer makes {tokenizer.codebook_size} codes at {tokenizer.token_rate} Hz; the "
                         f"model takes {config.speech_codebook_size} at {config.speech_token_rate} Hz")
    text_tokenizer = text_tokenizer or ByteTextTokenizer(config.text_size)
    entries = read_manifest(manifest)
    chunk_samples = round(config.chunk_seconds * tokenizer.sample_rate)
    lead = lead_samples(tokenizer)
    setup = {"tokenizer": tokenizer_digest(tokenizer), "text_tokenizer": text_tokenizer.name,
             "token_rate": tokenizer.token_rate, "sample_rate": tokenizer.sample_rate,
             "chunk_samples": chunk_samples, "lead_samples": lead, "shard_size": shard_size}
    out.mkdir(parents=True, exist_ok=True)
    old = _read_index_file(out) if (out / INDEX_FILE).exists() else None
    if old is not None and old["setup"] != setup:
        changed = sorted(k for k in setup if old["setup"].get(k) != setup[k])
        raise ShardError(f"{out} holds shards made with another {', '.join(changed)}: "
                         "build into a new folder (or delete this one)")
    groups = [entries[i:i + shard_size] for i in range(0, len(entries), shard_size)]
    digests = [_entry_digest(manifest, g) for g in groups]
    kept = {s["file"]: s for s in (old or {}).get("shards", [])}
    shards: list[dict[str, Any] | None] = []
    for k, d in enumerate(digests):
        s = kept.get(f"shard-{k:05d}.npz")
        shards.append(s if s and s["digest"] == d and (out / s["file"]).exists() else None)
    index = {"format": _FORMAT, "manifest": str(manifest.resolve()), "setup": setup, "entries": len(entries),
             "shards": [s for s in shards if s is not None]}
    for stale in set(kept) - {s["file"] for s in index["shards"]}:
        (out / stale).unlink(missing_ok=True)
    _write_index(out, index)  # forget shards about to be redone before touching them
    bar = _Progress(len(entries), sum(s["entries"] for s in index["shards"]), progress)
    try:
        for k, group in enumerate(groups):
            if shards[k] is not None:
                continue
            arrays = _shard(manifest, group, tokenizer, text_tokenizer, chunk_samples, lead, config.text_size, bar)
            name = f"shard-{k:05d}.npz"
            _atomic(out / name, lambda f: np.savez(f, **arrays))
            shards[k] = {"file": name, "digest": digests[k], "entries": len(group)}
            index["shards"] = [s for s in shards if s is not None]
            _write_index(out, index)
    finally:
        bar.close()
    return index


def _write_index(out: Path, index: dict[str, Any]) -> None:
    _atomic(out / INDEX_FILE, lambda f: f.write(json.dumps(index, indent=1) + "\n"), mode="w")


# ---------------------------------------------------------------------------- reading


def _read_index_file(folder: Path) -> dict[str, Any]:
    path = folder / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{folder}: no {INDEX_FILE}; build the shards first (build_shards)") from None
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: not valid JSON ({exc}); delete the folder and build again") from None
    if not isinstance(index, dict) or index.get("format") != _FORMAT:
        raise ShardError(f"{path}: not a shard index of format {_FORMAT}")
    return index


def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    """The index of a finished build; ShardError if shards are missing (an interrupted run)."""
    folder = Path(folder)
    index = _read_index_file(folder)
    have = sum(s["entries"] for s in index["shards"])
    if have != index["entries"]:
        raise ShardError(f"{folder}: {have} of {index['entries']} entries are tokenized; run the build "
                         "again to finish it")
    return index


def read_shards(folder: str | os.PathLike) -> Iterator[Record]:
    """Every entry's codes, in manifest order, one shard in memory at a time."""
    folder = Path(folder)
    index = read_index(folder)
    setup = index["setup"]
    for s in sorted(index["shards"], key=lambda s: s["file"]):
        with np.load(folder / s["file"]) as z:
            meta = json.loads(str(z["meta"]))
            for i, m in enumerate(meta):
                if m["kind"] == "pair":
                    yield PairCodes(m["id"], z[f"e{i}.speech"], z[f"e{i}.text"])
                    continue
                turns = tuple(TurnCodes(sp, start, end, z[f"e{i}.text{j}"], cut, bc)
                              for j, (sp, start, end, cut, bc) in enumerate(m["turns"]))
                yield DialogueCodes(m["id"], m["duration"], z[f"e{i}.user"], z[f"e{i}.assistant"], turns,
                                    setup["token_rate"], setup["lead_samples"], setup["sample_rate"], m["pattern"])
