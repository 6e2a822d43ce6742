"""The WebRTC leg's parts on their own, with no network: settings, offer checking, the
public-address twin candidates, the clock override and the fast media path's pieces
(a real aiortc receiver, real libopus). Nothing here opens a socket or gathers candidates."""

from __future__ import annotations

import asyncio
import datetime
import fractions
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import ConfigError
from bridge.settings import settings_from
from bridge.webrtc.config import IceServer, WebRtcSettings, parse_ice_servers
from bridge.webrtc.errors import OfferRejected, PeerFailed
from bridge.webrtc.sdp import announce_public_address, check_sdp, parse_offer

from .test_webrtc_offers import CHROME_OFFER

# ---- settings --------------------------------------------------------------------------------


def test_ice_servers_parse_json_and_comma_lists():
    assert parse_ice_servers("") == ()
    assert parse_ice_servers("stun:10.0.0.1:3478, stun:10.0.0.2:3478") == (
        IceServer(("stun:10.0.0.1:3478",)), IceServer(("stun:10.0.0.2:3478",)))
    servers = parse_ice_servers(json.dumps([{"urls": "turn:10.0.0.3:3478", "username": "u", "credential": "p"}]))
    assert servers[0].as_json() == {"urls": ["turn:10.0.0.3:3478"], "username": "u", "credential": "p"}
    assert "p" not in repr(servers[0]), "TURN credentials are not shown in repr"
    for bad, why in (("http://x", "must start with"), ('[{"urls": "turn:x"}]', "needs a username"),
                     ("[1]", "object"), ("[", "JSON")):
        with pytest.raises(ValueError, match=why):
            parse_ice_servers(bad)


def test_settings_come_from_flags_and_variables_and_name_bad_fields():
    s = settings_from(None, {"DUPLEXLINE_WEBRTC_TOKEN": "t" * 20, "DUPLEXLINE_WEBRTC_MAX_CALLS": "7",
                             "DUPLEXLINE_WEBRTC_PUBLIC_ADDRESS": "203.0.113.7", "DUPLEXLINE_WEBRTC_MEDIA": "stock"})
    assert (s.webrtc.token, s.webrtc.max_calls, s.webrtc.public_address, s.webrtc.media) == (
        "t" * 20, 7, "203.0.113.7", "stock")
    assert "t" * 20 not in repr(s.webrtc) and "<set>" in repr(s.webrtc)
    assert settings_from(None, {}).webrtc == WebRtcSettings()
    for env, field in ((("DUPLEXLINE_WEBRTC_TOKEN", "short"), "WEBRTC_TOKEN"),
                       (("DUPLEXLINE_WEBRTC_PUBLIC_ADDRESS", "not-an-ip"), "WEBRTC_PUBLIC_ADDRESS"),
                       (("DUPLEXLINE_WEBRTC_MEDIA", "turbo"), "WEBRTC_MEDIA"),
                       (("DUPLEXLINE_WEBRTC_ICE_SERVERS", "ftp://x"), "WEBRTC_ICE_SERVERS")):
        with pytest.raises(ConfigError, match=field):
            settings_from(None, dict([env]))
    with pytest.raises(ValueError, match="max_calls"):
        WebRtcSettings(max_calls=0)
    with pytest.raises(ValueError, match="public_address"):
        WebRtcSettings(public_address="example.org")


# ---- offers ----------------------------------------------------------------------------------


def test_chrome_offer_is_taken():
    offer = parse_offer(json.dumps({"type": "offer", "sdp": CHROME_OFFER}).encode())
    assert offer.has_data_channel and offer.audio_codecs[0] == "opus/48000/2"
    assert check_sdp(CHROME_OFFER.replace("\r\n", "\n")).audio_codecs == offer.audio_codecs


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=2000), st.text(max_size=2000).map(str.encode),
                 st.lists(st.sampled_from(CHROME_OFFER.split("\r\n")), max_size=60).map(
                     lambda lines: json.dumps({"type": "offer", "sdp": "\r\n".join(lines)}).encode())))
