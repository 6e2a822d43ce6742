"""The bridge-worker protocol's messages (docs/worker.md), version 1, over one WebSocket
per bridge-worker pair, many sessions on it.

Control messages are JSON text frames `{"t": kind, ...}`. Audio, both ways, travels in
binary frames, each carrying every session's chunk that was ready in the same moment
(one message per tick, not one per call per frame):

    b"DL" | version (u8) | kind (u8) | header length (u32, little-endian) | JSON header | payload

- kind AUDIO (bridge to worker): header `{"items": [[sid, seq, samples], ...]}`, payload
  each item's 16 kHz audio as int16 little-endian, in order (callers' audio is 16-bit
  already: int16 halves the bytes and loses nothing);
- kind RESULTS (worker to bridge): header `{"items": [[sid, seq, [[text_ids, speech_codes,
  dropped, samples], ...]], ...]}`, payload every chunk's audio as float32 little-endian
  at the decoder's rate, in order (what the decoder made, bit for bit).
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Callable, Generic, TypeVar

import numpy as np

from .voice import VoiceChunk

__all__ = ["PerPass", "VERSION", "AUDIO", "RESULTS", "ProtocolError", "control", "parse_control", "pack_audio",
           "unpack_audio", "pack_results", "unpack_results"]

VERSION = 1
AUDIO = 1
RESULTS = 2
_MAGIC = b"DL"
_PREFIX = struct.Struct("<2sBBI")
MAX_ITEMS = 4096  # sessions in one message: far above any worker's slots


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


def _pack(kind: int, header: dict, payload: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(_MAGIC, VERSION, kind, len(head)) + head + payload


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
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(x: object) -> bool:
    return isinstance(x, list) and all(_is_int(v) for v in x)


def pack_audio(items: list[tuple[int, int, np.ndarray]]) -> bytes:
    """(sid, seq, float32 audio in [-1, 1] from int16 frames) per session. One conversion
    over every session's audio at once: per-session numpy calls cost more than the data."""
    header = {"items": [[sid, seq, len(a)] for sid, seq, a in items]}
    audio = np.concatenate([a for _, _, a in items]) if items else np.zeros(0, np.float32)
    pcm = np.clip(np.round(audio * np.float32(32768.0)), -32768, 32767).astype("<i2")
    return _pack(AUDIO, header, pcm.tobytes())


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
    audio = np.frombuffer(payload, dtype="<i2").astype(np.float32) * np.float32(1.0 / 32768.0)
    return [(sid, seq, audio[start:start + n]) for sid, seq, start, n in out]


def pack_results(items: list[tuple[int, int, list[VoiceChunk]]]) -> bytes:
    header, pcm = [], []
    for sid, seq, chunks in items:
        header.append([sid, seq, [[list(c.text_ids), list(c.speech_codes), bool(c.dropped), len(c.pcm)]
                                  for c in chunks]])
        pcm += [np.asarray(c.pcm, dtype="<f4") for c in chunks]
    return _pack(RESULTS, {"items": header}, np.concatenate(pcm).tobytes() if pcm else b"")


def unpack_results(data: bytes) -> list[tuple[int, int, list[VoiceChunk]]]:
    items, payload = _unpack(data, RESULTS)
    out, at = [], 0
    for item in items:
        if not (isinstance(item, list) and len(item) == 3 and _is_int(item[0]) and _is_int(item[1])
                and isinstance(item[2], list)):
            raise ProtocolError("a results item is not [sid, seq, [[text, speech, dropped, samples], ...]]")
        sid, seq, chunks = item
        got = []
        for chunk in chunks:
            if not (isinstance(chunk, list) and len(chunk) == 4 and _ints(chunk[0]) and _ints(chunk[1])
                    and isinstance(chunk[2], bool) and _is_int(chunk[3])):
                raise ProtocolError("a result is not [text_ids, speech_codes, dropped, samples]")
            text_ids, speech_codes, dropped, n = chunk
            if n < 0 or at + 4 * n > len(payload):
                raise ProtocolError("a result's samples run past the payload")
            got.append((tuple(text_ids), tuple(speech_codes), dropped, at // 4, n))
            at += 4 * n
        out.append((sid, seq, got))
    if at != len(payload):
        raise ProtocolError("a results message's payload is longer than its items")
    # One copy of the whole message's audio (writable, native float32); each chunk a slice.
    audio = np.frombuffer(payload, dtype="<f4").astype(np.float32)
    return [(sid, seq, [VoiceChunk(text, speech, audio[start:start + n], dropped)
                        for text, speech, dropped, start, n in got]) for sid, seq, got in out]


T = TypeVar("T")


class PerPass(Generic[T]):
    """Items added during one pass of the event loop go out together: `send(items)` runs
    once, at the end of the pass (both sides: every session's chunk, or result, that is
    ready in the same moment travels in one message)."""

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
