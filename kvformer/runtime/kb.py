"""kb ("blocks"): a GGUF file's own block-quantized weights, repacked without rounding into
one layout that kvformer's kernels run (``csrc/kernels.h`` has it byte by byte).

Every weight of a kb matrix is an unsigned integer ``u`` of ``bits`` bits (4, 5, 6 or 8), or a
4-bit index into a table of 16 ``u`` (``lut``: the non-linear grid of IQ4_NL / IQ4_XS), and

    w[n, c] = D[n, c] * u[n, c] + M[n, c]

with D and M constant over blocks of 32 columns, or D over 16 columns and M = -32 D (Q6_K).
The scales are kept in the file's own form, so the layout is the file's size:

    scales  kPair (0)     fp16 D and M per block of 32          Q4_1 Q5_1
            kScale (3)    fp16 D per block of 32, M = -zero D    Q4_0 Q5_0 Q8_0 IQ4_NL
            kSuper (1)    fp16 d, dmin per 256 columns,          Q4_K Q5_K
                          int8 sc, mn per 32: D = d sc, M = -dmin mn
            kSuperZ (4)   fp16 d per 256, int8 sc per 32:        IQ4_XS
                          D = d sc, M = -zero D
            kSuper16 (2)  fp16 d per 256, int8 sc per 16:        Q6_K
                          D = d sc, M = -32 D

``zero`` is the offset ggml implies (8 for Q4_0, 16 for Q5_0, 128 where u is the int8 value
plus 128).

Rows are in tiles of 16 and columns in blocks of 32 as in the int4 layout (whose records are
kb's 4-bit records with kPair scales: Q4_0/Q4_1 run as ``Int4Linear``):

    qweight  uint8 [N/16, K/32, record]   record = 256 bytes of low nibbles + 64 bytes per
                                          bit above the fourth (512 bytes of u for 8 bits)
    scales   uint8 [N/16, K/32 * scale bytes]   64 (kPair), 32 (kScale), 40 (kSuper),
                                                20 (kSuperZ), 36 (kSuper16)

``kvformer.formats.gguf.blocks`` maps each GGUF type to this layout; ``dequantize_kb`` here is
the layout read back with torch ops (the fallback without the C++ kernels, and a check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvformer.runtime.quant import (
    INT4_BLOCK,
    INT4_TILE,
    Int4Linear,
    QuantizedLinear,
    _apply_keeping,
    _native,
    act_dtype,
)

__all__ = ["KbBlocks", "KbEmbedding", "KbLinear", "dequantize_kb", "record_bytes",
           "scale_bytes"]

PAIR, SUPER, SUPER16, SCALE, SUPERZ = 0, 1, 2, 3, 4
SCALE_NAMES = {PAIR: "pair", SUPER: "super", SUPER16: "super16", SCALE: "scale",
               SUPERZ: "superZ"}
SCALE_BYTES = {PAIR: 64, SUPER: 40, SUPER16: 36, SCALE: 32, SUPERZ: 20}


def record_bytes(bits: int) -> int:
    """Bytes of one (tile, block) record of u."""
    return 512 if bits == 8 else 256 + 64 * (bits - 4)


def scale_bytes(scales: int) -> int:
    """Bytes of scales per (tile, block), on average."""
    return SCALE_BYTES[scales]


@dataclass
class KbBlocks:
    """One matrix in the kb layout, as a loader hands it over: ``q`` uint8 [N/16, K/32,
    record], ``s`` uint8 [N/16, K/32 * scale bytes], ``lut`` uint8 [16] or None, ``zero``
    (kScale, kSuperZ: M = -zero D; else 0), and the GGUF type it came from (for what
    ``kvformer info`` shows)."""

    q: torch.Tensor
    s: torch.Tensor
    bits: int
    scales: int
    lut: torch.Tensor | None
    ggml_type: str
    zero: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0] * INT4_TILE, self.q.shape[1] * INT4_BLOCK)

    @property
    def form(self) -> tuple:
        """What must agree for two matrices to be stacked into one layer."""
        lut = None if self.lut is None else tuple(self.lut.tolist())
        return (self.bits, self.scales, self.zero, lut, self.q.shape[1])

    def rows(self, start: int, end: int) -> KbBlocks:
        if start % INT4_TILE or end % INT4_TILE:
            raise ValueError(f"kb rows are sliced in tiles of {INT4_TILE}: got {start}:{end}")
        t0, t1 = start // INT4_TILE, end // INT4_TILE
        return KbBlocks(self.q[t0:t1], self.s[t0:t1], self.bits, self.scales, self.lut,
                        self.ggml_type, self.zero)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_kb(self.q, self.s, self.bits, self.scales, self.lut,
                             self.zero).to(dtype)

    def detach(self) -> KbBlocks:
        return self

    def int4(self) -> bool:
        """True when the records are the int4 layout's (4 bits, fp16 (D, M) per block)."""
        return self.bits == 4 and self.scales == PAIR and self.lut is None

    @staticmethod
    def stack(parts: list[KbBlocks]) -> KbBlocks:
        if len(parts) == 1:
            return parts[0]
        if len({p.form for p in parts}) != 1:
            raise ValueError("kb matrices of different forms cannot be stacked")
        p0 = parts[0]
        return KbBlocks(_joined([p.q for p in parts]), _joined([p.s for p in parts]),
                        p0.bits, p0.scales, p0.lut, "+".join(sorted({p.ggml_type for p in parts})),
                        p0.zero)


