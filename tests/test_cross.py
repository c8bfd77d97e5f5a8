"""kvformer's portable kernels on another architecture: the scalar path (and the decode step
that calls it) is meant to compile and compute the same numbers anywhere, aarch64 included.
Where a cross compiler and user-mode emulation are installed (Debian: g++-aarch64-linux-gnu
and qemu-user; `.ci/run` installs them), tests/cross/kernels_check.cpp is built for aarch64,
run under qemu, and what it computes is checked against torch here. The same driver also
runs natively, so its checks hold on every machine."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kvformer.quantize import Int4Linear, Int8Linear, unpack_int4, unpack_scales

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "cross" / "kernels_check.cpp"
SCALAR = ROOT / "kvformer" / "csrc" / "kernels_scalar.cpp"
# (name, C++ compiler, how to run its binaries)
TARGETS = {"host": (os.environ.get("CXX") or shutil.which("g++") or "c++", []),
           "aarch64": ("aarch64-linux-gnu-g++", ["qemu-aarch64"])}


def missing(arch):
    cxx, run = TARGETS[arch]
    return [tool for tool in [cxx, *run] if shutil.which(tool) is None]


@pytest.fixture(scope="module", params=list(TARGETS))
def driver(request, tmp_path_factory):
    arch = request.param
    if missing(arch):
        pytest.skip(f"no {' or '.join(missing(arch))} (Debian: apt-get install "
                    "g++-aarch64-linux-gnu qemu-user)")
    cxx, run = TARGETS[arch]
    exe = tmp_path_factory.mktemp(arch) / "kernels_check"
    # -static: the emulator needs no aarch64 libraries; the flags the native build uses
    cmd = [cxx, "-std=c++17", "-O3", "-Wall", "-Wextra", "-Werror", "-fno-math-errno",
           *(["-static"] if run else []), str(DRIVER), str(SCALAR), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    def call(op, meta, **arrays):
        work = Path(exe.parent) / op
        work.mkdir(exist_ok=True)
        (work / "meta.txt").write_text(" ".join(map(str, meta)))
        for name, a in arrays.items():
            np.ascontiguousarray(a).tofile(work / f"{name}.bin")
        res = subprocess.run([*run, str(exe), op, str(work)], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        return torch.from_numpy(np.fromfile(work / "y.bin", dtype=np.float32))

    call.arch = arch
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


def test_exp(driver):
    x = torch.linspace(-100, 80, 1001)
    y = driver("exp", [x.numel()], x=x.numpy())
    torch.testing.assert_close(y, torch.exp(x), rtol=1e-6, atol=0)


def test_the_decode_step_compiles_for_aarch64():
    """step.cpp (the decode step as a torch operator) against torch's headers: its x86-only
    parts (cpuid) are guarded, so the portable build compiles, warnings included."""
    if missing("aarch64"):
        pytest.skip("no aarch64-linux-gnu-g++ (Debian: apt-get install g++-aarch64-linux-gnu)")
    from torch.utils.cpp_extension import include_paths

    cmd = [TARGETS["aarch64"][0], "-std=c++20", "-fopenmp", "-fsyntax-only", "-Wall",
           "-Wextra", "-Werror", "-Wno-unused-parameter",
           *[f"-I{p}" for p in include_paths()], str(ROOT / "kvformer" / "csrc" / "step.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
