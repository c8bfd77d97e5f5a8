"""GGUF files: metadata, tensors (dequantized), and the mapping to kvformer's names.

The header is parsed here directly (``gguf.GGUFReader`` builds one numpy view per vocabulary
string and takes seconds on a 49k-token file); the `gguf` package is still used for its type
tables and as the numpy fallback dequantizer for the rarer K-quants.

Facts this module relies on (from the GGUF spec and llama.cpp's converter):

* Header: magic ``GGUF``, u32 version (2 or 3), u64 tensor count, u64 key/value count, then
  the key/values, then per tensor: name, u32 n_dims, u64 dims (ne0 first, i.e. reversed
  relative to torch), u32 ggml type, u64 offset relative to the data section. The data
  section starts at the next multiple of ``general.alignment`` (default 32).
* Quantized tensors are stored as rows of blocks along ne0 (the torch last dim).
* For the ``llama`` architecture the converter permutes the rows of Q and K (per head, from
  Hugging Face's rotate-half layout to the interleaved pairs llama.cpp rotates)::

      gguf = hf.reshape(n, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(hf.shape)

  with ``n = n_head`` for Q and ``n = n_kv_head`` for K. The inverse used at load time is
  ``hf = gguf.reshape(n, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(gguf.shape)``.
  Qwen2, Qwen3, Gemma 2/3, Phi-3 (NEOX rope in llama.cpp) and GPT-2 are stored unpermuted.
* GPT-2's and Phi-3's fused ``attn_qkv`` is stored in Linear layout ``[q; k; v]`` along the
  rows; Phi-3's ``ffn_up`` holds ``[gate; up]``.
* Gemma's RMSNorm weights are stored as 1 + w (the multiplier), which is kvformer's form.
* Rotary scaling: ``rope.scaling.type`` / ``.factor`` / ``.original_context_length`` /
  ``.yarn_beta_*``, Llama 3's per-frequency ``rope_freqs.weight`` and Phi-3's
  ``rope_factors_long/short.weight`` (with ``rope.scaling.attn_factor``) become
  ``ModelConfig.rope_scaling``. Every ``{arch}.`` key is either read (``GGUF_ARCH_KEYS``),
  known harmless (``GGUF_NEUTRAL_KEYS``) or refused; so is every tensor kvformer has no
  place for.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvformer.config import ModelConfig
from kvformer.errors import CheckpointError, UnsupportedArchitectureError

__all__ = [
    "GGUF_ARCHITECTURES",
    "GGUF_FUSED_QKV",
    "GGUF_TENSOR_NAMES",
    "GGUFFile",
    "GGUFTensorInfo",
    "SUPPORTED_TENSOR_TYPES",
    "config_from_gguf",
    "dequantize",
    "expected_shapes",
    "iter_gguf_tensors",
    "load_gguf",
    "open_reader",
    "read_metadata",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# --------------------------------------------------------------------------- name tables
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

# Tensors that are rotary scaling factors, one per frequency: they become
# ModelConfig.rope_scaling (config_from_gguf reads them), not weights.
GGUF_ROPE_TENSORS: dict[str, str] = {
    "rope_freqs.weight": "factors",  # llama.cpp's form of Llama 3.1's scaling
    "rope_factors_long.weight": "long_factor",  # Phi-3's LongRoPE
    "rope_factors_short.weight": "short_factor",
}

# What each supported ``general.architecture`` means in ModelConfig terms (the facts are
# llama.cpp's: its converter and its loader).
#   permute_qk       Q/K rows stored in llama.cpp's interleaved rotary layout (undone at load)
#   qk_norm          attn_q_norm / attn_k_norm on every head (Qwen3, Gemma 3)
#   gemma            norms after each branch, embeddings times sqrt(d_model), and the
#                    attention scale 1/sqrt(head_dim), or 1/sqrt(d_model / n_head) for
#                    the 27B models (``big_layers`` layers), as llama.cpp decides it
#   window_pattern   every pattern-th layer global, the others windowed
#   default_window   the window when the file does not say (Gemma 2: 4096)
#   local_rope_theta the windowed layers' unscaled rotary base (Gemma 3: 10000)
#   softcaps         (attention, final) when the file does not say (Gemma 2: 50, 30)
#   fused_gate_up    ffn_up holds gate and up (Phi-3)
_RMS = dict(norm="rmsnorm", pos="rope", bias=False, qkv_bias=False,
            eps_key="attention.layer_norm_rms_epsilon", permute_qk=False)
GGUF_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": dict(_RMS, mlp="swiglu", permute_qk=True),
    "qwen2": dict(_RMS, mlp="swiglu", qkv_bias=True),
    "qwen3": dict(_RMS, mlp="swiglu", qk_norm=True),
    "gemma2": dict(_RMS, mlp="geglu", gemma=True, big_layers=46, window_pattern=2,
                   default_window=4096, softcaps=(50.0, 30.0)),
    "gemma3": dict(_RMS, mlp="geglu", gemma=True, big_layers=62, window_pattern=6,
                   qk_norm=True, local_rope_theta=10000.0, softcaps=(None, None)),
    "phi3": dict(_RMS, mlp="swiglu", fused_gate_up=True),
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, qkv_bias=True,
                 eps_key="attention.layer_norm_epsilon", permute_qk=False),
}

# Every "{arch}." metadata key kvformer reads into the config. A file with any other key
# under its architecture's name, or any other top-level namespace than these, is refused:
# an unknown key may change the computation (GGUF_NEUTRAL_KEYS lists the keys that are
# harmless with the value they have in ordinary files).
GGUF_ARCH_KEYS: tuple[str, ...] = (
    "vocab_size", "context_length", "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.value_length", "attention.layer_norm_rms_epsilon",
    "attention.layer_norm_epsilon", "attention.scale", "attention.sliding_window",
    "attention.sliding_window_pattern", "attn_logit_softcapping", "final_logit_softcapping",
    "rope.dimension_count", "rope.freq_base", "rope.freq_base_swa", "rope.scale_linear",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.attn_factor", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
)
GGUF_NEUTRAL_KEYS: dict[str, Any] = {  # key -> a test of its value: True when harmless
    "expert_count": lambda v: v == 0,
    "expert_used_count": lambda v: v == 0,
    "attention.causal": lambda v: v is True,
    "rope.scaling.finetuned": lambda v: True,  # a note on how the model was trained
    "logit_scale": lambda v: v == 1.0,
    "embedding_scale": lambda v: v == 1.0,
    "residual_scale": lambda v: v == 1.0,
    "use_parallel_residual": lambda v: v is False,
    "pooling_type": lambda v: v == 0,
}
# Top-level namespaces: general.* describes the file (its alignment is honoured, and its
# type must be a model), tokenizer.* is the tokenizer's (Tokenizer.from_gguf checks it),
# quantize.* records how the weights were quantized, split.* must say "one file".
GGUF_NAMESPACES = ("general.", "tokenizer.", "quantize.", "split.")

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


# --------------------------------------------------------------------------- header parsing
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

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            itype = self.u32(what + " item type")
            count = self.u64(what + " item count")
            return self.array(itype, count, what)
        scalar = _SCALARS.get(vtype)
        if scalar is None:
            raise CheckpointError(f"{what} has unknown value type {vtype}")
        code, size = scalar
        self.need(size, what)
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return v

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
                end = pos + n
                if end > size:
                    self.pos = pos
                    self.need(n, what + " string")
                raw = buf[pos:end]
                try:
                    append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    append(raw.decode("utf-8", errors="replace"))
                pos = end
            self.pos = pos
            return out
        if itype == _ARRAY:
            self.need(count * 12, what)
            return [self.value(_ARRAY, what) for _ in range(count)]
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
    if known is not None:  # the types kvformer reads: no need to import the gguf package
        return known[0]
    from gguf import GGMLQuantizationType

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
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

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
            meta[key] = cur.value(vtype, f"metadata {key!r}")
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


# --------------------------------------------------------------------------- dequantization
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
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as np_dequantize

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


# --------------------------------------------------------------------------- config
def _as_f32_float(v: Any) -> float:
    """Metadata floats are float32: use the shortest decimal that rounds to the same float32."""
    return float(str(np.float32(v)))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _file_label(path) -> str:
    if isinstance(path, GGUFFile):
        return path.path
    return os.fspath(path) if path is not None else "<GGUF metadata>"


def check_metadata_keys(metadata: dict[str, Any], label: str = "<GGUF metadata>") -> None:
    """Refuse a file whose metadata holds a key kvformer neither reads nor knows to be
    harmless (it might change the computation), or that is not one whole model."""
    arch = metadata.get("general.architecture")
    prefix = f"{arch}."
    for key, value in metadata.items():
        if key.startswith(prefix):
            suffix = key[len(prefix):]
            if suffix in GGUF_ARCH_KEYS:
                continue
            harmless = GGUF_NEUTRAL_KEYS.get(suffix)
            if harmless is not None:
                if harmless(value):
                    continue
                raise UnsupportedArchitectureError(
                    f"{label}: metadata {key} = {_short(value)} changes the model in a way "
                    "kvformer does not implement")
            raise UnsupportedArchitectureError(
                f"{label}: metadata key {key!r} (= {_short(value)}) is one kvformer does not "
                "read; it may change the computation, so the file is refused")
        if not key.startswith(GGUF_NAMESPACES):
            raise UnsupportedArchitectureError(
                f"{label}: metadata key {key!r} is outside what a {arch} model file holds "
                f"(keys start with {arch}. or {', '.join(GGUF_NAMESPACES)}); refused")
    kind = metadata.get("general.type", "model")
    if kind != "model":
        raise UnsupportedArchitectureError(
            f"{label}: general.type is {kind!r}, not a model (an adapter or projector is "
            "applied to a model; kvformer loads whole models only)")
    if metadata.get("split.count", 1) not in (0, 1):
        raise CheckpointError(
            f"{label}: one of {metadata['split.count']} split GGUF files; merge them first "
            "(llama.cpp's gguf-split --merge)")


def _factor_values(f: GGUFFile, name: str) -> list[float]:
    """A small per-frequency factor tensor's values (fp32 in the file, exact as floats)."""
    info = f.tensors[name]
    return [float(x) for x in _load_one(f, info, torch.float32).reshape(-1)]


