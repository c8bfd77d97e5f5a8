"""The step runner: the model's executor over the paged KV cache, for decode and prefill.

It holds the executor it was given (``kvformer.runtime.step.for_model``), chosen once for
the model. With the C++ step, ``step(decode, prefill)`` runs one engine step in one call
(``NativeStep.paged``): a row per decoding sequence and a row per prompt token to prefill,
each row's K/V read and its new slot written through its sequence's block table, nothing
copied. A prompt's tokens as rows of one call are its prefill (every row's K/V is written
before any row attends; each row attends up to its own position), with the bits that
decoding them one by one would give: so a sequence's tokens do not depend on how its prompt
was cut into chunks, on the prefix cache, or on the other rows. The LM head runs only on
the rows whose next token is wanted.

``step`` returns None when the model runs on ``Transformer.forward`` (no native library,
or parts the C++ step does not implement) or when the step has nothing to offer for this
batch (past the rotary table, a sliding window), and the engine then calls the two below:
``decode(seqs)`` runs one forward of T=1 for every row over ``PagedBatch`` (each row's
table already has room for its new slot) and returns the logits ``[B, V]``;
``prefill(seq, n)`` runs the next ``n`` prompt tokens of one sequence and returns its last
position's logits.
"""

from __future__ import annotations

import torch

from kvformer.kv.paged import BlockPool
from kvformer.runtime.step import Executor
from kvformer.serve.sequence import Seq


class StepRunner:
    def __init__(self, executor: Executor, pool: BlockPool):
        self.model, self.pool = executor.model, pool
        self.executor = executor

    @property
    def native(self):
        """The C++ step, or None: the forward runs every step."""
        return self.executor.native

    def step(self, decode: list[Seq], prefill: list[tuple[Seq, int]]
             ) -> tuple[list[Seq], torch.Tensor] | None:
        """One call of the C++ step: every sequence of ``decode`` (one token not yet cached,
        room for it in its table) and the next ``n`` prompt tokens of each (seq, n) of
        ``prefill``. Returns (the sequences with a next token to pick: the decoding ones, then
        those whose prompt is now all cached; their logits ``[len, V]``), or None when it
        cannot run (nothing has changed then)."""
        step = self.native
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
        args = (torch.tensor(tokens).unsqueeze(1), self.pool, tables, torch.tensor(lengths),
                torch.tensor(wanted, dtype=torch.long))
        out = step.paged(*args)
        if out is None and self.executor.renew(max(lengths)):  # past the rotary table
            out = self.native.paged(*args)
        if out is None:
            return None
        for s, n in zip(seqs, rows):
            s.num_cached += n
        return takers, out[:, -1]

    def decode(self, seqs: list[Seq]) -> torch.Tensor:
        """One token of every row through ``Transformer.forward`` over the paged cache."""
        device = self.model.device
        tokens = torch.tensor([[s.token_at(s.num_cached)] for s in seqs], device=device)
        pos = torch.tensor([[s.num_cached] for s in seqs], device=device)
        cache = self.pool.batch([s.blocks for s in seqs], [s.num_cached for s in seqs])
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
