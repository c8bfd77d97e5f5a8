"""Weight-only int8/int4: the layers against a dequantized reference, whole models against
fp32, the streaming build against quantizing a built model, and a perplexity guard."""

import copy
import weakref

import pytest
import torch
from helpers import TEXT, trained_tiny

from kvformer import ModelConfig, Transformer
from kvformer.formats.build import build_model
from kvformer.runtime import native
from kvformer.runtime.generation import perplexity
from kvformer.runtime.quant import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    act_dtype,
    check_mode,
    default_mode,
    pack_int4,
    pack_scales,
    quantize_int4,
    quantize_model,
    set_kernels,
    unpack_int4,
    unpack_scales,
)

# Every way a quantized layer can compute: torch's own ops, and each kernel path of
# kvformer's that this CPU can run (the others are skipped, with the reason).
PATHS = ["torch", "avx512", "avxvnni", "avx2", "neon", "scalar"]


def use_path(path):
    if path != "torch" and path not in native.isas():
        pytest.skip(f"this CPU (or build) cannot run the {path} kernels: {native.kernel_path()}")
    return path


@pytest.fixture(scope="module")
def tiny():
    return trained_tiny()


def small(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=256, d_model=128, n_layer=2, n_head=4, n_kv_head=2,
                                d_ff=256, max_seq_len=64), **kw})
    return Transformer(cfg).eval()


# --------------------------------------------------------------------------- layers
def reference_int4(q, d, m):
    """w = d * q + m per block of 32 columns, written out with a loop over the blocks."""
    n, k = q.shape
    w = torch.empty(n, k)
    for b in range(k // 32):
        w[:, 32 * b:32 * b + 32] = d[:, b:b + 1].float() * q[:, 32 * b:32 * b + 32].float() \
            + m[:, b:b + 1].float()
    return w


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 5, 80])  # kernels below 64 rows, dense matmul above
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_linear_matches_dequantized_reference(kind, rows, path):
    use_path(path)
    torch.manual_seed(0)
    w, b = torch.randn(192, 128), torch.randn(192)
    layer = (Int8Linear if kind == "int8" else Int4Linear).from_float(w, b)
    layer.isa = path
    if kind == "int4":  # the reference weight, from the integers by the closed form
        q, (d, m) = unpack_int4(layer.qweight), unpack_scales(layer.scales)
        weight = reference_int4(q, d, m)
    else:
        weight = layer.qweight.float() * layer.scale[:, None]
    torch.testing.assert_close(layer.dequantize(), weight, atol=0, rtol=0)
    x = torch.randn(rows, 128)
    ref = x @ weight.t() + b
    out = layer(x.to(layer.act_dtype)).float()
    assert out.shape == (rows, 192)
    # bf16 activations (where native) round each product to ~2^-9; fp32 ones do not
    tol = 5e-3 if layer.act_dtype == torch.bfloat16 else 5e-4
    assert (out - ref).norm() / ref.norm() < tol


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantization_error_is_small(kind):
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    layer = (Int8Linear if kind == "int8" else Int4Linear).from_float(w)
    rel = ((layer.dequantize() - w).norm() / w.norm()).item()
    assert rel < (0.01 if kind == "int8" else 0.1)


