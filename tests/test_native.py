"""kvformer's native kernels, path by path (avx512, avxvnni, avx2, neon, scalar: each one
this CPU can run), against references computed here: the integer layout unpacked by torch ops, the
matmul of the dequantized weight, the plain forward of the model. And the run-time choice of
path."""

import copy
import os

import pytest
import torch

from kvformer import ModelConfig, Transformer
from kvformer.errors import KvformerError
from kvformer.runtime import native
from kvformer.runtime.quant import (
    Int4Linear,
    Int8Linear,
    quantize_model,
    unpack_int4,
    unpack_scales,
)

PATHS = ["avx512", "avxvnni", "avx2", "neon", "scalar"]


@pytest.fixture(scope="module", autouse=True)
def built():
    if not native.available():
        if native._compiler() and not native.disabled():  # a compiler, and yet no library
            pytest.fail(f"the native kernels failed to build: {native.build_error()}")
        pytest.skip("no C++ compiler (or KVFORMER_NATIVE=0): the native kernels are not built")


def use(path):
    if path not in native.isas():
        pytest.skip(f"this CPU cannot run the {path} kernels: {native.kernel_path()}")
    return path


def cpu_flags() -> set[str]:
    return set(native.cpuinfo("flags").partition(":")[2].split())


# --------------------------------------------------------------------------- choosing a path
def test_paths_follow_what_the_cpu_reports():
    """cpuid inside the library and the kernel's /proc/cpuinfo agree on what runs here."""
    have = native.isas()
    assert have[-1] == "scalar" and have == sorted(have, key=PATHS.index)
    flags = cpu_flags()
    if flags:  # Linux
        assert ("avx2" in have) == ({"avx2", "fma", "f16c"} <= flags)
        avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags
        assert ("avx512" in have) == avx512
        # 256-bit vpdpbusd: AVX-VNNI's VEX form, or the EVEX form every AVX-512 path CPU has
        assert ("avxvnni" in have) == ("avx2" in have and ("avx_vnni" in flags or avx512))
    features = set(native.cpuinfo("Features").partition(":")[2].split())
    if features:  # Linux on ARM
        assert ("neon" in have) == ("asimddp" in features)


def test_threads_mode_follows_the_environment_and_can_be_set():
    """kvformer imported before torch makes OpenMP's threads sleep soon and the step use its
    own pool; KVFORMER_THREADS overrides; an unknown mode is refused."""
    import subprocess
    import sys

    code = "import {0}; from kvformer.runtime import native; print(native.threads())"
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_WAIT_POLICY", "KVFORMER_THREADS")}

    def mode(first, **extra):
        out = subprocess.run([sys.executable, "-c", code.format(first)], env={**env, **extra},
                             capture_output=True, text=True, check=True)
        return out.stdout.split()[-1]

    assert mode("kvformer") == "pool"
    assert mode("torch") == "openmp"  # torch first: its threads spin as libgomp's default
    assert mode("torch", OMP_WAIT_POLICY="passive") == "pool"
    assert mode("kvformer", KVFORMER_THREADS="openmp") == "openmp"
    assert mode("kvformer", GOMP_SPINCOUNT="300000") == "openmp"
    before = native.threads()
    try:
        with pytest.raises(RuntimeError, match="pool.*openmp"):
            native.threads("fibres")
        assert native.threads("openmp") == "openmp"
        assert native.threads("pool") == "pool"
    finally:
        native.threads(before)


def test_kvformer_isa_forces_a_lower_path_and_refuses_a_missing_one(monkeypatch):
    monkeypatch.delenv("KVFORMER_ISA", raising=False)
    assert native.default_isa() == native.isas()[0]
    monkeypatch.setenv("KVFORMER_ISA", "scalar")
    assert native.default_isa() == "scalar" and "forced" in native.kernel_path()
    monkeypatch.setenv("KVFORMER_ISA", "sse9")
    with pytest.raises(KvformerError, match=r"KVFORMER_ISA=sse9 is not a kernel path .*"
                                             r"\(it can run: "):
        native.default_isa()
    with pytest.raises(RuntimeError, match="cannot run the 'sse9' kernels"):
        torch.ops.kvformer_native.linear(torch.zeros(1, 32), "int8",
                                         torch.zeros(16, 32, dtype=torch.int8), torch.ones(16),
                                         "sse9")


# --------------------------------------------------------------------------- single kernels
@pytest.fixture(params=["int16", "int8"])
def acts(request):
    """The test runs with activations of two int8 levels, then of one (the default again
    after it)."""
    before = native.activations()
    native.activations(request.param)
    yield request.param
    native.activations(before)


