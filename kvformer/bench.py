"""`kvformer bench`: speed, memory and load time, against `transformers` in the same run.

For every configuration (kvformer in each dtype, and `transformers` in fp32 when it is
installed) and every run, a fresh Python process loads the model and measures

    load        seconds for the load call (kvformer.load / from_pretrained), imports excluded
    prefill     tokens/s of one forward over a 512-token prompt (logits of the last
                position only, as generation needs them)
    decode      tokens/s at batch 1: 128 new tokens, greedy, after a 16-token prompt
    batch       total tokens/s at batch 8 (8 different 16-token prompts, 128 new tokens each)
    no cache    tokens/s with use_cache=False (every step recomputes the whole sequence;
                the seed's comparison): 32 new tokens after the 16-token prompt
    RSS         peak resident memory as the kernel counts it for the whole process (its
                ru_maxrss, read by this parent when the process ends: the figure
                `/usr/bin/time -v` prints), of two processes: one that only loads the model
                and decodes 128 tokens at batch 1 (as `kvformer generate` does), and the one
                that runs all the workloads above
    perplexity  on a fixed English text (prefill path), to show quantization keeps quality;
                measured once, in a process of its own

Each workload is warmed up first; decode rates are taken between the first and the last new
token (so the prompt is not counted). The configurations take turns run after run, so the
noise of a shared machine falls on all of them alike, and each figure is the median over the
runs. The result is printed and written to docs/benchmarks.md with a chart.

    kvformer bench                       # default model, fp32 bf16 int8 int4 + transformers
    kvformer bench --dtype int4 --runs 5 --no-write
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
from pathlib import Path

DTYPES = ("fp32", "bf16", "int8", "int4")
PROMPT_TOKENS, SHORT_TOKENS, NEW_TOKENS, BATCH, NOCACHE_TOKENS = 512, 16, 128, 8, 32

# A fixed text: the prompts are cut from it and the perplexity is measured on it.
TEXT = """\
The history of the printing press begins in the middle of the fifteenth century, when \
Johannes Gutenberg, a goldsmith from Mainz, combined several existing technologies into a \
single practical system. Movable type had been used in East Asia for centuries, but the \
large number of characters in Chinese writing made it difficult to scale. In Europe, the \
Latin alphabet required only a few dozen letters, numerals and marks of punctuation, so a \
printer could cast thousands of small metal pieces and arrange them again and again. \
Gutenberg developed an alloy of lead, tin and antimony that melted at a low temperature and \
cooled quickly into durable letters. He adapted the screw press that farmers used to make \
wine and olive oil, and he mixed an oil-based ink that stuck to metal better than the \
water-based inks used by scribes.

The results spread with remarkable speed. Within fifty years of the first printed Bible, \
presses were operating in more than two hundred cities across the continent, and millions \
of books had been produced. The price of a book fell sharply, and reading ceased to be a \
privilege of monasteries, universities and wealthy households. Merchants printed price lists \
and calendars; governments printed laws and proclamations; scholars exchanged corrected \
editions of ancient texts and argued about them in pamphlets. Historians still debate how \
much the press caused the great changes of the following centuries and how much it simply \
accelerated them, but few doubt that the reformation of the church, the growth of modern \
science and the rise of newspapers would have looked very different without it.

Printing also changed the way people thought about language itself. Because a printer \
wanted to sell the same book in many towns, spelling and grammar slowly became more uniform, \
and regional dialects gave way to standard written forms. Dictionaries and grammars \
appeared, teachers used the same textbooks in different schools, and the idea of a correct \
way to write became widespread. At the same time, the sheer quantity of printed material \
created new problems. Readers complained that there were too many books to read, and \
librarians invented catalogues, indexes and systems of classification to help them find \
what they needed.

