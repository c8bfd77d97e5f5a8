"""Speculative decoding at batch 1: guess k tokens cheaply, check them all in one target call.

A decode step at batch 1 is bound by reading the weights: one executor call over 1 + k rows
(the last accepted token and k guesses, each at its own position) reads them once and gives
the target's logits after every row, so checking k guesses costs about one step. The
longest prefix of guesses the target agrees with is kept, plus one token of the target's
own from the first row that disagrees (or after the last guess): every round makes at least
the one token plain decoding would have made.

Two drafters make the guesses:

* ``PromptLookup``: the tokens that followed the most recent earlier occurrence of the
  text's last 3-, 2- or 1-gram (in the prompt or in what was generated), from an index
  updated as tokens come, not a rescan. It pays where the answer copies its input
  (summaries, edits, extraction, code).
* ``DraftModel``: a smaller or more quantized model with the target's vocabulary, decoding
  k tokens ahead in its own KV cache.

Greedy output is the target's argmax at every position, so it is plain decoding's token for
token wherever the executor's rows give the logits one-row decode gives (the C++ step does,
bit for bit; see docs/speculative.md for the forward). With sampling, the accept/reject rule
keeps the target's distribution exactly: a draft token d drawn from q is kept with
probability min(1, p(d) / q(d)), and on rejection the token is drawn from max(0, p - q)
renormalised. Prompt lookup's q is a point mass at d: keep d with probability p(d), else
draw from p without d. p is the distribution ``kvformer.runtime.sampling.sample`` draws
from (temperature, top-k, top-p applied).

Rejected tokens leave nothing behind: the target's cache (and the draft model's) is
truncated to the kept tokens, and their slots are overwritten by the next call.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from kvformer.errors import CheckpointError, ContextOverflowError
from kvformer.runtime.sampling import greedy, probabilities, sample, validate_sampling
from kvformer.runtime.step import Executor, for_model

METHODS = ("lookup", "draft")


@dataclass
class SpecStats:
    """What a speculative run did: target calls (``rounds``), guesses checked and kept."""
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    yielded: int = 0

    @property
    def acceptance(self) -> float:
        """Kept guesses / checked guesses (0 when nothing was guessed)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def line(self) -> str:
        return (f"speculative: {self.accepted}/{self.drafted} guesses kept "
                f"({100 * self.acceptance:.0f} %), {self.rounds} target calls")


class PromptLookup:
    """Drafts by n-gram lookup: ``last[g]`` is where the tokens after the most recent
    occurrence of the 1..max_n-gram g begin. An n-gram is indexed once a token follows it,
    so the text's own last n-gram is never its own match."""

    def __init__(self, ids: Iterable[int] = (), max_n: int = 3):
        self.max_n = max_n
        self.ids: list[int] = []
        self.last: dict[tuple[int, ...], int] = {}
        self.commit(ids)

    def commit(self, new_ids: Iterable[int]) -> None:
        """The text grew by ``new_ids`` (kept tokens): index the n-grams they complete."""
        ids, last = self.ids, self.last
        for tok in new_ids:
            j = len(ids)  # tok's position: every n-gram ending at j - 1 now has a follower
            for n in range(1, min(self.max_n, j) + 1):
                last[tuple(ids[j - n:j])] = j
            ids.append(tok)

    def propose(self, k: int) -> tuple[list[int], None]:
        """Up to k guesses, longest n-gram first (none: no earlier occurrence). A match
        near the end continues as a repeat (LZ77-style), so 'abab' guesses 'abab...'."""
        ids = self.ids
        for n in range(min(self.max_n, len(ids)), 0, -1):
            at = self.last.get(tuple(ids[len(ids) - n:]))
            if at is not None:
                guess: list[int] = []
                for i in range(k):
                    src = at + i
                    guess.append(ids[src] if src < len(ids) else guess[src - len(ids)])
                return guess, None
        return [], None


def check_vocab(target, draft, target_tok=None, draft_tok=None) -> None:
    """Raise ``CheckpointError`` in one line unless ``draft`` shares ``target``'s
    vocabulary: the same size and, where both tokenizers are given, the same tokens."""
    tv, dv = target.cfg.vocab_size, draft.cfg.vocab_size
    if tv != dv:
        raise CheckpointError(f"the draft model has {dv} tokens in its vocabulary, the target "
                              f"{tv}: a draft model must share the target's tokenizer")
    if target_tok is None or draft_tok is None:
        return
    for i in range(tv):
        a, b = target_tok.id_to_token(i), draft_tok.id_to_token(i)
        if a != b:
            raise CheckpointError(f"token {i} is {b!r} in the draft model's vocabulary and "
                                  f"{a!r} in the target's: a draft model must share the "
                                  "target's tokenizer")


