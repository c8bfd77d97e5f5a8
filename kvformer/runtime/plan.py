"""The named description of a decode step: which weights, norms and kernels, per layer.

The C++ step (``kvformer.runtime.step.NativeStep``, ``csrc/step.cpp``) reads ``named()``, a
flat table of names such as ``layers.3.qkv.weight`` or ``layers.3.attn_norm.eps``. The names
are made here and nowhere else, and the C++ side refuses a plan that has an entry it does
not read, so the two cannot drift apart silently.

    n_layer d_model head_dim n_head n_kv_head d_ff act_bf16 rope swiglu       integers
    q_scale                                                                    real
    embed.kind embed.weight [embed.scales]            kind 0 dense, 1 int8 rows + scales,
                                                      3 kb (and embed.bits, .layout, [.lut])
    rope.cos rope.sin                                 [positions, head_dim] fp32 (if rope)
    layers.{i}.attn_norm / mlp_norm .rms .eps .weight [.bias]
    layers.{i}.qkv | (.q .k .v)    layers.{i}.wo
    layers.{i}.gate_up | (.gate .up) | (.up)     layers.{i}.down
    final_norm   head
    a linear layer NAME: NAME.kind (0 dense, 1 int8, 2 int4, 3 kb), NAME.weight,
                         NAME.scales (int8, int4, kb), NAME.bias (if any),
                         kb: NAME.bits, NAME.layout (kernels.h's KbScales), [NAME.lut],
                         [NAME.zero]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kvformer.model.norms import LayerNorm, RMSNorm
from kvformer.runtime.kb import KbEmbedding, KbLinear
from kvformer.runtime.quant import Int4Linear, Int8Embedding, Int8Linear

KINDS = {"dense": 0, "int8": 1, "int4": 2, "kb": 3}


class Unsupported(Exception):
    """The model has a part that no decode step implements (it runs Transformer.forward)."""


@dataclass
class LinearPlan:
    kind: str                   # 'dense', 'int8' or 'int4'
    weight: torch.Tensor        # dense [n, k]; int8 [n, k]; int4 uint8 [n/16, k/32, 256]
    scales: torch.Tensor | None  # int8 fp32 [n]; int4 fp16 [n/16, k/32, 2, 16]
    bias: torch.Tensor | None
    module: nn.Module | None    # the layer itself (None: a tied head, the embedding table)
    kb: tuple | None = None  # kb: bits, scales kind, lut (or empty), zero

    @classmethod
    def of(cls, linear: nn.Module) -> LinearPlan:
        bias = linear.bias.detach() if linear.bias is not None else None
        if isinstance(linear, Int4Linear):
            return cls("int4", linear.qweight, linear.scales, bias, linear)
        if isinstance(linear, KbLinear):
            return cls("kb", linear.qweight, linear.scales, bias, linear,
                       (linear.bits, linear.layout, linear.lut, linear.zero))
        if isinstance(linear, Int8Linear):
            return cls("int8", linear.qweight, linear.scale, bias, linear)
        if type(linear) is nn.Linear:
            return cls("dense", linear.weight.detach(), None, bias, linear)
        raise Unsupported(f"no decode step for {type(linear).__name__}")

    def entries(self, name: str, table: Named, act: torch.dtype) -> None:
        table.ints[f"{name}.kind"] = KINDS[self.kind]
        table.tensors[f"{name}.weight"] = (self.weight.to(act) if self.kind == "dense"
                                           else self.weight)
        if self.scales is not None:
            table.tensors[f"{name}.scales"] = self.scales
        if self.bias is not None:
            table.tensors[f"{name}.bias"] = self.bias
        if self.kb is not None:
            _kb_entries(name, self.kb, table)


def _kb_entries(name: str, kb: tuple, table: Named) -> None:
    bits, layout, lut, zero = kb
    table.ints[f"{name}.bits"] = bits
    table.ints[f"{name}.layout"] = layout
    if zero:
        table.ints[f"{name}.zero"] = zero
    if lut.numel():
        table.tensors[f"{name}.lut"] = lut


@dataclass
class NormPlan:
    rms: bool
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, norm: nn.Module) -> NormPlan:
        if isinstance(norm, RMSNorm):
            return cls(True, norm.weight.detach(), None, float(norm.eps))
        if isinstance(norm, LayerNorm):
            bias = norm.bias.detach() if norm.bias is not None else None
            return cls(False, norm.weight.detach(), bias, float(norm.eps))
        raise Unsupported(f"no decode step for {type(norm).__name__}")

    def entries(self, name: str, table: Named) -> None:
        table.ints[f"{name}.rms"] = int(self.rms)
        table.reals[f"{name}.eps"] = self.eps
        table.tensors[f"{name}.weight"] = self.weight
        if self.bias is not None:
            table.tensors[f"{name}.bias"] = self.bias


@dataclass
class LayerPlan:
    attn_norm: NormPlan
    qkv: LinearPlan | None        # fused Q/K/V rows, or the three parts:
    q: LinearPlan | None
    k: LinearPlan | None
    v: LinearPlan | None
    wo: LinearPlan
    mlp_norm: NormPlan
    gate_up: LinearPlan | None    # fused gate/up rows (swiglu), or the parts:
    gate: LinearPlan | None       # (None for a GELU MLP)
    up: LinearPlan | None
    down: LinearPlan

    LINEARS = ("qkv", "q", "k", "v", "wo", "gate_up", "gate", "up", "down")


@dataclass
class Named:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ints: dict[str, int] = field(default_factory=dict)
    reals: dict[str, float] = field(default_factory=dict)


@dataclass
class StepPlan:
    n_layer: int
    d_model: int
    head_dim: int
    n_head: int
    n_kv_head: int
    d_ff: int
    act_dtype: torch.dtype
    rope: bool
    swiglu: bool
    q_scale: float                # 1/sqrt(d_k) (or the model's attn_scale), on the query
    embed_kind: str               # 'dense', 'int8' or 'kb'
    embed_weight: torch.Tensor
    embed_scales: torch.Tensor | None
    cos: torch.Tensor | None      # rotary tables [positions, head_dim], fp32
    sin: torch.Tensor | None
    layers: list[LayerPlan]
    final_norm: NormPlan
    head: LinearPlan
    # every layer's sliding window: a step whose cache already holds this many tokens is
    # left to Transformer.forward (the window would hide the oldest); None: no window
    window: int | None = None
    embed_kb: tuple | None = None  # kb: bits, scales kind, lut, zero

    @property
    def rope_len(self) -> int | None:
        """Positions the rotary tables cover (a later position needs a rebuilt plan)."""
        return self.cos.shape[0] if self.cos is not None else None

    @staticmethod
    def check_config(cfg) -> None:
        """Raise Unsupported if a model of ``cfg`` has parts no C++ step implements,
        whatever its weights' dtype."""
        if cfg.pos not in ("rope", "none"):
            raise Unsupported(f"no decode step for {cfg.pos} positions")
        parts = unsupported_parts(cfg)
        if parts:
            raise Unsupported(f"no decode step for {', '.join(parts)}")

    @classmethod
    def from_model(cls, model: nn.Module) -> StepPlan:
        """The plan of ``model``'s decode step; raises Unsupported for what has none
        (learned/sinusoidal positions, BatchNorm, attention sinks, other dtypes, and the
        parts of Gemma and Qwen3 blocks listed in ``unsupported_parts``)."""
        cfg = model.cfg
        cls.check_config(cfg)
        if model.dtype not in (torch.float32, torch.bfloat16):
            raise Unsupported(f"no decode step for {model.dtype} activations")
        if any(b.attn.weights_sink is not None for b in model.layers):
            raise Unsupported("attention weights are being recorded")
        emb = model.tok_emb
        embed_kb = None
        if isinstance(emb, Int8Embedding):
            embed = ("int8", emb.qweight, emb.scale)
        elif isinstance(emb, KbEmbedding):
            embed = ("kb", emb.qweight, emb.scales)
            embed_kb = (emb.bits, emb.layout, emb.lut, emb.zero)
        else:
            embed = ("dense", emb.weight.detach(), None)
        head = model._modules.get("lm_head")
        head_plan = (LinearPlan.of(head) if head is not None else
                     LinearPlan("dense", emb.weight.detach(), None, None, None))
        rope = cfg.pos == "rope"
        return cls(
            n_layer=cfg.n_layer, d_model=cfg.d_model, head_dim=cfg.head_dim,
            n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, d_ff=cfg.d_ff,
            act_dtype=model.dtype, rope=rope, swiglu=cfg.mlp == "swiglu",
            q_scale=cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5,
            embed_kind=embed[0], embed_weight=embed[1],
            embed_scales=embed[2],
            cos=model.rotary.cos if rope else None, sin=model.rotary.sin if rope else None,
            layers=[_layer_plan(block, cfg.mlp == "swiglu") for block in model.layers],
            final_norm=NormPlan.of(model.norm), head=head_plan, window=cfg.sliding_window,
            embed_kb=embed_kb)

    def named(self) -> Named:
        """The flat table the C++ step reads (the module docstring lists the names)."""
        t = Named()
        t.ints.update(n_layer=self.n_layer, d_model=self.d_model, head_dim=self.head_dim,
                      n_head=self.n_head, n_kv_head=self.n_kv_head, d_ff=self.d_ff,
                      act_bf16=int(self.act_dtype == torch.bfloat16), rope=int(self.rope),
                      swiglu=int(self.swiglu))
        t.reals["q_scale"] = self.q_scale
        t.ints["embed.kind"] = KINDS[self.embed_kind]
        t.tensors["embed.weight"] = self.embed_weight
        if self.embed_scales is not None:
            t.tensors["embed.scales"] = self.embed_scales
        if self.embed_kb is not None:
            _kb_entries("embed", self.embed_kb, t)
        if self.rope:
            t.tensors["rope.cos"], t.tensors["rope.sin"] = self.cos, self.sin
        for i, layer in enumerate(self.layers):
            layer.attn_norm.entries(f"layers.{i}.attn_norm", t)
            layer.mlp_norm.entries(f"layers.{i}.mlp_norm", t)
            for name in LayerPlan.LINEARS:
                lin = getattr(layer, name)
                if lin is not None:
                    lin.entries(f"layers.{i}.{name}", t, self.act_dtype)
        self.final_norm.entries("final_norm", t)
        self.head.entries("head", t, self.act_dtype)
        return t


