"""Block dequantizers for the ggml tensor types kvformer reads: stored bytes -> floats.

Quantized tensors are stored as rows of blocks along ne0 (the torch last dim); each block
dequantizer maps uint8 ``[n_blocks, bytes]`` to float32 ``[n_blocks, elements]``. Q2_K, Q3_K,
IQ4_NL and IQ4_XS fall back to the `gguf` package's numpy dequantizer.
The type table here (name, block size, bytes per block) is also what the container parser
sizes tensors by.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as np_dequantize

__all__ = ["SUPPORTED_TENSOR_TYPES", "dequantize"]


def _f16_col(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """A little-endian float16 at byte ``start`` of every block, as float32 of shape [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, out: torch.Tensor) -> None:
    """qs [n, k] bytes -> out [n, 2, k] floats: low nibbles first, then high nibbles."""
    out[:, 0].copy_(qs & 0x0F)
    out[:, 1].copy_(qs >> 4)


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16_col(b, 0)
    out = torch.empty(n, 2, 16)
    _nibbles(b[:, 2:18], out)
    out = out.view(n, 32)
    return out.sub_(8.0).mul_(d)


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, m = _f16_col(b, 0), _f16_col(b, 2)
    out = torch.empty(n, 2, 16)
    _nibbles(b[:, 4:20], out)
    out = out.view(n, 32)
    return out.mul_(d).add_(m)


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """qh [n, 4] bytes (a little-endian u32) -> [n, 32] uint8: bit j of the u32 at column j."""
    return ((qh.unsqueeze(-1) >> _BIT_SHIFTS) & 1).reshape(qh.shape[0], 32)


def _dq_q5(b: torch.Tensor, has_min: bool) -> torch.Tensor:
    n = b.shape[0]
    d = _f16_col(b, 0)
    o = 4 if has_min else 2
    q = torch.empty(n, 2, 16, dtype=torch.uint8)
    torch.bitwise_and(b[:, o + 4:o + 20], 0x0F, out=q[:, 0])
    torch.bitwise_right_shift(b[:, o + 4:o + 20], 4, out=q[:, 1])
    q = q.view(n, 32) | (_fifth_bits(b[:, o:o + 4]) << 4)
    out = q.float()
    if has_min:
        return out.mul_(d).add_(_f16_col(b, 2))
    return out.sub_(16.0).mul_(d)


def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16_col(b, 0)
    return b[:, 2:34].view(torch.int8).float().mul_(d)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes -> eight 6-bit scales and eight 6-bit mins (Q4_K / Q5_K)."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16_col(b, 0), _f16_col(b, 2)
    sc, mn = _k_scales(b[:, 4:16])
    out = torch.empty(n, 4, 2, 32)
    qs = b[:, 16:144].reshape(n, 4, 32)
    out[:, :, 0].copy_(qs & 0x0F)
    out[:, :, 1].copy_(qs >> 4)
    out = out.view(n, 8, 32)
    out.mul_((d * sc).unsqueeze(-1)).sub_((dmin * mn).unsqueeze(-1))
    return out.view(n, 256)


def _dq_q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16_col(b, 0), _f16_col(b, 2)
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]  # bit s of byte l is the 5th bit of element l of sub-block s
    high = ((qh.unsqueeze(1) >> _BIT_SHIFTS.view(1, 8, 1)) & 1) << 4  # [n, 8, 32]
    qs = b[:, 48:176].reshape(n, 4, 32)
    q = torch.empty(n, 4, 2, 32, dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=q[:, :, 0])
    torch.bitwise_right_shift(qs, 4, out=q[:, :, 1])
    q = q.view(n, 8, 32) | high
    out = q.float()
    out.mul_((d * sc).unsqueeze(-1)).sub_((dmin * mn).unsqueeze(-1))
    return out.view(n, 256)


_Q6_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)


