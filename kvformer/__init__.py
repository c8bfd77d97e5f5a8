"""kvformer: a decoder-only transformer engine you can read, run, serve and train."""

from .attention import attention_weights, scaled_dot_product_attention
from .cache import KVCache
from .config import ModelConfig
from .errors import (
    ChatTemplateError,
    CheckpointError,
    ContextOverflowError,
    KvformerError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from .generate import generate, generate_stream, perplexity
from .loading import load
from .model import Transformer
from .norms import BatchNorm, LayerNorm, RMSNorm
from .sampling import sample
from .tokenizer import ByteTokenizer, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "BatchNorm", "ByteTokenizer", "ChatTemplateError", "CheckpointError",
    "ContextOverflowError", "KVCache",
    "KvformerError", "LayerNorm", "ModelConfig", "ModelNotFoundError", "RMSNorm",
    "Tokenizer", "Transformer", "UnsupportedArchitectureError", "attention_weights",
    "generate", "generate_stream", "load", "perplexity", "sample",
    "scaled_dot_product_attention",
]
