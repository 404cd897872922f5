"""Per-request policy caches inside the continuous batch (policies paged blocks cannot hold).

KIVI `quantized` (per-channel key groups, an exact residual tail, exact sinks), `tiered`,
`evict:decode=true` and their compositions keep state that whole fixed-size blocks cannot:
an exact tail that changes format as it ages, groups that span tokens, a cold tier on disk,
indices rewritten during decoding. The engine runs them by giving each running request its
own one-sequence `PolicyCache` (the same object `kvcache eval` measures) and the scheduler
still decides who runs, by need, in blocks:

- blocks are an accounting unit here (`RowPolicyStorage` holds no bytes): a block stands
  for `block_size` tokens at the policy's packed rate (`PolicyFootprint.rate`), and each
  sequence reserves its fixed part once (exact tail and sinks, `PolicyFootprint.fixed`), so
  what a request really holds never passes what the scheduler granted it;
- a decode step runs every row's projections and MLP as one batch; attention is per row,
  each over its own cache (`RowsStepCache`): the fused quantized kernel, or the float
  history its store assembles;
- no prefix caching (a cache's bytes are private to its request) and preemption recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.cache.spec import kv_layers_bytes
from kvcache.models.llama import attend


@dataclass(frozen=True)
class PolicyFootprint:
    """An upper bound on the bytes one sequence's `PolicyCache` holds: fixed + rate x tokens."""

    rate: int  # bytes per token of the bulk of the history (packed codes, or the exact store's)
    fixed: int  # bytes of the exact tokens a sequence holds at most (sinks + residual tail + a group)

    def reserve_tokens(self) -> int:
        """The fixed part in tokens at `rate` (what a sequence reserves in blocks up front)."""
        return -(-self.fixed // self.rate)


def policy_footprint(spec, config, dtype: torch.dtype) -> PolicyFootprint:
    """The footprint of a policy's store on a model: its exact tokens (tail, sinks) are bounded,
    the rest costs `rate` bytes a token. Selectors only ever hold fewer tokens."""
    from kvcache.cache.policies.cache import exact_dtype
    from kvcache.cache.policies.quantized_store import layer_bits, value_group

    c, part = config, spec.store
    exact = 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.empty(0, dtype=exact_dtype(part, dtype)).element_size()
    if part.name == "full":
        return PolicyFootprint(exact, 0)
    p = part.params
    per_channel = part.name == "tiered" or p["key_axis"] == "channel"
    tokens = p["group_size"] if per_channel else 1  # tokens that quantize together
    key_bits, value_bits = layer_bits(part, c.num_layers)
    vg = p["value_group_size"] or value_group(p["group_size"], c.head_dim)
    kg = p["group_size"] if per_channel else value_group(p["group_size"], c.head_dim)
    packed = (kv_layers_bytes(key_bits, kg, tokens, c.num_kv_heads, c.head_dim, "channel" if per_channel else "token")
              + kv_layers_bytes(value_bits, vg, tokens, c.num_kv_heads, c.head_dim))
    exact_tokens = (p["residual"] + p["n_sink"]) if part.name == "quantized" else p["hot"]
    return PolicyFootprint(-(-packed // tokens), exact * (exact_tokens + tokens - 1))


class RowPolicyStorage:
    """The engine's storage under per-request policy caches: no tensors, only the byte
    accounting of its blocks (see the module docstring)."""

    saves_sessions = False  # the K/V live in each request's own cache, not in blocks
    decode_sinks = False

    def __init__(self, num_blocks: int, block_size: int, footprint: PolicyFootprint, dtype: torch.dtype,
                 device: torch.device | str):
        self.num_blocks, self.block_size, self.footprint = num_blocks, block_size, footprint
        self.dtype, self.device = dtype, torch.device(device)
        self.null_block = num_blocks

    def zero_blocks(self, block_ids) -> None:
        pass

    @property
    def bytes_per_token(self) -> int:
        """What a block's token stands for: the policy's packed rate."""
        return self.footprint.rate

    @property
    def nbytes(self) -> int:
        """The budget the blocks stand for: num_blocks x block_size x rate."""
        return self.num_blocks * self.block_size * self.footprint.rate


class RowsStepCache:
    """One decode step (one token per row) over several sequences' own `PolicyCache`s, with
    the interface `LlamaModel.forward` drives: the rows' K/V go to their caches and each row
    attends over its own (a row whose store scores the codes attends itself)."""

    length = 0  # no shared length: rows carry their positions in the step's inputs

    def __init__(self, caches: list):
        self.caches = caches
        self.rotates_keys = caches[0].rotates_keys  # one policy for all rows
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

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Row b's query q[b] (Hq, 1, D) over cache b. Returns (B, 1, Hq*D)."""
        out = []
        for b, (cache, (k, v)) in enumerate(zip(self.caches, self._kv)):
            qb = q[b : b + 1]  # (1, Hq, 1, D)
            if k is None:  # the store attends from its codes
                out.append(cache.attend(layer, qb))
                continue
            if cache.observes(1):
                cache.observe(layer, qb, k)
            out.append(attend(qb, k, v, None))  # (1, 1, Hq*D)
        return torch.cat(out)  # (B, 1, Hq*D)

    def advance(self, t: int) -> None:
        for c in self.caches:
            c.advance(t)
