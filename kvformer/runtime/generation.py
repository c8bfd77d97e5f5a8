"""Autoregressive generation: prefill the prompt, then decode one token at a time.

With the KV cache, each decode step feeds only the newest token; its keys and values are
appended to the cache and every earlier one is read back, not recomputed. Without it
(``use_cache=False``, the seed's comparison) every step runs the whole sequence again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from kvformer.errors import ContextOverflowError
from kvformer.runtime.sampling import REPEAT_LAST_N, penalize_repeats, sample, validate_sampling
from kvformer.runtime.speculative import SpecStats, speculative_stream
from kvformer.runtime.step import Executor, for_model


def _as_rows(prompt_ids) -> tuple[list[list[int]], bool]:
    """Normalise a prompt (list of ints, 1-D tensor) or batch (list of lists, 2-D tensor)."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            return [prompt_ids.tolist()], True
        if prompt_ids.dim() == 2:
            return prompt_ids.tolist(), False
        raise ValueError(f"prompt_ids tensor must be 1-D or 2-D, got {prompt_ids.dim()}-D")
    prompt_ids = list(prompt_ids)
    if prompt_ids and all(isinstance(t, int) for t in prompt_ids):
        return [prompt_ids], True
    rows = [list(r.tolist() if isinstance(r, torch.Tensor) else r) for r in prompt_ids]
    if not rows:
        raise ValueError("prompt_ids is empty: give at least one token")
    return rows, False


def generate_stream(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, stop_ids: Iterable[int] = (),
                    use_cache: bool = True, min_p: float | None = None,
                    repeat_penalty: float = 1.0, vocab_limit: int | None = None, *,
                    spec: str | None = None, spec_k: int = 5, draft=None,
                    spec_stats: SpecStats | None = None) -> Iterator:
    """Yield tokens as they are made. For one prompt, yields ints; for a batch, yields one
    list per step with an id for each row, or None for a row that has already stopped.
    A stop id ends its row and is not yielded. ``model`` is a model (run by its executor,
    ``kvformer.runtime.step.for_model``) or an ``Executor``. ``repeat_penalty`` looks at
    each row's last ``REPEAT_LAST_N`` tokens, its prompt's included. With ``vocab_limit``
    (the tokenizer's vocabulary size), no id at or past it is made: a model's embedding is
    often padded past its vocabulary, and those ids are no text.

    ``spec`` ('lookup', or 'draft' with ``draft`` a model of the same vocabulary) decodes
    one prompt speculatively (kvformer.runtime.speculative), checking up to ``spec_k``
    guesses per call: the same tokens, greedy or sampled from the same distribution (with
    ``min_p`` too; not with a repeat penalty, whose distribution depends on the text so
    far); ``spec_stats`` (a ``SpecStats``) collects its acceptance."""
    run = for_model(model)
    model = run.model
    rows, single = _as_rows(prompt_ids)
    if spec is not None:
        if not single or len(rows) != 1:
            raise ValueError(f"speculative decoding (spec={spec!r}) runs one prompt at a "
                             f"time; this batch has {len(rows)}: drop spec or decode each")
        if not use_cache:
            raise ValueError("speculative decoding needs the KV cache (use_cache=True)")
        if repeat_penalty != 1:
            raise ValueError("speculative decoding keeps the model's own distribution: "
                             "use repeat_penalty=1 with it")
    validate_sampling(temperature, top_k, top_p, min_p, repeat_penalty)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    vocab = model.cfg.vocab_size
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in row if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ContextOverflowError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens = "
            f"{longest + max_new_tokens} > the model's context of {model.cfg.max_seq_len}; "
            "shorten the prompt or lower max_new_tokens")
    if max_new_tokens == 0:
        return
    if spec is not None:
        yield from speculative_stream(run, rows[0], max_new_tokens, temperature, top_k,
                                      top_p, seed, stop_ids, method=spec, k=spec_k,
                                      draft=draft, stats=spec_stats,
                                      vocab_limit=vocab_limit, min_p=min_p)
        return
    stops = set(stop_ids)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    limit = _check_limit(vocab_limit, vocab)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
                    min_p=min_p)
    for step in _decode_loop(run, rows, max_new_tokens, sampling, repeat_penalty, stops,
                             use_cache, limit):
        yield step[0] if single else step


def _check_limit(vocab_limit: int | None, vocab: int) -> int | None:
    """The number of ids sampling may pick from (None: all of the model's)."""
    if vocab_limit is None or vocab_limit >= vocab:
        return None
    if not isinstance(vocab_limit, int) or vocab_limit < 1:
        raise ValueError(f"vocab_limit={vocab_limit!r} must be an integer >= 1")
    return vocab_limit


