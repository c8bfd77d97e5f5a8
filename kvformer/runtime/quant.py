"""Weight-only quantization in layouts kvformer defines: the same bytes on every CPU.

Only weights are quantized: the linear layers of the blocks, and the LM head and embedding
as one shared int8 table (``Int8Embedding``). The model code never learns it is quantized:
``nn.Linear`` modules are swapped for ``Int8Linear`` / ``Int4Linear`` modules with the same
``forward(x)``, which use kvformer's kernels (``kvformer.runtime.native``) for a few rows (decode)
and unpack the weight to a dense matmul for many (prefill).

    int8:  w[n, k] ~= q[n, k] * scale[n]                  q int8 in [-127, 127], scale fp32
    int4:  w[n, k] ~= d[n, b] * q[n, k] + m[n, b]         q in [0, 15], b = k // 32, d, m fp16

int4 is GGUF's Q4_1 form (``d * q + m`` per block of 32, fp16 d and m), so a Q4_1 file keeps
its grid. Its bytes are laid out for integer dot-product instructions (the layout is
written out in ``kvformer/runtime/csrc/kernels.h`` and docs/architecture.md):

    qweight  uint8 [N/16, K/32, 4, 16, 4]: tile t of 16 rows, block b of 32 columns,
             sub-block s, row r, byte j holds column 32b+8s+j (low nibble) and 32b+8s+4+j
             (high nibble) of row 16t+r
    scales   fp16  [N/16, K/32, 2, 16]: d of the tile's 16 rows for block b, then their m

Rows stay in tiles, so the rows [16i, 16j) of a matrix are a slice of both tensors: the
fused Q/K/V and gate/up matrices serve their parts without copies.

Activations are computed in ``act_dtype()``: bf16 where the CPU multiplies it natively
(AVX-512 BF16, AMX), fp32 elsewhere (on an AVX2 CPU a bf16 matmul is ~25x slower than fp32).

``quantize_model(model, mode)`` converts a model that is already built (in place: its
``nn.Linear`` modules are swapped); ``kvformer.formats.build.build_model`` builds one from a
checkpoint's tensors as they arrive, with the same layers. Both fuse Q/K/V and gate/up into
one quantized matrix per layer (the decode steps make one call for each); the model's own
``wq``/``wk``/``wv`` and ``w_gate``/``w_up`` become row slices that share its storage.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kvformer.runtime import native

MODES = ("fp32", "bf16", "fp16", "int8", "int4")
# "gguf": a GGUF file's weights as it stores them (kvformer.runtime.kb), only from a file
DENSE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT4_TILE = 16   # int4 rows per tile
INT4_BLOCK = 32  # int4 columns per (d, m) pair
_FP16_MAX = 65504.0
# At or above this many rows of input, unpack the weight once and use a dense matmul
# (prefill); below it, kvformer's kernels (decode) are faster.
DENSE_ROWS = 64

_int8_mm = torch.ops.aten._weight_int8pack_mm.default
_torch_int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_torch_int4_pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu.default


@functools.cache
def _bf16_native() -> bool:
    flags = native.cpuinfo("flags").split()
    return (torch.backends.cpu.get_cpu_capability() == "AVX512"
            and ("avx512_bf16" in flags or "amx_bf16" in flags))


def act_dtype() -> torch.dtype:
    """The dtype quantized models compute their activations in on this CPU: bf16 where it is
    native (AVX-512 BF16 or AMX, with torch dispatching to AVX-512), fp32 elsewhere.
    ``KVFORMER_ACT_DTYPE=fp32|bf16`` overrides it."""
    forced = os.environ.get("KVFORMER_ACT_DTYPE", "").strip().lower()
    if forced in ("fp32", "float32"):
        return torch.float32
    if forced in ("bf16", "bfloat16"):
        return torch.bfloat16
    return torch.bfloat16 if _bf16_native() else torch.float32


def _native():
    """kvformer.runtime.native if its library is loaded in this process, else None (never
    builds)."""
    return native if native.loaded() else None


# --------------------------------------------------------------------------- the maths
_CHUNK = 1 << 17  # quantize this many weights at a time: temporaries stay under a MB
# Prefill unpacks a weight this many weights at a time (a few MB): large enough that each
# piece is one efficient matmul, small enough not to hold a big matrix whole.
_DENSE_CHUNK = 1 << 20


def _stacked_rows(parts: list[torch.Tensor], step: int):
    """Walk the rows of ``parts`` stacked on top of each other (a fused matrix that is never
    built): ``(lo, hi, piece)`` with ``piece`` the rows ``lo:hi`` of the stack, at most
    ``step`` rows, never straddling two parts."""
    row = 0
    for w in parts:
        n = w.shape[0]
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            yield row + lo, row + hi, w[lo:hi]
        row += n


def _as_parts(w: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """A matrix, or a list of matrices to be treated as stacked, as a list."""
    return list(w) if isinstance(w, (list, tuple)) else [w]


def _stack_shape(parts: list[torch.Tensor]) -> tuple[int, int]:
    k = parts[0].shape[1]
    if any(p.dim() != 2 or p.shape[1] != k for p in parts):
        raise ValueError(f"cannot stack matrices of shapes {[list(p.shape) for p in parts]}")
    return sum(p.shape[0] for p in parts), k


def quantize_int8(w: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 [N, K], scale fp32 [N]) with w ~= q * scale[:, None].
    ``w`` may be a list of matrices, quantized as if stacked (without building the stack)."""
    parts = _as_parts(w)
    n, k = _stack_shape(parts)
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n)
    for lo, hi, piece in _stacked_rows(parts, max(1, _CHUNK // max(k, 1))):
        wc = piece.to(torch.float32, copy=True)
        s = wc.abs().amax(dim=1).clamp_(min=1e-10).div_(127)
        q[lo:hi] = wc.div_(s[:, None]).round_().clamp_(-127, 127)
        scale[lo:hi] = s
    return q, scale


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max int4 per block of 32 input columns (GGUF Q4_1's form): (q uint8 [N, K] in
    0..15, d fp16 [N, K/32], m fp16 [N, K/32]) with w ~= d * q + m. d and m are rounded to
    fp16 first and q is chosen against the rounded values, so the stored numbers are the
    ones the integers were fitted to."""
    n, k = w.shape
    nb = k // INT4_BLOCK
    q = torch.empty(n, k, dtype=torch.uint8)
    d, m = torch.empty(n, nb, dtype=torch.float16), torch.empty(n, nb, dtype=torch.float16)
    for a, b, piece in _stacked_rows([w], max(1, _CHUNK // max(k, 1))):
        wg = piece.to(torch.float32, copy=True).reshape(b - a, nb, INT4_BLOCK)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        d16, m16 = ((hi - lo) / 15).half(), lo.half()
        dd, mm = d16.float(), m16.float()
        inv = torch.where(dd > 0, 1 / dd, torch.zeros_like(dd))
        q[a:b] = wg.sub_(mm[..., None]).mul_(inv[..., None]).round_().clamp_(0, 15).view(b - a, k)
        d[a:b], m[a:b] = d16, m16
    return q, d, m


def int4_supported(n: int, k: int) -> bool:
    return n % INT4_TILE == 0 and k % INT4_BLOCK == 0


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] in 0..15 -> kvformer's int4 layout, uint8 [N/16, K/32, 256]."""
    n, k = q.shape
    p = q.view(n // 16, 16, k // 32, 4, 2, 4).permute(0, 2, 3, 1, 4, 5)  # t b s r h j
    return (p[..., 0, :] | (p[..., 1, :] << 4)).reshape(n // 16, k // 32, 256)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: uint8 [N, K] in 0..15."""
    t, kb, _ = qweight.shape
    p = qweight.view(t, kb, 4, 16, 4)  # t b s r j
    q = torch.stack([p & 15, p >> 4], dim=4)  # t b s r h j: column 32b + 8s + 4h + j
    return q.permute(0, 3, 1, 2, 4, 5).reshape(t * 16, kb * 32).contiguous()


def pack_scales(d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """d, m fp16 [N, K/32] -> fp16 [N/16, K/32, 2, 16]."""
    n, nb = d.shape
    return torch.stack([d.view(n // 16, 16, nb), m.view(n // 16, 16, nb)], dim=1) \
        .permute(0, 3, 1, 2).contiguous()


def unpack_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_scales``: (d, m) fp16 [N, K/32]."""
    t, nb = scales.shape[:2]
    s = scales.permute(0, 3, 2, 1)  # t r (d|m) b
    return s[:, :, 0].reshape(t * 16, nb), s[:, :, 1].reshape(t * 16, nb)


class Int4Blocks:
    """A matrix already in int4 blocks of 32 (a GGUF Q4_0/Q4_1 tensor): q uint8 [N, K] in
    0..15, d and m fp16 [N, K/32], w = d * q + m. A loader hands these over instead of
    floats so that an int4 build keeps the file's integers and scales exactly."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
        self.q, self.d, self.m = q, d, m
        self.shape = q.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        w = torch.addcmul(self.m.float()[..., None], self.q.view(n, k // INT4_BLOCK, INT4_BLOCK),
                          self.d.float()[..., None])
        return w.view(n, k).to(dtype)

    def detach(self) -> Int4Blocks:
        return self


def _floats(w):
    """A matrix as a float tensor (Int4Blocks and kb blocks are dequantized)."""
    return w if isinstance(w, torch.Tensor) else w.dequantize(torch.float32)


# --------------------------------------------------------------------------- modules
class QuantizedLinear(nn.Module):
    """Common part: shapes, bias, and the switch between kvformer's kernels (few rows) and a
    dense matmul of the unpacked weight (many rows).

    ``isa`` picks the kernel path for this layer ('avx512', 'avx2', 'scalar', or 'torch' for
    torch's own ops); None, the default, means ``kvformer.runtime.native.default_isa()`` when the
    native library is loaded and torch's ops otherwise."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 act: torch.dtype | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_dtype = act or act_dtype()
        self.isa: str | None = None
        self.bias = None if bias is None else nn.Parameter(
            bias.detach().to(self.act_dtype), requires_grad=False)

    EXACT: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        return _apply_keeping(self, super()._apply, fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.act_dtype:
            x2 = x2.to(self.act_dtype)
        if x2.shape[0] >= DENSE_ROWS:
            y = self.dense_mm(x2)
        else:
            y = self.small_mm(x2)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def kernel_isa(self) -> str:
        """The kernel path this layer uses now."""
        if self.isa is not None:
            return self.isa
        native = _native()
        return native.default_isa() if native else "torch"

    def small_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (M small) -> x W^T [M, N] in x's dtype, without the bias."""
        isa = self.kernel_isa()
        if isa == "torch":
            return self.torch_mm(x)
        a, b = self.kernel_tensors()
        return torch.ops.kvformer_native.linear(x, self.KIND, a, b, isa).to(x.dtype)

    def dense_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T (+ b) through a dense matmul in x's dtype, unpacking the weight a block of
        rows at a time (a few MB), never the whole of a large matrix at once."""
        n, k = self.out_features, self.in_features
        step = max(INT4_TILE, _DENSE_CHUNK // k // INT4_TILE * INT4_TILE)
        if n <= step:
            return F.linear(x, self.dequantize(x.dtype), self.bias)
        y = torch.empty(x.shape[0], n, dtype=x.dtype)
        for a in range(0, n, step):
            part = self.rows(a, min(a + step, n))
            y[:, a:a + step] = F.linear(x, part.dequantize(x.dtype), part.bias)
        return y

    KIND = ""

    def kernel_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def torch_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, start: int, end: int) -> QuantizedLinear:
        """Output rows [start, end) as a layer sharing this one's storage."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight these integers stand for, [out_features, in_features]."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Int8Linear(QuantizedLinear):
    """int8 weights, row-major [N, K], with one fp32 scale per output row."""

    KIND = "int8"
    EXACT = ("scale",)

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None, act: torch.dtype | None = None):
        super().__init__(qweight.shape[1], qweight.shape[0], bias, act)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(torch.float32))
        self._torch_scale = None

    @classmethod
    def from_float(cls, weight: torch.Tensor | list[torch.Tensor],
                   bias: torch.Tensor | None = None, act: torch.dtype | None = None
                   ) -> Int8Linear:
        """Quantize ``weight`` [N, K], or a list of matrices as if stacked (a fused layer)."""
        q, scale = quantize_int8([_floats(w) for w in _as_parts(weight)])
        return cls(q, scale, bias, act)

    def kernel_tensors(self):
        return self.qweight, self.scale

    def torch_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self._torch_scale is None or self._torch_scale.dtype != x.dtype:
            self._torch_scale = self.scale.to(x.dtype)  # torch's kernel wants x's dtype
        return _int8_mm(x, self.qweight, self._torch_scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def rows(self, start: int, end: int) -> Int8Linear:
        bias = None if self.bias is None else self.bias[start:end]
        return Int8Linear(self.qweight[start:end], self.scale[start:end], bias, self.act_dtype)


class Int8Embedding(nn.Module):
    """An embedding table looked up from int8 rows and their scales: with tied embeddings
    it shares the int8 LM head's storage, so the table is held once, in a quarter of fp32."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 act: torch.dtype | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.act_dtype = act or act_dtype()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(torch.float32))

    EXACT = ("scale",)

    def _apply(self, fn, recurse=True):
        return _apply_keeping(self, super()._apply, fn, recurse)

    @classmethod
    def from_float(cls, weight: torch.Tensor, act: torch.dtype | None = None) -> Int8Embedding:
        return cls(*quantize_int8(weight), act)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.qweight).to(torch.float32)
        return rows.mul_(F.embedding(tokens, self.scale.unsqueeze(1))).to(self.act_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Int4Linear(QuantizedLinear):
    """int4 weights in kvformer's layout (module docstring): ``qweight`` uint8
    [N/16, K/32, 256] and ``scales`` fp16 [N/16, K/32, 2, 16]."""

    KIND = "int4"
    EXACT = ("scales",)

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, act: torch.dtype | None = None):
        t, kb, width = qweight.shape
        if width != 256 or scales.shape != (t, kb, 2, INT4_TILE) or \
                scales.dtype != torch.float16 or qweight.dtype != torch.uint8:
            raise ValueError(f"not kvformer's int4 layout: qweight {qweight.dtype} "
                             f"{list(qweight.shape)}, scales {scales.dtype} {list(scales.shape)}")
        super().__init__(kb * INT4_BLOCK, t * INT4_TILE, bias, act)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self._torch_pack = None  # torch's own packed copy, made only for its fallback kernel

    @classmethod
    def from_float(cls, weight: torch.Tensor | list[torch.Tensor],
                   bias: torch.Tensor | None = None, act: torch.dtype | None = None
                   ) -> Int4Linear:
        """Quantize ``weight`` [N, K], or a list of matrices as if stacked (a fused layer,
        built without the stacked copy), a few tiles of 16 rows at a time."""
        parts = _as_parts(weight)
        n, k = _stack_shape(parts)
        for p in parts:
            if not int4_supported(p.shape[0], k):
                raise ValueError(f"int4 needs out_features % {INT4_TILE} == 0 and "
                                 f"in_features % {INT4_BLOCK} == 0, got {p.shape[0]} x {k}")
        qweight = torch.empty(n // INT4_TILE, k // INT4_BLOCK, 256, dtype=torch.uint8)
        scales = torch.empty(n // INT4_TILE, k // INT4_BLOCK, 2, INT4_TILE, dtype=torch.float16)
        step = max(1, _CHUNK // k // INT4_TILE) * INT4_TILE
        for lo, hi, piece in _stacked_rows(parts, step):
            q, d, m = quantize_int4(piece)
            qweight[lo // INT4_TILE:hi // INT4_TILE] = pack_int4(q)
            scales[lo // INT4_TILE:hi // INT4_TILE] = pack_scales(d, m)
        return cls(qweight, scales, bias, act)

    @classmethod
    def from_blocks(cls, parts: list[Int4Blocks], bias: torch.Tensor | None = None,
                    act: torch.dtype | None = None) -> Int4Linear:
        """Pack int4 blocks (stacked when there are several parts) as they are: the
        integers and fp16 scales of the file, no requantization."""
        q = torch.cat([p.q for p in parts]) if len(parts) > 1 else parts[0].q
        d = torch.cat([p.d for p in parts]) if len(parts) > 1 else parts[0].d
        m = torch.cat([p.m for p in parts]) if len(parts) > 1 else parts[0].m
        return cls(pack_int4(q.contiguous()), pack_scales(d, m), bias, act)

    def kernel_tensors(self):
        return self.qweight, self.scales

    def torch_mm(self, x: torch.Tensor) -> torch.Tensor:
        """torch's int4 kernel, on a copy converted to its own CPU-dependent packing (kept
        for this process only: nothing else reads those bytes)."""
        if self._torch_pack is None or self._torch_pack[1].dtype != x.dtype:
            q = unpack_int4(self.qweight).to(torch.int32)
            d, m = unpack_scales(self.scales)
            # torch's form: w = (q - 8) * scale + zero, [K/32, N, 2]
            sz = torch.stack([d.float(), m.float() + 8 * d.float()], dim=-1).transpose(0, 1)
            self._torch_pack = (_torch_int4_pack(q.contiguous(), 1),
                                sz.to(x.dtype).contiguous())
        packed, sz = self._torch_pack
        return _torch_int4_mm(x.contiguous(), packed, INT4_BLOCK, sz)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        isa = self.kernel_isa()
        if isa != "torch" and dtype in (torch.float32, torch.bfloat16):
            return torch.ops.kvformer_native.dequant_int4(self.qweight, self.scales,
                                                          dtype == torch.bfloat16, isa)
        q = unpack_int4(self.qweight).to(torch.float32)
        d, m = unpack_scales(self.scales)
        n, k = self.out_features, self.in_features
        w = torch.addcmul(m.float()[..., None], q.view(n, k // INT4_BLOCK, INT4_BLOCK),
                          d.float()[..., None])
        return w.view(n, k).to(dtype)

    def rows(self, start: int, end: int) -> Int4Linear:
        if start % INT4_TILE or end % INT4_TILE:
            raise ValueError(f"int4 rows are sliced in tiles of {INT4_TILE}: got {start}:{end}")
        bias = None if self.bias is None else self.bias[start:end]
        t0, t1 = start // INT4_TILE, end // INT4_TILE
        layer = Int4Linear(self.qweight[t0:t1], self.scales[t0:t1], bias, self.act_dtype)
        layer.isa = self.isa
        return layer


def _apply_keeping(module: nn.Module, apply, fn, recurse: bool) -> nn.Module:
    """``module._apply(fn)`` (what ``model.to(dtype)`` calls) for everything but the scales
    of the quantized layout, which keep their dtype (an fp16 scale rounded through bf16
    would lose bits); the activations' dtype follows the conversion."""
    kept = {name: module._buffers[name] for name in module.EXACT}
    for name in kept:
        module._buffers[name] = None  # _apply skips None buffers
    try:
        apply(fn, recurse)
    finally:
        module._buffers.update(kept)
    probe = fn(torch.empty(0, dtype=module.act_dtype))
    if probe.is_floating_point():
        module.act_dtype = probe.dtype
    for cached in ("_torch_pack", "_torch_scale"):
        if hasattr(module, cached):
            setattr(module, cached, None)
    return module


def _make(mode: str, weight: torch.Tensor | list[torch.Tensor], bias: torch.Tensor | None,
          act: torch.dtype | None = None) -> nn.Module:
    """A quantized linear layer for ``weight`` [N, K] (or a list of matrices to stack into
    one fused layer); int4 falls back to int8 for shapes the int4 layout cannot take, or
    weights too large for its fp16 scales."""
    parts = _as_parts(weight)
    if mode == "int4" and all(int4_supported(p.shape[0], p.shape[1]) for p in parts):
        if all(isinstance(p, Int4Blocks) for p in parts):
            return Int4Linear.from_blocks(parts, bias, act)
        parts = [_floats(p) for p in parts]
        if all(p.abs().max() < _FP16_MAX / 2 for p in parts):
            return Int4Linear.from_float(parts, bias, act)
    return Int8Linear.from_float(parts, bias, act)


def set_kernels(model: nn.Module, isa: str | None) -> nn.Module:
    """Make every quantized layer of ``model`` use the kernel path ``isa`` ('avx512',
    'avx2', 'scalar', 'torch'; None: the default). For tests and benchmarks."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.isa = isa
    return model


# --------------------------------------------------------------------------- whole models
# Linear layers fused into one quantized matrix per layer: (fused name, parts) per module.
FUSED = {"attn": ("wqkv", ("wq", "wk", "wv")), "mlp": ("w_gate_up", ("w_gate", "w_up"))}


ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", torch.float32: "fp32",
           torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_mode(mode) -> str:
    """'fp32', 'bf16', 'fp16', 'int8' or 'int4' (torch dtypes and long names accepted)."""
    mode = ALIASES.get(mode, mode)
    if mode not in MODES and mode != "gguf":
        raise ValueError(f"dtype {mode!r} is not one of {', '.join(MODES)}")
    return mode


def loader_dtype(mode) -> torch.dtype:
    """The dtype to ask a checkpoint loader for when building in ``mode``: quantized models
    are built from bf16 tensors (half the transient memory of fp32); an int4 build takes
    GGUF Q4_0/Q4_1 matrices as their integers instead (``Int4Blocks``)."""
    mode = check_mode(mode)
    return DENSE.get(mode, torch.bfloat16)


def default_mode(weight_types: Iterable[str] = ()) -> str:
    """The dtype to load in when none is asked for, from the type names of the checkpoint's
    tensors (e.g. GGUF 'Q4_1', 'Q8_0', 'F32'): int4 when most block-quantized weights
    are already 4-bit (Q4_0/Q4_1 pass into int4 exactly; Q4_K, requantized to blocks of 32,
    keeps its quality), int8 otherwise (per-row int8 keeps fp32's perplexity within ~0.5 %)."""
    blocks = [t.upper() for t in weight_types if t.upper().startswith("Q")]  # not F32 norms
    four_bit = sum(t.startswith("Q4") for t in blocks)
    return "int4" if blocks and four_bit * 2 > len(blocks) else "int8"


def _fuse_into(parent: nn.Module, fused_name: str, parts: tuple[str, ...],
               linear: nn.Module) -> None:
    """Register ``linear`` (the rows of every part, stacked) under ``fused_name`` and make
    each part a row slice of it."""
    parent.add_module(fused_name, linear)
    start = 0
    for part in parts:
        rows = getattr(parent, part).out_features
        parent.add_module(part, linear.rows(start, start + rows))
        start += rows


def _fusable(mode: str, sizes: list[int], k: int) -> bool:
    if mode in ("int8", "gguf"):  # gguf: when the parts' types agree (build_model checks)
        return True
    return all(int4_supported(n, k) for n in sizes)


def quantize_model(model: nn.Module, mode: str, act: torch.dtype | None = None) -> nn.Module:
    """Convert a built model in place to ``mode`` ('fp32', 'bf16', 'int8' or 'int4') and
    return it. For int8/int4 every linear layer of the blocks is quantized, the LM head
    and the embedding become int8 (one shared table when they are tied), and everything
    else (norms, biases: the activations) is in ``act`` (default ``act_dtype()``)."""
    mode = check_mode(mode)
    act = act or act_dtype()
    if mode in DENSE:
        model.to(DENSE[mode])
        _keep_rotary_fp32(model)
        return model
    if any(isinstance(m, (QuantizedLinear, Int8Embedding)) for m in model.modules()):
        raise ValueError("the model is already quantized")
    for block in model.layers:
        for owner_name, (fused_name, parts) in FUSED.items():
            owner = getattr(block, owner_name)
            linears = [getattr(owner, p, None) for p in parts]
            if any(lin is None for lin in linears):
                continue  # gelu MLP: no gate
            k = linears[0].in_features
            if _fusable(mode, [lin.out_features for lin in linears], k):
                w = [lin.weight.detach() for lin in linears]
                b = (torch.cat([lin.bias.detach() for lin in linears])
                     if linears[0].bias is not None else None)
                _fuse_into(owner, fused_name, parts, _make(mode, w, b, act))
        for name, module in list(block.named_modules()):
            if type(module) is nn.Linear:
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, attr, _make(mode, module.weight.detach(),
                                            module.bias, act))
    if "lm_head" in model._modules:
        model.lm_head = _make(head_mode(mode), model.lm_head.weight.detach(), None, act)
    _quantize_embedding(model, model.tok_emb.weight.detach(), mode, act)
    model.to(act)  # norms, biases, positions; the quantized tensors keep their dtypes
    _keep_rotary_fp32(model)
    return model


def head_mode(mode: str) -> str:
    """How the LM head is quantized in ``mode``. The head [vocab, d_model] is the largest
    matrix; int8 per row keeps the logits closest, and its table doubles as the embedding."""
    return "int8" if mode in ("int8", "int4") else mode


def _quantize_embedding(model: nn.Module, table: torch.Tensor, mode: str,
                        act: torch.dtype) -> None:
    """The embedding as int8 rows; with tied embeddings also the LM head, one shared table."""
    if model.cfg.tie_embeddings:
        model.lm_head = _make(head_mode(mode), table, None, act)
        if isinstance(model.lm_head, Int8Linear):
            model.tok_emb = Int8Embedding(model.lm_head.qweight, model.lm_head.scale, act)
            return
    model.tok_emb = Int8Embedding.from_float(table, act)


def _keep_rotary_fp32(model: nn.Module) -> None:
    for name in ("rotary", "rotary_local"):
        rot = getattr(model, name, None)
        if rot is not None:
            rot.to(torch.float32)
