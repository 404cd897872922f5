"""KVCacheManager additions for sessions and the dashboard: cached_prefix_blocks, restore_prefix, block_owners."""

from __future__ import annotations

import pytest

from kvcache import KVCacheError
from kvcache.cache.manager import KVCacheManager

BS = 4


def _run(mgr: KVCacheManager, seq: str, tokens: list[int]) -> list[int]:
    """Admit, 'compute' and register a sequence like the scheduler does; returns its table."""
    blocks, n_hit = mgr.get_computed_blocks(tokens)
    table = mgr.allocate_slots(seq, tokens, n_hit, len(tokens) - n_hit, blocks)
    mgr.cache_full_blocks(seq, tokens, len(tokens))
    return table


def test_restore_registers_blocks_that_the_next_request_hits():
    mgr = KVCacheManager(8, BS)
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    written = []
    assert mgr.restore_prefix(tokens, lambda ids, first: written.append((list(ids), first))) == (2, 0)
    assert len(written) == 1 and len(written[0][0]) == 2 and written[0][1] == 0
    assert mgr.usage()["blocks_used"] == 0 and mgr.usage()["blocks_cached"] == 2
    assert mgr.cached_prefix_blocks(tokens) == written[0][0]
    blocks, n_hit = mgr.get_computed_blocks(tokens + [99])
    assert blocks == written[0][0] and n_hit == 8
    mgr.pool.check_invariants()


def test_restore_keeps_blocks_already_cached_and_writes_only_the_rest():
    mgr = KVCacheManager(8, BS)
    _run(mgr, "a", list(range(5)))  # caches block 0 of the prefix
    mgr.free("a")
    calls = []
    assert mgr.restore_prefix(list(range(12)), lambda ids, first: calls.append((len(ids), first))) == (2, 1)
    assert calls == [(2, 1)]
    assert len(mgr.cached_prefix_blocks(list(range(12)))) == 3
    mgr.pool.check_invariants()


def test_restore_refuses_without_room_or_prefix_caching_and_changes_nothing():
    mgr = KVCacheManager(3, BS)
    _run(mgr, "busy", list(range(100, 110)))  # holds all 3 blocks
    before = mgr.usage()
    with pytest.raises(KVCacheError, match="free KV blocks"):
        mgr.restore_prefix(list(range(8)), lambda ids, first: None)
    assert mgr.usage() == before
    with pytest.raises(KVCacheError, match="Prefix caching is off"):
        KVCacheManager(3, BS, enable_prefix_caching=False).restore_prefix(list(range(8)), lambda i, f: None)


def test_a_failing_write_leaves_the_pool_consistent():
    mgr = KVCacheManager(4, BS)

    def boom(ids, first):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        mgr.restore_prefix(list(range(8)), boom)
    assert mgr.usage()["blocks_used"] == 0 and mgr.usage()["blocks_cached"] == 0
    mgr.pool.check_invariants()


def test_block_owners_lists_every_holder_of_shared_blocks():
    mgr = KVCacheManager(8, BS)
    a = _run(mgr, "a", list(range(9)))
    b = _run(mgr, "b", list(range(8)) + [50, 51])
    owners = mgr.block_owners()
    assert a[:2] == b[:2]
    assert owners[a[0]] == ["a", "b"] and owners[a[2]] == ["a"] and owners[b[2]] == ["b"]
