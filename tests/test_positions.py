import math

import torch

from kvformer import ModelConfig, Transformer
from kvformer.model.positions import Rotary, apply_rotary, sinusoidal_table


def test_sinusoidal_equals_closed_form():
    d = 8
    table = sinusoidal_table(torch.arange(50), d)
    for p in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert math.isclose(table[p, 2 * i].item(), math.sin(angle), abs_tol=1e-5)
            assert math.isclose(table[p, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-5)


def test_sinusoidal_and_learned_are_added_to_embeddings():
    for pos in ("sinusoidal", "learned"):
        cfg = ModelConfig(vocab_size=11, d_model=8, n_head=2, n_layer=1, pos=pos)
        m = Transformer(cfg)
        seen = {}
        m.layers[0].attn_norm.register_forward_hook(
            lambda mod, a, o, seen=seen: seen.update(x=a[0]))
        tokens = torch.tensor([[3, 3, 3]])
        m(tokens)
        expected = m.tok_emb(tokens) + m.pos_emb(torch.arange(3))
        torch.testing.assert_close(seen["x"], expected)
        assert not torch.equal(seen["x"][0, 0], seen["x"][0, 1])  # same token, new position


def test_rope_score_depends_only_on_distance():
    head_dim = 16
    rot = Rotary(head_dim, 128, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, head_dim, generator=g)
    k = torch.randn(1, 1, 1, head_dim, generator=g)

    def score(pq, pk):
        cq, sq = rot.cos_sin(torch.tensor([pq]))
        ck, sk = rot.cos_sin(torch.tensor([pk]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    for dist in (0, 1, 5, 40):
        ref = score(dist, 0)
        for offset in (3, 17, 80):
            assert math.isclose(score(offset + dist, offset), ref, rel_tol=1e-4, abs_tol=1e-4)
    assert not math.isclose(score(5, 0), score(6, 0), rel_tol=1e-3)


def test_rope_preserves_norm_and_extends_past_table():
    rot = Rotary(8, 16, theta=10000.0)
    x = torch.randn(1, 1, 3, 8)
    c, s = rot.cos_sin(torch.tensor([2, 20, 100]))  # 20 and 100 are past the table
    y = apply_rotary(x, c, s)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    c2, s2 = rot._table(torch.tensor([2, 20, 100]))
    torch.testing.assert_close(c, c2)


def test_rope_table_grows_on_demand_and_equals_closed_form():
    rot = Rotary(8, 5000, theta=10000.0)
    assert rot.cos.shape[0] == Rotary.INITIAL  # not the whole context up front
    c, s = rot.cos_sin(torch.tensor([3, 700]))  # past the first table: it doubles
    assert rot.cos.shape[0] == 2 * Rotary.INITIAL
    for p, row_c, row_s in ((3, c[0], s[0]), (700, c[1], s[1])):
        for i in range(4):  # rotate-half layout: frequency i at columns i and i + 4
            angle = p / 10000 ** (2 * i / 8)
            for col in (i, i + 4):
                assert math.isclose(row_c[col].item(), math.cos(angle), abs_tol=1e-4)
                assert math.isclose(row_s[col].item(), math.sin(angle), abs_tol=1e-4)
    rot.ensure(4900)
    assert rot.cos.shape[0] == 4900
    rot.ensure(10**6)  # never past max_seq_len
    assert rot.cos.shape[0] == 5000
    full = Rotary(8, 5000, theta=10000.0)
    full.ensure(5000)
    assert torch.equal(rot.cos, full.cos) and torch.equal(rot.sin, full.sin)
    c, _ = rot.cos_sin(torch.tensor([6000]))  # past the context: computed afresh
    torch.testing.assert_close(c, rot._table(torch.tensor([6000]))[0])
