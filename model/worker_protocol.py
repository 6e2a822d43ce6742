"""The bridge-worker protocol's messages (docs/worker.md), version 3, over one WebSocket
per bridge-worker pair, many sessions on it.

Control messages are JSON text frames `{"t": kind, ...}`. Audio, both ways, travels in
binary frames, each carrying the chunks of many sessions (what was ready in the same
moment, cut into messages of at most `PIECE_BYTES` of audio so that the receiver starts
on the first while the rest is still being packed and sent). Binary, little-endian, no
JSON: a table of int32 the receiver checks with a few numpy operations, whatever the
number of sessions, then the audio as int16:

    b"DL" | version (u8) | kind (u8) | items (u32) | int32 table | int16 audio

- kind AUDIO (bridge to worker): table `items` rows of (sid, seq, samples); audio each
  item's 16 kHz samples, in order (callers' audio is 16-bit already: int16 halves the
  bytes and loses nothing);
- kind RESULTS (worker to bridge): table `items` rows of (sid, seq, chunks), then a row
  per chunk of every item, in order, (text ids, speech codes, samples, dropped 0/1), then
  every chunk's text ids and speech codes, in order; audio every chunk's samples at the
  decoder's rate, made by `line_pcm16`: exactly the 16 bits the bridge's line makes of
  the decoder's float32 audio (bridge/line_audio.py), so that a caller hears the same
  samples from a remote engine as from a local one, for half the bytes.

Every count is checked against the message's length before anything is read: a message
that does not add up (or a negative count, sid or seq, a flag other than 0/1) raises
ProtocolError.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Callable, Generic, Iterator, TypeVar

import numpy as np

from .voice import VoiceChunk

__all__ = ["PerPass", "VERSION", "AUDIO", "RESULTS", "PIECE_BYTES", "ProtocolError", "control", "parse_control",
           "pack_audio", "unpack_audio", "pack_results", "unpack_results", "pieces", "audio_bytes",
           "result_bytes", "line_pcm16"]

VERSION = 3
AUDIO = 1
RESULTS = 2
_MAGIC = b"DL"
_PREFIX = struct.Struct("<2sBBI")
_I32 = np.dtype("<i4")
_I16 = np.dtype("<i2")
ITEM = 3  # int32 per item row: sid, seq, samples (AUDIO) or chunks (RESULTS)
CHUNK = 4  # int32 per chunk row (RESULTS): text ids, speech codes, samples, dropped
MAX_ITEMS = 4096  # sessions in one message: far above any worker's slots
# Audio bytes per binary message (one item at least): a tick of 256 sessions is 1.6 MB up
# and 2.3 MB down; in pieces this size the receiver unpacks the first while the sender
# packs the next (on another core), and each piece stays in the CPU's cache. Measured
# (256 sessions aligned, bench/worker.py's stand-in): 64-128 kB best, 256 kB+ slower.
PIECE_BYTES = 1 << 17
_TO_FLOAT = np.float32(1.0 / 32768.0)


class ProtocolError(ValueError):
    """A message that does not follow docs/worker.md: the connection is closed."""


def control(kind: str, **fields: object) -> str:
    return json.dumps({"t": kind, **fields}, separators=(",", ":"))


def parse_control(text: str) -> dict:
    try:
        message = json.loads(text)
    except ValueError:
        raise ProtocolError("a control message is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ProtocolError("a control message has no kind ('t')")
    return message


def line_pcm16(pcm: np.ndarray) -> np.ndarray:
    """The decoder's float audio as the bridge's line turns it into 16-bit samples
    (bridge/line_audio.py, `LineAudio.play`: `np.clip(pcm * 32768.0, -32768, 32767)
    .astype(np.int16)`, scale, clip, truncate), the same operations: the line plays
    `line_pcm16(x) / 32768` exactly as it plays `x` (the scale by 2**15 is exact, so the
    line gets the same int16 back). tests/unit/test_worker_protocol.py holds the two to
    that."""
    return _clip16(pcm * 32768.0)


def _clip16(scaled: np.ndarray) -> np.ndarray:
    np.clip(scaled, -32768, 32767, out=scaled)  # in place: one temporary, not two
    return scaled.astype(_I16)


# ---- packing ---------------------------------------------------------------------------------

def _pack(kind: int, items: int, table: list[int], audio: np.ndarray) -> bytes:
    try:
        ints = struct.pack(f"<{len(table)}i", *table)  # twice as fast as numpy from a list
    except struct.error:
        raise ProtocolError("a binary message's value is not an int32") from None
    # One copy of the audio, into the message itself (join takes the array's buffer).
    return b"".join((_PREFIX.pack(_MAGIC, VERSION, kind, items), ints, audio))


def pack_audio(items: list[tuple[int, int, np.ndarray]]) -> bytes:
    """(sid, seq, float32 audio in [-1, 1] from int16 frames) per session. One conversion
    over every session's audio at once: per-session numpy calls cost more than the data."""
    table: list[int] = []
    for sid, seq, a in items:
        table += (sid, seq, len(a))
    audio = np.concatenate([a for _, _, a in items], dtype=np.float32) if items else np.zeros(0, np.float32)
    # In place on the message's own copy: temporaries of this size (~250 kB) are fresh
    # pages from the kernel each time (malloc gives them back between ticks).
    np.multiply(audio, np.float32(32768.0), out=audio)
    np.rint(audio, out=audio)
    return _pack(AUDIO, len(items), table, _clip16(audio))


