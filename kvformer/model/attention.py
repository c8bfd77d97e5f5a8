"""Scaled dot-product attention, the seed's formula, and the attention layer around it.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

Why the scale: for q and k with independent unit-variance entries, q.k is a sum of d_k
terms and has variance d_k. Unscaled, the scores grow with the head size, the softmax
saturates toward a one-hot vector, and a query attends to one token only (with vanishing
gradients). Dividing by sqrt(d_k) brings the variance back to 1 and keeps it diffuse.

Some models change the formula in small, named ways, each a ModelConfig field: another
scale (Gemma's 1/sqrt(query_pre_attn_scalar)), soft-capped scores c * tanh(s / c) (Gemma
2), a sliding window (a query sees only the last W positions), RMSNorm on each head's q
and k (Qwen3, Gemma 3).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvformer.config import ModelConfig
from kvformer.model.norms import RMSNorm
from kvformer.model.positions import apply_rotary


def causal_mask(t_q: int, t_k: int, device=None, window: int | None = None) -> torch.Tensor:
    """Bool [t_q, t_k], True where a query may look. The t_q queries are the last t_q of
    the t_k positions (earlier ones are already in the cache): query i sits at position
    t_k - t_q + i and sees keys 0 .. t_k - t_q + i. With a sliding ``window`` W it sees
    only the last W of them (its own position and the W - 1 before it)."""
    offset = t_k - t_q
    q_pos = torch.arange(t_q, device=device).unsqueeze(1) + offset
    k_pos = torch.arange(t_k, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


def attention_weights(q: torch.Tensor, k: torch.Tensor, causal: bool = True,
                      mask: torch.Tensor | None = None, scale: float | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) with the causal mask, as probabilities [B, Hq, Tq, Tk].

    q is [B, Hq, Tq, d_k]; k is [B, Hkv, Tk, d_k] with Hkv dividing Hq (grouped-query):
    query head h reads KV head h // (Hq // Hkv). The KV heads are broadcast, not copied.
    mask: bool (True = may attend) or additive float, broadcastable to [B, Hq, Tq, Tk].
    scale: a model's own factor on Q K^T in place of 1/sqrt(d_k); softcap: scores s
    become softcap * tanh(s / softcap) before the mask.
    """
    b, h_q, t_q, d_k = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    if h_q % h_kv:
        raise ValueError(f"{h_q} query heads cannot share {h_kv} KV heads evenly")
    group = h_q // h_kv
    qg = q.reshape(b, h_kv, group, t_q, d_k)  # query heads grouped by the KV head they read
    scores = qg @ k.unsqueeze(2).transpose(-2, -1)  # Q K^T: [B, Hkv, G, Tq, Tk]
    scores = scores.reshape(b, h_q, t_q, t_k).float()
    if scale is None:
        scores = scores / math.sqrt(d_k)  # scale by 1/sqrt(d_k)
    else:
        scores = scores * scale  # the model's own scale, written out the same way
    if softcap is not None:  # bounded scores: c * tanh(s / c)
        scores = torch.tanh(scores / softcap) * softcap
    if causal:
        scores = scores.masked_fill(~causal_mask(t_q, t_k, q.device), float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return torch.softmax(scores, dim=-1)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 causal: bool = True, mask: torch.Tensor | None = None,
                                 scale: float | None = None,
                                 softcap: float | None = None) -> torch.Tensor:
    """The seed's formula, line by line: softmax(Q K^T / sqrt(d_k)) V.

    Shapes as in ``attention_weights``; v is [B, Hkv, Tk, d_v]. Returns [B, Hq, Tq, d_v].
    """
    weights = attention_weights(q, k, causal, mask, scale, softcap).to(v.dtype)
    b, h_q, t_q, t_k = weights.shape
    h_kv = v.shape[1]
    out = weights.reshape(b, h_kv, h_q // h_kv, t_q, t_k) @ v.unsqueeze(2)  # ... times V
    return out.reshape(b, h_q, t_q, v.shape[-1])


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    mask: torch.Tensor | None = None, scale: float | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """The same computation through torch's fused kernel (checked against the formula).
    The kernel cannot soft-cap scores: with ``softcap`` the formula runs instead."""
    if softcap is not None:
        return scaled_dot_product_attention(q, k, v, causal, mask, scale, softcap)
    if q.dtype in _HALF and q.device.type == "cpu" and _half_flash_refused():
        with sdpa_kernel(SDPBackend.MATH):
            return _fused(q, k, v, causal, mask, scale)
    return _fused(q, k, v, causal, mask, scale)


_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def _half_flash_refused() -> bool:
    """Whether torch's CPU flash attention refuses bf16/fp16 here. On a CPU with AMX, torch
    2.13 takes its AMX path for them whatever ``ATEN_CPU_CAPABILITY`` says, and that path
    fails below AVX-512 ("pack_vnni2 is only supported when avx512 is supported"): such a
    machine made to dispatch as a lower CPU (``make test`` does) runs torch's math kernel
    for them instead, the same computation."""
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "amx_fp16" in flags


def _fused(q, k, v, causal, mask, scale) -> torch.Tensor:
    t_q, t_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if causal and mask is None and t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa,
                                              scale=scale)
    if mask is not None and mask.dim() < 4:  # the fused kernel wants 4 dims to broadcast
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if causal:
        cm = causal_mask(t_q, t_k, q.device)
        mask = cm if mask is None else (mask & cm if mask.dtype == torch.bool
                                        else mask.masked_fill(~cm, float("-inf")))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)


ATTENTION_IMPLS = {"reference": scaled_dot_product_attention, "fused": fused_attention}


class Attention(nn.Module):
    """Projections to Q, K, V (fewer K/V heads for GQA/MQA), norms on q and k (if the
    config has them), rotary positions, the cache, attention, and the output projection."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        if cfg.qk_norm:  # one RMSNorm over head_dim, shared by every head
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.attend = fused_attention
        self.weights_sink: list | None = None  # set by kvformer.inspect to record weights

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache=None, start: int = 0, mask: torch.Tensor | None = None,
                causal: bool = True) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if "q_norm" in self._modules:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, start)
            if k.dtype != q.dtype:  # a cache kept in another float dtype than the model's
                k, v = k.to(q.dtype), v.to(q.dtype)
        if self.weights_sink is not None:
            weights = attention_weights(q, k, causal, mask, self.scale, self.softcap)
            self.weights_sink.append(weights.detach())
            out = scaled_dot_product_attention(q, k, v, causal, mask, self.scale, self.softcap)
        else:
            out = self.attend(q, k, v, causal, mask, self.scale, self.softcap)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))
