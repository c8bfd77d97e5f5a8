"""The KV cache: keys and values of every earlier token, so decode never recomputes them.

Layout, written down once: for every layer, K and V are preallocated as
``[batch, n_kv_head, max_len, head_dim]``. Only the KV heads are stored, so a
grouped-query model (n_kv_head < n_head) really does hold n_kv_head/n_head of the
multi-head cache, and a multi-query model 1/n_head.

Slots are filled left to right; ``length`` counts the filled slots (shared by the batch).
Attention talks to the cache through one call, ``update(layer, k, v, start)``; the model
asks it ``length``, ``check_room(n)``, ``key_mask(n)`` before a forward and calls
``advance(n)`` after. Another cache (the server's paged one) implements the same five.
"""

from __future__ import annotations

import torch

from .errors import ContextOverflowError


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size={batch_size} and max_len={max_len} must be >= 1")
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0

    @classmethod
    def from_tensors(cls, k: list[torch.Tensor], v: list[torch.Tensor],
                     length: int) -> KVCache:
        """A cache over existing per-layer ``[batch, n_kv_head, max_len, head_dim]``
        tensors (contiguous) whose first ``length`` slots are filled."""
        b, _, max_len, _ = k[0].shape
        if len(k) != len(v) or any(t.shape != k[0].shape for t in k + v):
            raise ValueError("k and v need one tensor of the same shape per layer")
        if not 0 <= length <= max_len:
            raise ValueError(f"length={length} is outside the {max_len} slots")
        cache = cls.__new__(cls)
        cache.k, cache.v = list(k), list(v)
        cache.batch_size, cache.max_len, cache.length = b, max_len, length
        return cache

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def free(self) -> int:
        return self.max_len - self.length

    def check_room(self, n_new: int, start: int | None = None) -> None:
        start = self.length if start is None else start
        if start + n_new > self.max_len:
            raise ContextOverflowError(
                f"KV cache overflow: {start} cached + {n_new} new tokens = {start + n_new} "
                f"> max_len={self.max_len}; allocate a larger cache (new_cache(max_len=...)) "
                "or shorten the input")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write k, v ``[B, n_kv_head, T, head_dim]`` at slots [start, start+T) and return
        views of every filled slot, ``[B, n_kv_head, start+T, head_dim]``."""
        end = start + k.shape[2]
        if end > self.max_len:
            self.check_room(k.shape[2], start)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def key_mask(self, n_new: int) -> torch.Tensor | None:
        """Which of the ``length + n_new`` slots attention may read, per row, or None for
        all of them. A contiguous cache has no holes; a paged cache that gathers rows of
        different lengths returns a left-padding mask here."""
        return None

    def advance(self, n_new: int) -> None:
        """Called by the model after every layer has written ``n_new`` slots."""
        self.length += n_new

    def reset(self) -> None:
        self.length = 0

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (the data stays; it will be overwritten)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length
