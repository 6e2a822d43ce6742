"""Inbound protection and refusals at the SIP front door, as protocol facts on the wire:
digest authentication (401 challenge, 403 for a wrong password, a real client with the
right one gets through), an INVITE flood from one source is rate-limited (503 +
Retry-After), a source outside the allowlist gets 403, and a draining bridge answers 503
with Retry-After while its live call goes on. Every refusal is counted in the metrics."""

from __future__ import annotations

import json
import socket

import pytest

from tests.integration.sip_peers import (BaresipPeer, BridgeProcess, eventually, metric_value, sip_request)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def guarded(workdir):
    routes = workdir / "routes.json"
    routes.write_text(json.dumps({"routes": [{"match": "bot"}]}))
    with BridgeProcess("--agent", "echo", "--sip-routes", str(routes), "--sip-auth", "bob:s3cret",
                       "--sip-invite-rate", "5", "--rtp-ports", "22000-22999", workdir=workdir) as server:
        yield server
        assert server.terminate() == 0, server.log()


def test_inbound_invite_without_credentials_is_challenged(guarded):
    reply = sip_request(guarded.sip_port)
    assert reply.status == 401
    challenge = reply.headers.get("www-authenticate", "")
    assert challenge.startswith("Digest ") and 'qop="auth"' in challenge and "nonce=" in challenge
    assert metric_value(guarded.metrics(), "duplexline_sip_invites_total", 'outcome="401"') >= 1


def test_client_with_the_password_gets_through_and_a_wrong_one_gets_403(guarded, workdir):
    with BaresipPeer(workdir, user="bob", password="s3cret") as peer:
        peer.dial(f"sip:bot@127.0.0.1:{guarded.sip_port}")
        call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
        eventually(lambda: guarded.get(f"/calls/{call_id}")[1].get("state") == "active", timeout=5,
                   what="the authenticated call to be active")
        peer.hangup()
        peer.wait_event("CALL_CLOSED", timeout=10)
    with BaresipPeer(workdir, user="bob", password="wrong") as peer:
        peer.dial(f"sip:bot@127.0.0.1:{guarded.sip_port}")
        closed = peer.wait_event("CALL_CLOSED", timeout=10)
    assert "403" in closed.get("param", ""), closed
    assert metric_value(guarded.metrics(), "duplexline_sip_invites_total", 'outcome="403"') >= 1


def test_invite_flood_from_one_source_is_rate_limited(guarded):
    before = metric_value(guarded.metrics(), "duplexline_sip_invites_total", 'outcome="rate_limited"')
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        replies = [sip_request(guarded.sip_port, sock=sock) for _ in range(40)]
    limited = [r for r in replies if r.status == 503]
    # A burst of twice the rate passes (to the 401 challenge), the rest is refused.
    assert len(limited) >= 25, [r.status for r in replies]
    assert all(r.status in (401, 503) for r in replies)
    assert all("rate" in r.reason.lower() and r.headers.get("retry-after", "").isdigit() for r in limited)
    after = metric_value(guarded.metrics(), "duplexline_sip_invites_total", 'outcome="rate_limited"')
    assert after - before == len(limited)


def test_source_outside_the_allowlist_gets_403(workdir):
    with BridgeProcess("--agent", "echo", "--sip-allow", "10.0.0.0/8", "--rtp-ports", "22000-22999",
                       workdir=workdir) as server:
        reply = sip_request(server.sip_port)
        assert reply.status == 403
        assert metric_value(server.metrics(), "duplexline_sip_invites_total", 'outcome="403"') == 1
        assert server.get("/calls")[1]["calls"] == []


def test_draining_bridge_answers_503_with_retry_after_and_keeps_live_calls(workdir):
    with BridgeProcess("--agent", "echo", "--rtp-ports", "22000-22999", "--drain-timeout", "30",
                       workdir=workdir) as server:
        with BaresipPeer(workdir, user="live") as peer:
            peer.dial(f"sip:bot@127.0.0.1:{server.sip_port}")
            call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
            status, body = server.post("/admin/drain")
            assert status == 202 and body["live_calls"] == 1, (status, body, server.log())
            reply = eventually(lambda: (r := sip_request(server.sip_port)).status == 503 and r, timeout=5,
                               what="503 while draining")
            assert reply.headers.get("retry-after") == "30" and "draining" in reply.reason.lower()
            assert server.proc.poll() is None, server.log()  # the live call keeps the bridge up
            assert server.get(f"/calls/{call_id}")[1]["state"] == "active", server.log()
            assert metric_value(server.metrics(), "duplexline_sip_invites_total", 'outcome="503"') >= 1
            peer.hangup()
            peer.wait_event("CALL_CLOSED", timeout=10)
        assert server.proc.wait(timeout=30) == 0, server.log()  # the last call ended: the drain completes
