"""The paged KV cache: same logits as the contiguous cache, block bookkeeping, running out."""


import pytest
import torch

from kvformer import ContextOverflowError, ModelConfig, Transformer, generate
from kvformer.kv.paged import BlockPool, OutOfBlocksError
from kvformer.runtime.step import NativeStep, for_model
from kvformer.serve.engine import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(pos="rope", n_kv_head=2, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=48, n_layer=2, n_head=6, n_kv_head=n_kv_head,
                      max_seq_len=96, pos=pos)
    return Transformer(cfg).eval()


def contiguous_logits(model, prompt, steps):
    """Logits of the last token of the prompt and of each later chunk, through KVCache."""
    cache = model.new_cache(1, 96)
    out = [model(torch.tensor([prompt]), cache=cache)[0, -1]]
    for chunk in steps:
        out.append(model(torch.tensor([chunk]), cache=cache)[0, -1])
    return out


@pytest.mark.parametrize("pos,n_kv_head", [("rope", 2), ("learned", 6), ("rope", 1)])
@torch.inference_mode()
def test_batch_through_paged_cache_equals_each_sequence_alone(pos, n_kv_head):
    model = tiny(pos, n_kv_head)
    pool = BlockPool.for_model(model, n_blocks=64, block_size=4)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13], [14, 15, 16, 17, 18]]
    steps = [[7], [9], [3, 4, 5], [2]]  # decode steps, then three tokens at once, then one
    expected = [contiguous_logits(model, p, steps) for p in prompts]

    tables, lengths, got = [[] for _ in prompts], [0] * len(prompts), []
    for i, p in enumerate(prompts):  # prefill each sequence alone, in chunks of 2
        for lo in range(0, len(p), 2):
            chunk = p[lo:lo + 2]
            pool.grow(tables[i], lengths[i] + len(chunk))
            batch = pool.batch([tables[i]], [lengths[i]])
            pos_ids = torch.arange(lengths[i], lengths[i] + len(chunk)).unsqueeze(0)
            logits = model(torch.tensor([chunk]), input_pos=pos_ids, cache=batch)[0, -1]
            lengths[i] = batch.lengths[0]
        got.append([logits])
    for chunk in steps:  # then every sequence together, left-padded
        for table, n in zip(tables, lengths):
            pool.grow(table, n + len(chunk))
        batch = pool.batch(tables, lengths)
        pos_ids = torch.tensor([[n + j for j in range(len(chunk))] for n in lengths])
        tokens = torch.tensor([chunk] * len(prompts))
        logits = model(tokens, input_pos=pos_ids, cache=batch)[:, -1]
        lengths = batch.lengths
        for i in range(len(prompts)):
            got[i].append(logits[i])
    assert lengths == [len(p) + 6 for p in prompts]
    for exp, out in zip(expected, got):
        for a, b in zip(exp, out):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def native_or_skip(native):
    if native is None:
        from kvformer.runtime import native as nat

        if not nat.available():
            pytest.skip("the native decode step is not available (no compiler, or "
                        "KVFORMER_NATIVE=0)")


def test_blocks_are_allocated_and_freed():
    pool = BlockPool(n_layer=1, n_blocks=8, block_size=4, n_kv_head=1, head_dim=2)
    assert (pool.num_free, pool.num_used, pool.capacity) == (8, 0, 32)
    assert pool.blocks_for(1) == 1 and pool.blocks_for(4) == 1 and pool.blocks_for(5) == 2
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert len(set(a + b)) == 5 and 0 not in a + b  # block 0 is the padding block
    assert (pool.num_free, pool.num_used) == (3, 5)
    table = list(a)
    pool.grow(table, 13)  # 13 slots need 4 blocks: one more
    assert len(table) == 4 and pool.num_free == 2
    pool.grow(table, 16)  # still 4 blocks
    assert len(table) == 4
    pool.free(table)
    pool.free(b)
    assert (pool.num_free, pool.num_used) == (8, 0)
    with pytest.raises(ValueError):
        pool.free([b[0]])  # twice
    with pytest.raises(ValueError):
        pool.free([0])
    # the padding block stays zero
    assert pool.k[0][:, 0].abs().sum() == 0 and pool.v[0][:, 0].abs().sum() == 0


def test_out_of_blocks_is_all_or_nothing():
    pool = BlockPool(n_layer=1, n_blocks=4, block_size=2, n_kv_head=1, head_dim=2)
    pool.allocate(3)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(2)
    assert pool.num_free == 1
    table: list[int] = []
    with pytest.raises(OutOfBlocksError):
        pool.grow(table, 5)  # needs 3 blocks, 1 is free
    assert table == [] and pool.num_free == 1


@torch.inference_mode()
def test_forward_without_room_in_the_table_refuses():
    model = tiny()
    pool = BlockPool.for_model(model, n_blocks=4, block_size=4)
    table = pool.allocate(1)
    batch = pool.batch([table], [0])
    with pytest.raises(ContextOverflowError):
        model(torch.tensor([[1, 2, 3, 4, 5]]), cache=batch)  # 5 tokens, 4 slots


@pytest.mark.parametrize("fast,kv", [(False, None), ("native", None),
                                     (False, "int8"), ("native", "int8")])