def int4_layer(n, k, seed=0):
    torch.manual_seed(seed)
    layer = Int4Linear.from_float(torch.randn(n, k))
    q = unpack_int4(layer.qweight).float()
    d, m = unpack_scales(layer.scales)
    w = (q.view(n, k // 32, 32) * d.float()[..., None] + m.float()[..., None]).view(n, k)
    return layer, w


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n, k", [(16, 32), (48, 96), (96, 576), (64, 1536)])
def test_int4_kernel_matches_the_dequantized_matmul(path, n, k):
    layer, w = int4_layer(n, k)
    for rows in (1, 2, 3, 4, 5, 8):  # every tail of the row blocking
        x = torch.randn(rows, k)
        ref = x @ w.t()
        out = torch.ops.kvformer_native.linear(x, "int4", layer.qweight, layer.scales, use(path))
        # x enters as two int8 levels per block of 32: error ~1e-4 of the result
        assert ((out - ref).norm() / ref.norm()).item() < 1e-3


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n, k", [(5, 1), (16, 17), (33, 64), (7, 100), (64, 576)])
def test_int8_kernel_matches_the_dequantized_matmul(path, n, k):
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(n, k))
    w = layer.qweight.float() * layer.scale[:, None]
    for rows in (1, 3, 8):
        x = torch.randn(rows, k)
        ref = x @ w.t()
        out = torch.ops.kvformer_native.linear(x, "int8", layer.qweight, layer.scale, use(path))
        assert ((out - ref).norm() / ref.norm()).item() < 1e-3


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n, k", [(5, 1), (33, 70), (100, 576), (96, 1536)])
def test_int8_kernel_gives_a_batch_the_bits_of_one_row(path, n, k, acts):
    """A batch of x rows (the LM head of a batched step) takes its own blocked code; the
    integer sums are exact and the final expression the same, so each row's result has the
    bits it has alone. (n and k with tails of the 16-row tiles and 4-byte lanes.)"""
    torch.manual_seed(2)
    layer = Int8Linear.from_float(torch.randn(n, k) * torch.rand(n, 1))
    for rows in (2, 3, 4, 5, 16, 17):
        x = torch.randn(rows, k) * 30  # large activations: the widest integer sums
        out = torch.ops.kvformer_native.linear(x, "int8", layer.qweight, layer.scale, use(path))
        for i in range(rows):
            one = torch.ops.kvformer_native.linear(x[i:i + 1], "int8", layer.qweight,
                                                   layer.scale, path)
            assert torch.equal(out[i:i + 1], one), (rows, i)


@pytest.fixture
def int8_activations():
    """The activations enter the kernels as one int8 level for the test, then as before."""
    before = native.activations()
    native.activations("int8")
    yield
    native.activations(before)


def one_level(x, block):
    """x as one int8 level per block, llama.cpp's Q8: round(x 127 / max|x|) max|x| / 127."""
    rows, k = x.shape
    xb = x.double().view(rows, k // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    return (q * amax / 127).view(rows, k)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_int8_activations_are_one_level_of_the_formula(path, kind, int8_activations):
    """int4 layers: x enters as one int8 level per block of 32, and the kernels skip the
    second; the integer sums are exact, so the result is the formula (x rounded to one
    level, times the weight; the offsets m too multiply the rounded x, as llama.cpp's Q8_1
    does) to fp32 rounding. int8 layers keep two levels (their x has one scale per row,
    too coarse for one level): the same bits as in the default mode."""
    n, k = 96, 576
    if kind == "int4":
        layer, w = int4_layer(n, k, seed=4)
        a, b = layer.qweight, layer.scales
    else:
        torch.manual_seed(4)
        layer = Int8Linear.from_float(torch.randn(n, k) * torch.rand(n, 1))
        w = layer.qweight.float() * layer.scale[:, None]
        a, b = layer.qweight, layer.scale
    xs = [torch.randn(rows, k) * 30 for rows in (1, 2, 3, 4, 5, 8, 16, 17)]  # every tail
    outs = [torch.ops.kvformer_native.linear(x, kind, a, b, use(path)) for x in xs]
    native.activations("int16")
    twos = [torch.ops.kvformer_native.linear(x, kind, a, b, path) for x in xs]
    for x, out, two in zip(xs, outs, twos):
        if kind == "int8":
            assert torch.equal(out, two)
            continue
        ref = one_level(x, 32) @ w.double().t()
        err, err_two = (((y.double() - ref).abs().max() / ref.abs().max()).item()
                        for y in (out, two))
        assert err < 1e-6 and err_two > 1e-4, x.shape  # two levels: not this formula


def test_activations_follow_the_environment_and_can_be_set():
    import subprocess
    import sys

    code = "from kvformer.runtime import native; print(native.activations())"
    env = {k: v for k, v in os.environ.items() if k != "KVFORMER_ACTIVATIONS"}

    def mode(**extra):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra},
                             capture_output=True, text=True, check=True)
        return out.stdout.split()[-1]

    assert mode() == "int16"
    assert mode(KVFORMER_ACTIVATIONS="int8") == "int8"
    before = native.activations()
    try:
        with pytest.raises(RuntimeError, match="'int8' or 'int16', not 'int4'"):
            native.activations("int4")
        assert native.activations("int8") == "int8"
        assert native.activations("int16") == "int16"
    finally:
        native.activations(before)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_every_path_computes_the_same_numbers(kind, acts):
    """The paths quantize x the same way and differ only in the order of float additions
    (with one level too: some skip the zero second level, the scalar one multiplies it)."""
    torch.manual_seed(0)
    w = torch.randn(96, 576)
    layer = (Int8Linear if kind == "int8" else Int4Linear).from_float(w)
    a, b = (layer.qweight, layer.scale) if kind == "int8" else (layer.qweight, layer.scales)
    x = torch.randn(3, 576)
    outs = {p: torch.ops.kvformer_native.linear(x, kind, a, b, p) for p in native.isas()}
    scale = outs["scalar"].abs().max().item()
    for p, out in outs.items():
        torch.testing.assert_close(out, outs["scalar"], rtol=1e-5, atol=1e-6 * scale, msg=p)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_vpdpbusd_gives_the_bits_of_vpmaddubsw(kind):
    """The avxvnni path is the avx2 source with vpdpbusd in place of vpmaddubsw + vpmaddwd:
    every integer sum is exact either way, so the results are the same bits. (This runs the
    VEX form on a CPU with AVX-VNNI, the EVEX form on an AVX-512 one.)"""
    use("avxvnni"), use("avx2")
    torch.manual_seed(1)
    w = torch.randn(64, 1536) * torch.rand(64, 1)  # rows of different scales
    layer = (Int8Linear if kind == "int8" else Int4Linear).from_float(w)
    a, b = (layer.qweight, layer.scale) if kind == "int8" else (layer.qweight, layer.scales)
    for rows in (1, 2, 3, 5):
        x = torch.randn(rows, 1536) * 30  # large activations: the widest integer sums
        vnni = torch.ops.kvformer_native.linear(x, kind, a, b, "avxvnni")
        assert torch.equal(vnni, torch.ops.kvformer_native.linear(x, kind, a, b, "avx2"))


