"""What the grammar mask of structured output costs: the engine's decode throughput with a
JSON schema enforced against the same requests free, in one process, rounds interleaved
(so the ratio holds on a busy machine), and the time of the mask itself.

    python benchmarks/structured_output.py            # SmolLM2-135M int4, 1 and 8 streams

Both runs decode exactly ``--max-tokens`` per stream: the schema asks for at least 100
objects (so the JSON never closes before) and ``ignore_eos`` keeps the free run going.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from kvformer.formats.load import load
from kvformer.serve import sampler
from kvformer.serve.engine import Engine, SamplingParams
from kvformer.serve.grammar import Grammars

SCHEMA = {"type": "array", "minItems": 100, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "role"],
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                   "role": {"enum": ["engineer", "doctor", "teacher", "artist"]}}}}


class MaskClock:
    """Wraps the sampler's ``apply_masks`` to add up its time and rows."""

    def __init__(self):
        self.seconds, self.calls, self.rows = 0.0, 0, 0
        self._inner = sampler.apply_masks

    def __call__(self, rows, logits):
        start = time.perf_counter()
        self._inner(rows, logits)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.rows += len(rows)


def rate(engine, prompts, max_tokens, grammar) -> tuple[float, float]:
    """Completion tokens/s of the engine running every prompt at once, and the seconds."""
    outs = [None] * len(prompts)

    def run(i):
        outs[i] = engine.generate(prompts[i], SamplingParams(
            max_tokens, temperature=0, ignore_eos=True, grammar=grammar), 900)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    assert all(o.completion_tokens == max_tokens for o in outs), "a run ended early"
    return sum(o.completion_tokens for o in outs) / elapsed, elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8])
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
        [{"role": "user", "content": f"List people of team {i} as JSON objects."}]),
        add_special_tokens=False) for i in range(max(args.streams))]
    grammars = Grammars(tok, model.cfg.vocab_size)
    start = time.perf_counter()
    grammars.vocab  # noqa: B018 - built on first use: the token table, once per server
    table_s = time.perf_counter() - start
    start = time.perf_counter()
    grammar = grammars.json_schema(SCHEMA)
    compile_ms = 1e3 * (time.perf_counter() - start)
    clock = MaskClock()
    sampler.apply_masks = clock
    rates: dict[tuple[int, bool], list[float]] = {}
    held_seconds = 0.0  # wall time of the runs with the schema (the mask runs only there)
    with Engine(model, tok, max_batch=max(args.streams), prefix_caching=False) as engine:
        engine.generate(prompts[0][:4], SamplingParams(2, temperature=0), 600)  # warm-up
        for _ in range(args.rounds):
            for s in args.streams:
                for constrained in (False, True):
                    tok_s, seconds = rate(engine, prompts[:s], args.max_tokens,
                                          grammar if constrained else None)
                    rates.setdefault((s, constrained), []).append(tok_s)
                    held_seconds += seconds if constrained else 0.0
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.model} ({args.dtype}), {args.max_tokens} tokens per stream, "
          f"{torch.get_num_threads()} torch threads, median of {args.rounds} interleaved rounds")
    print("\n| streams | free tok/s | with the schema tok/s | with / free |")
    print("|---:|---:|---:|---:|")
    for s in args.streams:
        free, held = med[(s, False)], med[(s, True)]
        print(f"| {s} | {free:.1f} | {held:.1f} | {held / free:.3f} |")
    print(f"\nthe vocabulary's table for the grammar: {table_s:.2f} s (once per server); "
          f"compiling the schema: {compile_ms:.1f} ms")
    print(f"the mask: {1e6 * clock.seconds / max(clock.calls, 1):.0f} us per step, "
          f"{1e6 * clock.seconds / max(clock.rows, 1):.0f} us per row "
          f"({clock.calls} steps, {clock.rows} rows): "
          f"{100 * clock.seconds / held_seconds:.1f} % of the wall time of the runs with it")


if __name__ == "__main__":
    main()