Today the digital screen has replaced paper for many purposes, yet the basic questions \
raised by the printing press remain familiar. Who controls what is published? How can \
readers tell reliable information from rumor? What happens to a culture when the cost of \
copying a text falls almost to zero? The answers are still being worked out, and they will \
shape the way the next generation learns, argues and remembers.
"""

METRICS = (  # key, column title, unit, higher is better
    ("decode", "decode b1", "tok/s", True),
    ("batch", f"decode b{BATCH}", "tok/s", True),
    ("prefill", f"prefill {PROMPT_TOKENS}", "tok/s", True),
    ("nocache", "no cache", "tok/s", True),
    ("load", "load", "s", False),
    ("rss", "peak RSS, load + decode b1", "MB", False),
    ("rss_all", "peak RSS, all workloads", "MB", False),
)


# --------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    """Add the `bench` verb to kvformer's CLI."""
    p = subparsers.add_parser(
        "bench", help="speed, memory and load time against transformers (writes "
                      "docs/benchmarks.md)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "-m", default="default",
                   help="a .gguf file, a model directory, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=",".join(DTYPES),
                   help=f"comma-separated kvformer dtypes to measure (default {','.join(DTYPES)})")
    p.add_argument("--runs", type=int, default=3, help="fresh processes per configuration "
                   "(the figures are their medians; default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads for every configuration (default: all cores)")
    p.add_argument("--no-transformers", action="store_true",
                   help="skip the transformers reference")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--out", default="docs/benchmarks.md",
                   help="markdown file to write (its chart goes to img/ beside it)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--profile", action="store_true",
                   help="also profile one int4 decode step and time torch.compile of a "
                        "piece of it (adds about a minute)")
    p.set_defaults(func=run)


def run(args) -> int:
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"--dtype {d!r} is not one of {', '.join(DTYPES)}")
    if args.runs < 1:
        raise ValueError("--runs must be at least 1")
    ids = token_ids(args.model)
    configs = [{"engine": "kvformer", "dtype": d} for d in dtypes]
    hf_dir = hf_source(args.model) if not args.no_transformers else None
    if hf_dir is not None:
        configs.append({"engine": "transformers", "dtype": "fp32", "hf": hf_dir})
    elif not args.no_transformers:
        print("transformers is not installed or cannot read this model: no reference",
              file=sys.stderr)
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {label(c): [] for c in configs}
    started = time.time()
    for r in range(args.runs):
        for c in configs:
            spec = {**c, "model": args.model, "threads": args.threads, "ids": ids,
                    "new_tokens": args.new_tokens}
            out = run_worker({**spec, "task": "speed"})
            out["rss_all"] = out.pop("peak_rss")
            out["rss"] = run_worker({**spec, "task": "memory"})["peak_rss"]
            if r == 0:  # quality does not change from run to run: once, in its own process
                profile = (args.profile and c["engine"] == "kvformer" and c["dtype"] == "int4")
                quality = run_worker({**spec, "task": "quality", "profile": profile})
                out.update({k: v for k, v in quality.items() if k != "peak_rss"})
            results[label(c)].append(out)
            print(f"[run {r + 1}/{args.runs}] {label(c):<22} " + "  ".join(
                f"{k} {out[k]:.1f}" for k, *_ in METRICS if k in out), file=sys.stderr)
    summary = {name: summarize(rs) for name, rs in results.items()}
    info = machine_info(args.threads, load_before, os.getloadavg(), time.time() - started)
    ref = "transformers fp32" if "transformers fp32" in summary else None
    text = report(summary, results, info, ref, args)
    print(text)
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        chart = out.parent / "img" / "bench_speed.png"
        plot(summary, ref, chart)
        out.write_text(text.replace("(CHART)", f"![speed]({chart.relative_to(out.parent)})"))
        print(f"wrote {out} and {chart}", file=sys.stderr)
    return 0


def label(c: dict) -> str:
    return f"{c['engine']} {c['dtype']}"


