"""A real SIP client calls `duplexline serve --agent omniflatten` (no --model: the tiny,
random model built at start-up, whose stand-in decoder plays tones): audio comes back,
/calls shows the call while it lasts, and with every engine slot taken a second caller
is answered 486 Busy Here, before anything is answered."""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration.sip_peers import (BaresipPeer, BridgeProcess, eventually, metric_value, read_wav,
                                         tone_sweep_wav)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bridge(workdir):
    with BridgeProcess("--agent", "omniflatten", "--slots", "1", "--device", "cpu", "--rtp-ports", "23000-23999",
                       workdir=workdir) as server:
        yield server
        assert server.terminate() == 0, server.log()


def test_model_call_sends_audio_back_and_is_listed_while_live(bridge, workdir):
    wav = tone_sweep_wav(workdir / "sweep.wav", 8000, tail_s=3.0)
    with BaresipPeer(workdir, user="caller", wav=wav) as peer:
        peer.dial(f"sip:assistant@127.0.0.1:{bridge.sip_port}")
        call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
        live = eventually(lambda: [c for c in bridge.get("/calls?live=1")[1]["calls"] if c["call_id"] == call_id],
                          timeout=5, what="the call in /calls?live=1")
        assert live[0]["transport"] == "sip" and live[0]["remote"] == peer.uri
        assert live[0]["state"] in ("ringing", "active")

        # A second caller while the only slot is taken: refused before it is answered.
        with BaresipPeer(workdir, user="second") as second:
            second.dial(f"sip:assistant@127.0.0.1:{bridge.sip_port}")
            closed = second.wait_event("CALL_CLOSED", timeout=10)
            assert "486" in closed.get("param", ""), closed
            assert not any(e.get("type") == "CALL_ESTABLISHED" for e in second.events)

        peer.wait_event("CALL_CLOSED", timeout=30)  # its WAV ended
        _, heard_wav = peer.recordings()
    rate, heard = read_wav(heard_wav)
    frames = heard[: len(heard) // 160 * 160].reshape(-1, 160)
    loud = np.sqrt((frames ** 2).mean(axis=1)) > 0.01
    assert loud.mean() > 0.1, f"only {loud.mean():.0%} of 20 ms frames carried audio"
    record = eventually(lambda: (r := bridge.get(f"/calls/{call_id}")[1]).get("state") == "ended" and r,
                        timeout=10, what="the call to end")
    assert record["frames_in"] > 100 and record["frames_out"] > 100
    assert call_id not in [c["call_id"] for c in bridge.get("/calls?live=1")[1]["calls"]]
    text = bridge.metrics()
    assert metric_value(text, "duplexline_sip_invites_total", 'outcome="486"') == 1
    assert metric_value(text, "duplexline_sip_invites_total", 'outcome="answered"') == 1
