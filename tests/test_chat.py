"""ChatSession on the real default model: answers cut part way (a stop request, Ctrl-C
inside a forward) stay in the conversation and leave a KV cache equal to an uncached
recomputation; save/load; reset and the system message."""

import copy
import itertools
import json
import os

import pytest
import torch
from helpers import needs_default

from kvformer import generate
from kvformer.errors import ContextOverflowError, KvformerError
from kvformer.runtime.generation import FIRST_CHUNK
from kvformer.runtime.session import ChatSession

pytestmark = [needs_default, pytest.mark.usefixtures("one_thread")]

STORY = "Tell me a long story about a dragon."


@pytest.fixture(scope="module")
def default():
    from kvformer.formats.load import load
    return load("default")  # fp32: cached and uncached runs agree token for token


def template_ids(tok, messages):
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tok.encode(tok.apply_chat_template(plain, add_generation_prompt=True),
                      add_special_tokens=False)


def uncached_answer(model, tok, messages, n):
    """The reference: the whole conversation recomputed for every token, no cache."""
    return generate(model, template_ids(tok, messages), n, stop_ids=tok.stop_ids,
                    use_cache=False)


def assert_cache_is_recomputation(session):
    """The cache holds exactly cached_ids, and its K/V are what a fresh forward over those
    tokens writes."""
    model, cache = session.model, session.cache
    n = cache.length
    assert n == len(session.cached_ids) > 0
    fresh = model.new_cache(1, n)
    with torch.inference_mode():
        model(torch.tensor([session.cached_ids]), cache=fresh)
    for layer in range(model.cfg.n_layer):
        for got, want in ((cache.k, fresh.k), (cache.v, fresh.v)):
            torch.testing.assert_close(got[layer][:, :, :n], want[layer][:, :, :n],
                                       atol=2e-3, rtol=2e-3)


def test_a_stopped_answer_stays_cut_and_the_cache_matches_it(default):
    model, tok = default
    session = ChatSession(model, tok, max_len=512)
    pieces = list(session.send(STORY, 64, stop=lambda: session.last.new_tokens >= 5))
    reply = session.messages[-1]
    assert session.last.cut and session.last.new_tokens == 5
    assert reply == {"role": "assistant", "content": "".join(pieces), "cut": True}
    # what was kept is the model's answer, cut after 5 tokens
    prompt = template_ids(tok, session.messages[:1])
    first5 = uncached_answer(model, tok, session.messages[:1], 5)
    assert tok.decode(first5) == reply["content"]
    # the last token was shown but never fed: the cache holds the rest
    assert session.cached_ids == prompt + first5[:4]
    assert_cache_is_recomputation(session)

    second = "".join(session.send("What was the dragon called?", 16))
    history = session.messages[:-1]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert session.reused_tokens > len(prompt)  # the cut answer came from the cache
    expected = uncached_answer(model, tok, history, 16)
    assert second == tok.decode(expected)
    # an answer that reached -n is marked cut too (one that ended by itself is not)
    assert session.messages[-1].get("cut", False) == (len(expected) == 16)
    assert session.last.cut_by == ("length" if len(expected) == 16 else None)
    assert_cache_is_recomputation(session)


def test_ctrl_c_inside_a_forward_leaves_a_consistent_cache(default, monkeypatch):
    """A KeyboardInterrupt after every layer wrote its K/V but before the cache counted
    them (the worst moment): the partial answer is kept and the cache is still exact."""
    model, tok = default
    session = ChatSession(model, tok, max_len=512)
    advances = itertools.count(1)
    real_advance = session.cache.advance

    def advance(n):
        if next(advances) == 4:  # the prompt, two tokens fed back, Ctrl-C in the third
            raise KeyboardInterrupt
        real_advance(n)

    monkeypatch.setattr(session.cache, "advance", advance)
    stream = session.send(STORY, 64)
    shown = []
    with pytest.raises(KeyboardInterrupt):
        for piece in stream:
            shown.append(piece)
    monkeypatch.undo()
    reply = session.messages[-1]
    assert reply["cut"] and reply["content"] == "".join(shown)
    made = uncached_answer(model, tok, session.messages[:1], 3)
    assert reply["content"] == tok.decode(made)  # three tokens were made and shown
    assert session.cached_ids == template_ids(tok, session.messages[:1]) + made[:2]
    assert_cache_is_recomputation(session)
    # the conversation goes on, as if it had been computed afresh
    again = "".join(session.send("Go on.", 12))
    assert again == tok.decode(uncached_answer(model, tok, session.messages[:-1], 12))
    assert_cache_is_recomputation(session)


