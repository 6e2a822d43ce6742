"""Wire format of the session store: `CallRecord` <-> Redis hash fields, `CallEvent` <->
Redis stream entry fields, and the Lua scripts that write them inside Redis. Pure
functions and constants, no I/O; the Redis store is the only user.

Format (version "1"), every value a string:
- record hash: `v`, `call_id`, `transport`, `remote`, `state`, `bridge`, `worker`,
  `started_at`, `last_activity`, `ended_at` (float epoch seconds as `repr`, exact round
  trip; "" when unset), `frames_in`, `frames_out`, `frames_late` (decimal ints),
  `end_reason` ("" when unset). Other fields (the store's `rev` and `owner`) are
  ignored, so a newer writer may add fields without breaking an older reader.
- event entry: `v`, `kind`, `time`, `data` (compact JSON object).

The Lua scripts at the end run in Redis and write `state`, `end_reason`, `ended_at`
(the reaper) and the store's `rev` and `owner` themselves: change them together with
the Python half.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from .errors import CorruptRecord
from .store import CallEvent, CallRecord

__all__ = ["VERSION", "encode_record", "decode_record", "encode_event", "decode_event",
           "encode_time", "WRITE_SCRIPT", "APPEND_SCRIPT", "REAP_SCRIPT"]

VERSION = "1"

_RECORD_FIELDS = ("call_id", "transport", "remote", "state", "bridge", "worker",
                  "started_at", "last_activity", "frames_in", "frames_out", "frames_late",
                  "end_reason", "ended_at")


def encode_time(t: float) -> str:
    # repr of a float round-trips exactly; ints are widened so the text is always a float.
    return repr(float(t))


def encode_record(record: CallRecord) -> dict[str, str]:
    return {
        "v": VERSION,
        "call_id": record.call_id,
        "transport": record.transport.value,
        "remote": record.remote,
        "state": record.state.value,
        "bridge": record.bridge,
        "worker": record.worker,
        "started_at": encode_time(record.started_at),
        "last_activity": encode_time(record.last_activity),
        "frames_in": str(record.frames_in),
        "frames_out": str(record.frames_out),
        "frames_late": str(record.frames_late),
        "end_reason": record.end_reason or "",
        "ended_at": "" if record.ended_at is None else encode_time(record.ended_at),
    }


def _time(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"time {text!r} is not finite")
    return value


def decode_record(fields: Mapping[str, str], what: str = "call record") -> CallRecord:
    """CorruptRecord (naming `what`, e.g. the Redis key) if the fields are not a record."""
    if fields.get("v") != VERSION:
        raise CorruptRecord(what, f"format version {fields.get('v')!r}, expected {VERSION!r}")
    missing = [name for name in _RECORD_FIELDS if name not in fields]
    if missing:
        raise CorruptRecord(what, f"missing fields {', '.join(missing)}")
    try:
        return CallRecord(
            call_id=fields["call_id"],
            transport=fields["transport"],  # type: ignore[arg-type]  # coerced to the enum
            remote=fields["remote"],
            state=fields["state"],  # type: ignore[arg-type]
            bridge=fields["bridge"],
            worker=fields["worker"],
            started_at=_time(fields["started_at"]),
            last_activity=_time(fields["last_activity"]),
            frames_in=int(fields["frames_in"]),
            frames_out=int(fields["frames_out"]),
            frames_late=int(fields["frames_late"]),
            end_reason=fields["end_reason"] or None,
            ended_at=_time(fields["ended_at"]) if fields["ended_at"] else None,
        )
    except (ValueError, TypeError) as exc:
        raise CorruptRecord(what, str(exc)) from None


def encode_event(event: CallEvent) -> dict[str, str]:
    """ValueError if `data` is not JSON (NaN included): a caller bug, caught before the
    event is queued rather than when it is flushed."""
    try:
        data = json.dumps(event.data, separators=(",", ":"), allow_nan=False,
                          ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"CallEvent.data of {event.kind!r} is not JSON: {exc}") from None
    return {"v": VERSION, "kind": event.kind, "time": encode_time(event.time), "data": data}


def decode_event(fields: Mapping[str, str], what: str = "call event") -> CallEvent:
    if fields.get("v") != VERSION:
        raise CorruptRecord(what, f"format version {fields.get('v')!r}, expected {VERSION!r}")
    try:
        data: Any = json.loads(fields["data"])
        if not isinstance(data, dict):
            raise ValueError("data is not a JSON object")
        return CallEvent(kind=fields["kind"], data=data, time=_time(fields["time"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptRecord(what, str(exc) or type(exc).__name__) from None


# Server-side halves of the format: Lua scripts the Redis store runs, kept here because
# they read and write the fields above by name (state, end_reason, ended_at) next to
# the store's own `rev` and `owner`.

# KEYS: call hash, live zset, calls zset, event stream.
# ARGV: id, mode ("put" | "write"), rev, lease expiry, retention ms, now, ended ("1"|"0"),
#       owner (this store's uuid), then the record's field/value pairs.
# A put over an ended record (a reused id) starts afresh; a put over a live record of
# this store is a replay (the first reply was lost) and acts as a write.
# Returns 1 (written, or Redis already has a newer rev), 0 (Redis has it ended: not
# written), -1 (put found the id live under another store: not written).
WRITE_SCRIPT = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'rev', 'owner')
local live = cur[1] and cur[1] ~= 'ended'
if ARGV[2] == 'put' and not (live and cur[3] == ARGV[8]) then
  if live then return -1 end
  redis.call('DEL', KEYS[1], KEYS[4])
else
  if cur[1] == 'ended' then return 0 end
  if cur[2] and tonumber(cur[2]) >= tonumber(ARGV[3]) then return 1 end
end
redis.call('HSET', KEYS[1], 'rev', ARGV[3], 'owner', ARGV[8], unpack(ARGV, 9))
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
if ARGV[7] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('PEXPIRE', KEYS[4], ARGV[5]) end
else
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  redis.call('PERSIST', KEYS[1])
end
return 1
"""

# KEYS: call hash, event stream. ARGV: must exist ("1"|"0"), maxlen, then event fields.
# The stream expires with its record. Returns 0 if the record had to exist and did not.
APPEND_SCRIPT = """
if ARGV[1] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

# KEYS: live zset, calls zset. ARGV: now, batch, call key prefix, retention ms, reason,
# calls-index cutoff. Field names and formats are store_codec's. Returns reaped ids.
REAP_SCRIPT = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[3] .. id
  local cur = redis.call('HMGET', key, 'state', 'rev')
  if cur[1] and cur[1] ~= 'ended' then
    local rev = (tonumber(cur[2]) or 0) + 1
    redis.call('HSET', key, 'state', 'ended', 'end_reason', ARGV[5], 'ended_at', ARGV[1],
               'rev', rev)
    redis.call('PEXPIRE', key, ARGV[4])
    table.insert(out, id)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
return out
"""
