"""GGUF metadata -> :class:`~kvformer.config.ModelConfig`.

Which architectures kvformer reads and what each means in ModelConfig terms, and which
metadata keys are read, known harmless, or refused (every ``{arch}.`` key is one of
``GGUF_ARCH_KEYS``, ``GGUF_NEUTRAL_KEYS`` or refused). Rotary scaling: ``rope.scaling.type``
/ ``.factor`` / ``.original_context_length`` / ``.yarn_beta_*``, Llama 3's per-frequency
``rope_freqs.weight`` and Phi-3's ``rope_factors_long/short.weight`` (with
``rope.scaling.attn_factor``) become ``ModelConfig.rope_scaling``; sliding windows and
Gemma's norms, embedding scale, soft-caps and attention scale come from here too.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from kvformer.config import ModelConfig
from kvformer.errors import CheckpointError, UnsupportedArchitectureError
from kvformer.formats.gguf.reader import GGUFFile, _load_one

__all__ = ["GGUF_ARCHITECTURES", "config_from_gguf"]

# Tensors that are rotary scaling factors, one per frequency: they become
# ModelConfig.rope_scaling (config_from_gguf reads them), not weights.
GGUF_ROPE_TENSORS: dict[str, str] = {
    "rope_freqs.weight": "factors",  # llama.cpp's form of Llama 3.1's scaling
    "rope_factors_long.weight": "long_factor",  # Phi-3's LongRoPE
    "rope_factors_short.weight": "short_factor",
}

# What each supported ``general.architecture`` means in ModelConfig terms (the facts are
# llama.cpp's: its converter and its loader).
#   permute_qk       Q/K rows stored in llama.cpp's interleaved rotary layout (undone at load)
#   qk_norm          attn_q_norm / attn_k_norm on every head (Qwen3, Gemma 3)
#   gemma            norms after each branch, embeddings times sqrt(d_model), and the
#                    attention scale 1/sqrt(head_dim), or 1/sqrt(d_model / n_head) for
#                    the 27B models (``big_layers`` layers), as llama.cpp decides it
#   window_pattern   every pattern-th layer global, the others windowed
#   default_window   the window when the file does not say (Gemma 2: 4096)
#   local_rope_theta the windowed layers' unscaled rotary base (Gemma 3: 10000)
#   softcaps         (attention, final) when the file does not say (Gemma 2: 50, 30)
#   fused_gate_up    ffn_up holds gate and up (Phi-3)
_RMS = dict(norm="rmsnorm", pos="rope", bias=False, qkv_bias=False,
            eps_key="attention.layer_norm_rms_epsilon", permute_qk=False)
GGUF_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": dict(_RMS, mlp="swiglu", permute_qk=True),
    "qwen2": dict(_RMS, mlp="swiglu", qkv_bias=True),
    "qwen3": dict(_RMS, mlp="swiglu", qk_norm=True),
    "gemma2": dict(_RMS, mlp="geglu", gemma=True, big_layers=46, window_pattern=2,
                   default_window=4096, softcaps=(50.0, 30.0)),
    "gemma3": dict(_RMS, mlp="geglu", gemma=True, big_layers=62, window_pattern=6,
                   qk_norm=True, local_rope_theta=10000.0, softcaps=(None, None)),
    "phi3": dict(_RMS, mlp="swiglu", fused_gate_up=True),
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, qkv_bias=True,
                 eps_key="attention.layer_norm_epsilon", permute_qk=False),
}

# Every "{arch}." metadata key kvformer reads into the config. A file with any other key
# under its architecture's name, or any other top-level namespace than these, is refused:
# an unknown key may change the computation (GGUF_NEUTRAL_KEYS lists the keys that are
# harmless with the value they have in ordinary files).
GGUF_ARCH_KEYS: tuple[str, ...] = (
    "vocab_size", "context_length", "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.value_length", "attention.layer_norm_rms_epsilon",
    "attention.layer_norm_epsilon", "attention.scale", "attention.sliding_window",
    "attention.sliding_window_pattern", "attn_logit_softcapping", "final_logit_softcapping",
    "rope.dimension_count", "rope.freq_base", "rope.freq_base_swa", "rope.scale_linear",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.attn_factor", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
)
GGUF_NEUTRAL_KEYS: dict[str, Any] = {  # key -> a test of its value: True when harmless
    "expert_count": lambda v: v == 0,
    "expert_used_count": lambda v: v == 0,
    "attention.causal": lambda v: v is True,
    "rope.scaling.finetuned": lambda v: True,  # a note on how the model was trained
    "logit_scale": lambda v: v == 1.0,
    "embedding_scale": lambda v: v == 1.0,
    "residual_scale": lambda v: v == 1.0,
    "use_parallel_residual": lambda v: v is False,
    "pooling_type": lambda v: v == 0,
}
# Top-level namespaces: general.* describes the file (its alignment is honoured, and its
# type must be a model), tokenizer.* is the tokenizer's (Tokenizer.from_gguf checks it),
# quantize.* records how the weights were quantized, split.* must say "one file".
GGUF_NAMESPACES = ("general.", "tokenizer.", "quantize.", "split.")


def _as_f32_float(v: Any) -> float:
    """Metadata floats are float32: use the shortest decimal that rounds to the same float32."""
    return float(str(np.float32(v)))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _file_label(path) -> str:
    if isinstance(path, GGUFFile):
        return path.path
    return os.fspath(path) if path is not None else "<GGUF metadata>"


def check_metadata_keys(metadata: dict[str, Any], label: str = "<GGUF metadata>") -> None:
    """Refuse a file whose metadata holds a key kvformer neither reads nor knows to be
    harmless (it might change the computation), or that is not one whole model."""
    arch = metadata.get("general.architecture")
    prefix = f"{arch}."
    for key, value in metadata.items():
        if key.startswith(prefix):
            suffix = key[len(prefix):]
            if suffix in GGUF_ARCH_KEYS:
                continue
            harmless = GGUF_NEUTRAL_KEYS.get(suffix)
            if harmless is not None:
                if harmless(value):
                    continue
                raise UnsupportedArchitectureError(
                    f"{label}: metadata {key} = {_short(value)} changes the model in a way "
                    "kvformer does not implement")
            raise UnsupportedArchitectureError(
                f"{label}: metadata key {key!r} (= {_short(value)}) is one kvformer does not "
                "read; it may change the computation, so the file is refused")
        if not key.startswith(GGUF_NAMESPACES):
            raise UnsupportedArchitectureError(
                f"{label}: metadata key {key!r} is outside what a {arch} model file holds "
                f"(keys start with {arch}. or {', '.join(GGUF_NAMESPACES)}); refused")
    kind = metadata.get("general.type", "model")
    if kind != "model":
        raise UnsupportedArchitectureError(
            f"{label}: general.type is {kind!r}, not a model (an adapter or projector is "
            "applied to a model; kvformer loads whole models only)")
    if metadata.get("split.count", 1) not in (0, 1):
        raise CheckpointError(
            f"{label}: one of {metadata['split.count']} split GGUF files; merge them first "
            "(llama.cpp's gguf-split --merge)")


def _factor_values(f: GGUFFile, name: str) -> list[float]:
    """A small per-frequency factor tensor's values (fp32 in the file, exact as floats)."""
    info = f.tensors[name]
    return [float(x) for x in _load_one(f, info, torch.float32).reshape(-1)]


