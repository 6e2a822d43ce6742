"""Flattening the model's streams into one token sequence, and back.

Full duplex (the paper's figure): each chunk is user speech, then assistant text
(three-stream only), then assistant speech, e.g. 10 + 2 + 10 tokens. An assistant that is
not speaking fills its speech slots with the silent speech token; text that has ended is
padded with the silent text token. The user's tokens are fed, never predicted, so the loss
mask covers only the assistant's positions.

Half duplex and the alignment tasks (ASR, TTS) use the special tokens:
    ASR  [ASR][SOS] speech [EOS][SOT] text [EOT]
    TTS  [TTS][SOT] text [EOT][SOS] speech [EOS]
    half duplex, per turn: user [SOS] speech [EOS][SOT] text [EOT];
                           assistant [SOT] text [EOT][SOS] speech [EOS]
All ids here are vocabulary ids (see `Vocabulary`), not raw speech codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .config import ChunkLayout
from .vocab import Vocabulary

__all__ = ["Chunk", "FlatSequence", "Turn", "streams_to_chunks", "chunks_to_streams",
           "flatten", "unflatten", "asr_sample", "tts_sample", "half_duplex_sample"]


@dataclass(frozen=True)
class Chunk:
    user: tuple[int, ...]
    text: tuple[int, ...]
    speech: tuple[int, ...]


@dataclass(frozen=True)
class FlatSequence:
    ids: list[int]
    loss_mask: list[bool]  # True where the model is trained to predict the token

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.loss_mask):
            raise ValueError("ids and loss_mask differ in length")


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: tuple[int, ...]
    speech: tuple[int, ...]


def _pad(stream: Sequence[int], length: int, fill: int) -> list[int]:
    return list(stream) + [fill] * (length - len(stream))


def streams_to_chunks(user: Sequence[int], text: Sequence[int], speech: Sequence[int],
                      layout: ChunkLayout, vocab: Vocabulary) -> list[Chunk]:
    """Cut three streams into chunks; the shorter streams are padded with silence (user and
    assistant speech with silent speech, text with silent text) to a whole chunk count."""
    if layout.text == 0 and text:
        raise ValueError("this layout has no text stream")
    count = max(math.ceil(len(user) / layout.user), math.ceil(len(speech) / layout.speech),
                math.ceil(len(text) / layout.text) if layout.text else 0)
    user_p = _pad(user, count * layout.user, vocab.silent_speech)
    text_p = _pad(text, count * layout.text, vocab.silent_text)
    speech_p = _pad(speech, count * layout.speech, vocab.silent_speech)
    return [
        Chunk(tuple(user_p[i * layout.user:(i + 1) * layout.user]),
              tuple(text_p[i * layout.text:(i + 1) * layout.text]),
              tuple(speech_p[i * layout.speech:(i + 1) * layout.speech]))
        for i in range(count)
    ]


def chunks_to_streams(chunks: Sequence[Chunk]) -> tuple[list[int], list[int], list[int]]:
    user: list[int] = []
    text: list[int] = []
    speech: list[int] = []
    for chunk in chunks:
        user += chunk.user
        text += chunk.text
        speech += chunk.speech
    return user, text, speech


def flatten(chunks: Sequence[Chunk], layout: ChunkLayout, prefix: Sequence[int] = ()) -> FlatSequence:
    """prefix (a system prompt) + chunks in the paper's order; the loss covers the
    assistant's text and speech positions only."""
    ids = list(prefix)
    mask = [False] * len(prefix)
    for i, chunk in enumerate(chunks):
        if (len(chunk.user), len(chunk.text), len(chunk.speech)) != (layout.user, layout.text, layout.speech):
            raise ValueError(f"chunk {i} has {len(chunk.user)}+{len(chunk.text)}+{len(chunk.speech)} "
                             f"tokens; the layout is {layout.user}+{layout.text}+{layout.speech}")
        ids += chunk.user + chunk.text + chunk.speech
        mask += [False] * layout.user + [True] * layout.decoded
    return FlatSequence(ids, mask)


def unflatten(ids: Sequence[int], layout: ChunkLayout, prefix_length: int = 0) -> list[Chunk]:
    body = list(ids[prefix_length:])
    if len(body) % layout.length:
        raise ValueError(f"{len(body)} tokens after the prefix is not a whole number of "
                         f"{layout.length}-token chunks")
    chunks = []
    u, t = layout.user, layout.user + layout.text
    for start in range(0, len(body), layout.length):
        part = body[start:start + layout.length]
        chunks.append(Chunk(tuple(part[:u]), tuple(part[u:t]), tuple(part[t:])))
    return chunks


def _sample(parts: Sequence[tuple[Sequence[int], bool]]) -> FlatSequence:
    ids: list[int] = []
    mask: list[bool] = []
    for tokens, learned in parts:
        ids += tokens
        mask += [learned] * len(tokens)
    return FlatSequence(ids, mask)


def asr_sample(speech: Sequence[int], text: Sequence[int], vocab: Vocabulary) -> FlatSequence:
    v = vocab.special
    return _sample([([v("[ASR]"), v("[SOS]"), *speech, v("[EOS]"), v("[SOT]")], False),
                    ([*text, v("[EOT]")], True)])


def tts_sample(text: Sequence[int], speech: Sequence[int], vocab: Vocabulary) -> FlatSequence:
    v = vocab.special
    return _sample([([v("[TTS]"), v("[SOT]"), *text, v("[EOT]"), v("[SOS]")], False),
                    ([*speech, v("[EOS]")], True)])


def half_duplex_sample(turns: Sequence[Turn], vocab: Vocabulary) -> FlatSequence:
    """Four streams turn by turn; only the assistant's turns are learned."""
    v = vocab.special
    parts: list[tuple[Sequence[int], bool]] = []
    for turn in turns:
        if turn.role == "user":
            parts.append(([v("[SOS]"), *turn.speech, v("[EOS]"), v("[SOT]"), *turn.text, v("[EOT]")], False))
        elif turn.role == "assistant":
            parts.append(([v("[SOT]"), *turn.text, v("[EOT]"), v("[SOS]"), *turn.speech, v("[EOS]")], True))
        else:
            raise ValueError(f"turn role must be user or assistant, got {turn.role!r}")
    return _sample(parts)
