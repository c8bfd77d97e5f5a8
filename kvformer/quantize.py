"""Weight-only quantization: int8 per output channel, int4 per group of input columns.

Only weights are quantized: the linear layers of the blocks, and the LM head and embedding
as one shared int8 table (``Int8Embedding``). Activations stay bf16, because torch's CPU
kernels for packed weights are fast only with bf16 inputs. The model code never learns it
is quantized: ``nn.Linear`` modules are swapped for ``Int8Linear`` / ``Int4Linear`` modules
with the same ``forward(x)``, which use the packed kernels for a few rows (decode) and
unpack the weight to a dense bf16 matmul for many (prefill).

    int8:  w[n, k] ~= q[n, k] * scale[n]                     q in [-127, 127]
    int4:  w[n, k] ~= (q[n, k] - 8) * scale[n, g] + zero[n, g]   q in [0, 15], g = k // group

The int4 form is the same as GGUF's Q4_1 blocks (``d * q + m`` with ``zero = m + 8 d``), so a
Q4_1 file requantized at group 32 keeps its grid: the round trip loses only the rounding of
the scales to bf16.

Two ways in:

* ``quantize_model(model, mode)`` converts a model that is already built;
* ``build_model(cfg, tensors, mode)`` builds one from ``(name, tensor)`` pairs arriving one at
  a time (a loader's iterator) into an untouched skeleton, quantizing each weight as it
  arrives, so a quantized model never holds a full-precision copy of its weights.

Both fuse Q/K/V and gate/up into one quantized matrix per layer (the decode steps of
``kvformer.fast`` and ``kvformer.native`` make one call for each); the model's own
``wq``/``wk``/``wv`` and ``w_gate``/``w_up`` become row slices that share its storage.
A quantized model's state_dict holds packed tensors: save models before quantizing them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import ModelConfig

MODES = ("fp32", "bf16", "fp16", "int8", "int4")
DENSE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACT_DTYPE = torch.bfloat16  # what the packed-weight kernels are fast with
INT4_GROUP = 32
INT4_BLOCK_N = 64  # rows are packed in blocks of 64 (32 low nibbles + 32 high nibbles)
# At or above this many rows of input, unpack the weight once and use a dense bf16 matmul
# (prefill); below it, the packed kernels (decode) are faster.
DENSE_ROWS = 64

_int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_int4_pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu.default
_int8_mm = torch.ops.aten._weight_int8pack_mm.default


# --------------------------------------------------------------------------- the maths
_CHUNK = 1 << 17  # quantize this many weights at a time: temporaries stay under a MB
# Prefill unpacks a weight to bf16 this many weights at a time (a few MB): large enough
# that each piece is one efficient matmul, small enough not to hold a big matrix whole.
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


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max int4 per group of ``group`` input columns (GGUF Q4_1's form):
    (q uint8 [N, K] in 0..15, scale fp32 [N, K/group], zero fp32 [N, K/group]) with
    w ~= (q - 8) * scale + zero."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.uint8)
    scale, zero = torch.empty(n, k // group), torch.empty(n, k // group)
    for a, b, piece in _stacked_rows([w], max(1, _CHUNK // max(k, 1))):
        wg = piece.to(torch.float32, copy=True).reshape(b - a, k // group, group)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        s = (hi - lo).div_(15).clamp_(min=1e-10)
        q[a:b] = wg.sub_(lo[..., None]).div_(s[..., None]).round_().clamp_(0, 15).view(b - a, k)
        scale[a:b], zero[a:b] = s, lo.add_(s, alpha=8)
    return q, scale, zero


def int4_supported(n: int, k: int, group: int = INT4_GROUP) -> bool:
    return n % INT4_BLOCK_N == 0 and k % group == 0 and k % 2 == 0


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] in 0..15 -> torch's CPU int4 layout, uint8 [N, K/2]: for each block
    of 64 rows and each column k, 32 bytes whose low nibble is row i and high nibble row
    i + 32 of the block. Rows stay in blocks, so a slice of rows at a multiple of 64 is
    a slice of the packed tensor."""
    return _int4_pack(q.to(torch.int32).contiguous(), 1)


