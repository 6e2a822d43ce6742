"""One clock: sessions that join at random phases are aligned to the engine's tick and step
together; a step computes only the rows that step; the warm-up gives admission data before
the first call; a lone session on an idle engine is stepped at once; and the call's frame
clock counts a stall's skipped frames as lost, once, not every later frame as late."""

import asyncio
import math
import random
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.session import FrameClock
from model.checkpoint import build_model, tiny_config
from model.engine import Engine, StepCosts
from model.errors import EngineFull
from model.omniflatten import OmniFlattenSession
from model.s3_tokenizer import S3Config, S3Tokenizer

FRAME = 0.02


@pytest.fixture(scope="module")
def model():
    # 25 Hz codes: a 400 ms chunk period leaves a loaded test machine room on the real clock.
    return build_model(tiny_config(speech_token_rate=25, context_length=256), seed=5)


def chunks_for(model, seed, n):
    rng = random.Random(seed)
    v = model.vocab
    return [[v.speech_id(rng.randrange(v.speech_codes)) for _ in range(model.layout.user)] for _ in range(n)]


def record_steps(engine):
    """Wrap the engine's stepper: (start time, rows computed, sessions stepped) per step."""
    steps = []
    inner = engine._stepper.step

    def step(user):
        t = time.monotonic()
        results, report = inner(user)
        steps.append((t, report.rows, report.stepped))
        return results, report

    engine._stepper.step = step
    return steps


def test_alignment_puts_every_first_chunk_just_before_a_tick(model):
    """Whatever the phase a session's audio starts at, its first chunk (pad frames of silence,
    then real frames) completes within one frame before `grace` ahead of a tick."""
    engine = Engine(model, slots=64, registry=CollectorRegistry(), warmup=False)
    frames = round(engine.period / FRAME)
    first = engine.open_session()
    t0 = 1000.0
    assert first.align(t0, FRAME) == 0  # an idle clock takes this session's phase, unpadded
    rng = random.Random(1)
    pads = []
    for _ in range(60):
        s = engine.open_session()
        start = t0 + rng.uniform(0, 5)
        pad = s.align(start, FRAME)
        pads.append(pad)
        assert 0 <= pad < frames
        done = start + (frames - pad - 1) * FRAME  # the first chunk's last real frame
        tick = engine._sessions[s.id].next_tick
        deadline = engine._deadline(tick)
        assert deadline - engine.grace - FRAME < done <= deadline - engine.grace + 1e-9
        assert tick == math.ceil((start + engine.grace - engine._deadline(0)) / engine.period - 1e-9)
    assert len(set(pads)) > frames // 2  # random phases need different pads


def test_sessions_joining_at_random_phases_step_together(model):
    """Six sessions start at random moments within one chunk period and send chunks on the
    real clock, with jitter, where their aligned frames complete: once all are in, every
    step steps all of them, computing exactly their rows, and results are on time."""
    n, chunks = 6, 8
    inputs = [chunks_for(model, 10 + i, chunks) for i in range(n)]
    expected = [_solo(model, inp) for inp in inputs]

    async def main():
        engine = Engine(model, slots=8, registry=CollectorRegistry(), warmup=False).start()
        steps = record_steps(engine)
        period = engine.period
        rng = random.Random(7)
        offsets = sorted(rng.uniform(0, period) for _ in range(n))
        aligned_at = []

        async def call(i):
            await asyncio.sleep(offsets[i])
            session = engine.open_session()
            first = time.monotonic()
            pad = session.align(first, FRAME)
            aligned_at.append(first)
            out = []
            for c in range(chunks):
                # The chunk's last frame arrives on the call's frame clock, up to 20 ms late.
                done = first + ((round(period / FRAME) - pad) + c * round(period / FRAME) - 1) * FRAME
                await asyncio.sleep(max(0.0, done + rng.uniform(0, 0.02) - time.monotonic()))
                out.append((await session.step(inputs[i][c])).token_ids)
            session.close()
            return out

        try:
            outs = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(n))), 60)
        finally:
            engine.close()
        return outs, steps, max(aligned_at), engine.stats()

    outs, steps, last_join, stats = asyncio.run(main())
    assert outs == expected
    assert all(rows == stepped for _, rows, stepped in steps)
    assert stats.rows_per_session == 1.0
    steady = [stepped for t, _, stepped in steps if t > last_join + 0.5][:-1]  # all six live
    assert len(steady) >= 3
    assert sum(steady) / (len(steady) * n) >= 0.9, steady  # one batch per tick, loaded machine or not
    assert stats.steps <= chunks + n  # not a step per chunk: ~one per tick, plus joins


