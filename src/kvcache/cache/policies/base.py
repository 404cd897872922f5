"""What a policy is: one named part of a policy string, declared by one class in its own file.

A policy class declares
- `name` and `role`: a "selector" chooses which tokens are kept (window, sinks, evict), a
  "store" how the kept tokens are held (full, quantized, tiered); a policy string has any
  selectors and at most one store;
- `params`: its keys (`params.Param`: type, default, range), from which the grammar parses,
  checks and fills a part (`fill`, then `check` for rules between keys);
- where it runs: `on_paged_blocks(params)`, whether the paged engine runs it on its blocks;
  otherwise each request gets a per-request store (`row_policy`);
- whether its layers keep different numbers of tokens (`ragged_layers(params)`, selectors): only
  a store that holds a length per layer (`holds_ragged_layers`) takes it, and no other selector;
- its memory: `held_cap` (selectors: the most tokens kept, averaged over the layers); stores build their per-request
  store (`make_store`) and declare its bytes (`footprint`, a `footprint.PolicyFootprint`), and,
  where they run on paged blocks, a token's bytes there (`paged_token_bytes`) and the blocks'
  format (`paged_format`: None for float blocks, else the quantized one).

The registry (`policies/registry.py`) lists the classes; a new policy is one file there.
"""

from __future__ import annotations

from typing import ClassVar

from kvcache.cache.policies.footprint import PolicyFootprint
from kvcache.cache.policies.params import Param


class Policy:
    """Base of every policy class; subclasses set `name`, `role` and `params`."""

    name: ClassVar[str] = ""
    role: ClassVar[str] = ""  # "selector" | "store"
    params: ClassVar[dict[str, Param]] = {}
    combines_with_selectors: ClassVar[bool] = True  # stores only: False where the store chooses tokens itself
    holds_ragged_layers: ClassVar[bool] = False  # stores only: True where each layer may hold its own number
    # policy strings the equivalence grid runs on a tiny model (tests/integration/test_policy_grid.py):
    # every path the policy takes against its one-sequence reference, with no test written for it
    examples: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def fill(cls, given: dict) -> dict:
        """The part's keys: the values given, the declared defaults for the rest."""
        return {k: given.get(k, p.default) for k, p in cls.params.items()}

    @classmethod
    def check(cls, params: dict) -> None:
        """Raise KVCacheError (one sentence) where keys contradict each other."""

    @classmethod
    def on_paged_blocks(cls, params: dict) -> bool:
        """Whether the paged engine runs this part on its shared blocks (False: a per-request store)."""
        return False

    @classmethod
    def keeps_exactly(cls, params: dict) -> bool:
        """Stores: whether this part keeps every token exactly, in the model's dtype (the plain cache)."""
        return False

    @classmethod
    def paged_plan(cls, part) -> dict:
        """Selectors the paged engine runs on its blocks: what it does there, as `PagedPlan`'s fields
        (`window`: free the blocks behind it; `sinks`: (n_sink, window), keep the sinks' blocks;
        `evict`: the part, each prompt compressed once)."""
        return {}

    @classmethod
    def ragged_layers(cls, params: dict) -> bool:
        """Selectors: whether this part keeps a different number of tokens in each layer."""
        return False

    @classmethod
    def held_cap(cls, params: dict, slack: int, num_layers: int) -> int | None:
        """The most tokens a sequence keeps under this part (None: no bound), `slack` included;
        where layers keep different numbers, the most they keep on average over the `num_layers`."""
        return None

    @classmethod
    def footprint(cls, part, config, dtype) -> PolicyFootprint:
        """Stores: the bytes a per-request store of this part holds (`held_cap` left None: the
        selectors bound it, see `row_policy.policy_footprint`); `config` the model's, `dtype` its."""
        raise NotImplementedError(f"The store '{cls.name}' declares no footprint.")

    @classmethod
    def paged_token_bytes(cls, part, config, dtype) -> int:
        """Stores that run on paged blocks: the bytes a token takes there, K and V of all layers."""
        raise NotImplementedError(f"The store '{cls.name}' does not run on paged blocks.")

    @classmethod
    def paged_format(cls, part, head_dim: int):
        """Stores that run on paged blocks: their blocks' quantized format (`paged_quant.TokenQuantFormat`),
        or None where the blocks hold the model's float K/V."""
        return None
