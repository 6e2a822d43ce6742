"""The `duplexline` command: the composition root, the only place that reads the
environment. Subcommands: `serve` (the bridge), `worker` (an engine worker for bridges'
calls), `dial` (place a call through a running bridge), `model init` (write a tiny model),
`data synth` / `data prepare` (training data), `train`, `eval turns` (docs/training.md)."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ConfigError
from .process import configure_logging
from .settings import add_serve_arguments, settings_from
from .data_prepare import add_prepare_parser
from .data_synth import add_synth_parser
from .sip.dial_cli import add_dial_parser
from .worker_cli import add_worker_parser

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duplexline",
        description="Full-duplex speech language model (OmniFlatten) on the phone line.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run the bridge: answer SIP and WebRTC calls",
                           description="Run the bridge. Every option also reads a "
                           "DUPLEXLINE_* environment variable; a flag wins.")
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    add_worker_parser(sub)
    add_dial_parser(sub)

    model = sub.add_parser("model", help="model files: write a tiny model for demos and tests")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    init = model_sub.add_parser("init", help="write a randomly initialised OmniFlatten model folder",
                                description="Write a model folder (config.json, backbone in "
                                "Hugging Face format, codec files). Untrained: for demos and tests.")
    init.add_argument("out", metavar="OUT", help="folder to create (must not exist or be empty)")
    init.add_argument("--tiny", action="store_true", required=True,
                      help="a tiny configuration (the only size offered: no weights are public)")
    init.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    init.add_argument("--decoder", choices=("v1", "v2"), default=None,
                      help="tiny random CosyVoice flow + HiFT decoder files in the official layout: v1 (50 Hz "
                      "codes, 22.05 kHz) or v2 (25 Hz, 6561 codes, 24 kHz); default: the stand-in tone decoder")
    init.add_argument("--layers", type=int, default=2, help="backbone layers (default 2)")
    init.add_argument("--width", type=int, default=64, help="backbone width, a multiple of 32 (default 64)")
    init.add_argument("--codebook", type=int, default=None, metavar="N",
                      help="speech codes (default 4096; not with --decoder, whose family fixes them)")
    init.add_argument("--fit-codebook", metavar="MANIFEST", default=None,
                      help="fit the tokenizer to a training manifest's audio, so its codes follow the sound, not "
                      "the frame's position (docs/training.md, \"The demo model\")")
    init.add_argument("--fit-entries", type=int, default=100, metavar="N",
                      help="manifest entries --fit-codebook reads (default 100)")
    init.set_defaults(func=_model_init)

    data = sub.add_parser("data", help="training data: synthetic phone dialogues, tokenized shards")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    add_synth_parser(data_sub)
    add_prepare_parser(data_sub)

    from model.train import train_cli  # light: torch loads inside run()

    train = sub.add_parser("train", help="train one stage of an OmniFlatten model (docs/training.md)",
                           description="Plain torch training of one stage (1: ASR/TTS, 2: half duplex, 3: full "
                           "duplex) from a model folder, or a Qwen2 folder plus a codec model folder; "
                           "checkpoints and --resume; torchrun for several GPUs (docs/training.md).")
    train_cli.add_arguments(train)
    train.set_defaults(func=_train)

    from model.train.eval_turns import add_eval_parser

    evaluate = sub.add_parser("eval", help="evaluate a model folder: turn-taking through the streaming engine")
    eval_sub = evaluate.add_subparsers(dest="eval_command", metavar="ACTION", required=True)
    add_eval_parser(eval_sub)
    return parser


def _serve(args: argparse.Namespace) -> int:
    settings = settings_from(args, os.environ)
    configure_logging(settings.log_level)
    from .server import run_server

    return run_server(settings)


def _model_init(args: argparse.Namespace) -> int:
    configure_logging("INFO")
    from model.checkpoint import write_tiny_model

    from model.errors import CheckpointError

    try:
        path = write_tiny_model(args.out, seed=args.seed, decoder=args.decoder, layers=args.layers,
                                width=args.width, codebook_size=args.codebook, fit_manifest=args.fit_codebook,
                                fit_entries=args.fit_entries)
    except (CheckpointError, ValueError) as exc:  # a manifest's or audio file's error is a ValueError
        print(f"duplexline model init: {exc}", file=sys.stderr)
        return 2
    which = f"tiny random CosyVoice {args.decoder} decoder" if args.decoder else "stand-in tone decoder"
    fitted = f", tokenizer fitted to {args.fit_codebook}" if args.fit_codebook else ""
    print(f"wrote a tiny, untrained OmniFlatten model to {path} ({which}{fitted})")
    return 0


def _train(args: argparse.Namespace) -> int:
    configure_logging("INFO")
    from model.train import train_cli

    return train_cli.run(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"duplexline: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
