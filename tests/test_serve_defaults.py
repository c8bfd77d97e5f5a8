"""`kvformer serve --max-tokens` (the server's default and ceiling for max_tokens) and the
sampling settings the chat page starts from (the model's own, else llama.cpp's), on a tiny
random model and the byte tokenizer; the sampling settings a model's files recommend."""

import json

import httpx
import pytest
import torch

from kvformer import ModelConfig, Transformer
from kvformer.formats import sampling_defaults
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer
from kvformer.serve.app import BackgroundServer, create_app
from kvformer.serve.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layer=1, n_head=2, n_kv_head=1,
                      max_seq_len=64)
    return Transformer(cfg).eval()


def test_max_tokens_is_the_default_and_the_ceiling(model):
    engine = Engine(model, ByteTokenizer(), max_batch=2, kv_blocks=16, block_size=8,
                    max_tokens=10)
    ids = list(range(1, 21))  # 20 prompt tokens, 44 left in the context of 64
    assert engine.check_prompt(ids, None) == 10  # the default
    assert engine.check_prompt(ids, 500) == 10  # the ceiling (not a 400)
    assert engine.check_prompt(ids, 3) == 3
    assert engine.check_prompt(list(range(1, 60)), None) == 5  # the rest of the context
    free = Engine(model, ByteTokenizer(), max_batch=2, kv_blocks=16, block_size=8)
    assert free.check_prompt(ids, None) == 44  # without it: the rest of the context
    with pytest.raises(ValueError, match="max_tokens"):
        Engine(model, ByteTokenizer(), max_tokens=0)


def test_serve_ctx_size_bounds_every_request_below_the_models_context(model):
    """`kvformer serve -c 32` on a model of 64: a request is sized and refused against 32,
    and /v1/models says so; more than the model's context is no more than the model's."""
    engine = Engine(model, ByteTokenizer(), max_batch=2, kv_blocks=16, block_size=8,
                    max_seq_len=32)
    assert engine.max_seq_len == 32
    assert engine.check_prompt(list(range(1, 21)), None) == 12  # 32 - 20
    srv = BackgroundServer(create_app(engine, "tiny")).start()
    try:
        listed = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]
        over = httpx.post(srv.url + "/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": list(range(1, 21)), "max_tokens": 13})
    finally:
        srv.stop()
    assert listed["max_model_len"] == 32
    assert over.status_code == 400 and "32" in over.json()["error"]["message"]
    assert Engine(model, ByteTokenizer(), kv_blocks=16, block_size=8,
                  max_seq_len=1000).max_seq_len == 64
    with pytest.raises(ValueError, match="max_seq_len"):
        Engine(model, ByteTokenizer(), max_seq_len=0)


def test_a_request_gets_at_most_max_tokens_and_the_page_its_defaults(model):
    engine = Engine(model, ByteTokenizer(), max_batch=2, kv_blocks=16, block_size=8,
                    max_tokens=4)
    model.sampling_defaults = {"temperature": 0.3}  # as a model's files would say
    srv = BackgroundServer(create_app(engine, "tiny")).start()
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0, "max_tokens": 50}
        answer = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).json()
        assert answer["usage"]["completion_tokens"] <= 4
        assert answer["choices"][0]["finish_reason"] in ("length", "stop")
        status = httpx.get(srv.url + "/status", timeout=30).json()
    finally:
        srv.stop()
        del model.sampling_defaults
    assert status["max_tokens"] == 4
    assert status["sampling"] == {**sampling_defaults.FALLBACK, "temperature": 0.3}


def test_a_models_own_sampling_settings(tmp_path):
    assert sampling_defaults.from_gguf({"general.sampling.temp": 0.6,
                                        "general.sampling.top_k": 20,
                                        "general.sampling.top_p": 0.95,
                                        "general.name": "x"}) == {
        "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "do_sample": True, "temperature": 0.7, "repetition_penalty": 1.05,
         "top_p": 2}))  # a top_p kvformer cannot use keeps the fallback's
    assert sampling_defaults.from_hf_dir(tmp_path) == {"temperature": 0.7,
                                                       "repeat_penalty": 1.05}
    assert sampling_defaults.resolve(sampling_defaults.from_hf_dir(tmp_path)) == {
        "temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.05}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert sampling_defaults.from_hf_dir(tmp_path) == {"temperature": 0.0}
    assert sampling_defaults.from_hf_dir(tmp_path / "none") == {}
    assert sampling_defaults.resolve({}) == {"temperature": 0.8, "top_k": 40, "top_p": 0.95,
                                             "min_p": 0.05, "repeat_penalty": 1.1}