# --------------------------------------------------------------------------- parent side
def token_ids(model: str) -> dict:
    """The prompts as token ids, cut from TEXT with the model's own tokenizer."""
    from .loading import resolve

    kind, path = resolve(model)
    if kind == "gguf":
        from .checkpoints.gguf import read_metadata
        from .tokenizer import Tokenizer

        tok = Tokenizer.from_gguf(read_metadata(path))
    else:
        from .tokenizer import Tokenizer

        tok = Tokenizer.from_dir(path)
    text_ids = tok.encode(TEXT)
    long = (text_ids * (PROMPT_TOKENS // len(text_ids) + 1))[:PROMPT_TOKENS]
    batch = [text_ids[i * 40:i * 40 + SHORT_TOKENS] for i in range(BATCH)]
    return {"text": text_ids, "long": long, "short": text_ids[:SHORT_TOKENS], "batch": batch}


def hf_source(model: str) -> dict | None:
    """Where transformers reads the same model from, if it is installed and can."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    from .loading import resolve

    kind, path = resolve(model)
    if kind == "gguf":
        return {"dir": str(path.parent), "gguf_file": path.name}
    if kind == "hf":
        return {"dir": str(path)}
    return None


def run_worker(spec: dict, timeout: float = 1800) -> dict:
    """One task in a fresh process; its result, plus ``peak_rss``: the process's maximum
    resident set size in MB as the kernel reports it to this parent when it ends (the
    figure `/usr/bin/time -v` prints; the process's own view of it can lag by a few MB)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(spec["threads"])}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kvformer.bench", "--worker"],
                                stdin=subprocess.PIPE, stdout=out, stderr=err, text=True,
                                env=env)
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        deadline = time.monotonic() + timeout
        while True:  # os.wait4, not proc.wait: it also returns the process's rusage
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise RuntimeError(f"benchmark of {label(spec)} ({spec['task']}) took more "
                                   f"than {timeout:.0f} s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"benchmark of {label(spec)} ({spec['task']}) failed:\n"
                               f"{err.read()[-3000:]}")
    result = json.loads(lines[-1])
    result["peak_rss"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return result


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))
                  and not isinstance(r.get(key), bool)]
        if values:
            out[key] = statistics.median(values)
    for key in ("ppl", "ppl_decode", "profile", "compile", "decode_path"):
        for r in runs:
            if key in r:
                out[key] = r[key]
    return out


def machine_info(threads: int, load_before, load_after, seconds: float) -> dict:
    from .native import cpuinfo

    cpu = cpuinfo("model name").partition(":")[2].strip() or "unknown CPU"
    flags = cpuinfo("flags").split()
    isa = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "avx512vbmi", "amx_tile")
           if f in flags]
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            kb = int(fh.readline().split()[1])
            mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "isa": isa,
            "memory": mem, "versions": versions, "load_before": load_before,
            "load_after": load_after, "seconds": seconds, "date": time.strftime("%Y-%m-%d")}


