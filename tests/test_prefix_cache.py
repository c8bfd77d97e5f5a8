"""Prefix caching over the paged pool: shared blocks, reference counts, the LRU of freed
blocks, copy-on-write of the last partial block; the logits and greedy text of a request
that reuses a cached prefix equal those computed from scratch."""

import threading

import httpx
import openai
import pytest
import torch

from kvformer import ModelConfig, Transformer, generate
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer
from kvformer.kv.paged import BlockPool, OutOfBlocksError
from kvformer.serve.app import BackgroundServer, create_app
from kvformer.serve.engine import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, scale=1.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=48, n_layer=2, n_head=6, n_kv_head=2,
                      max_seq_len=128)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def prefill(model, pool, table, tokens, start):
    """Run tokens[start:] through the paged cache of one sequence; its last logits."""
    pool.grow(table, len(tokens))
    batch = pool.batch([table], [start])
    pos = torch.arange(start, len(tokens)).unsqueeze(0)
    return model(torch.tensor([tokens[start:]]), input_pos=pos, cache=batch)[0, -1]


def test_blocks_are_shared_counted_and_kept_in_an_lru_until_needed():
    pool = BlockPool(n_layer=1, n_blocks=6, block_size=4, n_kv_head=1, head_dim=2)
    tokens = list(range(10, 22))  # 3 full blocks
    table = pool.allocate(3)
    hashes: list[bytes] = []
    pool.remember_full(table, tokens, 12, hashes)
    assert len(hashes) == 3 and len(set(hashes)) == 3
    # a second sequence with the same first 9 tokens: two whole blocks, and the third's
    # first token copied (its 10th token is different), at most limit=len-1 tokens
    other = tokens[:9] + [1, 2, 3]
    m = pool.match(other, len(other) - 1)
    assert m.blocks == table[:2] and m.partial == table[2] and m.partial_len == 1
    assert m.num_tokens == 9
    assert pool.cost(m, len(other)) == 1  # shared blocks are held already: one new block
    t2 = pool.acquire(m, len(other))
    assert t2[:2] == table[:2] and t2[2] not in table
    assert pool.num_used == 4
    pool.free(table)  # the first sequence ends: its shared blocks are still held
    assert pool.num_used == 3 and pool.num_cached == 1  # table[2] is free, but cached
    pool.free(t2)
    assert pool.num_used == 0 and pool.num_cached == 3  # t2[2] was never cached
    # cached blocks come back through match, and the never-cached ones are handed out first
    assert pool.match(tokens, 12).blocks == table
    fresh = pool.allocate(3)
    assert not set(fresh) & set(table) and pool.num_cached == 3
    # then the least recently freed cached block goes first, and its entry with it
    evicted = pool.allocate(1)
    assert evicted == [table[2]] and pool.num_cached == 2
    assert pool.match(tokens, 12).blocks == table[:2]
    pool.allocate(2)
    assert pool.match(tokens, 12).blocks == [] and pool.num_free == 0
    with pytest.raises(OutOfBlocksError):
        pool.allocate(1)
    with pytest.raises(ValueError):
        pool.free([0])


def test_the_hash_covers_the_model_and_every_earlier_token():
    a = BlockPool(n_layer=1, n_blocks=8, block_size=2, n_kv_head=1, head_dim=2,
                  model_key=b"model A")
    table = a.allocate(3)
    a.remember_full(table, [1, 2, 3, 4, 5, 6], 6, [])
    assert len(a.match([1, 2, 3, 4, 5, 6, 7], 6).blocks) == 3
    assert len(a.match([9, 2, 3, 4, 5, 6, 7], 6).blocks) == 0  # same block 2, other past
    assert len(a.match([1, 2, 9, 4, 5, 6, 7], 6).blocks) == 1
    b = BlockPool(n_layer=1, n_blocks=8, block_size=2, n_kv_head=1, head_dim=2,
                  model_key=b"model B")
    assert b.root != a.root
    assert a.block_hash(a.root, [1, 2]) != b.block_hash(b.root, [1, 2])
    off = BlockPool(n_layer=1, n_blocks=8, block_size=2, n_kv_head=1, head_dim=2,
                    prefix_caching=False)
    t = off.allocate(3)
    off.remember_full(t, [1, 2, 3, 4, 5, 6], 6, [])
    assert off.match([1, 2, 3, 4, 5, 6, 7], 6).num_tokens == 0


