"""Line quality: the simplified E-model against values worked out by hand from its
formulas (agent/emodel.py's docstring), and a call's `LineQuality`: dead air reported once
per stretch, never while listening is paused, the summary and the metrics it leaves."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.emodel import mos, mos_from_r, r_factor
from agent.quality import VOICE_PEAK, LineQuality, LineStats
from agent.quality_metrics import QualityMetrics

# Each case: rtt ms, jitter ms, loss, codec -> R, MOS, worked by hand:
#   d = rtt/2 + 2·jitter + 20; Id = 0.024·d (+ 0.11·(d − 177.3) above 177.3);
#   Ie,eff = 95·Ppl/(Ppl + Bpl) (Ie = 0); R = 93.2 − Id − Ie,eff;
#   MOS = 1 + 0.035·R + 7e-6·R·(R − 60)·(100 − R)
HAND = [
    # clean line: d = 20, Id = 0.48, R = 92.72; MOS = 1 + 3.2452 + 7e-6·92.72·32.72·7.28 = 4.3998
    (0, 0, 0.0, "pcmu", 92.72, 4.3998),
    # 5 % loss, G.711 without concealment (Bpl 4.3): Ie,eff = 95·5/9.3 = 51.0753,
    # R = 92.72 − 51.0753 = 41.6447; MOS = 1 + 1.4576 + 7e-6·41.6447·(−18.3553)·58.3553 = 2.1453
    (0, 0, 0.05, "pcmu", 41.6447, 2.1453),
    # long delay: d = 200 + 20 + 20 = 240, Id = 5.76 + 0.11·62.7 = 12.657, R = 80.543;
    # MOS = 1 + 2.8190 + 7e-6·80.543·20.543·19.457 = 4.0444
    (400, 10, 0.0, "pcma", 80.543, 4.0444),
    # Opus (Bpl 25.1), 2 % loss, rtt 100, jitter 5: d = 50 + 10 + 20 = 80, Id = 1.92,
    # Ie,eff = 190/27.1 = 7.0111, R = 84.2689; MOS = 1 + 2.9494 + 7e-6·84.2689·24.2689·15.7311 = 4.1746
    (100, 5, 0.02, "opus", 84.2689, 4.1746),
    # everything lost: Ie,eff = 9500/104.3 = 91.0834, R = 1.6366; the formula gives 0.9915,
    # below the scale: MOS 1.0
    (0, 0, 1.0, "pcmu", 1.6366, 1.0),
]


@pytest.mark.parametrize("rtt, jitter, loss, codec, r, score", HAND)
def test_emodel_matches_hand_computed_values(rtt, jitter, loss, codec, r, score):
    assert r_factor(rtt, jitter, loss, codec) == pytest.approx(r, abs=1e-3)
    assert mos(rtt, jitter, loss, codec) == pytest.approx(score, abs=1e-3)


def test_emodel_edges():
    assert mos_from_r(0) == 1.0 and mos_from_r(-5) == 1.0 and mos_from_r(100) == 4.5
    assert r_factor(0, 0, 0.0, "no-such-codec") == r_factor(0, 0, 0.0, "pcmu")  # unknown codecs: as G.711
    # worse on every axis means a lower score
    assert mos(0, 0, 0.01) > mos(0, 0, 0.02) and mos(100, 0, 0) > mos(300, 0, 0) > mos(300, 30, 0)


def _line(dead_air_seconds=2.0):
    registry = CollectorRegistry()
    events = []
    line = LineQuality("sip", QualityMetrics(registry), lambda kind, data: events.append((kind, data)),
                       dead_air_seconds=dead_air_seconds)
    return line, events, registry


def _count(registry, name, transport="sip"):
    return registry.get_sample_value(name, {"transport": transport}) or 0.0


SILENCE = np.zeros(320, np.int16)
VOICE = np.full(320, VOICE_PEAK, np.int16)


def test_dead_air_is_reported_once_per_stretch():
    line, events, registry = _line(2.0)
    tick = lambda t: asyncio.run(line.tick(t))  # noqa: E731
    tick(5.0)  # not answered yet: nothing
    line.listen(10.0)
    line.frame(SILENCE, 10.5)  # silence is not audio
    tick(11.9)
    assert events == []
    tick(12.0)
    tick(13.0)
    tick(20.0)  # the same stretch goes on: reported once
    assert events == [("dead-air", {"seconds": 2.0})]
    line.frame(-VOICE, 21.0)  # heard again (negative peaks count too): the stretch is over
    tick(22.9)
    assert len(events) == 1
    tick(23.0)
    assert [k for k, _ in events] == ["dead-air", "dead-air"] and line.dead_air == 2
    assert _count(registry, "duplexline_line_dead_air_total") == 2


def test_no_dead_air_on_hold_or_when_off():
    line, events, _ = _line(2.0)
    line.listen(0.0)
    line.pause()
    asyncio.run(line.tick(60.0))
    assert events == []
    line.listen(60.0)  # resumed: counts from here
    asyncio.run(line.tick(61.0))
    assert events == []
    off, off_events, _ = _line(0.0)
    off.listen(0.0)
    asyncio.run(off.tick(3600.0))
    assert off_events == []


def test_summary_and_metrics_at_the_end():
    line, _, registry = _line()
    assert line.summary("pcmu")["loss"] is None  # no media, no figures
    line.update(LineStats(packets=950, lost=50, jitter_ms=0.0, rtt_ms=None))
    line.concealed = 7
    summary = line.finish("pcmu")
    assert summary == {"packets": 950, "packets_lost": 50, "loss": 0.05, "jitter_ms": 0.0, "rtt_ms": None,
                       "mos": 2.15, "concealed_frames": 7, "dead_air": 0}  # MOS as in HAND's 5 % case
    assert registry.get_sample_value("duplexline_line_packet_loss_ratio_sum", {"transport": "sip"}) == 0.05
    assert registry.get_sample_value("duplexline_line_rtt_seconds_count", {"transport": "sip"}) == 0
    assert _count(registry, "duplexline_line_concealed_frames_total") == 7


def test_the_source_is_polled_each_tick_until_the_end():
    line, _, _ = _line()
    calls = []

    async def source():
        calls.append(1)
        return LineStats(packets=len(calls), lost=0, jitter_ms=1.0, rtt_ms=20.0)

    line.set_source(source)
    asyncio.run(line.tick(1.0))
    asyncio.run(line.tick(2.0))
    assert line.stats.packets == 2
    line.finish("opus")
    asyncio.run(line.tick(3.0))
    assert len(calls) == 2
