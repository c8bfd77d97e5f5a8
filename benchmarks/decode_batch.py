"""Where a batched decode step's time goes: the C++ step (what ``kvformer serve`` runs over
its paged pool) at several batch sizes, split by the step's own timers into the weight
matmuls, the LM head, attention and the rest, and the greedy pick of the next tokens from
the logits (``kvformer.serve.sampler.pick_tokens``), in one process, rounds interleaved.

Every row has --context tokens cached (random K/V: the timing does not depend on the
numbers) in blocks of 16 of a pool as the engine builds it; "vs B=1" is the step's
tokens/s over batch 1's.

    python benchmarks/decode_batch.py                        # SmolLM2-135M int4, B = 1 4 16
    python benchmarks/decode_batch.py --batch 1 2 4 8 16 --threads 1
    python benchmarks/decode_batch.py --activations int16 int8   # both modes, interleaved
"""

from __future__ import annotations

import argparse
import statistics
import time

# isort: off
import kvformer  # noqa: F401  (before torch, as the CLI does: see kvformer/__init__.py)
import torch
# isort: on

from kvformer.formats.load import load
from kvformer.kv.paged import BlockPool
from kvformer.runtime.step import for_model
from kvformer.serve.sampler import pick_tokens
from kvformer.serve.sequence import SamplingParams, Seq

PARTS = ("matmul", "head", "attention", "other")


def time_batch(step, pool, b: int, context: int, steps: int) -> dict[str, float]:
    """Milliseconds per step of each part at batch b (the median step's split)."""
    bs = pool.block_size
    nb = context // bs + 1
    tables = torch.tensor([[1 + i * nb + j for j in range(nb)] for i in range(b)])
    lens = torch.full((b,), context, dtype=torch.long)
    tokens = torch.randint(0, 1000, (b, 1))
    seqs = [Seq(i, [1, 2, 3], SamplingParams(16, temperature=0), lambda out: None, None, 0)
            for i in range(b)]
    for _ in range(3):
        step.paged(tokens, pool, tables, lens)
    native = torch.ops.kvformer_native
    native.profile(True)
    start = time.perf_counter()
    for _ in range(steps):
        logits = step.paged(tokens, pool, tables, lens)
    total = (time.perf_counter() - start) / steps
    raw = native.profile(False)
    start = time.perf_counter()
    for _ in range(steps):
        pick_tokens(seqs, logits[:, -1])
    pick = (time.perf_counter() - start) / steps
    out = {k: v / raw[-1] / 1e6 for k, v in zip(PARTS, raw[:-1])}
    out["step"] = total * 1e3
    out["pick"] = pick * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-dtype", default="auto")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--context", type=int, default=100, help="tokens cached per row")
    p.add_argument("--steps", type=int, default=20, help="steps per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--activations", nargs="+", default=None, choices=["int16", "int8"],
                   help="how x enters the int4 kernels; several: each, rounds interleaved "
                        "(default: the process's, KVFORMER_ACTIVATIONS or int16)")
    args = p.parse_args()
    from kvformer.runtime import native
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(1)  # load as kvformer serve does
    model, _ = load(args.model, dtype=args.dtype, kv_dtype=args.kv_dtype, progress=False)
    torch.set_num_threads(threads)
    rotary = model._modules.get("rotary")
    if rotary is not None:  # tabulate the positions the step will use (it reads the table)
        rotary.ensure(args.context + 1)
    executor = for_model(model)
    step = executor.native
    if step is None:
        raise SystemExit(f"this model has no native decode step: it runs on {executor.why}")
    bs = 16
    pool = BlockPool.for_model(model, max(args.batch) * (args.context // bs + 1) + 1, bs,
                               dtype=model.kv_format(None), prefix_caching=False)
    modes = args.activations or [native.activations()]
    runs: dict[tuple[str, int], list[dict[str, float]]] = {
        (a, b): [] for a in modes for b in args.batch}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for a in modes:
                native.activations(a)
                for b in args.batch:
                    runs[a, b].append(time_batch(step, pool, b, args.context, args.steps))
    isa = torch.ops.kvformer_native.plan_isa(step.handle)
    print(f"{args.model} ({args.dtype}, {isa} kernels, KV {pool.kv_dtype}), {args.context} "
          f"tokens cached per row, {threads} torch threads, median of {args.rounds} rounds "
          f"of {args.steps} steps (ms per step)\n")
    print("| activations | B | step | matmuls | LM head | attention | other | greedy pick | "
          "tok/s (step + pick) | vs B=1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    med = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for key, rs in runs.items()}
    for a in modes:
        first = med[a, args.batch[0]]
        base = args.batch[0] / (first["step"] + first["pick"])
        for b in args.batch:
            m = med[a, b]
            rate = b / (m["step"] + m["pick"])
            print(f"| {a} | {b} | {m['step']:.2f} | {m['matmul']:.2f} | {m['head']:.2f} | "
                  f"{m['attention']:.2f} | {m['other']:.2f} | {m['pick']:.2f} | "
                  f"{rate * 1e3:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
