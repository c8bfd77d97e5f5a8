"""Weight-only int8/int4: the layers against a dequantized reference, whole models against
fp32, the streaming build against quantizing a built model, and a perplexity guard."""

import copy
import weakref

import pytest
import torch
from helpers import TEXT, trained_tiny

from kvformer import ModelConfig, Transformer
from kvformer.generate import perplexity
from kvformer.quantize import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    build_model,
    check_mode,
    default_mode,
    pack_int4,
    quantize_int4,
    quantize_model,
    unpack_int4_t,
)


@pytest.fixture(scope="module")
def tiny():
    return trained_tiny()


def small(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=256, d_model=128, n_layer=2, n_head=4, n_kv_head=2,
                                d_ff=256, max_seq_len=64), **kw})
    return Transformer(cfg).eval()


# --------------------------------------------------------------------------- layers
@pytest.mark.parametrize("rows", [1, 5, 80])  # packed kernel below 64 rows, dense above
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_linear_matches_dequantized_reference(kind, rows):
    torch.manual_seed(0)
    w, b = torch.randn(192, 128), torch.randn(192)
    layer = (Int8Linear if kind == "int8" else Int4Linear).from_float(w, b)
    x = torch.randn(rows, 128)
    ref = x @ layer.dequantize().t() + b
    out = layer(x)
    assert out.dtype == x.dtype and out.shape == (rows, 192)
    # bf16 activations: ~2^-9 relative error per product
    torch.testing.assert_close(out, ref, atol=0.05 * ref.abs().max().item(), rtol=0.02)
    assert (out - ref).norm() / ref.norm() < 5e-3


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantization_error_is_small(kind):
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    layer = (Int8Linear if kind == "int8" else Int4Linear).from_float(w)
    rel = ((layer.dequantize() - w).norm() / w.norm()).item()
    assert rel < (0.01 if kind == "int8" else 0.1)


def test_int4_keeps_a_q4_1_grid():
    """GGUF Q4_1 blocks (w = d q + m over groups of 32, q spanning 0..15) requantize to the
    same integers: only the bf16 rounding of the scales is lost."""
    torch.manual_seed(0)
    n, k = 64, 128
    q = torch.randint(0, 16, (n, k))
    q[:, ::32], q[:, 1::32] = 0, 15  # each group uses the whole range, as Q4_1 does
    d = torch.rand(n, k // 32, 1) * 0.01 + 0.001
    m = -torch.rand(n, k // 32, 1) * 0.1
    w = (q.view(n, k // 32, 32) * d + m).view(n, k)
    q2, scale, zero = quantize_int4(w)
    assert torch.equal(q2.long(), q)
    back = Int4Linear.from_float(w).dequantize()
    assert (back - w).abs().max() < 2 ** -8 * w.abs().max()


def test_pack_and_unpack_are_inverse():
    q = torch.randint(0, 16, (192, 96), dtype=torch.uint8)
    assert torch.equal(unpack_int4_t(pack_int4(q), 192, 96), q.t())


def test_rows_of_a_packed_matrix_are_a_slice():
    torch.manual_seed(0)
    w = torch.randn(256, 64)
    full = Int4Linear.from_float(w)
    part = full.rows(64, 192)
    x = torch.randn(3, 64)
    torch.testing.assert_close(part(x), full(x)[:, 64:192])
    assert part.packed.data_ptr() == full.packed[64:].data_ptr()


@pytest.mark.parametrize("chunk", [1 << 17, 64 * 96])  # one piece per part; many pieces
def test_parts_quantize_as_their_stack_without_building_it(chunk, monkeypatch):
    """A fused layer is quantized from its parts a few rows at a time (so a load never holds
    the stacked copy or full-size temporaries): the result is that of the stacked matrix,
    and the int8 rows are the closed form round(w / (max|w| / 127))."""
    import kvformer.quantize as kq

    monkeypatch.setattr(kq, "_CHUNK", chunk)
    torch.manual_seed(0)
    parts = [torch.randn(192, 96), torch.randn(64, 96), torch.randn(128, 96)]
    stacked = torch.cat(parts)
    l8 = Int8Linear.from_float(parts)
    scale = stacked.abs().amax(dim=1) / 127
    assert torch.equal(l8.qweight, (stacked / scale[:, None]).round().clamp(-127, 127)
                       .to(torch.int8))
    torch.testing.assert_close(l8.scale.float(), scale, rtol=2 ** -8, atol=0)
    l4, ref4 = Int4Linear.from_float(parts), Int4Linear.from_float(stacked)
    q, sc, zero = quantize_int4(stacked)
    assert torch.equal(unpack_int4_t(l4.packed, 384, 96), q.t())
    assert torch.equal(l4.scales_and_zeros, ref4.scales_and_zeros)
    torch.testing.assert_close(l4.scales_and_zeros[..., 0].float(), sc.t(), rtol=2 ** -8, atol=0)
    with pytest.raises(ValueError, match="int4 needs"):
        Int4Linear.from_float([torch.randn(64, 96), torch.randn(32, 96)])


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
    assert q.dtype == torch.bfloat16 and cache.k[0].dtype == torch.bfloat16
    tol = {"bf16": 0.02, "int8": 0.03, "int4": 0.15}[mode] * ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1).float(), out.float(), atol=0.02, rtol=0)


def test_tied_embedding_and_head_share_one_int8_table():
    q = quantize_model(small(tie_embeddings=True), "int4")
    assert isinstance(q.tok_emb, Int8Embedding) and isinstance(q.lm_head, Int8Linear)
    assert q.tok_emb.qweight.data_ptr() == q.lm_head.qweight.data_ptr()
    assert isinstance(q.layers[0].attn.wqkv, Int4Linear)
    assert q.layers[0].attn.wk.packed.data_ptr() == q.layers[0].attn.wqkv.packed[128:].data_ptr()


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
def test_perplexity_guard(tiny):
    ids = list(TEXT[:400])
    base = perplexity(tiny, ids)
    assert base < 4  # it has learned the text: the guard below is meaningful
    for mode, limit in (("bf16", 0.02), ("int8", 0.02), ("int4", 0.10)):
        q = quantize_model(copy.deepcopy(tiny), mode)
        assert perplexity(q, ids) / base - 1 < limit, mode
