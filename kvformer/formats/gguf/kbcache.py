"""The repacked form of a big GGUF file, kept on disk so that its next load maps it instead of
repacking it.

Loading a GGUF file with ``dtype="auto"`` moves every block-quantized matrix into the kb
layout (``kvformer.runtime.kb``): one pass over the file's bytes, about a second per GB on
two cores, plus the page faults of writing that much fresh memory. For a file whose kb
weights reach ``KVFORMER_KB_CACHE_MIN_MB`` (default 256 MB: a 1B model and up; the 135M
default model repacks in about 0.1 s and is never cached) the repacked bytes are written once
to ``<cache>/kb/<key>.kb`` and later loads map that file: the load then reads nothing but the
header, and the weights come in from the page cache as the first tokens touch them, as
llama.cpp's mmap does.

The key is the GGUF file's identity and content header: its absolute path, size, mtime (ns)
and a blake2b digest of everything before the tensor data (the metadata, the tokenizer and
the tensor table), with a digest of the layout's definition (``csrc/kernels.h``,
``csrc/repack.cpp``, ``blocks.py``), so a new layout never reads an old file. A file that was
replaced or touched gets a new key. The entry itself repeats the source's size, mtime and
digest, and every matrix's name, type and shape; any mismatch, a truncated or unreadable
entry, is a miss (the entry is deleted and rewritten), never an error.

``KVFORMER_KB_CACHE`` bounds the directory (GB, default 16; ``0`` turns the cache off): after
each write the least recently used entries are deleted until the rest fit. No entry is
written when the disk would keep less than 1 GB free. ``KVFORMER_CACHE`` moves the whole cache
(the native build and this).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import time
from pathlib import Path

import torch

from kvformer.fileio import cache_dir
from kvformer.runtime.kb import KbBlocks

__all__ = ["KbCache"]

log = logging.getLogger("kvformer.load")

_MAGIC = b"KVFKB001"
_ALIGN = 4096  # every buffer starts on a page: mapped as it is
_BUDGET_ENV, _MIN_ENV = "KVFORMER_KB_CACHE", "KVFORMER_KB_CACHE_MIN_MB"
_DEFAULT_BUDGET_GB, _DEFAULT_MIN_MB = 16.0, 256.0
_KEEP_FREE = 1 << 30
_HERE = Path(__file__).resolve().parent
_LAYOUT_SOURCES = (_HERE.parent.parent / "runtime" / "csrc" / "kernels.h",
                   _HERE.parent.parent / "runtime" / "csrc" / "repack.cpp",
                   _HERE / "blocks.py")
_layout_digest: str | None = None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number; using %s", name, raw, default)
        return default
    return max(value, 0.0)


def _layout() -> str:
    global _layout_digest
    if _layout_digest is None:
        h = hashlib.blake2b(digest_size=16)
        for p in _LAYOUT_SOURCES:
            h.update(p.read_bytes() if p.exists() else p.name.encode())
        _layout_digest = h.hexdigest()
    return _layout_digest


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _directory() -> Path:
    return cache_dir() / "kb"


class KbCache:
    """One GGUF file's entry: ``lookup()`` gives its stored matrices (or None), ``wanted()``
    says whether to keep this load's, ``store()`` writes them."""

    def __init__(self, f, names: dict[str, tuple[str, tuple[int, int]]]):
        """``f``: the open GGUFFile; ``names``: kvformer name -> (ggml type, [n, k]) of every
        matrix this load repacks."""
        self.f, self.names = f, names
        self.budget = _env_float(_BUDGET_ENV, _DEFAULT_BUDGET_GB) * 1e9
        self.enabled = self.budget > 0
        self.path: Path | None = None
        if not self.enabled:
            return
        st = os.stat(f.path)
        header = hashlib.blake2b(f.header_bytes(), digest_size=16).hexdigest()
        self.source = {"path": os.path.abspath(f.path), "size": st.st_size,
                       "mtime_ns": st.st_mtime_ns, "header": header, "layout": _layout()}
        key = hashlib.blake2b(json.dumps(self.source, sort_keys=True).encode(),
                              digest_size=12).hexdigest()
        self.path = _directory() / f"{key}.kb"

    def wanted(self, nbytes: int) -> bool:
        """Whether kb weights of ``nbytes`` are worth keeping."""
        return self.enabled and nbytes >= _env_float(_MIN_ENV, _DEFAULT_MIN_MB) * 1e6

    # ------------------------------------------------------------------------------ reading
    def lookup(self) -> dict[str, KbBlocks] | None:
        if not self.enabled or self.path is None or not self.path.is_file():
            return None
        try:
            found = self._read()
        except Exception as exc:  # any unreadable entry is a miss, rewritten by this load
            log.info("kb cache: %s is unusable (%s); repacking", self.path, exc)
            self._remove(self.path)
            return None
        os.utime(self.path)  # most recently used
        return found

    def _read(self) -> dict[str, KbBlocks]:
        with open(self.path, "rb") as fh:
            if fh.read(8) != _MAGIC:
                raise ValueError("not a kb cache entry")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 1 << 26:
                raise ValueError("index too large")
            index = json.loads(fh.read(n))
            size = os.fstat(fh.fileno()).st_size
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writable views
        if index.get("source") != self.source:
            raise ValueError("made from another file")
        if {k: (v["type"], tuple(v["shape"])) for k, v in index["tensors"].items()} != \
                {k: (t, tuple(s)) for k, (t, s) in self.names.items()}:
            raise ValueError("its matrices are not this load's")
        bases = []
        for offset, nbytes in index["bases"]:
            if offset % _ALIGN or offset + nbytes > size:
                raise ValueError("truncated")
            bases.append(torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset))
        out = {}
        for name, v in index["tensors"].items():
            q, s = (self._view(bases, *v[part]) for part in ("q", "s"))
            lut = None if v["lut"] is None else torch.tensor(v["lut"], dtype=torch.uint8)
            out[name] = KbBlocks(q, s, v["bits"], v["scales"], lut, v["type"], v["zero"])
        return out

    @staticmethod
    def _view(bases, base: int, offset: int, shape: list[int]) -> torch.Tensor:
        b = bases[base]
        n = 1
        for d in shape:
            n *= d
        if offset < 0 or offset + n > b.numel():
            raise ValueError("a matrix outside its buffer")
        return b[offset:offset + n].view(*shape)

    # ------------------------------------------------------------------------------ writing
    def store(self, got: list[tuple[str, KbBlocks]]) -> None:
        """Write this load's matrices (parts of one buffer stay one buffer, so a fused
        layer's parts are adjacent again when mapped). Failures only log."""
        try:
            self._write(got)
        except OSError as exc:
            log.info("kb cache: not written (%s)", exc)

    def _write(self, got: list[tuple[str, KbBlocks]]) -> None:
        bases: dict[int, tuple[int, torch.Tensor]] = {}
        tensors = {}

        def place(t: torch.Tensor) -> list:
            st = t.untyped_storage()
            if st.data_ptr() not in bases:
                whole = torch.empty(0, dtype=torch.uint8).set_(st, 0, (st.nbytes(),))
                bases[st.data_ptr()] = (len(bases), whole)
            return [bases[st.data_ptr()][0], t.storage_offset(), list(t.shape)]

        for name, b in got:
            if not (b.q.is_contiguous() and b.s.is_contiguous()):
                return
            tensors[name] = {"q": place(b.q), "s": place(b.s), "bits": b.bits,
                             "scales": b.scales, "zero": b.zero, "type": b.ggml_type,
                             "shape": list(self.names[name][1]),
                             "lut": None if b.lut is None else b.lut.tolist()}
        order = sorted(bases.values())
        index = {"source": self.source, "tensors": tensors, "bases": []}
        start = _ALIGN
        while True:  # the index's length depends on the offsets, which depend on where it ends
            offsets, at = [], start
            for _, whole in order:
                offsets.append([at, whole.numel()])
                at = _aligned(at + whole.numel())
            index["bases"] = offsets
            raw = json.dumps(index).encode()
            if 16 + len(raw) <= start:
                break
            start = _aligned(16 + len(raw))
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(directory).free < at + _KEEP_FREE:
            log.info("kb cache: %s has too little free space for %.1f GB", directory, at / 1e9)
            return
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(_MAGIC + struct.pack("<Q", len(raw)) + raw)
                for (offset, _), (_, whole) in zip(offsets, order):
                    fh.seek(offset)
                    fh.write(memoryview(whole.numpy()))
                fh.truncate(at)
            os.replace(tmp, self.path)
        finally:
            self._remove(tmp)
        self._evict()

    def _evict(self) -> None:
        """Delete the least recently used entries (and stale temporary files) until the
        directory fits the budget; the entry just written is kept."""
        entries = []
        for p in self.path.parent.iterdir():
            try:
                st = p.stat()
            except OSError:
                continue
            if p.suffix.startswith(".tmp"):  # a write that never finished, an hour ago
                if st.st_mtime < time.time() - 3600:
                    self._remove(p)
                continue
            if p.suffix == ".kb":
                entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.budget:
                break
            if p != self.path:
                self._remove(p)
                total -= size

    @staticmethod
    def _remove(p: Path) -> None:
        try:
            p.unlink()
        except OSError:
            pass
