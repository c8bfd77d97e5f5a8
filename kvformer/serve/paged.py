"""A paged KV cache: one pool of fixed-size blocks per layer, a block table per sequence.

The contiguous ``KVCache`` gives every sequence a slab of ``max_len`` slots up front. A
server does not know how long a request will run, so it hands out memory in blocks of
``block_size`` token slots instead: a sequence holds a list of block ids (its *block
table*); slot ``p`` of the sequence lives in block ``table[p // block_size]`` at offset
``p % block_size``. Blocks return to the free list the moment a request ends.

Layout, per layer, for K and for V::

    [n_kv_head, n_blocks, block_size, head_dim]

Heads first, so that gathering a batch's slots (one ``index_select`` over the flattened
``n_blocks * block_size`` axis) yields every ``(row, head)`` as a contiguous run of
``[slots, head_dim]``, which is what the attention matmul reads. Block 0 is never handed
out: it stays zero and is where padding slots read from.

``PagedBatch`` lets the unchanged model run a batch of sequences of different lengths
over the pool. It speaks the model's cache protocol (``length``, ``check_room``,
``key_mask``, ``update``, ``advance``) by presenting the rows *left-padded*: with row
``i`` holding ``L_i`` cached tokens and ``start = max(L_i)``, row ``i``'s slots appear in
columns ``start - L_i ..`` and the columns before them are padding, masked out by
``key_mask``. The caller gives each row's positions (``input_pos [B, T]`` = ``L_i ..``),
exactly as ``generate`` does for its left-padded batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..cache import KVCache
from ..errors import ContextOverflowError, KvformerError


class OutOfBlocksError(KvformerError):
    """The pool has fewer free blocks than asked for."""


class BlockPool:
    """The K/V storage of every layer and the allocator of its blocks."""

    def __init__(self, n_layer: int, n_blocks: int, block_size: int, n_kv_head: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"n_blocks={n_blocks} and block_size={block_size} must be >= 1")
        self.n_layer, self.n_blocks, self.block_size = n_layer, n_blocks, block_size
        self.n_kv_head, self.head_dim, self.dtype = n_kv_head, head_dim, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        shape = (n_kv_head, n_blocks + 1, block_size, head_dim)  # + the zero block 0
        # empty, not zeros: pages are only touched once used; every slot attention reads
        # is written first, except padding, which reads the zeroed block 0
        self.k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(n_layer)]
        self.v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(n_layer)]
        for t in self.k + self.v:
            t[:, 0].zero_()
        # a stack: the most recently freed block (warm in memory) is reused first
        self._free = list(range(n_blocks, 0, -1))

    @classmethod
    def for_model(cls, model, n_blocks: int, block_size: int = 16,
                  dtype: torch.dtype | None = None) -> BlockPool:
        cfg = model.cfg
        return cls(cfg.n_layer, n_blocks, block_size, cfg.n_kv_head, cfg.head_dim,
                   dtype=dtype or model.dtype, device=model.device)

    # ------------------------------------------------------------------ allocation
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.n_blocks - len(self._free)

    @property
    def capacity(self) -> int:
        """Token slots in the whole pool."""
        return self.n_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks needed to hold ``n_tokens`` slots."""
        return -(-n_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        """``n`` block ids, all or none (OutOfBlocksError)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} KV blocks, {len(self._free)} of "
                                   f"{self.n_blocks} are free")
        taken = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        return taken[::-1]

    def free(self, blocks: Sequence[int]) -> None:
        """Give blocks back. Freeing a block twice, or block 0, is a bug and raises."""
        free = set(self._free)
        for b in blocks:
            if not 1 <= b <= self.n_blocks or b in free:
                raise ValueError(f"block {b} is not an allocated block of this pool")
            free.add(b)
        self._free.extend(reversed(list(blocks)))

    def grow(self, table: list[int], n_tokens: int) -> None:
        """Extend a block table in place so it holds ``n_tokens`` slots (all or nothing)."""
        need = self.blocks_for(n_tokens) - len(table)
        if need > 0:
            table.extend(self.allocate(need))

    # ------------------------------------------------------------------ batches
    def batch(self, tables: Sequence[list[int]], lengths: Sequence[int]) -> PagedBatch:
        return PagedBatch(self, tables, lengths)

    def slot_index(self, table: Sequence[int], lo: int, hi: int) -> torch.Tensor:
        """Flat slot ids (into ``n_blocks+1 * block_size``) of sequence positions [lo, hi)."""
        pos = torch.arange(lo, hi)
        blocks = torch.as_tensor(list(table), dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size


class PagedBatch:
    """A batch of sequences in a ``BlockPool`` seen through the model's cache protocol.

    ``tables[i]`` is row i's block table (it must already hold room for the tokens about
    to be written: grow it with ``BlockPool.grow`` first) and ``lengths[i]`` the number of
    its tokens already cached. After the forward, ``lengths`` holds the new counts.
    """

    def __init__(self, pool: BlockPool, tables: Sequence[list[int]], lengths: Sequence[int]):
        if len(tables) != len(lengths) or not tables:
            raise ValueError("give one block table and one length per row, at least one row")
        self.pool = pool
        self.tables = [list(t) for t in tables]
        self.lengths = [int(n) for n in lengths]
        self.batch_size = len(self.tables)
        self.length = max(self.lengths)  # the padded width of what is cached
        self._n_new: int | None = None

    # the model asks these before the forward ------------------------------------------
    def check_room(self, n_new: int) -> None:
        bs = self.pool.block_size
        for i, (table, n) in enumerate(zip(self.tables, self.lengths)):
            if n + n_new > len(table) * bs:
                raise ContextOverflowError(
                    f"row {i}: {n} cached + {n_new} new tokens need "
                    f"{self.pool.blocks_for(n + n_new)} KV blocks, its table holds "
                    f"{len(table)}; grow the block table before the forward")
        self._prepare(n_new)

    def key_mask(self, n_new: int) -> torch.Tensor | None:
        """[B, length + n_new]: False on each row's left padding; None with no padding."""
        self._prepare(n_new)
        return self._mask

    def _prepare(self, n_new: int) -> None:
        """Index tensors for a forward of ``n_new`` tokens per row, built once."""
        if self._n_new == n_new:
            return
        width = self.length + n_new
        writes, reads = [], []
        pad_any = False
        for table, n in zip(self.tables, self.lengths):
            slots = self.pool.slot_index(table, 0, n + n_new)
            writes.append(slots[n:])
            pad = self.length - n
            if pad:
                pad_any = True
                slots = torch.cat([torch.zeros(pad, dtype=torch.long), slots])  # block 0
            reads.append(slots)
        self._write = torch.cat(writes).to(self.pool.device)
        self._read = torch.cat(reads).to(self.pool.device)
        self._mask = None
        if pad_any:
            cols = torch.arange(width).unsqueeze(0)
            pads = torch.tensor([self.length - n for n in self.lengths]).unsqueeze(1)
            self._mask = (cols >= pads).to(self.pool.device)
        self._n_new = n_new

    # each attention layer -------------------------------------------------------------
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write k, v ``[B, n_kv_head, T, head_dim]`` after each row's cached tokens and
        return every row's K/V left-padded to ``[B, n_kv_head, start + T, head_dim]``."""
        b, h, t, d = k.shape
        if start != self.length or b != self.batch_size:
            raise ValueError(f"paged batch of {self.batch_size} rows at {self.length} got "
                             f"{b} rows at {start}")
        self._prepare(t)
        width = start + t
        out = []
        for pool, new in ((self.pool.k[layer], k), (self.pool.v[layer], v)):
            flat = pool.view(h, -1, d)  # [H, (n_blocks+1) * block_size, D]
            flat.index_copy_(1, self._write, new.transpose(0, 1).reshape(h, b * t, d))
            gathered = flat.index_select(1, self._read)  # [H, B * width, D]
            out.append(gathered.view(h, b, width, d).transpose(0, 1))
        return out[0], out[1]

    def advance(self, n_new: int) -> None:
        self.lengths = [n + n_new for n in self.lengths]
        self.length += n_new
        self._n_new = None

    # one-token steps through the contiguous layout ---------------------------------------
    def step_cache_bytes(self, room: int = 0) -> int:
        """What ``step_cache(room)`` allocates: K and V of every layer."""
        return (2 * self.pool.n_layer * self.batch_size * self.pool.n_kv_head
                * (self.length + 1 + room) * self.pool.head_dim * self.pool.k[0].element_size())

    def step_cache(self, room: int = 0) -> KVCache:
        """For a one-token step: every row's cached K/V gathered, left-padded as ``update``
        presents them, into a contiguous ``KVCache`` of ``length + 1 + room`` slots (one
        copy per layer: a single ``index_select`` lands in ``[B, n_kv_head, slots,
        head_dim]`` order). The fast decode steps of ``kvformer.fast``/``kvformer.native``
        read only that layout. Run the step on it with ``key_mask(1)``, then
        ``write_back`` it. With ``room``, the same cache can serve the next steps of the
        same rows (each adding one token) without gathering again."""
        self._prepare(1)
        pool, b, width = self.pool, self.batch_size, self.length + 1
        h, d = pool.n_kv_head, pool.head_dim
        read = self._read.view(b, width)
        if room:  # spare columns read block 0 (zeros) until steps write them
            read = torch.cat([read, read.new_zeros(b, room)], dim=1)
        index = (read.unsqueeze(1) + self._head_offsets().view(1, h, 1)).reshape(-1)
        shape = (b, h, width + room, d)
        return KVCache.from_tensors(
            [t.view(-1, d).index_select(0, index).view(shape) for t in pool.k],
            [t.view(-1, d).index_select(0, index).view(shape) for t in pool.v],
            self.length)

    def _head_offsets(self) -> torch.Tensor:
        """Where each head's slots start in a flattened pool tensor."""
        per_head = self.pool.k[0].shape[1] * self.pool.block_size
        return torch.arange(self.pool.n_kv_head, device=self.pool.device) * per_head

    def write_back(self, cache: KVCache) -> None:
        """Copy the slot that a one-token step wrote into a step cache (this batch's, or
        the previous step's for the same rows) to each row's place in the pool, and
        advance, as ``update`` + ``advance`` would have."""
        if cache.length != self.length + 1 or cache.batch_size != self.batch_size:
            raise ValueError(f"the step cache holds {cache.batch_size} rows of "
                             f"{cache.length} slots, expected {self.batch_size} of "
                             f"{self.length + 1}: run exactly one token through it first")
        self._prepare(1)
        b, h, d = self.batch_size, self.pool.n_kv_head, self.pool.head_dim
        index = (self._write.view(b, 1) + self._head_offsets().view(1, h)).reshape(-1)
        col = self.length
        for pool, new in zip(self.pool.k + self.pool.v, cache.k + cache.v):
            pool.view(-1, d).index_copy_(0, index, new[:, :, col].reshape(b * h, d))
        self.advance(1)
