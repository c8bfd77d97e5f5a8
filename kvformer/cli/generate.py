"""``kvformer generate``: continue a prompt (argument or stdin), streaming."""

from __future__ import annotations

import sys
import time

import torch

from kvformer.cli.common import context_size, load_model, speculative_options
from kvformer.cli.status import StatusLine
from kvformer.errors import KvformerError
from kvformer.runtime import native
from kvformer.runtime.generation import generate_stream
from kvformer.runtime.sampling import validate_sampling
from kvformer.runtime.step import for_model


def run(args) -> int:
    if args.prompt is None and sys.stdin is None:  # started with `<&-`
        raise KvformerError("no prompt: give it as an argument, or on stdin (which is closed)")
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise KvformerError("empty prompt: give it as an argument or on stdin")
    validate_sampling(args.temperature, args.top_k, args.top_p)
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
    if args.ctx_size and len(ids) + args.max_new_tokens > ctx:
        raise KvformerError(
            f"prompt of {len(ids)} tokens + {args.max_new_tokens} new tokens = "
            f"{len(ids) + args.max_new_tokens} > the context of {ctx} (--ctx-size); shorten "
            "the prompt, lower -n or raise -c")
    spec, draft, spec_stats = speculative_options(args, model, tok)
    decoder = tok.stream_decoder()
    status = StatusLine(enabled=not args.quiet)
    status.show(f"reading the prompt ({len(ids)} tokens)")
    start, n = time.perf_counter(), 0
    try:
        for token in generate_stream(model, ids, args.max_new_tokens, args.temperature,
                                     args.top_k, args.top_p, args.seed, tok.stop_ids,
                                     use_cache=not args.no_cache,
                                     vocab_limit=tok.vocab_size,  # not padded-embedding ids
                                     spec=spec, spec_k=args.spec_k, draft=draft,
                                     spec_stats=spec_stats):
            if n == 0:
                status.clear()
            n += 1
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()
    finally:
        status.clear()
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    if args.stats:
        elapsed = time.perf_counter() - start
        executor = for_model(model)
        kernels = executor.isa or (
            "torch" if native.loaded() else
            "torch (KVFORMER_NATIVE=0)" if native.disabled() else "torch (no native build)")
        print(f"[{len(ids)} prompt tokens, {n} new tokens in {elapsed:.2f} s, "
              f"{n / elapsed:.1f} tokens/s; runs on {executor.why}; "
              f"{getattr(model, 'mode', '?')}, kernels {kernels}, "
              f"activations {str(model.dtype).split('.')[-1]}"
              f"{' (int8 into int4)' if native.activations() == 'int8' else ''}, "
              f"KV {model.kv_format().name}, "
              f"{torch.get_num_threads()} threads]", file=sys.stderr)
        if spec:
            print(f"[{spec_stats.line()}]", file=sys.stderr)
    return 0

