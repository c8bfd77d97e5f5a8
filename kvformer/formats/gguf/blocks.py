"""GGUF block types as kb weights (``kvformer.runtime.kb``): the file's integers and scales,
moved, never rounded.

Each type's weight, as ggml defines it, and the kb form it takes (u: the unsigned integer
the kernels multiply; D, M: the scale and offset of its block):

    Q4_0    w = d (q - 8)                 u = q            D = d, zero 8            scale
    Q4_1    w = d q + m                   u = q            D = d, M = m             pair
    Q5_0    w = d (q - 16), q 5 bits      u = q            D = d, zero 16           scale
    Q5_1    w = d q + m, q 5 bits         u = q            D = d, M = m             pair
    Q8_0    w = d q, q int8               u = q + 128      D = d, zero 128          scale
    IQ4_NL  w = d v[q], v the int8 grid   u = lut[q] = v[q] + 128, zero 128         scale
    Q4_K    w = d sc q - dmin mn          u = q            super (d, dmin; sc, mn)
    Q5_K    the same, q 5 bits            u = q            super
    IQ4_XS  w = d (ls - 32) v[q]          u = lut[q]       superZ: sc = ls - 32, zero 128
    Q6_K    w = d sc (q - 32), sc per 16  u = q            super16 (M = -32 D)

The offsets ggml implies stay implied (M = -zero D, made by the kernels in fp32: exact), and
the products d sc of the super-block types are made in fp32 by the kernels, as ggml does.
"""

from __future__ import annotations

import numpy as np
import torch

from kvformer.errors import CheckpointError
from kvformer.runtime import native
from kvformer.runtime.kb import (
    PAIR,
    SCALE,
    SUPER,
    SUPER16,
    SUPERZ,
    KbBlocks,
    record_bytes,
    scale_bytes,
)

__all__ = ["KB_TYPES", "kb_buffers", "to_kb", "what_runs"]

IQ4_GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_LUT = torch.tensor([v + 128 for v in IQ4_GRID], dtype=torch.uint8)

# ggml type id -> (name, values per block, bytes per block)
KB_TYPES: dict[int, tuple[str, int, int]] = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 20: ("IQ4_NL", 32, 18), 23: ("IQ4_XS", 256, 136),
}

# rows repacked at a time: a few MB of temporaries whatever the matrix
_ROWS = 256


def what_runs(type_id: int, type_name: str, shape: tuple[int, ...]) -> str:
    """How dtype 'auto' runs one of a file's tensors (what ``kvformer info`` lists)."""
    if len(shape) != 2:
        return "numbers (norms, biases), in the activations' dtype"
    if type_id in (0, 1, 30):
        return "a dense matmul in the activations' dtype"
    if type_id not in KB_TYPES:
        return "no kernel: refused (--dtype int8 or int4 re-quantizes it)"
    if not kb_shape_ok(type_id, *shape):
        return "dequantized to a dense matmul (rows not in tiles of 16)"
    bits, scales, lut, _ = _FORM[type_name]
    if bits == 4 and scales == PAIR and not lut:
        return "the int4 kernel, the file's blocks as they are"
    kind = {PAIR: "a scale and offset per 32", SCALE: "a scale per 32",
            SUPER: "super-block scales", SUPERZ: "super-block scales",
            SUPER16: "a scale per 16"}[scales]
    return f"the kb kernel: {bits}-bit{' grid' if lut else ''} integers, {kind}"


def kb_shape_ok(type_id: int, n: int, k: int) -> bool:
    """Whether an [n, k] matrix of this type fits the kb layout (tiles of 16 rows)."""
    return type_id in KB_TYPES and n % 16 == 0 and k % KB_TYPES[type_id][1] == 0


