"""The batching engine: batched tokens equal solo tokens, joins/leaves never disturb
others, admission, backlog bounds, metrics."""

import asyncio
import random

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from model.checkpoint import build_model, tiny_config
from model.cosyvoice_decoder import CosyVoiceDecoder, DecoderSettings, Voice
from model.config import SamplingConfig
from model.engine import Engine
from model.errors import EngineFull, StaleSession
from model.omniflatten import BatchStepper, OmniFlattenSession


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(dtype="float64", context_length=120), seed=11)


def chunks_for(model, seed, n):
    rng = random.Random(seed)
    v = model.vocab
    return [[v.silent_speech if rng.random() < 0.3 else v.speech_id(rng.randrange(v.speech_codes))
             for _ in range(model.layout.user)] for _ in range(n)]


def solo(model, prompt, sampling, chunks):
    s = OmniFlattenSession(model, prompt=prompt, sampling=sampling)
    return [s.step(c).token_ids for c in chunks]


def test_batched_equals_alone_with_staggered_joins_and_rollover(model):
    """Sessions join at different chunks (different positions), one samples, and all run
    long enough (14 chunks of 22 tokens in a 120-token context) to roll over."""
    specs = [((1, 2, 3), None, 0), ((), SamplingConfig(temperature=1.0, top_k=40, seed=5), 2),
             ((7,), None, 5), ((), None, 1)]
    n = 14
    inputs = [chunks_for(model, 100 + i, n) for i in range(len(specs))]
    expected = [solo(model, p, s, inputs[i]) for i, (p, s, _) in enumerate(specs)]

    stepper = BatchStepper(model, 6)
    got = [[] for _ in specs]
    for t in range(n + max(j for *_, j in specs)):
        for i, (p, s, join) in enumerate(specs):
            if t == join:
                stepper.open(i + 1, p, s)  # rows 1..4: row 0 stays idle and masked
        work = {i + 1: inputs[i][t - join] for i, (_, _, join) in enumerate(specs) if join <= t < join + n}
        if not work:
            continue
        results, report = stepper.step(work)
        assert report.stepped == len(work)
        for row, r in results.items():
            got[row - 1].append(r.token_ids)
    assert all(stepper.rolled_chunks(i + 1) > 0 for i in range(len(specs)))
    assert got == expected


def test_random_joins_and_leaves_through_the_engine(model):
    """Many sessions join and leave at random through the async API; each one's tokens
    equal its solo run, and packing rows on close never mixes caches."""
    rng = random.Random(3)
    plans = []
    for i in range(12):
        plans.append((rng.randrange(0, 6), rng.randrange(3, 9), (i,) if i % 2 else ()))

    async def run_session(engine, start, length, prompt, inputs):
        for _ in range(start):
            await asyncio.sleep(0)  # interleave opens with other sessions' steps
        session = engine.open_session(prompt)
        out = [(await session.step(c)).token_ids for c in inputs[:length]]
        session.close()
        return out

    async def main():
        engine = Engine(model, slots=12, registry=CollectorRegistry()).start()
        try:
            inputs = [chunks_for(model, 200 + i, 9) for i in range(len(plans))]
            outs = await asyncio.wait_for(asyncio.gather(*(
                run_session(engine, s, l, p, inputs[i]) for i, (s, l, p) in enumerate(plans))), 120)
            return inputs, outs, engine.stats()
        finally:
            engine.close()

    inputs, outs, stats = asyncio.run(main())
    for i, (_, length, prompt) in enumerate(plans):
        assert outs[i] == solo(model, prompt, None, inputs[i][:length]), f"session {i}"
    assert stats.open_sessions == 0 and stats.steps > 0


def test_admission_refuses_when_full_and_when_draining(model):
    registry = CollectorRegistry()
    engine = Engine(model, slots=2, registry=registry)
    a = engine.open_session()
    engine.open_session()
    with pytest.raises(EngineFull) as exc:
        engine.open_session()
    assert exc.value.reason == "no_slot"
    a.close()
    engine.open_session()  # the freed slot is usable at once
    engine.drain()
    with pytest.raises(EngineFull) as exc:
        engine.open_session()
    assert exc.value.reason == "draining"
    assert registry.get_sample_value("duplexline_engine_admission_refusals_total", {"reason": "no_slot"}) == 1
    assert registry.get_sample_value("duplexline_engine_admission_refusals_total", {"reason": "draining"}) == 1


def test_admission_refuses_when_steps_would_miss_the_deadline(model):
    engine = Engine(model, slots=8, registry=CollectorRegistry(), headroom=0.5)
    engine.llm_costs.record(1, 0.04)
    engine.llm_costs.record(2, 0.09)  # period 0.2 s: 2 rows take 90 ms, 3 are projected at 135
    engine.open_session()
    engine.open_session()
    with pytest.raises(EngineFull) as exc:
        engine.open_session()
    assert exc.value.reason == "deadline" and "projected" in str(exc.value)


