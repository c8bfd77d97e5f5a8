"""An OpenAI-compatible server: continuous batching over a paged KV cache.

``kvformer serve --model M`` runs it; ``create_app(Engine(model, tokenizer))`` builds the
same FastAPI app in-process. The web layer (FastAPI) needs ``pip install kvformer[serve]``;
the engine and the paged cache need only torch.
"""

from importlib import import_module

__all__ = ["BlockPool", "Engine", "OutOfBlocksError", "Output", "PagedBatch", "SamplingParams",
           "create_app"]
# imported on first use: `kvformer serve` registers its verb without loading torch or FastAPI
_LAZY = {"Engine": ".engine", "Output": ".engine", "SamplingParams": ".engine",
         "BlockPool": ".paged", "OutOfBlocksError": ".paged", "PagedBatch": ".paged",
         "create_app": ".app"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvformer.serve' has no attribute {name!r}")
