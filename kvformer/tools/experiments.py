"""Equal-budget comparisons: norms, positional encodings, attention kinds.

    kvformer experiment norms|positions|attention|all [--out docs] [--steps N]

Every model has the same shape (d_model, layers, heads, d_ff), trains for the same number of
steps on the same batches (same seed, same data order, same learning-rate schedule) and
differs in one thing only. The corpus is the Python standard library's own source: a fixed,
sorted, evenly spaced subset of its .py files, read byte by byte, so the experiment needs no
download and anyone can rerun it (the exact files depend on the Python version, which the report
names).

What is measured, per model:
- validation loss (nats per byte) at the training length T, in eval mode (BatchNorm uses its
  running statistics, as it must at inference), with the standard error over windows;
- validation loss at 2T, and per position, to see which positional encodings extrapolate
  (learned positions have no vector past T: reported as not applicable);
- training throughput in tokens/s: timed separately, every model in turn, several rounds,
  keeping each model's best round, so that other load on the machine biases no one model;
- KV-cache bytes for a full context of T tokens (``ModelConfig.kv_cache_bytes``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kvformer.config import ModelConfig
from kvformer.errors import ContextOverflowError
from kvformer.formats.native import load_native
from kvformer.model.transformer import Transformer
from kvformer.train.config import TrainConfig
from kvformer.train.data import eval_starts, open_data, windows_to_batch
from kvformer.train.loop import train
from kvformer.train.metrics import read_metrics

GROUPS = ("norms", "positions", "attention")
IMG_PREFIX = "exp_"


@dataclass
class Settings:
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 30
    eval_every: int = 50
    eval_tokens: int = 16384  # during training (the curves)
    final_windows: int = 256  # windows of T and of 2T for the final numbers
    corpus_mb: float = 3.0
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 8
    d_ff: int = 384
    seed: int = 0
    bench_rounds: int = 3
    bench_steps: int = 3


def base_config(s: Settings) -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=s.d_model, n_layer=s.n_layer, n_head=s.n_head,
                       n_kv_head=s.n_head, d_ff=s.d_ff, max_seq_len=s.seq_len, norm="rmsnorm",
                       pos="rope", mlp="swiglu", name="experiment")


def variants(group: str, s: Settings) -> list[tuple[str, ModelConfig]]:
    """(label, config) of each model in a group; the base model (RMSNorm, RoPE, MHA) is in all
    three, so `all` trains it once."""
    base = base_config(s)
    if group == "norms":
        return [("LayerNorm", base.replace(norm="layernorm")),
                ("RMSNorm", base),
                ("BatchNorm", base.replace(norm="batchnorm"))]
    if group == "positions":
        return [("learned", base.replace(pos="learned")),
                ("sinusoidal", base.replace(pos="sinusoidal")),
                ("RoPE", base)]
    if group == "attention":
        gqa = max(2, s.n_head // 4)
        return [(f"MHA ({s.n_head} KV heads)", base),
                (f"GQA ({gqa} KV heads)", base.replace(n_kv_head=gqa)),
                ("MQA (1 KV head)", base.replace(n_kv_head=1))]
    raise ValueError(f"unknown experiment {group!r}; choose one of {', '.join(GROUPS)}, all")


def run_key(cfg: ModelConfig) -> str:
    return f"{cfg.norm}-{cfg.pos}-kv{cfg.n_kv_head}"


# ---------------------------------------------------------------------------------- corpus
def stdlib_corpus(max_mb: float = 3.0) -> list[Path]:
    """An evenly spaced subset of the standard library's .py files (tests, site-packages and
    files over 200 KB left out), in sorted order, about ``max_mb`` megabytes in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    files = sorted((p for p in root.rglob("*.py")
                    if not skip & set(p.relative_to(root).parts)
                    and p.stat().st_size <= 200_000),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(f"no .py files under {root}: the standard library's source "
                                "is not installed")
    total = sum(p.stat().st_size for p in files)
    ratio = min(1.0, max_mb * 1e6 / total)  # keep this share of the files, evenly spaced
    return [p for i, p in enumerate(files) if math.floor((i + 1) * ratio) > math.floor(i * ratio)]


# ---------------------------------------------------------------------------------- measuring
@torch.no_grad()
def position_losses(model, tokens: np.ndarray, length: int, n_windows: int) -> np.ndarray | None:
    """Per-window, per-position cross-entropy [windows, length] on evenly spaced windows of
    the validation tokens; None when the model cannot run that long (learned positions)."""
    starts = eval_starts(len(tokens), length, n_windows)
    model.eval()
    rows = []
    try:
        for i in range(0, len(starts), 16):
            x, y = windows_to_batch(tokens, starts[i:i + 16], length)
            logits = model(x).float()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 reduction="none")
            rows.append(ce.reshape(y.shape).numpy())
    except ContextOverflowError:
        return None
    return np.concatenate(rows)


