"""Files: writing them so that a crash or Ctrl-C never leaves half of one behind, and
saying their sizes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, writer: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``writer(binary file)`` into a temporary file beside it, flush
    it to disk, then rename it over ``path``: readers see the old file or the new one whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                               dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def human_bytes(n: float) -> str:
    """A byte count for people: 512 B, 1.50 KiB, 2.25 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
