"""The `kvformer` command: one verb per job."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from pathlib import Path

from kvformer.cli.arguments import SAMPLING, add_flags, apply_activations, at_least, physical_cores
from kvformer.errors import ArgumentParser, KvformerError


class _Version(argparse.Action):
    """--version, with torch's version read only when asked (importing torch takes ~2 s)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, help="show the versions and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import platform

        import torch

        from kvformer import __version__

        print(f"kvformer {__version__} (torch {torch.__version__}, "
              f"Python {platform.python_version()})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="kvformer", description=__doc__)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    g = sub.add_parser("generate", help="continue a prompt (argument or stdin), streaming")
    g.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted")
    add_flags(g, "model", "dtype", "kv_dtype", "activations", "threads", "ctx_size",
              *SAMPLING, "quiet")
    g.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence for every token (the seed's comparison)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--stats", action="store_true", help="print tokens/s to stderr")

    c = sub.add_parser("chat", help="interactive multi-turn chat (/help inside; Ctrl-C "
                                    "stops an answer, Ctrl-D exits)")
    add_flags(c, "model", "dtype", "kv_dtype", "activations", "threads", "ctx_size",
              *SAMPLING, "quiet", max_new_tokens=256, ctx_size=4096)
    c.add_argument("--context", dest="ctx_size", type=at_least(0),
                   help=argparse.SUPPRESS)  # the old name of --ctx-size
    c.add_argument("--system", default=None, help="system message")

    i = sub.add_parser("info", help="architecture, parameters, attention kind, KV-cache size")
    i.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="a model path or name, 'default', or a preset name (shapes only)")
    add_flags(i, "model")

    sub.add_parser("models", help="the models kvformer can find: the default one and those "
                                  "in $KVFORMER_MODELS (or ~/.cache/kvformer/models)")

    k = sub.add_parser("kv-size", help="KV-cache bytes of models as MHA, GQA and MQA")
    k.add_argument("models", nargs="*", default=["default"], metavar="PRESET|MODEL")
    k.add_argument("-c", "--ctx-size", "--context", dest="context", type=int, default=4096,
                   help="context length in tokens (default 4096)")
    k.add_argument("--batch", type=int, default=1)
    k.add_argument("--dtype", "--kv-dtype", default="fp16,int8,int4",
                   help="comma-separated KV dtypes: fp32, fp16, bf16, int8, int4 (int8 and "
                        "int4 with their scales; default fp16,int8,int4)")
    k.add_argument("--plot", default=None, metavar="OUT.png")

    a = sub.add_parser("attention", help="heatmaps of a model's attention weights")
    a.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="the model (or give it with -m)")
    a.add_argument("text")
    add_flags(a, "model", "threads", "quiet")
    a.add_argument("--layer", type=int, default=0)
    a.add_argument("--head", type=int, default=None, help="one head; default: all heads")
    a.add_argument("-o", "--output", default="attention.png")

    e = sub.add_parser("explain", help="the seed's ideas measured, as pictures")
    e.add_argument("topic", choices=["scaling", "cache", "docs"],
                   help="scaling: why 1/sqrt(d_k); cache: time per token with and without "
                        "the KV cache; docs: regenerate docs/how-it-decodes.md and its pictures")
    e.add_argument("-o", "--output", default=None, help="PNG (or, for docs, a directory)")
    add_flags(e, "model", "threads")

    b = sub.add_parser("build", help="compile kvformer's C++ kernels for this machine (make "
                                     "does it during setup)")
    b.add_argument("--force", action="store_true", help="build again even if a build exists")

    from kvformer.cli.serve import register as register_serve
    from kvformer.cli.train import register as register_train
    from kvformer.tools.bench.run import register as register_bench
    register_serve(sub)
    register_train(sub)
    register_bench(sub)
    return parser


