"""The API fuzzed from its own published schema: schemathesis generates requests (valid
and invalid by the schema) for every operation of /openapi.json; hypothesis adds bodies that
are any JSON at all; and numbers, nesting and text at their extremes. Every answer is a 2xx
or a 4xx that conforms to the schema (OpenAI's error shape), never a 5xx, and the server
keeps answering."""

import json

import httpx
import pytest
import torch

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kvformer import ModelConfig, Transformer  # noqa: E402
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer  # noqa: E402
from kvformer.serve.app import BODIES, ERROR_SCHEMA, BackgroundServer, create_app  # noqa: E402
from kvformer.serve.engine import Engine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
JSON = {"Content-Type": "application/json"}
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def tiny_app():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=258, d_model=32, n_layer=1, n_head=2, n_kv_head=1,
                      max_seq_len=64)
    engine = Engine(Transformer(cfg).eval(), ByteTokenizer(["<|im_start|>", "<|im_end|>"]),
                    max_batch=8, kv_blocks=64, block_size=8)
    return create_app(engine, "tiny")


APP = tiny_app()  # its engine starts with the server below
schema = schemathesis.openapi.from_dict(APP.openapi())


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(APP) as srv:
        yield srv


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_schemathesis(case, server):
    """Generated from the published schema: never a 5xx; statuses, content types and bodies
    as the schema says."""
    if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
        case.body["max_tokens"] = max(-1, min(case.body["max_tokens"], 8))  # keep it quick
    case.call_and_validate(base_url=server.url, checks=[not_a_server_error, status_code_conformance,
                                   content_type_conformance, response_schema_conformance])


# the streams whose events are named, and the type of their last event
NAMED_EVENTS = {"/v1/messages": ("message_stop",),
                "/v1/responses": ("response.completed", "response.incomplete")}


def check(srv, path, content):
    r = httpx.post(srv.url + path, content=content, headers=JSON, timeout=120)
    assert r.status_code < 500, (path, content[:300], r.status_code, r.text[:300])
    if r.status_code >= 400:
        body = r.json()
        err = body["error"]
        if path == "/v1/messages":  # Anthropic's shape
            assert body["type"] == "error" and set(err) == {"type", "message"}, body
        else:
            assert set(err) == set(ERROR_SCHEMA["properties"]["error"]["required"]), body
        assert isinstance(err["message"], str) and err["message"], body
    elif "text/event-stream" in r.headers.get("content-type", ""):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        if path in NAMED_EVENTS:  # event: <type> lines, and no [DONE]
            assert events and json.loads(events[-1])["type"] in NAMED_EVENTS[path], r.text
        else:
            assert events and events[-1] == "[DONE]", r.text[-300:]
            events.pop()
        for e in events:
            json.loads(e)
    else:
        assert isinstance(r.json(), dict)
    return r


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@pytest.mark.parametrize("path", list(BODIES))
def test_any_json_gets_a_4xx_or_a_2xx(server, path):
    fields = {"/v1/completions": "prompt", "/v1/chat/completions": "messages",
              "/tokenize": "prompt", "/detokenize": "tokens", "/v1/embeddings": "input",
              "/v1/responses": "input", "/v1/messages": "messages"}

    @FUZZ
    @given(ANY_JSON, st.dictionaries(st.sampled_from(
        ["temperature", "top_p", "top_k", "max_tokens", "n", "seed", "stop", "logit_bias",
         "min_p", "logprobs", "top_logprobs", "presence_penalty", "repetition_penalty",
         "stream", "messages", "prompt", "tokens", "model", "input", "system", "tools",
         "tool_choice", "instructions", "text", "encoding_format", "dimensions",
         "max_output_tokens", "previous_response_id"]), ANY_JSON, max_size=4))
    def run(value, extra):
        body = {fields[path]: value, **extra}
        for key in ("max_tokens", "max_output_tokens"):
            if isinstance(body.get(key), int):
                body[key] = min(body[key], 8)
        check(server, path, json.dumps(body))

    run()


EXTREMES = [
    {"messages": [{"role": "user", "content": "hi"}], "top_p": 1e-300},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-300},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 5e-324, "top_k": 1},
    {"messages": [{"role": "user", "content": "hi"}], "top_k": 2**70},
    {"messages": [{"role": "user", "content": "hi"}], "seed": 2**70},
    {"messages": [{"role": "user", "content": "hi"}], "seed": -(2**70)},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2**70},
    {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e-300},
    {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e300},
    {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"9" * 40: 1}},
    {"messages": [{"role": "user", "content": "hi"}], "min_p": 1, "temperature": 2},
    {"messages": [{"role": "user", "content": "\ud800"}]},
    {"messages": [{"role": "user", "content": "\U0010ffff\x00\u200b" * 50}]},
    {"messages": [{"role": "user", "content": "hi"}], "stop": ["\ud800"]},
    {"prompt": "\udfff"},
    {"prompt": [2**70]},
    {"prompt": [-1]},
    {"tokens": [2**70]},
    {"tokens": [-(2**63)]},
]


