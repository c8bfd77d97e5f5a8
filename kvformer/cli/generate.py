"""``kvformer generate``: continue a prompt (argument, -p, -f or stdin), streaming. It stops
at the end of the text, at -n tokens, or where the context (-c) is full, with a note."""

from __future__ import annotations

import sys
import time

import torch

from kvformer.cli.arguments import GREEDY, sampling_kwargs
from kvformer.cli.common import context_size, load_model, speculative_options
from kvformer.cli.status import StatusLine, plural
from kvformer.errors import KvformerError
from kvformer.runtime import native
from kvformer.runtime.generation import generate_stream
from kvformer.runtime.step import for_model


def run(args) -> int:
    prompt = args.prompt  # read by kvformer.cli.main (kvformer.cli.prompt)
    model, tok = load_model(args)
    if tok is None:
        raise KvformerError(f"{args.model}: no tokenizer found beside the model; "
                            "generate needs tokenizer.json or a GGUF with a vocabulary")
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        ids = tok.encode_chat(messages, add_generation_prompt=True)
    else:
        ids = tok.encode(prompt)
    ctx = context_size(args, model)
    if len(ids) >= ctx:
        raise KvformerError(
            f"the prompt is {plural(len(ids), 'token')}, and the context holds {ctx} with none "
            f"left for an answer; shorten the prompt or raise -c/--ctx-size (at most the "
            f"model's {model.cfg.max_seq_len})")
    room = ctx - len(ids)
    most = room if args.max_new_tokens is None else min(args.max_new_tokens, room)
    sampling = sampling_kwargs({name: getattr(args, name) for name in GREEDY})
    spec, draft, spec_stats = speculative_options(args, model, tok)
    if spec and sampling.get("repeat_penalty") not in (None, 1.0):
        raise KvformerError("--spec keeps the model's own distribution, which a repeat "
                            "penalty changes: give --repeat-penalty 1 with it")
    decoder = tok.stream_decoder()
    status = StatusLine(enabled=not args.quiet)
    status.show(f"reading the prompt ({plural(len(ids), 'token')})")
    start = first = time.perf_counter()
    n = 0
    try:
        for token in generate_stream(model, ids, most, seed=args.seed, stop_ids=tok.stop_ids,
                                     use_cache=not args.no_cache,
                                     vocab_limit=tok.vocab_size,  # not padded-embedding ids
                                     spec=spec, spec_k=args.spec_k, draft=draft,
                                     spec_stats=spec_stats, **sampling):
            if n == 0:
                first = time.perf_counter()
                status.clear()
            n += 1
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()
    finally:
        status.clear()
    end = time.perf_counter()
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    if n == most == room and (args.max_new_tokens is None or args.max_new_tokens > room):
        print(f"[stopped: the context of {plural(ctx, 'token')} is full; -c/--ctx-size sets "
              f"it (the model's is {model.cfg.max_seq_len})]", file=sys.stderr)
    if args.stats:
        for line in stats_lines(model, len(ids), n, start, first, end):
            print(line, file=sys.stderr)
        if spec:
            print(f"[{spec_stats.line()}]", file=sys.stderr)
    return 0


def stats_lines(model, prompt_tokens: int, n: int, start: float, first: float,
                end: float) -> list[str]:
    """As llama.cpp's timings: the load, the prompt's and the answer's tokens and speeds, the
    time to the first token; then what ran them."""
    to_first = (first if n else end) - start
    lines = [f"load:        {model.load_s:.2f} s",
             f"prompt:      {plural(prompt_tokens, 'token')} in {to_first:.2f} s"
             + (f" ({prompt_tokens / to_first:.1f} tokens/s)" if n and to_first > 0 else ""),
             f"answer:      {plural(n, 'token')} in {end - start:.2f} s"
             + (f" ({(n - 1) / (end - first):.1f} tokens/s after the first)"
                if n > 1 and end > first else ""),
             f"first token: {to_first:.2f} s after the prompt was given"]
    executor = for_model(model)
    kernels = executor.isa or (
        "torch" if native.loaded() else
        "torch (KVFORMER_NATIVE=0)" if native.disabled() else "torch (no native build)")
    lines.append(f"[runs on {executor.why}; {getattr(model, 'mode', '?')}, kernels {kernels}, "
                 f"activations {str(model.dtype).split('.')[-1]}"
                 f"{' (int8 into int4)' if native.activations() == 'int8' else ''}, "
                 f"KV {model.kv_format().name}, {plural(torch.get_num_threads(), 'thread')}]")
    return lines
