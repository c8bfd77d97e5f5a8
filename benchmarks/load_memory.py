"""Load time and memory of GGUF files, kvformer (``--dtype auto``) against llama.cpp, each in
fresh processes on the same file and threads.

    python benchmarks/load_memory.py FILE.gguf [FILE.gguf ...] [--runs 3] [--threads 2]

For each file: the load time (the model ready to run, the file in the page cache; kvformer's
second and later loads map its kb cache where the file is big enough: docs/models.md) as the
median of ``--runs`` fresh processes, each engine's peak RSS (VmHWM) over load + 128 greedy
tokens, and what load + decode added over the process just before the load (torch and the
native library are loaded before that point in kvformer's process; llama.cpp's process never
imports torch). Needs llama-cpp-python (the ``bench`` extra) for the llama.cpp columns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

KVFORMER = r"""
import json, sys, time
import torch
from kvformer.formats.load import load
from kvformer.runtime import native
from kvformer.runtime.generation import generate
torch.set_num_threads(THREADS)
native.available()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
base = status("VmRSS:")
t = time.perf_counter()
model, tok = load(PATH, dtype="auto", progress=False)
took = time.perf_counter() - t
if DECODE:
    generate(model, tok.encode("The history of the city begins"), 128)
print(json.dumps({"load": took, "peak": status("VmHWM:"), "base": base}))
"""

LLAMA = r"""
import json, time
from llama_cpp import Llama
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
base = status("VmRSS:")
t = time.perf_counter()
llm = Llama(model_path=PATH, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=256,
            n_batch=512, verbose=False)
took = time.perf_counter() - t
if DECODE:
    n = 0
    for _ in llm.generate(llm.tokenize(b"The history of the city begins"), temp=0.0, top_k=1):
        n += 1
        if n >= 128:
            break
print(json.dumps({"load": took, "peak": status("VmHWM:"), "base": base}))
"""


def run(code: str, path: str, threads: int, decode: bool) -> dict | None:
    src = (code.replace("PATH", repr(path)).replace("THREADS", str(threads))
           .replace("DECODE", str(decode)))
    proc = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
        engines = {"kvformer": KVFORMER, "llama.cpp": LLAMA}
    except ImportError:
        print("llama-cpp-python is not installed: kvformer only", file=sys.stderr)
        engines = {"kvformer": KVFORMER}
    print("| file | MB | engine | load (s), median | peak RSS, load + 128 tokens (MB) "
          "| added by load + decode (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in args.files:
        size = os.path.getsize(path) / 2**20
        run(KVFORMER, path, args.threads, False)  # the first load writes the kb cache
        for name, code in engines.items():
            loads = [r["load"] for r in (run(code, path, args.threads, False)
                                         for _ in range(args.runs)) if r]
            mem = run(code, path, args.threads, True)
            if not loads or mem is None:
                continue
            print(f"| {os.path.basename(path)} | {size:.0f} | {name} | "
                  f"{statistics.median(loads):.2f} | {mem['peak']:.0f} | "
                  f"{mem['peak'] - mem['base']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