@pytest.mark.parametrize("body", EXTREMES, ids=range(len(EXTREMES)))
def test_extreme_values_get_2xx_or_4xx(server, body):
    path = ("/v1/chat/completions" if "messages" in body else
            "/detokenize" if "tokens" in body else "/v1/completions")
    body = {**body, "max_tokens": body.get("max_tokens", 4)}
    if path == "/detokenize":
        body.pop("max_tokens")
    check(server, path, json.dumps(body))


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_deep_nesting_and_broken_bytes_get_400(server, depth):
    for path in BODIES:
        r = check(server, path, '{"messages": ' + "[" * depth + "]" * depth + "}")
        assert r.status_code in (400, 422)
    for raw in (b"\xff\xfe{", b'{"prompt": "a"', b"", b"NaN", b"[1, 2]"):
        r = check(server, "/v1/completions", raw)
        assert r.status_code == 400
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


HI = [{"role": "user", "content": "hi"}]
# keys that str.isdigit() or int() half-accept: superscripts, other scripts' digits,
# mathematical digits, circled numbers, fractions, signs, underscores, spaces
DIGIT_LIKE = ["²", "١٢", "𝟙", "⑴", "½", "-1", "+1", " 1", "1_0", "0x10", "1e3", "٣" * 40,
              "", "1.0", "\u0661\u0030"]


@pytest.mark.parametrize("key", DIGIT_LIKE, ids=range(len(DIGIT_LIKE)))
def test_digit_like_logit_bias_keys(server, key):
    """A logit_bias key that is not plain ASCII digits of an id in the vocabulary is a 400
    that names logit_bias (`{"²": 1}` was a 500: isdigit() said yes, int() said no)."""
    for path, field in (("/v1/chat/completions", {"messages": HI}),
                        ("/v1/completions", {"prompt": "hi"})):
        r = check(server, path, json.dumps({**field, "logit_bias": {key: 1}, "max_tokens": 2}))
        if not (key.isascii() and key.strip().lstrip("+-").isdigit()):
            assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text


def _deep(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [100, 2000, 100_000])
def test_deep_json_inside_strings(server, depth):
    """JSON nested thousands deep inside a string: an earlier tool call's arguments (a
    RecursionError once), a tool's description, a message's content and a stop string."""
    call = {"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": _deep(depth)}}
    tools = [{"type": "function", "function": {"name": "f", "description": _deep(depth),
                                               "parameters": {"type": "object"}}}]
    bodies = [
        {"messages": [{"role": "user", "content": "x"},
                      {"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "c1", "content": _deep(depth)}]},
        {"messages": HI, "tools": tools},
        {"messages": [{"role": "user", "content": _deep(depth)}]},
        {"messages": HI, "stop": [_deep(min(depth, 10))]},
    ]
    for body in bodies:
        check(server, "/v1/chat/completions", json.dumps({**body, "max_tokens": 2}))
    check(server, "/tokenize", json.dumps(bodies[0]))
    check(server, "/tokenize", json.dumps({"messages": bodies[0]["messages"][:2]}))


SCHEMAS = [
    {"$ref": "#"},
    {"properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}, "required": ["a"]},
    {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
    {"$ref": "#/$defs/missing"},
    {"$ref": "http://example.com/schema.json"},
    {"allOf": [{"type": "string"}, {"type": "integer"}]},
    {"type": "string", "minLength": 5, "maxLength": 2},
    {"type": "integer", "minimum": 5, "maximum": 1},
    {"enum": []},
    {"not": {}},
    False,
    {"type": "array", "minItems": 10**9},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
    {"type": "object", "required": ["a"], "additionalProperties": False},
    {"type": "string", "pattern": "(a*)*b"},
    {"type": "string", "pattern": "["},
    {"anyOf": []},
    {"type": ["null", "object"], "properties": {"next": {"$ref": "#"}},
     "required": ["next"]},
    {"type": "object", "properties": {"a": _deep(50)}},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_unsatisfiable_and_self_referential_schemas(server, schema):
    """response_format json_schema that refers to itself, can match nothing, or is broken:
    a 400 naming response_format or an answer with a clean finish_reason, never a 500."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    for path, field in (("/v1/chat/completions", {"messages": HI}),
                        ("/v1/completions", {"prompt": "hi"})):
        r = check(server, path, json.dumps({**field, "response_format": fmt,
                                            "max_tokens": 4}))
        if r.status_code >= 400:
            assert r.json()["error"]["param"] in ("response_format", None), r.text
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
