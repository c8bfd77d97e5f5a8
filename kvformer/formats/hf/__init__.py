"""Hugging Face checkpoint directories (config.json + safetensors) -> kvformer.

``config`` turns config.json into a ``ModelConfig``; ``tensors`` reads the safetensors
files into kvformer's tensor names (and ``load_hf_dir`` / ``model_from_hf_dir`` into a
state dict or a model).
"""
