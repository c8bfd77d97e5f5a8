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
    Sub-command parsers made with ``add_subparsers`` are of this class too. Abbreviated long
    options are not taken (``--n`` is not ``--no-cache``), and a flag a verb does not know
    is reported by that verb's parser, pointing to its own --help."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self._chosen(parsed).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def _chosen(self, parsed) -> argparse.ArgumentParser:
        """The innermost sub-command parser the command line chose."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest, None))
                if chosen is not None:
                    return chosen._chosen(parsed) if isinstance(chosen, ArgumentParser) \
                        else chosen
        return self

    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)",
              file=sys.stderr)
        sys.exit(2)

