"""Unit tests for KVCacheManager: block tables, prefix reuse, ref counts (pure Python)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvcache.cache.manager as manager_mod
from kvcache.cache.manager import KVCacheManager
from kvcache.cache.prefix import hash_block


def run_prompt(mgr: KVCacheManager, seq_id: str, tokens: list[int]) -> list[int] | None:
    """Admit a prompt the way the scheduler does: prefix lookup, allocate, compute, cache."""
    blocks, n_hit = mgr.get_computed_blocks(tokens)
    table = mgr.allocate_slots(seq_id, tokens, n_hit, len(tokens) - n_hit, blocks)
    if table is not None:
        mgr.cache_full_blocks(seq_id, tokens, len(tokens))
    return table


def refs(mgr: KVCacheManager) -> list[int]:
    return [b.ref_count for b in mgr.pool.blocks]


# -- allocation -------------------------------------------------------------------------


def test_restart_frees_the_blocks_and_keeps_the_sequence_as_admitted():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(10))
    run_prompt(mgr, "a", tokens)
    queries = mgr.usage()["prefix_queries"]
    mgr.restart("a")
    assert "a" in mgr and mgr.block_table("a") == [] and mgr.usage()["blocks_used"] == 0
    assert mgr.allocate_slots("a", tokens, 0, 10) is not None and mgr.blocks_held("a") == 3
    assert mgr.usage()["prefix_queries"] == queries  # computing it again is no new admission
    mgr.pool.check_invariants()


def test_rename_hands_the_blocks_over_unchanged():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    table = run_prompt(mgr, "a", list(range(6)))
    mgr.rename("a", "kept")
    assert "a" not in mgr and mgr.block_table("kept") == table and mgr.usage()["blocks_used"] == 2
    run_prompt(mgr, "b", [7, 8])
    with pytest.raises(ValueError, match="already has blocks"):
        mgr.rename("kept", "b")
    mgr.free("kept")
    assert mgr.usage()["blocks_used"] == 1
    mgr.pool.check_invariants()


def test_allocate_slots_grows_the_table_block_by_block():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(5))
    assert mgr.allocate_slots("a", tokens, 0, 5) == [0, 1]  # ceil(5 / 4) blocks
    for n in range(6, 9):  # decode up to 8 tokens: still 2 blocks
        tokens.append(n)
        assert len(mgr.allocate_slots("a", tokens, n - 1, 1)) == 2
    tokens.append(9)
    assert mgr.allocate_slots("a", tokens, 8, 1) == [0, 1, 2]
    assert mgr.block_table("a") == [0, 1, 2]
    assert mgr.usage()["blocks_used"] == 3 and mgr.num_free_blocks == 5
    mgr.free("a")
    mgr.free("a")  # unknown id: no-op
    assert mgr.num_free_blocks == 8 and "a" not in mgr


def test_allocate_slots_returns_none_without_change_when_short():
    mgr = KVCacheManager(num_blocks=3, block_size=2)
    assert mgr.allocate_slots("a", [1, 2, 3], 0, 3) == [0, 1]
    before = (refs(mgr), mgr.usage(), mgr.block_table("a"))
    assert mgr.allocate_slots("a", [1, 2, 3, 4, 5, 6, 7], 3, 4) is None  # needs 2 more, 1 free
    assert mgr.allocate_slots("b", [7] * 5, 0, 5) is None
    assert (refs(mgr), mgr.usage(), mgr.block_table("a")) == before
    assert "b" not in mgr


def test_free_releases_tail_first():
    mgr = KVCacheManager(num_blocks=3, block_size=2)
    table = mgr.allocate_slots("a", list(range(6)), 0, 6)
    mgr.cache_full_blocks("a", list(range(6)), 6)  # all three full and registered
    mgr.free("a")
    assert mgr.pool.allocate(3) == table[::-1]  # the tail is evicted first


def test_can_fit_counts_the_whole_pool():
    mgr = KVCacheManager(num_blocks=4, block_size=16)
    assert mgr.can_fit(64) and not mgr.can_fit(65) and mgr.can_fit(0)


def test_slot_mapping():
    mgr = KVCacheManager(num_blocks=6, block_size=4)
    mgr.allocate_slots("x", [0] * 3, 0, 3)  # block 0
    mgr.allocate_slots("a", [0] * 9, 0, 9)  # blocks 1, 2, 3
    assert mgr.block_table("a") == [1, 2, 3]
    assert mgr.slot("a", 0) == 4
    assert mgr.slot("a", 5) == 2 * 4 + 1
    assert mgr.slots("a", 3, 9) == [7, 8, 9, 10, 11, 12]
    assert mgr.slots("a", 2, 2) == []
    with pytest.raises(IndexError):
        mgr.slot("a", 12)
    with pytest.raises(IndexError):
        mgr.slots("a", 0, 13)


# -- prefix cache -------------------------------------------------------------------------


def test_freed_prefix_is_reused_by_a_later_identical_prompt():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    table_a = run_prompt(mgr, "a", prompt)
    mgr.free("a")
    assert mgr.usage()["blocks_cached"] == 2  # the partial tail block is not cached

    blocks, n_hit = mgr.get_computed_blocks(prompt + [1, 2, 3])
    assert blocks == table_a[:2] and n_hit == 8
    assert refs(mgr)[table_a[0]] == 0  # lookup changes no ref counts
    table_b = mgr.allocate_slots("b", prompt + [1, 2, 3], n_hit, 5, blocks)
    assert table_b[:2] == table_a[:2] and len(table_b) == 4
    assert mgr.usage()["blocks_cached"] == 0  # revived: used again


def test_cached_blocks_are_evicted_when_reallocated():
    mgr = KVCacheManager(num_blocks=3, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    run_prompt(mgr, "a", prompt)
    mgr.free("a")
    run_prompt(mgr, "b", [9, 9, 9, 9, 9, 9])  # needs all 3 blocks: evicts the cached ones
    mgr.free("b")
    assert mgr.get_computed_blocks(prompt) == ([], 0)


def test_get_computed_blocks_never_covers_the_whole_sequence():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(8))  # exactly 2 full blocks
    run_prompt(mgr, "a", prompt)
    blocks, n_hit = mgr.get_computed_blocks(prompt)
    assert len(blocks) == 1 and n_hit == 4  # the last block is recomputed for the logits
    assert mgr.get_computed_blocks(prompt + [8])[1] == 8
    assert mgr.get_computed_blocks([])[1] == 0
    # The recomputed last block duplicates a registered one: it stays unregistered, no error.
    table = mgr.allocate_slots("b", prompt, n_hit, 4, blocks)
    mgr.cache_full_blocks("b", prompt, 8)
    assert table[0] == mgr.block_table("a")[0] and table[1] != mgr.block_table("a")[1]
    assert mgr.pool.blocks[table[1]].block_hash is None
    mgr.pool.check_invariants()


def test_allocate_slots_counts_revived_blocks_and_touches_nothing_when_short():
    mgr = KVCacheManager(num_blocks=4, block_size=2)
    run_prompt(mgr, "a", [1, 2, 3, 4, 5])
    mgr.free("a")  # 4 free, 2 of them cached
    prompt = [1, 2, 3, 4, 9, 9, 9, 9, 9]
    blocks, n_hit = mgr.get_computed_blocks(prompt)
    assert n_hit == 4
    # 5 blocks needed in all: 2 revived + 3 new > 4 free
    assert mgr.allocate_slots("b", prompt, n_hit, 5, blocks) is None
    assert refs(mgr) == [0, 0, 0, 0] and mgr.usage()["blocks_cached"] == 2 and "b" not in mgr
    assert mgr.allocate_slots("b", prompt[:7], n_hit, 3, blocks) is not None  # 2 + 2 fit


def test_two_sequences_share_a_prefix_with_ref_counts():
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    system = list(range(50, 58))  # a shared 2-block system prompt
    table_a = run_prompt(mgr, "a", system + [1, 2, 3])
    table_b = run_prompt(mgr, "b", system + [7, 7])
    shared = table_a[:2]
    assert table_b[:2] == shared and table_b[2] != table_a[2]
    assert [mgr.pool.blocks[b].ref_count for b in shared] == [2, 2]
    assert mgr.usage()["blocks_used"] == 4
    mgr.free("a")
    assert [mgr.pool.blocks[b].ref_count for b in shared] == [1, 1]  # still held by b
    assert mgr.usage()["blocks_used"] == 3 and mgr.usage()["blocks_cached"] == 0
    mgr.free("b")
    assert mgr.usage()["blocks_used"] == 0 and mgr.usage()["blocks_cached"] == 2
    mgr.pool.check_invariants()


def test_collision_guard_prevents_a_false_hit(monkeypatch):
    monkeypatch.setattr(manager_mod, "hash_block", lambda parent, tokens, extra=None: 12345)
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    run_prompt(mgr, "a", [1, 2, 3])
    assert mgr.get_computed_blocks([1, 2, 3]) == ([mgr.block_table("a")[0]], 2)
    assert mgr.get_computed_blocks([5, 6, 7]) == ([], 0)  # same hash, other tokens


def test_stale_computed_blocks_are_refused():
    mgr = KVCacheManager(num_blocks=3, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    run_prompt(mgr, "a", prompt)
    mgr.free("a")
    blocks, n_hit = mgr.get_computed_blocks(prompt)
    run_prompt(mgr, "x", [8, 8, 8, 8, 8])  # evicts the cached blocks in between
    mgr.free("x")
    with pytest.raises(ValueError):
        mgr.allocate_slots("b", prompt, n_hit, 1, blocks)
    assert "b" not in mgr


def test_cache_full_blocks_is_idempotent_and_follows_decode():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    tokens = [5, 6, 7]
    mgr.allocate_slots("a", tokens, 0, 3)
    mgr.cache_full_blocks("a", tokens, 3)
    for t in range(8, 18):  # decode one token at a time
        tokens.append(t)
        mgr.allocate_slots("a", tokens, len(tokens) - 1, 1)
        mgr.cache_full_blocks("a", tokens, len(tokens))
        mgr.cache_full_blocks("a", tokens, len(tokens))
    table = mgr.block_table("a")
    h0 = hash_block(None, tokens[0:4])  # each full block's key chains its predecessor's
    h1 = hash_block(h0, tokens[4:8])
    assert [mgr.pool.blocks[b].block_hash for b in table[:3]] == [h0, h1, hash_block(h1, tokens[8:12])]
    assert mgr.pool.blocks[table[3]].block_hash is None  # partial tail
    mgr.pool.check_invariants()


def test_hash_extra_separates_caches():
    prompt = list(range(9))
    a = KVCacheManager(8, 4, hash_extra="model-a")
    run_prompt(a, "s", prompt)
    assert a.get_computed_blocks(prompt)[1] == 8
    assert a.pool.blocks[0].block_hash != hash_block(None, prompt[:4])


def test_prefix_caching_off():
    mgr = KVCacheManager(8, 4, enable_prefix_caching=False)
    prompt = list(range(9))
    run_prompt(mgr, "a", prompt)
    mgr.free("a")
    assert mgr.get_computed_blocks(prompt) == ([], 0)
    assert mgr.usage()["blocks_cached"] == 0
    with pytest.raises(ValueError):
        mgr.allocate_slots("b", prompt, 4, 5, [0])


def test_prefix_hit_rate_accounting():
    mgr = KVCacheManager(num_blocks=16, block_size=4)
    assert mgr.usage()["prefix_hit_rate"] == 0.0
    system = list(range(12))
    run_prompt(mgr, "a", system + [1, 2, 3, 4])  # 16 asked, 0 hit
    run_prompt(mgr, "b", system + [9, 9, 9, 9])  # 16 asked, 12 hit
    u = mgr.usage()
    assert (u["prefix_queries"], u["prefix_hits"]) == (32, 12)
    assert u["prefix_hit_rate"] == pytest.approx(12 / 32)
    assert set(u) == {"blocks_total", "blocks_used", "blocks_cached", "blocks_free",
                      "prefix_queries", "prefix_hits", "prefix_hit_rate"}


def test_reset_prefix_cache():
    mgr = KVCacheManager(8, 4)
    prompt = list(range(9))
    run_prompt(mgr, "a", prompt)
    assert mgr.reset_prefix_cache() == 2
    assert mgr.get_computed_blocks(prompt) == ([], 0)
    mgr.free("a")
    assert mgr.usage()["blocks_free"] == 8


# -- randomized: many sequences allocate, grow and free --------------------------------------

BASES = [[1] * 12, list(range(20, 32)), [1] * 4 + list(range(40, 48))]  # overlapping prefixes


class ManagerMachine(RuleBasedStateMachine):
    """Drives the manager like a scheduler and checks it against a fake KV storage: every
    slot holds the token prefix it was computed from, so a wrong prefix hit, or a shared
    block written by another sequence, shows up as a slot with the wrong context."""

    def __init__(self):
        super().__init__()
        self.mgr = KVCacheManager(num_blocks=12, block_size=4)
        self.tokens: dict[str, list[int]] = {}  # seq -> its tokens, all computed
        self.store: dict[int, tuple[int, ...]] = {}  # slot -> tokens[: pos + 1] it was computed with
        self.next_id = 0

    def compute(self, seq_id: str, start: int, end: int) -> None:
        toks = self.tokens[seq_id]
        for pos, slot in zip(range(start, end), self.mgr.slots(seq_id, start, end)):
            self.store[slot] = tuple(toks[: pos + 1])
        self.mgr.cache_full_blocks(seq_id, toks, end)

    @rule(base=st.sampled_from(BASES), cut=st.integers(0, 12), tail=st.lists(st.integers(0, 3), max_size=6))
    def admit(self, base, cut, tail):
        prompt = base[:cut] + tail
        if not prompt:
            return
        seq_id = f"s{self.next_id}"
        self.next_id += 1
        before = (refs(self.mgr), self.mgr.pool.num_cached_blocks)
        blocks, n_hit = self.mgr.get_computed_blocks(prompt)
        assert n_hit < len(prompt)
        table = self.mgr.allocate_slots(seq_id, prompt, n_hit, len(prompt) - n_hit, blocks)
        if table is None:
            assert (refs(self.mgr), self.mgr.pool.num_cached_blocks) == before and seq_id not in self.mgr
            return
        self.tokens[seq_id] = list(prompt)
        self.compute(seq_id, n_hit, len(prompt))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 5))
    def grow(self, data, n):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        toks = self.tokens[seq_id]
        start = len(toks)
        new = toks + [data.draw(st.integers(0, 3)) for _ in range(n)]
        before = (refs(self.mgr), self.mgr.block_table(seq_id))
        if self.mgr.allocate_slots(seq_id, new, start, n) is None:
            assert (refs(self.mgr), self.mgr.block_table(seq_id)) == before
            return
        self.tokens[seq_id] = new
        self.compute(seq_id, start, len(new))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def finish(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.mgr.free(seq_id)
        del self.tokens[seq_id]

    @invariant()
    def consistent(self):
        mgr = self.mgr
        mgr.pool.check_invariants()  # every block is exactly one of used / free, and more
        u = mgr.usage()
        assert u["blocks_used"] + u["blocks_free"] == u["blocks_total"]
        assert sum(refs(mgr)) == sum(len(mgr.block_table(s)) for s in self.tokens)
        for seq_id, toks in self.tokens.items():
            table = mgr.block_table(seq_id)
            assert len(table) == -(-len(toks) // mgr.block_size)
            for pos, slot in enumerate(mgr.slots(seq_id, 0, len(toks))):
                assert self.store[slot] == tuple(toks[: pos + 1]), (seq_id, pos)

    def teardown(self):
        for seq_id in list(self.tokens):
            self.mgr.free(seq_id)
        u = self.mgr.usage()
        assert u["blocks_used"] == 0 and u["blocks_free"] == u["blocks_total"]
        assert all(r == 0 for r in refs(self.mgr))


ManagerMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_manager_state_machine = ManagerMachine.TestCase


# -- bytes held -------------------------------------------------------------------------


def test_bytes_held_counts_allocated_blocks_whole_and_skips_released_ones():
    mgr = KVCacheManager(num_blocks=10, block_size=4, block_bytes=100)
    system = list(range(50, 58))  # a shared 2-block system prompt
    run_prompt(mgr, "a", system + [1, 2, 3])  # 11 tokens: 3 blocks, the last one 3/4 full
    run_prompt(mgr, "b", system + [7])  # shares a's first 2 blocks: 3 blocks
    assert mgr.blocks_held("a") == 3 and mgr.bytes_held("a") == 300  # the partly filled block counts whole
    assert mgr.bytes_held("b") == 300  # shared blocks count in each holder's figure
    assert mgr.bytes_held() == 4 * 100 == mgr.usage()["blocks_used"] * 100  # ...once in the total
    assert mgr.release_blocks_before("a", 4) == 1  # the first block: still b's, so no block goes free
    assert mgr.bytes_held("a") == 200 and mgr.bytes_held() == 400
    assert mgr.compact("b", 2, 7) is not None  # 2 kept tokens: one fresh block
    assert mgr.bytes_held("b") == 100 and mgr.bytes_held() == 300
    mgr.free("a")
    assert mgr.bytes_held("a") == 0 and mgr.bytes_held() == 100
    assert KVCacheManager(4, 4).bytes_held() == 0  # no block bytes given: bookkeeping only


# -- forks (n samples of one prompt) ----------------------------------------------------


def test_fork_shares_every_block_and_copies_the_partial_one_on_first_write():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(10))  # blocks 0, 1 full; block 2 holds 2 of 4
    table = run_prompt(mgr, "a", prompt)
    mgr.fork("a", "b")
    mgr.fork("a", "c")
    assert mgr.block_table("b") == mgr.block_table("c") == table and refs(mgr)[:3] == [3, 3, 3]
    assert mgr.usage()["blocks_used"] == 3 and mgr.take_copies() == []
    b = mgr.allocate_slots("b", prompt + [50], 10, 1)  # b writes token 10 into the shared block 2
    assert b[:2] == table[:2] and b[2] not in table and mgr.take_copies() == [(table[2], b[2])]
    assert refs(mgr)[table[2]] == 2 and mgr.num_copies == 1
    c = mgr.allocate_slots("c", prompt + [60], 10, 1)
    assert c[2] not in (table[2], b[2]) and mgr.take_copies() == [(table[2], c[2])]
    assert mgr.allocate_slots("a", prompt + [70], 10, 1) == table  # the last holder writes in place
    assert mgr.take_copies() == [] and mgr.num_copies == 2
    for seq in "abc":
        mgr.free(seq)
    assert mgr.usage()["blocks_used"] == 0
    mgr.pool.check_invariants()


def test_fork_on_a_block_boundary_copies_nothing():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    table = run_prompt(mgr, "a", prompt)
    mgr.fork("a", "b")
    assert mgr.allocate_slots("b", prompt + [9], 8, 1)[:2] == table and mgr.take_copies() == []
    with pytest.raises(ValueError, match="already has blocks"):
        mgr.fork("a", "b")
    mgr.free("a")
    mgr.free("b")
    assert mgr.usage()["blocks_used"] == 0
    mgr.pool.check_invariants()


def test_a_copy_the_pool_cannot_supply_changes_nothing():
    mgr = KVCacheManager(num_blocks=3, block_size=4)
    prompt = list(range(10))
    table = run_prompt(mgr, "a", prompt)
    mgr.fork("a", "b")
    assert mgr.allocate_slots("b", prompt + [1], 10, 1) is None  # no free block for the copy
    assert mgr.block_table("b") == table and mgr.take_copies() == [] and refs(mgr) == [2, 2, 2]
    mgr.free("a")  # now b holds the blocks alone: it writes in place
    assert mgr.allocate_slots("b", prompt + [1], 10, 1) == table and mgr.take_copies() == []
    mgr.pool.check_invariants()
