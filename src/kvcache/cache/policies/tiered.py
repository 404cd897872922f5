"""`tiered:hot=H,warm_bits=B,warm=W,cold=disk|drop`: exact recent tokens, quantized older ones, the oldest on disk."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvcache.cache.policies.base import Policy
from kvcache.cache.policies.footprint import PolicyFootprint
from kvcache.cache.policies.params import (CLIP_MODES, EXACT_DTYPES, HI_PARAMS, ROTATE_MODES, Param,
                                           check_quantizer_keys)


class Tiered(Policy):
    """Three tiers by age (`quantized_store.TieredStore`); it chooses which tokens live where,
    so it takes no selector."""

    name = "tiered"
    role = "store"
    combines_with_selectors = False
    params: ClassVar[dict[str, Param]] = {
        "hot": Param(int, 256, minimum=1),  # recent tokens, exact
        "warm_bits": Param(int, 4, choices=(8, 4, 2)),
        "warm": Param(int, 4096, minimum=0),  # older tokens kept quantized in memory
        "cold": Param(str, "disk", choices=("disk", "drop")),  # the oldest: memory-mapped file, or dropped
        "group_size": Param(int, 64, minimum=1),
        "exact": Param(str, "model", choices=EXACT_DTYPES),
        "clip": Param(str, "auto", choices=CLIP_MODES),
        "rotate": Param(str, "auto", choices=ROTATE_MODES),
        "value_group_size": Param(int, 0, minimum=0),  # channels per value group; 0: group_size if it divides head_dim
        **HI_PARAMS,
    }
    examples = ("tiered:hot=16,warm_bits=4,warm=32,cold=disk,group_size=16",)

    @classmethod
    def code_bits(cls, params: dict) -> int:
        """The width its packed tokens take (`layer_bits`: per layer, with `hi_bits` where named)."""
        return params["warm_bits"]

    @classmethod
    def check(cls, params: dict) -> None:
        check_quantizer_keys(cls.name, params, cls.code_bits(params))

    @classmethod
    def make_store(cls, part, config, dtype: torch.dtype, device: torch.device, capacity: int):
        from kvcache.cache.policies.full import exact_dtype
        from kvcache.cache.policies.quantized_store import TieredStore, quantizer_args

        c, p = config, part.params
        bits, extra, _ = quantizer_args(part, c)
        return TieredStore(c.num_layers, c.num_kv_heads, c.head_dim, p["hot"], bits, p["warm"], p["cold"],
                           p["group_size"], dtype, device, capacity, exact_dtype(part, dtype), **extra)

    @classmethod
    def footprint(cls, part, config, dtype: torch.dtype) -> PolicyFootprint:
        """Exact hot tokens (and a key group still filling), at most `warm` (and a group) packed;
        the cold tier is on disk or dropped."""
        from kvcache.cache.policies.full import exact_token_bytes
        from kvcache.cache.policies.quantized_store import packed_rate

        p = part.params
        rate, tokens = packed_rate(part, config, per_channel=True)  # KIVI keys
        return PolicyFootprint(rate, exact_token_bytes(part, config, dtype), p["hot"] + tokens - 1,
                               packed_cap=p["warm"] + tokens)