def config_from_gguf(metadata: dict[str, Any], path=None) -> ModelConfig:
    """A ModelConfig from GGUF metadata.

    ``path`` (a file path or an open :class:`GGUFFile`) names the file in errors and lets the
    tensor list decide ``tie_embeddings`` (no ``output.weight``) and the vocabulary size
    (rows of ``token_embd.weight``), and the rotary factor tensors (``rope_freqs.weight``,
    Phi-3's ``rope_factors_long/short.weight``) become ``rope_scaling``. Without it,
    ``tie_embeddings`` is False, the vocabulary comes from ``{arch}.vocab_size`` or the
    tokenizer's token list, and a file with rotary factor tensors is refused when its
    tensors are read.
    """
    label = _file_label(path)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{label}: architecture {_short(arch)} is not supported; kvformer reads GGUF files of "
            f"these architectures: {', '.join(sorted(GGUF_ARCHITECTURES))}")
    spec = GGUF_ARCHITECTURES[arch]
    check_metadata_keys(metadata, label)

    if isinstance(path, GGUFFile):
        return _config(metadata, path, label, arch, spec)
    if path is not None:
        with GGUFFile(path) as f:
            return _config(metadata, f, label, arch, spec)
    return _config(metadata, None, label, arch, spec)


def _config(metadata: dict[str, Any], f: GGUFFile | None, label: str, arch: str,
            spec: dict[str, Any]) -> ModelConfig:
    tensors = f.tensors if f is not None else None

    def get(key: str, default: Any = None, required: bool = False, kind: type = int) -> Any:
        full = f"{arch}.{key}"
        if full not in metadata:
            if required:
                raise CheckpointError(
                    f"{label}: metadata key {full!r} is missing; the file is incomplete or "
                    "was not written by a llama.cpp converter")
            return default
        value = metadata[full]
        if kind is not object:
            ok = isinstance(value, (int, float) if kind is float else kind)
            if not ok or isinstance(value, bool):
                raise CheckpointError(
                    f"{label}: metadata {full} = {_short(value)} is not a {kind.__name__}; "
                    "the file is corrupt or describes an unsupported variant")
        return value

    d_model = get("embedding_length", required=True)
    n_layer = get("block_count", required=True)
    n_head = get("attention.head_count", required=True)
    n_kv_head = get("attention.head_count_kv", n_head)
    if n_head < 1:
        raise CheckpointError(f"{label}: {arch}.attention.head_count = {n_head} must be >= 1")
    if tensors is not None and n_layer > len(tensors):
        raise CheckpointError(
            f"{label}: {arch}.block_count = {n_layer} but the file holds only {len(tensors)} "
            "tensors; the metadata is corrupt")
    key_len, value_len = get("attention.key_length"), get("attention.value_length")
    rope_dim = get("rope.dimension_count")
    head_dim = key_len or d_model // n_head  # llama.cpp's n_embd_head_k
    if value_len is not None and value_len != head_dim:
        raise UnsupportedArchitectureError(
            f"{label}: key length {head_dim} differs from value length {value_len}; kvformer "
            "needs equal K and V head sizes")
    if spec["pos"] == "rope" and rope_dim is not None and rope_dim != head_dim:
        raise UnsupportedArchitectureError(
            f"{label}: partial rotary embeddings (rope over {rope_dim} of {head_dim} dims) "
            "are not supported")

    vocab = get("vocab_size")
    if vocab is None and tensors is not None and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    tokens = metadata.get("tokenizer.ggml.tokens")
    if vocab is None and isinstance(tokens, list):
        vocab = len(tokens)
    if vocab is None:
        raise CheckpointError(f"{label}: cannot tell the vocabulary size (no {arch}.vocab_size, "
                              "token_embd.weight or tokenizer.ggml.tokens)")

    eps_key = spec["eps_key"]
    other_eps = ("attention.layer_norm_epsilon" if eps_key.endswith("rms_epsilon")
                 else "attention.layer_norm_rms_epsilon")
    if get(other_eps, kind=object) is not None:
        raise UnsupportedArchitectureError(
            f"{label}: {arch}.{other_eps} is set, but a {arch} model has no such norm")
    eps = get(eps_key, 1e-5, kind=float)
    name = metadata.get("general.name")
    if not name:
        name = os.path.splitext(os.path.basename(label))[0] if f is not None else arch
    fields: dict[str, Any] = dict(
        vocab_size=vocab, d_model=d_model, n_layer=n_layer, n_head=n_head,
        n_kv_head=n_kv_head, head_dim=head_dim,
        d_ff=get("feed_forward_length", 4 * d_model),
        max_seq_len=get("context_length", 2048),
        norm=spec["norm"], norm_eps=_as_f32_float(eps), pos=spec["pos"],
        rope_theta=_as_f32_float(get("rope.freq_base", 10000.0, kind=float)),
        mlp=spec["mlp"], bias=spec["bias"], qkv_bias=spec["qkv_bias"],
        qk_norm=bool(spec.get("qk_norm")),
        tie_embeddings=tensors is not None and "output.weight" not in tensors,
        name=str(name))
    if spec["pos"] == "rope":
        fields["rope_scaling"] = _gguf_rope_scaling(get, f, label, arch, head_dim,
                                                    fields["max_seq_len"])
    scale = get("attention.scale", kind=float)
    if scale:  # 0 means "the default" to llama.cpp
        fields["attn_scale"] = _as_f32_float(scale)
    fields.update(_gguf_windows(get, spec, n_layer, label, arch))
    if spec.get("gemma"):
        fields.update(_gguf_gemma(get, spec, fields, label, arch))
    else:
        caps = [f"{arch}.{k}" for k in ("attn_logit_softcapping", "final_logit_softcapping")
                if get(k, kind=object) is not None]
        if caps:
            raise UnsupportedArchitectureError(
                f"{label}: {', '.join(caps)} on a {arch} model, which llama.cpp does not "
                "soft-cap; refused rather than guessed")
    try:
        return ModelConfig(**fields)
    except ValueError as exc:
        raise CheckpointError(f"{label}: the GGUF metadata describes an invalid model: {exc}") \
            from exc


