"""The GGUF block types as kvformer runs them (kb weights: kvformer/runtime/kb.py,
kvformer/formats/gguf/blocks.py, csrc/kernels.h), against the `gguf` package's own numpy
dequantizer: random valid blocks of every type are repacked (exactly: the same numbers back),
and every kernel path this CPU runs multiplies them as x times the dequantized matrix."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from kvformer.errors import CheckpointError
from kvformer.formats.gguf.blocks import KB_TYPES, to_kb
from kvformer.runtime import native
from kvformer.runtime.kb import KbBlocks, KbEmbedding, KbLinear, dequantize_kb

PATHS = ["avx512", "avxvnni", "avx2", "neon", "scalar"]
TYPES = {name: tid for tid, (name, _, _) in KB_TYPES.items()}


def random_blocks(name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """[n, k / per, bytes] blocks of type `name`: random integers and scale bytes, with
    fp16 scales set to values a real file holds (1e-3 .. 2e-2; mins of either sign)."""
    rng = np.random.default_rng(seed)
    _, per, size = KB_TYPES[TYPES[name]]
    b = rng.integers(0, 256, size=(n, k // per, size), dtype=np.uint8)

    def f16(at, lo=1e-3, hi=2e-2):
        v = rng.uniform(lo, hi, size=(n, k // per, 1)).astype(np.float16)
        b[..., at:at + 2] = v.view(np.uint8)

    if name in ("Q4_1", "Q5_1"):
        f16(0)
        f16(2, -0.1, 0.1)
    elif name in ("Q4_K", "Q5_K"):
        f16(0)
        f16(2)
    elif name == "Q6_K":
        f16(208)
    else:
        f16(0)
    return b


def scaled_blocks(name: str, n: int, k: int, seed: int, std: float = 0.02) -> np.ndarray:
    """random_blocks with every fp16 scale multiplied so the weights' standard deviation is
    ``std`` (a model's initialisation: activations stay sane through the layers)."""
    b = random_blocks(name, n, k, seed)
    factor = std / reference(name, b).std()
    for at in {"Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2),
               "Q6_K": (208,)}.get(name, (0,)):
        v = np.ascontiguousarray(b[..., at:at + 2]).view(np.float16).astype(np.float32)
        b[..., at:at + 2] = (v * factor).astype(np.float16).view(np.uint8)
    return b


def reference(name: str, blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    return gguf_dequantize(blocks.reshape(n, -1), GGMLQuantizationType(TYPES[name])) \
        .reshape(n, -1)


def kb_of(name: str, blocks: np.ndarray):
    n = blocks.shape[0]
    k = blocks.shape[1] * KB_TYPES[TYPES[name]][1]
    return to_kb(torch.from_numpy(blocks.reshape(-1).copy()), TYPES[name], (n, k))


SHAPES = [(16, 256), (48, 512), (64, 768)]


@pytest.mark.parametrize("name", sorted(TYPES))
def test_the_repack_is_exact(name):
    """Read back with torch ops, the kb layout is the file's matrix, to the bit."""
    for n, k in SHAPES:
        blocks = random_blocks(name, n, k, seed=n)
        kb = kb_of(name, blocks)
        got = dequantize_kb(kb.q, kb.s, kb.bits, kb.scales, kb.lut, kb.zero)
        assert torch.equal(got, torch.from_numpy(reference(name, blocks)))


@pytest.mark.parametrize("name", sorted(TYPES))
def test_the_native_repack_gives_the_same_bytes(name):
    """csrc/repack.cpp (what loading uses) and the numpy repack write the same records and
    scales, byte for byte."""
    if not native.available():
        pytest.skip("no native kernels here")
    for n, k in SHAPES:
        blocks = random_blocks(name, n, k, seed=k + 1)
        raw = torch.from_numpy(blocks.reshape(-1).copy())
        a = to_kb(raw, TYPES[name], (n, k))
        b = to_kb(raw, TYPES[name], (n, k), native_repack=False)
        assert torch.equal(a.q, b.q) and torch.equal(a.s, b.s)


def use(path):
    if not native.available():
        pytest.skip("no native kernels here")
    if path not in native.isas():
        pytest.skip(f"this CPU cannot run the {path} kernels")
    return path


def _lut(kb):
    return kb.lut if kb.lut is not None else torch.empty(0, dtype=torch.uint8)


@pytest.mark.parametrize("name", sorted(TYPES))
def test_native_dequant_is_exact(name):
    use("scalar")
    blocks = random_blocks(name, 48, 512, seed=3)
    kb = kb_of(name, blocks)
    ref = torch.from_numpy(reference(name, blocks))
    got = torch.ops.kvformer_native.dequant_kb(kb.q, kb.s, kb.bits, kb.scales, kb.zero,
                                               _lut(kb), 0, 48, False)
    assert torch.equal(got, ref)
    rows = torch.ops.kvformer_native.dequant_kb(kb.q, kb.s, kb.bits, kb.scales, kb.zero,
                                                _lut(kb), 5, 37, True)
    assert torch.equal(rows, ref[5:37].to(torch.bfloat16))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", sorted(TYPES))
def test_kb_matmul_on_every_path(path, name):
    """x W^T through each path's kb kernel, for 1 to 9 rows of x (decode and a batch),
    against x times gguf's dequantized matrix in float64: within the error of quantizing
    x (two int8 levels, or one with KVFORMER_ACTIVATIONS=int8), and every path gives the
    scalar path's numbers up to fp32 summation order."""
    use(path)
    for n, k in SHAPES:
        blocks = random_blocks(name, n, k, seed=k)
        kb = kb_of(name, blocks)
        w = torch.from_numpy(reference(name, blocks)).double()
        for m in (1, 2, 5, 9):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            x[0, :7] *= 40  # an outlier block
            ref = x.double() @ w.T
            for levels in ("int16", "int8"):
                native.activations(levels)
                try:
                    y = torch.ops.kvformer_native.linear_kb(x, kb.q, kb.s, kb.bits, kb.scales,
                                                            kb.zero, _lut(kb), path)
                    ys = torch.ops.kvformer_native.linear_kb(x, kb.q, kb.s, kb.bits,
                                                             kb.scales, kb.zero, _lut(kb),
                                                             "scalar")
                finally:
                    native.activations("int16")
                err = ((y.double() - ref).norm() / ref.norm()).item()
                assert err < (2e-4 if levels == "int16" else 1.5e-2), (m, n, k, levels, err)
                torch.testing.assert_close(y, ys, rtol=1e-5, atol=1e-5 * ys.abs().max().item())


def test_layers_use_the_kernels_and_agree_with_the_file():
    """KbLinear (few rows: the kernels; many: a dense matmul of the dequantized weight) and
    KbEmbedding give what the file's matrix gives."""
    use("scalar")
    blocks = random_blocks("Q6_K", 64, 512, seed=9)
    w = torch.from_numpy(reference("Q6_K", blocks))
    layer = KbLinear(kb_of("Q6_K", blocks), act=torch.float32)
    for m in (3, 70):
        x = torch.randn(m, 512)
        ref = x.double() @ w.double().T
        assert ((layer(x).double() - ref).norm() / ref.norm()).item() < 2e-4
    emb = KbEmbedding(kb_of("Q6_K", blocks), act=torch.float32)
    ids = torch.tensor([[0, 17, 63], [5, 5, 40]])
    assert torch.equal(emb(ids), w[ids])
    with pytest.raises(IndexError):
        emb(torch.tensor([64]))


@pytest.mark.parametrize("native_repack", [True, False])
def test_fused_parts_repacked_into_one_buffer_are_stacked_without_a_copy(native_repack):
    """The loader repacks Q, K, V (gate, up) into row slices of one buffer (``kb_buffers`` +
    ``to_kb(out=)``); stacking them is then a view of that buffer holding exactly the bytes
    of the parts repacked on their own. Parts from separate buffers are copied."""
    from kvformer.formats.gguf.blocks import kb_buffers

    if native_repack and not native.available():
        pytest.skip("needs the native library")
    sizes, k = (64, 32, 32), 512
    parts = [random_blocks("Q4_K", n, k, seed=20 + i) for i, n in enumerate(sizes)]
    alone = [to_kb(torch.from_numpy(b.reshape(-1).copy()), TYPES["Q4_K"], (n, k),
                   native_repack=native_repack) for b, n in zip(parts, sizes)]
    q, s = kb_buffers(TYPES["Q4_K"], sum(sizes), k)
    placed, at = [], 0
    for b, n in zip(parts, sizes):
        placed.append(to_kb(torch.from_numpy(b.reshape(-1).copy()), TYPES["Q4_K"], (n, k),
                            native_repack=native_repack,
                            out=(q[at // 16:(at + n) // 16], s[at // 16:(at + n) // 16])))
        at += n
    fused = KbBlocks.stack(placed)
    assert fused.q.data_ptr() == q.data_ptr() and fused.s.data_ptr() == s.data_ptr()
    assert torch.equal(fused.q, torch.cat([a.q for a in alone]))
    assert torch.equal(fused.s, torch.cat([a.s for a in alone]))
    copied = KbBlocks.stack(alone)
    assert copied.q.data_ptr() != alone[0].q.data_ptr()
    assert torch.equal(copied.q, fused.q) and torch.equal(copied.s, fused.s)


def test_a_matrix_the_layout_cannot_take_is_refused_in_one_line():
    blocks = random_blocks("Q8_0", 16, 64)
    with pytest.raises(CheckpointError, match="tiles of 16"):
        to_kb(torch.from_numpy(blocks.reshape(-1)[: 10 * 34].copy()), TYPES["Q8_0"], (10, 64))
    for native_repack in (True, False):
        bad = blocks.copy()
        bad[3, 1, 0:2] = np.array([np.float16(np.inf)]).view(np.uint8)
        nan = blocks.copy()
        nan[0, 0, 0:2] = np.array([np.float16(np.nan)]).view(np.uint8)
        for corrupt in (bad, nan):
            with pytest.raises(CheckpointError, match="not finite"):
                to_kb(torch.from_numpy(corrupt.reshape(-1).copy()), TYPES["Q8_0"], (16, 64),
                      native_repack=native_repack)


# --------------------------------------------------------------------------- whole files
def _kb_file(tmp_path, types: dict, tied: bool, name: str = "kb.gguf"):
    """A small llama GGUF (hidden 256, so that every 256-block type applies; FFN 512) whose
    matrices are random valid blocks of the given types (the embedding and head Q8_0 unless
    said), Q/K rows stored permuted as llama.cpp's converter does."""
    from tests.test_gguf import _permute, _write

    d, n_head, n_kv, hd, ff, vocab, n_layer = 256, 4, 2, 64, 512, 64, 2
    kv = {"llama.block_count": n_layer, "llama.context_length": 256,
          "llama.embedding_length": d, "llama.feed_forward_length": ff,
          "llama.attention.head_count": n_head, "llama.attention.head_count_kv": n_kv,
          "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
          "llama.vocab_size": vocab, "llama.rope.dimension_count": hd,
          "general.name": "kb", "tokenizer.ggml.model": "llama",
          "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(vocab - 3)],
          "tokenizer.ggml.scores": [0.0] * vocab,
          "tokenizer.ggml.token_type": [2, 3, 3] + [1] * (vocab - 3)}
    rng = np.random.default_rng(1)
    tensors = {}

    def mat(gname, rows, cols, kind, heads=0):
        blocks = scaled_blocks(kind, rows, cols, seed=int(rng.integers(1 << 30)))
        arr = blocks.reshape(rows, -1)
        if heads:
            arr = _permute(arr, heads)
        tensors[gname] = (arr, GGMLQuantizationType(TYPES[kind]))

    def norm(gname):
        tensors[gname] = ((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), None)

    mat("token_embd.weight", vocab, d, types.get("token_embd", "Q8_0"))
    for i in range(n_layer):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight")
        mat(b + "attn_q.weight", n_head * hd, d, types["attn_q"], n_head)
        mat(b + "attn_k.weight", n_kv * hd, d, types["attn_k"], n_kv)
        mat(b + "attn_v.weight", n_kv * hd, d, types["attn_v"])
        mat(b + "attn_output.weight", d, n_head * hd, types["attn_output"])
        norm(b + "ffn_norm.weight")
        mat(b + "ffn_gate.weight", ff, d, types["ffn_gate"])
        mat(b + "ffn_up.weight", ff, d, types["ffn_up"])
        mat(b + "ffn_down.weight", d, ff, types["ffn_down"])
    norm("output_norm.weight")
    if not tied:
        mat("output.weight", vocab, d, types.get("output", "Q6_K"))
    return _write(tmp_path / name, "llama", kv, tensors)


FILES = {
    "k-quants": ({"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_K",
                  "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}, False),
    "legacy": ({"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q5_0", "attn_output": "Q8_0",
                "ffn_gate": "Q5_1", "ffn_up": "Q5_1", "ffn_down": "Q4_0",
                "token_embd": "Q4_1"}, True),
    "iq4": ({"attn_q": "IQ4_XS", "attn_k": "IQ4_XS", "attn_v": "IQ4_NL",
             "attn_output": "IQ4_XS", "ffn_gate": "IQ4_NL", "ffn_up": "IQ4_XS",
             "ffn_down": "IQ4_XS", "token_embd": "Q6_K"}, True),
}


@pytest.mark.parametrize("kind", sorted(FILES))
def test_a_file_runs_its_own_blocks_within_a_tenth_of_a_percent(tmp_path, kind):
    """dtype 'auto' keeps every matrix as the file stores it (kb layers, fused only where
    the parts share a type), and the perplexity of a text through them, one token at a time
    through the C++ step on every kernel path and in one forward, is within 0.1 % of the
    fp32 forward of the same dequantized weights."""
    import kvformer
    from kvformer.runtime.generation import perplexity
    from kvformer.runtime.kb import KbEmbedding, KbLinear
    from kvformer.runtime.quant import Int4Linear
    from kvformer.runtime.step import for_model

    types, tied = FILES[kind]
    path = _kb_file(tmp_path, types, tied)
    model, _ = kvformer.load(path, dtype="auto", progress=False)
    ref, _ = kvformer.load(path, dtype="fp32", progress=False)
    assert model.mode == "gguf"
    assert isinstance(model.tok_emb, KbEmbedding)
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    kinds = {types[p] for p in ("attn_q", "attn_k", "attn_v")}
    assert ("wqkv" in attn._modules) == (len(kinds) == 1)
    for layer, gname in ((attn.wq, "attn_q"), (attn.wv, "attn_v"), (attn.wo, "attn_output"),
                         (mlp.w_gate, "ffn_gate"), (mlp.w_down, "ffn_down")):
        want = Int4Linear if types[gname] == "Q4_1" else KbLinear
        assert isinstance(layer, want), (gname, type(layer))
        if isinstance(layer, KbLinear):
            assert layer.ggml_type == types[gname]
    ids = [int(i) for i in torch.randint(0, 64, (96,), generator=torch.Generator().manual_seed(0))]
    want = perplexity(ref, ids)
    # torch's forward multiplies the dequantized weights by activations in the model's
    # dtype (bf16 where the CPU has it: its rounding, not the weights', differs then); the
    # C++ step's activations are fp32 whatever the model's
    tol = 1e-3 if model.dtype == torch.float32 else 5e-3
    paths = native.isas() or ["torch"]
    for path_name in paths:
        run = for_model(model, native=path_name if path_name != "torch" else False)
        got = perplexity(run, ids, token_by_token=True, kv_dtype="fp32")
        assert abs(got / want - 1) < (1e-3 if run.native else tol), (path_name, got, want)
    assert abs(perplexity(model, ids) / want - 1) < tol
