"""The batched chunk step against an independent reference: a plain transformers forward.

For every forward pass of a batched step, each stepping session's hidden states must equal
those of `Qwen2Model(input_ids=kept)` (no cache, positions from 0, float64, the same
weights) over exactly the sequence that session keeps: its prompt, its kept chunks, and
the tokens this step has fed so far. What a session keeps is tracked here, by the test,
from the tokens it fed and received: the prompt always, and the chunks after the ones the
stepper reports rolled out. Position ids are checked per row, input ids per row, and greedy
tokens against the reference's constrained argmax.

Comparing the batched stepper with itself run alone cannot catch a bug both paths share
(a rollover that drops the prompt, a row whose positions are off by one); this can.

The rows a step computes are found by content (each session's first pass feeds its own
prompt or pending token and user tokens, unique here), so the test does not depend on
which rows the step computes or in what order, only on a step being one feed pass
followed by one pass per decoded token but the last.

After a rollover only a one-layer model has such a reference: in deeper layers the kept
tokens' cached keys and values were computed while the dropped tokens were still visible,
as in StreamingLLM, so no plain pass over the kept tokens reproduces them. Layer 0's keys
and values depend only on the token and its position, which is exactly what rolling must
re-position; the two-layer test covers batching without rollover.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import pytest
import torch

from model.checkpoint import build_model, tiny_config
from model.config import SamplingConfig
from model.omniflatten import BatchStepper

ATOL = 2e-5  # float32 stepper against a float64 reference, hidden size 64 (seen: 1e-6)


def _model(layers: int, context: int, seed: int):
    cfg = tiny_config(dtype="float32", context_length=context)
    cfg = cfg.with_(backbone={**cfg.backbone, "num_hidden_layers": layers})
    model = build_model(cfg, seed=seed)
    reference = copy.deepcopy(model.backbone).to(torch.float64).eval()
    return model, reference


@pytest.fixture(scope="module")
def two_layers():
    return _model(layers=2, context=512, seed=21)


@pytest.fixture(scope="module")
def one_layer():
    return _model(layers=1, context=96, seed=22)


class Recorder:
    """Records each forward pass of the backbone's base model: its input ids, position ids
    and last hidden states."""

    def __init__(self, model):
        self.passes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handle = model.backbone.model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.passes.append((kwargs["input_ids"].clone(), kwargs["position_ids"].clone(),
                            output.last_hidden_state.clone()))

    def close(self):
        self._handle.remove()


@dataclass
class Session:
    """What the test expects one session to keep, tracked apart from the stepper."""

    slot: int
    prompt: tuple[int, ...]
    sampling: SamplingConfig | None = None
    cached: list[int] = field(default_factory=list)  # tokens in the cache
    pending: int | None = None
    join: int = 0  # the tick the session opens at
    chunks: list[list[int]] = field(default_factory=list)  # its user input, one list per chunk
    rolled: int = 0
    done: int = 0  # chunks stepped
    closed: bool = False


def user_chunks(model, seed: int, n: int) -> list[list[int]]:
    # No silent tokens: every session's first-pass row is unique, so rows are found by content.
    rng = random.Random(seed)
    v = model.vocab
    return [[v.speech_id(rng.randrange(v.speech_codes)) for _ in range(model.layout.user)] for _ in range(n)]


def _candidates(model, kind: str) -> torch.Tensor:
    v = model.vocab
    if kind == "text":
        ids = list(range(v.text_size)) + [v.silent_text]
    else:
        ids = list(range(v.speech_base, v.special_base)) + [v.silent_speech]
    return torch.tensor(ids)


def step_and_check(model, reference, stepper, recorder, sessions: list[Session]) -> int:
    """Step `sessions` (each its next chunk) as one batch and check every pass against the
    reference. Returns how many greedy tokens were checked against the reference argmax."""
    layout = model.layout
    chunk = layout.length
    feeds = {}
    for s in sessions:
        user = s.chunks[s.done]
        feeds[s.slot] = (list(s.prompt) if s.pending is None else [s.pending]) + user
    recorder.passes.clear()
    results, _ = stepper.step({s.slot: s.chunks[s.done] for s in sessions})
    passes = recorder.passes
    assert len(passes) == layout.decoded, "a step is one feed pass and one pass per decoded token but the last"
    kinds = ["text"] * layout.text + ["speech"] * layout.speech
    head = reference.get_output_embeddings().weight
    greedy_checked = 0
    for s in sessions:
        rolled = stepper.rolled_chunks(s.slot) - s.rolled
        if rolled:
            # A rollover drops whole chunks right after the prompt; the prompt stays.
            s.cached = list(s.prompt) + s.cached[len(s.prompt) + rolled * chunk:]
            s.rolled += rolled
        feed = feeds[s.slot]
        decoded = list(results[s.slot].token_ids)
        start = len(s.cached)
        seq = s.cached + feed + decoded[:-1]
        assert len(seq) <= model.config.context_length, f"slot {s.slot}: kept more than the context"
        assert stepper.position(s.slot) == len(seq), f"slot {s.slot}: cache length"
        with torch.no_grad():
            ref = reference.model(input_ids=torch.tensor([seq])).last_hidden_state[0]

        ids0, pos0, hid0 = passes[0]
        n = len(feed)
        rows = [r for r in range(ids0.shape[0]) if ids0.shape[1] >= n and ids0[r, :n].tolist() == feed]
        assert len(rows) == 1, f"slot {s.slot}: its feed is in rows {rows} of the first pass"
        row = rows[0]
        assert pos0[row, :n].tolist() == list(range(start, start + n)), f"slot {s.slot}: feed position ids"
        torch.testing.assert_close(hid0[row, :n].double(), ref[start:start + n], atol=ATOL, rtol=0,
                                   msg=lambda m: f"slot {s.slot}, feed pass at {start}: {m}")
        for k in range(1, layout.decoded):
            ids, pos, hid = passes[k]
            p = start + n + k - 1
            assert ids[row, 0].item() == decoded[k - 1], f"slot {s.slot}: pass {k} fed the wrong token"
            assert pos[row, 0].item() == p, f"slot {s.slot}: pass {k} position id"
            torch.testing.assert_close(hid[row, 0].double(), ref[p], atol=ATOL, rtol=0,
                                       msg=lambda m: f"slot {s.slot}, pass {k} at {p}: {m}")
        if s.sampling is None or s.sampling.greedy:
            for k, kind in enumerate(kinds):
                cand = _candidates(model, kind)
                logits = ref[start + n - 1 + k] @ head[cand].T
                top2 = logits.topk(2).values
                if top2[0] - top2[1] > 1e-3:  # a near tie may go either way in float32
                    assert decoded[k] == cand[logits.argmax()].item(), f"slot {s.slot}: token {k}"
                    greedy_checked += 1
        s.cached = seq
        s.pending = decoded[-1]
        s.done += 1
    return greedy_checked


def run(model, reference, stepper, sessions: list[Session], ticks: int, events=None) -> int:
    """Open each session at its join tick; every tick, step every open session that has a
    chunk left, as one batch. `events(tick, stepper, sessions)` may close or move slots."""
    recorder = Recorder(model)
    checked = 0
    try:
        for tick in range(ticks):
            for s in sessions:
                if s.join == tick:
                    stepper.open(s.slot, s.prompt, s.sampling)
            if events:
                events(tick, stepper, sessions)
            stepping = [s for s in sessions if s.join <= tick and not s.closed and s.done < len(s.chunks)]
            if stepping:
                checked += step_and_check(model, reference, stepper, recorder, stepping)
    finally:
        recorder.close()
    return checked


def test_batched_passes_equal_a_plain_forward_over_each_session(two_layers):
    """Four sessions with different prompts join at different ticks (so they sit at
    different lengths in one batch), in slots 1, 2, 4, 5 with 0 and 3 idle; one samples.
    (With the rollover test below, every slot of the six is a session's.)"""
    model, reference = two_layers
    sessions = [
        Session(slot=1, prompt=(5, 6, 7), join=0, chunks=user_chunks(model, 1, 5)),
        Session(slot=2, prompt=(), join=1, chunks=user_chunks(model, 2, 5),
                sampling=SamplingConfig(temperature=1.0, top_k=40, seed=3)),
        Session(slot=4, prompt=(11, 12, 13, 14, 15, 16, 17), join=3, chunks=user_chunks(model, 3, 5)),
        Session(slot=5, prompt=(9,), join=2, chunks=user_chunks(model, 4, 5)),
    ]
    stepper = BatchStepper(model, 6)
    checked = run(model, reference, stepper, sessions, ticks=8)
    assert all(s.done == 5 and s.rolled == 0 for s in sessions)
    assert checked > 3 * 5 * model.layout.decoded // 2  # most greedy tokens had a clear winner


def test_after_rollovers_each_session_equals_a_plain_forward_over_what_it_keeps(one_layer):
    """A 96-token context rolls every few chunks. Sessions with prompts of 3, 0, 9 and 1
    tokens join at different ticks; halfway, slot 0's session leaves and slot 5's moves into
    its row (as the engine packs rows). After every rollover each session's every pass must
    equal a plain forward over its prompt + kept chunks + this step's tokens."""
    model, reference = one_layer
    assert model.backbone.config.num_hidden_layers == 1
    n = 12
    sessions = [
        Session(slot=0, prompt=(5, 6, 7), join=0, chunks=user_chunks(model, 11, 7)),
        Session(slot=1, prompt=(), join=1, chunks=user_chunks(model, 12, n)),
        Session(slot=3, prompt=tuple(range(20, 29)), join=3, chunks=user_chunks(model, 13, n)),
        Session(slot=5, prompt=(9,), join=2, chunks=user_chunks(model, 14, n)),
    ]

    def leave_and_pack(tick, stepper, live):
        if tick == 7:
            gone, mover = live[0], live[3]
            assert gone.done == len(gone.chunks) and gone.rolled > 0
            stepper.close(gone.slot)
            gone.closed = True
            stepper.move(mover.slot, gone.slot)
            mover.slot = gone.slot

    stepper = BatchStepper(model, 6)
    checked = run(model, reference, stepper, sessions, ticks=3 + n, events=leave_and_pack)
    assert all(s.done == len(s.chunks) for s in sessions)
    assert all(s.rolled >= 2 for s in sessions[1:]), [s.rolled for s in sessions]
    assert checked > 0
