"""The decoder-only transformer: pre-norm residual blocks, a final norm, an LM head.

    x = embed(tokens) * embed_scale (+ positions, if added)
    for each block:  x = x + attention(norm(x));  x = x + mlp(norm(x))
    logits = lm_head(norm(x))

With ``post_norms`` each branch is normed once more before it is added (Gemma 2 and 3:
x = x + norm(attention(norm(x)))); with ``final_softcap`` the logits are soft-capped.
Windowed layers (``sliding_window``) get a banded mask and, with ``local_rope_theta``,
rotary positions of their own base.

One forward serves prefill (many tokens) and decode (one token): with a cache, the new
tokens' keys and values are written after the ``cache.length`` cached ones and attention
reads them all, so cached and uncached runs are the same code and give the same logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvformer.config import ModelConfig
from kvformer.errors import CheckpointError, ContextOverflowError
from kvformer.kv.cache import KVCache, QuantizedKVCache
from kvformer.kv.formats import KVFormat, kv_format
from kvformer.model.attention import ATTENTION_IMPLS, Attention, causal_mask
from kvformer.model.norms import make_norm
from kvformer.model.positions import LearnedPositions, Rotary, SinusoidalPositions


class MLP(nn.Module):
    """gelu: down(gelu(up(x))) with GPT-2's tanh-approximate GELU.
    swiglu: down(silu(gate(x)) * up(x)), as in Llama.
    geglu: down(gelu(gate(x)) * up(x)), tanh-approximate GELU, as in Gemma."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.gated_mlp:
            self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        if self.kind == "geglu":
            return self.w_down(F.gelu(self.w_gate(x), approximate="tanh") * self.w_up(x))
        return self.w_down(F.gelu(self.w_up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.windowed = cfg.windowed(layer_idx)
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        if cfg.post_norms:
            self.attn_post_norm = make_norm(cfg)
            self.mlp_post_norm = make_norm(cfg)

    def forward(self, x, rope, cache, start, mask, causal):
        h = self.attn(self.attn_norm(x), rope, cache, start, mask, causal)
        if "attn_post_norm" in self._modules:
            h = self.attn_post_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if "mlp_post_norm" in self._modules:
            h = self.mlp_post_norm(h)
        return x + h


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.kv_dtype = "auto"  # what new_cache stores K/V as by default (kvformer.kv.formats)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_emb = LearnedPositions(cfg.max_seq_len, cfg.d_model)
        elif cfg.pos == "sinusoidal":
            self.pos_emb = SinusoidalPositions(cfg.d_model)
        self.rotary, local = _rotaries(cfg)
        if local is not None:
            self.rotary_local = local
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: shrink the residual projections
            if name.endswith(("attn.wo.weight", "mlp.w_down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the final norm's: the embedding may be quantized)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def kv_format(self, kv_dtype=None) -> KVFormat:
        """The form a new KV cache stores K and V in. kv_dtype: 'fp32', 'bf16', 'int8',
        'int4', a torch float dtype, or None / 'auto': the model's ``kv_dtype`` (set by
        ``kvformer.load(..., kv_dtype=...)``), whose 'auto' is the activations' dtype."""
        if kv_dtype is None:
            kv_dtype = getattr(self, "kv_dtype", "auto")
        if kv_dtype == "auto":
            kv_dtype = self.dtype
        fmt = kv_format(kv_dtype)
        fmt.check(self.cfg.head_dim)
        return fmt

    def new_cache(self, batch_size: int = 1, max_len: int | None = None,
                  dtype=None) -> KVCache:
        """A preallocated KV cache for this model: [batch, n_kv_head, max_len, head_dim]
        per layer for K and for V, in the form ``dtype`` names (``kv_format``): a
        ``KVCache`` of floats, or a ``QuantizedKVCache`` for 'int8' and 'int4'."""
        cfg = self.cfg
        max_len = max_len or cfg.max_seq_len
        for rotary in (self.rotary, self._modules.get("rotary_local")):
            if rotary is not None:  # the positions this cache can hold, tabulated now
                rotary.ensure(max_len)
        fmt = self.kv_format(dtype)
        if fmt.quantized:
            return QuantizedKVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len,
                                    cfg.head_dim, fmt, device=self.device)
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim,
                       dtype=fmt.float_dtype, device=self.device)

    def set_attention(self, impl: str) -> Transformer:
        """'fused' (torch's kernel, the default) or 'reference' (the seed's formula)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl {impl!r} is not one of {list(ATTENTION_IMPLS)}")
        for block in self.layers:
            block.attn.attend = ATTENTION_IMPLS[impl]
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None, *, last_only: bool = False
                ) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]: the LM head over ``hidden_states``."""
        x = self.hidden_states(tokens, input_pos, cache, key_mask, last_only=last_only)
        if "lm_head" in self._modules:  # untied, or a quantized copy of the tied embedding
            logits = self.lm_head(x)
        else:
            logits = F.linear(x, self.tok_emb.weight)
        cap = self.cfg.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def hidden_states(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                      cache: KVCache | None = None,
                      key_mask: torch.Tensor | None = None, *, last_only: bool = False
                      ) -> torch.Tensor:
        """tokens [B, T] -> the last layer's output after the final norm [B, T, d_model]
        (what the LM head reads; the server's embeddings pool it).

        input_pos: positions of the tokens for the positional encoding, [T] or [B, T]
            (per row, e.g. for left-padded batches); default start .. start+T-1, where
            start is the number of cached tokens.
        cache: written at slots [cache.length, cache.length + T); its length then grows.
        key_mask: bool [B, cache.length + T], False for slots attention must ignore
            (padding). Causality always holds on top of it.
        last_only: logits of the last position only, [B, 1, vocab] (all generation needs:
            the LM head, the largest matmul, then runs on one row instead of T).
        """
        b, t = tokens.shape
        start = cache.length if cache is not None else 0
        if cache is not None:
            cache.check_room(t)
            if key_mask is None:
                key_mask = cache.key_mask(t)  # None for a contiguous cache with no padding
        if input_pos is None:
            input_pos = torch.arange(start, start + t, device=tokens.device)
        if input_pos.shape[-1] != t:
            raise ValueError(f"input_pos has {input_pos.shape[-1]} positions for {t} tokens")

        x = self.tok_emb(tokens)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        if self.cfg.pos in ("learned", "sinusoidal"):
            x = x + self.pos_emb(input_pos).to(x.dtype)
        rope = rope_local = None
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(input_pos)
            rope = rope_local = (cos.to(x.dtype), sin.to(x.dtype))
        if "rotary_local" in self._modules:
            cos, sin = self.rotary_local.cos_sin(input_pos)
            rope_local = (cos.to(x.dtype), sin.to(x.dtype))

        mask, causal = None, True
        if key_mask is not None:
            if key_mask.shape != (b, start + t):
                raise ValueError(f"key_mask must be [{b}, {start + t}], got "
                                 f"{list(key_mask.shape)}")
            # [B, 1, T, S]: causal and not padding; a query always sees its own slot, so
            # a padding query never has an all-masked row (softmax of all -inf is NaN)
            allowed = causal_mask(t, start + t, tokens.device) & key_mask[:, None, :]
            own = torch.arange(t, device=tokens.device)
            allowed[:, own, start + own] = True
            mask, causal = allowed[:, None], False
        elif t == 1:
            causal = False  # one new token may see every cached one: no mask at all
        window = self.cfg.sliding_window
        local_mask, local_causal = mask, causal
        if window is not None and start + t > window:  # shorter: the window hides nothing
            band = causal_mask(t, start + t, tokens.device, window)  # [T, S]
            local_mask = band if mask is None else mask & band
            local_causal = False

        for block in self.layers:
            if block.windowed:
                x = block(x, rope_local, cache, start, local_mask, local_causal)
            else:
                x = block(x, rope, cache, start, mask, causal)
        if cache is not None:
            cache.advance(t)
        return self.norm(x[:, -1:] if last_only else x)

    def check_context(self, n_tokens: int) -> None:
        if n_tokens > self.cfg.max_seq_len:
            raise ContextOverflowError(
                f"{n_tokens} tokens do not fit in the context of {self.cfg.max_seq_len}; "
                "shorten the prompt or ask for fewer new tokens")

    # ------------------------------------------------------------------ weights in and out
    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                        strict: bool = True) -> Transformer:
        """Build a model around existing tensors without a random initialisation first
        (built on the meta device, then the tensors are assigned)."""
        with torch.device("meta"):
            model = cls(cfg)
        try:
            missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        except RuntimeError as exc:  # shape mismatches
            raise CheckpointError(f"weights do not match the config: {exc}") from exc
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"weights do not match the config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}")
        model.rotary, local = _rotaries(cfg)  # non-persistent buffers: rebuilt, not loaded
        if local is not None:
            model.rotary_local = local
        return model.eval()



def _rotaries(cfg: ModelConfig) -> tuple[Rotary | None, Rotary | None]:
    """The rotary positions of the model's layers and, with ``local_rope_theta``, the
    unscaled ones of its windowed layers."""
    if cfg.pos != "rope":
        return None, None
    rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
    local = (Rotary(cfg.head_dim, cfg.max_seq_len, cfg.local_rope_theta)
             if cfg.local_rope_theta is not None else None)
    return rotary, local
