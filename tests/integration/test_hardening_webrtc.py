"""Hostile or dead WebRTC callers against a real `duplexline serve --agent echo` in a
private network namespace (tests/integration/netns.py).

- Offers that never connect (Chromium's own offer, without candidates: nothing is ever
  checked) hold a slot only until `--webrtc-connect-timeout`, at most
  `--webrtc-max-pending` of them at once and `--webrtc-max-pending-per-source` from one
  address (sources here: 127.0.0.1-3 inside the namespace); the rest get 503 with
  Retry-After, counted by outcome.
- A connected caller that stops sending audio is hung up after `--media-timeout` with reason
  media-timeout, and told so over its data channel: whether it keeps answering ICE consent
  checks (it only stopped its track) or is stopped outright (SIGSTOP).

The client is an aiortc peer in its own process (`python -m tests.integration.
test_hardening_webrtc --client URL`), inside the namespace: it sends Opus silence every
20 ms, reports on stdout as JSON lines and, on "mute" from stdin, stops sending audio.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from .netns import REPO, NetNs, NsServer
from .sip_peers import eventually
from .test_webrtc_offers import CHROME_OFFER

pytestmark = pytest.mark.timeout(180)

CONNECT_TIMEOUT = 2.0
MAX_PENDING = 4
MEDIA_TIMEOUT = 2.0
MARGIN = 4.0  # the media check runs every 0.5 s here; the rest is the hang-up and the store


def _offer(ns: NetNs, port: int, source: str) -> tuple[int, dict, dict]:
    """POST the never-connecting offer from `source` (a loopback address in the namespace)."""
    def post() -> tuple[int, dict, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15, source_address=(source, 0))
        try:
            conn.request("POST", "/webrtc/offer", json.dumps({"type": "offer", "sdp": CHROME_OFFER}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), json.loads(resp.read())
        finally:
            conn.close()

    return ns.call(post)


def test_offers_that_never_connect_are_capped_and_freed(ns, tmp_path):
    srv = NsServer(ns, ["--agent", "echo", "--webrtc-connect-timeout", str(CONNECT_TIMEOUT),
                        "--webrtc-max-pending", str(MAX_PENDING)], tmp_path / "server.log",
                   http_port=8093, sip_port=5093)
    try:
        srv.wait_ready()
        port = int(srv.url.rsplit(":", 1)[1])
        answered = []

        def answer(source: str) -> None:
            status, _, body = _offer(ns, port, source)
            assert status == 200, body
            answered.append(body["call_id"])

        answer("127.0.0.1")
        answer("127.0.0.1")
        # the third from one address: its own cap (2 by default)
        status, headers, body = _offer(ns, port, "127.0.0.1")
        assert (status, body.get("error")) == (503, "too-many-pending-source"), body
        assert int(headers["Retry-After"]) > 0 and body["message"]
        answer("127.0.0.2")
        answer("127.0.0.2")
        # a new address, but MAX_PENDING are pending already
        status, headers, body = _offer(ns, port, "127.0.0.3")
        assert (status, body.get("error")) == (503, "too-many-pending"), body
        assert int(headers["Retry-After"]) > 0 and body["message"]
        ready = srv.json("GET", "/readyz")[1]
        assert ready["calls"] == MAX_PENDING and ready["details"]["webrtc"]["pending"] == MAX_PENDING, ready
        # None connects: after the connect timeout every slot is free again.
        t0 = time.monotonic()
        ready = eventually(lambda: (r := srv.json("GET", "/readyz")[1])["calls"] == 0 and r,
                           CONNECT_TIMEOUT + MARGIN, what="every slot free")
        assert ready["details"]["webrtc"]["pending"] == 0, ready
        assert time.monotonic() - t0 <= CONNECT_TIMEOUT + MARGIN
        for call_id in answered:
            record = srv.json("GET", f"/calls/{call_id}")[1]
            assert (record["state"], record["end_reason"]) == ("ended", "ice-timeout"), record
        status, _, body = _offer(ns, port, "127.0.0.3")
        assert status == 200, f"room again once the pending offers timed out: {body}"
        srv.json("DELETE", f"/webrtc/calls/{body['call_id']}")
        metrics = srv.http("GET", "/metrics")[2].decode()
        for outcome in ("too-many-pending", "too-many-pending-source"):
            assert re.search(rf'^duplexline_webrtc_offers_total\{{outcome="{outcome}"\}} 1\.0$', metrics, re.M), outcome
        assert re.search(r'^duplexline_webrtc_calls_ended_total\{reason="ice-timeout"\} 4\.0$', metrics, re.M)
        assert srv.terminate() == 0, srv.log()
    finally:
        ns.kill(srv.proc)


class _Client:
    """The aiortc client process, its stdout read by a thread into a queue."""

    def __init__(self, ns: NetNs, url: str, log_path) -> None:
        self._log = open(log_path, "wb")
        self.proc = ns.popen([sys.executable, "-m", "tests.integration.test_hardening_webrtc", "--client", url],
                             stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.PIPE, cwd=str(REPO))
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(json.loads(raw))

    def expect(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"client: {what} not within {timeout} s") from None
            if predicate(msg):
                return msg

    def send(self, command: str) -> None:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def media_server(ns, tmp_path_factory):
    log = tmp_path_factory.mktemp("webrtc-media") / "server.log"
    srv = NsServer(ns, ["--agent", "echo", "--media-timeout", str(MEDIA_TIMEOUT)], log, http_port=8094,
                   sip_port=5094)
    try:
        yield srv.wait_ready()
    finally:
        ns.kill(srv.proc)


@pytest.mark.parametrize("how", ["mute", "stop"])
def test_a_caller_that_sends_no_audio_is_hung_up(ns, media_server, tmp_path, how):
    client = _Client(ns, media_server.url, tmp_path / "client.log")
    try:
        call_id = client.expect(lambda m: m.get("state") == "connected", 20, "connected")["call_id"]
        client.expect(lambda m: m.get("event") == "hello", 10, "the data channel open")
        # audio flows: the call stays up past the timeout
        deadline = time.monotonic() + MEDIA_TIMEOUT + 1
        while time.monotonic() < deadline:
            assert media_server.json("GET", f"/calls/{call_id}")[1]["state"] == "active"
            time.sleep(0.1)  # polling inside an observation window
        t0 = time.monotonic()
        if how == "mute":
            client.send("mute")  # still answers ICE consent checks, sends no audio
            hangup = client.expect(lambda m: m.get("event") == "hangup", MEDIA_TIMEOUT + MARGIN, "the hang-up")
            assert hangup["data"]["reason"] == "media-timeout"
        else:
            os.kill(client.proc.pid, signal.SIGSTOP)  # gone: no audio, no consent answers
        record = eventually(lambda: (r := media_server.json("GET", f"/calls/{call_id}")[1])["state"] == "ended"
                            and r, MEDIA_TIMEOUT + MARGIN, what="the call to end")
        elapsed = time.monotonic() - t0
        assert record["end_reason"] == "media-timeout", record
        assert MEDIA_TIMEOUT * 0.9 <= elapsed <= MEDIA_TIMEOUT + MARGIN, elapsed
        assert media_server.json("GET", "/readyz")[1]["calls"] == 0
    finally:
        client.close()
    metrics = media_server.http("GET", "/metrics")[2].decode()
    assert re.search(r'^duplexline_webrtc_calls_ended_total\{reason="media-timeout"\} [1-9]', metrics, re.M)


# ---- the client process ------------------------------------------------------------------


async def _client(url: str) -> None:
    import asyncio
    import fractions

    import aiohttp
    import av
    import numpy as np
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    def say(**msg) -> None:
        print(json.dumps(msg), flush=True)

    muted = asyncio.Event()

    class Silence(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.n = 0
            self.start: float | None = None

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            loop = asyncio.get_running_loop()
            self.start = self.start or loop.time()
            await asyncio.sleep(max(0.0, self.start + self.n * 0.02 - loop.time()))
            if muted.is_set():
                await asyncio.Future()  # no more frames: the sender waits here forever
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 48000, self.n * 960, fractions.Fraction(1, 48000)
            self.n += 1
            return frame

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(Silence(), direction="sendrecv")
    channel = pc.createDataChannel("events")
    channel.on("message", lambda text: say(**json.loads(text)))
    pc.on("connectionstatechange", lambda: say(state=pc.connectionState, call_id=call_id))
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/webrtc/offer", json={"type": "offer", "sdp": pc.localDescription.sdp}) as r:
            answer = await r.json()
            if r.status != 200:
                raise SystemExit(f"offer refused: {r.status} {answer}")
    call_id = answer["call_id"]
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "quit":
            break
        if line.strip() == "mute":
            muted.set()
    await pc.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        import asyncio

        asyncio.run(_client(sys.argv[2]))
