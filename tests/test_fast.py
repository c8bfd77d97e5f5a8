"""The executor's C++ step against Transformer.forward (the spec): the same logits in fp32,
close logits and the same greedy tokens in bf16/int8/int4, on every kernel path."""

import copy

import pytest
import torch
from helpers import TEXT, trained_tiny

from kvformer import ModelConfig, Transformer, generate
from kvformer.kv.cache import KVCache
from kvformer.runtime.quant import quantize_model
from kvformer.runtime.step import Executor, NativeStep, for_model


def native_available() -> bool:
    from kvformer.runtime import native

    return native.available()  # builds once per machine (~20 s), then cached


# The C++ step on each kernel path of this CPU.
STEPS = ["avx512", "avxvnni", "avx2", "neon", "scalar"]


def make_step(kind, model):
    """The decode call of the C++ step on the ``kind`` kernels."""
    from kvformer.runtime import native

    if kind not in native.isas():
        pytest.skip(f"this CPU (or build) cannot run the {kind} kernels: {native.kernel_path()}")
    step = NativeStep(model, isa=kind)
    assert torch.ops.kvformer_native.plan_isa(step.handle) == kind
    return step.decode


@pytest.fixture(scope="module")
def tiny():
    return trained_tiny(120)


ARCHS = {  # (pos, norm, mlp, bias, n_head, n_kv_head, d_model)
    "llama-gqa": ("rope", "rmsnorm", "swiglu", False, 4, 2, 128),
    "hd64-gqa3": ("rope", "rmsnorm", "swiglu", False, 6, 2, 384),
    "mha-layernorm-gelu-bias": ("none", "layernorm", "gelu", True, 4, 4, 128),
    "mqa-rope-layernorm": ("rope", "layernorm", "swiglu", True, 4, 1, 128),
}


def arch_model(name):
    pos, norm, mlp, bias, nh, nkv, d = ARCHS[name]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=d, n_layer=2, n_head=nh, n_kv_head=nkv,
                      d_ff=2 * d, pos=pos, norm=norm, mlp=mlp, bias=bias, max_seq_len=64,
                      tie_embeddings=True)
    return Transformer(cfg).eval()


def decode_both(model, step, tokens, prefix=10, key_mask=None, input_pos=None):
    b, t = tokens.shape
    c1, c2 = model.new_cache(b, t + 1), model.new_cache(b, t + 1)
    with torch.inference_mode():
        model(tokens[:, :prefix], cache=c1)
        model(tokens[:, :prefix], cache=c2)
        pairs = []
        for i in range(prefix, t):
            pairs.append((model(tokens[:, i:i + 1], cache=c1),
                          step(tokens[:, i:i + 1], c2)))
    assert c1.length == c2.length == t
    return pairs, c1, c2


