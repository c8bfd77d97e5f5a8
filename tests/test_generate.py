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


def _padded_model():
    """A model whose 300-id embedding pads a 258-id vocabulary, built so that greedy
    decoding wants the padding: the output rows of the real ids are zero (logit 0), those of
    the padding random (some logit > 0)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layer=1, n_head=2, n_kv_head=1,
                      tie_embeddings=False)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[:258] = 0
    return model


def test_padded_vocabulary_ids_are_never_made():
    """With vocab_limit (the tokenizer's size), generate, generate_stream and
    continue_stream pick no id past the vocabulary, greedy or sampled, where without it the
    padding wins."""
    from kvformer.runtime.generation import continue_stream

    model = _padded_model()
    prompt = [1, 2, 3]
    assert min(generate(model, prompt, 6)) >= 258  # the reference: padding is what it wants
    assert generate(model, prompt, 6, vocab_limit=258) == [0] * 6  # all real logits are 0
    for seed in range(5):
        ids = generate(model, prompt, 20, temperature=5.0, seed=seed, vocab_limit=258)
        assert max(ids) < 258, ids
        assert max(generate_stream(model, prompt, 5, vocab_limit=258)) < 258
    cache = model.new_cache(1, 32)
    assert max(continue_stream(model, cache, prompt, 8, temperature=5.0,
                               vocab_limit=258)) < 258
    with pytest.raises(ValueError, match="vocab_limit"):
        generate(model, prompt, 2, vocab_limit=0)


def test_cli_generate_never_makes_a_padded_id(tmp_path):
    """`kvformer generate` on a model whose embedding pads its tokenizer's vocabulary:
    without the limit the greedy answer is padding ids, which do not decode (one-line
    error); with it the answer comes out."""
    import subprocess
    import sys

    import kvformer
    from kvformer.formats.tokenizer.tokenizer import ByteTokenizer

    kvformer.save(_padded_model(), tmp_path / "m", tokenizer=ByteTokenizer(["<|a|>", "<|b|>"]))
    res = subprocess.run([sys.executable, "-m", "kvformer", "generate", "-m",
                          str(tmp_path / "m"), "-n", "4", "-q", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "\0" * 4 + "\n"  # id 0, the first real id, at logit 0 like all
