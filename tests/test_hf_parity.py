"""Hugging Face checkpoints: kvformer must compute the logits transformers computes.

Tiny random models are built by ``transformers`` from configs (nothing is downloaded),
saved with ``save_pretrained(..., safe_serialization=True)`` and loaded by
``kvformer.formats.hf``; prefill and cached decode logits are compared in fp32.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from kvformer import (  # noqa: E402
    CheckpointError,
    ModelNotFoundError,
    Transformer,
    UnsupportedArchitectureError,
)
from kvformer.formats.hf.config import SUPPORTED_ARCHITECTURES, config_from_hf  # noqa: E402
from kvformer.formats.hf.tensors import (  # noqa: E402
    iter_hf_tensors,
    load_hf_dir,
    model_from_hf_dir,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB, MAX_POS, BATCH, PREFILL, DECODE = 211, 128, 2, 6, 8
ATOL = 1e-4

LLAMA_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_POS,
                  rms_norm_eps=1e-5, attn_implementation="eager")

# name -> (config class, kwargs, model class, expected kvformer fields, warns about sliding?)
CASES: dict[str, tuple[str, dict, str, dict, bool]] = {
    "llama_gqa": ("LlamaConfig", dict(LLAMA_BASE, num_key_value_heads=2, rope_theta=500.0,
                                      tie_word_embeddings=True),
                  "LlamaForCausalLM", dict(n_kv_head=2, tie_embeddings=True, rope_theta=500.0),
                  False),
    "llama_mqa": ("LlamaConfig", dict(LLAMA_BASE, num_key_value_heads=1, rope_theta=1000.0),
                  "LlamaForCausalLM", dict(n_kv_head=1, tie_embeddings=False), False),
    "llama_untied": ("LlamaConfig", dict(LLAMA_BASE, num_key_value_heads=4,
                                         tie_word_embeddings=False),
                     "LlamaForCausalLM", dict(n_kv_head=4, tie_embeddings=False,
                                              rope_theta=10000.0), False),
    "llama_head_dim": ("LlamaConfig", dict(LLAMA_BASE, num_key_value_heads=2, head_dim=32,
                                           rope_theta=300.0),
                       "LlamaForCausalLM", dict(head_dim=32), False),
    "llama_attn_bias": ("LlamaConfig", dict(LLAMA_BASE, num_key_value_heads=2,
                                            attention_bias=True, mlp_bias=False),
                        "LlamaForCausalLM", dict(bias=True, qkv_bias=True), False),
    "llama_mlp_bias": ("LlamaConfig", dict(LLAMA_BASE, num_key_value_heads=2,
                                           attention_bias=False, mlp_bias=True),
                       "LlamaForCausalLM", dict(bias=True, qkv_bias=False), False),
    "mistral": ("MistralConfig", dict(LLAMA_BASE, num_key_value_heads=2, sliding_window=None,
                                      rope_theta=700.0),
                "MistralForCausalLM", dict(n_kv_head=2, max_seq_len=MAX_POS), False),
    # a window shorter than the sequence: the oldest keys drop out of it
    "mistral_window": ("MistralConfig", dict(LLAMA_BASE, num_key_value_heads=2,
                                             sliding_window=5),
                       "MistralForCausalLM", dict(max_seq_len=MAX_POS, sliding_window=5), False),
    "qwen2": ("Qwen2Config", dict(LLAMA_BASE, num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_theta=900.0),
              "Qwen2ForCausalLM", dict(qkv_bias=True, bias=False, tie_embeddings=True), False),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4,
                                n_positions=MAX_POS, layer_norm_epsilon=1e-5,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                attn_implementation="eager"),
             "GPT2LMHeadModel", dict(pos="learned", norm="layernorm", mlp="gelu", bias=True,
                                     tie_embeddings=True, max_seq_len=MAX_POS), False),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one thread is faster than several fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (norm weights != 1, biases != 0) so a wrong mapping,
    a missed transpose or a dropped bias shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = any(k in name for k in ("norm", "ln_"))
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def _build_hf(case: str, seed: int = 0):
    cfg_cls, kwargs, model_cls, _, _ = CASES[case]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs))
    _randomize(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Every case built once and saved; (directory, transformers model)."""
    out = {}
    root = tmp_path_factory.mktemp("hf")
    for i, case in enumerate(CASES):
        model = _build_hf(case, seed=i)
        model.save_pretrained(root / case, safe_serialization=True)
        out[case] = (root / case, model)
    return out