@pytest.mark.parametrize("path", PATHS)
def test_dequantize_is_exact_on_every_path(path):
    layer, w = int4_layer(48, 96, seed=3)
    f32 = torch.ops.kvformer_native.dequant_int4(layer.qweight, layer.scales, False, use(path))
    bf16 = torch.ops.kvformer_native.dequant_int4(layer.qweight, layer.scales, True, path)
    assert torch.equal(f32, w)
    assert torch.equal(bf16, w.bfloat16())  # rounded to nearest even, as torch rounds


def test_kernels_refuse_a_foreign_layout():
    with pytest.raises(RuntimeError, match=r"int4 weights must be uint8 \[N/16, K/32, 256\]"):
        torch.ops.kvformer_native.linear(torch.zeros(1, 64), "int4",
                                         torch.zeros(64, 32, dtype=torch.uint8),
                                         torch.zeros(2, 64, 2, dtype=torch.bfloat16), "scalar")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kv,hd", [("int8", 64), ("int8", 128), ("int8", 32), ("int8", 48),
                                   ("int4", 64), ("int4", 32), ("int4", 128)])
def test_attention_over_quantized_rows_is_the_formula(path, kv, hd):
    """attend_q, the kernel that reads int8 / int4 K/V rows with their scales (dequantized
    inside, row by row), against softmax(q kᵀ) v over the rows kvformer.kv.formats dequantizes;
    a masked-out-free call over 70 rows, 3 query heads sharing one KV head."""
    from kvformer.kv.formats import kv_format

    torch.manual_seed(hd)
    fmt = kv_format(kv)
    q = torch.randn(3, hd) / hd ** 0.5
    (kq, ks), (vq, vs) = fmt.encode(torch.randn(70, hd)), fmt.encode(torch.randn(70, hd))
    ref = (torch.softmax(q.double() @ fmt.decode((kq, ks), torch.float64).t(), -1)
           @ fmt.decode((vq, vs), torch.float64))
    out = torch.ops.kvformer_native.attend(q, kq, vq, [ks, vs], use(path))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd", [32, 64, 128, 256, 48])
def test_attention_over_float_rows_is_the_formula(path, dtype, hd):
    """attend over fp32 / bf16 rows, at lengths below, at and past the 16 slots the avx512
    path scores at once (and its tails)."""
    torch.manual_seed(hd)
    q = torch.randn(3, hd) / hd ** 0.5
    for n in (5, 16, 70):
        k, v = torch.randn(n, hd).to(dtype), torch.randn(n, hd).to(dtype)
        ref = torch.softmax(q.double() @ k.double().t(), -1) @ v.double()
        out = torch.ops.kvformer_native.attend(q, k, v, [], use(path))
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kv,hd", [("fp32", 64), ("bf16", 64), ("bf16", 128), ("bf16", 48),
                                   ("bf16", 256), ("int8", 64), ("int4", 64), ("int4", 128)])
