"""sampling.speak_threshold: each text and speech slot first decides speaking against
silence by the non-silent tokens' total probability, then picks one of them; checked
token by token against a plain forward pass's softmax."""

import random

import pytest
import torch

from model.checkpoint import build_model, tiny_config
from model.config import SamplingConfig
from model.errors import ConfigInvalid
from model.flatten import Chunk, flatten
from model.omniflatten import OmniFlattenSession
from model.sampling import gate_speaking


def test_gate_keeps_silence_or_every_code_by_the_codes_total():
    # Silence is each row's argmax; the codes' total is 0.6 in row 0 and 0.3 in row 1.
    probs = torch.tensor([[0.2, 0.2, 0.2, 0.4], [0.1, 0.1, 0.1, 0.7], [0.2, 0.2, 0.2, 0.4]])
    gated = gate_speaking(probs.log(), torch.tensor([0.5, 0.5, 0.0]))
    assert gated[0].isinf().tolist() == [False, False, False, True]
    assert gated[1].isinf().tolist() == [True, True, True, False]
    assert torch.equal(gated[2], probs[2].log())  # threshold 0: untouched
    assert gate_speaking(probs.log(), torch.tensor([0.61, 0.29, 0.0]))[:2, -1].isinf().tolist() == [False, True]


def test_threshold_is_validated():
    with pytest.raises(ConfigInvalid, match="speak_threshold"):
        SamplingConfig(speak_threshold=1.0)
    with pytest.raises(ConfigInvalid, match="speak_threshold"):
        SamplingConfig(speak_threshold=-0.1)


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(dtype="float64", speech_codebook_size=16), seed=4)


def _candidates(model, kind):
    """A slot kind's non-silent ids, and its silent id."""
    v = model.vocab
    if kind == "text":
        return torch.arange(0, v.text_size), v.silent_text
    return torch.arange(v.speech_base, v.special_base), v.silent_speech


def _codes_mass(model, hidden, kind="speech"):
    """The non-silent tokens' total probability among the slot's candidates, per row."""
    ids, silent = _candidates(model, kind)
    with torch.inference_mode():
        return (hidden @ model.head_weight.T)[:, torch.cat([ids, torch.tensor([silent])])].softmax(-1)[:, :-1].sum(-1)


def _user_chunks(model, count):
    rng = random.Random(3)
    return [[model.vocab.speech_id(rng.randrange(model.vocab.speech_codes)) for _ in range(model.layout.user)]
            for _ in range(count)]


def _check_gated_run(model, users, threshold):
    """Steps a gated greedy session, then checks each slot against a plain forward pass
    over what it produced. Returns, per slot kind, how many spoke and how many stayed silent."""
    v, lay = model.vocab, model.layout
    session = OmniFlattenSession(model, sampling=SamplingConfig(speak_threshold=threshold))
    chunks = []
    for user in users:
        r = session.step(user)
        chunks.append(Chunk(tuple(user), r.token_ids[:lay.text], r.token_ids[lay.text:]))
    flat = flatten(chunks, lay)
    hidden = model.forward_full(flat.ids)
    mass = {kind: _codes_mass(model, hidden, kind) for kind in ("text", "speech")}
    spoke = {"text": 0, "speech": 0}
    silent = {"text": 0, "speech": 0}
    for pos, learned in enumerate(flat.loss_mask):
        if not learned:
            continue
        kind = "text" if (pos % lay.length) < lay.user + lay.text else "speech"
        ids, silent_id = _candidates(model, kind)
        chosen = flat.ids[pos]
        if float(mass[kind][pos - 1]) >= threshold:
            with torch.inference_mode():
                likeliest = int(ids[(hidden[pos - 1] @ model.head_weight[ids].T).argmax()])
            assert chosen == likeliest, f"threshold {threshold}, {kind} position {pos}: should speak its likeliest"
            spoke[kind] += 1
        else:
            assert chosen == silent_id, f"threshold {threshold}, {kind} position {pos}: should stay silent"
            silent[kind] += 1
    return spoke, silent


def test_greedy_gate_follows_the_plain_forward_softmax(model):
    users = _user_chunks(model, 8)
    # Thresholds across this random model's narrow ranges of mass (a text slot's is near
    # 1: one silent token among 257), so that some runs take both branches of each kind
    # (where a run goes silent, it tends to stay silent).
    hidden = model.forward_full([i for u in users for i in u])
    thresholds = [float(_codes_mass(model, hidden, kind).quantile(q))
                  for kind in ("speech", "text") for q in (0.05, 0.2, 0.35, 0.5)]
    runs = [_check_gated_run(model, users, t) for t in thresholds]
    for kind in ("speech", "text"):
        assert any(spoke[kind] > 0 and silent[kind] > 0 for spoke, silent in runs), (kind, runs)
