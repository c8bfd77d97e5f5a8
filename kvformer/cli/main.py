"""The `kvformer` command: one verb per job."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

from kvformer import __version__
from kvformer.cli import flags
from kvformer.cli.prompt import read_prompt
from kvformer.cli.status import StatusLine
from kvformer.errors import ArgumentParser, KvformerError

# verb: the module whose run(args) runs it, imported once the command line has parsed (and
# the status line shows), so that --help and a mistyped flag need no torch
VERBS = {
    "generate": "kvformer.cli.generate",
    "chat": "kvformer.cli.chat",
    "info": "kvformer.cli.info",
    "models": "kvformer.cli.models",
    "kv-size": "kvformer.cli.kv_size",
    "attention": "kvformer.cli.attention",
    "explain": "kvformer.cli.explain",
    "build": "kvformer.cli.build",
    "serve": "kvformer.cli.serve",
    "train": "kvformer.cli.train",
    "experiment": "kvformer.cli.experiment",
    "bench": "kvformer.cli.bench",
}


class _Version(argparse.Action):
    """--version, with torch's version read from its package metadata (importing torch
    takes ~2 s)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, help="show the versions and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            torch_version = version("torch")
        except PackageNotFoundError:
            torch_version = "not installed"
        print(f"kvformer {__version__} (torch {torch_version}, "
              f"Python {platform.python_version()})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="kvformer", description=__doc__)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    flags.add_generate(sub)
    flags.add_chat(sub)
    flags.add_info(sub)
    flags.add_models(sub)
    flags.add_kv_size(sub)
    flags.add_attention(sub)
    flags.add_explain(sub)
    flags.add_build(sub)
    flags.add_serve(sub)
    flags.add_train(sub)
    flags.add_experiment(sub)
    flags.add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if sys.stderr is None:  # started with `2>&-`: messages go nowhere, answers still out
        sys.stderr = open(os.devnull, "w")  # kept open for the life of the process
    if sys.stdout is None:  # started with `>&-`
        print("kvformer: error: standard output is closed, so there is nowhere to write; "
              "send it to a file or a pipe (e.g. > answer.txt)", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    # A verb that loads a model says so at once: importing torch alone takes a second or two.
    args.status = StatusLine(enabled=hasattr(args, "model") and hasattr(args, "quiet")
                             and not args.quiet)
    try:
        if getattr(args, "read_prompt_first", False):  # before torch: see cli/prompt.py
            args.prompt = read_prompt(args)
        args.status.show("starting (importing torch)")
        return importlib.import_module(VERBS[args.verb]).run(args)
    except KeyboardInterrupt:
        args.status.clear()
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (KvformerError, ValueError, OSError) as exc:
        if os.environ.get("KVFORMER_DEBUG"):
            raise
        message = " ".join(str(exc).split())
        args.status.clear()
        print(f"kvformer: error: {message}", file=sys.stderr)
        return 2
    finally:
        args.status.clear()


if __name__ == "__main__":
    sys.exit(main())
