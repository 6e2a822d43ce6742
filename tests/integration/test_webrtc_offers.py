"""Signaling against a real `duplexline serve --agent echo` in a private network namespace:
every bad or hostile offer gets its 4xx and leaves nothing behind (no live call, no open
peer connection); the token, the per-process limit and draining refuse with clear JSON.

The well-formed offer is Chromium's own (captured from Chromium 156) without candidates:
the server answers it, and no packet is sent, since there is no candidate to check."""

from __future__ import annotations

import json
import re

import pytest

from .netns import NsServer

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-token-for-tests-0123"

CHROME_OFFER = "\r\n".join([
    "v=0", "o=- 6854872703504398954 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0 1",
    "a=extmap-allow-mixed", "a=msid-semantic: WMS",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126", "c=IN IP4 0.0.0.0", "a=rtcp:9 IN IP4 0.0.0.0",
    "a=ice-ufrag:K0Us", "a=ice-pwd:pu1Xfj/p0TfRQ1BY0AEp3SDe", "a=ice-options:trickle",
    "a=fingerprint:sha-256 E5:36:A9:57:69:FB:07:5B:0B:B8:F1:E5:A8:52:44:03:1C:8B:A6:6B:7A:1B:51:86:52:BF:D5:30:7B:9B:9D:61",
    "a=setup:actpass", "a=mid:0", "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid", "a=sendrecv",
    "a=msid:- b2767133-a04e-4582-a95a-873670296ac6", "a=rtcp-mux", "a=rtcp-rsize",
    "a=rtpmap:111 opus/48000/2", "a=rtcp-fb:111 transport-cc", "a=fmtp:111 minptime=10;useinbandfec=1",
    "a=rtpmap:63 red/48000/2", "a=fmtp:63 111/111", "a=rtpmap:9 G722/8000", "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000", "a=rtpmap:13 CN/8000", "a=rtpmap:110 telephone-event/48000",
    "a=rtpmap:126 telephone-event/8000", "a=ssrc:2568215607 cname:1Qv4XkUg01L6QsuC",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "c=IN IP4 0.0.0.0", "a=ice-ufrag:K0Us",
    "a=ice-pwd:pu1Xfj/p0TfRQ1BY0AEp3SDe",
    "a=fingerprint:sha-256 E5:36:A9:57:69:FB:07:5B:0B:B8:F1:E5:A8:52:44:03:1C:8B:A6:6B:7A:1B:51:86:52:BF:D5:30:7B:9B:9D:61",
    "a=setup:actpass", "a=mid:1", "a=sctp-port:5000", "a=max-message-size:262144", ""])


