"""`kvformer bench`: speed, memory, load time and quality, against llama.cpp (and
`transformers`) measured in the same run, on each kernel path of this CPU.

Configurations: kvformer in each dtype on each kernel path it is asked for (default: the
SIMD paths this CPU runs; a path lower than the CPU's own also runs torch as that CPU
would, ATEN_CPU_CAPABILITY, so the avx2 row on an AVX-512 machine is what an AVX2 CPU
would do with this memory), llama.cpp (`llama-cpp-python`, the optional `bench` extra) on
the same GGUF with the same threads, and transformers fp32. For every configuration and
run, fresh processes (``kvformer.tools.bench.workers``) measure

    load        seconds for the load call, imports excluded
    prefill     tokens/s of one forward over a 512-token prompt (last-position logits)
    decode      tokens/s at batch 1: 128 new tokens after a 16-token prompt; and 64 new
                tokens with 1,000 and with 4,000 tokens already in the cache
    batch       total tokens/s at batch 8 (kvformer, transformers)
    no cache    tokens/s recomputing the whole sequence per token (the seed's comparison)
    RSS         peak resident memory as the kernel counts it (the child's ru_maxrss, read
                by this parent: the figure `/usr/bin/time -v` prints) of a process that
                loads the model and decodes 128 tokens at batch 1, and of the speed process
    perplexity  on a fixed English text of 600+ tokens, through prefill and (kvformer) one
                token at a time through the decode step, per path

The configurations take turns run after run, so the noise of a shared machine falls on all
of them alike; each figure is the median over the runs. ``--big`` adds a model ten times
larger: random weights in the shape of Llama-3.2-1B, written as a Q4_0 GGUF by this
command (``kvformer.tools.bench.models``) and read by both engines. The report, with ratios
against llama.cpp and a chart, is printed and written to docs/benchmarks.md.

    kvformer bench                                   # default model, every dtype and path
    kvformer bench --dtype int4 --paths avx2 --runs 5 --no-write
    kvformer bench --big --dtype int4,int8
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import kvformer
from kvformer.formats.gguf.reader import open_reader, read_metadata
from kvformer.formats.load import default_model_path, resolve
from kvformer.formats.tokenizer.tokenizer import Tokenizer
from kvformer.runtime import native
from kvformer.tools.bench import kv as kvbench
from kvformer.tools.bench.llama_worker import llama_cpp_info
from kvformer.tools.bench.models import (
    LLAMA_32_1B,
    LLAMA_FTYPES,
    f16_copy,
    llama_quantized,
    random_llama_gguf,
)
from kvformer.tools.texts import ENGLISH

DTYPES = ("fp32", "bf16", "int8", "int4")  # kvformer.cli.flags writes these and NEW_TOKENS out
QUANTIZED = ("int8", "int4", "auto")  # the rows measured on each kernel path
PROMPT_TOKENS, SHORT_TOKENS, NEW_TOKENS, BATCH, NOCACHE_TOKENS = 512, 16, 128, 8, 32
CONTEXTS = {"ctx1k": 1000, "ctx4k": 4000}

# A fixed text: the prompts are cut from it and the perplexity is measured on it.
TEXT = ENGLISH


METRICS = (  # key, column title, unit, higher is better
    ("decode", "decode b1", "tok/s", True),
    ("ctx1k", "decode b1, 1k cached", "tok/s", True),
    ("ctx4k", "decode b1, 4k cached", "tok/s", True),
    ("batch", f"decode b{BATCH}", "tok/s", True),
    ("prefill", f"prefill {PROMPT_TOKENS}", "tok/s", True),
    ("nocache", "no cache", "tok/s", True),
    ("load", "load", "s", False),
    ("rss", "peak RSS, load + decode b1", "MB", False),
    ("rss_model", "of it, added by load + decode", "MB", False),
    ("rss_all", "peak RSS, speed run", "MB", False),
)
# What kvformer's quantized rows must reach against llama.cpp in the same run (issue #12).
TARGETS = (("decode", 1.0), ("ctx1k", 1.0), ("ctx4k", 1.0), ("prefill", 1.5))
RSS_TARGET_MB = 400
# torch dispatching as a CPU of the path's kind would (set when Python starts)
PATH_CAPABILITY = {"avxvnni": "avx2", "avx2": "avx2", "scalar": "default"}


def run(args) -> int:
    if args.kv:
        return kvbench.run(args)
    kv_dtype = args.kv_dtype or "auto"
    if kv_dtype not in ("auto", "fp32", "bf16", "int8", "int4"):
        raise ValueError(f"--kv-dtype {kv_dtype!r} is not one of auto, fp32, bf16, int8, "
                         "int4 (a list is for --kv)")
    args.kv_dtype = kv_dtype
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES + ("auto",):
            raise ValueError(f"--dtype {d!r} is not one of {', '.join(DTYPES)}, auto")
    types = [t.strip() for t in (args.types or "").split(",") if t.strip()]
    for t in types:
        if t not in LLAMA_FTYPES:
            raise ValueError(f"--types {t!r} is not one of {', '.join(LLAMA_FTYPES)}")
    if types and llama_cpp_info() is None:
        raise ValueError("--types needs llama.cpp's quantizer: pip install 'kvformer[bench]'")
    if args.runs < 1:
        raise ValueError("--runs must be at least 1")
    paths = kernel_paths(args.paths)
    load_before, started = os.getloadavg(), time.time()
    ids = token_ids(args.model)
    configs = make_configs(args, args.model, dtypes, paths)
    summary, results = measure(configs, args, ids)
    big = None
    if args.big:
        big_path = str(random_llama_gguf())
        big_ids = token_ids(big_path, contexts=False, batch=False)
        big_configs = make_configs(args, big_path, [d for d in dtypes if d in QUANTIZED]
                                   or ["int4"], paths, transformers=False)
        big = measure(big_configs, args, big_ids, quality=False)[0]
    per_type = types_run(args, types, paths) if types else []
    info = machine_info(args.threads, paths, load_before, os.getloadavg(),
                        time.time() - started)
    text = report(summary, info, args, big, per_type)
    print(text)
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        chart = out.parent / "img" / "bench_speed.png"
        plot(summary, chart)
        out.write_text(text.replace("(CHART)", f"![speed]({chart.relative_to(out.parent)})"))
        print(f"wrote {out} and {chart}", file=sys.stderr)
    return 0


def kernel_paths(arg: str | None) -> list[str]:
    """The kernel paths to measure the quantized rows on ('torch' without native kernels)."""
    have = native.isas()
    if not have:
        return ["torch"]
    if arg is None:
        return [p for p in have if p != "scalar"] or have
    if arg.strip() == "all":
        return have
    paths = [p.strip() for p in arg.split(",") if p.strip()]
    for p in paths:
        if p not in have:
            raise ValueError(f"--paths {p!r}: this CPU runs {', '.join(have)}")
    return paths


def make_configs(args, model: str, dtypes: list[str], paths: list[str],
                 transformers: bool = True) -> list[dict]:
    """kvformer per dtype (the quantized ones per kernel path), then the references."""
    configs = []
    for d in dtypes:
        for path in (paths if d in QUANTIZED else paths[:1]):
            env = {}
            if path != "torch":
                env["KVFORMER_ISA"] = path
                if path != _best_path() and path in PATH_CAPABILITY:  # a lower CPU's path
                    env["ATEN_CPU_CAPABILITY"] = PATH_CAPABILITY[path]
            configs.append({"engine": "kvformer", "dtype": d, "path": path, "env": env,
                            "model": model, "kv_dtype": getattr(args, "kv_dtype", "auto")})
    kind, file = resolve(model)
    if kind == "gguf" and not args.no_llama_cpp:
        if llama_cpp_info() is None:
            print("llama-cpp-python is not installed (pip install 'kvformer[bench]'): no "
                  "llama.cpp reference", file=sys.stderr)
        else:
            configs.append({"engine": "llama.cpp", "dtype": gguf_type(file), "path": "",
                            "env": {}, "model": str(file)})
            if args.llama_cpp_avx2:
                pythonpath = os.pathsep.join(filter(None, [args.llama_cpp_avx2,
                                                           os.environ.get("PYTHONPATH")]))
                configs.append({"engine": "llama.cpp", "dtype": gguf_type(file),
                                "path": "avx2", "env": {"PYTHONPATH": pythonpath},
                                "model": str(file)})
    hf_dir = hf_source(model) if transformers and not args.no_transformers else None
    if hf_dir is not None:
        configs.append({"engine": "transformers", "dtype": "fp32", "path": "", "env": {},
                        "hf": hf_dir, "model": model})
    return configs


def _best_path() -> str:
    have = native.isas()
    return have[0] if have else "torch"


def gguf_type(path) -> str:
    """The GGUF's predominant quantization of its matrices (e.g. Q4_1)."""
    reader = open_reader(path)
    try:
        kinds = Counter(t.type_name for t in reader.tensors.values()
                        if t.type_name.upper().startswith("Q"))
    finally:
        reader.close()
    return kinds.most_common(1)[0][0] if kinds else "F32"


