"""`duplexline train`: the options, and a run from parsed arguments.

bridge/cli.py wires it (`add_arguments(parser)`, `run(args)`); without it, or under
torchrun, `python -m model.train.train_cli ARGS` runs the same:

    torchrun --nproc_per_node 8 -m model.train.train_cli --stage 3 --model M --data D --out O

`run(args, dataset=..., collate=...)` takes a dataset object instead of `--data`'s loader
(tests, or a caller with its own data).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch and the trainer load on run(): `duplexline --help` stays fast
    from .token_data import TokenDataset
    from .trainer import TrainConfig

__all__ = ["add_arguments", "run", "open_dataset", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", type=int, choices=(1, 2, 3), required=True,
                   help="1: ASR + TTS alignment; 2: half-duplex dialogue; 3: full duplex (the model's mode)")
    start = p.add_argument_group("starting point (one of)")
    start.add_argument("--model", metavar="FOLDER",
                       help="an OmniFlatten model folder (e.g. the previous stage's OUT/model)")
    start.add_argument("--backbone", metavar="QWEN2_FOLDER",
                       help="a Hugging Face Qwen2 folder: a new model from it, with --codec's speech parts")
    start.add_argument("--codec", metavar="FOLDER",
                       help="with --backbone: the model folder whose speech tokenizer, decoder and speech "
                       "settings to use")
    start.add_argument("--mode", choices=("three-stream", "two-stream"),
                       help="switch the model's full-duplex layout (stage 3: three-stream first, then two-stream)")
    p.add_argument("--data", metavar="PATH", required=True,
                   help="a shard folder (model/train/shards.py; samples built for --stage) or a JSONL file of "
                   "{\"input_ids\": [...], \"loss_mask\": [...]} lines")
    p.add_argument("--out", metavar="FOLDER", required=True,
                   help="writes checkpoints/, train_log.jsonl, tensorboard/ and the final model folder OUT/model")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest sample in tokens, for shard data (default: the model's context_length)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5, the paper's)")
    o.add_argument("--min-lr-ratio", type=float, default=0.0, help="the cosine's floor, as a share of --lr (default 0)")
    o.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 3%% of the run)")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    o.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per process (default 1)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    o.add_argument("--clip", type=float, default=1.0, help="max gradient norm; 0: off (default 1.0)")
    o.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1; the paper: 5)")
    o.add_argument("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    o.add_argument("--seed", type=int, default=0, help="data order and any randomness (default 0)")
    o.add_argument("--no-shuffle", action="store_true", help="read the data in order")
    r = p.add_argument_group("run")
    r.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps, and at the end (default 500)")
    r.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
    r.add_argument("--log-every", type=int, default=1, help="a train_log.jsonl line every N steps (default 1)")
    r.add_argument("--resume", action="store_true",
                   help="continue from OUT's latest checkpoint (same data and settings)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available (under torchrun, GPU LOCAL_RANK)")
    r.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU (bf16 there too when asked); weights stay fp32")
    r.add_argument("--fsdp", action="store_true", help="shard the model with PyTorch FSDP (torchrun, larger backbones)")
    r.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory, ~30%% slower")
    r.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core); on a small shared CPU use 1")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def open_dataset(path: str | Path, stage: int, config: Any,
                 max_length: int | None = None) -> tuple[TokenDataset, Callable]:
    """--data's dataset and its collate: a token JSONL file, or a shard folder's samples."""
    from ..vocab import Vocabulary
    from .token_data import DataError, TokenJsonlDataset, pad_collate

    path = Path(path)
    if path.is_file():
        with path.open() as f:
            first = next((line for line in f if line.strip()), "")
        if '"input_ids"' in first:
            vocab = Vocabulary(config.text_size, config.speech_codebook_size)
            return TokenJsonlDataset(path, vocab.size), pad_collate
        raise DataError(f"{path}: not a token file; for a manifest, build its shards first "
                        "(model/train/shards.py) and pass the shard folder")
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    from . import samples

    dataset = samples.TrainDataset(path, config, stage, max_length=max_length)
    if len(dataset) == 0:
        raise DataError(f"{path}: no stage-{stage} samples (stage 1 takes pairs or dialogue turns; 2 and 3 dialogues)")
    return dataset, samples.collate


def _config(args: argparse.Namespace, meta: dict[str, Any]) -> TrainConfig:
    from .trainer import TrainConfig

    bf16 = {"auto": None, "bf16": True, "fp32": False}[args.precision]
    return TrainConfig(
        out=Path(args.out), stage=args.stage, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, batch_size=args.batch_size,
        grad_accum=args.grad_accum, clip=args.clip, epochs=args.epochs, max_steps=args.max_steps,
        save_every=args.save_every, keep=args.keep, log_every=args.log_every, seed=args.seed,
        shuffle=not args.no_shuffle, resume=args.resume, device=args.device, bf16=bf16, fsdp=args.fsdp,
        grad_checkpointing=args.grad_checkpointing, num_workers=args.num_workers, progress=not args.no_progress,
        meta=meta)


def run(args: argparse.Namespace, dataset: TokenDataset | None = None, collate: Callable | None = None) -> int:
    import torch

    from ..errors import ModelError
    from .distributed import DistEnv
    from .start import copy_text_tokenizer, load_start_model
    from .token_data import DataError
    from .trainer import TrainError, train

    env = DistEnv.from_env(os.environ)
    say = print if env.is_main else (lambda *a, **k: None)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        loaded = load_start_model(args.model, args.backbone, args.codec, args.mode)
        if dataset is None:
            dataset, collate = open_dataset(args.data, args.stage, loaded.model.config, args.max_length)
        meta = {"started_from": str(args.model or args.backbone), "codec": args.codec, "data": str(args.data),
                "samples": len(dataset)}
        result = train(loaded, dataset, _config(args, meta), env, collate)
    except (ModelError, TrainError, DataError, ValueError) as exc:
        print(f"duplexline train: {exc}", file=sys.stderr)
        return 2
    if result.stopped:
        say(f"stopped after step {result.step} of {result.total_steps}; checkpoint in {args.out}/checkpoints: "
            "run the same command with --resume to continue")
        return 130
    if result.model_dir is not None:
        source = Path(args.backbone) if args.backbone else Path(args.model) / str(loaded.model.config.backbone)
        copy_text_tokenizer(source, result.model_dir)
        last = f"{result.losses[-1][1]:.4f}" if result.losses else "n/a"
        say(f"trained stage {args.stage} to step {result.step} (loss {last}, {result.tokens_per_s:.0f} tokens/s); "
            f"model folder: {result.model_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="duplexline train", description="Train an OmniFlatten model (one stage).")
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
