"""Training: from-scratch and fine-tuning runs, checkpoints, DDP, and the experiments.

    from kvformer.train import TrainConfig, train
    result = train(TrainConfig(config="tiny", data=["corpus.txt"], out="runs/tiny", steps=300))

The same run from the shell: ``kvformer train --config tiny --data corpus.txt --out runs/tiny
--steps 300`` (or ``python -m kvformer.train ...``, or under ``torchrun``). See docs/training.md.
"""

from importlib import import_module

__all__ = [
    "BatchSampler", "TokenData", "TrainConfig", "TrainResult", "Trainer", "latest_checkpoint",
    "list_checkpoints", "load_checkpoint", "load_tokenizer", "lr_at", "open_data",
    "plot_metrics", "prepare_data", "read_metrics", "resolve_model_config", "save_checkpoint",
    "train",
]

# imported on first use: `kvformer train --help` and the other verbs do not wait for torch
_LAZY = {name: module for module, names in {
    ".checkpoint": ("latest_checkpoint", "list_checkpoints", "load_checkpoint",
                    "save_checkpoint"),
    ".data": ("BatchSampler", "TokenData", "open_data", "prepare_data"),
    ".config": ("TrainConfig", "TrainResult", "load_tokenizer", "resolve_model_config"),
    ".loop": ("Trainer", "lr_at", "train"),
    ".metrics": ("plot_metrics", "read_metrics"),
}.items() for name in names}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvformer.train' has no attribute {name!r}")
