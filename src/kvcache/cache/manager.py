"""KVCacheManager: the only cache API the scheduler sees.

Per sequence it keeps a block table (block ids, in token order) and the chained hashes of
the sequence's full blocks; the `BlockPool` underneath owns ref counts, the LRU free queue
and the prefix-cache map. The scheduler moves block ids, never tensors.

One scheduling step for a sequence, as the scheduler drives it::

    blocks, n_hit = mgr.get_computed_blocks(tokens)            # first time only
    table = mgr.allocate_slots(seq_id, tokens, n_hit, n_new, blocks)
    if table is None: ...                                      # cannot schedule (or preempt)
    ... model computes tokens[n_hit : n_hit + n_new] into mgr.slots(seq_id, n_hit, n_hit + n_new)
    mgr.cache_full_blocks(seq_id, tokens, n_hit + n_new)
    ...
    mgr.free(seq_id)                                           # finished or preempted

`fork(seq_id, new_id)` starts another sequence on the same blocks (n samples of one prompt),
each block gaining a reference. A block shared that way is copied before a sequence writes
into it: `allocate_slots` gives the writer a fresh block and queues (source, copy) for the
storage, which the engine takes with `take_copies` and copies before the step runs.

Call `allocate_slots` right after `get_computed_blocks` (no other allocation between), as
vLLM's scheduler does; stale `computed_blocks` (evicted in between) are detected and refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvcache.cache.block_pool import BlockPool
from kvcache.cache.prefix import hash_block
from kvcache.errors import KVCacheError

__all__ = ["KVCacheManager", "RELEASED"]

RELEASED = -1  # a table entry whose block was given back (a sliding window no longer reads it)


@dataclass
class _SeqBlocks:
    table: list[int] = field(default_factory=list)  # block ids; token t lives in table[t // block_size]
    hashes: list[int] = field(default_factory=list)  # chained hashes of the first len(hashes) full blocks
    released: int = 0  # table entries before this index are RELEASED (except any kept head: sinks)
    offset: int = 0  # positions evicted before the table's first slot: token p sits at slot p - offset
    cacheable: bool = True  # False once compacted: its blocks no longer hold whole runs of the token ids


class KVCacheManager:
    """Block tables per sequence over one `BlockPool`, with prefix caching."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 *, hash_extra: object = None, block_bytes: int = 0):
        """`hash_extra`: a fingerprint (model, dtype, policy, ...) mixed into every block
        hash, so caches that must not share blocks never do; needs a stable `repr`.
        `block_bytes`: what one block takes in the storage behind the pool (its format's
        `bytes_per_block`); `bytes_held` counts in it (0: bookkeeping only)."""
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size  # tokens per block
        self.block_bytes = block_bytes
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_extra = hash_extra
        self._seqs: dict[str, _SeqBlocks] = {}
        self.prefix_queries = 0  # tokens of sequences admitted (first allocate_slots call)
        self.prefix_hits = 0  # of those, tokens served from the prefix cache
        # The last hit of get_computed_blocks: (block ids, their hashes), reused by allocate_slots.
        self._last_hit: tuple[tuple[int, ...], list[int]] = ((), [])
        self._copies: list[tuple[int, int]] = []  # (source, copy) block pairs the storage has yet to copy
        self.num_copies = 0  # blocks copied on write so far

    # -- prefix cache -------------------------------------------------------------------
    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """The longest run of leading full blocks of `token_ids` already in the prefix
        cache, and the number of tokens they cover. Never the whole sequence (at least one
        token is left to compute, for its logits). Changes no ref counts."""
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = max(len(token_ids) - 1, 0) // self.block_size  # leave >= 1 token uncovered
        blocks, hashes = self._lookup_prefix(token_ids, max_blocks)
        self._last_hit = (tuple(blocks), hashes)
        return blocks, len(blocks) * self.block_size

    def _lookup_prefix(self, token_ids: Sequence[int], max_blocks: int) -> tuple[list[int], list[int]]:
        """Cached blocks holding the first (up to `max_blocks`) full blocks of `token_ids`, and their hashes."""
        bs = self.block_size
        blocks: list[int] = []
        hashes: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            chunk = token_ids[i * bs : (i + 1) * bs]
            parent = hash_block(parent, chunk, self.hash_extra)
            block_id = self.pool.lookup(parent, chunk)
            if block_id is None:
                break
            blocks.append(block_id)
            hashes.append(parent)
        return blocks, hashes

    def block_hashes(self, token_ids: Sequence[int], num_blocks: int) -> list[int]:
        """The chained hashes of the first `num_blocks` full blocks of `token_ids` (the prefix
        cache's keys, and the shared tier's)."""
        bs, parent, out = self.block_size, None, []
        for i in range(min(num_blocks, len(token_ids) // bs)):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs], self.hash_extra)
            out.append(parent)
        return out

    def sequence_hashes(self, seq_id: str) -> list[int]:
        """The chained hashes of `seq_id`'s full blocks registered so far (none once compacted)."""
        return list(self._seqs[seq_id].hashes)

    def cached_prefix_blocks(self, token_ids: Sequence[int]) -> list[int]:
        """The cached blocks holding the leading full blocks of `token_ids` (all of them when
        the whole sequence is cached; unlike get_computed_blocks). Read-only."""
        if not self.enable_prefix_caching:
            return []
        return self._lookup_prefix(token_ids, len(token_ids) // self.block_size)[0]

    def restore_prefix(self, token_ids: Sequence[int], write: Callable[[list[int], int], None]) -> tuple[int, int]:
        """Put every full block of `token_ids` in the prefix cache, e.g. from a saved session.
        Blocks already cached are kept; each missing one gets a free block, which
        `write(block_ids, first_block_index)` fills with its K/V before it is registered under
        its chained hash. All end up cached and unreferenced (evictable, LRU). Returns
        (blocks written, blocks already cached). Raises `KVCacheError`, changing nothing,
        when prefix caching is off or too few blocks are free."""
        if not self.enable_prefix_caching:
            raise KVCacheError("Prefix caching is off, so a saved session cannot be restored into the cache.")
        bs = self.block_size
        n_full = len(token_ids) // bs
        present, hashes = self._lookup_prefix(token_ids, n_full)
        missing = n_full - len(present)
        revived = sum(1 for b in present if self.pool.blocks[b].ref_count == 0)
        if missing + revived > self.pool.num_free_blocks or n_full > self.num_blocks:
            raise KVCacheError(
                f"Restoring needs {missing} free KV blocks but only {self.pool.num_free_blocks - revived} "
                "are free now; try again when fewer requests are running."
            )
        self.pool.touch(present)  # the allocation below must not evict them
        new = self.pool.allocate(missing) if missing else []
        assert new is not None  # checked above
        try:
            if new:
                write(new, len(present))
            parent = hashes[-1] if hashes else None
            for j, block_id in enumerate(new):
                i = len(present) + j
                chunk = token_ids[i * bs : (i + 1) * bs]
                parent = hash_block(parent, chunk, self.hash_extra)
                self.pool.register(block_id, parent, chunk)
        finally:
            self.pool.free(reversed(present + new))  # tail first, as a finished sequence's
        return len(new), len(present)

    def _computed_hashes(self, token_ids: Sequence[int], computed_blocks: Sequence[int]) -> list[int]:
        """The hashes of `computed_blocks`, checked to still hold the first blocks of
        `token_ids` (they may have been evicted since get_computed_blocks)."""
        bs = self.block_size
        if tuple(computed_blocks) == self._last_hit[0]:
            hashes = list(self._last_hit[1])
        else:
            hashes, parent = [], None
            for i in range(len(computed_blocks)):
                parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs], self.hash_extra)
                hashes.append(parent)
        for i, (block_id, h) in enumerate(zip(computed_blocks, hashes)):
            block = self.pool.blocks[block_id]
            if block.block_hash != h or block.token_ids != tuple(token_ids[i * bs : (i + 1) * bs]):
                raise ValueError(
                    f"Computed block {block_id} no longer holds block {i} of this prompt; "
                    "call allocate_slots right after get_computed_blocks."
                )
        return hashes

    # -- allocation ---------------------------------------------------------------------
    def allocate_slots(self, seq_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                       num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> list[int] | None:
        """Grow `seq_id`'s block table to cover num_computed_tokens + num_new_tokens tokens.
        On the sequence's first call, `computed_blocks` (prefix hits from
        get_computed_blocks, covering num_computed_tokens) become the head of its table.
        Returns the table, or None with no state change if too few blocks are free."""
        if num_computed_tokens < 0 or num_new_tokens < 0:
            raise ValueError(
                f"Token counts must be >= 0, got computed={num_computed_tokens}, new={num_new_tokens}."
            )
        bs = self.block_size
        seq = self._seqs.get(seq_id)
        first = seq is None
        if computed_blocks:
            if not first:
                raise ValueError(f"Sequence {seq_id!r} already has blocks; computed_blocks is for its first call.")
            if not self.enable_prefix_caching:
                raise ValueError("computed_blocks were given but prefix caching is off.")
        if first and num_computed_tokens != len(computed_blocks) * bs:
            raise ValueError(
                f"A new sequence with {len(computed_blocks)} computed blocks has "
                f"{len(computed_blocks) * bs} computed tokens, not {num_computed_tokens}."
            )
        hashes = self._computed_hashes(token_ids, computed_blocks) if computed_blocks else []

        have = len(seq.table) if seq is not None else len(computed_blocks)
        total = num_computed_tokens + num_new_tokens - (seq.offset if seq is not None else 0)
        need = max(-(-total // bs) - have, 0)  # ceil(total / bs) - blocks held
        shared = self._shared_write_block(seq, num_computed_tokens) if num_new_tokens else None
        # Touching a free cached block takes it out of the free queue too.
        revived = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_count == 0)
        if need + (shared is not None) + revived > self.pool.num_free_blocks:
            return None
        if shared is not None:  # copy on write: this sequence gets its own copy of the block
            copy = self.pool.allocate(1)[0]
            src, seq.table[shared] = seq.table[shared], copy
            self.pool.free([src])  # still held by the sequences it was forked to
            self._copies.append((src, copy))
            self.num_copies += 1

        if seq is None:
            # hit-rate accounting per admitted sequence (a queue head retried while blocked counts once)
            self.prefix_queries += len(token_ids)
            self.prefix_hits += num_computed_tokens
            seq = self._seqs[seq_id] = _SeqBlocks()
            if computed_blocks:
                self.pool.touch(computed_blocks)  # before allocate: they must not be evicted
                seq.table.extend(computed_blocks)
                seq.hashes.extend(hashes)
        if need:
            new = self.pool.allocate(need)
            assert new is not None  # checked above
            seq.table.extend(new)
        return list(seq.table)

    def cache_full_blocks(self, seq_id: str, token_ids: Sequence[int], num_tokens: int) -> None:
        """Register every block of `seq_id` made full by the first `num_tokens` computed
        tokens of `token_ids`, continuing the sequence's hash chain. Idempotent."""
        if not self.enable_prefix_caching:
            return
        seq = self._seqs[seq_id]
        if not seq.cacheable:
            return
        bs = self.block_size
        num_full = min(num_tokens, len(token_ids)) // bs
        assert num_full <= len(seq.table), "tokens computed beyond the allocated table"
        parent = seq.hashes[-1] if seq.hashes else None
        for i in range(len(seq.hashes), num_full):
            chunk = token_ids[i * bs : (i + 1) * bs]
            parent = hash_block(parent, chunk, self.hash_extra)
            seq.hashes.append(parent)
            if seq.table[i] != RELEASED:
                self.pool.register(seq.table[i], parent, chunk)

    def _shared_write_block(self, seq: _SeqBlocks | None, position: int) -> int | None:
        """Index in `seq`'s table of the block its token `position` is written into, when another
        sequence holds that block too (forked); else None."""
        if seq is None:
            return None
        i = (position - seq.offset) // self.block_size
        if i >= len(seq.table) or seq.table[i] == RELEASED or self.pool.blocks[seq.table[i]].ref_count == 1:
            return None
        return i

    def fork(self, seq_id: str, new_id: str) -> None:
        """Start `new_id` with `seq_id`'s table, hash chain and offsets; every block it holds gains
        a reference (shared until a sequence writes into it, see `allocate_slots`)."""
        if new_id in self._seqs:
            raise ValueError(f"Sequence {new_id!r} already has blocks.")
        seq = self._seqs[seq_id]
        self.pool.touch([b for b in seq.table if b != RELEASED])
        self._seqs[new_id] = _SeqBlocks(list(seq.table), list(seq.hashes), seq.released, seq.offset, seq.cacheable)

    def take_copies(self) -> list[tuple[int, int]]:
        """The (source, copy) block pairs queued by copy-on-write since the last call; the caller
        copies them in the storage before any step writes to or reads from the copies."""
        copies, self._copies = self._copies, []
        return copies

    def free(self, seq_id: str) -> None:
        """Release `seq_id`'s blocks and forget it (unknown ids: no-op). Blocks are freed
        tail first, so its tail is evicted before its head, which is likelier shared."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.pool.free(reversed([b for b in seq.table if b != RELEASED]))

    def rename(self, seq_id: str, new_id: str) -> None:
        """Hand `seq_id`'s blocks and table to `new_id` (unknown to the manager), unchanged."""
        if new_id in self._seqs:
            raise ValueError(f"Sequence {new_id!r} already has blocks.")
        self._seqs[new_id] = self._seqs.pop(seq_id)

    def restart(self, seq_id: str) -> None:
        """Give back all of `seq_id`'s blocks but keep the sequence, with an empty table: it is
        computed again from its first token (no prefix hit, not counted as a new admission)."""
        seq = self._seqs[seq_id]
        self.pool.free(reversed([b for b in seq.table if b != RELEASED]))
        self._seqs[seq_id] = _SeqBlocks()

    def release_blocks_before(self, seq_id: str, position: int, keep_head: int = 0) -> int:
        """Give back `seq_id`'s blocks that lie wholly before token `position` (a sliding
        window will not read them again), except its first `keep_head` blocks (attention
        sinks); returns how many were freed. Token positions keep their meaning: the
        released entries stay in the table as RELEASED."""
        seq = self._seqs[seq_id]
        upto = min(max(position, 0) // self.block_size, len(seq.table))
        start = max(seq.released, keep_head)
        if upto <= start:
            return 0
        self.pool.free(seq.table[start:upto])
        seq.table[start:upto] = [RELEASED] * (upto - start)
        seq.released = upto
        return upto - start

    def compact(self, seq_id: str, keep_tokens: int, evicted: int) -> list[int] | None:
        """Replace `seq_id`'s blocks by fresh ones for `keep_tokens` tokens (an eviction policy
        copies the tokens it keeps into them; copy them out first: the old blocks are freed).
        Later positions move down by `evicted` slots and the sequence's blocks leave the prefix
        cache's hash chain. The old blocks stay cached if they were (they hold the prompt as
        computed with full attention). Returns the new table, or None, changing nothing, when
        the pool cannot supply the blocks."""
        seq = self._seqs[seq_id]
        need = -(-keep_tokens // self.block_size)
        live = [b for b in seq.table if b != RELEASED]
        freed_by_us = sum(1 for b in live if self.pool.blocks[b].ref_count == 1)
        if need > self.pool.num_free_blocks + freed_by_us:
            return None
        self.pool.free(reversed(live))
        new = self.pool.allocate(need)
        assert new is not None  # checked above
        seq.table, seq.hashes, seq.released = list(new), [], 0
        seq.offset += evicted
        seq.cacheable = False
        return list(new)

    def num_slots(self, seq_id: str, num_tokens: int) -> int:
        """Slots the first `num_tokens` positions of `seq_id` take (positions minus evicted ones)."""
        return num_tokens - self._seqs[seq_id].offset

    def first_live_block(self, seq_id: str) -> int:
        """Index in `seq_id`'s table of its first block after the released ones (0 when none
        were; kept head blocks, if any, come before the released run)."""
        return self._seqs[seq_id].released

    def reset_prefix_cache(self) -> int:
        """Forget all cached prefixes; returns the number of hashes dropped."""
        return self.pool.reset_prefix_cache()

    # -- queries ------------------------------------------------------------------------
    def block_table(self, seq_id: str) -> list[int]:
        """A copy of `seq_id`'s block table (block ids in token order; RELEASED where given back)."""
        return list(self._seqs[seq_id].table)

    def blocks_held(self, seq_id: str) -> int:
        """Blocks in `seq_id`'s table now (released ones not counted; 0 for an unknown sequence)."""
        seq = self._seqs.get(seq_id)
        return 0 if seq is None else len(seq.table) - seq.table.count(RELEASED)

    def bytes_held(self, seq_id: str | None = None) -> int:
        """Bytes of the blocks `seq_id` holds now, or with no id of every block some sequence
        holds (each counted once). A block counts whole once allocated, its last one too while
        partly filled: the storage has set its bytes aside. A block shared through the prefix
        cache counts in the figure of each sequence holding it, once in the total."""
        n = self.pool.num_used_blocks if seq_id is None else self.blocks_held(seq_id)
        return n * self.block_bytes

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    @property
    def num_seqs(self) -> int:
        """Sequences holding blocks."""
        return len(self._seqs)

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no reference (cached-but-unreferenced included)."""
        return self.pool.num_free_blocks

    def can_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` tokens fits in the whole (empty) pool."""
        return -(-num_tokens // self.block_size) <= self.num_blocks

    def slot(self, seq_id: str, position: int) -> int:
        """The flat storage slot of token `position`: block * block_size + offset."""
        seq = self._seqs[seq_id]
        table, position = seq.table, position - seq.offset
        if not 0 <= position < len(table) * self.block_size:
            raise IndexError(
                f"Position {position + seq.offset} is outside the {len(table) * self.block_size} slots of {seq_id!r}."
            )
        bs = self.block_size
        return table[position // bs] * bs + position % bs

    def slots(self, seq_id: str, start: int, end: int) -> list[int]:
        """The flat storage slots of tokens start..end-1 (the runner's slot mapping)."""
        seq = self._seqs[seq_id]
        table, off = seq.table, seq.offset
        bs = self.block_size
        if not 0 <= start - off <= end - off <= len(table) * bs:
            raise IndexError(
                f"Positions [{start}, {end}) are outside the {len(table) * bs} slots of {seq_id!r}."
            )
        return [table[p // bs] * bs + p % bs for p in range(start - off, end - off)]

    def block_owners(self) -> dict[int, list[str]]:
        """Read-only map: block id -> the sequences whose tables hold it (shared prefixes have several)."""
        owners: dict[int, list[str]] = {}
        for seq_id, seq in list(self._seqs.items()):
            for block_id in list(seq.table):
                owners.setdefault(block_id, []).append(seq_id)
        return owners

    def usage(self) -> dict:
        """Block counts (blocks_cached is a subset of blocks_free; used + free == total)
        and prefix-cache accounting in tokens."""
        q = self.prefix_queries
        return {
            "blocks_total": self.num_blocks,
            "blocks_used": self.pool.num_used_blocks,
            "blocks_cached": self.pool.num_cached_blocks,
            "blocks_free": self.pool.num_free_blocks,
            "prefix_queries": q,
            "prefix_hits": self.prefix_hits,
            "prefix_hit_rate": self.prefix_hits / q if q else 0.0,
        }