def _load(path: Path, warns: bool = False) -> Transformer:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = model_from_hf_dir(path)
    sliding = [w for w in caught if "sliding-window" in str(w.message)]
    assert bool(sliding) == warns, [str(w.message) for w in caught]
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_cached_decode_match_transformers(case, saved):
    path, hf = saved[case]
    expect_fields, warns = CASES[case][3], CASES[case][4]
    model = _load(path, warns)
    for key, value in expect_fields.items():
        assert getattr(model.cfg, key) == value, key
    assert not model.training

    g = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, VOCAB, (BATCH, PREFILL + DECODE), generator=g)
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits  # causal: position t sees tokens 0..t
        assert ref.std() > 0.3  # logits large enough that 1e-4 is a meaningful tolerance

        full = model(tokens)
        torch.testing.assert_close(full, ref, atol=ATOL, rtol=0)

        cache = model.new_cache(BATCH, PREFILL + DECODE)
        pre = model(tokens[:, :PREFILL], cache=cache)
        torch.testing.assert_close(pre, ref[:, :PREFILL], atol=ATOL, rtol=0)
        for step in range(PREFILL, PREFILL + DECODE):
            out = model(tokens[:, step:step + 1], cache=cache)
            torch.testing.assert_close(out[:, 0], ref[:, step], atol=ATOL, rtol=0)
        assert cache.length == PREFILL + DECODE


def test_transformers_cached_decode_agrees(saved):
    """transformers' own cached decode, fed the same tokens, agrees with kvformer's."""
    path, hf = saved["qwen2"]
    model = _load(path)
    # transformers 5 renamed past_key_values to cache (argument and output)
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    tokens = torch.randint(0, VOCAB, (BATCH, PREFILL + 3),
                           generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model.new_cache(BATCH, PREFILL + 3)
        out = hf(input_ids=tokens[:, :PREFILL], use_cache=True)
        torch.testing.assert_close(model(tokens[:, :PREFILL], cache=cache), out.logits,
                                   atol=ATOL, rtol=0)
        for step in range(PREFILL, PREFILL + 3):
            out = hf(input_ids=tokens[:, step:step + 1], use_cache=True,
                     **{key: getattr(out, key)})
            torch.testing.assert_close(model(tokens[:, step:step + 1], cache=cache),
                                       out.logits, atol=ATOL, rtol=0)


def test_sharded_checkpoint_loads_identically(saved, tmp_path):
    path, hf = saved["llama_untied"]
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    cfg_a, sd_a = load_hf_dir(path)
    cfg_b, sd_b = load_hf_dir(tmp_path)
    assert cfg_a == cfg_b
    assert sd_a.keys() == sd_b.keys()
    for name in sd_a:
        assert torch.equal(sd_a[name], sd_b[name]), name


def test_iter_hf_tensors_streams_kvformer_names(saved):
    path, _ = saved["gpt2"]
    cfg, sd = load_hf_dir(path)
    it = iter_hf_tensors(path, cfg)
    assert isinstance(it, Iterator)
    name, tensor = next(it)  # one tensor, without reading the rest
    assert name in sd and torch.equal(tensor, sd[name])
    names = [name] + [n for n, _ in it]
    assert sorted(names) == sorted(Transformer(cfg).state_dict())
    assert "lm_head.weight" not in names  # tied: the head is the embedding


def test_gpt2_conv1d_transposed_and_c_attn_split(saved):
    path, hf = saved["gpt2"]
    _, sd = load_hf_dir(path)
    c_attn = hf.transformer.h[1].attn.c_attn
    d = hf.config.n_embd
    torch.testing.assert_close(sd["layers.1.attn.wk.weight"], c_attn.weight[:, d:2 * d].T)
    torch.testing.assert_close(sd["layers.1.attn.wv.bias"], c_attn.bias[2 * d:])
    torch.testing.assert_close(sd["layers.1.mlp.w_up.weight"],
                               hf.transformer.h[1].mlp.c_fc.weight.T)
    assert all(t.is_contiguous() for t in sd.values())


def test_bf16_load(saved):
    path, _ = saved["llama_gqa"]
    cfg, sd = load_hf_dir(path, dtype=torch.bfloat16)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    model = model_from_hf_dir(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ref = model_from_hf_dir(path)
    tokens = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).float(), ref(tokens), atol=0.15, rtol=0.05)