def label(c: dict) -> str:
    if c["engine"] == "llama.cpp" and c["path"]:
        return f"llama.cpp {c['dtype']} · {c['path']} build"
    path = f" · {c['path']}" if c["engine"] == "kvformer" and c["dtype"] in QUANTIZED \
        else ""
    return f"{c['engine']} {c['dtype']}{path}"


def measure(configs: list[dict], args, ids: dict, quality: bool = True):
    results: dict[str, list[dict]] = {label(c): [] for c in configs}
    for r in range(args.runs):
        for c in configs:
            spec = {**c, "threads": args.threads, "ids": ids, "new_tokens": args.new_tokens,
                    "nocache": NOCACHE_TOKENS if "batch" in ids else 0}
            out = run_worker({**spec, "task": "speed"}, c["env"])
            out["rss_all"] = out.pop("peak_rss")
            mem = run_worker({**spec, "task": "memory"}, c["env"])
            out["rss"] = mem["peak_rss"]
            if mem.get("rss_base") is not None:  # what the model and its run added
                out["rss_model"] = mem["peak_rss"] - mem["rss_base"]
            if r == 0 and quality:  # quality does not change from run to run
                profile = (args.profile and c["engine"] == "kvformer" and c["dtype"] == "int4"
                           and c["path"] == configs[0]["path"])
                q = run_worker({**spec, "task": "quality", "profile": profile}, c["env"])
                out.update({k: v for k, v in q.items() if k != "peak_rss"})
            results[label(c)].append(out)
            print(f"[run {r + 1}/{args.runs}] {label(c):<26} " + "  ".join(
                f"{k} {out[k]:.1f}" for k, *_ in METRICS if k in out), file=sys.stderr)
    return {name: summarize(rs) for name, rs in results.items()}, results


