"""The ``kvformer train`` verb, and ``main()``, which runs it on its own for
``python -m kvformer.train`` (and so for torchrun). Its flags are in ``kvformer.cli.flags``.
"""

from __future__ import annotations

import os
import sys

from kvformer.cli import experiment
from kvformer.cli.flags import add_experiment, add_train, add_train_arguments
from kvformer.errors import ArgumentParser, KvformerError
from kvformer.train.config import TrainConfig
from kvformer.train.loop import train

INTERRUPTED = 130  # the conventional status of a program stopped by Ctrl-C


def config_from_args(args) -> TrainConfig:
    return TrainConfig(
        config=args.config, data=list(args.data), out=args.out, steps=args.steps,
        resume=args.resume, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len,
        lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
        weight_decay=args.weight_decay, grad_accum=args.grad_accum, grad_clip=args.grad_clip,
        eval_every=args.eval_every, eval_tokens=args.eval_tokens, save_every=args.save_every,
        log_every=args.log_every, keep=args.keep, bf16=args.bf16, init=args.init,
        tokenizer=args.tokenizer, val_fraction=args.val_fraction,
        sample_tokens=args.sample_tokens, device=args.device, threads=args.threads,
        data_dir=args.data_dir, progress=False if args.no_progress else None,
        verbose=not args.quiet)


def run(args) -> int:
    result = train(config_from_args(args))
    if result.interrupted:
        return INTERRUPTED
    return 0


def register(subparsers) -> None:
    """Add the ``train`` and ``experiment`` verbs to another argparse command, each with its
    runner as ``args.func`` (the ``kvformer`` command runs them by name instead)."""
    add_train(subparsers).set_defaults(func=run)
    add_experiment(subparsers).set_defaults(func=experiment.run)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvformer.train``: the train verb's flags, without the verb."""
    parser = ArgumentParser(prog="python -m kvformer.train",
                            description="Train a kvformer model (see docs/training.md)")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return INTERRUPTED
    except (KvformerError, ValueError, OSError) as exc:
        if os.environ.get("KVFORMER_DEBUG"):
            raise
        print(f"kvformer train: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
