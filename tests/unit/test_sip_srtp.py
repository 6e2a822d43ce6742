"""The SRTP policy of routes and accounts (bridge/sip/srtp.py): which SDP offers the front
door refuses with 488 and why, and what an `off` route strips."""

import json

import pytest

from bridge.errors import ConfigError
from bridge.sip.routes import RouteTable
from bridge.sip.srtp import answer_suite, offer_refusal, strip_crypto

HEAD = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
KEY = "inline:WnD7c1ksDGs+dIefCEo8omPg4uO8DYIinNGL5yxQ"


def offer(profile="RTP/AVP", *crypto: str, video: str = "") -> bytes:
    lines = [f"m=audio 4000 {profile} 0", "a=rtpmap:0 PCMU/8000", *(f"a=crypto:{i + 1} {c}" for i, c in
                                                                   enumerate(crypto))]
    return (HEAD + "\r\n".join(lines) + "\r\n" + video).encode()


@pytest.mark.parametrize("policy, body, wire, why", [
    ("required", offer(), "tls", "srtp-required"),
    ("required", offer("RTP/SAVP", f"F8_128_HMAC_SHA1_80 {KEY}"), "tls", "srtp-suite"),
    ("required", offer("RTP/SAVP", f"AES_CM_128_HMAC_SHA1_80 {KEY}"), "udp", "srtp-needs-tls"),
    ("required", offer("RTP/SAVP", f"AES_CM_128_HMAC_SHA1_80 {KEY}"), "tcp", "srtp-needs-tls"),
    ("required", offer("RTP/SAVP", f"F8_128_HMAC_SHA1_80 {KEY}", f"AES_CM_128_HMAC_SHA1_32 {KEY}"), "tls", None),
    ("required", offer("RTP/AVP", f"AES_CM_128_HMAC_SHA1_80 {KEY}"), "tls", None),  # best-effort keys count
    ("optional", offer(), "udp", None),
    ("optional", offer("RTP/SAVP", f"AES_CM_128_HMAC_SHA1_80 {KEY}"), "udp", None),
    ("off", offer("RTP/SAVP", f"AES_CM_128_HMAC_SHA1_80 {KEY}"), "tls", "srtp-off"),
    ("off", offer("RTP/AVP", f"AES_CM_128_HMAC_SHA1_80 {KEY}"), "tls", None),
    ("off", offer(), "udp", None),
])
def test_offers_are_judged_by_the_routes_policy(policy, body, wire, why):
    assert offer_refusal(policy, body, wire) == why


def test_keys_of_a_later_video_stream_do_not_make_the_audio_secure():
    video = f"m=video 4002 RTP/SAVP 96\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 {KEY}\r\n"
    assert offer_refusal("required", offer(video=video), "tls") == "srtp-required"


def test_an_off_route_strips_best_effort_keys_and_nothing_else():
    body = offer("RTP/AVP", f"AES_CM_128_HMAC_SHA1_80 {KEY}", f"AES_CM_128_HMAC_SHA1_32 {KEY}")
    stripped = strip_crypto(body)
    assert b"a=crypto" not in stripped
    assert stripped == offer()


def test_the_answers_suite_is_read_back():
    assert answer_suite(offer("RTP/SAVP", f"AES_CM_128_HMAC_SHA1_32 {KEY}")) == "AES_CM_128_HMAC_SHA1_32"
    assert answer_suite(offer()) is None


def test_a_route_with_an_unknown_policy_stops_the_start(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": [{"match": "*", "srtp": "mandatory"}]}))
    with pytest.raises(ConfigError, match=r"routes\[0\]: 'srtp' must be one of required, optional, off"):
        RouteTable.load(path, "echo")


def test_routes_default_to_optional(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": [{"match": "a"}, {"match": "b", "srtp": "required"}]}))
    table = RouteTable.load(path, "echo")
    assert (table.lookup("a").srtp, table.lookup("b").srtp) == ("optional", "required")