def unpack_int4_t(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of ``pack_int4``, transposed: uint8 [K, N] (the layout a dense matmul of
    x [M, K] by it wants)."""
    p = packed.view(n // INT4_BLOCK_N, k, INT4_BLOCK_N // 2)
    q = torch.cat([p & 15, p >> 4], dim=-1)  # [N/64, K, 64]: row-in-block is the last dim
    return q.permute(1, 0, 2).reshape(k, n)


# --------------------------------------------------------------------------- modules
class QuantizedLinear(nn.Module):
    """Common part: shapes, bias, and the switch between the packed kernel (few rows) and
    a dense bf16 matmul of the unpacked weight (many rows)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(
            bias.detach().to(ACT_DTYPE), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(ACT_DTYPE)
        if x2.shape[0] >= DENSE_ROWS:
            y = self.dense_mm(x2)
        else:
            y = self.packed_mm(x2)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dense_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T (+ b) through a dense bf16 matmul, unpacking the weight a block of rows at
        a time (a few MB), never the whole of a large matrix at once."""
        n, k = self.out_features, self.in_features
        step = max(INT4_BLOCK_N, _DENSE_CHUNK // k // INT4_BLOCK_N * INT4_BLOCK_N)
        if n <= step:
            return F.linear(x, self.dequantize(ACT_DTYPE), self.bias)
        y = torch.empty(x.shape[0], n, dtype=ACT_DTYPE)
        for a in range(0, n, step):
            part = self.rows(a, min(a + step, n))
            y[:, a:a + step] = F.linear(x, part.dequantize(ACT_DTYPE), part.bias)
        return y

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
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
    """int8 weights with one bf16 scale per output row; ``torch._weight_int8pack_mm``."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(ACT_DTYPE))

    @classmethod
    def from_float(cls, weight: torch.Tensor | list[torch.Tensor],
                   bias: torch.Tensor | None = None) -> Int8Linear:
        """Quantize ``weight`` [N, K], or a list of matrices as if stacked (a fused layer)."""
        q, scale = quantize_int8(weight)
        return cls(q, scale, bias)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return _int8_mm(x, self.qweight, self.scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if dtype == self.scale.dtype:  # bf16 (prefill): no float32 temporary; the same
            # values, since q * scale is exact in float32 and rounded once either way
            return self.qweight.to(dtype).mul_(self.scale[:, None])
        w = self.qweight.to(torch.float32) * self.scale.float()[:, None]
        return w.to(dtype)

    def rows(self, start: int, end: int) -> Int8Linear:
        bias = None if self.bias is None else self.bias[start:end]
        return Int8Linear(self.qweight[start:end], self.scale[start:end], bias)


class Int8Embedding(nn.Module):
    """An embedding table looked up from int8 rows and their scales: with tied embeddings
    it shares the int8 LM head's storage, so the table is held once, in a quarter of fp32."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(ACT_DTYPE))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Embedding:
        return cls(*quantize_int8(weight))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.qweight).to(ACT_DTYPE)
        return rows.mul_(F.embedding(tokens, self.scale.unsqueeze(1)))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Int4Linear(QuantizedLinear):
    """int4 weights, min/max per group of input columns, in torch's packed CPU layout;
    ``torch.ops.aten._weight_int4pack_mm_for_cpu``. scales_and_zeros is [K/group, N, 2]."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
                 in_features: int, bias: torch.Tensor | None = None):
        super().__init__(in_features, packed.shape[0], bias)
        self.group = group
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(ACT_DTYPE))

    @classmethod
    def from_float(cls, weight: torch.Tensor | list[torch.Tensor],
                   bias: torch.Tensor | None = None, group: int = INT4_GROUP) -> Int4Linear:
        """Quantize ``weight`` [N, K], or a list of matrices as if stacked (a fused layer,
        built without the stacked copy), a few blocks of 64 rows at a time."""
        parts = _as_parts(weight)
        n, k = _stack_shape(parts)
        for p in parts:
            if not int4_supported(p.shape[0], k, group):
                raise ValueError(f"int4 needs out_features % {INT4_BLOCK_N} == 0 and "
                                 f"in_features % {group} == 0, got {p.shape[0]} x {k}")
        packed = torch.empty(n, k // 2, dtype=torch.uint8)
        sz = torch.empty(k // group, n, 2, dtype=ACT_DTYPE)  # [K/g, N, (scale, zero)]
        step = max(1, _CHUNK // k // INT4_BLOCK_N) * INT4_BLOCK_N
        for lo, hi, piece in _stacked_rows(parts, step):
            q, scale, zero = quantize_int4(piece, group)
            packed[lo:hi] = pack_int4(q)
            sz[:, lo:hi, 0] = scale.t()
            sz[:, lo:hi, 1] = zero.t()
        return cls(packed, sz, group, k, bias)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros
        if not sz.is_contiguous():  # a row slice of a fused matrix (model.forward path)
            sz = sz.contiguous()
        return _int4_mm(x, self.packed, self.group, sz)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_t(dtype).t()

    def dequantize_t(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The transposed weight, [in_features, out_features], contiguous."""
        n, k, g = self.out_features, self.in_features, self.group
        if dtype == ACT_DTYPE and _native_ready():
            return torch.ops.kvformer_native.dequant_int4_t(self.packed, self.scales_and_zeros,
                                                             g)
        q = unpack_int4_t(self.packed, n, k).view(k // g, g, n).to(torch.float32)
        sz = self.scales_and_zeros.float()
        scale, zero = sz[..., 0].unsqueeze(1), sz[..., 1].unsqueeze(1)  # [K/g, 1, N]
        w = torch.addcmul(zero, q.sub_(8), scale)
        return w.view(k, n).to(dtype)

    def rows(self, start: int, end: int) -> Int4Linear:
        bias = None if self.bias is None else self.bias[start:end]
        return Int4Linear(self.packed[start:end], self.scales_and_zeros[:, start:end],
                          self.group, self.in_features, bias)


def _native_ready() -> bool:
    """Whether kvformer.native's operators are loaded (never builds them from here)."""
    from . import native

    return native.available(build=False)


def _make(mode: str, weight: torch.Tensor | list[torch.Tensor], bias: torch.Tensor | None,
          group: int = INT4_GROUP) -> nn.Module:
    """A quantized linear layer for ``weight`` [N, K] (or a list of matrices to stack into
    one fused layer); int4 falls back to int8 for shapes the int4 kernel cannot take."""
    parts = _as_parts(weight)
    if mode == "int4" and all(int4_supported(p.shape[0], p.shape[1], group) for p in parts):
        return Int4Linear.from_float(parts, bias, group)
    return Int8Linear.from_float(parts, bias)


# --------------------------------------------------------------------------- whole models
# Linear layers fused into one quantized matrix per layer: (fused name, parts) per module.
FUSED = {"attn": ("wqkv", ("wq", "wk", "wv")), "mlp": ("w_gate_up", ("w_gate", "w_up"))}


ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", torch.float32: "fp32",
           torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_mode(mode) -> str:
    """'fp32', 'bf16', 'fp16', 'int8' or 'int4' (torch dtypes and long names accepted)."""
    mode = ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"dtype {mode!r} is not one of {', '.join(MODES)}")
    return mode


def loader_dtype(mode) -> torch.dtype:
    """The dtype to ask a checkpoint loader for when building in ``mode``: quantized models
    are built from bf16 tensors (half the transient memory of fp32; a Q4_1 file's grid
    survives bf16 exactly enough to be requantized to the same integers)."""
    mode = check_mode(mode)
    return DENSE.get(mode, torch.bfloat16)


def default_mode(weight_types: Iterable[str] = ()) -> str:
    """The dtype to load in when none is asked for, from the type names of the checkpoint's
    tensors (e.g. GGUF 'Q4_1', 'Q8_0', 'F32'): int4 when most block-quantized weights
    are already 4-bit (GGUF Q4_0/Q4_1/Q4_K: requantizing them to int4 groups of 32 keeps
    their quality), int8 otherwise (per-channel int8 keeps fp32's perplexity within ~0.5 %)."""
    blocks = [t.upper() for t in weight_types if t.upper().startswith("Q")]  # not F32 norms
    four_bit = sum(t.startswith("Q4") for t in blocks)
    return "int4" if blocks and four_bit * 2 > len(blocks) else "int8"


def _dense_dtype(mode: str) -> torch.dtype:
    return DENSE.get(mode, torch.bfloat16)


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


def _fusable(mode: str, sizes: list[int], k: int, group: int) -> bool:
    if mode == "int8":
        return True
    return all(int4_supported(n, k, group) for n in sizes)


def quantize_model(model: nn.Module, mode: str, group: int = INT4_GROUP) -> nn.Module:
    """Convert a built model in place to ``mode`` ('fp32', 'bf16', 'int8' or 'int4') and
    return it. For int8/int4 every linear layer of the blocks is quantized, the LM head
    and the embedding become int8 (one shared table when they are tied), and everything
    else is bf16."""
    mode = check_mode(mode)
    if mode in DENSE:
        model.to(_dense_dtype(mode))
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
            if _fusable(mode, [lin.out_features for lin in linears], k, group):
                w = [lin.weight.detach() for lin in linears]
                b = (torch.cat([lin.bias.detach() for lin in linears])
                     if linears[0].bias is not None else None)
                _fuse_into(owner, fused_name, parts, _make(mode, w, b, group))
        for name, module in list(block.named_modules()):
            if type(module) is nn.Linear:
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, attr, _make(mode, module.weight.detach(),
                                            module.bias, group))
    if "lm_head" in model._modules:
        model.lm_head = _make(head_mode(mode), model.lm_head.weight.detach(), None, group)
    _quantize_embedding(model, model.tok_emb.weight.detach(), mode, group)
    model.to(ACT_DTYPE)  # norms, biases, positions; integer buffers are untouched
    _keep_rotary_fp32(model)
    return model


def head_mode(mode: str) -> str:
    """How the LM head is quantized in ``mode``. The head [vocab, d_model] is the largest
    matrix; int8 per row keeps the logits closest, and its table doubles as the embedding."""
    return "int8" if mode in ("int8", "int4") else mode


def _quantize_embedding(model: nn.Module, table: torch.Tensor, mode: str, group: int) -> None:
    """The embedding as int8 rows; with tied embeddings also the LM head, one shared table."""
    if model.cfg.tie_embeddings:
        model.lm_head = _make(head_mode(mode), table, None, group)
        if isinstance(model.lm_head, Int8Linear):
            model.tok_emb = Int8Embedding(model.lm_head.qweight, model.lm_head.scale)
            return
    model.tok_emb = Int8Embedding.from_float(table)


def _keep_rotary_fp32(model: nn.Module) -> None:
    rot = getattr(model, "rotary", None)
    if rot is not None:
        rot.to(torch.float32)


# --------------------------------------------------------------------------- streaming build
class _SkipInit(TorchFunctionMode):
    """Inside: ``torch.nn.init`` does nothing, so a model can be built as a skeleton whose
    parameters are allocated but never touched (no resident memory, no time) and then
    replaced. (The meta device would do too, but its first use imports ~70 MB of Python.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def empty_model(cfg: ModelConfig) -> nn.Module:
    """A ``Transformer`` skeleton to receive weights: its parameters are uninitialised."""
    from .model import Transformer

    with _SkipInit():
        return Transformer(cfg)


def build_model(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                mode: str = "fp32", group: int = INT4_GROUP) -> nn.Module:
    """Build a ``Transformer`` in ``mode`` from ``(kvformer name, tensor)`` pairs that arrive
    one at a time (e.g. ``iter_gguf_tensors``), never holding the whole model in full
    precision: the model starts as an untouched skeleton, each linear weight is quantized
    when it arrives (the parts of a fused matrix wait for each other: one layer's worth at
    most) and every other tensor is assigned in place. The result is the model that
    ``quantize_model`` makes from the same weights."""
    from .errors import CheckpointError

    mode = check_mode(mode)
    model = empty_model(cfg)
    quantized = mode in ("int8", "int4")
    expected = set(model.state_dict())
    seen: set[str] = set()
    # A quantized layer is made once all the tensors it needs have arrived:
    # needs[module name] = (names it waits for, the modules it replaces, their owner).
    waiting: dict[str, dict[str, torch.Tensor]] = {}
    needs: dict[str, tuple[list[str], tuple[str, ...], str]] = {}
    if quantized:
        for name, module in model.named_modules():
            if type(module) is nn.Linear:
                owner, _, child = name.rpartition(".")
                needs[name] = (_linear_names(name, module), (child,), owner)
        for i, block in enumerate(model.layers):
            for owner_name, (_, parts) in FUSED.items():
                owner = getattr(block, owner_name)
                lins = [getattr(owner, p, None) for p in parts]
                if any(lin is None for lin in lins) or not _fusable(
                        mode, [lin.out_features for lin in lins], lins[0].in_features, group):
                    continue
                prefix = f"layers.{i}.{owner_name}"
                names = [n for p, lin in zip(parts, lins)
                         for n in _linear_names(f"{prefix}.{p}", lin)]
                for p in parts:
                    needs[f"{prefix}.{p}"] = (names, parts, prefix)

    for name, tensor in tensors:
        if name not in expected:
            raise CheckpointError(f"weight {name!r} has no place in this model")
        seen.add(name)
        module_name, _, attr = name.rpartition(".")
        if module_name in needs:
            names, parts, owner_name = needs[module_name]
            key = f"{owner_name}:{'+'.join(parts)}"
            got = waiting.setdefault(key, {})
            got[name] = tensor.detach()
            if len(got) == len(names):
                del waiting[key]
                _install(model, owner_name, parts, [got.pop(n) for n in names], mode, group)
                _release_freed_memory()
            continue
        if quantized and name == "tok_emb.weight":
            _quantize_embedding(model, tensor.detach(), mode, group)
            del tensor
            _release_freed_memory()
            continue
        _assign(model.get_submodule(module_name), attr, tensor,
                _dense_dtype(mode) if tensor.is_floating_point() else None)
    missing = sorted(expected - seen)
    if missing or waiting:
        raise CheckpointError(f"weights do not match the config: missing "
                              f"{(missing or sorted(waiting))[:5]}")
    return model.eval()


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the system (glibc keeps the holes that the full-size
    temporaries leave; without this the peak RSS of a load grows by ~100 MB)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _linear_names(name: str, linear: nn.Linear) -> list[str]:
    return [f"{name}.weight"] + ([f"{name}.bias"] if linear.bias is not None else [])


def _install(model: nn.Module, owner_name: str, parts: tuple[str, ...],
             tensors: list[torch.Tensor], mode: str, group: int) -> None:
    """Quantize the (weight[, bias]) tensors of ``parts`` of ``owner_name`` into one layer
    (fused when there are several parts) and put it in the model."""
    owner = model.get_submodule(owner_name)
    has_bias = getattr(owner, parts[0]).bias is not None
    step = 2 if has_bias else 1
    w = tensors[0::step]  # quantized as if stacked, never concatenated
    b = (torch.cat(tensors[1::step]) if len(parts) > 1 else tensors[1]) if has_bias else None
    if len(parts) == 1:
        layer_mode = head_mode(mode) if (owner_name, parts[0]) == ("", "lm_head") else mode
        owner.add_module(parts[0], _make(layer_mode, w, b, group))
    else:
        fused_name = next(f for f, ps in FUSED.values() if ps == parts)
        _fuse_into(owner, fused_name, parts, _make(mode, w, b, group))


def _assign(module: nn.Module, attr: str, tensor: torch.Tensor,
            dtype: torch.dtype | None) -> None:
    t = tensor.detach() if dtype is None else tensor.detach().to(dtype)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(t, requires_grad=t.is_floating_point())
    else:
        module._buffers[attr] = t
