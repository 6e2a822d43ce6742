"""Building, saving and loading a whole OmniFlatten model folder.

    config.json           OmniFlattenConfig (backbone: "backbone", text_vocab_size set)
    backbone/             the Qwen2 backbone in Hugging Face layout (config.json and
                          model.safetensors, or sharded with model.safetensors.index.json),
                          embeddings already extended to the full vocabulary
    tokenizer/            the S3 speech tokenizer (its own config and weights)
    decoder/              the speech decoder: CosyVoice flow + HiFT (decoder.json, flow.pt,
                          hift.pt in the official layout, voice.npz), or
    decoder.json          the stand-in tone decoder (tiny demo models)

Weights are read with safetensors and loaded with every key checked: a missing, extra or
misshapen tensor is an error naming the file, never a silently random layer.
Only this module and the backbone adapter import transformers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .codec import SpeechDecoder, SpeechTokenizer
from .config import OmniFlattenConfig
from .decoder_standin import StandInToneDecoder
from .errors import CheckpointError, ConfigInvalid
from .omniflatten import OmniFlatten
from .vocab import Vocabulary

__all__ = ["LoadedModel", "serving_dtype", "build_model", "save_model", "load_model", "tiny_config", "qwen2_05b_config",
           "write_tiny_model"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: OmniFlatten
    tokenizer: SpeechTokenizer | None
    decoder: SpeechDecoder


def tiny_backbone(layers: int = 2, width: int = 64) -> dict[str, Any]:
    """A small Qwen2 config: `layers` of `width`, width/32 heads (at least 4), half as many
    key-value heads, a feed-forward twice the width. The defaults are `tiny_config`'s."""
    if layers < 1 or width < 32 or width % 32:
        raise ValueError(f"need at least 1 layer and a width that is a multiple of 32, got {layers} x {width}")
    heads = max(4, width // 32)
    return {"vocab_size": 256, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2), "max_position_embeddings": 2048,
            "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}


def tiny_config(**changes: Any) -> OmniFlattenConfig:
    """A few layers, small widths, the real vocabulary layout: for tests and demos."""
    return OmniFlattenConfig(**{"backbone": tiny_backbone(), "context_length": 512, **changes})


def qwen2_05b_config(**changes: Any) -> OmniFlattenConfig:
    """The paper's backbone shape (Qwen2-0.5B), for benchmarks with random weights."""
    backbone = {
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    }
    return OmniFlattenConfig(**{"backbone": backbone, **changes})


def _qwen2_config(fields: dict[str, Any]):
    from transformers import Qwen2Config

    cfg = Qwen2Config(**fields)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(config: OmniFlattenConfig, seed: int = 0, device: str = "cpu") -> OmniFlatten:
    """A randomly initialised model from an inline backbone config (nothing is read)."""
    from transformers import Qwen2ForCausalLM

    if not isinstance(config.backbone, dict):
        raise ConfigInvalid("backbone", "build_model needs an inline backbone config; use load_model for a folder")
    torch.manual_seed(seed)
    backbone = Qwen2ForCausalLM(_qwen2_config(config.backbone))
    vocab = Vocabulary(config.text_size, config.speech_codebook_size)
    vocab.resize(backbone)
    return OmniFlatten(config, backbone, vocab, device)


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(index, f"not a safetensors index ({exc})") from None
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise CheckpointError(path, "backbone weights are missing (expected Hugging Face "
                                  "safetensors: model.safetensors)")
        try:
            state.update(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(path, f"cannot read safetensors (truncated or corrupt?): {exc}") from None
    return state


def _load_backbone(folder: Path, vocab: Vocabulary):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg_path = folder / "config.json"
    try:
        fields = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(cfg_path, "backbone config.json is missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(cfg_path, f"not valid JSON ({exc})") from None
    if fields.get("model_type") not in (None, "qwen2"):
        raise CheckpointError(cfg_path, f"expected a qwen2 model, found {fields.get('model_type')!r}")
    qcfg = Qwen2Config.from_dict(fields)
    qcfg._attn_implementation = "sdpa"
    if qcfg.vocab_size not in (vocab.text_size, vocab.size):
        raise CheckpointError(cfg_path, f"vocab_size {qcfg.vocab_size} is neither the text "
                              f"vocabulary ({vocab.text_size}) nor the extended one ({vocab.size})")
    with torch.device("meta"):
        backbone = Qwen2ForCausalLM(qcfg)
    state = _read_safetensors(folder)
    expected = backbone.state_dict()
    tied = {"lm_head.weight"} if qcfg.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(folder, f"backbone weights do not match its config: missing "
                              f"{missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected "
                              f"{unexpected[:3]}{'…' if len(unexpected) > 3 else ''}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(folder, f"{key} has shape {tuple(tensor.shape)}, the config "
                                  f"says {tuple(expected[key].shape)}")
    backbone.load_state_dict(state, strict=False, assign=True)
    if qcfg.tie_word_embeddings:
        backbone.lm_head.weight = backbone.model.embed_tokens.weight
    backbone.model.rotary_emb = type(backbone.model.rotary_emb)(config=qcfg)  # a real, non-meta buffer
    vocab.resize(backbone)
    return backbone


def save_model(model: OmniFlatten, folder: str | Path, tokenizer: SpeechTokenizer | None = None,
               decoder: SpeechDecoder | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.with_(backbone="backbone", text_vocab_size=model.vocab.text_size)
    model.backbone.save_pretrained(folder / "backbone", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer")  # type: ignore[attr-defined]
    decoder = decoder or StandInToneDecoder(config.decoder_sample_rate, config.speech_token_rate,
                                            config.speech_codebook_size)
    if isinstance(decoder, StandInToneDecoder):
        decoder.save(folder / "decoder.json")
    else:
        decoder.save(folder / "decoder")  # type: ignore[attr-defined]
    config.save(folder / "config.json")
    return folder


def serving_dtype(config: OmniFlattenConfig, device: str) -> OmniFlattenConfig:
    """On a GPU a float32 config serves in bfloat16 (half the memory and bandwidth);
    any other dtype the config names is kept."""
    if str(device).startswith("cuda") and config.dtype == "float32":
        return config.with_(dtype="bfloat16")
    return config


def load_model(folder: str | Path, device: str = "cpu") -> LoadedModel:
    """Load a model folder. Raises CheckpointError/ConfigInvalid naming the bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "not a model folder (expected config.json, backbone/, decoder.json)")
    config = serving_dtype(OmniFlattenConfig.load(folder / "config.json"), device)
    vocab = Vocabulary(config.text_size, config.speech_codebook_size)
    if isinstance(config.backbone, dict):
        raise CheckpointError(folder / "config.json", "backbone must name the backbone folder in a saved model")
    backbone = _load_backbone(folder / config.backbone, vocab)
    model = OmniFlatten(config, backbone, vocab, device)
    tokenizer = None
    if (folder / "tokenizer").exists():
        from .s3_tokenizer import S3Tokenizer

        # On the engine's device: the engine tokenizes every tick's audio there, batched.
        tokenizer = S3Tokenizer.load(folder / "tokenizer", device=device)
    decoder_path = folder / "decoder"
    decoder: SpeechDecoder
    if decoder_path.is_dir():
        from .cosyvoice_decoder import CosyVoiceDecoder

        decoder = CosyVoiceDecoder.load(decoder_path, device=device)
    else:
        decoder_path = folder / "decoder.json"
        decoder = StandInToneDecoder.load(decoder_path)
        log.warning("%s: the STAND-IN tone decoder: callers hear tones, not speech", decoder_path)
    if decoder.sample_rate != config.decoder_sample_rate or decoder.token_rate != config.speech_token_rate:
        raise CheckpointError(decoder_path, f"decoder runs {decoder.token_rate} Hz -> "
                              f"{decoder.sample_rate} Hz; config.json says {config.speech_token_rate} Hz "
                              f"-> {config.decoder_sample_rate} Hz")
    codebook = getattr(decoder, "codebook_size", config.speech_codebook_size)
    if codebook != config.speech_codebook_size:
        raise CheckpointError(decoder_path, f"decoder takes {codebook} speech codes; config.json says "
                              f"{config.speech_codebook_size}")
    return LoadedModel(model, tokenizer, decoder)


DECODER_FAMILIES = {  # the OmniFlatten speech settings each CosyVoice family implies
    "v1": {"speech_token_rate": 50, "speech_codebook_size": 4096, "decoder_sample_rate": 22050},
    "v2": {"speech_token_rate": 25, "speech_codebook_size": 6561, "decoder_sample_rate": 24000},
}


def write_tiny_model(out: str | Path, seed: int = 0, decoder: str | None = None, *, layers: int = 2,
                     width: int = 64, codebook_size: int | None = None, fit_manifest: str | Path | None = None,
                     fit_entries: int = 100) -> Path:
    """A tiny random model folder. `decoder`: None for the stand-in tone decoder, or
    "v1" / "v2" for tiny random CosyVoice flow + HiFT files in the official layout (the
    model's speech codes, rate and the tokenizer then follow that family). `layers`,
    `width`: the backbone (`tiny_backbone`); `codebook_size`: the speech codes (default
    the family's). `fit_manifest`: a training manifest whose first `fit_entries` entries
    fit the tokenizer (model/train/codebook_fit.py), so its codes follow the sound."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(out, "folder exists and is not empty; choose a new one")
    if decoder is not None and decoder not in DECODER_FAMILIES:
        raise ValueError(f"decoder must be one of {', '.join(DECODER_FAMILIES)}, got {decoder!r}")
    if codebook_size and decoder is not None:
        raise ValueError(f"the {decoder} decoder fixes the speech codes; leave the codebook size out")
    sizes = {"speech_codebook_size": codebook_size} if codebook_size else {}
    config = tiny_config(backbone=tiny_backbone(layers, width), **{**DECODER_FAMILIES.get(decoder or "", {}), **sizes})
    model = build_model(config, seed=seed)
    from .s3_tokenizer import S3Tokenizer, tiny_config_for

    # v2's 6561 codes get the v2 architecture (FSMN blocks, FSQ), as CosyVoice2's own tokenizer.
    tokenizer = S3Tokenizer.random(tiny_config_for(config.speech_token_rate, config.speech_codebook_size), seed=seed)
    if fit_manifest is not None:
        from .train.codebook_fit import content_front_end, fit_codebook, manifest_signals

        fit_codebook(content_front_end(tokenizer), manifest_signals(fit_manifest, fit_entries), seed=seed)
    speech: SpeechDecoder | None = None
    if decoder is not None:
        from .cosyvoice_decoder import CosyVoiceDecoder

        speech = CosyVoiceDecoder.random(decoder, seed=seed)
    return save_model(model, out, tokenizer=tokenizer, decoder=speech)
