"""`full[:dtype=...]`: keep every token exactly (the default store)."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvcache.cache.policies.base import Policy
from kvcache.cache.policies.footprint import PolicyFootprint
from kvcache.cache.policies.params import EXACT_DTYPES, Param

_EXACT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def exact_dtype(part, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a store keeps its exact tokens in (its `dtype` / `exact` key; default the model's)."""
    name = part.params.get("dtype", part.params.get("exact", "model"))
    return _EXACT.get(name, model_dtype)


def exact_token_bytes(part, config, model_dtype: torch.dtype) -> int:
    """Bytes of one token's exact K and V over all layers, in the part's `exact_dtype`."""
    c, element = config, torch.empty(0, dtype=exact_dtype(part, model_dtype)).element_size()
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * element


class Full(Policy):
    """Every kept token's K and V, in the model's dtype or the one `dtype` names."""

    name = "full"
    role = "store"
    params: ClassVar[dict[str, Param]] = {
        "dtype": Param(str, "model", choices=EXACT_DTYPES),  # e.g. full:dtype=fp16 under an fp32 model
    }
    examples = ("full", "full:dtype=bf16")
    holds_ragged_layers = True  # `stores.ExactStore` keeps a length per layer

    @classmethod
    def on_paged_blocks(cls, params: dict) -> bool:
        return params["dtype"] == "model"  # the blocks hold the model's dtype

    @classmethod
    def keeps_exactly(cls, params: dict) -> bool:
        return params["dtype"] == "model"

    @classmethod
    def make_store(cls, part, config, dtype: torch.dtype, device: torch.device, capacity: int):
        """A per-sequence store for this part (`stores.ExactStore`)."""
        from kvcache.cache.policies.stores import ExactStore

        c = config
        return ExactStore(c.num_layers, 1, c.num_kv_heads, c.head_dim, exact_dtype(part, dtype), device, capacity)

    @classmethod
    def footprint(cls, part, config, dtype: torch.dtype) -> PolicyFootprint:
        """Every token exact."""
        exact = exact_token_bytes(part, config, dtype)
        return PolicyFootprint(exact, exact, 0)

    @classmethod
    def paged_token_bytes(cls, part, config, dtype: torch.dtype) -> int:
        return exact_token_bytes(part, config, dtype)  # the model's dtype (`on_paged_blocks`)
