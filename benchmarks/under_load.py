"""Decode speed while other programs want the same cores: kvformer and llama.cpp on the same
GGUF and the same threads, alone and with 1 and 2 busy processes beside them.

A busy process is a Python loop that never sleeps (what a compile, a browser tab or the
server's own HTTP clients look like to the scheduler, at its worst). With B busy processes
on C cores and T threads of ours, a fair share of the CPU is about C / (B + T) cores per
thread; a step that synchronises its threads ~200 times (kvformer's step: every matmul and
attention) loses far more than that share when a barrier waits for a thread the OS has
descheduled. "kept" is each engine's rate under load over its own rate alone, in the same
run; "vs llama.cpp" is kvformer's rate over llama.cpp's at the same load.

    python benchmarks/under_load.py                 # default model, 2 threads, 0 1 2 busy
    python benchmarks/under_load.py --busy 0 1 --tokens 128 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

# isort: off
import kvformer  # noqa: F401  (before torch, as the CLI does: see kvformer/__init__.py)
import torch
# isort: on

BUSY = "while True: pass"


def kvformer_rate(model, ids: list[int], n: int) -> float:
    from kvformer.runtime.generation import generate

    start = time.perf_counter()
    out = generate(model, ids, n)
    return len(out) / (time.perf_counter() - start)


def llama_rate(llm, ids: list[int], n: int) -> float:
    llm.reset()
    start = time.perf_counter()
    count = 0
    for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        count += 1
        if count == n:
            break
    return count / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per run")
    p.add_argument("--runs", type=int, default=3, help="runs per engine and load (median)")
    args = p.parse_args()

    from kvformer.formats.load import default_model_path, load

    torch.set_num_threads(args.threads)
    path = default_model_path()
    model, tok = load(str(path), dtype="auto", progress=False)
    ids = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a lighthouse."}]),
        add_special_tokens=False)
    try:
        from llama_cpp import Llama
        llm = Llama(model_path=str(path), n_threads=args.threads,
                    n_threads_batch=args.threads, n_ctx=512, verbose=False)
    except ImportError:
        llm = None
        print("llama-cpp-python is not installed: kvformer alone (pip install -e '.[llama]')")
    kvformer_rate(model, ids, 8)  # warm-up: the native step's plan, the caches
    if llm is not None:
        llama_rate(llm, ids, 8)

    rows = []
    for busy in args.busy:
        procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
        try:
            time.sleep(0.5)
            kv, ll = [], []
            for _ in range(args.runs):  # interleaved, so both see the same machine
                kv.append(kvformer_rate(model, ids, args.tokens))
                if llm is not None:
                    ll.append(llama_rate(llm, ids, args.tokens))
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
        rows.append((busy, statistics.median(kv), statistics.median(ll) if ll else None))
        print(f"busy {busy}: kvformer {rows[-1][1]:.1f} tok/s"
              + (f", llama.cpp {rows[-1][2]:.1f}" if ll else ""), flush=True)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    from kvformer.runtime import native
    print(f"\n{path.name}, {args.threads} threads, {args.tokens} greedy tokens, median of "
          f"{args.runs}; {cpu}, {torch.get_num_threads()} torch threads, kernels: "
          f"{native.kernel_path() if native.available() else 'torch ops'}\n")
    print("| busy processes | kvformer tok/s | kept | llama.cpp tok/s | kept | vs llama.cpp |")
    print("|---:|---:|---:|---:|---:|---:|")
    base_kv, base_ll = rows[0][1], rows[0][2]
    for busy, kv, ll in rows:
        if ll is None:
            print(f"| {busy} | {kv:.1f} | {kv / base_kv:.2f} | — | — | — |")
        else:
            print(f"| {busy} | {kv:.1f} | {kv / base_kv:.2f} | {ll:.1f} | {ll / base_ll:.2f} | "
                  f"{kv / ll:.2f}x |")


if __name__ == "__main__":
    main()
