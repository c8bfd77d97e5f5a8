"""Normalisation layers, written out so the seed's contrast is visible in the code.

The seed: BatchNorm computes mean and std for each feature (column) across the batch;
LayerNorm computes them across the features of a single sample. RMSNorm is LayerNorm
without the mean: it only rescales by the root mean square.
"""

from __future__ import annotations

import torch
from torch import nn

from kvformer.config import ModelConfig


class LayerNorm(nn.Module):
    """Per sample, over features: each token is normalised by its own mean and variance
    (BatchNorm, by contrast, uses one mean and variance per feature across the batch)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean = xf.mean(dim=-1, keepdim=True)
        var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)  # biased, as in the definition
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        y = y.to(x.dtype) * self.weight
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.Module):
    """Per sample, over features, like LayerNorm, but only divides by the root mean square
    (no mean subtracted, no bias): cheaper, and what Llama-family models use."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # the mean of squares in low precision loses too much
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class BatchNorm(nn.Module):
    """Per feature, over batch x time: each feature is normalised by the mean and variance
    of that feature across every token in the batch (LayerNorm, by contrast, normalises
    each token across its own features). In eval mode it uses running statistics, so a
    token's output does not depend on the rest of the batch — needed for a KV cache."""

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.training:
            flat = xf.reshape(-1, xf.shape[-1])  # (batch * time, features)
            mean = flat.mean(dim=0)
            var = flat.var(dim=0, unbiased=False)
            with torch.no_grad():
                n = flat.shape[0]
                unbiased = var * n / max(n - 1, 1)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        y = ((xf - mean) * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight
        return y + self.bias if self.bias is not None else y


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return LayerNorm(cfg.d_model, cfg.norm_eps, bias=cfg.bias)
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return BatchNorm(cfg.d_model, cfg.norm_eps, bias=cfg.bias)
