import pytest
import torch

from kvformer.runtime.sampling import filter_logits, sample, validate_sampling


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 30)
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))


def test_top_k_never_leaves_the_k_most_likely():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 100, generator=g)
    top = set(torch.topk(logits[0], 5).indices.tolist())
    draws = {int(sample(logits, 2.0, top_k=5, generator=g)) for _ in range(300)}
    assert draws <= top and len(draws) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.8) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    # order of the vocabulary does not matter
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.isfinite(filter_logits(logits[:, perm], top_p=0.6))[0].tolist() == \
        [False, True, False, True]


def test_fixed_seed_reproduces():
    logits = torch.randn(3, 50)
    a = sample(logits, 1.0, generator=torch.Generator().manual_seed(7))
    b = sample(logits, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw, text", [
    (dict(temperature=-0.1), ">= 0"), (dict(top_k=0), ">= 1"), (dict(top_p=0.0), "(0, 1]"),
    (dict(top_p=1.01), "(0, 1]"), (dict(temperature=float("nan")), ">= 0")])
def test_invalid_values_name_the_valid_range(kw, text):
    with pytest.raises(ValueError) as err:
        validate_sampling(**kw)
    assert text in str(err.value)


def test_greedy_is_torchs_argmax_ties_and_nan_included():
    """``greedy`` (numpy's argmax on the CPU) picks what torch.argmax picks: the first of
    equal maxima, a NaN above every number, for one row, a batch and bf16 logits."""
    from kvformer.runtime.sampling import greedy

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(16, 1000, generator=gen)
    rows[3, [7, 500]] = 100.0  # a tie: the first wins
    rows[5, 42] = float("nan")  # NaN wins
    rows[6] = float("-inf")  # nothing allowed: index 0
    for x in (rows, rows[2], rows.to(torch.bfloat16), rows[:, ::2]):
        got = greedy(x)
        assert got.dtype == torch.long and got.shape == x.shape[:-1]
        assert torch.equal(got, x.argmax(dim=-1))
    assert greedy(rows)[3] == 7 and greedy(rows)[5] == 42 and greedy(rows)[6] == 0


def test_min_p_keeps_the_tokens_at_least_min_p_times_the_likeliest():
    from kvformer.runtime.sampling import sample

    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])  # 0.1 * 0.5 = 0.05: all stay
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(probs.log(), 1.0, min_p=0.2, generator=g)) for _ in range(400)}
    assert draws == {0, 1, 2}  # 0.12 >= 0.2 * 0.5 = 0.1 > 0.08
    draws = {int(sample(probs.log(), 1.0, min_p=0.61, generator=g)) for _ in range(200)}
    assert draws == {0}  # 0.3 < 0.305


def test_repeat_penalty_is_llama_cpps():
    """A seen token's logit is divided by the penalty when positive, multiplied when not;
    the others, and other rows, stay."""
    from kvformer.runtime.sampling import penalize_repeats

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]])
    out = penalize_repeats(logits, [[0, 1, 1], []], 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]]
    assert logits[0, 0] == 2.0  # the input is not changed
    assert penalize_repeats(logits, [[0], [1]], 1.0) is logits


@pytest.mark.parametrize("kw", [dict(min_p=1.5), dict(min_p=-0.1), dict(repeat_penalty=0),
                                dict(repeat_penalty=float("inf"))])
def test_bad_min_p_and_repeat_penalty_are_refused(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        validate_sampling(**kw)
