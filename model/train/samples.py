"""The paper's training samples, built from cached codes (shards.py), as token ids and a
loss mask (True: the model is trained to predict that token; only the assistant's).

- Stage 1, modality alignment: each pair gives an ASR and a TTS sample (model/flatten.py
  `asr_sample`, `tts_sample`); with `turn_pairs`, so does every dialogue turn but the
  interrupted ones (its channel's codes over the turn's times), so synthetic dialogues
  alone can train it.
- Stage 2, half duplex: a dialogue's turns in start order (`half_duplex_sample`), but
  backchannels, packed whole into samples of at most `max_length` tokens.
- Stage 3, full duplex, in the config's layout (three-stream: user speech, assistant text,
  assistant speech per chunk; two-stream: no text), `streams_to_chunks` + `flatten`:
    user speech: the streamed user codes, chunk k = what the engine feeds at tick k;
    assistant speech: the assistant channel's codes inside its turns, the silent speech
      token elsewhere (turn-taking is the switch between the two);
    assistant text: each turn's text ids from the chunk its speech starts in, `text`
      slots per chunk, the silent text token elsewhere; a turn's text ends with the chunk
      its speech ends in (an interrupted assistant stops writing too), and what does not
      fit is cut (counted in `TrainDataset.text_cut`).
  A long dialogue is split into consecutive windows of whole chunks that fit
  `max_length` (after the prefix), as the engine's rolling context keeps whole chunks.

Samples too long to fit (a stage-1 pair, a single turn) are skipped and counted.
The trainer shifts: position t's logits predict token t+1 where loss_mask[t+1].
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..config import ChunkLayout, OmniFlattenConfig
from ..flatten import Chunk, FlatSequence, Turn, asr_sample, flatten, half_duplex_sample, streams_to_chunks, \
    tts_sample
from ..vocab import Vocabulary
from .shards import DialogueCodes, PairCodes, Record, read_shards
from .token_data import pad_collate

__all__ = ["STAGES", "pair_samples", "dialogue_turns", "half_duplex_samples", "assistant_streams",
           "full_duplex_chunks", "full_duplex_samples", "TrainDataset", "collate"]

STAGES = (1, 2, 3)


def _speech_ids(codes: np.ndarray, vocab: Vocabulary) -> list[int]:
    codes = np.asarray(codes, dtype=np.int64)
    if len(codes) and not (0 <= codes.min() and codes.max() < vocab.speech_codes):
        raise ValueError(f"speech code outside 0..{vocab.speech_codes - 1}: the shards were made by "
                         "another tokenizer than this model's")
    return (codes + vocab.speech_base).tolist()


def _text_ids(ids: np.ndarray, vocab: Vocabulary) -> list[int]:
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and not (0 <= ids.min() and ids.max() < vocab.text_size):
        raise ValueError(f"text id outside 0..{vocab.text_size - 1}: the shards were made by another "
                         "text tokenizer than this model's")
    return ids.tolist()


def pair_samples(pair: PairCodes, vocab: Vocabulary) -> list[FlatSequence]:
    """Stage 1: [ASR sample, TTS sample]."""
    speech, text = _speech_ids(pair.speech, vocab), _text_ids(pair.text, vocab)
    return [asr_sample(speech, text, vocab), tts_sample(text, speech, vocab)]


def _turn_pair_samples(d: DialogueCodes, vocab: Vocabulary) -> list[FlatSequence]:
    """Stage 1 from a dialogue: each turn with text and speech as an ASR and a TTS
    sample; not interrupted turns, whose speech stops before their text does."""
    return [s for t in dialogue_turns(d, vocab, interrupted=False) if t.text and t.speech
            for s in (asr_sample(t.speech, t.text, vocab), tts_sample(t.text, t.speech, vocab))]


def dialogue_turns(d: DialogueCodes, vocab: Vocabulary, *, backchannels: bool = True,
                   interrupted: bool = True) -> list[Turn]:
    """Each turn's text and its channel's speech ids, in start order."""
    turns = []
    for t in sorted(d.turns, key=lambda t: (t.start, t.speaker)):
        if (t.backchannel and not backchannels) or (t.interrupted and not interrupted):
            continue
        if t.speaker == "user":
            a, b = d.user_span(t.start, t.end)
            speech = d.user[a:b]
        else:
            a, b = d.assistant_span(t.start, t.end)
            speech = d.assistant[a:b]
        turns.append(Turn(t.speaker, tuple(_text_ids(t.text, vocab)), tuple(_speech_ids(speech, vocab))))
    return turns


def half_duplex_samples(d: DialogueCodes, vocab: Vocabulary, max_length: int) -> tuple[list[FlatSequence], int]:
    """Stage 2: whole turns (not backchannels: half duplex has no overlap) packed into
    samples of at most `max_length` tokens; samples without an assistant turn teach
    nothing and are left out. Returns (samples, turns skipped for being longer than
    `max_length` alone)."""
    out: list[FlatSequence] = []
    window: list[Turn] = []
    size = skipped = 0

    def close() -> None:
        nonlocal window, size
        if any(t.role == "assistant" for t in window):
            out.append(half_duplex_sample(window, vocab))
        window, size = [], 0

    for turn in dialogue_turns(d, vocab, backchannels=False):
        n = len(half_duplex_sample([turn], vocab).ids)
        if n > max_length:
            skipped += 1
            close()  # what follows no longer continues what came before
            continue
        if size + n > max_length:
            close()
        window.append(turn)
        size += n
    close()
    return out, skipped


def assistant_streams(d: DialogueCodes, layout: ChunkLayout, vocab: Vocabulary,
                      chunks: int) -> tuple[list[int], list[int], int]:
    """The assistant's text and speech ids on the chunk clock, `chunks` chunks long (see
    the module docstring); and how many text ids did not fit."""
    if layout.speech != layout.user:
        raise ValueError(f"full-duplex samples need as many assistant speech as user speech tokens per "
                         f"chunk (both are one chunk period of codes), got {layout.user} and {layout.speech}")
    per = layout.speech
    speech = [vocab.silent_speech] * (chunks * per)
    text = [vocab.silent_text] * (chunks * layout.text)
    mine = sorted((t for t in d.turns if t.speaker == "assistant"), key=lambda t: t.start)
    spans = [d.assistant_span(t.start, t.end) for t in mine]
    spans = [(min(a, chunks * per), min(b, chunks * per)) for a, b in spans]
    cut = 0
    for i, (turn, (a, b)) in enumerate(zip(mine, spans)):
        speech[a:b] = _speech_ids(d.assistant[a:b], vocab)
        if not layout.text:
            continue
        first = a // per
        last = math.ceil(b / per)  # exclusive: the chunk after its speech ends
        if i + 1 < len(spans):
            last = min(last, spans[i + 1][0] // per)  # the next turn's text starts on time
        room = max(0, last - first) * layout.text
        ids = _text_ids(turn.text, vocab)
        text[first * layout.text:first * layout.text + min(room, len(ids))] = ids[:room]
        cut += max(0, len(ids) - room)
    return text, speech, cut


def full_duplex_chunks(d: DialogueCodes, layout: ChunkLayout, vocab: Vocabulary) -> tuple[list[Chunk], int]:
    """Stage 3: the whole dialogue as chunks; and the text ids cut."""
    chunks = max(1, math.ceil(len(d.user) / layout.user))
    text, speech, cut = assistant_streams(d, layout, vocab, chunks)
    return streams_to_chunks(_speech_ids(d.user, vocab), text, speech, layout, vocab), cut


def full_duplex_samples(d: DialogueCodes, layout: ChunkLayout, vocab: Vocabulary, max_length: int,
                        prefix: Sequence[int] = ()) -> tuple[list[FlatSequence], int]:
    """Stage 3: consecutive windows of whole chunks, each `prefix` + at most `max_length`
    tokens in all; and the text ids cut."""
    per_window = (max_length - len(prefix)) // layout.length
    if per_window < 1:
        raise ValueError(f"max_length {max_length} holds no {layout.length}-token chunk after a "
                         f"{len(prefix)}-token prefix")
    chunks, cut = full_duplex_chunks(d, layout, vocab)
    return [flatten(chunks[i:i + per_window], layout, prefix) for i in range(0, len(chunks), per_window)], cut


class TrainDataset(torch.utils.data.Dataset):
    """One stage's samples: `dataset[i] -> {"input_ids": LongTensor[T], "loss_mask":
    BoolTensor[T]}`. `source`: a shard folder (shards.py) or records. Stage 1 takes pairs
    (and, with `turn_pairs`, dialogue turns); stages 2 and 3 take dialogues; stage 3 is
    three- or two-stream as the config's mode says. Samples are held in memory (5 bytes
    a token)."""

    def __init__(self, source: str | os.PathLike | Iterable[Record], config: OmniFlattenConfig, stage: int, *,
                 max_length: int | None = None, prefix: Sequence[int] = (), turn_pairs: bool = True) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.config, self.stage = config, stage
        self.vocab = Vocabulary(config.text_size, config.speech_codebook_size)
        self.max_length = max_length or config.context_length
        self.skipped = 0  # samples (stage 1) or turns (stage 2) longer than max_length
        self.text_cut = 0  # stage 3: assistant text ids that did not fit their turn's chunks
        records = read_shards(source) if isinstance(source, (str, os.PathLike, Path)) else source
        self._ids: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []
        for record in records:
            for seq in self._samples(record, tuple(prefix), turn_pairs):
                if len(seq.ids) > self.max_length:
                    self.skipped += 1
                    continue
                self._ids.append(np.asarray(seq.ids, dtype=np.int32))
                self._mask.append(np.asarray(seq.loss_mask, dtype=bool))

    def _samples(self, record: Record, prefix: tuple[int, ...], turn_pairs: bool) -> list[FlatSequence]:
        v = self.vocab
        if self.stage == 1:
            if isinstance(record, PairCodes):
                return pair_samples(record, v)
            return _turn_pair_samples(record, v) if turn_pairs else []
        if isinstance(record, PairCodes):
            return []
        if self.stage == 2:
            samples, skipped = half_duplex_samples(record, v, self.max_length)
            self.skipped += skipped
            return samples
        samples, cut = full_duplex_samples(record, self.config.layout, v, self.max_length, prefix)
        self.text_cut += cut
        return samples

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self._ids[i].astype(np.int64)),
                "loss_mask": torch.from_numpy(self._mask[i].copy())}

    @property
    def lengths(self) -> list[int]:
        """Each sample's length (for length-bucketed batching)."""
        return [len(x) for x in self._ids]


def collate(batch: Sequence[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: `input_ids` with `pad_id`, `loss_mask` False, and an
    `attention_mask` (True on real tokens) for the backbone (token_data.pad_collate)."""
    return pad_collate(batch, pad_id)