def test_model_has_no_meta_or_random_leftovers(saved):
    path, _ = saved["llama_gqa"]
    model = model_from_hf_dir(path)
    _, sd = load_hf_dir(path)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert not t.is_meta, name
    for name, t in model.state_dict().items():
        assert torch.equal(t, sd[name]), name
    fresh = Transformer(model.cfg)  # the rotary tables rebuilt on load equal a fresh model's
    n = min(model.rotary.cos.shape[0], fresh.rotary.cos.shape[0])
    torch.testing.assert_close(model.rotary.cos[:n], fresh.rotary.cos[:n])


# --------------------------------------------------------------------------- old layouts
def _rewrite(path: Path, edit) -> None:
    """Rewrite model.safetensors in path with edit(dict of tensors) -> dict."""
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), str(file), metadata={"format": "pt"})


def test_old_gpt2_layout_without_prefix_and_with_mask_buffers(saved, tmp_path):
    path, _ = saved["gpt2"]
    old = tmp_path / "gpt2-old"
    shutil.copytree(path, old)

    def edit(tensors):
        out = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        for i in range(3):
            out[f"h.{i}.attn.bias"] = torch.tril(torch.ones(MAX_POS, MAX_POS)).view(
                1, 1, MAX_POS, MAX_POS)
            out[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        return out

    _rewrite(old, edit)
    _, sd_new = load_hf_dir(path)
    _, sd_old = load_hf_dir(old)
    assert sd_new.keys() == sd_old.keys()
    assert all(torch.equal(sd_new[k], sd_old[k]) for k in sd_new)


def test_rotary_inv_freq_and_redundant_tied_head_are_skipped(saved, tmp_path):
    path, _ = saved["llama_gqa"]
    other = tmp_path / "llama"
    shutil.copytree(path, other)

    def edit(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["model.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        return tensors

    _rewrite(other, edit)
    _, sd_a = load_hf_dir(path)
    _, sd_b = load_hf_dir(other)
    assert sd_a.keys() == sd_b.keys()


# --------------------------------------------------------------------------- config.json
def _llama_dict(**changes):
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 128}
    base.update(changes)
    return base


def test_rope_theta_from_transformers5_and_transformers4_layouts():
    v5 = _llama_dict(rope_parameters={"rope_theta": 123.0, "rope_type": "default"})
    assert config_from_hf(v5).rope_theta == 123.0
    v4 = _llama_dict(rope_theta=500000.0, rope_scaling=None)
    assert config_from_hf(v4).rope_theta == 500000.0
    assert config_from_hf(_llama_dict()).rope_theta == 10000.0
    cfg = config_from_hf(_llama_dict(rms_norm_eps=1e-5, tie_word_embeddings=True, head_dim=32))
    assert (cfg.norm_eps, cfg.tie_embeddings, cfg.head_dim) == (1e-5, True, 32)
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_ff) == (64, 2, 4, 2, 96)


@pytest.mark.parametrize("rope, scaling", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}},
     {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}),
    # YaRN's attention factor defaults to 0.1 ln(factor) + 1, beta to 32 / 1
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                          "original_max_position_embeddings": 32}},
     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
      "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 0.1 * math.log(4.0) + 1,
      "truncate": True}),
    ({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     {"type": "linear", "factor": 2.0}),
    # dynamic NTK grows the base past max_position_embeddings (transformers' threshold)
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 128}),
])
def test_rope_scaling_is_read_as_data(rope, scaling):
    cfg = config_from_hf(_llama_dict(**rope))
    assert cfg.rope_scaling == pytest.approx(scaling)
    assert cfg.max_seq_len == (256 if scaling["type"] == "dynamic" else 128)