def _fmt(value, key) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "load":
        return f"{value:.2f}"
    if key in ("rss", "rss_all"):
        return f"{value:.0f}"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def report(summary: dict, results: dict, info: dict, ref: str | None, args) -> str:
    command = " ".join(["kvformer bench", *(["--profile"] if args.profile else []),
                        f"--runs {args.runs}",
                        *([f"--dtype {args.dtype}"] if args.dtype != ",".join(DTYPES) else []),
                        *([f"--model {args.model}"] if args.model != "default" else [])])
    lines = ["# Benchmarks", "",
             f"Written by `{command}` ({info['date']}, model `{args.model}`, "
             f"{args.runs} fresh process{'es' if args.runs > 1 else ''} per configuration, "
             "medians); run it again to regenerate this page.", ""]
    lines += ["| configuration | " + " | ".join(f"{t} ({u})" for _, t, u, _ in METRICS)
              + " | perplexity |",
              "| --- |" + " --- |" * (len(METRICS) + 1)]
    for name, s in summary.items():
        cells = [_fmt(s.get(k), k) for k, *_ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(s.get('ppl'), 'ppl')} |")
    if ref:
        lines += ["", f"Ratios against {ref} (above 1 is better for kvformer: speed ratios are "
                  "kvformer / transformers, load time and memory ratios transformers / "
                  "kvformer):", "",
                  "| configuration | " + " | ".join(t for _, t, _, _ in METRICS) + " |",
                  "| --- |" + " --- |" * len(METRICS)]
        r = summary[ref]
        for name, s in summary.items():
            if name == ref:
                continue
            cells = []
            for k, _, _, higher in METRICS:
                a, b = s.get(k), r.get(k)
                if not a or not b:
                    cells.append("–")
                    continue
                cells.append(f"{(a / b if higher else b / a):.2f}×")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "(CHART)", ""]
    fp32 = summary.get("kvformer fp32", {}).get("ppl")
    ppl_rows = [(n, s) for n, s in summary.items() if "ppl" in s]
    if ppl_rows:
        lines += ["## Quality", "",
                  f"Perplexity on a fixed English text ({len(TEXT.split())} words, "
                  "`kvformer.generate.perplexity`, the prefill path) and, for kvformer, the "
                  "same text fed one token at a time through the decode step that generation "
                  "uses (`decode path`, first 256 tokens).", "",
                  "| configuration | perplexity | vs kvformer fp32 | decode path |",
                  "| --- | --- | --- | --- |"]
        for n, s in ppl_rows:
            rel = f"{(s['ppl'] / fp32 - 1) * 100:+.2f} %" if fp32 else "–"
            lines.append(f"| {n} | {s['ppl']:.3f} | {rel} | "
                         f"{_fmt(s.get('ppl_decode'), 'ppl') if 'ppl_decode' in s else '–'} |")
    prof = next((s["profile"] for s in summary.values() if "profile" in s), None)
    if prof:
        lines += ["", "## Where the time goes (int4, batch 1)", ""]
        lines += [f"Native decode step, {prof['native_ms']:.2f} ms per token at ~{prof['len']} "
                  "cached tokens (timers inside the C++ operator):", "",
                  "| part | ms per token | share |", "| --- | --- | --- |"]
        total = sum(prof["parts"].values())
        for part, ms in prof["parts"].items():
            lines.append(f"| {part} | {ms:.2f} | {ms / total * 100:.0f} % |")
        lines += ["", f"For comparison, the same step in Python: `Transformer.forward` "
                  f"{prof['forward_ms']:.2f} ms, the lean Python `DecodeStep` "
                  f"{prof['python_ms']:.2f} ms. torch.profiler of `Transformer.forward` "
                  "(top operators by self CPU time, per token):", "",
                  "| operator | calls | ms |", "| --- | --- | --- |"]
        for name, calls, ms in prof["forward_top"]:
            lines.append(f"| `{name}` | {calls} | {ms:.2f} |")
    comp = next((s["compile"] for s in summary.values() if "compile" in s), None)
    if comp:
        lines += ["", "## torch.compile", "",
                  f"One layer's MLP piece of the Python decode step (norm, gate/up, SiLU, "
                  f"down) compiled with `torch.compile(dynamic=False)`: compiled in "
                  f"{comp['compile_s']:.1f} s; {comp['compiled_us']:.0f} µs per call against "
                  f"{comp['eager_us']:.0f} µs eager. "
                  + ("Compiling wins here." if comp["compiled_us"] < comp["eager_us"] else
                     "Compiling loses here, so nothing is compiled by default.")]
    paths = sorted({f"{n}: {s['decode_path']}" for n, s in summary.items()
                    if "decode_path" in s})
    lines += ["", "## How", "",
              "- **Weights.** `int4`: groups of 32 input columns with a bf16 scale and zero "
              "(GGUF Q4_1's own form, so a Q4_1 file keeps its grid); `int8`: one scale per "
              "output row. Each weight is quantized as it streams out of the file; the "
              "embedding and the LM head are one shared int8 table; Q/K/V and gate/up are "
              "fused into one matrix each.",
              "- **Decode** (one token per row): one C++ operator per token "
              "(`kvformer/native.py`, compiled once per machine with the system compiler) runs "
              "all layers: AVX-512 VNNI kernels read torch's packed int4 layout directly "
              "(`vpermt2b` + `vpdpbusd`, activations as two int8 levels, so no precision is "
              "lost to them), attention reads only the filled part of the cache, and nothing "
              "returns to Python between layers. Without a compiler the Python `DecodeStep` "
              "(`kvformer/fast.py`) does the same with torch ops. Decode step used: "
              + "; ".join(paths) + ".",
              "- **Prefill**: each packed weight is unpacked once to bf16 and multiplied with "
              "oneDNN's bf16 matmul; the LM head runs on the last position only.",
              "- **The limit** is memory bandwidth: a batch-1 int4 step reads ~94 MB (66 MB "
              "of int4 weights and scales, 28 MB of int8 LM head) and the machine streams "
              "~20-45 GB/s depending on its other load. llama.cpp decodes this model at "
              "≈160 tokens/s on this kind of machine (shared/PERF-NOTES.md; not measured by "
              "this command)."]
    la, lb = info["load_before"], info["load_after"]
    lines += ["", "## Machine", "",
              f"- CPU: {info['cpu']}, {info['cores']} cores visible, {info['threads']} torch "
              f"threads; {', '.join(info['isa']) or 'no AVX-512'}; {info['memory']} memory",
              "- " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
              f"- load average {la[0]:.2f} before and {lb[0]:.2f} after the run "
              f"({info['seconds'] / 60:.1f} minutes): the machine is shared with other "
              "busy processes, so absolute figures move by ±20 % or more between runs (more "
              "with 2 threads, when a thread waits for a core); compare the ratios, which "
              "come from the same runs.", ""]
    return "\n".join(lines)