def test_an_error_before_the_answer_undoes_the_turn(default):
    model, tok = default
    session = ChatSession(model, tok, max_len=48)
    "".join(session.send("Hi.", 4))
    before = [dict(m) for m in session.messages]
    with pytest.raises(ContextOverflowError):
        "".join(session.send("Please repeat this long sentence " * 6, 8))
    assert session.messages == before
    assert session.cached_ids == session.cached_ids[:session.cache.length]
    session.reset()
    assert session.messages == [] and session.cache.length == 0 and session.cached_ids == []
    assert "".join(session.send("Hi.", 4))


def test_system_message_and_reset(default):
    model, tok = default
    session = ChatSession(model, tok, system="You are a pirate.", max_len=512)
    "".join(session.send("Hello!", 8))
    session.set_system("Answer in French.")
    assert session.messages[0] == {"role": "system", "content": "Answer in French."}
    assert len(session.messages) == 3
    answer = "".join(session.send("How are you?", 12))
    assert answer == tok.decode(uncached_answer(model, tok, session.messages[:-1], 12))
    session.reset()
    assert session.messages == [{"role": "system", "content": "Answer in French."}]
    assert session.cache.length == 0
    assert session.total_new_tokens == 0 and session.last is None  # /stats starts afresh


def test_the_system_message_the_template_adds_by_itself(default):
    """SmolLM2's template writes its own system message when none is given; /system shows
    it. A template without one gives None."""
    model, tok = default
    session = ChatSession(model, tok, max_len=64)
    default_system = session.template_system()
    assert default_system and f"system\n{default_system}<|im_end|>" in tok.chat_template
    assert default_system.startswith("You are a helpful AI assistant named SmolLM")
    plain = ChatSession(model, tok, max_len=64)
    plain.tokenizer = copy.copy(tok)
    plain.tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert plain.template_system() is None


def test_save_and_load_round_trip(default, tmp_path):
    model, tok = default
    session = ChatSession(model, tok, system="Be brief.", max_len=512)
    "".join(session.send("Count to twenty.", 32, stop=lambda: session.last.new_tokens >= 3))
    path = session.save(tmp_path / "talk.json", model="smol")
    data = json.loads(path.read_text())
    assert data["format"] == "kvformer-chat" and data["model"] == "smol"
    assert data["messages"] == session.messages and data["messages"][-1]["cut"] is True

    other = ChatSession(model, tok, max_len=512)
    assert other.load(path) == 3
    assert other.messages == session.messages
    # the loaded conversation goes on exactly as the saved one would have
    a = "".join(session.send("Now count backwards.", 10))
    b = "".join(other.send("Now count backwards.", 10))
    assert a == b


def test_save_is_atomic(default, tmp_path, monkeypatch):
    model, tok = default
    session = ChatSession(model, tok, max_len=128)
    path = tmp_path / "talk.json"
    path.write_text("the old file")

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        session.save(path)
    assert path.read_text() == "the old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.json"]  # no temp file left
    with pytest.raises(KvformerError, match="not a directory"):
        session.save(tmp_path / "missing" / "talk.json")