@pytest.mark.parametrize("rope, words", [
    ({"rope_scaling": {"rope_type": "mrope", "factor": 2.0}}, ["'mrope'", "linear"]),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     ["llama3", "low_freq_factor"]),
    ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor"]),
])
def test_unknown_or_incomplete_rope_is_refused(rope, words):
    with pytest.raises((UnsupportedArchitectureError, CheckpointError)) as info:
        config_from_hf(_llama_dict(**rope))
    assert all(w in str(info.value) for w in words), str(info.value)


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as info:
        config_from_hf({"architectures": ["FalconForCausalLM"], "model_type": "falcon"},
                       path="/models/falcon")
    msg = str(info.value)
    assert "FalconForCausalLM" in msg and "/models/falcon" in msg
    assert all(name in msg for name in SUPPORTED_ARCHITECTURES)


def test_model_type_fallback_and_old_gpt2_config():
    # the config.json of the original gpt2 upload: no tie_word_embeddings key
    cfg = config_from_hf({"model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
                          "n_layer": 12, "n_positions": 1024, "vocab_size": 50257,
                          "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5})
    assert cfg == config_from_hf({"architectures": ["GPT2LMHeadModel"]})  # the defaults
    assert (cfg.pos, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_embeddings) == (
        "learned", "layernorm", "gelu", True, True)
    assert (cfg.max_seq_len, cfg.d_ff) == (1024, 3072)


@pytest.mark.parametrize("change", [{"activation_function": "gelu"},
                                    {"scale_attn_by_inverse_layer_idx": True},
                                    {"scale_attn_weights": False}])
def test_gpt2_variants_refused(change):
    with pytest.raises(UnsupportedArchitectureError):
        config_from_hf({"architectures": ["GPT2LMHeadModel"], **change})


def test_sliding_windows():
    mistral = {"architectures": ["MistralForCausalLM"], "hidden_size": 64,
               "num_key_value_heads": 2, "num_hidden_layers": 2, "num_attention_heads": 4,
               "vocab_size": 100, "max_position_embeddings": 4096}

    def window(config):
        cfg = config_from_hf(config)
        assert cfg.max_seq_len == 4096  # the context is never capped at the window
        return cfg.sliding_window, cfg.sliding_layers

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert window({**mistral, "sliding_window": None}) == (None, None)
        assert window({**mistral, "sliding_window": 512}) == (512, None)  # every layer
        assert window(mistral) == (4096, None)  # transformers' default for Mistral
        qwen = {**mistral, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 32}
        assert window({**qwen, "use_sliding_window": False}) == (None, None)
        assert window({**qwen, "use_sliding_window": True, "max_window_layers": 2}) == \
            (None, None)  # layers from max_window_layers on: none of 2
        assert window({**qwen, "use_sliding_window": True, "max_window_layers": 1}) == \
            (32, (1,))
        assert window({**qwen, "use_sliding_window": True, "layer_types": [
            "full_attention", "full_attention"]}) == (None, None)


def test_llama_bias_flags_and_bad_shape_config():
    assert config_from_hf(_llama_dict(attention_bias=True, mlp_bias=True)).bias is True
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act"):
        config_from_hf(_llama_dict(hidden_act="gelu"))
    with pytest.raises(CheckpointError, match="cannot build"):
        config_from_hf(_llama_dict(num_key_value_heads=3), path="/m")
    with pytest.raises(CheckpointError, match="cannot build"):
        config_from_hf(_llama_dict(hidden_size=None))


# --------------------------------------------------------------------------- error cases
@pytest.fixture
def llama_dir(saved, tmp_path) -> Path:
    path = tmp_path / "llama"
    shutil.copytree(saved["llama_untied"][0], path)
    return path


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_hf_dir(tmp_path / "nope")
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="directory"):
        load_hf_dir(tmp_path / "file.safetensors")
    with pytest.raises(ModelNotFoundError) as info:
        load_hf_dir(tmp_path)
    assert "config.json" in str(info.value) and str(tmp_path) in str(info.value)


def test_invalid_config_json(llama_dir):
    (llama_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(CheckpointError, match="not valid JSON") as info:
        load_hf_dir(llama_dir)
    assert str(llama_dir / "config.json") in str(info.value)


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_weights_refused(llama_dir, filename):
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / filename).write_bytes(b"never unpickled")
    with pytest.raises(CheckpointError) as info:
        load_hf_dir(llama_dir)
    msg = str(info.value)
    assert filename in msg and "arbitrary code" in msg and "safe_serialization=True" in msg
    assert str(llama_dir) in msg


def test_no_weights_at_all(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_dir(llama_dir)


def test_missing_tensor(llama_dir):
    _rewrite(llama_dir, lambda t: {k: v for k, v in t.items()
                                   if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError) as info:
        load_hf_dir(llama_dir)
    msg = str(info.value)
    assert "layers.1.mlp.w_up.weight" in msg and "model.layers.1.mlp.up_proj.weight" in msg


def test_untied_checkpoint_without_head_is_incomplete(llama_dir):
    _rewrite(llama_dir, lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        model_from_hf_dir(llama_dir)


def test_wrong_shape(llama_dir):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
        return t

    _rewrite(llama_dir, edit)
    with pytest.raises(CheckpointError) as info:
        load_hf_dir(llama_dir)
    msg = str(info.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "layers.0.attn.wk.weight" in msg
    assert "[32, 64]" in msg and "[64, 64]" in msg


def test_unexpected_tensor(llama_dir):
    def edit(t):
        t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
        return t

    _rewrite(llama_dir, edit)
    with pytest.raises(CheckpointError, match="q_norm"):
        load_hf_dir(llama_dir)


def test_tensor_for_a_layer_past_n_layer(llama_dir):
    def edit(t):
        t["model.layers.7.input_layernorm.weight"] = torch.ones(64)
        return t

    _rewrite(llama_dir, edit)
    with pytest.raises(CheckpointError, match="layers.7.attn_norm.weight"):
        load_hf_dir(llama_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(llama_dir, damage):
    file = llama_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not safetensors" * 9,
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError) as info:
        model_from_hf_dir(llama_dir)
    assert str(file) in str(info.value) and "corrupt" in str(info.value)


@pytest.fixture
def sharded_dir(saved, tmp_path) -> Path:
    saved["llama_untied"][1].save_pretrained(tmp_path, safe_serialization=True,
                                             max_shard_size="50KB")
    return tmp_path


def test_index_listing_a_missing_shard(sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded_dir / shard).unlink()
    with pytest.raises(CheckpointError) as info:
        load_hf_dir(sharded_dir)
    assert shard in str(info.value) and "missing" in str(info.value)


def test_bad_index(sharded_dir):
    file = sharded_dir / "model.safetensors.index.json"
    index = json.loads(file.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere.safetensors"
    file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name"):
        load_hf_dir(sharded_dir)
    file.write_text("{ nope")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_hf_dir(sharded_dir)


def test_unsupported_architecture_in_directory(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        model_from_hf_dir(llama_dir)
