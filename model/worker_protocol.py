"""The bridge-worker protocol's messages (docs/worker.md), version 2, over one WebSocket
per bridge-worker pair, many sessions on it.

Control messages are JSON text frames `{"t": kind, ...}`. Audio, both ways, travels in
binary frames, each carrying the chunks of many sessions (what was ready in the same
moment, cut into messages of at most `PIECE_BYTES` of audio so that the receiver starts
on the first while the rest is still being packed and sent):

    b"DL" | version (u8) | kind (u8) | header length (u32, little-endian) | JSON header | payload

- kind AUDIO (bridge to worker): header `{"items": [[sid, seq, samples], ...]}`, payload
  each item's 16 kHz audio as int16 little-endian, in order (callers' audio is 16-bit
  already: int16 halves the bytes and loses nothing);
- kind RESULTS (worker to bridge): header `{"items": [[sid, seq, [[text_ids, speech_codes,
  dropped, samples], ...]], ...]}`, payload every chunk's audio at the decoder's rate as
  int16 little-endian, in order, made by `line_pcm16`: exactly the 16 bits the bridge's
  line makes of the decoder's float32 audio (bridge/line_audio.py), so that a caller hears
  the same samples from a remote engine as from a local one, for half the bytes.
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

VERSION = 2
AUDIO = 1
RESULTS = 2
_MAGIC = b"DL"
_PREFIX = struct.Struct("<2sBBI")
MAX_ITEMS = 4096  # sessions in one message: far above any worker's slots
# Audio bytes per binary message (one item at least): a tick of 256 sessions is 1.6 MB up
# and 2.3 MB down; in pieces this size the receiver unpacks the first while the sender
# packs the next (on another core), and each piece stays in the CPU's cache. Measured
# (256 sessions aligned, bench/worker.py's stand-in): 64-128 kB best, 256 kB+ slower.
PIECE_BYTES = 1 << 17
_INT = {int}
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
    scaled = pcm * 32768.0
    np.clip(scaled, -32768, 32767, out=scaled)  # in place: one temporary, not two
    return scaled.astype(np.int16)


def _pack(kind: int, header: dict, payload: np.ndarray) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    # One copy of the audio, into the message itself (join takes the array's buffer).
    return b"".join((_PREFIX.pack(_MAGIC, VERSION, kind, len(head)), head, payload))


def _unpack(data: bytes, kind: int) -> tuple[list, memoryview]:
    if len(data) < _PREFIX.size:
        raise ProtocolError("a binary message shorter than its prefix")
    magic, version, got, n = _PREFIX.unpack_from(data)
    if magic != _MAGIC:
        raise ProtocolError("a binary message without the DL prefix")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}")
    if got != kind:
        raise ProtocolError(f"binary message kind {got}, expected {kind}")
    end = _PREFIX.size + n
    if end > len(data):
        raise ProtocolError("a binary message's header length runs past its end")
    try:
        items = json.loads(bytes(data[_PREFIX.size:end]))["items"]
    except (ValueError, KeyError, TypeError):
        raise ProtocolError("a binary message's header is not valid JSON with items") from None
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise ProtocolError("a binary message's items are not a list of at most 4096")
    return items, memoryview(data)[end:]


def _is_int(x: object) -> bool:
    return type(x) is int  # JSON gives int, float, bool, str, None, list or dict: not bool


def _ints(x: object) -> bool:
    return type(x) is list and _INT.issuperset(map(type, x))  # one C loop, not one call per value


def audio_bytes(item: tuple[int, int, np.ndarray]) -> int:
    return 2 * len(item[2])


def result_bytes(item: tuple[int, int, list[VoiceChunk]]) -> int:
    return 2 * sum(len(c.pcm) for c in item[2])


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


def pack_audio(items: list[tuple[int, int, np.ndarray]]) -> bytes:
    """(sid, seq, float32 audio in [-1, 1] from int16 frames) per session. One conversion
    over every session's audio at once: per-session numpy calls cost more than the data."""
    header = {"items": [[sid, seq, len(a)] for sid, seq, a in items]}
    audio = np.concatenate([a for _, _, a in items], dtype=np.float32) if items else np.zeros(0, np.float32)
    # In place on the message's own copy: temporaries of this size (~250 kB) are fresh
    # pages from the kernel each time (malloc gives them back between ticks).
    np.multiply(audio, np.float32(32768.0), out=audio)
    np.rint(audio, out=audio)
    np.clip(audio, -32768, 32767, out=audio)
    return _pack(AUDIO, header, audio.astype("<i2"))


def unpack_audio(data: bytes) -> list[tuple[int, int, np.ndarray]]:
    items, payload = _unpack(data, AUDIO)
    out, at = [], 0
    for item in items:
        if not (_ints(item) and len(item) == 3):
            raise ProtocolError("an audio item is not [sid, seq, samples]")
        sid, seq, n = item
        if n < 0 or at + 2 * n > len(payload):
            raise ProtocolError("an audio item's samples run past the payload")
        out.append((sid, seq, at // 2, n))
        at += 2 * n
    if at != len(payload):
        raise ProtocolError("an audio message's payload is longer than its items")
    # One conversion for the whole message; each session gets its own slice of it.
    audio = np.multiply(np.frombuffer(payload, dtype="<i2"), _TO_FLOAT, dtype=np.float32)
    return [(sid, seq, audio[start:start + n]) for sid, seq, start, n in out]


def pack_results(items: list[tuple[int, int, list[VoiceChunk]]]) -> bytes:
    header, pcm = [], []
    for sid, seq, chunks in items:
        header.append([sid, seq, [[c.text_ids, c.speech_codes, bool(c.dropped), len(c.pcm)] for c in chunks]])
        pcm += [c.pcm for c in chunks]
    audio = line_pcm16(np.concatenate(pcm)) if pcm else np.zeros(0, np.int16)
    return _pack(RESULTS, {"items": header}, audio.astype("<i2", copy=False))


def unpack_results(data: bytes) -> list[tuple[int, int, list[VoiceChunk]]]:
    items, payload = _unpack(data, RESULTS)
    out, at = [], 0
    for item in items:
        if not (type(item) is list and len(item) == 3 and _is_int(item[0]) and _is_int(item[1])
                and type(item[2]) is list):
            raise ProtocolError("a results item is not [sid, seq, [[text, speech, dropped, samples], ...]]")
        sid, seq, chunks = item
        got = []
        for chunk in chunks:
            if not (type(chunk) is list and len(chunk) == 4 and _ints(chunk[0]) and _ints(chunk[1])
                    and type(chunk[2]) is bool and _is_int(chunk[3])):
                raise ProtocolError("a result is not [text_ids, speech_codes, dropped, samples]")
            text_ids, speech_codes, dropped, n = chunk
            if n < 0 or at + 2 * n > len(payload):
                raise ProtocolError("a result's samples run past the payload")
            got.append((tuple(text_ids), tuple(speech_codes), dropped, at // 2, n))
            at += 2 * n
        out.append((sid, seq, got))
    if at != len(payload):
        raise ProtocolError("a results message's payload is longer than its items")
    # One conversion for the whole message (float32, k / 32768: what the line makes of it
    # is the int16 sent); each chunk a slice.
    audio = np.multiply(np.frombuffer(payload, dtype="<i2"), _TO_FLOAT, dtype=np.float32)
    return [(sid, seq, [VoiceChunk(text, speech, audio[start:start + n], dropped)
                        for text, speech, dropped, start, n in got]) for sid, seq, got in out]


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