# --------------------------------------------------------------------------- parent side
def token_ids(model: str, contexts: bool = True, batch: bool = True) -> dict:
    """The prompts as token ids, cut from TEXT with the model's own tokenizer."""
    kind, path = resolve(model)
    if kind == "gguf":
        tok = Tokenizer.from_gguf(read_metadata(path))
    else:
        tok = Tokenizer.from_dir(path)
    text_ids = tok.encode(TEXT)

    def repeat(n):
        return (text_ids * (n // len(text_ids) + 1))[:n]

    ids = {"text": text_ids, "long": repeat(PROMPT_TOKENS), "short": text_ids[:SHORT_TOKENS]}
    if batch:
        ids["batch"] = [text_ids[i * 40:i * 40 + SHORT_TOKENS] for i in range(BATCH)]
    if contexts:
        ids.update({k: repeat(n) for k, n in CONTEXTS.items()})
    return ids


def hf_source(model: str) -> dict | None:
    """Where transformers reads the same model from, if it is installed and can."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    kind, path = resolve(model)
    if kind == "gguf":
        return {"dir": str(path.parent), "gguf_file": path.name}
    if kind == "hf":
        return {"dir": str(path)}
    return None


def run_worker(spec: dict, env: dict | None = None, timeout: float = 3600) -> dict:
    """One task in a fresh process (``kvformer.tools.bench.workers``); its result, plus
    ``peak_rss``: the process's maximum resident set size in MB, as the kernel counts it for
    that process's own address space (VmHWM, read by the child as it ends; where there is
    no /proc, the ru_maxrss this parent gets, which on Linux starts at the parent's own
    peak: the forked child inherits it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(spec["threads"]),
           **(env or {})}
    if spec.get("engine") != "kvformer":
        # llama.cpp (built with OpenMP) and transformers run with OpenMP as the user has it,
        # not with the short spin kvformer sets for itself (kvformer/__init__.py)
        env["KVFORMER_THREADS"] = "openmp"
        for name, value in kvformer._OMP_ENV_BEFORE.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        module = "llama_worker" if spec["engine"] == "llama.cpp" else "workers"
        proc = subprocess.Popen([sys.executable, "-m", f"kvformer.tools.bench.{module}"],
                                stdin=subprocess.PIPE, stdout=out, stderr=err, text=True,
                                env=env)
        proc.stdin.write(json.dumps({k: v for k, v in spec.items() if k != "env"}))
        proc.stdin.close()
        deadline = time.monotonic() + timeout
        while True:  # os.wait4, not proc.wait: it also returns the process's rusage
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise RuntimeError(f"benchmark of {spec['engine']} ({spec['task']}) took "
                                   f"more than {timeout:.0f} s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"benchmark of {spec['engine']} {spec.get('dtype', '')} "
                               f"({spec['task']}) failed:\n{err.read()[-3000:]}")
    result = json.loads(lines[-1])
    # the child's own peak (VmHWM) where it can read it: wait4's ru_maxrss (Linux:
    # kilobytes) starts at this parent's peak when the child is forked
    own = result.pop("own_peak_rss", None)
    result["peak_rss"] = own if own is not None else usage.ru_maxrss / 1024
    return result


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))
                  and not isinstance(r.get(key), bool)]
        if values:
            out[key] = statistics.median(values)
    for key in ("ppl", "ppl_decode", "profile", "decode_path", "kernels", "act"):
        for r in runs:
            if key in r:
                out[key] = r[key]
    return out


