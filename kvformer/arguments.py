"""Command-line arguments shared by several verbs (``kvformer``'s own and ``kvformer serve``,
which registers itself from ``kvformer.serve.cli``). A module of its own so that the verb
modules import it, never ``kvformer.cli``, which imports them."""

from __future__ import annotations

import argparse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --dtype and --kv-dtype, as every verb that loads a model takes them."""
    p.add_argument("--model", "-m", default="default",
                   help="a .gguf file, a model directory, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "fp32", "bf16", "fp16", "int8", "int4"],
                   help="weights: auto (default: int4 for a 4-bit GGUF, else int8 — the fastest "
                        "that keeps quality), fp32 (exact), bf16, fp16, int8, int4")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "fp32", "bf16", "int8", "int4"],
                   help="KV cache: auto (default: the activations' dtype), fp32, bf16, int8 "
                        "(a scale per token and head: half of bf16's bytes, perplexity within "
                        "1 %%), int4 (a scale pair per 32 numbers; costs quality: see "
                        "docs/how-it-decodes.md)")