def test_a_step_computes_only_the_rows_that_step(model):
    """Sessions close in the middle and step in changing subsets: before each step the
    stepping sessions are packed into the low rows, so rows computed == rows stepping,
    and the moves never mix caches (each session's tokens equal its solo run)."""
    inputs = [chunks_for(model, 40 + i, 6) for i in range(6)]
    plans = {0: range(6), 1: range(0, 6, 2), 2: range(3), 3: range(1, 6), 4: range(2, 4), 5: range(6)}

    async def main():
        engine = Engine(model, slots=6, registry=CollectorRegistry(), warmup=False).start()
        steps = record_steps(engine)
        sessions = [engine.open_session() for _ in range(6)]
        outs = {i: [] for i in range(6)}
        try:
            for t in range(6):
                live = [i for i in range(6) if t in plans[i]]
                got = await asyncio.wait_for(asyncio.gather(
                    *(sessions[i].step(inputs[i][len(outs[i])]) for i in live)), 30)
                for i, r in zip(live, got):
                    outs[i].append(r.token_ids)
                for i in range(6):
                    if t == max(plans[i]):
                        sessions[i].close()
        finally:
            engine.close()
        return outs, steps

    outs, steps = asyncio.run(main())
    for i in range(6):
        assert outs[i] == _solo(model, inputs[i][:len(plans[i])]), f"session {i}"
    assert steps and all(rows == stepped for _, rows, stepped in steps), steps


def _solo(model, chunks):
    s = OmniFlattenSession(model)
    return [s.step(c).token_ids for c in chunks]


def test_warm_up_measures_several_batch_sizes_before_the_first_call(model, caplog):
    """Admission has measurements before any call: the warm-up times the tick (tokenizer
    included) at 1, 2, 4, ... sessions and logs it; then the first callers, all at once,
    are admitted while the projection fits, and refused exactly where it does not."""
    tok = S3Tokenizer.random(S3Config(width=64, heads=4, layers=2, codebook_size=4096, token_rate=25), seed=0)
    engine = Engine(model, slots=4, tokenizer=tok, registry=CollectorRegistry(), headroom=1.0)
    assert engine.projected_step_seconds(1) is None
    with caplog.at_level("INFO", logger="model.engine"):
        engine.start()
    try:
        assert any("warm-up" in r.getMessage() and "tokenizer + LLM" in r.getMessage() for r in caplog.records)
        measured = engine.llm_costs.table()
        assert {1, 2} <= set(measured)
        assert set(engine.tokenizer_costs.table()) >= {1, 2}
        admitted = []
        for _ in range(4):
            projected = engine.projected_step_seconds(len(admitted) + 1)
            assert projected is not None
            if projected > engine.period:
                break
            admitted.append(engine.open_session())
        assert admitted  # on a loaded 2-core machine the tiny model still fits one
        assert engine.stats().steps == 0  # the warm-up is not counted as serving
    finally:
        engine.close()


def test_a_stale_slow_figure_does_not_refuse_its_size_for_ever(model, monkeypatch):
    """Admission keeps the engine from a size it measured too slow, so no pass of that
    size ever refreshes the figure: one slow warm-up on a busy machine refused every call
    to a worker for good. A figure older than max_age is forgotten."""
    now = [1000.0]
    monkeypatch.setattr("model.engine.time.monotonic", lambda: now[0])
    engine = Engine(model, slots=2, registry=CollectorRegistry())
    engine.llm_costs.record(1, 10 * engine.period)  # a warm-up under a CPU spike
    with pytest.raises(EngineFull) as refused:
        engine.open_session()
    assert refused.value.reason == "deadline"
    now[0] += engine.llm_costs.max_age + 1
    session = engine.open_session()  # forgotten: admitted without data, as before any warm-up
    assert engine.stats().open_sessions == 1
    session.close()


def test_step_costs_project_from_measured_rows():
    costs = StepCosts()
    assert costs.project(3) is None
    costs.record(1, 0.01)
    costs.record(4, 0.04)
    assert costs.project(1) == 0.01
    assert costs.project(2) == pytest.approx(0.02)  # between measured sizes: linear
    assert costs.project(8) == pytest.approx(0.08)  # beyond: scaled up from the largest
    costs.record(4, 0.09)  # an EWMA per size
    assert 0.04 < costs.project(4) < 0.09


