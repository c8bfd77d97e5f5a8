"""Building a ``Transformer`` from a checkpoint's tensors, in the weights' form the user asked
for, and the state a quantized model is saved as.

``build_model(cfg, tensors, mode)`` builds a model from ``(name, tensor)`` pairs arriving one
at a time (a loader's iterator) into an untouched skeleton, quantizing each weight as it
arrives (``kvformer.runtime.quant``'s layers), so a quantized model never holds a
full-precision copy of its weights; the result is what ``quantize_model`` makes from the same
weights. ``saveable_state`` and ``load_quantized`` write and read kvformer's own int8/int4
layout as it is (``kvformer.formats.native`` puts it in files).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from kvformer.config import ModelConfig
from kvformer.errors import CheckpointError
from kvformer.model.transformer import Transformer
from kvformer.runtime.kb import KbBlocks, KbEmbedding, KbLinear, kb_layer
from kvformer.runtime.quant import (
    DENSE,
    FUSED,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QuantizedLinear,
    _floats,
    _fusable,
    _fuse_into,
    _keep_rotary_fp32,
    _make,
    _quantize_embedding,
    act_dtype,
    check_mode,
    head_mode,
)


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
    """A ``Transformer`` skeleton to receive weights: its parameters are uninitialised. A
    config too large to allocate (a wrong header) is a CheckpointError in one line."""
    try:
        with _SkipInit():
            return Transformer(cfg)
    except RuntimeError as exc:
        if "allocate" not in str(exc):
            raise
        raise CheckpointError(
            f"the config asks for {cfg.num_params():,} parameters, more than this machine "
            "can allocate; the checkpoint's config is wrong (compare its sizes with its "
            "tensors) or the model is too large for this machine") from None


def build_model(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                mode: str = "fp32", act: torch.dtype | None = None,
                weight_types: dict[str, str] | None = None) -> nn.Module:
    """Build a ``Transformer`` in ``mode`` from ``(kvformer name, tensor)`` pairs that arrive
    one at a time (e.g. ``iter_gguf_tensors``), never holding the whole model in full
    precision: the model starts as an untouched skeleton, each linear weight is quantized
    when it arrives (the parts of a fused matrix wait for each other: one layer's worth at
    most) and every other tensor is assigned in place. The result is the model that
    ``quantize_model`` makes from the same weights.

    mode "gguf" takes a GGUF file's matrices as they arrive from ``iter_gguf_tensors(...,
    kb=True)`` (``KbBlocks``: the file's own blocks) and keeps them so: ``KbLinear`` layers
    (``Int4Linear`` for Q4_0/Q4_1), a ``KbEmbedding``, the tied head on the same storage;
    ``weight_types`` (kvformer name -> the file's type) says which parts share a type and
    so can be fused."""
    mode = check_mode(mode)
    quantized = mode in ("int8", "int4", "gguf")
    act = act or act_dtype()
    dense = act if quantized else DENSE[mode]
    model = empty_model(cfg)
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
                prefix = f"layers.{i}.{owner_name}"
                if any(lin is None for lin in lins) or not _fusable(
                        mode, [lin.out_features for lin in lins], lins[0].in_features):
                    continue
                if mode == "gguf" and not _same_kb_type(
                        weight_types or {}, [f"{prefix}.{p}" for p in parts], lins):
                    continue
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
                _install(model, owner_name, parts, [got.pop(n) for n in names], mode, act)
                _release_freed_memory()
            continue
        if mode == "gguf" and name == "tok_emb.weight" and isinstance(tensor, KbBlocks):
            _kb_embedding(model, tensor, act)
            continue
        tensor = _floats(tensor)  # only linear layers take int4 blocks as they are
        if quantized and mode != "gguf" and name == "tok_emb.weight":
            _quantize_embedding(model, tensor.detach(), mode, act)
            del tensor
            _release_freed_memory()
            continue
        _assign(model.get_submodule(module_name), attr, tensor,
                dense if tensor.is_floating_point() else None)
    missing = sorted(expected - seen)
    if missing or waiting:
        raise CheckpointError(f"weights do not match the config: missing "
                              f"{(missing or sorted(waiting))[:5]}")
    return model.eval()


# --------------------------------------------------------------------------- saving and loading
LAYOUT = "kvformer-1"  # int4: tiles of 16 rows x blocks of 32, fp16 (d, m); int8: rows + fp32


def quantized_mode(model: nn.Module) -> str | None:
    """'int8' or 'int4' for a quantized model (int4 if any layer is), else None."""
    kinds = {type(m) for m in model.modules()}
    if Int4Linear in kinds:
        return "int4"
    return "int8" if kinds & {Int8Linear, Int8Embedding} else None


def saveable_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors that describe ``model`` once each, and what config.json needs to rebuild
    it: a quantized model's state_dict also holds the row slices of its fused matrices and,
    with tied embeddings, the LM head's table twice; those are left out (``load_quantized``
    makes them again)."""
    if any(isinstance(m, (KbLinear, KbEmbedding)) for m in model.modules()):
        raise CheckpointError(
            "this model runs a GGUF file's own blocks (dtype 'auto'), which kvformer's "
            "format does not store yet; load it with dtype 'int4' or 'int8' to save it")
    state = model.state_dict()
    mode = quantized_mode(model)
    if mode is None:
        return state, {}
    drop: set[str] = set()
    for i, block in enumerate(model.layers):
        for owner_name, (fused_name, parts) in FUSED.items():
            owner = getattr(block, owner_name)
            if fused_name in owner._modules:
                drop |= {f"layers.{i}.{owner_name}.{p}." for p in parts}
    if model.cfg.tie_embeddings and isinstance(model.tok_emb, Int8Embedding):
        drop.add("tok_emb.")
    state = {k: v for k, v in state.items() if not any(k.startswith(d) for d in drop)}
    return state, {"quantization": {"mode": mode, "layout": LAYOUT}}


def load_quantized(cfg: ModelConfig, state: dict[str, torch.Tensor], meta: dict,
                   act: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model saved by ``kvformer.save`` after quantizing: each linear layer is
    an Int4Linear (``qweight`` + ``scales``), an Int8Linear (``qweight`` + ``scale``) or a
    dense one, as saved; fused layers get their row slices back and a tied head shares its
    table with the embedding again. The bytes are used as they are (no requantization)."""
    if meta.get("layout") != LAYOUT:
        raise CheckpointError(f"quantized with layout {meta.get('layout')!r}, which this "
                              f"kvformer does not read (it reads {LAYOUT!r})")
    act = act or act_dtype()
    model = empty_model(cfg)
    # safetensors hands out tensors at the file's offsets; torch's own int8/int4 kernels
    # (the fallback without native code) crash on weights that are not 64-byte aligned
    state = {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in state.items()}

    def take(prefix: str) -> nn.Module | None:
        bias = state.pop(f"{prefix}.bias", None)
        if f"{prefix}.scales" in state:
            return Int4Linear(state.pop(f"{prefix}.qweight"), state.pop(f"{prefix}.scales"),
                              bias, act)
        if f"{prefix}.scale" in state:
            return Int8Linear(state.pop(f"{prefix}.qweight"), state.pop(f"{prefix}.scale"),
                              bias, act)
        if bias is not None:
            state[f"{prefix}.bias"] = bias
        return None

    try:
        for i, block in enumerate(model.layers):
            for owner_name, (fused_name, parts) in FUSED.items():
                owner = getattr(block, owner_name)
                fused = take(f"layers.{i}.{owner_name}.{fused_name}")
                if fused is not None:
                    _fuse_into(owner, fused_name, parts, fused)
            for name, module in list(block.named_modules()):
                if type(module) is nn.Linear:
                    layer = take(f"layers.{i}.{name}")
                    if layer is not None:
                        parent, _, attr = name.rpartition(".")
                        setattr(block.get_submodule(parent) if parent else block, attr, layer)
        head = take("lm_head")
        if head is not None:
            model.lm_head = head
        if "tok_emb.qweight" in state:
            model.tok_emb = Int8Embedding(state.pop("tok_emb.qweight"), state.pop("tok_emb.scale"),
                                          act)
        elif cfg.tie_embeddings and isinstance(head, Int8Linear):
            model.tok_emb = Int8Embedding(head.qweight, head.scale, act)
        quantized = tuple(f"{n}." for n, m in model.named_modules()
                          if isinstance(m, (QuantizedLinear, Int8Embedding)))
        expected = {k for k in model.state_dict() if not k.startswith(quantized)}
        for name, tensor in state.items():
            if name not in expected:
                raise CheckpointError(f"weight {name!r} has no place in this model")
            module_name, _, attr = name.rpartition(".")
            _assign(model.get_submodule(module_name), attr, tensor,
                    act if tensor.is_floating_point() else None)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"the quantized weights do not match the config ({exc})") from exc
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"weights do not match the config: missing {missing[:5]}")
    _keep_rotary_fp32(model)
    return model.eval()


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the system (glibc keeps the holes that the full-size
    temporaries leave; without this the peak RSS of a load grows by ~100 MB)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _same_kb_type(types: dict[str, str], prefixes: list[str], lins: list[nn.Module]) -> bool:
    """Whether the parts of a fused matrix come as kb blocks of one type (a Q4_K_M file's
    V rows are often Q6_K where Q and K are Q4_K: those stay three layers)."""
    got = {types.get(f"{p}.weight") for p in prefixes}
    return len(got) == 1 and None not in got and all(lin.out_features % 16 == 0 for lin in lins)


def _kb_embedding(model: nn.Module, blocks: KbBlocks, act: torch.dtype) -> None:
    """The embedding from the file's blocks; with tied embeddings the head is a layer on the
    same storage."""
    model.tok_emb = KbEmbedding(blocks, act)
    if model.cfg.tie_embeddings:
        model.lm_head = kb_layer([blocks], None, act)


def _gguf_layer(w: list, bias: torch.Tensor | None, act: torch.dtype) -> nn.Module:
    """A GGUF matrix as the file stores it: kb blocks as a kb layer; a float matrix (F16,
    F32, or rows that are not tiles of 16) as a dense layer in the activations' dtype."""
    if all(isinstance(p, KbBlocks) for p in w):
        return kb_layer(w, bias, act)
    if len(w) != 1:
        raise CheckpointError("a fused matrix mixes block types")  # _same_kb_type prevents it
    layer = nn.Linear(w[0].shape[1], w[0].shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(_floats(w[0]).to(act), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(act), requires_grad=False)
    return layer


def _linear_names(name: str, linear: nn.Linear) -> list[str]:
    return [f"{name}.weight"] + ([f"{name}.bias"] if linear.bias is not None else [])


def _install(model: nn.Module, owner_name: str, parts: tuple[str, ...],
             tensors: list[torch.Tensor], mode: str, act: torch.dtype) -> None:
    """Quantize the (weight[, bias]) tensors of ``parts`` of ``owner_name`` into one layer
    (fused when there are several parts) and put it in the model."""
    owner = model.get_submodule(owner_name)
    has_bias = getattr(owner, parts[0]).bias is not None
    step = 2 if has_bias else 1
    w = tensors[0::step]  # quantized as if stacked, never concatenated
    b = (torch.cat(tensors[1::step]) if len(parts) > 1 else tensors[1]) if has_bias else None
    if b is not None:
        b = _floats(b)
    if mode == "gguf":
        layer = _gguf_layer(w, b, act)
    else:
        head = (owner_name, parts) == ("", ("lm_head",))
        layer = _make(head_mode(mode) if head else mode, w, b, act)
    if len(parts) == 1:
        owner.add_module(parts[0], layer)
    else:
        fused_name = next(f for f, ps in FUSED.values() if ps == parts)
        _fuse_into(owner, fused_name, parts, layer)


def _assign(module: nn.Module, attr: str, tensor: torch.Tensor,
            dtype: torch.dtype | None) -> None:
    t = tensor.detach() if dtype is None else tensor.detach().to(dtype)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(t, requires_grad=t.is_floating_point())
    else:
        module._buffers[attr] = t
