"""Call recording from `duplexline serve --agent echo --record-dir DIR`, with Debian's
baresip as the caller playing a tone sweep over PCMU: the recording of a route with
`"record": true` holds the sweep on the left and its echo on the right at the echo's
delay, 16 kHz stereo, one frame per frame sent (the CDR's `frames.out`); the call's
`recording` event and CDR field name it; the admin route serves the same bytes and
refuses a request without the token; a route with `"record": false` leaves no file; the
retention deleted an old recording at start and kept a newer one."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from agent.recorder import file_name
from bridge.media import Resampler
from tests.integration.sip_peers import (TONES, BaresipPeer, BridgeProcess, eventually, lag_samples,
                                         metric_value, tone_runs, tone_sweep_wav)
from tests.integration.test_call_records import cdr_of

pytestmark = pytest.mark.slow
TOKEN = "rec-t0ken"
DAY = 86400


@pytest.fixture(scope="module")
def record_dir(workdir) -> Path:
    """With two recordings from earlier runs: one 3 days old, one 1 day old."""
    folder = workdir / "recordings"
    folder.mkdir()
    for name, age in (("old.wav", 3 * DAY), ("recent.wav", 1 * DAY)):
        (folder / name).write_bytes(b"RIFF")
        os.utime(folder / name, (time.time() - age,) * 2)
    return folder


@pytest.fixture(scope="module")
def cdr_dir(workdir) -> Path:
    return workdir / "cdr"


@pytest.fixture(scope="module")
def bridge(workdir, record_dir, cdr_dir):
    routes = workdir / "routes.json"
    routes.write_text(json.dumps({"routes": [{"match": "bot", "record": True},
                                             {"match": "norec", "record": False}]}))
    with BridgeProcess("--agent", "echo", "--sip-routes", str(routes), "--record-dir", str(record_dir),
                       "--record-retention-days", "2", "--cdr-dir", str(cdr_dir), "--rtp-ports", "29700-29899",
                       workdir=workdir, token=TOKEN) as server:
        yield server
        assert server.terminate() == 0, server.log()


def _get(bridge: BridgeProcess, path: str, token: str | None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(bridge.url + path)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _wav(path: Path) -> tuple:
    with wave.open(str(path)) as w:
        return w.getparams(), np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())


def test_retention_deleted_the_old_recording_at_start_and_kept_the_recent_one(bridge, record_dir):
    assert not (record_dir / "old.wav").exists() and (record_dir / "recent.wav").exists()
    assert metric_value(bridge.metrics(), "duplexline_recording_files_deleted_total") == 1
    assert "deleted 1 recordings older than 2 days" in bridge.log()


def test_a_recorded_echo_call_holds_the_caller_left_and_the_echo_right(bridge, workdir, record_dir, cdr_dir):
    sweep = tone_sweep_wav(workdir / "sweep.wav", 8000)
    with BaresipPeer(workdir, user="recorded", wav=sweep) as peer:
        peer.dial(f"sip:bot@127.0.0.1:{bridge.sip_port}")
        call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
        peer.wait_event("CALL_CLOSED", timeout=20)  # it hangs up when its WAV ends
    cdr = cdr_of(cdr_dir, call_id)
    path = Path(cdr["recording"])
    assert path == record_dir / file_name(call_id)
    frames_out = cdr["frames"]["out"]
    assert frames_out > 200  # the sweep is 4.5 s long
    # The writer finishes the file just after the call's end: its header then counts every frame sent.
    eventually(lambda: _wav(path)[0].nframes == frames_out * 320, timeout=10,
               what=f"the recording to hold {frames_out} frames")
    params, samples = _wav(path)
    assert (params.nchannels, params.framerate, params.sampwidth) == (2, 16000, 2)
    left, right = samples[:, 0] / 32768.0, samples[:, 1] / 32768.0
    assert [t for t, _ in tone_runs(16000, left)] == list(TONES)  # the caller's sweep, on the left
    assert [t for t, _ in tone_runs(16000, right)] == list(TONES)  # its echo, on the right
    # The echo agent plays each caller frame back at once, so the echo is sent on the same
    # tick: right = left through the resamplers of the round trip, 16 -> 8 kHz to the line
    # and 8 -> 16 kHz into the recording, linear-phase filters that delay every frequency by
    # exactly their group delay (2.4 ms each). Cross-correlation finds the lag to a sample;
    # the only noise is a rounding LSB, so 2 samples (0.125 ms) is the tolerance. A frame
    # paired one tick off would be 320 samples away, swapped channels the negative lag.
    expected = (Resampler(16000, 8000).delay_seconds + Resampler(8000, 16000).delay_seconds) * 16000
    lag = lag_samples(left, right, max_lag=800)
    assert abs(lag - expected) <= 2, (lag, expected)

    events = bridge.get(f"/calls/{call_id}")[1]["events"]
    assert [e["data"] for e in events if e["kind"] == "recording"] == [{"file": path.name}]
    status, headers, body = _get(bridge, f"/calls/{call_id}/recording", TOKEN)
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    assert body == path.read_bytes()
    status, headers, _ = _get(bridge, f"/calls/{call_id}/recording", None)
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    assert metric_value(bridge.metrics(), "duplexline_recording_frames_dropped_total", 'reason="queue_full"') == 0


def test_a_route_with_record_false_is_not_recorded(bridge, workdir, record_dir, cdr_dir):
    with BaresipPeer(workdir, user="unrecorded") as peer:
        peer.dial(f"sip:norec@127.0.0.1:{bridge.sip_port}")
        call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
        frames = metric_value(bridge.metrics(), "duplexline_agent_frame_lateness_seconds_count")
        eventually(lambda: metric_value(bridge.metrics(), "duplexline_agent_frame_lateness_seconds_count")
                   >= frames + 50, timeout=10, what="a second of the call's audio")
        peer.hangup()
        peer.wait_event("CALL_CLOSED", timeout=10)
    cdr = cdr_of(cdr_dir, call_id)
    assert cdr["frames"]["out"] >= 50 and cdr["recording"] is None  # it had audio, and no recording
    assert not (record_dir / file_name(call_id)).exists()
    assert [e for e in bridge.get(f"/calls/{call_id}")[1]["events"] if e["kind"] == "recording"] == []
    status, _, body = _get(bridge, f"/calls/{call_id}/recording", TOKEN)
    assert status == 404 and "no recording" in json.loads(body)["error"]