def test_a_lone_session_on_an_idle_engine_is_stepped_at_once(model):
    """Continuous batching's good part: alone on the clock, a chunk steps when it arrives,
    not at its tick's deadline `grace` later."""
    chunk = chunks_for(model, 3, 1)[0]

    async def main():
        engine = Engine(model, slots=2, registry=CollectorRegistry(), warmup=False, grace=0.2).start()
        steps = record_steps(engine)
        try:
            session = engine.open_session()
            assert session.align(time.monotonic(), FRAME) == 0
            await asyncio.sleep(engine.period - FRAME)  # the first chunk's frames arrive
            sent = time.monotonic()
            await asyncio.wait_for(session.step(chunk), 30)
            return sent, steps[0][0]
        finally:
            engine.close()

    sent, started = asyncio.run(main())
    assert started - sent < 0.1  # its tick's deadline was 0.2 s after the chunk


def test_late_chunk_catches_up_and_the_session_stays_on_the_clock(model):
    """A chunk that misses its tick (a stall) is stepped at once; the session's next
    chunk is on time again and steps with the others."""
    inputs = [chunks_for(model, 60 + i, 3) for i in range(2)]

    async def main():
        engine = Engine(model, slots=2, registry=CollectorRegistry(), warmup=False).start()
        steps = record_steps(engine)
        period = engine.period
        try:
            a, b = engine.open_session(), engine.open_session()
            t0 = time.monotonic()
            pads = [a.align(t0, FRAME), b.align(t0, FRAME)]
            assert pads == [0, 0]
            first_done = t0 + (round(period / FRAME) - 1) * FRAME
            await asyncio.sleep(max(0.0, first_done - time.monotonic()))
            ra = a.submit(inputs[0][0])
            await asyncio.sleep(period)  # b's first chunk misses its tick
            rb = b.submit(inputs[1][0])
            await asyncio.wait_for(asyncio.gather(ra, rb), 30)
            await asyncio.sleep(max(0.0, first_done + period - time.monotonic()))
            await asyncio.wait_for(asyncio.gather(a.step(inputs[0][1]), b.step(inputs[1][1])), 30)
            return steps, engine.stats()
        finally:
            engine.close()

    steps, stats = asyncio.run(main())
    assert [s for _, _, s in steps] == [1, 1, 2]  # a at its tick, b caught up, then together
    assert stats.catch_up_steps == 1


# ---- the call's frame clock -----------------------------------------------------------------


def arrivals(clock, times):
    judged, lost = [], 0
    for t in times:
        j, n = clock.arrive(t)
        judged += j
        lost += n
    return judged, lost


def test_frames_skipped_after_a_stall_are_lost_once_not_late_for_ever():
    """The SIP leg skips the frames of a stall longer than 100 ms: after a 400 ms stall the
    stream goes on at its pace, 400 ms behind a clock that only counts frames."""
    times = [i * FRAME for i in range(50)] + [1.4 + i * FRAME for i in range(200)]
    judged, lost = arrivals(FrameClock(), times)
    assert lost == 20  # the frames due at 1.00 .. 1.38 s never came
    assert len(judged) == 250
    late = [j for j in judged if j > FRAME]
    assert len(late) == 1 and late[0] == pytest.approx(0.4, abs=1e-9)  # the frame after the gap


def test_frames_delivered_late_in_a_burst_count_late_and_none_lost():
    times = [i * FRAME for i in range(50)] + [1.405] * 21 + [1.4 + i * FRAME for i in range(1, 50)]
    judged, lost = arrivals(FrameClock(), times)
    assert lost == 0 and len(judged) == len(times)
    late = [j for j in judged if j > FRAME]
    assert len(late) == 20 and max(late) == pytest.approx(0.405)  # 405, 385, ... 25 ms late


def test_jitter_is_not_lateness_and_slow_drift_loses_a_frame_now_and_then():
    rng = np.random.default_rng(0)
    jitter = [i * FRAME + rng.uniform(0, 0.015) for i in range(500)]
    judged, lost = arrivals(FrameClock(), jitter)
    assert lost == 0 and not [j for j in judged if j > FRAME]
    slow = [i * FRAME * 1.001 for i in range(3000)]  # a sender clock 0.1% slow: 60 ms in a minute
    judged, lost = arrivals(FrameClock(), slow)
    assert 1 <= lost <= 3 and len([j for j in judged if j > FRAME]) <= lost
