"""Positional encodings. Attention by itself is order-blind: it sees a set of tokens.

- sinusoidal: a fixed vector per position, added to the token embedding
  PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)).
- learned: a trained vector per position, added to the token embedding (cannot go past
  the positions it was trained for).
- rope: no vector is added; q and k are rotated by an angle proportional to the
  position, so the score q.k depends only on the distance between the two positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ContextOverflowError


def sinusoidal_table(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The closed form above, for any positions (so it extends past the training length)."""
    i = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = torch.exp(-math.log(base) * i / dim)
    angles = positions.float().unsqueeze(-1) * inv_freq  # [..., dim/2]
    table = torch.empty(*angles.shape[:-1], dim, device=positions.device)
    table[..., 0::2] = torch.sin(angles)
    table[..., 1::2] = torch.cos(angles)
    return table


class SinusoidalPositions(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return sinusoidal_table(positions, self.dim)


class LearnedPositions(nn.Module):
    def __init__(self, max_seq_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_seq_len, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        limit = self.weight.shape[0]
        if positions.numel() and int(positions.max()) >= limit:
            raise ContextOverflowError(
                f"position {int(positions.max())} is past the {limit} learned positions of "
                f"this model; keep prompt + new tokens within {limit}")
        return self.weight[positions]


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Angle p * theta^(-2i/head_dim) for each position p and each of head_dim/2 frequencies."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    return positions.float().unsqueeze(-1) * inv_freq


class Rotary(nn.Module):
    """Rotary position embedding in the "rotate half" layout: the head dimension is split
    in two halves (x1, x2) and each pair (x1[i], x2[i]) is rotated by angle p * f_i.

    cos/sin are tabulated for the positions in use, not the whole context: the table starts
    at ``INITIAL`` positions and doubles (up to max_seq_len) when a later position is asked
    for, so a long-context model does not hold megabytes of angles it may never use. Each
    row depends only on its position, so a grown table equals one built at full size."""

    INITIAL = 512

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.theta, self.max_seq_len = head_dim, theta, max_seq_len
        cos, sin = self._table(torch.arange(min(max_seq_len, self.INITIAL)))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = rope_angles(positions, self.head_dim, self.theta)
        angles = torch.cat([angles, angles], dim=-1)  # [..., head_dim]
        return angles.cos(), angles.sin()

    def ensure(self, n: int) -> None:
        """Make the table cover positions 0..n-1 (at most max_seq_len of them)."""
        have = self.cos.shape[0]
        if n <= have or have >= self.max_seq_len:
            return
        size = min(self.max_seq_len, max(n, 2 * have))
        cos, sin = self._table(torch.arange(size, device=self.cos.device))
        self.cos = cos.to(self.cos.dtype)  # assigning a tensor to a buffer name re-registers it
        self.sin = sin.to(self.sin.dtype)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions of shape [T] or [B, T]; computed afresh past max_seq_len."""
        if positions.numel():
            top = int(positions.max())
            if top >= self.cos.shape[0]:
                self.ensure(top + 1)
                if top >= self.cos.shape[0]:
                    return self._table(positions)
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos/sin of shape [T, D] or [B, T, D]."""
    if cos.dim() == 3:  # per-row positions: [B, T, D] -> [B, 1, T, D]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
