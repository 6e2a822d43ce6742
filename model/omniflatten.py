"""OmniFlatten on a Qwen2 backbone: the streaming chunk step, batched over session slots.

Plain torch, no asyncio (the engine batches and schedules; the worker serves).

One chunk step, for every slot that steps this round:
  1. feed: the previous chunk's last assistant token (not yet in the cache), or on a
     session's first chunk its prompt, then the user's speech tokens: one forward pass for
     all rows, padded to the longest and masked per row;
  2. decode the assistant's text tokens then speech tokens in lock-step for all rows, each
     constrained to its slot kind (a text slot holds text or silent text, a speech slot
     speech codes or silent speech: the candidates are the only logits computed);
  3. the last decoded token stays pending until the next chunk's feed.
So after k chunks a slot caches prefix + k * chunk_length - 1 tokens, and whole chunks sit
at fixed offsets after the prefix, which is what rolling drops.

A single session is a batch of one slot: `OmniFlattenSession` wraps exactly the same step,
so a session's tokens do not depend on who else is in the batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from .config import OmniFlattenConfig, SamplingConfig
from .kv_slots import SlotKVCache
from .sampling import gate_speaking, sample_rows, uniform_from_counter
from .vocab import Vocabulary

__all__ = ["OmniFlatten", "ChunkResult", "BatchStepper", "OmniFlattenSession", "StepReport"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


@dataclass(frozen=True)
class ChunkResult:
    """One slot's output of one chunk step. speech_codes uses -1 for silent speech."""

    text_ids: tuple[int, ...]
    speech_codes: tuple[int, ...]
    token_ids: tuple[int, ...]  # the decoded vocabulary ids, text then speech
    tokens_in: int
    dropped: bool = False  # True: the engine answered with silence (backlog full)
    # The assistant's audio for speech_codes (float32 at the decoder's rate), when the engine
    # has the decoder; None otherwise and for a dropped chunk.
    pcm: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class StepReport:
    """What one batched step did: rows computed, slots stepped, tokens in and out, time."""

    rows: int
    stepped: int
    tokens_in: int
    tokens_out: int
    seconds: float


