"""A speech tokenizer for models trained without CosyVoice's weights: a tiny S3 (v1)
network whose codes follow what a frame sounds like, with a codebook fitted to the data.

A randomly initialised tiny S3 tokenizer is a poor stand-in for the real one: its conv
features are small beside the encoder's sinusoidal positions, so after the L2
normalisation a frame's code mostly says where in the window it is, and a caller's
speech and the line noise between words share codes (measured on synthesised dialogues:
the majority label per code predicts "the caller is speaking" 69% of the time, barely
above the 66% of always answering "no"). A model cannot learn when to take its turn from
codes that do not say when the caller stops.

`content_front_end` makes content win: conv2's output is scaled up (positions then
become a small offset) and the transformer blocks pass their input through (their
residual branches' output layers are zeroed), so a code sees 5 mel frames (about 50 ms).
`fit_codebook` then places the codebook by spherical k-means on those normalised
features of the training audio. Measured: 89% on the same data, the accuracy of the best
single energy threshold (88%). Both keep the official layout and state dict, so the
tokenizer saves, loads and streams like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..s3_tokenizer import S3Tokenizer

__all__ = ["content_front_end", "fit_codebook", "frame_features", "manifest_signals"]


@torch.no_grad()
def content_front_end(tokenizer: S3Tokenizer, scale: float = 150.0) -> S3Tokenizer:
    """Scale conv2 by `scale` and make every block the identity, in place."""
    if tokenizer.config.version != "v1":
        raise ValueError(f"only v1's Euclidean codebook can be fitted, not {tokenizer.config.version}")
    encoder = tokenizer.model.encoder
    encoder.conv2.weight.mul_(scale)
    encoder.conv2.bias.mul_(scale)
    for block in encoder.blocks:
        for layer in (block.attn.out, block.mlp[2]):
            layer.weight.zero_()
            layer.bias.zero_()
    return tokenizer


@torch.inference_mode()
def frame_features(tokenizer: S3Tokenizer, pcm16k: np.ndarray) -> torch.Tensor:
    """The unit vectors the quantiser searches, one per code: (codes, width)."""
    c = tokenizer.config
    window = int(c.max_seconds * c.sample_rate) - c.sample_rate  # below the position table
    pieces = []
    for start in range(0, len(pcm16k), window):
        mel = tokenizer.log_mel(pcm16k[start:start + window])
        if mel.shape[1] < 3:
            continue
        hidden, _ = tokenizer.model.encoder(mel[None].to(tokenizer.device, tokenizer.dtype),
                                            torch.tensor([mel.shape[1]], device=tokenizer.device))
        pieces.append(F.normalize(hidden[0].float(), dim=-1).cpu())
    return torch.cat(pieces) if pieces else torch.zeros(0, c.width)


@torch.no_grad()
def fit_codebook(tokenizer: S3Tokenizer, signals: Iterable[np.ndarray], iterations: int = 25, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> S3Tokenizer:
    """Spherical k-means of the frames of `signals` (16 kHz float) into the codebook, in
    place: for unit rows, the quantiser's nearest row by Euclidean distance is the one of
    largest dot product, so the fitted centres are unit means. A centre left empty takes
    a random frame, so every code stays in use."""
    frames = torch.cat([frame_features(tokenizer, pcm) for pcm in signals])
    size = tokenizer.config.codebook_size
    if len(frames) < size:
        raise ValueError(f"{len(frames)} frames cannot place {size} codes; give more audio")
    generator = torch.Generator().manual_seed(seed)
    centres = frames[torch.randperm(len(frames), generator=generator)[:size]].clone()
    for i in range(iterations):
        nearest = (frames @ centres.T).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, frames)
        empty = torch.bincount(nearest, minlength=size) == 0
        spare = frames[torch.randint(len(frames), (size,), generator=generator)]
        centres = torch.where(empty[:, None], spare, F.normalize(sums, dim=-1))
        if progress:
            progress(f"k-means {i + 1}/{iterations}: {int(empty.sum())} empty codes")
    tokenizer.model.quantizer._codebook.embed.copy_(centres)
    return tokenizer


def manifest_signals(manifest: str | Path, limit: int, sample_rate: int = 16000) -> Iterator[np.ndarray]:
    """The audio of a training manifest's first `limit` entries: both channels of a
    dialogue (the caller's codes and the assistant's come from one codebook), a pair's
    one utterance."""
    from .audio import read_channels
    from .manifest import DialogueEntry, read_manifest

    for entry in read_manifest(manifest)[:limit]:
        if not isinstance(entry, DialogueEntry):
            yield read_channels(manifest, entry.audio, sample_rate)[0]
            continue
        files: dict[str, np.ndarray] = {}  # a stereo file is read once for both channels
        for path, column in ((entry.user_audio, entry.user_channel), (entry.assistant_audio, entry.assistant_channel)):
            if path not in files:
                files[path] = read_channels(manifest, path, sample_rate)
            yield files[path][column or 0]