class DraftModel:
    """Drafts by decoding with another model in its own cache, which holds a prefix of the
    kept text (``commit`` truncates it to what was kept). With sampling, its guesses are
    drawn from its own distribution q (the same temperature and filters), returned beside
    them for the accept/reject rule."""

    def __init__(self, draft, ids: Iterable[int], max_len: int, kv_dtype=None,
                 native: bool | str | None = None):
        self.run = for_model(draft, native)
        model = self.run.model
        self.max_len = min(max_len, model.cfg.max_seq_len)
        self.cache = model.new_cache(1, self.max_len, kv_dtype)
        self.ids = list(ids)
        self.guess: list[int] = []
        self.sampling: tuple = (0.0, None, None, None, None)
        self.limit: int | None = None  # the ids it may guess: the target's

    def propose(self, k: int) -> tuple[list[int], torch.Tensor | None]:
        temperature, top_k, top_p, gen, min_p = self.sampling
        cache, device = self.cache, self.run.model.device
        k = min(k, self.max_len - len(self.ids))  # its cache holds ids and k - 1 guesses
        if k < 1:
            return [], None
        tail = torch.tensor([self.ids[cache.length:]], dtype=torch.long, device=device)
        logits = self.run(tail, cache=cache, last_only=True)[:, -1, :self.limit]
        guess, qs = [], []
        for i in range(k):
            if temperature == 0:
                tok = int(greedy(logits)[0])
            else:
                q = probabilities(logits, temperature, top_k, top_p, min_p)[0]
                tok = int(torch.multinomial(q, 1, generator=gen))
                qs.append(q)
            guess.append(tok)
            if i + 1 < k:
                logits = self.run(torch.tensor([[tok]], device=device),
                                  cache=cache)[:, -1, :self.limit]
        self.guess = guess
        return guess, (torch.stack(qs) if qs else None)

    def commit(self, new_ids: list[int]) -> None:
        same = 0
        while same < min(len(new_ids), len(self.guess)) and new_ids[same] == self.guess[same]:
            same += 1
        keep = min(self.cache.length, len(self.ids) + same, len(self.ids) + len(new_ids) - 1)
        self.cache.truncate(max(keep, 0))
        self.ids.extend(new_ids)
        self.guess = []


class Adaptive:
    """How many tokens to guess next: k grows by 2 while every guess is kept and drops to
    one more than were kept otherwise; a round with nothing kept at k = 1 turns guessing off
    for 1, 2, 4 ... 32 rounds (reset by a kept guess), so free-form text, where guesses
    rarely hold, runs nearly as plain decoding does."""

    def __init__(self, k_max: int, adaptive: bool = True):
        self.k_max, self.adaptive = k_max, adaptive
        self.k = k_max if not adaptive else min(k_max, 2)
        self.off, self.backoff = 0, 1

    def next_k(self, room: int) -> int:
        if self.off:
            self.off -= 1
            return 0
        return max(0, min(self.k, room))

    def update(self, drafted: int, accepted: int) -> None:
        if not self.adaptive or drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 2)
        else:
            self.k = max(1, accepted + 1)
        if accepted:
            self.backoff = 1
        elif drafted == 1:
            self.off, self.backoff = self.backoff, min(32, 2 * self.backoff)


def accept(logits: torch.Tensor, guess: list[int], q: torch.Tensor | None,
           temperature: float, top_k, top_p, gen, min_p=None) -> tuple[int, int]:
    """(how many guesses are kept, the token after them) from the target's logits after
    each of the 1 + len(guess) rows. Greedy: keep while a guess is the argmax. Sampling:
    the rule that keeps the target's distribution (module docstring); q [len(guess), V] is
    the drafter's distribution, or None for point masses at the guesses."""
    if temperature == 0:
        best = greedy(logits).tolist()
        n = 0
        while n < len(guess) and guess[n] == best[n]:
            n += 1
        return n, best[n]
    p = probabilities(logits, temperature, top_k, top_p, min_p)
    for i, d in enumerate(guess):
        keep = p[i, d] if q is None else torch.clamp(p[i, d] / q[i, d], max=1.0)
        u = torch.rand((), dtype=torch.float64, generator=gen)
        if u < keep:
            continue
        if q is None:
            rest = p[i].clone()
            rest[d] = 0
        else:
            rest = torch.clamp(p[i] - q[i], min=0)
        if not rest.sum() > 0:  # only by rounding: p was (nearly) q or a point mass at d
            rest = p[i]
        return i, int(torch.multinomial(rest / rest.sum(), 1, generator=gen))
    return len(guess), int(torch.multinomial(p[len(guess)], 1, generator=gen))


