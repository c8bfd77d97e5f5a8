"""The engine's decode throughput without HTTP: the C++ step over the paged pool (what the
server runs) against the previous way (the batch's K/V gathered into a contiguous cache,
the step run on it, the new slots written back), and ``kvformer.generate`` alone, all in
one process, rounds interleaved, so the ratios hold on a busy machine too.

    python benchmarks/serve_decode.py                 # SmolLM2-135M int4, 1 and 16 streams
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from kvformer.formats.load import load
from kvformer.runtime.generation import generate
from kvformer.serve.engine import Engine, SamplingParams
from kvformer.serve.runner import StepRunner


def engine_rate(model, tok, prompts, max_tokens, paged: bool) -> float:
    """Completion tokens/s of the engine running every prompt at once."""
    if not paged:  # the gathered step cache: what decode did before the paged step
        original = StepRunner._decode_native
        StepRunner._decode_native = lambda self, step, seqs: None
    try:
        with Engine(model, tok, max_batch=len(prompts), prefix_caching=False) as engine:
            engine.generate(prompts[0][:4], SamplingParams(2, temperature=0), 600)  # warm-up
            outs = [None] * len(prompts)

            def run(i):
                outs[i] = engine.generate(prompts[i], SamplingParams(
                    max_tokens, temperature=0, ignore_eos=True), 600)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return sum(o.completion_tokens for o in outs) / (time.perf_counter() - start)
    finally:
        if not paged:
            StepRunner._decode_native = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # load as kvformer serve does
    model, tok = load(args.model, dtype=args.dtype, progress=False)
    torch.set_num_threads(threads)
    prompts = [tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": f"Write a short story about topic number {i}."}]),
        add_special_tokens=False) for i in range(max(args.streams))]
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        start = time.perf_counter()
        n = len(generate(model, prompts[0], args.max_tokens))
        rates.setdefault("generate", []).append(n / (time.perf_counter() - start))
        for s in args.streams:
            for paged in (True, False):
                key = f"{s} {'paged' if paged else 'gathered'}"
                rates.setdefault(key, []).append(
                    engine_rate(model, tok, prompts[:s], args.max_tokens, paged))
    med = {k: statistics.median(v) for k, v in rates.items()}
    gen = med["generate"]
    print(f"{args.model} ({args.dtype}), {args.max_tokens} tokens per stream, "
          f"{torch.get_num_threads()} torch threads, median of {args.rounds} interleaved rounds")
    print(f"kvformer.generate alone: {gen:.1f} tok/s\n")
    print("| streams | decode step | total tok/s | vs generate | vs 1 stream (same step) |")
    print("|---:|---|---:|---:|---:|")
    for s in args.streams:
        for kind in ("paged", "gathered"):
            r = med[f"{s} {kind}"]
            one = med[f"{args.streams[0]} {kind}"]
            print(f"| {s} | {kind} | {r:.1f} | {r / gen:.2f}x | {r / one:.1f}x |")


if __name__ == "__main__":
    main()