def config_from_gguf(metadata: dict[str, Any], path=None) -> ModelConfig:
    """A ModelConfig from GGUF metadata.

    ``path`` (a file path or an open :class:`GGUFFile`) names the file in errors and lets the
    tensor list decide ``tie_embeddings`` (no ``output.weight``) and the vocabulary size
    (rows of ``token_embd.weight``), and the rotary factor tensors (``rope_freqs.weight``,
    Phi-3's ``rope_factors_long/short.weight``) become ``rope_scaling``. Without it,
    ``tie_embeddings`` is False, the vocabulary comes from ``{arch}.vocab_size`` or the
    tokenizer's token list, and a file with rotary factor tensors is refused when its
    tensors are read.
    """
    label = _file_label(path)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{label}: architecture {_short(arch)} is not supported; kvformer reads GGUF files of "
            f"these architectures: {', '.join(sorted(GGUF_ARCHITECTURES))}")
    spec = GGUF_ARCHITECTURES[arch]
    check_metadata_keys(metadata, label)

    if isinstance(path, GGUFFile):
        return _config(metadata, path, label, arch, spec)
    if path is not None:
        with GGUFFile(path) as f:
            return _config(metadata, f, label, arch, spec)
    return _config(metadata, None, label, arch, spec)


def _config(metadata: dict[str, Any], f: GGUFFile | None, label: str, arch: str,
            spec: dict[str, Any]) -> ModelConfig:
    tensors = f.tensors if f is not None else None

    def get(key: str, default: Any = None, required: bool = False, kind: type = int) -> Any:
        full = f"{arch}.{key}"
        if full not in metadata:
            if required:
                raise CheckpointError(
                    f"{label}: metadata key {full!r} is missing; the file is incomplete or "
                    "was not written by a llama.cpp converter")
            return default
        value = metadata[full]
        if kind is not object:
            ok = isinstance(value, (int, float) if kind is float else kind)
            if not ok or isinstance(value, bool):
                raise CheckpointError(
                    f"{label}: metadata {full} = {_short(value)} is not a {kind.__name__}; "
                    "the file is corrupt or describes an unsupported variant")
        return value

    d_model = get("embedding_length", required=True)
    n_layer = get("block_count", required=True)
    n_head = get("attention.head_count", required=True)
    n_kv_head = get("attention.head_count_kv", n_head)
    if n_head < 1:
        raise CheckpointError(f"{label}: {arch}.attention.head_count = {n_head} must be >= 1")
    if tensors is not None and n_layer > len(tensors):
        raise CheckpointError(
            f"{label}: {arch}.block_count = {n_layer} but the file holds only {len(tensors)} "
            "tensors; the metadata is corrupt")
    key_len, value_len = get("attention.key_length"), get("attention.value_length")
    rope_dim = get("rope.dimension_count")
    head_dim = key_len or d_model // n_head  # llama.cpp's n_embd_head_k
    if value_len is not None and value_len != head_dim:
        raise UnsupportedArchitectureError(
            f"{label}: key length {head_dim} differs from value length {value_len}; kvformer "
            "needs equal K and V head sizes")
    if spec["pos"] == "rope" and rope_dim is not None and rope_dim != head_dim:
        raise UnsupportedArchitectureError(
            f"{label}: partial rotary embeddings (rope over {rope_dim} of {head_dim} dims) "
            "are not supported")

    vocab = get("vocab_size")
    if vocab is None and tensors is not None and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    tokens = metadata.get("tokenizer.ggml.tokens")
    if vocab is None and isinstance(tokens, list):
        vocab = len(tokens)
    if vocab is None:
        raise CheckpointError(f"{label}: cannot tell the vocabulary size (no {arch}.vocab_size, "
                              "token_embd.weight or tokenizer.ggml.tokens)")

    eps_key = spec["eps_key"]
    other_eps = ("attention.layer_norm_epsilon" if eps_key.endswith("rms_epsilon")
                 else "attention.layer_norm_rms_epsilon")
    if get(other_eps, kind=object) is not None:
        raise UnsupportedArchitectureError(
            f"{label}: {arch}.{other_eps} is set, but a {arch} model has no such norm")
    eps = get(eps_key, 1e-5, kind=float)
    name = metadata.get("general.name")
    if not name:
        name = os.path.splitext(os.path.basename(label))[0] if f is not None else arch
    fields: dict[str, Any] = dict(
        vocab_size=vocab, d_model=d_model, n_layer=n_layer, n_head=n_head,
        n_kv_head=n_kv_head, head_dim=head_dim,
        d_ff=get("feed_forward_length", 4 * d_model),
        max_seq_len=get("context_length", 2048),
        norm=spec["norm"], norm_eps=_as_f32_float(eps), pos=spec["pos"],
        rope_theta=_as_f32_float(get("rope.freq_base", 10000.0, kind=float)),
        mlp=spec["mlp"], bias=spec["bias"], qkv_bias=spec["qkv_bias"],
        qk_norm=bool(spec.get("qk_norm")),
        tie_embeddings=tensors is not None and "output.weight" not in tensors,
        name=str(name))
    if spec["pos"] == "rope":
        fields["rope_scaling"] = _gguf_rope_scaling(get, f, label, arch, head_dim,
                                                    fields["max_seq_len"])
    scale = get("attention.scale", kind=float)
    if scale:  # 0 means "the default" to llama.cpp
        fields["attn_scale"] = _as_f32_float(scale)
    fields.update(_gguf_windows(get, spec, n_layer, label, arch))
    if spec.get("gemma"):
        fields.update(_gguf_gemma(get, spec, fields, label, arch))
    else:
        caps = [f"{arch}.{k}" for k in ("attn_logit_softcapping", "final_logit_softcapping")
                if get(k, kind=object) is not None]
        if caps:
            raise UnsupportedArchitectureError(
                f"{label}: {', '.join(caps)} on a {arch} model, which llama.cpp does not "
                "soft-cap; refused rather than guessed")
    try:
        return ModelConfig(**fields)
    except ValueError as exc:
        raise CheckpointError(f"{label}: the GGUF metadata describes an invalid model: {exc}") \
            from exc


