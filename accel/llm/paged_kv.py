"""Paged KV cache, the allocator (after vLLM's PagedAttention, Kwon et al., SOSP 2023): keys and
values live in fixed-size blocks of one preallocated pool, and each sequence holds a block table
(the ids of its blocks, in order), so memory is taken a block at a time as a sequence grows and
sequences can share blocks.

    pool = BlockPool(num_blocks=512, block_size=16, num_layers=30, num_kv_heads=3, head_dim=64)
    kv = KVCacheManager(pool)
    cached = kv.allocate("a", prompt_ids)      # prompt tokens whose K/V is already in the pool
    slots = kv.slot_mapping("a", cached)       # where the model writes the rest: [n] flat slots
    slots = kv.append_slots("a", [next_id])    # decode growth
    kv.fork("a", "b"); kv.free("a")            # parallel sampling; freeing keeps full blocks cached

Sharing:
- prefix caching: a full block's hash chains its parent's hash with its token ids, so equal
  hashes mean equal whole prefixes; a freed full block stays findable by its hash until the pool
  hands it out again, and a later prompt with that prefix reuses it;
- forks share all blocks, and a sequence about to write into a block it shares gets its own copy
  first (copy-on-write). Blocks are append-only, so only a partial last block is ever copied.

Free blocks are kept least recently freed first, and a new block is taken from the front, so a
cached block survives as long as possible. Nothing is partial: a request the pool cannot serve
raises ``PoolExhausted`` with every structure as it was.

Contract with the model: K/V for the slots handed out are written before the next ``allocate``,
since a block is findable by its hash from the moment its tokens are known.
"""
from __future__ import annotations

import collections
import hashlib
import math
import struct
from typing import Dict, Hashable, List, Optional, Sequence, Union

import torch

from ..patches.settings import check_int, is_int

__all__ = ["PoolExhausted", "BlockPool", "KVCacheManager", "hash_block_tokens", "paged_attention_reference"]

TokenIds = Union[Sequence[int], torch.Tensor]


class PoolExhausted(RuntimeError):
    """The pool has fewer free blocks than a request needs now (it would fit once others are
    freed). ``needed`` and ``free`` give the counts; nothing was allocated."""

    def __init__(self, needed: int, free: int, total: int) -> None:
        super().__init__(f"BlockPool: {needed} blocks needed, {free} free of {total}; "
                         "free or preempt a sequence first")
        self.needed, self.free, self.total = needed, free, total


def hash_block_tokens(parent_hash: Optional[bytes], token_ids: Sequence[int]) -> bytes:
    """A full block's hash: SHA-256 of its parent block's hash (None for the first block) and its
    token ids. A cryptographic hash, because two prefixes with equal hashes share K/V silently."""
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


