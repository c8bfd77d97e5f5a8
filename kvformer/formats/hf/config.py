"""Hugging Face config.json -> :class:`~kvformer.config.ModelConfig`.

The architectures kvformer reads (``SUPPORTED_ARCHITECTURES``: Llama, Mistral, Qwen2, Qwen3,
Gemma 2, Gemma 3 text, Phi-3, GPT-2) with transformers' defaults for the keys a config.json
may leave out; ``config_from_hf`` turns rotary scaling, sliding windows, norms and scales
into ModelConfig fields and refuses settings kvformer would run differently from
transformers (an unknown rope_type, partial rotary, bidirectional attention, ...);
``read_hf_config`` reads a model directory's config.json.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvformer.config import ModelConfig
from kvformer.errors import CheckpointError, ModelNotFoundError, UnsupportedArchitectureError

__all__ = ["SUPPORTED_ARCHITECTURES", "config_from_hf", "read_hf_config"]

PathLike = str | os.PathLike

CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class _Arch:
    name: str  # the transformers class
    model_type: str
    family: str  # key into NAME_TABLES
    defaults: dict[str, Any]  # transformers' defaults for keys a config.json may leave out


_ROPE_DEFAULTS = dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False,
                      head_dim=None, rope_theta=10000.0)
_GEMMA_DEFAULTS = dict(
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
    head_dim=256, attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096,
    layer_types=None, use_bidirectional_attention=None, hidden_act=None)

_ARCHS = (
    _Arch("LlamaForCausalLM", "llama", "llama", dict(
        _ROPE_DEFAULTS, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
        max_position_embeddings=2048, attention_bias=False, mlp_bias=False)),
    _Arch("MistralForCausalLM", "mistral", "llama", dict(
        _ROPE_DEFAULTS, vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=4096 * 32, sliding_window=4096)),
    _Arch("Qwen2ForCausalLM", "qwen2", "llama", dict(
        _ROPE_DEFAULTS, vocab_size=151936, hidden_size=4096, intermediate_size=22016,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
        max_window_layers=28, layer_types=None)),
    _Arch("Qwen3ForCausalLM", "qwen3", "llama", dict(
        _ROPE_DEFAULTS, vocab_size=151936, hidden_size=4096, intermediate_size=22016,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
        max_position_embeddings=32768, attention_bias=False, use_sliding_window=False,
        sliding_window=4096, max_window_layers=28, layer_types=None)),
    _Arch("Gemma2ForCausalLM", "gemma2", "gemma", dict(
        _GEMMA_DEFAULTS, vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=8192, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, rope_theta=10000.0, sliding_window_pattern=2)),
    _Arch("Gemma3ForCausalLM", "gemma3_text", "gemma", dict(
        _GEMMA_DEFAULTS, vocab_size=262208, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=131072, final_logit_softcapping=None,
        attn_logit_softcapping=None, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
        sliding_window_pattern=6)),
    _Arch("Phi3ForCausalLM", "phi3", "phi3", dict(
        _ROPE_DEFAULTS, vocab_size=32064, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
        max_position_embeddings=4096, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, sliding_window=None)),
    _Arch("GPT2LMHeadModel", "gpt2", "gpt2", dict(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False, add_cross_attention=False,
        tie_word_embeddings=True)),
)
SUPPORTED_ARCHITECTURES = tuple(a.name for a in _ARCHS)
_BY_NAME = {a.name: a for a in _ARCHS}
_BY_MODEL_TYPE = {a.model_type: a for a in _ARCHS}
# Multimodal checkpoints whose text model kvformer runs, with where to get it.
_TEXT_ONLY_HINTS = {
    "Gemma3ForConditionalGeneration": "its text model is a Gemma3ForCausalLM (model_type "
                                      "'gemma3_text'); the 1B model ships as one",
}

_SILU = ("silu", "swish")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all tanh-approximate GELU


def _where(path: PathLike | None) -> str:
    return f"{Path(path) / CONFIG_FILE}" if path is not None else "config.json"


def _arch_of(config: dict[str, Any], path: PathLike | None) -> _Arch:
    archs = config.get("architectures") or []
    name = archs[0] if isinstance(archs, list) and archs else None
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name is None and config.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[config["model_type"]]
    described = (f"architecture {name!r}" if name is not None
                 else f"model_type {config.get('model_type')!r} (no 'architectures' entry)")
    hint = f" ({_TEXT_ONLY_HINTS[name]})" if name in _TEXT_ONLY_HINTS else ""
    raise UnsupportedArchitectureError(
        f"{_where(path)} describes {described}{hint}, which kvformer cannot load; supported "
        f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)} (model_type "
        f"{', '.join(repr(a.model_type) for a in _ARCHS)})")


# --------------------------------------------------------------------------- rotary positions
def _rope_blocks(c: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The rotary parameters per layer type ('full_attention', 'sliding_attention'), in
    whichever layout this config.json uses:

    transformers 5 writes ``rope_parameters: {"rope_type": ..., "rope_theta": ..., ...}``,
    or a dict of such dicts per layer type (Gemma 3); transformers 4 wrote a top-level
    ``rope_theta`` and ``rope_scaling`` (null, or ``{"type"|"rope_type": ..., "factor":
    ...}``), and Gemma 3 a top-level ``rope_local_base_freq`` for its windowed layers.
    """
    params = c.get("rope_parameters")
    if params is None:
        params = c.get("rope_scaling")
        key = "rope_scaling"
    else:
        key = "rope_parameters"
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"{where}: {key} should be an object, got {params!r}")
    params = dict(params or {})
    nested = bool(params) and all(isinstance(v, dict) or v is None for v in params.values())
    if nested:
        unknown = sorted(set(params) - {"full_attention", "sliding_attention"})
        if unknown:
            raise UnsupportedArchitectureError(
                f"{where}: {key} has rotary parameters for layer types {unknown}, which "
                "kvformer does not know")
        blocks = {k: dict(v or {}) for k, v in params.items()}
    else:
        blocks = {"full_attention": params}
    full = blocks.setdefault("full_attention", {})
    full.setdefault("rope_theta", c.get("rope_theta"))
    if "sliding_attention" in blocks or c.get("rope_local_base_freq") is not None:
        local = blocks.setdefault("sliding_attention", {})
        local.setdefault("rope_theta", c.get("rope_local_base_freq"))
    for name, block in blocks.items():
        factor = block.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
        if factor not in (None, 1, 1.0):
            raise UnsupportedArchitectureError(
                f"{where}: partial_rotary_factor={factor} ({name}); kvformer rotates the whole "
                "head dimension only")
        if block.get("rope_theta") is None:
            raise CheckpointError(f"{where}: no rope_theta for {name} layers")
    return blocks


