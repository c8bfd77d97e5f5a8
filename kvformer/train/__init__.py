"""Training: from-scratch and fine-tuning runs, checkpoints, DDP, and the experiments.

    from kvformer.train import TrainConfig, train
    result = train(TrainConfig(config="tiny", data=["corpus.txt"], out="runs/tiny", steps=300))

The same run from the shell: ``kvformer train --config tiny --data corpus.txt --out runs/tiny
--steps 300`` (or ``python -m kvformer.train ...``, or under ``torchrun``). See docs/training.md.
"""

from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .data import BatchSampler, TokenData, open_data, prepare_data
from .loop import (
    TrainConfig,
    Trainer,
    TrainResult,
    load_tokenizer,
    lr_at,
    plot_metrics,
    read_metrics,
    resolve_model_config,
    train,
)

__all__ = [
    "BatchSampler", "TokenData", "TrainConfig", "TrainResult", "Trainer", "latest_checkpoint",
    "list_checkpoints", "load_checkpoint", "load_tokenizer", "lr_at", "open_data",
    "plot_metrics", "prepare_data", "read_metrics", "resolve_model_config", "save_checkpoint",
    "train",
]
