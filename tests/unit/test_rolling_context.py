"""The rolling context: a full context drops a configured hop of whole chunks at once
(`roll_hop_fraction`), the prompt always stays, and bfloat16 keys do not drift however many
times a long call rolls (docs/engine.md, "The rolling context")."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from model.checkpoint import build_model, tiny_config
from model.config import OmniFlattenConfig
from model.errors import ConfigInvalid
from model.omniflatten import BatchStepper, OmniFlattenSession


# ---- drift: layer-0 keys against a fresh float64 pass over the kept tokens ----------------

def _drift_setup():
    # Two-stream chunks of 2 + 2 tokens in a 256-token context: 62 chunks fit, so a key
    # kept across one-chunk drops would be re-rotated up to 61 times.
    cfg = tiny_config(dtype="bfloat16", mode="two-stream", user_chunk=2, speech_chunk=2, context_length=256)
    cfg = cfg.with_(backbone={**cfg.backbone, "num_hidden_layers": 1})
    model = build_model(cfg, seed=7)
    reference = copy.deepcopy(model.backbone).to(torch.float64).eval()
    return model, reference


class _Stream:
    """Writes whole chunks into slot 0 as a chunk step does (roll first, then one forward
    pass), without decoding, and tracks the tokens the slot must keep."""

    def __init__(self, model, prompt):
        self.model = model
        self.stepper = BatchStepper(model, 1)
        self.stepper.open(0, prompt)
        self.prompt = list(prompt)
        self.kept = list(prompt)
        self.rng = random.Random(5)
        self._write(self.prompt)

    def _write(self, ids):
        with torch.inference_mode():
            self.stepper._forward(torch.tensor([ids]), [len(ids)])

    def fill(self, roll=True):
        """Roll as a chunk step does before feeding a chunk (it needs one chunk's room),
        then write as many whole chunks as fit; return how many tokens the roll dropped."""
        chunk = self.model.layout.length
        before = self.stepper.cache.lengths[0]
        if roll:
            self.stepper._roll(0, chunk)
        dropped = before - self.stepper.cache.lengths[0]
        del self.kept[len(self.prompt):len(self.prompt) + dropped]
        n = (self.stepper.cache.capacity - self.stepper.cache.lengths[0]) // chunk
        ids = [self.rng.randrange(self.model.vocab.size) for _ in range(n * chunk)]
        self._write(ids)
        self.stepper._slots[0].chunks += n
        self.kept += ids
        return dropped

    def key_error(self, reference) -> float:
        """Relative error of slot 0's layer-0 keys against a fresh float64 pass."""
        n = self.stepper.cache.lengths[0]
        assert n == len(self.kept)
        with torch.no_grad():
            out = reference.model(input_ids=torch.tensor([self.kept]), use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        want = cache.layers[0].keys[0]
        got = self.stepper.cache.keys[0][0, :, :n].double()
        return ((got - want).norm() / want.norm()).item()


def test_bf16_key_error_stays_flat_over_1000_drops():
    model, reference = _drift_setup()
    cfg, chunk = model.config, model.layout.length
    hop = math.ceil(cfg.roll_hop_fraction * cfg.context_length / chunk)
    stream = _Stream(model, prompt=range(30, 36))
    assert stream.fill() == 0 and stream.stepper.cache.lengths[0] == 6 + 62 * chunk
    fresh = stream.key_error(reference)  # nothing re-rotated yet: the bf16 write alone
    errors = {}
    for drop in range(1, 1001):
        assert stream.fill() == hop * chunk  # one hop dropped, one hop written
        if drop in (1, 2, 3, 10, 100, 1000):
            errors[drop] = stream.key_error(reference)
    first = max(errors[d] for d in (1, 2, 3))
    assert errors[1000] <= 1.5 * first, (fresh, errors)
    assert errors[1000] <= 2 * fresh and errors[1000] < 1e-2, (fresh, errors)


def test_one_chunk_drops_would_drift():
    """The control for the test above: the same cache dropping one chunk at a time (as it
    did before roll_hop_fraction) drifts, so the measurement can see drift."""
    model, reference = _drift_setup()
    chunk = model.layout.length
    stream = _Stream(model, prompt=range(30, 36))
    stream.fill()
    errors = {}
    for drop in range(1, 121):
        stream.stepper.cache.drop(0, 6, chunk)
        stream.stepper._slots[0].chunks -= 1
        del stream.kept[6:6 + chunk]
        stream.fill(roll=False)
        if drop in (3, 120):
            errors[drop] = stream.key_error(reference)
    assert errors[120] > 2 * errors[3], errors


# ---- the hop and the prompt, through the chunk step ----------------------------------------

@pytest.mark.parametrize("fraction, prompt_len, hop", [
    (0.25, 5, 2),    # a quarter of 176 tokens: 44, two 22-token chunks
    (0.5, 5, 4),     # half: 88, four chunks
    (0.5, 100, 2),   # a long prompt leaves 3 chunks; the newest one always stays
])
def test_a_rollover_drops_a_hop_of_whole_chunks_and_keeps_the_prompt(fraction, prompt_len, hop):
    model = build_model(tiny_config(dtype="float32", context_length=176, roll_hop_fraction=fraction), seed=4)
    prompt = [7 + i % 200 for i in range(prompt_len)]
    session = OmniFlattenSession(model, prompt=prompt)
    cache = session._stepper.cache
    rng = random.Random(1)
    v = model.vocab
    chunk, need = model.layout.length, model.layout.user + model.layout.decoded
    prompt_kv = None
    rolls = 0
    for _ in range(24):
        before, rolled = session.position, session.rolled_chunks
        session.step([v.speech_id(rng.randrange(v.speech_codes)) for _ in range(model.layout.user)])
        if prompt_kv is None:
            prompt_kv = [(k[0, :, :prompt_len].clone(), x[0, :, :prompt_len].clone())
                         for k, x in zip(cache.keys, cache.values)]
        dropped = session.rolled_chunks - rolled
        if dropped:
            rolls += 1
            assert before + need > model.config.context_length  # only when the chunk would not fit
            assert dropped == hop
            assert session.position == before - hop * chunk + need
        assert session.position <= model.config.context_length
    assert rolls >= 3
    for layer, (k, x) in enumerate(prompt_kv):  # the prompt's cache, every layer, untouched
        assert torch.equal(cache.keys[layer][0, :, :prompt_len], k), f"layer {layer} keys"
        assert torch.equal(cache.values[layer][0, :, :prompt_len], x), f"layer {layer} values"


@pytest.mark.parametrize("value", [0.1, 0.6, 0.0, float("nan"), "0.25"])
def test_roll_hop_fraction_is_validated(value):
    data = tiny_config().to_dict()
    data["roll_hop_fraction"] = value
    with pytest.raises(ConfigInvalid, match="roll_hop_fraction"):
        OmniFlattenConfig.from_dict(data)


def test_roll_hop_fraction_defaults_to_a_quarter_and_round_trips():
    cfg = tiny_config()
    assert cfg.roll_hop_fraction == 0.25
    again = OmniFlattenConfig.from_dict({**cfg.to_dict(), "roll_hop_fraction": 0.125})
    assert again.roll_hop_fraction == 0.125
