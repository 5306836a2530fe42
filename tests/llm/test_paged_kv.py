"""The paged KV cache's allocator: reference counts, the prefix hash chain, copy-on-write, LRU
eviction, all-or-nothing allocation, memory accounting, and the plain-torch paged attention read
against dense SDPA. Small pools with hand-worked block ids; seeded."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from accel.llm.paged_kv import (BlockPool, KVCacheManager, PoolExhausted, hash_block_tokens,
                                paged_attention_reference)

pytestmark = pytest.mark.usefixtures("one_thread")


def manager(num_blocks=8, block_size=4, layers=1, kv_heads=1, head_dim=2, dtype=torch.float32):
    return KVCacheManager(BlockPool(num_blocks, block_size, layers, kv_heads, head_dim, dtype=dtype))


def chain(tokens, block_size):
    """The full blocks' hashes of ``tokens``, chained by hand."""
    hashes = []
    for i in range(len(tokens) // block_size):
        hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens[i * block_size:(i + 1) * block_size]))
    return hashes


def snapshot(kv):
    """Everything an allocation may change: free list (in order), reference counts, the hash map,
    tables and tokens, prefix counters, and the K/V storage."""
    pool = kv.pool
    return (pool.free_block_ids(), [pool.ref_count(b) for b in range(pool.num_blocks)], dict(pool._cached),
            {s: (kv.block_ids(s), kv.num_tokens(s), kv.slot_mapping(s).tolist()) for s in kv._seqs},
            kv.prefix_queries, kv.prefix_hits, pool.key_cache.clone(), pool.value_cache.clone())


def assert_same(before, after):
    assert before[:6] == after[:6]
    assert torch.equal(before[6], after[6]) and torch.equal(before[7], after[7])


# -- reference counts ------------------------------------------------------------------------------
def test_reference_counts_through_allocate_fork_free():
    kv = manager(num_blocks=8, block_size=4)
    a = list(range(10, 20))                      # 10 tokens: two full blocks and one of 2
    assert kv.allocate("a", a) == 0
    assert kv.block_ids("a") == [0, 1, 2] and kv.slot_mapping("a").tolist() == list(range(10))
    kv.fork("a", "b")
    assert kv.block_ids("b") == [0, 1, 2]
    assert kv.allocate("c", a[:8] + [1, 2]) == 8  # the two full blocks reused
    assert kv.block_ids("c") == [0, 1, 3]
    assert [kv.pool.ref_count(b) for b in range(5)] == [3, 3, 2, 1, 0]
    assert kv.pool.used_blocks == 4 and kv.pool.free_block_ids() == [4, 5, 6, 7]

    kv.free("a")
    assert [kv.pool.ref_count(b) for b in range(4)] == [2, 2, 1, 1]
    kv.free("b")
    assert [kv.pool.ref_count(b) for b in range(4)] == [1, 1, 0, 1]
    assert kv.pool.free_block_ids() == [4, 5, 6, 7, 2]
    kv.free("c")                                 # released last block first
    assert kv.pool.free_block_ids() == [4, 5, 6, 7, 2, 3, 1, 0]
    assert kv.pool.used_blocks == 0 and "c" not in kv
    with pytest.raises(ValueError, match="not held"):
        kv.pool.release([0])


# -- the hash chain ----------------------------------------------------------------------------------
def test_hash_chain_depends_on_every_earlier_block():
    a = [5, 6, 7, 8, 9, 10]
    assert chain(a, 2) == chain(list(a), 2)
    b = [99] + a[1:]                              # differs in the first block only
    assert all(x != y for x, y in zip(chain(a, 2), chain(b, 2)))
    c = a[:2] + [7, 99] + a[4:]                   # differs in the second block only
    assert chain(c, 2)[0] == chain(a, 2)[0] and all(x != y for x, y in zip(chain(a, 2)[1:], chain(c, 2)[1:]))
    # The same tokens after a different prefix, and token order, change the hash.
    assert hash_block_tokens(None, [9, 10]) != chain(a, 2)[2]
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])

    kv = manager(num_blocks=16, block_size=2)
    kv.allocate("a", a + [11])
    assert [kv.pool.cached_block(h) for h in chain(a, 2)] == kv.block_ids("a")[:3]
    assert kv.pool.cached_blocks == 3             # the partial last block is not registered
    assert kv.allocate("b", b + [11]) == 0         # a different first block: nothing reused
    assert kv.allocate("c", c + [11]) == 2         # only the first block is shared
    assert kv.block_ids("c")[0] == kv.block_ids("a")[0] and kv.block_ids("c")[1] != kv.block_ids("a")[1]
    assert (kv.prefix_queries, kv.prefix_hits) == (9, 1)


