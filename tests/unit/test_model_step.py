"""The streaming chunk step on a tiny random Qwen2: constraints, cache equivalence,
rolling context, sampling."""

import random

import pytest
import torch

from model.checkpoint import build_model, tiny_config
from model.config import SamplingConfig
from model.flatten import Chunk, flatten
from model.omniflatten import BatchStepper, OmniFlattenSession


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(dtype="float64"), seed=3)


def user_chunk(model, rng, silent_share=0.3):
    v = model.vocab
    return [v.silent_speech if rng.random() < silent_share else v.speech_id(rng.randrange(v.speech_codes))
            for _ in range(model.layout.user)]


def test_constrained_slots_never_cross(model):
    # Make the special tokens win every unconstrained argmax, then check none is chosen.
    m = build_model(tiny_config(dtype="float64"), seed=5)
    v = m.vocab
    with torch.no_grad():
        w = m.backbone.get_input_embeddings().weight
        w[v.special("[ASR]"):v.silent_text] *= 50
    with torch.inference_mode():
        hidden = m.forward_full([v.silent_speech] * 10 + [1, 2])
        unconstrained = (hidden @ m.head_weight.T).argmax(-1)
    assert (unconstrained >= v.special_base).float().mean() > 0.5  # the constraint has work to do
    session = OmniFlattenSession(m, sampling=SamplingConfig(temperature=1.5, seed=9))
    rng = random.Random(1)
    for _ in range(20):
        r = session.step(user_chunk(m, rng))
        assert all(v.is_text(t) or t == v.silent_text for t in r.text_ids)
        speech_ids = r.token_ids[m.layout.text:]
        assert all(v.is_speech(t) or t == v.silent_speech for t in speech_ids)
        assert all(-1 <= c < v.speech_codes for c in r.speech_codes)


@torch.inference_mode()
def _candidate_argmax(model, hidden, kind):
    return int(model.candidate_id(model.candidate_logits(hidden[None], kind).argmax(-1), kind))


def test_cached_steps_equal_one_full_forward(model):
    prompt = [1, 2, 3]
    session = OmniFlattenSession(model, prompt=prompt)
    rng = random.Random(2)
    chunks = []
    for _ in range(6):
        user = user_chunk(model, rng)
        r = session.step(user)
        lay = model.layout
        chunks.append(Chunk(tuple(user), r.token_ids[:lay.text], r.token_ids[lay.text:]))
    flat = flatten(chunks, model.layout, prefix=prompt)
    hidden = model.forward_full(flat.ids)
    kinds = ["text"] * model.layout.text + ["speech"] * model.layout.speech
    checked = 0
    for pos, learned in enumerate(flat.loss_mask):
        if learned:
            k = (pos - len(prompt)) % model.layout.length - model.layout.user
            assert _candidate_argmax(model, hidden[pos - 1], kinds[k]) == flat.ids[pos], f"position {pos}"
            checked += 1
    assert checked == 6 * model.layout.decoded
    assert session.position == len(flat.ids) - 1  # the last token waits for the next feed


def test_rolling_context_runs_past_ten_times_the_context(model):
    small = build_model(tiny_config(dtype="float64", context_length=100), seed=3)
    session = OmniFlattenSession(small, prompt=[5, 6])
    before = session.cache_bytes
    rng = random.Random(4)
    total = 0
    for _ in range(60):  # 60 * 22 = 1320 tokens through a 100-token context
        r = session.step(user_chunk(small, rng))
        total += r.tokens_in + len(r.token_ids)
        assert session.position <= 100
        assert len(r.speech_codes) == small.layout.speech
    assert total > 10 * 100
    assert session.rolled_chunks > 0
    assert session.cache_bytes == before


def test_drop_re_positions_cached_keys(model):
    """Layer 0's keys depend only on the token and its position, so after dropping a block
    the moved keys must equal those of a fresh pass over the kept tokens."""
    ids = list(range(10, 60))
    kept = ids[:4] + ids[26:]
    stepper, fresh = BatchStepper(model, 1), BatchStepper(model, 1)
    with torch.inference_mode():
        stepper._forward(torch.tensor([ids]), [len(ids)])
        stepper.cache.drop(0, 4, 22)
        fresh._forward(torch.tensor([kept]), [len(kept)])
    n = len(kept)
    assert stepper.cache.lengths[0] == n
    torch.testing.assert_close(stepper.cache.keys[0][0, :, :n], fresh.cache.keys[0][0, :, :n])
    torch.testing.assert_close(stepper.cache.values[0][0, :, :n], fresh.cache.values[0][0, :, :n])


def test_sampling_is_seeded_per_session(model):
    def run(seed):
        s = OmniFlattenSession(model, sampling=SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, seed=seed))
        rng = random.Random(0)
        return [s.step(user_chunk(model, rng)).token_ids for _ in range(4)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_bad_step_input_is_refused(model):
    session = OmniFlattenSession(model)
    with pytest.raises(ValueError, match="user tokens"):
        session.step([model.vocab.silent_speech] * 3)
    stepper = BatchStepper(model, 2)
    with pytest.raises(ValueError, match="not open"):
        stepper.step({1: [model.vocab.silent_speech] * model.layout.user})


def test_step_report_counts_tokens(model):
    session = OmniFlattenSession(model, prompt=[1])
    session.step([model.vocab.silent_speech] * 10)
    rep = session.last_report
    assert (rep.stepped, rep.tokens_in, rep.tokens_out) == (1, 11, 12) and rep.seconds > 0
    session.step([model.vocab.silent_speech] * 10)
    assert session.last_report.tokens_in == 11  # the pending token + 10 user tokens


def test_two_stream_mode_decodes_speech_only():
    m = build_model(tiny_config(dtype="float64", mode="two-stream"), seed=1)
    session = OmniFlattenSession(m)
    r = session.step([m.vocab.silent_speech] * 5)
    assert r.text_ids == () and len(r.speech_codes) == 5
