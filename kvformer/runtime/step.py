"""How a model's tokens are computed: the executor, chosen once per model.

``Transformer.forward`` (kvformer.model.transformer) is the spec: written to be read, and
the fallback that runs everything. Where the native library is built (kvformer.runtime.native)
and the model's parts are ones the C++ step implements (``StepPlan.from_model``), the C++
step runs decode and short prefills instead: one call per step for every layer, reading the
same named plan (kvformer.runtime.plan), with the bits tested against the forward in
tests/test_fast.py and tests/test_native.py.

``for_model(model)`` decides once which of the two a model gets and says why
(``Executor.why``; ``kvformer info`` and ``kvformer generate --stats`` print it). The
model's ``forward`` is never replaced: ``generate``, the chat session and the server's
runner hold the executor and call it. An ``Executor`` call takes the forward's arguments;
with the C++ step it runs

* a decode call (one token per row) through a contiguous ``KVCache`` or
  ``QuantizedKVCache`` (``NativeStep.decode``),
* the prefill of one row into such a cache while rows pay (``rows_pay``: short prompts;
  ``NativeStep.prefill``),

and hands the call to the forward where the C++ step has nothing to offer by construction:
no cache (the seed's no-cache comparison, perplexity), a batch's prefill, a long prompt, or
a position past the rotary table the plan was made with or inside a sliding window's
wrap-around. The server runs ``NativeStep.paged`` over its block pool itself.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from kvformer.kv.cache import KVCache, QuantizedKVCache
from kvformer.runtime import native as native_lib
from kvformer.runtime.plan import StepPlan, Unsupported

# what the C++ step's caches may hold: numbers, or int8 / int4 (uint8) rows with scales
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.int8, torch.uint8)
# Rows of one C++ step call in a prefill: its per-row cost is flat from ~16 rows on, and
# its buffers grow with the rows (~34 KB a row for SmolLM2)
PREFILL_ROWS = 256


def rows_pay(n: int, cached: int) -> bool:
    """Whether n new tokens after ``cached`` ones are prefilled faster as rows of the C++
    step than by the forward. Measured on SmolLM2 int4 (``benchmarks/prefill_rows.py``,
    docs/serving.md): a row costs the step about what a token costs the forward's matmuls,
    plus ~1 us per slot it attends to (one query at a time), while the forward pays ~40 ms
    of per-operation overhead and attends with matrix products. So rows win for short
    prompts (4.8x at 8 tokens, 1.3x at 128, even at 512) and lose for long ones (0.9x at
    1,024)."""
    return cached + n / 2 < 400 + 40_000 / n


_EMPTY_LONG = torch.empty(0, dtype=torch.long)
_EMPTY_BOOL = torch.empty(0, dtype=torch.bool)


class NativeStep:
    """The model's C++ step on the kernels of ``isa`` (default: ``default_isa()``): one call
    runs every layer for a batch of rows, through a contiguous cache (``decode``,
    ``prefill``) or the server's paged pool (``paged``). Made by ``Executor``; raises
    ``Unsupported`` (from ``StepPlan.from_model``) for a model it cannot run."""

    def __init__(self, model: nn.Module, isa: str | None = None):
        plan = StepPlan.from_model(model)
        self.isa = isa or native_lib.default_isa()
        names = plan.named()
        self.handle = torch.ops.kvformer_native.plan_new(
            list(names.tensors), list(names.tensors.values()), list(names.ints),
            list(names.ints.values()), list(names.reals), list(names.reals.values()), self.isa)
        self.rope_len, self.window = plan.rope_len, plan.window

    def __del__(self):
        handle = getattr(self, "handle", None)
        if handle is not None:
            try:
                torch.ops.kvformer_native.plan_free(handle)
            except Exception:  # interpreter shutdown
                pass

    def decode(self, tokens: torch.Tensor, cache: KVCache,
                 input_pos: torch.Tensor | None = None,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        slot = cache.length
        if self.window is not None and slot >= self.window:
            return None  # the window now hides the oldest keys: the model computes it
        cache.check_room(1)
        pos0, pos = slot, _EMPTY_LONG
        if input_pos is not None:
            pos = input_pos.reshape(-1, 1)[:, 0] if input_pos.dim() == 2 else input_pos
            if pos.numel() == 1:
                pos0, pos = int(pos.reshape(())), _EMPTY_LONG
            elif pos.dtype != torch.long:
                pos = pos.long()
        if self.rope_len is not None:
            top = pos0 if pos.numel() == 0 else int(pos.max())
            if top >= self.rope_len:
                return None  # past the rotary table: the model computes it afresh
        mask = _EMPTY_BOOL if key_mask is None else key_mask
        logits = torch.ops.kvformer_native.plan_step(self.handle, tokens, cache.k, cache.v,
                                                      cache.k_scale, cache.v_scale, slot, pos0,
                                                      pos, mask)
        cache.advance(1)
        return logits

    def prefill(self, tokens: torch.Tensor, cache: KVCache,
                input_pos: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor | None:
        """T > 1 tokens of one row into a contiguous cache of one row, as rows of the C++
        step (its paged form, the cache seen as one block of max_len slots): every row's K/V
        written, then each row attends up to its own position. The K/V and logits have the
        bits that decoding the tokens one by one would give. Returns logits ``[1, T, V]``
        (``[1, 1, V]`` with ``last_only``), or None when this step cannot run it (the caller
        uses the forward): a batch, positions other than the cache's next slots, past the
        rotary table or a sliding window, or a long prompt (``rows_pay``)."""
        if tokens.shape[0] != 1 or cache.batch_size != 1:
            return None
        n, lo = tokens.shape[1], cache.length
        if not rows_pay(n, lo):
            return None
        if self.window is not None and lo + n > self.window:
            return None
        if self.rope_len is not None and lo + n > self.rope_len:
            return None
        lens = torch.arange(lo, lo + n)
        if input_pos is not None and not torch.equal(input_pos.reshape(-1).cpu(), lens):
            return None
        cache.check_room(n)

        def one_block(ts: list[torch.Tensor]) -> list[torch.Tensor]:  # [1, h, L, x] -> [h, 1, L, x]
            return [t.transpose(0, 1) for t in ts]

        rows = torch.tensor([n - 1]) if last_only else None
        logits = []
        for c0 in range(0, n, PREFILL_ROWS):  # the step's buffers grow with its rows
            c1 = min(n, c0 + PREFILL_ROWS)
            want = None if rows is None else (rows - c0 if c1 == n else rows[:0])
            logits.append(torch.ops.kvformer_native.plan_step_paged(
                self.handle, tokens[0, c0:c1, None], one_block(cache.k), one_block(cache.v),
                one_block(cache.k_scale), one_block(cache.v_scale),
                torch.zeros(c1 - c0, 1, dtype=torch.long), lens[c0:c1], want))
        cache.advance(n)
        return torch.cat(logits).transpose(0, 1)

    def paged(self, tokens: torch.Tensor, pool, tables: torch.Tensor,
              lengths: torch.Tensor, logit_rows: torch.Tensor | None = None
              ) -> torch.Tensor | None:
        """One token per row straight through a paged pool (``kvformer.kv.paged.BlockPool``:
        per layer ``[n_kv_head, n_blocks + 1, block_size, head_dim]``): row i has
        ``lengths[i]`` tokens cached in the blocks ``tables[i]`` (int64, padded with 0), and
        its new token is at position and slot ``lengths[i]``, which its table must already
        hold. Reads and writes the pool in place (no gathered copy); returns logits
        ``[B, 1, V]``, or None when this step cannot run it (the caller uses the forward).
        A quantized pool's rows are read and written with their scales (``pool.k_scale``).

        Every row's K/V is written before any row attends, so several rows may be
        consecutive tokens of one sequence (the same table, lengths p, p+1, ...): a prompt's
        prefill, causal through each row's own length, with the same bits as decoding those
        tokens one by one. No two rows may write the same slot. ``logit_rows`` (int64
        indices) asks for those rows' logits only, ``[len(logit_rows), 1, V]`` (empty: none):
        the LM head runs on them alone."""
        if pool.k[0].dtype not in _CACHE_DTYPES:
            return None
        top = int(lengths.max())
        if self.rope_len is not None and top >= self.rope_len:
            return None  # past the rotary table: the model computes it afresh
        if self.window is not None and top >= self.window:
            return None  # the window hides the oldest keys: the model computes it
        return torch.ops.kvformer_native.plan_step_paged(self.handle, tokens, pool.k, pool.v,
                                                         pool.k_scale, pool.v_scale, tables,
                                                         lengths, logit_rows)


class Executor:
    """A model and the way its calls run: ``native`` is the model's ``NativeStep`` or None
    (then every call is ``Transformer.forward``); ``why`` says which, and why not the other.
    Call it as the model's forward. Made by ``for_model``."""

    def __init__(self, model: nn.Module, native: bool | str | None = None):
        self.model = model
        self._asked = native
        self.native, self.why = _choose(model, native)

    def renew(self, position: int | None = None) -> bool:
        """A new plan if the model changed since this one was made; with ``position``, the
        rotary table is first grown to cover it (a long prompt or conversation goes past the
        table the plan was made with, which holds the positions in use, doubling on demand).
        Returns whether the step is now a different one."""
        rotary = self.model._modules.get("rotary")
        if position is not None and rotary is not None and hasattr(rotary, "ensure"):
            for name in ("rotary", "rotary_local"):
                table = self.model._modules.get(name)
                if table is not None:
                    table.ensure(position + 1)
        old = self.native
        self.native, self.why = _choose(self.model, self._asked)
        return self.native is not None and self.native is not old

    @property
    def name(self) -> str:
        """'native:<isa>' or 'forward'."""
        return f"native:{self.native.isa}" if self.native is not None else "forward"

    @property
    def isa(self) -> str | None:
        return self.native.isa if self.native is not None else None

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                 cache=None, key_mask: torch.Tensor | None = None, *,
                 last_only: bool = False) -> torch.Tensor:
        if (self.native is not None and type(cache) in _STEP_CACHES
                and cache.k[0].dtype in _CACHE_DTYPES and tokens.dtype == torch.long
                and tokens.shape[0] == cache.batch_size):
            for attempt in range(2):
                step = self.native
                if tokens.shape[1] == 1:
                    out = step.decode(tokens, cache, input_pos, key_mask)
                elif key_mask is None:
                    out = step.prefill(tokens, cache, input_pos, last_only)
                else:
                    out = None
                if out is not None:
                    return out
                # past the plan's rotary table: grow it and make a new plan, once
                top = (cache.length + tokens.shape[1] - 1 if input_pos is None
                       else int(input_pos.max()))
                if attempt or step.rope_len is None or top < step.rope_len or \
                        not self.renew(top):
                    break
        return self.model(tokens, input_pos, cache, key_mask, last_only=last_only)


