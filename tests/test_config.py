import pytest
import torch

from kvformer import ModelConfig


def test_defaults_fill_derived_fields():
    cfg = ModelConfig(d_model=96, n_head=6)
    assert cfg.n_kv_head == 6 and cfg.head_dim == 16 and cfg.d_ff == 384
    assert cfg.attention_kind == "MHA" and cfg.group_size == 1


@pytest.mark.parametrize("kw, words", [
    (dict(d_model=576, n_head=9, n_kv_head=4), ["n_head=9", "n_kv_head=4"]),
    (dict(n_head=4, n_kv_head=8), ["n_kv_head=8", "n_head=4"]),
    (dict(norm="groupnorm"), ["groupnorm", "layernorm"]),
    (dict(pos="alibi"), ["alibi", "rope"]),
    (dict(mlp="relu"), ["relu", "swiglu"]),
    (dict(d_model=0), ["d_model=0"]),
    (dict(head_dim=7, pos="rope"), ["head_dim=7", "even"]),
])
def test_invalid_combinations_name_the_numbers(kw, words):
    with pytest.raises(ValueError) as err:
        ModelConfig(**kw)
    for word in words:
        assert word in str(err.value)


def test_presets_shapes():
    assert set(ModelConfig.presets()) >= {"tiny", "gpt2", "smollm2-135m", "llama-2-7b",
                                          "llama-2-70b"}
    smol = ModelConfig.preset("smollm2-135m")
    assert (smol.n_layer, smol.n_head, smol.n_kv_head, smol.head_dim) == (30, 9, 3, 64)
    assert smol.attention_kind == "GQA" and smol.group_size == 3
    big = ModelConfig.preset("llama-2-70b")
    assert big.n_head == 64 and big.n_kv_head == 8 and big.n_kv_head == big.n_head // 8
    assert ModelConfig.preset("llama-2-7b").attention_kind == "MHA"
    # Published parameter counts, from the shapes alone.
    assert smol.num_params() == 134_515_008
    assert ModelConfig.preset("gpt2").num_params() == 124_439_808
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("gpt5")


def test_num_params_matches_built_model():
    from kvformer import Transformer
    for kw in (dict(), dict(norm="layernorm", bias=True, mlp="gelu", pos="learned",
                            tie_embeddings=True), dict(qkv_bias=True, n_kv_head=1)):
        cfg = ModelConfig(vocab_size=50, d_model=32, n_head=4, **kw)
        model = Transformer(cfg)
        assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_kv_cache_bytes_closed_form():
    cfg = ModelConfig.preset("llama-2-70b")
    # 2 * n_layer * n_kv_head * head_dim * seq * batch * bytes
    assert cfg.kv_cache_bytes(4096, 2, torch.float16) == 2 * 80 * 8 * 128 * 4096 * 2 * 2
    mha = cfg.replace(n_kv_head=64)
    mqa = cfg.replace(n_kv_head=1)
    assert mha.kv_cache_bytes(100) == 8 * cfg.kv_cache_bytes(100)
    assert mha.kv_cache_bytes(100) == 64 * mqa.kv_cache_bytes(100)


def test_dict_round_trip_and_unknown_fields():
    cfg = ModelConfig.preset("tiny")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_heads": 3})
