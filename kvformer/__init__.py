"""kvformer: a decoder-only transformer engine you can read, run, serve and train.

The names below are imported on first use (PEP 562), so that `import kvformer` — and the
`kvformer` command, which shows its status line before anything else — does not wait for
torch until something needs it.
"""

import os
import sys
from importlib import import_module

from kvformer.errors import (
    ChatTemplateError,
    CheckpointError,
    ContextOverflowError,
    KvformerError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)

# What the OpenMP settings below were before kvformer touched them (None: unset), so that
# `kvformer bench` can run its reference engines as they run without kvformer.
_OMP_ENV_BEFORE = {name: os.environ.get(name) for name in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
if "torch" not in sys.modules and os.environ.get("KVFORMER_THREADS", "").lower() != "openmp":
    # Read once, when torch loads OpenMP: its threads then spin ~20,000 times (tens of
    # microseconds) at a barrier before they sleep, instead of libgomp's ~300,000, so that
    # between torch's ops they leave the cores to the native decode step's own threads,
    # which then run (runtime/csrc/threads.h, "sharing work"). A value set before is kept.
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    os.environ.setdefault("KMP_BLOCKTIME", "0")  # the same for LLVM's OpenMP (macOS)

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "attention_weights": "kvformer.model.attention",
    "scaled_dot_product_attention": "kvformer.model.attention",
    "KVCache": "kvformer.kv.cache", "ModelConfig": "kvformer.config",
    "generate": "kvformer.runtime.generation", "generate_stream": "kvformer.runtime.generation",
    "perplexity": "kvformer.runtime.generation",
    "load": "kvformer.formats.load", "save": "kvformer.formats.native",
    "Transformer": "kvformer.model.transformer",
    "BatchNorm": "kvformer.model.norms", "LayerNorm": "kvformer.model.norms",
    "RMSNorm": "kvformer.model.norms", "sample": "kvformer.runtime.sampling",
    "ByteTokenizer": "kvformer.formats.tokenizer.tokenizer",
    "Tokenizer": "kvformer.formats.tokenizer.tokenizer",
}

_RENAMED = {"save": "save_model"}

__all__ = [
    "BatchNorm", "ByteTokenizer", "ChatTemplateError", "CheckpointError",
    "ContextOverflowError", "KVCache",
    "KvformerError", "LayerNorm", "ModelConfig", "ModelNotFoundError", "RMSNorm",
    "Tokenizer", "Transformer", "UnsupportedArchitectureError", "attention_weights",
    "generate", "generate_stream", "load", "perplexity", "sample", "save",
    "scaled_dot_product_attention",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), _RENAMED.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
