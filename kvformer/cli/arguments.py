"""Command-line flags shared by several verbs, each defined once: light (argparse and os
alone), as ``kvformer.cli.flags``, which defines every verb's flags with them.

``COMMON_FLAGS`` defines each flag that the verbs loading a model share, once, with the
names llama.cpp uses; a verb picks the ones that mean something for it with ``add_flags``.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def physical_cores() -> int:
    """CPU cores this process may run on, a core's hyper-threads counted once: the thread
    count that is fastest for matrix work (a second thread on a core only competes)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:  # no topology (some containers): every CPU is a core
            return max(1, len(cpus))
    return max(1, len(cores))


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        hint = ("; -t is now --threads, as in llama.cpp: use --temp for the temperature"
                if text.replace(".", "", 1).isdigit() else "")
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of threads"
                                         + hint) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} thread{'' if n == 1 else 's'}: give 1 or more")
    return n


def at_least(low: int, off: int | None = None):
    """A whole number >= low; with ``off``, that number means None (the setting is off)."""
    def parse(text: str) -> int | None:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is below {low}")
        return None if n == off else n
    parse.__name__ = "integer"
    return parse


def number(low: float, high: float = math.inf, *, above: bool = False):
    """A number in [low, high] (above: low itself excluded)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if math.isnan(x) or x < low or (above and x == low) or x > high:
            span = (f"{'above' if above else 'at least'} {low:g}" if high == math.inf else
                    f"in {'(' if above else '['}{low:g}, {high:g}]")
            raise argparse.ArgumentTypeError(f"{text} is not {span}")
        return x
    parse.__name__ = "number"
    return parse


class _Conversation(argparse.Action):
    """llama-cli's -cnv (conversation mode): in kvformer that is a verb of its own."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="llama.cpp's conversation mode: that is `kvformer chat` "
                              "(generate says so)")

    def __call__(self, parser, namespace, values, option_string=None):
        if parser.prog.endswith(" generate"):
            parser.error(f"{option_string}: a conversation is `kvformer chat` (it takes the "
                         "same flags)")


COMMON_FLAGS: dict[str, tuple[tuple[str, ...], dict]] = {
    "model": (("-m", "--model"), dict(
        default="default", metavar="MODEL",
        help="a .gguf file, a model directory, a name that `kvformer models` lists, or "
             "'default' (SmolLM2-135M-Instruct)")),
    "dtype": (("--dtype",), dict(
        default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8", "int4"],
        help="weights: auto (default: a GGUF's matrices as the file stores them, Q4_K, "
             "Q6_K, Q8_0, ... each on its own kernel; int8 for other checkpoints), fp32 "
             "(exact), bf16, fp16, int8 or int4 (re-quantized)")),
    "kv_dtype": (("--kv-dtype",), dict(
        default="auto", choices=["auto", "fp32", "bf16", "int8", "int4"],
        help="KV cache: auto (default: the activations' dtype), fp32, bf16, int8 (a scale "
             "per token and head: half of bf16's bytes, perplexity within 1 %%), int4 (a "
             "scale pair per 32 numbers; costs quality: see docs/kv-cache.md)")),
    "activations": (("--activations",), dict(
        default=None, choices=["int16", "int8"],
        help="how activations enter the int4 kernels: int16 (default: two int8 levels, "
             "finer than bf16) or int8 (one level, as llama.cpp does: +0.4-0.9 %% perplexity on "
             "SmolLM2, ~20 %% faster matmuls for a batch of rows, e.g. a busy server)")),
    "threads": (("-t", "--threads"), dict(
        type=_threads, default=None, metavar="N",
        help="torch threads (default: the physical cores this process may use)")),
    "ctx_size": (("-c", "--ctx-size"), dict(
        type=at_least(0), default=None, metavar="TOKENS",
        help="context size in tokens: the KV cache's length (default and 0: the "
             "model's)")),
    "max_new_tokens": (("-n", "--max-new-tokens", "--n-predict"), dict(
        type=at_least(-1, off=-1), metavar="N",
        help="most tokens per answer; -1: until the end of the text or of the context")),
    "temperature": (("--temp", "--temperature"), dict(
        type=number(0), dest="temperature", metavar="T",
        help="sampling temperature; 0: greedy, always the likeliest token")),
    "top_k": (("--top-k",), dict(type=at_least(0), metavar="K",
                                 help="sample from the K likeliest tokens only; 0: off")),
    "top_p": (("--top-p",), dict(type=number(0, 1, above=True), metavar="P",
                                 help="sample from the likeliest tokens whose probabilities "
                                      "add up to P; 1: off")),
    "min_p": (("--min-p",), dict(type=number(0, 1), metavar="P",
                                 help="drop the tokens less likely than P times the likeliest "
                                      "one; 0: off")),
    "repeat_penalty": (("--repeat-penalty",), dict(
        type=number(0, above=True), metavar="X",
        help="make the tokens of the last 64 less likely (llama.cpp's: a logit is divided by "
             "X, or multiplied when negative); 1: off")),
    "seed": (("-s", "--seed"), dict(type=int, default=None, help="random seed for sampling")),
    "system": (("-sys", "--system-prompt", "--system"), dict(
        default=None, dest="system", metavar="TEXT", help="the system message")),
    "n_gpu_layers": (("-ngl", "--n-gpu-layers", "--gpu-layers"), dict(
        type=int, default=None, metavar="N",
        help="accepted for llama.cpp's command lines: kvformer runs on the CPU (a note "
             "says so)")),
    "conversation": (("-cnv", "--conversation"), dict(action=_Conversation)),
    "quiet": (("-q", "--quiet"), dict(
        action="store_true",
        help="no status line on stderr while the model loads (and no banner in chat)")),
}
OFF = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}  # the flag values that turn a filter off