def test_equal_prefixes_hit_and_partial_blocks_are_never_shared():
    kv = manager(num_blocks=16, block_size=4)
    a = list(range(30, 40))                       # 2 full blocks + 2 tokens
    kv.allocate("a", a)
    assert kv.allocate("b", a) == 8               # same prompt while "a" lives
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.block_ids("b")[2] != kv.block_ids("a")[2]
    shared, partial = kv.block_ids("a")[:2], [kv.block_ids("a")[2], kv.block_ids("b")[2]]
    kv.free("a")
    kv.free("b")
    assert kv.allocate("c", a + [1, 2, 3]) == 8   # after both are freed: still cached
    assert kv.block_ids("c")[:2] == shared and kv.block_ids("c")[2] not in partial
    assert (kv.prefix_queries, kv.prefix_hits) == (2 + 2 + 3, 4)
    # A block-aligned prompt computes its last token, so its last full block is not reused; the
    # cached copy stays the registered one.
    hashes = chain(a, 4)
    assert kv.allocate("d", a[:8]) == 4
    assert kv.block_ids("d")[1] != kv.pool.cached_block(hashes[1]) == kv.block_ids("c")[1]
    assert kv.memory_stats()["prefix_hit_rate"] == 5 / 8


def test_decode_growth_seals_full_blocks_for_later_prompts():
    kv = manager(num_blocks=8, block_size=4)
    kv.allocate("a", [1, 2, 3])
    assert kv.append_slots("a", [4]).tolist() == [3] and kv.pool.cached_blocks == 1
    slots = kv.append_slots("a", torch.tensor([5, 6, 7, 8, 9]))
    assert slots.tolist() == [4, 5, 6, 7, 8] and kv.block_ids("a") == [0, 1, 2]
    assert [kv.pool.cached_block(h) for h in chain(list(range(1, 10)), 4)] == [0, 1]
    assert kv.append_slots("a", []).tolist() == [] and kv.num_tokens("a") == 9
    assert kv.allocate("b", list(range(1, 10)) + [0]) == 8


# -- copy-on-write -------------------------------------------------------------------------------------
def test_copy_on_write_copies_the_shared_block_and_leaves_the_parent_alone():
    gen = torch.Generator().manual_seed(0)
    kv = manager(num_blocks=6, block_size=4, layers=2, kv_heads=2, head_dim=3, dtype=torch.float64)
    pool = kv.pool
    pool.key_cache.normal_(generator=gen)          # stale content everywhere
    pool.value_cache.normal_(generator=gen)
    kv.allocate("p", list(range(6)))              # blocks [0, 1]; block 1 holds 2 tokens
    for layer in range(2):
        pool.write(layer, kv.slot_mapping("p"), torch.randn(6, 2, 3, generator=gen, dtype=torch.float64),
                   torch.randn(6, 2, 3, generator=gen, dtype=torch.float64))
    kv.fork("p", "c")
    keys, values = pool.key_cache.clone(), pool.value_cache.clone()

    slots = kv.append_slots("c", [100])
    copy = kv.block_ids("c")[1]
    assert kv.block_ids("c") == [0, copy] and copy not in (0, 1) and slots.tolist() == [copy * 4 + 2]
    assert torch.equal(pool.key_cache[:, copy], keys[:, 1]) and torch.equal(pool.value_cache[:, copy], values[:, 1])
    others = [b for b in range(6) if b != copy]
    assert torch.equal(pool.key_cache[:, others], keys[:, others])
    assert [pool.ref_count(b) for b in (0, 1, copy)] == [2, 1, 1]

    pool.write(0, slots, torch.ones(1, 2, 3, dtype=torch.float64), torch.ones(1, 2, 3, dtype=torch.float64))
    assert torch.equal(pool.key_cache[:, 1], keys[:, 1])           # the parent's block is untouched
    used = pool.used_blocks
    assert kv.append_slots("p", [7]).tolist() == [1 * 4 + 2]        # the parent now owns it: no copy
    assert pool.used_blocks == used

    kv.allocate("q", list(range(8)))              # full last block: a fork appends into a new block
    kv.fork("q", "r")
    used = pool.used_blocks
    kv.append_slots("r", [9])
    assert kv.block_ids("r")[:2] == kv.block_ids("q") and pool.used_blocks == used + 1


