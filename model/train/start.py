"""The model a run starts from: a model folder, or a bare Qwen2 checkpoint plus a codec.

- `--model FOLDER`: an OmniFlatten model folder (model/checkpoint.py's `load_model`).
- `--backbone QWEN2 --codec FOLDER`: a new OmniFlatten model from a Hugging Face Qwen2
  folder (config.json, safetensors; its text vocabulary) and the speech tokenizer, decoder
  and speech settings (rates, codebook, chunk layout, context) of a model folder. The
  embeddings grow by the speech codes and special tokens (new rows randomly initialised).

Everything loads on the CPU; the trainer moves the backbone to its device. `mode` turns a
three-stream model into a two-stream one (the paper's last stage) or back, with that
mode's default chunk lengths.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..checkpoint import LoadedModel, _load_backbone, load_model
from ..errors import CheckpointError
from ..omniflatten import OmniFlatten
from ..vocab import Vocabulary

__all__ = ["load_start_model", "copy_text_tokenizer", "TEXT_TOKENIZER_FILES"]

# What a Hugging Face folder ships for its text tokenizer; the data builder reads
# backbone/tokenizer.json (text.py), so a trained model folder carries them along.
TEXT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                        "special_tokens_map.json")


def _from_backbone(backbone: Path, codec: Path) -> LoadedModel:
    parts = load_model(codec, device="cpu")
    cfg_path = backbone / "config.json"
    try:
        text_size = int(json.loads(cfg_path.read_text())["vocab_size"])
    except FileNotFoundError:
        raise CheckpointError(cfg_path, "not a Hugging Face model folder (config.json is missing)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(cfg_path, f"no readable vocab_size ({exc})") from None
    config = parts.model.config.with_(backbone="backbone", text_vocab_size=text_size)
    vocab = Vocabulary(config.text_size, config.speech_codebook_size)
    qwen = _load_backbone(backbone, vocab)
    try:
        model = OmniFlatten(config, qwen, vocab, "cpu")
    except ValueError as exc:
        raise CheckpointError(backbone, str(exc)) from None
    return LoadedModel(model, parts.tokenizer, parts.decoder)


def load_start_model(model: str | Path | None = None, backbone: str | Path | None = None,
                     codec: str | Path | None = None, mode: str | None = None) -> LoadedModel:
    if (model is None) == (backbone is None) or (backbone is None) != (codec is None):
        raise ValueError("start from --model FOLDER, or from --backbone QWEN2_FOLDER with --codec MODEL_FOLDER")
    loaded = load_model(Path(model), device="cpu") if model is not None else _from_backbone(Path(backbone), Path(codec))
    m = loaded.model
    if mode is not None and mode != m.config.mode:
        config = m.config.with_(mode=mode, user_chunk=None, text_chunk=None, speech_chunk=None)
        loaded = LoadedModel(OmniFlatten(config, m.backbone, m.vocab, "cpu"), loaded.tokenizer, loaded.decoder)
    return loaded


def copy_text_tokenizer(source: Path, model_dir: Path) -> list[str]:
    """Copy the source backbone's text tokenizer files into MODEL/backbone/; their names."""
    copied = []
    for name in TEXT_TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, model_dir / "backbone" / name)
            copied.append(name)
    return copied
