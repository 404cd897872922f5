"""Per-request policy caches inside the continuous batch (policies paged blocks cannot hold).

KIVI `quantized` (per-channel key groups, an exact residual tail, exact sinks), `tiered`,
`evict:decode=true` and their compositions keep state that whole fixed-size blocks cannot:
an exact tail that changes format as it ages, groups that span tokens, a cold tier on disk,
indices rewritten during decoding. The engine runs them by giving each running request its
own one-sequence `SequenceCache` (the same object `kvcache eval` measures) and the scheduler
still decides who runs, by need, in blocks:

- blocks are an accounting unit here (`RowPolicyStorage` holds no bytes): a block stands
  for `block_size` tokens at the policy's packed rate (`PolicyFootprint.rate`), and a
  sequence of n tokens is granted `PolicyFootprint.slots(n)` of them: its exact tokens (tail,
  sinks) at their own cost, its packed ones at the rate, no more than its selector keeps; so
  what a request really holds never passes what the scheduler granted it;
- a decode step runs every row's projections and MLP as one batch; attention is per row,
  each over its own cache (`RowsStepView`): all KIVI rows in one backend call over their
  codes (`AttentionBackend.quantized_decode_rows`), other stores over the float history
  they assemble;
- no prefix caching (a cache's bytes are private to its request) and preemption recomputes.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kvcache.cache.base import StepKVDefaults
from kvcache.cache.policies.footprint import PolicyFootprint  # the byte bound, declared by each store class


def policy_footprint(spec, config, dtype: torch.dtype, prefill_piece: int = 0) -> PolicyFootprint:
    """The footprint of a policy on a model (see `PolicyFootprint`): the one its store declares
    (`Policy.footprint`), over at most the tokens its selectors keep. `prefill_piece`: the prompt
    pieces a sequence is fed in; a selector evicts after each, so it may hold one more piece."""
    from kvcache.cache.policies.registry import POLICIES
    from kvcache.cache.policies.selectors import EVICT_UNIT

    store = POLICIES[spec.store.name].footprint(spec.store, config, dtype)
    caps = [c for c in (store.held_cap, _held_cap(spec, EVICT_UNIT + prefill_piece, config.num_layers)) if c is not None]
    return replace(store, held_cap=min(caps) if caps else None)


def _held_cap(spec, slack: int, num_layers: int) -> int | None:
    """The most tokens the policy's selectors keep, on average over the layers (None: no bound),
    `slack` (a unit and a piece) included."""
    from kvcache.cache.policies.registry import POLICIES

    caps = [cap for sel in spec.selectors
            if (cap := POLICIES[sel.name].held_cap(sel.params, slack, num_layers)) is not None]
    return min(caps) if caps else None


class RowPolicyStorage:
    """The engine's storage under per-request policy caches: no tensors, only the byte
    accounting of its blocks (see the module docstring)."""

    saves_sessions = False  # the K/V live in each request's own cache, not in blocks

    def __init__(self, num_blocks: int, block_size: int, footprint: PolicyFootprint):
        self.num_blocks, self.block_size, self.footprint = num_blocks, block_size, footprint

    def zero_blocks(self, block_ids) -> None:
        """Nothing to zero: the blocks hold no memory."""

    @property
    def bytes_per_token(self) -> int:
        """What a block's token stands for: the policy's packed rate."""
        return self.footprint.rate

    @property
    def bytes_per_block(self) -> int:
        """What a block stands for: block_size tokens at the packed rate (a grant, not memory)."""
        return self.block_size * self.footprint.rate

    @property
    def nbytes(self) -> int:
        """The budget the blocks stand for: num_blocks x bytes per block."""
        return self.num_blocks * self.bytes_per_block


class RowsStepView(StepKVDefaults):
    """One decode step (one token per row) over several sequences' own `SequenceCache`s, with
    the interface `LlamaModel.forward` drives: the rows' K/V go to their caches and each row
    attends over its own (rows whose stores attend from their codes, in one backend call)."""

    length = 0  # no shared length: rows carry their positions in the step's inputs

    def __init__(self, caches: list):
        self.caches = caches
        self.rotates_keys = caches[0].rotates_keys  # one policy for all rows
        self.attention = caches[0].attention  # one model for all rows
        self._kv: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []

    def reserve(self, n_slots: int) -> None:
        for c in self.caches:
            c.reserve(c.length + 1)

    def observes(self, t: int) -> bool:
        return False  # rows whose selectors observe do it in `attend`, with their own keys

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[None, None]:
        """Give row b's k, v (B, Hkv, 1, D) to cache b; the model then calls `attend`."""
        self._kv = [c.write(layer, k[b : b + 1], v[b : b + 1]) for b, c in enumerate(self.caches)]
        return None, None

    def attend(self, layer: int, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Row b's query q[b] (Hq, 1, D) over cache b (one query each: `mask` is None). Returns
        (B, 1, Hq*D). Rows whose stores attend from their codes do it in one backend call."""
        b_, hq, _, d = q.shape
        out: list[torch.Tensor | None] = [None] * b_
        coded = [b for b, (k, _) in enumerate(self._kv) if k is None]
        if coded:
            inputs = [self.caches[b].attend_inputs(layer) for b in coded]
            o = self.attention.quantized_decode_rows(q[coded, :, 0], inputs)  # (F, Hq, D)
            for i, b in enumerate(coded):
                out[b] = o[i].view(1, 1, hq * d)
        for b, (cache, (k, v)) in enumerate(zip(self.caches, self._kv)):
            if out[b] is not None:
                continue
            qb = q[b : b + 1]  # (1, Hq, 1, D)
            if cache.observes(1):
                cache.observe(layer, qb, k)
            out[b] = self.attention.grouped(qb, k, v, None)  # (1, 1, Hq*D)
        return torch.cat(out)  # (B, 1, Hq*D)

    def advance(self, t: int) -> None:
        for c in self.caches:
            c.advance(t)