def test_engine_preempts_when_blocks_run_out_and_still_matches_generate(fast, kv, monkeypatch):
    """With preemptions (and the prefix cache bringing blocks back), the engine's greedy
    tokens equal generate's (through the forward): through the model's forward over the
    paged cache, and through the C++ step reading the pool in place; with the model's own
    KV dtype and with int8 rows (a pool of int8 against generate's int8 cache)."""
    if fast == "native":
        native_or_skip(None)
    model = tiny(seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)  # decisive logits: no near-ties for batching noise to flip
    prompts = [[i % 60 + 1 for i in range(k, k + 6 + 3 * k)] for k in range(6)]
    if kv:
        model.kv_dtype = kv  # generate's cache and the engine's pool alike
    expected = [generate(for_model(model, native=False), p, 24) for p in prompts]
    paged = []

    def counted(method, log):
        def spy(self, *a):
            log.append(1)
            return method(self, *a)
        return spy

    run = for_model(model, native=None if fast else False)
    monkeypatch.setattr(NativeStep, "paged", counted(NativeStep.paged, paged))
    # 6 sequences of up to 45 tokens in 20 blocks of 4 (80 slots): they cannot all fit
    engine = Engine(run, None, max_batch=6, kv_blocks=20, block_size=4, prefill_chunk=8)
    with engine:
        sinks: list[list] = [[] for _ in prompts]
        import threading

        done = threading.Semaphore(0)

        def sink_for(i):
            def sink(out):
                sinks[i].append(out)
                if out.finished:
                    done.release()
            return sink

        for i, p in enumerate(prompts):
            engine.submit(p, SamplingParams(max_tokens=24, temperature=0), sink_for(i))
        for _ in prompts:
            assert done.acquire(timeout=60)
        assert engine.metrics.preemptions > 0
        assert engine.pool.num_used == 0
        assert engine.pool.kv_dtype == (kv or "fp32")
    for outs, exp in zip(sinks, expected):
        assert [t for o in outs for t in o.token_ids] == exp
        assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 24
    if fast == "native":  # every decode step read the pool in place
        assert len(paged) > 20
    else:
        assert not paged


def test_a_sequence_larger_than_the_pool_ends_with_length():
    model = tiny()
    engine = Engine(model, None, max_batch=2, kv_blocks=3, block_size=4)  # 12 slots
    with engine:
        out = engine.generate([1, 2, 3, 4, 5], SamplingParams(max_tokens=50, temperature=0),
                              timeout=30)
        assert out.finish_reason == "length"
        assert out.completion_tokens == 12 - 5 + 1  # the last token needs no slot
        assert engine.pool.num_used == 0
        with pytest.raises(ContextOverflowError):  # a prompt that cannot fit at all
            engine.submit(list(range(1, 14)), SamplingParams(max_tokens=1), print)


def test_the_default_pool_holds_more_tokens_of_int8_in_the_same_memory():
    """Without --kv-blocks the pool takes the bytes of max_batch x 2,048 tokens in the
    activations' dtype; int8 rows (head_dim 64: 66 bytes against bf16's 128) fill the same
    bytes with 1.9x the tokens, int4 (40 bytes) with 3.2x."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=256, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=4096)
    model = Transformer(cfg).eval().to(torch.bfloat16)
    pools = {kv: Engine(model, None, max_batch=4, kv_dtype=kv).pool
             for kv in ("bf16", "int8", "int4")}
    bf16 = pools["bf16"]
    assert bf16.capacity == 4 * 2048 and bf16.kv_dtype == "bf16"
    for kv, ratio in (("int8", 1.9), ("int4", 3.1)):
        pool = pools[kv]
        assert pool.nbytes <= bf16.nbytes + pool.block_size * pool.bytes_per_token
        assert pool.capacity >= ratio * bf16.capacity
        budget = 4 * 2048 * bf16.bytes_per_token  # the bf16 pool's blocks, block 0 aside
        assert pool.n_blocks == -(-budget // (pool.block_size * pool.bytes_per_token))


def test_native_engine_tokens_do_not_depend_on_chunks_batch_or_the_prefix_cache(monkeypatch):
    """Through the C++ step a prompt's tokens are rows of the engine's one call per step,
    beside the other sequences' decode rows. A row's bits depend on its own tokens only, so
    a request's greedy tokens are the same whatever the prefill chunk, the other requests
    in the batch, and whether its prefix came from the cache; and nothing goes through the
    model's forward (no separate prefill or decode forward)."""
    native_or_skip(None)
    from kvformer.runtime.quant import quantize_model
    from kvformer.serve.runner import StepRunner

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=256, n_layer=2, n_head=4, n_kv_head=2,
                      d_ff=128, max_seq_len=256)
    model = quantize_model(Transformer(cfg).eval(), "int4", act=torch.float32)
    gen = torch.Generator().manual_seed(2)
    shared = torch.randint(1, 256, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(1, 256, (k,), generator=gen).tolist()
               for k in (3, 17, 1, 30)]
    apart = []
    monkeypatch.setattr(StepRunner, "prefill", lambda *a: apart.append("prefill"))
    monkeypatch.setattr(StepRunner, "decode", lambda *a: apart.append("decode"))

    def run(chunk, caching, together):
        engine = Engine(model, None, max_batch=4, kv_blocks=64, block_size=16,
                        prefill_chunk=chunk, prefix_caching=caching)
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        with engine:
            first = engine.generate(prompts[0], params, timeout=60)  # fills the cache
            if not together:  # one request at a time
                rest = [engine.generate(p, params, timeout=60) for p in prompts[1:]]
            else:
                import threading
                rest = [None] * 3

                def one(i):
                    rest[i] = engine.generate(prompts[i + 1], params, timeout=60)

                threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        return [first] + rest

    base = run(chunk=128, caching=False, together=False)
    for chunk, caching, together in ((5, False, True), (7, True, True), (64, True, False)):
        outs = run(chunk, caching, together)
        assert [o.token_ids for o in outs] == [o.token_ids for o in base], (chunk, caching)
        if caching:  # the shared 40 tokens: two full blocks and 8 slots of a partial one
            assert [o.cached_tokens for o in outs[1:]] == [40] * 3
    assert not apart
