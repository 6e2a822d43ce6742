"""`ResampleBatch`: many streams' chunks of one tick resampled together must give, bit for
bit, what each stream's own `Resampler.process` gives, with the state carried over ticks;
and, independently, what scipy's upfirdn gives with the same taps (within the one LSB the
float32 sums allow, as for the per-stream resampler). Also the line's batched path
(`LineAudio.receive_into`/`received`, deferred `play`/`settle`) against the plain one."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from bridge.line_audio import LineAudio
from bridge.media import BadPcm, Resampler, design
from bridge.media.batch_resample import ResampleBatch

PAIRS = [(8000, 16000), (16000, 8000), (48000, 16000), (16000, 48000), (22050, 8000), (24000, 8000), (16000, 16000)]
IDS = [f"{a}-{b}" for a, b in PAIRS]


def _lengths(rate: int, rng: np.random.Generator, count: int) -> list[int]:
    """What a tick reads: mostly 0-4 whole 20 ms frames, now and then an odd size."""
    frame = rate // 50
    odd = [1, 7, frame // 2 + 3, 3 * frame + 11, 70 * frame]  # the last is over the step limit
    return [int(rng.choice(odd)) if rng.random() < 0.2 else frame * int(rng.integers(0, 5)) for _ in range(count)]


def _ticks(rate_in: int, rate_out: int, calls: int, ticks: int, seed: int):
    """Per tick: every call's chunk (random full-scale PCM, so clipping is exercised too)."""
    rng = np.random.default_rng(seed)
    for _ in range(ticks):
        yield [rng.integers(-32768, 32768, n, dtype=np.int16) for n in _lengths(rate_in, rng, calls)]


@pytest.mark.parametrize(("rate_in", "rate_out"), PAIRS, ids=IDS)
def test_batched_equals_per_stream_bit_for_bit_over_ticks(rate_in: int, rate_out: int) -> None:
    calls = 40
    alone = [Resampler(rate_in, rate_out) for _ in range(calls)]
    batched = [Resampler(rate_in, rate_out) for _ in range(calls)]
    batch = ResampleBatch()
    for chunks in _ticks(rate_in, rate_out, calls, ticks=40, seed=rate_in + rate_out):
        expected = [r.process(x) for r, x in zip(alone, chunks, strict=True)]
        tickets = [batch.add(r, x) for r, x in zip(batched, chunks, strict=True)]
        batch.run()
        for i, (ticket, want) in enumerate(zip(tickets, expected, strict=True)):
            got = batch.result(ticket)
            assert got.dtype == np.int16 and np.array_equal(got, want), f"call {i}"
        batch.clear()
        assert [r.samples_in for r in batched] == [r.samples_in for r in alone]


def test_a_stream_twice_in_one_batch_takes_its_chunks_in_order() -> None:
    rng = np.random.default_rng(3)
    alone, batched, batch = Resampler(16000, 8000), Resampler(16000, 8000), ResampleBatch()
    for _ in range(10):
        chunks = [rng.integers(-20000, 20000, int(n), dtype=np.int16) for n in rng.integers(0, 700, 4)]
        expected = [alone.process(x) for x in chunks]
        tickets = [batch.add(batched, x) for x in chunks]
        batch.run()
        assert all(np.array_equal(batch.result(t), e) for t, e in zip(tickets, expected, strict=True))
        batch.clear()


