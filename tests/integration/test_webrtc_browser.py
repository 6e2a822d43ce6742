"""The softphone page in headless Chromium against a real bridge, all inside a private
network namespace (tests/integration/netns.py).

The fake microphone plays a WAV of two tones (600 Hz and 1000 Hz bursts); the page
records both directions on one audio clock, so the test checks that the tones it sent
come back from the echo agent, and how late. With the tiny random model the transcript
fills with token placeholders and the latency field with the model's response time.
"""

from __future__ import annotations

import base64
import os
import re
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from .browser import Chromium, Page
from .netns import NsServer

pytestmark = pytest.mark.timeout(180)

TONES = (600.0, 1000.0)
CYCLE = 2.0  # seconds: 600 Hz for 0.4 s, 0.4 s silence, 1000 Hz for 0.4 s, 0.8 s silence
CONNECT = 20.0  # seconds from the click to "in-call"
SCREENSHOT_TO = os.environ.get("WEBRTC_SCREENSHOT_TO")  # set to docs/softphone.png to refresh it


def _write_tones(path: Path, rate: int = 48000) -> Path:
    t = np.arange(int(rate * CYCLE)) / rate
    sig = np.zeros_like(t)
    for f, start in zip(TONES, (0.0, 0.8)):
        on = (t >= start) & (t < start + 0.4)
        sig[on] = 0.3 * np.sin(2 * np.pi * f * t[on])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((sig * 32767).astype("<i2").tobytes())
    return path


def _tone_frames(x: np.ndarray, f: float, rate: int, win: int) -> np.ndarray:
    """Per 20 ms window: the amplitude of the `f` component (a one-bin DFT)."""
    n = len(x) // win
    seg = x[: n * win].reshape(n, win)
    basis = np.exp(-2j * np.pi * f * np.arange(win) / rate)
    return 2 * np.abs(seg @ basis) / win


def _recording(page: Page, seconds: float) -> tuple[int, np.ndarray, np.ndarray]:
    rec = page.evaluate(f"softphone.recording({seconds})")
    mic = np.frombuffer(base64.b64decode(rec["mic"]), "<i2").astype(np.float64)
    remote = np.frombuffer(base64.b64decode(rec["remote"]), "<i2").astype(np.float64)
    return rec["rate"], mic, remote


def _check_echo(page: Page, seconds: float = 4.0) -> float:
    """Both tones came back; returns the echo delay in ms (the lag that best lines the
    assistant's audio up with the microphone's, on the page's one audio clock)."""
    rate, mic, remote = _recording(page, seconds)
    assert len(remote) >= rate * (seconds - 0.1), "the page recorded too little"
    win = rate // 50
    for f in TONES:
        sent = _tone_frames(mic, f, rate, win) > 1000
        heard = _tone_frames(remote, f, rate, win) > 1000
        assert sent.sum() >= 20, f"the fake microphone did not play {f} Hz"
        assert heard.sum() >= 0.6 * sent.sum(), f"{f} Hz: sent in {sent.sum()} frames, heard in {heard.sum()}"
    # the 600 Hz tone is not in the remote audio where the microphone played 1000 Hz
    other = _tone_frames(remote, TONES[0], rate, win)[_tone_frames(mic, TONES[1], rate, win) > 1000]
    assert np.median(other) < 1000, "the echo is not the tones that were sent"
    lags = np.arange(0, int(0.8 * rate), 16)
    span = len(mic) - lags[-1]
    score = [np.dot(remote[lag:lag + span], mic[:span]) for lag in lags]
    return 1000.0 * lags[int(np.argmax(score))] / rate


def _call(page: Page) -> str:
    page.click("#call")
    page.wait_for("softphone.state === 'in-call' || softphone.state === 'failed'", CONNECT)
    error = page.evaluate("softphone.error")
    assert error is None, error
    return page.evaluate("softphone.callId")


def _live(server: NsServer) -> list[str]:
    return [c["call_id"] for c in server.json("GET", "/calls?live=1")[1]["calls"]]