def _gguf_rope_scaling(get, f: GGUFFile | None, label: str, arch: str, head_dim: int,
                       context: int) -> dict[str, Any] | None:
    """rope_scaling from rope.scaling.* (and the older rope.scale_linear) and the factor
    tensors, as llama.cpp reads them; combinations it would run differently are refused."""
    kind = get("rope.scaling.type", "none", kind=str)
    factor = get("rope.scaling.factor", kind=float)
    original = get("rope.scaling.original_context_length")
    attn_factor = get("rope.scaling.attn_factor", kind=float)
    linear = get("rope.scale_linear", kind=float)
    present = {name: _factor_values(f, name) for name in GGUF_ROPE_TENSORS
               if f is not None and name in f.tensors}
    # (a file read without its tensors: a factor tensor is refused when the weights are read)

    def refuse(why: str):
        return UnsupportedArchitectureError(f"{label}: {why}; kvformer refuses rather than "
                                            "compute different positions")

    if factor is None:  # llama.cpp: rope.scaling.factor, else the older rope.scale_linear
        factor = linear
    if kind == "none" and factor not in (None, 1.0):
        kind = "linear"  # llama.cpp divides the frequencies by the factor whatever the type
    yarn_keys = [k for k in ("rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow")
                 if get(k, kind=object) is not None]
    if yarn_keys and kind != "yarn":
        raise refuse(f"{', '.join(yarn_keys)} set for rope scaling {kind!r}")
    long_short = {"rope_factors_long.weight", "rope_factors_short.weight"} & set(present)
    if "rope_freqs.weight" in present:
        if kind != "none" or long_short:
            raise refuse(f"rope_freqs.weight together with rope scaling {kind!r}")
        if attn_factor not in (None, 1.0):
            raise refuse(f"{arch}.rope.scaling.attn_factor with rope_freqs.weight")
        return {"type": "factors", "factors": _per_frequency(present["rope_freqs.weight"],
                                                             head_dim, label)}
    if long_short:
        if kind not in ("none", "longrope") or len(long_short) != 2:
            raise refuse("Phi-3 LongRoPE needs both rope_factors_long and rope_factors_short "
                         f"and no other rope scaling (found {kind!r})")
        if original is None:
            raise refuse("LongRoPE factors without rope.scaling.original_context_length")
        if attn_factor is None:  # transformers' default, from the two context lengths
            scale = context / original
            attn_factor = (1.0 if scale <= 1 else
                           math.sqrt(1 + math.log(scale) / math.log(original)))
        return {"type": "longrope",
                "short_factor": _per_frequency(present["rope_factors_short.weight"],
                                               head_dim, label),
                "long_factor": _per_frequency(present["rope_factors_long.weight"],
                                              head_dim, label),
                "original_max_position_embeddings": int(original),
                "attention_factor": _as_f32_float(attn_factor)}
    if attn_factor not in (None, 1.0):
        raise refuse(f"{arch}.rope.scaling.attn_factor = {attn_factor} with rope scaling "
                     f"{kind!r}")
    if kind == "none":
        return None
    if kind == "linear":
        if factor in (None, 1.0):
            return None  # llama.cpp: no factor is a factor of 1
        return {"type": "linear", "factor": _as_f32_float(factor)}
    if kind == "yarn":
        if factor is None or original is None:
            raise refuse("YaRN rope scaling without rope.scaling.factor and "
                         "rope.scaling.original_context_length")
        factor = _as_f32_float(factor)
        return {"type": "yarn", "factor": factor,
                "original_max_position_embeddings": int(original),
                "beta_fast": _as_f32_float(get("rope.scaling.yarn_beta_fast", 32.0, kind=float)),
                "beta_slow": _as_f32_float(get("rope.scaling.yarn_beta_slow", 1.0, kind=float)),
                # llama.cpp: mscale = 1 + 0.1 ln(factor), as YaRN and transformers
                "attention_factor": 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0,
                "truncate": True}
    raise refuse(f"rope scaling type {kind!r} is not one kvformer implements (none, linear, "
                 "yarn, and Phi-3's LongRoPE and Llama 3's rope_freqs tensors)")


