"""One config dataclass for every architecture kvformer runs.

Attention kind is read off the head counts, exactly as the seed puts it:
multi-head (n_kv_head == n_head), grouped-query (1 < n_kv_head < n_head, each KV head
shared by n_head // n_kv_head query heads) and multi-query (n_kv_head == 1).

Every way the supported model families differ is a field here that the model reads
(``docs/models.md`` lists which family sets which): rotary scaling, norms on q and k,
norms after attention and the MLP, the embedding scale, the attention scale, soft-capping,
sliding windows on some layers with their own rotary base. The model never asks which
vendor a checkpoint came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from kvformer.kv.formats import kv_format

NORMS = ("layernorm", "rmsnorm", "batchnorm")
POSITIONS = ("learned", "sinusoidal", "rope", "none")
MLPS = ("gelu", "swiglu", "geglu")


# ------------------------------------------------------------------ rotary scalings
ROPE_SCALINGS = ("linear", "dynamic", "llama3", "yarn", "longrope", "factors")
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
             "attention_factor", "truncate"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings",
                 "attention_factor"),
    "factors": ("factors",),
}
_PER_FREQUENCY = ("short_factor", "long_factor", "factors")  # lists of head_dim/2 numbers


def check_rope_scaling(scaling: dict | None, head_dim: int) -> None:
    """Raise ValueError unless ``scaling`` is None or a complete, valid scaling dict."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling={scaling!r} must be a dict with a 'type'")
    kind = scaling.get("type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope scaling type {kind!r} is not one of {', '.join(ROPE_SCALINGS)}")
    want = set(ROPE_SCALING_KEYS[kind])
    have = set(scaling) - {"type"}
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        raise ValueError(f"{kind} rope scaling needs exactly {', '.join(sorted(want))}"
                         + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; unknown {', '.join(extra)}" if extra else ""))
    for key in want:
        value = scaling[key]
        if key in _PER_FREQUENCY:
            if (not isinstance(value, (list, tuple)) or len(value) != head_dim // 2
                    or not all(isinstance(v, (int, float)) and v > 0 for v in value)):
                raise ValueError(f"{kind} rope scaling: {key} must be {head_dim // 2} positive "
                                 f"numbers (one per frequency of head_dim {head_dim})")
        elif key == "truncate":
            if not isinstance(value, bool):
                raise ValueError(f"yarn rope scaling: truncate={value!r} must be true or false")
        elif (not isinstance(value, (int, float)) or isinstance(value, bool)
              or not value > 0 or not math.isfinite(value)):
            raise ValueError(f"{kind} rope scaling: {key}={value!r} must be a positive number")
    if kind == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
        raise ValueError("llama3 rope scaling: low_freq_factor and high_freq_factor must differ")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (multi-head attention)
    head_dim: int | None = None  # None -> d_model // n_head
    d_ff: int | None = None  # None -> 4 * d_model
    max_seq_len: int = 256
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    pos: str = "rope"
    rope_theta: float = 10000.0
    mlp: str = "swiglu"
    bias: bool = False  # biases on every linear layer and on the norms (GPT-2 style)
    qkv_bias: bool | None = None  # None -> bias; Qwen2 has q/k/v biases and nothing else
    tie_embeddings: bool = False
    # rotary scaling: None, or {"type": one of ROPE_SCALINGS, ...its parameters}
    rope_scaling: dict | None = None
    qk_norm: bool = False  # RMSNorm over each head's q and k before rotary (Qwen3, Gemma 3)
    post_norms: bool = False  # also a norm on the attention and MLP outputs (Gemma 2, 3)
    embed_scale: float = 1.0  # embeddings multiplied by this (Gemma: sqrt(d_model))
    attn_scale: float | None = None  # the factor on Q K^T; None -> 1/sqrt(head_dim)
    attn_softcap: float | None = None  # scores s -> c * tanh(s / c) before the mask (Gemma 2)
    final_softcap: float | None = None  # logits l -> c * tanh(l / c) (Gemma 2)
    # a windowed layer's query sees its own position and the sliding_window - 1 before it
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None  # windowed layers; None: all of them
    local_rope_theta: float | None = None  # unscaled rotary base of windowed layers (Gemma 3)
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None and self.n_head > 0:
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.sliding_layers is not None:  # JSON gives a list back
            self.sliding_layers = tuple(self.sliding_layers)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim",
                     "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_kv_head > self.n_head:
            raise ValueError(
                f"n_kv_head={self.n_kv_head} is larger than n_head={self.n_head}; "
                "each KV head must serve at least one query head")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                f"grouped-query attention needs n_kv_head to divide n_head")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not one of {', '.join(NORMS)}")
        if self.pos not in POSITIONS:
            raise ValueError(f"pos={self.pos!r} is not one of {', '.join(POSITIONS)}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp={self.mlp!r} is not one of {', '.join(MLPS)}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary positions")
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even for sinusoidal positions")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0")
        if self.pos == "rope" and not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0")
        if self.rope_scaling is not None or self.local_rope_theta is not None:
            if self.pos != "rope":
                raise ValueError("rope_scaling and local_rope_theta need pos='rope'")
            check_rope_scaling(self.rope_scaling, self.head_dim)
        for name in ("embed_scale", "attn_scale", "attn_softcap", "final_softcap",
                     "local_rope_theta"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not 0 < value < float("inf")):
                raise ValueError(f"{name}={value!r} must be a positive number")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window={self.sliding_window!r} must be a positive integer")
        if self.sliding_layers is not None:
            if self.sliding_window is None:
                raise ValueError("sliding_layers is set but sliding_window is not")
            bad = [i for i in self.sliding_layers if not 0 <= i < self.n_layer]
            if bad:
                raise ValueError(f"sliding_layers {bad} are not layers of a {self.n_layer}-layer "
                                 "model")
        if self.local_rope_theta is not None and self.sliding_window is None:
            raise ValueError("local_rope_theta is for windowed layers, but sliding_window is "
                             "not set")

    # ------------------------------------------------------------------ derived values
    @property
    def group_size(self) -> int:
        """Query heads that share one KV head."""
        return self.n_head // self.n_kv_head

    @property
    def gated_mlp(self) -> bool:
        """The MLP has a gate matrix (swiglu, geglu)."""
        return self.mlp in ("swiglu", "geglu")

    def windowed(self, layer: int) -> bool:
        """Whether ``layer`` attends through the sliding window."""
        return self.sliding_window is not None and (
            self.sliding_layers is None or layer in self.sliding_layers)

    @property
    def attention_kind(self) -> str:
        if self.n_kv_head == self.n_head:
            return "MHA"
        if self.n_kv_head == 1:
            return "MQA"
        return "GQA"

    def rope_summary(self) -> str | None:
        """The rotary positions in words (None without them), for ``kvformer info``."""
        if self.pos != "rope":
            return None
        text = f"theta {self.rope_theta:g}"
        s = self.rope_scaling
        if s is not None:
            params = ", ".join(
                f"{k} [{len(v)} values, {min(v):g}..{max(v):g}]" if isinstance(v, list)
                else f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in s.items() if k != "type")
            text += f"; {s['type']} scaling ({params})"
        if self.local_rope_theta is not None:
            text += f"; windowed layers: theta {self.local_rope_theta:g}, unscaled"
        return text

    def block_summary(self) -> str | None:
        """What this model's blocks add to a plain pre-norm block, in words (None: nothing)."""
        parts = []
        if self.qk_norm:
            parts.append("RMSNorm on q and k")
        if self.post_norms:
            parts.append("norms after attention and MLP")
        if self.embed_scale != 1.0:
            parts.append(f"embeddings x {self.embed_scale:g}")
        if self.attn_scale is not None and abs(self.attn_scale * self.head_dim ** 0.5 - 1) > 1e-6:
            parts.append(f"attention scale {self.attn_scale:.4g} (1/sqrt(head_dim) = "
                         f"{self.head_dim ** -0.5:.4g})")
        if self.attn_softcap is not None:
            parts.append(f"scores soft-capped at {self.attn_softcap:g}")
        if self.final_softcap is not None:
            parts.append(f"logits soft-capped at {self.final_softcap:g}")
        if self.sliding_window is not None:
            layers = ("every layer" if self.sliding_layers is None else
                      f"{len(self.sliding_layers)} of {self.n_layer} layers")
            parts.append(f"sliding window {self.sliding_window} on {layers}")
        return "; ".join(parts) or None

    def kv_cache_bytes(self, seq_len: int, batch_size: int = 1, kv_dtype="fp32") -> int:
        """Bytes of a KV cache: 2 (K and V) * layers * KV heads * positions * batch * the
        bytes of one head's row: head_dim numbers, plus their scales for int8 and int4
        (``kvformer.kv.formats``). kv_dtype: 'fp32', 'bf16', 'fp16', 'int8', 'int4' or a torch
        float dtype."""
        row = kv_format(kv_dtype).row_bytes(self.head_dim)
        return 2 * self.n_layer * self.n_kv_head * seq_len * batch_size * row

    def num_params(self) -> int:
        """Parameter count of the model this config builds (tied embeddings counted once)."""
        d, h = self.d_model, self.head_dim
        attn = d * h * (self.n_head + 2 * self.n_kv_head) + self.n_head * h * d
        if self.qkv_bias:
            attn += h * (self.n_head + 2 * self.n_kv_head)
        if self.bias:
            attn += d
        n_mats = 3 if self.gated_mlp else 2
        mlp = n_mats * d * self.d_ff + ((self.d_ff * (n_mats - 1) + d) if self.bias else 0)
        norm = d * (2 if self.bias and self.norm != "rmsnorm" else 1)
        block = attn + mlp + (4 if self.post_norms else 2) * norm
        if self.qk_norm:
            block += 2 * h
        total = self.n_layer * block + norm + self.vocab_size * d
        if not self.tie_embeddings:
            total += self.vocab_size * d
        if self.pos == "learned":
            total += self.max_seq_len * d
        return total

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named shape (no weights). ``ModelConfig.presets()`` lists the names."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    @staticmethod
    def presets() -> list[str]:
        return list(PRESETS)