class BlockPool:
    """``num_blocks`` KV blocks of ``block_size`` tokens, preallocated for a model's shape:
    ``key_cache``/``value_cache``: ``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]``.

    Each block has a reference count and, once full and registered (``seal``), a hash under which
    it can be found again. Blocks with no reference wait in the free list, least recently freed
    first; taking a block evicts its hash, so cached blocks are reused until memory is needed."""

    def __init__(self, num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> None:
        self.num_blocks = check_int("BlockPool", "num_blocks", num_blocks, 1)
        self.block_size = check_int("BlockPool", "block_size", block_size, 1)
        shape = [check_int("BlockPool", name, value, 1) for name, value in
                 (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim))]
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"BlockPool: dtype must be a floating-point torch.dtype; got {dtype!r}")
        shape = (shape[0], self.num_blocks, self.block_size, shape[1], shape[2])
        self.key_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.value_cache = torch.zeros(shape, dtype=dtype, device=device)
        self._refs = [0] * self.num_blocks
        self._hash: List[Optional[bytes]] = [None] * self.num_blocks
        self._free: "collections.OrderedDict[int, None]" = collections.OrderedDict.fromkeys(range(self.num_blocks))
        self._cached: Dict[bytes, int] = {}

    # -- accounting -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks no sequence holds (cached or not): what can be handed out now."""
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of K and V one block holds over all layers."""
        per_tensor = self.key_cache[:, 0].numel() * self.key_cache.element_size()
        return 2 * per_tensor

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.bytes_per_block

    @property
    def cached_blocks(self) -> int:
        """Blocks findable by hash, held or free."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]

    def free_block_ids(self) -> List[int]:
        """The free list in eviction order (the next block handed out first)."""
        return list(self._free)

    def cached_block(self, block_hash: bytes) -> Optional[int]:
        """The block registered under ``block_hash``, or None."""
        return self._cached.get(block_hash)

    # -- taking and returning blocks ---------------------------------------------------------------
    def take(self, count: int) -> List[int]:
        """``count`` blocks from the front of the free list, each with one reference; their hashes
        are evicted. ``PoolExhausted`` (and nothing taken) if fewer are free."""
        if count > len(self._free):
            raise PoolExhausted(count, len(self._free), self.num_blocks)
        taken = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            old = self._hash[block]
            if old is not None:
                del self._cached[old]
                self._hash[block] = None
            self._refs[block] = 1
            taken.append(block)
        return taken

    def touch(self, block_ids: Sequence[int]) -> None:
        """One more reference to each block; a free one (a cached block being reused) leaves the
        free list."""
        for block in block_ids:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """One reference fewer to each block, in the order given; a block left with none goes to
        the back of the free list, keeping its hash until it is taken again."""
        for block in block_ids:
            if self._refs[block] <= 0:
                raise ValueError(f"BlockPool: block {block} is not held; cannot release it")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    def seal(self, block_id: int, block_hash: bytes) -> None:
        """Register a full block under its hash. If an equal block is already registered, that one
        stays the cached copy and this block stays unregistered (it is freed uncached)."""
        if block_hash not in self._cached:
            self._cached[block_hash] = block_id
            self._hash[block_id] = block_hash

    def copy_block(self, src: int, dst: int) -> None:
        """Block ``dst``'s K/V in every layer become block ``src``'s (copy-on-write)."""
        self.key_cache[:, dst] = self.key_cache[:, src]
        self.value_cache[:, dst] = self.value_cache[:, src]

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store one layer's ``key``/``value`` ``[n, num_kv_heads, head_dim]`` at flat ``slots``
        ``[n]`` (``block_id * block_size + offset``, as ``KVCacheManager`` hands them out)."""
        flat = (-1,) + tuple(self.key_cache.shape[3:])
        self.key_cache[layer].view(flat)[slots] = key
        self.value_cache[layer].view(flat)[slots] = value


class _Sequence:
    """A sequence's block table, the tokens it holds, and the hashes of its full blocks."""

    __slots__ = ("blocks", "tokens", "hashes")

    def __init__(self, blocks: List[int], tokens: List[int], hashes: List[bytes]) -> None:
        self.blocks, self.tokens, self.hashes = blocks, tokens, hashes