def test_paged_attention_over_blocks_out_of_order_is_the_formula(path, kv, hd):
    """One kernel call over a paged row: slot s in block table[s // 16] (blocks out of order,
    some consecutive ones, so a run may span blocks), lengths within a block, at a block's
    end and past several; against softmax(q kᵀ) v over the rows gathered in slot order."""
    from kvformer.kv.formats import kv_format

    torch.manual_seed(hd)
    bs, n_blocks = 16, 12
    q = torch.randn(3, hd) / hd ** 0.5
    if kv in ("fp32", "bf16"):
        dtype = torch.float32 if kv == "fp32" else torch.bfloat16
        k, v = (torch.randn(n_blocks * bs, hd).to(dtype) for _ in range(2))
        scales, kd, vd = [], k.double(), v.double()
    else:
        fmt = kv_format(kv)
        (k, ks), (v, vs) = (fmt.encode(torch.randn(n_blocks * bs, hd)) for _ in range(2))
        scales = [ks, vs]
        kd, vd = fmt.decode((k, ks), torch.float64), fmt.decode((v, vs), torch.float64)
    table = torch.tensor([7, 3, 4, 5, 0, 11, 9, 10, 1])  # 3, 4, 5 and 9, 10: consecutive
    for n in (1, 5, 16, 17, 40, 64, 70, 9 * bs):
        slots = table[torch.arange(n) // bs] * bs + torch.arange(n) % bs
        ref = torch.softmax(q.double() @ kd[slots].t(), -1) @ vd[slots]
        out = torch.ops.kvformer_native.attend_paged(q, k, v, scales, table, bs, n, use(path))
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the whole step
def model_for(head_dim, n_head, n_kv, dtype, mode=None, max_len=640):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=head_dim * n_head, n_layer=2, n_head=n_head,
                      n_kv_head=n_kv, d_ff=128, max_seq_len=max_len)
    model = Transformer(cfg).eval()
    if mode:
        return quantize_model(model, mode, act=dtype)
    return model.to(dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head_dim", [64, 48])  # a specialised width and the generic one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_cache_with_padding_matches_the_forward(path, head_dim, dtype):
    """Past 256 cached slots attention is split into parts that run on different threads and
    are combined; a left-padded row masks its first slots. The step's logits and the K/V it
    writes equal those of Transformer.forward."""
    from kvformer.runtime.step import NativeStep

    model = model_for(head_dim, 6, 2, dtype)
    b, t = 2, 600
    tokens = torch.randint(0, 256, (b, t + 1))
    mask = torch.ones(b, t + 1, dtype=torch.bool)
    mask[1, :37] = False
    pos = torch.tensor([[t], [t - 37]])
    with torch.inference_mode():
        c1, c2 = model.new_cache(b, t + 1), model.new_cache(b, t + 1)
        step = NativeStep(model, isa=use(path))  # after the rotary table has grown
        model(tokens[:, :t], cache=c1, key_mask=mask[:, :t])
        for i in range(2):
            c2.k[i][:, :, :t] = c1.k[i][:, :, :t]
            c2.v[i][:, :, :t] = c1.v[i][:, :, :t]
        c2.length = t
        ref = model(tokens[:, t:], input_pos=pos, cache=c1, key_mask=mask)
        out = step.decode(tokens[:, t:], c2, pos, mask)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * ref.abs().max().item(),
                               rtol=0)
    for i in range(2):
        torch.testing.assert_close(c2.k[i][:, :, t].float(), c1.k[i][:, :, t].float(),
                                   atol=tol, rtol=tol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kv,head_dim", [("int8", 64), ("int8", 48), ("int4", 64)])
def test_quantized_cache_step_matches_the_forward(path, kv, head_dim):
    """The step over an int8 / int4 cache (past 256 slots, a left-padded row): its logits
    equal those of Transformer.forward over the same cache, and the row it writes is the
    one kvformer.kv.formats makes of the same K/V (the integers and scales, bit for bit)."""
    from kvformer.runtime.step import NativeStep

    model = model_for(head_dim, 6, 2, torch.float32)
    b, t = 2, 300
    tokens = torch.randint(0, 256, (b, t + 1))
    mask = torch.ones(b, t + 1, dtype=torch.bool)
    mask[1, :37] = False
    pos = torch.tensor([[t], [t - 37]])
    with torch.inference_mode():
        c1, c2 = model.new_cache(b, t + 1, kv), model.new_cache(b, t + 1, kv)
        step = NativeStep(model, isa=use(path))
        model(tokens[:, :t], cache=c1, key_mask=mask[:, :t])
        for mine, ref in zip(c2.k + c2.v + c2.k_scale + c2.v_scale,
                             c1.k + c1.v + c1.k_scale + c1.v_scale):
            mine.copy_(ref)
        c2.length = t
        ref = model(tokens[:, t:], input_pos=pos, cache=c1, key_mask=mask)
        out = step.decode(tokens[:, t:], c2, pos, mask)
    torch.testing.assert_close(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    for mine, theirs in zip(c2.k + c2.v + c2.k_scale + c2.v_scale,
                            c1.k + c1.v + c1.k_scale + c1.v_scale):
        assert torch.equal(mine[:, :, t], theirs[:, :, t])


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_path_decodes_the_same_tokens(mode, acts):
    """Greedy decoding through each path of the C++ step gives the tokens of the plain
    forward on a small quantized model (activations of two int8 levels, and of one)."""
    from kvformer.runtime.generation import generate
    from kvformer.runtime.step import for_model

    model = model_for(32, 4, 2, torch.float32, mode, max_len=128)
    prompt = list(range(5, 17))
    expected = generate(for_model(model, native=False), prompt, 20)
    for path in native.isas():
        fast = for_model(copy.deepcopy(model), native=path)
        assert fast.isa == path and generate(fast, prompt, 20) == expected
    model.kv_dtype = "int8"  # and over an int8 cache: the same tokens as its forward
    expected = generate(for_model(model, native=False), prompt, 20)
    for path in native.isas():
        assert generate(for_model(copy.deepcopy(model), native=path), prompt, 20) == expected


def test_the_plan_names_are_checked_on_both_sides():
    """The C++ step reads the plan by name: an entry it does not read, or one it needs that
    is missing, is an error naming it (the two sides cannot drift apart silently)."""
    from kvformer.runtime.plan import StepPlan

    model = model_for(32, 4, 2, torch.float32)
    named = StepPlan.from_model(model).named()

    def make(tensors, ints):
        return torch.ops.kvformer_native.plan_new(
            list(tensors), list(tensors.values()), list(ints), list(ints.values()),
            list(named.reals), list(named.reals.values()), "scalar")

    handle = make(named.tensors, named.ints)
    torch.ops.kvformer_native.plan_free(handle)
    with pytest.raises(RuntimeError, match="'layers.0.extra' is not read"):
        make({**named.tensors, "layers.0.extra": torch.zeros(1)}, named.ints)
    ints = dict(named.ints)
    del ints["layers.1.down.kind"]
    with pytest.raises(RuntimeError, match="no integer 'layers.1.down.kind'"):
        make(named.tensors, ints)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head_dim,dtype,mode,kv", [(64, torch.float32, None, None),
                                                    (48, torch.float32, None, None),
                                                    (64, torch.bfloat16, None, None),
                                                    (64, torch.float32, "int4", None),
                                                    (64, torch.float32, None, "int8"),
                                                    (48, torch.bfloat16, None, "int8"),
                                                    (64, torch.float32, "int4", "int4")])