def _per_frequency(values: list[float], head_dim: int, label: str) -> list[float]:
    if len(values) != head_dim // 2:
        raise CheckpointError(f"{label}: a rotary factor tensor has {len(values)} values for "
                              f"{head_dim // 2} frequencies; the file is corrupt")
    return values


def _gguf_windows(get, spec: dict[str, Any], n_layer: int, label: str,
                  arch: str) -> dict[str, Any]:
    """Sliding windows: the window, which layers (a pattern from the file or the
    architecture), the windowed layers' rotary base."""
    window = get("attention.sliding_window", spec.get("default_window"))
    pattern = get("attention.sliding_window_pattern", spec.get("window_pattern"), kind=object)
    local_theta = get("rope.freq_base_swa", spec.get("local_rope_theta"), kind=float)
    if not window:  # absent, or 0 (Phi-3 files write 0 for "none")
        return {}
    if isinstance(pattern, list):  # one flag per layer
        if len(pattern) != n_layer or not all(isinstance(x, bool) for x in pattern):
            raise CheckpointError(f"{label}: {arch}.attention.sliding_window_pattern has "
                                  f"{len(pattern)} entries for {n_layer} layers")
        layers = [i for i, on in enumerate(pattern) if on]
    elif pattern is None:
        layers = list(range(n_layer))
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 1:
        layers = [i for i in range(n_layer) if i % pattern < pattern - 1] if pattern > 1 \
            else list(range(n_layer))
    else:
        raise CheckpointError(f"{label}: {arch}.attention.sliding_window_pattern = "
                              f"{_short(pattern)} is not a layer count or a list of flags")
    if not layers:
        return {}
    fields: dict[str, Any] = dict(
        sliding_window=int(window),
        sliding_layers=None if len(layers) == n_layer else tuple(layers))
    if local_theta is not None:
        fields["local_rope_theta"] = _as_f32_float(local_theta)
    return fields