class StatusLine:
    """One line on stderr saying what is happening while nothing else shows (building the
    kernels, loading, reading a long prompt), rewritten in place and wiped before anything
    else is written. Only on a terminal (a log file gets none), and not with --quiet."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.shown = False

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        import shutil

        width = shutil.get_terminal_size().columns - 1
        line = f"kvformer: {text}..."
        if len(line) > width:  # a wrapped line could not be wiped with \r
            line = line[:max(0, width - 3)] + "..."
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def set_threads(args) -> None:
    import torch

    torch.set_num_threads(args.threads or physical_cores())


def _build_native(status: StatusLine, quiet: bool) -> None:
    """Build the native kernels now if this machine has none, under the status line (the
    build would otherwise happen inside loading, with its own message)."""
    from kvformer.runtime import native

    lib = native.library_path()
    if native.disabled() or lib is None or lib.exists():
        return
    if not status.enabled and not quiet:
        native.available()  # prints its own line: a log gets it as it is
        return
    status.show("building the native kernels (once per machine, about a minute; "
                "`kvformer build` does it ahead)")
    with contextlib.redirect_stderr(io.StringIO()) as said:
        ok = native.available()
    status.clear()
    lines = said.getvalue().strip().splitlines()
    if not ok and not quiet and lines:
        print(lines[-1], file=sys.stderr)  # "native kernels unavailable (why); torch ops"


def load_model(args, name: str | None = None, dtype: str | None = None):
    """(model, tokenizer) for a verb: threads set, the kernels built and the model loaded
    under the status line. Every verb that runs a model comes through here."""
    from kvformer.formats.catalog import display_name
    from kvformer.formats.load import load, resolve

    name = name or args.model
    quiet = getattr(args, "quiet", False)
    status = getattr(args, "status", None) or StatusLine(enabled=not quiet)
    status.show("starting (importing torch)")
    set_threads(args)
    _build_native(status, quiet)
    apply_activations(args)
    status.show(f"loading {display_name(resolve(name)[1])}")
    try:
        model, tok = load(name, dtype=dtype or getattr(args, "dtype", None),
                          kv_dtype=getattr(args, "kv_dtype", None) or "auto",
                          progress=not quiet)
    finally:
        status.clear()
    model.display_name = (display_name(model.source) if name == "default" or
                          Path(name).exists() else name)
    return model, tok


def context_size(args, model) -> int:
    """-c/--ctx-size checked against the model: unset gives the verb's default (capped to
    the model's context), 0 the model's, more than the model's is an error."""
    most = model.cfg.max_seq_len
    if args.ctx_size is None:
        return min(getattr(args, "ctx_default", None) or most, most)
    if args.ctx_size == 0:
        return most
    if args.ctx_size > most:
        raise KvformerError(f"--ctx-size {args.ctx_size} is more than the model's context of "
                            f"{most} tokens; give at most {most} (or 0 for all of it)")
    return args.ctx_size


