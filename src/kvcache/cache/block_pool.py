"""Fixed-size KV blocks: ref counts, an LRU free queue and the prefix-cache hash map.

Pure bookkeeping over block ids 0..num_blocks-1 (the tensors live in `storage.py`).
A block is in exactly one of two states:

- used: ref_count > 0, held by one or more sequences' block tables;
- free: ref_count == 0, in the free queue. A free block may still be *cached*: it keeps
  the hash (and token ids) of the full block it last held, so a later request with the
  same prefix can take it back with `touch` instead of recomputing it.

The free queue is in LRU order: a block whose ref_count drops to 0 goes to the END (most
recently freed) and `allocate` takes from the FRONT (least recently freed). Taking a cached
block for new content drops its hash from the map: that is the cache's eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvcache.errors import KVCacheError

__all__ = ["Block", "BlockPool"]


@dataclass
class Block:
    """One block of `block_size` token slots."""

    block_id: int
    ref_count: int = 0  # number of sequence tables holding this block
    block_hash: int | None = None  # set once full and registered for prefix reuse
    token_ids: tuple[int, ...] = ()  # the tokens of a full registered block (collision guard)


class BlockPool:
    """Allocates blocks, counts references and maps block hashes to cached blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise KVCacheError(f"num_blocks must be a positive number, got {num_blocks}.")
        if block_size <= 0:
            raise KVCacheError(f"block_size must be a positive number of tokens, got {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size  # tokens per block
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks: list[Block] = [Block(i) for i in range(num_blocks)]
        # Free block ids, front = least recently freed (allocated first). Values unused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_to_block: dict[int, int] = {}  # block hash -> the block id registered under it
        self._num_cached_free = 0  # free blocks that still hold a registered hash
        self.num_evictions = 0  # cached blocks whose hash was dropped (reused or reset)

    # -- counts -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_count 0 (the free-queue length), cached-but-unreferenced included."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks that still hold a registered hash (reusable by a prefix hit)."""
        return self._num_cached_free

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ref_count > 0."""
        return self.num_blocks - len(self._free)

    # -- allocation ---------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """Take `n` blocks from the front of the free queue, each with ref_count 1 and no
        hash (cached ones are evicted). None, with no change, if fewer than `n` are free."""
        if n < 0:
            raise ValueError(f"Cannot allocate a negative number of blocks ({n}).")
        if n > len(self._free):
            return None
        out: list[int] = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            assert block.ref_count == 0, f"free block {block_id} has ref_count {block.ref_count}"
            if block.block_hash is not None:
                self._num_cached_free -= 1
                self._evict(block)
            block.ref_count = 1
            out.append(block_id)
        return out

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block, in the given order. A block reaching 0 with a
        registered hash goes to the end of the free queue (kept for reuse as long as possible);
        one holding nothing reusable goes to the front (taken first). Callers free a
        sequence's table in reverse so its tail blocks are evicted before its head, which is
        likelier shared."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                assert block_id not in self._free
                self._free[block_id] = None
                if block.block_hash is not None:
                    self._num_cached_free += 1
                else:
                    self._free.move_to_end(block_id, last=False)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each block (a prefix hit): a free cached block leaves the
        free queue and keeps its content."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]  # KeyError here would mean a broken invariant
                if block.block_hash is not None:
                    self._num_cached_free -= 1
            block.ref_count += 1

    # -- prefix cache -------------------------------------------------------------------
    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> int | None:
        """The block (used or free) registered under `block_hash` whose tokens equal
        `token_ids`, else None. The token check guards against 64-bit hash collisions."""
        if not self.enable_prefix_caching:
            return None
        block_id = self._hash_to_block.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        assert block.block_hash == block_hash
        if block.token_ids != tuple(token_ids):
            return None  # a collision: same hash, different content
        return block_id

    def register(self, block_id: int, block_hash: int, token_ids: Sequence[int]) -> None:
        """Mark a full, used block as reusable under `block_hash`. If another block already
        holds that hash (two sequences computed the same prefix), the existing mapping is
        kept and this block stays unregistered. Registering a block again is a no-op."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"register of free block {block_id}"
        assert len(token_ids) == self.block_size, "only full blocks are registered"
        if block.block_hash is not None:
            assert block.block_hash == block_hash, f"block {block_id} re-registered under another hash"
            return
        if block_hash in self._hash_to_block:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._hash_to_block[block_hash] = block_id

    def reset_prefix_cache(self) -> int:
        """Forget every registered hash (used blocks keep their content but can no longer
        be shared). Returns the number of hashes dropped."""
        dropped = len(self._hash_to_block)
        for block_id in list(self._hash_to_block.values()):
            self._evict(self.blocks[block_id])
        assert not self._hash_to_block
        self._num_cached_free = 0
        return dropped

    def _evict(self, block: Block) -> None:
        assert self._hash_to_block.get(block.block_hash) == block.block_id  # type: ignore[arg-type]
        del self._hash_to_block[block.block_hash]  # type: ignore[arg-type]
        block.block_hash = None
        block.token_ids = ()
        self.num_evictions += 1

    # -- checks -------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Assert the pool's internal consistency (O(num_blocks); for tests and debugging)."""
        cached_free = 0
        for block in self.blocks:
            assert block.ref_count >= 0
            assert (block.ref_count == 0) == (block.block_id in self._free), block
            if block.block_hash is not None:
                assert self._hash_to_block[block.block_hash] == block.block_id
                assert len(block.token_ids) == self.block_size
                cached_free += block.ref_count == 0
            else:
                assert block.token_ids == ()
        assert len(self._hash_to_block) == sum(b.block_hash is not None for b in self.blocks)
        assert cached_free == self._num_cached_free
        assert len(self._free) + sum(b.ref_count > 0 for b in self.blocks) == self.num_blocks
