"""``kvformer info``: a model's architecture, parameters, attention kind and KV-cache size,
and the kernels it runs on here."""

from __future__ import annotations

from collections import Counter

from kvformer.cli.common import kernels_line, model_arg
from kvformer.fileio import human_bytes
from kvformer.formats.gguf.blocks import what_runs
from kvformer.formats.gguf.reader import open_reader
from kvformer.formats.load import check_model, load_config
from kvformer.kv.formats import INT4_GROUP
from kvformer.runtime.step import describe


def weight_rows(path) -> list[tuple[str, str]]:
    """For a GGUF file: each tensor type, how many, and what runs it with --dtype auto."""
    if path is None or path.suffix.lower() != ".gguf":
        return []
    seen: Counter = Counter()
    with open_reader(path) as reader:
        for info in reader.tensors.values():
            seen[(info.type_name, what_runs(info.type_id, info.type_name, info.shape))] += 1
    return [("weights (--dtype auto)" if i == 0 else "", f"{n:>4} {t:<7} {how}")
            for i, ((t, how), n) in enumerate(sorted(seen.items(), key=lambda kv: -kv[1]))]


def run(args) -> int:
    cfg, arch, path = load_config(model_arg(args))
    checked = check_model(model_arg(args))  # fails, in one line, where generate would
    kv_dtypes = [d for d in ("fp32", "bf16", "int8", "int4")
                 if d != "int4" or cfg.head_dim % INT4_GROUP == 0]

    def per_dtype(c, tokens: int) -> str:  # int8 and int4 with their scales
        return " · ".join(f"{d} {c.kv_cache_bytes(tokens, 1, d):,} B" if tokens == 1 else
                          f"{d} {human_bytes(c.kv_cache_bytes(tokens, 1, d))}"
                          for d in kv_dtypes)
    kind_line = {"MHA": "multi-head (MHA)", "GQA": "grouped-query (GQA)",
                 "MQA": "multi-query (MQA)"}[cfg.attention_kind]
    rows = [
        ("model", str(path or model_arg(args))), ("architecture", arch),
        ("parameters", f"{cfg.num_params():,}"),
        ("layers", cfg.n_layer), ("d_model", cfg.d_model), ("d_ff", cfg.d_ff),
        ("vocab", cfg.vocab_size), ("context", cfg.max_seq_len),
        ("attention", f"{kind_line}: {cfg.n_head} query heads, {cfg.n_kv_head} KV heads, "
                      f"group size {cfg.group_size}, head_dim {cfg.head_dim}"),
        ("norm / positions / mlp", f"{cfg.norm} / {cfg.pos} / {cfg.mlp}"),
        *((("rotary positions", cfg.rope_summary()),) if cfg.rope_summary() else ()),
        *((("block", cfg.block_summary()),) if cfg.block_summary() else ()),
        ("KV cache per token", per_dtype(cfg, 1)),
        (f"KV cache, full context {cfg.max_seq_len}", per_dtype(cfg, cfg.max_seq_len)),
        ("  the same model as MHA",
         per_dtype(cfg.replace(n_kv_head=cfg.n_head), cfg.max_seq_len)),
        ("kernels on this CPU", kernels_line()),
        *weight_rows(path),
        ("runs on", describe(cfg)),
        ("file", checked),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
