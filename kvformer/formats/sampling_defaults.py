"""The sampling settings a model's own files recommend, for the interfaces a person talks to
(``kvformer chat``, the chat page): GGUF's ``general.sampling.*`` keys (llama.cpp's converter
writes them from the model's generation_config.json), or generation_config.json beside a
Hugging Face checkpoint. What the model does not set comes from ``FALLBACK``, the defaults of
llama.cpp and Ollama. The API keeps OpenAI's request defaults and does not use these."""

from __future__ import annotations

import json
import math
from pathlib import Path

FALLBACK = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
            "repeat_penalty": 1.1}
GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
             "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
             "general.sampling.penalty_repeat": "repeat_penalty"}
HF_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
           "min_p": "min_p", "repetition_penalty": "repeat_penalty"}


def _checked(raw: dict) -> dict:
    """Only values kvformer can use (a file with a strange one keeps the fallback there)."""
    out = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            continue
        if name == "top_k":
            out[name] = int(value)
        elif name in ("top_p", "min_p") and value > 1:
            continue
        elif name == "repeat_penalty" and value == 0:
            continue
        else:
            out[name] = float(value)
    return out


def from_gguf(meta: dict) -> dict:
    """The settings a GGUF file's metadata recommends (only those it has)."""
    return _checked({name: meta[key] for key, name in GGUF_KEYS.items() if key in meta})


def from_hf_dir(path: str | Path) -> dict:
    """The settings of generation_config.json in a model directory (only those it has); a
    file that says do_sample false asks for greedy decoding."""
    file = Path(path) / "generation_config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    if config.get("do_sample") is False:
        return {"temperature": 0.0}
    return _checked({name: config[key] for key, name in HF_KEYS.items() if key in config})


def resolve(model_settings: dict | None) -> dict:
    """FALLBACK with what the model sets in its place."""
    return {**FALLBACK, **(model_settings or {})}
