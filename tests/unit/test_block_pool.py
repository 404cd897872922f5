"""Unit tests for the block pool and the chained block hashes (pure Python, no torch)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.cache.block_pool import Block, BlockPool
from kvcache.cache.prefix import hash_block
from kvcache.errors import KVCacheError
from tests.helpers import imported_top_modules

CACHE_DIR = Path(__file__).resolve().parents[2] / "src" / "kvcache" / "cache"


def full(pool: BlockPool, base: int) -> tuple[int, ...]:
    """A full block of distinct token ids starting at `base`."""
    return tuple(range(base, base + pool.block_size))


# -- hashing --------------------------------------------------------------------------


def test_hash_block_is_stable_chained_and_64_bit():
    h0 = hash_block(None, [1, 2, 3, 4])
    assert h0 == hash_block(None, (1, 2, 3, 4))  # list or tuple: same key
    assert 0 <= h0 < 2**64
    assert hash_block(h0, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])  # parent matters
    assert hash_block(None, [1, 2, 3, 4], extra="model-a") != hash_block(None, [1, 2, 3, 4], extra="model-b")
    assert hash_block(None, [1, 2, 3, 4], extra="1") != hash_block(None, [1, 2, 3, 4], extra=1)
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [1, 2, 3, 5])


def test_hash_block_is_stable_across_processes():
    # Golden values: Python's str hash() is randomised per process; ours must not be.
    assert hash_block(7, [1, 2, 3], extra=("m", "fp16")) == 290486850096007055
    assert hash_block(None, [0, 1, 2, 3]) == 2823699892572788195


# -- pool basics ----------------------------------------------------------------------


def test_bad_sizes_are_user_errors():
    with pytest.raises(KVCacheError):
        BlockPool(0, 16)
    with pytest.raises(KVCacheError):
        BlockPool(4, 0)


def test_block_defaults():
    b = Block(3)
    assert (b.block_id, b.ref_count, b.block_hash, b.token_ids) == (3, 0, None, ())


def test_allocate_and_free_counts():
    pool = BlockPool(4, 2)
    assert (pool.num_free_blocks, pool.num_used_blocks, pool.num_cached_blocks) == (4, 0, 0)
    ids = pool.allocate(3)
    assert ids == [0, 1, 2]
    assert all(pool.blocks[i].ref_count == 1 for i in ids)
    assert (pool.num_free_blocks, pool.num_used_blocks) == (1, 3)
    pool.free(ids)
    assert (pool.num_free_blocks, pool.num_used_blocks) == (4, 0)
    assert pool.allocate(0) == []
    pool.check_invariants()


def test_allocate_short_returns_none_without_change():
    pool = BlockPool(3, 2)
    held = pool.allocate(2)
    before = [(b.ref_count, b.block_hash) for b in pool.blocks]
    assert pool.allocate(2) is None
    assert [(b.ref_count, b.block_hash) for b in pool.blocks] == before
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) == [2]
    pool.free(held)
    pool.check_invariants()


def test_lru_order_allocates_least_recently_freed_first():
    pool = BlockPool(4, 2)
    a, b, c, d = pool.allocate(4)
    for i, blk in enumerate((a, b, c, d)):
        pool.register(blk, 100 + i, full(pool, 10 * i))  # cached blocks keep LRU order
    pool.free([c])
    pool.free([a])
    pool.free([d, b])  # free order decides eviction order
    assert pool.allocate(4) == [c, a, d, b]
    pool.check_invariants()


def test_blocks_holding_nothing_reusable_are_taken_before_cached_ones():
    pool = BlockPool(3, 2)
    x, y, z = pool.allocate(3)
    pool.register(x, 111, full(pool, 0))
    pool.free([x])  # cached
    pool.free([y, z])  # unregistered: go to the front, each in turn
    assert pool.allocate(2) == [z, y]
    assert pool.num_cached_blocks == 1 and pool.lookup(111, full(pool, 0)) == x
    pool.check_invariants()


def test_touch_revives_a_free_block_and_counts_refs():
    pool = BlockPool(3, 2)
    (x,) = pool.allocate(1)
    pool.register(x, 111, full(pool, 0))
    pool.free([x])
    assert pool.num_cached_blocks == 1 and pool.num_free_blocks == 3
    pool.touch([x])
    assert pool.blocks[x].ref_count == 1 and pool.num_free_blocks == 2 and pool.num_cached_blocks == 0
    pool.touch([x])  # a second sharer
    assert pool.blocks[x].ref_count == 2
    pool.free([x])
    assert pool.num_used_blocks == 1
    pool.free([x])
    assert pool.num_used_blocks == 0 and pool.num_cached_blocks == 1
    pool.check_invariants()


def test_double_free_is_caught():
    pool = BlockPool(2, 2)
    (x,) = pool.allocate(1)
    pool.free([x])
    with pytest.raises(AssertionError):
        pool.free([x])


# -- prefix cache in the pool -----------------------------------------------------------


def test_cached_block_survives_free_then_is_evicted_on_reuse():
    pool = BlockPool(2, 2)
    x, y = pool.allocate(2)
    pool.register(x, 42, (1, 2))
    pool.free([y, x])  # y freed first: y is reused first
    assert pool.lookup(42, (1, 2)) == x
    assert pool.allocate(1) == [y]
    assert pool.lookup(42, (1, 2)) == x  # still cached
    assert pool.allocate(1) == [x]  # now x is taken for new content: evicted
    assert pool.lookup(42, (1, 2)) is None
    assert pool.blocks[x].block_hash is None and pool.blocks[x].token_ids == ()
    assert pool.num_evictions == 1
    pool.check_invariants()


def test_lookup_checks_tokens_against_collisions():
    pool = BlockPool(2, 2)
    (x,) = pool.allocate(1)
    pool.register(x, 7, (1, 2))
    assert pool.lookup(7, (1, 2)) == x
    assert pool.lookup(7, (3, 4)) is None  # same hash, other tokens: no false hit
    assert pool.lookup(8, (1, 2)) is None


def test_register_keeps_the_existing_mapping_for_a_duplicate():
    pool = BlockPool(3, 2)
    x, y = pool.allocate(2)
    pool.register(x, 5, (1, 2))
    pool.register(y, 5, (1, 2))  # same content computed twice
    assert pool.lookup(5, (1, 2)) == x
    assert pool.blocks[y].block_hash is None
    pool.register(x, 5, (1, 2))  # idempotent
    pool.free([x, y])
    assert pool.num_cached_blocks == 1
    pool.check_invariants()


def test_reset_prefix_cache_drops_all_hashes():
    pool = BlockPool(3, 2)
    x, y = pool.allocate(2)
    pool.register(x, 1, (1, 2))
    pool.register(y, 2, (3, 4))
    pool.free([x])
    assert pool.reset_prefix_cache() == 2
    assert pool.lookup(1, (1, 2)) is None and pool.lookup(2, (3, 4)) is None
    assert pool.num_cached_blocks == 0 and pool.num_used_blocks == 1
    pool.check_invariants()


def test_prefix_caching_off_never_registers():
    pool = BlockPool(2, 2, enable_prefix_caching=False)
    (x,) = pool.allocate(1)
    pool.register(x, 9, (1, 2))
    assert pool.lookup(9, (1, 2)) is None
    pool.free([x])
    assert pool.num_cached_blocks == 0


@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "touch", "register"]), st.integers(0, 7)),
                max_size=60))
@settings(max_examples=60, deadline=None)
def test_random_pool_operations_keep_invariants(ops):
    pool = BlockPool(6, 2)
    held: list[int] = []  # one entry per reference we hold
    for op, k in ops:
        if op == "alloc":
            before = pool.num_free_blocks
            got = pool.allocate(k % 4)
            assert (got is None) == (k % 4 > before)
            held += got or []
        elif op == "free" and held:
            pool.free([held.pop(k % len(held))])
        elif op == "touch" and held:
            b = held[k % len(held)]
            pool.touch([b])
            held.append(b)
        elif op == "register" and held:
            b = held[k % len(held)]
            if pool.blocks[b].block_hash is None:
                pool.register(b, 1000 + k, (k, k))
        pool.check_invariants()
        assert sum(b.ref_count for b in pool.blocks) == len(held)
    pool.free(held)
    assert pool.num_used_blocks == 0 and pool.num_free_blocks == pool.num_blocks


def test_cache_bookkeeping_imports_no_torch():
    for name in ("block_pool.py", "prefix.py", "manager.py"):
        assert not imported_top_modules(CACHE_DIR / name) & {"torch", "numpy"}, name