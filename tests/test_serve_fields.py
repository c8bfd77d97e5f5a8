"""Every field of a request is honoured or refused: n, the penalties, logit_bias, min_p,
max_completion_tokens, echo, labels; a field that would change the output and is not
honoured is a 400 naming it. And /tokenize, /detokenize. References are computed here,
from the model's plain forward and the formulas (or transformers' own logits processors)."""

import math

import httpx
import openai
import pytest
import torch

from kvformer import ModelConfig, Transformer, generate
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer
from kvformer.serve.app import BackgroundServer, create_app
from kvformer.serve.engine import Engine

MODEL = "tiny"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=256)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)  # confident, but not so much that penalties cannot move a choice
    return m


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def server(model, tok):
    srv = BackgroundServer(create_app(Engine(model, tok, max_batch=8, kv_blocks=256,
                                             block_size=8), MODEL)).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


@torch.inference_mode()
def reference(model, prompt, n, adjust):
    """Greedy tokens from the plain forward, each step's logits passed through
    ``adjust(logits [V], prompt, generated)`` first."""
    ids, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1].float()
        tok = int(adjust(logits, prompt, out).argmax())
        out.append(tok)
        ids.append(tok)
    return out


TOK = ByteTokenizer()


def completion_ids(client, tok, prompt, n, **extra):
    """The completion's text, and (to compare with token ids) a function that decodes."""
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                    extra_body={"ignore_eos": True, **extra.pop("body", {})},
                                    **extra)
    return Text(out.choices[0].text), out


class Text(str):
    """A completion's text, equal to the token ids that decode to it."""

    def __eq__(self, other):
        if isinstance(other, list):
            return str(self) == TOK.decode(other)
        return str.__eq__(self, other)

    __hash__ = str.__hash__


PROMPT = [ord(c) for c in "the cat sat on the mat and the cat sat"]


def test_presence_and_frequency_penalties_follow_openais_formula(client, model, tok):
    plain = reference(model, PROMPT, 16, lambda x, p, o: x)
    for presence, frequency in ((1.5, 0.0), (0.0, 1.2), (0.7, 0.9), (-0.5, -0.3)):
        def adjust(logits, prompt, out, pres=presence, freq=frequency):
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=256).float() \
                if out else torch.zeros(256)
            return logits - counts * freq - (counts > 0).float() * pres
        expected = reference(model, PROMPT, 16, adjust)
        got, _ = completion_ids(client, tok, PROMPT, 16, presence_penalty=presence,
                                frequency_penalty=frequency)
        assert got == expected, (presence, frequency)
    assert reference(model, PROMPT, 16, adjust) != plain  # the penalties changed the text


def test_repetition_penalty_matches_transformers_and_min_p_its_formula(client, model):
    from transformers import RepetitionPenaltyLogitsProcessor

    for penalty in (1.3, 2.0, 0.8):
        proc = RepetitionPenaltyLogitsProcessor(penalty)

        def adjust(logits, prompt, out, proc=proc):
            seen = torch.tensor([prompt + out])
            return proc(seen, logits[None])[0]
        expected = reference(model, PROMPT, 16, adjust)
        got, _ = completion_ids(client, None, PROMPT, 16, body={"repetition_penalty": penalty})
        assert got == expected, penalty
    # min_p keeps the tokens whose probability (after temperature) is at least min_p times
    # the best one's; log-probabilities are reported before temperature, so at T=1 every
    # sampled token is within log(min_p) of the best; and min_p=1 is greedy
    out = openai_sample(client, 0.3)
    for lp in out.choices[0].logprobs.content:
        top = max(t.logprob for t in lp.top_logprobs)
        assert lp.logprob >= top + math.log(0.3) - 1e-4
    unrestricted = openai_sample(client, None).choices[0].logprobs.content
    assert any(lp.logprob < max(t.logprob for t in lp.top_logprobs) + math.log(0.3)
               for lp in unrestricted)  # without min_p, such tokens do get drawn
    greedy = reference(model, PROMPT, 12, lambda x, p, o: x)
    sampled = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                        temperature=1.5, seed=3,
                                        extra_body={"min_p": 1.0, "ignore_eos": True})
    assert Text(sampled.choices[0].text) == greedy


def openai_sample(client, min_p):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "sample"}], max_tokens=24,
        temperature=1.0, seed=11, logprobs=True, top_logprobs=5,
        extra_body={"min_p": min_p, "ignore_eos": True})


