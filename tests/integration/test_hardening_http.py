"""The bridge's HTTP routes against hostile input, on a real `duplexline serve` with an
admin token: a 40,000-character or control-character dial/transfer target is refused with
400 naming the field before the native SIP stack sees it (unchecked, the long one
corrupted the stack's heap: the process died with SIGABRT at exit), and call records
(caller URIs, DTMF digits) answer only the admin token. Afterwards the bridge still
answers SIP and HTTP and exits 0 on SIGTERM."""

from __future__ import annotations

import pytest

from tests.integration.serve_process import http_json
from tests.integration.sip_peers import BridgeProcess, RawPhone, eventually, sip_request

pytestmark = pytest.mark.slow
TOKEN = "t0ken-hardening"

HOSTILE = [
    ("sip:" + "a" * 40000 + "@127.0.0.1", "40014 characters long"),
    ("sip:bob\x01@127.0.0.1", "'\\x01'"),
    ("sip:bob@127.0.0.1\r\nX-Injected: 1", "'\\r'"),
    ("sip:bob@" + "x" * 300, "characters long"),
    ("sip:bob@127.0.0.1?Subject=x", "not of the form"),
]


@pytest.fixture(scope="module")
def bridge(workdir):
    with BridgeProcess("--agent", "echo", "--rtp-ports", "28500-28999", workdir=workdir, token=TOKEN) as server:
        yield server


def test_hostile_dial_targets_are_refused_naming_the_field(bridge):
    for uri, why in HOSTILE:
        status, body = bridge.post("/calls", {"to": uri})
        assert status == 400, (uri[:40], status, body)
        assert body["error"].startswith("'to' must be a SIP URI") and why in body["error"], body
    assert bridge.get("/calls")[1]["calls"] == [], "nothing was dialled"


def test_hostile_transfer_targets_are_refused_and_call_records_are_admin_data(bridge):
    with RawPhone(bridge.sip_port) as phone:
        dialog = phone.call()
        assert dialog["status"] == 200, dialog
        call_id = dialog["call_id"]
        record = eventually(lambda: (r := bridge.get(f"/calls/{call_id}")[1]).get("state") == "active" and r,
                            timeout=5, what="the call to be active")
        assert record["remote"].startswith("sip:raw@127.0.0.1")
        for uri, why in HOSTILE:
            status, body = bridge.post(f"/calls/{call_id}/transfer", {"to": uri})
            assert status == 400 and why in body["error"], (uri[:40], status, body)
        # Call records: the token, nothing else (this host included, since a token is set).
        for path in ("/calls", "/calls?live=1", f"/calls/{call_id}"):
            for token in (None, "wrong"):
                status, body = http_json("GET", bridge.url + path, token=token)
                assert status == 401 and "raw@" not in str(body), (path, token, status)
            status, body = http_json("GET", bridge.url + path, token=TOKEN)
            assert status == 200 and "sip:raw@127.0.0.1" in str(body), (path, body)
        phone.bye(dialog)
        eventually(lambda: bridge.get(f"/calls/{call_id}")[1].get("state") == "ended", timeout=10,
                   what="the call to end")


def test_the_bridge_still_answers_and_exits_cleanly(bridge):
    assert http_json("GET", bridge.url + "/healthz")[0] == 200
    assert sip_request(bridge.sip_port, method="OPTIONS").status == 200
    assert bridge.terminate() == 0, bridge.log()