def _gguf_rope_scaling(get, f: GGUFFile | None, label: str, arch: str, head_dim: int,
                       context: int) -> dict[str, Any] | None:
    """rope_scaling from rope.scaling.* (and the older rope.scale_linear) and the factor
    tensors, as llama.cpp reads them; combinations it would run differently are refused."""
    kind = get("rope.scaling.type", "none", kind=str)
    factor = get("rope.scaling.factor", kind=float)
    original = get("rope.scaling.original_context_length")
    attn_factor = get("rope.scaling.attn_factor", kind=float)
    linear = get("rope.scale_linear", kind=float)
    present = {name: _factor_values(f, name) for name in GGUF_ROPE_TENSORS
               if f is not None and name in f.tensors}
    # (a file read without its tensors: a factor tensor is refused when the weights are read)

    def refuse(why: str):
        return UnsupportedArchitectureError(f"{label}: {why}; kvformer refuses rather than "
                                            "compute different positions")

    if factor is None:  # llama.cpp: rope.scaling.factor, else the older rope.scale_linear
        factor = linear
    if kind == "none" and factor not in (None, 1.0):
        kind = "linear"  # llama.cpp divides the frequencies by the factor whatever the type
    yarn_keys = [k for k in ("rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow")
                 if get(k, kind=object) is not None]
    if yarn_keys and kind != "yarn":
        raise refuse(f"{', '.join(yarn_keys)} set for rope scaling {kind!r}")
    long_short = {"rope_factors_long.weight", "rope_factors_short.weight"} & set(present)
    if "rope_freqs.weight" in present:
        if kind != "none" or long_short:
            raise refuse(f"rope_freqs.weight together with rope scaling {kind!r}")
        if attn_factor not in (None, 1.0):
            raise refuse(f"{arch}.rope.scaling.attn_factor with rope_freqs.weight")
        return {"type": "factors", "factors": _per_frequency(present["rope_freqs.weight"],
                                                             head_dim, label)}
    if long_short:
        if kind not in ("none", "longrope") or len(long_short) != 2:
            raise refuse("Phi-3 LongRoPE needs both rope_factors_long and rope_factors_short "
                         f"and no other rope scaling (found {kind!r})")
        if original is None:
            raise refuse("LongRoPE factors without rope.scaling.original_context_length")
        if attn_factor is None:  # transformers' default, from the two context lengths
            scale = context / original
            attn_factor = (1.0 if scale <= 1 else
                           math.sqrt(1 + math.log(scale) / math.log(original)))
        return {"type": "longrope",
                "short_factor": _per_frequency(present["rope_factors_short.weight"],
                                               head_dim, label),
                "long_factor": _per_frequency(present["rope_factors_long.weight"],
                                              head_dim, label),
                "original_max_position_embeddings": int(original),
                "attention_factor": _as_f32_float(attn_factor)}
    if attn_factor not in (None, 1.0):
        raise refuse(f"{arch}.rope.scaling.attn_factor = {attn_factor} with rope scaling "
                     f"{kind!r}")
    if kind == "none":
        return None
    if kind == "linear":
        if factor in (None, 1.0):
            return None  # llama.cpp: no factor is a factor of 1
        return {"type": "linear", "factor": _as_f32_float(factor)}
    if kind == "yarn":
        if factor is None or original is None:
            raise refuse("YaRN rope scaling without rope.scaling.factor and "
                         "rope.scaling.original_context_length")
        factor = _as_f32_float(factor)
        return {"type": "yarn", "factor": factor,
                "original_max_position_embeddings": int(original),
                "beta_fast": _as_f32_float(get("rope.scaling.yarn_beta_fast", 32.0, kind=float)),
                "beta_slow": _as_f32_float(get("rope.scaling.yarn_beta_slow", 1.0, kind=float)),
                # llama.cpp: mscale = 1 + 0.1 ln(factor), as YaRN and transformers
                "attention_factor": 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0,
                "truncate": True}
    raise refuse(f"rope scaling type {kind!r} is not one kvformer implements (none, linear, "
                 "yarn, and Phi-3's LongRoPE and Llama 3's rope_freqs tensors)")


