"""Models for `kvformer bench`: random weights in the shape of a real model, as a GGUF file.

The benchmark needs a model larger than the 135M default, readable by both kvformer and
llama.cpp, without downloading anything. So the weights are random, written straight as
quantized blocks (Q4_0 or Q8_0; no float weights are ever made or quantized), and the
tokenizer is the default model's, its vocabulary padded to the shape's embedding rows.

* :data:`LLAMA_32_1B`: the shape of Llama-3.2-1B (1.24 B parameters, tied embeddings).
* :func:`write_random_gguf`: write such a file, one tensor in memory at a time.
* :func:`random_llama_gguf`: the cached file, written once (atomically) and then reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import TokenType

from kvformer.errors import CheckpointError
from kvformer.formats.gguf.dequant import dequantize
from kvformer.formats.gguf.reader import GGUFFile, read_metadata
from kvformer.formats.load import default_model_path

__all__ = ["LLAMA_FTYPES", "LLAMA_32_1B", "f16_copy", "llama_quantized", "random_llama_gguf",
           "write_random_gguf"]

# Keys are ModelConfig's field names, so a shape reads like the config it loads as.
LLAMA_32_1B: dict[str, Any] = dict(
    name="Llama-3.2-1B", vocab_size=128256, d_model=2048, n_layer=16, n_head=32,
    n_kv_head=8, head_dim=64, d_ff=8192, rope_theta=500000.0, norm_eps=1e-5,
    max_seq_len=131072, tie_embeddings=True,
)

# Bump when the layout of the written file changes, so stale cached files are not reused.
FORMAT_VERSION = 1

# ggml block types: (weights per block, bytes per block, scale d). A Q4_0 block is an fp16 d
# and 16 bytes of nibbles q, w = d * (q - 8); a Q8_0 block is an fp16 d and 32 int8 q,
# w = d * q. With q uniformly random, rms(q - 8) = 4.64 and rms(int8) = 73.9, so these d
# give weights of standard deviation ~0.02, Llama's initialisation (activations stay sane).
_BLOCKS = {"Q4_0": (32, 18, 0.02 / 4.64), "Q8_0": (32, 34, 0.02 / 73.9)}
_FILE_TYPES = {"Q4_0": 2, "Q8_0": 7, "F16": 1}  # general.file_type: MOSTLY_Q4_0, ...

# llama.cpp's quantizer's file types (its llama_ftype): what `kvformer bench --types` makes
# from an F16 file with llama_cpp.llama_model_quantize, as people's downloads are made
LLAMA_FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15,
                "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30}

_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def _tensor_plan(shape: dict, linear_type: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, torch-order shape, ggml type) of every tensor, in file order."""
    d, kv = shape["d_model"], shape["n_kv_head"] * shape["head_dim"]
    q, ff = shape["n_head"] * shape["head_dim"], shape["d_ff"]
    dims = dict(attn_norm=(d,), attn_q=(q, d), attn_k=(kv, d), attn_v=(kv, d),
                attn_output=(d, q), ffn_norm=(d,), ffn_gate=(ff, d), ffn_up=(ff, d),
                ffn_down=(d, ff))
    # The embedding stays Q8_0 whatever the linears are, as llama.cpp's Q4_0 files keep it
    # at higher precision; with tied embeddings it is also the output projection.
    plan = [("token_embd.weight", (shape["vocab_size"], d),
             "F16" if linear_type == "F16" else "Q8_0")]
    for i in range(shape["n_layer"]):
        for part in _LAYER_TENSORS:
            kind = "F32" if part.endswith("norm") else linear_type
            plan.append((f"blk.{i}.{part}.weight", dims[part], kind))
    plan.append(("output_norm.weight", (d,), "F32"))
    if not shape.get("tie_embeddings", True):
        plan.append(("output.weight", (shape["vocab_size"], d),
                     "F16" if linear_type == "F16" else "Q8_0"))
    return plan


