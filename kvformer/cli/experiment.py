"""``kvformer experiment``: norms, positions or attention kinds compared on equal budgets."""

from __future__ import annotations

import sys

from kvformer.tools.experiments import run_experiments


def run(args) -> int:
    run_experiments(args.which, out=args.out, steps=args.steps, work=args.work,
                    corpus_mb=args.corpus_mb, seed=args.seed, verbose=not args.quiet,
                    threads=args.threads,
                    command=" ".join(["kvformer", "experiment", *sys.argv[2:]])
                    if len(sys.argv) > 1 and sys.argv[1] == "experiment" else None)
    return 0
