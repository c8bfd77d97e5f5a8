"""Speculative decoding: tokens/s of plain decoding and of speculation, in the same run.

Prompt lookup on input-grounded tasks (summarize, edit, extract from a passage given in the
prompt) and on free-form text (what it costs when guesses fail), for each --k; then a draft
model: the default model in --draft-dtype drafting for itself in --target-dtype. Every run
is greedy, and each speculative answer is checked to be plain decoding's, token for token.
Decode speed is the tokens after the first over the time from the first to the last (the
prompt's prefill is the same in both). Writes a table and a PNG of tokens/s against k and
against acceptance.

    python benchmarks/speculative.py                      # SmolLM2-135M, k = 2 4 6 8
    python benchmarks/speculative.py --new-tokens 64 --k 4 --png /tmp/spec.png
"""

from __future__ import annotations

import argparse
import platform
import time

# isort: off
import kvformer  # noqa: F401  (before torch, as the CLI does: see kvformer/__init__.py)
import torch
# isort: on

from kvformer.formats.load import load
from kvformer.runtime.generation import generate_stream
from kvformer.runtime.speculative import SpecStats
from kvformer.runtime.step import for_model

PASSAGE = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Harbor Street. "
    "Council member Rivera said the lanes had cut accidents by a third since March. "
    "Council member Okafor asked for a count of the parking spaces that were removed, and "
    "the transport office said forty-two spaces were removed and thirty were added on "
    "Mill Road. The council voted six to one to extend the lanes to the train station by "
    "next summer, at a cost of 1.2 million dollars, paid from the road repair budget.")

TASKS = {
    "summarize": f"Summarize this passage in two sentences:\n\n{PASSAGE}",
    "edit": ("Rewrite the passage below with every number written in digits, changing "
             f"nothing else:\n\n{PASSAGE}"),
    "extract": ("List every council member named in the passage below and what each said, "
                f"quoting the passage:\n\n{PASSAGE}"),
    "free-form": "Write a short story about a lighthouse keeper who finds a strange map.",
}


def timed(run, ids, n, stop_ids, **spec) -> tuple[list[int], float, SpecStats]:
    """(tokens, decode tokens/s after the first, speculation stats)."""
    stats = SpecStats()
    out, first = [], None
    for tok in generate_stream(run, ids, n, stop_ids=stop_ids, spec_stats=stats, **spec):
        if first is None:
            first = time.perf_counter()
        out.append(tok)
    end = time.perf_counter()
    rate = (len(out) - 1) / (end - first) if len(out) > 1 and end > first else float("nan")
    return out, rate, stats


def verify_cost(run, ids, rows=(1, 2, 3, 5, 7, 9), reps=15) -> dict[int, float]:
    """The 10th-percentile ms (others on the machine only ever slow a call down) of one
    executor call over ``r`` rows after the prompt (one row: a decode step; more: a
    verification), the cache truncated back after each."""
    model = run.model
    cache = model.new_cache(1, len(ids) + max(rows) + 1)
    with torch.inference_mode():
        run(torch.tensor([ids]), cache=cache, last_only=True)
        n = cache.length
        out = {}
        for r in rows:
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                run(torch.tensor([ids[-r:]]), cache=cache, last_only=False)
                times.append(time.perf_counter() - start)
                cache.truncate(n)
            out[r] = 1000 * sorted(times)[len(times) // 10]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto", help="the model for prompt lookup")
    p.add_argument("--target-dtype", default="fp32", help="the draft model's target")
    p.add_argument("--draft-dtype", default="int4")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 6, 8])
    p.add_argument("--no-draft", action="store_true", help="prompt lookup only")
    p.add_argument("--no-lookup", action="store_true", help="the draft model only")
    p.add_argument("--png", default="docs/img/speculative.png")
    p.add_argument("--cost-only", action="store_true",
                   help="only the time of one call over 1..9 rows")
    args = p.parse_args()

    model, tok = load(args.model, dtype=args.dtype, progress=False)
    run = for_model(model)
    print(f"model {args.model} ({getattr(model, 'mode', args.dtype)}), {run.why}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{args.new_tokens} new tokens, greedy")
    ids = tok.encode_chat([{"role": "user", "content": TASKS["summarize"]}],
                          add_generation_prompt=True)
    cost = verify_cost(run, ids)
    print("one call after the summarize prompt (" + f"{len(ids)} tokens), 10th-percentile ms: "
          + ", ".join(f"{r} row{'s' * (r > 1)} {ms:.1f}" for r, ms in cost.items()))
    if args.cost_only:
        return
    print("| task | method | k | tokens/s | speed-up | acceptance | target calls | same |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    rows = []  # (task, method, k, rate, speed-up, acceptance)

    def report(task, method, k, out, rate, stats, plain, base):
        same = out == plain
        acc = stats.acceptance if stats.drafted else float("nan")
        print(f"| {task} | {method} | {k} | {rate:.1f} | {rate / base:.2f}x | "
              f"{100 * acc:.0f} % | {stats.rounds} | {'yes' if same else 'NO'} |", flush=True)
        rows.append((task, method, k, rate, rate / base, acc))

    for task, text in ({} if args.no_lookup else TASKS).items():
        ids = tok.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
        plain, base, _ = timed(run, ids, args.new_tokens, tok.stop_ids)
        print(f"| {task} | plain | - | {base:.1f} | 1.00x | - | {len(plain)} | - |", flush=True)
        for k in args.k:
            out, rate, stats = timed(run, ids, args.new_tokens, tok.stop_ids,
                                     spec="lookup", spec_k=k)
            report(task, "lookup", k, out, rate, stats, plain, base)

    if not args.no_draft:
        target, _ = load(args.model, dtype=args.target_dtype, progress=False)
        draft, _ = load(args.model, dtype=args.draft_dtype, progress=False)
        trun, drun = for_model(target), for_model(draft)
        print(f"\ndraft model: {args.model} {args.draft_dtype} ({drun.why}) for "
              f"{args.target_dtype} ({trun.why})")
        for task in ("summarize", "free-form"):
            ids = tok.encode_chat([{"role": "user", "content": TASKS[task]}],
                                  add_generation_prompt=True)
            plain, base, _ = timed(trun, ids, args.new_tokens, tok.stop_ids)
            print(f"| {task} ({args.target_dtype}) | plain | - | {base:.1f} | 1.00x | - | "
                  f"{len(plain)} | - |", flush=True)
            for k in args.k:
                out, rate, stats = timed(trun, ids, args.new_tokens, tok.stop_ids,
                                         spec="draft", spec_k=k, draft=drun)
                report(f"{task} ({args.target_dtype})", "draft", k, out, rate, stats, plain,
                       base)
    if args.png:
        plot(rows, args)


def plot(rows, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    tasks = sorted({(r[0], r[1]) for r in rows}, key=lambda t: (t[1], t[0]))
    for task, method in tasks:
        mine = [r for r in rows if r[0] == task and r[1] == method]
        style = "-o" if method == "lookup" else "--s"
        left.plot([r[2] for r in mine], [r[4] for r in mine], style,
                  label=f"{task}, {method}")
        right.scatter([r[5] for r in mine], [r[4] for r in mine], label=f"{task}, {method}")
    for ax in (left, right):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("speed-up over plain decoding (tokens/s)")
        ax.grid(alpha=0.3)
    left.set_xlabel("k (most guesses checked per step)")
    right.set_xlabel("acceptance (kept / checked guesses)")
    left.legend(fontsize=7)
    fig.suptitle(f"Speculative decoding, {args.model}, batch 1, greedy, "
                 f"{args.new_tokens} new tokens (a busy 2-core machine: indicative)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