@torch.inference_mode()
def _decode_loop(executor: Executor, rows, max_new_tokens, sampling, repeat_penalty, stops,
                 use_cache, limit=None):
    model = executor.model
    device = model.device
    b = len(rows)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    p = int(lengths.max())
    total = p + max_new_tokens
    # Left-pad so every row's last prompt token is in the same column; padding slots are
    # masked out of attention and each row's positions start at 0 at its first real token.
    pad = p - lengths  # [B]
    tokens = torch.zeros(b, total, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        tokens[i, p - len(row):p] = torch.tensor(row, dtype=torch.long)
    slots = torch.arange(total, device=device)
    valid = slots.unsqueeze(0) >= pad.unsqueeze(1)  # [B, total]
    positions = (slots.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)  # [B, total]
    ragged = bool((pad > 0).any())

    def run(lo: int, hi: int, cache):
        pos = positions[:, lo:hi] if ragged else slots[lo:hi]
        mask = valid[:, :hi] if ragged else None
        return executor(tokens[:, lo:hi], input_pos=pos, cache=cache, key_mask=mask,
                        last_only=True)[:, -1]

    cache = model.new_cache(b, total) if use_cache else None
    logits = run(0, p, cache)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for t in range(p, total):
        if repeat_penalty != 1:
            recent = [tokens[i, max(int(pad[i]), t - REPEAT_LAST_N):t].tolist()
                      for i in range(b)]
            logits = penalize_repeats(logits, recent, repeat_penalty)
        nxt = sample(logits[:, :limit], **sampling)
        tokens[:, t] = nxt
        ids = nxt.tolist()
        out = []
        for i, tok in enumerate(ids):
            if done[i]:
                out.append(None)
            elif tok in stops:
                done[i] = True
                out.append(None)
            else:
                out.append(tok)
        if bool(done.all()):
            return
        yield out
        if t + 1 < total:
            logits = run(t, t + 1, cache) if use_cache else run(0, t + 1, None)


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_ids: Iterable[int] = (), use_cache: bool = True, min_p: float | None = None,
             repeat_penalty: float = 1.0, vocab_limit: int | None = None, *,
             spec: str | None = None, spec_k: int = 5, draft=None,
             spec_stats: SpecStats | None = None):
    """New token ids for a prompt (list of ints or 1-D tensor -> list of ints) or a batch
    (list of lists or 2-D tensor -> list of lists, rows may differ in length). Greedy when
    temperature is 0; each row of a batch gives what its prompt gives alone. ``vocab_limit``,
    ``spec``, ``spec_k``, ``draft``, ``spec_stats``: as in ``generate_stream``."""
    rows, single = _as_rows(prompt_ids)
    if spec is not None and single:
        return list(generate_stream(model, rows[0], max_new_tokens, temperature, top_k,
                                    top_p, seed, stop_ids, use_cache, min_p, repeat_penalty,
                                    vocab_limit, spec=spec, spec_k=spec_k, draft=draft,
                                    spec_stats=spec_stats))
    outs: list[list[int]] = [[] for _ in rows]
    for step in generate_stream(model, rows, max_new_tokens, temperature, top_k, top_p, seed,
                                stop_ids, use_cache, min_p, repeat_penalty, vocab_limit,
                                spec=spec, spec_k=spec_k, draft=draft,
                                spec_stats=spec_stats):
        for i, tok in enumerate(step):
            if tok is not None:
                outs[i].append(tok)
    return outs[0] if single else outs


def perplexity(model, ids: Sequence[int], window: int | None = None, *,
               kv_dtype: str | None = None, token_by_token: bool = False) -> float:
    """exp(mean negative log-likelihood of ``ids[1:]``, each given the ids before it): the one
    perplexity of kvformer, in the three ways worth comparing.

    By default, one forward per ``window`` (the context) with no cache: every token attends to
    the exact K/V of the ones before it. With ``kv_dtype``, the text in one forward through a
    cache of that dtype: attention reads the K/V as the cache stores them (int8, int4), what a
    prefill sees. With ``token_by_token``, one token at a time through the model's executor
    (the C++ step where it runs) and a cache of ``kv_dtype`` (None: the model's), as decoding
    sees it. ``model`` may be an ``Executor``."""
    run = for_model(model)
    model = run.model
    ids_t = torch.tensor(list(ids), dtype=torch.long, device=model.device)
    if len(ids_t) < 2:
        raise ValueError("perplexity needs at least two token ids")
    nll = 0.0
    with torch.inference_mode():
        if token_by_token:
            cache = model.new_cache(1, len(ids_t), kv_dtype)
            for i in range(len(ids_t) - 1):
                logits = run(ids_t[i:i + 1].view(1, 1), cache=cache)[0, -1].float()
                nll += F.cross_entropy(logits[None], ids_t[i + 1:i + 2], reduction="sum").item()
        elif kv_dtype is not None:
            cache = model.new_cache(1, len(ids_t), kv_dtype)
            logits = model(ids_t[None, :-1], cache=cache)[0].float()
            nll = F.cross_entropy(logits, ids_t[1:], reduction="sum").item()
        else:
            window = window or model.cfg.max_seq_len
            for lo in range(0, len(ids_t) - 1, window):
                chunk = ids_t[lo:lo + window + 1]
                if len(chunk) < 2:
                    break
                logits = model(chunk[:-1].unsqueeze(0))[0].float()
                nll += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
    return math.exp(nll / (len(ids_t) - 1))