def _per_frequency(values: list[float], head_dim: int, label: str) -> list[float]:
    if len(values) != head_dim // 2:
        raise CheckpointError(f"{label}: a rotary factor tensor has {len(values)} values for "
                              f"{head_dim // 2} frequencies; the file is corrupt")
    return values


def _gguf_windows(get, spec: dict[str, Any], n_layer: int, label: str,
                  arch: str) -> dict[str, Any]:
    """Sliding windows: the window, which layers (a pattern from the file or the
    architecture), the windowed layers' rotary base."""
    window = get("attention.sliding_window", spec.get("default_window"))
    pattern = get("attention.sliding_window_pattern", spec.get("window_pattern"), kind=object)
    local_theta = get("rope.freq_base_swa", spec.get("local_rope_theta"), kind=float)
    if not window:  # absent, or 0 (Phi-3 files write 0 for "none")
        return {}
    if isinstance(pattern, list):  # one flag per layer
        if len(pattern) != n_layer or not all(isinstance(x, bool) for x in pattern):
            raise CheckpointError(f"{label}: {arch}.attention.sliding_window_pattern has "
                                  f"{len(pattern)} entries for {n_layer} layers")
        layers = [i for i, on in enumerate(pattern) if on]
    elif pattern is None:
        layers = list(range(n_layer))
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 1:
        layers = [i for i in range(n_layer) if i % pattern < pattern - 1] if pattern > 1 \
            else list(range(n_layer))
    else:
        raise CheckpointError(f"{label}: {arch}.attention.sliding_window_pattern = "
                              f"{_short(pattern)} is not a layer count or a list of flags")
    if not layers:
        return {}
    fields: dict[str, Any] = dict(
        sliding_window=int(window),
        sliding_layers=None if len(layers) == n_layer else tuple(layers))
    if local_theta is not None:
        fields["local_rope_theta"] = _as_f32_float(local_theta)
    return fields


