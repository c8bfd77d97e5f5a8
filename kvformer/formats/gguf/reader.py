"""The GGUF container: the header parser, the metadata, and each tensor's bytes.

The header is parsed here directly (``gguf.GGUFReader`` builds one numpy view per vocabulary
string and takes seconds on a 49k-token file); the file is memory-mapped and a tensor is
read as a view of its bytes, or decoded to floats by :mod:`kvformer.formats.gguf.dequant`.

Header layout (from the GGUF spec): magic ``GGUF``, u32 version (2 or 3), u64 tensor count,
u64 key/value count, then the key/values, then per tensor: name, u32 n_dims, u64 dims (ne0
first, i.e. reversed relative to torch), u32 ggml type, u64 offset relative to the data
section. The data section starts at the next multiple of ``general.alignment`` (default 32).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kvformer.errors import CheckpointError
from kvformer.formats.gguf.dequant import (
    _BLOCK_TYPES,
    _FLOAT_TYPES,
    SUPPORTED_TENSOR_TYPES,
    dequantize,
)

__all__ = ["GGUFFile", "GGUFTensorInfo", "open_reader", "read_metadata"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4


class _Truncated(Exception):
    pass


_SCALARS: dict[int, tuple[str, int]] = {  # GGUF value type -> (struct code, size)
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}
_NUMPY_OF: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
    10: "<u8", 11: "<i8", 12: "<f8",
}
_STRING, _ARRAY = 8, 9
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Arrays longer than this are no vocabulary and no per-layer list (the longest kvformer reads
# is a vocabulary's scores: ~256 K): their values are not made into Python objects
LONG_ARRAY = 1 << 20
# The metadata arrays kvformer reads besides its architecture's own ({arch}.*, per-layer
# lists): every other array stays in the file (``LongArray``), so that no key nothing reads
# can make a load cost more than the file (as Python ints or strings an array takes 10 to
# 60 times its bytes)
READ_ARRAYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                         "tokenizer.ggml.scores", "tokenizer.ggml.token_type"})


@dataclass(frozen=True)
class LongArray:
    """A metadata array left unread in the file: one under a key kvformer does not read, or
    of more than ``LONG_ARRAY`` values. ``dtype`` is numpy's name of its numbers, 'string'
    or 'array' (arrays of arrays)."""

    dtype: str
    count: int
    # where its first value is in the file, and GGUF's type of its values
    offset: int = dataclasses.field(default=0, repr=False, compare=False)
    item_type: int = dataclasses.field(default=0, repr=False, compare=False)

    def __len__(self) -> int:  # an empty one is false, as the list would be
        return self.count

    def __repr__(self) -> str:
        return f"<{self.count:,} values of {self.dtype}, not read>"


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(f"{what} needs {n} bytes at offset {self.pos} but the file has "
                             f"{self.size} bytes")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(what + " length")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, read: bool = True) -> Any:
        """The value at the cursor; an array only if ``read``, else a ``LongArray``."""
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            itype = self.u32(what + " item type")
            count = self.u64(what + " item count")
            if read and count <= LONG_ARRAY and itype != _ARRAY:
                return self.array(itype, count, what)
            return self.skip_array(itype, count, what)
        scalar = _SCALARS.get(vtype)
        if scalar is None:
            raise CheckpointError(f"{what} has unknown value type {vtype}")
        code, size = scalar
        self.need(size, what)
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return v

    def skip_array(self, itype: int, count: int, what: str) -> LongArray:
        """Step over an array's values (arrays of arrays too, however deep, without
        recursion), making none of them; what stands for it is a ``LongArray``."""
        dtype = (np.dtype(_NUMPY_OF[itype]).str if itype in _NUMPY_OF else
                 "string" if itype == _STRING else "array" if itype == _ARRAY else None)
        if dtype is None:
            raise CheckpointError(f"{what} is an array of unknown value type {itype}")
        skipped = LongArray(dtype, count, self.pos, itype)
        todo = [(itype, count)]
        while todo:
            itype, left = todo.pop()
            if itype in _NUMPY_OF:
                size = left * np.dtype(_NUMPY_OF[itype]).itemsize
                self.need(size, what)
                self.pos += size
            elif itype == _STRING:
                self.need(left * 8, what)  # every string has at least its 8-byte length
                for _ in range(left):
                    n = self.u64(what + " string length")
                    self.need(n, what + " string")
                    self.pos += n
            elif itype == _ARRAY:
                if left:
                    todo.append((_ARRAY, left - 1))  # the rest, after this one
                    inner = self.u32(what + " item type")
                    todo.append((inner, self.u64(what + " item count")))
            else:
                raise CheckpointError(f"{what} is an array of unknown value type {itype}")
        return skipped

    def array(self, itype: int, count: int, what: str) -> list:
        if itype in _NUMPY_OF:
            dt = np.dtype(_NUMPY_OF[itype])
            self.need(count * dt.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += count * dt.itemsize
            return arr.tolist()
        if itype == _STRING:
            self.need(count * 8, what)  # every string has at least its 8-byte length
            buf, pos, size = self.buf, self.pos, self.size
            out = []
            append = out.append
            unpack = _U64.unpack_from
            for _ in range(count):
                if pos + 8 > size:
                    self.pos = pos
                    self.need(8, what + " string length")
                (n,) = unpack(buf, pos)
                pos += 8
                raw = buf[pos:pos + n]
                if len(raw) != n:  # the string runs past the end of the file
                    self.pos = pos
                    self.need(n, what + " string")
                try:
                    append(raw.decode())
                except UnicodeDecodeError:
                    append(raw.decode("utf-8", errors="replace"))
                pos += n
            self.pos = pos
            return out
        raise CheckpointError(f"{what} is an array of unknown value type {itype}")


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type_id: int  # ggml type number (see gguf.GGMLQuantizationType)
    shape: tuple[int, ...]  # torch order: the GGUF dims reversed
    offset: int  # absolute byte offset in the file
    nbytes: int | None  # None for a type this module does not know the size of

    @property
    def type_name(self) -> str:
        return _type_name(self.type_id)

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _type_name(type_id: int) -> str:
    known = _BLOCK_TYPES.get(type_id) or _FLOAT_TYPES.get(type_id)
    if known is not None:  # the types kvformer reads
        return known[0]
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"unknown type {type_id}"


def _block_sizes(type_id: int) -> tuple[int, int] | None:
    """(elements per block, bytes per block) of a ggml type, None if unknown."""
    if type_id in _BLOCK_TYPES:
        _, block, size, _ = _BLOCK_TYPES[type_id]
        return block, size
    if type_id in _FLOAT_TYPES:
        return 1, _FLOAT_TYPES[type_id][1].itemsize
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return None


class GGUFFile:
    """A GGUF file opened for reading: ``metadata`` (dict) and ``tensors`` (name -> info).

    The file is memory-mapped read-only: :meth:`raw` views its bytes without copying (the views
    must never be written to; every decoder here allocates its output). Use as a context
    manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise CheckpointError(f"{self.path}: no such GGUF file")
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: is not a regular file (expected a .gguf file)")
        self.file_size = os.path.getsize(self.path)
        if self.file_size == 0:
            raise CheckpointError(f"{self.path}: the file is empty (0 bytes), not a GGUF file; "
                                  "download or convert it again")
        try:
            with open(self.path, "rb") as fh:
                self._mm: mmap.mmap | None = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot open ({exc})") from exc
        try:
            self._parse()
        except _Truncated as exc:
            self.close()
            raise CheckpointError(
                f"{self.path}: the GGUF header is truncated or corrupt ({exc}); "
                "download or convert the file again") from exc
        except CheckpointError as exc:
            self.close()
            raise CheckpointError(f"{self.path}: {exc}") from None
        except Exception as exc:  # anything unforeseen in a corrupt header
            self.close()
            raise CheckpointError(
                f"{self.path}: not a readable GGUF file ({type(exc).__name__}: {exc}); "
                "the file may be truncated or corrupt") from exc

    # -- parsing ---------------------------------------------------------------------------
    def _parse(self) -> None:
        cur = _Cursor(self._mm, self.file_size)
        cur.need(4, "magic")
        magic = bytes(self._mm[0:4])
        if magic != GGUF_MAGIC:
            raise CheckpointError(
                f"not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})")
        cur.pos = 4
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 16) in range(1, 0x100):
                raise CheckpointError("big-endian GGUF files are not supported")
            raise CheckpointError(
                f"GGUF version {version} is not supported (readable versions: "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
        self.version = version
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("key/value count")
        # Each key/value takes >= 13 bytes and each tensor info >= 24: refuse absurd counts early.
        if n_kv * 13 + n_tensors * 24 > self.file_size:
            raise CheckpointError(
                f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than a "
                f"{self.file_size}-byte file can hold; the header is corrupt")
        meta: dict[str, Any] = {}
        for k in range(n_kv):
            key = cur.string(f"metadata key #{k}")
            vtype = cur.u32(f"type of metadata {key!r}")
            if key in meta:
                raise CheckpointError(f"metadata key {key!r} appears twice; the file is corrupt")
            meta[key] = cur.value(vtype, f"metadata {key!r}", read=key in READ_ARRAYS)
        self._read_architecture_arrays(meta, cur)
        self.metadata = meta

        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
                or alignment & (alignment - 1)):
            raise CheckpointError(f"general.alignment={alignment!r} is not a power of two")
        self.alignment = alignment

        infos: list[tuple[str, int, tuple[int, ...], int]] = []
        for t in range(n_tensors):
            name = cur.string(f"tensor #{t} name")
            n_dims = cur.u32(f"tensor {name!r} dimension count")
            if n_dims > MAX_DIMS:
                raise CheckpointError(
                    f"tensor {name!r} claims {n_dims} dimensions (GGUF allows at most "
                    f"{MAX_DIMS}); the file is corrupt")
            dims = [cur.u64(f"tensor {name!r} dimensions") for _ in range(n_dims)]
            type_id = cur.u32(f"tensor {name!r} type")
            rel = cur.u64(f"tensor {name!r} offset")
            infos.append((name, type_id, tuple(reversed(dims)), rel))
        pad = (-cur.pos) % alignment
        self.data_offset = cur.pos + pad

        tensors: dict[str, GGUFTensorInfo] = {}
        for name, type_id, shape, rel in infos:
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears twice; the file is corrupt")
            n = 1
            for s in shape:
                n *= s
            if n >= 1 << 62:
                raise CheckpointError(f"tensor {name!r} has absurd shape {list(shape)}; "
                                      "the file is corrupt")
            nbytes = None
            sizes = _block_sizes(type_id)
            if sizes is not None:
                block, type_size = sizes
                if shape and shape[-1] % block:
                    raise CheckpointError(
                        f"tensor {name!r}: row length {shape[-1]} is not a multiple of the "
                        f"{_type_name(type_id)} block size {block}; the file is corrupt")
                nbytes = n // block * type_size
            if rel % alignment:
                raise CheckpointError(f"tensor {name!r}: data offset {rel} is not aligned to "
                                      f"{alignment} bytes; the file is corrupt")
            tensors[name] = GGUFTensorInfo(name, type_id, shape, self.data_offset + rel, nbytes)
        self.tensors = tensors

    @staticmethod
    def _read_architecture_arrays(meta: dict[str, Any], cur: _Cursor) -> None:
        """Read the arrays under the architecture's own keys (per-layer lists), which the
        first pass left unread when it did not know the architecture yet; at most
        ``LONG_ARRAY`` values in all (a model has a few short ones)."""
        arch = meta.get("general.architecture")
        if not isinstance(arch, str):
            return
        budget, end = LONG_ARRAY, cur.pos
        for key, value in meta.items():
            if (key.startswith(arch + ".") and isinstance(value, LongArray)
                    and value.dtype not in ("array",) and value.count <= budget):
                cur.pos = value.offset
                meta[key] = cur.array(value.item_type, value.count, f"metadata {key!r}")
                budget -= value.count
        cur.pos = end

    # -- access ----------------------------------------------------------------------------
    def check_tensor_data(self, names=None) -> None:
        """Raise CheckpointError if any (named) tensor's bytes run past the end of the file."""
        for name in self.tensors if names is None else names:
            info = self.tensors[name]
            if info.nbytes is None:
                continue
            end = info.offset + info.nbytes
            if end > self.file_size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ({info.type_name}, shape {list(info.shape)}) "
                    f"needs bytes {info.offset}..{end} but the file ends at {self.file_size}; "
                    "the file is truncated — download or convert it again")

    def header_bytes(self) -> bytes:
        """Everything before the tensor data: the metadata and the tensor table."""
        if self._mm is None:
            raise CheckpointError(f"{self.path}: the GGUF file is closed")
        return bytes(self._mm[:min(self.data_offset, self.file_size)])

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes of one tensor as a uint8 tensor (a view of the mapped file)."""
        if self._mm is None:
            raise CheckpointError(f"{self.path}: the GGUF file is closed")
        info = self.tensors[name]
        if info.nbytes is None:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has {info.type_name}, which kvformer cannot "
                f"read; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}")
        self.check_tensor_data([name])
        if info.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        with warnings.catch_warnings():  # "buffer is not writable": we only ever read it
            warnings.simplefilter("ignore")
            return torch.frombuffer(self._mm, dtype=torch.uint8, count=info.nbytes,
                                    offset=info.offset)

    def drop_pages(self) -> None:
        """Tell the kernel the mapped file's pages are no longer needed here (what was read
        has been copied out), so they stop counting in the process's resident memory.
        Reading them again later still works."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, 0, len(self._mm))
        except (OSError, ValueError):  # advisory only
            pass

    def forget_metadata(self, prefix: str) -> None:
        """Drop the metadata entries whose keys start with ``prefix`` (e.g. the tokenizer's
        vocabulary, tens of thousands of strings, once the tokenizer is built)."""
        for key in [k for k in self.metadata if k.startswith(prefix)]:
            del self.metadata[key]

    def close(self) -> None:
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a tensor still views the mapping; let GC close it
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={getattr(self, 'version', '?')}, "
                f"tensors={len(getattr(self, 'tensors', {}))})")


