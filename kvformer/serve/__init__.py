"""An OpenAI-compatible server: continuous batching over a paged KV cache.

``kvformer serve --model M`` runs it; ``create_app(Engine(model, tokenizer))`` builds the
same FastAPI app in-process. The web layer (FastAPI) needs ``pip install kvformer[serve]``;
the engine and the paged cache need only torch.
"""

from .engine import Engine, Output, SamplingParams
from .paged import BlockPool, OutOfBlocksError, PagedBatch

__all__ = ["BlockPool", "Engine", "OutOfBlocksError", "Output", "PagedBatch", "SamplingParams",
           "create_app"]


def create_app(*args, **kwargs):
    """``kvformer.serve.app.create_app`` (imported lazily: it needs FastAPI)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