def _dq_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # [half, 32-byte chunk, byte]
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].view(torch.int8).float()
    d = _f16_col(b, 208)
    q = torch.empty(n, 2, 2, 2, 32, dtype=torch.uint8)  # [half, nibble, chunk, byte]
    torch.bitwise_and(ql, 0x0F, out=q[:, :, 0])
    torch.bitwise_right_shift(ql, 4, out=q[:, :, 1])
    q = q.view(n, 2, 4, 32) | (((qh >> _Q6_SHIFTS) & 3) << 4)
    out = q.view(n, 16, 16).float().sub_(32.0)
    out.mul_((d * scales).unsqueeze(-1))
    return out.view(n, 256)


def _numpy_fallback(type_id: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(b: torch.Tensor) -> torch.Tensor:
        arr = np_dequantize(b.numpy(), GGMLQuantizationType(type_id))
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return run


# ggml type id -> (name, elements per block, bytes per block, block dequantizer or None)
# A block dequantizer maps uint8 [n_blocks, bytes] -> float32 [n_blocks, elements].
_BLOCK_TYPES: dict[int, tuple[str, int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    2: ("Q4_0", 32, 18, _dq_q4_0),
    3: ("Q4_1", 32, 20, _dq_q4_1),
    6: ("Q5_0", 32, 22, lambda b: _dq_q5(b, has_min=False)),
    7: ("Q5_1", 32, 24, lambda b: _dq_q5(b, has_min=True)),
    8: ("Q8_0", 32, 34, _dq_q8_0),
    10: ("Q2_K", 256, 84, _numpy_fallback(10)),
    11: ("Q3_K", 256, 110, _numpy_fallback(11)),
    12: ("Q4_K", 256, 144, _dq_q4_k),
    13: ("Q5_K", 256, 176, _dq_q5_k),
    14: ("Q6_K", 256, 210, _dq_q6_k),
    # IQ4_NL and IQ4_XS (a non-linear 16-level grid), through the gguf package's numpy
    # decoders; the rarer i-quants (IQ1-IQ3) stay refused rather than rounded again
    20: ("IQ4_NL", 32, 18, _numpy_fallback(20)),
    23: ("IQ4_XS", 256, 136, _numpy_fallback(23)),
}
_FLOAT_TYPES: dict[int, tuple[str, torch.dtype]] = {
    0: ("F32", torch.float32),
    1: ("F16", torch.float16),
    30: ("BF16", torch.bfloat16),
}
SUPPORTED_TENSOR_TYPES: tuple[str, ...] = tuple(
    name for name, *_ in list(_FLOAT_TYPES.values()) + list(_BLOCK_TYPES.values()))

# Dequantize about this many weights at a time: the float32 temporaries stay under a MB (and
# out of the peak memory of a load), yet each call still does enough work to be efficient.
_CHUNK_ELEMENTS = 1 << 17


def _view_as(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    try:
        return raw.view(dtype)
    except RuntimeError:  # misaligned start: copy the bytes first
        return raw.clone().view(dtype)


def dequantize(raw: torch.Tensor, type_id: int, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored bytes of a tensor of ggml type ``type_id`` -> a new ``dtype`` tensor of ``shape``.

    Raises KeyError for a type not in :data:`SUPPORTED_TENSOR_TYPES`.
    """
    raw = raw.reshape(-1)
    if raw.data_ptr() % 4:  # a file with an odd alignment: copy so 16/32-bit views line up
        raw = raw.clone()
    if type_id in _FLOAT_TYPES:
        t = _view_as(raw, _FLOAT_TYPES[type_id][1]).reshape(shape)
        return t.to(dtype, copy=True)
    _, block, type_size, fn = _BLOCK_TYPES[type_id]
    blocks = raw.view(-1, type_size)
    n = blocks.shape[0]
    per_chunk = max(1, _CHUNK_ELEMENTS // block)
    if n <= per_chunk and dtype == torch.float32:
        return fn(blocks).reshape(shape)
    out = torch.empty(n, block, dtype=dtype)
    for start in range(0, n, per_chunk):
        stop = min(start + per_chunk, n)
        out[start:stop] = fn(blocks[start:stop])
    return out.reshape(shape)