def test_logit_bias(client, model):
    greedy = reference(model, PROMPT, 6, lambda x, p, o: x)
    got, _ = completion_ids(client, None, PROMPT, 6, logit_bias={str(ord("z")): 100})
    assert got == "z" * 6  # +100 wins every step
    ban = {str(greedy[0]): -100}
    got, _ = completion_ids(client, None, PROMPT, 6, logit_bias=ban)

    def adjust(logits, prompt, out):
        logits = logits.clone()
        logits[greedy[0]] -= 100
        return logits
    expected = reference(model, PROMPT, 6, adjust)
    assert got == expected and expected[0] != greedy[0]
    for bad in ({"999": 1}, {"x": 1}, {"5": 101}):
        with pytest.raises(openai.BadRequestError, match="logit_bias"):
            completion_ids(client, None, PROMPT, 2, logit_bias=bad)


def test_n_choices_each_their_own_sequence(client, model, tok):
    msgs = [{"role": "user", "content": "choices"}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=10, temperature=1.0)
    both = client.chat.completions.create(n=3, seed=5, **kw)
    assert [c.index for c in both.choices] == [0, 1, 2]
    for i in range(3):  # choice i is what seed + i gives alone
        alone = client.chat.completions.create(n=1, seed=5 + i, **kw)
        assert both.choices[i].message.content == alone.choices[0].message.content
    assert len({c.message.content for c in both.choices}) > 1
    assert both.usage.completion_tokens == 30  # 3 x 10 (the byte tokenizer has no EOS)
    # streamed: every choice's deltas, under its index, and one usage for all
    chunks = list(client.chat.completions.create(
        n=3, seed=5, stream=True, stream_options={"include_usage": True}, **kw))
    texts = ["", "", ""]
    finished = set()
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert texts == [c.message.content for c in both.choices] and finished == {0, 1, 2}
    assert chunks[-1].usage.completion_tokens == both.usage.completion_tokens
    # completions too, with greedy choices all equal to generate
    out = client.completions.create(model=MODEL, prompt="abc", n=2, max_tokens=8,
                                    temperature=0, extra_body={"ignore_eos": True})
    expected = tok.decode(generate(model, tok.encode("abc"), 8))
    assert [c.text for c in out.choices] == [expected, expected]
    assert out.usage.completion_tokens == 16


def test_max_completion_tokens_echo_and_labels(client, model, tok):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3,
        max_tokens=50, temperature=0, user="u-1", metadata={"team": "a"}, store=False,
        service_tier="auto", extra_body={"ignore_eos": True, "prompt_cache_key": "k",
                                         "safety_identifier": "s", "modalities": ["text"],
                                         "response_format": {"type": "text"}, "audio": None,
                                         "tools": [], "tool_choice": "none"})
    assert out.usage.completion_tokens == 3
    echo = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=5,
                                     temperature=0, echo=True)
    assert echo.choices[0].text == "Echo me" + tok.decode(generate(model, tok.encode("Echo me"),
                                                                   5))


REFUSALS = [
    ("chat", "audio", {"voice": "alloy", "format": "wav"}),
    ("chat", "modalities", ["text", "audio"]),
    ("chat", "prediction", {"type": "content", "content": "x"}),
    ("chat", "reasoning_effort", "high"),
    ("chat", "verbosity", "low"),
    ("chat", "web_search_options", {"search_context_size": "low"}),
    ("chat", "functions", [{"name": "f", "parameters": {}}]),
    ("chat", "function_call", {"name": "f"}),
    ("chat", "best_of", 3),
    ("completions", "suffix", "the end"),
    ("completions", "best_of", 2),
]


@pytest.mark.parametrize("endpoint,field,value", REFUSALS)
def test_unhonoured_fields_are_refused_by_name(server, endpoint, field, value):
    if endpoint == "chat":
        url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}
    else:
        url, body = "/v1/completions", {"prompt": "x"}
    body.update(model=MODEL, max_tokens=2)
    r = httpx.post(server.url + url, json={**body, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["code"] == "unsupported_value"
    assert field in err["message"]
    assert httpx.post(server.url + url, json=body).status_code == 200


def test_echo_with_logprobs_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, echo=True,
                                  logprobs=1)


def test_out_of_range_values_name_their_field(server):
    url = server.url + "/v1/chat/completions"
    base = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for field, value in (("presence_penalty", 2.5), ("frequency_penalty", -3),
                         ("repetition_penalty", 0), ("min_p", 1.5), ("top_k", 0)):
        r = httpx.post(url, json={**base, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)


def test_tokenize_and_detokenize(server, tok):
    text = "Hello, world"
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(text)
    assert r["max_model_len"] == 256
    msgs = [{"role": "user", "content": "Hi"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    expected = tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    assert r["tokens"] == expected
    back = httpx.post(server.url + "/detokenize", json={"tokens": tok.encode(text)}).json()
    assert back == {"prompt": text}
    assert httpx.post(server.url + "/detokenize", json={"tokens": [99999]}).status_code == 400
    assert httpx.post(server.url + "/tokenize", json={}).status_code == 400
    assert httpx.post(server.url + "/tokenize", json={"model": "other",
                                                      "prompt": "x"}).status_code == 404
