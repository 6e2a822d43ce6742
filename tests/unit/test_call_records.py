"""Call records without a network: the webhook signature against RFC 2104 computed by hand,
the CDR file's daily rotation with an injected clock (and its counted failures), the CDR's
fields, and the settings and routes that configure them."""

from __future__ import annotations

import argparse
import asyncio
import calendar
import hashlib
import json
import re
import time

import pytest
from prometheus_client import CollectorRegistry

from agent.call import CallInfo
from agent.cdr import CallDetail, call_record, end_reason, iso_utc, refused_record
from agent.cdr_file import CdrFile
from agent.record_metrics import RecordMetrics
from agent.store import Transport
from agent.webhooks import sign
from bridge.errors import ConfigError
from bridge.settings import add_serve_arguments, settings_from
from bridge.sip.routes import RouteTable


def _hmac_sha256_by_hand(key: bytes, message: bytes) -> str:
    """RFC 2104, spelled out: H((K ^ opad) || H((K ^ ipad) || m)), 64-byte blocks."""
    key = key.ljust(64, b"\0") if len(key) <= 64 else hashlib.sha256(key).digest().ljust(64, b"\0")
    inner = hashlib.sha256(bytes(k ^ 0x36 for k in key) + message).digest()
    return hashlib.sha256(bytes(k ^ 0x5C for k in key) + inner).hexdigest()


@pytest.mark.parametrize("secret", ["s", "a-much-longer-secret-" * 5])
def test_signature_is_hmac_sha256_of_timestamp_dot_body(secret):
    body = json.dumps({"call_id": "c1", "end_reason": "remote-hangup", "from": "sip:ü@x"}).encode()
    got = sign(secret, "1765100000", body)
    assert got == _hmac_sha256_by_hand(secret.encode(), b"1765100000." + body)
    assert re.fullmatch(r"[0-9a-f]{64}", got)
    assert sign(secret, "1765100001", body) != got  # the timestamp is signed too


def _at(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))


def test_cdr_file_rotates_at_utc_midnight(tmp_path):
    registry = CollectorRegistry()
    metrics = RecordMetrics(registry)
    now = [_at("2026-12-07T23:59:59")]
    sink = CdrFile(tmp_path / "cdr", metrics, clock=lambda: now[0])

    async def body():
        await sink.start()
        sink.offer('{"n":1}')
        now[0] = _at("2026-12-08T00:00:00")
        sink.offer('{"n":2}')
        sink.offer('{"n":3}')
        await sink.close()

    asyncio.run(asyncio.wait_for(body(), 10))
    assert (tmp_path / "cdr/cdr-2026-12-07.jsonl").read_text() == '{"n":1}\n'
    assert (tmp_path / "cdr/cdr-2026-12-08.jsonl").read_text() == '{"n":2}\n{"n":3}\n'
    assert registry.get_sample_value("duplexline_cdr_records_total", {"sink": "file", "outcome": "written"}) == 3


def test_cdr_file_counts_a_full_queue_and_a_failed_write(tmp_path):
    registry = CollectorRegistry()
    metrics = RecordMetrics(registry)
    unstarted = CdrFile(tmp_path / "a", metrics, maxsize=1)  # no writer thread: the queue fills
    unstarted.offer("{}")
    unstarted.offer("{}")
    assert registry.get_sample_value("duplexline_cdr_records_total", {"sink": "file", "outcome": "queue_full"}) == 1

    now = [_at("2026-12-07T12:00:00")]
    sink = CdrFile(tmp_path / "b", metrics, clock=lambda: now[0])

    async def body():
        await sink.start()
        (tmp_path / "b/cdr-2026-12-08.jsonl").mkdir()  # tomorrow's file cannot be opened
        now[0] = _at("2026-12-08T12:00:00")
        sink.offer("{}")
        await sink.close()

    asyncio.run(asyncio.wait_for(body(), 10))
    assert registry.get_sample_value("duplexline_cdr_records_total", {"sink": "file", "outcome": "error"}) == 1


def test_an_unwritable_cdr_folder_stops_the_start(tmp_path):
    (tmp_path / "file").write_text("")
    sink = CdrFile(tmp_path / "file" / "cdr", RecordMetrics(CollectorRegistry()))
    with pytest.raises(OSError, match="--cdr-dir"):
        asyncio.run(sink.start())