def kb_buffers(type_id: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized (q, s) for an [n, k] matrix of this type in the kb layout (``to_kb``'s
    ``out``; the loader takes row slices of one pair for the parts of a fused layer)."""
    bits, scales, _, _ = _FORM[KB_TYPES[type_id][0]]
    q = torch.empty(n // 16, k // 32, record_bytes(bits), dtype=torch.uint8)
    s = torch.empty(n // 16, k // 32 * scale_bytes(scales), dtype=torch.uint8)
    return q, s


def to_kb(raw: torch.Tensor, type_id: int, shape: tuple[int, int], where: str = "",
          native_repack: bool = True,
          out: tuple[torch.Tensor, torch.Tensor] | None = None) -> KbBlocks:
    """The stored bytes of a GGUF matrix [n, k] (rows of blocks) as kb weights: by the C++
    repack (``csrc/repack.cpp``, one pass) where the native library is built, else (or with
    ``native_repack=False``) with numpy, a few hundred rows at a time. ``out``: the (q, s)
    to write (``kb_buffers``' shapes), else new tensors."""
    name, per, size = KB_TYPES[type_id]
    n, k = shape
    if not kb_shape_ok(type_id, n, k) or raw.numel() != n * k // per * size:
        raise CheckpointError(f"{where}{name} matrix {list(shape)} does not fit kvformer's "
                              "kb layout (rows in tiles of 16)")
    t, kb = n // 16, k // 32
    bits, scales, lut, zero = _FORM[name]
    if native_repack and native.available():
        try:
            q, s = torch.ops.kvformer_native.kb_repack(raw, type_id, n, k,
                                                       *(out or (None, None)))
        except RuntimeError as exc:
            raise CheckpointError(f"{where}{name} matrix {list(shape)}: "
                                  f"{str(exc).splitlines()[0].split(': ', 1)[-1]}") from None
        return KbBlocks(q, s, bits, scales, _LUT.clone() if lut else None, name, zero)
    q, s = out or (torch.empty(t, kb, record_bytes(bits), dtype=torch.uint8),
                   torch.empty(t, kb * scale_bytes(scales), dtype=torch.uint8))
    blocks = raw.numpy().reshape(n, k // per, size)
    qn, sn = q.numpy(), s.numpy()
    for r0 in range(0, n, _ROWS):
        r1 = min(n, r0 + _ROWS)
        with np.errstate(over="ignore"):
            u, sc = _SPLIT[name](blocks[r0:r1])
        if not all(np.isfinite(a.astype(np.float32)).all() for a in sc
                   if a.dtype == np.float16):
            raise CheckpointError(f"{where}{name} matrix {list(shape)} has scales that are "
                                  "not finite; the file is corrupt")
        qn[r0 // 16:r1 // 16] = _records(u, bits)
        sn[r0 // 16:r1 // 16] = _scales(sc, scales)
    return KbBlocks(q, s, bits, scales, _LUT.clone() if lut else None, name, zero)


# ------------------------------------------------------------------ u and scales per type
def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[.., 16] bytes -> [.., 32]: the low nibbles, then the high ones (ggml's order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """[.., 4] bytes (a little-endian u32) -> [.., 32]: bit j at j."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _split_q4_0(b):
    return _nibbles(b[..., 2:18]), (_f16(b[..., 0:2]),)


def _split_q4_1(b):
    return _nibbles(b[..., 4:20]), (_f16(b[..., 0:2]), _f16(b[..., 2:4]))


def _split_q5_0(b):
    return _nibbles(b[..., 6:22]) | (_bits32(b[..., 2:6]) << 4), (_f16(b[..., 0:2]),)


def _split_q5_1(b):
    u = _nibbles(b[..., 8:24]) | (_bits32(b[..., 4:8]) << 4)
    return u, (_f16(b[..., 0:2]), _f16(b[..., 2:4]))


def _split_q8_0(b):
    return b[..., 2:34] ^ np.uint8(0x80), (_f16(b[..., 0:2]),)


def _split_iq4_nl(b):
    return _nibbles(b[..., 2:18]), (_f16(b[..., 0:2]),)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 2) & 48)], axis=-1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 2) & 48)], axis=-1)
    return sc.astype(np.int8), mn.astype(np.int8)


def _split_q4_k(b):
    n, ns = b.shape[:2]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales(b[..., 4:16])
    qs = b[..., 16:144].reshape(n, ns, 4, 32)
    u = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, ns * 256)  # sub-block 2j, 2j+1
    return u, (d, dmin, sc, mn)