def open_reader(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file (header parsed, tensors mapped lazily); failures are CheckpointError."""
    return GGUFFile(path)


def _field_value(field) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def read_metadata(path_or_reader) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (str, int, float, lists).

    Accepts a path, a :class:`GGUFFile`, or a ``gguf.GGUFReader``.
    """
    if isinstance(path_or_reader, (str, os.PathLike)):
        with GGUFFile(path_or_reader) as f:
            return dict(f.metadata)
    if isinstance(path_or_reader, GGUFFile):
        return dict(path_or_reader.metadata)
    reader = path_or_reader  # a gguf.GGUFReader
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = _field_value(field)
        except Exception as exc:
            raise CheckpointError(
                f"{getattr(reader, 'path', '?')}: metadata field {key!r} is unreadable ({exc}); "
                "the file may be corrupt") from exc
    return meta


# One tensor decoded to ``dtype``: config.py reads the rotary factor tensors with it,
# tensors.py the weights.
def _load_one(f: GGUFFile, info: GGUFTensorInfo, dtype: torch.dtype) -> torch.Tensor:
    if info.type_id not in _FLOAT_TYPES and info.type_id not in _BLOCK_TYPES:
        raise CheckpointError(
            f"{f.path}: tensor {info.name!r} has type {info.type_name}, which kvformer cannot "
            f"dequantize; supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}")
    raw = f.raw(info.name)
    try:
        return dequantize(raw, info.type_id, info.shape, dtype)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"{f.path}: tensor {info.name!r} ({info.type_name}, shape {list(info.shape)}) "
            f"could not be decoded ({exc}); the file may be corrupt") from exc