@pytest.mark.parametrize("kind", STEPS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_decode_step_equals_forward_in_fp32(kind, arch):
    model = arch_model(arch)
    step = make_step(kind, model)
    tokens = torch.randint(0, 256, (2, 20))
    pairs, c1, c2 = decode_both(model, step, tokens)
    for ref, out in pairs:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c2.k[1][:, :, :20], c1.k[1][:, :, :20], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c2.v[0][:, :, :20], c1.v[0][:, :, :20], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", STEPS)
def test_decode_step_with_padding_and_row_positions(kind):
    """A left-padded batch: key_mask hides the padding, positions are per row."""
    model = arch_model("llama-gqa")
    step = make_step(kind, model)
    tokens = torch.randint(0, 256, (2, 12))
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False
    pos = torch.tensor([[12], [8]])
    with torch.inference_mode():
        c1, c2 = model.new_cache(2, 16), model.new_cache(2, 16)
        model(tokens, cache=c1, key_mask=mask[:, :12])
        model(tokens, cache=c2, key_mask=mask[:, :12])
        ref = model(tokens[:, :1], input_pos=pos, cache=c1, key_mask=mask)
        out = step(tokens[:, :1], c2, pos, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", STEPS)
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_low_precision_step_is_close_and_greedy_is_identical(tiny, kind, mode):
    model = quantize_model(copy.deepcopy(tiny), mode)
    step = make_step(kind, model)
    tokens = torch.tensor([list(TEXT[:24])])
    pairs, _, _ = decode_both(model, step, tokens, prefix=8)
    for ref, out in pairs:
        # the C++ step's logits are fp32 whatever the activations' dtype (not rounded to
        # bf16, where near-ties become ties)
        assert ref.dtype == model.dtype
        assert out.dtype == torch.float32
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(out.float(), ref.float(), atol=0.03 * scale, rtol=0)
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
    prompt = list(TEXT[:12])
    fast = for_model(copy.deepcopy(model), native=kind)
    assert fast.isa == kind
    assert generate(fast, prompt, 24) == generate(for_model(model, native=False), prompt, 24)


def test_generation_through_the_executor_is_the_same_in_fp32(tiny):
    model = copy.deepcopy(tiny)
    prompts = [list(TEXT[:5]), list(TEXT[30:41]), list(TEXT[60:63])]  # ragged: padding
    expected = generate(for_model(model, native=False), prompts, 16)
    fast = for_model(model)
    assert isinstance(fast, Executor)
    assert "forward" not in type(model).__dict__ or "forward" not in model.__dict__
    assert generate(fast, prompts, 16) == expected
    assert generate(model, prompts, 16) == expected  # a model: its executor
    assert generate(model, prompts[0], 16, use_cache=False) == expected[0]


def test_other_caches_go_through_forward():
    model = arch_model("llama-gqa")
    fast = for_model(copy.deepcopy(model))

    class OtherCache(KVCache):  # e.g. the server's paged cache: not the contiguous layout
        pass

    tokens = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        c1 = OtherCache(2, 1, 2, 16, 32)
        c2 = model.new_cache(1, 16)
        fast(tokens[:, :5], cache=c1), model(tokens[:, :5], cache=c2)
        torch.testing.assert_close(fast(tokens[:, 5:], cache=c1), model(tokens[:, 5:], cache=c2))


def test_the_executor_is_chosen_once_and_says_why():
    """The model's forward is never replaced; the plan is made once per model and weights
    (a model quantized since gets a new one); the choice names its reason."""
    model = arch_model("llama-gqa")
    assert "forward" not in model.__dict__
    off = for_model(model, native=False)
    assert off.native is None and "turned off" in off.why
    if not native_available():
        pytest.skip("the native decode step is not available (no compiler, or KVFORMER_NATIVE=0)")
    first = for_model(model)
    assert first.native is not None and first.native.isa in first.why
    assert for_model(model).native is first.native  # decided once
    assert for_model(first) is first
    quantize_model(model, "int8")
    assert for_model(model).native is not first.native
    assert "forward" not in model.__dict__
    learned = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2,
                                      pos="learned")).eval()
    assert for_model(learned).native is None
    assert "learned positions" in for_model(learned).why


@pytest.mark.parametrize("native", [False, None])
def test_decode_across_a_growing_rotary_table(native):
    """A cache made by hand (not new_cache) lets decoding pass the end of the rotary table:
    the executor hands those steps to the forward, which grows the table; an executor made
    after that has a plan on the new table; logits stay those of the plain forward."""
    if native is None and not native_available():
        pytest.skip("the native decode step is not available (no compiler, or KVFORMER_NATIVE=0)")
    from kvformer.model.positions import Rotary

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                      d_ff=128, max_seq_len=4 * Rotary.INITIAL)
    model = Transformer(cfg).eval()
    copied = copy.deepcopy(model)
    n = Rotary.INITIAL
    tokens = torch.randint(0, 256, (1, n + 4))
    c1, c2 = (KVCache(2, 1, 2, n + 4, 16) for _ in range(2))
    with torch.inference_mode():
        model(tokens[:, :n - 2], cache=c1), for_model(copied, native)(tokens[:, :n - 2], cache=c2)
        steps = set()
        for i in range(n - 2, n + 4):
            fast = for_model(copied, native)
            ref = model(tokens[:, i:i + 1], cache=c1)
            out = fast(tokens[:, i:i + 1], cache=c2)
            steps.add(id(fast.native))
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert copied.rotary.cos.shape[0] == 2 * n
    assert len(steps) == (1 if native is False else 2)  # a new plan once, when the table grew