def _joined(ts: list[torch.Tensor]) -> torch.Tensor:
    """Row blocks stacked along dim 0: a view where they already lie end to end in one
    storage (the loader repacks a fused layer's parts into one buffer), else a copy."""
    t0 = ts[0]
    storage = t0.untyped_storage()
    end = t0.data_ptr() + t0.nbytes
    for t in ts[1:]:
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.data_ptr() != end or t.shape[1:] != t0.shape[1:]):
            return torch.cat(ts)
        end += t.nbytes
    if not t0.is_contiguous():
        return torch.cat(ts)
    shape = (sum(t.shape[0] for t in ts), *t0.shape[1:])
    return torch.empty(0, dtype=t0.dtype).set_(storage, t0.storage_offset(), shape)


# ------------------------------------------------------------------ the layout in torch ops
def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 pairs of bytes (last dim even) -> float32."""
    return b.contiguous().view(torch.float16).float()


def _u(q: torch.Tensor, bits: int, lut: torch.Tensor | None) -> torch.Tensor:
    """u of every weight: [T, KB, 16 rows, 32 columns] uint8 (int16 for the sums below)."""
    t, kb, _ = q.shape
    if bits == 8:
        # byte 128 s + 64 h + 4 r + j -> row r, column 8 s + 4 h + j
        return q.view(t, kb, 4, 2, 16, 4).permute(0, 1, 4, 2, 3, 5).reshape(t, kb, 16, 32)
    nib = q[..., :256].reshape(t, kb, 4, 16, 4)  # [s, r, j]
    lo, hi = nib & 15, nib >> 4
    u = torch.stack([lo, hi], dim=3)  # [t, kb, s, h, r, j]
    if lut is not None:
        u = lut[u.long()]
    for p in range(bits - 4):
        plane = q[..., 256 + 64 * p:256 + 64 * (p + 1)].reshape(t, kb, 4, 2, 8)  # [s, h, byte]
        bit = (plane.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [s,h,byte,bit]
        u = u | (bit.reshape(t, kb, 4, 2, 16, 4) << (4 + p))
    return u.permute(0, 1, 4, 2, 3, 5).reshape(t, kb, 16, 32)


def _dm(s: torch.Tensor, scales: int, kb: int, zero: int = 0
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """D and M per (tile, block, row, half of 16 columns): [T, KB, 16, 2] float32 each."""
    t = s.shape[0]
    if scales == PAIR:
        dm = _f16(s.view(t, kb, 64)).view(t, kb, 2, 16)
        d, m = dm[:, :, 0], dm[:, :, 1]
        return d[..., None].expand(t, kb, 16, 2), m[..., None].expand(t, kb, 16, 2)
    if scales == SCALE:
        d = _f16(s.view(t, kb, 32)).view(t, kb, 16)
        return d[..., None].expand(t, kb, 16, 2), (-zero * d)[..., None].expand(t, kb, 16, 2)
    nsup = kb // 8
    if scales == SUPERZ:
        rec = s.view(t, nsup, 160)
        dd = _f16(rec[:, :, :32]).view(t, nsup, 1, 16)
        sc = rec[:, :, 32:].contiguous().view(torch.int8).view(t, nsup, 8, 16).float()
        d = (dd * sc).reshape(t, kb, 16)
        return d[..., None].expand(t, kb, 16, 2), (-zero * d)[..., None].expand(t, kb, 16, 2)
    if scales == SUPER:
        rec = s.view(t, nsup, 320)
        dd = _f16(rec[:, :, :64]).view(t, nsup, 2, 16)
        sc = rec[:, :, 64:].contiguous().view(torch.int8).view(t, nsup, 8, 2, 16).float()
        d = dd[:, :, None, 0] * sc[:, :, :, 0]  # [t, nsup, 8, 16]
        m = -(dd[:, :, None, 1] * sc[:, :, :, 1])
        d, m = d.reshape(t, kb, 16), m.reshape(t, kb, 16)
        return d[..., None].expand(t, kb, 16, 2), m[..., None].expand(t, kb, 16, 2)
    rec = s.view(t, nsup, 288)
    dd = _f16(rec[:, :, :32]).view(t, nsup, 1, 1, 16)
    sc = rec[:, :, 32:].contiguous().view(torch.int8).view(t, nsup, 8, 2, 16).float()
    d = (dd * sc).reshape(t, kb, 2, 16).transpose(2, 3)
    return d, -32.0 * d


def dequantize_kb(q: torch.Tensor, s: torch.Tensor, bits: int, scales: int,
                  lut: torch.Tensor | None, zero: int = 0) -> torch.Tensor:
    """The matrix [N, K] (float32) a kb layout stands for, with torch ops only."""
    t, kb, _ = q.shape
    u = _u(q, bits, lut).float().view(t, kb, 16, 2, 16)
    d, m = _dm(s, scales, kb, zero)
    w = u * d[..., None] + m[..., None]  # [t, kb, r, half, 16]
    return w.view(t, kb, 16, 32).permute(0, 2, 1, 3).reshape(t * 16, kb * 32)


# ------------------------------------------------------------------ modules
def _hold(module: nn.Module, blocks: KbBlocks) -> None:
    """A kb module's form and its three buffers (an empty lut when there is none)."""
    module.bits, module.layout, module.ggml_type = blocks.bits, blocks.scales, blocks.ggml_type
    module.zero = blocks.zero
    module.register_buffer("qweight", blocks.q)
    module.register_buffer("scales", blocks.s)
    module.register_buffer("lut", blocks.lut if blocks.lut is not None
                           else torch.empty(0, dtype=torch.uint8))


