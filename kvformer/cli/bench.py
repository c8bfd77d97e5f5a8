"""The ``kvformer bench`` verb (``kvformer.tools.bench.run`` measures and writes the report;
the flags are in ``kvformer.cli.flags``), and ``main()``, which runs it on its own for
benchmarks/bench.py."""

from __future__ import annotations

import sys

from kvformer.cli.flags import add_bench
from kvformer.errors import ArgumentParser
from kvformer.tools.bench import run as bench


def run(args) -> int:
    return bench.run(args)


def main(argv: list[str] | None = None) -> int:
    """``kvformer bench`` outside the kvformer command (benchmarks/bench.py)."""
    parser = ArgumentParser(prog="kvformer")
    add_bench(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run(args)