def test_any_body_is_taken_or_refused_cleanly(body):
    try:
        offer = parse_offer(body)
    except OfferRejected as exc:
        assert 400 <= exc.status < 500 and exc.code and exc.message
    else:
        assert any(c.lower().startswith("opus/48000") for c in offer.audio_codecs)


def test_public_address_adds_a_reflexive_twin_per_host_candidate():
    sdp = "\r\n".join(["v=0", "m=audio 9 UDP/TLS/RTP/SAVPF 96",
                       "a=candidate:abc 1 udp 2130706431 10.0.0.5 40000 typ host",
                       "a=candidate:def 1 udp 2130706431 fe80::1 40002 typ host",
                       "a=candidate:ghi 1 udp 1694498815 198.51.100.1 40004 typ srflx raddr 10.0.0.5 rport 40004", ""])
    out = announce_public_address(sdp, "203.0.113.9").split("\r\n")
    twin = [l for l in out if "203.0.113.9" in l]
    assert twin == ["a=candidate:abcn 1 udp 2113929215 203.0.113.9 40000 typ srflx raddr 10.0.0.5 rport 40000"]
    assert all(l in out for l in sdp.split("\r\n")), "the host candidates stay"


# ---- the clock override ----------------------------------------------------------------------


def test_fast_clock_gives_aiortcs_numbers():
    import aiortc.clock as clock

    from bridge.webrtc import clock as webrtc_clock

    rng = random.Random(7)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    for _ in range(2000):
        ns = rng.randrange(0, 4_000_000_000 * 10**9)
        dt = epoch + datetime.timedelta(microseconds=ns // 1000)
        assert webrtc_clock.ntp_from_ns(ns) == clock.datetime_to_ntp(dt)
        assert abs(webrtc_clock.ms_from_ns(ns) - int((dt - clock.NTP_EPOCH).total_seconds() * 1000)) <= 1
    original = clock.current_ntp_time
    webrtc_clock.install()
    webrtc_clock.install()
    try:
        assert webrtc_clock.installed() and clock.current_ntp_time is not original
        stock = clock.datetime_to_ntp(clock.current_datetime())
        assert abs(clock.current_ntp_time() - stock) < (1 << 32) // 10, "within 100 ms of aiortc's"
    finally:
        webrtc_clock.uninstall()
    assert clock.current_ntp_time is original and not webrtc_clock.installed()


# ---- the fast media path ---------------------------------------------------------------------


class _Packet:
    def __init__(self, seq: int) -> None:
        self.sequence_number = seq
        self.timestamp = seq * 960
        self._data = bytes([seq & 0xFF])


def test_newest_wins_drops_late_and_duplicate_packets_across_wraparound():
    from bridge.webrtc.peer import PeerStats, _NewestWins

    stats = PeerStats()
    jb = _NewestWins(stats)
    order = [65533, 65534, 65534, 65532, 65535, 0, 2, 1, 3]
    passed = [seq for seq in order if jb.add(_Packet(seq))[1] is not None]
    assert passed == [65533, 65534, 65535, 0, 2, 3]
    assert stats.late_packets == 3


def _tone(rate: int, seconds: float, f: float = 1000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * f * t)).astype(np.int16)


def test_opus_round_trip_keeps_the_tone_and_the_48k_clock():
    from aiortc.jitterbuffer import JitterFrame

    from bridge.webrtc.peer import FAST_RECEIVE_RATE, SEND_RATE, PeerStats, _FastDecoder, _OpusEncoder

    enc = _OpusEncoder()
    pcm = _tone(SEND_RATE, 1.0)
    packets = [p for k in range(50) for p in enc.encode(pcm[k * 480:(k + 1) * 480])]
    assert [p.pts for p in packets[:3]] == [0, 960, 1920], "the RTP clock is 48 kHz whatever the input rate"
    assert packets[0].time_base == fractions.Fraction(1, 48000)
    heard: list[np.ndarray] = []
    stats = PeerStats()
    dec = _FastDecoder(lambda x: heard.append(x.copy()), stats)
    for p in packets:
        dec.put((None, JitterFrame(bytes(p), p.pts)))
    dec.put((None, JitterFrame(b"\xff\xff\xff", 0)))  # garbage: counted, not raised
    assert stats.decode_errors == 1
    assert stats.frames_in == len(heard) == 50 and all(len(x) == FAST_RECEIVE_RATE // 50 for x in heard)
    out = np.concatenate(heard[10:]).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * FAST_RECEIVE_RATE / len(out) - 1000) < 10, "the tone comes out at 1000 Hz"
    dec.put(None)
    assert dec.get() is None, "the decoder thread is released at stop"