def mean_and_se(per_window: np.ndarray) -> tuple[float, float]:
    means = per_window.mean(axis=1)
    return float(means.mean()), float(means.std(ddof=1) / math.sqrt(len(means)))


def throughput(configs: dict[str, ModelConfig], s: Settings, log) -> dict[str, float]:
    """Training tokens/s of each config: forward + backward + AdamW on one fixed batch, timed
    in interleaved rounds; the best round of each counts (least disturbed by other load)."""
    best = {k: float("inf") for k in configs}
    g = torch.Generator().manual_seed(s.seed)
    batch = torch.randint(0, 256, (s.batch_size, s.seq_len + 1), generator=g)
    x, y = batch[:, :-1], batch[:, 1:]
    models = {}
    for k, cfg in configs.items():
        torch.manual_seed(s.seed)
        m = Transformer(cfg).train()
        models[k] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4))
    for r in range(s.bench_rounds):
        for k, (m, opt) in models.items():
            for i in range(s.bench_steps + 1):
                t0 = time.perf_counter()
                logits = m(x)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i:  # the first step of each round warms caches up
                    best[k] = min(best[k], time.perf_counter() - t0)
        log(f"throughput round {r + 1}/{s.bench_rounds} done")
    return {k: s.batch_size * s.seq_len / t for k, t in best.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")


# ---------------------------------------------------------------------------------- running
def run_experiments(which: str = "all", out: str | os.PathLike = "docs", steps: int | None = None,
                    work: str | os.PathLike | None = None, corpus_mb: float | None = None,
                    seed: int = 0, verbose: bool = True, command: str | None = None,
                    threads: int | None = None, settings: Settings | None = None) -> dict:
    """Train every model the chosen comparison needs, measure, and write
    OUT/experiments.md and OUT/img/exp_*.png. Returns the results as a dict."""
    groups = list(GROUPS) if which == "all" else [which]
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"unknown experiment {g!r}; choose one of {', '.join(GROUPS)}, all")
    s = settings or Settings()
    if steps is not None:
        s.steps = steps
        s.warmup = min(s.warmup, max(1, steps // 10))
        s.eval_every = max(1, min(s.eval_every, steps // 2))
    if corpus_mb is not None:
        s.corpus_mb = corpus_mb
    s.seed = seed
    if threads:
        torch.set_num_threads(threads)

    def log(msg):
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    t_start, cpu_start = time.perf_counter(), time.process_time()
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="kvformer-exp-")) if own_work else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    try:
        files = stdlib_corpus(s.corpus_mb)
        corpus_bytes = sum(p.stat().st_size for p in files)
        stdlib_root = Path(sysconfig.get_paths()["stdlib"])
        plan: dict[str, ModelConfig] = {}
        labels: dict[str, list[tuple[str, str]]] = {}
        for g in groups:
            labels[g] = []
            for label, cfg in variants(g, s):
                plan.setdefault(run_key(cfg), cfg)
                labels[g].append((label, run_key(cfg)))
        # the base model once more with the next seed: how far apart two runs of the very
        # same model land, the yardstick for every gap on the page
        base_key = run_key(base_config(s))
        jobs = [(key, cfg, s.seed) for key, cfg in plan.items()]
        jobs.append((f"{base_key}-seed{s.seed + 1}", base_config(s), s.seed + 1))
        log(f"{len(jobs)} runs x {s.steps} steps on {len(files)} standard-library files "
            f"({corpus_bytes / 1e6:.2f} MB); runs in {work}")

        runs: dict[str, dict] = {}
        for i, (key, cfg, run_seed) in enumerate(jobs):
            log(f"[{i + 1}/{len(jobs)}] {key}: {cfg.num_params():,} parameters, seed {run_seed}")
            t0 = time.perf_counter()
            result = train(TrainConfig(
                config=cfg, data=[str(f) for f in files], out=str(work / key),
                steps=s.steps, seed=run_seed, batch_size=s.batch_size, seq_len=s.seq_len,
                lr=s.lr, warmup=s.warmup, eval_every=s.eval_every, eval_tokens=s.eval_tokens,
                save_every=0, keep=1, log_every=max(1, s.steps // 100), sample_tokens=0,
                data_dir=str(work / "data"), plot=False, verbose=False,
                progress=verbose and sys.stderr.isatty(), device="cpu"))
            train_s = time.perf_counter() - t0
            metrics = read_metrics(result.metrics)
            mcfg, state, _ = load_native(result.model_dir)
            model = Transformer.from_state_dict(mcfg, state)
            val = open_data(work / "data").val
            at_t = position_losses(model, val, s.seq_len, s.final_windows)
            at_2t = position_losses(model, val, 2 * s.seq_len, s.final_windows)
            loss_t, se_t = mean_and_se(at_t)
            train_losses = [m["loss"] for m in metrics if m["type"] == "train"]
            tail = train_losses[-max(1, len(train_losses) // 10):]
            run = {
                "config": cfg.to_dict(), "params": cfg.num_params(),
                "val_loss": loss_t, "val_se": se_t, "seed": run_seed,
                "window_losses": at_t.mean(axis=1).tolist(),
                "train_loss_end": float(np.mean(tail)),
                "kv_cache_bytes": cfg.kv_cache_bytes(s.seq_len),
                "kv_bytes_per_token": cfg.kv_cache_bytes(1),
                "train_seconds": train_s,
                "curve": [(m["step"], m["val_loss"]) for m in metrics if m["type"] == "eval"],
                "train_curve": [(m["step"], m["loss"]) for m in metrics if m["type"] == "train"],
                "train_tokens_per_s": statistics.median(
                    [m["tokens_per_s"] for m in metrics
                     if m["type"] == "train" and m.get("tokens_per_s")] or [0.0]),
                "per_position_t": at_t.mean(axis=0).tolist(),
            }
            if at_2t is not None:
                run["val_loss_2t"], run["val_se_2t"] = mean_and_se(at_2t)
                run["val_loss_2t_tail"] = float(at_2t[:, s.seq_len:].mean())
                run["per_position_2t"] = at_2t.mean(axis=0).tolist()
            runs[key] = run
            log(f"    val loss {loss_t:.4f} ± {se_t:.4f}, at 2T "
                f"{run.get('val_loss_2t', float('nan')):.4f}, {train_s:.0f} s")

        log("timing training throughput")
        tps = throughput(plan, s, log)
        for key, v in tps.items():
            runs[key]["tokens_per_s"] = v
        repeat = runs.pop(jobs[-1][0])
        base_run = runs[base_key]
        seed_gap = abs(repeat["val_loss"] - base_run["val_loss"])
        wall = time.perf_counter() - t_start
        results = {
            "groups": {g: labels[g] for g in groups}, "runs": runs, "settings": asdict(s),
            "machine": machine(), "wall_seconds": wall,
            "cpu_seconds": time.process_time() - cpu_start,
            "command": ((f"nice -n {_niceness()} " if _niceness() > 0 else "")
                        + (command or _command(which, out, steps, corpus_mb, seed, threads))),
            "threads": torch.get_num_threads(),
            "corpus": {"files": len(files), "bytes": corpus_bytes, "root": str(stdlib_root),
                       "first": files[0].relative_to(stdlib_root).as_posix(),
                       "last": files[-1].relative_to(stdlib_root).as_posix(),
                       "train_tokens": int(open_data(work / "data").meta["train_tokens"]),
                       "val_tokens": int(open_data(work / "data").meta["val_tokens"])},
            "load": _load_average(), "cores": os.cpu_count(),
            "seed_repeat": {"seed": repeat["seed"], "val_loss": repeat["val_loss"],
                            "base_val_loss": base_run["val_loss"], "gap": seed_gap,
                            "curve": repeat["curve"]},
        }
        if not own_work:
            (work / "results.json").write_text(json.dumps(results, indent=1))
        write_report(results, out)
        log(f"wrote {out / 'experiments.md'} and {len(groups)} plots in {wall / 60:.1f} min")
        return results
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def write_report(results: dict, out: str | os.PathLike) -> Path:
    """OUT/experiments.md and OUT/img/exp_<group>.png from a results dict (the one
    run_experiments returns and, with --work, saves as WORK/results.json)."""
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    for g in results["groups"]:
        _plot_group(g, results, out / "img" / f"{IMG_PREFIX}{g}.png")
    path = out / "experiments.md"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_markdown(results))
    os.replace(tmp, path)
    return path


def _niceness() -> int:
    try:
        return os.nice(0)
    except OSError:
        return 0


def _command(which, out, steps, corpus_mb, seed, threads) -> str:
    parts = ["kvformer", "experiment", which, "--out", str(out)]
    if steps is not None:
        parts += ["--steps", str(steps)]
    if corpus_mb is not None:
        parts += ["--corpus-mb", str(corpus_mb)]
    if seed:
        parts += ["--seed", str(seed)]
    if threads:
        parts += ["--threads", str(threads)]
    return " ".join(parts)


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------- plots
def _plot_group(group: str, results: dict, png: Path) -> None:
    runs, entries = results["runs"], results["groups"][group]
    s = results["settings"]
    ncols = 3 if group == "attention" else 2
    fig = Figure(figsize=(5.2 * ncols, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    ax = axes[0]
    for (label, key), color in zip(entries, colors):
        steps, losses = zip(*runs[key]["curve"])
        ax.plot(steps, losses, "o-", ms=3, color=color, label=label)
        tsteps, tl = zip(*runs[key]["train_curve"])
        ax.plot(tsteps, _smooth(tl), color=color, alpha=0.35, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title("validation (dots) and smoothed training loss")
    vals = [v for _, k in entries for st, v in runs[k]["curve"] if st >= s["steps"] // 4]
    if vals:
        ax.set_ylim(min(vals) - 0.1, max(vals) + 0.3)
    ax.grid(alpha=0.3)
    ax.legend()
    if group == "attention":
        names = [label.split(" ")[0] for label, _ in entries]
        kv = [runs[k]["kv_cache_bytes"] / 1024 for _, k in entries]
        bars = axes[1].bar(names, kv, color=colors[:len(entries)])
        axes[1].bar_label(bars, fmt="%.0f KiB")
        axes[1].set_title(f"KV cache, {s['seq_len']} tokens, fp32")
        axes[1].set_ylabel("KiB per sequence")
        tps = [runs[k]["tokens_per_s"] for _, k in entries]
        bars = axes[2].bar(names, tps, color=colors[:len(entries)])
        axes[2].bar_label(bars, fmt="%.0f")
        axes[2].set_title("training throughput (best round)")
        axes[2].set_ylabel("tokens / s")
    else:
        ax = axes[1]
        t = s["seq_len"]
        for (label, key), color in zip(entries, colors):
            run = runs[key]
            curve = run.get("per_position_2t") if group == "positions" else run["per_position_t"]
            if curve is None:
                curve = run["per_position_t"]
                label = f"{label} (no positions past {t})"
            ax.plot(np.arange(len(curve)), _smooth(curve, 8), color=color, label=label)
        lows = [min(ln.get_ydata()) for ln in ax.get_lines()]
        highs = [float(np.percentile(ln.get_ydata(), 90)) for ln in ax.get_lines()]
        ax.set_ylim(min(lows) - 0.1, max(highs) + 0.3)
        if group == "positions":
            ax.axvline(t, color="gray", ls="--", lw=1)
            ax.text(t, 0.03, " trained length", va="bottom", fontsize=8,
                    transform=ax.get_xaxis_transform())
            ax.set_title(f"loss by position, windows of {2 * t} (2x training length)")
        else:
            ax.set_title("validation loss by position in the window")
        ax.set_xlabel("position")
        ax.set_ylabel("loss (nats / byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, png)


def _smooth(values, width: int | None = None) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    width = width or max(1, len(v) // 20)
    if width <= 1 or len(v) < width:
        return v
    kernel = np.ones(width) / width
    head = np.array([v[:i + 1].mean() for i in range(width - 1)])
    return np.concatenate([head, np.convolve(v, kernel, mode="valid")])


# ---------------------------------------------------------------------------------- report
def _kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB"


def render_markdown(r: dict) -> str:
    s, runs, rep = r["settings"], r["runs"], r["seed_repeat"]
    t = s["seq_len"]
    c = r["corpus"]
    tokens = s["steps"] * s["batch_size"] * s["seq_len"]
    base = runs.get(run_key(base_config(Settings(**s))))
    lines = [
        "# Experiments: norms, positions, attention",
        "",
        "Generated by `kvformer experiment` (kvformer/train/experiments.py): every number, table "
        "and plot below comes from one run of the command shown; rerun it to reproduce them.",
        "",
        "## Setup",
        "",
        f"- **Command:** `{r['command']}`",
        f"- **Machine:** {r['machine']}; {r['threads']} torch thread(s).",
        f"- **Wall time:** {r['wall_seconds'] / 60:.1f} minutes for everything on this page; "
        f"the process used {r['cpu_seconds'] / 60:.1f} CPU-minutes"
        + (f" (load average over the last 1 / 5 / 15 minutes at the end: "
           f"{' / '.join(str(x) for x in r['load'])} on {r.get('cores', os.cpu_count())} "
           "cores, this run included)" if r.get("load") else "") + ".",
        f"- **Corpus:** {c['files']} `.py` files of the Python standard library "
        f"({c['bytes'] / 1e6:.2f} MB, every k-th file in sorted order from `{c['first']}` to "
        f"`{c['last']}`, tests and files over 200 KB left out), read as bytes (vocabulary 256). "
        f"{c['train_tokens']:,} bytes for training, {c['val_tokens']:,} held out (the last "
        "5% of each tenth of the stream). The file list depends on the Python version.",
        f"- **Models:** d_model {s['d_model']}, {s['n_layer']} layers, {s['n_head']} query heads "
        f"(head_dim {s['d_model'] // s['n_head']}), SwiGLU d_ff {s['d_ff']}, context {t}; "
        "the base model is RMSNorm + RoPE + multi-head attention and each comparison changes "
        "one thing.",
        f"- **Budget, identical for every model:** {s['steps']} AdamW steps of {s['batch_size']} "
        f"x {t} bytes ({tokens:,} training tokens, under one epoch), peak lr {s['lr']}, "
        f"{s['warmup']} warmup steps then cosine to lr/10, weight decay 0.1, clip 1.0, seed "
        f"{s['seed']}: the same initial randomness and the same batches in the same order.",
        f"- **Validation loss** is nats per byte on {s['final_windows']} evenly spaced held-out "
        "windows, in eval mode; ± is the standard error over windows (evaluation noise; gaps "
        "between models are judged on the paired difference over the same windows).",
        "- **Throughput** is training tokens/s (forward + backward + AdamW, one batch), every "
        f"model timed in turn for {s['bench_rounds']} rounds, best round kept.",
        f"- **Seed check:** the base model trained again with seed {rep['seed']} reaches "
        f"{rep['val_loss']:.4f} against {rep['base_val_loss']:.4f} with seed {s['seed']}"
        f" (a gap of {rep['gap']:.4f}): gaps between models no larger than about "
        "twice that are not evidence of anything.",
        "",
    ]
    others = (r["load"][1] - r["threads"]) if r.get("load") else 0.0
    if others > 0.5:
        nice = " under `nice`" if r["command"].startswith("nice") else ""
        lines += [
            f"> **Note.** This run shared the CPU{nice} with other busy processes: over its "
            f"last minutes the load average was {r['load'][1]}, about {others:.1f} more than "
            f"its own {r['threads']} thread(s). Wall time and tokens/s are therefore worse "
            "than on an idle machine, and tokens/s is noisier (the best of several "
            "interleaved rounds is kept to limit that). With one thread, the CPU time above "
            "is a fair estimate of the wall time on an idle machine. The losses do not depend "
            "on speed: they are exactly what an idle machine gives.",
            "",
        ]

    def table(group: str, extra_cols: list[tuple[str, callable]]) -> list[str]:
        head = ["model", "params", f"val loss @ {t}", *[h for h, _ in extra_cols],
                "train loss (last 10%)", "tokens/s"]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, key in r["groups"][group]:
            run = runs[key]
            cells = [label, f"{run['params']:,}", f"{run['val_loss']:.4f} ± {run['val_se']:.4f}",
                     *[f(run) for _, f in extra_cols], f"{run['train_loss_end']:.4f}",
                     f"{run['tokens_per_s']:,.0f}"]
            rows.append("| " + " | ".join(cells) + " |")
        return rows

    groups = r["groups"]
    if "norms" in groups:
        lines += ["## Normalisation: LayerNorm vs RMSNorm vs BatchNorm", ""]
        lines += table("norms", [])
        lines += ["", f"![norms](img/{IMG_PREFIX}norms.png)", ""]
        lines += _reading_norms(r)
    if "positions" in groups:
        lines += ["## Positions: learned vs sinusoidal vs RoPE, and at 2x the training length",
                  ""]

        def at2(run):
            if "val_loss_2t" not in run:
                return f"n/a: no learned vector past position {t - 1}"
            return f"{run['val_loss_2t']:.4f} ± {run['val_se_2t']:.4f}"

        def tail(run):
            return f"{run['val_loss_2t_tail']:.4f}" if "val_loss_2t_tail" in run else "n/a"

        lines += table("positions", [(f"val loss @ {2 * t}", at2),
                                     (f"positions {t}..{2 * t - 1} only", tail)])
        lines += ["", f"![positions](img/{IMG_PREFIX}positions.png)", ""]
        lines += _reading_positions(r)
    if "attention" in groups:
        lines += ["## Attention: MHA vs GQA vs MQA", ""]
        lines += table("attention", [
            ("KV heads", lambda run: str(run["config"]["n_kv_head"])),
            (f"KV cache @ {t} tokens (fp32)", lambda run: _kib(run["kv_cache_bytes"])),
            ("KV bytes / token", lambda run: f"{run['kv_bytes_per_token']:,}")])
        lines += ["", f"![attention](img/{IMG_PREFIX}attention.png)", ""]
        lines += _reading_attention(r)
    if base is not None:
        lines += ["## Caveats", "",
                  f"- One seed per model (plus one repeat of the base model), {s['steps']} steps, "
                  f"models of about {base['params'] / 1e6:.1f}M parameters: a longer run or "
                  "larger models can change the ranking of close results.",
                  "- Throughput on a CPU measures these small models, where embedding, "
                  "normalisation and optimizer overheads weigh more than in large ones.",
                  ""]
    return "\n".join(lines)


def _ranked(r: dict, group: str) -> list[tuple[str, dict]]:
    return sorted(((label, r["runs"][key]) for label, key in r["groups"][group]),
                  key=lambda x: x[1]["val_loss"])


def paired_se(a: dict, b: dict) -> float:
    """Standard error of the loss difference of two models on the same windows."""
    d = np.asarray(b["window_losses"]) - np.asarray(a["window_losses"])
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("inf")


def verdict(r: dict, better: dict, worse: dict) -> str:
    """How much a gap in validation loss can be trusted, in words."""
    gap = worse["val_loss"] - better["val_loss"]
    seed = r["seed_repeat"]["gap"]
    if gap <= 3 * paired_se(better, worse):
        return "within evaluation noise"
    if gap <= max(2 * seed, 0.01):
        return (f"not conclusive: two seeds of the same model landed {seed:.3f} apart")
    return "larger than the evaluation noise and than the gap between two seeds"


def _list_gaps(r: dict, ranked: list[tuple[str, dict]]) -> str:
    best_label, best = ranked[0]
    return ", ".join(f"{label} {run['val_loss']:.3f} ({run['val_loss'] - best['val_loss']:+.3f}, "
                     f"{verdict(r, best, run)})" for label, run in ranked[1:])


def _reading_norms(r: dict) -> list[str]:
    ranked = _ranked(r, "norms")
    best, b = ranked[0]
    out = [f"**Reading.** {best} ends lowest ({b['val_loss']:.3f}); then {_list_gaps(r, ranked)}."]
    runs = dict(ranked)
    bn = runs.get("BatchNorm")
    others = [run for label, run in ranked if label != "BatchNorm"]
    if bn is not None and others:
        gap_bn = bn["val_loss"] - bn["train_loss_end"]
        gap_other = statistics.mean(o["val_loss"] - o["train_loss_end"] for o in others)
        out.append(
            "BatchNorm normalises each feature with the mean and variance of the whole batch "
            "(every sequence, every position) while training, so a token's activations depend "
            "on other sequences and on tokens after it; at inference it has to switch to running "
            "averages, since one token at a time through a KV cache has no batch to average "
            "over. LayerNorm and RMSNorm use only the token's own features and behave the same "
            "in training and inference.")
        if gap_bn - gap_other > 0.05:
            out.append(
                f"That switch shows here: BatchNorm's validation loss sits {gap_bn:+.3f} from its "
                f"final training loss, against {gap_other:+.3f} for the per-token norms.")
        else:
            out.append(
                f"That switch is not where it loses here: its validation loss is {gap_bn:+.3f} "
                f"from its final training loss, like the per-token norms' {gap_other:+.3f}, and "
                "it is behind from the first evaluation on (left plot): it learns more slowly. "
                "A plausible reason, not tested here, is that every activation is rescaled by "
                "statistics that change from batch to batch.")
        if "LayerNorm" in runs and "RMSNorm" in runs:
            ln, rms = runs["LayerNorm"], runs["RMSNorm"]
            diff = (rms["tokens_per_s"] - ln["tokens_per_s"]) / ln["tokens_per_s"]
            out.append(
                f"RMSNorm skips the mean (and, here, LayerNorm has no bias either); its training "
                f"throughput is {rms['tokens_per_s']:,.0f} tokens/s against LayerNorm's "
                f"{ln['tokens_per_s']:,.0f} ({diff:+.0%}"
                + ("; the norms are a small share of the compute)." if abs(diff) < 0.1 else
                   "; norms are a small share of the compute, so much of a gap this size is "
                   "the shared machine's noise)."))
    return [" ".join(out), ""]


def _rise_position(run: dict, t: int, margin: float = 0.3) -> int | None:
    """First position past t where the smoothed per-position loss exceeds the loss at t by
    ``margin``, or None."""
    curve = _smooth(run["per_position_2t"], 8)
    for p in range(t, len(curve)):
        if curve[p] > run["val_loss"] + margin:
            return p
    return None


def _reading_positions(r: dict) -> list[str]:
    t = r["settings"]["seq_len"]
    d = r["settings"]["d_model"]
    runs = dict((label, r["runs"][key]) for label, key in r["groups"]["positions"])
    ranked = _ranked(r, "positions")
    best, b = ranked[0]
    parts = [f"**Reading.** At the training length {t}, {best} is lowest ({b['val_loss']:.3f}); "
             f"then {_list_gaps(r, ranked)}."]
    if "RoPE" in runs and "learned" in runs:
        parts.append("RoPE gives attention the distance between two tokens for free; learned "
                     f"positions have to learn {t} vectors from {r['settings']['steps']} steps.")
    if "sinusoidal" in runs:
        pe, tok = math.sqrt(d / 2), 0.02 * math.sqrt(d)
        parts.append(
            f"Sinusoidal positions are added at full amplitude (a vector of norm "
            f"sqrt(d_model/2) = {pe:.1f}) to token embeddings initialised with std 0.02 (norm "
            f"about {tok:.2f}), so at the start the position outweighs the token about "
            f"{pe / tok:.0f} to 1 (the original Transformer scaled its embeddings by "
            "sqrt(d_model) instead); learned vectors start at the token's scale. That is a "
            "likely part of the sinusoidal gap at this short budget, not measured separately.")
    for label, run in runs.items():
        if "val_loss_2t" not in run:
            continue
        delta = run["val_loss_2t_tail"] - run["val_loss"]
        how = ("holds up" if delta <= 0.05 else "degrades" if delta <= 0.3 else "breaks down")
        text = (f"Past the trained length {label} {how}: {run['val_loss_2t_tail']:.3f} on "
                f"positions {t}..{2 * t - 1}, never seen in training, against "
                f"{run['val_loss']:.3f} at length {t} ({delta:+.3f}).")
        rise = _rise_position(run, t)
        if label == "RoPE" and rise is not None and rise > t + 8:
            text += (f" Per position (right plot) it stays near its trained level up to about "
                     f"position {rise} ({rise / t:.1f}x the training length) and then rises: "
                     "it was trained on distances up to "
                     f"{t - 1} only, and longer ones rotate query and key by angles it never saw.")
        elif label == "RoPE":
            text += (f" It was trained on distances up to {t - 1} only, and longer ones rotate "
                     "query and key by angles it never saw.")
        elif label == "sinusoidal":
            text += (f" The vectors for positions {t} and later exist, but the model never "
                     "learned to read them.")
        parts.append(text)
    if "learned" in runs and "val_loss_2t" not in runs["learned"]:
        parts.append(f"Learned positions cannot be evaluated at {2 * t} at all: the table has "
                     f"{t} rows and there is no vector for position {t} or later, so the entry "
                     "is not applicable rather than a number.")
    parts.append("The wiggles along the position axis are shared by all models: they come from "
                 "the text that happens to sit at those offsets in the validation windows.")
    return [" ".join(parts), ""]


def _matmul_weights(cfg: dict) -> int:
    """Weights a token is multiplied by (all but the embedding lookup and learned positions)."""
    c = ModelConfig.from_dict(cfg)
    n = c.num_params() - (0 if c.tie_embeddings else c.vocab_size * c.d_model)
    return n - (c.max_seq_len * c.d_model if c.pos == "learned" else 0)


def _reading_attention(r: dict) -> list[str]:
    entries = [(label.split(" ")[0], r["runs"][key]) for label, key in r["groups"]["attention"]]
    _, mha = entries[0]
    parts = [f"**Reading.** MHA: validation loss {mha['val_loss']:.3f}, "
             f"{mha['kv_bytes_per_token']:,} KV-cache bytes per token."]
    for label, run in entries[1:]:
        pair = (mha, run) if run["val_loss"] >= mha["val_loss"] else (run, mha)
        parts.append(
            f"{label}: {run['val_loss']:.3f} ({run['val_loss'] - mha['val_loss']:+.3f}, "
            f"{verdict(r, *pair)}) with a KV cache "
            f"{mha['kv_cache_bytes'] / run['kv_cache_bytes']:.0f}x smaller.")
    parts.append("The cache shrinks exactly in proportion to the number of KV heads; fewer K/V "
                 "projection weights come with it, which is also part of any loss difference "
                 "at an equal budget.")
    w0 = _matmul_weights(mha["config"])
    fewer = [1 - _matmul_weights(run["config"]) / w0 for _, run in entries[1:]]
    gain = [run["tokens_per_s"] / mha["tokens_per_s"] - 1 for _, run in entries[1:]]
    names = [label for label, _ in entries[1:]]
    parts.append(
        "Training throughput: " + ", ".join(f"{label} {run['tokens_per_s']:,.0f}"
                                            for label, run in entries) + " tokens/s. "
        + " and ".join(f"{n} multiplies each token by {f:.0%} fewer weights"
                       for n, f in zip(names, fewer))
        + " (the attention scores cost the same: the query heads are unchanged), and "
        + " and ".join(f"{n} is {g:+.0%}" for n, g in zip(names, gain))
        + " faster, so in training GQA and MQA are only slightly cheaper. What they really "
        "save is the cache, which exists only while generating: its size bounds batch size "
        "and context length, and reading it dominates the time per generated token.")
    return [" ".join(parts), ""]