def test_paged_step_reads_and_writes_the_pool_as_the_paged_forward_does(path, head_dim,
                                                                        dtype, mode, kv):
    """The step over a paged pool: rows of different lengths (one past 256 slots, so its
    attention is split and combined), blocks scattered through the pool, a first block that
    two rows share. Its logits, and the whole pool after it, equal those of
    Transformer.forward over the same pool (PagedBatch)."""
    from kvformer.kv.paged import BlockPool
    from kvformer.runtime.step import NativeStep

    model = model_for(head_dim, 6, 2, dtype, mode)
    bs, lengths = 16, [3, 40, 300, 35]
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 256, (n + 1,), generator=gen).tolist() for n in lengths]
    rows[3][:bs] = rows[1][:bs]  # rows 1 and 3 share their first block
    ref = BlockPool.for_model(model, n_blocks=64, block_size=bs, dtype=kv,
                              prefix_caching=False)
    order = torch.randperm(64, generator=gen).add(1).tolist()  # blocks out of order
    tables = []
    for i, n in enumerate(lengths):
        k = ref.blocks_for(n + 1)
        table = [tables[1][0]] + order[:k - 1] if i == 3 else order[:k]
        del order[:k - 1 if i == 3 else k]
        tables.append(table)
    with torch.inference_mode():
        step = NativeStep(model, isa=use(path))
        for i, n in enumerate(lengths):
            lo = bs if i == 3 else 0
            model(torch.tensor([rows[i][lo:n]]), input_pos=torch.arange(lo, n)[None],
                  cache=ref.batch([tables[i]], [lo]))
        pool = BlockPool.for_model(model, n_blocks=64, block_size=bs, dtype=kv,
                                   prefix_caching=False)
        for a, b in zip(pool.tensors, ref.tensors):
            a.copy_(b)
        tokens = torch.tensor([[r[n]] for r, n in zip(rows, lengths)])
        expected = model(tokens, input_pos=torch.tensor(lengths)[:, None],
                         cache=ref.batch(tables, lengths))
        padded = torch.zeros(len(tables), max(map(len, tables)), dtype=torch.long)
        for i, t in enumerate(tables):
            padded[i, :len(t)] = torch.tensor(t)
        out = step.paged(tokens, pool, padded, torch.tensor(lengths))
    # int4: the step's kernels take activations as two int8 levels (docs/architecture.md)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-3 if mode else 1e-4
    torch.testing.assert_close(out.float(), expected.float(),
                               atol=tol * expected.abs().max().item(), rtol=0)
    used = sorted({b for t in tables for b in t})
    unused = [b for b in range(65) if b not in used]
    if kv:  # the rows as numbers: an int8 level may differ where the two K/V do
        tol = 3e-2 if kv == "int8" else 0.15
        num = [pool.format.decode(parts, torch.float32) for parts in
               [(pool.k[i], pool.k_scale[i]) for i in range(2)]
               + [(pool.v[i], pool.v_scale[i]) for i in range(2)]]
        ref_num = [ref.format.decode(parts, torch.float32) for parts in
                   [(ref.k[i], ref.k_scale[i]) for i in range(2)]
                   + [(ref.v[i], ref.v_scale[i]) for i in range(2)]]
    else:
        num, ref_num = pool.k + pool.v, ref.k + ref.v
    for a, b in zip(num, ref_num):
        for table, n in zip(tables, lengths):  # every slot of every row, the new one too
            ia = pool.slot_index(table, 0, n + 1)
            h, d = a.shape[0], a.shape[-1]
            torch.testing.assert_close(a.view(h, -1, d)[:, ia].float(),
                                       b.view(h, -1, d)[:, ia].float(), atol=tol, rtol=tol)
    for a, b in zip(pool.tensors, ref.tensors):  # untouched blocks keep their bytes
        assert torch.equal(a[:, unused].view(torch.uint8), b[:, unused].view(torch.uint8))