def _wait_record(server: NsServer, call_id: str, predicate, timeout: float = 10.0) -> dict:
    poll = _Poll(timeout)
    while True:
        record = server.json("GET", f"/calls/{call_id}")[1]
        if predicate(record):
            return record
        poll.tick(f"call record {record}")


class _Poll:
    """A bounded polling loop for conditions on the server."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout

    def tick(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise AssertionError(f"timed out waiting; last: {what}")
        time.sleep(0.05)  # polling interval; the deadline bounds the wait


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("webrtc-browser")
    _write_tones(path / "tones.wav")
    return path


@pytest.fixture(scope="module")
def echo_server(ns, workdir):
    srv = NsServer(ns, ["--agent", "echo"], workdir / "echo-server.log", http_port=8090, sip_port=5090)
    try:
        yield srv.wait_ready()
    finally:
        ns.kill(srv.proc)


@pytest.fixture(scope="module")
def browser(ns, workdir):
    with Chromium(ns, workdir, fake_audio=workdir / "tones.wav") as b:
        yield b


def test_echo_call_in_chromium(echo_server, browser, capsys):
    page = browser.open(echo_server.url + "/")
    call_id = _call(page)
    assert _live(echo_server) == [call_id]
    assert page.evaluate("document.getElementById('call-id').textContent") == call_id[:8]
    page.wait_for("softphone.mic.length * 2048 >= 4.5 * softphone.sampleRate", 20)
    delay = _check_echo(page)
    assert 20 < delay < 600, f"echo delay {delay:.0f} ms"
    with capsys.disabled():
        print(f"\n[webrtc] echo delay through Chromium and the bridge: {delay:.0f} ms")
    # levels of both directions on the meters
    assert page.evaluate("softphone.peaks[0] > -30 && softphone.peaks[1] > -30") is True
    # the keypad reaches the session, which says so back over the data channel
    page.click('.keypad button[data-key="5"]')
    page.click('.keypad button[data-key="#"]')
    page.wait_for("document.getElementById('keys-sent').textContent.endsWith('5#')", 5)
    # stats events and the network round trip fill in
    page.wait_for("softphone.rttMs !== null && document.getElementById('rtt').textContent.endsWith('ms')", 5)
    page.wait_for("softphone.lossPct !== null && /^\\d+\\.\\d %$/.test(document.getElementById('loss').textContent)", 5)
    assert page.evaluate("softphone.lossPct") < 1.0  # nothing is lost inside the namespace
    # the bridge's own view, polled from aiortc's getStats once a second while the call is live
    _wait_record(echo_server, call_id, lambda r: ((r["quality"] or {}).get("packets") or 0) > 50)
    record = _wait_record(echo_server, call_id, lambda r: [e["data"]["digits"] for e in r["events"]
                                                              if e["kind"] == "dtmf"] == ["5", "#"])
    assert record["state"] == "active" and record["frames_in"] > 0
    page.click("#hangup")
    page.wait_for("softphone.state === 'ended'", 5)
    record = _wait_record(echo_server, call_id, lambda r: r["state"] == "ended")
    assert record["end_reason"] == "remote-hangup"
    assert record["frames_in"] >= 200 and record["frames_out"] >= 200
    quality = record["quality"]  # the summary stored when the call ended
    assert quality["packets"] >= 200 and quality["packets_lost"] == 0 and quality["mos"] > 4.0, quality
    assert quality["rtt_ms"] is not None and 0 <= quality["rtt_ms"] < 100, quality  # Chromium's RTCP reports
    assert _live(echo_server) == []


def test_two_concurrent_browser_calls(echo_server, browser):
    first, second = browser.open(echo_server.url + "/"), browser.open(echo_server.url + "/")
    a, b = _call(first), _call(second)
    assert a != b and sorted(_live(echo_server)) == sorted([a, b])
    for page in (first, second):
        page.wait_for("softphone.mic.length * 2048 >= 4.5 * softphone.sampleRate", 20)
        _check_echo(page)
    first.click("#hangup")
    first.wait_for("softphone.state === 'ended'", 5)
    poll = _Poll(10)
    while _live(echo_server) != [b]:
        poll.tick(str(_live(echo_server)))
    # the other call goes on: its frames keep coming after the first one ended
    before = echo_server.json("GET", f"/calls/{b}")[1]["frames_in"]
    _wait_record(echo_server, b, lambda r: r["frames_in"] >= before + 50 or r["state"] != "active")
    assert second.evaluate("softphone.state") == "in-call"
    second.click("#hangup")
    second.wait_for("softphone.state === 'ended'", 5)
    poll = _Poll(10)
    while _live(echo_server):
        poll.tick(str(_live(echo_server)))


def test_no_microphone_is_explained(ns, echo_server, workdir):
    with Chromium(ns, workdir, fake_audio=None, fake_devices=False) as bare:
        page = bare.open(echo_server.url + "/")
        page.click("#call")
        page.wait_for("softphone.state === 'failed'", 10)
        assert page.evaluate("softphone.error.code") == "no-mic"
        text = page.evaluate("document.getElementById('error').textContent")
        assert "microphone" in text.lower() and not page.evaluate("document.getElementById('error').hidden")
    assert _live(echo_server) == []


def test_tiny_model_call_shows_transcript_and_latency(ns, workdir, browser):
    srv = NsServer(ns, ["--agent", "omniflatten", "--slots", "1"], workdir / "model-server.log",
                   http_port=8091, sip_port=5091)
    try:
        srv.wait_ready(timeout=120)
        page = browser.open(srv.url + "/")
        call_id = _call(page)
        page.wait_for("softphone.transcript.length > 20", 30)
        assert re.fullmatch(r"(⟨\d+⟩)+", page.evaluate("softphone.transcript")), "token placeholders"
        page.wait_for("/^\\d+ ms$/.test(document.getElementById('latency').textContent)", 10)
        assert 0 < page.evaluate("softphone.latencyMs") < 5000
        assert page.evaluate("document.getElementById('turn').textContent") in ("speaking", "listening")
        kinds = set(page.evaluate("softphone.events.map(e => e.kind)"))
        assert {"hello", "text", "turn", "latency"} <= kinds, kinds
        page.wait_for("softphone.mic.length * 2048 >= 3 * softphone.sampleRate", 10)
        shot = workdir / "softphone.png"
        page.screenshot(shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if SCREENSHOT_TO:
            Path(SCREENSHOT_TO).write_bytes(shot.read_bytes())
        # one slot: a second caller is refused before anything is built, and told why
        other = browser.open(srv.url + "/")
        other.click("#call")
        other.wait_for("softphone.state === 'failed'", 10)
        assert other.evaluate("softphone.error.code") == "busy"
        assert "busy" in other.evaluate("document.getElementById('error').textContent")
        assert _live(srv) == [call_id]
        # the operator hangs up: the page says who ended the call
        assert srv.json("POST", f"/calls/{call_id}/hangup")[0] == 200
        page.wait_for("softphone.state === 'ended'", 10)
        assert "operator" in page.evaluate("document.getElementById('status').textContent")
        record = _wait_record(srv, call_id, lambda r: r["state"] == "ended")
        assert record["end_reason"] == "operator"
    finally:
        ns.kill(srv.proc)


def test_connection_lost_is_shown(ns, workdir, browser):
    srv = NsServer(ns, ["--agent", "echo"], workdir / "lost-server.log", http_port=8092, sip_port=5092)
    try:
        srv.wait_ready()
        page = browser.open(srv.url + "/")
        _call(page)
        ns.kill(srv.proc)  # the bridge dies mid-call
        page.wait_for("softphone.state === 'failed'", 30)
        assert page.evaluate("softphone.error.code") == "connection-lost"
        assert "lost" in page.evaluate("document.getElementById('error').textContent")
    finally:
        ns.kill(srv.proc)