def sampling_kwargs(settings: dict) -> dict:
    """Sampling settings as the flags take them, for the runtime: an "off" value is None."""
    return {name: None if name in OFF and value == OFF[name] else value
            for name, value in settings.items()}


SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
            "seed")
# generate's defaults: greedy, nothing filtered (a continuation to compare, as the Python API);
# chat's are the model's own or FALLBACK's (kvformer.formats.sampling_defaults)
GREEDY = {"temperature": 0.0, "top_k": None, "top_p": None, "min_p": None,
          "repeat_penalty": 1.0}
FALLBACK_HELP = {"temperature": "0.8", "top_k": "40", "top_p": "0.95", "min_p": "0.05",
                 "repeat_penalty": "1.1"}


def add_flags(p: argparse.ArgumentParser, *names: str, max_new_tokens: int = 128,
              ctx_size: int | None = None, model_sampling: bool = False) -> None:
    """Add the named common flags to a verb's parser, with the verb's defaults for the
    answer length and the context (None: the model's; a larger one is capped to it). With
    ``model_sampling`` the sampling flags default to None: the model's own settings, else
    llama.cpp's (the verb resolves them once the model is loaded)."""
    for name in names:
        flags, options = COMMON_FLAGS[name]
        options = dict(options)
        if name == "max_new_tokens":
            options["default"] = max_new_tokens
            options["help"] += f" (default {max_new_tokens})"
        if name in GREEDY:
            if model_sampling:
                options["default"] = None
                options["help"] += (f" (default: the model's own setting, else "
                                    f"{FALLBACK_HELP[name]})")
            else:
                options["default"] = GREEDY[name]
                options["help"] += {"temperature": " (default 0)"}.get(name, " (default off)")
        if name == "ctx_size" and ctx_size is not None:
            options["help"] = (f"context size in tokens: the KV cache's length (default "
                               f"{ctx_size}, or the model's if smaller; 0: the model's)")
            p.set_defaults(ctx_default=ctx_size)
        p.add_argument(*flags, **options)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """-m/--model, --dtype, --kv-dtype, --activations, -t/--threads and -ngl (a note), as
    every verb that loads a model takes them."""
    add_flags(p, "model", "dtype", "kv_dtype", "activations", "threads", "n_gpu_layers")

