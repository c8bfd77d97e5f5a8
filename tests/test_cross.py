"""kvformer's kernels on another architecture: the scalar path (and the decode step that
calls it) is meant to compile and compute the same numbers anywhere, and 64-bit ARM has a
NEON path of its own. Where a cross compiler and user-mode emulation are installed (Debian:
g++-aarch64-linux-gnu and qemu-user; `.ci/run` installs them), tests/cross/kernels_check.cpp
is built with those kernels for aarch64, run under qemu, and what each path computes is
checked against torch here. The same driver also runs natively (the scalar path), so its
checks hold on every machine."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kvformer.runtime.quant import Int4Linear, Int8Linear, unpack_int4, unpack_scales

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "kvformer" / "runtime" / "csrc"
DRIVER = ROOT / "tests" / "cross" / "kernels_check.cpp"
# name: (C++ compiler, how to run its binaries, its kernel paths beyond the portable one)
TARGETS = {"host": (os.environ.get("CXX") or shutil.which("g++") or "c++", [], []),
           "aarch64": ("aarch64-linux-gnu-g++", ["qemu-aarch64", "-cpu", "max"], ["neon"])}
CASES = [(arch, path) for arch, (_, _, extra) in TARGETS.items() for path in ["scalar", *extra]]
FLAGS = ["-std=c++17", "-O3", "-Wall", "-Wextra", "-Werror", "-fno-math-errno"]


def missing(arch):
    cxx, run, _ = TARGETS[arch]
    return [tool for tool in [cxx, *run[:1]] if shutil.which(tool) is None]


_built = {}


def build(arch, tmp_path_factory) -> Path:
    """The driver and the kernels for `arch`, each source with the flags the native build
    gives it (-static: the emulator then needs no libraries of that architecture)."""
    if arch in _built:
        return _built[arch]
    cxx, run, extra = TARGETS[arch]
    out = tmp_path_factory.mktemp(arch)
    units = [(DRIVER, ["-DKVF_CHECK_NEON"] if "neon" in extra else []),
             (CSRC / "kernels" / "scalar.cpp", [])]
    if "neon" in extra:
        units.append((CSRC / "kernels" / "neon.cpp", ["-march=armv8.2-a+dotprod"]))
    objs = []
    for src, flags in units:
        obj = out / (src.stem + ".o")
        done = subprocess.run([cxx, *FLAGS, *flags, "-c", str(src), "-o", str(obj)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        objs.append(str(obj))
    exe = out / "kernels_check"
    done = subprocess.run([cxx, *(["-static"] if run else []), *objs, "-o", str(exe)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _built[arch] = exe
    return exe


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{p}" for a, p in CASES])
def driver(request, tmp_path_factory):
    arch, path = request.param
    if missing(arch):
        pytest.skip(f"no {' or '.join(missing(arch))} (Debian: apt-get install "
                    "g++-aarch64-linux-gnu qemu-user)")
    exe = build(arch, tmp_path_factory)
    run = TARGETS[arch][1]

    def call(op, meta, via=None, **arrays):
        """y of `op` through this case's kernel path (or the path `via` of the same build)"""
        via = via or path
        work = exe.parent / f"{via}-{op}"
        work.mkdir(exist_ok=True)
        (work / "meta.txt").write_text(" ".join(map(str, meta)))
        for name, a in arrays.items():
            np.ascontiguousarray(a).tofile(work / f"{name}.bin")
        res = subprocess.run([*run, str(exe), op, str(work), via], capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        return torch.from_numpy(np.fromfile(work / "y.bin", dtype=np.float32))

    call.path = path
    return call


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("n, k", [(16, 32), (48, 576)])
def test_int4_matmul(driver, n, k):
    torch.manual_seed(0)
    layer = Int4Linear.from_float(torch.randn(n, k))
    q = unpack_int4(layer.qweight).float()
    d, m = unpack_scales(layer.scales)
    w = (q.view(n, k // 32, 32) * d.float()[..., None] + m.float()[..., None]).view(n, k)
    x = torch.randn(3, k)
    y = driver("int4", [3, k, n], x=x.numpy(), q=layer.qweight.numpy(),
               dm=layer.scales.view(torch.int16).numpy()).view(3, n)
    assert rel(y, x @ w.t()) < 1e-3  # x enters as two int8 levels per block


def test_int8_matmul(driver):
    torch.manual_seed(1)
    layer = Int8Linear.from_float(torch.randn(40, 100))
    w = layer.qweight.float() * layer.scale[:, None]
    x = torch.randn(2, 100)
    y = driver("int8", [2, 100, 40], x=x.numpy(), q=layer.qweight.numpy(),
               scale=layer.scale.numpy()).view(2, 40)
    assert rel(y, x @ w.t()) < 1e-3


def test_unpack_is_exact(driver):
    torch.manual_seed(2)
    layer = Int4Linear.from_float(torch.randn(32, 64))
    q = unpack_int4(layer.qweight).float()
    d, m = unpack_scales(layer.scales)
    w = (q.view(32, 2, 32) * d.float()[..., None] + m.float()[..., None]).view(32, 64)
    y = driver("unpack", [64, 32], q=layer.qweight.numpy(),
               dm=layer.scales.view(torch.int16).numpy()).view(32, 64)
    assert torch.equal(y, w)


def test_attention_is_the_formula(driver):
    """softmax(q kᵀ) v for 3 query heads of a group over 70 cached rows."""
    torch.manual_seed(3)
    q, k, v = torch.randn(3, 64) / 8, torch.randn(70, 64), torch.randn(70, 64)
    y = driver("attend", [3, 64, 70], q=q.numpy(), k=k.numpy(), v=v.numpy()).view(3, 64)
    ref = torch.softmax(q.double() @ k.double().t(), dim=-1) @ v.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv,hd", [("int8", 64), ("int8", 48), ("int4", 64), ("int4", 128)])
def test_attention_over_quantized_rows_is_the_formula(driver, kv, hd):
    """attend_q over int8 / int4 K/V rows and their bf16 scales (kvformer.kv.formats's
    layouts) against softmax(q kᵀ) v of the rows as kvformer.kv.formats dequantizes them."""
    from kvformer.kv.formats import kv_format

    torch.manual_seed(4)
    fmt = kv_format(kv)
    q = torch.randn(3, hd) / hd ** 0.5
    (kq, ks), (vq, vs) = fmt.encode(torch.randn(70, hd)), fmt.encode(torch.randn(70, hd))
    y = driver("attend_q", [3, hd, 70, 8 if kv == "int8" else 4], q=q.numpy(),
               k=kq.view(torch.uint8).numpy(), v=vq.view(torch.uint8).numpy(),
               ks=ks.view(torch.int16).numpy(), vs=vs.view(torch.int16).numpy()).view(3, hd)
    ref = (torch.softmax(q.double() @ fmt.decode((kq, ks), torch.float64).t(), -1)
           @ fmt.decode((vq, vs), torch.float64))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv", ["fp32", "int8", "int4"])
def test_paged_attention_over_blocks_out_of_order_is_the_formula(driver, kv):
    """One call over a paged row: slot s in block table[s // 16] of the rows, blocks out of
    order (two consecutive ones among them), the last one partly filled."""
    from kvformer.kv.formats import kv_format

    torch.manual_seed(5)
    bs, rows, n = 16, 96, 70
    table = torch.tensor([4, 1, 2, 5, 0])
    slots = table[torch.arange(n) // bs] * bs + torch.arange(n) % bs
    q = torch.randn(3, 64) / 8
    if kv == "fp32":
        k, v = torch.randn(rows, 64), torch.randn(rows, 64)
        y = driver("attend", [3, 64, n, rows, bs, len(table)], q=q.numpy(), k=k.numpy(),
                   v=v.numpy(), table=table.numpy()).view(3, 64)
        kd, vd = k.double(), v.double()
    else:
        fmt = kv_format(kv)
        (kq, ks), (vq, vs) = fmt.encode(torch.randn(rows, 64)), fmt.encode(torch.randn(rows, 64))
        y = driver("attend_q", [3, 64, n, 8 if kv == "int8" else 4, rows, bs, len(table)],
                   q=q.numpy(), k=kq.view(torch.uint8).numpy(), v=vq.view(torch.uint8).numpy(),
                   ks=ks.view(torch.int16).numpy(), vs=vs.view(torch.int16).numpy(),
                   table=table.numpy()).view(3, 64)
        kd, vd = fmt.decode((kq, ks), torch.float64), fmt.decode((vq, vs), torch.float64)
    ref = torch.softmax(q.double() @ kd[slots].t(), dim=-1) @ vd[slots]
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


def _gguf_blocks(name, n, k, seed):
    """[n, k / per, bytes] random blocks of GGUF type `name` (tests/test_kb.py's
    random_blocks): random integer and scale bytes, fp16 scales of the size a real file holds
    (1e-3 .. 2e-2; the mins of Q4_1 and Q5_1 of either sign)."""
    from kvformer.formats.gguf.blocks import KB_TYPES

    tid = next(t for t, (nm, _, _) in KB_TYPES.items() if nm == name)
    _, per, size = KB_TYPES[tid]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(n, k // per, size), dtype=np.uint8)
    at = {"Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
    for i, o in enumerate(at.get(name, [0])):
        lo, hi = (-0.1, 0.1) if name in ("Q4_1", "Q5_1") and i == 1 else (1e-3, 2e-2)
        b[..., o:o + 2] = rng.uniform(lo, hi, size=(n, k // per, 1)).astype(np.float16) \
            .view(np.uint8)
    return tid, b


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K",
                                  "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_kb_matmul_is_x_times_the_gguf_matrix(driver, name):
    """gemm_kb over random GGUF blocks of each type, repacked by to_kb (4, 5, 6 and 8 bits,
    a lut, the three kinds of scales), against x times the gguf package's dequantized matrix
    in float64 (3 rows of x: a pair and a single row; an outlier block), with two activation
    levels (against x itself) and with one (against x rounded to that level); a SIMD path
    also gives its build's scalar path's numbers up to fp32 summation order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from kvformer.formats.gguf.blocks import to_kb

    m, n, k = 3, 48, 512
    tid, blocks = _gguf_blocks(name, n, k, seed=7)
    kb = to_kb(torch.from_numpy(blocks.reshape(-1).copy()), tid, (n, k))
    w = torch.from_numpy(dequantize(blocks.reshape(n, -1), GGMLQuantizationType(tid))
                         .reshape(n, k)).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(tid))
    x[0, :7] *= 40
    # one level: x as the products see it, round(x 127 / max|x|) max|x| / 127 per block of
    # 32 (the kernels' quantize, in fp32), so that what is checked is the kernel, not that
    # level's rounding (~1-3 % here)
    xb = x.view(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    x1 = (torch.round(xb * (127 / amax)) * (amax / 127)).view(m, k)
    arrays = dict(x=x.numpy(), q=kb.q.numpy(), s=kb.s.numpy())
    if kb.lut is not None:
        arrays["lut"] = kb.lut.numpy()
    for levels, xs in ((2, x), (1, x1)):
        meta = [m, k, n, kb.bits, kb.scales, int(kb.lut is not None), kb.zero, levels]
        y = driver("kb", meta, **arrays).view(m, n)
        err = rel(y.double(), xs.double() @ w.T)
        assert err < 2e-4, (levels, err)
        if driver.path != "scalar":
            ys = driver("kb", meta, via="scalar", **arrays).view(m, n)
            torch.testing.assert_close(y, ys, rtol=1e-5, atol=1e-5 * ys.abs().max().item())


def test_exp(driver):
    x = torch.linspace(-100, 80, 1001)
    y = driver("exp", [x.numel()], x=x.numpy())
    torch.testing.assert_close(y, torch.exp(x), rtol=1e-6, atol=0)


def test_the_decode_step_compiles_for_aarch64():
    """cpu.cpp, plan.cpp, step.cpp and ops.cpp (the decode step as a torch operator) against
    torch's headers: their x86-only parts (cpuid) are guarded, so the portable build compiles,
    warnings included."""
    if missing("aarch64"):
        pytest.skip("no aarch64-linux-gnu-g++ (Debian: apt-get install g++-aarch64-linux-gnu)")
    from torch.utils.cpp_extension import include_paths

    cmd = [TARGETS["aarch64"][0], "-std=c++20", "-fopenmp", "-fsyntax-only", "-Wall",
           "-Wextra", "-Werror", "-Wno-unused-parameter",
           *[f"-I{p}" for p in include_paths()],
           *[str(CSRC / name) for name in ["cpu.cpp", "plan.cpp", "step.cpp", "ops.cpp"]]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
