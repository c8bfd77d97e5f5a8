"""From a batch's logits to each sequence's next token, by each sequence's own settings.

Greedy rows are picked together (one argmax); the others sample one by one, each with its
own ``torch.Generator`` so that a request's tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

import torch

from ..sampling import sample
from .sequence import Seq, TokenLogprob


def pick_tokens(seqs: list[Seq], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
    """Each row's next token and, if the request asked for them, its log-probabilities."""
    greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
    ids = [0] * len(seqs)
    if greedy:
        picked = logits[greedy].argmax(dim=-1).tolist()
        for i, tok in zip(greedy, picked):
            ids[i] = tok
    for i, s in enumerate(seqs):
        p = s.params
        if p.temperature != 0:
            ids[i] = int(sample(logits[i:i + 1], p.temperature, p.top_k, p.top_p,
                                s.generator)[0])
    out = []
    for i, (s, tok) in enumerate(zip(seqs, ids)):
        lp = None
        if s.params.logprobs is not None:
            lp = TokenLogprob.of(logits[i], tok, s.params.logprobs)
        out.append((tok, lp))
    return out
