"""SIP over TLS and SRTP (SDES) with real parts: Debian's baresip calls `duplexline serve
--agent echo` on its TLS port with `mediaenc=srtp-mand`; what it hears must be the tone
sweep it sent (the echo test's measure), its media must have been SRTP (its srtp module says
so, and the bridge logged the suite its answer chose), and the call's record says `tls`.
An SRTP-only route refuses a plain-RTP offer with 488 and a CDR saying why; SDES keys in
clear SIP (UDP) to such a route are refused too; a bad certificate stops the start."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.integration.serve_process import DUPLEXLINE, REPO, free_port
from tests.integration.sip_peers import (BaresipPeer, BridgeProcess, compare_tones, eventually, free_sip_port,
                                         metric_value, read_wav, sip_request, tone_runs, tone_sweep_wav)
from tests.integration.tls_certs import self_signed

pytestmark = pytest.mark.slow

_CRYPTO = "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WnD7c1ksDGs+dIefCEo8omPg4uO8DYIinNGL5yxQ\r\n"


@pytest.fixture(scope="module")
def certs(workdir):
    return self_signed(workdir / "tls")


@pytest.fixture(scope="module")
def bridge(workdir, certs):
    routes = workdir / "routes.json"
    routes.write_text(json.dumps({"routes": [{"match": "secure", "srtp": "required"},
                                             {"match": "*", "srtp": "optional"}]}))
    accounts = workdir / "accounts.json"  # a trunk reached over TLS, SRTP or nothing
    accounts.write_text(json.dumps([{"name": "tls-trunk", "user": "bridge", "domain": "127.0.0.1", "register": False,
                                     "transport": "tls", "srtp": "required"}]))
    tls_port = free_sip_port()
    with BridgeProcess("--agent", "echo", "--sip-routes", str(routes), "--rtp-ports", "22000-22999",
                       "--cdr-dir", str(workdir / "cdr"), "--sip-accounts", str(accounts),
                       "--sip-tls-listen", f"127.0.0.1:{tls_port}", "--sip-tls-cert", str(certs.cert),
                       "--sip-tls-key", str(certs.key), "--sip-tls-ca", str(certs.cert),
                       workdir=workdir) as server:
        server.tls_port = tls_port
        yield server
        assert server.terminate() == 0, server.log()


def _cdrs(workdir) -> list[dict]:
    return [json.loads(line) for path in sorted((workdir / "cdr").glob("cdr-*.jsonl"))
            for line in path.read_text().splitlines() if line]


def test_tls_srtp_call_echoes_the_sweep(bridge, workdir, certs):
    wav = tone_sweep_wav(workdir / "sweep-tls.wav", 8000)
    with BaresipPeer(workdir, user="tls-caller", codecs=("pcmu",), wav=wav, transport="tls",
                     mediaenc="srtp-mand", certificate=certs.combined) as peer:
        peer.dial(f"sip:secure@127.0.0.1:{bridge.tls_port};transport=tls")
        call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
        record = eventually(lambda: (r := bridge.get(f"/calls/{call_id}")[1]).get("state") == "active" and r,
                            timeout=5, what="the TLS call to be active in the store")
        assert record["transport"] == "sip"
        peer.wait_event("CALL_CLOSED", timeout=20)  # it hangs up when its WAV ends
        caller_log = peer.log(full=True)
        sent_wav, heard_wav = peer.recordings()
    assert re.search(r"srtp: audio: SRTP is Enabled \(cryptosuite=AES_CM_128_HMAC_SHA1_\d+\)", caller_log), caller_log
    assert re.search(rf"call {re.escape(call_id)}: SRTP negotiated \(AES_CM_128_HMAC_SHA1_\d+\)", bridge.log(full=True))
    delays = compare_tones(tone_runs(*read_wav(sent_wav)), tone_runs(*read_wav(heard_wav)))
    assert all(0.0 < d < 0.4 for d in delays), delays
    cdr = eventually(lambda: next((c for c in _cdrs(workdir) if c.get("call_id") == call_id), None), timeout=10,
                     what="the TLS call's CDR")
    assert cdr["transport"] == "tls" and cdr["sip_code"] == 200, cdr


def test_plain_rtp_offer_to_an_srtp_only_route_is_refused_488(bridge, workdir, certs):
    before = metric_value(bridge.metrics(), "duplexline_sip_invites_total", 'outcome="488"')
    with BaresipPeer(workdir, user="plain-tls", transport="tls", certificate=certs.combined) as peer:
        peer.dial(f"sip:secure@127.0.0.1:{bridge.tls_port};transport=tls")
        closed = peer.wait_event("CALL_CLOSED", timeout=10)
    assert "488" in closed.get("param", ""), closed
    assert metric_value(bridge.metrics(), "duplexline_sip_invites_total", 'outcome="488"') == before + 1
    assert "srtp-required (route secure, srtp required), 488" in bridge.log(full=True)
    cdr = eventually(lambda: next((c for c in _cdrs(workdir) if c.get("end_detail") == "srtp-required"), None),
                     timeout=10, what="the refused call's CDR")
    assert cdr["sip_code"] == 488 and cdr["end_reason"] == "refused" and cdr["transport"] == "tls", cdr


def test_sdes_keys_in_clear_sip_to_an_srtp_only_route_are_refused(bridge):
    sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           "m=audio 9 RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n" + _CRYPTO)
    reply = sip_request(bridge.sip_port, user="secure", sdp=sdp)
    assert (reply.status, reply.reason) == (488, "Not Acceptable Here (srtp-needs-tls)")


def test_a_missing_or_mismatched_certificate_stops_the_start(workdir, certs):
    other = self_signed(workdir / "other", name="other")
    port, http = free_sip_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEXLINE_")}
    cases = [(["--sip-tls-cert", str(workdir / "nope.pem"), "--sip-tls-key", str(certs.key)],
              "invalid --sip-tls-cert=", "does not exist"),
             (["--sip-tls-cert", str(certs.cert), "--sip-tls-key", str(other.key)],
              "invalid sip_tls_key=", "does not match the certificate")]
    for flags, named, why in cases:
        proc = subprocess.run([*DUPLEXLINE, "serve", "--agent", "echo", "--sip-listen", f"127.0.0.1:{port}",
                               "--http-listen", f"127.0.0.1:{http}", "--sip-tls-listen", f"127.0.0.1:{port + 1}",
                               *flags], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env=env)
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
        assert named in proc.stderr and why in proc.stderr, proc.stderr[-2000:]



def _dial_tls(bridge, peer: BaresipPeer) -> tuple[int, dict]:
    # baresip listens for TLS on the port after its SIP port
    return bridge.post("/calls", {"to": f"sip:{peer.user}@127.0.0.1:{peer.sip_port + 1};transport=tls",
                                  "account": "tls-trunk", "timeout": 10}, timeout=30)


def test_an_account_with_transport_tls_dials_out_with_srtp(bridge, workdir, certs):
    wav = tone_sweep_wav(workdir / "sweep-out.wav", 8000)
    with BaresipPeer(workdir, user="tls-callee", wav=wav, answer=True, transport="tls", mediaenc="srtp-mand",
                     certificate=certs.combined) as peer:
        status, body = _dial_tls(bridge, peer)
        assert status == 201 and body["outcome"] == "answered", body
        peer.wait_event("CALL_CLOSED", timeout=20)  # its WAV ended
        callee_log = peer.log(full=True)
        sent_wav, heard_wav = peer.recordings()
    assert "SRTP is Enabled" in callee_log, callee_log
    delays = compare_tones(tone_runs(*read_wav(sent_wav)), tone_runs(*read_wav(heard_wav)))
    assert all(0.0 < d < 0.4 for d in delays), delays


def test_an_account_with_transport_tls_refuses_an_untrusted_certificate(bridge, workdir):
    stranger = self_signed(workdir / "stranger", name="stranger")  # not in --sip-tls-ca
    with BaresipPeer(workdir, user="impostor", answer=True, transport="tls", mediaenc="srtp-mand",
                     certificate=stranger.combined) as peer:
        status, body = _dial_tls(bridge, peer)
        impostor_log = peer.log(full=True)
    assert status == 502 and body["outcome"] == "failed", body
    # the stack broke off the handshake: the INVITE (with its SDES keys) never reached the impostor
    assert "tls: accept error" in impostor_log and "answering call" not in impostor_log, impostor_log
