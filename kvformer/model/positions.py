"""Positional encodings. Attention by itself is order-blind: it sees a set of tokens.

- sinusoidal: a fixed vector per position, added to the token embedding
  PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)).
- learned: a trained vector per position, added to the token embedding (cannot go past
  the positions it was trained for).
- rope: no vector is added; q and k are rotated by an angle proportional to the
  position, so the score q.k depends only on the distance between the two positions.

Rotary scaling stretches a model past the context it was trained for by changing the
frequencies (and, for YaRN and LongRoPE, scaling cos and sin by an attention factor). It
is data, ``ModelConfig.rope_scaling``: a dict whose "type" is one of ``config.ROPE_SCALINGS``
and whose other keys are that type's parameters (``ROPE_SCALING_KEYS``), the same
numbers Hugging Face's ``rope_parameters`` and a GGUF's ``rope.scaling.*`` hold:

- linear:   every frequency divided by ``factor``.
- dynamic:  NTK-aware: once a call reaches past ``original_max_position_embeddings``
            positions, the base grows with the call's length L:
            theta * (factor * L / original - (factor - 1)) ** (d / (d - 2)).
- llama3:   Llama 3.1's: long wavelengths divided by ``factor``, short ones kept, a
            smooth blend between (``low_freq_factor``, ``high_freq_factor``).
- yarn:     YaRN: interpolated and extrapolated frequencies blended by a linear ramp
            over the dimensions between ``beta_fast`` and ``beta_slow`` rotations, cos and
            sin scaled by ``attention_factor``.
- longrope: Phi-3's: each frequency divided by its own factor, ``short_factor`` while a
            call stays within ``original_max_position_embeddings``, ``long_factor`` past
            it; cos and sin scaled by ``attention_factor``.
- factors:  each frequency divided by its own factor (a GGUF's ``rope_freqs.weight``:
            llama.cpp's form of the llama3 scaling).

For dynamic and longrope the frequencies depend on the length of the call (as in
transformers): a key keeps the rotation it got when it was written to the cache.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvformer.errors import ContextOverflowError


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


def rope_switch_length(scaling: dict | None) -> int | None:
    """For scalings whose frequencies depend on the call (dynamic, longrope): the longest
    call (highest position + 1) that still uses the base frequencies. None for the rest."""
    if scaling is not None and scaling["type"] in ("dynamic", "longrope"):
        return int(scaling["original_max_position_embeddings"])
    return None


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                     seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2] fp32, attention factor) of rotary positions.

    Unscaled, frequency i is theta^(-2i/head_dim). ``seq_len`` is the length of the call
    (its highest position + 1); only dynamic and longrope scalings read it. The attention
    factor multiplies cos and sin (so q.k by its square); it is 1 except for yarn/longrope.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    kind = scaling["type"] if scaling is not None else None
    if kind == "dynamic":
        original, factor = scaling["original_max_position_embeddings"], scaling["factor"]
        if seq_len is not None and seq_len > original:  # in fp32, as transformers does
            grow = factor * torch.tensor(seq_len) / original - (factor - 1)
            theta = theta * grow ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / theta ** exponent
    if kind is None or kind == "dynamic":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "factors":
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32), 1.0
    if kind == "longrope":
        long = seq_len is not None and seq_len > scaling["original_max_position_embeddings"]
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"],
                           dtype=torch.float32)
        return 1.0 / (ext * theta ** exponent), float(scaling["attention_factor"])
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return _yarn(head_dim, theta, exponent, scaling), float(scaling["attention_factor"])


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Wavelengths longer than original/low_freq_factor are divided by factor, shorter than
    original/high_freq_factor kept, and those between blended linearly in 1/wavelength."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    between = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(between, blended, scaled)


def _yarn(head_dim: int, theta: float, exponent: torch.Tensor, s: dict) -> torch.Tensor:
    """Dimensions that turn fewer than beta_slow times over the original context are
    interpolated (divided by factor), more than beta_fast times kept, a ramp between."""
    factor, original = s["factor"], s["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times
        return (head_dim * math.log(original / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = dim_of(s["beta_fast"]), dim_of(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the frequency as it is), 0: interpolate
    freqs = theta ** exponent
    return (1.0 / (factor * freqs)) * (1 - keep) + (1.0 / freqs) * keep


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """Angle p * f_i for each position p and each of head_dim/2 frequencies f_i
    (unscaled: f_i = theta^(-2i/head_dim))."""
    if inv_freq is None:
        inv_freq = rope_frequencies(head_dim, theta)[0]
    return positions.float().unsqueeze(-1) * inv_freq.to(positions.device)


class Rotary(nn.Module):
    """Rotary position embedding in the "rotate half" layout: the head dimension is split
    in two halves (x1, x2) and each pair (x1[i], x2[i]) is rotated by angle p * f_i.

    cos/sin are tabulated for the positions in use, not the whole context: the table starts
    at ``INITIAL`` positions and doubles (up to max_seq_len) when a later position is asked
    for, so a long-context model does not hold megabytes of angles it may never use. Each
    row depends only on its position, so a grown table equals one built at full size.

    With a rotary scaling the frequencies (and the attention factor folded into cos and sin)
    are the scaled ones. For dynamic and longrope scalings the table serves calls that stay
    within the original context; a call reaching past it gets its own angles, computed
    from its length."""

    INITIAL = 512

    def __init__(self, head_dim: int, max_seq_len: int, theta: float,
                 scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.max_seq_len = head_dim, theta, max_seq_len
        self.scaling = scaling
        self.switch = rope_switch_length(scaling)
        self.limit = max_seq_len if self.switch is None else min(max_seq_len, self.switch)
        inv_freq, self.attention_factor = rope_frequencies(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        cos, sin = self._table(torch.arange(min(self.limit, self.INITIAL)))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, positions: torch.Tensor, inv_freq: torch.Tensor | None = None,
               attention_factor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.float() if inv_freq is None else inv_freq
        factor = self.attention_factor if attention_factor is None else attention_factor
        angles = rope_angles(positions, self.head_dim, self.theta, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [..., head_dim]
        cos, sin = angles.cos(), angles.sin()
        if factor != 1.0:  # YaRN / LongRoPE: q.k scaled by factor^2
            cos, sin = cos * factor, sin * factor
        return cos, sin

    def ensure(self, n: int) -> None:
        """Make the table cover positions 0..n-1 (at most max_seq_len of them, and for a
        dynamic or longrope scaling at most the original context)."""
        have = self.cos.shape[0]
        if n <= have or have >= self.limit:
            return
        size = min(self.limit, max(n, 2 * have))
        cos, sin = self._table(torch.arange(size, device=self.cos.device))
        self.cos = cos.to(self.cos.dtype)  # assigning a tensor to a buffer name re-registers it
        self.sin = sin.to(self.sin.dtype)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions of shape [T] or [B, T]; computed afresh past the table."""
        if positions.numel():
            top = int(positions.max())
            if self.switch is not None and top + 1 > self.switch:
                inv_freq, factor = rope_frequencies(self.head_dim, self.theta, self.scaling,
                                                    seq_len=top + 1)
                cos, sin = self._table(positions, inv_freq, factor)
                return cos.to(self.cos.dtype), sin.to(self.sin.dtype)
            if top >= self.cos.shape[0]:
                self.ensure(top + 1)
                if top >= self.cos.shape[0]:
                    cos, sin = self._table(positions)
                    return cos.to(self.cos.dtype), sin.to(self.sin.dtype)
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos/sin of shape [T, D] or [B, T, D]."""
    if cos.dim() == 3:  # per-row positions: [B, T, D] -> [B, 1, T, D]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
