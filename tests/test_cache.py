import pytest
import torch

from kvformer import ContextOverflowError, ModelConfig, Transformer


def make(n_kv_head):
    cfg = ModelConfig(vocab_size=32, d_model=64, n_layer=3, n_head=8, n_kv_head=n_kv_head)
    return cfg, Transformer(cfg)


@pytest.mark.parametrize("n_kv_head", [8, 2, 1])
def test_cache_layout_and_bytes(n_kv_head):
    cfg, model = make(n_kv_head)
    cache = model.new_cache(batch_size=3, max_len=40)
    assert len(cache.k) == len(cache.v) == cfg.n_layer
    assert cache.k[0].shape == (3, n_kv_head, 40, cfg.head_dim)
    assert cache.nbytes == cfg.kv_cache_bytes(40, 3, torch.float32)
    assert model.new_cache(1, 40, torch.bfloat16).nbytes == cfg.kv_cache_bytes(40, 1,
                                                                               torch.bfloat16)


def test_gqa_and_mqa_savings_are_real():
    mha = make(8)[1].new_cache(2, 50).nbytes
    gqa = make(2)[1].new_cache(2, 50).nbytes
    mqa = make(1)[1].new_cache(2, 50).nbytes
    assert gqa * 8 == mha * 2  # n_kv_head / n_head
    assert mqa * 8 == mha  # 1 / n_head


def test_overflow_raises_with_numbers_and_never_wraps():
    _, model = make(2)
    cache = model.new_cache(1, 6)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    before = [k.clone() for k in cache.k]
    with pytest.raises(ContextOverflowError) as err:
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert "4 cached + 3 new" in str(err.value) and "max_len=6" in str(err.value)
    assert cache.length == 4
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k))  # nothing was written


def test_cache_holds_exactly_the_projected_keys():
    cfg, model = make(2)
    model.eval()
    x = torch.randint(0, 32, (1, 5))
    cache = model.new_cache(1, 8)
    model(x, cache=cache)
    layer0 = model.layers[0]
    h = layer0.attn_norm(model.tok_emb(x))
    k = layer0.attn.wk(h).view(1, 5, 2, cfg.head_dim).transpose(1, 2)
    cos, sin = model.rotary.cos_sin(torch.arange(5))
    from kvformer.model.positions import apply_rotary
    torch.testing.assert_close(cache.k[0][:, :, :5], apply_rotary(k, cos, sin))
    assert torch.all(cache.k[0][:, :, 5:] == 0)
