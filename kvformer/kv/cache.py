"""The KV cache: keys and values of every earlier token, so decode never recomputes them.

Layout, written down once: for every layer, K and V are preallocated as
``[batch, n_kv_head, max_len, head_dim]``. Only the KV heads are stored, so a
grouped-query model (n_kv_head < n_head) really does hold n_kv_head/n_head of the
multi-head cache, and a multi-query model 1/n_head.

Slots are filled left to right; ``length`` counts the filled slots (shared by the batch).
Attention talks to the cache through one call, ``update(layer, k, v, start)``; the model
asks it ``length``, ``check_room(n)``, ``key_mask(n)`` before a forward and calls
``advance(n)`` after. Another cache (the server's paged one) implements the same five.

``QuantizedKVCache`` is the same cache with each (token, KV head) row stored as int8 or
int4 numbers and their scales (``kvformer.kv.formats``): 1.9x or 3.2x smaller at head_dim 64
than bf16. Attention reads it dequantized: ``update`` returns the filled slots as numbers,
and the native decode step dequantizes inside its attention kernel, row by row.
"""

from __future__ import annotations

import torch

from kvformer.errors import ContextOverflowError
from kvformer.kv.formats import KVFormat, kv_format


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size={batch_size} and max_len={max_len} must be >= 1")
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.k_scale: list[torch.Tensor] = []  # only a quantized cache has scales
        self.v_scale: list[torch.Tensor] = []
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
        cache.k_scale, cache.v_scale = [], []
        cache.batch_size, cache.max_len, cache.length = b, max_len, length
        return cache

    @property
    def format(self) -> KVFormat:
        """The form K and V are stored in (fp32, bf16, fp16; int8 or int4 when quantized)."""
        return kv_format(self.k[0].dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in self.k + self.v + self.k_scale + self.v_scale)

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


class QuantizedKVCache(KVCache):
    """A ``KVCache`` whose rows are int8 (one bf16 scale per token and head) or int4 (a
    bf16 (d, m) pair per 32 numbers): per layer, ``k``/``v`` hold the integers
    ``[batch, n_kv_head, max_len, head_dim]`` (int8) or ``[..., head_dim / 2]`` (uint8,
    two numbers a byte) and ``k_scale``/``v_scale`` the scales ``[batch, n_kv_head, max_len,
    1 or head_dim / 16]`` (layouts in ``kvformer.kv.formats``)."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int,
                 head_dim: int, kv_dtype: str | KVFormat = "int8",
                 device: torch.device | str | None = None):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size={batch_size} and max_len={max_len} must be >= 1")
        fmt = kv_format(kv_dtype)
        if not fmt.quantized:
            raise ValueError(f"QuantizedKVCache holds int8 or int4, not {fmt.name}: "
                             "use KVCache")
        fmt.check(head_dim)
        (n_q, q_dtype), (n_s, s_dtype) = fmt.parts(head_dim)
        lead = (batch_size, n_kv_head, max_len)

        def zeros(n, dtype):
            return [torch.zeros(*lead, n, dtype=dtype, device=device) for _ in range(n_layer)]

        self.k, self.v = zeros(n_q, q_dtype), zeros(n_q, q_dtype)
        self.k_scale, self.v_scale = zeros(n_s, s_dtype), zeros(n_s, s_dtype)
        self._format = fmt
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0

    @classmethod
    def from_parts(cls, kv_dtype: str | KVFormat, k: list[torch.Tensor],
                   v: list[torch.Tensor], k_scale: list[torch.Tensor],
                   v_scale: list[torch.Tensor], length: int) -> QuantizedKVCache:
        """A cache over existing per-layer integer and scale tensors (contiguous), whose
        first ``length`` slots are filled."""
        cache = cls.__new__(cls)
        cache.k, cache.v = list(k), list(v)
        cache.k_scale, cache.v_scale = list(k_scale), list(v_scale)
        cache._format = kv_format(kv_dtype)
        cache.batch_size, cache.max_len = k[0].shape[0], k[0].shape[2]
        if not 0 <= length <= cache.max_len:
            raise ValueError(f"length={length} is outside the {cache.max_len} slots")
        cache.length = length
        return cache

    @property
    def format(self) -> KVFormat:
        return self._format

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Quantize k, v ``[B, n_kv_head, T, head_dim]`` into slots [start, start+T) and
        return every filled slot dequantized, ``[B, n_kv_head, start+T, head_dim]`` in k's
        dtype (a copy: the stored rows are integers). The new tokens read back their own
        quantized K/V too, as every later token will."""
        end = start + k.shape[2]
        if end > self.max_len:
            self.check_room(k.shape[2], start)
        out = []
        for store, scales, new in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = self._format.encode(new)
            store[layer][:, :, start:end] = q
            scales[layer][:, :, start:end] = s
            out.append(self._format.decode((store[layer][:, :, :end],
                                            scales[layer][:, :, :end]), k.dtype))
        return out[0], out[1]
