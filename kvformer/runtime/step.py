"""The lean decode step: one new token per row, through the same weights, with less work.

``Transformer.forward`` is written to be read; at decode (one token, batch 1..8) its
cost is mostly per-op overhead, not arithmetic. ``DecodeStep`` computes the same thing
with as few tensor operations as it can:

* one matmul for Q, K and V and one for gate and up when the model's weights are fused
  (``kvformer.runtime.quant`` fuses them when it quantizes);
* rotary positions as ``x * cos + roll(x) * sin`` on Q and K together, with the
  1/sqrt(d_k) of the attention folded into the query's cos/sin (a power of two for
  head_dim 64 or 256, so exact);
* attention written as the seed's formula, softmax(Q K^T / sqrt(d_k)) V, for the one new
  query over the filled part of the cache only (no mask at all without padding);
* the norms as single fused kernels, the residual stream updated in place, and the K/V
  of the new token written straight into the ``KVCache`` buffers (a ``QuantizedKVCache``
  quantizes them through its ``update``; the C++ step writes and reads the int8 / int4 rows
  itself, dequantizing inside its attention kernel).

Both this step and ``NativeDecodeStep``, the C++ one (much faster once matmuls are
quantized; the library is ``kvformer.runtime.native``'s), read the same named description of the
step, ``kvformer.runtime.plan.StepPlan``;
``decode_step(model)`` picks the C++ step when the native library is built and this one
otherwise. ``accelerate(model)`` routes a model's decode steps through it, and with the C++
step also the prefill of one row into its cache (the prompt's tokens as rows of one step:
``NativeDecodeStep.prefill``); every other call (a batch's prefill, gradients, any cache
other than the contiguous ``KVCache`` and ``QuantizedKVCache``) goes through
``Transformer.forward`` as before. The server runs the C++ step over its paged pool itself
(``NativeDecodeStep.paged``). Checked against
``Transformer.forward`` in ``tests/test_fast.py``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kvformer.kv.cache import KVCache, QuantizedKVCache
from kvformer.runtime import native as native_lib
from kvformer.runtime.plan import LinearPlan, NormPlan, StepPlan, Unsupported


def _linear_fn(lp: LinearPlan):
    """x [M, K] -> x W^T (+ b) through the cheapest call for this kind of layer."""
    bias = lp.bias
    if lp.kind == "dense":
        weight = lp.weight
        return lambda x: F.linear(x, weight, bias)
    mm = lp.module.small_mm  # kvformer's kernels, or torch's without the native library
    if bias is None:
        return mm
    return lambda x: mm(x).add_(bias)


def _norm_fn(norm: NormPlan, dim: int, dtype: torch.dtype):
    """x [B, D] -> norm(x) as one fused kernel.

    RMSNorm has no fused CPU kernel in torch, but LayerNorm does, and the RMS norm of x is
    the LayerNorm of [x, -x] (mean 0, variance mean(x^2)) restricted to its first half."""
    if norm.rms:
        weight = torch.cat([norm.weight, torch.zeros_like(norm.weight)]).to(dtype)
        eps, shape = norm.eps, (2 * dim,)

        def rms(x, buf):
            buf[:, :dim] = x
            torch.neg(x, out=buf[:, dim:])
            return F.layer_norm(buf, shape, weight, None, eps)[:, :dim].contiguous()
        return rms
    weight = norm.weight.to(dtype)
    bias = norm.bias.to(dtype) if norm.bias is not None else None
    return lambda x, buf: F.layer_norm(x, (dim,), weight, bias, norm.eps)


class _Layer:
    __slots__ = ("attn_norm", "qkv", "q", "k", "v", "wo", "mlp_norm", "gate_up", "gate", "up",
                 "down", "idx")


class DecodeStep:
    """``step(tokens [B, 1], cache, input_pos=None, key_mask=None) -> logits [B, 1, V]`` for
    a model with rotary (or no) positions and RMS/LayerNorm, read from its ``StepPlan``;
    ``supported`` says whether this model can use it."""

    def __init__(self, model: nn.Module):
        self.model, self.cfg = model, model.cfg
        try:
            plan = StepPlan.from_model(model)
        except Unsupported:
            self.supported = False
            return
        self.no_sinks = all(b.attn.weights_sink is None for b in model.layers)
        self.supported = True
        self.plan = plan
        self.dtype = plan.act_dtype
        d, hd = plan.d_model, plan.head_dim
        self.n_q, self.n_kv, self.hd = plan.n_head, plan.n_kv_head, hd
        self.group = plan.n_head // plan.n_kv_head
        self.swiglu = plan.swiglu
        self.layers = [self._layer(i, lp, d) for i, lp in enumerate(plan.layers)]
        self.final_norm = _norm_fn(plan.final_norm, d, self.dtype)
        self.head = _linear_fn(plan.head)
        if plan.embed_kind == "dense":
            table = plan.embed_weight
            self.embed = lambda tokens: F.embedding(tokens, table)
        else:
            self.embed = model.tok_emb  # int8 rows: its own lookup
        if plan.rope:
            # rotate-half: x * cos + cat(-x2, x1) * sin == x * cos + roll(x, half) * sin_signed
            half = hd // 2
            sign = torch.cat([-torch.ones(half), torch.ones(half)])
            self.cos, self.sin = plan.cos.to(self.dtype), (plan.sin * sign).to(self.dtype)
        # 1/sqrt(d_k) folded into the query heads (their rotation, with rotary positions)
        scale = torch.ones(self.n_q + self.n_kv, 1)
        scale[:self.n_q] = plan.q_scale
        self.head_scale = scale.to(self.dtype)
        self._bufs: dict[int, torch.Tensor] = {}

    def _layer(self, i: int, lp, d: int) -> _Layer:
        L = _Layer()
        L.idx = i
        L.attn_norm = _norm_fn(lp.attn_norm, d, self.dtype)
        L.mlp_norm = _norm_fn(lp.mlp_norm, d, self.dtype)
        for name in ("qkv", "q", "k", "v", "wo", "gate_up", "gate", "up", "down"):
            part = getattr(lp, name)
            setattr(L, name, _linear_fn(part) if part is not None else None)
        return L

    def usable(self, tokens: torch.Tensor, cache) -> bool:
        return (self.supported and tokens.shape[1] == 1
                and (type(cache) is QuantizedKVCache
                     or type(cache) is KVCache and cache.k[0].dtype == self.dtype)
                and tokens.shape[0] == cache.batch_size
                and self.no_sinks)

    def _norm_buf(self, b: int) -> torch.Tensor:
        buf = self._bufs.get(b)
        if buf is None:
            buf = self._bufs[b] = torch.empty(b, 2 * self.cfg.d_model, dtype=self.dtype)
        return buf

    def __call__(self, tokens: torch.Tensor, cache: KVCache,
                 input_pos: torch.Tensor | None = None,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b = tokens.shape[0]
        slot = cache.length
        if self.plan.window is not None and slot >= self.plan.window:
            return None  # the window now hides the oldest keys: the model computes it
        cache.check_room(1)
        n_q, n_kv, hd, g = self.n_q, self.n_kv, self.hd, self.group
        n_qk = (n_q + n_kv) * hd
        buf = self._norm_buf(b)
        x = self.embed(tokens.view(b))  # [B, D], a fresh tensor: updated in place

        rope = self.cfg.pos == "rope"
        if rope:
            pos = slot if input_pos is None else input_pos.reshape(-1, 1)[:, 0]
            if isinstance(pos, torch.Tensor) and pos.numel() == 1:
                pos = int(pos)
            if isinstance(pos, int):
                if pos >= self.cos.shape[0]:
                    return None  # past the rotary table: the model computes it afresh
                cos, sin = self.cos[pos], self.sin[pos]  # [hd]
            else:
                if int(pos.max()) >= self.cos.shape[0]:
                    return None
                cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # [B, 1, hd]
            cos, sin = cos * self.head_scale, sin * self.head_scale  # [(B,) H, hd]
            half = hd // 2
        quantized = type(cache) is QuantizedKVCache
        bias = None
        if key_mask is not None:
            bias = torch.zeros(b, 1, 1, slot + 1, dtype=self.dtype)
            bias.masked_fill_(~key_mask.view(b, 1, 1, slot + 1), float("-inf"))
            bias[..., slot] = 0  # a query always sees its own slot

        for L in self.layers:
            h = L.attn_norm(x, buf)
            if L.qkv is not None:
                qkv = L.qkv(h)
                qk = qkv[:, :n_qk].view(b, n_q + n_kv, hd)
                v = qkv[:, n_qk:].view(b, n_kv, hd)
            else:
                qk = torch.cat([L.q(h), L.k(h)], dim=1).view(b, n_q + n_kv, hd)
                v = L.v(h).view(b, n_kv, hd)
            if rope:
                qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)
            else:
                qk = qk * self.head_scale
            q = qk[:, :n_q].view(b, n_kv, g, hd)
            if quantized:  # its rows are integers: it writes them and gives back numbers
                keys, values = cache.update(L.idx, qk[:, n_q:, None], v[:, :, None], slot)
            else:
                kc, vc = cache.k[L.idx], cache.v[L.idx]
                kc.select(2, slot).copy_(qk[:, n_q:])
                vc.select(2, slot).copy_(v)
                keys, values = kc[:, :, :slot + 1], vc[:, :, :slot + 1]
            # softmax(Q K^T / sqrt(d_k)) V for the one new query (1/sqrt(d_k) is in q)
            scores = torch.matmul(q, keys.transpose(-1, -2))  # [B, Hkv, G, S]
            if bias is not None:
                scores = scores + bias
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
            if weights.dtype != values.dtype:
                weights = weights.to(values.dtype)
            out = torch.matmul(weights, values).view(b, n_q * hd)
            x.add_(L.wo(out))
            h = L.mlp_norm(x, buf)
            if self.swiglu:
                if L.gate_up is not None:
                    gu = L.gate_up(h)
                    f = gu.shape[1] // 2
                    a = F.silu(gu[:, :f]).mul_(gu[:, f:])
                else:
                    a = F.silu(L.gate(h)).mul_(L.up(h))
            else:
                a = F.gelu(L.up(h), approximate="tanh")
            x.add_(L.down(a))
        cache.advance(1)
        return self.head(self.final_norm(x, buf)).unsqueeze(1)


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


class NativeDecodeStep:
    """The same contract as ``kvformer.runtime.step.DecodeStep``, computed by the C++ operator on the
    kernels of ``isa`` (default: ``default_isa()``)."""

    def __init__(self, model: nn.Module, isa: str | None = None):
        self.model = model
        self.supported = False
        if not native_lib.available():
            return
        try:
            plan = StepPlan.from_model(model)
        except Unsupported:
            return
        self.isa = isa or native_lib.default_isa()
        names = plan.named()
        self.handle = torch.ops.kvformer_native.plan_new(
            list(names.tensors), list(names.tensors.values()), list(names.ints),
            list(names.ints.values()), list(names.reals), list(names.reals.values()), self.isa)
        self.rope_len, self.window = plan.rope_len, plan.window
        # attention sinks are not in the plan (the forward computes such a model)
        self.no_sinks = all(b.attn.weights_sink is None for b in model.layers)
        self.supported = True

    def __del__(self):
        handle = getattr(self, "handle", None)
        if handle is not None:
            try:
                torch.ops.kvformer_native.plan_free(handle)
            except Exception:  # interpreter shutdown
                pass

    def usable(self, tokens: torch.Tensor, cache) -> bool:
        return (self.supported and tokens.shape[1] == 1
                and type(cache) in (KVCache, QuantizedKVCache)
                and tokens.shape[0] == cache.batch_size and tokens.dtype == torch.long
                and cache.k[0].dtype in _CACHE_DTYPES
                and self.no_sinks)

    def __call__(self, tokens: torch.Tensor, cache: KVCache,
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
        if not (self.supported and tokens.dim() == 2 and tokens.shape[0] == 1
                and tokens.dtype == torch.long and type(cache) in (KVCache, QuantizedKVCache)
                and cache.batch_size == 1 and cache.k[0].dtype in _CACHE_DTYPES
                and self.no_sinks):
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
        if not (self.supported and tokens.dim() == 2 and tokens.shape[1] == 1
                and tokens.dtype == torch.long and pool.k[0].dtype in _CACHE_DTYPES
                and self.no_sinks):
            return None
        top = int(lengths.max())
        if self.rope_len is not None and top >= self.rope_len:
            return None  # past the rotary table: the model computes it afresh
        if self.window is not None and top >= self.window:
            return None  # the window hides the oldest keys: the model computes it
        return torch.ops.kvformer_native.plan_step_paged(self.handle, tokens, pool.k, pool.v,
                                                         pool.k_scale, pool.v_scale, tables,
                                                         lengths, logit_rows)



def decode_step(model: nn.Module, native: bool | str | None = None):
    """The fastest decode step this machine has for ``model``: the C++ operator of
    ``kvformer.runtime.native`` (``native`` may name its kernel path, e.g. 'avx2'; ``False`` or
    ``KVFORMER_NATIVE=0`` skips it), else the Python ``DecodeStep``. Check ``.supported``
    before use."""
    if native is not False:
        step = NativeDecodeStep(model, isa=native if isinstance(native, str) else None)
        if step.supported:
            return step
    return DecodeStep(model)


class FastForward:
    """Stands in for ``model.forward``: decode steps (one token per row, a ``KVCache``, no
    gradients) go through ``decode_step(model)``; every other call goes to
    ``Transformer.forward``."""

    def __init__(self, model: nn.Module, native: bool | str | None = None):
        self.model = model
        self.native = native
        self.original = type(model).forward.__get__(model)
        self._step = None
        self._key = None

    def step(self):
        """The decode step for the model's current weights (rebuilt if they were swapped)."""
        m = self.model
        rotary = m._modules.get("rotary")
        key = (m.dtype, id(m.tok_emb), tuple(id(mod) for mod in m.layers[0].modules()),
               id(m._modules.get("lm_head")), id(rotary.cos) if rotary is not None else None)
        if self._step is None or key != self._key:
            self._step, self._key = decode_step(m, self.native), key
        return self._step

    def reset(self) -> None:
        """Forget the decode step (it is rebuilt from the current weights on next use)."""
        self._step = self._key = None

    # A copy or a pickle of the model gets a FastForward of its own, never this one's step
    # (which points at this model's tensors).
    def __deepcopy__(self, memo):
        return FastForward(copy.deepcopy(self.model, memo), self.native)

    def __getstate__(self):
        return {"model": self.model, "native": self.native}

    def __setstate__(self, state):
        self.__init__(state["model"], state["native"])

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                 cache=None, key_mask: torch.Tensor | None = None, *,
                 last_only: bool = False) -> torch.Tensor:
        if cache is not None and not torch.is_grad_enabled():
            step = self.step()
            if tokens.shape[1] == 1:
                if step.usable(tokens, cache):
                    out = step(tokens, cache, input_pos, key_mask)
                    if out is not None:
                        return out
            elif key_mask is None and isinstance(step, NativeDecodeStep):
                out = step.prefill(tokens, cache, input_pos, last_only)
                if out is not None:
                    return out
        return self.original(tokens, input_pos, cache, key_mask, last_only=last_only)


def accelerate(model: nn.Module, native: bool | str | None = None) -> nn.Module:
    """Route the model's decode steps through the fast decode step (in place; returns the
    model). Call it once the weights are final (after ``quantize_model``); calling it again
    rebuilds the step from the current weights. The step is made now, so a first build of
    the native library happens here (with a message on stderr), never mid-generation."""
    current = model.__dict__.get("forward")
    if isinstance(current, FastForward) and current.native == native:
        current.reset()
    else:
        model.forward = FastForward(model, native)
    model.forward.step()
    return model