@pytest.mark.parametrize("kv", [None, "int8"])
def test_a_paged_row_has_the_same_bits_in_any_batch(kv):
    """A long row (its attention split into parts) gives the same logits, bit for bit,
    alone and beside fifteen other long rows: how a row's attention is split depends on its
    own length only, never on the rest of the batch (nor on the thread count)."""
    from kvformer.kv.paged import BlockPool
    from kvformer.runtime.step import NativeStep

    # int4 layers: their kernels give a row the same bits in any batch (a dense fp32 matmul
    # need not)
    model = model_for(64, 6, 2, torch.float32, "int4", max_len=2048)
    bs, lengths = 16, [1200] + [900] * 15
    model.rotary.ensure(max(lengths) + 1)  # the step reads the positions from its table
    per_row = [(n + 1 + bs - 1) // bs for n in lengths]
    pool = BlockPool.for_model(model, n_blocks=sum(per_row), block_size=bs, dtype=kv,
                               prefix_caching=False)
    gen = torch.Generator().manual_seed(3)
    for t in pool.tensors:  # random cached K/V (int8 rows: random bytes and small scales)
        if t.is_floating_point():
            t.copy_(torch.rand(t.shape, generator=gen) * 0.1 if kv else
                    torch.randn(t.shape, generator=gen))
        else:
            t.copy_(torch.randint(-100, 100, t.shape, generator=gen).to(t.dtype))
    order = torch.randperm(sum(per_row), generator=gen).add(1).tolist()
    tables = torch.zeros(len(lengths), max(per_row), dtype=torch.long)
    for i, k in enumerate(per_row):
        tables[i, :k] = torch.tensor(order[:k])
        del order[:k]
    tokens = torch.randint(0, 256, (len(lengths), 1), generator=gen)
    step = NativeStep(model, isa=native.isas()[0])
    with torch.inference_mode():
        alone = step.paged(tokens[:1], pool, tables[:1], torch.tensor(lengths[:1]))
        batch = step.paged(tokens, pool, tables, torch.tensor(lengths))
    assert alone is not None and torch.equal(batch[:1], alone)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kv", [None, "int8", "int4"])
def test_a_prompt_as_rows_of_one_step_is_its_prefill(path, kv):
    """A prompt's tokens as rows of one paged step (one table, lengths 0, 1, ...) are its
    prefill: causal through each row's own length. Beside another sequence's decode row,
    the K/V they write and the logits of the rows asked for equal, bit for bit, those of
    decoding the prompt one token per step; and those logits match Transformer.forward
    over the whole prompt (the independent reference)."""
    from kvformer.kv.paged import BlockPool
    from kvformer.runtime.step import NativeStep

    model = model_for(64, 6, 2, torch.float32, "int4")
    bs, n = 16, 37
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 256, (n,), generator=gen)
    other = torch.randint(0, 256, (21,), generator=gen)  # a sequence already decoding
    pools = [BlockPool.for_model(model, n_blocks=12, block_size=bs, dtype=kv,
                                 prefix_caching=False) for _ in range(2)]
    table, table2 = [5, 2, 9], [7, 3]  # blocks out of order
    step = NativeStep(model, isa=use(path))
    with torch.inference_mode():
        for pool in pools:  # the other sequence's 20 cached tokens, one step each
            for i in range(20):
                step.paged(other[i:i + 1, None], pool, torch.tensor([table2]),
                           torch.tensor([i]))
        one_by_one = []
        for i in range(n):  # pool 0: the prompt one token per step
            one_by_one.append(step.paged(prompt[i:i + 1, None], pools[0],
                                         torch.tensor([table]), torch.tensor([i]))[0, 0])
        decode = step.paged(other[20:, None], pools[0], torch.tensor([table2]),
                            torch.tensor([20]))[0, 0]
        # pool 1: the other sequence's decode row, then the prompt in two chunks of rows
        tables = torch.tensor([table2 + [0]] + [table] * 30)  # padded with 0
        tokens = torch.cat([other[20:], prompt[:30]])[:, None]
        lens = torch.tensor([20] + list(range(30)))
        first = step.paged(tokens, pools[1], tables, lens, torch.tensor([0, 13, 30]))
        rest = step.paged(prompt[30:, None], pools[1], torch.tensor([table] * (n - 30)),
                          torch.arange(30, n), torch.tensor([n - 31]))
        full = model(prompt[None])[0]
    assert first.shape == (3, 1, 256) and rest.shape == (1, 1, 256)
    assert torch.equal(first[0, 0], decode)
    assert torch.equal(first[1, 0], one_by_one[12]) and torch.equal(first[2, 0], one_by_one[29])
    assert torch.equal(rest[0, 0], one_by_one[n - 1])
    for a, b in zip(pools[0].tensors, pools[1].tensors):  # every slot the rows wrote
        for t, m in ((table, n), (table2, 21)):
            ia = pools[0].slot_index(t, 0, m)
            h = a.shape[0]
            assert torch.equal(a.view(h, -1, a.shape[-1])[:, ia].view(torch.uint8),
                               b.view(h, -1, b.shape[-1])[:, ia].view(torch.uint8))
    # int4 layers: the step's activations are int8 levels, the forward's are floats; the
    # forward keeps exact K/V, the step int4 rows (a step of 1/15 of a group's range)
    tol = 0.15 if kv == "int4" else 2e-2
    for i in (12, 29, n - 1):
        torch.testing.assert_close(one_by_one[i].float(), full[i].float(),
                                   atol=tol * full[i].abs().max().item(), rtol=0)
    with pytest.raises(RuntimeError, match="no row 31"):
        step.paged(prompt[30:, None], pools[1], torch.tensor([table] * (n - 30)),
                   torch.arange(30, n), torch.tensor([31]))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kv", [None, "int8", "int4"])