def _audio_only(sdp: str, codecs: list[str]) -> str:
    """The Chrome offer with the audio section's codecs replaced (payload types kept)."""
    lines = [l for l in sdp.split("\r\n") if not l.startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"))]
    at = lines.index("a=rtcp-rsize") + 1
    pts = " ".join(str(96 + i) for i in range(len(codecs)))
    lines = [f"m=audio 9 UDP/TLS/RTP/SAVPF {pts}" if l.startswith("m=audio") else l for l in lines]
    return "\r\n".join(lines[:at] + [f"a=rtpmap:{96 + i} {c}" for i, c in enumerate(codecs)] + lines[at:])


def _offer(sdp: str) -> dict:
    return {"type": "offer", "sdp": sdp}


@pytest.fixture(scope="module")
def server(ns, tmp_path_factory):
    log = tmp_path_factory.mktemp("offers") / "server.log"
    srv = NsServer(ns, ["--agent", "echo", "--webrtc-max-calls", "2"], log)
    try:
        yield srv.wait_ready()
    finally:
        ns.kill(srv.proc)


def _nothing_left(server: NsServer) -> None:
    status, live = server.json("GET", "/calls?live=1")
    assert status == 200 and live["calls"] == [], live
    metrics = server.http("GET", "/metrics")[2].decode()
    assert re.search(r"^duplexline_webrtc_peers 0\.0$", metrics, re.M), "a peer connection was left open"
    assert re.search(r'^duplexline_calls_active\{transport="webrtc"\} 0\.0$', metrics, re.M)


def _reject(server: NsServer, body, status: int, code: str, **kw) -> dict:
    got, headers, raw = server.http("POST", "/webrtc/offer", body, **kw)
    data = json.loads(raw)
    assert (got, data.get("error")) == (status, code), data
    assert data["message"], "every refusal says what was wrong"
    assert headers.get("Content-Type", "").startswith("application/json")
    return data


BAD_BODIES = [
    pytest.param(b"this is not json", 400, "bad-json", id="not-json"),
    pytest.param(b"[1, 2, 3]", 400, "bad-json", id="json-not-object"),
    pytest.param(b'{"type": "offer"}', 400, "bad-json", id="no-sdp"),
    pytest.param(b'{"type": "offer", "sdp": 42}', 400, "bad-json", id="sdp-not-string"),
    pytest.param(b"[" * 100000, 413, "too-large", id="deep-json-over-limit"),
    pytest.param(json.dumps(_offer(CHROME_OFFER) | {"type": "answer"}).encode(), 400, "not-an-offer", id="answer"),
    pytest.param(json.dumps(_offer("hello, world")).encode(), 400, "bad-sdp", id="not-sdp"),
    pytest.param(json.dumps(_offer("v=0\r\nm=audio x\r\n")).encode(), 400, "bad-sdp", id="broken-media-line"),
    pytest.param(json.dumps(_offer(CHROME_OFFER.replace("a=mid:0", "a=mid:\x00"))).encode(), 400, "bad-sdp",
                 id="control-character"),
    pytest.param(json.dumps(_offer(CHROME_OFFER.split("m=audio")[0] + "m=application" +
                                   CHROME_OFFER.split("m=application")[1])).encode(), 422, "no-audio",
                 id="data-channel-only"),
    pytest.param(json.dumps(_offer(CHROME_OFFER.replace("m=audio 9", "m=audio 0"))).encode(), 422, "no-audio",
                 id="audio-port-zero"),
    pytest.param(json.dumps(_offer(CHROME_OFFER + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n"))
                 .encode(), 415, "unsupported-media", id="video"),
    pytest.param(json.dumps(_offer(_audio_only(CHROME_OFFER, ["PCMU/8000", "PCMA/8000"]))).encode(), 415,
                 "unsupported-codec", id="pcmu-only"),
    pytest.param(json.dumps(_offer(_audio_only(CHROME_OFFER, ["opus/16000/2"]))).encode(), 415,
                 "unsupported-codec", id="opus-wrong-rate"),
    pytest.param(json.dumps(_offer("\r\n".join(l for l in CHROME_OFFER.split("\r\n")
                                               if not l.startswith("a=fingerprint")))).encode(), 400, "bad-sdp",
                 id="no-fingerprint"),
    pytest.param(json.dumps(_offer(CHROME_OFFER + "a=x:" + "y" * 40000 + "\r\n")).encode(), 413, "too-large",
                 id="sdp-over-limit"),
    pytest.param(json.dumps(_offer(CHROME_OFFER + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" * 5)).encode(), 413,
                 "too-large", id="many-sections"),
    pytest.param(json.dumps(_offer(CHROME_OFFER.replace("a=rtcp-mux\r\n", ""))).encode(), 400, "peer-failed",
                 id="no-rtcp-mux-aiortc-refuses"),
    pytest.param(json.dumps(_offer(CHROME_OFFER.replace("a=setup:actpass", "a=setup:bogus"))).encode(), 400,
                 "peer-failed", id="bad-dtls-setup-aiortc-refuses"),
]


@pytest.mark.parametrize("body,status,code", BAD_BODIES)
def test_bad_offer_is_refused_and_leaves_nothing(server, body, status, code):
    _reject(server, body, status, code, headers={"Content-Type": "application/json"})
    _nothing_left(server)


def test_huge_body_is_refused_without_reading_it(server):
    _reject(server, b"x" * (200 * 1024), 413, "too-large", headers={"Content-Type": "application/json"})
    _nothing_left(server)


def test_form_post_is_refused(server):
    _reject(server, json.dumps(_offer(CHROME_OFFER)).encode(), 415, "bad-content-type",
            headers={"Content-Type": "text/plain"})
    _nothing_left(server)


def test_good_offer_answered_then_hung_up(server):
    status, answer = server.json("POST", "/webrtc/offer", _offer(CHROME_OFFER))
    assert status == 200, answer
    assert answer["type"] == "answer" and answer["sdp"].startswith("v=0")
    sdp = answer["sdp"]
    assert "opus/48000/2" in sdp and "PCMU" not in sdp, "the answer keeps Opus only"
    assert "a=candidate:" in sdp and "10.231." in sdp, "host candidates on the namespace's veth"
    assert "webrtc-datachannel" in sdp
    call_id = answer["call_id"]
    status, live = server.json("GET", "/calls?live=1")
    assert [c["call_id"] for c in live["calls"]] == [call_id]
    assert server.json("DELETE", f"/webrtc/calls/{call_id}")[0] == 200
    _nothing_left(server)
    status, record = server.json("GET", f"/calls/{call_id}")
    assert record["state"] == "ended" and record["end_reason"] == "remote-hangup"
    assert server.json("DELETE", f"/webrtc/calls/{call_id}")[0] == 404, "a second hang-up finds no call"


def test_process_limit_refuses_with_retry_after(server):
    ids = []
    for _ in range(2):  # --webrtc-max-calls 2
        status, answer = server.json("POST", "/webrtc/offer", _offer(CHROME_OFFER))
        assert status == 200, answer
        ids.append(answer["call_id"])
    status, headers, raw = server.http("POST", "/webrtc/offer", _offer(CHROME_OFFER))
    assert status == 503 and json.loads(raw)["error"] == "server-full"
    assert int(headers["Retry-After"]) > 0
    for call_id in ids:
        server.json("DELETE", f"/webrtc/calls/{call_id}")
    _nothing_left(server)
    status, answer = server.json("POST", "/webrtc/offer", _offer(CHROME_OFFER))
    assert status == 200, "room again once the calls ended"
    server.json("DELETE", f"/webrtc/calls/{answer['call_id']}")
    metrics = server.http("GET", "/metrics")[2].decode()
    assert re.search(r'^duplexline_webrtc_offers_total\{outcome="server-full"\} [1-9]', metrics, re.M)


def test_token_guards_offer_config_and_hangup(ns, tmp_path):
    srv = NsServer(ns, ["--agent", "echo", "--webrtc-token", TOKEN], tmp_path / "server.log",
                   http_port=8081, sip_port=5071)
    try:
        srv.wait_ready()
        _reject(srv, _offer(CHROME_OFFER), 401, "unauthorized")
        _reject(srv, _offer(CHROME_OFFER), 401, "unauthorized", headers={"Authorization": "Bearer wrong-token-0000000"})
        assert srv.json("GET", "/webrtc/config")[0] == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        status, config = srv.json("GET", "/webrtc/config", headers=good)
        assert status == 200 and config == {"ice_servers": [], "token_required": True}
        status, answer = srv.json("POST", "/webrtc/offer", _offer(CHROME_OFFER), headers=good)
        assert status == 200, answer
        assert srv.json("DELETE", f"/webrtc/calls/{answer['call_id']}")[0] == 401
        assert srv.json("DELETE", f"/webrtc/calls/{answer['call_id']}", headers=good)[0] == 200
        assert srv.http("GET", "/")[0] == 200, "the page itself is public"
    finally:
        ns.kill(srv.proc)


def test_draining_refuses_new_offers(ns, tmp_path):
    srv = NsServer(ns, ["--agent", "echo", "--drain-timeout", "30"], tmp_path / "server.log",
                   http_port=8082, sip_port=5072)
    try:
        srv.wait_ready()
        status, answer = srv.json("POST", "/webrtc/offer", _offer(CHROME_OFFER))
        assert status == 200  # a live call keeps the drain going
        assert srv.json("POST", "/admin/drain")[0] == 202
        status, headers, raw = srv.http("POST", "/webrtc/offer", _offer(CHROME_OFFER))
        assert status == 503 and json.loads(raw)["error"] == "draining", raw
        assert int(headers["Retry-After"]) > 0
        assert srv.json("DELETE", f"/webrtc/calls/{answer['call_id']}")[0] == 200
        assert srv.proc.wait(timeout=30) == 0, "the drained server exits by itself"
    finally:
        ns.kill(srv.proc)


def test_page_and_static_files_are_served(server):
    status, headers, body = server.http("GET", "/")
    assert status == 200 and b'id="call"' in body and b"/static/softphone.js" in body
    for name, marker in (("softphone.js", b"RTCPeerConnection"), ("softphone.css", b".keypad"),
                         ("tap-worklet.js", b"registerProcessor")):
        status, _, body = server.http("GET", f"/static/{name}")
        assert status == 200 and marker in body, name
    assert server.http("GET", "/static/../webrtc/leg.py")[0] in (403, 404)
