"""Pictures of what happens inside: KV-cache arithmetic, attention maps, the effect of
the 1/sqrt(d_k) scale, and the cache's speed-up. Every number behind a picture comes from
the model's own code (the attention weights are recorded by the attention layer itself).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch

from kvformer.config import ModelConfig
from kvformer.fileio import human_bytes
from kvformer.kv.formats import INT4_GROUP, kv_format
from kvformer.runtime.step import for_model
from kvformer.tools.timing import seconds

matplotlib.use("Agg")  # files only, no display: chosen before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

# KV dtypes kv-size shows (int8 and int4 with their scales: kvformer.kv.formats)
DTYPE_NAMES = ("fp32", "fp16", "bf16", "int8", "int4")
DTYPE_COLORS = {"fp32": "#7f7f7f", "fp16": "#c44", "bf16": "#c44", "int8": "#4a4",
                "int4": "#48c"}


# ---------------------------------------------------------------------------- KV-cache size
@dataclass
class KVRow:
    model: str
    variant: str  # "MHA", "GQA (G KV heads)", "MQA"
    n_head: int
    n_kv_head: int
    per_token: int
    total: int
    own: bool  # the model's own attention kind
    dtype: str = "fp16"  # what the cache stores: fp32, fp16, bf16, int8, int4


def _dtype_names(dtypes) -> list[str]:
    if isinstance(dtypes, (str, torch.dtype)):
        dtypes = [dtypes]
    return [kv_format(d).name for d in dtypes]


def kv_size_rows(name: str, cfg: ModelConfig, context: int, batch: int = 1,
                 dtypes=("fp16",)) -> list[KVRow]:
    """The model as MHA, GQA and MQA side by side (only the number of KV heads changes),
    each in every KV dtype of ``dtypes`` (names or torch dtypes; int4 only where head_dim
    is a multiple of 32)."""
    kv_options = [cfg.n_head]
    gqa = cfg.n_kv_head if 1 < cfg.n_kv_head < cfg.n_head else None
    if gqa is None and cfg.n_head % 8 == 0 and cfg.n_head > 8:
        gqa = cfg.n_head // 8  # the seed's G = N/8
    if gqa:
        kv_options.append(gqa)
    kv_options.append(1)
    rows = []
    for kv in dict.fromkeys(kv_options):
        variant = cfg.replace(n_kv_head=kv)
        kind = variant.attention_kind
        label = f"GQA ({kv} KV heads)" if kind == "GQA" else kind
        for dt in _dtype_names(dtypes):
            if dt == "int4" and cfg.head_dim % INT4_GROUP:
                continue
            rows.append(KVRow(name, label, cfg.n_head, kv, variant.kv_cache_bytes(1, 1, dt),
                              variant.kv_cache_bytes(context, batch, dt),
                              kv == cfg.n_kv_head, dt))
    return rows


def format_kv_table(rows: Sequence[KVRow], context: int, batch: int,
                    dtype_name: str | None = None) -> str:
    dtypes = list(dict.fromkeys(r.dtype for r in rows))
    first = dtypes[0] if dtypes else "fp16"
    lines = [f"KV cache, context {context}, batch {batch}, {', '.join(dtypes)} "
             "(2 · n_layer · n_kv_head · tokens · batch · bytes of a head's row: head_dim "
             "numbers, plus the scales of int8 and int4)",
             f"{'model':<16} {'attention':<20} {'KV':<5} {'per token':>22} {'total':>28} "
             f"{'vs MHA ' + first:>12}"]
    mha: dict[str, int] = {}
    for r in rows:
        if r.variant == "MHA" and r.dtype == first:
            mha.setdefault(r.model, r.total)
    for r in rows:
        ratio = mha[r.model] / r.total if r.model in mha else float("nan")
        mark = " *" if r.own else ""
        lines.append(f"{r.model:<16} {r.variant + mark:<20} {r.dtype:<5} "
                     f"{r.per_token:>10,} B {human_bytes(r.per_token):>10} "
                     f"{r.total:>16,} B {human_bytes(r.total):>10} {ratio:>11.1f}×")
    lines.append("* the model's own attention kind")
    return "\n".join(lines)


def plot_kv_sizes(rows: Sequence[KVRow], out: str | Path, context: int, batch: int,
                  dtype_name: str | None = None, quality: dict[str, str] | None = None) -> Path:
    """Bars per attention kind, one per KV dtype, per model. ``quality``: a note per KV
    dtype (what it costs), shown in the legend."""
    return _save(kv_sizes_figure(rows, context, batch, quality), out)


def kv_sizes_figure(rows: Sequence[KVRow], context: int, batch: int,
                    quality: dict[str, str] | None = None):
    """The figure of ``plot_kv_sizes``: its title and legend wrapped to the width of the
    panels (one model's panel is narrower than the title's one line)."""
    models = list(dict.fromkeys(r.model for r in rows))
    dtypes = list(dict.fromkeys(r.dtype for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4.2), squeeze=False)
    width = 0.8 / len(dtypes)
    for ax, m in zip(axes[0], models):
        sub = [r for r in rows if r.model == m]
        variants = list(dict.fromkeys(r.variant for r in sub))
        for j, dt in enumerate(dtypes):
            xs, ys, rs = [], [], []
            for i, v in enumerate(variants):
                r = next((r for r in sub if r.variant == v and r.dtype == dt), None)
                if r is not None:
                    xs.append(i + (j - (len(dtypes) - 1) / 2) * width)
                    ys.append(r.total / 2**20)
                    rs.append(r)
            label = dt + (f" ({quality[dt]})" if quality and dt in quality else "")
            bars = ax.bar(xs, ys, width, color=DTYPE_COLORS.get(dt, "#999"),
                          alpha=1.0 - 0.22 * (j % 2 if dt in ("fp16", "bf16") else 0),
                          label=label)
            for bar, r in zip(bars, rs):
                ax.annotate(human_bytes(r.total).replace(" ", "\n"),
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(variants)),
                      [v.replace(" (", "\n(") + (" *" if any(r.own for r in sub
                                                              if r.variant == v) else "")
                       for v in variants])
        ax.set_yscale("log")
        ax.set_ylabel("KV cache (MiB, log scale)")
        ax.set_title(f"{m}: {sub[0].n_head} query heads", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    chars = int(fig.get_figwidth() * 12)  # about what a line of 10-point text holds
    columns = max(1, min(len(dtypes), chars * 8 // 10 // max(len(x) + 6 for x in labels)))
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.suptitle(textwrap.fill(f"KV-cache size at context {context}, batch {batch}, per KV "
                               "dtype (* the model's own attention kind)", chars),
                 fontsize=10)
    rows_of_legend = math.ceil(len(labels) / columns)
    fig.tight_layout(rect=(0, 0.035 + 0.035 * rows_of_legend, 1, 1))
    return fig


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------- attention maps
@torch.inference_mode()
def record_attention(model, ids: Sequence[int]) -> list[torch.Tensor]:
    """Run the model once over ids and return, per layer, the attention weights
    softmax(QK^T / sqrt(d_k)) under the causal mask, [n_head, T, T], as the model's own
    attention layers computed them."""
    sinks: list[list[torch.Tensor]] = []
    for block in model.layers:
        block.attn.weights_sink = []
        sinks.append(block.attn.weights_sink)
    try:
        model(torch.tensor([list(ids)], device=model.device))
    finally:
        for block in model.layers:
            block.attn.weights_sink = None
    return [s[0][0].float() for s in sinks]


def plot_attention(weights: torch.Tensor, labels: Sequence[str], out: str | Path,
                   title: str, head: int | None = None) -> Path:
    """weights [n_head, T, T]; one head, or a grid of all heads."""
    heads = [head] if head is not None else list(range(weights.shape[0]))
    cols = min(len(heads), 3)
    rows = math.ceil(len(heads) / cols)
    t = weights.shape[-1]
    size = max(3.2, min(0.32 * t, 9.0))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.5, size * rows + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, h in zip(axes.flat, heads):
        ax.axis("on")
        im = ax.imshow(weights[h].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=9)
        if t <= 40:
            ax.set_xticks(range(t), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(t), labels, fontsize=7)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight")
    fig.suptitle(title)
    return _save(fig, out)


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    labels = []
    for i in ids:
        text = tokenizer.decode([i]) if tokenizer is not None else str(i)
        text = text.replace("\n", "\\n").replace(" ", "·")
        labels.append(text[:12] or "∅")
    return labels


# ---------------------------------------------------------------------------- why sqrt(d_k)
def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats along the last dim (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(1e-30))).where(p > 0, torch.zeros(())).sum(-1)


def random_scaling_stats(dims: Sequence[int] = (4, 16, 64, 256, 1024), n_keys: int = 64,
                         trials: int = 2000, seed: int = 0) -> list[dict]:
    """For q, k with independent N(0, 1) entries: Var(q.k) and the softmax entropy over
    n_keys keys, unscaled and scaled by 1/sqrt(d_k)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in dims:
        q = torch.randn(trials, 1, d, generator=g)
        k = torch.randn(trials, n_keys, d, generator=g)
        scores = (q @ k.transpose(1, 2)).squeeze(1)  # [trials, n_keys]
        out.append({
            "d_k": d,
            "var_dot": scores.var().item(),
            "var_scaled": (scores / math.sqrt(d)).var().item(),
            "entropy_unscaled": entropy(torch.softmax(scores, -1)).mean().item(),
            "entropy_scaled": entropy(torch.softmax(scores / math.sqrt(d), -1)).mean().item(),
            "max_weight_unscaled": torch.softmax(scores, -1).max(-1).values.mean().item(),
            "max_weight_scaled": torch.softmax(scores / math.sqrt(d), -1).max(-1)
                                      .values.mean().item(),
            "uniform_entropy": math.log(n_keys),
        })
    return out


