"""Where `generate`'s prompt comes from: the argument, -p/--prompt, -f/--file or stdin. Light
(no torch): ``kvformer.cli.main`` reads it before the verb's module is imported, so that a
terminal waiting on stdin says so at once instead of looking hung under the status line."""

from __future__ import annotations

import sys
from pathlib import Path

from kvformer.errors import KvformerError


def read_prompt(args) -> str:
    given = [name for name, value in (("the argument", args.prompt),
                                      ("-p/--prompt", args.prompt_flag),
                                      ("-f/--file", args.file)) if value is not None]
    if len(given) > 1:
        raise KvformerError(f"two prompts given ({' and '.join(given)}); give one")
    if args.prompt is not None:
        return _nonempty(args.prompt)
    if args.prompt_flag is not None:
        return _nonempty(args.prompt_flag)
    if args.file is not None and args.file != "-":
        path = Path(args.file).expanduser()
        try:
            return _nonempty(path.read_text(encoding="utf-8"), f" ({path} is empty)")
        except UnicodeDecodeError:
            raise KvformerError(f"-f {path}: not a UTF-8 text file") from None
    if sys.stdin is None:  # started with `<&-`
        raise KvformerError("no prompt: give it as an argument, with -p or -f, or on stdin "
                            "(which is closed)")
    if sys.stdin.isatty():
        print("kvformer: reading the prompt from stdin (Ctrl-D to end)", file=sys.stderr,
              flush=True)
    return _nonempty(sys.stdin.read())


def _nonempty(text: str, where: str = "") -> str:
    if not text:
        raise KvformerError(f"empty prompt{where}: give it as an argument, with -p or -f, "
                            "or on stdin")
    return text
