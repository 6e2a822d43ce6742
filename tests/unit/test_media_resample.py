"""Streaming resampler: quality, latency and streaming facts for every rate pair the bridge
uses, measured on real signals (chirp, sines, speech-like noise), plus bad input.

Quality is judged against the analytic signal, not against another resampler: the input
is a chirp sampled at the input rate, the reference is the same chirp computed at the
output rate and delayed by the stream's reported `delay_seconds`. A delay wrong by even
10 µs would cost more than 60 dB at 3.4 kHz, so the SNR test also proves the reported
delay exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal

from bridge.media import BadPcm, MediaError, Resampler, UnsupportedRate, design

PAIRS = [
    (8000, 16000),
    (16000, 8000),
    (16000, 48000),
    (48000, 16000),
    (22050, 8000),
    (22050, 16000),
    (22050, 48000),
    (24000, 8000),
    (24000, 16000),
    (24000, 48000),
]
IDS = [f"{a}-{b}" for a, b in PAIRS]

AMPLITUDE = 16384.0  # -6 dBFS: realistic speech peak level, far from clipping
CHIRP_LOW, CHIRP_HIGH = 200.0, 3400.0  # the telephone band, inside every pair's passband
SECONDS = 0.5


def chirp(t: np.ndarray) -> np.ndarray:
    """Linear chirp CHIRP_LOW -> CHIRP_HIGH over SECONDS, zero before t = 0."""
    rate = (CHIRP_HIGH - CHIRP_LOW) / SECONDS
    phase = 2 * np.pi * (CHIRP_LOW * t + rate / 2 * t**2)
    return np.where(t >= 0, AMPLITUDE * np.sin(phase), 0.0)


def sampled(fn, rate: int, seconds: float = SECONDS) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return np.round(fn(t)).astype(np.int16)


def speechlike(rate: int, seconds: float, seed: int) -> np.ndarray:
    """Noise band-limited to 100-3800 Hz with a 4 Hz syllable envelope, about -10 dBFS."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    sos = signal.butter(6, [100, min(3800, 0.45 * rate)], btype="band", fs=rate, output="sos")
    x = signal.sosfilt(sos, rng.standard_normal(n))
    x *= 0.3 + 0.7 * np.sin(np.pi * 4.0 * np.arange(n) / rate) ** 2
    return np.clip(np.round(x / np.abs(x).max() * 10000), -32768, 32767).astype(np.int16)


def run_frames(r: Resampler, x: np.ndarray, frame: int) -> np.ndarray:
    return np.concatenate([r.process(x[i : i + frame]) for i in range(0, len(x), frame)])


def snr_db(reference: np.ndarray, got: np.ndarray) -> float:
    err = got.astype(np.float64) - reference
    return 10 * math.log10(np.sum(reference**2) / np.sum(err**2))


def frame20(rate: int) -> int:
    return rate // 50


# -- latency and quality ----------------------------------------------------------------------


@pytest.mark.parametrize(("rate_in", "rate_out"), PAIRS, ids=IDS)
def test_latency_at_most_3ms(rate_in: int, rate_out: int) -> None:
    r = Resampler(rate_in, rate_out)
    assert 0 < r.delay_seconds <= 0.003
    d = design(rate_in, rate_out)
    assert r.delay_seconds == pytest.approx((len(d.taps) - 1) / 2 / (rate_in * d.up))


@pytest.mark.parametrize(("rate_in", "rate_out"), PAIRS, ids=IDS)
def test_chirp_snr_at_least_80db(rate_in: int, rate_out: int) -> None:
    r = Resampler(rate_in, rate_out)
    y = run_frames(r, sampled(chirp, rate_in), frame20(rate_in))
    t = np.arange(len(y)) / rate_out - r.delay_seconds
    keep = (t >= 0.010) & (t <= SECONDS - 0.010)  # skip the chirp's switch-on transient
    assert snr_db(chirp(t[keep]), y[keep]) >= 80.0