class KVCacheManager:
    """Block tables of sequences over one ``BlockPool``: allocation with prefix reuse, growth,
    forks with copy-on-write, freeing, and the slots and tables the attention reads.

    ``prefix_queries``/``prefix_hits`` count full prompt blocks looked up and found in the cache
    (the last prompt token is always computed, so a block-aligned prompt looks up one block less)."""

    def __init__(self, pool: BlockPool) -> None:
        if not isinstance(pool, BlockPool):
            raise TypeError(f"KVCacheManager: pool must be a BlockPool; got {type(pool).__name__}")
        self.pool = pool
        self._seqs: Dict[Hashable, _Sequence] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- queries -----------------------------------------------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def block_ids(self, seq_id: Hashable) -> List[int]:
        return list(self._get(seq_id).blocks)

    def num_tokens(self, seq_id: Hashable) -> int:
        return len(self._get(seq_id).tokens)

    @property
    def tokens_held(self) -> int:
        """Tokens over all sequences, a shared token counted once per sequence holding it."""
        return sum(len(seq.tokens) for seq in self._seqs.values())

    def memory_stats(self) -> Dict[str, Union[int, float]]:
        """KV memory in use against the tokens it serves, and the prefix cache's hit rate."""
        pool = self.pool
        return {"used_blocks": pool.used_blocks, "free_blocks": pool.num_free, "cached_blocks": pool.cached_blocks,
                "used_bytes": pool.used_bytes, "total_bytes": pool.num_blocks * pool.bytes_per_block,
                "tokens_held": self.tokens_held, "prefix_queries": self.prefix_queries,
                "prefix_hits": self.prefix_hits,
                "prefix_hit_rate": self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0}

    # -- allocation --------------------------------------------------------------------------------
    def can_allocate(self, token_ids: TokenIds) -> bool:
        """Whether ``allocate`` of this prompt would succeed now (prefix hits counted). A prompt
        larger than the whole pool raises ``ValueError``, as it can never be admitted."""
        tokens = self._tokens(token_ids, "token_ids", empty=False)
        _, _, needed = self._plan(tokens)
        return needed <= self.pool.num_free

    def cached_prefix_length(self, token_ids: TokenIds) -> int:
        """How many leading tokens of a prompt ``allocate`` would find cached now (whole blocks,
        never the last token), changing nothing and counting no query. A scheduler admitting a long
        prompt a chunk at a time allocates ``token_ids[:cached + chunk]``, so that no block is
        registered before its K/V is computed, and grows it with ``append_slots``."""
        tokens = self._tokens(token_ids, "token_ids", empty=False)
        return len(self._plan(tokens)[1]) * self.pool.block_size

    def allocate(self, seq_id: Hashable, token_ids: TokenIds) -> int:
        """Blocks for a new sequence's prompt, reusing cached blocks of its longest cached prefix.
        Returns how many leading tokens already have K/V in the pool; the model computes the rest
        and writes them at ``slot_mapping(seq_id, returned)``."""
        if seq_id in self._seqs:
            raise ValueError(f"KVCacheManager: seq_id {seq_id!r} is already allocated; free it or use another id")
        tokens = self._tokens(token_ids, "token_ids", empty=False)
        hashes, hits, needed = self._plan(tokens)
        if needed > self.pool.num_free:
            raise PoolExhausted(needed, self.pool.num_free, self.pool.num_blocks)
        # Reuse first, so that taking new blocks cannot evict a block about to be reused.
        self.pool.touch(hits)
        blocks = hits + self.pool.take(self._blocks_for(len(tokens)) - len(hits))
        for i in range(len(hits), len(hashes)):
            self.pool.seal(blocks[i], hashes[i])
        self._seqs[seq_id] = _Sequence(blocks, tokens, hashes)
        self.prefix_queries += (len(tokens) - 1) // self.pool.block_size
        self.prefix_hits += len(hits)
        return len(hits) * self.pool.block_size

    def can_append(self, seq_id: Hashable, num_new_tokens: int) -> bool:
        """Whether ``append_slots`` of that many tokens would succeed now."""
        seq = self._get(seq_id)
        check_int("KVCacheManager", "num_new_tokens", num_new_tokens, 0)
        return self._append_need(seq, num_new_tokens) <= self.pool.num_free

    def append_slots(self, seq_id: Hashable, new_token_ids: TokenIds) -> torch.Tensor:
        """Grow a sequence by ``new_token_ids`` (a decode step, or several tokens at once) and
        return their flat slots ``[n]``. A shared partial last block is copied before it is written
        (copy-on-write); blocks that become full are sealed, findable by their hash."""
        seq = self._get(seq_id)
        new = self._tokens(new_token_ids, "new_token_ids", empty=True)
        needed = self._append_need(seq, len(new))
        if needed > self.pool.num_free:
            raise PoolExhausted(needed, self.pool.num_free, self.pool.num_blocks)
        start, size = len(seq.tokens), self.pool.block_size
        if self._must_copy(seq, len(new)):
            fresh = self.pool.take(1)[0]
            self.pool.copy_block(seq.blocks[-1], fresh)
            self.pool.release([seq.blocks[-1]])
            seq.blocks[-1] = fresh
        seq.blocks += self.pool.take(self._blocks_for(start + len(new)) - len(seq.blocks))
        seq.tokens += new
        for i in range(len(seq.hashes), len(seq.tokens) // size):
            seq.hashes.append(hash_block_tokens(seq.hashes[-1] if i else None, seq.tokens[i * size:(i + 1) * size]))
            self.pool.seal(seq.blocks[i], seq.hashes[i])
        return self.slot_mapping(seq_id, start)

    def fork(self, parent_seq_id: Hashable, child_seq_id: Hashable) -> None:
        """A child sharing all of the parent's blocks (parallel sampling, beam search); either
        copies a shared partial block when it first writes to it."""
        parent = self._get(parent_seq_id, "parent_seq_id")
        if child_seq_id in self._seqs:
            raise ValueError(f"KVCacheManager: child_seq_id {child_seq_id!r} is already allocated")
        self.pool.touch(parent.blocks)
        self._seqs[child_seq_id] = _Sequence(list(parent.blocks), list(parent.tokens), list(parent.hashes))

    def free(self, seq_id: Hashable) -> None:
        """Drop a sequence. Its blocks are released last block first, so that when cached blocks
        are evicted a prefix's tail goes before its head (which more prompts can share)."""
        seq = self._get(seq_id)
        self.pool.release(seq.blocks[::-1])
        del self._seqs[seq_id]

    # -- what attention reads ----------------------------------------------------------------------
    def slot_mapping(self, seq_id: Hashable, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
        """Flat slots ``[end - start]`` (``block_id * block_size + offset``) of the sequence's
        positions ``start..end-1``, on the pool's device."""
        seq = self._get(seq_id)
        end = len(seq.tokens) if end is None else end
        if not (is_int(start) and is_int(end) and 0 <= start <= end <= len(seq.tokens)):
            raise ValueError(f"KVCacheManager: need 0 <= start <= end <= {len(seq.tokens)} (the tokens held); "
                             f"got start={start!r}, end={end!r}")
        size = self.pool.block_size
        return torch.tensor([seq.blocks[p // size] * size + p % size for p in range(start, end)],
                            dtype=torch.long, device=self.pool.key_cache.device)

    def block_tables(self, seq_ids: Sequence[Hashable], pad: int = 0) -> torch.Tensor:
        """The sequences' block tables ``[B, max_blocks]`` (long, on the pool's device), rows
        padded with ``pad`` past their own blocks; pair with ``seq_lens``."""
        tables = [self._get(seq_id).blocks for seq_id in seq_ids]
        width = max((len(t) for t in tables), default=0)
        return torch.tensor([t + [pad] * (width - len(t)) for t in tables], dtype=torch.long,
                            device=self.pool.key_cache.device).reshape(len(tables), width)

    def seq_lens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """Tokens each sequence holds ``[B]`` (long, on the pool's device)."""
        return torch.tensor([len(self._get(s).tokens) for s in seq_ids], dtype=torch.long,
                            device=self.pool.key_cache.device)

    # -- internals ---------------------------------------------------------------------------------
    def _get(self, seq_id: Hashable, name: str = "seq_id") -> _Sequence:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise ValueError(f"KVCacheManager: {name} {seq_id!r} is not allocated")
        return seq

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.pool.block_size)

    def _fits_pool(self, num_tokens: int, name: str) -> None:
        blocks = self._blocks_for(num_tokens)
        if blocks > self.pool.num_blocks:
            raise ValueError(f"KVCacheManager: {name} needs {blocks} blocks of {self.pool.block_size} tokens "
                             f"({num_tokens} tokens); the whole pool has {self.pool.num_blocks}")

    def _plan(self, tokens: List[int]):
        """A prompt's full-block hashes, the cached blocks of its longest cached prefix, and the
        free blocks allocating it takes (new ones, and cached ones now in the free list)."""
        self._fits_pool(len(tokens), "token_ids")
        size, hashes = self.pool.block_size, []
        for i in range(len(tokens) // size):
            hashes.append(hash_block_tokens(hashes[-1] if i else None, tokens[i * size:(i + 1) * size]))
        hits: List[int] = []
        for block_hash in hashes[:(len(tokens) - 1) // size]:  # the last token is always computed
            block = self.pool.cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        reclaimed = sum(1 for block in hits if self.pool.ref_count(block) == 0)
        return hashes, hits, self._blocks_for(len(tokens)) - len(hits) + reclaimed

    def _must_copy(self, seq: _Sequence, num_new: int) -> bool:
        return (num_new > 0 and len(seq.tokens) % self.pool.block_size != 0
                and self.pool.ref_count(seq.blocks[-1]) > 1)

    def _append_need(self, seq: _Sequence, num_new: int) -> int:
        self._fits_pool(len(seq.tokens) + num_new, "the sequence after appending")
        return self._blocks_for(len(seq.tokens) + num_new) - len(seq.blocks) + self._must_copy(seq, num_new)

    @staticmethod
    def _tokens(token_ids: TokenIds, name: str, empty: bool) -> List[int]:
        if isinstance(token_ids, torch.Tensor):
            if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.is_complex():
                raise TypeError(f"KVCacheManager: {name} must be a 1-D integer tensor or a list of ints; "
                                f"got a {token_ids.dim()}-D {token_ids.dtype} tensor")
            token_ids = token_ids.tolist()
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
            raise TypeError(f"KVCacheManager: {name} must be a list of ints or a 1-D tensor; "
                            f"got {type(token_ids).__name__}")
        bad = next((t for t in token_ids if not (is_int(t) and 0 <= t < 2 ** 63)), None)
        if bad is not None:
            raise ValueError(f"KVCacheManager: {name} must hold token ids (ints >= 0); got {bad!r}")
        if not token_ids and not empty:
            raise ValueError(f"KVCacheManager: {name} must hold at least one token")
        return [int(t) for t in token_ids]


def paged_attention_reference(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              scale: Optional[float] = None) -> torch.Tensor:
    """Decode attention over a paged cache, in plain torch (the reference a kernel is tested
    against). ``query``: ``[B, H, 1, D]``; ``key_cache``/``value_cache``: one layer of the pool,
    ``[num_blocks, block_size, H_kv, D]``; ``block_tables``: ``[B, max_blocks]``; ``seq_lens``:
    ``[B]``, each >= 1. ``H`` a multiple of ``H_kv`` (grouped-query attention: query head ``h``
    reads KV head ``h // (H / H_kv)``). Returns ``[B, H, 1, D]``, computed in float32 at least."""
    name = "paged_attention_reference"
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"{name}: query must be [B, H, 1, D]; got {list(query.shape)}")
    batch, heads, _, dim = query.shape
    if key_cache.dim() != 4 or key_cache.shape[3] != dim or value_cache.shape != key_cache.shape:
        raise ValueError(f"{name}: key_cache and value_cache must both be [num_blocks, block_size, H_kv, {dim}]; "
                         f"got {list(key_cache.shape)} and {list(value_cache.shape)}")
    num_blocks, block_size, kv_heads, _ = key_cache.shape
    if heads % kv_heads:
        raise ValueError(f"{name}: query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"{name}: block_tables must be [{batch}, max_blocks] and seq_lens [{batch}]; "
                         f"got {list(block_tables.shape)} and {list(seq_lens.shape)}")
    capacity = block_tables.shape[1] * block_size
    if bool((seq_lens < 1).any()) or bool((seq_lens > capacity).any()):
        raise ValueError(f"{name}: seq_lens must lie in 1..{capacity} (the tokens a table's blocks hold); "
                         f"got {seq_lens.tolist()}")
    compute = torch.promote_types(query.dtype, torch.float32)
    positions = torch.arange(int(seq_lens.max()), device=query.device)
    valid = positions[None, :] < seq_lens[:, None]                                  # [B, L]
    blocks = block_tables.long().gather(1, (positions // block_size).expand(batch, -1))
    slots = torch.where(valid, blocks * block_size + positions % block_size, 0)     # padding reads slot 0
    keys = key_cache.reshape(num_blocks * block_size, kv_heads, dim)[slots]         # [B, L, H_kv, D]
    values = value_cache.reshape(num_blocks * block_size, kv_heads, dim)[slots]
    keys = keys.to(compute).permute(0, 2, 1, 3).repeat_interleave(heads // kv_heads, dim=1)    # [B, H, L, D]
    values = values.to(compute).permute(0, 2, 1, 3).repeat_interleave(heads // kv_heads, dim=1)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    scores = (query.to(compute) @ keys.transpose(-1, -2)) * scale                   # [B, H, 1, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return (scores.softmax(dim=-1) @ values).to(query.dtype)
