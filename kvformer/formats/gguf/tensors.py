"""GGUF tensors under kvformer's names: the name tables, the shapes a config expects, the
checks made before any data is read, and the loading itself (one tensor at a time).

For the ``llama`` architecture llama.cpp's converter permutes the rows of Q and K (per head,
from Hugging Face's rotate-half layout to the interleaved pairs llama.cpp rotates)::

    gguf = hf.reshape(n, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(hf.shape)

with ``n = n_head`` for Q and ``n = n_kv_head`` for K. The inverse used at load time is
``hf = gguf.reshape(n, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(gguf.shape)``.
Qwen2, Qwen3, Gemma 2/3, Phi-3 (NEOX rope in llama.cpp) and GPT-2 are stored unpermuted.
GPT-2's and Phi-3's fused ``attn_qkv`` is stored in Linear layout ``[q; k; v]`` along the
rows; Phi-3's ``ffn_up`` holds ``[gate; up]``. Gemma's RMSNorm weights are stored as 1 + w
(the multiplier), which is kvformer's form. A tensor kvformer has no place for is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from kvformer.config import ModelConfig
from kvformer.errors import CheckpointError, UnsupportedArchitectureError
from kvformer.formats.gguf.blocks import KB_TYPES, kb_buffers, kb_shape_ok, to_kb
from kvformer.formats.gguf.config import (
    GGUF_ARCHITECTURES,
    GGUF_ROPE_TENSORS,
    _factor_values,
    config_from_gguf,
)
from kvformer.formats.gguf.dequant import SUPPORTED_TENSOR_TYPES, dequantize
from kvformer.formats.gguf.kbcache import KbCache
from kvformer.formats.gguf.reader import GGUFFile, GGUFTensorInfo, _load_one
from kvformer.runtime.kb import KbBlocks
from kvformer.runtime.quant import FUSED, Int4Blocks

__all__ = [
    "GGUF_FUSED_QKV",
    "GGUF_TENSOR_NAMES",
    "expected_shapes",
    "iter_gguf_tensors",
    "load_gguf",
]

# GGUF name -> kvformer name. "{i}" stands for the layer index.
GGUF_TENSOR_NAMES: dict[str, str] = {
    "token_embd.weight": "tok_emb.weight",
    "position_embd.weight": "pos_emb.weight",
    "output_norm.weight": "norm.weight",
    "output_norm.bias": "norm.bias",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_norm.bias": "layers.{i}.attn_norm.bias",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.wq.weight",
    "blk.{i}.attn_q.bias": "layers.{i}.attn.wq.bias",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.wk.weight",
    "blk.{i}.attn_k.bias": "layers.{i}.attn.wk.bias",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.wv.weight",
    "blk.{i}.attn_v.bias": "layers.{i}.attn.wv.bias",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.wo.weight",
    "blk.{i}.attn_output.bias": "layers.{i}.attn.wo.bias",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",
    "blk.{i}.ffn_norm.bias": "layers.{i}.mlp_norm.bias",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.w_gate.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.w_up.weight",
    "blk.{i}.ffn_up.bias": "layers.{i}.mlp.w_up.bias",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.w_down.weight",
    "blk.{i}.ffn_down.bias": "layers.{i}.mlp.w_down.bias",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.attn_post_norm.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.mlp_post_norm.weight",
}

# Fused GGUF tensors split row-wise into (q, k, v) kvformer tensors.
GGUF_FUSED_QKV: dict[str, tuple[str, str, str]] = {
    "blk.{i}.attn_qkv.weight": ("layers.{i}.attn.wq.weight", "layers.{i}.attn.wk.weight",
                                "layers.{i}.attn.wv.weight"),
    "blk.{i}.attn_qkv.bias": ("layers.{i}.attn.wq.bias", "layers.{i}.attn.wk.bias",
                              "layers.{i}.attn.wv.bias"),
}

# Phi-3 keeps gate and up in one matrix under ffn_up ([gate; up] rows).
GGUF_FUSED_GATE_UP: dict[str, tuple[str, str]] = {
    "blk.{i}.ffn_up.weight": ("layers.{i}.mlp.w_gate.weight", "layers.{i}.mlp.w_up.weight"),
}

# kvformer tensor (suffix after "layers.{i}.") -> which head count its rows are grouped by,
# for the rotary un-permutation.
_PERMUTED_ROWS: dict[str, str] = {
    "attn.wq.weight": "n_head",
    "attn.wq.bias": "n_head",
    "attn.wk.weight": "n_kv_head",
    "attn.wk.bias": "n_kv_head",
}


def _build_name_lookup(n_layer: int, arch: str | None = None
                       ) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    single: dict[str, str] = {}
    fused: dict[str, tuple[str, ...]] = {}
    fused_tables: dict[str, tuple[str, ...]] = dict(GGUF_FUSED_QKV)
    if GGUF_ARCHITECTURES.get(arch, {}).get("fused_gate_up"):
        fused_tables.update(GGUF_FUSED_GATE_UP)
    for src, dst in GGUF_TENSOR_NAMES.items():
        if src in fused_tables:
            continue
        if "{i}" in src:
            for i in range(n_layer):
                single[src.format(i=i)] = dst.format(i=i)
        else:
            single[src] = dst
    for src, dsts in fused_tables.items():
        for i in range(n_layer):
            fused[src.format(i=i)] = tuple(d.format(i=i) for d in dsts)
    return single, fused


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor (kvformer name -> shape) a model built from ``cfg`` holds."""
    d, hd, ff = cfg.d_model, cfg.head_dim, cfg.d_ff
    q_out, kv_out = cfg.n_head * hd, cfg.n_kv_head * hd
    norm_bias = cfg.bias and cfg.norm != "rmsnorm"
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (cfg.vocab_size, d)}
    if cfg.pos == "learned":
        shapes["pos_emb.weight"] = (cfg.max_seq_len, d)
    norms = ("attn_norm", "mlp_norm") + (("attn_post_norm", "mlp_post_norm")
                                         if cfg.post_norms else ())
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        for norm in norms:
            shapes[f"{p}{norm}.weight"] = (d,)
            if norm_bias:
                shapes[f"{p}{norm}.bias"] = (d,)
        for name, rows in (("wq", q_out), ("wk", kv_out), ("wv", kv_out)):
            shapes[f"{p}attn.{name}.weight"] = (rows, d)
            if cfg.qkv_bias:
                shapes[f"{p}attn.{name}.bias"] = (rows,)
        if cfg.qk_norm:
            shapes[p + "attn.q_norm.weight"] = shapes[p + "attn.k_norm.weight"] = (hd,)
        shapes[p + "attn.wo.weight"] = (d, q_out)
        if cfg.bias:
            shapes[p + "attn.wo.bias"] = (d,)
        mats = (("w_gate", (ff, d)),) if cfg.gated_mlp else ()
        mats += (("w_up", (ff, d)), ("w_down", (d, ff)))
        for name, shape in mats:
            shapes[f"{p}mlp.{name}.weight"] = shape
            if cfg.bias:
                shapes[f"{p}mlp.{name}.bias"] = shape[:1]
    shapes["norm.weight"] = (d,)
    if norm_bias:
        shapes["norm.bias"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def _unpermute_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row permutation (interleaved pairs -> rotate-half halves)."""
    rows = t.shape[0]
    half = rows // n // 2
    return t.reshape(n, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


def iter_gguf_tensors(path_or_reader, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                      int4_blocks: bool = False, kb: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(kvformer_name, tensor)`` one at a time, dequantized to ``dtype``.

    With ``int4_blocks``, the Q4_0/Q4_1 matrices of the layers come as
    :class:`kvformer.runtime.quant.Int4Blocks` instead (their integers and fp16 scales, not
    floats), for an int4 build that keeps the file's grid exactly.

    With ``kb``, every block-quantized matrix (the layers', the embedding, the head) comes as
    :class:`kvformer.runtime.kb.KbBlocks`: the file's integers and scales in kvformer's kb
    layout (``kvformer.formats.gguf.blocks``); a matrix whose rows are not tiles of 16 comes
    dequantized, and a type kb does not take (Q2_K, Q3_K, the 1-3 bit i-quants) is refused.

    Every tensor is checked against ``cfg`` (``check_tensors``: present, in its shape, its
    bytes inside the file) when this is called, before anything is yielded, so a caller can
    check a file before it allocates a model; each yielded tensor owns its memory (no view
    of the file). ``path_or_reader`` is a path, a :class:`GGUFFile` (left open) or a
    ``gguf.GGUFReader`` (its file is reopened).
    """
    if dtype is None:
        dtype = torch.float32
    own = not isinstance(path_or_reader, GGUFFile)
    if own and hasattr(getattr(path_or_reader, "data", None), "filename"):
        path_or_reader = path_or_reader.data.filename  # a gguf.GGUFReader: reopen its file
    f = GGUFFile(path_or_reader) if own else path_or_reader
    try:
        plan = check_tensors(f, cfg)
    except BaseException:
        if own:
            f.close()
        raise
    if kb:
        for gname, _ in plan:
            info = f.tensors[gname]
            if len(info.shape) == 2 and info.type_id not in KB_TYPES \
                    and info.type_id not in _FLOAT_IDS:
                if own:
                    f.close()
                raise CheckpointError(
                    f"{f.path}: tensor {gname!r} is {info.type_name}, a type kvformer has no "
                    "kernel for; load it with --dtype int8 (or int4) to re-quantize it, or use "
                    "a file quantized to Q4_K, Q5_K, Q6_K, Q8_0, Q4_0/Q4_1, Q5_0/Q5_1 or IQ4")
    return _iter_tensors(f, cfg, plan, dtype, int4_blocks, own, kb)


_FLOAT_IDS = {0, 1, 30}  # F32, F16, BF16


def check_tensors(f: GGUFFile, cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Everything about the file's tensors that loading would refuse, found without reading
    their data: each has a place in a ``cfg`` model and that place's shape, none is missing,
    each type is one kvformer decodes, and each one's bytes lie inside the file. Returns
    the plan: (GGUF name, kvformer names) in file order."""
    arch = f.metadata.get("general.architecture")
    if cfg.n_layer > len(f.tensors):
        raise CheckpointError(f"{f.path}: the config has {cfg.n_layer} layers but the file holds "
                              f"only {len(f.tensors)} tensors")
    single, fused = _build_name_lookup(cfg.n_layer, arch)
    expected = expected_shapes(cfg)

    # Plan: (gguf name, [kvformer names]) in file order; check everything before yielding.
    plan: list[tuple[str, tuple[str, ...]]] = []
    provided: dict[str, str] = {}
    for gname in f.tensors:
        if gname in single:
            targets: tuple[str, ...] = (single[gname],)
        elif gname in fused:
            targets = fused[gname]
        elif gname in GGUF_ROPE_TENSORS:
            _check_rope_tensor(f, gname, cfg)
            continue
        else:
            raise UnsupportedArchitectureError(
                f"{f.path}: tensor {gname!r} ({list(f.tensors[gname].shape)}) has no place in "
                f"a kvformer {arch} model; the file holds a variant kvformer does not "
                "implement")
        if gname == "output.weight" and cfg.tie_embeddings:
            continue  # tied config: the embedding serves as the output projection
        unknown = [t for t in targets if t not in expected]
        if unknown:
            raise CheckpointError(
                f"{f.path}: tensor {gname!r} ({', '.join(unknown)}) has no place in a model "
                f"with this config (bias={cfg.bias}, qkv_bias={cfg.qkv_bias}, pos={cfg.pos}, "
                f"mlp={cfg.mlp}); kvformer cannot run this variant")
        for t in targets:
            provided[t] = gname
        plan.append((gname, targets))
    missing = [name for name in expected if name not in provided]
    if missing:
        gguf_names = {v: k for k, v in single.items()}
        listed = ", ".join(f"{gguf_names.get(m, m)} (for {m})" for m in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"{f.path}: missing tensor(s) {listed}{more}; the file is "
                              "incomplete or not a complete model")
    for gname, targets in plan:
        info = f.tensors[gname]
        if info.type_name not in SUPPORTED_TENSOR_TYPES:
            raise CheckpointError(
                f"{f.path}: tensor {gname!r} is stored as {info.type_name}, a ggml type "
                f"kvformer cannot decode (supported types: {', '.join(SUPPORTED_TENSOR_TYPES)});"
                " convert the model to one of those")
        if len(targets) == 1:
            want = expected[targets[0]]
            if info.shape != want:
                raise CheckpointError(
                    f"{f.path}: tensor {gname!r} has shape {list(info.shape)} but the config "
                    f"expects {list(want)} for {targets[0]}; the metadata and tensors disagree")
        else:
            want_rows = sum(expected[t][0] for t in targets)
            want = (want_rows, *expected[targets[0]][1:])
            if info.shape != want:
                parts = " and ".join(t.rsplit(".", 2)[-2] for t in targets)
                raise CheckpointError(
                    f"{f.path}: fused tensor {gname!r} has shape {list(info.shape)} but the "
                    f"config expects {list(want)} ({parts} stacked)")
    f.check_tensor_data([g for g, _ in plan])
    return plan


def _iter_tensors(f: GGUFFile, cfg: ModelConfig, plan, dtype: torch.dtype,
                  int4_blocks: bool = False, own: bool = False, kb: bool = False
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        if kb:
            yield from _plan_kb(f, cfg, plan, dtype)
        else:
            yield from _plan_tensors(f, cfg, plan, dtype, int4_blocks)
    finally:
        if own:
            f.close()


def _plan_tensors(f: GGUFFile, cfg: ModelConfig, plan, dtype: torch.dtype,
                  int4_blocks: bool) -> Iterator[tuple[str, torch.Tensor]]:
    arch = f.metadata.get("general.architecture")
    permute = GGUF_ARCHITECTURES.get(arch, {}).get("permute_qk", False)
    expected = expected_shapes(cfg)
    for gname, targets in plan:
        info = f.tensors[gname]
        with _torch_threads(DEQUANT_THREADS):
            blocks = (int4_blocks and info.type_id in _INT4_BLOCKS and len(info.shape) == 2
                      and targets[0].startswith("layers.") and targets[0].endswith(".weight"))
            tensor = _load_int4_blocks(f, info) if blocks else _load_one(f, info, dtype)
            # The tensor owns a copy now. Drop the whole mapping, not only this tensor's
            # range: the kernel maps neighbouring pages in around each fault, and those
            # would otherwise pile up (~13 MB for SmolLM2). Cheap where nothing is mapped.
            f.drop_pages()
            if len(targets) == 1:
                name = targets[0]
                suffix = name.split(".", 2)[2] if name.startswith("layers.") else ""
                if permute and suffix in _PERMUTED_ROWS:
                    heads = getattr(cfg, _PERMUTED_ROWS[suffix])
                    tensor = _rows_of(tensor, lambda t, h=heads: _unpermute_rows(t, h))
                out = [(name, tensor)]
            else:
                sizes, out, row = [expected[t][0] for t in targets], [], 0
                for t, n in zip(targets, sizes):
                    out.append((t, _rows_of(tensor, lambda x, a=row, b=row + n: x[a:b].clone())))
                    row += n
            del tensor
        yield from out
        del out


def _plan_kb(f: GGUFFile, cfg: ModelConfig, plan, dtype: torch.dtype
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """The plan's tensors with every block-quantized matrix as KbBlocks: the rows of the
    stored bytes are permuted or split (llama's Q/K rows, fused Q/K/V) before the repack, so
    no number is touched."""
    arch = f.metadata.get("general.architecture")
    permute = GGUF_ARCHITECTURES.get(arch, {}).get("permute_qk", False)
    expected = expected_shapes(cfg)
    place = _fused_places(f, plan, expected)
    repacked = _kb_matrices(f, plan, expected)
    cache = KbCache(f, {t: (KB_TYPES[f.tensors[g].type_id][0], shape)
                        for t, (g, shape) in repacked.items()})
    stored = cache.lookup() if repacked else None
    keep = (stored is None and cache.wanted(sum(f.tensors[g].nbytes
                                                for g in {g for g, _ in repacked.values()})))
    made: list[tuple[str, KbBlocks]] = []
    for gname, targets in plan:
        info = f.tensors[gname]
        if len(info.shape) != 2 or info.type_id not in KB_TYPES:
            yield from _plan_tensors(f, cfg, [(gname, targets)], dtype, False)
            continue
        if stored is not None and all(t in stored for t in targets):
            yield from ((t, stored.pop(t)) for t in targets)  # mapped, not repacked
            continue
        n, k = info.shape
        rows = f.raw(gname).view(n, -1)
        where = f"{f.path}: tensor {gname!r}: "
        parts = []
        if len(targets) == 1:
            suffix = targets[0].split(".", 2)[2] if targets[0].startswith("layers.") else ""
            if permute and suffix in _PERMUTED_ROWS:
                rows = _unpermute_rows(rows, getattr(cfg, _PERMUTED_ROWS[suffix]))
            parts.append((targets[0], rows))
        else:
            at = 0
            for t in targets:
                parts.append((t, rows[at:at + expected[t][0]]))
                at += expected[t][0]
        out = []
        for name, part in parts:
            shape = (part.shape[0], k)
            if kb_shape_ok(info.type_id, *shape):
                out.append((name, to_kb(part.contiguous().view(-1), info.type_id, shape, where,
                                        out=place(name))))
                if keep:
                    made.append(out[-1])
            else:  # rows that are not tiles of 16: the numbers, dequantized exactly
                out.append((name, dequantize(part.contiguous().view(-1), info.type_id, shape,
                                             dtype)))
        f.drop_pages()
        del rows, parts
        yield from out
        del out
    if made:
        cache.store(made)


def _kb_matrices(f: GGUFFile, plan, expected: dict) -> dict[str, tuple[str, tuple[int, int]]]:
    """kvformer name -> (GGUF tensor, [n, k]) of every matrix ``_plan_kb`` repacks."""
    out = {}
    for gname, targets in plan:
        info = f.tensors[gname]
        if len(info.shape) != 2 or info.type_id not in KB_TYPES:
            continue
        k = info.shape[1]
        for t in targets:
            shape = (info.shape[0] if len(targets) == 1 else expected[t][0], k)
            if kb_shape_ok(info.type_id, *shape):
                out[t] = (gname, shape)
    return out


def _fused_places(f: GGUFFile, plan, expected: dict):
    """name -> its rows in one buffer shared by the parts of a fused layer (Q, K, V; gate,
    up) where they are kb matrices of one type: the repack writes each part in place, and
    the layer takes them as they lie (no concatenation, no second copy). None for others."""
    source = {t: f.tensors[g] for g, targets in plan for t in targets}
    slots: dict[str, tuple[list, int, int]] = {}  # name -> (the group's buffers, rows)
    for name in source:
        if not (name.startswith("layers.") and name.endswith(".weight")):
            continue
        i, owner, part = name.split(".")[1:4]
        if owner not in FUSED or part != FUSED[owner][1][0]:
            continue
        names = [f"layers.{i}.{owner}.{p}.weight" for p in FUSED[owner][1]]
        infos = [source.get(n) for n in names]
        if any(x is None for x in infos):
            continue
        type_id, k = infos[0].type_id, infos[0].shape[1]
        rows = [expected[n][0] for n in names]
        if not all(x.type_id == type_id and x.shape[1] == k and kb_shape_ok(type_id, r, k)
                   for x, r in zip(infos, rows)):
            continue
        group = [None, type_id, sum(rows), k]  # buffers made when the first part arrives
        at = 0
        for n, r in zip(names, rows):
            slots[n] = (group, at, at + r)
            at += r

    def place(name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if name not in slots:
            return None
        group, a, b = slots.pop(name)
        if group[0] is None:
            group[0] = kb_buffers(*group[1:])
        q, s = group[0]
        return q[a // 16:b // 16], s[a // 16:b // 16]

    return place


def _check_rope_tensor(f: GGUFFile, name: str, cfg: ModelConfig) -> None:
    """A rotary factor tensor is part of the config, not a weight: the config must carry
    exactly its values (config_from_gguf with the file does)."""
    key = GGUF_ROPE_TENSORS[name]
    scaling = cfg.rope_scaling or {}
    if list(scaling.get(key) or ()) != _factor_values(f, name):
        raise CheckpointError(
            f"{f.path}: {name} holds rotary scaling factors that the config does not carry; "
            "build the config with config_from_gguf(metadata, the file)")


# Threads torch may use while dequantizing. The work is memory-bound, and with 2+ threads on a
# busy machine OpenMP's barriers stall whenever one thread is descheduled: measured on 2 shared
# cores, SmolLM2 took 7-24 s with 2 threads and 1.5-2 s with 1 (about 0.5 s either way when idle).
DEQUANT_THREADS = 1


class _torch_threads:
    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        if self.n and self.n != self.saved:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self.saved:
            torch.set_num_threads(self.saved)


_INT4_BLOCKS = {2: 18, 3: 20}  # Q4_0, Q4_1: bytes per block of 32


def _load_int4_blocks(f: GGUFFile, info: GGUFTensorInfo):
    """A Q4_0/Q4_1 matrix as int4 blocks (q 0..15, fp16 d and m), without dequantizing:
    Q4_1 stores w = d q + m; Q4_0 stores w = d (q - 8), i.e. m = -8 d (exact in fp16)."""
    n, k = info.shape
    raw = f.raw(info.name)
    try:
        b = raw.view(n * k // 32, _INT4_BLOCKS[info.type_id])
        d = b[:, 0:2].contiguous().view(torch.float16).view(n, k // 32)
        if info.type_id == 3:
            m = b[:, 2:4].contiguous().view(torch.float16).view(n, k // 32)
            qs = b[:, 4:20]
        else:
            m = d * -8
            qs = b[:, 2:18]
        q = torch.empty(n * k // 32, 2, 16, dtype=torch.uint8)
        torch.bitwise_and(qs, 0x0F, out=q[:, 0])
        torch.bitwise_right_shift(qs, 4, out=q[:, 1])
    except RuntimeError as exc:
        raise CheckpointError(f"{f.path}: tensor {info.name!r} ({info.type_name}, shape "
                              f"{list(info.shape)}) could not be decoded ({exc})") from exc
    if not (torch.isfinite(d).all() and torch.isfinite(m).all()):
        raise CheckpointError(f"{f.path}: tensor {info.name!r} has non-finite scales; the "
                              "file is corrupt")
    return Int4Blocks(q.view(n, k), d.clone(), m.clone())


def _rows_of(t, fn):
    """Apply a row operation to a tensor, or to each of an Int4Blocks' row-aligned parts."""
    if isinstance(t, Int4Blocks):
        return Int4Blocks(fn(t.q), fn(t.d), fn(t.m))
    return fn(t)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32
              ) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a GGUF file: (config, state dict in kvformer names, metadata)."""
    with GGUFFile(path) as f:
        meta = dict(f.metadata)
        cfg = config_from_gguf(meta, f)
        with _torch_threads(DEQUANT_THREADS):
            state = dict(iter_gguf_tensors(f, cfg, dtype))
    return cfg, state, meta
