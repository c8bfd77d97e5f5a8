"""The ``train`` and ``experiment`` verbs of the kvformer command.

``register(subparsers)`` adds both verbs to kvformer's argparse CLI; ``main()`` runs the train
verb on its own for ``python -m kvformer.train`` (and so for torchrun).
"""

from __future__ import annotations

import argparse
import os
import sys

from kvformer.errors import ArgumentParser, KvformerError

INTERRUPTED = 130  # the conventional status of a program stopped by Ctrl-C


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny",
                   help="model shape: a preset (tiny, gpt2, smollm2-135m, ...) or a config "
                        "JSON file (default: tiny); ignored with --init and --resume")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files, directories (searched for text files) or glob patterns")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run directory: token files, checkpoints, metrics.jsonl, loss.png, "
                        "and at the end the trained model in DIR/model")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in DIR (starts fresh if none)")
    p.add_argument("--seed", type=int, default=1337)
    g = p.add_argument_group("batches and optimisation")
    g.add_argument("--batch-size", type=int, default=16,
                   help="sequences per micro-batch over all processes (default 16)")
    g.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: min(128, the model's context))")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 1e-3; 5e-5 with --init)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the cosine ends at lr * this (default 0.1)")
    g.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps (default 10%% of --steps, at most 100)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast (CPU or GPU); weights and optimizer stay fp32")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=100,
                   help="steps between evaluations (0: only at the end)")
    g.add_argument("--eval-tokens", type=int, default=16384,
                   help="validation tokens per evaluation (default 16384)")
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the data held out for validation (default 0.05)")
    g.add_argument("--sample-tokens", type=int, default=64,
                   help="tokens of sample text generated at each evaluation (0: none)")
    g.add_argument("--save-every", type=int, default=250,
                   help="steps between checkpoints (0: only at the end and on Ctrl-C)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default 2)")
    g.add_argument("--log-every", type=int, default=10,
                   help="steps between lines in metrics.jsonl (default 10)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    g = p.add_argument_group("model and tokenizer")
    g.add_argument("--init", metavar="MODEL", default=None,
                   help="fine-tune this model (a .gguf, a model directory, or 'default') "
                        "with its own tokenizer")
    g.add_argument("--tokenizer", default=None, metavar="byte|MODEL",
                   help="'byte' (default from scratch) or a model whose tokenizer to use")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: torch's choice, one per core)")
    g.add_argument("--data-dir", default=None,
                   help="where the token files go (default DIR/data); runs on the same data "
                        "and tokenizer can share it")


def config_from_args(args):
    from kvformer.train.loop import TrainConfig

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


def cmd_train(args) -> int:
    from kvformer.train.loop import train

    result = train(config_from_args(args))
    if result.interrupted:
        return INTERRUPTED
    return 0


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=("norms", "positions", "attention", "all"),
                   help="which comparison to run")
    p.add_argument("--out", default="docs",
                   help="where experiments.md goes (plots go to OUT/img/exp_*.png); "
                        "default docs")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per model (default: the documented budget)")
    p.add_argument("--work", default=None,
                   help="directory for the runs (default: a temporary one, removed at the end)")
    p.add_argument("--corpus-mb", type=float, default=None,
                   help="megabytes of standard-library source to train on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: one per core; 1 is faster on a busy machine)")
    p.add_argument("--quiet", "-q", action="store_true")


def cmd_experiment(args) -> int:
    from kvformer.tools.experiments import run_experiments

    run_experiments(args.which, out=args.out, steps=args.steps, work=args.work,
                    corpus_mb=args.corpus_mb, seed=args.seed, verbose=not args.quiet,
                    threads=args.threads,
                    command=" ".join(["kvformer", "experiment", *sys.argv[2:]])
                    if len(sys.argv) > 1 and sys.argv[1] == "experiment" else None)
    return 0


def register(subparsers) -> None:
    """Add the ``train`` and ``experiment`` verbs to kvformer's argparse sub-commands."""
    t = subparsers.add_parser(
        "train", help="train a model from scratch or fine-tune one (also under torchrun)",
        description="Train a model on text files; Ctrl-C saves a checkpoint and --resume "
                    "continues exactly where it stopped. See docs/training.md.")
    add_train_arguments(t)
    t.set_defaults(func=cmd_train)
    e = subparsers.add_parser(
        "experiment", help="compare norms, positions or attention kinds on equal budgets",
        description="Train equal-size models on the Python standard library's source and "
                    "write docs/experiments.md with tables and plots.")
    add_experiment_arguments(e)
    e.set_defaults(func=cmd_experiment)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvformer.train``: the train verb's flags, without the verb."""
    parser = ArgumentParser(prog="python -m kvformer.train",
                                     description="Train a kvformer model (see docs/training.md)")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return INTERRUPTED
    except (KvformerError, ValueError, OSError) as exc:
        if os.environ.get("KVFORMER_DEBUG"):
            raise
        print(f"kvformer train: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