def test_a_prompt_into_a_contiguous_cache_is_prefilled_by_the_step(path, kv, monkeypatch):
    """The executor prefills one row into its KVCache through the C++ step (the
    cache seen as one block): the logits of every position and the K/V written have the
    bits of decoding the prompt one token per step, in one call or in chunks, with the
    last position only or all; nothing goes through Transformer.forward; and the logits
    match the plain forward's (the independent reference)."""
    from kvformer.runtime.step import for_model

    plain = model_for(64, 6, 2, torch.float32, "int4")
    model = for_model(copy.deepcopy(plain), native=use(path))
    prompt = torch.randint(0, 256, (1, 45), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        one = model.model.new_cache(1, 64, kv)
        steps = torch.cat([model(prompt[:, i:i + 1], cache=one) for i in range(45)], dim=1)
        forwards = []
        monkeypatch.setattr(model.model, "forward", lambda *a, **k: forwards.append(1))
        whole = model.model.new_cache(1, 64, kv)
        rows = model(prompt, cache=whole)
        chunked = model.model.new_cache(1, 64, kv)
        first = model(prompt[:, :10], input_pos=torch.arange(10)[None], cache=chunked)
        last = model(prompt[:, 10:], cache=chunked, last_only=True)
        monkeypatch.undo()
        full = plain(prompt)
    assert not forwards
    assert rows.shape == (1, 45, 256) and last.shape == (1, 1, 256)
    assert torch.equal(rows, steps) and torch.equal(first, steps[:, :10])
    assert torch.equal(last[0, 0], steps[0, -1])
    assert one.length == whole.length == chunked.length == 45
    parts = [c.k + c.v + c.k_scale + c.v_scale for c in (one, whole, chunked)]
    for a, b, c in zip(*parts):
        assert torch.equal(a[:, :, :45].view(torch.uint8), b[:, :, :45].view(torch.uint8))
        assert torch.equal(a[:, :, :45].view(torch.uint8), c[:, :, :45].view(torch.uint8))
    tol = 2e-2 if kv is None else 1e-1  # int8 levels of x; quantized K/V
    torch.testing.assert_close(rows.float(), full.float(), atol=tol * full.abs().max().item(),
                               rtol=0)


def test_paged_step_refuses_a_table_without_room():
    from kvformer.kv.paged import BlockPool
    from kvformer.runtime.step import NativeStep

    model = model_for(64, 6, 2, torch.float32)
    pool = BlockPool.for_model(model, n_blocks=4, block_size=4)
    step = NativeStep(model)
    with pytest.raises(RuntimeError, match="has no room for slot 4"):
        step.paged(torch.tensor([[1]]), pool, torch.tensor([[1]]), torch.tensor([4]))
    with pytest.raises(RuntimeError, match="names block 9"):
        step.paged(torch.tensor([[1]]), pool, torch.tensor([[9]]), torch.tensor([2]))


def _step_logits(step, model, tokens):
    """One step of 16 rows over a copy of the 40-token cache model.filled: the logits."""
    cache = copy.deepcopy(model.filled)
    return step.decode(tokens[:, 40:41], cache)


def _child_step(conn, step, model, tokens):
    # torch's own OpenMP threads do not survive a fork (a parallel copy hangs in the child):
    # the cache is copied on one thread; the step then runs on two, through its own pool
    torch.set_num_threads(1)
    cache = copy.deepcopy(model.filled)
    torch.set_num_threads(2)
    with torch.inference_mode():
        conn.send(step.decode(tokens[:, 40:41], cache).numpy().tobytes())  # bytes: no shared memory


@pytest.mark.parametrize("mode", ["pool", "openmp"])
def test_the_step_gives_the_same_bits_on_any_number_of_threads(mode):
    """The step's matmuls and attention are cut into pieces that whichever thread is free
    takes (kvformer's own pool, csrc/threads.h, or torch's OpenMP team): the logits are the same
    bits on 1, 2 and 3 threads, when several threads run steps at once (on the pool, all but
    one of them then run alone), and (on the pool) in a child process forked after the
    workers started, which has none of them."""
    import multiprocessing
    import threading

    from kvformer.runtime.step import NativeStep

    # big enough that every matmul is cut into several pieces at 16 rows
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=384, n_layer=2, n_head=6, n_kv_head=2,
                      d_ff=1024, max_seq_len=64)
    model = quantize_model(Transformer(cfg).eval(), "int4", act=torch.float32)
    tokens = torch.randint(0, 512, (16, 41))
    step = NativeStep(model)
    threads, before = torch.get_num_threads(), native.threads()
    native.threads(mode)
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)  # the prefill's torch ops too depend on the threads
            model.filled = model.new_cache(16, 48)
            model(tokens[:, :40], cache=model.filled)
            one = _step_logits(step, model, tokens)
            for n in (2, 3):
                torch.set_num_threads(n)
                assert torch.equal(_step_logits(step, model, tokens), one)
            outs = [None] * 4

            def run(i):
                with torch.inference_mode():
                    outs[i] = _step_logits(step, model, tokens)

            workers = [threading.Thread(target=run, args=(i,)) for i in range(4)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            assert all(torch.equal(o, one) for o in outs)
        if mode == "openmp":
            return  # libgomp's threads do not survive a fork: a child's OpenMP region hangs
        ctx = multiprocessing.get_context("fork")
        mine, theirs = ctx.Pipe()
        child = ctx.Process(target=_child_step, args=(theirs, step, model, tokens))
        child.start()
        assert mine.poll(120), "the forked child did not finish its step"
        assert mine.recv() == one.numpy().tobytes()
        child.join(30)
        assert child.exitcode == 0
    finally:
        torch.set_num_threads(threads)
        native.threads(before)


def test_decoding_past_the_rotary_table_renews_the_plan(monkeypatch):
    """A prompt longer than the rotary table the plan was made with (it holds 512 positions
    at first and doubles on demand) is prefilled by the forward, which grows the table;
    decoding after it goes on through the C++ step on a new plan (it had gone through the
    forward for every token, ~5x slower at 1,000 cached), with the forward's numbers, and
    the server's runner renews its plan the same way."""
    from kvformer.runtime.generation import generate
    from kvformer.runtime.step import for_model

    use("scalar")
    model = model_for(64, 4, 2, torch.float32, "int4", max_len=2048)
    run = for_model(model)
    assert run.native.rope_len == 512
    prompt = [int(t) for t in torch.randint(0, 256, (700,), generator=torch.Generator()
                                             .manual_seed(1))]
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward",
                        lambda self, *a, **k: calls.append(a[0].shape[1]) or forward(self, *a, **k))
    out = generate(model, prompt, 6)
    monkeypatch.undo()
    # the forward ran the prefill at most (the step may, where rows pay), no decode step
    assert for_model(model).native.rope_len >= 701 and calls in ([], [700])
    ref = []
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        for _ in range(6):
            ref.append(int(model(ids)[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[ref[-1]]])], dim=1)
    assert out == ref
