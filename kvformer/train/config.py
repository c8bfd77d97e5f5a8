"""What a training run is asked for and what it gives back: ``TrainConfig`` (the CLI flags map
one to one), ``TrainResult``, and the model config and tokenizer that ``--config`` and
``--tokenizer`` name."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvformer.config import ModelConfig
from kvformer.errors import KvformerError
from kvformer.formats.load import resolve
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer, Tokenizer


@dataclass
class TrainConfig:
    """Everything that defines a training run (the CLI flags map one to one)."""
    data: list[str] = field(default_factory=list)  # text files, directories, glob patterns
    out: str = "runs/train"
    config: Any = "tiny"  # preset name, path to a config JSON, ModelConfig or dict
    steps: int = 300
    resume: bool = False
    seed: int = 1337
    batch_size: int = 16  # windows per micro-batch, over all processes together
    seq_len: int | None = None  # None: min(128, the model's max_seq_len)
    lr: float | None = None  # None: 1e-3 from scratch, 5e-5 when fine-tuning (--init)
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup: int | None = None  # None: 10% of the steps, at most 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_every: int = 100  # 0: evaluate only at the end
    eval_tokens: int = 16384
    save_every: int = 250  # 0: checkpoint only at the end (and on Ctrl-C)
    log_every: int = 10
    keep: int = 2  # checkpoints kept on disk (the newest ones)
    bf16: bool = False  # bfloat16 autocast (CPU or GPU); weights and optimizer stay fp32
    init: str | None = None  # fine-tune this model (anything kvformer.formats.load.load opens)
    tokenizer: str | None = None  # 'byte' or a model whose tokenizer to use; None: see below
    val_fraction: float = 0.05
    sample_tokens: int = 64  # length of the text sample generated at each evaluation
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    threads: int | None = None  # torch CPU threads per process; None: torch's default
    data_dir: str | None = None  # where token files go; default OUT/data
    progress: bool | None = None  # tqdm bar; None: only when stderr is a terminal
    verbose: bool = True
    plot: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(self.config, ModelConfig):
            d["config"] = self.config.to_dict()
        d["data"] = [str(p) for p in self.data]
        d["betas"] = list(self.betas)
        return d


@dataclass
class TrainResult:
    out: Path
    step: int
    steps: int
    interrupted: bool
    loss: float | None
    val_loss: float | None
    model_dir: Path | None  # OUT/model once the run has finished
    checkpoint: Path | None
    metrics: Path
    tokens_per_s: float | None = None


def resolve_model_config(spec) -> ModelConfig:
    """A preset name, a JSON file (a ModelConfig dict, a kvformer config.json, or
    {"preset": name, ...overrides}), a dict, or a ModelConfig."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, dict):
        return _config_from_dict(spec, "config")
    spec = str(spec)
    if spec in ModelConfig.presets():
        return ModelConfig.preset(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if not path.is_file():
        raise KvformerError(f"--config {spec}: neither a preset "
                            f"({', '.join(ModelConfig.presets())}) nor a config file")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KvformerError(f"{path}: not a readable JSON config ({exc})") from exc
    return _config_from_dict(data, str(path))


def _config_from_dict(data: dict, where: str) -> ModelConfig:
    try:
        if "model" in data and isinstance(data["model"], dict):  # a kvformer config.json
            data = data["model"]
        data = dict(data)
        preset = data.pop("preset", None)
        if preset is not None:
            return ModelConfig.preset(preset, **data)
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise KvformerError(f"{where}: invalid model config ({exc})") from exc


def load_tokenizer(spec: str | None):
    """'byte' (or None) -> ByteTokenizer; anything else names a model whose tokenizer to use."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    kind, path = resolve(spec)
    if kind == "gguf":
        return Tokenizer.from_gguf(path)
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path)
    raise KvformerError(f"--tokenizer {spec}: no tokenizer.json in {path}")