@torch.inference_mode()
def speculative_stream(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = None, stop_ids: Iterable[int] = (), *,
                       method: str = "lookup", k: int = 5, draft=None,
                       kv_dtype=None, draft_kv_dtype=None, adaptive: bool = True,
                       stats: SpecStats | None = None, cache=None,
                       generator: torch.Generator | None = None,
                       vocab_limit: int | None = None,
                       min_p: float | None = None) -> Iterator[int]:
    """Yield the new tokens of one prompt (a list of ints) as ``generate_stream`` does, with
    guesses from ``method`` ('lookup', or 'draft' with ``draft`` a model or executor of the
    same vocabulary) checked ``k`` at most at a time. ``stats`` (a ``SpecStats``) is filled
    in as it runs. ``cache`` is the target's batch-1 cache, made here by default (in the
    form ``kv_dtype`` names, as ``new_cache`` takes); one passed in may already hold a
    prefix of the prompt (the chat's kept cache), and then, as ``continue_stream``, at most
    the tokens it has room for are made. However the stream ends, the cache then holds a
    prefix of the prompt and the yielded tokens, nothing else. ``vocab_limit``: as in
    ``generate_stream`` (ids at or past it, a padded embedding's, are never made)."""
    run = for_model(model)
    model = run.model
    validate_sampling(temperature, top_k, top_p, min_p)
    if method not in METHODS:
        raise ValueError(f"speculative method {method!r} is not one of {', '.join(METHODS)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"spec_k={k!r} must be an integer >= 1")
    ids = list(prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)
    vocab = model.cfg.vocab_size
    if not ids or any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
        raise ValueError(f"speculative decoding takes one prompt of token ids in [0, {vocab})")
    total = len(ids) + max_new_tokens
    if cache is not None:
        if not cache.length < len(ids) < cache.max_len:
            raise ContextOverflowError(
                f"{cache.length} cached tokens and a text of {len(ids)} leave no room in a "
                f"context of {cache.max_len}; start a new conversation or raise the context")
        max_new_tokens = min(max_new_tokens, cache.max_len - len(ids))
        total = len(ids) + max_new_tokens
    elif total > model.cfg.max_seq_len:
        raise ContextOverflowError(
            f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens = {total} > the "
            f"model's context of {model.cfg.max_seq_len}; shorten the prompt or lower "
            "max_new_tokens")
    if max_new_tokens <= 0:
        return
    limit = vocab_limit if vocab_limit is not None and vocab_limit < vocab else None
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise ValueError(f"vocab_limit={vocab_limit!r} must be an integer >= 1")
    if method == "draft":
        if draft is None:
            raise ValueError("method='draft' needs a draft model (draft=...)")
        check_vocab(model, draft.model if isinstance(draft, Executor) else draft)
    stats = stats if stats is not None else SpecStats()
    stops = set(stop_ids)
    gen = generator if generator is not None else (
        torch.Generator().manual_seed(seed) if seed is not None else None)
    if temperature > 0 and gen is None:
        gen = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    drafter = (PromptLookup(ids) if method == "lookup" else
               DraftModel(draft, ids, total, draft_kv_dtype))
    if method == "draft":
        drafter.sampling = (temperature, top_k, top_p, gen, min_p)
        drafter.limit = limit
    policy = Adaptive(k, adaptive)

    cache = cache if cache is not None else model.new_cache(1, total, kv_dtype)
    device = model.device
    rows = torch.tensor([ids[cache.length:]], device=device)
    logits = run(rows, cache=cache, last_only=True)[:, -1, :limit]
    new = [int(sample(logits, temperature, top_k, top_p, gen, min_p)[0])]
    prompt_len, before = len(ids), stats.yielded
    try:
        yield from _rounds(run, cache, ids, new, drafter, policy, stats, max_new_tokens,
                           stops, temperature, top_k, top_p, gen, limit, min_p)
    finally:  # kept guesses past a stop or the consumer's last token leave the cache too
        cache.truncate(min(cache.length, prompt_len + stats.yielded - before))


def _rounds(run, cache, ids, new, drafter, policy, stats, max_new_tokens, stops,
            temperature, top_k, top_p, gen, limit=None, min_p=None):
    device = run.model.device
    made = 0
    while True:
        for tok in new:
            if tok in stops:
                return
            yield tok
            made += 1
            stats.yielded += 1
            if made == max_new_tokens:
                return
        ids.extend(new)
        drafter.commit(new)
        guess, q = drafter.propose(policy.next_k(max_new_tokens - made - 1))
        rows = torch.tensor([[ids[-1], *guess]], dtype=torch.long, device=device)
        logits = run(rows, cache=cache, last_only=False)[0, :, :limit]
        kept, nxt = accept(logits, guess, q, temperature, top_k, top_p, gen, min_p)
        cache.truncate(len(ids) + kept)  # the last kept token (nxt) is fed next round
        policy.update(len(guess), kept)
        stats.rounds += 1
        stats.drafted += len(guess)
        stats.accepted += kept
        new = guess[:kept] + [nxt]
