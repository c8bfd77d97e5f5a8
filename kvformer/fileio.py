"""Files: writing them so that a crash or Ctrl-C never leaves half of one behind, and
saying their sizes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def cache_dir() -> Path:
    """kvformer's own files on this machine: $KVFORMER_CACHE, else kvformer under
    $XDG_CACHE_HOME, else ~/.cache/kvformer (the native build lives there too)."""
    root = os.environ.get("KVFORMER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvformer")
    return Path(root)


def umask() -> int:
    """This process's umask (read without changing it where Linux says it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back
    os.umask(mask)
    return mask


def usual_mode(directory: bool = False) -> int:
    """The permissions a plain open() or mkdir() would give: tempfile's private 0600 and
    0700 would keep a shared models directory or a server under another user out."""
    return (0o777 if directory else 0o666) & ~umask()


def write_atomic(path: str | os.PathLike, writer: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``writer(binary file)`` into a temporary file beside it, flush
    it to disk, then rename it over ``path``: readers see the old file or the new one whole.
    The file gets the permissions of the one it replaces, else the umask's (as open())."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = usual_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                               dir=path.parent if str(path.parent) else ".")
    try:
        if hasattr(os, "fchmod"):  # not on Windows, where there is no umask to follow
            os.fchmod(fd, mode)
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