@pytest.mark.parametrize(("rate_in", "rate_out"), [(8000, 16000), (16000, 8000), (48000, 16000)])
def test_batched_streams_match_scipy_upfirdn_with_the_same_taps(rate_in: int, rate_out: int) -> None:
    """Each call's concatenated output against scipy applied to its whole input."""
    calls = 12
    streams = [Resampler(rate_in, rate_out) for _ in range(calls)]
    batch = ResampleBatch()
    inputs: list[list[np.ndarray]] = [[] for _ in range(calls)]
    outputs: list[list[np.ndarray]] = [[] for _ in range(calls)]
    for chunks in _ticks(rate_in, rate_out, calls, ticks=25, seed=9):
        chunks = [(x // 4).astype(np.int16) for x in chunks]  # -12 dBFS: no clipping here
        tickets = [batch.add(r, x) for r, x in zip(streams, chunks, strict=True)]
        batch.run()
        for i, t in enumerate(tickets):
            inputs[i].append(chunks[i])
            outputs[i].append(batch.result(t).copy())
        batch.clear()
    d = design(rate_in, rate_out)
    for i in range(calls):
        x = np.concatenate(inputs[i]).astype(np.float64)
        y = np.concatenate(outputs[i])
        ref = signal.upfirdn(d.taps, x, d.up, d.down)[: -(-len(x) * d.up // d.down)]
        ref = np.clip(np.round(ref), -32768, 32767)
        assert len(y) == len(ref)
        assert np.abs(y - ref).max(initial=0) <= 1, f"call {i}"


def test_calls_do_not_share_history() -> None:
    """Two calls, one silent: the silent one's output stays silent while the other talks."""
    loud, quiet, batch = Resampler(8000, 16000), Resampler(8000, 16000), ResampleBatch()
    rng = np.random.default_rng(1)
    for _ in range(5):
        a = batch.add(loud, rng.integers(-30000, 30000, 160, dtype=np.int16))
        b = batch.add(quiet, np.zeros(160, np.int16))
        batch.run()
        assert np.abs(batch.result(a)).max() > 0
        assert not batch.result(b).any()
        batch.clear()


def test_bad_pcm_is_refused_before_state_changes() -> None:
    r, batch = Resampler(8000, 16000), ResampleBatch()
    with pytest.raises(BadPcm):
        batch.add(r, b"\x00\x01\x02")  # odd byte count
    assert r.samples_in == 0 and len(batch) == 0


def test_results_taken_stay_valid_after_the_next_tick() -> None:
    r, batch = Resampler(8000, 16000), ResampleBatch()
    t = batch.add(r, np.full(160, 1000, np.int16))
    batch.run()
    first = batch.result(t)
    kept = first.copy()
    batch.clear()
    batch.add(r, np.full(160, -1000, np.int16))
    batch.run()
    assert np.array_equal(first, kept)


@pytest.mark.parametrize("line_rate", [8000, 16000, 48000])
def test_line_audio_batched_equals_plain(line_rate: int) -> None:
    """receive_into/received and deferred play/settle against receive/play, many lines."""
    rng = np.random.default_rng(line_rate)
    plain = [LineAudio(line_rate) for _ in range(6)]
    lines = [LineAudio(line_rate) for _ in range(6)]
    inbound, outbound = ResampleBatch(), ResampleBatch()
    for _ in range(30):
        reads = [rng.integers(-9000, 9000, n, dtype=np.int16) for n in _lengths(line_rate, rng, len(lines))]
        want_frames = [p.receive(x) for p, x in zip(plain, reads, strict=True)]
        tickets = [line.receive_into(inbound, x) for line, x in zip(lines, reads, strict=True)]
        inbound.run()
        for line, p, t, want in zip(lines, plain, tickets, want_frames, strict=True):
            got = line.received(inbound, t)
            assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
            line.defer_play(outbound)
            for frame in got:  # an echo: each frame played straight back
                line.play(frame, 16000)
                p.play(frame, 16000)
            line.defer_play(None)
        outbound.run()
        for line, p in zip(lines, plain, strict=True):
            line.settle(outbound)
            assert line.depth_ms == p.depth_ms
            assert np.array_equal(line.next_frame(), p.next_frame())
        inbound.clear()
        outbound.clear()


def test_flush_drops_staged_plays() -> None:
    line, batch = LineAudio(8000), ResampleBatch()
    line.defer_play(batch)
    line.play(np.full(320, 5000, np.int16), 16000)
    line.flush()
    line.defer_play(None)
    batch.run()
    line.settle(batch)
    assert line.depth_ms == 0.0
