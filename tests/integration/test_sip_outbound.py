"""Outbound calls and mid-call control through the HTTP routes of the SIP leg (POST
/calls, /calls/{id}/dtmf|hold|transfer) and `duplexline dial`, against real clients:
Debian's baresip answering, and small UDP user agents that answer busy, decline, or never
pick up. The bridge is `duplexline serve` as an operator starts it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.serve_process import REPO, http_json
from tests.integration.sip_peers import (BaresipPeer, BridgeProcess, Responder, compare_tones, eventually,
                                         metric_value, read_wav, tone_runs, tone_sweep_wav)

pytestmark = pytest.mark.slow
TOKEN = "t0ken"


@pytest.fixture(scope="module")
def bridge(workdir, sip_backend):
    with BridgeProcess("--agent", "echo", "--rtp-ports", "25000-25999", "--sip-backend", sip_backend, workdir=workdir,
                       token=TOKEN) as server:
        yield server
        assert server.terminate() == 0, server.log()


def _ended(bridge, call_id: str) -> dict:
    return eventually(lambda: (r := bridge.get(f"/calls/{call_id}")[1]).get("state") == "ended" and r,
                      timeout=10, what=f"call {call_id} to end")


def test_dialled_client_hears_the_agent(bridge, workdir):
    wav = tone_sweep_wav(workdir / "sweep.wav", 8000)
    with BaresipPeer(workdir, user="callee", wav=wav, answer=True) as peer:
        assert http_json("POST", bridge.url + "/calls", body={"to": peer.uri})[0] == 401  # admin route
        status, body = bridge.post("/calls", {"to": peer.uri}, timeout=30)
        assert status == 201 and body["outcome"] == "answered", body
        call_id = body["call_id"]
        assert bridge.get(f"/calls/{call_id}")[1]["transport"] == "sip"
        peer.wait_event("CALL_CLOSED", timeout=20)  # its WAV ended
        sent_wav, heard_wav = peer.recordings()
    delays = compare_tones(tone_runs(*read_wav(sent_wav)), tone_runs(*read_wav(heard_wav)))
    assert all(0 < d < 0.4 for d in delays), delays
    assert _ended(bridge, call_id)["end_reason"] == "remote-hangup"
    assert metric_value(bridge.metrics(), "duplexline_sip_outbound_calls_total", 'outcome="answered"') >= 1


@pytest.mark.parametrize("status, outcome, http", [(486, "busy", 409), (603, "declined", 409),
                                                   (None, "no_answer", 504)])
def test_unanswered_outcomes_are_reported(bridge, status, outcome, http):
    with Responder(status) as far:
        code, body = bridge.post("/calls", {"to": far.uri, "timeout": 2}, timeout=30)
        assert far.invites >= 1
    assert code == http and body["outcome"] == outcome, body
    ended = [c for c in bridge.get("/calls")[1]["calls"] if c["remote"] == far.uri]
    assert len(ended) == 1 and ended[0]["state"] == "ended"
    assert ended[0]["end_reason"] == outcome.replace("_", "-")
    assert metric_value(bridge.metrics(), "duplexline_sip_outbound_calls_total", f'outcome="{outcome}"') >= 1


def test_dtmf_hold_resume_and_blind_transfer(bridge, workdir):
    with BaresipPeer(workdir, user="bob", answer=True) as bob, \
            BaresipPeer(workdir, user="carol", answer=True) as carol:
        status, body = bridge.post("/calls", {"to": bob.uri}, timeout=30)
        assert status == 201, body
        call_id = body["call_id"]
        bob.wait_event("CALL_ESTABLISHED", timeout=10)

        assert bridge.post(f"/calls/{call_id}/dtmf", {"digits": "x"})[0] == 400
        status, body = bridge.post(f"/calls/{call_id}/dtmf", {"digits": "5#"})
        assert status == 200 and body["sent"] == "5#"
        assert metric_value(bridge.metrics(), "duplexline_sip_dtmf_sent_digits_total") >= 2

        assert bridge.post(f"/calls/{call_id}/hold", {"hold": True})[0] == 200
        eventually(lambda: bridge.get(f"/calls/{call_id}")[1].get("state") == "on-hold", timeout=5,
                   what="the session on hold")
        assert bridge.post(f"/calls/{call_id}/hold", {"hold": False})[0] == 200
        record = eventually(lambda: (r := bridge.get(f"/calls/{call_id}")[1]).get("state") == "active" and r,
                            timeout=5, what="the session resumed")
        kinds = [e["kind"] for e in record["events"]]
        assert kinds.index("hold") < kinds.index("resume")

        status, body = bridge.post(f"/calls/{call_id}/transfer", {"to": carol.uri}, timeout=60)
        assert status == 200 and body["transferred"], body
        carol.wait_event("CALL_ESTABLISHED", timeout=10)  # bob now talks to carol
        assert _ended(bridge, call_id)["end_reason"] == "transferred"
        assert bridge.post(f"/calls/{call_id}/dtmf", {"digits": "1"})[0] == 404  # gone from the bridge


def test_dial_command_reports_busy(bridge):
    with Responder(486) as far:
        run = subprocess.run([sys.executable, "-m", "bridge.cli", "dial", far.uri, "--server", bridge.url,
                              "--admin-token", TOKEN, "--timeout", "3"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert json.loads(run.stdout)["outcome"] == "busy"
    run = subprocess.run([sys.executable, "-m", "bridge.cli", "dial", "sip:x@127.0.0.1:9", "--server", bridge.url],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "admin token" in run.stderr


def test_readyz_and_sip_route_describe_the_sip_leg(bridge):
    status, body = bridge.get("/readyz")
    assert status == 200, body
    sip = body["details"]["sip"]
    assert sip["listen"] == f"127.0.0.1:{bridge.sip_port}" and sip["draining"] is False
    assert body["details"]["webrtc"]["draining"] is False
    assert bridge.get("/sip")[1]["listen"] == sip["listen"]
