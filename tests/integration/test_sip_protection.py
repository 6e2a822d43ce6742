"""Inbound protection and refusals at the SIP front door, as protocol facts on the wire:
digest authentication (401 challenge, 403 for a wrong password, a real client with the
right one gets through), an INVITE flood from one source is rate-limited (503 +
Retry-After), a source outside the allowlist gets 403, and a draining bridge answers 503
with Retry-After while its live call goes on. Every refusal is counted in the metrics."""

from __future__ import annotations

import hashlib
import json
import socket

import pytest

from tests.integration.sip_peers import (BaresipPeer, BridgeProcess, eventually, metric_value, sip_request)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def guarded(workdir, sip_backend):
    routes = workdir / "routes.json"
    routes.write_text(json.dumps({"routes": [{"match": "bot"}]}))
    with BridgeProcess("--agent", "echo", "--sip-routes", str(routes), "--sip-auth", "bob:s3cret",
                       "--sip-invite-rate", "5", "--rtp-ports", "22000-22999", "--sip-backend", sip_backend,
                       workdir=workdir) as server:
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


def test_source_outside_the_allowlist_gets_403(workdir, sip_backend):
    with BridgeProcess("--agent", "echo", "--sip-allow", "10.0.0.0/8", "--rtp-ports", "22000-22999",
                       "--sip-backend", sip_backend,
                       workdir=workdir) as server:
        reply = sip_request(server.sip_port)
        assert reply.status == 403
        assert metric_value(server.metrics(), "duplexline_sip_invites_total", 'outcome="403"') == 1
        assert server.get("/calls")[1]["calls"] == []


def test_draining_bridge_answers_503_with_retry_after_and_keeps_live_calls(workdir, sip_backend):
    with BridgeProcess("--agent", "echo", "--rtp-ports", "22000-22999", "--drain-timeout", "30",
                       "--sip-backend", sip_backend,
                       workdir=workdir) as server:
        with BaresipPeer(workdir, user="live") as peer:
            peer.dial(f"sip:bot@127.0.0.1:{server.sip_port}")
            call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
            # The caller sees 200 OK before the bridge sees its ACK: wait for the bridge's view.
            eventually(lambda: server.get(f"/calls/{call_id}")[1].get("state") == "active", timeout=5,
                       what="the live call to be active")
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


def _digest(challenge: str, uri: str, password: str, nc: int = 1) -> str:
    """RFC 7616 (MD5, qop=auth) computed here from the formula, not by the bridge's code."""
    nonce = challenge.split('nonce="', 1)[1].split('"', 1)[0]
    ha1 = hashlib.md5(f"bob:duplexline:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"INVITE:{uri}".encode()).hexdigest()
    response = hashlib.md5(f"{ha1}:{nonce}:{nc:08x}:abc:auth:{ha2}".encode()).hexdigest()
    return (f'Digest username="bob", realm="duplexline", nonce="{nonce}", uri="{uri}", qop=auth, '
            f'nc={nc:08x}, cnonce="abc", response="{response}", algorithm=MD5')


def test_a_captured_authorization_is_not_accepted_again(guarded):
    # The user "nobody" has no route: a good answer gets past auth to the 404, and no call is made.
    uri = f"sip:nobody@127.0.0.1:{guarded.sip_port}"
    challenge = sip_request(guarded.sip_port, user="nobody").headers["www-authenticate"]
    captured = _digest(challenge, uri, "s3cret")
    assert sip_request(guarded.sip_port, user="nobody", headers={"Authorization": captured}).status == 404
    replayed = sip_request(guarded.sip_port, user="nobody", headers={"Authorization": captured})
    assert replayed.status == 401 and "nonce=" in replayed.headers.get("www-authenticate", "")
    assert metric_value(guarded.metrics(), "duplexline_sip_auth_failures_total", 'reason="replay"') >= 1
    # The next nonce count on the same nonce is the client's right.
    assert sip_request(guarded.sip_port, user="nobody",
                       headers={"Authorization": _digest(challenge, uri, "s3cret", nc=2)}).status == 404


def test_password_guessing_gets_the_source_banned(guarded):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.2", 0))  # its own source address: the ban must not touch 127.0.0.1
        uri = f"sip:nobody@127.0.0.1:{guarded.sip_port}"
        challenge = sip_request(guarded.sip_port, user="nobody", sock=sock).headers["www-authenticate"]
        statuses = [sip_request(guarded.sip_port, user="nobody", sock=sock,
                                headers={"Authorization": _digest(challenge, uri, guess, nc=i + 1)}).status
                    for i, guess in enumerate(("a", "b", "c", "d", "e", "s3cret"))]
    assert statuses == [403] * 6, statuses  # five wrong guesses, then even the right one is refused
    text = guarded.metrics()
    assert metric_value(text, "duplexline_sip_auth_bans_total", 'kind="source"') >= 1
    assert metric_value(text, "duplexline_sip_invites_total", 'outcome="banned"') >= 1
    assert sip_request(guarded.sip_port, user="nobody").status == 401  # 127.0.0.1 is untouched


def test_a_call_beyond_sip_max_calls_gets_486_and_the_first_goes_on(workdir, sip_backend):
    with BridgeProcess("--agent", "echo", "--sip-max-calls", "1", "--rtp-ports", "22000-22999",
                       "--sip-backend", sip_backend, workdir=workdir) as server:
        with BaresipPeer(workdir, user="first") as first, BaresipPeer(workdir, user="second") as second:
            first.dial(f"sip:bot@127.0.0.1:{server.sip_port}")
            call_id = first.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
            second.dial(f"sip:bot@127.0.0.1:{server.sip_port}")
            closed = second.wait_event("CALL_CLOSED", timeout=10)
            assert "486" in closed.get("param", ""), closed
            assert server.get(f"/calls/{call_id}")[1]["state"] == "active"
            first.hangup()
            first.wait_event("CALL_CLOSED", timeout=10)


def test_new_calls_beyond_the_stacks_own_rate_get_503_and_the_bridge_stays_up(workdir, sip_backend):
    # pjsua2's wheel aborts when a burst of INVITEs uses up its 64 socket handles
    # (bridge/sip/backends/__init__.py, INVITE_RATE): its front door takes 10 a second.
    with BridgeProcess("--agent", "echo", "--rtp-ports", "22000-22999", "--sip-backend", sip_backend,
                       workdir=workdir) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            replies = [sip_request(server.sip_port, sock=sock) for _ in range(30)]
        limited = [r for r in replies if r.status == 503 and "new calls" in r.reason]
        if sip_backend == "pjsua2":
            assert len(limited) >= 10, [(r.status, r.reason) for r in replies]
            assert all(r.headers.get("retry-after", "").isdigit() for r in limited)
        else:
            assert not limited
        assert server.proc.poll() is None and server.get("/healthz")[0] == 200, server.log()
