"""From a batch's logits to each sequence's next token, by each sequence's own settings.

First, rows with a grammar (structured output) lose every token their grammar does not
allow next (set to -inf: ``grammar.apply_masks``, one call for all of them). Then, for
each row, in order: ``logit_bias`` is added; the repetition, presence and frequency
penalties are applied; then the token is picked: argmax for temperature 0, otherwise a draw
from softmax(logits / temperature) restricted by min_p, top-k and top-p, with the
sequence's own ``torch.Generator`` (so a request's tokens do not depend on the rest of the
batch). Log-probabilities, when asked for, are those of the adjusted logits (the grammar's
mask, bias and penalties applied, before temperature and truncation). Rows without
adjustments and with temperature 0 are picked together, with one argmax.
"""

from __future__ import annotations

import math

import torch

from kvformer.runtime.sampling import filter_logits, greedy
from kvformer.serve.grammar import apply_masks
from kvformer.serve.sequence import SamplingParams, Seq, TokenLogprob


def adjust(logits: torch.Tensor, seq: Seq) -> torch.Tensor:
    """One row's logits [V] after the sequence's bias and penalties (a new tensor)."""
    p = seq.params
    logits = logits.float().clone()
    masked = torch.isneginf(logits)  # the grammar's mask: out of reach whatever is added
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        logits.index_add_(0, ids, torch.tensor(list(p.logit_bias.values())))
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.counts)), dtype=torch.long)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty,
                                   picked * p.repetition_penalty)
    if seq.counts and (p.presence_penalty or p.frequency_penalty):
        ids = torch.tensor(list(seq.counts), dtype=torch.long)
        counts = torch.tensor(list(seq.counts.values()), dtype=torch.float32)
        logits.index_add_(0, ids, -(counts * p.frequency_penalty + p.presence_penalty))
    # an extreme (legal) penalty can overflow: keep every allowed logit a number (the lowest
    # finite one at worst), so that a token the grammar allows still beats those it does not
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    return logits.masked_fill_(masked, float("-inf"))


def draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """A token from one row's (adjusted) logits [V] by temperature, min_p, top-k, top-p."""
    if p.temperature == 0:
        return int(greedy(logits))
    # relative to the largest logit and in float64, so that any temperature > 0, however
    # small (1e-300 is legal), sends the others towards -inf instead of making NaNs
    scaled = (logits.double() - logits.max()) / p.temperature
    if p.min_p:  # p_i >= min_p * p_max  <=>  l_i >= l_max + log(min_p), on scaled logits
        scaled = scaled.masked_fill(scaled < scaled.max() + math.log(p.min_p), float("-inf"))
    scaled = filter_logits(scaled.unsqueeze(0), p.top_k, p.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)[0, 0])


def pick_tokens(seqs: list[Seq], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
    """Each row's next token and, if the request asked for them, its log-probabilities."""
    constrained = [(i, s.constraint, s.params.ignore_eos) for i, s in enumerate(seqs)
                   if s.constraint is not None]
    if constrained:
        logits = logits.float().clone()
        apply_masks(constrained, logits)
    ids = [0] * len(seqs)
    plain = [i for i, s in enumerate(seqs)
             if s.params.temperature == 0 and not s.params.adjusts_logits]
    if plain:
        rows = logits if len(plain) == len(seqs) else logits[plain]
        for i, tok in zip(plain, greedy(rows).tolist()):
            ids[i] = tok
    rows: dict[int, torch.Tensor] = {}
    for i, s in enumerate(seqs):
        if i in plain and s.params.logprobs is None:
            continue
        rows[i] = adjust(logits[i], s) if s.params.adjusts_logits else logits[i]
        if i not in plain:
            ids[i] = draw(rows[i], s.params, s.generator)
    out = []
    for i, (s, tok) in enumerate(zip(seqs, ids)):
        lp = None
        if s.params.logprobs is not None:
            lp = TokenLogprob.of(rows[i], tok, s.params.logprobs)
        out.append((tok, lp))
    return out