@torch.inference_mode()
def test_logits_from_a_cached_prefix_equal_those_from_scratch():
    model = tiny()
    pool = BlockPool.for_model(model, n_blocks=32, block_size=4)
    first = [(5 * i) % 60 + 1 for i in range(18)]  # 4 full blocks and 2 tokens
    table: list[int] = []
    prefill(model, pool, table, first, 0)
    hashes: list[bytes] = []
    pool.remember_full(table, first, len(first), hashes)
    pool.remember_partial(table, first, len(first), hashes)
    before = [t[:, table[4], :2].clone() for t in pool.k + pool.v]
    pool.free(table)
    for second in (first[:18] + [7, 8, 9],   # continues the partial block: copied
                   first[:10] + [3, 3, 3],   # diverges inside block 2
                   first[:16],               # all blocks cached: the last one is copied
                   [9] + first[1:12]):       # differs at the first token: nothing reused
        m = pool.match(second, len(second) - 1)
        t2 = pool.acquire(m, len(second))
        got = prefill(model, pool, t2, second, m.num_tokens)
        ref = model(torch.tensor([second]))[0, -1]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        # writing after the copied slots never touched the cached block
        for t, b in zip(pool.k + pool.v, before):
            if table[4] not in pool._tokens:
                break
            assert torch.equal(t[:, table[4], :2], b)
        assert set(t2[len(m.blocks):]).isdisjoint(table)  # only whole blocks are shared
        pool.free(t2)
    assert pool.match(first[:18] + [7, 8, 9], 20).num_tokens == 18


def run_engine(model, prompts, prefix_caching, concurrent=False):
    outs = [None] * len(prompts)
    with Engine(model, None, max_batch=4, kv_blocks=40, block_size=4, prefill_chunk=16,
                prefix_caching=prefix_caching) as engine:
        def one(i):
            outs[i] = engine.generate(prompts[i], SamplingParams(12, temperature=0), 60)

        if concurrent:
            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        else:
            for i in range(len(prompts)):
                one(i)
        m = engine.metrics
        return outs, (m.prefix_queried, m.prefix_hits), engine.pool.num_used


def test_greedy_output_is_identical_with_and_without_the_cache():
    model = tiny(seed=1, scale=8)  # decisive logits: no near-ties
    system = [(3 * i) % 60 + 1 for i in range(21)]
    prompts = [system + [40 + i, 41, 42 + i] for i in range(5)]
    prompts += [prompts[0] + generate(model, prompts[0], 12) + [7]]  # a chat's next turn
    expected = [generate(model, p, 12) for p in prompts]
    off, (queried, hits), _ = run_engine(model, prompts, False)
    assert hits == 0 and queried == sum(map(len, prompts))
    on, (queried, hits), used = run_engine(model, prompts, True)
    assert used == 0
    assert [o.token_ids for o in off] == [o.token_ids for o in on] == expected
    assert on[0].cached_tokens == 0
    assert all(o.cached_tokens == 21 for o in on[1:5])  # 5 whole blocks and 1 token copied
    assert on[5].cached_tokens == len(prompts[0]) + 11  # the whole first turn, copied on
    assert hits == sum(o.cached_tokens for o in on)  # write from its last partial block
    # all at once (rows share blocks while they run), and with preemptions
    together, _, used = run_engine(model, prompts * 2, True, concurrent=True)
    assert [o.token_ids for o in together] == expected * 2 and used == 0


def test_usage_and_metrics_report_cached_tokens():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=512)
    model = Transformer(cfg).eval()
    tok = ByteTokenizer()
    engine = Engine(model, tok, max_batch=4, kv_blocks=128, block_size=8)
    with BackgroundServer(create_app(engine, "tiny")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        system = {"role": "system", "content": "You are a careful assistant. " * 4}
        usages, prompts = [], []
        for question in ("What is a KV cache?", "What is attention?"):
            messages = [system, {"role": "user", "content": question}]
            out = client.chat.completions.create(model="tiny", messages=messages,
                                                 max_tokens=4, temperature=0)
            usages.append(out.usage)
            prompts.append(tok.encode(tok.apply_chat_template(messages),
                                      add_special_tokens=False))
        common = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b)
        assert usages[0].prompt_tokens_details.cached_tokens == 0
        cached = usages[1].prompt_tokens_details.cached_tokens
        assert cached == common > 8  # whole blocks, then the partial one copied
        text = httpx.get(srv.url + "/metrics").text
        values = dict(line.rsplit(" ", 1) for line in text.splitlines()
                      if line and not line.startswith("#"))
        queried = usages[0].prompt_tokens + usages[1].prompt_tokens
        assert float(values["kvformer_prefix_cache_hit_tokens_total"]) == cached
        assert float(values["kvformer_prefix_cache_queried_tokens_total"]) == queried
        assert float(values["kvformer_prefix_cache_hit_rate"]) == pytest.approx(
            cached / queried, rel=1e-4)
