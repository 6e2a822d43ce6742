"""Line quality of SIP calls from `duplexline serve --agent echo`, with Debian's baresip as
the caller: 5 % of its RTP packets dropped on the way by a seeded relay
(tests/integration/lossy_relay.py) show as about 5 % loss in the call's `quality`, in
`GET /calls/{id}` and in its CDR, and in the metrics; a clean call shows none; a caller
that sends only silence gets one dead-air event and one count per stretch.

The caller plays a silent WAV throughout (RTP flows, no voice), so both calls are also
dead air, once each."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.integration.lossy_relay import LossyRelay
from tests.integration.sip_peers import BaresipPeer, BridgeProcess, eventually, metric_value

pytestmark = pytest.mark.slow
TOKEN = "t0ken"
DEAD_AIR = 2.0  # --dead-air-seconds
PACKETS = 500  # RTP packets (10 s of 20 ms) the lossy call runs for


@pytest.fixture(scope="module")
def bridge(workdir):
    with BridgeProcess("--agent", "echo", "--cdr-dir", str(workdir / "cdr"), "--dead-air-seconds", str(DEAD_AIR),
                       "--rtp-ports", "27000-27999", workdir=workdir, token=TOKEN) as server:
        yield server
        assert server.terminate() == 0, server.log()


def _cdr(cdr_dir: Path, call_id: str) -> dict:
    def find():
        lines = [json.loads(line) for path in cdr_dir.glob("cdr-*.jsonl") for line in path.read_text().splitlines()]
        return [r for r in lines if r["call_id"] == call_id]

    records = eventually(find, timeout=15, what=f"the CDR of {call_id}")
    assert len(records) == 1, records
    return records[0]


def _ended(bridge: BridgeProcess, call_id: str) -> dict:
    def ended() -> dict | None:
        record = bridge.get(f"/calls/{call_id}")[1]
        return record if record.get("state") == "ended" else None

    return eventually(ended, timeout=15, what=f"{call_id} ended")


def test_packet_loss_on_the_line_shows_in_the_call_record(bridge, workdir):
    before = bridge.metrics()
    with LossyRelay(bridge.sip_port, loss=0.05, seed=7) as relay, BaresipPeer(workdir, user="lossy") as peer:
        peer.dial(f"sip:bot@127.0.0.1:{relay.sip_port}")
        call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
        eventually(lambda: relay.rtp_forwarded + relay.rtp_dropped >= PACKETS, timeout=30,
                   what=f"{PACKETS} RTP packets through the relay")
        peer.hangup()
        peer.wait_event("CALL_CLOSED", timeout=10)
        record = _ended(bridge, call_id)
        dropped, sent = relay.rtp_dropped, relay.rtp_forwarded + relay.rtp_dropped
    quality = record["quality"]
    assert quality == _cdr(workdir / "cdr", call_id)["quality"]  # the same object in both places
    # The bridge counts what the relay did, up to the packets in flight when the call ended:
    # a drop after the last packet received is no gap yet, and the jitter buffer (20-60 ms)
    # may hold the last three unread. So within 3 packets, and never more than were dropped.
    assert dropped - 3 <= quality["packets_lost"] <= dropped, (quality, dropped, sent)
    assert sent - dropped - 5 <= quality["packets"] <= sent - dropped, (quality, dropped, sent)
    # "about 5 %": the seeded drops over >= 500 packets; a binomial 5 % over 500 has a
    # standard deviation of 1 %, so 2-8 % holds for any seed at 3 sigma
    assert 0.02 <= quality["loss"] <= 0.08, quality
    assert abs(quality["loss"] - dropped / sent) <= 3 / sent + 1e-4, (quality, dropped, sent)
    # each lost packet left a 20 ms hole the SIP leg filled with silence
    assert quality["concealed_frames"] >= quality["packets_lost"] - 3, quality
    assert quality["mos"] < 3.0, quality  # G.711 at 5 % random loss: about 2.1 (agent/emodel.py)
    assert quality["dead_air"] == 1, quality  # silence all along: one stretch
    text = bridge.metrics()
    grew = lambda name, labels='transport="sip"': (  # noqa: E731
        metric_value(text, name, labels) - metric_value(before, name, labels))
    assert grew("duplexline_line_packet_loss_ratio_count") == 1
    assert grew("duplexline_line_packet_loss_ratio_sum") == pytest.approx(quality["loss"], abs=1e-6)
    assert grew("duplexline_line_packet_loss_ratio_bucket", 'le="0.1",transport="sip"') == 1
    assert grew("duplexline_line_packet_loss_ratio_bucket", 'le="0.02",transport="sip"') == 0
    assert grew("duplexline_line_mos_bucket", 'le="3.0",transport="sip"') == 1


def test_a_clean_line_and_dead_air_counted_once_per_stretch(bridge, workdir):
    before = metric_value(bridge.metrics(), "duplexline_line_dead_air_total", 'transport="sip"')
    with BaresipPeer(workdir, user="quiet") as peer:  # plays silence: RTP flows, nobody speaks
        peer.dial(f"sip:bot@127.0.0.1:{bridge.sip_port}")
        call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]

        def dead_air_events() -> list:
            events = bridge.get(f"/calls/{call_id}")[1]["events"]
            return [e for e in events if e["kind"] == "dead-air"]

        first = eventually(dead_air_events, timeout=DEAD_AIR + 5, what="a dead-air event")
        assert len(first) == 1 and first[0]["data"]["seconds"] >= DEAD_AIR
        # The stretch goes on for three times as long again: still one event, one count.
        # (Waiting out a span is the point here; every poll checks the count.)
        until = time.monotonic() + 3 * DEAD_AIR
        eventually(lambda: len(dead_air_events()) == 1 and time.monotonic() > until, timeout=3 * DEAD_AIR + 5,
                   what="the stretch to go on with a single event")
        live = bridge.get(f"/calls/{call_id}")[1]["quality"]
        assert live["dead_air"] == 1 and live["concealed_frames"] >= 0  # live, from the session
        peer.hangup()
        peer.wait_event("CALL_CLOSED", timeout=10)
    quality = _ended(bridge, call_id)["quality"]
    assert quality == _cdr(workdir / "cdr", call_id)["quality"]
    assert quality["packets"] >= 200 and quality["dead_air"] == 1, quality
    assert quality["packets_lost"] == 0 and quality["loss"] == 0.0, quality  # loopback loses nothing
    assert quality["mos"] > 4.3, quality  # the clean line's ceiling is 4.40
    assert metric_value(bridge.metrics(), "duplexline_line_dead_air_total", 'transport="sip"') == before + 1
