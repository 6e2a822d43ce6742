"""Text to the model's text ids: a small interface, so a real Qwen2 tokenizer plugs in.

The text ids are the backbone's own: `[0, text_size)` of the extended vocabulary
(model/vocab.py), so a text checkpoint keeps its meaning. Nothing in the model layer
tokenizes text (the engine only ever decodes speech), so training brings its own:

- `ByteTextTokenizer`: UTF-8 bytes as ids 0..255. For the tiny models, whose text
  vocabulary is exactly 256 rows and has no tokenizer; a byte is one text slot, so text
  runs about three times longer than with BPE (English speech ~14 bytes/s against 10 text
  slots/s at 2 per 200 ms chunk: full-duplex samples cut what does not fit, samples.py).
- `JsonTextTokenizer`: a Hugging Face `tokenizer.json` (what a Qwen2 folder ships) read
  with the `tokenizers` package; ids must fall inside the text vocabulary.

`name` identifies the tokenizer (its kind and file digest); shards record it, so codes
cached with one are never mixed with another's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

__all__ = ["TextTokenizer", "ByteTextTokenizer", "JsonTextTokenizer", "text_tokenizer_for"]


class TextTokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]:
        """Text ids in [0, text_size), no special tokens."""
        ...


class ByteTextTokenizer:
    name = "bytes/1"

    def __init__(self, text_size: int) -> None:
        if text_size < 256:
            raise ValueError(f"byte-level text needs a text vocabulary of at least 256 ids, got {text_size}")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class JsonTextTokenizer:
    def __init__(self, path: str | Path, text_size: int) -> None:
        from tokenizers import Tokenizer  # only this adapter needs it

        path = Path(path)
        self._tok = Tokenizer.from_file(str(path))
        self._size = text_size
        self.name = "tokenizer.json/" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bad = [i for i in ids if not 0 <= i < self._size]
        if bad:
            raise ValueError(f"text id {bad[0]} is outside the model's text vocabulary ({self._size}): "
                             "the tokenizer does not belong to this backbone")
        return ids


def text_tokenizer_for(text_size: int, folder: str | Path | None = None) -> TextTokenizer:
    """The backbone folder's `tokenizer.json` when there is one, else bytes."""
    if folder is not None and (Path(folder) / "tokenizer.json").exists():
        return JsonTextTokenizer(Path(folder) / "tokenizer.json", text_size)
    return ByteTextTokenizer(text_size)