def _gguf_gemma(get, spec: dict[str, Any], fields: dict[str, Any], label: str,
                arch: str) -> dict[str, Any]:
    attn_cap, final_cap = spec["softcaps"]
    if arch == "gemma3" and get("attn_logit_softcapping", kind=object) is not None:
        raise UnsupportedArchitectureError(
            f"{label}: gemma3.attn_logit_softcapping is set, which llama.cpp and transformers "
            "ignore for Gemma 3; refused rather than guessed")
    attn_cap = get("attn_logit_softcapping", attn_cap, kind=float)
    final_cap = get("final_logit_softcapping", final_cap, kind=float)
    d, n_head = fields["d_model"], fields["n_head"]
    # llama.cpp: 1/sqrt(d_model / n_head) for the 27B models, 1/sqrt(head_dim) otherwise
    # (the files do not carry query_pre_attn_scalar)
    scalar = d // n_head if fields["n_layer"] == spec["big_layers"] else fields["head_dim"]
    out = dict(post_norms=True, embed_scale=float(d ** 0.5),
               attn_softcap=_as_f32_float(attn_cap) if attn_cap else None,
               final_softcap=_as_f32_float(final_cap) if final_cap else None)
    if "attn_scale" not in fields:
        out["attn_scale"] = float(scalar) ** -0.5
    return out


