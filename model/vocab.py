"""The extended vocabulary: the backbone's text ids, then the speech codes, then the
special tokens, in that order (so a text checkpoint's ids keep their meaning).

    [0, text_size)                       text (the backbone's embedding rows)
    [speech_base, speech_base + codes)   speech codes 0..codes-1
    then [ASR] [TTS] [SOS] [EOS] [SOT] [EOT] <silent text> <silent speech>
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Vocabulary", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("[ASR]", "[TTS]", "[SOS]", "[EOS]", "[SOT]", "[EOT]", "<silent_text>", "<silent_speech>")


@dataclass(frozen=True)
class Vocabulary:
    text_size: int
    speech_codes: int

    @property
    def speech_base(self) -> int:
        return self.text_size

    @property
    def special_base(self) -> int:
        return self.text_size + self.speech_codes

    @property
    def size(self) -> int:
        return self.special_base + len(SPECIAL_TOKENS)

    def special(self, name: str) -> int:
        return self.special_base + SPECIAL_TOKENS.index(name)

    @property
    def silent_text(self) -> int:
        return self.special("<silent_text>")

    @property
    def silent_speech(self) -> int:
        return self.special("<silent_speech>")

    def speech_id(self, code: int) -> int:
        if not 0 <= code < self.speech_codes:
            raise ValueError(f"speech code {code} outside 0..{self.speech_codes - 1}")
        return self.speech_base + code

    def code_of(self, token_id: int) -> int:
        """The speech code of a speech id; -1 for silent speech."""
        if token_id == self.silent_speech:
            return -1
        if not self.is_speech(token_id):
            raise ValueError(f"token {token_id} is not a speech token")
        return token_id - self.speech_base

    def is_text(self, token_id: int) -> bool:
        return 0 <= token_id < self.text_size

    def is_speech(self, token_id: int) -> bool:
        return self.speech_base <= token_id < self.special_base

    def name_of(self, token_id: int) -> str:
        if self.is_text(token_id):
            return f"text:{token_id}"
        if self.is_speech(token_id):
            return f"speech:{token_id - self.speech_base}"
        if self.special_base <= token_id < self.size:
            return SPECIAL_TOKENS[token_id - self.special_base]
        raise ValueError(f"token {token_id} outside the vocabulary of {self.size}")

    def text_candidates(self) -> torch.Tensor:
        """Ids a text slot may hold: any text token, or silent text."""
        return torch.cat([torch.arange(self.text_size), torch.tensor([self.silent_text])])

    def speech_candidates(self) -> torch.Tensor:
        """Ids a speech slot may hold: any speech code, or silent speech."""
        return torch.cat([torch.arange(self.speech_base, self.special_base), torch.tensor([self.silent_speech])])

    def resize(self, model: torch.nn.Module) -> None:
        """Grow a Qwen2 model's (tied) embeddings to this vocabulary. The new rows are
        initialised by transformers (mean of the old rows); the text rows are untouched."""
        current = model.get_input_embeddings().weight.shape[0]
        if current == self.size:
            return
        if current != self.text_size:
            raise ValueError(f"the model has {current} embedding rows; expected the text "
                             f"vocabulary ({self.text_size}) or the extended one ({self.size})")
        model.resize_token_embeddings(self.size, mean_resizing=False)
        model.config.vocab_size = self.size