def pack_results(items: list[tuple[int, int, list[VoiceChunk]]]) -> bytes:
    table: list[int] = []
    rows: list[int] = []
    ids: list[int] = []
    pcm: list[np.ndarray] = []
    for sid, seq, chunks in items:
        table += (sid, seq, len(chunks))
        for c in chunks:
            rows += (len(c.text_ids), len(c.speech_codes), len(c.pcm), 1 if c.dropped else 0)
            ids += c.text_ids
            ids += c.speech_codes
            pcm.append(c.pcm)
    audio = np.concatenate(pcm, dtype=np.float32) if pcm else np.zeros(0, np.float32)
    np.multiply(audio, np.float32(32768.0), out=audio)  # line_pcm16, on the message's own copy
    return _pack(RESULTS, len(items), table + rows + ids, _clip16(audio))


# ---- unpacking: every count checked before it is used -----------------------------------------

def _items(data: bytes, kind: int) -> int:
    """The prefix's checks; the number of items."""
    if len(data) < _PREFIX.size:
        raise ProtocolError("a binary message shorter than its prefix")
    magic, version, got, n = _PREFIX.unpack_from(data)
    if magic != _MAGIC:
        raise ProtocolError("a binary message without the DL prefix")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}")
    if got != kind:
        raise ProtocolError(f"binary message kind {got}, expected {kind}")
    if n > MAX_ITEMS:
        raise ProtocolError(f"a binary message of {n} items (at most {MAX_ITEMS})")
    return n


def _rows(data: bytes, at: int, n: int, width: int, what: str) -> np.ndarray:
    """`n` rows of `width` int32 from `at`, none negative."""
    end = at + 4 * n * width
    if end > len(data):
        raise ProtocolError(f"a binary message's {what} run past its end")
    rows = np.frombuffer(data, _I32, n * width, at).reshape(n, width)
    if n and rows.min() < 0:
        raise ProtocolError(f"a binary message's {what} hold a negative count, sid or seq")
    return rows


def _total(counts: np.ndarray) -> int:
    return int(counts.sum(dtype=np.int64))  # int32 counts may add up past 2**31


