"""kvformer's native code: the C++ in ``kvformer/runtime/csrc``, built once per machine, and
the decode step that runs as one C++ operator.

At batch 1 a quantized decode step is ~120 small matmuls plus ~20 tiny tensor ops per
layer; in eager PyTorch each op costs a few microseconds of Python and dispatch, more than
the matmuls themselves. ``kvformer.runtime.step.NativeStep`` runs the whole step in C++
(``csrc/step.cpp``) from a named description of the model (``kvformer.runtime.plan.StepPlan``,
read by ``csrc/plan.cpp``). This module builds, loads and describes the library; it imports
nothing of the model's (``kvformer.runtime.quant`` calls it for its kernels).

The kernels (``csrc/kernels/*.cpp``) are one translation unit per instruction set, each
compiled with its own flags, and the path is chosen at run time from what the CPU reports
(cpuid, in ``csrc/cpu.cpp``), not from the machine that built it:

    avx512   AVX-512 F/BW/VL/DQ + VNNI (Ice Lake, Zen 4 and later): vpdpbusd
    avxvnni  AVX2 + AVX-VNNI (Alder Lake and later client CPUs, Sapphire Rapids, Zen 5):
             the avx2 kernels with 256-bit vpdpbusd (on an AVX-512 CPU without AVX-VNNI the
             same code runs in vpdpbusd's EVEX form, so such a machine tests it too)
    avx2     AVX2 + FMA + F16C (Haswell, Zen 1-3 and later): vpmaddubsw / vpmaddwd
    neon     64-bit ARM with the dot-product extension (Apple silicon, Graviton 2 and later,
             Cortex-A76 and later): vdotq_s32
    scalar   portable C++, any architecture (aarch64 included): the fallback

``KVFORMER_ISA=avx2`` (or ``avxvnni``, ``scalar``) forces a lower path, so any machine can run
every path it can execute; ``isas()`` lists them, best first.

The library is built by ``kvformer build`` (which ``make`` runs during setup), or else the
first time a model is loaded, with a message on stderr before any output. Built files go
to ``~/.cache/kvformer/native/<key>`` (``KVFORMER_CACHE`` moves it); the key covers the
sources, flags, compiler and torch. Without a compiler (or with ``KVFORMER_NATIVE=0``),
``available()`` is False and everything runs on torch ops: ``Transformer.forward`` (the
executor ``kvformer.runtime.step.for_model`` chooses then) with the torch fallbacks of
``kvformer.runtime.quant``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvformer.errors import KvformerError

NAME = "kvformer_native"
CSRC = Path(__file__).with_name("csrc")
X86 = platform.machine().lower() in ("x86_64", "amd64")
ARM64 = platform.machine().lower() in ("aarch64", "arm64")
COMMON = ["-O3", "-fPIC", "-Wall", "-Wextra", "-fno-math-errno"]
# (object name, source under csrc/, its own flags, needs torch's headers); the SIMD files only
# where they can compile. Linked in this order: the generic objects first (the portable
# kernels, then the torch-facing units: CPU detection, the plan, the step, the operators),
# then from the lowest instruction set to the highest, so that an inline function or
# template the compiler emits in several objects (std::vector's, kernels.h's) resolves to the
# copy built for the lowest CPU - never to an AVX-512 copy that step.cpp would then call on
# an AVX2 machine.
# GCC 12's intrinsics headers trip its own -W(maybe-)uninitialized (`__m512 __Y = __Y;`).
SIMD = ["-std=c++17", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
AVX2 = [*SIMD, "-mavx2", "-mfma", "-mf16c"]
TORCH = ["-std=c++20", "-fopenmp", "-Wno-unused-parameter"]
UNITS = [("kernels_scalar", "kernels/scalar.cpp", ["-std=c++17"], False),
         ("cpu", "cpu.cpp", TORCH, True),
         ("plan", "plan.cpp", TORCH, True),
         ("step", "step.cpp", TORCH, True),
         ("ops", "ops.cpp", TORCH, True),
         ("repack", "repack.cpp", TORCH, True)]
if X86:
    UNITS += [
        ("kernels_avx2", "kernels/avx2.cpp", AVX2, False),
        ("kernels_avxvnni", "kernels/avx2.cpp", [*AVX2, "-mavxvnni", "-DKVF_VNNI=1"], False),
        ("kernels_avxvnni_evex", "kernels/avx2.cpp",
         [*AVX2, "-mavx512f", "-mavx512vl", "-mavx512vnni", "-DKVF_VNNI=2"], False),
        ("kernels_avx512", "kernels/avx512.cpp", [*AVX2, "-mavx512f", "-mavx512bw",
                                                  "-mavx512vl", "-mavx512dq", "-mavx512vnni"],
         False),
    ]
if ARM64:
    NEON = ["-std=c++17", "-march=armv8.2-a+dotprod"]
    UNITS.append(("kernels_neon", "kernels/neon.cpp", NEON, False))

_lock = threading.Lock()
_state: dict[str, object] = {}


class NativeBuildError(KvformerError):
    """The C++ could not be compiled (the message carries the compiler's output)."""


def cpuinfo(field: str) -> str:
    """The first line of /proc/cpuinfo that starts with ``field`` ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith(field)), "")
    except OSError:
        return ""


def _cache_dir() -> Path:
    root = os.environ.get("KVFORMER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvformer")
    return Path(root) / "native"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _build_key(cxx: str) -> str:
    """Sources, flags, compiler and torch: a change to any of them builds anew. (Not the
    CPU: the kernels are chosen at run time, so one build serves every x86-64 CPU.)"""
    h = hashlib.sha256()
    for f in sorted(CSRC.rglob("*")):  # kernels/ too
        if f.is_file() and f.suffix in (".cpp", ".h"):
            h.update(f.relative_to(CSRC).as_posix().encode() + b"\0" + f.read_bytes())
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = cxx
    h.update(repr((UNITS, COMMON, version, torch.__version__, platform.machine())).encode())
    return h.hexdigest()[:16]


def library_path() -> Path | None:
    """Where this machine's build of the library is (or would be); None without a compiler."""
    cxx = _compiler()
    if cxx is None:
        return None
    return _cache_dir() / _build_key(cxx) / f"{NAME}.so"


def build(force: bool = False, echo=None) -> Path:
    """Compile ``kvformer/runtime/csrc`` into the cached library (if it is not built yet, or with
    ``force``) and return its path. The compiler's warnings are passed to ``echo``
    (default: stderr). Raises NativeBuildError with the compiler's output on failure."""
    echo = echo or (lambda text: print(text, file=sys.stderr, flush=True))
    cxx = _compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++ or clang++); "
                               "kvformer runs on torch ops without it")
    target = _cache_dir() / _build_key(cxx) / f"{NAME}.so"
    if target.exists() and not force:
        return target
    from torch.utils.cpp_extension import include_paths, library_paths

    target.parent.mkdir(parents=True, exist_ok=True)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    torch_inc = [f"-I{p}" for p in include_paths()]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        def compile_unit(unit):
            name, src, flags, needs_torch = unit
            obj = Path(tmp) / (name + ".o")
            cmd = [cxx, *COMMON, *flags, abi, *(torch_inc if needs_torch else []),
                   "-c", str(CSRC / src), "-o", str(obj)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            return name, obj, done

        with ThreadPoolExecutor(max_workers=max(1, min(len(UNITS), os.cpu_count() or 1))) as ex:
            results = list(ex.map(compile_unit, UNITS))
        failed = [(src, done) for src, _, done in results if done.returncode != 0]
        for src, _, done in results:
            if done.stderr.strip() and done.returncode == 0:
                echo(f"kvformer build: warnings from {src}:\n{done.stderr.rstrip()}")
        if failed:
            src, done = failed[0]
            raise NativeBuildError(f"compiling {src} failed:\n{done.stderr.strip()[-4000:]}")
        libs = library_paths()
        link = [cxx, "-shared", *[str(obj) for _, obj, _ in results], "-o",
                str(Path(tmp) / f"{NAME}.so"), "-fopenmp",
                *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs],
                "-lc10", "-ltorch_cpu", "-ltorch"]
        done = subprocess.run(link, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeBuildError(f"linking failed:\n{done.stderr.strip()[-4000:]}")
        os.replace(Path(tmp) / f"{NAME}.so", target)  # atomic: never a half-written library
    return target


def available(build_if_missing: bool = True) -> bool:
    """Whether the native library is loaded; loads it (building it first, with a message on
    stderr, if this machine has no build yet and ``build_if_missing``). Never raises: a
    failed build warns once and kvformer runs on torch ops."""
    if "ok" in _state:
        return bool(_state["ok"])
    if not build_if_missing and not _built():
        return False
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load()
    return bool(_state["ok"])


def build_error() -> str | None:
    """Why the library could not be built or loaded in this process (None if it was, or if
    nothing was tried)."""
    return _state.get("error")  # type: ignore[return-value]


def disabled() -> bool:
    return os.environ.get("KVFORMER_NATIVE", "1").lower() in ("0", "false", "no", "off")


def loaded() -> bool:
    """Whether the library is loaded in this process (never builds or loads it)."""
    return bool(_state.get("ok"))


def _built() -> bool:
    path = library_path()
    return path is not None and path.exists()


def _load() -> bool:
    if disabled():
        return False
    try:
        path = library_path()
        if path is None:
            return False
        if not path.exists():
            print("kvformer: building the native kernels (once per machine, about a minute; "
                  "`kvformer build` does it ahead)...", file=sys.stderr, flush=True)
            path = build()
        torch.ops.load_library(str(path))
        return hasattr(torch.ops.kvformer_native, "plan_step")
    except Exception as exc:  # no headers, a failed build, an unloadable file: torch ops
        _state["error"] = f"{type(exc).__name__}: {exc}"
        message = str(exc).strip().splitlines()
        print(f"kvformer: native kernels unavailable ({type(exc).__name__}: "
              f"{message[0] if message else ''}); running on torch ops (slower; "
              "`kvformer build` shows the compiler's output)", file=sys.stderr, flush=True)
        return False


def isas() -> list[str]:
    """The kernel paths this CPU can run, best first (e.g. ['avx512', 'avx2', 'scalar']);
    [] when the native library is not available."""
    if not available():
        return []
    return list(torch.ops.kvformer_native.isas())


def threads(mode: str = "") -> str:
    """Who runs the native step's pieces of work: ``"pool"`` (kvformer's own threads, the
    default when kvformer was imported before torch, see kvformer/__init__.py) or
    ``"openmp"`` (torch's). Given a mode, switches to it; returns the mode now ("" without a
    native build)."""
    if not available():
        return ""
    return torch.ops.kvformer_native.threads(mode)


def activations(mode: str = "") -> str:
    """How activations enter the int4/int8 kernels: ``"int16"`` (two int8 levels per number,
    x ~ s (128 q1 + q2): the default, x's error below bf16's rounding) or ``"int8"`` (one
    level, llama.cpp's Q8 precision: half the integer work, faster for batches of rows;
    docs/architecture.md has its perplexity). ``KVFORMER_ACTIVATIONS`` sets it for a
    process. Given a mode, switches to it; returns the mode now ("" without a native build)."""
    if not available():
        return ""
    return torch.ops.kvformer_native.activations(mode)


def default_isa() -> str:
    """The path kvformer uses: the best this CPU runs, or ``KVFORMER_ISA`` if it names a lower
    one. Raises a KvformerError if KVFORMER_ISA names a path this CPU cannot run."""
    have = isas()
    if not have:
        return "torch"
    want = os.environ.get("KVFORMER_ISA", "").strip().lower()
    if not want:
        return have[0]
    if want not in have:
        raise KvformerError(f"KVFORMER_ISA={want} is not a kernel path this CPU can run "
                            f"(it can run: {', '.join(have)}); unset it or pick one of those")
    return want


def kernel_path() -> str:
    """A line for people: which kernels run here and why."""
    have = isas()
    if not have:
        reason = "KVFORMER_NATIVE=0" if disabled() else "no native build"
        return f"torch ops ({reason})"
    isa = default_isa()
    forced = " (forced by KVFORMER_ISA)" if isa != have[0] else ""
    return f"{isa}{forced}; this CPU runs: {', '.join(have)}"


def torch_capabilities() -> list[str]:
    """The values of ATEN_CPU_CAPABILITY this CPU can run, lowest first: with one of them set
    when Python starts, torch dispatches as a CPU of that kind would (the tests use it to
    prove the lower paths on a higher machine)."""
    flags = set(cpuinfo("flags").partition(":")[2].split())
    caps = ["default"]
    if X86 and {"avx2", "fma"} <= flags:
        caps.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            caps.append("avx512")
    return caps


if __name__ == "__main__":  # used by the Makefile: the capabilities below this CPU's own
    if sys.argv[1:] == ["lower-capabilities"]:
        print(" ".join(torch_capabilities()[:-1]))
    else:
        sys.exit("usage: python -m kvformer.runtime.native lower-capabilities")
