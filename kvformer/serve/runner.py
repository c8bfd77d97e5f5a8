"""The step runner: the model's forwards over the paged KV cache, for decode and prefill.

``decode(seqs)`` runs one forward of T=1 for every row (each row's table already has room
for its new slot) and returns the logits ``[B, V]``; ``prefill(seq, n)`` runs the next
``n`` prompt tokens of one sequence and returns its last position's logits.

For an accelerated model (``kvformer.load``'s), a decode step goes through the fast step
of ``kvformer.fast`` / ``kvformer.native``, which reads only the contiguous ``KVCache``
layout: the batch's K/V is gathered, left-padded, into a contiguous cache with
``STEP_ROOM`` spare slots, the step runs on it with the padding mask, and the new slot of
each row is copied back into the pool, which stays the source of truth. While the same rows
keep decoding, the next steps reuse that cache instead of gathering again. Above
``STEP_CACHE_BUDGET`` of gathered K/V the step runs over the paged cache in place.
"""

from __future__ import annotations

import torch

from ..fast import FastForward
from .paged import BlockPool
from .sequence import Seq

# Largest contiguous copy of the batch's K/V a decode step may gather to run the fast step
# (beyond it, e.g. 16 rows of 2,000+ tokens, the step runs over the paged cache in place).
STEP_CACHE_BUDGET = 64 << 20
# Spare slots a gathered step cache gets, so the same rows' next steps reuse it.
STEP_ROOM = 32


class StepRunner:
    def __init__(self, model, pool: BlockPool):
        self.model, self.pool = model, pool
        # an accelerated model (kvformer.load's) decodes through the lean step of
        # kvformer.fast / the C++ one of kvformer.native, which need a contiguous cache
        self.fast_decode = isinstance(model.__dict__.get("forward"), FastForward)
        self._memo = None  # (row ids, their lengths, step cache) after the last decode

    def forget(self) -> None:
        """Drop the gathered step cache (nothing decodes now: do not hold its memory)."""
        self._memo = None

    def decode(self, seqs: list[Seq]) -> torch.Tensor:
        device = self.model.device
        tokens = torch.tensor([[s.token_at(s.num_cached)] for s in seqs], device=device)
        pos = torch.tensor([[s.num_cached] for s in seqs], device=device)
        cache = self.pool.batch([s.blocks for s in seqs], [s.num_cached for s in seqs])
        if self.fast_decode and cache.step_cache_bytes(STEP_ROOM) <= STEP_CACHE_BUDGET:
            rows = [s.id for s in seqs]
            memo = self._memo
            if (memo is not None and memo[0] == rows and memo[1] == cache.lengths
                    and memo[2].length < memo[2].max_len):
                step = memo[2]
            else:
                self._memo = None  # free the old one before gathering a new one
                step = cache.step_cache(STEP_ROOM)
            logits = self.model(tokens, input_pos=pos, cache=step,
                                key_mask=cache.key_mask(1))[:, -1]
            cache.write_back(step)
            self._memo = (rows, list(cache.lengths), step)
        else:
            self._memo = None
            logits = self.model(tokens, input_pos=pos, cache=cache)[:, -1]
        for s in seqs:
            s.num_cached += 1
        return logits

    def prefill(self, seq: Seq, n: int) -> torch.Tensor:
        device = self.model.device
        lo = seq.num_cached
        tokens = torch.tensor([seq.tokens(lo, lo + n)], device=device)
        pos = torch.arange(lo, lo + n, device=device).unsqueeze(0)
        cache = self.pool.batch([seq.blocks], [lo])
        # a prefill chunk needs only its last token's logits: the LM head runs on one row
        logits = self.model(tokens, input_pos=pos, cache=cache, last_only=True)[:, -1]
        seq.num_cached += n
        return logits
