"""Dead SIP calls are reaped, on a real `duplexline serve --media-timeout 2` with real far
ends: a raw UDP phone that answers SDP but never sends RTP, and Debian's baresip stopped
mid-call with SIGSTOP (its RTP stops at once; it answers nothing). Each call is hung up
with reason media-timeout within the timeout plus a margin, and its slot is free again.
A call on hold is spared however long its far end is silent, and its clock restarts on
resume. An INVITE answered but never ACKed is hung up as no-ack after ACK_TIMEOUT instead
of holding its slot for the stack's 32 s."""

from __future__ import annotations

import os
import signal
import time

import pytest

from bridge.sip.call import ACK_TIMEOUT
from tests.integration.sip_peers import BaresipPeer, BridgeProcess, NeverAcksPhone, RawPhone, eventually

pytestmark = pytest.mark.slow

TIMEOUT = 2.0  # --media-timeout
MARGIN = 4.0  # detection is within a 10 ms tick; the rest is the hang-up and the store


@pytest.fixture(scope="module")
def bridge(workdir):
    with BridgeProcess("--agent", "echo", "--media-timeout", str(TIMEOUT), "--rtp-ports", "28000-28499",
                       workdir=workdir) as server:
        yield server
        assert server.terminate() == 0, server.log()


def _record(bridge: BridgeProcess, call_id: str) -> dict:
    return bridge.get(f"/calls/{call_id}")[1]


def _ended(bridge: BridgeProcess, call_id: str, timeout: float) -> dict:
    return eventually(lambda: (r := _record(bridge, call_id)).get("state") == "ended" and r, timeout=timeout,
                      what=f"call {call_id} to end")


def _no_live_calls(bridge: BridgeProcess) -> None:
    eventually(lambda: bridge.get("/readyz")[1].get("calls") == 0, timeout=5, what="every slot free")


def _holds(check, seconds: float, what: str) -> None:
    """`check()` stays true for `seconds` (an observation window, polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), what
        time.sleep(0.1)  # polling interval inside the window


def _answered_peer(bridge: BridgeProcess, workdir, user: str) -> tuple[BaresipPeer, str]:
    peer = BaresipPeer(workdir, user=user).start()
    peer.dial(f"sip:bot@127.0.0.1:{bridge.sip_port}")
    call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
    eventually(lambda: _record(bridge, call_id).get("state") == "active", timeout=5, what="the call active")
    return peer, call_id


def _resume_and_stop(peer: BaresipPeer) -> None:
    os.kill(peer.proc.pid, signal.SIGCONT)
    peer.stop()


def test_a_far_end_that_never_sends_rtp_is_hung_up(bridge):
    with RawPhone(bridge.sip_port) as phone:  # its SDP points at the discard port; it sends nothing
        dialog = phone.call()
        assert dialog["status"] == 200, dialog
        t0 = time.monotonic()
        record = _ended(bridge, dialog["call_id"], TIMEOUT + MARGIN)
        elapsed = time.monotonic() - t0
    assert record["end_reason"] == "media-timeout", record
    assert elapsed >= TIMEOUT * 0.9, f"hung up after {elapsed:.2f} s, before the timeout"
    _no_live_calls(bridge)
    assert f"call {dialog['call_id']}: no caller audio for" in bridge.log()


def test_a_far_end_that_stops_mid_call_is_hung_up(bridge, workdir):
    peer, call_id = _answered_peer(bridge, workdir, "vanishing")
    try:
        _holds(lambda: _record(bridge, call_id).get("state") == "active", TIMEOUT + 0.5,
               "a call whose far end sends RTP stays up")
        os.kill(peer.proc.pid, signal.SIGSTOP)  # the far end vanishes: no RTP, no BYE
        t0 = time.monotonic()
        record = _ended(bridge, call_id, TIMEOUT + MARGIN)
        elapsed = time.monotonic() - t0
    finally:
        _resume_and_stop(peer)
    assert record["end_reason"] == "media-timeout", record
    assert elapsed >= TIMEOUT * 0.9, f"hung up {elapsed:.2f} s after the last RTP, before the timeout"
    assert record["frames_in"] > 0
    _no_live_calls(bridge)


def test_a_held_call_is_spared_and_its_clock_restarts_on_resume(bridge, workdir):
    peer, call_id = _answered_peer(bridge, workdir, "holder")
    try:
        assert bridge.post(f"/calls/{call_id}/hold", {"hold": True})[0] == 200
        eventually(lambda: _record(bridge, call_id).get("state") == "on-hold", timeout=5, what="the call held")
        os.kill(peer.proc.pid, signal.SIGSTOP)  # silent on hold, surely
        _holds(lambda: _record(bridge, call_id).get("state") == "on-hold", 3 * TIMEOUT,
               "a held call was hung up")
        os.kill(peer.proc.pid, signal.SIGCONT)
        # Woken, the far end may have a re-INVITE of its own in flight ("retry shortly").
        eventually(lambda: bridge.post(f"/calls/{call_id}/hold", {"hold": False})[0] == 200, timeout=5,
                   what="the resume to be taken")
        # The far end was silent for 3 timeouts on hold; after resume it talks and the call stays.
        _holds(lambda: _record(bridge, call_id).get("state") == "active", TIMEOUT + 1.0,
               "a resumed call was hung up for its silence on hold")
        os.kill(peer.proc.pid, signal.SIGSTOP)
        record = _ended(bridge, call_id, TIMEOUT + MARGIN)
    finally:
        _resume_and_stop(peer)
    assert record["end_reason"] == "media-timeout", record
    kinds = [e["kind"] for e in record["events"]]
    assert kinds.index("hold") < kinds.index("resume"), kinds
    _no_live_calls(bridge)


def test_an_answered_invite_never_acked_is_hung_up_as_no_ack(bridge):
    with NeverAcksPhone(bridge.sip_port) as phone:
        dialog = phone.call()
        assert dialog["status"] == 200, dialog
        t0 = time.monotonic()
        assert bridge.get("/readyz")[1]["calls"] == 1, "the unacknowledged call holds a slot"
        record = _ended(bridge, dialog["call_id"], ACK_TIMEOUT + MARGIN)
        elapsed = time.monotonic() - t0
    assert record["end_reason"] == "no-ack", record
    assert ACK_TIMEOUT - 1.0 <= elapsed <= ACK_TIMEOUT + MARGIN, f"ended {elapsed:.2f} s after the 200 OK"
    _no_live_calls(bridge)
    assert f"call {dialog['call_id']}: answered but not established (no ACK)" in bridge.log()
