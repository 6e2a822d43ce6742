"""`OmniFlattenConfig`: every size, rate and chunk length of the model, as configuration.

Saved as `config.json` beside the weights. The backbone is either an inline Qwen2 config
(a dict of `Qwen2Config` fields, as tiny test models use) or a path to a Hugging Face
model folder, relative to the model folder. Validation names the bad field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigInvalid

__all__ = ["OmniFlattenConfig", "SamplingConfig", "ChunkLayout", "THREE_STREAM", "TWO_STREAM"]

THREE_STREAM = "three-stream"
TWO_STREAM = "two-stream"
MODES = (THREE_STREAM, TWO_STREAM)


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy. top_k 0 and top_p 1.0 mean no truncation.

    speak_threshold > 0 decides each text and speech slot in two steps: speak when the
    non-silent tokens' total probability reaches it (else the silent token), then pick one
    of them by the other settings. A small model spreads its speaking mass over thousands
    of tokens, so the one silent token is the argmax even where speaking is likelier:
    greedy never speaks, and plain sampling speaks at random moments. 0 (the default)
    leaves the slot to them (docs/engine.md)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    speak_threshold: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigInvalid("sampling.temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigInvalid("sampling.top_k", f"must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigInvalid("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.speak_threshold < 1.0:
            raise ConfigInvalid("sampling.speak_threshold", f"must be in [0, 1), got {self.speak_threshold}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ChunkLayout:
    """How many tokens of each stream one chunk holds, in the paper's order:
    user speech, then assistant text (three-stream only), then assistant speech."""

    user: int
    text: int
    speech: int

    @property
    def decoded(self) -> int:
        return self.text + self.speech

    @property
    def length(self) -> int:
        return self.user + self.text + self.speech


@dataclass(frozen=True)
class OmniFlattenConfig:
    backbone: dict[str, Any] | str  # inline Qwen2Config fields, or a folder path
    text_vocab_size: int | None = None  # default: the inline backbone's vocab_size
    speech_codebook_size: int = 4096
    speech_token_rate: int = 50  # Hz: 50 (CosyVoice v1) or 25
    mode: str = THREE_STREAM
    user_chunk: int | None = None  # default: 10 (three-stream) or 5 (two-stream)
    text_chunk: int | None = None  # default: 2 (three-stream), 0 (two-stream)
    speech_chunk: int | None = None  # default: 10 (three-stream) or 5 (two-stream)
    tokenizer_sample_rate: int = 16000
    decoder_sample_rate: int = 22050
    context_length: int = 8192
    # When a session's context is full, at least this share of context_length (rounded up
    # to whole chunks) is dropped at once, so a kept key is re-rotated at most about
    # 1/roll_hop_fraction times: in bfloat16 each re-rotation re-rounds it (docs/engine.md).
    roll_hop_fraction: float = 0.25
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dtype: str = "float32"  # float32, bfloat16, float16 or float64 (tests)

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, (dict, str)) or not self.backbone:
            raise ConfigInvalid("backbone", "must be a Qwen2 config object or a model folder path")
        if isinstance(self.backbone, dict) and not isinstance(self.backbone.get("vocab_size"), int):
            raise ConfigInvalid("backbone.vocab_size", "an inline backbone needs its text vocab_size")
        if self.text_vocab_size is None and not isinstance(self.backbone, dict):
            raise ConfigInvalid("text_vocab_size", "required when the backbone is a folder path")
        if self.text_vocab_size is not None and self.text_vocab_size < 1:
            raise ConfigInvalid("text_vocab_size", f"must be positive, got {self.text_vocab_size}")
        if self.mode not in MODES:
            raise ConfigInvalid("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.speech_token_rate not in (25, 50):
            raise ConfigInvalid("speech_token_rate", f"must be 25 or 50 Hz, got {self.speech_token_rate}")
        if self.speech_codebook_size < 2:
            raise ConfigInvalid("speech_codebook_size", "must be at least 2")
        if self.decoder_sample_rate not in (16000, 22050, 24000):
            raise ConfigInvalid("decoder_sample_rate", f"must be 16000, 22050 or 24000, got {self.decoder_sample_rate}")
        if self.tokenizer_sample_rate != 16000:
            raise ConfigInvalid("tokenizer_sample_rate", "the S3 tokenizer takes 16000 Hz input")
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ConfigInvalid("dtype", f"unknown dtype {self.dtype!r}")
        layout = self.layout
        if layout.user < 1 or layout.speech < 1 or layout.text < 0:
            raise ConfigInvalid("user_chunk/speech_chunk", "user and speech chunks need at least one token")
        if self.mode == TWO_STREAM and layout.text != 0:
            raise ConfigInvalid("text_chunk", "the two-stream mode has no text stream: use 0")
        if self.mode == THREE_STREAM and layout.text < 1:
            raise ConfigInvalid("text_chunk", "the three-stream mode needs at least one text token per chunk")
        if not isinstance(self.roll_hop_fraction, (int, float)) or not 0.125 <= self.roll_hop_fraction <= 0.5:
            raise ConfigInvalid("roll_hop_fraction", f"must be in [0.125, 0.5], got {self.roll_hop_fraction}: "
                                "smaller hops let bfloat16 keys drift, larger ones drop most of the context")
        if self.context_length < 4 * layout.length:
            raise ConfigInvalid("context_length", f"{self.context_length} holds fewer than 4 chunks "
                                f"of {layout.length} tokens")

    @property
    def layout(self) -> ChunkLayout:
        three = self.mode == THREE_STREAM
        return ChunkLayout(
            user=self.user_chunk if self.user_chunk is not None else (10 if three else 5),
            text=self.text_chunk if self.text_chunk is not None else (2 if three else 0),
            speech=self.speech_chunk if self.speech_chunk is not None else (10 if three else 5),
        )

    @property
    def text_size(self) -> int:
        if self.text_vocab_size is not None:
            return self.text_vocab_size
        return int(self.backbone["vocab_size"])  # type: ignore[index]

    @property
    def chunk_seconds(self) -> float:
        """The chunk period: the user speech one chunk carries."""
        return self.layout.user / self.speech_token_rate

    def with_(self, **changes: Any) -> "OmniFlattenConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> "OmniFlattenConfig":
        if not isinstance(data, dict):
            raise ConfigInvalid("<root>", "expected a JSON object", source)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigInvalid(unknown[0], f"unknown field (known: {', '.join(sorted(known))})", source)
        if "backbone" not in data:
            raise ConfigInvalid("backbone", "missing", source)
        values = dict(data)
        sampling = values.pop("sampling", None)
        try:
            if sampling is not None:
                if not isinstance(sampling, dict):
                    raise ConfigInvalid("sampling", "expected an object", source)
                values["sampling"] = SamplingConfig(**sampling)
            return cls(**values)
        except TypeError as exc:  # a wrong type or an unknown sampling field
            raise ConfigInvalid("sampling", str(exc), source) from None
        except ConfigInvalid as exc:
            if source and source not in str(exc):
                raise ConfigInvalid(exc.field, str(exc).split(": ", 1)[-1], source) from None
            raise

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "OmniFlattenConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigInvalid("<file>", "config.json is missing", str(path)) from None
        except json.JSONDecodeError as exc:
            raise ConfigInvalid("<file>", f"not valid JSON ({exc})", str(path)) from None
        return cls.from_dict(data, source=str(path))