def _scaling(block: dict[str, Any], c: dict[str, Any], head_dim: int,
             where: str) -> dict[str, Any] | None:
    """kvformer's rope_scaling for one Hugging Face rotary block (None: plain rotary),
    resolving the defaults as transformers does."""
    kind = block.get("rope_type", block.get("type", "default"))
    if kind in (None, "default"):
        return None
    max_pos = c.get("max_position_embeddings")
    # transformers: a top-level original_max_position_embeddings wins (Phi-3), then the
    # block's, then max_position_embeddings
    original = (c.get("original_max_position_embeddings")
                or block.get("original_max_position_embeddings") or max_pos)

    def need(key: str) -> Any:
        if block.get(key) is None:
            raise CheckpointError(f"{where}: {kind} rotary scaling without {key!r}")
        return block[key]

    if kind == "linear":
        return {"type": "linear", "factor": float(need("factor"))}
    if kind == "dynamic":  # transformers grows the base past max_position_embeddings
        return {"type": "dynamic", "factor": float(need("factor")),
                "original_max_position_embeddings": int(max_pos)}
    if kind == "llama3":
        return {"type": "llama3", "factor": float(need("factor")),
                "low_freq_factor": float(need("low_freq_factor")),
                "high_freq_factor": float(need("high_freq_factor")),
                "original_max_position_embeddings": int(original)}
    if kind == "yarn":
        factor = block.get("factor") or max_pos / original
        attention = block.get("attention_factor")
        if attention is None:
            mscale, mscale_all_dim = block.get("mscale"), block.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention = _yarn_mscale(factor)
        return {"type": "yarn", "factor": float(factor),
                "original_max_position_embeddings": int(original),
                "beta_fast": float(block.get("beta_fast") or 32),
                "beta_slow": float(block.get("beta_slow") or 1),
                "attention_factor": float(attention),
                "truncate": bool(block.get("truncate", True))}
    if kind == "longrope":
        factor = block.get("factor") or max_pos / original
        attention = block.get("attention_factor")
        if attention is None:
            attention = (1.0 if factor <= 1.0 else
                         math.sqrt(1 + math.log(factor) / math.log(original)))
        return {"type": "longrope",
                "short_factor": [float(x) for x in need("short_factor")],
                "long_factor": [float(x) for x in need("long_factor")],
                "original_max_position_embeddings": int(original),
                "attention_factor": float(attention)}
    raise UnsupportedArchitectureError(
        f"{where}: rope_type {kind!r} is a rotary scaling kvformer does not implement "
        "(it implements linear, dynamic, llama3, yarn and longrope); running it with other "
        "positions would compute different logits")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_fields(c: dict[str, Any], head_dim: int, where: str) -> dict[str, Any]:
    blocks = _rope_blocks(c, where)
    full = blocks["full_attention"]
    fields: dict[str, Any] = dict(rope_theta=float(full["rope_theta"]),
                                  rope_scaling=_scaling(full, c, head_dim, where))
    local = blocks.get("sliding_attention")
    if local is not None:
        if _scaling(local, c, head_dim, where) is not None:
            raise UnsupportedArchitectureError(
                f"{where}: scaled rotary positions on the sliding-window layers; kvformer "
                "scales the global layers' only")
        fields["local_rope_theta"] = float(local["rope_theta"])
    return fields


