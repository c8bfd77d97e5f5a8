"""The `kvformer` command: one verb per job."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .arguments import add_model_arguments
from .errors import ArgumentParser, KvformerError


def _add_sampling(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=max_new)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="kvformer", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    g = sub.add_parser("generate", help="continue a prompt (argument or stdin), streaming")
    g.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted")
    add_model_arguments(g)
    _add_sampling(g, 128)
    g.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence for every token (the seed's comparison)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--stats", action="store_true", help="print tokens/s to stderr")

    c = sub.add_parser("chat", help="interactive multi-turn chat (Ctrl-D exits)")
    add_model_arguments(c)
    _add_sampling(c, 256)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--context", type=int, default=4096, help="KV cache size in tokens")

    i = sub.add_parser("info", help="architecture, parameters, attention kind, KV-cache size")
    i.add_argument("model", nargs="?", default="default",
                   help="a model path, 'default', or a preset name (shapes only)")

    k = sub.add_parser("kv-size", help="KV-cache bytes of models as MHA, GQA and MQA")
    k.add_argument("models", nargs="*", default=["default"], metavar="PRESET|MODEL")
    k.add_argument("--context", type=int, default=4096)
    k.add_argument("--batch", type=int, default=1)
    k.add_argument("--dtype", "--kv-dtype", default="fp16,int8,int4",
                   help="comma-separated KV dtypes: fp32, fp16, bf16, int8, int4 (int8 and "
                        "int4 with their scales; default fp16,int8,int4)")
    k.add_argument("--plot", default=None, metavar="OUT.png")

    a = sub.add_parser("attention", help="heatmaps of a model's attention weights")
    a.add_argument("model")
    a.add_argument("text")
    a.add_argument("--layer", type=int, default=0)
    a.add_argument("--head", type=int, default=None, help="one head; default: all heads")
    a.add_argument("-o", "--output", default="attention.png")

    e = sub.add_parser("explain", help="the seed's ideas measured, as pictures")
    e.add_argument("topic", choices=["scaling", "cache", "docs"],
                   help="scaling: why 1/sqrt(d_k); cache: time per token with and without "
                        "the KV cache; docs: regenerate docs/how-it-decodes.md and its pictures")
    e.add_argument("-o", "--output", default=None, help="PNG (or, for docs, a directory)")
    e.add_argument("--model", "-m", default="default")

    b = sub.add_parser("build", help="compile kvformer's C++ kernels for this machine (make "
                                     "does it during setup)")
    b.add_argument("--force", action="store_true", help="build again even if a build exists")

    from .bench import register as register_bench
    from .serve.cli import register as register_serve
    from .train.cli import register as register_train
    register_serve(sub)
    register_train(sub)
    register_bench(sub)
    return parser


def cmd_generate(args) -> int:
    from .generate import generate_stream
    from .loading import load

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise KvformerError("empty prompt: give it as an argument or on stdin")
    model, tok = load(args.model, dtype=args.dtype, kv_dtype=args.kv_dtype)
    if tok is None:
        raise KvformerError(f"{args.model}: no tokenizer found beside the model; "
                            "generate needs tokenizer.json or a GGUF with a vocabulary")
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True),
                         add_special_tokens=False)
    else:
        ids = tok.encode(prompt)
    decoder = tok.stream_decoder()
    start, n = time.perf_counter(), 0
    for token in generate_stream(model, ids, args.max_new_tokens, args.temperature,
                                 args.top_k, args.top_p, args.seed, tok.stop_ids,
                                 use_cache=not args.no_cache):
        n += 1
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    if args.stats:
        from . import native

        elapsed = time.perf_counter() - start
        step = model.forward.step() if hasattr(model.forward, "step") else None
        kernels = getattr(step, "isa", None) or (
            "torch" if native.loaded() else
            "torch (KVFORMER_NATIVE=0)" if native.disabled() else "torch (no native build)")
        print(f"[{len(ids)} prompt tokens, {n} new tokens in {elapsed:.2f} s, "
              f"{n / elapsed:.1f} tokens/s; {getattr(model, 'mode', '?')}, kernels {kernels}, "
              f"activations {str(model.dtype).split('.')[-1]}, KV {model.kv_format().name}]",
              file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .chat import ChatSession
    from .loading import load
    from .sampling import validate_sampling

    validate_sampling(args.temperature, args.top_k, args.top_p)
    model, tok = load(args.model, dtype=args.dtype, kv_dtype=args.kv_dtype)
    session = ChatSession(model, tok, system=args.system, max_len=args.context,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"kvformer chat with {getattr(model, 'source', args.model)} "
              "(Ctrl-D to exit)", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        for piece in session.send(line, args.max_new_tokens):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def cmd_info(args) -> int:
    from .kvquant import INT4_GROUP
    from .loading import load_config
    from .pictures import human_bytes

    cfg, arch, path = load_config(args.model)
    kv_dtypes = [d for d in ("fp32", "bf16", "int8", "int4")
                 if d != "int4" or cfg.head_dim % INT4_GROUP == 0]

    def per_dtype(c, tokens: int) -> str:  # int8 and int4 with their scales
        return " · ".join(f"{d} {c.kv_cache_bytes(tokens, 1, d):,} B" if tokens == 1 else
                          f"{d} {human_bytes(c.kv_cache_bytes(tokens, 1, d))}"
                          for d in kv_dtypes)
    kind_line = {"MHA": "multi-head (MHA)", "GQA": "grouped-query (GQA)",
                 "MQA": "multi-query (MQA)"}[cfg.attention_kind]
    rows = [
        ("model", str(path or args.model)), ("architecture", arch),
        ("parameters", f"{cfg.num_params():,}"),
        ("layers", cfg.n_layer), ("d_model", cfg.d_model), ("d_ff", cfg.d_ff),
        ("vocab", cfg.vocab_size), ("context", cfg.max_seq_len),
        ("attention", f"{kind_line}: {cfg.n_head} query heads, {cfg.n_kv_head} KV heads, "
                      f"group size {cfg.group_size}, head_dim {cfg.head_dim}"),
        ("norm / positions / mlp", f"{cfg.norm} / {cfg.pos} / {cfg.mlp}"),
        ("KV cache per token", per_dtype(cfg, 1)),
        (f"KV cache, full context {cfg.max_seq_len}", per_dtype(cfg, cfg.max_seq_len)),
        ("  the same model as MHA",
         per_dtype(cfg.replace(n_kv_head=cfg.n_head), cfg.max_seq_len)),
        ("kernels on this CPU", _kernels_line()),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _kernels_line() -> str:
    """Which kernel path quantized models run here, and their activations' dtype."""
    from . import native
    from .quantize import act_dtype

    act = {"torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(str(act_dtype()))
    if not native.available(build_if_missing=False):
        return f"torch ops (native kernels not built: run `kvformer build`); activations {act}"
    return f"{native.kernel_path()}; activations {act}"


def cmd_build(args) -> int:
    from . import native

    try:
        path = native.build(force=args.force)
    except native.NativeBuildError as exc:
        print(f"kvformer build: {exc}", file=sys.stderr)
        return 1
    print(f"kvformer: native kernels in {path}")
    print(f"kvformer: {_kernels_line()}")
    return 0


def cmd_kv_size(args) -> int:
    from .loading import load_config
    from .pictures import DTYPE_NAMES, format_kv_table, kv_size_rows, plot_kv_sizes

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes or [""]:
        if d not in DTYPE_NAMES:
            raise ValueError(f"--dtype {d!r} is not one of {', '.join(DTYPE_NAMES)}")
    if args.context < 1 or args.batch < 1:
        raise ValueError("--context and --batch must be >= 1")
    rows = []
    for name in args.models:
        cfg = load_config(name)[0]
        rows += kv_size_rows(name, cfg, args.context, args.batch, dtypes)
    print(format_kv_table(rows, args.context, args.batch))
    if args.plot:
        print(f"wrote {plot_kv_sizes(rows, args.plot, args.context, args.batch)}")
    return 0


def cmd_attention(args) -> int:
    from .loading import load
    from .pictures import plot_attention, record_attention, token_labels

    model, tok = load(args.model)
    if tok is None:
        raise KvformerError(f"{args.model}: no tokenizer found beside the model")
    ids = tok.encode(args.text)
    model.check_context(len(ids))
    cfg = model.cfg
    if not 0 <= args.layer < cfg.n_layer:
        raise ValueError(f"--layer {args.layer} is out of range: the model has layers "
                         f"0..{cfg.n_layer - 1}")
    if args.head is not None and not 0 <= args.head < cfg.n_head:
        raise ValueError(f"--head {args.head} is out of range: the model has heads "
                         f"0..{cfg.n_head - 1}")
    weights = record_attention(model, ids)[args.layer]
    what = f"head {args.head}" if args.head is not None else f"all {cfg.n_head} heads"
    out = plot_attention(weights, token_labels(tok, ids), args.output,
                         f"layer {args.layer}, {what}: softmax(QKᵀ/√d_k), causal", args.head)
    print(f"wrote {out}")
    return 0


def cmd_explain(args) -> int:
    from . import explain

    return explain.run(args.topic, args.output, args.model)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info,
            "kv-size": cmd_kv_size, "attention": cmd_attention, "explain": cmd_explain,
            "build": cmd_build}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return (COMMANDS.get(args.verb) or args.func)(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (KvformerError, ValueError, OSError) as exc:
        if os.environ.get("KVFORMER_DEBUG"):
            raise
        message = " ".join(str(exc).split())
        print(f"kvformer: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