# --------------------------------------------------------------------------- tensors
def _unpermute_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row permutation (interleaved pairs -> rotate-half halves)."""
    rows = t.shape[0]
    half = rows // n // 2
    return t.reshape(n, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


def iter_gguf_tensors(path_or_reader, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                      int4_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(kvformer_name, tensor)`` one at a time, dequantized to ``dtype``.

    With ``int4_blocks``, the Q4_0/Q4_1 matrices of the layers come as
    :class:`kvformer.runtime.quant.Int4Blocks` instead (their integers and fp16 scales, not
    floats), for an int4 build that keeps the file's grid exactly.

    Every expected tensor is checked present (and its bytes inside the file) before the first
    one is yielded; each yielded tensor owns its memory (no view of the file). ``path_or_reader``
    is a path, a :class:`GGUFFile` (left open) or a ``gguf.GGUFReader`` (its file is reopened).
    """
    if dtype is None:
        dtype = torch.float32
    own = not isinstance(path_or_reader, GGUFFile)
    if own and hasattr(getattr(path_or_reader, "data", None), "filename"):
        path_or_reader = path_or_reader.data.filename  # a gguf.GGUFReader: reopen its file
    f = GGUFFile(path_or_reader) if own else path_or_reader
    try:
        yield from _iter_tensors(f, cfg, dtype, int4_blocks)
    finally:
        if own:
            f.close()


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


def _iter_tensors(f: GGUFFile, cfg: ModelConfig, dtype: torch.dtype,
                  int4_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    arch = f.metadata.get("general.architecture")
    permute = GGUF_ARCHITECTURES.get(arch, {}).get("permute_qk", False)
    plan = check_tensors(f, cfg)
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
    from kvformer.runtime.quant import Int4Blocks

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
    from kvformer.runtime.quant import Int4Blocks

    if isinstance(t, Int4Blocks):
        return Int4Blocks(fn(t.q), fn(t.d), fn(t.m))
    return fn(t)


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


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32
              ) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a GGUF file: (config, state dict in kvformer names, metadata)."""
    with GGUFFile(path) as f:
        meta = dict(f.metadata)
        cfg = config_from_gguf(meta, f)
        with _torch_threads(DEQUANT_THREADS):
            state = dict(iter_gguf_tensors(f, cfg, dtype))
    return cfg, state, meta
