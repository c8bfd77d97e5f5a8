"""The step runner: the model's forwards over the paged KV cache, for decode and prefill.

``step(decode, prefill)`` runs one engine step in one call of the C++ step when the model
has it (``kvformer.runtime.step.NativeDecodeStep``, an accelerated model of ``kvformer.load``): a row
per decoding sequence and a row per prompt token to prefill, each row's K/V read and its new
slot written through its sequence's block table, nothing copied. A prompt's tokens as rows
of one call are its prefill (every row's K/V is written before any row attends; each row
attends up to its own position), with the bits that decoding them one by one would give:
so a sequence's tokens do not depend on how its prompt was cut into chunks, on the prefix
cache, or on the other rows. The LM head runs only on the rows whose next token is wanted.
It returns None when the model has no such step (or this step cannot run it: past the
rotary table, a sliding window), and the engine then calls the two below.

``decode(seqs)`` runs one forward of T=1 for every row (each row's table already has room
for its new slot) and returns the logits ``[B, V]``; ``prefill(seq, n)`` runs the next
``n`` prompt tokens of one sequence and returns its last position's logits.

A decode step takes the fastest way there is:

1. an accelerated model (``kvformer.load``'s) whose decode step is the C++ one runs it
   straight over the pool, as ``step`` does;
2. an accelerated model on the Python step (no native build) gathers the batch's K/V,
   left-padded, into a contiguous cache with ``STEP_ROOM`` spare slots, runs the step with
   the padding mask and copies each row's new slot back into the pool; while the same rows
   keep decoding, the next steps reuse that cache (up to ``STEP_CACHE_BUDGET`` of it);
3. anything else runs ``Transformer.forward`` over ``PagedBatch``.
"""

from __future__ import annotations

import torch

from kvformer.kv.paged import BlockPool
from kvformer.runtime.step import FastForward, NativeDecodeStep
from kvformer.serve.sequence import Seq

# Largest contiguous copy of the batch's K/V a decode step may gather to run the fast step
# (beyond it, e.g. 16 rows of 2,000+ tokens, the step runs over the paged cache in place).
STEP_CACHE_BUDGET = 64 << 20
# Spare slots a gathered step cache gets, so the same rows' next steps reuse it.
STEP_ROOM = 32


class StepRunner:
    def __init__(self, model, pool: BlockPool):
        self.model, self.pool = model, pool
        # an accelerated model (kvformer.load's) decodes through the lean step of
        # kvformer.runtime.step / the C++ one of kvformer.runtime.native, which need a contiguous cache
        self.fast_decode = isinstance(model.__dict__.get("forward"), FastForward)
        self._memo = None  # (row ids, their lengths, step cache) after the last decode

    def forget(self) -> None:
        """Drop the gathered step cache (nothing decodes now: do not hold its memory)."""
        self._memo = None

    def native(self) -> NativeDecodeStep | None:
        """The model's C++ step, if it has one."""
        if self.fast_decode:
            step = self.model.forward.step()
            if isinstance(step, NativeDecodeStep):
                return step
        return None

    def step(self, decode: list[Seq], prefill: list[tuple[Seq, int]]
             ) -> tuple[list[Seq], torch.Tensor] | None:
        """One call of the C++ step: every sequence of ``decode`` (one token not yet cached,
        room for it in its table) and the next ``n`` prompt tokens of each (seq, n) of
        ``prefill``. Returns (the sequences with a next token to pick: the decoding ones, then
        those whose prompt is now all cached; their logits ``[len, V]``), or None when it
        cannot run (nothing has changed then)."""
        step = self.native()
        if step is None:
            return None
        seqs = decode + [s for s, _ in prefill]
        width = max(len(s.blocks) for s in seqs)
        # one tensor from lists (a tensor per row cost ~8 us each)
        tables = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs])
        tokens: list[int] = []
        lengths: list[int] = []
        rows: list[int] = []  # how many rows each sequence has
        wanted: list[int] = []
        takers: list[Seq] = []
        for i, s in enumerate(seqs):
            n = 1 if i < len(decode) else prefill[i - len(decode)][1]
            lo = s.num_cached
            tokens += s.tokens(lo, lo + n)
            lengths += range(lo, lo + n)
            rows.append(n)
            if lo + n == s.num_tokens:
                wanted.append(len(tokens) - 1)
                takers.append(s)
        if len(tokens) > len(seqs):
            tables = tables.repeat_interleave(torch.tensor(rows), dim=0)
        out = step.paged(torch.tensor(tokens).unsqueeze(1), self.pool, tables,
                         torch.tensor(lengths), torch.tensor(wanted, dtype=torch.long))
        if out is None:
            return None
        self._memo = None
        for s, n in zip(seqs, rows):
            s.num_cached += n
        return takers, out[:, -1]

    def decode(self, seqs: list[Seq]) -> torch.Tensor:
        logits = None
        step = self.native()
        if step is not None:
            logits = self._decode_native(step, seqs)
        if logits is None:
            logits = self._decode_forward(seqs)
        for s in seqs:
            s.num_cached += 1
        return logits

    def _decode_native(self, step: NativeDecodeStep, seqs: list[Seq]) -> torch.Tensor | None:
        self._memo = None
        width = max(len(s.blocks) for s in seqs)
        tables = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs])
        tokens = torch.tensor([[s.token_at(s.num_cached)] for s in seqs])
        lengths = torch.tensor([s.num_cached for s in seqs])
        out = step.paged(tokens, self.pool, tables, lengths)
        return None if out is None else out[:, -1]

    def _decode_forward(self, seqs: list[Seq]) -> torch.Tensor:
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
            return logits
        self._memo = None
        return self.model(tokens, input_pos=pos, cache=cache)[:, -1]

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