def cmd_generate(args) -> int:
    from kvformer.runtime.generation import generate_stream
    from kvformer.runtime.sampling import validate_sampling

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
    decoder = tok.stream_decoder()
    status = StatusLine(enabled=not args.quiet)
    status.show(f"reading the prompt ({len(ids)} tokens)")
    start, n = time.perf_counter(), 0
    try:
        for token in generate_stream(model, ids, args.max_new_tokens, args.temperature,
                                     args.top_k, args.top_p, args.seed, tok.stop_ids,
                                     use_cache=not args.no_cache):
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
        import torch

        from kvformer.runtime import native

        elapsed = time.perf_counter() - start
        from kvformer.runtime.step import for_model

        executor = for_model(model)
        kernels = executor.isa or (
            "torch" if native.loaded() else
            "torch (KVFORMER_NATIVE=0)" if native.disabled() else "torch (no native build)")
        print(f"[{len(ids)} prompt tokens, {n} new tokens in {elapsed:.2f} s, "
              f"{n / elapsed:.1f} tokens/s; {getattr(model, 'mode', '?')}, kernels {kernels}, "
              f"activations {str(model.dtype).split('.')[-1]}"
              f"{' (int8 into int4)' if native.activations() == 'int8' else ''}, "
              f"KV {model.kv_format().name}, "
              f"{torch.get_num_threads()} threads; runs on {executor.why}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from kvformer.cli.chat import ChatLoop
    from kvformer.formats.catalog import attention_label
    from kvformer.runtime.sampling import validate_sampling
    from kvformer.runtime.session import ChatSession

    validate_sampling(args.temperature, args.top_k, args.top_p)
    model, tok = load_model(args)
    if tok is None:
        raise KvformerError(f"{args.model}: no tokenizer found beside the model; "
                            "chat needs tokenizer.json or a GGUF with a vocabulary")
    session = ChatSession(model, tok, system=args.system,
                          max_len=context_size(args, model),
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed)
    interactive = sys.stdin.isatty()
    if interactive and not args.quiet:
        from kvformer.tools.pictures import human_bytes

        cache = session.cache
        kv = cache.format.name
        print(f"kvformer chat: {model.display_name} ({getattr(model, 'mode', '?')} weights)\n"
              f"  attention {attention_label(model.cfg, long=True)}\n"
              f"  KV cache {kv}, {cache.max_len} tokens ({human_bytes(cache.nbytes)})\n"
              "/help lists the commands; Ctrl-C stops an answer; Ctrl-D leaves.",
              file=sys.stderr, flush=True)
    return ChatLoop(session, args.max_new_tokens, model.display_name, interactive).run()


def _model_arg(args) -> str:
    """The model of a verb that takes it as a positional argument or with -m."""
    if args.model_arg is not None and args.model != "default" and args.model_arg != args.model:
        raise KvformerError(f"two models given ({args.model_arg!r} and -m {args.model!r}); "
                            "give one")
    return args.model_arg if args.model_arg is not None else args.model


def cmd_models(args) -> int:
    from kvformer.formats.catalog import format_table, list_models
    from kvformer.formats.load import MODELS_ENV, model_dirs

    print(format_table(list_models()))
    dirs = model_dirs()
    where = ", ".join(str(d) for d in dirs) or "(none)"
    source = f"${MODELS_ENV}" if os.environ.get(MODELS_ENV) is not None else \
        f"the default; set ${MODELS_ENV} to look elsewhere"
    print(f"\nmodels are looked for in {where} ({source})", file=sys.stderr)
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        print(f"{', '.join(missing)}: no such directory; put .gguf files or model directories "
              "there to use them by name (--model NAME)", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from kvformer.formats.load import check_model, load_config
    from kvformer.kv.formats import INT4_GROUP
    from kvformer.runtime.step import describe
    from kvformer.tools.pictures import human_bytes

    cfg, arch, path = load_config(_model_arg(args))
    checked = check_model(_model_arg(args))  # fails, in one line, where generate would
    kv_dtypes = [d for d in ("fp32", "bf16", "int8", "int4")
                 if d != "int4" or cfg.head_dim % INT4_GROUP == 0]

    def per_dtype(c, tokens: int) -> str:  # int8 and int4 with their scales
        return " · ".join(f"{d} {c.kv_cache_bytes(tokens, 1, d):,} B" if tokens == 1 else
                          f"{d} {human_bytes(c.kv_cache_bytes(tokens, 1, d))}"
                          for d in kv_dtypes)
    kind_line = {"MHA": "multi-head (MHA)", "GQA": "grouped-query (GQA)",
                 "MQA": "multi-query (MQA)"}[cfg.attention_kind]
    rows = [
        ("model", str(path or _model_arg(args))), ("architecture", arch),
        ("parameters", f"{cfg.num_params():,}"),
        ("layers", cfg.n_layer), ("d_model", cfg.d_model), ("d_ff", cfg.d_ff),
        ("vocab", cfg.vocab_size), ("context", cfg.max_seq_len),
        ("attention", f"{kind_line}: {cfg.n_head} query heads, {cfg.n_kv_head} KV heads, "
                      f"group size {cfg.group_size}, head_dim {cfg.head_dim}"),
        ("norm / positions / mlp", f"{cfg.norm} / {cfg.pos} / {cfg.mlp}"),
        *((("rotary positions", cfg.rope_summary()),) if cfg.rope_summary() else ()),
        *((("block", cfg.block_summary()),) if cfg.block_summary() else ()),
        ("KV cache per token", per_dtype(cfg, 1)),
        (f"KV cache, full context {cfg.max_seq_len}", per_dtype(cfg, cfg.max_seq_len)),
        ("  the same model as MHA",
         per_dtype(cfg.replace(n_kv_head=cfg.n_head), cfg.max_seq_len)),
        ("kernels on this CPU", _kernels_line()),
        ("runs on", describe(cfg)),
        ("file", checked),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _kernels_line() -> str:
    """Which kernel path quantized models run here, and their activations' dtype."""
    from kvformer.runtime import native
    from kvformer.runtime.quant import act_dtype

    act = {"torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(str(act_dtype()))
    if not native.available(build_if_missing=False):
        return f"torch ops (native kernels not built: run `kvformer build`); activations {act}"
    import torch

    return (f"{native.kernel_path()}; activations {act} ({native.activations()} into int4); "
            f"{torch.get_num_threads()} threads ({native.threads()})")


def cmd_build(args) -> int:
    from kvformer.runtime import native

    try:
        path = native.build(force=args.force)
    except native.NativeBuildError as exc:
        print(f"kvformer build: {exc}", file=sys.stderr)
        return 1
    print(f"kvformer: native kernels in {path}")
    print(f"kvformer: {_kernels_line()}")
    return 0


def cmd_kv_size(args) -> int:
    from kvformer.formats.load import load_config
    from kvformer.tools.pictures import DTYPE_NAMES, format_kv_table, kv_size_rows, plot_kv_sizes

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
    from kvformer.tools.pictures import plot_attention, record_attention, token_labels

    name = _model_arg(args)
    model, tok = load_model(args, name, dtype="fp32")
    if tok is None:
        raise KvformerError(f"{name}: no tokenizer found beside the model")
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
    from kvformer.tools import explain

    set_threads(args)
    return explain.run(args.topic, args.output, args.model)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "models": cmd_models,
            "kv-size": cmd_kv_size, "attention": cmd_attention, "explain": cmd_explain,
            "build": cmd_build}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A verb that loads a model says so at once: importing torch alone takes a second or two.
    args.status = StatusLine(enabled=hasattr(args, "model") and hasattr(args, "quiet")
                             and not args.quiet)
    args.status.show("starting (importing torch)")
    try:
        return (COMMANDS.get(args.verb) or args.func)(args)
    except KeyboardInterrupt:
        args.status.clear()
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (KvformerError, ValueError, OSError) as exc:
        if os.environ.get("KVFORMER_DEBUG"):
            raise
        message = " ".join(str(exc).split())
        args.status.clear()
        print(f"kvformer: error: {message}", file=sys.stderr)
        return 2
    finally:
        args.status.clear()


if __name__ == "__main__":
    sys.exit(main())
