"""`kvformer models`: the models kvformer can find, with what each one is.

The default model comes first, then every model in the model directories
(``loading.model_dirs()``: $KVFORMER_MODELS, or ~/.cache/kvformer/models). Each is described
from its header alone (GGUF metadata, config.json, the safetensors header): its size on
disk, architecture, attention kind and quantization. No weights are read, so listing a
directory of large models is quick. A file that cannot be read is listed with the reason
rather than ending the listing.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gguf import LlamaFileType
from safetensors import safe_open

from kvformer.config import ModelConfig
from kvformer.errors import KvformerError
from kvformer.fileio import human_bytes
from kvformer.formats.gguf.config import config_from_gguf
from kvformer.formats.gguf.reader import open_reader, read_metadata
from kvformer.formats.hf.config import config_from_hf
from kvformer.formats.load import default_model_path, named_models
from kvformer.formats.native import is_native_dir


@dataclass
class ModelInfo:
    name: str
    path: Path | None
    size: int | None = None
    architecture: str = "?"
    attention: str = "?"
    quantization: str = "?"
    problem: str | None = None  # why the model could not be described


def attention_label(cfg, long: bool = False) -> str:
    """MHA, GQA or MQA, with the group size (query heads per KV head) where heads share."""
    kind = cfg.attention_kind
    if long:
        if kind == "MHA":
            return f"MHA ({cfg.n_head} heads, each with its own K/V)"
        return (f"{kind} ({cfg.n_head} query heads share {cfg.n_kv_head} KV "
                f"head{'s' if cfg.n_kv_head > 1 else ''}, group size {cfg.group_size})")
    return kind if kind == "MHA" else f"{kind}, group {cfg.group_size}"


def display_name(path: str | os.PathLike) -> str:
    """A model's short name: its file name without .gguf, or its directory's name."""
    path = Path(path)
    return path.stem if path.suffix == ".gguf" else path.name


def list_models() -> list[ModelInfo]:
    infos = []
    try:
        infos.append(describe("default", default_model_path()))
    except KvformerError as exc:
        infos.append(ModelInfo("default", None, problem=str(exc)))
    infos += [describe(name, path) for name, path in named_models().items()]
    return infos


def describe(name: str, path: Path) -> ModelInfo:
    info = ModelInfo(name, path)
    try:
        if path.is_file():
            info.size = path.stat().st_size
            _describe_gguf(info, path)
        else:
            info.size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            _describe_dir(info, path)
    except (KvformerError, OSError, ValueError, KeyError, TypeError) as exc:
        info.problem = " ".join(str(exc).split())
    return info


def _describe_gguf(info: ModelInfo, path: Path) -> None:
    with open_reader(path) as reader:
        meta = read_metadata(reader)
        info.architecture = str(meta.get("general.architecture", "?"))
        # The matrices' type says how the model is quantized (norms stay F32 in every file).
        types = Counter(t.type_name for t in reader.tensors.values() if len(t.shape) >= 2)
        info.quantization = _gguf_file_type(meta.get("general.file_type")) or (
            types.most_common(1)[0][0] if types else "?")
        info.attention = attention_label(config_from_gguf(meta, reader))


def _gguf_file_type(value) -> str | None:
    """llama.cpp's name for a whole file's quantization (general.file_type), e.g. Q4_1."""
    if value is None:
        return None
    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return None


def _describe_dir(info: ModelInfo, path: Path) -> None:
    raw = json.loads((path / "config.json").read_text())
    if is_native_dir(path):
        info.architecture = "kvformer"
        cfg = ModelConfig.from_dict(raw["model"])
        saved = raw.get("quantization") or {}
        info.quantization = saved.get("mode") or _safetensors_dtype(path)
    else:
        info.architecture = (raw.get("architectures") or [raw.get("model_type", "?")])[0]
        cfg = config_from_hf(raw, path)
        quant = raw.get("quantization_config") or {}
        info.quantization = (quant.get("quant_method") or _safetensors_dtype(path))
    info.attention = attention_label(cfg)


_SAFETENSORS_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "I8": "int8"}


def _safetensors_dtype(path: Path) -> str:
    """The dtype of a directory's largest-count tensor type, read from the header only."""
    counts: Counter = Counter()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                counts[f.get_slice(key).get_dtype()] += 1
    if not counts:
        return "?"
    dtype = counts.most_common(1)[0][0]
    return _SAFETENSORS_NAMES.get(dtype, dtype.lower())


def format_table(infos: list[ModelInfo]) -> str:
    header = ("NAME", "SIZE", "ARCHITECTURE", "ATTENTION", "QUANTIZATION", "PATH")
    rows = [header]
    for i in infos:
        rows.append((i.name, human_bytes(i.size) if i.size is not None else "-",
                     i.architecture, i.attention, i.quantization,
                     str(i.path) if i.path else "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1]
             for r in rows]
    for i in infos:
        if i.problem:
            lines.append(f"{i.name}: cannot be read: {i.problem}")
    return "\n".join(lines)
