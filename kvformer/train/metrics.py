"""A run's ``metrics.jsonl`` (one JSON object a line: ``train`` entries every ``log_every``
steps, ``eval`` entries at each evaluation) read back, and drawn as a loss plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash
    return out


def plot_metrics(metrics, png: str | os.PathLike, title: str = "training loss") -> Path:
    """Train and validation loss against step, as a PNG (no display needed)."""
    if not isinstance(metrics, list):
        metrics = read_metrics(metrics)
    train = [(m["step"], m["loss"]) for m in metrics if m.get("type") == "train"]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("type") == "eval"]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange", lw=1.5, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, png)
    return png
