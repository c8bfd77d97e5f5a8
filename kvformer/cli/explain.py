"""``kvformer explain``: the seed's ideas measured, as pictures."""

from __future__ import annotations

from kvformer.cli.common import set_threads
from kvformer.tools import explain


def run(args) -> int:
    set_threads(args)
    return explain.run(args.topic, args.output, args.model)
