"""`duplexline data prepare`: a manifest's audio and text through the model's own speech
tokenizer (the caller's channel streamed as on a call) and text tokenizer, once, into
shards that `duplexline train` reads (model/train/shards.py, docs/training.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_prepare_parser", "prepare"]


def add_prepare_parser(data_subparsers) -> argparse.ArgumentParser:
    parser = data_subparsers.add_parser(
        "prepare", help="tokenize a manifest's audio and text into training shards (resumable)",
        description="Run the model folder's speech tokenizer over the manifest's audio (the user channel "
        "streamed chunk by chunk as the engine does on a call, the rest whole) and its text tokenizer over "
        "the transcripts, and write shards; a second run keeps the finished ones.")
    parser.add_argument("manifest", metavar="MANIFEST", help="a manifest JSONL (e.g. data synth's manifest.jsonl)")
    parser.add_argument("--model", required=True, metavar="FOLDER",
                        help="the model folder whose tokenizers (and chunk clock) the shards are for")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="where the shards go")
    parser.add_argument("--shard-size", type=int, default=32, metavar="N", help="entries per shard (default 32)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch CPU threads (default 1: the streamed tokenizer's small steps run "
                        "fastest on one)")
    parser.set_defaults(func=prepare)
    return parser


def prepare(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import load_model
    from model.errors import CheckpointError, ConfigInvalid
    from model.train.shards import build_shards
    from model.train.text import text_tokenizer_for

    torch.set_num_threads(max(1, args.threads))
    try:
        loaded = load_model(args.model)
        if loaded.tokenizer is None:
            print(f"duplexline: {args.model} has no tokenizer/: nothing to tokenize the audio with", file=sys.stderr)
            return 2
        config = loaded.model.config
        backbone = Path(args.model) / str(config.backbone)
        index = build_shards(args.manifest, args.out, config, loaded.tokenizer,
                             text_tokenizer_for(config.text_size, backbone), shard_size=args.shard_size)
    except (CheckpointError, ConfigInvalid, ValueError, OSError) as exc:  # the data's errors are ValueErrors
        print(f"duplexline: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(index['shards'])} shards to {args.out}")
    return 0
