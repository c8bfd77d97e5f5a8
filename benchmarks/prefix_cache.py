"""Prefix caching: time to first token of a request whose long prefix another request has
already computed, as a fraction of the first request's.

Two chat-style prompts share a prefix of --prefix tokens (a long system text) and end in
different questions. Each is sent to an in-process ``Engine`` (as ``kvformer serve`` builds
it) on its own, with max_tokens=1, so the time to its first token is its queueing plus its
prefill. The second request finds the prefix in the cache and prefills only its own tail.
The same pair runs again with the cache off, as the reference (its ratio is ~1).

    python benchmarks/prefix_cache.py                    # SmolLM2-135M, a 1,500-token prefix
    python benchmarks/prefix_cache.py --dtype fp32 --prefix 3000
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

# isort: off
import kvformer  # noqa: F401  (before torch, as the CLI does: see kvformer/__init__.py)
import torch
# isort: on

from kvformer.formats.load import load
from kvformer.serve.engine import Engine, SamplingParams

TEXT = ("The KV cache keeps the keys and values of every earlier token, so a decoder computes "
        "attention for a new token without recomputing the past. A server that sees the "
        "same system prompt in many requests can keep those keys and values too. ")


def ttft(engine: Engine, ids: list[int]) -> tuple[float, int]:
    start = time.perf_counter()
    out = engine.generate(ids, SamplingParams(max_tokens=1, temperature=0), timeout=600)
    return time.perf_counter() - start, out.cached_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prefix", type=int, default=1500, help="shared prefix tokens")
    p.add_argument("--runs", type=int, default=3, help="pairs per setting (median shown)")
    args = p.parse_args()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as kvformer serve loads (see docs/serving.md)
    model, tok = load(args.model, dtype=args.dtype, progress=False)
    torch.set_num_threads(threads)
    words = tok.encode(TEXT * (args.prefix // 20 + 2), add_special_tokens=False)
    prefix = words[:args.prefix]
    print(f"model {args.model} ({args.dtype}), prefix {len(prefix)} tokens, "
          f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}")
    print("| prefix cache | 1st request TTFT (s) | 2nd request TTFT (s) | 2nd / 1st | "
          "cached tokens of the 2nd |")
    print("|---|---:|---:|---:|---:|")
    for caching in (True, False):
        firsts, seconds, cached = [], [], 0
        for run in range(args.runs):
            engine = Engine(model, tok, max_batch=4, prefix_caching=caching)
            with engine:
                ttft(engine, tok.encode("warm up", add_special_tokens=False))
                a = prefix + tok.encode(f" Question {run}: what does it keep?",
                                        add_special_tokens=False)
                b = prefix + tok.encode(f" Question {run}: why is that faster?",
                                        add_special_tokens=False)
                t1, _ = ttft(engine, a)
                t2, cached = ttft(engine, b)
            firsts.append(t1)
            seconds.append(t2)
        f, s = statistics.median(firsts), statistics.median(seconds)
        print(f"| {'on' if caching else 'off'} | {f:.3f} | {s:.3f} | {s / f:.3f} | {cached} |")


if __name__ == "__main__":
    main()