def plot(summary: dict, ref: str | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    keys = [("decode", "decode, batch 1"), ("batch", f"decode, batch {BATCH} (total)"),
            ("prefill", f"prefill, {PROMPT_TOKENS}-token prompt")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6))
    colors = ["#c44e52" if n == ref else "#4c72b0" for n in names]
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
    plt.close(fig)


# --------------------------------------------------------------------------- worker side
def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    return _kvformer(spec) if spec["engine"] == "kvformer" else _transformers(spec)


def _stamps(stream, n: int) -> float:
    """tokens/s between the first and the last of n streamed steps."""
    first = last = None
    count = 0
    for _ in stream:
        last = time.perf_counter()
        if first is None:
            first = last
        count += 1
    if count < 2 or count != n:
        raise RuntimeError(f"expected {n} steps, got {count}")
    return (count - 1) / (last - first)


def _kvformer(spec: dict) -> dict:
    import torch

    from . import native
    from .generate import generate_stream, perplexity
    from .loading import load

    ids, n = spec["ids"], spec["new_tokens"]
    if spec["task"] == "memory":  # what `kvformer generate` does: load, then decode
        model, _ = load(spec["model"], dtype=spec["dtype"], progress=False)
        _stamps(generate_stream(model, ids["short"], n), n)
        return {}
    if spec["task"] == "quality":
        model, _ = load(spec["model"], dtype=spec["dtype"], progress=False)
        out = {"ppl": perplexity(model, ids["text"]),
               "ppl_decode": decode_perplexity(model, ids["text"][:256])}
        if spec.get("profile"):
            out["profile"] = profile_step(model, ids["short"])
            out["compile"] = compile_experiment(model)
        return out

    out: dict = {"native": native.available()}  # built (once) before the clock starts
    t = time.perf_counter()
    model, _ = load(spec["model"], dtype=spec["dtype"], progress=False)
    out["load"] = time.perf_counter() - t
    long = torch.tensor([ids["long"]])

    def prefill(tokens):
        with torch.inference_mode():
            cache = model.new_cache(1, tokens.shape[1])
            t0 = time.perf_counter()
            model(tokens, cache=cache, last_only=True)
            return tokens.shape[1] / (time.perf_counter() - t0)

    prefill(long[:, :64])
    out["prefill"] = prefill(long)
    for _ in generate_stream(model, ids["short"], 8):
        pass
    out["decode"] = _stamps(generate_stream(model, ids["short"], n), n)
    for _ in generate_stream(model, ids["batch"], 8):
        pass
    out["batch"] = BATCH * _stamps(generate_stream(model, ids["batch"], n), n)
    for _ in generate_stream(model, ids["short"], 4, use_cache=False):
        pass
    out["nocache"] = _stamps(generate_stream(model, ids["short"], NOCACHE_TOKENS,
                                             use_cache=False), NOCACHE_TOKENS)
    out["decode_path"] = type(model.forward.step()).__name__
    return out


def decode_perplexity(model, ids: list[int]) -> float:
    """Perplexity with the text fed one token at a time through the model's decode path."""
    import torch
    import torch.nn.functional as F

    nll = 0.0
    with torch.inference_mode():
        cache = model.new_cache(1, len(ids))
        logits = model(torch.tensor([ids[:1]]), cache=cache)
        for i in range(1, len(ids)):
            nll += F.cross_entropy(logits[0, -1:].float(), torch.tensor([ids[i]])).item()
            if i + 1 < len(ids):
                logits = model(torch.tensor([[ids[i]]]), cache=cache)
    return math.exp(nll / (len(ids) - 1))


