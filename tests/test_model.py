import itertools

import pytest
import torch

from kvformer import ModelConfig, Transformer

KINDS = {"MHA": 4, "GQA": 2, "MQA": 1}


@pytest.mark.parametrize("kind, pos, norm", list(itertools.product(
    KINDS, ["learned", "sinusoidal", "rope"], ["layernorm", "rmsnorm"])))
def test_cached_decode_equals_full_forward(kind, pos, norm):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layer=2, n_head=4, n_kv_head=KINDS[kind],
                      pos=pos, norm=norm, max_seq_len=32,
                      mlp="gelu" if norm == "layernorm" else "swiglu",
                      bias=norm == "layernorm")
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 16)
        steps = [model(tokens[:, :4], cache=cache)]
        for t in range(4, 11):
            steps.append(model(tokens[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 11


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_attention_impls_agree_in_the_model(impl):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=48, n_layer=2, n_head=6, n_kv_head=2)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 40, (3, 9))
    with torch.no_grad():
        ref = model.set_attention("reference")(tokens)
        out = model.set_attention(impl)(tokens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_batchnorm_model_caches_in_eval():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=30, d_model=32, n_layer=2, n_head=4, norm="batchnorm")
    model = Transformer(cfg)
    model(torch.randint(0, 30, (4, 8)))  # a training-mode pass moves the running stats
    model.eval()
    tokens = torch.randint(0, 30, (1, 6))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(1, 6)
        steps = [model(tokens[:, :2], cache=cache)] + [
            model(tokens[:, t:t + 1], cache=cache) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_causality_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, d_model=32, n_layer=2, n_head=4)).eval()
    a = torch.randint(0, 30, (1, 8))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 1) % 30
    with torch.no_grad():
        torch.testing.assert_close(model(a)[:, :5], model(b)[:, :5])


def test_left_padding_with_key_mask_matches_unpadded():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, d_model=32, n_layer=2, n_head=4,
                                    n_kv_head=2)).eval()
    tokens = torch.randint(1, 30, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], 1)
    mask = torch.tensor([[False] * 3 + [True] * 5])
    pos = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        ref = model(tokens)
        out = model(padded, input_pos=pos, key_mask=mask)
    torch.testing.assert_close(out[:, 3:], ref, atol=1e-5, rtol=1e-5)