def unsupported_parts(cfg) -> list[str]:
    """The parts of a model's config that neither decode step computes (such a model's
    decode steps run Transformer.forward)."""
    return [name for name, present in (
        ("norms on q and k", cfg.qk_norm),
        ("norms after attention and the MLP", cfg.post_norms),
        ("a scaled embedding", cfg.embed_scale != 1.0),
        ("soft-capped attention scores", cfg.attn_softcap is not None),
        ("soft-capped logits", cfg.final_softcap is not None),
        ("a GeGLU MLP", cfg.mlp == "geglu"),
        ("windowed layers among global ones", cfg.sliding_layers is not None),
        ("a rotary base of their own for windowed layers", cfg.local_rope_theta is not None),
    ) if present]


def _layer_plan(block: nn.Module, swiglu: bool) -> LayerPlan:
    attn, mlp = block.attn, block.mlp
    fused_qkv = attn._modules.get("wqkv")
    fused_gu = mlp._modules.get("w_gate_up")

    def of(module):
        return LinearPlan.of(module) if module is not None else None

    return LayerPlan(
        attn_norm=NormPlan.of(block.attn_norm),
        qkv=of(fused_qkv),
        q=None if fused_qkv is not None else of(attn.wq),
        k=None if fused_qkv is not None else of(attn.wk),
        v=None if fused_qkv is not None else of(attn.wv),
        wo=of(attn.wo),
        mlp_norm=NormPlan.of(block.mlp_norm),
        gate_up=of(fused_gu),
        gate=None if fused_gu is not None or not swiglu else of(mlp.w_gate),
        up=None if fused_gu is not None else of(mlp.w_up),
        down=of(mlp.w_down))
