"""kvformer's own model directory: config.json + model.safetensors (+ tokenizer files).

Saving writes everything into a temporary sibling directory and renames it into place,
so a crash never leaves a half-written model where a good one was expected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvformer.config import ModelConfig
from kvformer.errors import CheckpointError
from kvformer.fileio import usual_mode
from kvformer.formats.build import saveable_state

FORMAT = "kvformer"
FORMAT_VERSION = 1


def is_native_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def save_native(path: str | os.PathLike, cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                tokenizer=None, extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(usual_mode(directory=True))  # mkdtemp's 0700 would keep other users out
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.to_dict(),
                **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_model(model, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` in kvformer's own format: config.json + model.safetensors (+ the
    tokenizer). A quantized model is saved in kvformer's int8/int4 layout, the same bytes on
    every CPU, and loads back as it was (``kvformer.load``). ``kvformer.save`` is this."""
    state, extra = saveable_state(model)
    return save_native(path, model.cfg, state, tokenizer, extra)


def load_native(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    path = Path(path)
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: cannot read kvformer config ({exc})") \
            from exc
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer kvformer (format version "
                              f"{meta['format_version']}); upgrade kvformer to read it")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: invalid model config ({exc})") from exc
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path}: model.safetensors is missing")
    try:
        state = load_file(weights)
    except Exception as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({exc}); the file may "
                              "be truncated or corrupt — save the model again") from exc
    return cfg, state, meta