# -- LRU eviction -----------------------------------------------------------------------------------
def test_least_recently_freed_cached_block_is_evicted_first():
    kv = manager(num_blocks=4, block_size=2)
    kv.allocate("a", [1, 2, 3])                    # blocks 0 (full, cached) and 1
    kv.allocate("b", [4, 5, 6])                    # blocks 2 (full, cached) and 3
    kv.free("a")
    kv.free("b")
    assert kv.pool.free_block_ids() == [1, 0, 3, 2]
    ha, hb = hash_block_tokens(None, [1, 2]), hash_block_tokens(None, [4, 5])
    kv.allocate("x", [9])                          # takes block 1 (uncached)
    assert kv.pool.cached_block(ha) == 0
    kv.allocate("y", [9])                          # takes block 0: "a"'s prefix is evicted
    assert kv.pool.cached_block(ha) is None and kv.pool.cached_block(hb) == 2
    assert kv.allocate("b2", [4, 5, 7]) == 2 and kv.block_ids("b2") == [2, 3]

    # Within a sequence the tail is evicted before the head.
    kv = manager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    kv.allocate("a", tokens)
    kv.free("a")
    hashes = chain(tokens, 2)
    kv.pool.take(1)                                # the partial last block, uncached
    assert all(kv.pool.cached_block(h) is not None for h in hashes)
    for evicted in (2, 1, 0):
        kv.pool.take(1)
        assert [kv.pool.cached_block(h) is not None for h in hashes] == [i < evicted for i in range(3)]


# -- running out -----------------------------------------------------------------------------------
def test_pool_exhausted_on_allocate_leaves_everything_as_it_was():
    kv = manager(num_blocks=5, block_size=2)
    kv.allocate("a", [1, 2, 3, 4, 5])
    kv.free("a")                                   # blocks 0, 1 cached and free
    kv.allocate("b", [9, 9, 9, 9, 9])              # takes 3, 4, 2: free list [1, 0]
    before = snapshot(kv)
    # 2 cached blocks reused and 2 new ones: the cached ones are free, so 4 free blocks are needed.
    big = [1, 2, 3, 4, 5, 6, 7]
    assert not kv.can_allocate(big)
    with pytest.raises(PoolExhausted, match="4 blocks needed, 2 free of 5") as info:
        kv.allocate("c", big)
    assert (info.value.needed, info.value.free) == (4, 2)
    assert_same(before, snapshot(kv))
    assert "c" not in kv
    assert kv.can_allocate([1, 2, 3]) and kv.allocate("c", [1, 2, 3]) == 2


def test_pool_exhausted_on_append_leaves_everything_as_it_was():
    kv = manager(num_blocks=4, block_size=2)
    kv.allocate("a", [1, 2, 3])                    # blocks 0, 1
    kv.fork("a", "b")
    kv.allocate("x", [5, 6, 7, 8])                 # blocks 2, 3: the pool is full
    before = snapshot(kv)
    assert not kv.can_append("b", 1)
    with pytest.raises(PoolExhausted, match="1 blocks needed, 0 free"):
        kv.append_slots("b", [4])                  # would copy the shared block 1
    with pytest.raises(PoolExhausted):
        kv.append_slots("x", [9])                  # would need a new block
    assert_same(before, snapshot(kv))
    assert kv.pool.ref_count(1) == 2
    kv.free("x")
    assert kv.can_append("b", 1) and kv.append_slots("b", [4]).tolist() == [3 * 2 + 1]


def test_a_request_larger_than_the_pool_is_refused():
    kv = manager(num_blocks=3, block_size=4)
    with pytest.raises(ValueError, match=r"token_ids needs 4 blocks of 4 tokens \(13 tokens\); the whole pool has 3"):
        kv.allocate("a", list(range(13)))
    with pytest.raises(ValueError, match="the whole pool has 3"):
        kv.can_allocate(list(range(13)))
    assert "a" not in kv and kv.pool.num_free == 3
    kv.allocate("a", list(range(12)))
    before = snapshot(kv)
    with pytest.raises(ValueError, match=r"needs 4 blocks of 4 tokens \(13 tokens\)"):
        kv.append_slots("a", [1])
    assert_same(before, snapshot(kv))