class OmniFlatten:
    """The backbone with the extended vocabulary, and what a step needs from it."""

    def __init__(self, config: OmniFlattenConfig, backbone: torch.nn.Module, vocab: Vocabulary,
                 device: str | torch.device = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = DTYPES[config.dtype]
        self.backbone = backbone.to(device=self.device, dtype=self.dtype).eval()
        bcfg = backbone.config
        rope_type = (getattr(bcfg, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rolling context re-rotates cached keys, which needs the default "
                             f"rotary embedding; this backbone uses {rope_type!r}")
        self.vocab = vocab
        if backbone.get_input_embeddings().weight.shape[0] != self.vocab.size:
            raise ValueError(f"the backbone has {backbone.get_input_embeddings().weight.shape[0]} "
                             f"embedding rows; the vocabulary needs {self.vocab.size}")
        if config.context_length > bcfg.max_position_embeddings:
            raise ValueError(f"context_length {config.context_length} exceeds the backbone's "
                             f"max_position_embeddings {bcfg.max_position_embeddings}")
        self.layout = config.layout
        v = self.vocab
        # Each slot kind's candidates: a contiguous block of the head plus one silent token.
        self._kinds = {
            "text": (0, v.text_size, v.silent_text),
            "speech": (v.speech_base, v.special_base, v.silent_speech),
        }

    @property
    def head_weight(self) -> torch.Tensor:
        return self.backbone.get_output_embeddings().weight

    def candidate_logits(self, hidden: torch.Tensor, kind: str) -> torch.Tensor:
        """Logits over a slot kind's candidates only: [n, block + 1]."""
        lo, hi, silent = self._kinds[kind]
        w = self.head_weight
        return torch.cat([hidden @ w[lo:hi].T, hidden @ w[silent:silent + 1].T], dim=-1)

    def candidate_id(self, column: torch.Tensor, kind: str) -> torch.Tensor:
        lo, hi, silent = self._kinds[kind]
        return torch.where(column == hi - lo, torch.full_like(column, silent), column + lo)

    def new_cache(self, slots: int) -> SlotKVCache:
        bcfg = self.backbone.config
        head_dim = getattr(bcfg, "head_dim", None) or bcfg.hidden_size // bcfg.num_attention_heads
        inv_freq = self.backbone.model.rotary_emb.inv_freq
        return SlotKVCache(bcfg.num_hidden_layers, slots, bcfg.num_key_value_heads, head_dim,
                           self.config.context_length, inv_freq, self.dtype, self.device)

    @torch.inference_mode()
    def forward_full(self, ids: Sequence[int]) -> torch.Tensor:
        """Last hidden states of one plain causal forward pass (reference for tests)."""
        x = torch.tensor([list(ids)], device=self.device)
        return self.backbone.model(input_ids=x).last_hidden_state[0]


@dataclass
class _Slot:
    prompt: tuple[int, ...]
    sampling: SamplingConfig
    pending: int | None = None
    sampled: int = 0  # tokens sampled so far: the counter of the slot's randomness
    chunks: int = 0
    rolled: int = 0  # chunks dropped by the rolling context
    extra: dict = field(default_factory=dict)


class BatchStepper:
    """Session slots over one shared cache, stepped together. Not thread-safe: one thread
    (the engine's) owns it."""

    def __init__(self, model: OmniFlatten, slots: int) -> None:
        self.model = model
        self.cache = model.new_cache(slots)
        self._slots: list[_Slot | None] = [None] * slots
        self._kinds = ["text"] * model.layout.text + ["speech"] * model.layout.speech

    @property
    def slots(self) -> int:
        return len(self._slots)

    def is_open(self, slot: int) -> bool:
        return self._slots[slot] is not None

    def open(self, slot: int, prompt: Sequence[int] = (), sampling: SamplingConfig | None = None) -> None:
        if self._slots[slot] is not None:
            raise ValueError(f"slot {slot} is in use")
        layout = self.model.layout
        if len(prompt) + 2 * layout.length > self.model.config.context_length:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room for two chunks")
        self._slots[slot] = _Slot(tuple(prompt), sampling or self.model.config.sampling)
        self.cache.clear(slot)

    def close(self, slot: int) -> None:
        self._slots[slot] = None
        self.cache.clear(slot)

    def move(self, src: int, dst: int) -> None:
        if self._slots[dst] is not None or self._slots[src] is None:
            raise ValueError(f"cannot move slot {src} to {dst}")
        self.cache.move(src, dst)
        self._slots[dst], self._slots[src] = self._slots[src], None

    def position(self, slot: int) -> int:
        return self.cache.lengths[slot]

    def rolled_chunks(self, slot: int) -> int:
        s = self._slots[slot]
        return s.rolled if s else 0

    # ---- the step ----------------------------------------------------------------------

    def _feed(self, slot: int, user_ids: Sequence[int]) -> list[int]:
        s = self._slots[slot]
        head = [s.pending] if s.pending is not None else list(s.prompt)
        return head + list(user_ids)

    def _roll(self, slot: int, need: int) -> None:
        """When `need` more tokens would not fit, drop the oldest whole chunks after the
        prompt (the prompt always stays): at least one hop, `roll_hop_fraction` of the
        context rounded up to whole chunks, and never the newest chunk.

        Every drop re-rotates the whole kept tail, and in bfloat16 re-rounds it; dropping a
        hop at once bounds the re-roundings of any key by the context's length in hops
        (about 1/roll_hop_fraction), however many times a long call rolls. Dropping one
        chunk at a time let the keys drift with every chunk (docs/engine.md, measured)."""
        s = self._slots[slot]
        length = self.cache.lengths[slot]
        over = length + need - self.cache.capacity
        if over <= 0:
            return
        config = self.model.config
        chunk = self.model.layout.length
        least = -(-over // chunk)
        if least >= s.chunks:
            raise RuntimeError(f"slot {slot}: context {self.cache.capacity} cannot hold one chunk")
        hop = max(1, math.ceil(config.roll_hop_fraction * config.context_length / chunk))
        drop = min(max(least, hop), s.chunks - 1)
        self.cache.drop(slot, len(s.prompt), drop * chunk)
        s.rolled += drop
        s.chunks -= drop

    def _forward(self, ids: torch.Tensor, fed: list[int]) -> torch.Tensor:
        plan = self.cache.prepare(fed, ids.shape[1])
        out = self.model.backbone.model(
            input_ids=ids, position_ids=plan.position_ids,
            attention_mask={"full_attention": plan.mask}, cache=self.cache, use_cache=True)
        self.cache.commit(fed)
        return out.last_hidden_state

    @torch.inference_mode()
    def step(self, user: Mapping[int, Sequence[int]]) -> tuple[dict[int, ChunkResult], StepReport]:
        """Step the slots in `user` (slot -> this chunk's user speech ids, layout.user of
        them) as one batch. Rows [0, highest stepping slot] are computed; rows that do not
        step are masked and left unchanged."""
        t0 = time.perf_counter()
        layout = self.model.layout
        dev = self.model.device
        stepping = sorted(user)
        for slot in stepping:
            if self._slots[slot] is None:
                raise ValueError(f"slot {slot} is not open")
            if len(user[slot]) != layout.user:
                raise ValueError(f"slot {slot}: {len(user[slot])} user tokens, the chunk takes {layout.user}")
        if not stepping:
            return {}, StepReport(0, 0, 0, 0, 0.0)
        rows = stepping[-1] + 1
        feeds = {slot: self._feed(slot, user[slot]) for slot in stepping}
        for slot in stepping:
            self._roll(slot, len(feeds[slot]) + layout.decoded - 1)
        width = max(len(f) for f in feeds.values())
        ids = torch.zeros((rows, width), dtype=torch.long)
        fed = [0] * rows
        for slot, f in feeds.items():
            ids[slot, :len(f)] = torch.tensor(f)
            fed[slot] = len(f)
        hidden = self._forward(ids.to(dev), fed)
        index = torch.tensor(stepping, device=dev)
        last = torch.tensor([fed[s] - 1 for s in stepping], device=dev)
        h = hidden[index, last]

        states = [self._slots[s] for s in stepping]
        temperature = torch.tensor([st.sampling.temperature for st in states], device=dev)
        top_k = torch.tensor([st.sampling.top_k for st in states], device=dev)
        top_p = torch.tensor([st.sampling.top_p for st in states], device=dev)
        speak_threshold = torch.tensor([st.sampling.speak_threshold for st in states], device=dev)
        any_sampled = bool((temperature > 0).any())
        decoded = torch.empty((len(stepping), layout.decoded), dtype=torch.long, device=dev)
        one = [0] * rows
        for slot in stepping:
            one[slot] = 1
        for k, kind in enumerate(self._kinds):
            logits = self.model.candidate_logits(h, kind)
            logits = gate_speaking(logits, speak_threshold)
            if any_sampled:
                u = torch.tensor([uniform_from_counter(st.sampling.seed, st.sampled + k) for st in states],
                                 dtype=torch.float64, device=dev)
            else:
                u = torch.zeros(len(stepping), dtype=torch.float64, device=dev)
            tok = self.model.candidate_id(sample_rows(logits, temperature, top_k, top_p, u), kind)
            decoded[:, k] = tok
            if k == layout.decoded - 1:
                break
            step_ids = torch.zeros((rows, 1), dtype=torch.long, device=dev)
            step_ids[index, 0] = tok
            h = self._forward(step_ids, one)[index, 0]

        decoded_host = decoded.tolist()
        results: dict[int, ChunkResult] = {}
        vocab = self.model.vocab
        for i, slot in enumerate(stepping):
            st = self._slots[slot]
            toks = decoded_host[i]
            st.pending = toks[-1]
            st.sampled += layout.decoded
            st.chunks += 1
            text = tuple(toks[:layout.text])
            speech = tuple(vocab.code_of(t) for t in toks[layout.text:])
            results[slot] = ChunkResult(text, speech, tuple(toks), len(feeds[slot]))
        report = StepReport(rows=rows, stepped=len(stepping),
                            tokens_in=sum(len(f) for f in feeds.values()),
                            tokens_out=len(stepping) * layout.decoded,
                            seconds=time.perf_counter() - t0)
        return results, report


class OmniFlattenSession:
    """One conversation on its own one-slot cache: the model issue's streaming session."""

    def __init__(self, model: OmniFlatten, prompt: Sequence[int] = (), sampling: SamplingConfig | None = None) -> None:
        self._stepper = BatchStepper(model, 1)
        self._stepper.open(0, prompt, sampling)
        self.last_report: StepReport | None = None

    def step(self, user_ids: Sequence[int]) -> ChunkResult:
        results, self.last_report = self._stepper.step({0: user_ids})
        return results[0]

    def step_codes(self, user_codes: Sequence[int]) -> ChunkResult:
        """Like step, with raw speech codes (-1 = silent speech) for the user."""
        v = self._stepper.model.vocab
        return self.step([v.silent_speech if c < 0 else v.speech_id(c) for c in user_codes])

    @property
    def position(self) -> int:
        return self._stepper.position(0)

    @property
    def rolled_chunks(self) -> int:
        return self._stepper.rolled_chunks(0)

    @property
    def cache_bytes(self) -> int:
        return self._stepper.cache.bytes_per_slot
