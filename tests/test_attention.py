import math

import pytest
import torch

from kvformer import attention_weights, scaled_dot_product_attention
from kvformer.model.attention import fused_attention


def loop_attention(q, k, v, causal=True):
    """An explicit loop over batch, head, query and key: the formula with no tensor tricks."""
    b, h_q, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    group = h_q // h_kv
    out = torch.zeros(b, h_q, t_q, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(h_q):
            kh = h // group
            for i in range(t_q):
                pos = t_k - t_q + i  # queries follow the cached positions
                scores = []
                for j in range(t_k):
                    if causal and j > pos:
                        scores.append(-math.inf)
                    else:
                        s = sum(float(q[bi, h, i, c]) * float(k[bi, kh, j, c]) for c in range(d))
                        scores.append(s / math.sqrt(d))
                m = max(scores)
                e = [math.exp(s - m) for s in scores]
                z = sum(e)
                for j in range(t_k):
                    out[bi, h, i] += (e[j] / z) * v[bi, kh, j].double()
    return out.float()


KINDS = {"MHA": (4, 4), "GQA": (4, 2), "MQA": (4, 1)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t_q, t_k", [(5, 5), (2, 6), (1, 4)])
def test_formula_matches_loop_and_fused(kind, t_q, t_k):
    h_q, h_kv = KINDS[kind]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, h_q, t_q, 8, generator=g)
    k = torch.randn(2, h_kv, t_k, 8, generator=g)
    v = torch.randn(2, h_kv, t_k, 8, generator=g)
    ref = loop_attention(q, k, v)
    ours = scaled_dot_product_attention(q, k, v, causal=True)
    fused = fused_attention(q, k, v, causal=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)


def test_non_causal_and_explicit_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g) for _ in range(3))
    ref = loop_attention(q, k, v, causal=False)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, causal=False), ref,
                               atol=1e-5, rtol=1e-5)
    mask = torch.tensor([True, False, True])  # hide key 1 from everyone
    w = attention_weights(q, k, causal=False, mask=mask)
    assert torch.all(w[..., 1] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 3))
    torch.testing.assert_close(fused_attention(q, k, v, causal=False, mask=mask),
                               scaled_dot_product_attention(q, k, v, causal=False, mask=mask),
                               atol=1e-6, rtol=1e-6)


def test_gqa_does_not_copy_kv_and_matches_repeated_heads():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 6, 4, 8, generator=g)
    k = torch.randn(1, 2, 4, 8, generator=g)
    v = torch.randn(1, 2, 4, 8, generator=g)
    # Reference: the MHA computation on K/V repeated per query head (the copy GQA avoids).
    mha = scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v), mha)


def test_weights_are_the_scaled_softmax_by_hand():
    q = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])
    k = torch.tensor([[[[1.0, 1.0], [2.0, 0.0]]]])
    w = attention_weights(q, k, causal=True)
    # query 0 sees key 0 only; query 1: scores (2, 0) / sqrt(2)
    s = torch.tensor([2.0, 0.0]) / math.sqrt(2)
    expected = torch.tensor([[1.0, 0.0], (s.exp() / s.exp().sum()).tolist()])
    torch.testing.assert_close(w[0, 0], expected)
