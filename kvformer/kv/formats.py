"""The forms a KV cache can store keys and values in, and their exact bytes.

Every cache (the contiguous ``KVCache``, the server's paged pool) stores each ``(token,
KV head)`` row of ``head_dim`` numbers in one of these forms; the native decode step reads
the same bytes (``kvformer/runtime/csrc/kernels.h``, ``attend_q``) and dequantizes inside
attention.

    fp32   4 bytes a number
    bf16   2 bytes a number
    int8   one int8 per number, x = s·q with q in -127..127, and one bf16 scale s per row
           (per token and head): s = max|x| / 127, rounded *up* to a bf16, so that no q
           clips and every |x - s·q| <= s/2
    int4   groups of 32 numbers along head_dim, each with a bf16 pair (d, m): x = d·q + m,
           q in 0..15; m = min(x) rounded down to a bf16, d = (max(x) - m) / 15 rounded up,
           so every |x - (d·q + m)| <= d/2. Two numbers a byte: byte i of a group holds
           number i in its low nibble and number i + 16 in its high one.

A quantized row is two tensors with the same leading dimensions: the integers
``[..., head_dim]`` (int8) or ``[..., head_dim / 2]`` (uint8, int4) and the scales
``[..., 1]`` (int8: s) or ``[..., head_dim / 16]`` (int4: d0, m0, d1, m1, ...), both
contiguous, so a row is found by the same slot index in both.

This module imports nothing else of kvformer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_DTYPES = ("auto", "fp32", "bf16", "int8", "int4")
INT4_GROUP = 32  # numbers sharing one (d, m) pair in an int4 row
_FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class KVFormat:
    """One of ``fp32``, ``bf16``, ``fp16`` (stored as they are) or ``int8``, ``int4``."""

    name: str

    @property
    def quantized(self) -> bool:
        return self.name in ("int8", "int4")

    @property
    def float_dtype(self) -> torch.dtype | None:
        return _FLOAT.get(self.name)

    def check(self, head_dim: int) -> None:
        if self.name == "int4" and head_dim % INT4_GROUP:
            raise ValueError(f"an int4 KV cache needs head_dim divisible by {INT4_GROUP} "
                             f"(this model's is {head_dim}); use --kv-dtype int8")

    def parts(self, head_dim: int) -> list[tuple[int, torch.dtype]]:
        """(last dimension, dtype) of each tensor a row is stored in: values, then scales."""
        if self.name == "int8":
            return [(head_dim, torch.int8), (1, torch.bfloat16)]
        if self.name == "int4":
            return [(head_dim // 2, torch.uint8), (head_dim // 16, torch.bfloat16)]
        return [(head_dim, _FLOAT[self.name])]

    def row_bytes(self, head_dim: int) -> int:
        """Bytes of one (token, KV head) row of K, or of V, scales included."""
        return sum(n * torch.empty((), dtype=dt).element_size()
                   for n, dt in self.parts(head_dim))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows ``x [..., head_dim]`` in this form: (values,) or (integers, scales)."""
        if self.name == "int8":
            return quantize_int8(x)
        if self.name == "int4":
            return quantize_int4(x)
        return (x.to(_FLOAT[self.name]),)

    def decode(self, parts, dtype: torch.dtype) -> torch.Tensor:
        """The numbers rows stand for, ``[..., head_dim]`` in ``dtype``."""
        if self.name == "int8":
            return dequantize_int8(*parts).to(dtype)
        if self.name == "int4":
            return dequantize_int4(*parts).to(dtype)
        return parts[0].to(dtype)


def kv_format(kv_dtype) -> KVFormat:
    """A KV dtype given as a name ('fp32', 'bf16', 'fp16', 'int8', 'int4'), a torch float
    dtype, or a KVFormat, as a KVFormat ('auto' is resolved by the caller)."""
    if isinstance(kv_dtype, KVFormat):
        return kv_dtype
    if isinstance(kv_dtype, torch.dtype):
        for name, dt in _FLOAT.items():
            if dt == kv_dtype:
                return KVFormat(name)
        raise ValueError(f"a KV cache cannot hold {kv_dtype}; use fp32, bf16, int8 or int4")
    if kv_dtype not in (*_FLOAT, "int8", "int4"):
        raise ValueError(f"kv_dtype={kv_dtype!r} is not one of "
                         f"{', '.join(KV_DTYPES)}")
    return KVFormat(kv_dtype)


# --------------------------------------------------------------------------- rounding
def _bf16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 >= x (x >= 0, fp32)."""
    b = x.to(torch.bfloat16)
    bits = b.view(torch.int16)
    return torch.where(b.float() < x, bits + 1, bits).view(torch.bfloat16)


def _bf16_down(x: torch.Tensor) -> torch.Tensor:
    """The largest bf16 <= x (fp32). One step down from a bf16 is -1 on the bits of a
    positive one and +1 on those of a negative one (sign and magnitude)."""
    b = x.to(torch.bfloat16)
    bits = b.view(torch.int16)
    step = torch.where(bits >= 0, bits - 1, bits + 1)
    return torch.where(b.float() > x, step, bits).view(torch.bfloat16)


# --------------------------------------------------------------------------- int8 rows
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., hd] -> (q int8 [..., hd], s bf16 [..., 1]) with x ~= s q, |x - s q| <= s/2."""
    x = x.float()
    s = _bf16_up(x.abs().amax(-1, keepdim=True) / 127)
    sf = s.float()
    q = torch.where(sf > 0, (x / sf).round().clamp(-127, 127), 0.0)
    return q.to(torch.int8), s


def dequantize_int8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s.float()


# --------------------------------------------------------------------------- int4 rows
def quantize_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., hd] (hd % 32 == 0) -> (nibbles uint8 [..., hd/2], (d, m) bf16 [..., hd/16])
    with x ~= d q + m per group of 32 and |x - (d q + m)| <= d/2."""
    *lead, hd = x.shape
    g = x.float().reshape(*lead, hd // INT4_GROUP, INT4_GROUP)
    m = _bf16_down(g.amin(-1, keepdim=True))
    mf = m.float()
    d = _bf16_up((g.amax(-1, keepdim=True) - mf) / 15)
    df = d.float()
    q = torch.where(df > 0, ((g - mf) / df).round().clamp(0, 15), 0.0).to(torch.uint8)
    half = INT4_GROUP // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    scales = torch.cat([d, m], dim=-1)  # [..., groups, 2]: d, m of each group
    return packed.reshape(*lead, hd // 2), scales.reshape(*lead, hd // 16)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    *lead, half_hd = packed.shape
    groups = half_hd * 2 // INT4_GROUP
    p = packed.reshape(*lead, groups, INT4_GROUP // 2)
    q = torch.cat([p & 15, p >> 4], dim=-1).float()  # [..., groups, 32]
    dm = scales.reshape(*lead, groups, 2).float()
    return (q * dm[..., :1] + dm[..., 1:]).reshape(*lead, half_hd * 2)