def test_closed_handle_is_stale_and_backlog_is_bounded(model):
    async def main():
        engine = Engine(model, slots=2, registry=CollectorRegistry(), max_backlog=1)
        session = engine.open_session()
        chunk = chunks_for(model, 1, 1)[0]
        # The engine thread is not started: the first chunk waits, the second replaces it.
        first = asyncio.ensure_future(session.step(chunk))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(session.step(chunk))
        result = await asyncio.wait_for(first, 5)
        assert result.dropped and set(result.speech_codes) == {-1}
        engine.start()
        assert not (await asyncio.wait_for(second, 30)).dropped
        session.close()
        with pytest.raises(StaleSession):
            await session.step(chunk)
        engine.close()
        return engine.stats()

    stats = asyncio.run(main())
    assert stats.dropped_chunks == 1


def test_metrics_count_steps_and_tokens(model):
    registry = CollectorRegistry()

    async def main():
        engine = Engine(model, slots=4, registry=registry).start()
        sessions = [engine.open_session() for _ in range(3)]
        chunk = chunks_for(model, 2, 1)[0]
        await asyncio.wait_for(asyncio.gather(*(s.step(chunk) for s in sessions)), 30)
        engine.close()

    asyncio.run(main())
    get = registry.get_sample_value
    assert get("duplexline_engine_tokens_generated_total", {"stream": "speech"}) == 30
    assert get("duplexline_engine_tokens_generated_total", {"stream": "text"}) == 6
    assert get("duplexline_engine_step_duration_seconds_count") >= 1
    assert get("duplexline_engine_batch_size_sum") == 3
    assert get("duplexline_engine_slots_used") == 3
    assert get("duplexline_engine_slots_total") == 4


def test_the_decoder_runs_on_the_tick_and_each_result_carries_its_audio(model):
    """With a decoder, the engine decodes every LLM step's speech codes as one batch right
    after the step: each result's audio equals that session's codes pushed, in order, to a
    stream of the same decoder alone (the batch changes nothing but the cost), and the
    decoder's time is in the step metrics."""
    decoder = CosyVoiceDecoder.random("v1", settings=DecoderSettings(steps=2))
    registry = CollectorRegistry()
    n_sessions, n_chunks = 3, 4

    async def main():
        engine = Engine(model, slots=4, decoder=decoder, registry=registry, headroom=None).start()
        try:
            sessions = [engine.open_session() for _ in range(n_sessions)]
            got = [[] for _ in sessions]
            for t in range(n_chunks):
                chunks = [chunks_for(model, 20 + i, n_chunks)[t] for i in range(n_sessions)]
                results = await asyncio.wait_for(asyncio.gather(*(s.step(c) for s, c in zip(sessions, chunks))), 60)
                for out, r in zip(got, results):
                    out.append(r)
            return got
        finally:
            engine.close()

    with torch.random.fork_rng(devices=[]):
        got = asyncio.run(main())
    for results in got:
        alone = decoder.new_stream()
        for r in results:
            expected = alone.push(np.asarray(r.speech_codes, np.int64))
            assert r.pcm is not None and r.pcm.dtype == np.float32
            np.testing.assert_allclose(r.pcm, expected, rtol=0, atol=1e-4)
    assert any(np.abs(r.pcm).max() > 1e-3 for results in got for r in results)  # some speech was heard
    get = registry.get_sample_value
    assert get("duplexline_engine_decoder_duration_seconds_count") >= n_chunks
    assert get("duplexline_engine_decoder_duration_seconds_sum") > 0


def test_a_session_speaks_in_the_voice_it_opened_with(model):
    decoder = CosyVoiceDecoder.random("v1", settings=DecoderSettings(steps=2))
    rng = np.random.default_rng(9)
    decoder.add_voice("anna", Voice(rng.standard_normal(192).astype(np.float32), rng.integers(0, 4096, 6),
                                    (rng.standard_normal((decoder.mel_frames(6), 80)) - 5.0).astype(np.float32)))

    async def main():
        engine = Engine(model, slots=2, decoder=decoder, registry=CollectorRegistry(), headroom=None,
                        warmup=False).start()
        try:
            with pytest.raises(ValueError, match="'bob'"):
                engine.open_session(voice="bob")
            session = engine.open_session(voice="anna")
            return [await asyncio.wait_for(session.step(c), 60) for c in chunks_for(model, 30, 2)]
        finally:
            engine.close()

    with torch.random.fork_rng(devices=[]):
        results = asyncio.run(main())
    anna, default = decoder.new_stream("anna"), decoder.new_stream()
    heard_default = False
    for r in results:
        codes = np.asarray(r.speech_codes, np.int64)
        np.testing.assert_allclose(r.pcm, anna.push(codes), rtol=0, atol=1e-4)
        heard_default |= bool(np.abs(r.pcm - default.push(codes)).max() > 1e-3)
    assert heard_default  # not the default voice's audio
    with pytest.raises(ValueError, match="without a speech decoder"):
        Engine(model, slots=1, registry=CollectorRegistry(), warmup=False).open_session(voice="anna")
