"""`tiered:hot=H,warm_bits=B,warm=W,cold=disk|drop`: exact recent tokens, quantized older ones, the oldest on disk."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvcache.cache.policies.base import Policy
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
    def check(cls, params: dict) -> None:
        check_quantizer_keys(cls.name, params, params["warm_bits"])

    @classmethod
    def make_store(cls, part, config, dtype: torch.dtype, device: torch.device, capacity: int):
        from kvcache.cache.policies.full import exact_dtype
        from kvcache.cache.policies.quantized_store import make_quantized_store

        return make_quantized_store(part, config, dtype, exact_dtype(part, dtype), device, capacity)