def _audio(data: bytes, at: int, samples: int, what: str) -> np.ndarray:
    """The int16 audio that ends the message, as float32 k / 32768 (what the line makes of
    it is the int16 sent): one conversion for the whole message, each item a slice."""
    end = at + 2 * samples
    if end > len(data):
        raise ProtocolError(f"{what} samples run past the payload")
    if end < len(data):
        raise ProtocolError(f"{what} payload is longer than its items")
    audio = np.frombuffer(data, _I16, samples, at).astype(np.float32)
    return np.multiply(audio, _TO_FLOAT, out=audio)


def unpack_audio(data: bytes) -> list[tuple[int, int, np.ndarray]]:
    n = _items(data, AUDIO)
    table = _rows(data, _PREFIX.size, n, ITEM, "audio items")
    audio = _audio(data, _PREFIX.size + 4 * ITEM * n, _total(table[:, 2]), "an audio message's")
    out, at = [], 0
    for sid, seq, samples in table.tolist():
        out.append((sid, seq, audio[at:at + samples]))
        at += samples
    return out


def unpack_results(data: bytes) -> list[tuple[int, int, list[VoiceChunk]]]:
    n = _items(data, RESULTS)
    at = _PREFIX.size
    table = _rows(data, at, n, ITEM, "results items")
    at += 4 * ITEM * n
    m = _total(table[:, 2])
    rows = _rows(data, at, m, CHUNK, "chunks")
    at += 4 * CHUNK * m
    if m and rows[:, 3].max() > 1:
        raise ProtocolError("a chunk's dropped flag is not 0 or 1")
    k = _total(rows[:, :2])
    if at + 4 * k > len(data):
        raise ProtocolError("a results message's ids run past its end")
    ids = struct.unpack_from(f"<{k}i", data, at)  # a tuple: each chunk's ids a slice; any int32 (-1: silent)
    audio = _audio(data, at + 4 * k, _total(rows[:, 2]), "a results message's")
    return _results(table.tolist(), rows.tolist(), ids, audio)


def _results(table: list, rows: list, ids: tuple[int, ...],
             audio: np.ndarray) -> list[tuple[int, int, list[VoiceChunk]]]:
    """The checked tables as VoiceChunks: each a slice of the ids and of the audio."""
    out, r, i, p = [], 0, 0, 0
    for sid, seq, count in table:
        chunks = []
        for text, speech, samples, dropped in rows[r:r + count]:
            j, e = i + text, i + text + speech
            chunks.append(VoiceChunk(ids[i:j], ids[j:e], audio[p:p + samples], dropped == 1))
            i, p = e, p + samples
        r += count
        out.append((sid, seq, chunks))
    return out


# ---- batching ---------------------------------------------------------------------------------

def audio_bytes(item: tuple[int, int, np.ndarray]) -> int:
    return 2 * len(item[2])


def result_bytes(item: tuple[int, int, list[VoiceChunk]]) -> int:
    return 2 * sum([len(c.pcm) for c in item[2]])  # a list: cheaper than a generator for a chunk or two


T = TypeVar("T")


def pieces(items: list[T], nbytes: Callable[[T], int], limit: int | None = None) -> Iterator[list[T]]:
    """`items` in order, cut into runs of at most `limit` (PIECE_BYTES) audio bytes, one
    item at least: one message each."""
    limit = PIECE_BYTES if limit is None else limit
    piece: list[T] = []
    size = 0
    for item in items:
        n = nbytes(item)
        if piece and size + n > limit:
            yield piece
            piece, size = [], 0
        piece.append(item)
        size += n
    if piece:
        yield piece


class PerPass(Generic[T]):
    """Items added during one pass of the event loop go out together: `send(items)` runs
    once, at the end of the pass (both sides: every session's chunk, or result, that is
    ready in the same moment travels in the same messages)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Callable[[list[T]], None]) -> None:
        self._loop = loop
        self._send = send
        self._items: list[T] = []
        self._scheduled = False

    def add(self, item: T) -> None:
        self._items.append(item)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        items, self._items = self._items, []
        if items:
            self._send(items)