def test_int4_keeps_a_q4_1_grid_exactly():
    """GGUF Q4_1 blocks (w = d q + m over blocks of 32, fp16 d and m, q spanning 0..15)
    requantize to the same integers and the same fp16 d and m: the weights come back
    bit for bit."""
    torch.manual_seed(0)
    n, k = 64, 128
    q = torch.randint(0, 16, (n, k))
    q[:, ::32], q[:, 1::32] = 0, 15  # each block uses the whole range, as Q4_1 does
    d = (torch.rand(n, k // 32) * 0.01 + 0.001).half()
    m = (-torch.rand(n, k // 32) * 0.1).half()
    w = reference_int4(q, d, m)
    q2, d2, m2 = quantize_int4(w)
    assert torch.equal(q2.long(), q) and torch.equal(d2, d) and torch.equal(m2, m)
    assert torch.equal(Int4Linear.from_float(w).dequantize(), w)


def test_int4_layout_is_the_documented_one():
    """The byte of tile t, block b, sub-block s, row r, lane j holds column 32b+8s+j in its
    low nibble and 32b+8s+4+j in its high nibble of row 16t+r (kvformer/runtime/csrc/kernels.h)."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (2, 2, 256)
    for t, b, s, r, j in [(0, 0, 0, 0, 0), (1, 1, 3, 15, 3), (0, 1, 2, 7, 1), (1, 0, 1, 9, 2)]:
        byte = int(packed[t, b, s * 64 + r * 4 + j])
        row, col = 16 * t + r, 32 * b + 8 * s + j
        assert byte & 15 == q[row, col] and byte >> 4 == q[row, col + 4]
    assert torch.equal(unpack_int4(packed), q)
    d, m = torch.randn(32, 2).half(), torch.randn(32, 2).half()
    sc = pack_scales(d, m)
    assert sc[1, 0, 0, 5] == d[21, 0] and sc[1, 1, 1, 5] == m[21, 1]
    assert all(torch.equal(a, b) for a, b in zip(unpack_scales(sc), (d, m)))


def test_the_layout_does_not_depend_on_the_cpu():
    """The same weights quantize to the same bytes under every torch CPU capability: the
    bytes are checked against a digest computed once (ATEN_CPU_CAPABILITY=default, avx2 and
    avx512 runs of this file all meet it). The weights come from numpy's generator: torch's
    own randn gives different numbers under different capabilities."""
    import hashlib

    import numpy as np

    w = torch.from_numpy(np.random.default_rng(1234).standard_normal((64, 96)).astype(np.float32))
    layer = Int4Linear.from_float(w)
    digest = hashlib.sha256(layer.qweight.numpy().tobytes() + layer.scales.numpy().tobytes())
    assert digest.hexdigest()[:16] == INT4_DIGEST
    l8 = Int8Linear.from_float(w)
    digest8 = hashlib.sha256(l8.qweight.numpy().tobytes() + l8.scale.numpy().tobytes())
    assert digest8.hexdigest()[:16] == INT8_DIGEST


INT4_DIGEST = "d5d779acfb201641"
INT8_DIGEST = "a402112d4e9e4b7d"


def test_rows_of_a_packed_matrix_are_a_slice():
    torch.manual_seed(0)
    w = torch.randn(256, 64)
    full = Int4Linear.from_float(w)
    part = full.rows(64, 192)
    x = torch.randn(3, 64).to(full.act_dtype)
    torch.testing.assert_close(part(x), full(x)[:, 64:192])
    assert part.qweight.data_ptr() == full.qweight[4:].data_ptr()
    with pytest.raises(ValueError, match="tiles of 16"):
        full.rows(8, 64)


@pytest.mark.parametrize("chunk", [1 << 17, 16 * 96])  # one piece per part; many pieces
def test_parts_quantize_as_their_stack_without_building_it(chunk, monkeypatch):
    """A fused layer is quantized from its parts a few rows at a time (so a load never holds
    the stacked copy or full-size temporaries): the result is that of the stacked matrix,
    and the int8 rows are the closed form round(w / (max|w| / 127))."""
    import kvformer.runtime.quant as kq

    monkeypatch.setattr(kq, "_CHUNK", chunk)
    torch.manual_seed(0)
    parts = [torch.randn(192, 96), torch.randn(64, 96), torch.randn(128, 96)]
    stacked = torch.cat(parts)
    l8 = Int8Linear.from_float(parts)
    scale = stacked.abs().amax(dim=1) / 127
    assert torch.equal(l8.qweight, (stacked / scale[:, None]).round().clamp(-127, 127)
                       .to(torch.int8))
    torch.testing.assert_close(l8.scale, scale, rtol=1e-6, atol=0)
    l4, ref4 = Int4Linear.from_float(parts), Int4Linear.from_float(stacked)
    q, d, m = quantize_int4(stacked)
    assert torch.equal(unpack_int4(l4.qweight), q)
    assert torch.equal(l4.scales, ref4.scales) and torch.equal(l4.qweight, ref4.qweight)
    assert torch.equal(unpack_scales(l4.scales)[0], d)
    with pytest.raises(ValueError, match="int4 needs"):
        Int4Linear.from_float([torch.randn(64, 96), torch.randn(8, 96)])


# --------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("tie, bias", [(True, False), (False, True)])
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_quantized_model_is_close_to_fp32_and_caches_the_same(mode, tie, bias):
    model = small(tie_embeddings=tie, bias=bias)
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(tokens)
        q = quantize_model(copy.deepcopy(model), mode)
        out = q(tokens)
        cache = q.new_cache(2, 32)
        steps = [q(tokens[:, :16], cache=cache)] + [q(tokens[:, t:t + 1], cache=cache)
                                                    for t in range(16, 24)]
    expected = torch.bfloat16 if mode == "bf16" else act_dtype()
    assert q.dtype == expected and cache.k[0].dtype == expected
    tol = {"bf16": 0.02, "int8": 0.03, "int4": 0.15}[mode] * ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1).float(), out.float(), atol=0.02, rtol=0)


def test_tied_embedding_and_head_share_one_int8_table():
    q = quantize_model(small(tie_embeddings=True), "int4")
    assert isinstance(q.tok_emb, Int8Embedding) and isinstance(q.lm_head, Int8Linear)
    assert q.tok_emb.qweight.data_ptr() == q.lm_head.qweight.data_ptr()
    assert isinstance(q.layers[0].attn.wqkv, Int4Linear)
    fused = q.layers[0].attn.wqkv.qweight
    assert q.layers[0].attn.wk.qweight.data_ptr() == fused[128 // 16:].data_ptr()


@pytest.mark.parametrize("tie, bias", [(True, False), (False, True)])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8", "int4"])
def test_streaming_build_equals_quantizing_a_built_model(mode, tie, bias):
    model = small(tie_embeddings=tie, bias=bias)
    tokens = torch.randint(0, 256, (1, 12))
    state = model.state_dict()
    built = build_model(model.cfg, ((k, v.clone()) for k, v in state.items()), mode)
    with torch.no_grad():
        expected = quantize_model(copy.deepcopy(model), mode)(tokens)
        assert torch.equal(built(tokens), expected)


def test_streaming_build_holds_one_layer_at_a_time():
    """Each weight the loader yields is quantized and dropped as soon as its (fused) layer is
    complete: at most the parts of one fused matrix are alive at once."""
    model = small(n_layer=4)
    pending = [(k, v.clone()) for k, v in model.state_dict().items()]
    alive: list[weakref.ref] = []
    most = 0

    def tensors():
        nonlocal most
        while pending:
            name, t = pending.pop(0)
            most = max(most, sum(r() is not None for r in alive))
            if t.dim() == 2:  # matrices; norms are kept by the model, as they should be
                alive.append(weakref.ref(t))
            yield name, t
            del t

    build_model(model.cfg, tensors(), "int4")
    assert len(alive) == 4 * 7 + 2 and most <= 3  # 7 per layer, embedding, head


def test_modes_and_errors():
    assert check_mode(torch.bfloat16) == "bf16" and check_mode("float32") == "fp32"
    with pytest.raises(ValueError, match="int4"):
        check_mode("int3")
    q = quantize_model(small(), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, "int4")
    assert default_mode(["Q4_1"] * 20 + ["F32"] * 9 + ["Q8_0"]) == "int4"
    assert default_mode(["F32"] * 9) == "int8" and default_mode(["Q8_0"] * 9) == "int8"


# --------------------------------------------------------------------------- quality guard
@pytest.mark.parametrize("path", PATHS)
def test_perplexity_guard(tiny, path):
    """Perplexity through prefill (the dense path) and token by token through the cache
    (the kernels of ``path``): int8 within 2 % and int4 within 10 % of fp32."""
    from kvformer.runtime.step import for_model

    use_path(path)
    ids = list(TEXT[:400])
    base = perplexity(tiny, ids)
    assert base < 4  # it has learned the text: the guard below is meaningful
    for mode, limit in (("bf16", 0.02), ("int8", 0.02), ("int4", 0.10)):
        q = set_kernels(quantize_model(copy.deepcopy(tiny), mode), path)
        assert perplexity(q, ids) / base - 1 < limit, mode
        step = for_model(q, native=path if path != "torch" else False)
        by_token = perplexity(step, ids[:120], token_by_token=True)
        assert by_token / perplexity(tiny, ids[:120]) - 1 < limit, mode
