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
from kvformer.runtime.kb import KbEmbedding, KbLinear, dequantize_kb

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
        got = dequantize_kb(kb.q, kb.s, kb.bits, kb.scales, kb.lut)
        assert torch.equal(got, torch.from_numpy(reference(name, blocks)))


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
    got = torch.ops.kvformer_native.dequant_kb(kb.q, kb.s, kb.bits, kb.scales, _lut(kb),
                                               0, 48, False)
    assert torch.equal(got, ref)
    rows = torch.ops.kvformer_native.dequant_kb(kb.q, kb.s, kb.bits, kb.scales, _lut(kb),
                                                5, 37, True)
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
                                                            _lut(kb), path)
                    ys = torch.ops.kvformer_native.linear_kb(x, kb.q, kb.s, kb.bits,
                                                             kb.scales, _lut(kb), "scalar")
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


def test_a_matrix_the_layout_cannot_take_is_refused_in_one_line():
    blocks = random_blocks("Q8_0", 16, 64)
    with pytest.raises(CheckpointError, match="tiles of 16"):
        to_kb(torch.from_numpy(blocks.reshape(-1)[: 10 * 34].copy()), TYPES["Q8_0"], (10, 64))
    bad = blocks.copy()
    bad[3, 1, 0:2] = np.array([np.float16(np.inf)]).view(np.uint8)
    with pytest.raises(CheckpointError, match="not finite"):
        kb_of("Q8_0", bad)
    big = blocks.copy()
    big[0, 0, 0:2] = np.array([np.float16(1000.0)]).view(np.uint8)  # -128 d overflows fp16
    with pytest.raises(CheckpointError, match="too large"):
        kb_of("Q8_0", big)
