"""POST /v1/responses (OpenAI's Responses API), driven by the openai SDK
(``responses.create`` / ``responses.stream``) and the OpenAI Agents SDK against a live server
on a tiny random model with a Hermes-style chat template. The reference for each answer is
/v1/chat/completions given the same conversation written by hand in chat form."""

import json
from typing import Literal

import httpx
import openai
import pytest
import torch
from helpers import needs_default

from kvformer import ModelConfig, Transformer
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer
from kvformer.serve.app import BackgroundServer, create_app
from kvformer.serve.engine import Engine
from kvformer.serve.responses import Store

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "tiny"

TEMPLATE = """{%- if tools %}<|im_start|>system
Functions:
{%- for t in tools %}
{{ t | tojson }}
{%- endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{{ m.content }}{% for c in m.tool_calls %}<tool_call>
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

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "additionalProperties": False,
                          "properties": {"city": {"type": "string", "maxLength": 8}},
                          "required": ["city"]}}
AS_CHAT_TOOL = {"type": "function", "function": {
    k: v for k, v in WEATHER.items() if k != "type"}}
POINT = {"type": "object", "additionalProperties": False,
         "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                        "ok": {"type": "boolean"}}, "required": ["x", "ok"]}


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=258, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=1024)
    model = Transformer(cfg).eval()
    tok = ByteTokenizer(["<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>",
                        chat_template=TEMPLATE)
    engine = Engine(model, tok, max_batch=4, kv_blocks=256, block_size=8)
    srv = BackgroundServer(create_app(engine, MODEL)).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


def test_create_text_and_input_items_match_chat(client):
    res = client.responses.create(
        model=MODEL, instructions="Be brief.", temperature=0, max_output_tokens=12,
        input=[{"role": "user", "content": "Hello"},
               {"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "Hi."}]},
               {"role": "developer", "content": [{"type": "input_text", "text": "Rule."}]},
               {"role": "user", "content": [{"type": "input_text", "text": "How "},
                                            {"type": "input_text", "text": "are you?"}]}])
    ref = chat(client, [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hello"},
                        {"role": "assistant", "content": "Hi."},
                        {"role": "system", "content": "Rule."},
                        {"role": "user", "content": "How are you?"}], max_tokens=12)
    assert res.object == "response" and res.id.startswith("resp_") and res.model == MODEL
    assert [o.type for o in res.output] == ["message"]
    assert res.output_text == ref.choices[0].message.content
    assert res.status == "incomplete" and res.incomplete_details.reason == "max_output_tokens"
    assert (res.usage.input_tokens, res.usage.output_tokens, res.usage.total_tokens) == \
        (ref.usage.prompt_tokens, 12, ref.usage.prompt_tokens + 12)
    plain = client.responses.create(model=MODEL, input="Hello", temperature=0,
                                    max_output_tokens=5)
    assert plain.output_text == chat(client, [{"role": "user", "content": "Hello"}],
                                     max_tokens=5).choices[0].message.content


def test_stream_events(client):
    kw = dict(model=MODEL, input="Stream me", temperature=0, max_output_tokens=10)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    plain = client.responses.create(**kw)
    assert deltas == plain.output_text and deltas
    final = events[-1].response
    assert final.output[0].content[0].text == deltas and final.usage.output_tokens == 10
    assert final.id == events[0].response.id


def test_json_schema_format_create_stream_and_parse(client):
    fmt = {"format": {"type": "json_schema", "name": "point", "schema": POINT,
                      "strict": True}}
    res = client.responses.create(model=MODEL, input="A point", temperature=0, text=fmt,
                                  max_output_tokens=200)
    assert res.status == "completed"
    value = json.loads(res.output_text)
    assert set(value) == {"x", "ok"} and 0 <= value["x"] <= 9
    with client.responses.stream(model=MODEL, input="A point", temperature=0, text=fmt,
                                 max_output_tokens=200) as stream:
        final = stream.get_final_response()
    assert final.output_text == res.output_text and final.status == "completed"

    from pydantic import BaseModel, Field

    class Point(BaseModel):
        x: int = Field(ge=0, le=9)
        ok: bool

    parsed = client.responses.parse(model=MODEL, input="A point", temperature=0,
                                    text_format=Point, max_output_tokens=200)
    assert isinstance(parsed.output_parsed, Point)


def test_function_call_and_output_round_trip(client):
    first = client.responses.create(model=MODEL, input="Weather in Paris?", temperature=0,
                                    tools=[WEATHER], max_output_tokens=200,
                                    tool_choice={"type": "function", "name": "get_weather"})
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and first.status == "completed"
    call = calls[0]
    args = json.loads(call.arguments)
    assert call.name == "get_weather" and isinstance(args["city"], str)
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    # the call and its output sent back as items, or continued from the stored response
    items = [{"type": "function_call", "call_id": call.call_id, "name": call.name,
              "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}]
    full = client.responses.create(model=MODEL, temperature=0, tools=[WEATHER],
                                   tool_choice="none", max_output_tokens=8,
                                   input=[{"role": "user", "content": "Weather in Paris?"},
                                          *items])
    cont = client.responses.create(model=MODEL, temperature=0, tools=[WEATHER],
                                   tool_choice="none", max_output_tokens=8,
                                   previous_response_id=first.id, input=items[1:])
    ref = chat(client, [{"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"id": call.call_id, "type": "function", "function": {
                                "name": call.name, "arguments": call.arguments}}]},
                        {"role": "tool", "tool_call_id": call.call_id, "content": "18 C"}],
               tools=[AS_CHAT_TOOL], tool_choice="none", max_tokens=8)
    assert full.output_text == cont.output_text == ref.choices[0].message.content
    assert full.usage.input_tokens == cont.usage.input_tokens == ref.usage.prompt_tokens
    # streamed: the call's item and its argument events
    with client.responses.stream(model=MODEL, input="Weather in Paris?", temperature=0,
                                 tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=200) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(done[0].arguments) == args
    assert final.output[-1].type == "function_call" and final.output[-1].name == call.name


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model=MODEL, input="Remember 7", temperature=0,
                                    max_output_tokens=6, instructions="Sys.")
    second = client.responses.create(model=MODEL, input="And now?", temperature=0,
                                     max_output_tokens=6, previous_response_id=first.id)
    ref = chat(client, [{"role": "user", "content": "Remember 7"},
                        {"role": "assistant", "content": first.output_text},
                        {"role": "user", "content": "And now?"}], max_tokens=6)
    assert second.output_text == ref.choices[0].message.content  # instructions not carried
    assert second.previous_response_id == first.id
    unstored = client.responses.create(model=MODEL, input="x", store=False,
                                       max_output_tokens=2)
    for rid in (unstored.id, "resp_nope"):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=MODEL, input="y", previous_response_id=rid,
                                    max_output_tokens=2)
        assert info.value.body["param"] == "previous_response_id"


def test_store_is_bounded():
    store = Store(size=2)
    for i in range(3):
        store.put(f"r{i}", [{"role": "user", "content": str(i)}])
    store.get("r1")  # used: kept over r2
    store.put("r3", [])
    assert list(store.items) == ["r1", "r3"]


@pytest.mark.parametrize("body, param", [
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
     "input[0].content[0]"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
])
def test_bad_input_is_a_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/responses", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def weather_agent(url, model_name, **kw):
    """An Agents SDK agent with one function tool, on this server; the cities it was
    called with."""
    from agents import Agent, OpenAIResponsesModel, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    seen = []

    @function_tool
    def get_weather(city: Literal["Paris", "Oslo", "Rome"]) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"18 C in {city}"

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    agent = Agent(name="weather", instructions="Answer with the get_weather tool.",
                  tools=[get_weather], **kw,
                  model=OpenAIResponsesModel(model=model_name, openai_client=client))
    return agent, seen


def test_agents_sdk_runs_an_agent_with_a_tool(server):
    pytest.importorskip("agents")
    from agents import ModelSettings, Runner

    agent, seen = weather_agent(
        server.url, MODEL, tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(tool_choice="get_weather", temperature=0,
                                     max_tokens=120))
    result = Runner.run_sync(agent, "Weather in Paris?", max_turns=2)
    assert len(seen) == 1 and seen[0] in ("Paris", "Oslo", "Rome")
    assert [item.type for item in result.new_items] == ["tool_call_item",
                                                        "tool_call_output_item"]
    assert result.final_output == f"18 C in {seen[0]}"
    # streamed the same way (the SDK's default for Runner.run_streamed)
    agent, seen_streamed = weather_agent(
        server.url, MODEL, tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(tool_choice="get_weather", temperature=0,
                                     max_tokens=120))

    async def streamed():
        run = Runner.run_streamed(agent, "Weather in Paris?", max_turns=2)
        async for _ in run.stream_events():
            pass
        return run

    import asyncio

    run = asyncio.run(streamed())
    assert seen_streamed == seen and run.final_output == result.final_output


@needs_default
def test_agents_sdk_full_loop_with_the_default_model():
    """SmolLM2-135M-Instruct: the agent calls the tool (forced on the first turn), reads its
    output and answers in text on the second."""
    pytest.importorskip("agents")
    from agents import ModelSettings, Runner

    from kvformer import load

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load("default", progress=False)
    finally:
        torch.set_num_threads(before)
    engine = Engine(model, tokenizer, max_batch=2)
    with BackgroundServer(create_app(engine, "default")) as srv:
        agent, seen = weather_agent(
            srv.url, "default", reset_tool_choice=True,
            model_settings=ModelSettings(tool_choice="get_weather", temperature=0,
                                         max_tokens=80))
        result = Runner.run_sync(agent, "What's the weather like in Paris today?",
                                 max_turns=3)
    assert seen == ["Paris"]
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]
    assert isinstance(result.final_output, str) and result.final_output
