"""Framer and PlayoutBuffer: property tests of their accounting, plus the edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.media import BadFrameSize, BadPcm, Framer, PlayoutBuffer, UnsupportedRate

chunks = st.lists(
    st.lists(st.integers(-32768, 32767), max_size=700).map(lambda v: np.array(v, np.int16)),
    max_size=12,
)


# -- Framer --------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(parts=chunks, rate=st.sampled_from([8000, 16000, 24000]), ms=st.sampled_from([10, 20, 30]))
def test_frames_concatenate_to_the_input_prefix(parts, rate, ms) -> None:
    f = Framer(rate, ms)
    size = rate * ms // 1000
    frames: list[np.ndarray] = []
    for i, part in enumerate(parts):
        # Alternate bytes and arrays: the two input forms must be interchangeable.
        frames += f.push(part.tobytes() if i % 2 else part)
        assert f.pending_samples < size
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int16)
    assert all(fr.shape == (size,) and fr.dtype == np.int16 for fr in frames)
    got = np.concatenate(frames) if frames else np.zeros(0, np.int16)
    assert len(got) + f.pending_samples == len(stream)
    np.testing.assert_array_equal(got, stream[: len(got)])

    tail = f.flush()
    if len(stream) % size:
        assert tail is not None and tail.shape == (size,)
        rest = len(stream) - len(got)
        np.testing.assert_array_equal(tail[:rest], stream[len(got) :])
        assert not tail[rest:].any()  # padded with silence
    else:
        assert tail is None
    assert f.pending_samples == 0 and f.flush() is None


def test_frames_are_copies_not_views_of_the_input() -> None:
    f = Framer(8000)
    x = np.arange(400, dtype=np.int16)
    frames = f.push(x)
    x[:] = 0
    assert frames[0][1] == 1 and frames[1][0] == 160
    assert len(frames) == 2 and f.pending_samples == 80


def test_framer_sizes_and_reset() -> None:
    f = Framer(16000)
    assert (f.frame_samples, f.frame_bytes, f.frame_ms, f.rate) == (320, 640, 20.0, 16000)
    f.push(np.ones(100, np.int16))
    f.reset()
    assert f.pending_samples == 0 and f.flush() is None
    assert Framer(22050, 20).frame_samples == 441
    assert Framer(8000, 2.5).frame_samples == 20


@pytest.mark.parametrize(
    ("rate", "ms", "error"),
    [
        (22050, 10, BadFrameSize),  # 220.5 samples
        (8000, 0, BadFrameSize),
        (8000, -20, BadFrameSize),
        (8000, "20", BadFrameSize),
        (8000, True, BadFrameSize),
        (0, 20, UnsupportedRate),
        (-8000, 20, UnsupportedRate),
        (8000.0, 20, UnsupportedRate),
    ],
)
def test_framer_refuses_bad_configuration(rate, ms, error) -> None:
    with pytest.raises(error):
        Framer(rate, ms)


def test_framer_refuses_bad_pcm_without_losing_state() -> None:
    f = Framer(8000)
    f.push(np.ones(10, np.int16))
    with pytest.raises(BadPcm, match="even number of bytes"):
        f.push(b"\x00\x01\x02")
    with pytest.raises(BadPcm):
        f.push(np.ones(10, np.int32))
    assert f.pending_samples == 10
    assert f.push(b"") == [] and f.push(np.zeros(0, np.int16)) == []


# -- PlayoutBuffer -----------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 900)),
        st.tuples(st.just("pop"), st.just(0)),
        st.tuples(st.just("flush"), st.just(0)),
        st.tuples(st.just("end"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(script=ops, max_ms=st.sampled_from([None, 20, 50, 100]))
def test_playout_against_a_plain_list_model(script, max_ms) -> None:
    """Every operation agrees with a naive model (a Python list of samples)."""
    rate, frame = 8000, 160
    buf = PlayoutBuffer(rate, 20, max_ms=max_ms)
    cap = None if max_ms is None else rate * max_ms // 1000
    model: list[int] = []
    counter = 0
    overflow = flushed = 0
    for op, n in script:
        if op == "push":
            x = (np.arange(counter, counter + n) % 30000).astype(np.int16)
            counter += n
            dropped = buf.push(x)
            model.extend(int(v) for v in x)
            want_drop = max(0, len(model) - cap) if cap is not None else 0
            del model[:want_drop]
            overflow += want_drop
            assert dropped == want_drop
        elif op == "pop":
            out = buf.pop_frame()
            assert out.shape == (frame,) and out.dtype == np.int16
            take = model[:frame]
            del model[:frame]
            np.testing.assert_array_equal(out[: len(take)], take)
            assert not out[len(take) :].any()
        elif op == "flush":
            ms = buf.flush()
            assert ms == pytest.approx(len(model) * 1000 / rate)
            flushed += len(model)
            model.clear()
        else:
            buf.mark_end()
        assert buf.depth_samples == len(model)
        assert buf.depth_ms == pytest.approx(len(model) * 1000 / rate)
        if cap is not None:
            assert buf.depth_samples <= cap
        assert buf.overflow_samples == overflow and buf.flushed_samples == flushed
        assert buf.depth_samples == (
            buf.pushed_samples - buf.popped_samples - buf.flushed_samples - buf.overflow_samples
        )


def test_pop_on_empty_is_silence_and_idle_silence_is_not_an_underrun() -> None:
    buf = PlayoutBuffer(16000)
    for _ in range(5):
        frame = buf.pop_frame()
        assert frame.shape == (320,) and not frame.any()
    assert buf.underruns == 0


def test_running_dry_mid_speech_counts_one_underrun_per_gap() -> None:
    buf = PlayoutBuffer(8000)
    buf.push(np.ones(400, np.int16))  # 2.5 frames
    assert buf.pop_frame().all() and buf.pop_frame().all()
    short = buf.pop_frame()  # half a frame of speech, then silence
    assert short[:80].all() and not short[80:].any()
    assert buf.underruns == 1
    buf.pop_frame()
    buf.pop_frame()
    assert buf.underruns == 1  # the same gap is counted once
    buf.push(np.ones(160, np.int16))
    buf.pop_frame()
    buf.pop_frame()
    assert buf.underruns == 2


def test_mark_end_makes_the_natural_end_not_an_underrun() -> None:
    buf = PlayoutBuffer(8000)
    buf.push(np.ones(200, np.int16))
    buf.mark_end()
    buf.pop_frame()
    buf.pop_frame()
    buf.pop_frame()
    assert buf.underruns == 0
    buf.push(np.ones(10, np.int16))  # a new utterance un-ends the stream
    buf.pop_frame()
    assert buf.underruns == 1


def test_flush_drops_everything_at_once_for_barge_in() -> None:
    buf = PlayoutBuffer(24000, max_ms=None)
    buf.push(np.ones(24000 * 3, np.int16))  # 3 s, past the initial 1 s ring: it grows
    buf.pop_frame()
    assert buf.flush() == pytest.approx(3000 - 20)
    assert buf.depth_ms == 0 and buf.flush() == 0.0
    assert not buf.pop_frame().any() and buf.underruns == 0  # flushing is not running dry


def test_max_depth_drops_oldest_and_keeps_newest() -> None:
    buf = PlayoutBuffer(8000, max_ms=40)  # 320 samples
    buf.push(np.arange(300, dtype=np.int16))
    assert buf.push(np.arange(1000, 1100, dtype=np.int16)) == 80
    np.testing.assert_array_equal(buf.pop_frame()[:80], np.arange(80, 160))
    big = np.arange(2000, 3000, dtype=np.int16)
    assert buf.push(big) == 160 + 1000 - 320  # all 160 queued, and 680 of the new
    np.testing.assert_array_equal(buf.pop_frame(), big[-320:-160])
    assert buf.max_ms == 40 and buf.overflow_samples == 80 + 840


def test_bytes_and_arrays_mix() -> None:
    buf = PlayoutBuffer(8000)
    buf.push(np.full(100, 7, np.int16).tobytes())
    buf.push(np.full(60, 9, np.int16))
    frame = buf.pop_frame()
    assert (frame[:100] == 7).all() and (frame[100:] == 9).all()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rate": 0}, UnsupportedRate),
        ({"rate": 8000, "frame_ms": 0}, BadFrameSize),
        ({"rate": 22050, "frame_ms": 10}, BadFrameSize),
        ({"rate": 8000, "max_ms": 10}, BadFrameSize),  # less than one frame
        ({"rate": 8000, "max_ms": "100"}, BadFrameSize),
    ],
)
def test_playout_refuses_bad_configuration(kwargs, error) -> None:
    with pytest.raises(error):
        PlayoutBuffer(**kwargs)


def test_playout_refuses_bad_pcm_without_losing_state() -> None:
    buf = PlayoutBuffer(8000)
    buf.push(np.ones(50, np.int16))
    with pytest.raises(BadPcm):
        buf.push(b"\x01")
    assert buf.depth_samples == 50 and buf.push(b"") == 0