class KbLinear(QuantizedLinear):
    """A linear layer on kb weights (``KbBlocks``): kvformer's kb kernels for a few rows, a
    dense matmul of the weight, unpacked a few rows at a time, for many."""

    KIND = "kb"
    EXACT = ("qweight", "scales", "lut")

    def __init__(self, blocks: KbBlocks, bias: torch.Tensor | None = None,
                 act: torch.dtype | None = None):
        n, k = blocks.shape
        super().__init__(k, n, bias, act)
        _hold(self, blocks)

    @property
    def blocks(self) -> KbBlocks:
        return KbBlocks(self.qweight, self.scales, self.bits, self.layout,
                        self.lut if self.lut.numel() else None, self.ggml_type, self.zero)

    def small_mm(self, x: torch.Tensor) -> torch.Tensor:
        isa = self.kernel_isa()
        if isa == "torch":
            return self.torch_mm(x)
        return torch.ops.kvformer_native.linear_kb(x, self.qweight, self.scales, self.bits,
                                                   self.layout, self.zero, self.lut,
                                                   isa).to(x.dtype)

    def torch_mm(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if _native() and dtype in (torch.float32, torch.bfloat16):
            return torch.ops.kvformer_native.dequant_kb(
                self.qweight, self.scales, self.bits, self.layout, self.zero, self.lut, 0,
                self.out_features, dtype == torch.bfloat16)
        return self.blocks.dequantize(dtype)

    def rows(self, start: int, end: int) -> KbLinear:
        bias = None if self.bias is None else self.bias[start:end]
        layer = KbLinear(self.blocks.rows(start, end), bias, self.act_dtype)
        layer.isa = self.isa
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.ggml_type} ({self.bits} bits, " \
               f"{SCALE_NAMES[self.layout]} scales)"


class KbEmbedding(nn.Module):
    """An embedding looked up from kb weights: each token's row is dequantized when it is
    asked for (tied embeddings share the head's storage)."""

    EXACT = ("qweight", "scales", "lut")

    def __init__(self, blocks: KbBlocks, act: torch.dtype | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = blocks.shape
        self.act_dtype = act or act_dtype()
        _hold(self, blocks)

    def _apply(self, fn, recurse=True):
        return _apply_keeping(self, super()._apply, fn, recurse)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must be in [0, {self.num_embeddings})")
        tiles, rows = torch.unique(flat // INT4_TILE, return_inverse=True)
        lut = self.lut if self.lut.numel() else None
        if _native():
            table = torch.cat([torch.ops.kvformer_native.dequant_kb(
                self.qweight, self.scales, self.bits, self.layout, self.zero, self.lut,
                int(t) * INT4_TILE, int(t + 1) * INT4_TILE, False) for t in tiles.tolist()])
        else:
            table = dequantize_kb(self.qweight[tiles], self.scales[tiles], self.bits,
                                  self.layout, lut, self.zero)
        table = table.view(-1, INT4_TILE, self.embedding_dim)
        out = table[rows, flat % INT4_TILE]
        return out.view(*tokens.shape, self.embedding_dim).to(self.act_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.ggml_type}"


def kb_layer(parts: list[KbBlocks], bias: torch.Tensor | None, act: torch.dtype | None
             ) -> QuantizedLinear:
    """The layer for kb matrices stacked as one: ``Int4Linear`` when the records are the
    int4 layout's (its kernels), ``KbLinear`` otherwise."""
    blocks = KbBlocks.stack(parts)
    if blocks.int4():
        t, kb, _ = blocks.q.shape
        layer = Int4Linear(blocks.q, blocks.s.view(t, kb, 64).view(torch.float16)
                           .view(t, kb, 2, INT4_TILE), bias, act)
        layer.ggml_type = blocks.ggml_type
        return layer
    return KbLinear(blocks, bias, act)