_STEP_CACHES = (KVCache, QuantizedKVCache)
# model -> {native: (weights key, NativeStep or None, why)}. A NativeStep holds the model's
# tensors, not the model, so an entry goes when its model does.
_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_key(model: nn.Module) -> tuple:
    """What the C++ plan points at: a model whose layers were swapped since (quantized, its
    dtype changed, its rotary table grown) gets a new plan."""
    rotary = model._modules.get("rotary")
    return (model.dtype, id(model.tok_emb), tuple(id(m) for m in model.layers[0].modules()),
            id(model._modules.get("lm_head")), id(rotary.cos) if rotary is not None else None)


def _choose(model: nn.Module, native: bool | str | None) -> tuple[NativeStep | None, str]:
    """The C++ step of ``model`` (made once per model and weights), or None, and why."""
    made = _CHOSEN.setdefault(model, {})
    key = _weights_key(model)
    known = made.get(native)
    if known is not None and known[0] == key:
        return known[1], known[2]
    step = None
    if native is False:
        why = "Transformer.forward (the C++ step was turned off by the caller)"
    elif not native_lib.available():
        why = ("Transformer.forward (native kernels off: KVFORMER_NATIVE=0)"
               if native_lib.disabled() else
               f"Transformer.forward (no native kernels: {native_lib.build_error()})"
               if native_lib.build_error() else "Transformer.forward (no native kernels)")
    else:
        try:
            step = NativeStep(model, isa=native if isinstance(native, str) else None)
            why = f"the C++ step on the {step.isa} kernels"
        except Unsupported as exc:
            why = f"Transformer.forward ({exc})"
    made[native] = (key, step, why)
    return step, why


def for_model(model, native: bool | str | None = None) -> Executor:
    """The executor of ``model``: its C++ step where the native library is built and the
    model's parts are ones it implements, else ``Transformer.forward``. Decided once per
    model and its weights (a later call reuses the plan). ``native`` may name a kernel path
    ('avx2'), or be False to run the forward only. An ``Executor`` passed in is returned as
    it is. The first call builds the native library if it is missing (with a message on
    stderr), so ``kvformer.load`` calls it before the first token."""
    if isinstance(model, Executor):
        return model
    return Executor(model, native)


def describe(cfg) -> str:
    """What ``for_model`` would choose for a model of ``cfg`` with fp32 or bf16 activations
    (any weights kvformer makes), without building it: for ``kvformer info``."""
    try:
        StepPlan.check_config(cfg)
    except Unsupported as exc:
        return f"Transformer.forward ({exc})"
    if not native_lib.available(build_if_missing=False):
        return "Transformer.forward (native kernels not built: run `kvformer build`)"
    return f"the C++ step on the {native_lib.default_isa()} kernels"
