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

A pool of ``int8`` or ``int4`` rows (``dtype='int8'``; ``kvformer.kv.formats`` has the
layouts) holds the integers in ``k``/``v`` (``[..., head_dim]`` int8 or ``[..., head_dim /
2]`` uint8) and their bf16 scales in ``k_scale``/``v_scale`` (``[..., 1]`` or ``[...,
head_dim / 16]``), with the same leading ``[n_kv_head, n_blocks, block_size]``: a slot
index finds a row's integers and its scales alike. The same bytes then hold 1.9x (int8) or
3.2x (int4) the tokens of bf16 at head_dim 64.

``PagedBatch`` lets the unchanged model run a batch of sequences of different lengths
over the pool. It speaks the model's cache protocol (``length``, ``check_room``,
``key_mask``, ``update``, ``advance``) by presenting the rows *left-padded*: with row
``i`` holding ``L_i`` cached tokens and ``start = max(L_i)``, row ``i``'s slots appear in
columns ``start - L_i ..`` and the columns before them are padding, masked out by
``key_mask``. The caller gives each row's positions (``input_pos [B, T]`` = ``L_i ..``),
exactly as ``generate`` does for its left-padded batches.

**Prefix caching.** A full block is known by a chained hash: of the model, of every token
before it (through the previous block's hash) and of its own tokens. Blocks have
reference counts, so sequences whose prompts start alike share the blocks of their common
prefix read-only (``match`` finds them, ``acquire`` takes them). A block whose count drops
to zero keeps its K/V and its hash in an LRU list, still reusable, until an allocation
needs its memory (blocks never cached are handed out first, then the least recently
freed). The last, partly filled block of a sequence is kept too when the sequence ends
(``remember_partial``), but is never shared: a sequence that continues from it gets a
copy (copy-on-write), as does one that would otherwise write into a shared full block
(every prompt recomputes at least its last token, for the logits).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvformer.errors import ContextOverflowError, KvformerError
from kvformer.kv.formats import KVFormat, kv_format


class OutOfBlocksError(KvformerError):
    """The pool has fewer free blocks than asked for."""


@dataclass
class PrefixMatch:
    """What ``BlockPool.match`` found for a sequence: whole blocks to share, and a block to
    copy the first ``partial_len`` slots of (or None)."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # the chain hash of each block
    partial: int | None = None
    partial_len: int = 0
    block_size: int = 1

    @property
    def num_tokens(self) -> int:
        """Tokens whose K/V the match provides."""
        return len(self.blocks) * self.block_size + self.partial_len


class BlockPool:
    """The K/V storage of every layer and the allocator of its blocks (with prefix caching
    unless ``prefix_caching=False``; ``model_key`` names the model in the block hashes)."""

    def __init__(self, n_layer: int, n_blocks: int, block_size: int, n_kv_head: int,
                 head_dim: int, dtype: torch.dtype | str | KVFormat = torch.float32,
                 device: torch.device | str | None = None, *, prefix_caching: bool = True,
                 model_key: bytes = b""):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"n_blocks={n_blocks} and block_size={block_size} must be >= 1")
        fmt = kv_format(dtype)
        fmt.check(head_dim)
        self.format, self.kv_dtype = fmt, fmt.name
        parts = fmt.parts(head_dim)
        self.n_layer, self.n_blocks, self.block_size = n_layer, n_blocks, block_size
        self.n_kv_head, self.head_dim, self.dtype = n_kv_head, head_dim, parts[0][1]
        self.device = torch.device(device) if device is not None else torch.device("cpu")

        def tensors(last: int, dt: torch.dtype) -> list[torch.Tensor]:
            shape = (n_kv_head, n_blocks + 1, block_size, last)  # + the zero block 0
            # empty, not zeros: pages are only touched once used; every slot attention reads
            # is written first, except padding, which reads the zeroed block 0
            out = [torch.empty(shape, dtype=dt, device=self.device) for _ in range(n_layer)]
            for t in out:
                t[:, 0].zero_()
            return out

        self.k, self.v = tensors(*parts[0]), tensors(*parts[0])
        self.k_scale, self.v_scale = ((tensors(*parts[1]), tensors(*parts[1]))
                                      if fmt.quantized else ([], []))
        # a stack of never-cached blocks: the most recently freed (warm) is reused first
        self._free = list(range(n_blocks, 0, -1))
        self._ref = [0] * (n_blocks + 1)
        self.prefix_caching = prefix_caching
        self.root = hashlib.blake2b(b"kvformer-kv\0" + model_key, digest_size=16).digest()
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds
        self._by_hash: dict[bytes, int] = {}  # full blocks
        self._children: dict[bytes, set[int]] = {}  # previous block's hash -> cached blocks
        self._parent: dict[int, bytes] = {}  # cached block -> previous block's hash
        self._hash: dict[int, bytes] = {}  # cached full block -> its hash
        self._tokens: dict[int, tuple[int, ...]] = {}  # cached block -> the tokens it holds

    @classmethod
    def for_model(cls, model, n_blocks: int, block_size: int = 16, dtype=None,
                  **kw) -> BlockPool:
        """A pool for ``model``'s K/V in the form ``dtype`` names (None: the model's own
        choice, ``model.kv_format()``)."""
        cfg = model.cfg
        return cls(cfg.n_layer, n_blocks, block_size, cfg.n_kv_head, cfg.head_dim,
                   dtype=model.kv_format(dtype), device=model.device, **kw)

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the pool: K and V of each layer, then their scales (if any)."""
        return self.k + self.v + self.k_scale + self.v_scale

    def layer_parts(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """K's and V's tensors of one layer: [numbers] or [integers, scales]."""
        if self.format.quantized:
            return ([self.k[layer], self.k_scale[layer]], [self.v[layer], self.v_scale[layer]])
        return [self.k[layer]], [self.v[layer]]

    @property
    def bytes_per_token(self) -> int:
        """K and V of every layer for one token, scales included."""
        return 2 * self.n_layer * self.n_kv_head * self.format.row_bytes(self.head_dim)

    # ------------------------------------------------------------------ allocation
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never cached, or cached and held by nobody."""
        return len(self._free) + len(self._lru)

    @property
    def num_used(self) -> int:
        return self.n_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return len(self._lru)

    @property
    def capacity(self) -> int:
        """Token slots in the whole pool."""
        return self.n_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks needed to hold ``n_tokens`` slots."""
        return -(-n_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        """``n`` block ids, all or none (OutOfBlocksError): never-cached blocks first, then
        the least recently freed cached ones (their cache entry is dropped)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise OutOfBlocksError(f"asked for {n} KV blocks, {self.num_free} of "
                                   f"{self.n_blocks} are free")
        take = min(n, len(self._free))
        taken = self._free[len(self._free) - take:][::-1]
        del self._free[len(self._free) - take:]
        while len(taken) < n:
            block, _ = self._lru.popitem(last=False)
            self._forget(block)
            taken.append(block)
        for b in taken:
            self._ref[b] = 1
        return taken

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; a block nobody holds becomes free (kept in the
        LRU while it holds a cached prefix). Freeing an unheld block, or block 0, raises."""
        for b in blocks:
            if not 1 <= b <= self.n_blocks or self._ref[b] < 1:
                raise ValueError(f"block {b} is not an allocated block of this pool")
        for b in reversed(list(blocks)):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._tokens:
                    self._lru[b] = None
                else:
                    self._free.append(b)

    def grow(self, table: list[int], n_tokens: int) -> None:
        """Extend a block table in place so it holds ``n_tokens`` slots (all or nothing)."""
        need = self.blocks_for(n_tokens) - len(table)
        if need > 0:
            table.extend(self.allocate(need))

    # ------------------------------------------------------------------ prefix caching
    def block_hash(self, previous: bytes, tokens: Sequence[int]) -> bytes:
        return hashlib.blake2b(previous + array("q", tokens).tobytes(), digest_size=16).digest()

    def match(self, tokens: Sequence[int], limit: int) -> PrefixMatch:
        """The cached K/V for the longest prefix of ``tokens``, at most ``limit`` tokens:
        whole cached blocks, then the best partial start of the next block. Changes
        nothing (``acquire`` takes what it found)."""
        bs = self.block_size
        found = PrefixMatch(block_size=bs)
        if not self.prefix_caching:
            return found
        previous = self.root
        while (len(found.blocks) + 1) * bs <= limit:
            lo = len(found.blocks) * bs
            chunk = tuple(tokens[lo:lo + bs])
            h = self.block_hash(previous, chunk)
            block = self._by_hash.get(h)
            if block is None or self._tokens[block] != chunk:
                break
            found.blocks.append(block)
            found.hashes.append(h)
            previous = h
        lo = len(found.blocks) * bs
        rest = tuple(tokens[lo:min(limit, lo + bs)])
        for block in self._children.get(previous, ()) if rest else ():
            held = self._tokens[block]
            n = 0
            while n < len(rest) and n < len(held) and held[n] == rest[n]:
                n += 1
            if n > found.partial_len:
                found.partial, found.partial_len = block, n
        return found

    def cost(self, match: PrefixMatch, n_tokens: int) -> int:
        """Free blocks that ``acquire(match, n_tokens)`` takes out of ``num_free``."""
        lru = sum(1 for b in match.blocks if self._ref[b] == 0)
        held = 1 if match.partial is not None and self._ref[match.partial] == 0 else 0
        return lru + held + self.blocks_for(n_tokens) - len(match.blocks)

    def acquire(self, match: PrefixMatch, n_tokens: int) -> list[int]:
        """A block table for ``n_tokens`` slots whose first ``match.num_tokens`` slots hold
        the matched K/V: the shared blocks, then a copy of the partial one, then fresh
        blocks (all or nothing: OutOfBlocksError)."""
        if self.cost(match, n_tokens) > self.num_free:
            raise OutOfBlocksError(f"asked for {self.cost(match, n_tokens)} KV blocks, "
                                   f"{self.num_free} of {self.n_blocks} are free")
        for b in match.blocks + ([match.partial] if match.partial is not None else []):
            self._hold(b)  # the partial one only until it is copied: nothing evicts it
        table = list(match.blocks) + self.allocate(self.blocks_for(n_tokens) - len(match.blocks))
        if match.partial is not None:
            self.copy_block(match.partial, table[len(match.blocks)], match.partial_len)
            self.free([match.partial])
        return table

    def _hold(self, block: int) -> None:
        if self._ref[block] == 0:
            del self._lru[block]
        self._ref[block] += 1

    def copy_block(self, src: int, dst: int, n_slots: int) -> None:
        """Copy the first ``n_slots`` slots of block ``src`` into ``dst`` (every layer)."""
        for t in self.tensors:
            t[:, dst, :n_slots] = t[:, src, :n_slots]

    def remember_full(self, table: Sequence[int], tokens: Sequence[int], n_cached: int,
                      hashes: list[bytes]) -> None:
        """Cache the blocks of ``table`` that ``n_cached`` tokens have filled since the last
        call; ``hashes`` is the sequence's list of its full blocks' chain hashes (extended
        here). A block whose hash is already cached elsewhere stays uncached."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        while (len(hashes) + 1) * bs <= n_cached:
            i = len(hashes)
            previous = hashes[-1] if hashes else self.root
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = self.block_hash(previous, chunk)
            hashes.append(h)
            block = table[i]
            if h not in self._by_hash and block not in self._tokens:
                self._by_hash[h] = block
                self._hash[block] = h
                self._remember(block, previous, chunk)

    def remember_partial(self, table: Sequence[int], tokens: Sequence[int], n_cached: int,
                         hashes: list[bytes]) -> None:
        """Cache the partly filled last block (call before freeing the table)."""
        bs = self.block_size
        i, n = divmod(n_cached, bs)
        if not self.prefix_caching or n == 0 or i >= len(table) or len(hashes) < i:
            return
        block = table[i]
        if block not in self._tokens and self._ref[block] == 1:
            self._remember(block, hashes[i - 1] if i else self.root,
                           tuple(tokens[i * bs:n_cached]))

    def _remember(self, block: int, previous: bytes, chunk: tuple[int, ...]) -> None:
        self._parent[block] = previous
        self._tokens[block] = chunk
        self._children.setdefault(previous, set()).add(block)

    def _forget(self, block: int) -> None:
        """Drop a block's cache entry (it is being reused)."""
        previous = self._parent.pop(block)
        del self._tokens[block]
        kids = self._children[previous]
        kids.discard(block)
        if not kids:
            del self._children[previous]
        h = self._hash.pop(block, None)
        if h is not None:
            del self._by_hash[h]

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
        fmt, out = self.pool.format, []
        for tensors, new in zip(self.pool.layer_parts(layer), (k, v)):
            gathered = []
            for pool, part in zip(tensors, fmt.encode(new)):  # numbers, or integers + scales
                n = pool.shape[-1]
                flat = pool.view(h, -1, n)  # [H, (n_blocks+1) * block_size, n]
                flat.index_copy_(1, self._write, part.transpose(0, 1).reshape(h, b * t, n))
                got = flat.index_select(1, self._read)  # [H, B * width, n]
                gathered.append(got.view(h, b, width, n).transpose(0, 1))
            out.append(fmt.decode(gathered, k.dtype))
        return out[0], out[1]

    def advance(self, n_new: int) -> None:
        self.lengths = [n + n_new for n in self.lengths]
        self.length += n_new
        self._n_new = None