# --------------------------------------------------------------------------- windows
def _layer_types(c: dict[str, Any], arch: _Arch, n_layer: int) -> list[str]:
    """'sliding_attention' or 'full_attention' per layer, as transformers decides them."""
    if c.get("layer_types") is not None:
        return list(c["layer_types"])
    if arch.model_type in ("qwen2", "qwen3"):
        if not c["use_sliding_window"] or c["sliding_window"] is None:
            return ["full_attention"] * n_layer
        return ["sliding_attention" if i >= c["max_window_layers"] else "full_attention"
                for i in range(n_layer)]
    if arch.family == "gemma":  # every pattern-th layer is global
        pattern = c["sliding_window_pattern"]
        return ["sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(n_layer)]
    kind = "full_attention" if c.get("sliding_window") is None else "sliding_attention"
    return [kind] * n_layer  # Mistral, Phi-3: the window (if any) on every layer


def _window_fields(c: dict[str, Any], arch: _Arch, n_layer: int,
                   where: str) -> dict[str, Any]:
    types = _layer_types(c, arch, n_layer)
    if len(types) != n_layer or set(types) - {"sliding_attention", "full_attention"}:
        raise UnsupportedArchitectureError(
            f"{where}: layer_types {types} is not {n_layer} of 'sliding_attention' / "
            "'full_attention'")
    sliding = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    window = c.get("sliding_window")
    if arch.model_type in ("qwen2", "qwen3") and not c.get("use_sliding_window"):
        window = None  # transformers sets sliding_window to None in this case
    if not sliding or window is None:
        return {}
    return dict(sliding_window=int(window),
                sliding_layers=None if len(sliding) == n_layer else tuple(sliding))


# --------------------------------------------------------------------------- config.json
def config_from_hf(config: dict[str, Any], path: PathLike | None = None) -> ModelConfig:
    """A ``ModelConfig`` for a Hugging Face config.json (already parsed into a dict).

    ``path`` (the checkpoint directory) only makes error messages name the file. Raises
    ``UnsupportedArchitectureError`` for architectures and settings kvformer would not run
    exactly as transformers does.
    """
    where = _where(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} should hold a JSON object, got {type(config).__name__}")
    arch = _arch_of(config, path)
    c = {**arch.defaults, **config}  # an explicit null stays null (sliding_window: null)
    try:
        if arch.family == "gpt2":
            fields = _gpt2_fields(c, where)
        else:
            fields = _llama_fields(c, arch, where)
            fields.update(_rope_fields(c, fields["head_dim"], where))
            fields.update(_window_fields(c, arch, fields["n_layer"], where))
            if arch.family == "gemma":
                fields.update(_gemma_fields(c, arch, fields, where))
            if fields["rope_scaling"] and fields["rope_scaling"]["type"] == "dynamic":
                # NTK scaling is for running past the trained context
                fields["max_seq_len"] = int(fields["max_seq_len"]
                                            * fields["rope_scaling"]["factor"])
        fields["name"] = Path(path).name if path is not None else arch.model_type
        return ModelConfig(**fields)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{where} describes a model kvformer cannot build: {exc}") from exc


def _llama_fields(c: dict[str, Any], arch: _Arch, where: str) -> dict[str, Any]:
    """What every rotary family shares: sizes, norms, MLP, biases."""
    gemma = arch.family == "gemma"
    act = c["hidden_activation"] if gemma and c["hidden_activation"] else c["hidden_act"]
    if act not in (_GELU_TANH if gemma else _SILU):
        raise UnsupportedArchitectureError(
            f"{where}: {'hidden_activation' if gemma else 'hidden_act'}={act!r}; kvformer's "
            f"gated MLP for {arch.name} uses "
            f"{' / '.join(_GELU_TANH if gemma else _SILU)} only")
    n_head = c["num_attention_heads"]
    n_kv = c["num_key_value_heads"] if c["num_key_value_heads"] is not None else n_head
    qkv_bias = bias = False
    if arch.model_type == "qwen2":
        qkv_bias = True  # Qwen2: biases on q/k/v and nowhere else
    elif arch.model_type in ("llama", "qwen3") or gemma:
        # attention_bias covers q/k/v/o, mlp_bias the three MLP matrices; RMSNorm has no
        # bias either way. kvformer's bias=True adds o and MLP biases together: a missing
        # half is loaded as zeros (see _implied_zeros), which computes the same thing.
        if arch.model_type != "llama" and c["attention_bias"]:
            raise UnsupportedArchitectureError(
                f"{where}: attention_bias=true on {arch.name} is not supported by kvformer")
        qkv_bias = bool(c["attention_bias"])
        bias = bool(c["attention_bias"] or c.get("mlp_bias"))
    return dict(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layer=c["num_hidden_layers"],
        n_head=n_head, n_kv_head=n_kv,
        head_dim=c["head_dim"] or c["hidden_size"] // n_head, d_ff=c["intermediate_size"],
        max_seq_len=c["max_position_embeddings"], norm="rmsnorm",
        norm_eps=float(c["rms_norm_eps"]), pos="rope", mlp="geglu" if gemma else "swiglu",
        bias=bias, qkv_bias=qkv_bias, tie_embeddings=bool(c["tie_word_embeddings"]),
        qk_norm=arch.model_type in ("qwen3", "gemma3_text"))


def _gemma_fields(c: dict[str, Any], arch: _Arch, fields: dict[str, Any],
                  where: str) -> dict[str, Any]:
    """Gemma 2 and 3: norms after each branch, a scaled embedding, their own attention
    scale, soft-capping (Gemma 2)."""
    if c.get("use_bidirectional_attention"):
        raise UnsupportedArchitectureError(
            f"{where}: use_bidirectional_attention=true (an embedding model); kvformer runs "
            "causal language models only")
    attn_softcap = c.get("attn_logit_softcapping")
    if arch.model_type == "gemma3_text" and attn_softcap is not None:
        # transformers' Gemma 3 attention never applies it (nor does llama.cpp)
        raise UnsupportedArchitectureError(
            f"{where}: attn_logit_softcapping={attn_softcap} on Gemma 3, which transformers "
            "ignores; kvformer refuses rather than guess")
    return dict(
        post_norms=True, embed_scale=float(fields["d_model"] ** 0.5),
        attn_scale=float(c["query_pre_attn_scalar"]) ** -0.5,
        attn_softcap=float(attn_softcap) if attn_softcap is not None else None,
        final_softcap=(float(c["final_logit_softcapping"])
                       if c.get("final_logit_softcapping") is not None else None))


def _gpt2_fields(c: dict[str, Any], where: str) -> dict[str, Any]:
    act = c["activation_function"]
    if act not in _GELU_TANH:
        raise UnsupportedArchitectureError(
            f"{where}: activation_function={act!r}; kvformer's GPT-2 MLP uses the "
            f"tanh-approximate GELU ({', '.join(_GELU_TANH)})")
    if not c["scale_attn_weights"]:
        raise UnsupportedArchitectureError(
            f"{where}: scale_attn_weights=false; kvformer always scales scores by "
            "1/sqrt(head_dim)")
    if c["scale_attn_by_inverse_layer_idx"]:
        raise UnsupportedArchitectureError(
            f"{where}: scale_attn_by_inverse_layer_idx=true is not implemented by kvformer")
    if c["add_cross_attention"]:
        raise UnsupportedArchitectureError(
            f"{where}: add_cross_attention=true (an encoder-decoder GPT-2); kvformer is "
            "decoder-only")
    d = c["n_embd"]
    return dict(
        vocab_size=c["vocab_size"], d_model=d, n_layer=c["n_layer"], n_head=c["n_head"],
        d_ff=c["n_inner"] if c["n_inner"] is not None else 4 * d,
        max_seq_len=c["n_positions"], norm="layernorm",
        norm_eps=float(c["layer_norm_epsilon"]), pos="learned", mlp="gelu", bias=True,
        tie_embeddings=bool(c["tie_word_embeddings"]))


def _implied_zeros(config: dict[str, Any], arch: _Arch) -> tuple[str, ...]:
    """kvformer names (with {i}) the checkpoint lacks by design and that are exactly zero:
    a Llama with attention_bias but no mlp_bias (or the reverse)."""
    if arch.model_type != "llama":
        return ()
    c = {**arch.defaults, **config}
    zeros: tuple[str, ...] = ()
    if not c["attention_bias"]:
        zeros += ("layers.{i}.attn.wo.bias",)
    if not c["mlp_bias"]:
        zeros += tuple(f"layers.{{i}}.mlp.{w}.bias" for w in ("w_gate", "w_up", "w_down"))
    return zeros


# --------------------------------------------------------------------------- files
def _check_dir(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"{p} does not exist; pass a Hugging Face model directory "
                                 "(one holding config.json and *.safetensors)")
    if not p.is_dir():
        raise ModelNotFoundError(f"{p} is a file; pass the directory that holds config.json "
                                 "and the *.safetensors weights")
    return p


def read_hf_config(path: PathLike) -> dict[str, Any]:
    """The parsed config.json of a model directory, with errors that say what to do."""
    p = _check_dir(path)
    cfg_file = p / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelNotFoundError(
            f"{p} has no {CONFIG_FILE}; a Hugging Face model directory needs it next to the "
            "weights (save the model with transformers' save_pretrained, or copy config.json "
            "from where the weights came from)")
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc}); re-download or "
                              "re-save it") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg_file} should hold a JSON object, got "
                              f"{type(data).__name__}")
    return data
