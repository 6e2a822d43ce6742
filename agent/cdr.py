"""Call detail records (CDRs): one JSON object per call that ended or was refused, the
same object in the daily file (agent/cdr_file.py), the Redis stream (agent/cdr_redis.py)
and the `call.ended` webhook (agent/webhooks.py). docs/cdr.md is the schema.

A `CallDetail` rides on each `CallSession` and gathers, on the event loop, what the
session's own counters do not hold: wall-clock times, the wire facts the transport knows
(udp/tcp/webrtc, codec, the INVITE's final SIP status) and per-call tallies of events
(DTMF digits, barge-ins, re-homes, first-audio latencies). Nothing here does I/O, and the
event hook is a few comparisons: it runs for every event a call emits.

Every field of SCHEMA_VERSION 1 is always present (null when unknown); a change that
removes or renames a field bumps the version. `quality` is the call's line quality
(agent/quality.py builds it); null for refused calls.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .call import CallInfo

__all__ = ["SCHEMA_VERSION", "CallDetail", "END_REASONS", "end_reason", "parties", "call_record",
           "refused_record", "iso_utc", "encode"]

SCHEMA_VERSION = 1
_MAX_LATENCIES = 4096  # first-audio samples kept per call (one per assistant turn)

# What each way a call can end (the store's end reason) counts as in a CDR; anything
# else is "error". Bounded: dashboards and billing group by it.
_CATEGORY = {
    "remote-hangup": "remote-hangup",
    "cancelled": "cancelled",
    "operator": "operator-hangup",
    "transferred": "transfer",
    "refused": "refused",
    "drain-timeout": "drain",
    "shutdown": "drain",
    "media-timeout": "timeout",
    "no-ack": "timeout",
    "ice-timeout": "timeout",
    "rtp-timeout": "timeout",
    "busy": "not-answered",
    "declined": "not-answered",
    "no-answer": "not-answered",
    "connection-lost": "connection-lost",
    "lease-lost": "lease-lost",
    "lease-expired": "lease-lost",
    "worker-lost": "worker-lost",
}
END_REASONS = tuple(sorted(set(_CATEGORY.values()) | {"error"}))


def end_reason(detail: str) -> str:
    """The CDR's bounded `end_reason` for a call's own (free-form) end reason."""
    return _CATEGORY.get(detail, "error")


def iso_utc(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class CallDetail:
    """A call's CDR facts beyond the session's frame counters. Event loop only."""

    invited_at: float = field(default_factory=time.time)
    answered_at: float | None = None
    ended_at: float | None = None
    codec: str | None = None
    sip_code: int | None = None  # the INVITE's final status (200 answered); None for WebRTC
    frames_dropped: int = 0  # caller frames the transport or the held session threw away
    dtmf_digits: int = 0
    bargeins: int = 0
    rehomes: int = 0
    first_audio_ms: list[float] = field(default_factory=list)
    recording: str | None = None  # the call's recording file (agent/recorder.py), once it has audio

    def on_event(self, kind: str, data: dict) -> None:
        if kind == "latency":
            ms = data.get("first_audio_ms")
            if ms is not None and len(self.first_audio_ms) < _MAX_LATENCIES:
                self.first_audio_ms.append(float(ms))
        elif kind == "barge-in":
            self.bargeins += 1
        elif kind == "rehomed":
            self.rehomes += 1
        elif kind == "dtmf":
            self.dtmf_digits += len(data.get("digits", ""))


def _p50(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _base(call_id: str, *, direction: str, from_: str | None, to: str | None, transport: str, bridge: str,
          invited_at: float, ended_at: float) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "call_id": call_id, "direction": direction, "from": from_ or None,
            "to": to or None, "transport": transport, "codec": None, "bridge": bridge, "worker": None,
            "invite_at": iso_utc(invited_at), "answer_at": None, "end_at": iso_utc(ended_at),
            "setup_seconds": None, "duration_seconds": 0.0}


def parties(info: CallInfo) -> dict[str, Any]:
    """Who called whom, over what: the fields a CDR and `call.started` share."""
    outbound = info.direction == "out"
    return {"direction": info.direction, "from": (info.local if outbound else info.remote) or None,
            "to": (info.remote if outbound else info.local) or None, "transport": info.wire or str(info.transport)}


def call_record(info: CallInfo, detail: CallDetail, *, bridge: str, worker: str | None, reason: str,
                frames_in: int, frames_out: int, frames_late: int, frames_lost: int,
                quality: dict | None = None) -> dict[str, Any]:
    """The CDR of an admitted call that has ended (`detail.ended_at` set)."""
    d = detail
    ended = d.ended_at if d.ended_at is not None else time.time()
    p = parties(info)
    record = _base(info.call_id, direction=p["direction"], from_=p["from"], to=p["to"], transport=p["transport"],
                   bridge=bridge, invited_at=d.invited_at, ended_at=ended)
    answered = d.answered_at
    record.update({
        "codec": d.codec, "worker": worker or None, "answer_at": iso_utc(answered),
        "setup_seconds": round(answered - d.invited_at, 3) if answered is not None else None,
        "duration_seconds": round(max(0.0, ended - answered), 3) if answered is not None else 0.0,
        "end_reason": end_reason(reason), "end_detail": reason, "sip_code": d.sip_code,
        "frames": {"in": frames_in, "out": frames_out, "late": frames_late, "lost": frames_lost,
                   "dropped": d.frames_dropped},
        "first_audio_ms": ({"p50": round(_p50(d.first_audio_ms), 1), "max": round(max(d.first_audio_ms), 1),
                            "count": len(d.first_audio_ms)} if d.first_audio_ms else None),
        "barge_ins": d.bargeins, "dtmf_digits": d.dtmf_digits, "rehomes": d.rehomes, "quality": quality,
        "recording": d.recording,
    })
    return record


def refused_record(info: CallInfo, *, bridge: str, sip_code: int | None, detail: str,
                   at: float | None = None) -> dict[str, Any]:
    """The CDR of a call refused before it was answered (nothing was admitted)."""
    now = time.time() if at is None else at
    p = parties(info)
    record = _base(info.call_id, direction=p["direction"], from_=p["from"], to=p["to"], transport=p["transport"],
                   bridge=bridge, invited_at=now, ended_at=now)
    record.update({"end_reason": "refused", "end_detail": detail, "sip_code": sip_code,
                   "frames": {"in": 0, "out": 0, "late": 0, "lost": 0, "dropped": 0}, "first_audio_ms": None,
                   "barge_ins": 0, "dtmf_digits": 0, "rehomes": 0, "quality": None,
                   "recording": None})
    return record


def encode(record: dict[str, Any]) -> str:
    """One JSON line (no newline): the wire form of a CDR, everywhere it goes."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)