def machine_info(threads: int, paths: list[str], load_before, load_after,
                 seconds: float) -> dict:
    cpu = native.cpuinfo("model name").partition(":")[2].strip() or "unknown CPU"
    flags = native.cpuinfo("flags").split()
    isa = [f for f in ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16",
                       "amx_tile", "asimd") if f in flags]
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    llama = llama_cpp_info()
    if llama:
        versions["llama-cpp-python"] = llama["version"]
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            kb = int(fh.readline().split()[1])
            mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "isa": isa,
            "paths": paths, "runs_here": native.isas(), "memory": mem, "versions": versions,
            "llama": llama, "load_before": load_before, "load_after": load_after,
            "seconds": seconds, "date": time.strftime("%Y-%m-%d")}


def _fmt(value, key) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "load":
        return f"{value:.2f}"
    if key in ("rss", "rss_all"):
        return f"{value:.0f}"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _table(summary: dict, metrics=METRICS, ppl: bool = True) -> list[str]:
    keys = [m for m in metrics if any(m[0] in s for s in summary.values())]
    lines = ["| configuration | " + " | ".join(f"{t} ({u})" for _, t, u, _ in keys)
             + (" | perplexity |" if ppl else " |"),
             "| --- |" + " --- |" * (len(keys) + ppl)]
    for name, s in summary.items():
        cells = [_fmt(s.get(k), k) for k, *_ in keys]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     (f" | {_fmt(s.get('ppl'), 'ppl')} |" if ppl else " |"))
    return lines


