"""`CosyVoiceDecoder`: the assistant's speech codes become speech through CosyVoice's
flow matching (`cosyvoice_flow`) and HiFT vocoder (`cosyvoice_hift`), chunk by chunk, as
the model speaks (docs/decoder.md).

One push = one model chunk of codes (10: 200 ms at 50 Hz, 400 ms at 25 Hz). Per push:

- **v2's flow, chunk-causal with caches** (`FlowStream`, cosyvoice_flow_stream.py): each
  chunk of `chunk_tokens` codes is computed once, attending to `left_chunks` chunks
  before it through cached keys and values, and equals the flow run once over the whole
  utterance on the same chunk grid. A code's mel waits for its 3 look-ahead codes.
- **v1's flow, in a sliding window** (v1 is not causal: no cache can give the whole
  utterance's result). The chunk's codes are the flow's new tokens; the voice's prompt
  plus the stream's last `context_tokens` codes are its prompt, with the voice's prompt
  mel plus the mel this stream made for those codes as the prompt's condition. So every
  chunk continues the mel it follows (no seam in the mel), at a cost bounded by the
  window, not by the length of the reply. v1's 1.72 mel frames per code are counted on
  the stream's running total, so the chunks add up to the audio's length exactly.
- **HiFT with its caches**: the chunk's mel after the previous chunk's last `overlap`
  frames, the previous source's last samples in front of the new source (the harmonic
  phase goes on); the first `overlap` frames' samples are cross-faded (Hamming) with the
  previous chunk's held-back tail, and this chunk's last `overlap` frames are held back
  for the next: no click at chunk edges, for `overlap` frames of added latency (v1: 8 x
  256 samples = 93 ms; v2: 8 x 480 = 160 ms, as upstream's streaming).
- **Silent speech** (code -1): a chunk of it ends the utterance: the held-back tail is
  played out with a fade, the rest is silence, and the next utterance starts afresh. Silent
  codes inside a spoken chunk repeat the nearest spoken code and are muted with 5 ms ramps
  (the mute follows its samples through the hold-back).

Each push (of one chunk) returns exactly its codes' duration of audio: the first of an
utterance starts with the held-back tail's and v2's look-ahead's length of silence (the
latency they cost, paid once, so that the playout never runs dry inside a turn).

`steps` (Euler steps) and `guidance` (classifier-free guidance weight) are settings:
bench/decoder.py measures cost against steps. Randomness (v1's flow noise, HiFT's noise)
comes from a per-stream generator with a fixed seed, so one stream's audio depends only on
its codes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .codec import DEFAULT_VOICE, DecoderStream, SpeechDecoder
from .cosyvoice_encoder import EncoderConfig
from .cosyvoice_estimator import EstimatorConfig
from .cosyvoice_flow import V2, CosyVoiceFlow, FlowConfig, load_flow
from .cosyvoice_flow_stream import FlowStream
from .cosyvoice_stream import CosyVoiceStream, decode_many
from .cosyvoice_hift import HiFTConfig, HiFTGenerator, load_hift
from .errors import CheckpointError

__all__ = ["CosyVoiceDecoder", "DecoderSettings", "Voice", "KIND", "tiny_flow_config", "tiny_hift_config"]

KIND = "cosyvoice"
VOICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class DecoderSettings:
    steps: int = 10  # Euler steps of the flow
    guidance: float = 0.7  # classifier-free guidance weight
    context_tokens: int = 20  # v1: codes of the stream's past re-fed to the flow as prompt
    overlap_frames: int = 8  # mel frames HiFT repeats, cross-fades and holds back
    seed: int = 0  # each stream's noise generator
    chunk_tokens: int = 0  # v2: codes per attention chunk; 0: a reply's first push's (the model's chunk)
    left_chunks: int = 2  # v2: chunks before its own a chunk attends to (< 0: all; memory grows)

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 100:
            raise ValueError(f"steps must be 1..100, got {self.steps}")
        if not 0.0 <= self.guidance <= 10.0:
            raise ValueError(f"guidance must be 0..10, got {self.guidance}")
        if self.context_tokens < 0 or self.overlap_frames < 0:
            raise ValueError("context_tokens and overlap_frames must be >= 0")
        if self.chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0 (0: the pushes' size), got {self.chunk_tokens}")


@dataclass
class Voice:
    """A speaker: the 192-d x-vector, and an optional prompt (its codes and their mel,
    (frames, 80) natural-log, at the decoder's mel rate)."""

    embedding: np.ndarray
    prompt_tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    prompt_mel: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 80), np.float32))