PRESETS: dict[str, dict[str, Any]] = {
    # A model that trains in about a minute on 2 CPU cores (byte-level vocabulary).
    "tiny": dict(vocab_size=256, d_model=128, n_layer=4, n_head=4, n_kv_head=2, d_ff=384,
                 max_seq_len=256, norm="rmsnorm", pos="rope", mlp="swiglu"),
    "gpt2": dict(vocab_size=50257, d_model=768, n_layer=12, n_head=12, d_ff=3072,
                 max_seq_len=1024, norm="layernorm", pos="learned", mlp="gelu", bias=True,
                 tie_embeddings=True),
    "smollm2-135m": dict(vocab_size=49152, d_model=576, n_layer=30, n_head=9, n_kv_head=3,
                         d_ff=1536, max_seq_len=8192, norm="rmsnorm", pos="rope",
                         rope_theta=100000.0, mlp="swiglu", tie_embeddings=True),
    "llama-2-7b": dict(vocab_size=32000, d_model=4096, n_layer=32, n_head=32, n_kv_head=32,
                       d_ff=11008, max_seq_len=4096, norm="rmsnorm", pos="rope", mlp="swiglu"),
    # 64 query heads and 8 KV heads: the seed's G = N/8.
    "llama-2-70b": dict(vocab_size=32000, d_model=8192, n_layer=80, n_head=64, n_kv_head=8,
                        d_ff=28672, max_seq_len=4096, norm="rmsnorm", pos="rope",
                        mlp="swiglu"),
}