def _ratios(summary: dict, ref: str, metrics=METRICS) -> list[str]:
    r = summary[ref]
    keys = [m for m in metrics if m[0] in r]
    lines = ["| configuration | " + " | ".join(t for _, t, _, _ in keys) + " |",
             "| --- |" + " --- |" * len(keys)]
    for name, s in summary.items():
        if name == ref or not name.startswith("kvformer"):
            continue
        cells = []
        for k, _, _, higher in keys:
            a, b = s.get(k), r.get(k)
            cells.append("–" if not a or not b else f"{(a / b if higher else b / a):.2f}×")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _reference_for(name: str, summary: dict, default: str) -> str:
    """The llama.cpp row a kvformer row is compared with: the build for its path if there
    is one (e.g. 'llama.cpp Q4_1 · avx2 build' for '... · avx2'), else the default one."""
    path = name.rpartition(" · ")[2]
    return next((n for n in summary if n.startswith("llama.cpp") and
                 n.endswith(f"· {path} build")), default)


def _targets(summary: dict, ref: str) -> list[str]:
    heads = [f"{t} ≥ {x:g}×" for k, x in TARGETS for m, t, _, _ in METRICS if m == k]
    lines = ["| configuration | " + " | ".join(heads) + f" | peak RSS ≤ {RSS_TARGET_MB} MB |",
             "| --- |" + " --- |" * (len(heads) + 1)]
    for name, s in summary.items():
        if not name.startswith(("kvformer int8", "kvformer int4")):
            continue
        r = summary[_reference_for(name, summary, ref)]
        cells = []
        for k, goal in TARGETS:
            if not s.get(k) or not r.get(k):
                cells.append("–")
                continue
            ratio = s[k] / r[k]
            cells.append(f"{ratio:.2f}× {'met' if ratio >= goal else '**missed**'}")
        rss = s.get("rss")
        cells.append("–" if rss is None else
                     f"{rss:.0f} {'met' if rss <= RSS_TARGET_MB else '**missed**'}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def types_run(args, types: list[str], paths: list[str]) -> list[tuple[str, str, dict]]:
    """--types: each file type made by llama.cpp's own quantizer from the model's numbers as
    F16 (the default model's, decoded; with --big also the random Llama-3.2-1B shape), run
    by kvformer (--dtype auto: the file's blocks) and llama.cpp on the same file, taking
    turns. Returns (model, type, summary) for each."""
    sources = [("SmolLM2-135M", f16_copy(default_model_path()), True)]
    if args.big:
        sources.append(("Llama-3.2-1B shape", random_llama_gguf(linear_type="F16"), False))
    out = []
    for name, src, quality in sources:
        for t in types:
            file = str(llama_quantized(src, t))
            print(f"--types: {name} {t} ({file})", file=sys.stderr)
            ids = token_ids(file, batch=False)
            configs = make_configs(args, file, ["auto"], paths, transformers=False)
            out.append((name, t, measure(configs, args, ids, quality=quality)[0]))
    return out


def _types_section(per_type: list[tuple[str, str, dict]]) -> list[str]:
    keys = ("decode", "ctx1k", "ctx4k", "prefill")
    lines = ["## Each GGUF type, against llama.cpp on the same file", "",
             "Made by llama.cpp's own quantizer (`llama_model_quantize`, from the `bench` "
             "extra) from the model's numbers as F16; kvformer runs the file's blocks "
             "(`--dtype auto`), llama.cpp the same file, same threads, taking turns. Ratios "
             "are kvformer / llama.cpp for speed (above 1: kvformer faster), llama.cpp / "
             "kvformer for load time and memory. Targets: decode ≥ 1.0× (after a short "
             "prompt, 1k and 4k cached), prefill of 512 ≥ 1.5×. Peak RSS counts each "
             "process whole (kvformer's includes torch, about 230 MB; the llama.cpp worker "
             "does not import torch); \"RSS added by the model\" is the peak less the "
             "process's resident memory just before the load. Load times are medians over "
             "fresh processes with the file in the page cache; after the first, kvformer "
             "maps the file's repacked form from its kb cache where the file is big enough "
             "to be kept (docs/models.md).", "",
             "| model | type | kvformer row | decode b1 | 1k cached | 4k cached | prefill 512 "
             "| load | peak RSS | RSS added by the model | perplexity kvformer / llama.cpp |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, t, summary in per_type:
        refs = [n for n in summary if n.startswith("llama.cpp")]
        for name, s in summary.items():
            if not name.startswith("kvformer") or not refs:
                continue
            # each kernel path against the llama.cpp build for it where the run has one
            # ("llama.cpp Q4_K · avx2 build" for the avx2 row), else the first
            path = name.rsplit("· ", 1)[-1]
            ref = next((n for n in refs if n.endswith(f"· {path} build")), refs[0])
            r = summary[ref]
            cells = [f"{s[k] / r[k]:.2f}×" if s.get(k) and r.get(k) else "–" for k in keys]
            cells += [f"{r[k] / s[k]:.2f}×" if s.get(k) and r.get(k) else "–"
                      for k in ("load", "rss", "rss_model")]
            ppl = (f"{s['ppl']:.3f} / {r['ppl']:.3f}" if s.get("ppl") and r.get("ppl")
                   else "–")
            against = ref.removeprefix("llama.cpp ").split("· ", 1)[-1] \
                if "· " in ref else "default build"
            lines.append(f"| {model} | {t} | {name.removeprefix('kvformer ')} vs {against} | "
                         + " | ".join(cells) + f" | {ppl} |")
    return lines + [""]


def report(summary: dict, info: dict, args, big: dict | None = None,
           per_type: list | None = None) -> str:
    flags = [f"--runs {args.runs}", *(["--profile"] if args.profile else []),
             *(["--big"] if args.big else []),
             *([f"--types {args.types}"] if getattr(args, "types", None) else []),
             *([f"--dtype {args.dtype}"] if args.dtype != ",".join(DTYPES) else []),
             *([f"--paths {args.paths}"] if args.paths else []),
             *([f"--kv-dtype {args.kv_dtype}"] if args.kv_dtype != "auto" else []),
             *(["--llama-cpp-avx2 DIR"] if args.llama_cpp_avx2 else []),
             *([f"--model {args.model}"] if args.model != "default" else [])]
    command = " ".join(["kvformer bench", *flags])
    llama = next((n for n in summary if n.startswith("llama.cpp")), None)
    hf = "transformers fp32" if "transformers fp32" in summary else None
    lines = ["# Benchmarks", "",
             f"Written by `{command}` ({info['date']}, model `{args.model}`, {args.runs} fresh "
             f"process{'es' if args.runs > 1 else ''} per configuration, medians, "
             f"{info['threads']} threads for every engine) on **{info['cpu']}** "
             f"({', '.join(info['isa']) or 'no SIMD flags'}); run it again to regenerate "
             "this page. kvformer's int8/int4 rows name their kernel path; a path below the "
             "CPU's own also runs torch as such a CPU would (`ATEN_CPU_CAPABILITY`), so the "
             "avx2 rows show what an AVX2-only CPU does with this machine's memory and "
             "clock.", ""]
    lines += _table(summary)
    if llama:
        lines += ["", f"Against {llama} in the same run (above 1 is better for kvformer: speed "
                  "ratios are kvformer / llama.cpp, load time and memory llama.cpp / kvformer):",
                  ""] + _ratios(summary, llama)
        lines += ["", "Targets (issue 12): decode at batch 1 ≥ 1.0× llama.cpp after a short "
                  "prompt and with 1k and 4k tokens cached, prefill of 512 tokens ≥ 1.5×, "
                  f"peak RSS ≤ {RSS_TARGET_MB} MB; each row against the llama.cpp build for its "
                  "path where the run has one:", ""] + _targets(summary, llama)
    if hf:
        lines += ["", "Against transformers fp32 in the same run:", ""] + _ratios(summary, hf)
    lines += ["", "(CHART)", ""]
    lines += _quality(summary)
    if big:
        lines += _big_section(big)
    if per_type:
        lines += _types_section(per_type)
    lines += _profile_sections(summary)
    lines += _how(summary, info)
    return "\n".join(lines)


def _quality(summary: dict) -> list[str]:
    fp32 = summary.get("kvformer fp32", {})
    rows = [(n, s) for n, s in summary.items() if "ppl" in s]
    if not rows:
        return []
    lines = ["## Quality", "",
             f"Perplexity on a fixed English text ({len(TEXT.split())} words), through "
             "prefill (`kvformer.runtime.generation.perplexity`) and, for kvformer, the same "
             "text fed one token at a time through the decode step that generation uses (`decode "
             "path`: the C++ step on the row's kernel path). Targets: int8 within 2 % and "
             "int4 within 10 % of fp32, both ways.", "",
             "| configuration | perplexity | vs kvformer fp32 | decode path | vs fp32 decode |",
             "| --- | --- | --- | --- | --- |"]
    for n, s in rows:
        rel = f"{(s['ppl'] / fp32['ppl'] - 1) * 100:+.2f} %" if "ppl" in fp32 else "–"
        dec = s.get("ppl_decode")
        rel_d = (f"{(dec / fp32['ppl_decode'] - 1) * 100:+.2f} %"
                 if dec and "ppl_decode" in fp32 else "–")
        lines.append(f"| {n} | {s['ppl']:.3f} | {rel} | "
                     f"{f'{dec:.3f}' if dec else '–'} | {rel_d} |")
    return lines + [""]


def _big_section(big: dict) -> list[str]:
    shape = LLAMA_32_1B
    llama = next((n for n in big if n.startswith("llama.cpp")), None)
    keys = [m for m in METRICS if m[0] in ("decode", "prefill", "load", "rss", "rss_model",
                                            "rss_all")]
    lines = ["## A model ten times larger", "",
             f"Random weights in the shape of Llama-3.2-1B ({shape['n_layer']} layers, d_model "
             f"{shape['d_model']}, {shape['n_head']} query / {shape['n_kv_head']} KV heads, "
             f"d_ff {shape['d_ff']}, vocabulary {shape['vocab_size']:,}; Q4_0 matrices, Q8_0 "
             "embedding), written by `kvformer.tools.bench.models` and read by both engines:", ""]
    lines += _table(big, keys, ppl=False)
    if llama:
        lines += ["", f"Against {llama}:", ""] + _ratios(big, llama, keys)
    return lines + [""]


def _profile_sections(summary: dict) -> list[str]:
    lines: list[str] = []
    prof = next((s["profile"] for s in summary.values() if "profile" in s), None)
    if prof and "native_ms" in prof:
        lines += ["## Where the time goes (int4, batch 1)", "",
                  f"Native decode step on the {prof.get('isa', '?')} path, "
                  f"{prof['native_ms']:.2f} ms per token at ~{prof['len']} cached tokens "
                  "(timers inside the C++ operator):", "",
                  "| part | ms per token | share |", "| --- | --- | --- |"]
        total = sum(prof["parts"].values())
        for part, ms in prof["parts"].items():
            lines.append(f"| {part} | {ms:.2f} | {ms / total * 100:.0f} % |")
        lines += ["", f"For comparison, the same step through `Transformer.forward` (what runs "
                  f"without the native library): {prof['forward_ms']:.2f} ms. torch.profiler "
                  "of `Transformer.forward` "
                  "(top operators by self CPU time, per token):", "",
                  "| operator | calls | ms |", "| --- | --- | --- |"]
        for name, calls, ms in prof["forward_top"]:
            lines.append(f"| `{name}` | {calls} | {ms:.2f} |")
        lines.append("")
    return lines


def _how(summary: dict, info: dict) -> list[str]:
    kernels = sorted({f"{n}: {s['kernels']}" + (f", activations {s['act']}" if "act" in s
                                                 else "")
                      for n, s in summary.items() if "kernels" in s and "fp32" not in n
                      and "bf16" not in n})
    llama = info.get("llama")
    la, lb = info["load_before"], info["load_after"]
    lines = ["## How", "",
             "- **Weights.** `int4`: kvformer's layout, tiles of 16 rows × blocks of 32 "
             "columns with an fp16 (d, m) pair per row and block (GGUF Q4_1's numbers, laid "
             "out so that one integer dot-product instruction covers 4 columns of 16 rows); "
             "`int8`: rows with one fp32 scale each. The embedding and the LM head are one "
             "shared int8 table; Q/K/V and gate/up are fused into one matrix each.",
             "- **Decode** (one token per row): one C++ operator per token "
             "(`kvformer/runtime/csrc/step.cpp`) runs every layer on the kernels of the row's "
             "path (`csrc/kernels/avx512.cpp`: vpdpbusd; `kernels/avx2.cpp`: vpmaddubsw/"
             "vpmaddwd; `kernels/scalar.cpp`: portable C++), chosen at run time from cpuid "
             "(`csrc/cpu.cpp`). Activations "
             "enter the integer kernels as two int8 levels per block, so they lose less than "
             "bf16 would; attention over a long cache is split between threads.",
             "- **Prefill**: each weight is unpacked once (in pieces of ~1 M values) to the "
             "activations' dtype (bf16 only where the CPU has native bf16, fp32 elsewhere) "
             "for a dense matmul; the LM head runs on the last position only.",
             "- **Kernel paths of these rows** (for llama.cpp: what its build uses): "
             + ("; ".join(kernels) or "–") + ".",
             f"- **llama.cpp:** llama-cpp-python {llama['version']}, `Llama(n_threads, "
             "n_threads_batch)` at the same thread count; decode rates from the token "
             "timestamps of `generate()`, prefill from `eval()`."
             if llama else "- **llama.cpp:** not installed (`pip install 'kvformer[bench]'`).",
             "", "## Machine", "",
             f"- CPU: {info['cpu']}, {info['cores']} cores visible, {info['threads']} threads; "
             f"flags {', '.join(info['isa']) or '–'}; kvformer's kernel paths here: "
             f"{', '.join(info['runs_here']) or 'none (no native build)'}; {info['memory']} "
             "memory",
             "- " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
             f"- load average {la[0]:.2f} before and {lb[0]:.2f} after the run "
             f"({info['seconds'] / 60:.1f} minutes): the machine is shared with other "
             "processes, so absolute figures move by ±20 % or more between runs; compare the "
             "ratios, which come from the same runs.", ""]
    return lines


def plot(summary: dict, path: Path) -> None:
    names = list(summary)
    keys = [("decode", "decode, batch 1"), ("ctx4k", "decode, 4k tokens cached"),
            ("prefill", f"prefill, {PROMPT_TOKENS}-token prompt")]
    fig = Figure(figsize=(4.4 * len(keys), 0.9 + 0.32 * len(names)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys))
    colors = ["#c44e52" if n.startswith("llama.cpp") else "#8c8c8c"
              if n.startswith("transformers") else "#4c72b0" for n in names]
    for ax, (k, title) in zip(axes, keys):
        vals = [summary[n].get(k, 0) for n in names]
        bars = ax.barh(names, vals, color=colors)
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
        ax.set_title(f"{title}, tokens/s", fontsize=10)
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
        ax.set_xlim(0, max(vals + [1]) * 1.2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)