@pytest.mark.parametrize(("rate_in", "rate_out"), PAIRS, ids=IDS)
def test_sine_snr_and_gain(rate_in: int, rate_out: int) -> None:
    def tone(t: np.ndarray) -> np.ndarray:
        return np.where(t >= 0, AMPLITUDE * np.sin(2 * np.pi * 1000.0 * t), 0.0)

    r = Resampler(rate_in, rate_out)
    y = run_frames(r, sampled(tone, rate_in, 0.2), frame20(rate_in))
    t = np.arange(len(y)) / rate_out - r.delay_seconds
    keep = t >= 0.010
    assert snr_db(tone(t[keep]), y[keep]) >= 80.0


def _peak_db(x: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude spectrum in dB (Blackman-Harris window: sidelobes below -92 dB)."""
    w = signal.get_window("blackmanharris", len(x))
    spec = np.abs(np.fft.rfft(x.astype(np.float64) * w))
    return np.fft.rfftfreq(len(x), 1 / rate), 20 * np.log10(spec + 1e-12)


def _steady(r: Resampler, rate_in: int, freq: float, amplitude: float) -> np.ndarray:
    """Output for a 0.3 s tone, minus the first 50 ms (switch-on transient)."""
    t = np.arange(int(0.3 * rate_in)) / rate_in
    x = np.round(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    y = run_frames(r, x, frame20(rate_in))
    return y[int(0.05 * r.rate_out) :]


def _out_of_band_tone(rate_in: int, rate_out: int) -> float:
    """A tone the resampler must remove: for downsampling, 1.25x the output's Nyquist
    (aliases to 0.75x: 5 kHz into 8 kHz lands at 3 kHz); for upsampling, 0.75x the
    input's Nyquist, whose image at 1.25x must be removed."""
    if rate_out < rate_in:
        return 1.25 * rate_out / 2
    return 0.75 * rate_in / 2


@pytest.mark.parametrize(("rate_in", "rate_out"), PAIRS, ids=IDS)
def test_aliases_and_images_80db_below_full_scale(rate_in: int, rate_out: int) -> None:
    full_scale = 32767.0
    reference = _steady(Resampler(rate_in, rate_out), rate_in, 1000.0, full_scale)
    ref_level = _peak_db(reference, rate_out)[1].max()

    tone = _out_of_band_tone(rate_in, rate_out)
    y = _steady(Resampler(rate_in, rate_out), rate_in, tone, full_scale)
    freqs, db = _peak_db(y, rate_out)
    if rate_out < rate_in:
        unwanted = np.ones_like(freqs, dtype=bool)  # anything left of the tone is an alias
    else:
        unwanted = freqs > rate_in / 2  # the tone itself stays; its images must go
    assert db[unwanted].max() <= ref_level - 80.0


@pytest.mark.parametrize("rate_in", [16000, 22050, 24000])
def test_5khz_into_8khz_at_least_80db_down(rate_in: int) -> None:
    """The case that matters on a phone line: speech energy at 5 kHz in the model's audio
    must not fold back to 3 kHz."""
    full_scale = 32767.0
    reference = _steady(Resampler(rate_in, 8000), rate_in, 1000.0, full_scale)
    ref_level = _peak_db(reference, 8000)[1].max()
    y = _steady(Resampler(rate_in, 8000), rate_in, 5000.0, full_scale)
    db = _peak_db(y, 8000)[1]
    assert db.max() <= ref_level - 80.0
    assert np.abs(y).max() <= 2  # in sample terms: the 5 kHz tone is gone, to the LSB


# -- streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize(("rate_in", "rate_out"), PAIRS, ids=IDS)
def test_frames_and_random_chunks_equal_whole_signal(rate_in: int, rate_out: int) -> None:
    x = speechlike(rate_in, 0.4, seed=rate_in + rate_out)
    whole = Resampler(rate_in, rate_out).process(x)
    assert len(whole) == -(-len(x) * rate_out // rate_in)

    framed = run_frames(Resampler(rate_in, rate_out), x, frame20(rate_in))
    rng = np.random.default_rng(7)
    r = Resampler(rate_in, rate_out)
    pieces, i = [], 0
    while i < len(x):
        n = int(rng.integers(0, 3 * frame20(rate_in)))  # zero-length chunks included
        pieces.append(r.process(x[i : i + n]))
        i += n
    chunked = np.concatenate(pieces)
    for got in (framed, chunked):
        assert len(got) == len(whole)
        assert np.abs(got.astype(np.int32) - whole).max() <= 1


@pytest.mark.parametrize(("rate_in", "rate_out"), [(8000, 16000), (24000, 8000), (22050, 8000)])
def test_one_sample_at_a_time(rate_in: int, rate_out: int) -> None:
    x = speechlike(rate_in, 0.05, seed=3)
    whole = Resampler(rate_in, rate_out).process(x)
    r = Resampler(rate_in, rate_out)
    single = np.concatenate([r.process(x[i : i + 1]) for i in range(len(x))])
    assert np.abs(single.astype(np.int32) - whole).max() <= 1


@settings(max_examples=40, deadline=None)
@given(
    pair=st.sampled_from([(8000, 16000), (24000, 8000), (22050, 16000), (24000, 16000)]),
    sizes=st.lists(st.integers(min_value=0, max_value=1500), min_size=1, max_size=12),
)
def test_any_chunking_gives_ceil_outputs_and_same_samples(pair, sizes) -> None:
    rate_in, rate_out = pair
    x = speechlike(rate_in, sum(sizes) / rate_in + 0.001, seed=1)[: sum(sizes)]
    whole = Resampler(rate_in, rate_out).process(x)
    r = Resampler(rate_in, rate_out)
    outs, total = [], 0
    for n in sizes:
        expected = r.output_length(n)
        out = r.process(x[total : total + n])
        total += n
        assert len(out) == expected
        assert r.samples_in == total
        assert r.samples_out == -(-total * rate_out // rate_in)
        outs.append(out)
    got = np.concatenate(outs)
    assert len(got) == len(whole)
    assert np.abs(got.astype(np.int32) - whole).max(initial=0) <= 1


def test_long_chunk_is_cut_into_pieces_transparently() -> None:
    x = speechlike(24000, 3.0, seed=5)
    framed = run_frames(Resampler(24000, 8000), x, 480)
    whole = Resampler(24000, 8000).process(x)  # 3 s: many internal pieces
    assert np.abs(framed.astype(np.int32) - whole).max() <= 1


def test_dc_gain_is_unity() -> None:
    for rate_in, rate_out in PAIRS:
        y = Resampler(rate_in, rate_out).process(np.full(rate_in // 10, 12345, np.int16))
        assert np.abs(y[len(y) // 2 :].astype(np.int32) - 12345).max() <= 1


def _upfirdn_reference(rate_in: int, rate_out: int, x: np.ndarray) -> np.ndarray:
    """The same filter applied by scipy's (stateless, float64) upfirdn, rounded and
    clipped: an independent check of the block matrix's indexing."""
    d = design(rate_in, rate_out)
    y = signal.upfirdn(d.taps, x.astype(np.float64), d.up, d.down)
    return np.clip(np.round(y[: -(-len(x) * d.up // d.down)]), -32768, 32767)


@pytest.mark.parametrize(("rate_in", "rate_out"), PAIRS, ids=IDS)
def test_matches_scipy_upfirdn_with_the_same_taps(rate_in: int, rate_out: int) -> None:
    x = speechlike(rate_in, 0.2, seed=21)
    y = run_frames(Resampler(rate_in, rate_out), x, frame20(rate_in))
    assert np.abs(y - _upfirdn_reference(rate_in, rate_out, x)).max() <= 1


def test_full_scale_overshoot_saturates_instead_of_wrapping() -> None:
    """A full-scale square wave rings (Gibbs) past int16 after filtering: it must clip."""
    t = np.arange(4000)
    square = np.where((t // 200) % 2 == 0, 32767, -32768).astype(np.int16)
    y = run_frames(Resampler(8000, 16000), square, 160)
    unclipped = signal.upfirdn(design(8000, 16000).taps, square.astype(np.float64), 2, 1)
    assert unclipped.max() > 32767 and unclipped.min() < -32768  # the test has teeth
    assert np.abs(y - _upfirdn_reference(8000, 16000, square)).max() <= 1
    assert y.max() == 32767 and y.min() == -32768


def test_starts_from_silence_and_reset_forgets() -> None:
    x = speechlike(8000, 0.2, seed=11)
    fresh = Resampler(8000, 16000).process(x)
    r = Resampler(8000, 16000)
    r.process(speechlike(8000, 0.13, seed=12))
    r.reset()
    assert r.samples_in == 0 and r.samples_out == 0
    np.testing.assert_array_equal(r.process(x), fresh)


def test_empty_chunk_is_a_no_op() -> None:
    x = speechlike(24000, 0.1, seed=13)
    want = Resampler(24000, 8000).process(x)
    r = Resampler(24000, 8000)
    first = r.process(x[:100])
    empty = r.process(np.zeros(0, np.int16))
    assert empty.dtype == np.int16 and empty.shape == (0,)
    assert r.process(b"").shape == (0,)
    assert r.samples_in == 100
    rest = r.process(x[100:])
    np.testing.assert_array_equal(np.concatenate([first, rest]), want)


def test_bytes_in_bytes_out() -> None:
    x = speechlike(16000, 0.1, seed=14)
    want = run_frames(Resampler(16000, 48000), x, 320).tobytes()
    r = Resampler(16000, 48000)
    got = b"".join(r.process_bytes(x[i : i + 320].tobytes()) for i in range(0, len(x), 320))
    assert got == want  # same chunking, same arithmetic: identical
    r = Resampler(16000, 48000)
    got = [r.process(bytearray(x[i : i + 320].tobytes())) for i in range(0, len(x), 320)]
    assert np.concatenate(got).tobytes() == want


def test_equal_rates_pass_through() -> None:
    x = speechlike(16000, 0.05, seed=15)
    r = Resampler(16000, 16000)
    assert r.delay_seconds == 0.0
    out = r.process(x)
    np.testing.assert_array_equal(out, x)
    assert out is not x and r.samples_out == len(x)


def test_tables_are_shared_and_read_only() -> None:
    a, b = Resampler(22050, 8000), Resampler(22050, 8000)
    assert design(22050, 8000) is design(22050, 8000)
    assert a._design is b._design  # one filter for every stream of the pair
    with pytest.raises(ValueError):
        design(22050, 8000).matrix[0, 0] = 1.0
    with pytest.raises(ValueError):
        design(22050, 8000).taps[0] = 1.0


def test_streams_are_independent() -> None:
    x1, x2 = speechlike(8000, 0.1, seed=16), speechlike(8000, 0.1, seed=17)
    want1, want2 = Resampler(8000, 16000).process(x1), Resampler(8000, 16000).process(x2)
    a, b = Resampler(8000, 16000), Resampler(8000, 16000)
    got1, got2 = [], []
    for i in range(0, len(x1), 160):  # interleaved, as two calls on one event loop
        got1.append(a.process(x1[i : i + 160]))
        got2.append(b.process(x2[i : i + 160]))
    assert np.abs(np.concatenate(got1).astype(np.int32) - want1).max() <= 1
    assert np.abs(np.concatenate(got2).astype(np.int32) - want2).max() <= 1


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate_in", "rate_out", "match"),
    [
        (0, 16000, "rate_in=0"),
        (-8000, 16000, "rate_in=-8000"),
        (8000, -16000, "rate_out=-16000"),
        (8000, 0, "rate_out=0"),
        (8000.0, 16000, "integer"),
        ("8000", 16000, "integer"),
        (None, 16000, "integer"),
        (True, 16000, "bool"),
        (8000, 10**7, "between"),
        (8000, 16001, "16001/8000"),  # ratio in lowest terms too large
    ],
)
def test_bad_rates_are_refused_clearly(rate_in, rate_out, match) -> None:
    with pytest.raises(UnsupportedRate, match=match):
        Resampler(rate_in, rate_out)


def test_numpy_integer_rates_are_fine() -> None:
    assert Resampler(np.int64(8000), np.int32(16000)).rate_out == 16000


def test_bad_pcm_is_refused_before_state_changes() -> None:
    r = Resampler(8000, 16000)
    with pytest.raises(BadPcm, match="even number of bytes, got 3"):
        r.process(b"\x00\x01\x02")
    with pytest.raises(BadPcm, match="int16"):
        r.process(np.zeros(160, np.float32))
    with pytest.raises(BadPcm, match="1-D"):
        r.process(np.zeros((2, 160), np.int16))
    with pytest.raises(BadPcm):
        r.process_bytes(b"\x00" * 7)
    with pytest.raises(MediaError):
        r.process([1, 2, 3])  # type: ignore[arg-type]
    assert r.samples_in == 0