def tiny_flow_config(family: str) -> FlowConfig:
    """The small reference builds' sizes (the upstream-made fixtures' small-vN): the
    official layout at a few hundred thousand parameters, for tests and demos."""
    encoder = dict(input_size=64, output_size=64, attention_heads=4, linear_units=128, num_blocks=2)
    estimator = dict(attention_head_dim=32, n_blocks=2, num_mid_blocks=2, num_heads=2)
    if family == "v1":
        return FlowConfig(input_size=64, encoder=EncoderConfig(**encoder),
                          estimator=EstimatorConfig(channels=(32, 32), **estimator))
    official = FlowConfig.official_v2()
    return dataclasses.replace(
        official, input_size=64,
        encoder=dataclasses.replace(official.encoder, **encoder),
        estimator=dataclasses.replace(official.estimator, channels=(32,), **estimator))


def tiny_hift_config(family: str) -> HiFTConfig:
    official = HiFTConfig.official_v1() if family == "v1" else HiFTConfig.official_v2()
    return dataclasses.replace(official, base_channels=64, f0_channels=48)


class CosyVoiceDecoder(SpeechDecoder):
    """Flow + HiFT + voices (the default one and any named others). Thread-safe for
    concurrent streams (inference only). It owns its flow: it sets the solver's steps and
    guidance on the flow's config, so two decoders must not share one flow module."""

    def __init__(self, flow: CosyVoiceFlow, hift: HiFTGenerator, voice: Voice,
                 settings: DecoderSettings | None = None, voices: Mapping[str, Voice] | None = None) -> None:
        self.settings = settings or DecoderSettings()
        s = self.settings
        # Steps and guidance are the solver's, not the weights': set them on its config.
        config = dataclasses.replace(flow.config, n_timesteps=s.steps, inference_cfg_rate=s.guidance)
        flow.config = config
        flow.decoder.config = config
        self.flow = flow.eval()
        self.hift = hift.eval()
        self.family = "v2" if config.version == V2 else "v1"
        self._primed_lock = threading.Lock()
        self._voices: dict[str, Voice] = {}
        self._primed: dict[tuple[str, int], FlowStream] = {}  # v2: each voice prompt's chunks, once per grid
        self.voice = voice
        for name, other in (voices or {}).items():
            self.add_voice(name, other)
        self.sample_rate = hift.config.sample_rate
        self.token_rate = config.input_frame_rate
        self.codebook_size = config.vocab_size
        if hift.config.sample_rate != config.mel_sample_rate or hift.config.samples_per_frame != config.mel_hop:
            raise ValueError(f"the flow makes mel for {config.mel_sample_rate} Hz, hop {config.mel_hop}; HiFT takes "
                             f"{hift.config.sample_rate} Hz, hop {hift.config.samples_per_frame}")
        self.device = next(flow.parameters()).device
        self.dtype = next(flow.parameters()).dtype
        # v2: mel frames a code waits for its look-ahead.
        self.delay_frames = config.pre_lookahead_len * config.token_mel_ratio if self.family == "v2" else 0

    @property
    def samples_per_code(self) -> float:
        return self.sample_rate / self.token_rate

    def mel_frames(self, codes: int) -> int:
        """Mel frames of the first `codes` codes of an utterance."""
        c = self.flow.config
        return codes * c.token_mel_ratio if c.version == V2 else c.v1_frames(codes)

    def new_stream(self, voice: str | None = None) -> DecoderStream:
        return CosyVoiceStream(self, self.check_voice(voice))

    def push_many(self, streams: list[DecoderStream], codes: list[np.ndarray]) -> list[np.ndarray]:
        """One push per stream, batched (model/cosyvoice_stream.py)."""
        return decode_many(self, streams, codes)

    @property
    def voice(self) -> Voice:
        """The default voice."""
        return self._voices[DEFAULT_VOICE]

    @voice.setter
    def voice(self, voice: Voice) -> None:
        self.add_voice(DEFAULT_VOICE, voice)

    @property
    def voices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._voices)

    def add_voice(self, name: str, voice: Voice) -> None:
        """Add (or replace) a named voice; a route or `--voice` picks it by name."""
        if not VOICE_NAME.fullmatch(name):
            raise ValueError(f"voice name {name!r}: use 1-64 letters, digits, '_' or '-'")
        _check_voice(voice, name)
        with self._primed_lock:
            self._voices[name] = voice
            self._primed = {key: p for key, p in self._primed.items() if key[0] != name}

    def voice_of(self, name: str) -> Voice:
        return self._voices[name]

    def flow_stream(self, voice: str = DEFAULT_VOICE, push_size: int = 10) -> FlowStream:
        """v2: a new utterance's flow state, the voice's prompt already in it; its chunks
        are `chunk_tokens` codes, or (0) `push_size`, so that each push completes one."""
        chunk = self.settings.chunk_tokens or max(1, push_size)
        with self._primed_lock:
            primed = self._primed.get((voice, chunk))
            if primed is None:
                v = self._voices[voice]
                primed = self._primed[voice, chunk] = FlowStream(self.flow, v.embedding, v.prompt_tokens,
                                                                 v.prompt_mel, chunk, self.settings.left_chunks).prime()
            return primed.copy()

    # ---- building, saving, loading ---------------------------------------------------------

    @classmethod
    def random(cls, family: str, seed: int = 0, settings: DecoderSettings | None = None) -> CosyVoiceDecoder:
        """Tiny random flow and HiFT (`tiny_flow_config`), a random voice: tests and demos."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            flow = CosyVoiceFlow(tiny_flow_config(family))
            hift = HiFTGenerator(tiny_hift_config(family))
            embedding = torch.randn(192).numpy()
        return cls(flow, hift, Voice(embedding.astype(np.float32)), settings)

    def save(self, folder: str | Path) -> None:
        """`folder/`: decoder.json (kind, family, configs, settings), flow.pt and hift.pt
        (plain state dicts in the official layout), voice.npz (the default voice) and
        voices/NAME.npz (the others)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.flow.state_dict(), folder / "flow.pt")
        torch.save(self.hift.state_dict(), folder / "hift.pt")
        for name, voice in self._voices.items():
            path = folder / "voice.npz" if name == DEFAULT_VOICE else folder / "voices" / f"{name}.npz"
            path.parent.mkdir(exist_ok=True)
            np.savez(path, embedding=voice.embedding, prompt_tokens=voice.prompt_tokens, prompt_mel=voice.prompt_mel)
        meta = {"kind": KIND, "family": self.family, "flow": dataclasses.asdict(self.flow.config),
                "hift": dataclasses.asdict(self.hift.config), "settings": dataclasses.asdict(self.settings)}
        (folder / "decoder.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", settings: DecoderSettings | None = None) -> CosyVoiceDecoder:
        """Raises CheckpointError naming the file for anything missing, corrupt or not
        matching its configuration. `settings` replaces the saved ones."""
        folder = Path(folder)
        meta_path = folder / "decoder.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(meta_path, "decoder file is missing") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(meta_path, f"not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("kind") != KIND:
            raise CheckpointError(meta_path, f"expected a decoder of kind {KIND!r}")
        try:
            flow_config = _flow_config(meta["flow"])
            hift_config = _dataclass(HiFTConfig, meta["hift"])
            saved = DecoderSettings(**meta.get("settings", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(meta_path, f"bad decoder settings: {exc}") from None
        flow = load_flow(folder / "flow.pt", flow_config, device=device)
        hift = load_hift(folder / "hift.pt", hift_config, map_location=device)
        voice = _load_voice(folder / "voice.npz")
        others = {}
        for path in sorted((folder / "voices").glob("*.npz")):
            if path.stem == DEFAULT_VOICE or not VOICE_NAME.fullmatch(path.stem):
                raise CheckpointError(path, f"voice name {path.stem!r}: use 1-64 letters, digits, '_' or '-' "
                                      f"(the default voice is voice.npz)")
            others[path.stem] = _load_voice(path)
        try:
            return cls(flow, hift.to(device), voice, settings or saved, others)
        except ValueError as exc:  # the flow's and HiFT's rates disagree
            raise CheckpointError(meta_path, str(exc)) from None


def _dataclass(cls: type, data: dict[str, Any]) -> Any:
    """A frozen config dataclass from its asdict() form (JSON lists back to tuples)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")

    def tuples(value: Any) -> Any:
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value
    return cls(**{k: tuples(v) for k, v in data.items()})


def _flow_config(data: dict[str, Any]) -> FlowConfig:
    data = dict(data)
    encoder = _dataclass(EncoderConfig, data.pop("encoder"))
    estimator = _dataclass(EstimatorConfig, data.pop("estimator"))
    return FlowConfig(**{**{k: v for k, v in data.items()}, "encoder": encoder, "estimator": estimator})


def _load_voice(path: Path) -> Voice:
    try:
        with np.load(path, allow_pickle=False) as z:
            voice = Voice(z["embedding"].astype(np.float32), z["prompt_tokens"].astype(np.int64),
                          z["prompt_mel"].astype(np.float32))
    except FileNotFoundError:
        raise CheckpointError(path, "the voice file is missing") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, f"not a voice file (embedding, prompt_tokens, prompt_mel): {exc}") from None
    try:
        _check_voice(voice, path.stem)
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from None
    return voice


def _check_voice(voice: Voice, name: str) -> None:
    if voice.embedding.shape != (192,):
        raise ValueError(f"voice {name!r}: embedding has shape {voice.embedding.shape}, expected (192,)")
    if voice.prompt_mel.ndim != 2 or voice.prompt_mel.shape[1] != 80:
        raise ValueError(f"voice {name!r}: prompt_mel has shape {voice.prompt_mel.shape}, expected (frames, 80)")
    if voice.prompt_tokens.ndim != 1:
        raise ValueError(f"voice {name!r}: prompt_tokens has shape {voice.prompt_tokens.shape}, expected (n,)")
