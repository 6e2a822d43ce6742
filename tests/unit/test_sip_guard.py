"""The front door's checks without a network: request grammar (bridge/sip/validate.py),
digest auth against RFC 2617's own worked example, replay and source binding, the failure
throttle's growing bans, and the pending-INVITE caps."""

from __future__ import annotations

import hashlib

import pytest

from bridge.sip.guard import AuthThrottle, DigestAuth, PendingInvites
from bridge.sip.message import parse
from bridge.sip.validate import check_request

_SDP = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def _invite(**replace: str) -> bytes:
    headers = {"Via": "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;rport", "Max-Forwards": "70",
               "From": "<sip:a@10.0.0.1>;tag=1", "To": "<sip:bot@10.0.0.2>", "Call-ID": "abc@10.0.0.1",
               "CSeq": "1 INVITE", "Contact": "<sip:a@10.0.0.1:5060>", "Content-Type": "application/sdp"}
    body = replace.pop("body", _SDP)
    uri = replace.pop("uri", "sip:bot@10.0.0.2")
    headers.update(replace)
    headers.setdefault("Content-Length", str(len(body)))
    lines = [f"INVITE {uri} SIP/2.0"] + [f"{k}: {v}" for k, v in headers.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def _check(data: bytes):
    return check_request(parse(data), len(data))


def test_a_plain_invite_passes():
    assert _check(_invite()) is None


@pytest.mark.parametrize("change,reason", [
    ({"From": "<sip:a@10.0.0.1>"}, "from"),
    ({"From": None}, "from"),
    ({"To": "garbage"}, "to"),
    ({"Contact": "*"}, "header"),
    ({"Contact": None}, "header"),
    ({"Call-ID": "has space"}, "call-id"),
    ({"Call-ID": "x" * 129}, "call-id"),
    ({"CSeq": "1 BYE"}, "cseq"),
    ({"CSeq": "\u00b2 INVITE"}, "cseq"),
    ({"Max-Forwards": "\u00b2"}, "max-forwards"),
    ({"Max-Forwards": "999"}, "max-forwards"),
    ({"Via": "SIP/2.0/UDP 10.0.0.1:\u00b2;branch=z9hG4bK1"}, "via"),
    ({"Via": "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1;rport=\u00b2"}, "via"),
    ({"Via": "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1;received=example.invalid"}, "via"),
    ({"Via": "SIP/2.0/UDP 10.0.0.1"}, "via"),
    ({"uri": "sip:" + "a" * 300 + "@10.0.0.2"}, "uri"),
    ({"uri": "http://10.0.0.2/"}, "uri"),
    ({"Content-Length": "9999"}, "content-length"),
    ({"body": "v=0\r\nm=video 1 RTP/AVP 31\r\n"}, "sdp"),
    ({"body": "hello"}, "sdp"),
    ({"body": _SDP.replace("IN IP4 10.0.0.1\r\nt", "IN IP4 nowhere\r\nt")}, "sdp"),
    ({"Content-Type": "text/plain"}, "content-type"),
    ({"X-Big": "y" * 3000}, "size"),
])
def test_malformed_requests_are_named_by_reason(change, reason):
    problem = _check(_invite(**change))
    assert problem is not None and problem.reason == reason, problem


def test_rfc2617_worked_example_is_accepted_once():
    """RFC 2617 §3.5: Mufasa / "Circle Of Life" gives response 6629fae4... for GET."""
    auth = DigestAuth("Mufasa", "Circle Of Life", realm="testrealm@host.com")
    auth._nonce_ok = lambda nonce, source, now: (True, True)  # the RFC's nonce is not one of ours
    header = ('Digest username="Mufasa", realm="testrealm@host.com", '
              'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", qop=auth, nc=00000001, '
              'cnonce="0a4f113b", response="6629fae49393a05397450978507c4ef1", opaque="5ccc069c403ebaf9f0171e9517f40e41"')
    msg = parse(b"GET /dir/index.html SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nCall-ID: 1\r\n"
                b"Authorization: " + header.encode() + b"\r\n\r\n")
    assert auth.check(msg, "10.0.0.1").ok
    replay = auth.check(msg, "10.0.0.1")  # the same nonce count again: a captured header
    assert not replay.ok and replay.status == 401 and replay.reason == "replay"


def _answer(auth: DigestAuth, source: str, *, uri: str = "sip:bot@10.0.0.2", nc: int = 1,
            password: str = "pw", nonce: str | None = None) -> bytes:
    nonce = nonce or auth.nonce(source)
    ha1 = hashlib.md5(f"bob:duplexline:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"INVITE:{uri}".encode()).hexdigest()
    resp = hashlib.md5(f"{ha1}:{nonce}:{nc:08x}:c:auth:{ha2}".encode()).hexdigest()
    return _invite(Authorization=f'Digest username="bob", realm="duplexline", nonce="{nonce}", uri="{uri}", '
                                 f'qop=auth, nc={nc:08x}, cnonce="c", response="{resp}"')


def test_nonces_are_bound_to_the_source_and_the_request_uri():
    auth = DigestAuth("bob", "pw")
    nonce = auth.nonce("10.0.0.1")
    assert auth.check(parse(_answer(auth, "10.0.0.1", nonce=nonce)), "10.0.0.1").ok
    other = auth.check(parse(_answer(auth, "10.0.0.1", nonce=nonce, nc=2)), "10.0.0.9")
    assert not other.ok and other.reason == "bad-nonce"
    moved = parse(_answer(auth, "10.0.0.1", nonce=nonce, nc=3, uri="sip:bot@10.0.0.2"))
    moved.uri = "sip:other@10.0.0.2"
    assert auth.check(moved, "10.0.0.1").reason == "bad-uri"
    assert auth.check(parse(_answer(auth, "10.0.0.1", nonce=nonce, nc=4)), "10.0.0.1").ok
    stale = auth.check(parse(_answer(auth, "10.0.0.1", nonce=auth.nonce("10.0.0.1", now=0), nc=1)), "10.0.0.1")
    assert not stale.ok and stale.stale and stale.status == 401


def test_failures_ban_the_source_for_a_growing_time():
    throttle = AuthThrottle(max_failures=3, window=60, ban=30, max_ban=100)
    t = 1000.0
    assert [throttle.failed("s", None, now=t) for _ in range(3)] == [[], [], ["source"]]
    assert throttle.banned_for("s", None, now=t + 29) == pytest.approx(1)
    assert throttle.banned_for("other", None, now=t) == 0
    t += 31
    for _ in range(3):
        throttle.failed("s", None, now=t)
    assert throttle.banned_for("s", None, now=t) == pytest.approx(60)  # doubled
    t += 61
    for _ in range(3):
        throttle.failed("s", None, now=t)
    assert throttle.banned_for("s", None, now=t) == pytest.approx(100)  # capped


def test_pending_invites_are_capped_per_source_and_in_total():
    pending = PendingInvites(per_source=2, total=3, ack_window=8, ttl=64)
    pending.add("a", "s1", now=0)
    pending.add("b", "s1", now=0)
    assert pending.full("s1", now=1) == "source"
    pending.add("c", "s2", now=0)
    assert pending.full("s3", now=1) == "total"
    pending.answered("a", now=1)  # a 200 went out: counted until the ACK window closes
    assert pending.full("s1", now=8.5) == "source"
    assert pending.full("s1", now=9.5) is None
    pending.settle("b")
    pending.settle("b")  # twice is harmless
    assert pending.count("s1") == 0 and len(pending) == 1
    assert pending.full("s4", now=65) is None and len(pending) == 0  # Timer B: nothing outlives 64 s