# -- accounting ---------------------------------------------------------------------------------------
def test_memory_accounting():
    pool = BlockPool(num_blocks=10, block_size=4, num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    assert pool.key_cache.shape == (3, 10, 4, 2, 8)
    assert pool.bytes_per_block == 2 * 3 * 4 * 2 * 8 * 2 == (pool.key_cache.nbytes + pool.value_cache.nbytes) // 10
    kv = KVCacheManager(pool)
    kv.allocate("a", list(range(10)))              # 3 blocks
    kv.fork("a", "b")                              # shares them
    kv.allocate("c", list(range(8)) + [50, 51])    # shares 2, adds 1
    stats = kv.memory_stats()
    assert stats["used_blocks"] == 4 and stats["free_blocks"] == 6 and stats["tokens_held"] == 30
    assert stats["used_bytes"] == 4 * 768 and stats["total_bytes"] == 10 * 768
    assert (stats["prefix_queries"], stats["prefix_hits"], stats["cached_blocks"]) == (4, 2, 2)


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, value, error", [("num_blocks", 0, ValueError), ("block_size", 0, ValueError),
                                                ("block_size", -2, ValueError), ("num_blocks", 2.0, TypeError),
                                                ("block_size", True, TypeError), ("head_dim", 0, ValueError)])
def test_bad_pool_settings(name, value, error):
    settings = dict(num_blocks=4, block_size=2, num_layers=1, num_kv_heads=1, head_dim=2)
    settings[name] = value
    with pytest.raises(error, match=f"BlockPool: {name} must be an int >= 1"):
        BlockPool(**settings)


def test_bad_manager_input():
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        BlockPool(4, 2, 1, 1, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="pool must be a BlockPool"):
        KVCacheManager("pool")
    kv = manager()
    for call in (lambda: kv.free("z"), lambda: kv.append_slots("z", [1]), lambda: kv.slot_mapping("z"),
                 lambda: kv.block_tables(["z"]), lambda: kv.can_append("z", 1)):
        with pytest.raises(ValueError, match="seq_id 'z' is not allocated"):
            call()
    with pytest.raises(ValueError, match="parent_seq_id 'z' is not allocated"):
        kv.fork("z", "y")
    kv.allocate("a", [1, 2])
    kv.allocate("b", [3])
    with pytest.raises(ValueError, match="seq_id 'a' is already allocated"):
        kv.allocate("a", [1])
    with pytest.raises(ValueError, match="child_seq_id 'b' is already allocated"):
        kv.fork("a", "b")
    with pytest.raises(ValueError, match="token_ids must hold at least one token"):
        kv.allocate("c", [])
    with pytest.raises(ValueError, match=r"token_ids must hold token ids \(ints >= 0\); got -1"):
        kv.allocate("c", [1, -1])
    with pytest.raises(TypeError, match="token_ids must be a 1-D integer tensor"):
        kv.allocate("c", torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="new_token_ids must be a list of ints"):
        kv.append_slots("a", 5)
    with pytest.raises(ValueError, match="need 0 <= start <= end <= 2"):
        kv.slot_mapping("a", 1, 3)
    with pytest.raises(ValueError, match="num_new_tokens must be an int >= 0"):
        kv.can_append("a", -1)
    assert kv.pool.used_blocks == 2 and "c" not in kv