def profile_step(model, prompt: list[int], steps: int = 32) -> dict:
    """Per-token time of the native step by part, of Transformer.forward and of the Python
    DecodeStep on the same cache, and torch.profiler's top operators of the forward."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .fast import DecodeStep
    from .native import NativeDecodeStep

    tok = torch.tensor([[prompt[-1]]])
    fwd = type(model).forward.__get__(model)
    with torch.inference_mode():
        cache = model.new_cache(1, 512)
        model(torch.tensor([prompt]), cache=cache)
        start = cache.length + 100  # ~100 more tokens in the cache, as mid-generation
        cache.length = start

        def timed(f) -> float:
            cache.length = start
            f(tok, cache)
            cache.length = start
            t0 = time.perf_counter()
            for _ in range(steps):
                f(tok, cache)
            return (time.perf_counter() - t0) / steps * 1e3

        step = NativeDecodeStep(model)
        result = {"len": start}
        if step.supported:
            torch.ops.kvformer_native.profile(True)
            result["native_ms"] = timed(step)
            raw = torch.ops.kvformer_native.profile(False)
            names = ("weight matmuls", "LM head", "attention (incl. RoPE, cache writes)",
                     "norms, SiLU, residuals")
            result["parts"] = {k: v / raw[-1] / 1e6 for k, v in zip(names, raw[:4])}
        result["python_ms"] = timed(DecodeStep(model))
        result["forward_ms"] = timed(lambda t, c: fwd(t, cache=c))
        cache.length = start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(8):
                fwd(tok, cache=cache)
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        result["forward_top"] = [(e.key, e.count // 8, e.self_cpu_time_total / 8 / 1e3)
                                 for e in rows[:8]]
    return result


def compile_experiment(model) -> dict:
    """torch.compile of one layer's MLP piece of the Python decode step, against eager."""
    import torch
    import torch.nn.functional as F

    from .fast import DecodeStep

    layer = DecodeStep(model).layers[0]
    d = model.cfg.d_model
    x = torch.randn(1, d, dtype=model.dtype)
    buf = torch.empty(1, 2 * d, dtype=model.dtype)

    def mlp(x, buf):
        h = layer.mlp_norm(x, buf)
        if layer.gate_up is not None:
            gu = layer.gate_up(h)
            f = gu.shape[1] // 2
            return layer.down(F.silu(gu[:, :f]) * gu[:, f:])
        return layer.down(F.silu(layer.gate(h)) * layer.up(h))

    def per_call(f, n=300) -> float:
        for _ in range(20):
            f(x, buf)
        best = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                f(x, buf)
            best.append((time.perf_counter() - t0) / n * 1e6)
        return statistics.median(best)

    with torch.inference_mode():
        compiled = torch.compile(mlp, dynamic=False)
        t0 = time.perf_counter()
        try:
            compiled(x, buf)
        except Exception as exc:  # no working compiler: report, do not fail the benchmark
            return {"error": f"{type(exc).__name__}: {exc}"[:200]}
        compile_s = time.perf_counter() - t0
        return {"compile_s": compile_s, "eager_us": per_call(mlp),
                "compiled_us": per_call(compiled)}


def _transformers(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    hf, ids, n = spec["hf"], spec["ids"], spec["new_tokens"]
    kwargs = {"gguf_file": hf["gguf_file"]} if "gguf_file" in hf else {}
    t = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(hf["dir"], dtype=torch.float32, **kwargs)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(hf["dir"], torch_dtype=torch.float32,
                                                     **kwargs)
    model.eval()
    out: dict = {"load": time.perf_counter() - t}
    if spec["task"] == "quality":
        with torch.inference_mode():
            text = torch.tensor([ids["text"]])
            logits = model(text).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, text[0, 1:])
        return {"ppl": math.exp(nll.item())}

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def gen(prompts, new, use_cache=True) -> float:
        x = torch.tensor(prompts)
        stamp = Stamp()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, use_cache=use_cache,
                           logits_processor=LogitsProcessorList([stamp]),
                           pad_token_id=model.config.eos_token_id)
        if len(stamp.times) != new:
            raise RuntimeError(f"expected {new} steps, got {len(stamp.times)}")
        return (new - 1) / (stamp.times[-1] - stamp.times[0])

    def prefill(tokens):
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(tokens, use_cache=True, logits_to_keep=1)
            return tokens.shape[1] / (time.perf_counter() - t0)

    if spec["task"] == "memory":
        gen([ids["short"]], n)
        return {}
    long = torch.tensor([ids["long"]])
    prefill(long[:, :64])
    out["prefill"] = prefill(long)
    gen([ids["short"]], 8)
    out["decode"] = gen([ids["short"]], n)
    gen(ids["batch"], 8)
    out["batch"] = BATCH * gen(ids["batch"], n)
    gen([ids["short"]], 4, use_cache=False)
    out["nocache"] = gen([ids["short"]], NOCACHE_TOKENS, use_cache=False)
    return out


def main(argv: list[str] | None = None) -> int:
    """`kvformer bench` on its own (benchmarks/bench.py), outside the kvformer command."""
    from .errors import ArgumentParser

    parser = ArgumentParser(prog="kvformer")
    register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        print(json.dumps(worker(json.loads(sys.stdin.read()))))
    else:
        sys.exit(main())
