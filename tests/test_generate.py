import pytest
import torch

from kvformer import ContextOverflowError, ModelConfig, Transformer, generate, generate_stream


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=48, n_layer=2, n_head=6, n_kv_head=2,
                      max_seq_len=64)
    return Transformer(cfg).eval()


def naive_greedy(model, ids, n):
    """No cache, no batching: argmax of the full forward, one token at a time."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def test_greedy_equals_naive_loop(model):
    prompt = [3, 14, 15, 9, 2]
    assert generate(model, prompt, 12) == naive_greedy(model, prompt, 12)


def test_no_cache_gives_identical_greedy_output(model):
    prompt = [7, 1, 8, 2]
    assert generate(model, prompt, 15, use_cache=False) == generate(model, prompt, 15)


def test_batch_of_different_lengths_equals_each_alone(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]
    alone = [generate(model, p, 10) for p in prompts]
    assert generate(model, prompts, 10) == alone
    assert generate(model, prompts, 10, use_cache=False) == alone
    assert alone[0] == naive_greedy(model, prompts[0], 10)


def test_stream_yields_the_same_tokens(model):
    prompt = torch.tensor([5, 6, 7])
    assert list(generate_stream(model, prompt, 9)) == generate(model, prompt, 9)


def test_stop_ids_end_generation(model):
    prompt = [3, 14, 15]
    full = generate(model, prompt, 10)
    stop = full[4]
    first = full.index(stop)
    assert generate(model, prompt, 10, stop_ids={stop}) == full[:first]


def test_seed_reproduces_and_sampling_varies(model):
    prompt = [1, 2, 3]
    a = generate(model, prompt, 20, temperature=1.5, seed=123)
    b = generate(model, prompt, 20, temperature=1.5, seed=123)
    c = generate(model, prompt, 20, temperature=1.5, seed=124)
    assert a == b and a != c


def test_context_overflow_is_checked_before_generating(model):
    with pytest.raises(ContextOverflowError) as err:
        generate(model, list(range(40)), 30)
    assert "40" in str(err.value) and "30" in str(err.value) and "64" in str(err.value)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                dict(top_k=0)])
def test_invalid_sampling_values(model, kw):
    with pytest.raises(ValueError):
        generate(model, [1, 2], 3, **kw)


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [1, 99], 3)