def _split_q5_k(b):
    n, ns = b.shape[:2]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales(b[..., 4:16])
    qh = b[..., 16:48]  # [n, ns, 32]: bit i of byte c -> sub-block i, column c
    qs = b[..., 48:176].reshape(n, ns, 4, 32)
    lo = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, ns, 8, 32)
    hi = (qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1
    return (lo | (hi << 4)).reshape(n, ns * 256), (d, dmin, sc, mn)


def _split_q6_k(b):
    n, ns = b.shape[:2]
    ql = b[..., 0:128].reshape(n, ns, 2, 1, 64)
    qh = b[..., 128:192].reshape(n, ns, 2, 1, 32)
    lo = (ql >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & 15
    hi = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 3
    u = lo.reshape(n, ns, 8, 32) | (hi.reshape(n, ns, 8, 32) << 4)
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8)  # [n, ns, 16]
    return u.reshape(n, ns * 256), (_f16(b[..., 208:210]), sc)


def _split_iq4_xs(b):
    n, ns = b.shape[:2]
    d = _f16(b[..., 0:2])
    sh = np.ascontiguousarray(b[..., 2:4]).view(np.uint16)  # [n, ns, 1]
    sl = b[..., 4:8]
    lo = np.stack([sl & 15, sl >> 4], axis=-1).reshape(n, ns, 8)
    hi = (sh >> (2 * np.arange(8, dtype=np.uint16))) & 3
    ls = (lo | (hi.astype(np.uint8) << 4)).astype(np.int16) - 32
    qs = b[..., 8:136].reshape(n, ns, 8, 16)
    u = np.concatenate([qs & 15, qs >> 4], axis=-1)  # [n, ns, 8, 32]
    return u.reshape(n, ns * 256), (d, ls.astype(np.int8))


_SPLIT = {"Q4_0": _split_q4_0, "Q4_1": _split_q4_1, "Q5_0": _split_q5_0, "Q5_1": _split_q5_1,
          "Q8_0": _split_q8_0, "IQ4_NL": _split_iq4_nl, "Q4_K": _split_q4_k,
          "Q5_K": _split_q5_k, "Q6_K": _split_q6_k, "IQ4_XS": _split_iq4_xs}

# name -> (bits, scales kind, lut, zero): csrc/repack.cpp's form_of
_FORM = {"Q4_0": (4, SCALE, False, 8), "Q4_1": (4, PAIR, False, 0),
         "Q5_0": (5, SCALE, False, 16), "Q5_1": (5, PAIR, False, 0),
         "Q8_0": (8, SCALE, False, 128), "IQ4_NL": (4, SCALE, True, 128),
         "Q4_K": (4, SUPER, False, 0), "Q5_K": (5, SUPER, False, 0),
         "Q6_K": (6, SUPER16, False, 0), "IQ4_XS": (4, SUPERZ, True, 128)}


# ------------------------------------------------------------------ the kb arrangement
def _records(u: np.ndarray, bits: int) -> np.ndarray:
    """u [n, k] (n % 16 == 0) -> records [n/16, k/32, bytes] (kernels.h's order)."""
    n = u.shape[0]
    k = u.size // n
    u = u.reshape(n // 16, 16, k // 32, 4, 2, 4)  # [t, r, b, s, h, j]
    if bits == 8:
        return np.ascontiguousarray(u.transpose(0, 2, 3, 4, 1, 5)).reshape(n // 16, k // 32, 512)
    lo = u & 15
    nib = (lo[:, :, :, :, 0] | (lo[:, :, :, :, 1] << 4)).transpose(0, 2, 3, 1, 4)  # t b s r j
    parts = [nib.reshape(n // 16, k // 32, 256)]
    for p in range(bits - 4):
        bit = ((u >> (4 + p)) & 1).transpose(0, 2, 3, 4, 1, 5)  # [t, b, s, h, r, j]
        parts.append(np.packbits(bit.reshape(n // 16, k // 32, 8, 64), axis=-1,
                                 bitorder="little").reshape(n // 16, k // 32, 64))
    return np.concatenate(parts, axis=-1)


def _tiles(a: np.ndarray) -> np.ndarray:
    """[n, x, ...] per row -> [n/16, x, ..., 16]: each tile's 16 rows last."""
    n = a.shape[0]
    a = a.reshape(n // 16, 16, *a.shape[1:])
    return np.moveaxis(a, 1, -1)


def _bytes(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(a.shape[0], -1)


def _scales(sc: tuple, kind: int) -> np.ndarray:
    if kind == PAIR:
        d, m = sc  # [n, kb] fp16
        return _bytes(np.stack([_tiles(d), _tiles(m)], axis=2))  # [t, kb, 2, 16]
    if kind == SCALE:
        return _bytes(_tiles(sc[0]))  # [t, kb, 16]
    if kind == SUPERZ:
        d, s = sc  # [n, ns] fp16; [n, ns, 8] int8
        t, ns = d.shape[0] // 16, d.shape[1]
        head = _bytes(_tiles(d)).reshape(t, ns, 32)
        body = _bytes(_tiles(s)).reshape(t, ns, 128)  # [t, ns, 8, 16]
        return np.concatenate([head, body], axis=-1).reshape(t, -1)
    if kind == SUPER:
        d, dmin, s, mn = sc  # [n, ns] fp16; [n, ns, 8] int8
        head = _bytes(np.stack([_tiles(d), _tiles(dmin)], axis=2))  # [t, ns, 2, 16]
        body = _bytes(np.stack([_tiles(s), _tiles(mn)], axis=3))  # [t, ns, 8, 2, 16]
        t, ns = head.shape[0], d.shape[1]
        return np.concatenate([head.reshape(t, ns, 64), body.reshape(t, ns, 256)],
                              axis=-1).reshape(t, -1)
    d, s = sc  # [n, ns] fp16; [n, ns, 16] int8 (halves in column order)
    t, ns = d.shape[0] // 16, d.shape[1]
    head = _bytes(_tiles(d)).reshape(t, ns, 32)
    body = _bytes(_tiles(s.reshape(-1, ns, 8, 2))).reshape(t, ns, 256)  # [t, ns, 8, 2, 16]
    return np.concatenate([head, body], axis=-1).reshape(t, -1)