@pytest.mark.parametrize("content, words", [
    ("not json", "not JSON"),
    ('{"messages": []}', "not a kvformer conversation"),
    ('{"format": "kvformer-chat", "messages": [{"role": "robot", "content": "x"}]}',
     "message 0 needs a role"),
    ('{"format": "kvformer-chat", "messages": [{"role": "user", "content": "x"}, '
     '{"role": "system", "content": "y"}]}', "only the first"),
    ('{"format": "kvformer-chat", "messages": [{"role": "user", "content": "' + "word " * 200
     + '"}]}', "more than the context of 128"),
])
def test_load_refuses_what_is_not_a_conversation(default, tmp_path, content, words):
    model, tok = default
    session = ChatSession(model, tok, system="Kept.", max_len=128)
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(KvformerError, match=words):
        session.load(path)
    assert session.messages == [{"role": "system", "content": "Kept."}]


def test_stopped_while_the_prompt_is_read_the_turn_is_undone_and_the_cache_kept(default):
    """stop() is asked between chunks of a long prompt: saying True there ends the turn
    before any answer, the message is not kept, and the cache holds the chunks read, each
    as a fresh forward over those tokens would write it."""
    model, tok = default
    session = ChatSession(model, tok, max_len=1024)
    "".join(session.send("Hi.", 4))
    before = [dict(m) for m in session.messages]
    asked = []
    long = "Tell me about the sea. " * 60
    pieces = list(session.send(long, 8, stop=lambda: asked.append(1) or True))
    assert pieces == [""] and asked  # no answer
    assert session.last.cut_by == "prompt" and session.last.new_tokens == 0
    assert session.messages == before
    full = template_ids(tok, [*before, {"role": "user", "content": long}])
    # the first chunk was read before stop() was asked
    assert session.cache.length == session.last.reused + FIRST_CHUNK < len(full)
    assert session.cached_ids == full[:session.cache.length]
    assert_cache_is_recomputation(session)
    again = "".join(session.send("And the sky?", 10))
    assert again == tok.decode(uncached_answer(model, tok, session.messages[:-1], 10))


def test_a_full_context_drops_the_oldest_turns_and_keeps_the_system_message(default):
    model, tok = default
    session = ChatSession(model, tok, system="Be brief.", max_len=160)
    dropped = []
    for text in ("Tell me a story about a cat.", "Tell me a story about a dog.",
                 "Tell me a story about a bird.", "Tell me a story about a fish."):
        "".join(session.send(text, 40))
        dropped.append(session.last.dropped)
        assert len(session.cached_ids) == session.cache.length <= 160
    assert sum(dropped) >= 2 and dropped[0] == 0  # whole exchanges went, oldest first
    assert session.messages[0] == {"role": "system", "content": "Be brief."}
    assert session.messages[1]["role"] == "user"
    kept = [m["content"] for m in session.messages if m["role"] == "user"]
    assert kept[-1].endswith("a fish.") and not kept[0].endswith("a cat.")
    # the answer after the drop is what a fresh run over the kept conversation gives
    history = session.messages[:-1]
    assert session.messages[-1]["content"] == tok.decode(
        uncached_answer(model, tok, history, 40))
    assert_cache_is_recomputation(session)


def test_ctrl_c_while_the_prompt_is_read_in_one_piece_undoes_the_turn(default, monkeypatch):
    """`kvformer chat`'s way (stop_prompt=False): the prompt in one forward, Ctrl-C as a
    KeyboardInterrupt inside it; the message is not kept and the cache is still exact."""
    model, tok = default
    session = ChatSession(model, tok, max_len=512)
    "".join(session.send("Hi.", 4))
    before = [dict(m) for m in session.messages]
    real_advance = session.cache.advance

    def advance(n):  # the worst moment: every layer wrote its K/V, none counted yet
        raise KeyboardInterrupt

    monkeypatch.setattr(session.cache, "advance", advance)
    with pytest.raises(KeyboardInterrupt):
        "".join(session.send(STORY, 8, stop=lambda: False, stop_prompt=False))
    monkeypatch.setattr(session.cache, "advance", real_advance)
    assert session.messages == before and session.last.cut_by == "prompt"
    assert session.cache.length == session.last.reused  # nothing of the message counted
    assert_cache_is_recomputation(session)
    again = "".join(session.send("Go on.", 10))
    assert again == tok.decode(uncached_answer(model, tok, session.messages[:-1], 10))
