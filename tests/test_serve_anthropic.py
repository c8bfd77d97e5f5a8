"""POST /v1/messages (Anthropic's Messages API), driven by the `anthropic` SDK against a live
server on a tiny random model with a Hermes-style chat template. The reference for each
answer is /v1/chat/completions given the same conversation written by hand in OpenAI's
form: the same greedy tokens must come back, in Anthropic's blocks and events."""

import json

import httpx
import openai
import pytest
import torch
from helpers import needs_default

from kvformer import ModelConfig, Transformer
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer
from kvformer.serve.app import BackgroundServer, create_app
from kvformer.serve.engine import Engine

anthropic = pytest.importorskip("anthropic")

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "tiny"
KEY = "secret"
# the SDK has no sampling arguments any more; the API still takes temperature (default 1)
GREEDY = {"temperature": 0}

TEMPLATE = """{%- if tools %}<|im_start|>system
Functions:
{%- for t in tools %}
{{ t | tojson }}
{%- endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>
{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}
</tool_call>
{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "additionalProperties": False,
                            "properties": {"city": {"type": "string", "maxLength": 8}},
                            "required": ["city"]}}


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=258, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=1024)
    model = Transformer(cfg).eval()
    tok = ByteTokenizer(["<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>",
                        chat_template=TEMPLATE)
    engine = Engine(model, tok, max_batch=4, kv_blocks=256, block_size=8)
    srv = BackgroundServer(create_app(engine, MODEL, api_key=KEY)).start()
    srv.engine = engine
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def reference(oai, messages, **kw):
    return oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


def test_create_matches_chat_completions(client, oai):
    msg = client.messages.create(
        model=MODEL, max_tokens=12, extra_body=GREEDY, system="Be brief.",
        messages=[{"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
                  {"role": "user", "content": [{"type": "text", "text": "How "},
                                               {"type": "text", "text": "are you?"}]}])
    ref = reference(oai, [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hello"},
                          {"role": "assistant", "content": "Hi."},
                          {"role": "user", "content": "How are you?"}], max_tokens=12)
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == ref.choices[0].message.content
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None
    u = msg.usage
    assert u.output_tokens == 12
    assert u.input_tokens + u.cache_read_input_tokens == ref.usage.prompt_tokens


def test_system_blocks_and_stream_events(client, oai):
    kw = dict(model=MODEL, max_tokens=10, extra_body=GREEDY,
              system=[{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
              messages=[{"role": "user", "content": "Stream me"}])
    with client.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    ref = reference(oai, [{"role": "system", "content": "One.\nTwo."},
                          {"role": "user", "content": "Stream me"}], max_tokens=10)
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[1] == "content_block_start" and "message_delta" in kinds
    assert kinds.index("content_block_stop") < kinds.index("message_delta")
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert "".join(deltas) == final.content[0].text == ref.choices[0].message.content
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 10
    assert events[0].message.usage.input_tokens == ref.usage.prompt_tokens
    plain = client.messages.create(**kw)
    assert plain.content[0].text == final.content[0].text


def test_stop_sequence_is_reported(client, oai):
    base = dict(model=MODEL, extra_body=GREEDY, messages=[{"role": "user", "content": "Go"}])
    text = client.messages.create(max_tokens=20, **base).content[0].text
    cut = next(i for i in range(3, len(text)) if text[i:i + 2].strip())  # a visible pair
    stop = text[cut:cut + 2]
    msg = client.messages.create(max_tokens=20, stop_sequences=["\u00a7never", stop], **base)
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert msg.content[0].text == text[:text.index(stop)]
    with client.messages.stream(max_tokens=20, stop_sequences=[stop], **base) as s:
        final = s.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


def test_end_turn(server, client, oai):
    base = dict(model=MODEL, extra_body=GREEDY, messages=[{"role": "user", "content": "End"}])
    ref = reference(oai, base["messages"], max_tokens=6, logprobs=True)
    ids = [t.bytes[0] for t in ref.choices[0].logprobs.content]  # byte tokens: id = byte
    engine = server.engine
    before = engine.stop_ids
    engine.stop_ids = before | {ids[3]}  # this model's 4th token ends its turn now
    try:
        msg = client.messages.create(max_tokens=6, **base)
    finally:
        engine.stop_ids = before
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.output_tokens == 3
    assert msg.content[0].text == bytes(ids[:3]).decode("utf-8", "replace")


def test_tool_round_trip(client, oai):
    first = client.messages.create(
        model=MODEL, max_tokens=200, extra_body=GREEDY, tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert first.stop_reason == "tool_use"
    call = first.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.id.startswith("toolu_") and isinstance(call.input["city"], str)
    assert len(call.input["city"]) <= 8
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": [b.model_dump() for b in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": "18 C, sunny"}]}]
    second = client.messages.create(model=MODEL, max_tokens=8, extra_body=GREEDY, tools=[WEATHER],
                                    tool_choice={"type": "none"}, messages=history)
    ref = reference(oai, [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps(call.input)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}],
        max_tokens=8)
    assert second.content[0].text == ref.choices[0].message.content
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens \
        == ref.usage.prompt_tokens
    # streamed: the call as a tool_use block whose input_json_delta is its JSON
    with client.messages.stream(model=MODEL, max_tokens=200, extra_body=GREEDY, tools=[WEATHER],
                                tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "Weather in Paris?"}]
                                ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts[-1] == "tool_use" and final.stop_reason == "tool_use"
    assert final.content[-1].input == call.input


def test_output_format_json_schema(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                             "ok": {"type": "boolean"}}, "required": ["n", "ok"]}
    msg = client.messages.create(model=MODEL, max_tokens=200, extra_body=GREEDY,
                                 output_config={"format": {"type": "json_schema",
                                                           "schema": schema}},
                                 messages=[{"role": "user", "content": "JSON please"}])
    assert msg.stop_reason == "end_turn"
    jsonschema.validate(json.loads(msg.content[0].text), schema)


def test_errors_have_anthropics_shape(server, client):
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    body = info.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0]" in body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-x", max_tokens=5,
                               messages=[{"role": "user", "content": "x"}])
    bad_key = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        bad_key.messages.create(model=MODEL, max_tokens=5,
                                messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 422 and r.json()["type"] == "error"  # max_tokens is required
    # x-api-key is honoured on the OpenAI routes too, like a Bearer token
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401


@needs_default
def test_default_model_tool_round_trip_ends_its_turn():
    """SmolLM2-135M-Instruct through the anthropic SDK: a forced get_weather call for
    Paris, its result back, and a text answer that ends with the model's own end of turn."""
    from kvformer import load

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load("default", progress=False)
    finally:
        torch.set_num_threads(before)
    weather = {"name": "get_weather", "description": "Get the current weather in a city",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                "required": ["city"]}}
    ask = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    with BackgroundServer(create_app(Engine(model, tok, max_batch=2), "default")) as srv:
        client = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0)
        first = client.messages.create(model="default", max_tokens=60, messages=ask,
                                       tools=[weather], tool_choice={"type": "any"},
                                       extra_body=GREEDY)
        call = first.content[-1]
        assert (first.stop_reason, call.type, call.name, call.input) == \
            ("tool_use", "tool_use", "get_weather", {"city": "Paris"})
        history = ask + [
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                          "content": "21 C and sunny"}]}]
        final = client.messages.create(model="default", max_tokens=120, messages=history,
                                       tools=[weather], extra_body=GREEDY)
    assert final.stop_reason == "end_turn", final
    assert [b.type for b in final.content] == ["text"] and final.content[0].text.strip()