def unscale(weights: torch.Tensor, d_k: int) -> torch.Tensor:
    """The attention the same scores would give without the 1/sqrt(d_k) scale.

    log w = s / sqrt(d_k) - log Z, so softmax(sqrt(d_k) * log w) = softmax(s): exact, with
    masked keys (w = 0) staying masked."""
    logw = torch.log(weights.double()).masked_fill(weights == 0, float("-inf"))
    return torch.softmax(logw * math.sqrt(d_k), dim=-1).to(weights.dtype)


def model_entropy_per_head(layers: list[torch.Tensor], d_k: int, skip: int = 8):
    """Mean entropy (nats) per layer and head of the recorded weights, and of the same
    scores unscaled; only queries with at least ``skip`` visible keys are averaged."""
    scaled, unscaled = [], []
    for w in layers:
        w = w[:, skip:]  # queries early in the sequence see too few keys to say much
        scaled.append(entropy(w).mean(-1))
        unscaled.append(entropy(unscale(w, d_k)).mean(-1))
    return torch.stack(scaled), torch.stack(unscaled)  # [n_layer, n_head]


def plot_scaling(stats: list[dict], out: str | Path, model_entropy=None,
                 model_name: str = "") -> Path:
    n = 3 if model_entropy is not None else 2
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2))
    dims = [s["d_k"] for s in stats]
    ax = axes[0]
    ax.loglog(dims, [s["var_dot"] for s in stats], "o-", label="Var(q·k)")
    ax.loglog(dims, [s["var_scaled"] for s in stats], "s-", label="Var(q·k / √d_k)")
    ax.loglog(dims, dims, "k:", label="d_k")
    ax.set_xlabel("d_k")
    ax.set_title("dot products grow with d_k")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.semilogx(dims, [s["entropy_unscaled"] for s in stats], "o-", color="#c44",
                label="softmax(q·k)")
    ax.semilogx(dims, [s["entropy_scaled"] for s in stats], "s-", color="#4a4",
                label="softmax(q·k / √d_k)")
    ax.axhline(stats[0]["uniform_entropy"], color="k", ls=":", label="uniform (log n)")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("d_k")
    ax.set_ylabel("entropy (nats)")
    ax.set_title("unscaled softmax collapses to one-hot")
    ax.legend(fontsize=8)
    if model_entropy is not None:
        scaled, unscaled = model_entropy
        ax = axes[2]
        ax.scatter(unscaled.flatten().numpy(), scaled.flatten().numpy(), s=8, alpha=0.6)
        hi = float(max(scaled.max(), unscaled.max())) * 1.05
        ax.plot([0, hi], [0, hi], "k:", lw=1)
        ax.set_xlabel("entropy without the scale (nats)")
        ax.set_ylabel("entropy with 1/√d_k (nats)")
        ax.set_title(f"{model_name}: every head, every layer", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


# ---------------------------------------------------------------------------- cache speed-up
@torch.inference_mode()
def time_per_token(model, lengths: Sequence[int], repeats: int = 3, seed: int = 0,
                   report=None):
    """Seconds to make one more token at each sequence length: with the KV cache (one
    token through the model, attending to the cached ones) and without (the whole
    sequence through the model again). Medians of ``repeats``; ``report(row)`` is called
    with each row as it is measured."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    executor = for_model(model)  # decode through the model's executor, as generate does
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (1, n + 1), generator=g, device=model.device)
        cache = model.new_cache(1, n + 1)
        executor(ids[:, :n], cache=cache)
        cached, full = [], []
        for _ in range(repeats):  # interleaved, so that a busy machine slows both alike
            cached += seconds(lambda: executor(ids[:, n:], cache=cache),  # noqa: B023
                              before=lambda: cache.truncate(n))  # noqa: B023
            full += seconds(lambda: model(ids))  # noqa: B023
        rows.append({"length": n, "with_cache_s": sorted(cached)[len(cached) // 2],
                     "without_cache_s": sorted(full)[len(full) // 2]})
        if report is not None:
            report(rows[-1])
    return rows


def plot_cache_timing(rows: list[dict], out: str | Path, model_name: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lengths = [r["length"] for r in rows]
    ax.plot(lengths, [1000 * r["without_cache_s"] for r in rows], "o-", color="#c44",
            label="without KV cache (recompute all)")
    ax.plot(lengths, [1000 * r["with_cache_s"] for r in rows], "s-", color="#4a4",
            label="with KV cache (one token)")
    ax.set_xlabel("tokens already in the sequence")
    ax.set_ylabel("ms per generated token")
    ax.set_title(f"{model_name}: the cost of the next token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)
