"""Training checkpoints that lose nothing and never replace a good one with a bad one.

A checkpoint is a directory ``DIR/checkpoints/step-00000123/``:

    model/               a kvformer model directory (config.json, model.safetensors, tokenizer),
                         so any checkpoint can be loaded, generated from or fine-tuned on its own
    trainer_state.pt     optimizer state, data position, RNG states, training config
                         (torch.save; read back with torch.load(weights_only=True))
    manifest.json        size and SHA-256 of every file above, written last

It is written under a hidden temporary name and renamed into place only once every file is on
disk, so a crash while saving leaves the previous checkpoint untouched. Older checkpoints are
deleted only after the new one is in place. Loading checks the manifest first, so truncation,
bit flips and half-copied directories are reported as a CheckpointError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kvformer.errors import CheckpointError
from kvformer.fileio import usual_mode
from kvformer.formats.native import load_native, save_native

PREFIX = "step-"
MANIFEST = "manifest.json"
STATE = "trainer_state.pt"
MODEL = "model"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint directories under root, oldest first. Temporary
    directories of interrupted saves (hidden names) are not listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
            found.append((int(p.name[len(PREFIX):]), p))
    return sorted(found)


def remove_stale_temporaries(root: str | os.PathLike) -> None:
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(f".{PREFIX}") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(root: str | os.PathLike, step: int, model_cfg, model_state: dict,
                    tokenizer, trainer_state: dict, keep: int = 2,
                    extra: dict | None = None) -> Path:
    """Write checkpoint ``step`` under root, then delete all but the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        tmp.chmod(usual_mode(directory=True))  # mkdtemp's 0700 would keep other users out
        save_native(tmp / MODEL, model_cfg, model_state, tokenizer, extra=extra)
        torch.save(trainer_state, tmp / STATE)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"step": step, "files": {
            str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for p in [*files, tmp / MANIFEST, tmp / MODEL, tmp]:
            _fsync(p)
        final = root / name
        old = None
        if final.exists():  # the same step saved again (e.g. after a resume): swap it out
            old = root / f".{name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for _, path in list_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file against the manifest; raise CheckpointError naming the bad file."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing; the checkpoint {path} was not completely "
                              "written")
    try:
        manifest = json.loads(mpath.read_text())
        entries = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{mpath}: unreadable checkpoint manifest ({exc})") from exc
    for rel, info in entries.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes where {info['bytes']} were written; the "
                                  "checkpoint file is truncated or corrupt")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: contents do not match the checksum written with it; "
                                  "the checkpoint file is corrupt")
    return manifest


def load_checkpoint(path: str | os.PathLike):
    """(model_cfg, model_state, trainer_state) of a verified checkpoint."""
    path = Path(path)
    verify_checkpoint(path)
    cfg, state, _ = load_native(path / MODEL)
    try:
        trainer_state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path / STATE}: unreadable trainer state ({exc})") from exc
    return cfg, state, trainer_state


def latest_checkpoint(root: str | os.PathLike):
    """The newest checkpoint, loaded: (path, model_cfg, model_state, trainer_state), or None
    when there is none. If the newest is damaged, the error names the bad file and the newest
    intact one, which is left where it is."""
    found = list_checkpoints(root)
    if not found:
        return None
    step, path = found[-1]
    try:
        return (path, *load_checkpoint(path))
    except CheckpointError as exc:
        good = None
        for prev_step, prev in reversed(found[:-1]):
            try:
                verify_checkpoint(prev)
                good = (prev_step, prev)
                break
            except CheckpointError:
                continue
        hint = (f"; the previous checkpoint {good[1]} (step {good[0]}) is intact: move {path} "
                f"away and run again with --resume to continue from step {good[0]}"
                if good else "; no earlier intact checkpoint exists: start again without "
                "--resume in a new --out directory")
        raise CheckpointError(f"{exc}{hint}") from exc