# -- the paged attention read -------------------------------------------------------------------------
def dense_attention(query, keys, values, scale=None):
    """Per sequence: SDPA of ``query[i:i+1]`` on its dense ``[L, H_kv, D]`` keys and values."""
    rows = [F.scaled_dot_product_attention(query[i:i + 1], k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None],
                                           scale=scale, enable_gqa=True) for i, (k, v) in enumerate(zip(keys, values))]
    return torch.cat(rows)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_paged_read_matches_dense_sdpa_on_shuffled_tables(dtype, atol, scale):
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, heads, kv_heads, dim = 24, 4, 8, 2, 16
    lengths = [1, 5, 16, 23]
    key_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen, dtype=dtype) * 1e3  # stale
    value_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen, dtype=dtype) * 1e3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, keys, values = [], [], []
    for length in lengths:
        table = [order.pop() for _ in range(-(-length // block_size))]
        k = torch.randn(length, kv_heads, dim, generator=gen, dtype=dtype)
        v = torch.randn(length, kv_heads, dim, generator=gen, dtype=dtype)
        for p in range(length):                    # scattered position by position
            key_cache[table[p // block_size], p % block_size] = k[p]
            value_cache[table[p // block_size], p % block_size] = v[p]
        tables.append(table + [-1] * (6 - len(table)))
        keys.append(k)
        values.append(v)
    query = torch.randn(len(lengths), heads, 1, dim, generator=gen, dtype=dtype)
    out = paged_attention_reference(query, key_cache, value_cache, torch.tensor(tables), torch.tensor(lengths),
                                    scale=scale)
    assert out.dtype == dtype and out.shape == (4, heads, 1, dim)
    torch.testing.assert_close(out, dense_attention(query, keys, values, scale), atol=atol, rtol=0)


def test_paged_read_through_the_manager_with_shared_and_forked_blocks():
    gen = torch.Generator().manual_seed(2)
    block_size, heads, kv_heads, dim = 4, 4, 2, 8
    kv = manager(num_blocks=32, block_size=block_size, layers=2, kv_heads=kv_heads, head_dim=dim, dtype=torch.float64)
    order = torch.randperm(32, generator=gen).tolist()
    for b in range(32):
        kv.allocate(("fill", b), [b])
    for b in order:                                # the free list becomes a random order
        kv.free(("fill", b))
    assert kv.pool.free_block_ids() == order

    dense = {}                                     # seq -> per layer ([L, H_kv, D] keys, values)

    def fresh(n):
        return [(torch.randn(n, kv_heads, dim, generator=gen, dtype=torch.float64),
                 torch.randn(n, kv_heads, dim, generator=gen, dtype=torch.float64)) for _ in range(2)]

    def store(seq, slots, kvs):
        for layer, (k, v) in enumerate(kvs):
            kv.pool.write(layer, slots, k, v)
        old = dense.get(seq, [(k[:0], v[:0]) for k, v in kvs])
        dense[seq] = [(torch.cat([ok, k]), torch.cat([ov, v])) for (ok, ov), (k, v) in zip(old, kvs)]

    prompt_a = list(range(100, 113))
    store("a", kv.slot_mapping("a", kv.allocate("a", prompt_a)), fresh(13))
    cached = kv.allocate("b", prompt_a[:9] + [7, 7])          # shares a's first two blocks
    assert cached == 8
    dense["b"] = [(k[:8], v[:8]) for k, v in dense["a"]]
    store("b", kv.slot_mapping("b", cached), fresh(3))
    store("c", kv.slot_mapping("c", kv.allocate("c", [5])), fresh(1))
    kv.fork("a", "d")
    dense["d"] = list(dense["a"])
    for step in range(3):                                     # decode: a and d diverge after the fork
        for seq in ("a", "d", "b"):
            store(seq, kv.append_slots(seq, [step]), fresh(1))
    seqs = ["a", "b", "c", "d"]
    tables = kv.block_tables(seqs)
    assert tables.shape == (4, 4) and kv.seq_lens(seqs).tolist() == [16, 14, 1, 16]
    blocks_a = kv.block_ids("a")
    assert any(blocks_a[i + 1] != blocks_a[i] + 1 for i in range(3))   # not contiguous
    query = torch.randn(4, heads, 1, dim, generator=gen, dtype=torch.float64)
    for layer in range(2):
        out = paged_attention_reference(query, kv.pool.key_cache[layer], kv.pool.value_cache[layer], tables,
                                        kv.seq_lens(seqs))
        want = dense_attention(query, [dense[s][layer][0] for s in seqs], [dense[s][layer][1] for s in seqs])
        torch.testing.assert_close(out, want, atol=1e-12, rtol=0)


def test_paged_read_refuses_bad_shapes():
    cache = torch.zeros(4, 2, 2, 8)
    table, lens = torch.zeros(1, 2, dtype=torch.long), torch.tensor([3])
    with pytest.raises(ValueError, match=r"query must be \[B, H, 1, D\]"):
        paged_attention_reference(torch.zeros(1, 4, 2, 8), cache, cache, table, lens)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of KV heads \(2\)"):
        paged_attention_reference(torch.zeros(1, 3, 1, 8), cache, cache, table, lens)
    with pytest.raises(ValueError, match=r"seq_lens must lie in 1..4"):
        paged_attention_reference(torch.zeros(1, 4, 1, 8), cache, cache, table, torch.tensor([5]))
    with pytest.raises(ValueError, match="key_cache and value_cache"):
        paged_attention_reference(torch.zeros(1, 4, 1, 8), cache, cache[..., :4], table, lens)