def test_call_record_fields():
    info = CallInfo("c1", Transport.SIP, "sip:bob@example.org", "sip:alice@example.org", direction="out",
                    wire="tcp")
    detail = CallDetail(invited_at=1000.0, answered_at=1000.5, ended_at=1010.5, codec="g722", sip_code=200)
    for kind, data in [("latency", {"first_audio_ms": 300.0}), ("latency", {"response_ms": 5}),
                       ("latency", {"first_audio_ms": 500.0}), ("latency", {"first_audio_ms": 900.0}),
                       ("barge-in", {}), ("dtmf", {"digits": "12"}), ("rehomed", {"reason": "worker-lost"})]:
        detail.on_event(kind, data)
    cdr = call_record(info, detail, bridge="b1", worker="w7", reason="operator", frames_in=500, frames_out=499,
                      frames_late=2, frames_lost=1)
    assert (cdr["from"], cdr["to"], cdr["direction"]) == ("sip:alice@example.org", "sip:bob@example.org", "out")
    assert cdr["transport"] == "tcp" and cdr["worker"] == "w7" and cdr["codec"] == "g722"
    assert (cdr["setup_seconds"], cdr["duration_seconds"]) == (0.5, 10.0)
    assert cdr["invite_at"] == "1970-01-01T00:16:40.000Z" and cdr["end_at"] == iso_utc(1010.5)
    assert cdr["first_audio_ms"] == {"p50": 500.0, "max": 900.0, "count": 3}
    assert (cdr["barge_ins"], cdr["dtmf_digits"], cdr["rehomes"]) == (1, 2, 1)
    assert (cdr["end_reason"], cdr["end_detail"]) == ("operator-hangup", "operator")
    assert cdr["frames"] == {"in": 500, "out": 499, "late": 2, "lost": 1, "dropped": 0}
    refused = refused_record(CallInfo("c2", Transport.SIP, "sip:x@y", "bot"), bridge="b1", sip_code=404,
                             detail="no-route", at=1000.0)
    assert set(refused) == set(cdr)  # every field in every record: schema 1
    assert refused["answer_at"] is None and refused["worker"] is None


@pytest.mark.parametrize("raw, category", [("remote-hangup", "remote-hangup"), ("operator", "operator-hangup"),
                                           ("transferred", "transfer"), ("drain-timeout", "drain"),
                                           ("shutdown", "drain"), ("worker-lost", "worker-lost"),
                                           ("closed: 500 Oops", "error")])
def test_end_reasons_are_bounded(raw, category):
    assert end_reason(raw) == category


def _settings(argv, env=None):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from(parser.parse_args(argv), env or {})


def test_webhook_flag_repeats_and_reads_its_variable():
    s = _settings(["--webhook", "http://127.0.0.1:9/a", "--webhook", "https://h.example/b,http://[::1]:8/c"])
    assert s.records.webhooks == ("http://127.0.0.1:9/a", "https://h.example/b", "http://[::1]:8/c")
    s = _settings([], {"DUPLEXLINE_WEBHOOK": "http://a.example/x", "DUPLEXLINE_WEBHOOK_SECRET": "hush",
                       "DUPLEXLINE_WEBHOOK_RETRY_SECONDS": "5", "DUPLEXLINE_CDR_DIR": "/tmp/cdr"})
    assert s.records.webhooks == ("http://a.example/x",) and s.records.retry_seconds == 5
    assert s.records.secret == "hush" and "hush" not in repr(s)
    assert str(s.records.cdr_dir) == "/tmp/cdr"


@pytest.mark.parametrize("argv, env, named", [
    (["--webhook", "ftp://h.example/x"], {}, "--webhook"),
    (["--webhook", "http://"], {}, "--webhook"),
    ([], {"DUPLEXLINE_WEBHOOK": "http://h.example:99999/"}, "DUPLEXLINE_WEBHOOK"),
    (["--webhook-retry-seconds", "0"], {}, "webhook_retry_seconds"),
    (["--cdr-stream-maxlen", "-1"], {}, "--cdr-stream-maxlen"),
])
def test_bad_record_settings_name_themselves(argv, env, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        _settings(argv, env)


def test_routes_take_webhooks_and_refuse_bad_ones(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": [{"match": "bot", "webhooks": ["https://crm.example/h"]}]}))
    assert RouteTable.load(path, "echo").lookup("bot").webhooks == ("https://crm.example/h",)
    for bad, why in [({"match": "bot", "webhooks": ["nope"]}, "webhooks"),
                     ({"match": "bot", "webhooks": "https://x.example/"}, "list"),
                     ({"match": "bot", "webhook": ["https://x.example/"]}, "unknown keys")]:
        path.write_text(json.dumps({"routes": [bad]}))
        with pytest.raises(ConfigError, match=why):
            RouteTable.load(path, "echo")