PREFILL_CHUNK_S = 0.15  # a prompt is read in chunks of about this long, asking stop() between
FIRST_CHUNK = 32  # tokens in the first chunk; the next ones sized by how fast it went


@torch.inference_mode()
def continue_stream(model, cache, new_ids: Sequence[int], max_new_tokens: int,
                    temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, generator: torch.Generator | None = None,
                    stop_ids: Iterable[int] = (), min_p: float | None = None,
                    repeat_penalty: float = 1.0, history: Sequence[int] = (),
                    stop: Callable[[], bool] | None = None,
                    vocab_limit: int | None = None) -> Iterator[int]:
    """Feed ``new_ids`` after what a batch-1 cache already holds, then decode: the chat
    loop uses this so earlier turns are never recomputed. Every yielded token except the
    last is already in the cache when the next one is made; a stop id is not yielded and
    not written. At most ``max_new_tokens`` (None: until the context is full) are made.
    ``model`` is a model or its ``Executor``; ``history`` is what the cache holds (for the
    repeat penalty); ``vocab_limit``: as in ``generate_stream``.

    With ``stop``, the prompt is read in chunks of about ``PREFILL_CHUNK_S`` seconds and
    ``stop()`` is asked between them: when it says True nothing is yielded and the cache
    holds the chunks read so far (``cache.length`` says how many of ``new_ids``). Each
    forward call has a fixed cost (~40 ms once the C++ step no longer takes the rows), so
    chunks read a long prompt slower than one forward (2-3x measured on a busy 2-core
    machine, SmolLM2, 1,000 tokens): `kvformer chat` reads it in one piece and stops it with
    KeyboardInterrupt instead."""
    run = for_model(model)
    model = run.model
    validate_sampling(temperature, top_k, top_p, min_p, repeat_penalty)
    new_ids = list(new_ids)
    if not new_ids:
        raise ValueError("continue_stream needs at least one new token")
    room = cache.max_len - cache.length - len(new_ids)
    if room < 1:
        raise ContextOverflowError(
            f"{cache.length} cached + {len(new_ids)} new tokens leave no room in a context "
            f"of {cache.max_len}; start a new conversation or raise the context size")
    limit = room if max_new_tokens is None else min(max_new_tokens, room)
    if limit < 1:
        return
    stops = set(stop_ids)
    recent = list(history)[-REPEAT_LAST_N:] + new_ids
    vocab = _check_limit(vocab_limit, model.cfg.vocab_size)

    def forward(ids: list[int]) -> torch.Tensor:
        tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
        return run(tokens, cache=cache, last_only=True)[:, -1]

    if stop is None:
        logits = forward(new_ids)
    else:
        done, chunk = 0, FIRST_CHUNK
        while True:
            began = time.perf_counter()
            logits = forward(new_ids[done:done + chunk])
            done += chunk
            if done >= len(new_ids):
                break
            if stop():
                return
            took = time.perf_counter() - began
            # the next chunk sized to take about PREFILL_CHUNK_S, as fast as this one went
            chunk = max(1, min(4 * chunk, int(chunk * PREFILL_CHUNK_S / max(took, 1e-6))))
    for i in range(limit):
        if repeat_penalty != 1:
            logits = penalize_repeats(logits, [recent[-REPEAT_LAST_N:]], repeat_penalty)
        nxt = int(sample(logits[:, :vocab], temperature, top_k, top_p, generator, min_p)[0])
        if nxt in stops:
            return
        yield nxt
        recent.append(nxt)
        if i + 1 < limit:
            logits = run(torch.tensor([[nxt]], device=model.device), cache=cache)[:, -1]
