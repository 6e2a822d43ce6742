"""The store's wire format and value checks: no I/O, so these run without Redis."""

from __future__ import annotations

import dataclasses
import math

import pytest

from agent.errors import CorruptRecord, InvalidConfig
from agent.store import CallEvent, CallRecord, CallState, StoreConfig, Transport
from agent.store_codec import decode_event, decode_record, encode_event, encode_record


def full_record() -> CallRecord:
    return CallRecord(call_id="a84b4c76e66710@pc33.example.org", transport=Transport.WEBRTC,
                      remote="sip:zoë@例え.jp", started_at=1_700_000_000.123456789,
                      last_activity=1_700_000_010.5, state=CallState.ENDED, bridge="b1",
                      worker="w-3", frames_in=123, frames_out=120, frames_late=3,
                      end_reason="hangup", ended_at=1_700_000_011.25)


def test_record_round_trip_is_exact():
    for record in (full_record(), CallRecord.new("x", "sip", "", now=5)):
        fields = encode_record(record)
        assert all(isinstance(v, str) for v in fields.values())
        assert decode_record({**fields, "rev": "7", "owner": "abc"}) == record


@pytest.mark.parametrize("change, why", [
    ({"v": "2"}, "version"),
    ({"state": "flying"}, "flying"),
    ({"frames_in": "-1"}, "frames_in"),
    ({"frames_in": "x"}, "invalid literal"),
    ({"started_at": "nan"}, "finite"),
    ({"end_reason": ""}, "end_reason"),
])
def test_corrupt_records_are_named(change, why):
    fields = {**encode_record(full_record()), **change}
    with pytest.raises(CorruptRecord, match=why) as err:
        decode_record(fields, "duplexline:call:x")
    assert err.value.what == "duplexline:call:x"


def test_missing_field():
    fields = encode_record(full_record())
    del fields["worker"]
    with pytest.raises(CorruptRecord, match="worker"):
        decode_record(fields)


def test_event_round_trip_and_checks():
    event = CallEvent("dtmf", {"digit": "#", "ms": 120, "nested": {"a": [1, None]}}, 12.5)
    assert decode_event(encode_event(event)) == event
    with pytest.raises(CorruptRecord):
        decode_event({**encode_event(event), "data": "[1]"})
    with pytest.raises(CorruptRecord):
        decode_event({**encode_event(event), "data": "{"})
    with pytest.raises(ValueError, match="JSON"):
        CallEvent("x", {"bad": object()})
    with pytest.raises(ValueError, match="JSON"):
        CallEvent("x", {"bad": math.nan})
    with pytest.raises(ValueError):
        CallEvent("")


@pytest.mark.parametrize("change", [
    {"call_id": ""}, {"call_id": "has space"}, {"call_id": "x" * 300},
    {"transport": "pigeon"}, {"frames_late": 1.5}, {"frames_out": True},
    {"started_at": -1.0}, {"state": CallState.ACTIVE},  # live with an end_reason
])
def test_record_rejects_bad_values(change):
    with pytest.raises(ValueError):
        dataclasses.replace(full_record(), **change)


@pytest.mark.parametrize("change, field", [
    ({"lease_ttl": 0}, "lease_ttl"),
    ({"renew_interval": 10.0}, "renew_interval"),  # more than half the 15 s TTL
    ({"retention": -1}, "retention"),
    ({"events_maxlen": 0}, "events_maxlen"),
    ({"key_prefix": "a b"}, "key_prefix"),
    ({"op_timeout": math.inf}, "op_timeout"),
])
def test_config_names_the_bad_field(change, field):
    with pytest.raises(InvalidConfig) as err:
        StoreConfig(**change)
    assert err.value.field == field