def test_fast_receive_installs_on_a_real_receiver_and_refuses_an_unknown_one():
    from aiortc import RTCPeerConnection

    from bridge.webrtc.peer import PeerStats, _FastDecoder, _install_fast_receive, _NewestWins

    async def go():
        pc = RTCPeerConnection()  # no description: no candidates are gathered
        try:
            receiver = pc.addTransceiver("audio").receiver
            _install_fast_receive(receiver, lambda pcm: None, PeerStats())
            assert isinstance(getattr(receiver, "_RTCRtpReceiver__jitter_buffer"), _NewestWins)
            assert isinstance(getattr(receiver, "_RTCRtpReceiver__decoder_queue"), _FastDecoder)
        finally:
            await pc.close()

    asyncio.run(go())
    with pytest.raises(PeerFailed, match="webrtc-media stock"):
        _install_fast_receive(object(), lambda pcm: None, PeerStats())  # type: ignore[arg-type]


def test_paced_track_keeps_the_20ms_clock_and_encodes():
    import av

    from bridge.webrtc.peer import SEND_RATE, PeerStats, _PacedTrack

    pulled = []

    def pull():
        pulled.append(1)
        return _tone(SEND_RATE, 0.02)

    async def go():
        track = _PacedTrack(pull, PeerStats(), encode=True)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        packets = [await track.recv() for _ in range(6)]
        return loop.time() - t0, packets

    elapsed, packets = asyncio.run(go())
    assert elapsed >= 0.09, "6 frames take at least 5 frame periods"
    assert all(isinstance(p, av.Packet) and p.size > 0 for p in packets)
    assert [p.pts for p in packets] == [960 * k for k in range(6)] and len(pulled) == 6


def test_silence_skips_the_encoder_and_speech_after_it_decodes_cleanly():
    from aiortc.jitterbuffer import JitterFrame

    from bridge.webrtc.peer import FAST_RECEIVE_RATE, SEND_RATE, PeerStats, _FastDecoder, _OpusEncoder

    enc = _OpusEncoder()
    tone = _tone(SEND_RATE, 0.4)
    frames = [np.zeros(480, np.int16)] * 10 + [tone[k * 480:(k + 1) * 480] for k in range(20)]
    frames += [np.zeros(480, np.int16)] * 5 + [tone[k * 480:(k + 1) * 480] for k in range(20)]
    packets = [p for f in frames for p in enc.encode(f)]
    assert enc.silent_frames == 15
    assert [p.pts for p in packets] == [960 * k for k in range(len(frames))], "no gap in the RTP clock"
    assert all(p.size <= 8 for p in packets[:10]), "silence is a tiny cached packet"
    heard: list[np.ndarray] = []
    stats = PeerStats()
    dec = _FastDecoder(lambda x: heard.append(x.copy()), stats)
    for p in packets:
        dec.put((None, JitterFrame(bytes(p), p.pts)))
    assert stats.decode_errors == 0 and len(heard) == len(frames)
    assert np.abs(np.concatenate(heard[:10])).max() < 50, "silence decodes to silence"
    for start in (12, 37):  # each talk spurt: the tone, at 1000 Hz, at its level
        out = np.concatenate(heard[start:start + 8]).astype(np.float64)
        assert abs(np.argmax(np.abs(np.fft.rfft(out))) * FAST_RECEIVE_RATE / len(out) - 1000) < 10
        assert 0.5 < np.sqrt((out ** 2).mean()) / (0.3 * 32767 / np.sqrt(2)) < 1.5
