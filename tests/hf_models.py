"""Small random transformers models, their logits, and GGUF files written from them the
way llama.cpp's convert_hf_to_gguf.py writes them (shared by the architecture tests).

The GGUF writer follows the converter's facts, checked against its source and gguf-py:
tensor names come from gguf-py's own name map (``gguf.get_tensor_name_map``); the
``llama`` architecture permutes Q/K rows into interleaved pairs, the others (NEOX rotary
in llama.cpp) do not; Gemma's norms are stored as 1 + w; Llama 3's rotary scaling becomes
``rope_freqs.weight``, one factor per frequency, computed as the converter does; Phi-3
keeps the fused qkv and gate_up matrices (gate_up under ``ffn_up``), writes its LongRoPE
factors as two tensors and ``rope.scaling.attn_factor``, and its window (0 for none);
Gemma 2 writes both soft-caps and its window, Gemma 3 its global rotary base, window and
linear scaling (llama.cpp fixes the pattern at 6 and the windowed layers' base at 10000).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import gguf
import numpy as np
import torch

VOCAB = 97


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Values everywhere (norm weights far from their init) so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def build_hf(cfg_cls: str, kwargs: dict, model_cls: str, seed: int = 0):
    import transformers

    config = getattr(transformers, cfg_cls)(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    randomize(model, seed)
    return model


def hf_cached_logits(hf, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """transformers' own prefill + one-token cached steps: the reference for a cache."""
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    out = hf(input_ids=tokens[:, :prefill], use_cache=True)
    steps = [out.logits]
    for s in range(prefill, tokens.shape[1]):
        out = hf(input_ids=tokens[:, s:s + 1], use_cache=True, **{key: getattr(out, key)})
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


def cached_logits(model, tokens: torch.Tensor, prefill: int, run=None) -> torch.Tensor:
    """Logits of a prefill of ``prefill`` tokens, then one cached step per token, through
    ``run`` (an executor of the model) or the model's forward."""
    run = run or model
    cache = model.new_cache(tokens.shape[0], tokens.shape[1])
    steps = [run(tokens[:, :prefill], cache=cache)]
    for s in range(prefill, tokens.shape[1]):
        steps.append(run(tokens[:, s:s + 1], cache=cache))
    return torch.cat(steps, dim=1)


# ----------------------------------------------------------------------------- HF -> GGUF
_GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
              "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
              "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
              "phi3": gguf.MODEL_ARCH.PHI3}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The converter's Q/K row permutation for the llama architecture."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _llama3_factors(theta: float, head_dim: int, rope: dict) -> torch.Tensor:
    """rope_freqs.weight as the converter computes it from Llama 3's rope parameters."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def hf_to_gguf(hf, path: Path) -> Path:
    """Write ``hf`` (a transformers model) as a GGUF file, F32 tensors, no tokenizer."""
    c = hf.config
    model_type = c.model_type
    arch = _GGUF_ARCH[model_type]
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    n_layer, n_head, n_kv = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
    rope = dict(c.rope_parameters or {})
    full = rope.get("full_attention", rope)
    w.add_block_count(n_layer)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    extra: dict[str, torch.Tensor] = {}
    if model_type == "phi3":
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(full["rope_theta"])
        w.add_sliding_window(c.sliding_window or 0)
        if full.get("rope_type") == "longrope":
            scale = c.max_position_embeddings / c.original_max_position_embeddings
            orig = c.original_max_position_embeddings
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
            extra["rope_factors_long.weight"] = torch.tensor(full["long_factor"])
            extra["rope_factors_short.weight"] = torch.tensor(full["short_factor"])
    elif model_type in ("gemma2", "gemma3_text"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(c.sliding_window)
        if model_type == "gemma2":
            w.add_attn_logit_softcapping(c.attn_logit_softcapping)
            w.add_final_logit_softcapping(c.final_logit_softcapping)
        else:
            w.add_rope_freq_base(full["rope_theta"])
            if full.get("rope_type") == "linear":
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(full["factor"])
    else:  # the generic text-model writer (llama, qwen2, qwen3)
        kind = full.get("rope_type", "default")
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        elif kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(full["factor"])
            w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
            if full.get("beta_fast") is not None:
                w.add_rope_scaling_yarn_beta_fast(full["beta_fast"])
            if full.get("beta_slow") is not None:
                w.add_rope_scaling_yarn_beta_slow(full["beta_slow"])
        elif kind == "llama3":
            extra["rope_freqs.weight"] = _llama3_factors(full["rope_theta"], head_dim, full)
        w.add_rope_freq_base(full["rope_theta"])
        if getattr(c, "head_dim", None) is not None:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if model_type in ("llama", "mistral"):
            w.add_vocab_size(c.vocab_size)
            w.add_rope_dimension_count(head_dim)
    names = gguf.get_tensor_name_map(arch, n_layer)
    for name, t in extra.items():
        w.add_tensor(name, t.numpy().astype(np.float32))
    for hf_name, t in hf.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.detach().float()
        if model_type in ("llama", "mistral") and hf_name.endswith("q_proj.weight"):
            t = _permute(t, n_head)
        if model_type in ("llama", "mistral") and hf_name.endswith("k_proj.weight"):
            t = _permute(t, n_kv)
        if model_type.startswith("gemma") and hf_name.endswith("norm.weight"):
            t = t + 1
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert new is not None, hf_name
        w.add_tensor(new, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