def _byte_shape(dims: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The uint8 array shape of a tensor's stored bytes (rows of blocks along the last dim)."""
    if kind in ("F32", "F16"):
        return (*dims[:-1], dims[-1] * (4 if kind == "F32" else 2))
    block, size, _ = _BLOCKS[kind]
    if dims[-1] % block:
        raise ValueError(f"row length {dims[-1]} is not a multiple of the {kind} block "
                         f"size {block}")
    return (*dims[:-1], dims[-1] // block * size)


def _tensor_bytes(rng: np.random.Generator, dims: tuple[int, ...], kind: str) -> np.ndarray:
    """One tensor's stored bytes: ones for a norm, random blocks for a quantized weight."""
    if kind == "F32":
        return np.ones(dims, dtype=np.float32)
    if kind == "F16":  # Llama's initialisation, std 0.02
        return (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16)
    _, size, scale = _BLOCKS[kind]
    byte_shape = _byte_shape(dims, kind)
    blocks = rng.integers(0, 256, size=byte_shape, dtype=np.uint8).reshape(-1, size)
    # One scale for every block: the benchmark measures speed, not what the weights say.
    blocks[:, :2] = np.array([scale], dtype=np.float16).view(np.uint8)
    return blocks.reshape(byte_shape)


def _add_shape_metadata(writer, shape: dict, linear_type: str) -> None:
    writer.add_name(f"random {shape.get('name', 'llama')} shape")
    writer.add_file_type(_FILE_TYPES[linear_type])
    writer.add_quantization_version(2)
    writer.add_vocab_size(shape["vocab_size"])
    writer.add_context_length(shape["max_seq_len"])
    writer.add_embedding_length(shape["d_model"])
    writer.add_block_count(shape["n_layer"])
    writer.add_feed_forward_length(shape["d_ff"])
    writer.add_head_count(shape["n_head"])
    writer.add_head_count_kv(shape["n_kv_head"])
    writer.add_rope_freq_base(float(shape["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(shape["norm_eps"]))
    writer.add_rope_dimension_count(shape["head_dim"])
    if shape["head_dim"] != shape["d_model"] // shape["n_head"]:  # as the converter does
        writer.add_key_length(shape["head_dim"])
        writer.add_value_length(shape["head_dim"])


def _add_tokenizer(writer, tokenizer_gguf, vocab_size: int) -> None:
    """Copy the tokenizer of another GGUF file, its token list padded to ``vocab_size``."""
    meta = read_metadata(tokenizer_gguf)
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError(f"{tokenizer_gguf}: the file has no tokenizer to copy")
    if len(tokens) > vocab_size:
        raise ValueError(f"{tokenizer_gguf}: {len(tokens)} tokens do not fit in a vocabulary "
                         f"of {vocab_size}")
    types = list(meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens))
    # Unreachable filler rows (BPE never produces them). NORMAL, not CONTROL: tens of
    # thousands of special tokens would slow both engines' special-token matching.
    taken = set(tokens)
    pads = [f"<|reserved_{i}|>" for i in range(vocab_size - len(tokens))]
    if taken.intersection(pads):
        raise ValueError(f"{tokenizer_gguf}: already holds tokens named like the padding")
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if meta.get("tokenizer.ggml.pre"):
        writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(tokens + pads)
    writer.add_token_types(types + [TokenType.NORMAL] * len(pads))
    if meta.get("tokenizer.ggml.merges"):
        writer.add_token_merges(meta["tokenizer.ggml.merges"])
    if meta.get("tokenizer.ggml.scores"):
        writer.add_token_scores(list(meta["tokenizer.ggml.scores"]) + [0.0] * len(pads))
    # Special ids and flags; not the chat template (the benchmark feeds plain text).
    for key, value in meta.items():
        if not key.startswith("tokenizer.ggml."):
            continue
        if key.endswith("_token_id"):
            writer.add_uint32(key, int(value))
        elif isinstance(value, bool):
            writer.add_bool(key, value)


def write_random_gguf(path, tokenizer_gguf, shape: dict = LLAMA_32_1B,
                      linear_type: str = "Q4_0", seed: int = 0) -> Path:
    """Write a llama-architecture GGUF of random weights in ``shape`` to ``path``.

    Linear weights are ``linear_type`` (Q4_0 or Q8_0) blocks of random bytes, the embedding
    Q8_0, the norms ones; the tokenizer is copied from ``tokenizer_gguf``. Deterministic for a
    given ``seed``. Only one tensor is in memory at a time (the embedding, ~280 MB, is the
    largest). Writes ``path`` in place: see :func:`random_llama_gguf` for an atomic write.
    """
    if linear_type not in _FILE_TYPES:
        raise ValueError(f"linear_type={linear_type!r} must be one of {', '.join(_FILE_TYPES)}")
    path = Path(path)
    plan = _tensor_plan(shape, linear_type)
    writer = gguf.GGUFWriter(path, "llama")
    _add_shape_metadata(writer, shape, linear_type)
    _add_tokenizer(writer, tokenizer_gguf, shape["vocab_size"])
    # Describe every tensor first and then stream the data one tensor at a time:
    # add_tensor would hold every array until the end, i.e. the whole model in memory.
    for name, dims, kind in plan:
        if kind in ("F32", "F16"):
            dt = np.dtype(np.float32 if kind == "F32" else np.float16)
            writer.add_tensor_info(name, dims, dt, dt.itemsize * int(np.prod(dims)))
        else:  # a uint8 byte shape, which the writer turns into the element shape
            byte_shape = _byte_shape(dims, kind)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8),
                                   int(np.prod(byte_shape)),
                                   raw_dtype=gguf.GGMLQuantizationType[kind])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        for _, dims, kind in plan:
            writer.write_tensor_data(_tensor_bytes(rng, dims, kind))
    finally:
        writer.close()
    return path


def _cache_root() -> Path:
    """Like kvformer.runtime.native's cache: KVFORMER_CACHE, else $XDG_CACHE_HOME/kvformer."""
    root = os.environ.get("KVFORMER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvformer")
    return Path(root) / "bench"


def _cache_name(shape: dict, linear_type: str, tokenizer_gguf: Path) -> str:
    """A file name that changes with anything that changes the file's content."""
    key = json.dumps([FORMAT_VERSION, shape, linear_type, tokenizer_gguf.name,
                      tokenizer_gguf.stat().st_size], sort_keys=True, default=str)
    slug = str(shape.get("name", "llama")).lower().replace(" ", "-")
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"random-{slug}-{linear_type.lower()}-{digest}.gguf"


def _is_complete(path: Path, shape: dict, linear_type: str) -> bool:
    """Whether ``path`` holds every tensor of the shape, all its bytes present."""
    if not path.is_file():
        return False
    try:
        with GGUFFile(path) as f:
            f.check_tensor_data()
            return set(f.tensors) == {name for name, _, _ in _tensor_plan(shape, linear_type)}
    except CheckpointError:
        return False


def _check_space(folder: Path, shape: dict, linear_type: str) -> None:
    """Fail before writing, not halfway, when the disk cannot take the file."""
    need = sum(int(np.prod(_byte_shape(dims, kind)))
               for _, dims, kind in _tensor_plan(shape, linear_type))
    free = shutil.disk_usage(folder).free
    if free < need * 1.1:
        raise OSError(f"{folder}: {free / 1e9:.2f} GB free, but the benchmark model needs "
                      f"{need / 1e9:.2f} GB; free some space or set KVFORMER_CACHE elsewhere")


def random_llama_gguf(cache_dir=None, linear_type: str = "Q4_0",
                      shape: dict = LLAMA_32_1B) -> Path:
    """The random ``shape`` model (Llama-3.2-1B by default) as a cached GGUF file.

    Cached under ``cache_dir`` (default: ``~/.cache/kvformer/bench``, see
    :func:`_cache_root`) and reused when complete. A new file is written under a temporary
    name and renamed into place, so a crash or a concurrent run never leaves a partial
    file under the final name. Needs the default model installed, for its tokenizer.
    """
    tokenizer_gguf = default_model_path()
    folder = Path(cache_dir) if cache_dir is not None else _cache_root()
    path = folder / _cache_name(shape, linear_type, tokenizer_gguf)
    if _is_complete(path, shape, linear_type):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    _check_space(folder, shape, linear_type)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write_random_gguf(tmp, tokenizer_gguf, shape, linear_type)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- files made by llama.cpp
def _derived(src: Path, suffix: str, cache_dir, make) -> Path:
    """The file made from ``src`` by ``make(tmp_path)``, cached as ``<src stem>-<suffix>.gguf``
    beside the other benchmark files and made again only when ``src`` is newer; written
    under a temporary name and renamed into place."""
    folder = Path(cache_dir) if cache_dir is not None else _cache_root()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{Path(src).stem}-{suffix}.gguf"
    if path.is_file() and path.stat().st_mtime >= Path(src).stat().st_mtime:
        return path
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        make(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def llama_quantized(src: Path, ftype: str, cache_dir=None) -> Path:
    """``src`` (an F16 GGUF) quantized by llama.cpp's own quantizer to ``ftype`` (a key of
    LLAMA_FTYPES, e.g. 'Q4_K_M'), cached beside the other benchmark files. Needs the
    ``bench`` extra (llama-cpp-python)."""
    import llama_cpp  # the optional bench extra

    if ftype not in LLAMA_FTYPES:
        raise ValueError(f"{ftype!r} is not one of {', '.join(LLAMA_FTYPES)}")

    def make(tmp: Path) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPES[ftype]
        params.nthread = os.cpu_count() or 1
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama.cpp's quantizer failed on {src} -> {ftype} ({rc})")

    return _derived(src, ftype.lower(), cache_dir, make)


def f16_copy(src: Path, cache_dir=None) -> Path:
    """A GGUF file's model with every matrix as F16 (its numbers, decoded; norms F32),
    metadata copied as stored: the source llama.cpp's quantizer makes each type from, for
    a model (such as the default) that is only distributed quantized."""

    def make(tmp: Path) -> None:
        reader = gguf.GGUFReader(str(src))
        arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
        writer = gguf.GGUFWriter(tmp, arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            vtype = field.types[0]
            if key == "general.file_type":
                writer.add_uint32(key, 1)  # MOSTLY_F16
            elif vtype == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
            else:
                writer.add_key_value(key, field.contents(), vtype)
        for t in reader.tensors:
            shape = tuple(int(x) for x in reversed(t.shape))  # torch order
            raw = torch.from_numpy(np.array(t.data).view(np.uint8).reshape(-1))  # a copy
            values = dequantize(raw, int(t.tensor_type), shape, torch.float32).numpy()
            writer.add_tensor(t.name, values.astype(np.float16 if len(shape) == 2
                                                    else np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _derived(src, "f16", cache_dir, make)
