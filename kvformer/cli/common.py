"""What the verbs that run a model share: threads, the native kernels built under the status
line, the model loaded, the context size checked, the kernel path described."""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path

import torch

from kvformer.cli.arguments import physical_cores
from kvformer.cli.status import StatusLine, plural
from kvformer.errors import KvformerError
from kvformer.formats.catalog import display_name
from kvformer.formats.load import load, resolve
from kvformer.runtime import native
from kvformer.runtime.quant import act_dtype
from kvformer.runtime.speculative import SpecStats, check_vocab


def set_threads(args) -> None:
    torch.set_num_threads(args.threads or physical_cores())


def apply_activations(args) -> None:
    """--activations for the int4 kernels (without the native kernels there are none: torch's
    int4 matmul takes the activations as they are)."""
    if getattr(args, "activations", None) and native.available(build_if_missing=False):
        native.activations(args.activations)


def _build_native(status: StatusLine, quiet: bool) -> None:
    """Build the native kernels now if this machine has none, under the status line (the
    build would otherwise happen inside loading, with its own message)."""
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
    name = name or args.model
    quiet = getattr(args, "quiet", False)
    status = getattr(args, "status", None) or StatusLine(enabled=not quiet)
    status.show("starting (importing torch)")
    if getattr(args, "n_gpu_layers", None) is not None and not quiet:
        print("note: -ngl/--n-gpu-layers is taken for llama.cpp's command lines; kvformer "
              "runs on the CPU", file=sys.stderr)
    began = time.perf_counter()
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
    model.load_s = time.perf_counter() - began  # for --stats: kernels found, weights read
    model.display_name = (display_name(model.source) if name == "default" or
                          Path(name).exists() else name)
    if getattr(model, "requantized", None) and not quiet:
        print(f"note: --dtype {model.mode} re-quantizes the file's "
              f"{', '.join(model.requantized)} blocks (--dtype auto runs them as stored)",
              file=sys.stderr)
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
        raise KvformerError(f"-c/--ctx-size {args.ctx_size} is more than the model's context of "
                            f"{most} tokens; give at most {most} (or 0 for all of it)")
    return args.ctx_size


def model_arg(args) -> str:
    """The model of a verb that takes it as a positional argument or with -m."""
    if args.model_arg is not None and args.model != "default" and args.model_arg != args.model:
        raise KvformerError(f"two models given ({args.model_arg!r} and -m {args.model!r}); "
                            "give one")
    return args.model_arg if args.model_arg is not None else args.model


def kernels_line() -> str:
    """Which kernel path quantized models run here, and their activations' dtype."""
    act = {"torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(str(act_dtype()))
    if not native.available(build_if_missing=False):
        return f"torch ops (native kernels not built: run `kvformer build`); activations {act}"
    return (f"{native.kernel_path()}; activations {act} ({native.activations()} into int4); "
            f"{plural(torch.get_num_threads(), 'thread')} ({native.threads()})")


def speculative_options(args, model, tok):
    """(method or None, draft model or None, SpecStats) from --spec / --draft-model."""
    spec = getattr(args, "spec", None) or ("draft" if getattr(args, "draft_model", None)
                                           else None)
    if spec is None:
        return None, None, None
    draft = None
    if spec == "draft":
        if not args.draft_model:
            raise KvformerError("--spec draft needs a draft model: --draft-model M (-md M)")
        draft, draft_tok = load_model(args, name=args.draft_model, dtype=args.draft_dtype)
        check_vocab(model, draft, tok, draft_tok)
    return spec, draft, SpecStats()
