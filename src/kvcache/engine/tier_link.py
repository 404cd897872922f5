"""`TierLink`: the engine's two meetings with the shared KV tier (`cache.tier`).

- Before a step is scheduled, each request not yet admitted is looked up once: past the
  blocks the prefix cache already holds, the longest run of its prompt's full blocks the
  tier returns in time is written into free pool blocks and registered under their chained
  hashes (`KVCacheManager.restore_prefix`, as a saved session is), so the scheduler admits
  the request with them as ordinary prefix-cache hits and prefills only the rest.
- After a step, each block a request's chunk made full (and computed here, not fetched) is
  offered to the tier's write queue; the K/V are copied out of the pool only when the queue
  has room.

The scheduler still moves block ids only; tensors move here, on the engine thread.
"""

from __future__ import annotations

import torch

from kvcache.cache.manager import RELEASED, KVCacheManager
from kvcache.cache.tier import KVTier
from kvcache.engine.request import Request
from kvcache.errors import KVCacheError


class TierLink:
    """Fetch-on-miss and write-through between one engine's pool and a `KVTier`."""

    def __init__(self, tier: KVTier, kv: KVCacheManager, storage):
        self.tier, self.kv, self.storage = tier, kv, storage
        self.tokens_fetched = 0  # prompt tokens whose K/V came from the tier

    def prefetch(self, req: Request) -> int:
        """Bring the request's prompt blocks the pool lacks in from the tier; tokens brought."""
        req.tier_checked = True
        bs = self.kv.block_size
        tokens = req.all_token_ids
        wanted = max(len(tokens) - 1, 0) // bs  # a hit never covers the last token
        local = len(self.kv.cached_prefix_blocks(tokens[: wanted * bs]))
        room = self.kv.num_free_blocks - local  # at most: some local hits may be free blocks too
        n = min(wanted, local + max(room, 0))
        if n <= local:
            return 0
        hashes = self.kv.block_hashes(tokens, n)
        chunks = [tokens[i * bs : (i + 1) * bs] for i in range(local, n)]
        got = self.tier.fetch(hashes[local:], chunks)
        if not got:
            return 0
        k = torch.cat([b[0] for b in got], dim=2)  # (L, Hkv, len(got) * bs, D)
        v = torch.cat([b[1] for b in got], dim=2)

        def write(block_ids: list[int], first: int) -> None:
            lo = (first - local) * bs
            self.storage.write_blocks(block_ids, k[:, :, lo : lo + len(block_ids) * bs],
                                      v[:, :, lo : lo + len(block_ids) * bs])

        try:
            written, _ = self.kv.restore_prefix(tokens[: (local + len(got)) * bs], write)
        except KVCacheError:
            return 0  # the pool filled up meanwhile: those blocks are computed instead
        self.tokens_fetched += written * bs
        return written * bs

    def write_through(self, req: Request, first_block: int) -> None:
        """Offer the request's registered full blocks from `first_block` on to the tier."""
        rid, bs = req.request_id, self.kv.block_size
        hashes = self.kv.sequence_hashes(rid)
        if first_block >= len(hashes):
            return
        table, tokens = self.kv.block_table(rid), req.all_token_ids
        for i in range(first_block, len(hashes)):
            block = table[i]
            if block == RELEASED:
                continue
            self.tier.offer(hashes[i], tokens[i * bs : (i + 1) * bs],
                            lambda b=block: self.storage.read_blocks([b], bs))

    def stats(self) -> dict:
        """The tier's figures and the prompt tokens it saved this engine from computing."""
        return {**self.tier.stats(), "kv_tier_tokens_fetched": self.tokens_fetched}
