"""POST /v1/embeddings, driven by the openai client and langchain-openai against a live
server on a tiny random model; the reference vectors come from the model's own forward (the
final norm's output, caught by a hook) pooled here by hand."""

import base64

import httpx
import numpy as np
import openai
import pytest
import torch
from helpers import needs_default

from kvformer import ModelConfig, Transformer
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer
from kvformer.serve.app import BackgroundServer, create_app
from kvformer.serve.engine import Engine

MODEL = "tiny"
D_MODEL = 64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=D_MODEL, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=64)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def server(model, tok):
    engine = Engine(model, tok, max_batch=4, kv_blocks=64, block_size=8)
    srv = BackgroundServer(create_app(engine, MODEL, api_key="k")).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)


def reference(model, ids):
    """Mean of what the final norm gave inside ``model(tokens)``, scaled to length 1."""
    caught = []
    hook = model.norm.register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        hook.remove()
    h = caught[0][0].double().numpy()  # [T, d]
    mean = h.sum(axis=0) / len(ids)
    return mean / np.sqrt((mean * mean).sum())


def test_vectors_are_the_pooled_hidden_states(client, model, tok):
    texts = ["The quick brown fox", "hello", "a longer sentence about embeddings, here"]
    res = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in res.data] == [0, 1, 2] and res.model == MODEL
    n_tokens = 0
    for text, d in zip(texts, res.data):
        ids = tok.encode(text)
        n_tokens += len(ids)
        got = np.array(d.embedding)
        assert got.shape == (D_MODEL,)
        np.testing.assert_allclose(got, reference(model, ids), atol=2e-6)
    assert res.usage.prompt_tokens == res.usage.total_tokens == n_tokens


def test_batched_and_alone_are_identical_and_base64_is_the_same_floats(client, server):
    texts = ["one", "two two", "three three three", "one"]
    batch = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    for text, d in zip(texts, batch.data):
        alone = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
        assert alone.data[0].embedding == d.embedding  # the same bits
    assert batch.data[0].embedding == batch.data[3].embedding
    assert batch.data[0].embedding != batch.data[1].embedding
    # base64: the float32 bytes, little-endian (the SDK's default asks for it and decodes it)
    raw = httpx.post(server.url + "/v1/embeddings", headers={"Authorization": "Bearer k"},
                     json={"model": MODEL, "input": texts, "encoding_format": "base64"}).json()
    for item, d in zip(raw["data"], batch.data):
        vec = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        assert vec.tolist() == d.embedding
    default = client.embeddings.create(model=MODEL, input=texts)  # base64 on the wire
    assert [d.embedding for d in default.data] == [d.embedding for d in batch.data]


def test_token_id_inputs(client, model, tok):
    ids = tok.encode("token ids")
    one = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    many = client.embeddings.create(model=MODEL, input=[ids, ids[:3]],
                                    encoding_format="float")
    text = client.embeddings.create(model=MODEL, input="token ids", encoding_format="float")
    assert one.data[0].embedding == many.data[0].embedding == text.data[0].embedding
    np.testing.assert_allclose(many.data[1].embedding, reference(model, ids[:3]), atol=2e-6)
    assert one.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input[1]"),
    ({"input": [[1, 2], [300]]}, "input[1]"),
    ({"input": "y" * 200}, "input[0]"),  # past the 64-token context
])
def test_bad_input_is_a_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, **body},
                   headers={"Authorization": "Bearer k"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_dimensions_equal_to_the_width_and_the_key(server, client):
    res = client.embeddings.create(model=MODEL, input="x", dimensions=D_MODEL,
                                   encoding_format="float")
    assert len(res.data[0].embedding) == D_MODEL
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert r.status_code == 401


def test_langchain_openai_embeddings(server, client):
    pytest.importorskip("langchain_openai")
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(model=MODEL, base_url=server.url + "/v1", api_key="k",
                           check_embedding_ctx_length=False, max_retries=0)
    docs = ["first document", "second one"]
    got = emb.embed_documents(docs)
    query = emb.embed_query("first document")
    want = client.embeddings.create(model=MODEL, input=docs, encoding_format="float")
    np.testing.assert_allclose(got, [d.embedding for d in want.data], atol=1e-7)
    np.testing.assert_allclose(query, got[0], atol=1e-7)
    assert abs(np.linalg.norm(query) - 1) < 1e-5


def test_engine_call_runs_on_the_engine_thread(model, tok):
    import threading

    with Engine(model, tok, kv_blocks=8, block_size=8) as engine:
        where = engine.call(lambda: (threading.current_thread().name,
                                     torch.is_inference_mode_enabled())).result(10)
        failed = engine.call(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failed.result(10)
    assert where == ("kvformer-engine", True)


def test_too_many_waiting_embeddings_get_429(server, monkeypatch):
    from kvformer.serve import scheduler

    monkeypatch.setattr(scheduler, "MAX_JOBS", 0)
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "x"},
                   headers={"Authorization": "Bearer k"})
    assert r.status_code == 429 and "Retry-After" in r.headers
    monkeypatch.undo()
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "x"},
                   headers={"Authorization": "Bearer k"})
    assert r.status_code == 200


@needs_default
def test_default_model_embeddings():
    """SmolLM2-135M (its int4/int8 GGUF weights): the vectors are the forward's pooled
    hidden states, and two sentences about a cat are closer than one about markets."""
    from kvformer import load

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load("default", progress=False)
    finally:
        torch.set_num_threads(before)
    texts = ["The cat sat on the mat.", "A cat is sitting on a rug.",
             "Stock markets fell sharply today."]
    with BackgroundServer(create_app(Engine(model, tok, max_batch=2), "default")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        res = client.embeddings.create(model="default", input=texts)
    v = np.array([d.embedding for d in res.data])
    assert v.shape == (3, model.cfg.d_model)
    np.testing.assert_allclose(v[0], reference(model, tok.encode(texts[0])), atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]
