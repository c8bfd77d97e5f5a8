"""Hugging Face safetensors directories -> tensors under kvformer's names.

A directory written by ``transformers``' ``save_pretrained(..., safe_serialization=True)``
holds ``config.json`` and either ``model.safetensors`` or several shards listed in
``model.safetensors.index.json``. ``iter_hf_tensors`` streams the weights one tensor at a
time, renamed to kvformer's names through a per-family table (``NAME_TABLES``),
transposed/split where the layout differs (GPT-2's Conv1D, Phi-3's fused matrices),
Gemma's norms turned from w into 1 + w, and checked against the shapes the config implies;
``load_hf_dir`` / ``model_from_hf_dir`` collect them into a state dict / a ready model.

Only safetensors are read: pickle files (``pytorch_model.bin``, ``*.pt``) can run arbitrary
code when loaded, so they are refused with instructions to convert them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kvformer.config import ModelConfig
from kvformer.errors import CheckpointError
from kvformer.formats.hf.config import (
    PathLike,
    _arch_of,
    _check_dir,
    _implied_zeros,
    config_from_hf,
    read_hf_config,
)
from kvformer.model.transformer import Transformer

__all__ = ["NAME_TABLES", "iter_hf_tensors", "load_hf_dir", "model_from_hf_dir"]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

# --------------------------------------------------------------------------- name tables
# One row per Hugging Face tensor: (HF name after the family prefix, kvformer name(s), op).
# "{i}" stands for the layer index. Ops:
#   copy       the tensor as it is
#   t          transpose a 2-D tensor (GPT-2's Conv1D keeps weights as [in, out])
#   t_split3   transpose, then split the rows in three equal parts (GPT-2's fused c_attn)
#   split3     split in three equal parts (the fused c_attn bias)
#   rows       split the rows into the targets' row counts (Phi-3's fused qkv and gate_up)
#   plus1      add 1 (Gemma's RMSNorm multiplies by 1 + w; kvformer's by its weight)
COPY, T, T_SPLIT3, SPLIT3, ROWS, PLUS1 = "copy", "t", "t_split3", "split3", "rows", "plus1"

_Rows = tuple[tuple[str, tuple[str, ...], str], ...]


def _attention_rows(norm_op: str = COPY) -> _Rows:
    rows: list[tuple[str, tuple[str, ...], str]] = []
    for hf, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
        for kind in ("weight", "bias"):
            rows.append((f"layers.{{i}}.self_attn.{hf}.{kind}",
                         (f"layers.{{i}}.attn.{ours}.{kind}",), COPY))
    rows += [("layers.{i}.self_attn.q_norm.weight", ("layers.{i}.attn.q_norm.weight",), norm_op),
             ("layers.{i}.self_attn.k_norm.weight", ("layers.{i}.attn.k_norm.weight",), norm_op)]
    return tuple(rows)


def _mlp_rows() -> _Rows:
    return tuple((f"layers.{{i}}.mlp.{hf}.{kind}", (f"layers.{{i}}.mlp.{ours}.{kind}",), COPY)
                 for hf, ours in (("gate_proj", "w_gate"), ("up_proj", "w_up"),
                                  ("down_proj", "w_down"))
                 for kind in ("weight", "bias"))


_LLAMA_ROWS: _Rows = (
    ("embed_tokens.weight", ("tok_emb.weight",), COPY),
    ("layers.{i}.input_layernorm.weight", ("layers.{i}.attn_norm.weight",), COPY),
    *_attention_rows(),
    ("layers.{i}.post_attention_layernorm.weight", ("layers.{i}.mlp_norm.weight",), COPY),
    *_mlp_rows(),
    ("norm.weight", ("norm.weight",), COPY),
    ("lm_head.weight", ("lm_head.weight",), COPY),
)

# Gemma 2 and 3: four norms a block, all stored as w for a multiplier of 1 + w.
_GEMMA_ROWS: _Rows = (
    ("embed_tokens.weight", ("tok_emb.weight",), COPY),
    ("layers.{i}.input_layernorm.weight", ("layers.{i}.attn_norm.weight",), PLUS1),
    *_attention_rows(PLUS1),
    ("layers.{i}.post_attention_layernorm.weight", ("layers.{i}.attn_post_norm.weight",), PLUS1),
    ("layers.{i}.pre_feedforward_layernorm.weight", ("layers.{i}.mlp_norm.weight",), PLUS1),
    ("layers.{i}.post_feedforward_layernorm.weight", ("layers.{i}.mlp_post_norm.weight",),
     PLUS1),
    *_mlp_rows(),
    ("norm.weight", ("norm.weight",), PLUS1),
    ("lm_head.weight", ("lm_head.weight",), COPY),
)

# Phi-3: Llama's block with Q, K, V in one matrix ([q; k; v] rows) and gate, up in another.
_PHI3_ROWS: _Rows = (
    ("embed_tokens.weight", ("tok_emb.weight",), COPY),
    ("layers.{i}.input_layernorm.weight", ("layers.{i}.attn_norm.weight",), COPY),
    ("layers.{i}.self_attn.qkv_proj.weight",
     ("layers.{i}.attn.wq.weight", "layers.{i}.attn.wk.weight", "layers.{i}.attn.wv.weight"),
     ROWS),
    ("layers.{i}.self_attn.o_proj.weight", ("layers.{i}.attn.wo.weight",), COPY),
    ("layers.{i}.post_attention_layernorm.weight", ("layers.{i}.mlp_norm.weight",), COPY),
    ("layers.{i}.mlp.gate_up_proj.weight",
     ("layers.{i}.mlp.w_gate.weight", "layers.{i}.mlp.w_up.weight"), ROWS),
    ("layers.{i}.mlp.down_proj.weight", ("layers.{i}.mlp.w_down.weight",), COPY),
    ("norm.weight", ("norm.weight",), COPY),
    ("lm_head.weight", ("lm_head.weight",), COPY),
)

_GPT2_ROWS: _Rows = (
    ("wte.weight", ("tok_emb.weight",), COPY),
    ("wpe.weight", ("pos_emb.weight",), COPY),
    ("h.{i}.ln_1.weight", ("layers.{i}.attn_norm.weight",), COPY),
    ("h.{i}.ln_1.bias", ("layers.{i}.attn_norm.bias",), COPY),
    ("h.{i}.attn.c_attn.weight",
     ("layers.{i}.attn.wq.weight", "layers.{i}.attn.wk.weight", "layers.{i}.attn.wv.weight"),
     T_SPLIT3),
    ("h.{i}.attn.c_attn.bias",
     ("layers.{i}.attn.wq.bias", "layers.{i}.attn.wk.bias", "layers.{i}.attn.wv.bias"),
     SPLIT3),
    ("h.{i}.attn.c_proj.weight", ("layers.{i}.attn.wo.weight",), T),
    ("h.{i}.attn.c_proj.bias", ("layers.{i}.attn.wo.bias",), COPY),
    ("h.{i}.ln_2.weight", ("layers.{i}.mlp_norm.weight",), COPY),
    ("h.{i}.ln_2.bias", ("layers.{i}.mlp_norm.bias",), COPY),
    ("h.{i}.mlp.c_fc.weight", ("layers.{i}.mlp.w_up.weight",), T),
    ("h.{i}.mlp.c_fc.bias", ("layers.{i}.mlp.w_up.bias",), COPY),
    ("h.{i}.mlp.c_proj.weight", ("layers.{i}.mlp.w_down.weight",), T),
    ("h.{i}.mlp.c_proj.bias", ("layers.{i}.mlp.w_down.bias",), COPY),
    ("ln_f.weight", ("norm.weight",), COPY),
    ("ln_f.bias", ("norm.bias",), COPY),
    ("lm_head.weight", ("lm_head.weight",), COPY),
)

NAME_TABLES: dict[str, _Rows] = {
    "llama": _LLAMA_ROWS,  # Llama, Mistral, Qwen2 and Qwen3 share one layout
    "gemma": _GEMMA_ROWS,
    "phi3": _PHI3_ROWS,
    "gpt2": _GPT2_ROWS,
}

# Prefixes a family's tensors may carry (a *ForCausalLM checkpoint has them, a bare base
# model does not); the first that matches is stripped before the table lookup.
_PREFIXES = {"llama": ("model.",), "gemma": ("model.",), "phi3": ("model.",),
             "gpt2": ("transformer.",)}

# Tensors that are not parameters: causal-mask buffers of old GPT-2 checkpoints, rotary
# frequency tables some exporters save. kvformer recomputes them, so they are skipped.
_ROTARY_BUFFERS = ("layers.{i}.self_attn.rotary_emb.inv_freq", "rotary_emb.inv_freq",
                   "rotary_emb.original_inv_freq")
_SKIP = {
    "llama": _ROTARY_BUFFERS,
    "gemma": _ROTARY_BUFFERS,
    "phi3": _ROTARY_BUFFERS,
    "gpt2": ("h.{i}.attn.bias", "h.{i}.attn.masked_bias"),
}


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")


@dataclass(frozen=True)
class _Row:
    hf: str
    pattern: re.Pattern[str]
    targets: tuple[str, ...]
    op: str


def _compile(family: str) -> tuple[list[_Row], list[re.Pattern[str]]]:
    rows = [_Row(hf, _template_regex(hf), targets, op) for hf, targets, op in NAME_TABLES[family]]
    return rows, [_template_regex(s) for s in _SKIP[family]]


# --------------------------------------------------------------------------- files
def _refuse_pickles(p: Path) -> None:
    pickles = sorted({f.name for pat in PICKLE_PATTERNS for f in p.glob(pat) if f.is_file()})
    if pickles:
        raise CheckpointError(
            f"{p} holds PyTorch pickle weights ({', '.join(pickles)}) and no safetensors. "
            "kvformer does not load pickle files: unpickling can run arbitrary code. Convert "
            "them once, in a trusted environment, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, "
            "safe_serialization=True), then load dst")


def _shard_plan(p: Path) -> list[tuple[Path, list[str] | None]]:
    """(file, tensor names the index assigns to it or None for all) in reading order."""
    index = p / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc}); it "
                                  "should map tensor names to shard files under "
                                  "'weight_map'") from exc
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        plan = []
        for shard in sorted(shards):
            file = p / shard
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{index} names shard {shard!r}, which is not a file "
                                      f"name in {p}; shards must sit next to the index")
            if not file.is_file():
                raise CheckpointError(
                    f"{index} lists shard {shard} ({len(shards[shard])} tensors), but "
                    f"{file} is missing; download or copy every shard the index names")
            plan.append((file, sorted(shards[shard])))
        return plan
    single = p / SAFETENSORS_FILE
    if single.is_file():
        return [(single, None)]
    _refuse_pickles(p)
    others = sorted(f.name for f in p.glob("*.safetensors"))
    hint = (f" (found {', '.join(others)} but no {SAFETENSORS_INDEX} saying how they fit "
            "together)" if others else "")
    raise CheckpointError(f"{p} has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}{hint}; "
                          "save the model with save_pretrained(..., safe_serialization=True)")


def _read_safetensors(plan: list[tuple[Path, list[str] | None]]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    for file, names in plan:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                available = set(handle.keys())
                if names is not None:
                    missing = [n for n in names if n not in available]
                    if missing:
                        raise CheckpointError(
                            f"{file} lacks {len(missing)} tensor(s) its index assigns to it "
                            f"(e.g. {missing[0]}); the shard is stale or from another "
                            "download")
                for name in names if names is not None else sorted(available):
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"{file} could not be read as safetensors ({exc}); the file is truncated or "
                "corrupt, re-download it") from exc


# --------------------------------------------------------------------------- tensors
def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """kvformer's state-dict names and shapes for cfg, from a model on the meta device (no
    memory, no init)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _apply(op: str, tensor: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
    """The row's op on one checkpoint tensor; ``rows`` are the row counts of its targets."""
    n_out = len(rows)
    if op == COPY:
        return [tensor]
    if op == PLUS1:  # in fp32, as Gemma's norm computes 1 + w
        return [tensor.float() + 1.0]
    if op == ROWS:
        if tensor.dim() != 2 or tensor.shape[0] != sum(rows):
            raise ValueError(f"expected {sum(rows)} rows ({' + '.join(map(str, rows))}), got "
                             f"shape {list(tensor.shape)}")
        return [part.contiguous().clone() for part in torch.split(tensor, rows, dim=0)]
    if op in (T, T_SPLIT3) and tensor.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {list(tensor.shape)}")
    if op == T:
        return [tensor.t().contiguous()]
    if op in (T_SPLIT3, SPLIT3):
        whole = tensor.t() if op == T_SPLIT3 else tensor
        if whole.shape[0] % n_out:
            raise ValueError(f"cannot split {whole.shape[0]} rows in {n_out} equal parts")
        return [part.contiguous().clone() for part in whole.chunk(n_out, dim=0)]
    raise AssertionError(f"unknown op {op!r}")


def iter_hf_tensors(path: PathLike, cfg: ModelConfig, dtype: torch.dtype = torch.float32
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(kvformer_name, tensor)`` for every weight of the checkpoint in ``path``, one
    safetensors tensor at a time (never the whole model), converted to ``dtype``.

    Every tensor is checked against the shape ``cfg`` implies; unknown tensors, missing
    ones and mismatched shapes raise ``CheckpointError`` naming the tensor. The last
    tensors come only once every file is read, so the completeness check is done by then.
    """
    p = _check_dir(path)
    hf_config = read_hf_config(p)
    arch = _arch_of(hf_config, p)
    rows, skips = _compile(arch.family)
    prefixes = _PREFIXES[arch.family]
    expected = _expected_shapes(cfg)
    seen: dict[str, str] = {}  # kvformer name -> HF name it came from

    for hf_name, raw in _read_safetensors(_shard_plan(p)):
        short = next((hf_name[len(pre):] for pre in prefixes if hf_name.startswith(pre)),
                     hf_name)
        if any(s.match(short) for s in skips):
            continue
        row, match = next(((r, m) for r in rows if (m := r.pattern.match(short))),
                          (None, None))
        if row is None:
            raise CheckpointError(
                f"{p}: tensor {hf_name!r} is not part of a {arch.name} that kvformer knows "
                f"(shape {list(raw.shape)}); the checkpoint is a variant kvformer does not "
                "implement, or its config.json names the wrong architecture")
        targets = [t.replace("{i}", match.groupdict().get("i") or "") for t in row.targets]
        if targets == ["lm_head.weight"] and cfg.tie_embeddings:
            continue  # tied: the head is the embedding (transformers ties them the same way)
        if not raw.is_floating_point():
            raise CheckpointError(f"{p}: tensor {hf_name!r} has dtype {raw.dtype}; expected "
                                  "floating-point weights (quantized checkpoints are not "
                                  "read by this loader)")
        try:
            parts = _apply(row.op, raw, [expected.get(t, (0,))[0] for t in targets])
        except ValueError as exc:
            raise CheckpointError(f"{p}: tensor {hf_name!r} (shape {list(raw.shape)}) cannot "
                                  f"become {', '.join(targets)}: {exc}") from exc
        del raw
        for name, tensor in zip(targets, parts):
            if name not in expected:
                raise CheckpointError(
                    f"{p}: tensor {hf_name!r} maps to {name!r}, which a model with this "
                    f"config.json does not have (n_layer={cfg.n_layer}, "
                    f"tie_embeddings={cfg.tie_embeddings}, bias={cfg.bias}, "
                    f"qkv_bias={cfg.qkv_bias}); checkpoint and config.json disagree")
            if name in seen:
                raise CheckpointError(f"{p}: {name!r} is given twice (by {seen[name]!r} and "
                                      f"{hf_name!r}); the checkpoint files overlap")
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(
                    f"{p}: tensor {hf_name!r} has shape {list(tensor.shape)} for {name!r}, "
                    f"but config.json implies {list(expected[name])}; checkpoint and "
                    "config.json disagree (wrong config.json, or a damaged export)")
            seen[name] = hf_name
            yield name, tensor.to(dtype)

    missing = [n for n in expected if n not in seen]
    zero_patterns = [_template_regex(z) for z in _implied_zeros(hf_config, arch)]
    for name in [n for n in missing if any(z.match(n) for z in zero_patterns)]:
        missing.remove(name)
        yield name, torch.zeros(expected[name], dtype=dtype)
    if missing:
        listed = ", ".join(f"{n} (HF {_hf_name_for(n, rows, prefixes)})" for n in missing[:6])
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        raise CheckpointError(
            f"{p}: the checkpoint lacks {len(missing)} tensor(s) its config.json implies: "
            f"{listed}{more}; the files are incomplete (a shard missing from the index?) or "
            "config.json describes a different model")


def _hf_name_for(kv_name: str, rows: list[_Row], prefixes: tuple[str, ...]) -> str:
    for row in rows:
        for target in row.targets:
            m = _template_regex(target).match(kv_name)
            if m:
                short = row.hf.replace("{i}", m.groupdict().get("i") or "")
                return short if short.startswith("lm_head") else prefixes[0] + short
    return "?"


def load_hf_dir(path: PathLike, dtype: torch.dtype = torch.float32
                ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, kvformer state dict) for a Hugging Face model directory."""
    p = _check_dir(path)
    cfg = config_from_hf(read_hf_config(p), p)
    return cfg, dict(iter_hf_tensors(p, cfg, dtype))


def model_from_hf_dir(path: PathLike, dtype: torch.dtype = torch.float32):
    """A ``kvformer.Transformer`` with every weight from the checkpoint (strictly: no
    parameter is left at a random initial value), in eval mode."""
    cfg, state = load_hf_dir(path, dtype)
    try:  # built on the meta device around the loaded tensors: no init, no second copy
        model = Transformer.from_state_dict(cfg, state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the weights do not fit the model: {exc}") from exc
    return model.eval()