def _gguf_gemma(get, spec: dict[str, Any], fields: dict[str, Any], label: str,
                arch: str) -> dict[str, Any]:
    attn_cap, final_cap = spec["softcaps"]
    if arch == "gemma3" and get("attn_logit_softcapping", kind=object) is not None:
        raise UnsupportedArchitectureError(
            f"{label}: gemma3.attn_logit_softcapping is set, which llama.cpp and transformers "
            "ignore for Gemma 3; refused rather than guessed")
    attn_cap = get("attn_logit_softcapping", attn_cap, kind=float)
    final_cap = get("final_logit_softcapping", final_cap, kind=float)
    d, n_head = fields["d_model"], fields["n_head"]
    # llama.cpp: 1/sqrt(d_model / n_head) for the 27B models, 1/sqrt(head_dim) otherwise
    # (the files do not carry query_pre_attn_scalar)
    scalar = d // n_head if fields["n_layer"] == spec["big_layers"] else fields["head_dim"]
    out = dict(post_norms=True, embed_scale=float(d ** 0.5),
               attn_softcap=_as_f32_float(attn_cap) if attn_cap else None,
               final_softcap=_as_f32_float(final_cap) if final_cap else None)
    if "attn_scale" not in fields:
        out["attn_scale"] = float(scalar) ** -0.5
    return out
