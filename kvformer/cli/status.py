"""The status line: one line on stderr while nothing else shows. Light (no torch), so that
``kvformer.cli.main`` shows it before a verb's module, and torch with it, is imported."""

from __future__ import annotations

import shutil
import sys


class StatusLine:
    """One line on stderr saying what is happening while nothing else shows (building the
    kernels, loading, reading a long prompt), rewritten in place and wiped before anything
    else is written. Only on a terminal (a log file gets none), and not with --quiet."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.shown = False

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        width = shutil.get_terminal_size().columns - 1
        line = f"kvformer: {text}..."
        if len(line) > width:  # a wrapped line could not be wiped with \r
            line = line[:max(0, width - 3)] + "..."
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def plural(n: int, word: str) -> str:
    """'1 token', '2 tokens', '1,024 tokens'."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"
