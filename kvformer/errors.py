"""Errors a user can act on. Every message says what was wrong and what to do."""

import argparse
import sys


class KvformerError(Exception):
    """Base class: the CLI prints the message on one line and exits with status 2."""


class ContextOverflowError(KvformerError, ValueError):
    """A sequence would not fit in the context (model max_seq_len or the cache's max_len)."""


class CheckpointError(KvformerError):
    """A model file is missing, truncated, corrupt, or of a kind kvformer cannot read."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint describes an architecture kvformer does not implement."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """A model name or path could not be resolved to files on disk."""


class ChatTemplateError(KvformerError):
    """A chat template failed to render or tried to reach outside its sandbox."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line (what was wrong, where to look), not
    the usage block: ``kvformer generate: error: argument --dtype: invalid choice: ...``.
    Sub-command parsers made with ``add_subparsers`` are of this class too."""

    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)",
              file=sys.stderr)
        sys.exit(2)

