"""``kvformer build``: compile the C++ kernels for this machine."""

from __future__ import annotations

import sys

from kvformer.cli.common import kernels_line
from kvformer.runtime import native


def run(args) -> int:
    try:
        path = native.build(force=args.force)
    except native.NativeBuildError as exc:
        print(f"kvformer build: {exc}", file=sys.stderr)
        return 1
    print(f"kvformer: native kernels in {path}")
    print(f"kvformer: {kernels_line()}")
    return 0
