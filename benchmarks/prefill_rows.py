"""Prefill of one prompt into a contiguous cache: as rows of the C++ step against the model's
forward, for prompts of several lengths, in one process (interleaved, best of --rounds).

``kvformer generate`` prefills through the C++ step when ``kvformer.runtime.step.rows_pay``
says rows are faster (short prompts), and through ``Transformer.forward`` otherwise (long
ones: the step attends one query at a time, the forward with matrix products). This prints
both for each length so that the rule can be checked on a machine:

    python benchmarks/prefill_rows.py                 # SmolLM2-135M int4, 8 .. 2,048 tokens
    python benchmarks/prefill_rows.py --lengths 64 512 --cached 1000
"""

from __future__ import annotations

import argparse
import time

# isort: off
import kvformer  # noqa: F401  (before torch, as the CLI does: see kvformer/__init__.py)
import torch
# isort: on

from kvformer.formats.load import load
from kvformer.runtime import native
from kvformer.runtime.step import for_model, rows_pay


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--lengths", type=int, nargs="+",
                   default=[8, 32, 64, 128, 256, 512, 1024, 2048])
    p.add_argument("--cached", type=int, default=0, help="tokens already in the cache")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not native.available():
        raise SystemExit("the native kernels are not built: there are no step rows to time")
    model, _ = load(args.model, dtype=args.dtype, progress=False)
    executor = for_model(model)
    if executor.native is None:
        raise SystemExit(f"this model runs on {executor.why}: there are no step rows to time")

    def rows(tokens, cache, last_only):  # the C++ step's rows, whatever rows_pay says
        saved = swap_rows_pay(lambda n, cached: True)
        try:
            return executor(tokens, cache=cache, last_only=last_only)
        finally:
            swap_rows_pay(saved)

    def forward_only(tokens, cache, last_only):
        return model(tokens, cache=cache, last_only=last_only)

    gen = torch.Generator().manual_seed(0)
    print(f"{args.model} ({args.dtype}, {native.kernel_path()}), {args.cached} tokens cached "
          f"before, {torch.get_num_threads()} threads, best of {args.rounds}\n")
    print("| prompt tokens | C++ step rows (ms) | forward (ms) | rows vs forward | "
          "kvformer generate takes |")
    print("|---:|---:|---:|---:|---|")
    for n in args.lengths:
        ids = torch.randint(100, model.cfg.vocab_size, (1, args.cached + n), generator=gen)
        best = {"rows": float("inf"), "forward": float("inf")}
        for _ in range(args.rounds):
            for way, fn in (("rows", rows), ("forward", forward_only)):
                cache = model.new_cache(1, args.cached + n + 1)
                with torch.inference_mode():
                    if args.cached:
                        model(ids[:, :args.cached], cache=cache, last_only=True)
                    start = time.perf_counter()
                    fn(ids[:, args.cached:], cache, True)
                    best[way] = min(best[way], time.perf_counter() - start)
        takes = "rows" if rows_pay(n, args.cached) else "forward"
        print(f"| {n} | {best['rows'] * 1e3:.1f} | {best['forward'] * 1e3:.1f} | "
              f"{best['forward'] / best['rows']:.2f}x | {takes} |", flush=True)


def swap_rows_pay(fn):
    """Swap kvformer.runtime.step.rows_pay (what NativeStep.prefill asks); returns the old."""
    import kvformer.runtime.step as fast

    old, fast.rows_pay = fast.rows_pay, fn
    return old


if __name__ == "__main__":
    main()
