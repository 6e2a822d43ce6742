"""bridge/media/opus.py against libopus itself and against PyAV's encoder (what aiortc and
browsers send): tones survive at every rate, bad input is refused with a clear error."""

import fractions

import numpy as np
import pytest

from bridge.media.errors import BadPcm, UnsupportedRate
from bridge.media.opus import OpusDecoder, OpusEncoder, OpusError, libopus_version


def tone(rate, seconds, f=1000.0, amp=0.3):
    t = np.arange(int(rate * seconds)) / rate
    return (amp * 32767 * np.sin(2 * np.pi * f * t)).astype(np.int16)


def frames(pcm, rate):
    n = rate // 50
    return [pcm[i:i + n] for i in range(0, len(pcm) - n + 1, n)]


def peak_hz(x, rate):
    x = x.astype(np.float64)
    return np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x))))) * rate / len(x)


def rms(x):
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_the_library_is_found_and_names_its_version():
    assert libopus_version().startswith("libopus")


@pytest.mark.parametrize("enc_rate,dec_rate", [(24000, 16000), (24000, 48000), (16000, 16000), (48000, 16000)])
def test_a_tone_survives_encode_and_decode_at_any_pair_of_rates(enc_rate, dec_rate):
    enc, dec = OpusEncoder(enc_rate), OpusDecoder(dec_rate)
    packets = [enc.encode(f) for f in frames(tone(enc_rate, 1.0), enc_rate)]
    assert all(0 < len(p) <= 200 for p in packets)  # ~80 bytes at 32 kbit/s
    out = [dec.decode(p) for p in packets]
    assert all(len(x) == dec_rate // 50 for x in out), "one packet, 20 ms at the decoder's rate"
    heard = np.concatenate(out[10:])
    assert abs(peak_hz(heard, dec_rate) - 1000) < 15
    assert 0.7 < rms(heard) / (0.3 * 32767 / np.sqrt(2)) < 1.3


def test_decodes_what_pyav_encodes_at_48k_as_aiortc_and_browsers_send():
    av = pytest.importorskip("av")
    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate, codec.format, codec.layout, codec.sample_rate = 32000, "s16", "mono", 48000
    codec.time_base = fractions.Fraction(1, 48000)
    packets = []
    for k, f in enumerate(frames(tone(48000, 0.6, f=600), 48000)):
        frame = av.AudioFrame.from_ndarray(f.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48000, k * 960
        packets += [bytes(p) for p in codec.encode(frame)]
    dec = OpusDecoder(16000)
    heard = np.concatenate([dec.decode(p) for p in packets][5:])
    assert abs(peak_hz(heard, 16000) - 600) < 15


def test_reset_makes_the_encoder_start_a_fresh_stream():
    enc = OpusEncoder(24000)
    speech = frames(tone(24000, 0.2), 24000)
    first = [enc.encode(f) for f in speech]
    enc.reset()
    assert [enc.encode(f) for f in speech] == first, "a reset encoder repeats a fresh one's output"


def test_bad_input_is_refused_and_the_decoder_goes_on():
    dec = OpusDecoder(16000)
    good = OpusEncoder(16000).encode(tone(16000, 0.02))
    with pytest.raises(OpusError, match="opus_decode"):
        dec.decode(b"\xff\xff\xff\xff")
    with pytest.raises(OpusError, match="empty"):
        dec.decode(b"")
    assert len(dec.decode(good)) == 320
    enc = OpusEncoder(24000)
    with pytest.raises(BadPcm, match=r"int16\[480\]"):
        enc.encode(np.zeros(479, np.int16))
    with pytest.raises(BadPcm):
        enc.encode(np.zeros(480, np.float32))
    with pytest.raises(UnsupportedRate, match="44100"):
        OpusDecoder(44100)
    with pytest.raises(ValueError, match="complexity"):
        OpusEncoder(24000, complexity=11)


def test_the_bitrate_setting_takes_effect():
    pcm = tone(24000, 1.0, f=700)
    sizes = {}
    for bitrate in (16000, 32000):
        enc = OpusEncoder(24000, bitrate=bitrate)
        sizes[bitrate] = np.mean([len(enc.encode(f)) for f in frames(pcm, 24000)][5:])
    # bytes per 20 ms packet = bitrate / 8 / 50 (VBR: about that on a steady tone)
    assert 30 <= sizes[16000] <= 50 and 65 <= sizes[32000] <= 95, sizes


def test_a_missing_library_is_named_and_the_fast_webrtc_leg_refuses_to_start(monkeypatch):
    import asyncio

    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from bridge.webrtc import signaling
    from bridge.errors import BridgeError
    from bridge.media import opus
    from bridge.settings import Settings

    monkeypatch.setattr(opus, "_LIB", None)
    monkeypatch.setattr(opus, "_candidates", lambda: ["/nonexistent/libopus.so.0"])
    with pytest.raises(OpusError, match="libopus not found"):
        OpusDecoder(16000)
    with pytest.raises(BridgeError, match="webrtc-media stock"):
        asyncio.run(signaling.start(Settings(), None, web.Application(), CollectorRegistry()))
